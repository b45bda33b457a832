#!/usr/bin/env python
"""Projected time and storage for large datasets from the measured numbers
(bench/results/extract.json and merge.json); the tables of docs/SCALING.md.

    python3 bench/project_scaling.py [--bandwidth-mb-s 1000]

Model (every input is a measurement except the stated assumptions):
* per-image work (extract_image + NPZ write) runs on W workers in parallel;
  per-image CPU seconds (process_time, insensitive to other users' load) are
  used, scaled by the pixel count for other detectors;
* serial parts of today's code: the detector context (once) and the
  dynamic-mask pre-pass (a second read of every image in the main process);
* reading is bounded by an aggregate file-system bandwidth (assumption,
  --bandwidth-mb-s), image bytes per pixel as the measured CBF;
* output: measured NPZ bytes per image, scaled by the pixel count;
* merge: one process today; seconds per observation per scaling iteration
  (largest merge run) and bytes per observation (marginal, between the two
  largest merge runs) as measured, times --merge-iterations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = [
    # name, images, fast, slow
    ("Pilatus 6M, 3600 images", 3600, 2463, 2527),
    ("Eiger 16M, 10000 images", 10000, 4148, 4362),
]
WORKERS = [1, 16, 128]


def fmt_t(s):
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bandwidth-mb-s", type=float, default=1000.0,
                    help="aggregate read bandwidth of the file system (assumption)")
    ap.add_argument("--merge-iterations", type=int, default=10,
                    help="scaling iterations (the simulated 100-image Pilatus run converged in 9)")
    args = ap.parse_args()
    ex = json.loads((RESULTS / "extract.json").read_text())
    me = json.loads((RESULTS / "merge.json").read_text())
    px0 = ex["image_size"][0] * ex["image_size"][1] if "image_size" in ex else \
        ex["dataset"]["image_size"][0] * ex["dataset"]["image_size"][1]
    per_image = ex.get("extract_image_cpu_s", ex["extract_image_s"]) + ex["write_npz_s"]
    dyn = ex["dynamic_mask_pass_per_image_s"]
    context = ex["detector_context_s"]
    runs = me["runs"]
    r1, r2 = runs[-2], runs[-1]
    it = args.merge_iterations
    s_per_obs_iter = r2["scale_merge_s"] / r2["n_observations"] / max(r2["scaling_iterations"], 1)
    read_per_obs = r2["read_s"] / r2["n_observations"]
    b_per_obs = (r2["vmhwm_mb"] - r1["vmhwm_mb"]) * 2**20 / (r2["n_observations"] - r1["n_observations"])
    base_mb = r2["vmhwm_mb"] - b_per_obs * r2["n_observations"] / 2**20

    print(f"inputs: {per_image:.3f} s CPU per 6M image (extract {ex.get('extract_image_cpu_s', ex['extract_image_s']):.3f}"
          f" + write {ex['write_npz_s']:.3f}), dynamic pre-pass {dyn:.3f} s/image (serial), context {context:.1f} s,"
          f" {ex['voxels_per_image']:.0f} voxels and {ex['output_bytes_per_image'] / 1e6:.2f} MB per 6M image,"
          f" CBF {ex['cbf_bytes_per_image'] / 1e6:.2f} MB; merge {s_per_obs_iter * 1e9:.0f} ns per observation"
          f" per iteration x {it} iterations + read {read_per_obs * 1e9:.0f} ns/obs, {b_per_obs:.0f} bytes/obs;"
          f" bandwidth {args.bandwidth_mb_s:.0f} MB/s (assumed)\n")
    for name, n, nf, ns in DATASETS:
        f = nf * ns / px0
        img_bytes = n * ex["cbf_bytes_per_image"] * f
        out_bytes = n * ex["output_bytes_per_image"] * f
        n_obs = n * ex["voxels_per_image"] * f
        merge_s = n_obs * (s_per_obs_iter * it + read_per_obs)
        merge_mb = base_mb + n_obs * b_per_obs / 2**20
        print(f"#### {name} ({nf} x {ns}, x{f:.2f} the 6M pixels)\n")
        print(f"images {img_bytes / 1e9:.0f} GB; extracted voxel files {out_bytes / 1e9:.1f} GB "
              f"({img_bytes / out_bytes:.1f}x smaller); {n_obs:.2e} voxel observations; merge today "
              f"(one process, all observations in memory): ~{fmt_t(merge_s)}, ~{merge_mb / 1024:.0f} GB\n")
        print("| workers | extraction compute | serial part today (context + dynamic pre-pass) "
              "| read floor at the assumed bandwidth | extraction wall (today) | extraction wall (pre-pass parallel) "
              "| bottleneck |")
        print("|---|---|---|---|---|---|---|")
        for w in WORKERS:
            compute = n * per_image * f / w
            serial = context * f + n * dyn * f
            io = img_bytes / (args.bandwidth_mb_s * 1e6)
            today = serial + max(compute, io)
            better = context * f + max(compute + n * dyn * f / w, io)
            parts = {"per-image compute": compute, "serial dynamic pre-pass": serial, "file-system read": io}
            if merge_s > today:
                parts["merge (one process)"] = merge_s
            bottleneck = max(parts, key=parts.get)
            print(f"| {w} | {fmt_t(compute)} | {fmt_t(serial)} | {fmt_t(io)} | {fmt_t(today)} | {fmt_t(better)} "
                  f"| {bottleneck} |")
        print()


if __name__ == "__main__":
    main()
