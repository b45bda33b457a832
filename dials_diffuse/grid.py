"""The fractional-hkl voxel grid and binning of observations into it.

A voxel is named by integer grid indices g = (gh, gk, gl); its centre is at
hkl = (gh / ndiv_h, gk / ndiv_k, gl / ndiv_l), so voxel centres sit on the
Bragg positions whenever g is a multiple of ndiv. A point belongs to the voxel
whose centre is nearest along each axis: g = rint(hkl * ndiv).
"""

from __future__ import annotations

import numpy as np
from cctbx import uctbx


def voxel_indices(hkl: np.ndarray, ndiv) -> np.ndarray:
    """(n, 3) int32 grid indices of the voxel containing each fractional hkl."""
    return np.rint(hkl * np.asarray(ndiv, dtype=np.float64)).astype(np.int32)


def voxel_centres(indices: np.ndarray, ndiv) -> np.ndarray:
    """Fractional hkl of voxel centres."""
    return indices / np.asarray(ndiv, dtype=np.float64)


def decode(keys: np.ndarray, lower: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Grid indices (n, 3) of keys sum_a (g_a - lower_a) * stride_a, strides
    (extent_1 extent_2, extent_2, 1): (gh, gk, gl) in lexicographic order."""
    keys = keys.astype(np.int64)
    gl = keys % extent[2]
    rest = keys // extent[2]
    gk = rest % extent[1]
    gh = rest // extent[1]
    return (np.stack([gh, gk, gl], axis=1) + lower).astype(np.int32)


def bin_runs(run_keys, run_counts, run_sums, lower, extent):
    """Combine runs (pre-summed groups of observations) that share a voxel key.

    ``run_keys``: non-negative keys (see ``decode``) of one box (``lower``,
    ``extent``); ``run_counts``: observations per run; ``run_sums``: dict of
    per-run sums, 1-D or (m, k). Returns (voxel indices (m, 3) sorted by key,
    counts, summed columns).
    """
    keys, counts, sums = combine_runs(run_keys, run_counts, run_sums)
    return decode(keys, lower, extent).reshape(-1, 3), counts, sums


def combine_runs(run_keys, run_counts, run_sums):
    """(unique keys sorted, counts, summed columns) of runs sharing a key."""
    if len(run_keys) == 0:
        return (
            np.zeros(0, run_keys.dtype),
            np.zeros(0, np.int64),
            {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in run_sums.items()},
        )
    order = sort_keys(run_keys)
    sorted_keys = run_keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    counts = np.add.reduceat(run_counts[order], starts)
    sums = {
        name: np.add.reduceat(values[order], starts, axis=0)
        for name, values in run_sums.items()
    }
    return sorted_keys[starts], counts, sums


def sort_keys(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integer keys.

    Keys below 2**32 are sorted as two 16-bit digits: numpy's stable sort of
    16-bit integers is a radix sort, twice as fast as sorting the int32 keys.
    """
    if keys.dtype.itemsize > 4 and keys.max(initial=0) >= 2**32:
        return np.argsort(keys, kind="stable")
    low = (keys & 0xFFFF).astype(np.uint16)
    high = (keys >> 16).astype(np.uint16)
    order = np.argsort(low, kind="stable")
    return order[np.argsort(high[order], kind="stable")]


def key_box(setting_inverse: np.ndarray, ndiv, q_max: float):
    """(lower, extent) of a key box that holds every voxel within |q| <= q_max.

    |h_a| = |row_a(M^-1) . q| <= |row_a| |q| (Cauchy-Schwarz), one voxel of
    margin for rounding.
    """
    reach = np.linalg.norm(setting_inverse, axis=1) * np.asarray(ndiv, float) * q_max
    half = np.ceil(reach).astype(np.int64) + 1
    return -half, 2 * half + 1


class GlobalVoxelGrid:
    """The merge grid: average cell, space group, subdivisions and hkl bounds.

    Built from all crystal models of a run. Per PHYSICS.md the orientation of
    randomly oriented stills is never averaged: the grid only needs the
    average metric (B) and the symmetry; each image keeps its own A for hkl.
    """

    def __init__(self, unit_cell, space_group, ndiv, d_min=None, d_max=None,
                 cell_spread=None, orientation=None, n_crystals=0):

        self.unit_cell = uctbx.unit_cell(tuple(unit_cell))
        self.space_group = space_group
        self.ndiv = tuple(int(n) for n in ndiv)
        self.d_min = d_min
        self.d_max = d_max
        self.cell_spread = cell_spread or {}
        self.orientation = orientation or {}
        self.n_crystals = n_crystals

    @property
    def B(self) -> np.ndarray:
        """Reciprocal orthogonalisation (DIALS convention): q = B hkl, 1/Angstrom."""
        return np.array(self.unit_cell.fractionalization_matrix()).reshape(3, 3).T

    def hkl_bounds(self):
        """|h| <= |a| / d_min (and likewise k, l): integer bounds per axis."""
        if self.d_min is None:
            return None
        params = self.unit_cell.parameters()
        return [
            (-int(np.floor(params[i] / self.d_min)), int(np.floor(params[i] / self.d_min)))
            for i in range(3)
        ]

    def q_of(self, hkl: np.ndarray) -> np.ndarray:
        return hkl @ self.B.T

    def total_voxels(self):
        bounds = self.hkl_bounds()
        if bounds is None:
            return None
        total = 1
        for (lo, hi), n in zip(bounds, self.ndiv):
            total *= (hi - lo) * n + 1
        return total

    def as_dict(self):
        bounds = self.hkl_bounds()
        return {
            "crystal_avg_ref": {
                "unit_cell": list(self.unit_cell.parameters()),
                "space_group": self.space_group.info().symbol_and_number(),
                "space_group_hall": self.space_group.type().hall_symbol(),
                "setting_matrix_B": self.B.tolist(),
                "setting_matrix_convention": "q = B hkl (1/Angstrom, crystal "
                "Cartesian frame, no 2 pi); orientations are not averaged",
            },
            "hkl_bounds": {
                axis: list(b) for axis, b in zip("hkl", bounds)
            } if bounds else None,
            "ndiv_h": self.ndiv[0],
            "ndiv_k": self.ndiv[1],
            "ndiv_l": self.ndiv[2],
            "d_min": self.d_min,
            "d_max": self.d_max,
            "total_voxels": self.total_voxels(),
            "n_crystals": self.n_crystals,
            "cell_spread": self.cell_spread,
            "orientation_spread": self.orientation,
        }


def unit_cell_statistics(crystals):
    """Mean and standard deviation of the cell parameters of crystal models."""
    cells = np.array([c.get_unit_cell().parameters() for c in crystals])
    return cells.mean(axis=0), cells.std(axis=0), cells
