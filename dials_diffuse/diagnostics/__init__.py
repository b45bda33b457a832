"""Visual diagnostics of extracted and merged diffuse scattering (dials.diffuse_check).

* ``extraction_check.run_extraction_check``: plots and summaries of one
  extracted image (``extraction_plots`` draws them);
* ``merged_check.run_merged_check``: plots and summaries of a merged map
  (``merged_plots`` draws them, ``sections`` cuts central sections);
* ``report.write_report``: the self-contained HTML page of a run.

``run_check(inputs, params, experiments)`` is the library entry point behind
the command: it picks the mode from the classified inputs.
"""

from __future__ import annotations

import logging
import os

from dials_diffuse.command_util import ensure_output_directory

logger = logging.getLogger("dials.diffuse_check")

DEFAULT_DIRECTORIES = {"extraction": "extraction_visual_check", "merged": "phase3_diagnostics"}
REPORT_NAME = "dials.diffuse_check.html"


def run_check(found, params, experiments=None):
    """Run the diagnostics of the mode of ``found``; returns the Inventory."""
    if params.output.directory is None:
        params.output.directory = DEFAULT_DIRECTORIES[found.mode]
    out_dir = params.output.directory
    ensure_output_directory(out_dir)
    logger.info("%s diagnostics into %s", found.mode.capitalize(), out_dir)
    # local imports: the check modules load matplotlib (about 1 s), needed
    # only when diagnostics run (dials.diffuse_process imports this package)
    if found.mode == "extraction":
        from dials_diffuse.diagnostics.extraction_check import run_extraction_check

        inventory = run_extraction_check(found, params, experiments)
        title = "Extraction diagnostics"
    else:
        from dials_diffuse.diagnostics.merged_check import run_merged_check

        inventory = run_merged_check(found, params, experiments)
        title = "Merged-map diagnostics"
    if params.output.html:
        from dials_diffuse.diagnostics.report import write_report

        write_report(inventory, os.path.join(out_dir, REPORT_NAME), title)
    return inventory
