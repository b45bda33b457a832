#!/usr/bin/env python
"""Projected time and storage for large datasets from the measured numbers
(bench/results/extract.json and merge_parallel.json); the tables of docs/SCALING.md.

    python3 bench/project_scaling.py [--bandwidth-mb-s 1000]

Model (every input is a measurement except the stated assumptions):
* per-image work (dynamic-mask pass + extract_image + NPZ write) runs on W
  workers in parallel; per-image CPU seconds (process_time, insensitive to
  other users' load) are used, scaled by the pixel count for other detectors;
* serial part: the detector context (once per detector, before the workers
  start);
* reading is bounded by an aggregate file-system bandwidth (assumption,
  --bandwidth-mb-s); every image is read twice (dynamic pass, extraction),
  image bytes per pixel as the measured CBF;
* output: measured NPZ bytes per image, scaled by the pixel count;
* merge on one 2-core node as measured: wall seconds per observation of the
  largest merge run (1e8 observations, 2 workers) and bytes per observation
  (marginal, between the two largest runs) of the process tree.
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
    args = ap.parse_args()
    ex = json.loads((RESULTS / "extract.json").read_text())
    me = json.loads((RESULTS / "merge_parallel.json").read_text())
    px0 = ex["dataset"]["image_size"][0] * ex["dataset"]["image_size"][1]
    extract_cpu = ex.get("extract_image_cpu_s", ex["extract_image_s"])
    per_image = extract_cpu + ex["write_npz_s"] + ex["dynamic_mask_pass_per_image_s"]
    context = ex["detector_context_s"]
    r1, r2 = me["runs"][-2], me["runs"][-1]
    merge_s_per_obs = r2["wall_s"] / r2["n_observations"]
    b_per_obs = (r2["peak_mb"] - r1["peak_mb"]) * 2**20 / (r2["n_observations"] - r1["n_observations"])
    base_mb = r2["peak_mb"] - b_per_obs * r2["n_observations"] / 2**20

    print(f"inputs: {per_image:.3f} s CPU per 6M image (dynamic pass "
          f"{ex['dynamic_mask_pass_per_image_s']:.3f} + extract {extract_cpu:.3f} + write "
          f"{ex['write_npz_s']:.3f}), context {context:.1f} s (serial),"
          f" {ex['voxels_per_image']:.0f} voxels and {ex['output_bytes_per_image'] / 1e6:.2f} MB per 6M image,"
          f" CBF {ex['cbf_bytes_per_image'] / 1e6:.2f} MB; merge {merge_s_per_obs * 1e9:.0f} ns wall"
          f" per observation ({r2['n_observations']:.0e} observations, {r2.get('nproc')} workers),"
          f" {b_per_obs:.0f} bytes/obs; bandwidth {args.bandwidth_mb_s:.0f} MB/s (assumed)\n")
    for name, n, nf, ns in DATASETS:
        f = nf * ns / px0
        img_bytes = n * ex["cbf_bytes_per_image"] * f
        out_bytes = n * ex["output_bytes_per_image"] * f
        n_obs = n * ex["voxels_per_image"] * f
        merge_s = n_obs * merge_s_per_obs
        merge_mb = base_mb + n_obs * b_per_obs / 2**20
        print(f"#### {name} ({nf} x {ns}, x{f:.2f} the 6M pixels)\n")
        print(f"images {img_bytes / 1e9:.0f} GB; extracted voxel files {out_bytes / 1e9:.1f} GB "
              f"({img_bytes / out_bytes:.1f}x smaller); {n_obs:.2e} voxel observations; merge on "
              f"one 2-core node (all observations in memory): ~{fmt_t(merge_s)}, ~{merge_mb / 1024:.0f} GB\n")
        print("| workers | per-image compute | serial context | read floor (2 reads) at the assumed "
              "bandwidth | extraction wall | then merge | bottleneck |")
        print("|---|---|---|---|---|---|---|")
        for w in WORKERS:
            compute = n * per_image * f / w
            serial = context * f
            io = 2 * img_bytes / (args.bandwidth_mb_s * 1e6)
            wall = serial + max(compute, io)
            parts = {"per-image compute": compute, "file-system read": io, "merge": merge_s}
            bottleneck = max(parts, key=parts.get)
            print(f"| {w} | {fmt_t(compute)} | {fmt_t(serial)} | {fmt_t(io)} | {fmt_t(wall)} "
                  f"| {fmt_t(merge_s)} | {bottleneck} |")
        print()


if __name__ == "__main__":
    main()
