"""Per-pixel correction factors for diffuse intensities.

Each factor F is what the detector records relative to the scattered intensity,
so corrected intensity = (counts * gain - background) / (P * Omega * eta * T) /
exposure_time. Conventions follow ``dials/algorithms/integration/corrections.h``:

* P, polarization: (1 - 2 pf)(1 - (n.s1)^2) + pf (1 + (s0.s1)^2) with unit
  vectors, pf = beam polarization fraction (0.5 unpolarised), n = polarization
  normal. DIALS' stills ``lp()`` returns 1/P; here P itself is returned.
* Omega, solid angle of a pixel (steradian): px py |n_panel . r^| / r^2;
  with the parallax correction the smaller patch of the sensor surface whose
  rays the pixel records (``geometry.pixel_solid_angles``).
* eta, sensor efficiency: 1 - exp(-mu t / cos alpha) (DIALS' ``qe``), 1 when
  the panel has no attenuation model.
* T, air transmission exp(-mu_air r), mu_air from the composition of dry air,
  an ideal-gas density and cctbx's tabulated mass attenuation coefficients.

No rotation Lorentz factor is applied to per-pixel diffuse intensities.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from dials_diffuse.geometry import PanelGeometry
from cctbx.eltbx import attenuation_coefficient

# Dry air, mole fractions (N2, O2, Ar); CO2 and traces are below 0.1 %.
AIR_COMPOSITION = (("N", 2, 0.7808), ("O", 2, 0.2095), ("Ar", 1, 0.0093))
MOLAR_MASS_G_PER_MOL = {"N": 14.0067, "O": 15.9994, "Ar": 39.948}
GAS_CONSTANT = 8.314462618  # J / (mol K)
ATM_PA = 101325.0


def polarization_factor(
    unit_s1: np.ndarray, s0, polarization_normal, polarization_fraction: float
) -> np.ndarray:
    """P for each ray (multiplicative: recorded = P * scattered)."""
    s0_hat = np.asarray(s0, dtype=np.float64)
    s0_hat = s0_hat / np.linalg.norm(s0_hat)
    normal = np.asarray(polarization_normal, dtype=np.float64)
    normal = normal / np.linalg.norm(normal)
    n_dot = unit_s1 @ normal
    s0_dot = unit_s1 @ s0_hat
    pf = float(polarization_fraction)
    return (1.0 - 2.0 * pf) * (1.0 - n_dot**2) + pf * (1.0 + s0_dot**2)


def solid_angle(geometry: PanelGeometry) -> np.ndarray:
    """Solid angle (sr) of the rays each pixel records: px py |n . r^| / r^2,
    or the parallax-shrunk patch (geometry.pixel_solid_angles)."""
    return geometry.solid_angle_sr


def sensor_efficiency(geometry: PanelGeometry, mu_per_mm: float, thickness_mm: float):
    """Fraction of photons absorbed in the sensor, 1 - exp(-mu t / cos alpha)."""
    if mu_per_mm <= 0 or thickness_mm <= 0:
        return np.ones(geometry.n_pixels)
    return 1.0 - np.exp(-mu_per_mm * thickness_mm / geometry.cos_incidence)


def air_attenuation_coefficient(
    wavelength_angstrom: float, temperature_k: float = 293.15, pressure_atm: float = 1.0
) -> float:
    """Linear attenuation coefficient of dry air (1/mm) at the given T and P."""

    if temperature_k <= 0 or pressure_atm < 0:
        raise ValueError("air temperature must be > 0 K and pressure >= 0 atm")
    total_moles_per_cm3 = pressure_atm * ATM_PA / (GAS_CONSTANT * temperature_k) * 1e-6
    mu_per_cm = 0.0
    for element, atoms, fraction in AIR_COMPOSITION:
        density_g_cm3 = (
            total_moles_per_cm3 * fraction * atoms * MOLAR_MASS_G_PER_MOL[element]
        )
        mu_rho = attenuation_coefficient.get_table(element).mu_rho_at_angstrom(
            wavelength_angstrom
        )
        mu_per_cm += mu_rho * density_g_cm3
    return mu_per_cm / 10.0


def air_transmission(geometry: PanelGeometry, mu_air_per_mm: float) -> np.ndarray:
    """exp(-mu_air r) along the sample-to-pixel path."""
    return np.exp(-mu_air_per_mm * geometry.distance_mm)


@dataclasses.dataclass
class CorrectionFactors:
    """The factors for the pixels of one PanelGeometry; ``total`` is their product."""

    polarization: np.ndarray
    solid_angle: np.ndarray
    efficiency: np.ndarray
    air: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.polarization * self.solid_angle * self.efficiency * self.air


def correction_factors(
    geometry: PanelGeometry,
    beam,
    panel,
    polarization: bool = True,
    solid_angle_on: bool = True,
    efficiency: bool = True,
    air: bool = True,
    air_temperature_k: float = 293.15,
    air_pressure_atm: float = 1.0,
    polarization_fraction: Optional[float] = None,
) -> CorrectionFactors:
    """All switchable factors for one panel; a switched-off factor is 1."""
    ones = np.ones(geometry.n_pixels)
    pf = (
        beam.get_polarization_fraction()
        if polarization_fraction is None
        else polarization_fraction
    )
    return CorrectionFactors(
        polarization=polarization_factor(
            geometry.unit_s1, beam.get_s0(), beam.get_polarization_normal(), pf
        )
        if polarization
        else ones,
        solid_angle=solid_angle(geometry) if solid_angle_on else ones,
        efficiency=sensor_efficiency(geometry, panel.get_mu(), panel.get_thickness())
        if efficiency
        else ones,
        air=air_transmission(
            geometry,
            air_attenuation_coefficient(
                beam.get_wavelength(), air_temperature_k, air_pressure_atm
            ),
        )
        if air
        else ones,
    )
