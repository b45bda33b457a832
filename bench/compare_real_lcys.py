#!/usr/bin/env python
"""Our map against mdx2's on real data: one L-cysteine sweep (issue 14, item 3).

    bash bench/compare_real_lcys.sh                  # sweep 1, ndiv 4
    bash bench/compare_real_lcys.sh --ndiv 2 --sweep 2

Data: ../shared/data/l_cysteine_rotation (15 images of 0.1 deg per sweep,
PILATUS 2M on a 30 deg 2theta arm, kappa goniometer, P 21 21 21, cell about
5.5 8.2 12.2 A; see its README). One sweep is processed with DIALS as a user
would (dials.import, find_spots, index with space_group=P212121, refine
scan-static: a 1.5 deg wedge gives a scan-varying model nothing to fit), then
on the same refined.expt and images:

* ours: dials.diffuse_extract refined.expt imported.expt refined.refl
  (grid.ndiv = --ndiv, the recipe of tests/test_rotation_real.py) and
  dials.diffuse_merge;
* mdx2 (bench/.mdx2-venv, as bench_vs_mdx2.py): import_data, import_geometry,
  find_peaks (--count-threshold), mask_peaks, integrate --subdivide ndiv,
  correct, scale, merge;

and the two maps are compared on their common voxels (bench/compare_maps.py;
no truth on real data). Each stage is timed; a failing stage of either chain
is recorded (command and log tail) in the JSON instead of stopping the script.
Result: a table and bench/results/maps_lcys_sweep<s>_ndiv<n>.json.
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_mdx2 as bvm  # noqa: E402
import common  # noqa: E402
import compare_maps  # noqa: E402

DATA = common.ROOT.parent / "shared" / "data" / "l_cysteine_rotation"


def dials_processing(images, work):
    """import, find_spots, index, refine (scan-static); returns the run record."""
    stages = [
        ("import", ["dials.import", *map(str, images)]),
        ("find_spots", ["dials.find_spots", "imported.expt", "nproc=1"]),
        ("index", ["dials.index", "imported.expt", "strong.refl", "space_group=P212121"]),
        ("refine", ["dials.refine", "indexed.expt", "indexed.refl", "scan_varying=False"]),
    ]
    common.rmtree(work)
    r = bvm.run_stages("dials", stages, work)
    if r["ok"]:
        from dxtbx.model.experiment_list import ExperimentListFactory
        from dials.array_family import flex

        expt = ExperimentListFactory.from_json_file(str(work / "refined.expt"), check_format=False)[0]
        refl = flex.reflection_table.from_file(str(work / "refined.refl"))
        r["unit_cell"] = [round(x, 4) for x in expt.crystal.get_unit_cell().parameters()]
        r["space_group"] = str(expt.crystal.get_space_group().info())
        r["n_indexed"] = int(refl.get_flags(refl.flags.indexed).count(True))
        r["n_strong"] = len(refl)
        r["goniometer"] = type(expt.goniometer).__name__
        r["detector_panels"] = len(expt.detector)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=int, default=1, choices=[1, 2])
    ap.add_argument("--ndiv", type=int, default=4, help="grid subdivision (ours grid.ndiv, mdx2 --subdivide)")
    ap.add_argument("--count-threshold", type=float, default=50,
                    help="mdx2.find_peaks --count_threshold (Bragg peak pixels; the "
                         "background is a few counts per pixel)")
    ap.add_argument("--mdx2-spec", default="mdx2", help="pip requirement for the peer")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    common.bootstrap()
    images = sorted(Path(args.data).glob(f"l-cyst_{args.sweep:02d}_000??.cbf.bz2"))
    if not images:
        raise SystemExit(f"no l-cyst_{args.sweep:02d}_*.cbf.bz2 in {args.data}")
    work = common.DATA / f"lcys_sweep{args.sweep}_ndiv{args.ndiv}"
    result = {**common.stamp(), "data": str(args.data), "sweep": args.sweep, "n_images": len(images),
              "ndiv": args.ndiv, "count_threshold": args.count_threshold, "runs": {}}
    runs = result["runs"]
    runs["dials"] = dials_processing(images, work / "dials")
    if not runs["dials"]["ok"]:
        print("DIALS processing failed: nothing to compare")
        common.write_result(args.output or f"maps_lcys_sweep{args.sweep}_ndiv{args.ndiv}.json", result)
        return 1
    d = work / "dials"
    print(f"  refined cell {runs['dials']['unit_cell']}, {runs['dials']['n_indexed']} of "
          f"{runs['dials']['n_strong']} spots indexed")

    runs["ours"] = bvm.ours(None, work / "ours", args.ndiv, 1, bvm.has_mp_nproc(),
                            inputs=[d / "refined.expt", d / "imported.expt", d / "refined.refl"])
    version, error = bvm.ensure_mdx2(args.mdx2_spec)
    result["mdx2_version"] = version
    if error:
        result["mdx2_error"] = error
        print(f"mdx2 unavailable: {error}")
    else:
        from dxtbx.model.experiment_list import ExperimentListFactory

        panel = ExperimentListFactory.from_json_file(str(d / "refined.expt"), check_format=False)[0].detector[0]
        nx, ny = panel.get_image_size()
        # chunks of about 200 x 300 pixels that tile the image
        chunks = (-(-ny // -(-ny // 211)), -(-nx // -(-nx // 300)))
        runs["mdx2"] = bvm.mdx2(None, work / "mdx2", args.ndiv, 1, len(images), args.count_threshold,
                                expt=d / "refined.expt", chunks=chunks)

    rows = []
    for name, r in runs.items():
        for stage, s in r["stages"].items():
            rows.append([name, stage, f"{s['wall_s']:.1f}", f"{s['peak_rss_tree_mb']:.0f}"])
        rows.append([name, "TOTAL" + ("" if r["ok"] else f" (failed at {r['error']['stage']})"),
                     f"{r['total_s']:.1f}", f"{r['peak_rss_mb'] or 0:.0f}"])
    print(f"\nL-cysteine sweep {args.sweep}, {len(images)} images, ndiv {args.ndiv} ({result['uptime']})")
    print(common.table(rows, ["chain", "stage", "wall s", "peak MB"]))
    if runs.get("mdx2", {}).get("error"):
        e = runs["mdx2"]["error"]
        print(f"mdx2 failed at {e['stage']}: {e['message'][-1500:]}")
    if runs["ours"]["ok"] and runs.get("mdx2", {}).get("ok"):
        r = compare_maps.compare(work / "ours" / "merged", work / "mdx2" / "merged.nxs")
        print()
        print(compare_maps.format_result(r))
        result["maps"] = r
    common.write_result(args.output or f"maps_lcys_sweep{args.sweep}_ndiv{args.ndiv}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
