"""Reference physics of the simulator, independent of the code it checks.

Nothing here imports ``dials_diffuse.geometry`` or ``dials_diffuse.corrections``:
the simulator's truth is built from dxtbx/DIALS themselves and from formulas
written out separately, so tests comparing the extraction with the truth can
see errors in the project's own geometry and correction code.

* pixel lab coordinates: dxtbx's ``panel.get_lab_coord(panel.pixel_to_millimeter(xy))``
  over ``flex.vec2_double`` (the panel's px->mm strategy, parallax included);
* polarization and sensor efficiency: DIALS' ``CorrectionsMulti`` of the stills
  ``Corrections(beam, detector)`` (``lp`` returns 1/P, ``qe`` returns eta);
* solid angle: the exact solid angle of the quadrilateral spanned by the four
  pixel corners (two triangles, Van Oosterom & Strackee 1983), corners mapped by
  the same dxtbx px->mm -> lab calls as the centres;
* air transmission: exp(-mu_air r), mu_air from the ideal-gas density of dry air
  (scipy's R and atm, cctbx atomic weights) and cctbx's mass attenuation tables;
* fractional hkl: q = s1 - s0 (|s0| = 1/lambda); stills hkl = A^-1 q by a linear
  solve; rotation images undo S, then rotate by -phi (numpy Rodrigues), undo F,
  then A; phi from the scan's oscillation and absolute frame numbers;
* zeta = m2 . unit(s1 x s0) (DIALS' Lorentz term of a rotation reflection).

Per-panel pixel arrays are flat in C order over (n_slow, n_fast).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List

import numpy as np
from dxtbx import flumpy

#: dry air as mole fractions of its gases: (element, atoms per molecule, fraction)
DRY_AIR = (("N", 2, 0.7808), ("O", 2, 0.2095), ("Ar", 1, 0.0093))


# --------------------------------------------------------------------------
# pixel positions
# --------------------------------------------------------------------------
def lab_coordinates(panel, x_px, y_px) -> np.ndarray:
    """(n, 3) lab positions (mm) of pixel coordinates, through dxtbx itself."""
    xy = np.ascontiguousarray(
        np.stack([np.ravel(x_px), np.ravel(y_px)], axis=1), dtype=np.float64
    )
    mm = panel.pixel_to_millimeter(flumpy.vec_from_numpy(xy))
    return flumpy.to_numpy(panel.get_lab_coord(mm)).copy()


def _grid(n_fast, n_slow, offset):
    fast, slow = np.meshgrid(
        np.arange(n_fast) + offset, np.arange(n_slow) + offset, indexing="xy"
    )
    return fast, slow


@dataclasses.dataclass
class ReferencePanel:
    """Pixel-centre geometry of one panel, flat over (n_slow, n_fast)."""

    panel_id: int
    image_shape: tuple  # (n_slow, n_fast)
    lab_mm: np.ndarray  # (n, 3) lab position of each pixel centre (i + 0.5, j + 0.5)

    @functools.cached_property
    def distance_mm(self) -> np.ndarray:
        return np.sqrt(np.einsum("ij,ij->i", self.lab_mm, self.lab_mm))

    @functools.cached_property
    def unit_s1(self) -> np.ndarray:
        return self.lab_mm / self.distance_mm[:, None]


def reference_panels(detector) -> List[ReferencePanel]:
    out = []
    for p, panel in enumerate(detector):
        n_fast, n_slow = panel.get_image_size()
        fast, slow = _grid(n_fast, n_slow, 0.5)
        out.append(ReferencePanel(p, (n_slow, n_fast), lab_coordinates(panel, fast, slow)))
    return out


# --------------------------------------------------------------------------
# solid angle
# --------------------------------------------------------------------------
def triangle_solid_angle(r1, r2, r3) -> np.ndarray:
    """Solid angle (sr) of the triangles (r1, r2, r3) seen from the origin.

    Van Oosterom & Strackee (1983): tan(Omega / 2) = |r1 . (r2 x r3)| /
    (|r1||r2||r3| + (r1.r2)|r3| + (r1.r3)|r2| + (r2.r3)|r1|).
    """
    n1, n2, n3 = (np.sqrt(np.einsum("...i,...i->...", r, r)) for r in (r1, r2, r3))
    triple = np.abs(np.einsum("...i,...i->...", r1, np.cross(r2, r3)))
    den = (
        n1 * n2 * n3
        + np.einsum("...i,...i->...", r1, r2) * n3
        + np.einsum("...i,...i->...", r1, r3) * n2
        + np.einsum("...i,...i->...", r2, r3) * n1
    )
    return 2.0 * np.arctan2(triple, den)


def pixel_solid_angles(panel, rows_per_block: int = 256) -> np.ndarray:
    """Exact solid angle of every pixel's corner quadrilateral, flat (n_slow * n_fast).

    Corners at integer pixel coordinates go through the same px->mm->lab mapping
    as the centres (so, on a parallax-corrected panel, the quadrilateral is the
    patch of sensor surface whose photons are recorded in that pixel). Blocks of
    rows keep the temporaries small on a 6M detector.
    """
    n_fast, n_slow = panel.get_image_size()
    out = np.empty((n_slow, n_fast))
    for r0 in range(0, n_slow, rows_per_block):
        r1 = min(n_slow, r0 + rows_per_block)
        fast, slow = np.meshgrid(
            np.arange(n_fast + 1.0), np.arange(r0, r1 + 1.0), indexing="xy"
        )
        c = lab_coordinates(panel, fast, slow).reshape(r1 - r0 + 1, n_fast + 1, 3)
        c00, c10 = c[:-1, :-1], c[:-1, 1:]
        c01, c11 = c[1:, :-1], c[1:, 1:]
        out[r0:r1] = triangle_solid_angle(c00, c10, c11) + triangle_solid_angle(
            c00, c11, c01
        )
    return out.ravel()


def solid_angle_approximation(panel, lab_mm) -> np.ndarray:
    """px py |n . r^| / r^2 at the given pixel positions (for comparisons only)."""
    px, py = panel.get_pixel_size()
    normal = np.cross(panel.get_fast_axis(), panel.get_slow_axis())
    r = np.sqrt(np.einsum("ij,ij->i", lab_mm, lab_mm))
    return px * py * np.abs(lab_mm @ normal) / r**3


# --------------------------------------------------------------------------
# polarization and sensor efficiency: DIALS' own Corrections
# --------------------------------------------------------------------------
def _dials_corrections(beam, detector):
    from dials.algorithms.integration import Corrections, CorrectionsMulti

    multi = CorrectionsMulti()
    multi.append(Corrections(beam, detector))  # stills constructor: no Lorentz term
    return multi


def polarization(beam, detector, unit_s1) -> np.ndarray:
    """P (recorded / scattered) = 1 / DIALS' stills lp(s1)."""
    from dials.array_family import flex

    s1 = np.ascontiguousarray(unit_s1 / beam.get_wavelength(), dtype=np.float64)
    lp = _dials_corrections(beam, detector).lp(
        flex.int(len(s1), 0), flumpy.vec_from_numpy(s1)
    )
    return 1.0 / flumpy.to_numpy(lp)


def efficiency(beam, detector, panel_id, unit_s1) -> np.ndarray:
    """eta = DIALS' qe(s1, panel): 1 - exp(-mu t / cos alpha); 1 without a sensor model."""
    from dials.array_family import flex

    panel = detector[panel_id]
    if not (panel.get_mu() > 0 and panel.get_thickness() > 0):
        return np.ones(len(unit_s1))
    s1 = np.ascontiguousarray(unit_s1 / beam.get_wavelength(), dtype=np.float64)
    n = len(s1)
    qe = _dials_corrections(beam, detector).qe(
        flex.int(n, 0), flumpy.vec_from_numpy(s1), flex.size_t(n, panel_id)
    )
    return flumpy.to_numpy(qe).copy()


# --------------------------------------------------------------------------
# air
# --------------------------------------------------------------------------
def air_mu_per_mm(wavelength, temperature_k=293.15, pressure_atm=1.0) -> float:
    """Linear attenuation coefficient of dry air (1/mm).

    rho = p M / (R T) for the mean molar mass M of the mixture, and
    mu = rho * sum_e w_e (mu/rho)_e with w_e the mass fraction of element e.
    """
    from cctbx.eltbx import attenuation_coefficient, tiny_pse
    from scipy import constants

    grams = {e: n * x * tiny_pse.table(e).weight() for e, n, x in DRY_AIR}  # g per mol of air
    molar_mass = sum(grams.values())  # g/mol
    rho_g_per_cm3 = (
        pressure_atm * constants.atm * molar_mass / (constants.R * temperature_k) * 1e-6
    )
    mu_rho = sum(
        grams[e] / molar_mass
        * attenuation_coefficient.get_table(e).mu_rho_at_angstrom(wavelength)
        for e in grams
    )  # cm^2 / g
    return rho_g_per_cm3 * mu_rho / 10.0


# --------------------------------------------------------------------------
# the factors together
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Factors:
    """The factors applied to one panel, flat; switched-off ones are 1."""

    polarization: np.ndarray
    solid_angle: np.ndarray
    efficiency: np.ndarray
    air: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.polarization * self.solid_angle * self.efficiency * self.air


def panel_factors(
    beam,
    detector,
    ref: ReferencePanel,
    polarization_on=True,
    solid_angle_on=True,
    efficiency_on=True,
    air_on=True,
    air_temperature_k=293.15,
    air_pressure_atm=1.0,
) -> Factors:
    ones = np.ones(len(ref.lab_mm))
    return Factors(
        polarization=polarization(beam, detector, ref.unit_s1) if polarization_on else ones,
        solid_angle=pixel_solid_angles(detector[ref.panel_id]) if solid_angle_on else ones,
        efficiency=efficiency(beam, detector, ref.panel_id, ref.unit_s1)
        if efficiency_on
        else ones,
        air=np.exp(
            -air_mu_per_mm(beam.get_wavelength(), air_temperature_k, air_pressure_atm)
            * ref.distance_mm
        )
        if air_on
        else ones,
    )


# --------------------------------------------------------------------------
# reciprocal space
# --------------------------------------------------------------------------
def q_vectors(unit_s1, s0) -> np.ndarray:
    """q = s1 - s0 with |s1| = |s0| = 1/lambda (no 2 pi)."""
    s0 = np.asarray(s0, dtype=np.float64)
    return unit_s1 * np.sqrt(s0 @ s0) - s0


def rotate(v, axis, angle) -> np.ndarray:
    """Rodrigues: rotate (n, 3) vectors by ``angle`` (rad) about ``axis`` (right-handed)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.sqrt(k @ k)
    c, s = np.cos(angle), np.sin(angle)
    return v * c + np.cross(k, v) * s + np.outer(v @ k, k) * (1.0 - c)


def rotation_matrix(axis, angle) -> np.ndarray:
    """The 3x3 matrix of ``rotate`` (columns: the rotated unit vectors)."""
    return rotate(np.eye(3), axis, angle).T


def _solve(m, v):
    """m^-1 v for (n, 3) row vectors v."""
    return np.linalg.solve(np.asarray(m, dtype=np.float64).reshape(3, 3), v.T).T


def stills_hkl(q, A) -> np.ndarray:
    """hkl = A^-1 q."""
    return _solve(A, q)


@dataclasses.dataclass
class RotationImage:
    """What fixes hkl on one rotation image: q = S R(phi) F A hkl."""

    S: np.ndarray
    F: np.ndarray
    A: np.ndarray
    axis: np.ndarray  # rotation axis datum
    phi: float  # radians, at the image centre

    def setting_matrix(self, dphi: float = 0.0) -> np.ndarray:
        return self.S @ rotation_matrix(self.axis, self.phi + dphi) @ self.F @ self.A

    def hkl(self, q, dphi: float = 0.0) -> np.ndarray:
        v = _solve(self.S, q)
        v = rotate(v, self.axis, -(self.phi + dphi))
        return _solve(self.A, _solve(self.F, v))


def frame_centre_angle(scan, frame) -> float:
    """phi (rad) at the centre of absolute frame ``frame`` (an array index)."""
    start, width = scan.get_oscillation(deg=False)
    first = scan.get_array_range()[0]
    return start + (frame - first + 0.5) * width


def crystal_A_for_frame(crystal, scan, frame) -> np.ndarray:
    """A at the centre of absolute frame ``frame``: the mean of the two scan points
    bracketing it (scan point k at the start of frame first + k) when the crystal is
    scan-varying, else the static A."""
    n = crystal.num_scan_points
    if n > 0:
        k = int(frame - scan.get_array_range()[0])
        a0 = np.array(crystal.get_A_at_scan_point(min(max(k, 0), n - 1)))
        a1 = np.array(crystal.get_A_at_scan_point(min(max(k + 1, 0), n - 1)))
        return (0.5 * (a0 + a1)).reshape(3, 3)
    return np.array(crystal.get_A(), dtype=np.float64).reshape(3, 3)


def rotation_image(experiment, frame) -> RotationImage:
    gonio, scan = experiment.goniometer, experiment.scan
    return RotationImage(
        S=np.array(gonio.get_setting_rotation(), dtype=np.float64).reshape(3, 3),
        F=np.array(gonio.get_fixed_rotation(), dtype=np.float64).reshape(3, 3),
        A=crystal_A_for_frame(experiment.crystal, scan, frame),
        axis=np.array(gonio.get_rotation_axis_datum(), dtype=np.float64),
        phi=frame_centre_angle(scan, frame),
    )


def zeta(s1, s0, m2) -> np.ndarray:
    """DIALS' zeta = m2 . e1, e1 = unit(s1 x s0), for (n, 3) s1 (m2: lab rotation axis)."""
    e1 = np.cross(s1, np.asarray(s0, dtype=np.float64))
    e1 /= np.sqrt(np.einsum("ij,ij->i", e1, e1))[:, None]
    return e1 @ np.asarray(m2, dtype=np.float64)


__all__ = [
    "DRY_AIR",
    "Factors",
    "ReferencePanel",
    "RotationImage",
    "air_mu_per_mm",
    "crystal_A_for_frame",
    "efficiency",
    "frame_centre_angle",
    "lab_coordinates",
    "panel_factors",
    "pixel_solid_angles",
    "polarization",
    "q_vectors",
    "reference_panels",
    "rotate",
    "rotation_image",
    "rotation_matrix",
    "solid_angle_approximation",
    "stills_hkl",
    "triangle_solid_angle",
    "zeta",
]
