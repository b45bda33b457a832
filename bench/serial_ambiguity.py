"""Indexing ambiguity at serial scale (issue 15): P6_3 stills of many crystals.

    PYTHONPATH=. python bench/serial_ambiguity.py --n-images 200 --per-crystal 4 \\
        --out /tmp/serial_bench [--mode pipeline|models] [--nproc 2]

1. Simulates ``n_images`` stills of ``n_images / per_crystal`` P6_3 crystals
   (60 x 60 x 90 A, 0.5 % cell spread, random orientations, log-normal scales,
   a diffuse model with lobes that only the Laue group 6/m keeps, so the
   alternative indexing k,h,-l gives a different map), raw CBF images on a
   Pilatus-300K-like detector.
2. ``--mode pipeline`` (default): dials.diffuse_process on the raw images,
   indexing every still from scratch with the known symmetry (DIALS picks
   one of the two settings per still); ``--mode models``: the simulator's
   crystal models, each replaced by a random alternative setting, extracted.
3. Merges with ``ambiguity.resolve=true`` (the pipeline's merge) and again
   with ``false``; finds the setting each still was indexed in by comparing
   its A matrix with the truth's, and reports the fraction of stills the merge
   brought to one common setting, the CC of both maps with the truth (in that
   setting; voxels seen >= 3 times and all voxels), and timings, as JSON
   (``<out>/serial_ambiguity_<mode>.json``). ``--reuse`` keeps the simulated
   images of an earlier run in ``--out`` (e.g. both modes on one data set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

CELL = (60.0, 60.0, 90.0, 90.0, 90.0, 120.0)
SIM = {
    "mode": "stills",
    "crystal.unit_cell": "60 60 90 90 90 120",
    "crystal.space_group": "P 63",
    "crystal.cell_spread": 0.005,
    "diffuse.lobe.amplitude": 1.0,
    "diffuse.lobe.direction": "1 0.35 0.9",
    "diffuse.lobe.angle": 0.25,
    "diffuse.lobe.q0": 0.12,
    "diffuse.lobe.q_width": 0.1,
    "diffuse.halo.amplitude": 0.5,
    "detector.distance": 100,
    "bragg.mosaicity_deg": 0.3,
}
#: the two settings of P6_3 in its hexagonal lattice, as hkl' = hkl @ M
SETTINGS = {"h,k,l": np.eye(3, dtype=int),
            "k,h,-l": np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])}


def laue_6m():
    from cctbx import sgtbx

    mats = {tuple(op.r().num()) for op in
            sgtbx.space_group_info("P 63").group().build_derived_laue_group().all_ops()}
    return [np.array(m).reshape(3, 3) for m in mats]


def setting_of(crystal, true_crystal, laue):
    """Name of the setting ('h,k,l' or 'k,h,-l') of an indexed crystal
    relative to the truth: hkl_indexed = hkl_true @ M, M = (A_idx^-1 A_true)^T."""
    A = np.array(crystal.get_A()).reshape(3, 3)
    At = np.array(true_crystal.get_A()).reshape(3, 3)
    M = np.linalg.solve(A, At).T
    Mi = np.rint(M).astype(int)
    if np.abs(M - Mi).max() > 0.05:
        return None
    for name, s in SETTINGS.items():
        if any(np.array_equal(Mi, s @ g) for g in laue):
            return name
    return None


def truth_cc(truth, merged_dir, op=None, min_obs=3):
    from dials_diffuse.merged_files import read_merged

    grid, _, v, _ = read_merged(str(merged_dir))
    hkl = np.stack([v["H_center"], v["K_center"], v["L_center"]], axis=1)
    well = v["num_observations"] >= min_obs
    h = hkl if op is None else hkl @ op
    expected = truth.diffuse_voxel_average(h, (grid["ndiv_h"], grid["ndiv_k"], grid["ndiv_l"]),
                                           n_sub=3)
    return {"cc_well_observed": float(np.corrcoef(v["I_merged_relative"][well], expected[well])[0, 1]),
            "cc_all": float(np.corrcoef(v["I_merged_relative"], expected)[0, 1]),
            "n_voxels_well_observed": int(well.sum()), "n_voxels": int(well.size)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--per-crystal", type=int, default=4)
    ap.add_argument("--out", default="serial_bench")
    ap.add_argument("--mode", choices=("pipeline", "models"), default="pipeline")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--detector", default="487x619", help="n_fast x n_slow")
    ap.add_argument("--reuse", action="store_true", help="keep an existing simulation")
    a = ap.parse_args(argv)
    if a.mode == "models":  # the pipeline configures its own log
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")

    from dials_diffuse.simulate import load_truth, params_from, simulate_dataset

    out = os.path.abspath(a.out)
    data = os.path.join(out, "data")
    times = {}
    nf, ns = (int(x) for x in a.detector.split("x"))
    if not (a.reuse and os.path.exists(os.path.join(data, "truth.json"))):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        t = time.time()
        simulate_dataset(params_from(**SIM, **{
            "n_images": a.n_images, "random_seed": a.seed, "detector.n_fast": nf,
            "detector.n_slow": ns, "crystal.stills_per_crystal": a.per_crystal,
            "output.directory": data}))
        times["simulate_s"] = round(time.time() - t, 1)
    truth = load_truth(data)
    laue = laue_6m()
    result = {"n_images": a.n_images, "n_crystals": int(np.ceil(a.n_images / a.per_crystal)),
              "mode": a.mode, "detector": a.detector, "simulation": SIM}

    if a.mode == "pipeline":
        from dials_diffuse.command_line import process as process_cmd

        base = os.path.join(out, "processed")
        images = [str(truth.image_path(i)) for i in range(truth.n_images)]
        t = time.time()
        process_cmd.run(images + [
            f"output.base_dir={base}", "indexing.known_symmetry.space_group=P63",
            "indexing.known_symmetry.unit_cell=60,60,90,90,90,120",
            "masking.bragg.max_delpsi=1.0", f"mp.nproc={a.nproc}",
            "diagnostics.extraction=False", "diagnostics.merged=False",
            "merge.ambiguity.resolve=true"])
        times["process_s"] = round(time.time() - t, 1)
        summary = json.load(open(os.path.join(base, "dials.diffuse_process.json")))
        from dxtbx.model.experiment_list import ExperimentListFactory

        refined = ExperimentListFactory.from_json_file(os.path.join(base, "refined.expt"),
                                                       check_format=False)
        failed = {int(i) for i in summary.get("validation", {}).get("failed", {})}
        from dxtbx.model import ExperimentList

        # the models the extraction used: refined.expt less the failed validation
        experiments = ExperimentList([e for i, e in enumerate(refined) if i not in failed])
        extract_dir = _find(base, "extraction_manifest.json")
        merged_resolved = os.path.join(base, summary["steps"]["merge"]["directory"])
        result["n_failed_validation"] = len(failed)
        result["n_failed_images"] = summary.get("n_failed")
        result["n_indexed"] = len(experiments)
    else:
        from diffuse_helpers import extraction_params
        from dials_diffuse.extraction import extract
        from dials_diffuse.simulate.serial import scramble_settings

        experiments, _ = scramble_settings(truth.experiments, list(SETTINGS.values()), a.seed + 1)
        extract_dir = os.path.join(out, "extracted")
        t = time.time()
        p = extraction_params(truth, extract_dir, **{"output.save_pixels": "off"})
        p.mp.nproc = a.nproc
        extract(experiments, p, progress=False)
        times["extract_s"] = round(time.time() - t, 1)
        merged_resolved = None
        result["n_indexed"] = len(experiments)

    from diffuse_helpers import merge_params
    from dials_diffuse.merging import merge_run

    merged = {}
    for mode in ("true", "false"):
        target = os.path.join(out, f"merged_{a.mode}_{mode}")
        if mode == "true" and merged_resolved is not None:
            target = merged_resolved
        else:
            t = time.time()
            merge_run(experiments, [extract_dir],
                      merge_params(target, **{"ambiguity.resolve": mode, "mp.nproc": a.nproc}))
            times[f"merge_{mode}_s"] = round(time.time() - t, 1)
        merged[mode] = target

    # the setting each still was indexed in, from its A matrix against the truth
    by_name = {os.path.basename(truth.image_path(i)): i for i in range(truth.n_images)}
    report = json.load(open(os.path.join(merged["true"], "ambiguity.json")))
    indexed_setting, final = {}, {}
    for im in report["images"]:
        i = by_name[os.path.basename(im["image_path"])]
        expt = experiments[im["experiment_id"]]
        true_crystal = truth.experiments[i].crystal
        s = setting_of(expt.crystal, true_crystal, laue)
        indexed_setting[i] = s
        if s is not None:
            total = SETTINGS[s] @ SETTINGS[im["operator"]]
            final[i] = "h,k,l" if any(np.array_equal(total, g) for g in laue) else "k,h,-l"
    counts = {k: list(indexed_setting.values()).count(k) for k in SETTINGS}
    fin = list(final.values())
    common = max(SETTINGS, key=fin.count)
    result.update({
        "n_merged_stills": len(report["images"]),
        "indexed_settings": counts,
        "unclassified": sum(v is None for v in indexed_setting.values()),
        "fraction_consistent": fin.count(common) / max(len(fin), 1),
        "common_setting_vs_truth": common,
        "consistency_cc_before": report["mean_score_before"],
        "consistency_cc_after": report["mean_score_after"],
        "ambiguity_report": {k: v for k, v in report.items() if k != "images"},
    })
    op = None if common == "h,k,l" else SETTINGS[common]
    result["cc_resolved"] = truth_cc(truth, merged["true"], op)
    result["cc_unresolved"] = {name: truth_cc(truth, merged["false"], s)
                               for name, s in (("truth_setting", None),
                                               ("alternative_setting", SETTINGS["k,h,-l"]))}
    result["times"] = times
    with open(os.path.join(out, f"serial_ambiguity_{a.mode}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("simulation", "ambiguity_report")}, indent=1))
    return result


def _find(base, name):
    for root, _, files in os.walk(base):
        if name in files:
            return root
    raise FileNotFoundError(name)


if __name__ == "__main__":
    main()
