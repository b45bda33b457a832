"""Smooth multiplicative surfaces on a grid of control values (mdx2's
absorption a(x, y, phi) and detector response d(x, y); issue 14).

A surface g is the multilinear interpolation of control values c on a
regular grid over each coordinate's range (2 or 3 coordinates: detector x,
y and optionally phi). Observations S with model predictions P (everything
but g: scale, correction, merged intensity) and weights w give c by

    min_c  sum_obs w (S - g(x) P)^2 + lam sum (second differences of c)^2,

a linear least-squares problem: g(x) P = sum_k B_k(x) P c_k with at most
2^d non-zero basis weights B_k per observation. The normal matrix is
accumulated with ``np.bincount`` over the (observation, corner, corner)
products, so the cost is linear in the observations and the grid (a few
thousand control values at most) is solved densely.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class ControlGrid:
    """A regular grid of control values over ``lower``..``upper`` per coordinate."""

    lower: np.ndarray
    upper: np.ndarray
    shape: tuple  # control points per coordinate (>= 2)

    @classmethod
    def covering(cls, coordinates: np.ndarray, shape: Sequence[int]):
        """A grid spanning the coordinates' range ((n, d) array)."""
        return cls.spanning(coordinates.min(axis=0), coordinates.max(axis=0), shape)

    @classmethod
    def spanning(cls, lower, upper, shape: Sequence[int]):
        """A grid from lower to upper per coordinate (an empty range is
        widened to 1, so that every point has a cell)."""
        lower = np.asarray(lower, dtype=np.float64)
        upper = np.asarray(upper, dtype=np.float64)
        upper = np.where(upper > lower, upper, lower + 1.0)
        return cls(lower, upper, tuple(int(s) for s in shape))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def basis(self, coordinates: np.ndarray):
        """(index, weight) arrays of shape (2^d, n): the control values each
        of n points interpolates and their multilinear weights (corners in
        the order of itertools.product((0, 1), repeat=d))."""
        coordinates = np.atleast_2d(np.asarray(coordinates, dtype=np.float64))
        n = coordinates.shape[0]
        index = np.zeros((1, n), np.int64)
        weight = np.ones((1, n))
        # axis by axis, each doubling the corners (the new axis varies
        # fastest); corners first, so every operation runs over n contiguous
        # values
        for axis, size in enumerate(self.shape):
            position = ((coordinates[:, axis] - self.lower[axis])
                        / (self.upper[axis] - self.lower[axis]) * (size - 1))
            np.clip(position, 0.0, size - 1, out=position)
            cell = np.minimum(position.astype(np.int64), size - 2)
            frac = position - cell
            stride = int(np.prod(self.shape[axis + 1:]))
            base = cell * stride
            index = np.stack([index + base, index + (base + stride)], axis=1).reshape(-1, n)
            weight = np.stack([weight * (1.0 - frac), weight * frac], axis=1).reshape(-1, n)
        return index, weight

    def evaluate(self, values: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
        index, weight = self.basis(coordinates)
        return (np.asarray(values).ravel()[index] * weight).sum(axis=0)

    def roughness(self) -> np.ndarray:
        """D^T D of the second differences along every coordinate (size x size)."""
        return sum(self.roughness_by_axis())

    def roughness_by_axis(self) -> list:
        """D_a^T D_a of the second differences along each axis a (zeros for an
        axis of fewer than 3 control values), made once per grid."""
        # (an axis of 2 values has no second differences: D has no rows)
        return [self._difference_penalty({axis: 2}) for axis in range(len(self.shape))]

    def mixed_roughness(self, axis_a, axis_b) -> np.ndarray:
        """D^T D of the mixed second differences along two axes (the cross
        term f_ab of the thin-plate energy f_aa^2 + 2 f_ab^2 + f_bb^2: without
        it a saddle a b costs nothing)."""
        return self._difference_penalty({axis_a: 1, axis_b: 1})

    def _difference_penalty(self, orders) -> np.ndarray:
        """D^T D with D the differences of the given order along the given
        axes ({axis: order}) and the identity along the others, made once
        per grid."""
        key = "_penalty_" + "_".join(f"{a}{o}" for a, o in sorted(orders.items()))
        cached = self.__dict__.get(key)
        if cached is None:
            operator = np.ones((1, 1))
            for axis, m in enumerate(self.shape):
                operator = np.kron(operator, np.diff(np.eye(m), orders.get(axis, 0), axis=0))
            cached = self.__dict__[key] = operator.T @ operator
        return cached


def points_spanning(span: float, interval: float) -> int:
    """Control points at most ``interval`` apart over ``span`` (at least 2;
    2 when interval is not positive)."""
    if not interval > 0:
        return 2
    return max(2, int(np.ceil(span / interval - 1e-9)) + 1)


def fit_surface(grid: ControlGrid, coordinates, observed, predicted, weights,
                smoothness=1.0, prior=1.0) -> np.ndarray:
    """Control values c of g with observed ~ g(coordinates) predicted (see
    normal_equations and solve)."""
    normal, rhs = normal_equations(grid, coordinates, observed, predicted, weights)
    return solve(grid, normal, rhs, smoothness, prior)


def normal_equations(grid: ControlGrid, coordinates, observed, predicted, weights,
                     basis=None):
    """(normal matrix, right-hand side) of sum w (observed - g(x) predicted)^2
    over these observations: sums that add up over any split of them.
    ``basis``: grid.basis(coordinates) when the caller has it already."""
    index, weight = grid.basis(coordinates) if basis is None else basis
    design = weight * np.asarray(predicted, dtype=np.float64)  # (2^d, n)
    weighted = design * np.asarray(weights, dtype=np.float64)
    k = grid.size
    # sum over observations of w B_a B_b at (index_a, index_b), for each pair
    # of corners a <= b (the matrix is symmetric)
    normal = np.zeros(k * k)
    for a in range(index.shape[0]):
        for b in range(a, index.shape[0]):
            pair = np.bincount(index[a] * k + index[b], weights=weighted[a] * design[b],
                               minlength=k * k)
            normal += pair
            if b != a:
                normal += pair.reshape(k, k).T.ravel()
    rhs = np.bincount(index.ravel(), weights=(weighted * np.asarray(observed)).ravel(),
                      minlength=k)
    return normal.reshape(k, k), rhs


def solve(grid: ControlGrid, normal, rhs, smoothness=1.0, prior=1.0) -> np.ndarray:
    """The control values minimising the data term plus the roughness penalty.

    ``smoothness`` scales the second-difference penalty relative to the data
    (it is multiplied by the mean diagonal of the normal matrix, so the same
    value works for any number of observations or intensity scale).
    Control values no observation reaches are pinned by the penalty; a tiny
    ridge towards ``prior`` keeps the system regular where even that is
    missing."""
    k = grid.size
    trace = np.trace(normal)
    scale = trace / k if trace > 0 else 1.0
    normal = normal + smoothness * scale * grid.roughness()
    ridge = 1e-9 * scale
    values = np.linalg.solve(normal + ridge * np.eye(k), rhs + ridge * prior)
    return values.reshape(grid.shape)
