"""Smooth detector surfaces (dials_diffuse/surface_model.py) against known
surfaces written as separate formulas."""

from __future__ import annotations

import numpy as np
import pytest

from dials_diffuse.surface_model import ControlGrid, fit_surface


def test_multilinear_basis_reproduces_linear_functions():
    rng = np.random.default_rng(1)
    points = rng.uniform([0, 0, -5], [100, 50, 5], size=(1000, 3))
    grid = ControlGrid.covering(points, (5, 4, 3))
    # a linear function is interpolated exactly from its control values
    axes = [np.linspace(lo, hi, n) for lo, hi, n in zip(grid.lower, grid.upper, grid.shape)]
    cx, cy, cz = np.meshgrid(*axes, indexing="ij")
    values = 2 + 0.01 * cx - 0.02 * cy + 0.1 * cz
    expected = 2 + 0.01 * points[:, 0] - 0.02 * points[:, 1] + 0.1 * points[:, 2]
    assert np.allclose(grid.evaluate(values, points), expected)
    index, weight = grid.basis(points)
    assert index.shape == (8, 1000) and np.allclose(weight.sum(axis=0), 1)


def test_roughness_is_zero_for_linear_surfaces():
    grid = ControlGrid(np.zeros(2), np.ones(2), (6, 5))
    x, y = np.meshgrid(np.arange(6.0), np.arange(5.0), indexing="ij")
    plane = (1 + 0.3 * x - 0.2 * y).ravel()
    assert plane @ grid.roughness() @ plane == pytest.approx(0, abs=1e-9)
    bumpy = (x * x).ravel()
    assert bumpy @ grid.roughness() @ bumpy > 1


def test_fit_recovers_a_smooth_absorption_surface():
    """S = a(x, y, phi) P with Poisson noise: a recovered to < 1 % rms."""
    rng = np.random.default_rng(7)
    n = 200_000
    xyz = rng.uniform([0, 0, 0], [2000, 2000, 90], size=(n, 3))

    def true_a(p):
        u, v = p[:, 0] / 1000 - 1, p[:, 1] / 1000 - 1
        return 1 - 0.3 * (0.5 * (1 + u) * (0.75 + 0.25 * np.cos(2 * np.pi * p[:, 2] / 60))
                          + 0.5 * v * v)

    predicted = rng.uniform(200, 2000, n)
    observed = rng.poisson(true_a(xyz) * predicted).astype(float)
    grid = ControlGrid.covering(xyz, (8, 8, 7))
    values = fit_surface(grid, xyz, observed, predicted, 1 / predicted, smoothness=1e-3)
    test = rng.uniform([100, 100, 5], [1900, 1900, 85], size=(5000, 3))
    error = grid.evaluate(values, test) / true_a(test) - 1
    assert np.sqrt(np.mean(error ** 2)) < 0.01
    assert np.corrcoef(grid.evaluate(values, test), true_a(test))[0, 1] > 0.99
