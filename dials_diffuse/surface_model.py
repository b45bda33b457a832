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
import itertools
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
        lower = coordinates.min(axis=0).astype(np.float64)
        upper = coordinates.max(axis=0).astype(np.float64)
        upper = np.where(upper > lower, upper, lower + 1.0)
        return cls(lower, upper, tuple(int(s) for s in shape))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def basis(self, coordinates: np.ndarray):
        """(index, weight) arrays of shape (n, 2^d): the control values each
        point interpolates and their multilinear weights."""
        coordinates = np.atleast_2d(np.asarray(coordinates, dtype=np.float64))
        n, d = coordinates.shape
        shape = np.array(self.shape)
        position = (coordinates - self.lower) / (self.upper - self.lower) * (shape - 1)
        position = np.clip(position, 0.0, shape - 1)
        cell = np.minimum(np.floor(position).astype(np.int64), shape - 2)
        frac = position - cell
        corners = np.array(list(itertools.product((0, 1), repeat=d)))  # (2^d, d)
        index_nd = cell[:, None, :] + corners[None, :, :]  # (n, 2^d, d)
        weight = np.prod(np.where(corners[None, :, :] == 1, frac[:, None, :],
                                  1.0 - frac[:, None, :]), axis=2)
        index = np.ravel_multi_index(tuple(index_nd[..., k] for k in range(d)), self.shape)
        return index, weight

    def evaluate(self, values: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
        index, weight = self.basis(coordinates)
        return (np.asarray(values).ravel()[index] * weight).sum(axis=1)

    def roughness(self) -> np.ndarray:
        """D^T D of the second differences along every coordinate (size x size)."""
        rows = []
        for axis, n in enumerate(self.shape):
            if n < 3:
                continue
            second = np.zeros((n - 2, n))
            second[np.arange(n - 2), np.arange(n - 2)] = 1.0
            second[np.arange(n - 2), np.arange(1, n - 1)] = -2.0
            second[np.arange(n - 2), np.arange(2, n)] = 1.0
            # the second difference along this axis, identity along the others
            factors = [second if k == axis else np.eye(m) for k, m in enumerate(self.shape)]
            operator = factors[0]
            for f in factors[1:]:
                operator = np.kron(operator, f)
            rows.append(operator)
        if not rows:
            return np.zeros((self.size, self.size))
        stacked = np.vstack(rows)
        return stacked.T @ stacked


def fit_surface(grid: ControlGrid, coordinates, observed, predicted, weights,
                smoothness=1.0) -> np.ndarray:
    """Control values c of g with observed ~ g(coordinates) predicted.

    ``smoothness`` scales the second-difference penalty relative to the data
    (it is multiplied by the mean of w P^2 per control value, so the same
    value works for any number of observations or intensity scale)."""
    index, weight = grid.basis(coordinates)
    design = weight * np.asarray(predicted, dtype=np.float64)[:, None]  # (n, 2^d)
    w = np.asarray(weights, dtype=np.float64)[:, None]
    k = grid.size
    # normal matrix: sum over observations of w B_i B_j at (index_i, index_j)
    pair_index = (index[:, :, None] * k + index[:, None, :]).ravel()
    pair_value = (w[:, :, None] * design[:, :, None] * design[:, None, :]).ravel()
    normal = np.bincount(pair_index, weights=pair_value, minlength=k * k).reshape(k, k)
    rhs = np.bincount(index.ravel(), weights=(w * design * np.asarray(observed)[:, None]).ravel(),
                      minlength=k)
    scale = np.trace(normal) / k if np.trace(normal) > 0 else 1.0
    normal = normal + smoothness * scale * grid.roughness()
    # control values no observation reaches are pinned by the penalty; a tiny
    # ridge towards 1 keeps the system regular where even that is missing
    ridge = 1e-9 * scale
    values = np.linalg.solve(normal + ridge * np.eye(k), rhs + ridge)
    return values.reshape(grid.shape)
