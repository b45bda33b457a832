"""
From raw images to corrected, scaled and merged 3-D diffuse maps, with
diagnostics, in one command.

Phase 1 (DIALS): import, spot finding, indexing and refinement. Stills
(zero-oscillation images) are indexed each on their own with the DIALS stills
indexer and, when at least three index, refined together with one shared
detector; rotation images are indexed together and refined scan-varying
(processing.mode=auto chooses from the images). Images that do not index are
reported and left out. The crystal models are validated against reference_pdb
(unit cell, Laue group) and against each other (cell spread of stills, RMS
misorientation of sequences); validation.on_failure=continue leaves failing
images out, stop ends the run.

Started from DIALS' crystal models instead of images (refined.expt, with
imported.expt for the images to extract and refined.refl for the Bragg
masks, as dials.diffuse_extract takes them), phase 1 is skipped: one command
after dials.refine gives the maps and their diagnostics.

Phase 2: masks and extraction (every extract.* parameter of
dials.diffuse_extract), then diagnostics of the first extracted image.
Phase 3, with two or more extracted images: scaling and merging (merge.*,
dials.diffuse_merge) and diagnostics of the merged map (check.*,
dials.diffuse_check).

DIALS' own parameters keep their names (spotfinder.*, indexing.*,
refinement.*, e.g. indexing.known_symmetry.space_group); dials_phil=file.phil
adds a file of them. Short names resolve to the diffuse scopes first
(filter.d_min means extract.filter.d_min; write spotfinder.filter.d_min for
DIALS'). Parameter-set files (phil/*.phil) may be given as arguments.

Outputs in output.base_dir: imported.expt, strong.refl, indexed.expt/.refl,
refined.expt/.refl, per_image/ (stills), diffuse_extracted/ (with masks),
extraction_diagnostics/, diffuse_merged/, phase3_diagnostics/,
dials.diffuse_process.json (summary: steps, per-image status, failures, CC1/2),
intermediate_outputs_manifest.json and dials.diffuse_process.log. A re-run on
the same base_dir reuses finished steps whose inputs and parameters did not
change, unless output.overwrite=True.

Examples::

  dials.diffuse_process image_*.cbf output.base_dir=diffuse_run

  dials.diffuse_process thau_3_2_00*.cbf.bz2 phil/thaumatin_grid_stills.phil \\
    indexing.known_symmetry.space_group=P41212 \\
    indexing.known_symmetry.unit_cell=57.9,57.9,150.2,90,90,90 \\
    filter.pixel_step=2 output.base_dir=thaumatin

  dials.diffuse_process image_0001.cbf reference_pdb=model.pdb \\
    dials_phil=my_dials.phil output.base_dir=one_image

  dials.diffuse_process rotation_*.cbf processing.mode=sequence \\
    merge.symmetry.merge=friedel merge.scaling.offsets=True

  dials.diffuse_process refined.expt imported.expt refined.refl \\
    output.base_dir=diffuse_run
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List

import dials.util
import dials.util.log
from dials.util import Sorry
from dials.util.options import ArgumentParser
from dials.util.version import dials_version

from dials_diffuse import pipeline
from dials_diffuse.command_util import modified_parameters, split_preset_files
from dials_diffuse.startup import run_and_exit

logger = logging.getLogger("dials.diffuse_process")

phil_scope = pipeline.phil_scope


@dials.util.show_mail_handle_errors()
def run(args: List[str] = None, phil=phil_scope) -> None:
    usage = (
        "dials.diffuse_process [options] image_0001.cbf [image_0002.cbf ...] "
        "output.base_dir=diffuse_run\n"
        "       dials.diffuse_process [options] refined.expt [imported.expt] [refined.refl] "
        "output.base_dir=diffuse_run"
    )
    parser = ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=False,
        read_reflections=False,
        check_format=False,
        epilog=__doc__,
    )
    if args is None:
        args = sys.argv[1:]
    args, ignored_presets = split_preset_files(args, phil)
    args = pipeline.resolve_short_names(args, phil)
    params, options, unhandled = parser.parse_args(
        args=args, show_diff_phil=False, return_unhandled=True
    )
    images, experiments, reflections = [], [], []
    for arg in unhandled:
        if "=" in arg and not os.path.exists(arg):
            raise Sorry(f"unknown or ambiguous parameter: {arg}")
        if not os.path.exists(arg):
            raise Sorry(f"file not found: {arg}")
        kind = (experiments if arg.endswith(".expt") else
                reflections if arg.endswith(".refl") else images)
        kind.append(arg)
    if not images and not experiments and not reflections and not args:
        parser.print_help()
        return
    if images and (experiments or reflections):
        raise Sorry("give images, or DIALS' crystal models (refined.expt [imported.expt] "
                    "[refined.refl]), not both")
    # every input is checked (and the images imported) before anything is written
    if experiments or reflections:
        inputs = pipeline.check_model_inputs(experiments, reflections, params)
    else:
        inputs = pipeline.check_inputs(images, params)
    base = Path(params.output.base_dir)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Sorry(f"cannot create output.base_dir {base}: {e.strerror}")
    if not os.access(base, os.W_OK):
        raise Sorry(f"output.base_dir {base} is not writable")
    dials.util.log.config(verbosity=options.verbose, logfile=str(base / pipeline.LOG_NAME))
    logger.info(dials_version())
    for item in ignored_presets:
        logger.info("Preset parameter not used by this command: %s", item)
    diff = modified_parameters(parser)
    if diff:
        logger.info("The following parameters have been modified:\n%s", diff)
    dials_args = pipeline.dials_arguments(args, phil)
    summary = pipeline.process(inputs.image_paths, params, inputs=inputs, dials_args=dials_args)
    logger.info("Summary: %s", base / pipeline.SUMMARY_NAME)
    for name in ("extraction_diagnostics", "phase3_diagnostics"):
        report = summary["steps"].get(name, {}).get("report")
        if report:
            logger.info("Diagnostics report: %s", base / report)


def main() -> None:
    """The console entry point: run(), then exit without the interpreter's
    teardown (startup.run_and_exit)."""
    run_and_exit(run)


if __name__ == "__main__":
    run()
