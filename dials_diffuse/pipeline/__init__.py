"""From raw images to merged diffuse maps and diagnostics in one call.

``process(image_paths, params)`` is the library entry point behind
``dials.diffuse_process`` (the command only parses, calls and writes the log):

1. **Phase 1, DIALS processing** (:mod:`dials_diffuse.processing`), unless
   the run starts from DIALS' refined experiments (:func:`check_model_inputs`:
   ``refined.expt [imported.expt] [refined.refl]``): import,
   spot finding, indexing (stills each on their own through the DIALS stills
   indexer, made to work on Debian's DIALS 3.12 by
   :func:`dials_diffuse.dials_compat.ensure_stills_indexing`; rotation
   sequences together with scan-varying refinement) and refinement (stills: one
   detector shared by all indexed stills when there are enough of them).
   An image that does not index is reported and left out.
2. **Validation** of the crystal models against ``reference_pdb`` (unit cell
   within tolerance, same Laue group) and between images (cell spread of the
   stills, RMS misorientation of a sequence); failing images are left out
   (``validation.on_failure=continue``) or stop the run (``stop``).
3. **Extraction** (:func:`dials_diffuse.extraction.extract`) into
   ``diffuse_extracted/`` with masks, and extraction diagnostics of the first
   extracted image (``extraction_diagnostics/``).
4. With two or more extracted images, **merging**
   (:func:`dials_diffuse.merging.merge_run`, ``diffuse_merged/``) and the
   merged-map diagnostics (``phase3_diagnostics/``).

Every step records a signature (its parameters and inputs) in
``dials.diffuse_process.json``; a later run on the same ``output.base_dir``
reuses a step whose outputs are complete and whose signature is unchanged,
unless ``overwrite=True``.

The package follows the run's phases; this module holds only the flow of
:func:`process`:

* :mod:`.params`: the PHIL scope (:data:`phil_scope`), built from the
  library's scopes (:mod:`dials_diffuse.phil_scopes`) and DIALS' own;
* :mod:`.inputs`: input checks before anything is written (:class:`Inputs`);
* :mod:`.state`: :class:`~.state.RunState`, the run's summary and reuse
  decisions, passed explicitly to every phase and changed only through its
  methods;
* :mod:`.phase1`: DIALS import, spot finding, indexing, refinement;
* :mod:`.validation`: crystal-model checks;
* :mod:`.steps`: extraction, merging, diagnostics;
* :mod:`.summary`: the manifest of outputs and the tables in the log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from dials.util import Sorry

from dials_diffuse.pipeline.inputs import (
    Inputs,
    check_inputs,
    check_model_inputs,
    read_reference_symmetry,
)
from dials_diffuse.pipeline.params import (
    default_params,
    dials_arguments,
    dials_overrides,
    params_from,
    phil_scope,
    resolve_short_names,
)
from dials_diffuse.pipeline.phase1 import given_models, load_expts, run_phase1
from dials_diffuse.pipeline.state import SUMMARY_NAME, RunState, models_fingerprint, signature
from dials_diffuse.pipeline.steps import (
    EXTRACTION_DIAGNOSTICS_DIR,
    PHASE3_DIAGNOSTICS_DIR,
    run_diagnostics,
    run_extraction,
    run_merge,
)
from dials_diffuse.pipeline.summary import finish
from dials_diffuse.pipeline.validation import apply_validation, validate

__all__ = [
    "LOG_NAME", "SUMMARY_NAME", "Inputs", "check_inputs", "check_model_inputs", "default_params",
    "dials_arguments",
    "dials_overrides", "load_expts", "params_from", "phil_scope", "process",
    "read_reference_symmetry", "resolve_short_names", "validate",
]

logger = logging.getLogger("dials.diffuse_process")

#: the command's log file (opened by dials.diffuse_process in the base directory)
LOG_NAME = "dials.diffuse_process.log"


def process(image_paths, params, inputs: Optional[Inputs] = None, dials_args=None) -> dict:
    """Run the whole pipeline on ``image_paths``; returns the summary dict
    (also written to ``output.base_dir/dials.diffuse_process.json``).

    ``params``: from :data:`phil_scope` (``default_params()``,
    ``params_from(...)``). ``inputs``: the result of :func:`check_inputs`
    when already called (the command checks inputs before it opens the log),
    or of :func:`check_model_inputs` to start from crystal models (phase 1
    skipped; ``image_paths`` then ``inputs.image_paths``).
    ``dials_args``: DIALS parameters the user set explicitly
    (:func:`dials_arguments`), applied last.
    Raises ``Sorry`` on bad input or when nothing is left to process; per-image
    failures are listed in ``summary["failures"]`` and the run goes on.
    """
    t_start = time.perf_counter()
    if inputs is None:
        inputs = check_inputs(image_paths, params)
    base = Path(params.output.base_dir)
    base.mkdir(parents=True, exist_ok=True)
    run = RunState(params, inputs, dials_args or ())
    logger.info(
        "dials.diffuse_process: %d image(s), %s mode, output in %s",
        len(inputs.image_paths), inputs.mode, base,
    )
    if inputs.reference_symmetry is not None:
        logger.info("Reference symmetry from %s: %s", params.reference_pdb,
                    str(inputs.reference_symmetry).replace("\n", ", "))
    try:
        if inputs.models is not None:
            models, refl, strong = given_models(run)
        else:
            models, refl, strong = run_phase1(run)
        models, refl = apply_validation(run, models, refl)
        upstream = signature(run.signature_of("phase1"), models_fingerprint(models))

        extract_dir, manifest, sig_extract = run_extraction(run, models, strong, upstream,
                                                            indexed=refl)
        if params.diagnostics.extraction:
            run_diagnostics(run, "extraction", models, [extract_dir],
                            run.base / EXTRACTION_DIAGNOSTICS_DIR, sig_extract)
        else:
            run.step("extraction_diagnostics", "skipped", reason="diagnostics.extraction=False")

        if manifest["n_extracted"] >= 2:
            merged_dir, sig_merge = run_merge(run, models, extract_dir, manifest, sig_extract)
            if params.diagnostics.merged:
                run_diagnostics(run, "phase3", models, [merged_dir, extract_dir],
                                run.base / PHASE3_DIAGNOSTICS_DIR, sig_merge)
            else:
                run.step("phase3_diagnostics", "skipped", reason="diagnostics.merged=False")
        else:
            logger.info("One extracted image: no merging (the phase-2 path)")
            run.step("merge", "skipped", reason="fewer than 2 extracted images")
    except Sorry as e:
        run.record("error", str(e))
        run.record("seconds_total", round(time.perf_counter() - t_start, 2))
        run.save()
        raise
    run.record("seconds_total", round(time.perf_counter() - t_start, 2))
    return finish(run)

