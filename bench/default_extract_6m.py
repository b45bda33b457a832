"""Default-settings extraction of Pilatus 6M stills (issue 16): time and bytes per image.

Simulates N stills on a 2463 x 2527 Pilatus-like detector (172 um, 250 mm;
dials.diffuse_simulate, PILATUS miniCBF headers), then runs
``dials.diffuse_extract truth.expt`` as a user would, once per
``output.save_pixels`` setting (sample, the default; all; off), and prints
per setting the wall time of the command, the mean per-image extraction time
the command logs, and the mean size of the per-image files.

The logged per-image time includes the run's fixed costs (detector context,
first predictions). With ``--marginal M`` the default setting also runs on
M stills, and (T_M - T_N) / (M - N) of the two logged extraction loops is
the steady-state cost of one more still.

    .venv/bin/python bench/default_extract_6m.py [--images 4] [--marginal 16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

from dials_diffuse.simulate import params_from, simulate_dataset  # noqa: E402


def run(data, work, setting, expt="truth.expt", tag=""):
    out = work / f"ex_{setting}{tag}"
    log_path = work / f"{setting}{tag}.log"
    # the command installed beside this interpreter (the project's venv)
    args = [os.path.join(os.path.dirname(sys.executable), "dials.diffuse_extract"),
            str(data / expt), f"output.directory={out}", f"output.log={log_path}", "mp.nproc=1"]
    if setting != "sample":
        args.append(f"output.save_pixels={setting}")
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=work)
    wall = time.perf_counter() - t0
    files = sorted(out.glob("image_*.npz"))
    timings = common.parse_extract_log(log_path.read_text())
    return {
        "setting": setting,
        "wall_s": wall,
        "mean_file_MB": sum(f.stat().st_size for f in files) / len(files) / 1e6,
        "n_images": len(files),
        "per_image_s": timings.get("per_image_s"),
        "loop_s": timings.get("extraction_loop_s"),
        "dynamic_pass_s": timings.get("dynamic_mask_s"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--marginal", type=int, default=0,
                        help="also run the default setting on this many stills")
    args = parser.parse_args()
    marginal = None
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        data = simulate_dataset(params_from(**{
            "mode": "stills", "n_images": max(args.images, args.marginal), "random_seed": 16,
            "detector.n_fast": 2463, "detector.n_slow": 2527, "detector.pixel_size": 0.172,
            "detector.distance": 250, "detector.format": "pilatus",
            "output.directory": str(work / "data")}))
        data = pathlib.Path(data)
        expt = "truth.expt"
        if args.marginal > args.images:
            # the first N stills of the same data set
            from dxtbx.model.experiment_list import ExperimentListFactory

            experiments = ExperimentListFactory.from_json_file(str(data / "truth.expt"),
                                                               check_format=False)
            experiments[:args.images].as_file(str(data / "first.expt"))
            expt = "first.expt"
        rows = [run(data, work, s, expt) for s in ("sample", "all", "off")]
        if args.marginal > args.images:
            big = run(data, work, "sample", tag=f"_{args.marginal}")
            marginal = {"n_small": args.images, "n_large": args.marginal,
                        "loop_small_s": rows[0]["loop_s"], "loop_large_s": big["loop_s"],
                        "s_per_extra_still": (big["loop_s"] - rows[0]["loop_s"])
                        / (args.marginal - args.images),
                        "mean_file_MB": big["mean_file_MB"]}
    load = os.getloadavg()[0]
    for r in rows:
        print(f"save_pixels={r['setting']:6s}  {r['mean_file_MB']:7.1f} MB per image  "
              f"{r['per_image_s']} s per image (+ dynamic pass {r['dynamic_pass_s']} s; "
              f"command {r['wall_s']:.1f} s for {r['n_images']} images)  (load {load:.1f})")
    if marginal:
        print(f"steady state (default setting): {marginal['s_per_extra_still']:.3f} s per extra "
              f"still ({marginal['n_small']} -> {marginal['n_large']} stills), "
              f"{marginal['mean_file_MB']:.1f} MB per image")
    print(json.dumps({"rows": rows, "marginal": marginal}))


if __name__ == "__main__":
    main()
