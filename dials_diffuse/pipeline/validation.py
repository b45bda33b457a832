"""Validation of the crystal models of a run: against the reference PDB
(unit cell, Laue group) and between images (cell spread of stills, RMS
misorientation of sequences); failing images are left out or stop the run."""

from __future__ import annotations

import logging
import time

import numpy as np
from dxtbx import flumpy
from dxtbx.model.experiment_list import ExperimentList

from dials.util import Sorry

from dials_diffuse import crystal_checks
from dials_diffuse.pipeline.inputs import path_of
from dials_diffuse.pipeline.state import RunState

logger = logging.getLogger("dials.diffuse_process")


def validate(experiments, params, reference_symmetry=None, image_of=None) -> dict:
    """Check the crystal models. Returns ``{"checks": [...], "failed": {experiment
    id: [reasons]}, ...}``; nothing is raised.

    * against ``reference_symmetry`` (cctbx crystal.symmetry): same Laue group,
      cell edges within ``cell_length_tolerance`` (relative), angles within
      ``cell_angle_tolerance`` (degrees);
    * stills: every cell edge within ``max_cell_spread`` of the median cell;
      the RMS misorientation from the first still (modulo symmetry) is reported;
    * sequences: RMS misorientation along the scan (scan-varying models) and
      between sequences (modulo symmetry) below ``max_rms_misorientation_deg``.
    """
    v = params.validation
    crystals = [e.crystal for e in experiments]
    failed = {}
    report = {"n_models": len(crystals)}

    def fail(i, reason):
        failed.setdefault(i, []).append(reason)

    if reference_symmetry is not None:
        ref_cell = reference_symmetry.unit_cell().parameters()
        ref_sg = reference_symmetry.space_group()
        report["reference"] = {
            "unit_cell": [round(x, 3) for x in ref_cell],
            "space_group": str(reference_symmetry.space_group_info()),
        }
        for i, c in enumerate(crystals):
            sg = c.get_space_group()
            if not crystal_checks.same_laue_group(sg, ref_sg):
                fail(i, f"space group {sg.info()} is not compatible with the reference "
                        f"{reference_symmetry.space_group_info()} (different Laue group)")
            cell = c.get_unit_cell().parameters()
            rel = max(abs(a - b) / b for a, b in zip(cell[:3], ref_cell[:3]))
            ang = max(abs(a - b) for a, b in zip(cell[3:], ref_cell[3:]))
            if rel > v.cell_length_tolerance or ang > v.cell_angle_tolerance:
                fail(i, "unit cell " + ", ".join(f"{x:.2f}" for x in cell)
                        + f" differs from the reference by {100 * rel:.1f} % / {ang:.1f} deg "
                        f"(tolerance {100 * v.cell_length_tolerance:.1f} % / "
                        f"{v.cell_angle_tolerance} deg)")

    is_still = all(e.is_still() for e in experiments)
    if crystals:
        spread = crystal_checks.cell_spread(crystals)
        rel = spread.relative_deviation
        report["cell_median"] = [round(float(x), 4) for x in spread.median]
        report["cell_max_relative_deviation"] = round(float(rel.max()), 5)
        if is_still and len(crystals) > 1:
            for i in spread.outliers(v.max_cell_spread):
                fail(int(i), f"cell edge {100 * rel[i].max():.1f} % from the median cell of the "
                             f"stills (max_cell_spread {100 * v.max_cell_spread:.1f} %)")
    angles = crystal_checks.misorientations_from_first(crystals)
    comparable = bool(np.isfinite(angles).any())
    if comparable:
        report["rms_misorientation_from_first_deg"] = round(
            crystal_checks.rms_misorientation(angles), 4)
    if not is_still:
        if comparable:
            rms = report["rms_misorientation_from_first_deg"]
            if rms > v.max_rms_misorientation_deg:
                for i in range(1, len(crystals)):
                    fail(i, f"RMS misorientation between sequences {rms:.2f} deg > "
                            f"{v.max_rms_misorientation_deg}")
        for i, e in enumerate(experiments):
            drift = crystal_checks.scan_rms_misorientation(e)
            if drift is not None:
                report.setdefault("scan_rms_misorientation_deg", {})[i] = round(drift, 4)
                if drift > v.max_rms_misorientation_deg:
                    fail(i, f"RMS misorientation along the scan {drift:.2f} deg > "
                            f"{v.max_rms_misorientation_deg}")
    report["failed"] = {int(k): r for k, r in failed.items()}
    report["passed"] = len(crystals) - len(failed)
    return report


def apply_validation(run: RunState, experiments, reflections):
    """Validate, log, record per image; returns the experiments (and
    reflections) that go on."""
    t0 = time.perf_counter()
    params = run.params
    report = validate(experiments, params, run.inputs.reference_symmetry)
    failed = report["failed"]
    for i, reasons in failed.items():
        for path in _paths_of(experiments[i]):
            run.fail_image(path, "validation", "; ".join(reasons))
        logger.warning("Validation failed for experiment %d (%s): %s", i,
                       path_of(experiments[i]), "; ".join(reasons))
    run.record("validation", report)
    status = "passed" if not failed else f"{len(failed)} failed"
    run.step("validation", status, time.perf_counter() - t0, on_failure=params.validation.on_failure)
    if failed and params.validation.on_failure == "stop":
        run.save()
        raise Sorry(
            f"validation failed for {len(failed)} of {len(experiments)} crystal model(s) "
            f"(validation.on_failure=stop); first: {path_of(experiments[min(failed)])}: "
            f"{failed[min(failed)][0]}"
        )
    if not failed:
        return experiments, reflections
    keep = [i for i in range(len(experiments)) if i not in failed]
    if not keep:
        run.save()
        raise Sorry(f"no crystal model passed validation; first reason: {failed[min(failed)][0]}")
    kept = ExperimentList([experiments[i] for i in keep])
    logger.info("%d of %d crystal models go on after validation", len(kept), len(experiments))
    if reflections is None:
        return kept, None
    ids = flumpy.to_numpy(reflections["id"])
    sel = np.isin(ids, keep)
    refl = reflections.select(flumpy.from_numpy(sel))
    new_ids = np.full(len(experiments), -1)
    new_ids[keep] = np.arange(len(keep))
    refl["id"] = flumpy.from_numpy(new_ids[flumpy.to_numpy(refl["id"])].astype(np.int32))
    refl.clean_experiment_identifiers_map()
    for j, e in enumerate(kept):
        refl.experiment_identifiers()[j] = e.identifier
    return kept, refl


def _paths_of(expt):
    try:
        return [expt.imageset.get_path(k) for k in range(len(expt.imageset))]
    except Exception:
        return []

