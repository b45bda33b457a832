"""Phases 2 and 3 of a run: extraction, merging and their diagnostics, each
a step reused when its signature (inputs and parameters) is unchanged."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from dxtbx import flumpy

from dials_diffuse import phil_scopes
from dials_diffuse.diagnostics import REPORT_NAME, run_check
from dials_diffuse.diagnostics.inputs import classify
from dials_diffuse.diffuse_files import MANIFEST_NAME
from dials_diffuse.extraction import bragg_methods, extract
from dials_diffuse.merged_files import GRID_NAME, STATS_NAME
from dials_diffuse.merging import merge_run
from dials_diffuse.pipeline.params import inherit_nproc, scope_text, sub_params
from dials_diffuse.pipeline.state import RunState, rel, signature

logger = logging.getLogger("dials.diffuse_process")

#: diagnostics directories in the base directory
EXTRACTION_DIAGNOSTICS_DIR = "extraction_diagnostics"
PHASE3_DIAGNOSTICS_DIR = "phase3_diagnostics"


def _in_base(base, path):
    path = Path(path)
    return path if path.is_absolute() else base / path


def _strong_for(models, strong):
    """Strong spots renumbered to the model experiments (matched by experiment
    identifier), for the spots part of masking.bragg.method."""

    ident_to_strong = {v: k for k, v in strong.experiment_identifiers()}
    ids = flumpy.to_numpy(strong["id"])
    new = np.full(len(ids), -1, dtype=np.int32)
    for j, e in enumerate(models):
        i = ident_to_strong.get(e.identifier)
        if i is not None:
            new[ids == i] = j
    refl = strong.select(flumpy.from_numpy(new >= 0))
    refl["id"] = flumpy.from_numpy(new[new >= 0].copy())
    refl.clean_experiment_identifiers_map()
    for j, e in enumerate(models):
        refl.experiment_identifiers()[j] = e.identifier
    return refl


def run_extraction(run: RunState, models, strong, upstream_signature, indexed=None):

    params = run.params
    sub = sub_params(params, "extract", phil_scopes.extract_params_scope)
    out_dir = _in_base(run.base, params.extract.output.directory)
    sub.output.directory = str(out_dir)
    inherit_nproc(sub, params)
    sig = signature(
        "extract/1", upstream_signature, scope_text(params, ("extract", "grid")),
        [e.identifier for e in models],
    )
    manifest_path = out_dir / MANIFEST_NAME
    if run.reusable("extraction", sig, manifest_path):
        manifest = json.loads(manifest_path.read_text())
        run.step("extraction", "reused", n_extracted=manifest["n_extracted"],
                 directory=rel(run.base, out_dir))
    else:
        t0 = time.perf_counter()
        reflections = None
        methods = bragg_methods(sub.masking.bragg)
        # stills: the found spots only when asked for alone (spot finding on
        # stills picks up strong diffuse halos, which the per-still predicted
        # mask leaves alone); rotation: both, the spots covering every frame
        # of every found spot
        if (strong is not None and "spots" in methods
                and (run.inputs.mode != "stills" or "predicted" not in methods)):
            reflections = _strong_for(models, strong)
        if run.inputs.models is not None:
            # from given models: the images given apart (imported.expt), if any
            images = run.inputs.images
        else:
            images = run.inputs.experiments if run.inputs.mode == "stills" else None
        if manifest_path.exists():
            manifest_path.unlink()  # unfinished until the new one is written
        # indexed spots give rotation Bragg masks their profile widths
        manifest = extract(models, sub, images=images, reflections=reflections,
                           profile_reflections=indexed if run.inputs.mode != "stills" else None)
        run.step("extraction", "done", time.perf_counter() - t0,
                 n_extracted=manifest["n_extracted"], directory=rel(run.base, out_dir))
    run.record_extracted(manifest, lambda entry: rel(run.base, out_dir / entry["file"]))
    run.record_signature("extraction", sig)
    run.save()
    return out_dir, manifest, sig


def run_merge(run: RunState, models, extract_dir, manifest, upstream_signature):

    params = run.params
    sub = sub_params(params, "merge", phil_scopes.merge_params_scope)
    inherit_nproc(sub, params)
    out_dir = _in_base(run.base, params.merge.output.directory)
    sub.output.directory = str(out_dir)
    sig = signature("merge/1", upstream_signature, scope_text(params, ("merge", "grid")))
    grid_path = out_dir / GRID_NAME
    if run.reusable("merge", sig, grid_path, out_dir / STATS_NAME):
        run.step("merge", "reused", directory=rel(run.base, out_dir))
    else:
        t0 = time.perf_counter()
        if grid_path.exists():
            grid_path.unlink()  # the grid file marks a finished merge
        files = [
            str(extract_dir / e["file"]) for e in manifest["images"] if e["status"] == "extracted"
        ]
        merge_run(models, files, sub)
        run.step("merge", "done", time.perf_counter() - t0, directory=rel(run.base, out_dir))
    stats = json.loads((out_dir / STATS_NAME).read_text())
    run.record("merge", _merge_summary(stats, out_dir))
    run.record_signature("merge", sig)
    run.save()
    return out_dir, sig


def _merge_summary(stats, out_dir):
    out = {
        "n_images": stats.get("n_images"),
        "n_voxels": stats.get("n_voxels"),
        "symmetry_merge": stats.get("symmetry_merge"),
        "cc_half_overall": stats.get("overall", {}),
        "cc_half_shells": stats.get("shells", []),
    }
    scaling_path = out_dir / "refined_scaling_model_params.json"
    if scaling_path.is_file():
        scaling = json.loads(scaling_path.read_text())
        out["scaling"] = {
            "converged": scaling.get("refinement_statistics", {}).get("converged"),
            "final_R": scaling.get("refinement_statistics", {}).get("final_R"),
            "scales": {
                k: round(v["multiplicative_scale"], 4)
                for k, v in scaling.get("refined_parameters", {}).items()
            },
        }
    return out


def run_diagnostics(run: RunState, kind, models, inputs, out_dir, upstream_signature):
    """Extraction (``kind="extraction"``) or merged-map diagnostics; failures
    are logged and recorded, never raised (the guide: non-fatal)."""

    step = f"{kind}_diagnostics"
    params = run.params
    sub = sub_params(params, "check", phil_scopes.check_params_scope)
    sub.output.directory = str(out_dir)
    sig = signature(f"check/{kind}/1", upstream_signature, scope_text(params, ("check",)))
    marker = out_dir / ("extraction_diagnostics_summary.txt" if kind == "extraction"
                        else "phase3_diagnostics_summary.txt")
    if run.reusable(step, sig, marker):
        run.step(step, "reused", directory=rel(run.base, out_dir))
        run.record_signature(step, sig)
        return
    t0 = time.perf_counter()
    try:
        if marker.exists():
            marker.unlink()
        found = classify([str(p) for p in inputs], sub.input)
        if found.mode != ("extraction" if kind == "extraction" else "merged"):
            raise RuntimeError(f"diagnostics inputs not recognised as {kind} outputs")
        inventory = run_check(found, sub, models)
        n_files = len(inventory.entries)
        html = out_dir / REPORT_NAME
        run.step(step, "done", time.perf_counter() - t0, directory=rel(run.base, out_dir),
                 n_outputs=n_files, report=rel(run.base, html) if html.exists() else None)
        run.record_signature(step, sig)
    except Exception as e:  # diagnostics never end the run
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        logger.warning("%s diagnostics failed: %s", kind.capitalize(), reason)
        logger.debug("diagnostics failure", exc_info=True)
        run.step(step, "failed", time.perf_counter() - t0, reason=reason)
    run.save()

