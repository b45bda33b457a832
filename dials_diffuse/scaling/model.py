"""The scaling model: per-image scales and offsets, the smooth resolution
term (:class:`ScalingModel`), the smooth per-sweep scale basis and the
result of a refinement; a small linear solver shared by the fits."""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import numpy as np
import scipy.linalg

from dials_diffuse.surface_model import points_spanning


logger = logging.getLogger("dials.diffuse_merge")


@dataclasses.dataclass
class ScalingModel:
    scale: np.ndarray  # b_i
    offset: np.ndarray  # c_i (zeros when offsets are off)
    smoother_q: Optional[np.ndarray] = None  # control point |q| (1/Angstrom)
    smoother_values: Optional[np.ndarray] = None  # (n_images, k): a_i at the control points
    scale_basis: Optional["SmoothScaleBasis"] = None  # b = basis.matrix @ scale_controls
    scale_controls: Optional[np.ndarray] = None
    # error model: var(S) = var_Poisson + (error_k E[S])^2 (fit_error_model),
    # and its term in the merged variance (merged_error_k)
    error_k: float = 0.0
    merged_error_k: float = 0.0

    def set_scale_controls(self, controls):
        self.scale_controls = controls
        self.scale = self.scale_basis.matrix @ controls

    def __getstate__(self):
        # the workers of a pass need b, not how it is parametrised (the basis
        # is images x controls: not worth pickling for every partition)
        state = dict(self.__dict__)
        state["scale_basis"] = None
        return state

    def observation_offset(self, ch):
        """c_i of each row of a chunk, plus c(|s|, phi) with mdx2's offset surface."""
        if ch.row_offset is None:
            return self.offset[ch.image]
        return self.offset[ch.image] + ch.row_offset

    def interpolation(self, qmag):
        """Control-point index j and weight t: a(q) = (1-t) v_j + t v_{j+1}."""
        qs = self.smoother_q
        j = np.clip(np.searchsorted(qs, qmag, side="right") - 1, 0, qs.size - 2)
        t = np.clip((qmag - qs[j]) / (qs[j + 1] - qs[j]), 0.0, 1.0)
        return j, t

    def resolution_factor(self, qmag: np.ndarray, image: np.ndarray) -> np.ndarray:
        """a_image(|q|) for each (|q|, image) pair."""
        if self.smoother_q is None:
            return np.ones_like(qmag)
        j, t = self.interpolation(qmag)
        v = self.smoother_values
        return (1 - t) * v[image, j] + t * v[image, j + 1]

    def observation_factor(self, obs):
        """a_i(|q_v|) of each row; the number 1 without a smoother (no
        per-row array)."""
        if self.smoother_q is None:
            return 1.0
        return self.resolution_factor(obs.voxel_qmag[obs.voxel], obs.image)


@dataclasses.dataclass
class SmoothScaleBasis:
    """b_i of rotation images as a smooth function of the rotation angle:
    per sweep, piecewise linear through control points at most ``interval``
    degrees apart spanning the sweep's image centres (b = matrix @ controls)."""

    matrix: np.ndarray  # (n_images, n_controls) hat-function weights, rows sum to 1
    control_phi: np.ndarray  # (n_controls,) degrees
    control_sweep: np.ndarray  # (n_controls,) sweep (experiment) of each control point
    interval: float

    @classmethod
    def from_angles(cls, phi_deg, sweep, interval_deg):
        phi_deg = np.asarray(phi_deg, float)
        sweep = np.asarray(sweep)
        control_phi, control_sweep = [], []
        matrix_blocks = []
        for s_id in np.unique(sweep):
            rows = np.flatnonzero(sweep == s_id)
            lo, hi = phi_deg[rows].min(), phi_deg[rows].max()
            n_ctrl = points_spanning(hi - lo, interval_deg)
            knots = np.linspace(lo, hi, n_ctrl) if hi > lo else np.array([lo, lo + interval_deg])
            j = np.clip(np.searchsorted(knots, phi_deg[rows], side="right") - 1, 0, n_ctrl - 2)
            t = np.clip((phi_deg[rows] - knots[j]) / (knots[j + 1] - knots[j]), 0.0, 1.0)
            matrix_blocks.append((rows, j, t, n_ctrl))
            control_phi.append(knots)
            control_sweep.append(np.full(n_ctrl, s_id))
        n_ctrl_total = sum(b[3] for b in matrix_blocks)
        matrix = np.zeros((phi_deg.size, n_ctrl_total))
        first = 0
        for rows, j, t, n_ctrl in matrix_blocks:
            matrix[rows, first + j] = 1.0 - t
            matrix[rows, first + j + 1] += t
            first += n_ctrl
        return cls(matrix, np.concatenate(control_phi), np.concatenate(control_sweep),
                   float(interval_deg))

    def fit(self, values, weights):
        """Controls c minimising sum_i w_i (values_i - (M c)_i)^2."""
        m = self.matrix
        normal = m.T @ (weights[:, None] * m)
        rhs = m.T @ (weights * values)
        return solver(normal + 1e-12 * np.trace(normal) * np.eye(normal.shape[0]))(rhs)


@dataclasses.dataclass
class ScalingResult:
    model: ScalingModel
    intensity: np.ndarray  # merged I_v (per compact voxel)
    rejected: np.ndarray  # bool per observation
    history: List[dict]
    converged: bool
    sigma: Optional[np.ndarray] = None  # sigma of I_v, with the final model and rejections
    n_observations: Optional[np.ndarray] = None  # used observations per voxel
    half_maps: Optional[list] = None  # (I_v, sigma_v, n) of each half of the images
    surfaces: object = None  # scaling.surfaces.SurfaceModel (mdx2's terms), None when off


def solver(matrix):
    """x -> matrix^-1 x (LU once; least squares if singular)."""
    try:
        lu = scipy.linalg.lu_factor(matrix, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return lambda b: np.linalg.lstsq(matrix, b, rcond=None)[0]
    if not np.all(np.isfinite(lu[0])) or np.any(np.diag(lu[0]) == 0):
        return lambda b: np.linalg.lstsq(matrix, b, rcond=None)[0]
    return lambda b: scipy.linalg.lu_solve(lu, b, check_finite=False)
