"""Simulated data on an absolute scale: diffuse intensity in electron units per
unit cell, plus the incoherent (Compton) scattering of the cell's atoms.

Written independently of ``dials_diffuse.absolute_scale`` (the code it
checks): coherent form factors from the International Tables' four-Gaussian
fits (``cctbx.eltbx.xray_scattering.it1992``; the merge uses Waasmaier-Kirfel),
the recoil factor and the detector's response at the Compton-shifted energy in
energy terms, not wavelength terms.

Truth: D(hkl) = I_coh(|s|) (1 + c (L(hkl) / <L> - 1)), with I_coh = sum_j n_j
f_j(|s|)^2 the independent-atom coherent scattering per cell (all of it
diffuse: the sum rule a merge fits holds exactly, shell by shell), L the
model's Laue-symmetrised halos and streaks round the lattice points and <L>
their mean over reciprocal space (over one cell of fractional hkl, where the
symmetrisation leaves it unchanged). Compton photons of a pixel:
flux x S(|s|) x recoil x (the pixel's factors, with the sensor and the air at
the shifted energy).
"""

from __future__ import annotations

import re

import numpy as np

from dials_diffuse.simulate.diffuse_model import DiffuseModel

#: keV Angstrom, and the electron's rest energy in keV (CODATA 2018)
HC_KEV_ANGSTROM = 12.398419843
ELECTRON_REST_KEV = 510.99895


def parse_elements(text: str) -> dict:
    """'C 600 H 950 O 190' -> {'C': 600.0, 'H': 950.0, 'O': 190.0}."""
    tokens = text.replace(",", " ").split()
    if len(tokens) % 2:
        raise ValueError(f"composition {text!r}: element / count pairs expected")
    out = {}
    for symbol, count in zip(tokens[::2], tokens[1::2]):
        if not re.fullmatch(r"[A-Z][a-z]?", symbol):
            raise ValueError(f"composition {text!r}: {symbol!r} is no element symbol")
        out[symbol] = out.get(symbol, 0.0) + float(count)
    return out


def coherent_per_cell(qmag, elements: dict) -> np.ndarray:
    """sum_j n_j f_j^2 at |s| = 1/d (IT 1992 Cromer-Mann fits, sin(theta)/lambda = |s|/2)."""
    from cctbx.eltbx import xray_scattering

    stol = np.asarray(qmag, dtype=np.float64) / 2.0
    total = np.zeros_like(stol)
    for symbol, count in elements.items():
        gaussians = xray_scattering.it1992(symbol).fetch()
        a = np.array(gaussians.array_of_a())
        b = np.array(gaussians.array_of_b())
        f = (a[None, :] * np.exp(-b[None, :] * stol.reshape(-1, 1) ** 2)).sum(axis=1)
        total += count * (f + gaussians.c()).reshape(stol.shape) ** 2
    return total


def incoherent_per_cell(qmag, elements: dict) -> np.ndarray:
    """sum_j n_j S_j: incoherent scattering functions of Hubbell et al. (1975),
    J. Phys. Chem. Ref. Data 4, 471, as tabulated by xraylib (SF_Compt)."""
    import xraylib

    stol = np.asarray(qmag, dtype=np.float64).ravel() / 2.0
    # tabulated at 2001 points and interpolated: S is smooth, pixels are many
    table = np.linspace(1e-3, max(float(stol.max(initial=0.0)), 1e-3) * 1.001, 2001)
    total = np.zeros_like(table)
    for symbol, count in elements.items():
        z = xraylib.SymbolToAtomicNumber(symbol)
        total += count * np.array([xraylib.SF_Compt(z, float(x)) for x in table])
    return np.interp(stol, np.concatenate([[0.0], table]),
                     np.concatenate([[0.0], total])).reshape(np.shape(qmag))


def compton_energy_ratio(qmag, wavelength) -> np.ndarray:
    """E'/E of a photon scattered through 2 theta: 1 / (1 + E/mc^2 (1 - cos 2 theta))."""
    energy = HC_KEV_ANGSTROM / wavelength
    cos_2theta = 1.0 - 0.5 * (np.asarray(qmag) * wavelength) ** 2
    return 1.0 / (1.0 + energy / ELECTRON_REST_KEV * (1.0 - cos_2theta))


def shifted_response(efficiency, air, energy_ratio):
    """(sensor efficiency, air transmission) at E' from those at E: both
    absorptions scale as E^-3 (photoabsorption far above the K edges of Si,
    CdTe's aside, and of N, O, Ar)."""
    power = energy_ratio ** -3.0
    eta = 1.0 - np.power(np.clip(1.0 - efficiency, 1e-12, 1.0), power)
    return eta, np.power(air, power)


class AbsoluteDiffuseModel(DiffuseModel):
    """D(hkl) in electron units per unit cell (see the module docstring)."""

    def __init__(self, params, elements: dict, contrast: float):
        super().__init__(params)
        self.elements = elements
        self.contrast = contrast
        # the mean of L over reciprocal space: L depends on h - rint(h) only,
        # so its mean over one cell of fractional hkl (a 96^3 midpoint grid;
        # halos and streaks are cut where another lattice point is nearer)
        f = (np.arange(96) + 0.5) / 96 - 0.5
        cell = np.stack(np.meshgrid(f, f, f, indexing="ij"), axis=-1).reshape(-1, 3)
        self.local_mean = float(np.mean(self._local(cell)))

    def diffuse(self, hkl) -> np.ndarray:
        hkl = np.asarray(hkl, dtype=np.float64)
        single = hkl.ndim == 1
        hkl = np.atleast_2d(hkl)
        qv = hkl @ self.B.T
        qmag = np.sqrt(np.einsum("ij,ij->i", qv, qv))
        modulation = 1.0 + self.contrast * (self.symmetrised_local(hkl) / self.local_mean - 1.0)
        out = coherent_per_cell(qmag, self.elements) * modulation
        return out[0] if single else out
