"""A merged map against the truth of the simulated dataset it came from.

    python -m dials_diffuse.simulate.compare processed/diffuse_merged simulated

prints the correlation of the merged voxels with the true diffuse intensity
averaged over each voxel (all voxels, and those off the Bragg positions), and
the merged / true ratio per resolution shell.
"""

from __future__ import annotations

import sys

import numpy as np

from dials_diffuse.merged_files import read_merged
from dials_diffuse.simulate.truth import load_truth


def compare_with_truth(merged_directory, truth_directory, n_shells=5) -> dict:
    """CC of the merged map with the truth (all voxels, off Bragg positions)
    and the normalised merged/true ratio per resolution shell."""
    grid, _, voxels, _ = read_merged(str(merged_directory))
    truth = load_truth(truth_directory)
    ndiv = (grid["ndiv_h"], grid["ndiv_k"], grid["ndiv_l"])
    hkl = np.stack([voxels["H_center"], voxels["K_center"], voxels["L_center"]], axis=1)
    merged = voxels["I_merged_relative"]
    expected = truth.flux * truth.diffuse_voxel_average(hkl, ndiv)
    ok = np.isfinite(merged) & np.isfinite(expected)
    off = ok & ~voxels["on_bragg_position"]
    qmag = voxels["q_magnitude_center"]
    order = np.argsort(qmag[ok])
    shells = np.array_split(order, n_shells)
    ratio = [float(merged[ok][s].sum() / expected[ok][s].sum()) for s in shells]
    mean_ratio = float(merged[ok].sum() / expected[ok].sum())
    return {
        "n_voxels": int(ok.sum()),
        "cc_all": float(np.corrcoef(merged[ok], expected[ok])[0, 1]),
        "cc_off_bragg": float(np.corrcoef(merged[off], expected[off])[0, 1]),
        "shell_d_min": [float(1.0 / qmag[ok][s].max()) for s in shells],
        "shell_ratio": [r / mean_ratio for r in ratio],
    }


def main(args=None):
    args = sys.argv[1:] if args is None else args
    if len(args) != 2:
        print("usage: python -m dials_diffuse.simulate.compare MERGED_DIR SIMULATED_DIR")
        return 1
    result = compare_with_truth(*args)
    print(f"Merged map against the simulated truth ({result['n_voxels']} voxels): "
          f"CC {result['cc_all']:.3f} (off Bragg positions {result['cc_off_bragg']:.3f})")
    print("merged / true per resolution shell (normalised): " + ", ".join(
        f"{r:.3f} to {d:.2f} A" for r, d in zip(result["shell_ratio"], result["shell_d_min"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
