#!/usr/bin/env python
"""Per-image extraction cost on Pilatus 6M images (issue 3, "Speed and memory").

    .venv/bin/python bench/bench_extract.py            # or: bash bench/run_extract.sh

On a simulated 2463 x 2527 (172 um) rotation sequence, all corrections,
filter.pixel_step=1, binning included, output.save_pixels=off, one thread:

* dxtbx read only (``imageset.get_raw_data``) and read + conversion to numpy;
* the static/detector context (static mask, per-pixel geometry and correction
  factors, resolution selection), computed once per detector;
* per-image extraction (``extraction.extract_image``: read, trusted range,
  predicted-Bragg mask, corrections, hkl, voxel binning), median over images;
  the NPZ write and the dynamic-mask pass (a second read of each image) apart;
* output size per image against the CBF size;
* peak RSS of whole ``extract()`` runs on 100 and 400 images (separate processes;
  beyond the simulated images the scan cycles through their files, see
  ``cycled_dataset``).

Results: a table on stdout and bench/results/extract.json.
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_k] = "1"
os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402


def extract_params(out_dir):
    from dials_diffuse.command_line import extract as extract_cmd

    params = extract_cmd.phil_scope.fetch().extract()
    params.filter.pixel_step = 1
    params.output.save_pixels = "off"
    params.output.directory = str(out_dir)
    params.grid.ndiv_h = params.grid.ndiv_k = params.grid.ndiv_l = 4
    if hasattr(params, "mp"):
        params.mp.nproc = 1  # one core: the per-image figures of issue 3
    return params


def vmhwm_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_full_run(directory, n, out_dir):
    """One extract() over the first n images (a separate process): wall time
    and peak memory of the whole run."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffuse.extraction import extract

    models = ExperimentListFactory.from_json_file(str(Path(directory) / "truth.expt"))
    images = None  # all of the models' own images
    if len(models[0].imageset) != n:
        paths = [models[0].imageset.get_path(k) for k in range(n)]
        images = ExperimentListFactory.from_filenames(paths)
    params = extract_params(out_dir)
    t0 = time.perf_counter()
    manifest = extract(models, params, images=images, progress=False)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "n_images": n,
        "n_extracted": manifest["n_extracted"],
        "wall_s": round(wall, 2),
        "per_image_s": round(wall / n, 3),
        "vmhwm_mb": round(vmhwm_mb(), 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


def cycled_dataset(source, n):
    """``source`` itself when it has n images, else an n-image rotation scan
    whose files cycle through the source's images (hard links, so each image
    path is distinct): the per-image work and the whole-run bookkeeping of n
    images without simulating them."""
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model import ScanFactory
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    images = sorted(Path(source).glob("image_*.cbf"))
    if n <= len(images):
        return Path(source)
    d = common.DATA / f"p6m_rot_cycled_{n}"
    if (d / "truth.expt").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        link = d / f"image_{k + 1:05d}.cbf"
        if not link.exists():
            os.link(images[k % len(images)], link)
    models = ExperimentListFactory.from_json_file(str(Path(source) / "truth.expt"))
    expt = models[0]
    scan = ScanFactory.make_scan(
        (1, n), expt.scan.get_exposure_times()[0], expt.scan.get_oscillation(),
        {k + 1: float(k) for k in range(n)},
    )
    if expt.crystal.num_scan_points:
        expt.crystal.reset_scan_points()
    expt.imageset = ImageSetFactory.make_sequence(
        str(d / "image_#####.cbf"), list(range(1, n + 1)),
        format_class=expt.imageset.get_format_class(), beam=expt.beam,
        detector=expt.detector, goniometer=expt.goniometer, scan=scan,
    )
    expt.scan = scan
    ExperimentList([expt]).as_file(str(d / "truth.expt"))
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=10, help="images timed one by one (>= 5)")
    ap.add_argument("--memory-sizes", type=int, nargs="+", default=[100, 400],
                    help="numbers of images of the whole-run memory comparison")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--output", default="extract.json")
    ap.add_argument("--child", nargs=3, metavar=("DIR", "N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_full_run(args.child[0], int(args.child[1]), args.child[2])

    common.bootstrap()
    meta = common.stamp()
    directory = common.dataset(args.n_images)

    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffuse import extraction, masks
    from dials_diffuse.diffuse_files import write_image_file

    models = ExperimentListFactory.from_json_file(str(directory / "truth.expt"))
    expt = models[0]
    imageset = expt.imageset
    n = min(args.n_images, len(imageset))
    tmp = Path(tempfile.mkdtemp(prefix="extract_", dir=common.DATA))
    params = extract_params(tmp)
    ndiv = extraction.check_params(params)
    tasks, _ = extraction.plan_tasks(models)
    tasks = tasks[:n]
    cbf_sizes = [os.path.getsize(imageset.get_path(k)) for k in range(n)]
    panel = expt.detector[0]
    n_pixels = panel.get_image_size()[0] * panel.get_image_size()[1]

    # warm the page cache and the format class (first reads are not representative)
    for k in range(n):
        imageset.get_raw_data(k)

    # 1. dxtbx read only, and read + numpy float64 (what extraction uses)
    # (an imageset keeps the last image read: never read the same index twice in a row)
    t_read, t_read_np, cpu_read = [], [], []
    for rep in range(2):
        for k in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            imageset.get_raw_data(k)
            t_read.append(time.perf_counter() - t0)
            cpu_read.append(time.process_time() - c0)
        for k in range(n):
            t0 = time.perf_counter()
            extraction.read_image(tasks[k])
            t_read_np.append(time.perf_counter() - t0)

    # 2. static/detector context, once per detector
    t_static, t_context = [], []
    for rep in range(2):
        t0 = time.perf_counter()
        static = masks.static_mask(imageset, params.masking, params.masking.beamstop)
        t1 = time.perf_counter()
        context = extraction.detector_context(expt, imageset, params, static)
        t2 = time.perf_counter()
        t_static.append(t1 - t0)
        t_context.append(t2 - t1)

    # dynamic mask: a pass over the images before extraction (per image: read + accumulate)
    d = params.masking.dynamic
    acc = masks.DynamicMaskAccumulator(expt.detector, d.hot_threshold, d.hot_fraction,
                                       d.hot_ratio, d.dead_min_expected_counts)
    t_dyn = []
    for task in tasks:
        t0 = time.perf_counter()
        raw = extraction.read_image(task)
        acc.add(raw)
        t_dyn.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    dynamic = acc.masks()
    t_dyn_final = time.perf_counter() - t0

    # 3. per-image extraction (first image apart: it fills the rotation prediction cache)
    t_extract, t_write, out_sizes, n_voxels, n_kept = [], [], [], [], []
    cpu_extract = []
    first_image = None
    for k, task in enumerate(tasks):
        t_exp = extraction.exposure_time(task, params)
        t0, c0 = time.perf_counter(), time.process_time()
        result = extraction.extract_image(task, context, params, ndiv, None, dynamic, None,
                                          exposure=t_exp)
        dt = time.perf_counter() - t0
        if k == 0:
            first_image = dt
        else:
            t_extract.append(dt)
            cpu_extract.append(time.process_time() - c0)
        path = tmp / f"image_{k:06d}.npz"
        t0 = time.perf_counter()
        write_image_file(str(path), result.arrays, {"still_id": k, "ndiv": list(ndiv)})
        t_write.append(time.perf_counter() - t0)
        out_sizes.append(path.stat().st_size)
        n_voxels.append(len(result.arrays["voxel_indices"]))
        n_kept.append(result.stages["kept"])

    # profile one image by stage (cProfile top functions), to say where time goes
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    extraction.extract_image(tasks[-1], context, params, ndiv, None, dynamic, None,
                             exposure=extraction.exposure_time(tasks[-1], params))
    prof.disable()
    stats = pstats.Stats(prof)
    top = sorted(((v[3], f"{Path(k[0]).name}:{k[2]}") for k, v in stats.stats.items()),
                 reverse=True)[:12]

    common.rmtree(tmp)
    med = common.median
    read_s, read_np_s = med(t_read), med(t_read_np)
    extract_s, write_s, dyn_s = med(t_extract), med(t_write), med(t_dyn)
    per_image_total = extract_s + write_s + dyn_s
    result = {
        **meta,
        "dataset": {"directory": str(directory.relative_to(common.ROOT)), "n_images_timed": n,
                    "image_size": list(panel.get_image_size()),
                    "pixel_size_mm": list(panel.get_pixel_size()),
                    "oscillation_deg": expt.scan.get_oscillation()[1]},
        "settings": {"pixel_step": 1, "save_pixels": "off", "ndiv": list(ndiv),
                     "corrections": "polarization, solid angle, efficiency, air, gain, exposure",
                     "bragg_mask": params.masking.bragg.method, "dynamic_mask": True,
                     "threads": 1},
        "read_only_s": read_s,
        "read_to_numpy_s": read_np_s,
        "static_mask_s": med(t_static),
        "detector_context_s": med(t_context),
        "n_pixels_in_context": int(sum(p.n_selected for p in context.panels)),
        "read_only_cpu_s": med(cpu_read),
        "extract_image_s": extract_s,
        "extract_image_cpu_s": med(cpu_extract),
        "extract_image_all_s": [round(x, 4) for x in t_extract],
        "extract_first_image_s": first_image,
        "write_npz_s": write_s,
        "dynamic_mask_pass_per_image_s": dyn_s,
        "dynamic_mask_finalise_s": t_dyn_final,
        "per_image_total_s": per_image_total,
        "per_image_total_without_dynamic_s": extract_s + write_s,
        "ratio_extract_to_read": extract_s / read_s,
        "pixels_per_s": n_pixels / (extract_s + write_s),
        "kept_pixels_per_image": med(n_kept),
        "voxels_per_image": med(n_voxels),
        "output_bytes_per_image": med(out_sizes),
        "cbf_bytes_per_image": med(cbf_sizes),
        "raw_int32_bytes_per_image": 4 * n_pixels,
        "shrink_vs_cbf": med(cbf_sizes) / med(out_sizes),
        "shrink_vs_raw_int32": 4 * n_pixels / med(out_sizes),
        "profile_top_cumulative_s": [[name, round(t, 4)] for t, name in top],
        "target_s": 0.3,
    }

    # 4. memory of whole runs on different numbers of images (separate processes)
    if not args.skip_memory:
        runs = []
        for size in args.memory_sizes:
            out = common.DATA / f"extract_mem_{size}"
            common.rmtree(out)
            source = cycled_dataset(directory, size)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(source), str(size), str(out)],
                capture_output=True, text=True, env=common.one_core_env(),
            )
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            common.rmtree(out)
        result["whole_runs"] = runs
        if len(runs) >= 2:
            result["memory_growth_pct"] = 100 * (runs[-1]["vmhwm_mb"] / runs[0]["vmhwm_mb"] - 1)

    path = common.write_result(args.output, result)
    report.extract(json.loads(path.read_text()))


if __name__ == "__main__":
    main()
