"""Phase 1 of the run: DIALS import, spot finding, indexing and refinement.

Stills are indexed each on their own (:func:`dials_diffuse.processing.index_stills`)
and refined with one shared detector; rotation images are indexed together
and refined scan-varying. Owns the DIALS files written in the base directory.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from dxtbx import flumpy
from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

from dials.array_family import flex
from dials.util import Sorry

from dials_diffuse import io, processing
from dials_diffuse.command_util import resolve_nproc
from dials_diffuse.pipeline.inputs import capture_stdout, unreadable_image
from dials_diffuse.pipeline.params import DIALS_SCOPES, dials_overrides, libtbx_auto, scope_text
from dials_diffuse.pipeline.state import RunState, signature

logger = logging.getLogger("dials.diffuse_process")

#: files written in the base directory
IMPORTED = "imported.expt"
STRONG = "strong.refl"
INDEXED_EXPT, INDEXED_REFL = "indexed.expt", "indexed.refl"
REFINED_EXPT, REFINED_REFL = "refined.expt", "refined.refl"
PER_IMAGE_DIR = "per_image"


#: Spot-finding threshold for simulated images (dials_diffuse.simulate):
#: their diffuse halos exceed DIALS' default strong-pixel limit.
SIMULATED_SPOTFINDING = "spotfinder.threshold.dispersion.global_threshold=400"


def write_refl(path, table):
    with io.atomic_path(str(path)) as tmp:
        table.as_file(tmp)


def load_expts(path, check_format=True):
    return ExperimentListFactory.from_json_file(str(path), check_format=check_format)


def load_refl(path):
    return flex.reflection_table.from_file(str(path))


def _cell(crystal):
    return [round(float(v), 4) for v in crystal.get_unit_cell().parameters()]


def _phase1_signature(run: RunState):
    p = run.params
    dials_file = ""
    if p.dials_phil:
        dials_file = Path(p.dials_phil).read_text()
    return signature(
        "phase1/1",
        [os.path.realpath(x) for x in run.inputs.image_paths],
        run.inputs.mode,
        scope_text(p, DIALS_SCOPES),
        [a.as_str() for a in run.dials_args],
        dials_file,
        p.processing.refine_shared_detector,
        p.processing.shared_detector_min_stills,
        p.processing.min_spots,
        p.processing.scan_varying,
    )


def given_models(run: RunState):
    """Phase 1 when the run starts from DIALS' crystal models (refined.expt
    [imported.expt] [refined.refl]): nothing to process; the images matched to
    a model are marked indexed. Returns (models, reflections, reflections):
    the given table serves as the indexed and the strong spots."""
    inputs = run.inputs
    # summary entries by path, in order: a container file (HDF5) holds
    # several images under one path, matched in turn (one lookup per image,
    # not a scan of the summary)
    entries = {}
    for i, path in enumerate(inputs.image_paths):
        entries.setdefault(os.path.realpath(path), []).append(i)
    for j, expt in enumerate(inputs.models):
        for k in range(len(expt.imageset)):
            matches = entries.get(os.path.realpath(expt.imageset.get_path(k)))
            if matches:
                run.update_image(index=matches.pop(0), status="indexed", experiment_id=j)
    run.set_unit_cells(lambda j: _cell(inputs.models[j].crystal))
    run.record("n_indexed", sum(e.get("status") == "indexed" for e in run.summary["images"]))
    files = [os.path.realpath(f) for f in inputs.model_files]
    # the files' identity (size and time): a rerun on the same files reuses
    # the later steps
    stats = [(os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    run.record_signature("phase1", signature("models/1", files, stats))
    run.step("phase1", "skipped", reason="crystal models given: " + ", ".join(
        os.path.basename(f) for f in inputs.model_files))
    return inputs.models, inputs.reflections, inputs.reflections


def run_phase1(run: RunState):
    """Import, spot finding, indexing, refinement; returns the refined
    experiments (imagesets loaded) and reflections."""
    params = run.params
    base = run.base
    sig = _phase1_signature(run)
    refined_path = base / REFINED_EXPT
    if run.reusable("phase1", sig, refined_path, base / REFINED_REFL, base / STRONG):
        t0 = time.perf_counter()
        refined = load_expts(refined_path)
        refined_refl = load_refl(base / REFINED_REFL)
        strong = load_refl(base / STRONG)
        run.restore_phase1(sig)
        logger.info(
            "Phase 1: reusing %s (%d experiments) from a previous run (%.1f s)",
            refined_path, len(refined), time.perf_counter() - t0,
        )
        return refined, refined_refl, strong

    overrides = dials_overrides(params, run.inputs.dials_phil_scope, run.dials_args)
    nproc_override = []
    if params.mp.nproc not in (None, libtbx_auto()):
        nproc_override = [f"spotfinder.mp.nproc={params.mp.nproc}"]

    experiments = run.inputs.experiments
    t0 = time.perf_counter()
    io.write_experiments(str(base / IMPORTED), experiments)
    run.step("import", "done", time.perf_counter() - t0, n_experiments=len(experiments),
             outputs=[IMPORTED])

    # -- spot finding
    t0 = time.perf_counter()
    spot_defaults = [SIMULATED_SPOTFINDING] if _simulated(experiments) else []
    if spot_defaults:
        logger.info("Simulated images (dials.diffuse_simulate): %s", spot_defaults[0])
    try:
        with capture_stdout():
            strong = processing.find_spots(experiments, spot_defaults + nproc_override + overrides)
    except Sorry:
        raise
    except Exception as e:
        bad = unreadable_image(experiments)
        if bad:
            raise Sorry(f"cannot read image {bad[0]} (truncated or corrupt?): {bad[1]}")
        raise Sorry(f"spot finding failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    write_refl(base / STRONG, strong)
    counts = _spots_per_experiment(strong, len(experiments))
    run.set_spot_counts(_per_image(counts, experiments, run))
    run.step("find_spots", "done", time.perf_counter() - t0, n_spots=len(strong), outputs=[STRONG])
    run.save()

    if run.inputs.mode == "stills":
        refined, refined_refl = _phase1_stills(run, experiments, strong, overrides)
    else:
        refined, refined_refl = _phase1_sequence(run, experiments, strong, overrides)
    run.record_signature("phase1", sig)
    run.save()
    return refined, refined_refl, strong


def _simulated(experiments) -> bool:
    """Images written by dials.diffuse_simulate (truth.json beside them)."""
    try:
        directory = os.path.dirname(experiments[0].imageset.get_path(0))
    except Exception:
        return False
    return os.path.isfile(os.path.join(directory, "truth.json"))


def _spots_per_experiment(strong, n):
    ids = flumpy.to_numpy(strong["id"]) if len(strong) else np.zeros(0, int)
    return np.bincount(ids, minlength=n).tolist()


def _per_image(counts, experiments, run):
    """Spot counts per input image (stills: one experiment per image)."""
    if len(experiments) == run.n_images:
        return counts
    return [None] * run.n_images


def _phase1_stills(run: RunState, experiments, strong, overrides):
    params = run.params
    base = run.base
    t0 = time.perf_counter()
    with capture_stdout():
        result = processing.index_stills(
            experiments, strong, known_symmetry=None, params_overrides=overrides,
            min_spots=params.processing.min_spots, nproc=resolve_nproc(params),
        )
    for r in result.report:
        run.update_image(
            r.path, r.index,
            n_spots=r.n_spots,
            n_indexed=r.n_indexed,
            indexing_seconds=round(r.time_s, 2),
        )
        if r.indexed:
            run.update_image(
                r.path, r.index,
                status="indexed",
                experiment_id=r.experiment_id,
                unit_cell_indexed=list(r.unit_cell),
                space_group=r.space_group,
                rmsd_px=[round(r.rmsd_x_px, 3), round(r.rmsd_y_px, 3)],
            )
        else:
            run.fail_image(r.path, "indexing", r.reason)
            logger.warning("Not indexed: %s: %s", os.path.basename(r.path), r.reason)
    n_ok = result.n_indexed_images
    run.record("n_indexed", n_ok)
    outputs = []
    if n_ok:
        io.write_experiments(str(base / INDEXED_EXPT), result.experiments)
        write_refl(base / INDEXED_REFL, result.reflections)
        outputs = [INDEXED_EXPT, INDEXED_REFL]
    run.step(
        "index", "done" if n_ok else "failed", time.perf_counter() - t0,
        n_indexed=n_ok, n_failed=len(result.failures), outputs=outputs,
    )
    run.save()
    if n_ok == 0:
        raise Sorry(
            f"no image could be indexed ({len(experiments)} tried); first reason: "
            + (result.failures[0].reason if result.failures else "unknown")
        )

    # -- joint refinement of a shared detector
    t0 = time.perf_counter()
    choice = params.processing.refine_shared_detector
    do_shared = choice == "yes" or (
        choice == "auto" and n_ok >= params.processing.shared_detector_min_stills
    )
    refined, refined_refl = result.experiments, result.reflections
    info = {}
    status = "skipped"
    if do_shared:
        try:
            refine_overrides = [o for o in overrides]
            with capture_stdout():
                refined, refined_refl, info = processing.refine_shared_detector(
                    result.experiments, result.reflections, refine_overrides
                )
            status = "done"
        except Exception as e:  # graceful: keep the per-still models
            status = "failed"
            info = {"reason": f"{type(e).__name__}: {e}".splitlines()[0]}
            logger.warning(
                "Shared-detector refinement failed (%s): keeping the per-still models",
                info["reason"],
            )
    else:
        logger.info(
            "Shared-detector refinement skipped (%d indexed stills, "
            "refine_shared_detector=%s)", n_ok, choice,
        )
    io.write_experiments(str(base / REFINED_EXPT), refined)
    write_refl(base / REFINED_REFL, refined_refl)
    run.set_unit_cells(lambda i: _cell(refined[i].crystal))
    outputs = [REFINED_EXPT, REFINED_REFL]
    if params.output.save_intermediate_outputs:
        outputs += _write_per_image(base, refined, refined_refl)
    run.record("phase1", {"shared_detector": info})
    run.step("refine", status if status != "skipped" else "done", time.perf_counter() - t0,
             shared_detector=status, outputs=outputs, **_refine_info(info))
    return refined, refined_refl


def _refine_info(info):
    keep = ("distance_before_mm", "distance_after_mm", "final_rmsds", "n_reflections_used", "reason")
    return {k: info[k] for k in keep if k in info}


def _write_per_image(base, experiments, reflections):
    """Per-still refined.expt/.refl in per_image/ (cheap: a few kB each)."""
    out_dir = base / PER_IMAGE_DIR
    out_dir.mkdir(exist_ok=True)
    written = []
    ids = flumpy.to_numpy(reflections["id"])
    for i, expt in enumerate(experiments):
        stem = Path(expt.imageset.get_path(0)).name.split(".")[0]
        single = ExperimentList([expt])
        io.write_experiments(str(out_dir / f"{stem}_refined.expt"), single)
        refl = reflections.select(flumpy.from_numpy(ids == i))
        refl.clean_experiment_identifiers_map()
        refl["id"] = flex.int(len(refl), 0)
        refl.experiment_identifiers()[0] = expt.identifier
        write_refl(out_dir / f"{stem}_refined.refl", refl)
        written += [f"{PER_IMAGE_DIR}/{stem}_refined.expt", f"{PER_IMAGE_DIR}/{stem}_refined.refl"]
    return written


def _phase1_sequence(run: RunState, experiments, strong, overrides):
    params = run.params
    base = run.base
    t0 = time.perf_counter()
    try:
        with capture_stdout():
            refined, refined_refl, info = processing.index_and_refine_sequence(
                experiments, strong, known_symmetry=None, params_overrides=overrides,
                refine_overrides=overrides, scan_varying=params.processing.scan_varying,
            )
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        for p in run.inputs.image_paths:
            run.fail_image(p, "indexing", reason)
        run.step("index", "failed", time.perf_counter() - t0, reason=reason)
        run.save()
        raise Sorry(f"the sequence could not be indexed: {reason}")
    run.mark_all_indexed(0 if len(refined) == 1 else None)
    run.record("n_indexed", run.n_images)
    run.record("phase1", {
        "sequence": {
            "n_indexed": info["n_indexed"],
            "n_strong": info["n_strong"],
            "unit_cells": [list(c) for c in info["unit_cells"]],
            "space_groups": info["space_groups"],
            "final_rmsds": info["final_rmsds"],
        }
    })
    io.write_experiments(str(base / INDEXED_EXPT), refined)
    io.write_experiments(str(base / REFINED_EXPT), refined)
    write_refl(base / REFINED_REFL, refined_refl)
    write_refl(base / INDEXED_REFL, refined_refl)
    run.step("index", "done", info["time_index_s"], n_indexed_reflections=info["n_indexed"],
             outputs=[INDEXED_EXPT, INDEXED_REFL])
    run.step("refine", "done", info["time_total_s"] - info["time_index_s"],
             scan_varying=params.processing.scan_varying, outputs=[REFINED_EXPT, REFINED_REFL])
    return refined, refined_refl

