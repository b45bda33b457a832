"""Smooth multiplicative surfaces on the detector, as mdx2 models them
(issue 14): an absorption surface a(x, y, phi) and a detector response d(x, y).

With u, v the pixel centre's fast / slow position scaled to [-1, 1] over its
panel and phi the rotation angle (degrees) at the image centre (0 for stills):

    a = 1 - A [0.5 (1 + u) (0.75 + 0.25 cos(2 pi phi / P)) + 0.5 v^2]   in [1 - A, 1]
    d = 1 + R cos(pi u) cos(pi v)                                       in [1 - R, 1 + R]

The diffuse (and Compton) photons of a pixel are multiplied by a d; the
background map and the Bragg spots are not.
"""

from __future__ import annotations

import numpy as np


def panel_uv(shape):
    """(u, v) of every pixel centre of a (n_slow, n_fast) panel, flat."""
    n_slow, n_fast = shape
    u = (np.arange(n_fast) + 0.5) / n_fast * 2 - 1
    v = (np.arange(n_slow) + 0.5) / n_slow * 2 - 1
    uu, vv = np.meshgrid(u, v)
    return uu.ravel(), vv.ravel()


def absorption(shape, phi_deg, amplitude, period_deg):
    u, v = panel_uv(shape)
    phase = 0.75 + 0.25 * np.cos(2 * np.pi * phi_deg / period_deg)
    return 1.0 - amplitude * (0.5 * (1 + u) * phase + 0.5 * v * v)


def response(shape, amplitude):
    u, v = panel_uv(shape)
    return 1.0 + amplitude * np.cos(np.pi * u) * np.cos(np.pi * v)
