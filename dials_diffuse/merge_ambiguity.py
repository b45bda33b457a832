"""The merge's step for indexing ambiguity (issue 15): whether to resolve it
(PHIL scope ``ambiguity``), with which operators (``dials_diffuse.reindexing``),
the choice per crystal (``dials_diffuse.ambiguity``), and the report
``ambiguity.json`` (written also when nothing is done, saying why): per
image the operator applied, its consistency CC before and after, and the CC
under every operator. See docs/SERIAL.md.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from dials.util import Sorry

from dials_diffuse import symmetry
from dials_diffuse.ambiguity import apply, resolve
from dials_diffuse.merged_files import AMBIGUITY_NAME, read_merged
from dials_diffuse.reindexing import reindexing_operators

logger = logging.getLogger("dials.diffuse_merge")


REPORT_NAME = AMBIGUITY_NAME

#: PHIL of the merge's ambiguity scope (included by phil_scopes.merge_phil_str)
ambiguity_phil_str = """
ambiguity
  .help = "Indexing ambiguity: alternative settings of stills / crystals "
          "(docs/SERIAL.md)."
{
  resolve = *auto true false
    .type = choice
    .help = "auto: resolve when the lattice allows alternative indexing "
            "operators and the data are stills or several crystals."
  reference = None
    .type = path
    .help = "A merged map (dials.diffuse_merge output directory or its "
            "voxel_data_relative.npz) that fixes the absolute choice. "
            "Without it the setting most crystals were indexed in is kept."
  iterations = 20
    .type = int(value_min=1)
    .help = "Most passes of each assignment stage."
  max_delta = 3.0
    .type = float(value_min=0)
    .help = "Tolerance (degrees) of the lattice symmetry (cctbx lattice_symmetry)."
  max_pairwise = 500
    .type = int(value_min=2)
    .help = "Crystals in the pairwise (Brehm-Diederichs) stage; the others "
            "are assigned against the reference map it gives."
  min_common = 20
    .type = int(value_min=3)
    .help = "Fewest common voxels for a pairwise correlation to count."
  seed = 0
    .type = int
}
"""


def crystal_groups(experiments, obs):
    """Group index per image: images whose experiments share a crystal model
    share a group (a rotation sweep is one crystal; a still is its own)."""
    ids = {}
    group_of_expt = []
    for e in experiments:
        group_of_expt.append(ids.setdefault(id(e.crystal), len(ids)))
    raw = np.array([group_of_expt[m["experiment_id"]] for m in obs.metadata], np.int64)
    used, group = np.unique(raw, return_inverse=True)
    return group.astype(np.int64), used


def load_reference(path, grid, laue_ops):
    """(voxel_grid, anisotropic intensity) of a merged map in the same grid."""
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    ref_grid, _, voxels, _ = read_merged(directory)
    ndiv = (ref_grid["ndiv_h"], ref_grid["ndiv_k"], ref_grid["ndiv_l"])
    if tuple(ndiv) != tuple(grid.ndiv):
        raise Sorry(f"ambiguity.reference={path}: grid ndiv {ndiv}, this merge uses "
                    f"{tuple(grid.ndiv)}")
    values = voxels["I_anisotropic"] if "I_anisotropic" in voxels else voxels["I_merged_relative"]
    keep = np.isfinite(values) & ~voxels["on_bragg_position"]
    return voxels["voxel_indices"][keep].astype(np.int64), values[keep]


def wanted(params, experiments, obs, n_ops):
    """Whether the merge resolves the ambiguity (resolve=auto: alternatives
    exist and the data are stills or more than one crystal)."""
    mode = params.resolve
    if mode == "false" or n_ops < 2:
        return False
    if mode == "true":
        return True
    stills = any(m.get("is_still", False) for m in obs.metadata) or any(
        e.is_still() for e in experiments if e.crystal is not None)
    crystals = {id(e.crystal) for e in experiments if e.crystal is not None}
    return stills or len(crystals) > 1


def resolve_in_merge(experiments, obs, grid, laue_ops, params):
    """The merge's hook: returns the observations to scale and merge
    (reindexed where needed) and the report for ``ambiguity.json`` (also
    when nothing is done, saying why), which ``merged_files.write_all``
    writes with the merge's other outputs."""
    p = params.ambiguity
    report = {"resolve": p.resolve}
    if p.resolve == "false":
        report["done"] = False
        report["reason"] = "ambiguity.resolve=false"
        return obs, report
    if params.symmetry.merge != "laue":
        # the operators are cosets of the Laue group the data are merged in
        if p.resolve == "true":
            raise Sorry("ambiguity.resolve=true needs symmetry.merge=laue")
        report["done"] = False
        report["reason"] = f"symmetry.merge={params.symmetry.merge}"
        logger.info("Indexing ambiguity not resolved: symmetry.merge=%s", params.symmetry.merge)
        return obs, report
    try:
        table = reindexing_operators(grid.unit_cell.parameters(), grid.space_group, p.max_delta,
                                     table=True)
    except ValueError as e:
        if p.resolve == "true":
            raise Sorry(f"ambiguity: {e}")
        # auto: a pseudo-symmetric lattice this method cannot handle
        report["done"] = False
        report["reason"] = f"not resolvable here: {e}"
        logger.warning("Warning: indexing ambiguity not resolved: %s", e)
        return obs, report
    report["operators"] = table.symbols()
    report["lattice_max_delta_deg"] = p.max_delta
    if not wanted(p, experiments, obs, table.n):
        report["done"] = False
        report["reason"] = ("the lattice allows no alternative indexing" if table.n < 2 else
                            "one rotation crystal (resolve=auto)")
        logger.info("Indexing ambiguity: %s", report["reason"])
        return obs, report
    ndiv = np.array(grid.ndiv)
    try:
        symmetry.check_ndiv(ndiv, table.ops)
    except ValueError as e:
        raise Sorry(f"ambiguity: the alternative indexing operators {', '.join(table.symbols()[1:])}"
                    f" do not map the voxel grid onto itself: {e}")
    reference = load_reference(p.reference, grid, laue_ops) if p.reference else None
    group_of_image, used_expts = crystal_groups(experiments, obs)
    res = resolve(obs, ndiv, table, group_of_image, p, reference)
    per_image = res.assignment[group_of_image]
    new_obs = apply(obs, per_image, grid, table)
    symbols = table.symbols()
    changed = res.assignment != 0
    report.update({
        "done": True,
        "n_crystals": int(res.assignment.size),
        "n_images": int(obs.n_images),
        "n_reindexed": int(changed.sum()),
        "operator_counts": {symbols[k]: int(np.sum(res.assignment == k)) for k in range(table.n)},
        "mean_score_before": _nanmean(res.score_before),
        "mean_score_after": _nanmean(res.score_after),
        "pairwise_crystals": int(res.pairwise_groups.size),
        "pairwise_passes": int(res.pairwise_passes),
        "reference_passes": int(res.reference_passes),
        "absolute_choice": res.global_choice,
        "score": "Pearson CC of the crystal's standardised voxel intensities with the "
                 "mean of all other crystals (leave-one-out), off Bragg positions",
        "images": [
            {
                "still_id": int(m["still_id"]),
                "experiment_id": int(m["experiment_id"]),
                "image_path": m.get("image_path"),
                "crystal": int(g),
                "operator": symbols[res.assignment[g]],
                "score_before": _num(res.score_before[g]),
                "score_after": _num(res.score_after[g]),
                # CC with the others' final map under each operator applied to
                # the data as indexed; a small margin: an undecidable still
                "scores": [_num(res.scores[g, k]) for k in range(table.n)],
                "margin": _num(_margin(res.scores[g])),
            }
            for m, g in zip(obs.metadata, group_of_image)
        ],
    })
    logger.info(
        "Indexing ambiguity (operators %s): %d of %d crystals reindexed (%s); consistency "
        "CC with the others %.3f as indexed, %.3f after; absolute choice: %s",
        ", ".join(symbols), report["n_reindexed"], res.assignment.size,
        ", ".join(f"{k} x{v}" for k, v in report["operator_counts"].items()),
        report["mean_score_before"], report["mean_score_after"], res.global_choice)
    return new_obs, report


def _margin(row):
    row = np.sort(np.asarray(row, float)[np.isfinite(row)])
    return row[-1] - row[-2] if row.size >= 2 else np.nan


def _num(x):
    return None if not np.isfinite(x) else float(x)


def _nanmean(x):
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None
