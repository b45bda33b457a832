#!/usr/bin/env python
"""Side by side: dials_diffuse vs mdx2 vs dials.rs_mapper on the same images (issue 7).

    bash bench/run_comparison.sh                 # 100 images (default)
    bash bench/run_comparison.sh --n-images 10   # smoke run

Dataset: a simulated Pilatus 6M (2463 x 2527, 172 um, PILATUS_1.2 miniCBF
headers, so dxtbx and mdx2 read it as a Pilatus) rotation sequence from
dials.diffuse_simulate (0.1 deg images, P 21 21 21, 30 x 40 x 50 A, Bragg
peaks, diffuse halos, Poisson noise), made once under bench/data/.

Chains, each stage a separate process timed for wall time and peak memory of
its process tree (psutil polling every 50 ms, plus the kernel's maxrss):

* ours: dials.diffuse_extract (static + dynamic + predicted-Bragg masks, all
  corrections, voxel binning at grid.ndiv = --ndiv, output.save_pixels=off)
  then dials.diffuse_merge (scaling, merging, CC1/2, maps);
  with mp.nproc=1 and 2 when dials.diffuse_extract has mp.nproc.
* ours, one command (``ours1cmd``; --skip-one-command to leave out):
  dials.diffuse_process truth.expt with the same extraction and merge
  parameters and no diagnostics: the chain started from crystal models in
  one process (one start-up instead of two).
* mdx2 (PyPI, in its own venv bench/.mdx2-venv with the system site packages,
  installed here when missing; never a dependency of dials_diffuse):
  import_data, import_geometry, find_peaks, mask_peaks, integrate
  (--subdivide = --ndiv), correct, scale, merge; --nproc 1 and 2.
* dials.rs_mapper (mapping only: no masks, corrections, scaling), at the
  detector-corner resolution with a grid whose spacing matches our finest voxel.

Both chains read the simulator's truth.expt (the exact models), so neither
needs indexing. Results: a table and bench/results/comparison_<n>.json.
--repeats N runs each of our chains N times, interleaved, and reports each by
its median run (mdx2 runs once): the VM's speed drifts by +-2 s between
minutes, which moves a single run's 1 -> 2 ratio by +-0.2.

Maps (issue 14, item 3; --skip-maps to leave out): after the timing table,
bench/compare_maps.py puts our merged map (ours_np<k>/merged) and mdx2's
(mdx2_np<k>/merged.nxs, the first nproc at which both succeeded) on their
common voxels of the same fractional-hkl grid (both mapped to our canonical
asymmetric unit) and prints CC of total and anisotropic intensity between the
two and of each against the simulator's truth (flux x D averaged over each
voxel), and the normalised ratios per resolution shell; stored under "maps"
in the JSON. --maps-only redoes just that on the outputs of an earlier run.
--no-background simulates the images without the simulator's background
(neither chain subtracts it here), for the check against the truth;
--bragg-widths truth (default) gives our extraction the simulated spots'
widths (masking.bragg.mosaicity_deg / beam_divergence_deg), 'fallback' leaves
it to its 0.2 / 0.1 deg fallback as the issue-7 runs did (it then masks 18 %
of the pixels and cuts the halo cores out of the voxels next to Bragg peaks).
See docs/MDX2_COMPARISON.md.
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MDX2_VENV = common.BENCH / ".mdx2-venv"
MDX2_BIN = MDX2_VENV / "bin"
MDX2_STAGES = ["import_data", "import_geometry", "find_peaks", "mask_peaks", "integrate",
               "correct", "scale", "merge"]


def ensure_mdx2(spec):
    """mdx2 in bench/.mdx2-venv; returns (version or None, error text or None)."""
    env = common.one_core_env()
    if not (MDX2_BIN / "mdx2.integrate").exists():
        print(f"installing {spec} into {MDX2_VENV.relative_to(common.ROOT)} ...", flush=True)
        steps = [["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(MDX2_VENV)],
                 [str(MDX2_BIN / "pip"), "install", "-q", "--disable-pip-version-check", spec]]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                return None, f"{' '.join(step)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    proc = subprocess.run([str(MDX2_BIN / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('mdx2'))"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return None, f"mdx2 does not import:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip(), None


def has_mp_nproc():
    proc = subprocess.run([str(common.VENV_BIN / "dials.diffuse_extract"), "-c"],
                          capture_output=True, text=True, env=common.one_core_env())
    return "nproc" in proc.stdout


def run_stages(name, stages, cwd):
    """Run (stage, argv) in order; stop at the first failure and record it."""
    cwd.mkdir(parents=True, exist_ok=True)
    out = {"stages": {}, "ok": True}
    for stage, argv in stages:
        print(f"  {name}: {stage} ...", end=" ", flush=True)
        log = cwd / f"bench_{stage}.log"
        try:
            r = common.run_timed(argv, cwd, log=log)
        except RuntimeError as e:
            print("FAILED")
            out["ok"] = False
            out["error"] = {"stage": stage, "command": " ".join(map(str, argv)), "message": str(e)[-3000:]}
            break
        print(f"{r['wall_s']:.1f} s, {r['peak_rss_tree_mb']:.0f} MB")
        out["stages"][stage] = r
    st = out["stages"].values()
    out["total_s"] = round(sum(s["wall_s"] for s in st), 2)
    out["cpu_s"] = round(sum(s["user_s"] + s["sys_s"] for s in st), 2)
    out["peak_rss_mb"] = max((s["peak_rss_tree_mb"] for s in st), default=None)
    return out


def truth_bragg_widths(directory):
    """The simulated spots' widths as dials.diffuse_extract's rotation Bragg-mask
    parameters: sigma_m = bragg.mosaicity_deg, sigma_b = the spot's sigma_px
    seen from the sample (deg; plus the beam divergence)."""
    import math

    from dxtbx.model.experiment_list import ExperimentListFactory

    truth = json.loads((directory / "truth.json").read_text())
    bragg = truth["bragg"]
    panel = ExperimentListFactory.from_json_file(str(directory / "truth.expt"), check_format=False)[0].detector[0]
    spot = math.degrees(math.atan(bragg["sigma_px"] * panel.get_pixel_size()[0] / panel.get_distance()))
    sigma_b = math.hypot(spot, bragg.get("divergence_deg") or 0.0)
    return [f"masking.bragg.mosaicity_deg={bragg['mosaicity_deg']:.4g}",
            f"masking.bragg.beam_divergence_deg={sigma_b:.4g}"]


def ours(directory, work, ndiv, nproc, mp_supported, inputs=None, extra=()):
    """Our chain; ``inputs``: the files dials.diffuse_extract reads (default the
    simulator's truth.expt; the first is also the merge's experiments);
    ``extra``: more extraction parameters."""
    inputs = [str(p) for p in (inputs or [directory / "truth.expt"])]
    expt = inputs[0]
    extract = [str(common.VENV_BIN / "dials.diffuse_extract"), *inputs,
               "output.directory=extracted", "output.save_pixels=off",
               f"grid.ndiv_h={ndiv}", f"grid.ndiv_k={ndiv}", f"grid.ndiv_l={ndiv}", *extra]
    if mp_supported:
        extract.append(f"mp.nproc={nproc}")
    merge = [str(common.VENV_BIN / "dials.diffuse_merge"), str(expt), "extracted",
             "output.directory=merged", f"mp.nproc={nproc}"]
    common.rmtree(work)
    r = run_stages(f"ours nproc={nproc}", [("extract", extract), ("merge", merge)], work)
    if r["ok"]:
        r["output_mb"] = {"extracted": round(common.dir_size(work / "extracted") / 1e6, 1),
                          "merged": round(common.dir_size(work / "merged") / 1e6, 1)}
    return r


def median_run(chain_runs):
    """The run of median total time (the later of the two middle ones for an
    even count; a failed run if any failed), with every repeat's total."""
    failed = [r for r in chain_runs if not r["ok"]]
    if failed:
        return failed[0]
    chosen = sorted(chain_runs, key=lambda r: r["total_s"])[len(chain_runs) // 2]
    if len(chain_runs) > 1:
        chosen = dict(chosen, repeats_total_s=[r["total_s"] for r in chain_runs])
    return chosen


def ours_one_command(directory, work, ndiv, nproc, extra=()):
    """Our chain as one command from the crystal models: dials.diffuse_process
    truth.expt (phase 1 skipped), the same extraction and merge parameters as
    ``ours``, no diagnostics: one process start-up instead of two."""
    argv = [str(common.VENV_BIN / "dials.diffuse_process"), str(directory / "truth.expt"),
            "output.base_dir=run", "extract.output.save_pixels=off",
            f"grid.ndiv_h={ndiv}", f"grid.ndiv_k={ndiv}", f"grid.ndiv_l={ndiv}", *extra,
            f"mp.nproc={nproc}", "diagnostics.extraction=False", "diagnostics.merged=False"]
    common.rmtree(work)
    return run_stages(f"ours one command nproc={nproc}", [("process", argv)], work)


def mdx2(directory, work, ndiv, nproc, n_images, count_threshold, expt=None, chunks=(211, 493)):
    """mdx2's chain on ``expt`` (default: the simulator's truth.expt);
    ``chunks``: the (y, x) chunk shape of import_data (frames: min(20, n))."""
    expt = str(expt or directory / "truth.expt")
    b = lambda s: str(MDX2_BIN / f"mdx2.{s}")  # noqa: E731
    np_ = ["--nproc", str(nproc)]
    stages = [
        ("import_data", [b("import_data"), expt, "--chunks", str(min(20, n_images)),
                         str(chunks[0]), str(chunks[1])] + np_),
        ("import_geometry", [b("import_geometry"), expt] + np_),
        ("find_peaks", [b("find_peaks"), "geometry.nxs", "data.nxs", "--count_threshold",
                        str(count_threshold)] + np_),
        ("mask_peaks", [b("mask_peaks"), "geometry.nxs", "data.nxs", "peaks.nxs",
                        "--sigma_cutoff", "3"] + np_),
        ("integrate", [b("integrate"), "geometry.nxs", "data.nxs", "--mask", "mask.nxs",
                       "--subdivide", str(ndiv), str(ndiv), str(ndiv)] + np_),
        ("correct", [b("correct"), "geometry.nxs", "integrated.nxs"] + np_),
        ("scale", [b("scale"), "corrected.nxs"] + np_),
        ("merge", [b("merge"), "corrected.nxs", "--scale", "scales.nxs"] + np_),
    ]
    common.rmtree(work)
    r = run_stages(f"mdx2 nproc={nproc}", stages, work)
    r["output_mb"] = round(common.dir_size(work) / 1e6, 1)
    return r


def rs_mapper(directory, work, ndiv):
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt = ExperimentListFactory.from_json_file(str(directory / "truth.expt"), check_format=False)[0]
    d_min = expt.detector.get_max_resolution(expt.beam.get_s0())
    cell = expt.crystal.get_unit_cell().parameters()
    step = 1.0 / (max(cell[:3]) * ndiv)  # our finest voxel edge, 1/Angstrom
    grid_size = int(round(2.0 / (d_min * step)))
    argv = ["dials.rs_mapper", str(directory / "truth.expt"), f"max_resolution={d_min:.3f}",
            f"grid_size={grid_size}", "map_file=rs_mapper.mrc"]
    common.rmtree(work)
    r = run_stages("dials.rs_mapper", [("rs_mapper", argv)], work)
    r["grid_size"] = grid_size
    r["max_resolution"] = round(d_min, 3)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=100)
    ap.add_argument("--ndiv", type=int, default=4, help="grid subdivision (ours grid.ndiv, mdx2 --subdivide)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mdx2-spec", default="mdx2", help="pip requirement for the peer")
    ap.add_argument("--count-threshold", type=float, default=1000,
                    help="mdx2.find_peaks --count_threshold (Bragg peak pixels)")
    ap.add_argument("--skip-mdx2", action="store_true")
    ap.add_argument("--skip-rs-mapper", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each of our chains (interleaved); each reported by its median")
    ap.add_argument("--skip-one-command", action="store_true",
                    help="no run of our chain as one command (dials.diffuse_process truth.expt)")
    ap.add_argument("--no-background", action="store_true",
                    help="simulate the images without the simulator's background (constant + radial "
                         "air/solvent photons, which neither chain subtracts here), so that the maps "
                         "can be checked against the truth; dataset p6m_rot_<n>_nobg")
    ap.add_argument("--bragg-widths", choices=["truth", "fallback"], default="truth",
                    help="our rotation Bragg mask: 'truth' passes the simulated spots' widths "
                         "(masking.bragg.mosaicity_deg / beam_divergence_deg, as a profile model or "
                         "refined.refl would give them); 'fallback': truth.expt alone, so "
                         "dials.diffuse_extract falls back to sigma_m 0.2, sigma_b 0.1 deg (the "
                         "issue-7 timing runs; 2x / 3x the simulated spots)")
    ap.add_argument("--skip-maps", action="store_true", help="no map comparison (compare_maps.py)")
    ap.add_argument("--maps-only", action="store_true",
                    help="no runs: compare the maps of an earlier run (bench/data/cmp_<n>) only")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    if args.maps_only:
        return maps_only(args)

    common.bootstrap()
    meta = common.stamp()
    n = args.n_images
    directory = dataset(n, args.no_background)
    work = common.DATA / f"cmp_{n}{suffix(args)}"
    pixels = n * 2463 * 2527
    mp_supported = has_mp_nproc()
    result = {**meta, "n_images": n, "pixels": pixels, "ndiv": args.ndiv,
              "dataset": str(directory.relative_to(common.ROOT)),
              "simulated_background": not args.no_background,
              "bragg_widths": args.bragg_widths,
              "cbf_mb": round(sum(common.dir_size(p) for p in directory.glob("*.cbf")) / 1e6, 1),
              "ours_mp_nproc_supported": mp_supported, "runs": {}}
    if not mp_supported:
        print("note: dials.diffuse_extract has no mp.nproc yet: our chain runs one process "
              "(nproc=2 is skipped for ours)")

    version, error = (None, "skipped (--skip-mdx2)") if args.skip_mdx2 else ensure_mdx2(args.mdx2_spec)
    result["mdx2_version"] = version
    if error:
        result["mdx2_error"] = error
        print(f"mdx2 unavailable: {error}")

    extra = truth_bragg_widths(directory) if args.bragg_widths == "truth" else []
    result["ours_extra_parameters"] = extra
    # our chains --repeats times, interleaved (np1, np2, np1, ...: the VM's
    # slow and fast minutes fall on both); each reported by its median run
    repeats = {}
    for repeat in range(args.repeats):
        for nproc in args.nproc:
            if nproc == 1 or mp_supported:
                repeats.setdefault(f"ours_np{nproc}", []).append(ours(
                    directory, work / f"ours_np{nproc}", args.ndiv, nproc, mp_supported,
                    extra=extra))
            if not args.skip_one_command:
                repeats.setdefault(f"ours1cmd_np{nproc}", []).append(ours_one_command(
                    directory, work / f"ours1cmd_np{nproc}", args.ndiv, nproc, extra=extra))
            if version and repeat == 0:
                result["runs"][f"mdx2_np{nproc}"] = mdx2(directory, work / f"mdx2_np{nproc}",
                                                         args.ndiv, nproc, n, args.count_threshold)
    for name, chain_runs in repeats.items():
        result["runs"][name] = median_run(chain_runs)
    if not args.skip_rs_mapper:
        result["runs"]["rs_mapper"] = rs_mapper(directory, work / "rs_mapper", args.ndiv)

    for r in result["runs"].values():
        if r["total_s"]:
            r["images_per_s"] = round(n / r["total_s"], 3)
            r["mpixels_per_s"] = round(pixels / r["total_s"] / 1e6, 2)
    runs = result["runs"]
    ratios = {}
    for nproc in args.nproc:
        o, m = runs.get(f"ours_np{nproc}"), runs.get(f"mdx2_np{nproc}")
        if o and m and o["ok"] and m["ok"]:
            ratios[f"mdx2_over_ours_np{nproc}"] = round(m["total_s"] / o["total_s"], 2)
    if runs.get("ours_np1", {}).get("ok") and runs.get("ours_np2", {}).get("ok"):
        ratios["ours_speedup_1_to_2"] = round(runs["ours_np1"]["total_s"] / runs["ours_np2"]["total_s"], 2)
        ratios["ours_extract_speedup_1_to_2"] = round(
            runs["ours_np1"]["stages"]["extract"]["wall_s"] / runs["ours_np2"]["stages"]["extract"]["wall_s"], 2)
    one_1, one_2 = runs.get("ours1cmd_np1", {}), runs.get("ours1cmd_np2", {})
    if one_1.get("ok") and one_2.get("ok"):
        ratios["ours_one_command_speedup_1_to_2"] = round(one_1["total_s"] / one_2["total_s"], 2)
    if one_1.get("ok") and runs.get("mdx2_np1", {}).get("ok"):
        ratios["mdx2_over_ours_one_command_np1"] = round(
            runs["mdx2_np1"]["total_s"] / one_1["total_s"], 2)
    if runs.get("mdx2_np1", {}).get("ok") and runs.get("mdx2_np2", {}).get("ok"):
        ratios["mdx2_speedup_1_to_2"] = round(runs["mdx2_np1"]["total_s"] / runs["mdx2_np2"]["total_s"], 2)
    if runs.get("rs_mapper", {}).get("ok") and runs.get("ours_np1", {}).get("ok"):
        ratios["rs_mapper_over_ours_np1"] = round(runs["rs_mapper"]["total_s"] / runs["ours_np1"]["total_s"], 2)
        ratios["rs_mapper_over_ours_extract_np1"] = round(
            runs["rs_mapper"]["total_s"] / runs["ours_np1"]["stages"]["extract"]["wall_s"], 2)
    result["ratios"] = ratios
    result["read_floor"] = read_floor(directory, work, runs)

    rows = []
    for name, r in runs.items():
        for stage, s in r["stages"].items():
            rows.append([name, stage, f"{s['wall_s']:.1f}", f"{s['user_s'] + s['sys_s']:.1f}",
                         f"{s['peak_rss_tree_mb']:.0f}", ""])
        rows.append([name, "TOTAL" + ("" if r["ok"] else f" (failed at {r['error']['stage']})"),
                     f"{r['total_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['peak_rss_mb'] or 0:.0f}",
                     f"{r.get('images_per_s', 0):.2f} img/s, {r.get('mpixels_per_s', 0):.1f} Mpx/s"])
    print(f"\n{n} Pilatus 6M images, ndiv {args.ndiv} ({meta['uptime']})")
    print(common.table(rows, ["chain", "stage", "wall s", "cpu s", "peak MB", "throughput"]))
    for name, r in runs.items():
        if r.get("repeats_total_s"):
            print(f"{name}: median of {len(r['repeats_total_s'])} runs "
                  f"({', '.join(f'{t:.1f}' for t in r['repeats_total_s'])} s)")
    for k, v in ratios.items():
        print(f"{k}: {v}")
    floor = result["read_floor"]
    if floor.get("ours_np1_s_per_image"):
        print(f"per image: dxtbx reads one in {floor['read_s_per_image']:.3f} s; our one-process "
              f"extraction loop takes {floor['ours_np1_s_per_image']:.3f} s, "
              f"{floor['ours_np1_over_read']:.1f}x the read (the whole chain "
              f"{floor['chain_np1_s_per_image']:.3f} s per image, "
              f"{floor['chain_np1_over_read']:.1f}x)")
    if not args.skip_maps:
        result["maps"] = compare_run_maps(directory, work, runs, args.nproc)
    common.write_result(args.output or f"comparison_{n}{suffix(args)}.json", result)


def read_floor(directory, work, runs, n_read=10):
    """Distance to the read floor: dxtbx's read of an image (the mean of
    ``n_read``, timed here) against our one-process extraction loop per image
    (its log's 'Extracted N images in T s', which excludes start-up and the
    dynamic pass) and against the whole one-process chain per image."""
    import re

    from dxtbx.model.experiment_list import ExperimentListFactory

    imageset = ExperimentListFactory.from_json_file(str(directory / "truth.expt"))[0].imageset
    n_read = min(n_read, len(imageset))
    imageset.get_raw_data(0)  # the format class's first-use costs
    t0 = time.perf_counter()
    for k in range(n_read):
        imageset.get_raw_data(k)
    read = (time.perf_counter() - t0) / n_read
    out = {"read_s_per_image": round(read, 4)}
    ours_np1 = runs.get("ours_np1")
    log = work / "ours_np1" / "dials.diffuse_extract.log"
    if ours_np1 and ours_np1.get("ok") and log.exists():
        m = re.search(r"Extracted (\d+) images in ([\d.]+) s", log.read_text())
        if m:
            loop = float(m.group(2)) / int(m.group(1))
            chain = ours_np1["total_s"] / int(m.group(1))
            out.update(ours_np1_s_per_image=round(loop, 4), ours_np1_over_read=round(loop / read, 2),
                       chain_np1_s_per_image=round(chain, 4),
                       chain_np1_over_read=round(chain / read, 2))
    return out


def suffix(args):
    return "_nobg" if args.no_background else ""


def dataset(n, no_background=False):
    """The simulated Pilatus 6M sequence: common.dataset (the timing runs'
    images, with the simulator's default background), or the same without
    background (p6m_rot_<n>_nobg)."""
    if not no_background:
        return common.dataset(n, exact=True)
    d = common.DATA / f"p6m_rot_{n}_nobg"
    if (d / "truth.json").exists():
        return d
    argv = [str(common.VENV_BIN / "dials.diffuse_simulate"), f"n_images={n}", f"output.directory={d}",
            "output.overwrite=True", "background.constant=0", "background.radial_amplitude=0"]
    argv += [f"{k}={v}" for k, v in common.P6M.items()]
    print(f"simulating {n} Pilatus 6M images without background into {d.relative_to(common.ROOT)} ...",
          flush=True)
    t0 = time.time()
    subprocess.run(argv, check=True, cwd=str(common.DATA), stdout=subprocess.DEVNULL, env=common.one_core_env())
    print(f"  simulated in {time.time() - t0:.0f} s", flush=True)
    return d


def compare_run_maps(directory, work, runs, nprocs):
    """Our merged map against mdx2's (and both against the simulator's truth)
    on their common voxels (bench/compare_maps.py), from the first nproc at
    which both chains succeeded; printed and returned for the JSON."""
    import compare_maps

    for nproc in nprocs:
        o, m = runs.get(f"ours_np{nproc}"), runs.get(f"mdx2_np{nproc}")
        if o and m and o["ok"] and m["ok"]:
            break
    else:
        print("\nmap comparison skipped: no nproc at which both chains succeeded")
        return {"error": "no nproc at which both chains succeeded"}
    ours_dir = work / f"ours_np{nproc}" / "merged"
    mdx2_file = work / f"mdx2_np{nproc}" / "merged.nxs"
    print(f"\nmaps: {ours_dir.relative_to(common.ROOT)} vs {mdx2_file.relative_to(common.ROOT)}, "
          f"truth {directory.relative_to(common.ROOT)}", flush=True)
    t0 = time.perf_counter()
    try:
        r = compare_maps.compare(ours_dir, mdx2_file, truth_dir=directory)
    except Exception as e:  # a failed comparison must not lose the timings
        print(f"map comparison failed: {e!r}")
        return {"error": repr(e)}
    r["seconds"] = round(time.perf_counter() - t0, 1)
    r["runs"] = [f"ours_np{nproc}", f"mdx2_np{nproc}"]
    print(compare_maps.format_result(r))
    return r


def maps_only(args):
    """--maps-only: the map comparison of an earlier run, added to its JSON."""
    n = args.n_images
    directory = common.DATA / f"p6m_rot_{n}{suffix(args)}"
    work = common.DATA / f"cmp_{n}{suffix(args)}"
    runs = {p.name: {"ok": True} for p in work.glob("*_np*")
            if (p / "merged").is_dir() or (p / "merged.nxs").is_file()}
    r = compare_run_maps(directory, work, runs, args.nproc)
    name = args.output or f"comparison_{n}{suffix(args)}.json"
    path = common.RESULTS / name
    result = json.loads(path.read_text()) if path.is_file() else {"n_images": n, "ndiv": args.ndiv}
    result["maps"] = r
    common.write_result(name, result)


if __name__ == "__main__":
    main()
