"""Stills |s| trend of merged / true: where does it come from?

Simulates stills on a Pilatus-like 1000 x 1000 detector at 150 mm (3 A and
beyond), extracts and merges them as the tests do (tests/diffuse_helpers.py),
and prints per resolution shell the median over the voxels (n_obs >= 3) of

* ``actual``   the project's extraction + merge of the images;
* ``perfect``  an oracle extraction: the same kept pixels, voxels and merge, but
               every pixel's signal replaced by the exact scale_i * flux * D(hkl)
               of the truth (no correction, mask or noise error left: only the
               sampling of the voxels by the pixels, and the merge);
* ``act/perf`` voxel by voxel: what the extraction's corrections and hkl add;
* ``perf@mean`` the oracle with D at each image's mean hkl of the voxel's pixels;
* ``perf-noparallax`` the oracle with D where a simulator that ignores the
               sensor parallax (dxtbx's simple px->mm) would put it: the size of
               the trend such a simulator/reader mismatch makes;

against the truth D averaged over each voxel: ``avg`` (the truth's default, a
5^3 midpoint rule Richardson-extrapolated with 3^3), ``avg5`` (the plain 5^3
midpoint rule the references used before) and D at the voxel ``centre``.
``--variants`` repeats it with one correction off in both simulator and
extraction, and without Bragg spots/mask.

    .venv/bin/python bench/stills_resolution_trend.py [--images 24] [--variants]

About 3 min per case on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from diffuse_helpers import extraction_params, merge_params  # noqa: E402

from dials_diffuse import diffuse_files  # noqa: E402
from dials_diffuse.extraction import extract  # noqa: E402
from dials_diffuse.merging import merge_run  # noqa: E402
from dials_diffuse.simulate import load_truth, params_from, simulate_dataset  # noqa: E402
from dials_diffuse.simulate.oracle import oracle_files as _oracle_files  # noqa: E402

NDIV = 4
SHELL_EDGES_D = (20.0, 10.0, 7.0, 5.0, 4.0, 3.6, 3.4, 3.2, 3.0, 2.6)
SIM = {
    "mode": "stills",
    "random_seed": 7,
    "detector.format": "generic",
    "detector.n_fast": 1000,
    "detector.n_slow": 1000,
    "detector.distance": 150,
    "noise": False,
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def simulate(work, name, n_images, **overrides):
    params = params_from(**{**SIM, "n_images": n_images, **overrides,
                            "output.directory": str(work / name / "data")})
    return load_truth(simulate_dataset(params))


def run_extract(truth, out, **overrides):
    params = extraction_params(truth, out, **{"output.save_pixels": "all", **overrides})
    extract(truth.experiments, params)
    return sorted(str(p) for p in pathlib.Path(out).glob("image_*.npz"))


def run_merge(truth, files, out):
    result = merge_run(truth.experiments, files, merge_params(out))
    return result["merged"]


# --------------------------------------------------------------------------
# oracle extraction: the same kept pixels with the exact signal
# --------------------------------------------------------------------------
def oracle_files(truth, files, out, **kwargs):
    return _oracle_files(truth, files, out, ndiv=NDIV, **kwargs)


def without_parallax(truth):
    """The same truth on a copy of the detector with dxtbx's simple px->mm
    strategy: D where a simulator that ignores the sensor parallax puts it."""
    from dxtbx.model import SimplePxMmStrategy
    from dxtbx.model.detector import Detector
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    from dials_diffuse.simulate import Truth

    detector = Detector.from_dict(truth.detector.to_dict())
    for panel in detector:
        panel.set_px_mm_strategy(SimplePxMmStrategy())
    experiments = ExperimentList(
        [Experiment(beam=e.beam, detector=detector, crystal=e.crystal) for e in truth.experiments]
    )
    return Truth(truth.data, experiments, truth.directory)


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------
def shells_of(truth, hkl):
    qmag = np.linalg.norm(hkl @ truth.model.B.T, axis=1)
    d = 1.0 / np.maximum(qmag, 1e-12)
    edges = np.array(SHELL_EDGES_D)
    shell = np.full(len(d), -1)
    for s in range(len(edges) - 1):
        shell[(d <= edges[s]) & (d > edges[s + 1])] = s
    return shell


def _sum_ratio_by_shell(shell, x, reference, n_shells):
    num = np.bincount(shell[shell >= 0], weights=x[shell >= 0], minlength=n_shells)
    den = np.bincount(shell[shell >= 0], weights=reference[shell >= 0], minlength=n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _median_by_shell(shell, ratio, n_shells):
    return np.array([np.median(ratio[shell == s]) if np.any(shell == s) else np.nan
                     for s in range(n_shells)])


def compare(truth, maps, min_obs=3):
    """Median ratios per shell over the voxels every map shares (n_obs >= min_obs)."""
    index = {name: {tuple(g): k for k, g in enumerate(m.voxel_grid)} for name, m in maps.items()}
    actual = maps["actual"]
    common = [g for g in index["actual"] if all(g in ix for ix in index.values())]
    rows = {name: np.array([index[name][g] for g in common]) for name in maps}
    well = actual.n_observations[rows["actual"]] >= min_obs
    rows = {name: r[well] for name, r in rows.items()}
    value = {name: maps[name].intensity[rows[name]] for name in maps}
    hkl = actual.hkl[rows["actual"]]
    flux = truth.flux
    avg = flux * truth.diffuse_voxel_average(hkl, NDIV)  # n_sub 5, extrapolated
    avg5 = flux * truth.diffuse_voxel_average(hkl, NDIV, n_sub=5, extrapolate=False)
    centre = flux * truth.diffuse(hkl)
    on_bragg = actual.on_bragg[rows["actual"]]
    shell = shells_of(truth, hkl)
    n = len(SHELL_EDGES_D) - 1
    a, p = value["actual"], value["perfect"]
    columns = {
        "actual/avg5": a / avg5,
        "actual/avg": a / avg,
        "perfect/avg": p / avg,
        "act/perf": a / p,
        "avg5/avg": avg5 / avg,
        "centre/avg": centre / avg,
        "perf@mean/avg": value["perfect@mean"] / avg,
        "perf-noparallax/avg": value["perfect-noparallax"] / avg,
    }
    table = {name: _median_by_shell(shell, r, n) for name, r in columns.items()}
    table["act/perf off-Bragg"] = _median_by_shell(np.where(on_bragg, -1, shell), a / p, n)
    # ratios of sums (as tests/test_merge.py): insensitive to the skew of the
    # per-voxel sampling error that biases the medians
    for name, x in (("sum actual/avg", a), ("sum perfect/avg", p)):
        table[name] = _sum_ratio_by_shell(shell, x, avg, n)
    counts = np.array([np.sum(shell == s) for s in range(n)])
    return table, counts


def print_table(title, table, counts):
    names = list(table)
    print(f"\n## {title}")
    print("| d (A) | voxels | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for s in range(len(counts)):
        label = f"{SHELL_EDGES_D[s]:g}-{SHELL_EDGES_D[s + 1]:g}"
        values = " | ".join(f"{table[k][s]:.4f}" for k in names)
        print(f"| {label} | {counts[s]} | {values} |")
    ok = counts > 20
    if not ok.any():
        print("(no voxels: the case failed)")
        return
    p2p = " | ".join(f"{np.ptp(table[k][ok]) * 100:.2f}" for k in names)
    print(f"| peak-to-peak % | | {p2p} |")
    sys.stdout.flush()


def run_case(work, title, n_images, sim_overrides=None, extract_overrides=None):
    t0 = time.time()
    name = title.replace(" ", "_").replace("=", "_")
    truth = simulate(work, name, n_images, **(sim_overrides or {}))
    log(f"[{title}] simulated in {time.time() - t0:.0f} s")
    files = run_extract(truth, work / name / "extracted", **(extract_overrides or {}))
    log(f"[{title}] extracted {len(files)} images, {time.time() - t0:.0f} s")
    maps = {"actual": run_merge(truth, files, work / name / "merged")}
    oracles = {
        "perfect": {},
        "perfect@mean": {"at_mean_hkl": True},
        "perfect-noparallax": {"signal_truth": without_parallax(truth)},
    }
    for label, options in oracles.items():
        directory = work / name / label
        maps[label] = run_merge(truth, oracle_files(truth, files, directory, **options),
                                work / name / f"merged_{label}")
    log(f"[{title}] merged, {time.time() - t0:.0f} s")
    table, counts = compare(truth, maps)
    print_table(title, table, counts)
    shutil.rmtree(work / name, ignore_errors=True)
    return table, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--variants", action="store_true",
                        help="also switch each correction off (sim and extraction)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="stills_trend_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# stills |s| trend: {args.images} stills, 1000x1000 px of 0.172 mm at 150 mm, "
          f"noise off, ndiv {NDIV}; medians over voxels with n_obs >= 3")
    run_case(work, "baseline", args.images)
    if args.variants:
        for switch in ("polarization", "solid_angle", "efficiency", "air"):
            sim = {f"corrections.{switch}": False}
            if switch == "solid_angle":  # keep the counts of a pixel the same
                sim["flux"] = 3e8 * (0.172 / 150.0) ** 2
            run_case(work, f"{switch} off", args.images, sim, {f"corrections.{switch}": False})
        run_case(work, "no Bragg", args.images, {"bragg.enabled": False},
                 {"masking.bragg.method": "none"})
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
