"""Consistency rules of crystal models, one definition each, used by the
pipeline's validation (:mod:`dials_diffuse.pipeline.validation`) and by the
merge (:func:`dials_diffuse.merging.build_grid`).

* **Cell spread**: the relative deviation of each cell edge a, b, c from the
  *median* cell of the models (the median, so that one bad model does not
  move the reference towards itself); a model is an outlier when its largest
  edge deviation exceeds the tolerance (``validation.max_cell_spread``,
  default 0.02, in ``dials.diffuse_process``; ``cell_tolerance``, default
  0.03, in ``dials.diffuse_merge``). The merge's grid still uses the *mean*
  cell of the models as its average cell: that is the map's cell, not this
  rule.
* **Laue group**: two space groups are compatible when their Laue groups
  (the derived Patterson groups) are the same.
* **Misorientation**: the angle of each model's orientation from the first
  model's, modulo the crystal symmetry (DIALS'
  ``difference_rotation_matrix_axis_angle``); NaN where DIALS cannot compare
  them. The RMS over the comparable models is the reported figure. Along a
  scan (scan-varying models): the RMS angle of the scan-point U matrices from
  the first one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scitbx import matrix

from dials.algorithms.indexing.compare_orientation_matrices import (
    difference_rotation_matrix_axis_angle,
)


# --------------------------------------------------------------------------
# Cell spread
# --------------------------------------------------------------------------
@dataclass
class CellSpread:
    cells: np.ndarray  # (n, 6) cell parameters of the models
    median: np.ndarray  # (6,) median cell
    relative_deviation: np.ndarray  # (n, 3) |edge - median| / median

    @property
    def max_deviation(self) -> np.ndarray:
        """Largest relative edge deviation of each model, (n,)."""
        return self.relative_deviation.max(axis=1)

    def outliers(self, tolerance) -> np.ndarray:
        """Indices of the models whose largest edge deviation exceeds ``tolerance``."""
        return np.flatnonzero(self.max_deviation > tolerance)


def cell_spread(crystals) -> CellSpread:
    """Cell-edge deviations of the crystal models from their median cell."""
    cells = np.array([c.get_unit_cell().parameters() for c in crystals])
    median = np.median(cells, axis=0)
    rel = np.abs(cells[:, :3] - median[:3]) / median[:3]
    return CellSpread(cells, median, rel)


# --------------------------------------------------------------------------
# Laue group
# --------------------------------------------------------------------------
def laue_group_number(space_group) -> int:
    """Space-group number of the Laue group (derived Patterson group)."""
    return space_group.build_derived_patterson_group().type().number()


def same_laue_group(space_group, reference) -> bool:
    return laue_group_number(space_group) == laue_group_number(reference)


def space_group_symbols(crystals) -> set:
    """The distinct space groups (Hermann-Mauguin symbols) of the models."""
    return {c.get_space_group().type().lookup_symbol() for c in crystals}


# --------------------------------------------------------------------------
# Misorientation
# --------------------------------------------------------------------------
def misorientations_from_first(crystals) -> np.ndarray:
    """Angles (deg) of crystals[1:] from crystals[0], modulo symmetry; NaN
    where they cannot be compared."""
    angles = []
    for c in crystals[1:]:
        try:
            _, _, angle, _ = difference_rotation_matrix_axis_angle(crystals[0], c)
        except Exception:
            angle = float("nan")
        angles.append(float(angle))
    return np.array(angles, dtype=float)


def rms_misorientation(angles) -> float:
    """RMS (deg) of the comparable angles; NaN if none is."""
    angles = np.asarray(angles, dtype=float)
    ok = np.isfinite(angles)
    return float(np.sqrt(np.mean(np.square(angles[ok])))) if ok.any() else float("nan")


def scan_rms_misorientation(experiment):
    """RMS angle (deg) of the scan-point U matrices from the first one; None
    for a scan-static crystal."""
    c = experiment.crystal
    n = c.num_scan_points
    if not n:
        return None
    u0 = matrix.sqr(c.get_U_at_scan_point(0))
    angles = []
    for i in range(1, n):
        r = matrix.sqr(c.get_U_at_scan_point(i)) * u0.transpose()
        cos_t = max(-1.0, min(1.0, (r.trace() - 1) / 2))
        angles.append(math.degrees(math.acos(cos_t)))
    if not angles:
        return 0.0
    return math.sqrt(sum(a * a for a in angles) / len(angles))
