"""Fine-sliced rotation data: are the merged sigmas calibrated against the truth?

Simulates 0.1 deg frames with a 0.1 deg mosaicity (the test fixture
``simulated_rotation_fine`` of tests/conftest.py, with more frames), extracts
and merges them as the tests do, and prints the robust width (1.4826 MAD) of

* ``half``      (I1 - I2) / sqrt(s1^2 + s2^2) of the two half maps;
* ``truth``     (I - k T) / s against the truth T averaged over each voxel,
                all voxels with >= 3 observations;
* ``swept``     the same on the voxels the Ewald sphere swept through inside
                the scan: not observed on its first or last frame (a voxel cut
                by the scan's ends is sampled only in part, and its merged
                value is the average of that part, not of the voxel);
* ``oracle``    (I - k O) / s against an oracle merge of the same kept pixels
                carrying the exact signal (what is left is the counting noise).

    .venv/bin/python bench/fine_sliced_truth.py [--frames 20 100 200]

About 1 min per 100 frames on 2 cores.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ROTATION_FINE_PARAMS  # noqa: E402
from diffuse_helpers import (  # noqa: E402
    extraction_params,
    merge_params,
    robust_width,
    swept_voxels,
)

from dials_diffuse.extraction import extract  # noqa: E402
from dials_diffuse.merging import merge_run  # noqa: E402
from dials_diffuse.simulate import load_truth, params_from, simulate_dataset  # noqa: E402
from dials_diffuse.simulate.oracle import oracle_files  # noqa: E402

NDIV = 4


def widths(n_frames, work):
    data = simulate_dataset(params_from(**{**ROTATION_FINE_PARAMS, "n_images": n_frames,
                                           "output.directory": str(work / "data")}))
    truth = load_truth(data)
    params = extraction_params(truth, work / "ex", **{"output.save_pixels": "all"})
    extract(truth.experiments, params, progress=False)
    result = merge_run(truth.experiments, [str(work / "ex")], merge_params(work / "m"))
    obs, merged = result["observations"], result["merged"]
    swept = swept_voxels(merged, obs)
    expected = truth.flux * truth.diffuse_voxel_average(merged.hkl, NDIV)
    well = (merged.n_observations >= 3) & ~merged.on_bragg
    k = merged.intensity[well].sum() / expected[well].sum()
    z = (merged.intensity - k * expected) / merged.sigma
    (i1, s1, n1), (i2, s2, n2) = result["scaling"].half_maps
    both = (n1 >= 2) & (n2 >= 2)
    z_half = (i1[both] - i2[both]) / np.sqrt(s1[both] ** 2 + s2[both] ** 2)

    files = sorted(str(p) for p in (work / "ex").glob("image_*.npz"))
    oracle = merge_run(truth.experiments, oracle_files(truth, files, work / "oracle", ndiv=NDIV),
                       merge_params(work / "mo"))["merged"]
    index_o = {tuple(g): i for i, g in enumerate(oracle.voxel_grid)}
    pairs = np.array([(i, index_o[tuple(g)]) for i, g in enumerate(merged.voxel_grid)
                      if tuple(g) in index_o and well[i]])
    ia, ib = pairs[:, 0], pairs[:, 1]
    ko = merged.intensity[ia].sum() / oracle.intensity[ib].sum()
    z_oracle = (merged.intensity[ia] - ko * oracle.intensity[ib]) / merged.sigma[ia]
    return {
        "frames": n_frames,
        "voxels": int(well.sum()),
        "swept voxels": int((well & swept).sum()),
        "half": robust_width(z_half),
        "truth": robust_width(z[well]),
        "swept": robust_width(z[well & swept]) if (well & swept).sum() > 50 else float("nan"),
        "oracle": robust_width(z_oracle),
        "error k": result["scaling"].model.error_k,
        "k merged": result["scaling"].model.merged_error_k,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[20, 100, 200])
    args = parser.parse_args()
    rows = []
    for n in args.frames:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(widths(n, pathlib.Path(tmp)))
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in rows[-1].items()), flush=True)


if __name__ == "__main__":
    main()
