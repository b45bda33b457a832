#!/usr/bin/env python
"""Markdown tables of bench/results/*.json (what docs/PERFORMANCE.md quotes).

    python3 bench/report.py [results-dir]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# the per-image target of issue 3 (s, read + extraction + write + dynamic pass)
EXTRACT_TARGET_S = 0.3


def md(rows, headers):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def header(d):
    m = d["machine"]
    return (f"{d['date']}, commit {d['git_commit']}, {m['cpu_model']} ({m['cores']} cores, "
            f"{m['memory_gb']} GB), load before {d['load_before']}, after {d.get('load_after')}")


def extract(d):
    print(f"### Extraction per Pilatus 6M image\n\n{header(d)}\n")
    rows = [
        ["dxtbx read only (`get_raw_data`)", f"{d['read_only_s']:.3f}", f"{d.get('read_only_cpu_s', float('nan')):.3f}"],
        ["static mask (once per detector)", f"{d['static_mask_s']:.3f}", ""],
        ["detector context: geometry, corrections, resolution (once)", f"{d['detector_context_s']:.2f}", ""],
        ["`extract_image` (read, trusted, Bragg, corrections, hkl, binning), median", f"{d['extract_image_s']:.3f}",
         f"{d.get('extract_image_cpu_s', float('nan')):.3f}"],
        ["first image (fills the rotation prediction cache)", f"{d['extract_first_image_s']:.3f}", ""],
        ["write NPZ", f"{d['write_npz_s']:.3f}", ""],
        ["dynamic-mask pass (second read + accumulate)", f"{d['dynamic_mask_pass_per_image_s']:.3f}", ""],
        [f"**per image total** (target {EXTRACT_TARGET_S} s: "
         f"{'met' if d['per_image_total_s'] <= EXTRACT_TARGET_S else 'MISSED'})",
         f"**{d['per_image_total_s']:.3f}**", ""],
        ["per image without the dynamic pass", f"{d['per_image_total_without_dynamic_s']:.3f}", ""],
    ]
    print(md(rows, ["stage", "wall s", "cpu s"]))
    print(f"\nextract / read = {d['ratio_extract_to_read']:.0f}x; "
          f"{d['pixels_per_s'] / 1e6:.1f} Mpixel/s; kept {d['kept_pixels_per_image']:.0f} pixels "
          f"-> {d['voxels_per_image']:.0f} voxels per image; output "
          f"{d['output_bytes_per_image'] / 1e6:.2f} MB/image vs CBF {d['cbf_bytes_per_image'] / 1e6:.2f} MB "
          f"({d['shrink_vs_cbf']:.1f}x) and raw int32 {d['raw_int32_bytes_per_image'] / 1e6:.1f} MB "
          f"({d['shrink_vs_raw_int32']:.0f}x)\n")
    if d.get("whole_runs"):
        rows = [[r["n_images"], f"{r['wall_s']:.1f}", f"{r['per_image_s']:.3f}", f"{r['vmhwm_mb']:.0f}",
                 f"{r['ru_maxrss_mb']:.0f}"] for r in d["whole_runs"]]
        print(md(rows, ["images", "wall s", "s/image", "VmHWM MB", "ru_maxrss MB"]))
        print()


def merge(d):
    print(f"### Scaling and merging\n\n{header(d)}\n")
    rows = [[f"{r['n_observations']:.0e}", r["n_images"], r["n_voxels_asu"], r["input_mb"],
             r.get("read_s", ""), r.get("scale_merge_s", ""), r.get("write_s", ""), r["wall_s"],
             f"{r['obs_per_s'] / 1e6:.2f}", f"{r['vmhwm_mb']:.0f}",
             f"{r['scaling_iterations']}{'' if r['converged'] else ' (not converged)'}",
             f"{r['cc_half']:.3f}"] for r in d["runs"]]
    e = d.get("extrapolation_1e8")
    if e:
        rows.append(["1e8 (extrapolated)", 1000, "", "", "", "", "", f"~{e['wall_s']:.0f}", "",
                     f"~{e['peak_mb']:.0f}", "", ""])
    print(md(rows, ["observations", "images", "ASU voxels", "input MB", "read s", "scale+merge s",
                    "write s", "total s", "Mobs/s", "peak MB", "iterations", "CC1/2"]))
    print()


def comparison(d):
    print(f"### Side by side, {d['n_images']} images\n\n{header(d)}; mdx2 {d.get('mdx2_version')}; "
          f"ours mp.nproc: {'yes' if d['ours_mp_nproc_supported'] else 'not available'}\n")
    rows = []
    for name, r in d["runs"].items():
        for stage, s in r["stages"].items():
            rows.append([name, stage, f"{s['wall_s']:.1f}", f"{s['user_s'] + s['sys_s']:.1f}",
                         f"{s['peak_rss_tree_mb']:.0f}", ""])
        rows.append([f"**{name}**", "**total**" + ("" if r["ok"] else f" (failed at {r['error']['stage']})"),
                     f"**{r['total_s']:.1f}**", f"{r['cpu_s']:.1f}", f"{r['peak_rss_mb'] or 0:.0f}",
                     f"{r.get('images_per_s', 0):.2f} img/s, {r.get('mpixels_per_s', 0):.1f} Mpx/s"])
    print(md(rows, ["chain", "stage", "wall s", "cpu s", "peak MB (tree)", "throughput"]))
    print()
    for k, v in d.get("ratios", {}).items():
        print(f"* {k}: {v}")
    if d.get("read_floor"):
        print(f"* read floor: {d['read_floor']}")
    print()


def ceiling(d):
    """bench/parallel_ceiling.py: the same work on one process and on two."""
    print(f"\n### Two processes' ceiling ({header(d)})\n")
    rows = [(r["workload"], r["units"], r["median_one_s"], r["median_two_s"], f"{r['gain']:.2f}x")
            for r in d["rows"]]
    print(md(rows, ["workload", "units", "1 process s (median)", "2 processes s (median)",
                    "gain"]))


def main(results=RESULTS):
    p = results / "extract.json"
    if p.exists():
        extract(json.loads(p.read_text()))
    for p in sorted(results.glob("merge*.json")):
        merge(json.loads(p.read_text()))
    for p in sorted(results.glob("comparison_*.json")):
        d = json.loads(p.read_text())
        if "runs" in d:  # --maps-only runs hold map comparisons, no timings
            comparison(d)
    for p in sorted(results.glob("parallel_ceiling*.json")):
        ceiling(json.loads(p.read_text()))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
