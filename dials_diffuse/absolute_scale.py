"""Merged maps in electron units per unit cell, and the Compton scattering taken out.

The sum rule (Krogh-Moe 1956; Norman 1957): averaged over a shell of
reciprocal space wide enough for the interference between atoms to average
out, a crystal scatters per unit cell what its atoms scatter independently,

    K <I(s)>_shell = sum_j n_j f_j(s)^2 + R(s) sum_j n_j S_j(s),

with I the merged map (relative units), K its absolute scale (electron units
per cell per map unit), f_j the atoms' coherent form factors, S_j their
incoherent scattering functions and R the detector's view of the Compton
photons (below). K is fitted by least squares on the relative residuals of
shell means over a |s| range (PHIL ``d_min``/``d_max``; default: the outer half
of the data's |s| range). The map is diffuse only (Bragg pixels are masked),
so the fit range must be one where the Bragg intensity is negligible next to
the diffuse and incoherent scattering (macromolecules beyond ~2.5 A, where
the Debye-Waller factor has taken the Bragg peaks): the docs say so, and the
fitted ratio per shell shows when it is not.

* f_j: Waasmaier & Kirfel (1995), Acta Cryst. A51, 416, via
  ``cctbx.eltbx.xray_scattering.wk1995`` (sin(theta)/lambda = |s|/2).
* S_j: Hubbell et al. (1975), J. Phys. Chem. Ref. Data 4, 471, as tabulated
  by xraylib (Schoonjans et al. 2011, Spectrochim. Acta B 66, 776;
  ``xraylib.SF_Compt``).
* R = (lambda / lambda')^2 eta(lambda') / eta(lambda): the Breit-Dirac recoil
  factor of a photon-counting detector (photon number, exponent 2) and the
  sensor's efficiency at the Compton-shifted wavelength lambda' = lambda +
  (h / m_e c)(1 - cos 2 theta), relative to the efficiency the extraction
  divided by (normal incidence, absorption ~ lambda^3). The air's
  transmission changes by < 0.05 % and is left out.

s-space throughout: |s| = 1/d, no 2 pi.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import numpy as np

from dials.util import Sorry

logger = logging.getLogger("dials.diffuse_merge")

#: Compton wavelength of the electron h / (m_e c), Angstrom (CODATA 2018)
COMPTON_WAVELENGTH = 0.02426310238
#: water molecules per cubic Angstrom of bulk solvent (1.0 g/cm^3)
WATER_PER_A3 = 0.03343

#: PHIL of the merge's absolute_scale scope (included by phil_scopes.merge_phil_str)
absolute_scale_phil_str = """
absolute_scale
  .help = "Put the merged map in electron units per unit cell (sum rule over "
          "the cell contents) and subtract the incoherent (Compton) scattering."
{
  composition = None
    .type = str
    .help = "The unit cell's contents: element / count pairs per cell "
            "('C 600 H 950 N 160 O 190 S 8'), or a PDB / mmCIF model file "
            "(its atoms times occupancy, expanded by the space group's operators)."
  sequence = None
    .type = str
    .help = "Instead of composition: a protein sequence (one-letter codes, or "
            "a FASTA / plain sequence file) of the molecule(s) in the "
            "asymmetric unit; hydrogens included, times the space group's order."
  molecules_per_asu = 1
    .type = int(value_min=1)
    .help = "Copies of the sequence in the asymmetric unit."
  solvent_fraction = None
    .type = float(value_min=0, value_max=1)
    .help = "With a model file or a sequence: the volume fraction of the cell "
            "filled by bulk water (0.0334 molecules per cubic Angstrom)."
  d_min = None
    .type = float(value_min=0)
    .help = "High-resolution end of the fit (Angstrom); default: the data's."
  d_max = None
    .type = float(value_min=0)
    .help = "Low-resolution end of the fit (Angstrom); default: |s| half the "
            "data's largest."
  n_bins = 20
    .type = int(value_min=2)
    .help = "Shells of equal |s| width in the fit range."
}
"""


@dataclasses.dataclass
class AbsoluteScale:
    scale: float  # electron units per cell per map unit
    elements: dict
    fit_range: tuple  # (s_min, s_max), 1/Angstrom
    shell_s: np.ndarray
    shell_data: np.ndarray  # K x shell mean of the map
    shell_coherent: np.ndarray
    shell_incoherent: np.ndarray  # as recorded (recoil and sensor response)
    intensity: np.ndarray  # per voxel: K I - incoherent
    sigma: np.ndarray
    incoherent: np.ndarray  # per voxel
    # the same shell means over the map's whole |s| range (the fit shells
    # cover only the fit range): where the sum rule holds and where not
    profile: dict = None

    @property
    def electrons_per_cell(self) -> float:
        return float(sum(count * _atomic_number(e) for e, count in self.elements.items()))

    def as_dict(self) -> dict:
        model = self.shell_coherent + self.shell_incoherent
        return {
            "scale": self.scale,
            "units": "electron units per unit cell per unit of I_merged_relative",
            "electrons_per_cell": self.electrons_per_cell,
            "composition": {e: float(n) for e, n in sorted(self.elements.items())},
            "fit_s_range": [float(s) for s in self.fit_range],
            "fit_d_range": [float(1 / s) for s in self.fit_range[::-1]],
            "shells": {
                "s": self.shell_s.tolist(),
                "data": self.shell_data.tolist(),
                "coherent": self.shell_coherent.tolist(),
                "incoherent": self.shell_incoherent.tolist(),
                "sum": model.tolist(),
                "ratio_data_to_sum": (self.shell_data / model).tolist(),
            },
            "profile": None if self.profile is None else {
                k: [float(x) for x in v] for k, v in self.profile.items()},
            "references": {
                "coherent": "Waasmaier & Kirfel (1995) Acta Cryst. A51, 416 (cctbx wk1995)",
                "incoherent": "Hubbell et al. (1975) J. Phys. Chem. Ref. Data 4, 471 (xraylib)",
                "sum_rule": "Krogh-Moe (1956) Acta Cryst. 9, 951; Norman (1957) Acta Cryst. 10, 370",
            },
        }


def _atomic_number(symbol: str) -> int:
    from cctbx.eltbx import tiny_pse

    return tiny_pse.table(symbol).atomic_number()


def _check_element(symbol: str, where: str) -> str:
    from cctbx.eltbx import tiny_pse

    symbol = symbol.strip().capitalize()
    try:
        tiny_pse.table(symbol)
    except (RuntimeError, ValueError):
        raise Sorry(f"absolute_scale.composition: {symbol!r} ({where}) is no element")
    return symbol


def parse_element_counts(text: str) -> dict:
    """'C 600 H 950 O 190' -> {'C': 600.0, 'H': 950.0, 'O': 190.0}."""
    tokens = text.replace(",", " ").split()
    if not tokens or len(tokens) % 2:
        raise Sorry(f"absolute_scale.composition={text!r}: give element / count pairs "
                    "('C 600 H 950 ...') or a PDB / mmCIF file")
    counts = {}
    for symbol, value in zip(tokens[::2], tokens[1::2]):
        symbol = _check_element(symbol, text)
        try:
            n = float(value)
        except ValueError:
            raise Sorry(f"absolute_scale.composition={text!r}: {value!r} is no count")
        if n < 0:
            raise Sorry(f"absolute_scale.composition={text!r}: negative count for {symbol}")
        counts[symbol] = counts.get(symbol, 0.0) + n
    return counts


def model_element_counts(path: str, space_group, unit_cell, solvent_fraction=None) -> dict:
    """Atoms of a PDB / mmCIF model per unit cell: occupancy-weighted element
    counts of the model (the asymmetric unit) times the space group's order,
    plus bulk water filling ``solvent_fraction`` of the cell."""
    import iotbx.pdb

    try:
        hierarchy = iotbx.pdb.input(file_name=path).construct_hierarchy()
    except Exception as e:  # iotbx raises plain Exceptions for unreadable files
        raise Sorry(f"absolute_scale.composition={path}: not a readable model ({e})")
    atoms = hierarchy.atoms()
    if atoms.size() == 0:
        raise Sorry(f"absolute_scale.composition={path}: the model has no atoms")
    symbols = [_check_element(e or n[:2], path) for e, n in
               zip(atoms.extract_element(), atoms.extract_name())]
    occupancy = atoms.extract_occ().as_numpy_array()
    elements, atom_element = np.unique(symbols, return_inverse=True)
    totals = np.bincount(atom_element, weights=occupancy) * space_group.order_z()
    counts = {str(e): float(n) for e, n in zip(elements, totals)}
    if "H" not in counts:
        logger.warning("absolute_scale: %s has no hydrogen atoms; they are not counted "
                       "(about 7 %% of a protein's electrons)", os.path.basename(path))
    return _add_solvent(counts, unit_cell, solvent_fraction)


#: elements (C, H, N, O, S) of amino-acid residues in a chain: the free
#: amino acid minus one H2O
RESIDUE_ELEMENTS = {
    "G": (2, 3, 1, 1, 0), "A": (3, 5, 1, 1, 0), "S": (3, 5, 1, 2, 0), "P": (5, 7, 1, 1, 0),
    "V": (5, 9, 1, 1, 0), "T": (4, 7, 1, 2, 0), "C": (3, 5, 1, 1, 1), "L": (6, 11, 1, 1, 0),
    "I": (6, 11, 1, 1, 0), "N": (4, 6, 2, 2, 0), "D": (4, 5, 1, 3, 0), "Q": (5, 8, 2, 2, 0),
    "K": (6, 12, 2, 1, 0), "E": (5, 7, 1, 3, 0), "M": (5, 9, 1, 1, 1), "H": (6, 7, 3, 1, 0),
    "F": (9, 9, 1, 1, 0), "R": (6, 12, 4, 1, 0), "Y": (9, 9, 1, 2, 0), "W": (11, 10, 2, 1, 0),
}


def read_sequence(text: str) -> str:
    """One-letter protein sequence from a string or a (FASTA) file."""
    if os.path.isfile(text):
        with open(text) as fh:
            text = "".join(line.strip() for line in fh if not line.startswith(">"))
    letters = re.sub(r"[\s*]", "", text).upper()
    unknown = sorted(set(letters) - set(RESIDUE_ELEMENTS))
    if not letters or unknown:
        raise Sorry(f"absolute_scale.sequence: not a protein sequence (unknown letters "
                    f"{''.join(unknown) or 'none'}; give one-letter codes or a FASTA file)")
    return letters


def sequence_element_counts(sequence: str, copies: int, space_group, unit_cell,
                            solvent_fraction=None) -> dict:
    """Atoms per cell of ``copies`` chains per asymmetric unit (each chain
    with one water for its termini), plus bulk water."""
    per_chain = np.array([RESIDUE_ELEMENTS[r] for r in sequence], dtype=float).sum(axis=0)
    per_chain += (0, 2, 0, 1, 0)
    counts = dict(zip(("C", "H", "N", "O", "S"),
                      (per_chain * copies * space_group.order_z()).tolist()))
    return _add_solvent(counts, unit_cell, solvent_fraction)


def _add_solvent(counts, unit_cell, solvent_fraction):
    if solvent_fraction:
        waters = solvent_fraction * unit_cell.volume() * WATER_PER_A3
        counts["O"] = counts.get("O", 0.0) + waters
        counts["H"] = counts.get("H", 0.0) + 2 * waters
    return {e: n for e, n in counts.items() if n > 0}


def element_counts(params, space_group, unit_cell) -> dict:
    if params.sequence:
        if params.composition:
            raise Sorry("absolute_scale: give composition or sequence, not both")
        return sequence_element_counts(read_sequence(params.sequence.strip()),
                                       params.molecules_per_asu, space_group, unit_cell,
                                       params.solvent_fraction)
    text = params.composition.strip()

    if os.path.isfile(text) or re.search(r"\.(pdb|ent|cif|mmcif)(\.gz)?$", text, re.I):
        if not os.path.isfile(text):
            raise Sorry(f"absolute_scale.composition={text}: no such file")
        return model_element_counts(text, space_group, unit_cell, params.solvent_fraction)
    if params.solvent_fraction:
        raise Sorry("absolute_scale.solvent_fraction needs a model file or a sequence "
                    "(with element counts, count the solvent's O and H in)")
    return parse_element_counts(text)


def coherent_per_cell(qmag, elements: dict) -> np.ndarray:
    """sum_j n_j f_j(|s|)^2, electron units."""
    from cctbx.eltbx import xray_scattering

    stol = np.asarray(qmag, dtype=np.float64) / 2.0
    total = np.zeros_like(stol)
    for symbol, count in elements.items():
        form_factor = xray_scattering.wk1995(symbol).fetch()
        f = np.array([form_factor.at_stol(float(x)) for x in stol.ravel()])
        total += count * f.reshape(stol.shape) ** 2
    return total


def incoherent_per_cell(qmag, elements: dict) -> np.ndarray:
    """sum_j n_j S_j(|s|), electron units (Hubbell et al. 1975 via xraylib)."""
    import xraylib

    stol = np.asarray(qmag, dtype=np.float64) / 2.0
    # xraylib's splines start at sin(theta)/lambda = 1e-3 (S is ~1e-4 there)
    clipped = np.maximum(stol.ravel(), 1e-3)
    total = np.zeros(clipped.size)
    for symbol, count in elements.items():
        z = xraylib.SymbolToAtomicNumber(symbol)
        total += count * np.array([xraylib.SF_Compt(z, float(x)) for x in clipped])
    return total.reshape(stol.shape)


def compton_response(qmag, wavelength, mu_per_mm=0.0, thickness_mm=0.0) -> np.ndarray:
    """R(|s|): recoil factor (lambda/lambda')^2 times the sensor's efficiency at
    lambda' relative to that at lambda (normal incidence)."""
    cos_2theta = 1.0 - 0.5 * (np.asarray(qmag, dtype=np.float64) * wavelength) ** 2
    shifted = wavelength + COMPTON_WAVELENGTH * (1.0 - cos_2theta)
    recoil = (wavelength / shifted) ** 2
    if mu_per_mm > 0 and thickness_mm > 0:
        eta = -np.expm1(-mu_per_mm * thickness_mm)
        eta_shifted = -np.expm1(-mu_per_mm * thickness_mm * (shifted / wavelength) ** 3)
        recoil = recoil * eta_shifted / eta
    return recoil


def _on_grid(function, qmag, *args, n=1001):
    """A smooth function of |s| evaluated on n points and interpolated."""
    qmag = np.asarray(qmag, dtype=np.float64)
    if qmag.size <= n:
        return function(qmag, *args)
    table = np.linspace(0.0, float(qmag.max()) * 1.0001, n)
    return np.interp(qmag, table, function(table, *args))


def _shell_means(qmag, multiplicity, use, edges):
    """A function giving the mean of per-voxel values in each |s| shell
    (``edges``) over the voxels ``use``, weighted by symmetry multiplicity
    (the reciprocal volume a voxel stands for), for the shells with data;
    None when fewer than 2 shells have data."""
    n_bins = len(edges) - 1
    shell = np.clip(np.searchsorted(edges, qmag[use], side="right") - 1, 0, n_bins - 1)
    weight = multiplicity[use].astype(np.float64)
    norm = np.bincount(shell, weights=weight, minlength=n_bins)
    filled = norm > 0
    if filled.sum() < 2:
        return None

    def shell_mean(values):
        return np.bincount(shell, weights=weight * values[use],
                           minlength=n_bins)[filled] / norm[filled]

    return shell_mean


def fit_absolute_scale(merged, elements, wavelength, sensor=(0.0, 0.0), d_min=None,
                       d_max=None, n_bins=20) -> AbsoluteScale:
    """K from the sum rule on shell means of the merged map (voxels weighted by
    their symmetry multiplicity: the reciprocal volume each stands for), and
    the map in electron units with the incoherent scattering subtracted."""
    qmag = merged.qmag
    s_max = float(qmag.max()) if d_min is None else 1.0 / d_min
    s_min = 0.5 * float(qmag.max()) if d_max is None else 1.0 / d_max
    if s_min >= s_max:
        raise Sorry(f"absolute_scale: empty fit range (|s| {s_min:.3f} to {s_max:.3f} 1/A)")
    finite = np.isfinite(merged.intensity)
    fit_mean = _shell_means(qmag, merged.multiplicity, finite & (qmag >= s_min) & (qmag <= s_max),
                            np.linspace(s_min, s_max, n_bins + 1))
    if fit_mean is None:
        raise Sorry(f"absolute_scale: fewer than 2 shells with data between "
                    f"{1 / s_max:.2f} and {1 / s_min:.2f} A")
    coherent_voxels = _on_grid(coherent_per_cell, qmag, elements)
    incoherent_voxels = _on_grid(incoherent_per_cell, qmag, elements) * compton_response(
        qmag, wavelength, *sensor)
    data = fit_mean(merged.intensity)
    coherent = fit_mean(coherent_voxels)
    incoherent = fit_mean(incoherent_voxels)
    ratio = data / (coherent + incoherent)
    # least squares on relative residuals: every shell counts alike
    scale = float(ratio.sum() / (ratio * ratio).sum())
    result = AbsoluteScale(
        scale=scale,
        elements=dict(elements),
        fit_range=(s_min, s_max),
        shell_s=fit_mean(qmag),
        shell_data=scale * data,
        shell_coherent=coherent,
        shell_incoherent=incoherent,
        intensity=scale * merged.intensity - incoherent_voxels,
        sigma=scale * merged.sigma,
        incoherent=incoherent_voxels,
    )
    # the whole map in shells of the fit's width from |s| = 0 (the default
    # fit range, the outer half in 20 shells, falls on the same edges)
    width = (s_max - s_min) / n_bins
    n_profile = max(2, int(np.ceil(float(qmag.max()) / width)))
    profile_mean = _shell_means(qmag, merged.multiplicity, finite,
                                width * np.arange(n_profile + 1))
    if profile_mean is not None:
        coherent_all, incoherent_all = profile_mean(coherent_voxels), profile_mean(incoherent_voxels)
        result.profile = {"s": profile_mean(qmag), "data": scale * profile_mean(merged.intensity),
                          "coherent": coherent_all, "incoherent": incoherent_all,
                          "sum": coherent_all + incoherent_all}
    spread = np.ptp(scale * ratio)
    logger.info(
        "Absolute scale: %.5g electron units per cell per map unit (%.0f electrons per "
        "cell; fit %.2f-%.2f A, %d shells, data / model from %.3f to %.3f)",
        scale, result.electrons_per_cell, 1 / s_max, 1 / s_min, len(ratio),
        float((scale * ratio).min()), float((scale * ratio).max()))
    if spread > 0.2:
        logger.warning("absolute_scale: data / model varies by %.0f %% over the fit range: "
                       "Bragg intensity or an unmodelled background in it?", 100 * spread)
    return result


def cell_contents(params, grid):
    """Element counts per cell of ``absolute_scale.composition`` (None if unset);
    read before the merge's work, so that bad input fails at once."""
    if not (params.composition or params.sequence):
        return None
    return element_counts(params, grid.space_group, grid.unit_cell)


def absolute_scale_run(merged, experiments, elements, params):
    """The merge's entry point: None without cell contents."""
    if elements is None:
        return None
    beam = experiments[0].beam
    panel = experiments[0].detector[0]
    sensor = (panel.get_mu() * 1.0, panel.get_thickness())
    return fit_absolute_scale(merged, elements, beam.get_wavelength(), sensor,
                              params.d_min, params.d_max, params.n_bins)
