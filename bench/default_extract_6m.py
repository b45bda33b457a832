"""Default-settings extraction of Pilatus 6M stills (issue 16): time and bytes per image.

Simulates N stills on a 2463 x 2527 Pilatus-like detector (172 um, 250 mm;
dials.diffuse_simulate, PILATUS miniCBF headers), then runs
``dials.diffuse_extract truth.expt`` as a user would, once per
``output.save_pixels`` setting (sample, the default; all; off), and prints
per setting the wall time of the command, the mean per-image extraction time
the command logs, and the mean size of the per-image files.

    .venv/bin/python bench/default_extract_6m.py [--images 4]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from dials_diffuse.simulate import params_from, simulate_dataset


def run(data, work, setting):
    out = work / f"ex_{setting}"
    # the command installed beside this interpreter (the project's venv)
    args = [os.path.join(os.path.dirname(sys.executable), "dials.diffuse_extract"), str(data / "truth.expt"), f"output.directory={out}",
            f"output.log={work / (setting + '.log')}", "mp.nproc=1"]
    if setting != "sample":
        args.append(f"output.save_pixels={setting}")
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=work)
    wall = time.perf_counter() - t0
    files = sorted(out.glob("image_*.npz"))
    log = (work / (setting + ".log")).read_text()
    # "Extracted N images in T s (t s per image, ...)" and the dynamic pass
    per_image = [float(x) for x in re.findall(r"\((\d+\.\d+) s per image", log)]
    dynamic = [float(x) for x in re.findall(r"Dynamic mask from \d+ images in (\d+\.\d+) s", log)]
    return {
        "setting": setting,
        "wall_s": wall,
        "mean_file_MB": sum(f.stat().st_size for f in files) / len(files) / 1e6,
        "n_images": len(files),
        "per_image_s": per_image[0] if per_image else None,
        "dynamic_pass_s": dynamic[0] if dynamic else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        data = simulate_dataset(params_from(**{
            "mode": "stills", "n_images": args.images, "random_seed": 16,
            "detector.n_fast": 2463, "detector.n_slow": 2527, "detector.pixel_size": 0.172,
            "detector.distance": 250, "detector.format": "pilatus",
            "output.directory": str(work / "data")}))
        rows = [run(pathlib.Path(data), work, s) for s in ("sample", "all", "off")]
    load = os.getloadavg()[0]
    for r in rows:
        print(f"save_pixels={r['setting']:6s}  {r['mean_file_MB']:7.1f} MB per image  "
              f"{r['per_image_s']} s per image (+ dynamic pass {r['dynamic_pass_s']} s; "
              f"command {r['wall_s']:.1f} s for {r['n_images']} images)  (load {load:.1f})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
