"""Central sections of a merged voxel map.

The merged map holds one voxel per asymmetric-unit grid point. It is expanded
to P1 with the Laue operators the merge used (``symmetry.expand_to_p1``), and a
central section is the set of P1 voxels with one grid index equal to zero:
``L0`` = all voxels with gl == 0 (an h-k plane through the origin), ``K0`` =
gk == 0 (h-l), ``H0`` = gh == 0 (k-l). Coordinates are in reciprocal-lattice
units: the voxel centre hkl = grid index / ndiv.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional

import numpy as np

from dials_diffuse import symmetry
from cctbx import sgtbx

logger = logging.getLogger("dials.diffuse_check")

AXES = "hkl"
SECTIONS = {"L0": 2, "K0": 1, "H0": 0}  # name -> the axis held at zero


@dataclasses.dataclass
class Section:
    name: str
    fixed_axis: int
    u_axis: int  # column axis of ``values``
    v_axis: int  # row axis
    values: np.ndarray  # (n_v, n_u), NaN where no voxel
    u: np.ndarray  # hkl coordinate of each column
    v: np.ndarray  # hkl coordinate of each row

    @property
    def u_label(self):
        return AXES[self.u_axis]

    @property
    def v_label(self):
        return AXES[self.v_axis]

    def value_at(self, u, v):
        """Value of the voxel whose centre is nearest to (u, v) (NaN outside)."""
        iu = int(np.argmin(np.abs(self.u - u)))
        iv = int(np.argmin(np.abs(self.v - v)))
        return self.values[iv, iu]

    def argmax(self):
        """(u, v) hkl coordinates of the largest finite value."""
        flat = np.nanargmax(self.values)
        iv, iu = np.unravel_index(flat, self.values.shape)
        return float(self.u[iu]), float(self.v[iv])

    def extent(self):
        du = (self.u[1] - self.u[0]) if self.u.size > 1 else 1.0
        dv = (self.v[1] - self.v[0]) if self.v.size > 1 else 1.0
        return (self.u[0] - du / 2, self.u[-1] + du / 2, self.v[0] - dv / 2, self.v[-1] + dv / 2)


def space_group_of(grid: dict):
    """cctbx space group of a grid definition (by its Hall symbol)."""

    ref = grid.get("crystal_avg_ref", {})
    hall = ref.get("space_group_hall")
    if hall:
        return sgtbx.space_group(hall)
    symbol = str(ref.get("space_group", "P 1")).split("(")[0].strip()
    return sgtbx.space_group_info(symbol=symbol).group()


def operators_for(grid: dict, mode: str):
    return symmetry.laue_operators(space_group_of(grid), mode)


def expand_columns(voxel_indices, columns: Dict[str, np.ndarray], operators, ndiv):
    """P1 grid indices and every column carried to the symmetry mates."""
    names = list(columns)
    stacked = np.column_stack([np.asarray(columns[n], dtype=np.float64) for n in names])
    full, values = symmetry.expand_to_p1(np.asarray(voxel_indices), stacked, operators, ndiv)
    return full, {n: values[:, i] for i, n in enumerate(names)}


def central_section(indices, values, fixed_axis: int, ndiv, name: str = "") -> Optional[Section]:
    """The plane g[fixed_axis] == 0 of P1 grid ``indices`` as a dense 2-D array."""
    u_axis, v_axis = [a for a in range(3) if a != fixed_axis]
    sel = indices[:, fixed_axis] == 0
    if not sel.any():
        return None
    g = indices[sel]
    vals = np.asarray(values, dtype=np.float64)[sel]
    lo_u, hi_u = g[:, u_axis].min(), g[:, u_axis].max()
    lo_v, hi_v = g[:, v_axis].min(), g[:, v_axis].max()
    dense = np.full((hi_v - lo_v + 1, hi_u - lo_u + 1), np.nan)
    dense[g[:, v_axis] - lo_v, g[:, u_axis] - lo_u] = vals
    ndiv = np.asarray(ndiv, dtype=np.float64)
    return Section(
        name=name or {2: "L0", 1: "K0", 0: "H0"}[fixed_axis],
        fixed_axis=fixed_axis,
        u_axis=u_axis,
        v_axis=v_axis,
        values=dense,
        u=np.arange(lo_u, hi_u + 1) / ndiv[u_axis],
        v=np.arange(lo_v, hi_v + 1) / ndiv[v_axis],
    )


def central_sections(indices, values, ndiv) -> Dict[str, Optional[Section]]:
    return {name: central_section(indices, values, axis, ndiv, name) for name, axis in SECTIONS.items()}
