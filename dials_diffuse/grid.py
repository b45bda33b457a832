"""The fractional-hkl voxel grid and binning of observations into it.

A voxel is named by integer grid indices g = (gh, gk, gl); its centre is at
hkl = (gh / ndiv_h, gk / ndiv_k, gl / ndiv_l), so voxel centres sit on the
Bragg positions whenever g is a multiple of ndiv. A point belongs to the voxel
whose centre is nearest along each axis: g = rint(hkl * ndiv).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


def voxel_indices(hkl: np.ndarray, ndiv) -> np.ndarray:
    """(n, 3) int32 grid indices of the voxel containing each fractional hkl."""
    return np.rint(hkl * np.asarray(ndiv, dtype=np.float64)).astype(np.int32)


def voxel_centres(indices: np.ndarray, ndiv) -> np.ndarray:
    """Fractional hkl of voxel centres."""
    return indices / np.asarray(ndiv, dtype=np.float64)


def encode(indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One int64 key per grid point, ordered lexicographically by (gh, gk, gl).

    Returns (keys, lower corner, extent) so that ``decode`` can invert it.
    """
    lower = indices.min(axis=0).astype(np.int64)
    extent = indices.max(axis=0).astype(np.int64) - lower + 1
    shifted = indices.astype(np.int64) - lower
    keys = (shifted[:, 0] * extent[1] + shifted[:, 1]) * extent[2] + shifted[:, 2]
    return keys, lower, extent


def decode(keys: np.ndarray, lower: np.ndarray, extent: np.ndarray) -> np.ndarray:
    gl = keys % extent[2]
    rest = keys // extent[2]
    gk = rest % extent[1]
    gh = rest // extent[1]
    return (np.stack([gh, gk, gl], axis=1) + lower).astype(np.int32)


def bin_by_voxel(indices: np.ndarray, columns: Dict[str, np.ndarray]):
    """Group observations by voxel and sum each column within a voxel.

    Returns (unique voxel indices (m, 3) sorted by key, counts (m,), dict of
    summed columns). Columns may be 1-D or 2-D (summed along axis 0).
    """
    if len(indices) == 0:
        return (
            np.zeros((0, 3), np.int32),
            np.zeros(0, np.int64),
            {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in columns.items()},
        )
    keys, lower, extent = encode(indices)
    # pixels in raster order give keys in long sorted runs: a stable
    # (merge-based) sort exploits them
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    counts = np.diff(np.r_[starts, len(sorted_keys)])
    sums = {
        name: np.add.reduceat(values[order], starts, axis=0)
        for name, values in columns.items()
    }
    return decode(sorted_keys[starts], lower, extent), counts, sums
