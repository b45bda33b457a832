"""Per-pixel detector geometry, scattering vectors and fractional Miller indices.

Everything here is in DIALS s-space: |s0| = 1/lambda (1/Angstrom), s1 has the
same length, q = s1 - s0 and |q| = 1/d. No 2*pi.

The per-pixel lab geometry of a detector depends only on the detector model, so
it is computed once (``PanelGeometry``) and reused for every image. Pixel lab
coordinates go through dxtbx's ``pixel_to_millimeter`` so that a panel's
parallax-corrected px->mm strategy is honoured.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
from dxtbx import flumpy
from scitbx import matrix

from dials_diffuse.compiled import lazy_jit


@dataclasses.dataclass
class PanelGeometry:
    """Lab-frame geometry of the (optionally sub-sampled) pixel centres of one panel.

    Arrays are flattened in C order over the selected (slow, fast) pixel grid.
    """

    panel_id: int
    image_shape: tuple  # full panel (n_slow, n_fast)
    slow: np.ndarray  # int32 slow index of each selected pixel
    fast: np.ndarray  # int32 fast index of each selected pixel
    lab_mm: np.ndarray  # (n, 3) lab coordinate of each pixel centre, mm
    distance_mm: np.ndarray  # (n,) sample-to-pixel path length, mm
    unit_s1: np.ndarray  # (n, 3) unit vector from sample to pixel centre
    cos_incidence: np.ndarray  # (n,) |n_panel . unit_s1|
    pixel_area_mm2: float
    solid_angle_sr: np.ndarray  # (n,) solid angle of the rays each pixel records

    @property
    def n_pixels(self):
        return self.slow.size


def panel_geometry(panel, panel_id: int = 0, pixel_step: int = 1,
                   rows: slice = slice(None)) -> PanelGeometry:
    """Geometry of the pixel centres (i + 0.5, j + 0.5) of one panel.

    ``pixel_step`` keeps every n-th pixel along fast and slow; ``rows``
    selects rows of that raster (a block of the panel, for work in pieces
    that stay in the CPU cache).
    """
    n_fast, n_slow = panel.get_image_size()
    slow_1d = np.arange(0, n_slow, pixel_step, dtype=np.int32)[rows]
    fast_1d = np.arange(0, n_fast, pixel_step, dtype=np.int32)
    slow, fast = np.meshgrid(slow_1d, fast_1d, indexing="ij")
    slow = slow.ravel()
    fast = fast.ravel()
    lab = pixel_lab_coordinates(panel, fast + 0.5, slow + 0.5)
    distance = np.sqrt(np.einsum("ij,ij->i", lab, lab))
    unit_s1 = lab / distance[:, None]
    normal = np.array(panel.get_normal(), dtype=np.float64)
    cos_incidence = np.abs(unit_s1 @ normal)
    px, py = panel.get_pixel_size()
    solid = pixel_solid_angles(panel, slow_1d, fast_1d, cos_incidence, distance)
    return PanelGeometry(
        panel_id=panel_id,
        image_shape=(n_slow, n_fast),
        slow=slow,
        fast=fast,
        lab_mm=lab,
        distance_mm=distance,
        unit_s1=unit_s1,
        cos_incidence=cos_incidence,
        pixel_area_mm2=px * py,
        solid_angle_sr=solid,
    )


def pixel_solid_angles(panel, slow_1d, fast_1d, cos_incidence, distance) -> np.ndarray:
    """Solid angle (sr) of the rays each pixel of the raster slow_1d x
    fast_1d (C order, as ``panel_geometry``) records.

    Flat panel with the simple px->mm mapping: px py |n . r^| / r^2. With the
    parallax correction, the rays a pixel records enter the sensor on a patch
    smaller than the pixel (the mapping's Jacobian: 0.1-0.3 % on a 450 um Si
    Pilatus at 100-250 mm): the patch spanned by the lab positions of the
    pixel's edge midpoints, dotted with the ray, over r^2. That shrink factor
    varies by ~1e-4 over a panel, so it is computed on a grid every
    SHRINK_GRID pixels and interpolated (bilinear error < 1e-7).
    """
    px, py = panel.get_pixel_size()
    nominal = px * py * cos_incidence / distance**2
    if panel.get_px_mm_strategy().name() != "ParallaxCorrectedPxMmStrategy":
        return nominal
    grid_slow, grid_fast, shrink = _parallax_shrink_grid(panel)
    # bilinear interpolation onto the raster as two small matrix products
    along_y = _interpolation_weights(grid_slow, slow_1d + 0.5)
    along_x = _interpolation_weights(grid_fast, fast_1d + 0.5)
    return nominal * (along_y @ shrink @ along_x.T).ravel()


SHRINK_GRID = 16
_SHRINK_CACHE = {}  # panel geometry: (grid_slow, grid_fast, shrink), a few panels


def _parallax_shrink_grid(panel):
    """The parallax shrink factor of pixel_solid_angles on the panel's
    coarse grid, computed once per panel geometry (blocks of rows of one
    panel all interpolate from it)."""
    px_mm = panel.get_px_mm_strategy()
    key = (panel.get_origin(), panel.get_fast_axis(), panel.get_slow_axis(),
           panel.get_pixel_size(), panel.get_image_size(), px_mm.mu(), px_mm.t0())
    if key not in _SHRINK_CACHE:
        px, py = panel.get_pixel_size()
        n_fast, n_slow = panel.get_image_size()
        grid_fast = np.unique(np.append(np.arange(0, n_fast, SHRINK_GRID), n_fast - 1)) + 0.5
        grid_slow = np.unique(np.append(np.arange(0, n_slow, SHRINK_GRID), n_slow - 1)) + 0.5
        y, x = (a.ravel() for a in np.meshgrid(grid_slow, grid_fast, indexing="ij"))
        centre = pixel_lab_coordinates(panel, x, y)
        r = np.sqrt(np.einsum("ij,ij->i", centre, centre))
        ray = centre / r[:, None]
        along_fast = (pixel_lab_coordinates(panel, x + 0.5, y)
                      - pixel_lab_coordinates(panel, x - 0.5, y))
        along_slow = (pixel_lab_coordinates(panel, x, y + 0.5)
                      - pixel_lab_coordinates(panel, x, y - 0.5))
        patch = np.abs(np.einsum("ij,ij->i", np.cross(along_fast, along_slow), ray))
        normal = np.array(panel.get_normal(), dtype=np.float64)
        shrink = (patch / (px * py * np.abs(ray @ normal))).reshape(grid_slow.size, grid_fast.size)
        if len(_SHRINK_CACHE) > 256:  # many-panel detectors, many runs
            _SHRINK_CACHE.clear()
        _SHRINK_CACHE[key] = (grid_slow, grid_fast, shrink)
    return _SHRINK_CACHE[key]


def _interpolation_weights(grid, points):
    """(points, grid) matrix W of linear interpolation: f(points) = W f(grid)."""
    points = np.asarray(points, dtype=np.float64)
    left = np.clip(np.searchsorted(grid, points, side="right") - 1, 0, grid.size - 2)
    t = np.clip((points - grid[left]) / (grid[left + 1] - grid[left]), 0.0, 1.0)
    weights = np.zeros((points.size, grid.size))
    rows = np.arange(points.size)
    weights[rows, left] = 1.0 - t
    weights[rows, left + 1] += t
    return weights


def pixel_lab_coordinates(panel, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
    """(n, 3) lab coordinates (mm) of pixel positions: dxtbx's
    ``get_lab_coord(pixel_to_millimeter(xy))``.

    The simple and the parallax-corrected px->mm strategies are evaluated here
    in numpy with dxtbx's formulas (parallax_correction.h: the inverse
    correction xy - (s1.f, s1.s) * attenuation length), about ten times faster
    than dxtbx's per-pixel calls on a Pilatus 6M; any other strategy goes
    through dxtbx itself.
    """
    fast_axis, slow_axis, origin = (
        np.array(v, dtype=np.float64)
        for v in (panel.get_fast_axis(), panel.get_slow_axis(), panel.get_origin())
    )
    size_x, size_y = panel.get_pixel_size()
    strategy = panel.get_px_mm_strategy().name()
    if strategy not in ("SimplePxMmStrategy", "ParallaxCorrectedPxMmStrategy"):
        xy = np.stack([x_px, y_px], axis=1).astype(np.float64)
        mm = panel.pixel_to_millimeter(flumpy.vec_from_numpy(xy))
        return flumpy.to_numpy(panel.get_lab_coord(mm)).copy()
    x_px = np.asarray(x_px, dtype=np.float64)
    y_px = np.asarray(y_px, dtype=np.float64)
    parallax = None
    if strategy == "ParallaxCorrectedPxMmStrategy":
        px_mm = panel.get_px_mm_strategy()
        normal = np.cross(fast_axis, slow_axis)
        if origin @ normal < 0:
            normal = -normal
        parallax = (px_mm.mu(), px_mm.t0(), normal)
    compiled = lazy_jit("geometry.lab_coordinates", _define_lab_coordinates)
    if compiled is not None:
        # the same formulas, one pass per pixel (a 6M detector: 0.8 s in
        # numpy temporaries, 0.1 s compiled); equal to rounding (exp)
        mu, t0, normal = parallax if parallax is not None else (0.0, 0.0, np.zeros(3))
        lab = np.empty((x_px.size, 3))
        compiled(np.ascontiguousarray(x_px), np.ascontiguousarray(y_px), size_x, size_y,
                 origin, fast_axis, slow_axis, parallax is not None, mu, t0, normal, lab)
        return lab
    lab = np.empty((x_px.size, 3))
    # chunks of 2**16 pixels keep the (n, 3) temporaries in the CPU cache
    for begin in range(0, x_px.size, 2**16):
        chunk = slice(begin, begin + 2**16)
        x = x_px[chunk] * size_x
        y = y_px[chunk] * size_y
        if parallax is not None:
            mu, t0, normal = parallax
            ray = origin + x[:, None] * fast_axis + y[:, None] * slow_axis
            ray /= np.sqrt(np.einsum("ij,ij->i", ray, ray))[:, None]
            cos_t = ray @ normal
            depth = (1.0 / mu) - (t0 / cos_t + 1.0 / mu) * np.exp(-mu * t0 / cos_t)
            x = x - (ray @ fast_axis) * depth
            y = y - (ray @ slow_axis) * depth
        lab[chunk] = origin + x[:, None] * fast_axis + y[:, None] * slow_axis
    return lab


def _define_lab_coordinates(jit):
    @jit
    def lab_coordinates(x_px, y_px, size_x, size_y, origin, fast, slow, parallax, mu, t0,
                        normal, lab):
        for i in range(x_px.size):
            x = x_px[i] * size_x
            y = y_px[i] * size_y
            if parallax:
                r0 = origin[0] + x * fast[0] + y * slow[0]
                r1 = origin[1] + x * fast[1] + y * slow[1]
                r2 = origin[2] + x * fast[2] + y * slow[2]
                norm = np.sqrt(r0 * r0 + r1 * r1 + r2 * r2)
                r0, r1, r2 = r0 / norm, r1 / norm, r2 / norm
                cos_t = r0 * normal[0] + r1 * normal[1] + r2 * normal[2]
                depth = (1.0 / mu) - (t0 / cos_t + 1.0 / mu) * np.exp(-mu * t0 / cos_t)
                x -= (r0 * fast[0] + r1 * fast[1] + r2 * fast[2]) * depth
                y -= (r0 * slow[0] + r1 * slow[1] + r2 * slow[2]) * depth
            for k in range(3):
                lab[i, k] = origin[k] + x * fast[k] + y * slow[k]

    return lab_coordinates


def detector_geometry(detector, pixel_step: int = 1) -> List[PanelGeometry]:
    """``PanelGeometry`` for every panel of a detector (panel ids kept)."""
    return [panel_geometry(p, i, pixel_step) for i, p in enumerate(detector)]


def detector_plane_xy(detector, s1: np.ndarray) -> np.ndarray:
    """(n, 2) position (mm) where rays s1 (any length, lab frame) meet the
    plane of panel 0, along its fast and slow axes from its origin (dxtbx's
    D matrix): one coordinate system for every panel, so that a surface over
    the detector (mdx2's absorption and response) is continuous across
    panels; on one panel it is the position in mm."""
    d_matrix = np.array(detector[0].get_D_matrix(), dtype=np.float64).reshape(3, 3)
    v = np.asarray(s1, dtype=np.float64) @ d_matrix.T
    return v[:, :2] / v[:, 2:3]


def scattering_vectors(unit_s1: np.ndarray, s0) -> np.ndarray:
    """q = s1 - s0 for unit ray directions, with |s1| = |s0| = 1/lambda."""
    s0 = np.asarray(s0, dtype=np.float64)
    return unit_s1 * np.linalg.norm(s0) - s0


def absolute_frame(scan, position: int) -> int:
    """The array index of image ``position`` (0-based place in the image set) of
    a scan: the frame number every dxtbx/DIALS scan function and reflection
    column (``xyzcal.px`` z, shoebox z) uses.

    Frames count from ``scan.get_array_range()[0]``, which is not 0 when a sweep
    is imported from image 4 or with ``image_range=``; this is the one place
    where a position in the image set becomes a frame.
    """
    return scan.get_array_range()[0] + int(position)


def frame_centre_angle(scan, frame: int, deg: bool = False) -> float:
    """Rotation angle at the centre of absolute frame ``frame``."""
    return scan.get_angle_from_array_index(frame + 0.5, deg=deg)


def setting_matrix(experiment, frame: Optional[int] = None) -> np.ndarray:
    """The matrix M that takes fractional hkl to q (q = M hkl) for one image.

    Still (``experiment.is_still()``): M = A = U B of that experiment's crystal.
    Rotation image on absolute frame ``frame`` (array index, see
    ``absolute_frame``): M = S R(phi) F A, with phi at the centre of the frame,
    R about the goniometer axis and A the crystal at that image when the crystal
    is scan-varying (the mean of the scan points at the frame's two edges).
    """
    crystal = experiment.crystal
    if experiment.is_still() or experiment.goniometer is None or experiment.scan is None:
        return np.array(crystal.get_A(), dtype=np.float64).reshape(3, 3)
    if frame is None:
        raise ValueError("a rotation experiment needs the frame")
    scan = experiment.scan
    gonio = experiment.goniometer
    if crystal.num_scan_points > 0:
        # scan point k sits at the start of frame first + k; the centre of a
        # frame lies between its two edges' points
        point = int(frame) - scan.get_array_range()[0]
        last = crystal.num_scan_points - 1
        a0 = matrix.sqr(crystal.get_A_at_scan_point(min(max(point, 0), last)))
        a1 = matrix.sqr(crystal.get_A_at_scan_point(min(max(point + 1, 0), last)))
        A = (a0 + a1) * 0.5
    else:
        A = matrix.sqr(crystal.get_A())
    phi = frame_centre_angle(scan, frame)
    axis = matrix.col(gonio.get_rotation_axis_datum())
    R = axis.axis_and_angle_as_r3_rotation_matrix(phi, deg=False)
    S = matrix.sqr(gonio.get_setting_rotation())
    F = matrix.sqr(gonio.get_fixed_rotation())
    return np.array(S * R * F * A, dtype=np.float64).reshape(3, 3)


def miller_indices(q: np.ndarray, setting: np.ndarray) -> np.ndarray:
    """Fractional hkl = M^-1 q for an (n, 3) array of q vectors."""
    return q @ np.linalg.inv(setting).T
