#!/usr/bin/env python
"""Scaling and merging throughput and memory (issue 4, "Speed and memory").

    .venv/bin/python bench/bench_merge.py                       # 1e6 and 1e7 observations
    .venv/bin/python bench/bench_merge.py --sizes 1e6 1e7 3e7   # larger (needs RAM, disk)

Synthetic voxel observations are written as real extraction files
(``diffuse_files.write_image_file``, the same NPZ layout, float32 sums) and
``merging.merge_run`` (read, ASU mapping, relative scaling, merge, CC1/2,
outputs) is timed in a separate process whose peak memory (VmHWM) is recorded.

The observations model a rotation sequence: a fixed P1 voxel set (a ball in
hkl, ndiv 4, P 21 21 21, 30 x 40 x 50 A) swept by images that each see a wedge
of ``--voxels-per-image`` voxels (1e5 by default) advancing with the image
number, so consecutive images overlap as in real data. Values: per-voxel
intensity smooth in hkl, per-image log-normal scale, 1-40 pixels per voxel,
Poisson-like noise. 1e8 observations = 1000 images x 1e5 voxels.

Results: a table and bench/results/merge.json (with a linear extrapolation to
1e8 observations when that size is not run).
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FILES = common.DATA / "merge_synthetic"
CELL = (30.0, 40.0, 50.0)
NDIV = (4, 4, 4)


def experiments():
    from dxtbx.model import Crystal, Experiment, ExperimentList

    crystal = Crystal((CELL[0], 0, 0), (0, CELL[1], 0), (0, 0, CELL[2]), space_group_symbol="P 21 21 21")
    return ExperimentList([Experiment(crystal=crystal)])


def voxel_set(n_total, seed=1):
    """About n_total P1 grid voxels in a ball, ordered by azimuth about h."""
    import numpy as np

    radius = int(np.ceil((3 * n_total / (4 * np.pi)) ** (1 / 3)))
    r = np.arange(-radius, radius + 1)
    g = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    g = g[(g * g).sum(1) <= radius * radius]
    angle = np.arctan2(g[:, 1], g[:, 2]) + 1e-3 * g[:, 0] / max(radius, 1)
    return g[np.argsort(angle, kind="stable")].astype(np.int32)


def write_files(n_images, voxels_per_image, n_voxels_total, cycle):
    """Files image_000000.npz ... for the first n_images (existing ones kept)."""
    import numpy as np

    from dials_diffuse.diffuse_files import write_image_file

    FILES.mkdir(parents=True, exist_ok=True)
    spec = {"voxels_per_image": voxels_per_image, "n_voxels_total": n_voxels_total, "cycle": cycle}
    spec_path = FILES / "spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
        common.rmtree(FILES)
        FILES.mkdir(parents=True)
    spec_path.write_text(json.dumps(spec))
    todo = [i for i in range(n_images) if not (FILES / f"image_{i:06d}.npz").exists()]
    if not todo:
        return
    grid = voxel_set(n_voxels_total)
    nv = len(grid)
    hkl = grid / np.array(NDIV)
    q = hkl / np.array(CELL)
    qmag = np.linalg.norm(q, axis=1)
    truth = 100 * (1 + 0.5 * np.cos(2 * np.pi * hkl).prod(axis=1)) * np.exp(-2 * qmag**2) + 5
    rng_scales = np.random.default_rng(7)
    scales = np.exp(rng_scales.normal(0, 0.15, 100000))
    t0 = time.time()
    print(f"writing {len(todo)} synthetic extraction files ({voxels_per_image} voxels each, "
          f"{nv} P1 voxels) ...", flush=True)
    for i in todo:
        rng = np.random.default_rng(1000 + i)
        start = int(i * nv / cycle)
        sel = np.sort((start + np.arange(voxels_per_image)) % nv)
        n_pix = rng.integers(1, 41, sel.size).astype(np.int32)
        factor = n_pix * 0.05 * (1 + 0.1 * rng.random(sel.size))
        mu = factor * scales[i] * truth[sel]
        signal = np.maximum(mu + np.sqrt(mu) * rng.standard_normal(sel.size), 0)
        jitter = (rng.random((sel.size, 3)) - 0.5) / np.array(NDIV)
        write_image_file(
            str(FILES / f"image_{i:06d}.npz"),
            {
                "voxel_indices": grid[sel],
                "voxel_sum_signal": signal.astype(np.float32),
                "voxel_sum_factor": factor.astype(np.float32),
                "voxel_sum_variance": signal.astype(np.float32),
                "voxel_n_pixels": n_pix,
                "voxel_mean_qmag": qmag[sel].astype(np.float32),
                "voxel_mean_hkl": (hkl[sel] + jitter).astype(np.float32),
            },
            {"still_id": i, "experiment_id": 0, "image_path": f"synthetic_{i:06d}.cbf",
             "image_index": i, "wavelength": 1.0, "ndiv": list(NDIV), "is_still": False,
             "exposure_time": 0.1, "gain": 1.0},
        )
    print(f"  written in {time.time() - t0:.0f} s", flush=True)


class TreeMemory:
    """Peak memory of this process and its forked workers, polled: the sum of
    the proportional set sizes (PSS: shared pages split between the processes
    that map them, so the observation columns in shared memory count once)
    and, as an upper bound, the sum of the resident sizes."""

    def __init__(self, interval=0.2):
        import threading

        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            pss = rss = 0
            for p in [self.me] + self.me.children(recursive=True):
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                pss += info.pss
                rss += info.rss
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()


def child(n_images, out_dir, nproc=None):
    """merge_run on the first n_images files; prints a JSON line."""
    from dials_diffuse.command_line import merge as merge_cmd
    from dials_diffuse.merging import merge_run

    lines = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("dials.diffuse_merge")
    log.setLevel(logging.INFO)
    log.addHandler(Capture())
    params = merge_cmd.phil_scope.fetch().extract()
    params.output.directory = str(out_dir)
    if nproc:
        params.mp.nproc = nproc
    files = [str(FILES / f"image_{i:06d}.npz") for i in range(n_images)]
    memory = TreeMemory()
    t0 = time.perf_counter()
    result = merge_run(experiments(), files, params)
    wall = time.perf_counter() - t0
    memory.stop()
    stages = {}
    for line in lines:
        m = re.search(r"Read ([\d.]+) s, scale and merge ([\d.]+) s, write ([\d.]+) s", line)
        if m:
            stages = dict(zip(("read_s", "scale_merge_s", "write_s"), map(float, m.groups())))
    hist = result["scaling"].history
    with open("/proc/self/status") as fh:
        hwm = next(int(x.split()[1]) for x in fh if x.startswith("VmHWM:")) / 1024
    print(json.dumps({
        "n_images": n_images,
        "n_observations": int(result["observations"].n_obs),
        "n_voxels_asu": int(result["observations"].n_voxels),
        "wall_s": round(wall, 2),
        **stages,
        "scaling_iterations": len(hist),
        "converged": bool(result["scaling"].converged),
        "cc_half": result["statistics"]["overall"].get("cc_half_total"),
        "vmhwm_mb": round(hwm, 1),
        "tree_pss_peak_mb": round(memory.peak_pss / 2**20, 1),
        "tree_rss_sum_peak_mb": round(memory.peak_rss / 2**20, 1),
        "nproc": nproc or "Auto",
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7],
                    help="numbers of voxel observations (multiples of --voxels-per-image)")
    ap.add_argument("--voxels-per-image", type=int, default=100000)
    ap.add_argument("--voxel-set", type=float, default=2e6,
                    help="P1 voxels of the swept ball (fixed: the grid, not the data, grows)")
    ap.add_argument("--cycle", type=int, default=1000, help="images per full turn of the wedge")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--output", default="merge.json")
    ap.add_argument("--keep-files", action="store_true", help="keep bench/data/merge_synthetic")
    ap.add_argument("--nproc", type=int, default=0, help="mp.nproc of the merge (0: Auto)")
    ap.add_argument("--child", nargs=3, metavar=("N_IMAGES", "OUT", "NPROC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(int(args.child[0]), args.child[1], int(args.child[2]))

    common.bootstrap()
    meta = common.stamp()
    sizes = sorted(int(s) for s in args.sizes)
    n_max = max(s // args.voxels_per_image for s in sizes)
    t0 = time.time()
    write_files(n_max, args.voxels_per_image, int(args.voxel_set), args.cycle)
    write_s = time.time() - t0
    runs = []
    for size in sizes:
        n_images = max(1, size // args.voxels_per_image)
        reps = []
        for rep in range(args.repeats):
            out = common.DATA / f"merge_out_{n_images}"
            common.rmtree(out)
            load = common.loadavg()
            proc = subprocess.run([sys.executable, __file__, "--child", str(n_images), str(out), str(args.nproc)],
                                  capture_output=True, text=True, env=common.one_core_env())
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["load_at_start"] = load
            # the whole process tree (workers included), never below the
            # merging process's own high-water mark
            r["peak_mb"] = max(r["vmhwm_mb"], r["tree_pss_peak_mb"])
            r["output_mb"] = round(common.dir_size(out) / 1e6, 1)
            common.rmtree(out)
            reps.append(r)
        best = sorted(reps, key=lambda r: r["wall_s"])[len(reps) // 2]
        best["wall_s_all"] = [r["wall_s"] for r in reps]
        best["input_mb"] = round(sum(
            (FILES / f"image_{i:06d}.npz").stat().st_size for i in range(n_images)) / 1e6, 1)
        best["obs_per_s"] = round(best["n_observations"] / best["wall_s"])
        best["bytes_per_obs_peak"] = round(best["peak_mb"] * 2**20 / best["n_observations"], 1)
        runs.append(best)
        print(f"{best['n_observations']:.2e} obs: {best['wall_s']:.1f} s, "
              f"{best['peak_mb']:.0f} MB peak (process tree)", flush=True)

    # linear model t = a + b n, memory = m0 + m1 n from the two largest runs
    extrapolation = None
    if len(runs) >= 2 and runs[-1]["n_observations"] < 1e8:
        r1, r2 = runs[-2], runs[-1]
        dn = r2["n_observations"] - r1["n_observations"]
        b = (r2["wall_s"] - r1["wall_s"]) / dn
        m1 = (r2["peak_mb"] - r1["peak_mb"]) / dn
        extrapolation = {
            "n_observations": 1e8,
            "from_sizes": [r1["n_observations"], r2["n_observations"]],
            "wall_s": round(r2["wall_s"] + b * (1e8 - r2["n_observations"]), 0),
            "peak_mb": round(r2["peak_mb"] + m1 * (1e8 - r2["n_observations"]), 0),
            "seconds_per_1e6_obs": round(b * 1e6, 3),
            "mb_per_1e6_obs": round(m1 * 1e6, 1),
            "note": "linear in the number of observations, fitted to the two largest runs",
        }
    result = {**meta, "settings": vars(args) | {"child": None}, "file_write_s": round(write_s, 1),
              "runs": runs, "extrapolation_1e8": extrapolation,
              "target": {"n_observations": 1e8, "wall_s": 60, "peak_gb": 4}}
    rows = [[f"{r['n_observations']:.2e}", r["n_images"], r["n_voxels_asu"], r["input_mb"],
             f"{r.get('read_s', 0):.1f}", f"{r.get('scale_merge_s', 0):.1f}", f"{r.get('write_s', 0):.1f}",
             f"{r['wall_s']:.1f}", f"{r['obs_per_s'] / 1e6:.2f}", f"{r['peak_mb']:.0f}",
             r["scaling_iterations"], r["load_at_start"][0]] for r in runs]
    if extrapolation:
        rows.append(["1e8 (extrap.)", 1000, "", "", "", "", "", f"{extrapolation['wall_s']:.0f}",
                     "", f"{extrapolation['peak_mb']:.0f}", "", ""])
    print(f"\nmerge_run on synthetic extraction files ({meta['uptime']})")
    print(common.table(rows, ["observations", "images", "ASU voxels", "input MB", "read s",
                              "scale+merge s", "write s", "total s", "Mobs/s", "peak MB", "iter", "load"]))
    common.write_result(args.output, result)
    if not args.keep_files:
        common.rmtree(FILES)


if __name__ == "__main__":
    main()
