"""Absolute scale (electron units per unit cell) and the Compton subtraction.

References that share no code with dials_diffuse.absolute_scale: the
limits f(0) = Z and S(s -> large) = Z, the Compton formula written out, and a
simulator whose truth uses other form-factor fits (IT 1992 vs WK 1995) and
writes the recoil and detector response in energy terms
(dials_diffuse/simulate/absolute.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dials.util import Sorry

from dials_diffuse import absolute_scale as absolute
from dials_diffuse.extraction import extract
from dials_diffuse.merging import merge_run
from dials_diffuse.simulate import load_truth, params_from, simulate_dataset

from diffuse_helpers import extraction_params, merge_params

COMPOSITION = "C 600 H 950 N 160 O 190 S 8"


def test_form_factor_limits():
    counts = {"C": 2.0, "O": 1.0, "S": 0.5}
    z = {"C": 6, "O": 8, "S": 16}
    # coherent: f(0) = Z (neutral atoms)
    expected = sum(n * z[e] ** 2 for e, n in counts.items())
    assert absolute.coherent_per_cell(np.array([0.0]), counts)[0] == pytest.approx(expected, rel=2e-3)
    # incoherent: 0 at s = 0, Z far out (every electron scatters incoherently)
    s = absolute.incoherent_per_cell(np.array([0.0, 6.0]), counts)
    assert s[0] < 0.01
    assert s[1] == pytest.approx(sum(n * z[e] for e, n in counts.items()), rel=0.02)


def test_compton_response():
    # 2 theta = 90 deg at 1 A: |s| = sqrt(2), lambda' = 1 + 0.0242631 A
    recoil = absolute.compton_response(np.array([np.sqrt(2.0), 0.0]), 1.0)
    assert recoil[0] == pytest.approx(1.0 / 1.0242631 ** 2, rel=1e-6)
    assert recoil[1] == pytest.approx(1.0)
    # a thin sensor absorbs the longer wavelength better: lambda'^3 / lambda^3
    thin = absolute.compton_response(np.array([np.sqrt(2.0)]), 1.0, 1e-4, 1e-2)[0]
    assert thin == pytest.approx(1.0242631 ** 3 / 1.0242631 ** 2, rel=1e-3)


def test_composition_parsing(tmp_path):
    assert absolute.parse_element_counts("C 6 h 12,O 6 C 1") == {"C": 7.0, "H": 12.0, "O": 6.0}
    for bad in ("C 6 H", "Xx 3", "C six", "C -1"):
        with pytest.raises(Sorry):
            absolute.parse_element_counts(bad)


def test_model_composition(tmp_path):
    """A PDB model is the asymmetric unit: its atoms times occupancy, times
    the space group's order, plus water for the solvent fraction."""
    from cctbx import sgtbx, uctbx

    pdb = tmp_path / "model.pdb"
    pdb.write_text(
        "CRYST1   30.000   40.000   50.000  90.00  90.00  90.00 P 21 21 21    4\n"
        "ATOM      1  N   GLY A   1       1.000   1.000   1.000  1.00 10.00           N\n"
        "ATOM      2  CA  GLY A   1       2.000   1.000   1.000  1.00 10.00           C\n"
        "ATOM      3  C   GLY A   1       3.000   1.000   1.000  1.00 10.00           C\n"
        "ATOM      4  O   GLY A   1       4.000   1.000   1.000  0.50 10.00           O\n"
        "END\n")
    group = sgtbx.space_group_info("P 21 21 21").group()
    cell = uctbx.unit_cell((30, 40, 50, 90, 90, 90))
    counts = absolute.model_element_counts(str(pdb), group, cell)
    assert counts == {"N": 4.0, "C": 8.0, "O": 2.0}
    wet = absolute.model_element_counts(str(pdb), group, cell, solvent_fraction=0.5)
    waters = 0.5 * 60000 * absolute.WATER_PER_A3
    assert wet["O"] == pytest.approx(2 + waters) and wet["H"] == pytest.approx(2 * waters)


@pytest.fixture(scope="module")
def absolute_run(tmp_path_factory):
    """8 stills of a cell whose diffuse scattering is in electron units, with
    the Compton scattering of its atoms on the images (flux: photons per
    electron unit per steradian per second)."""
    base = tmp_path_factory.mktemp("absolute")
    truth = load_truth(simulate_dataset(params_from(**{
        "mode": "stills", "n_images": 8, "random_seed": 31,
        "detector.format": "generic", "detector.n_fast": 256, "detector.n_slow": 256,
        "detector.distance": 100, "flux": 3e5,
        # halos as wide as a voxel: the diffuse under the Bragg masks, which
        # the map cannot hold, is a small part of each shell (with the
        # default 0.006 the sum rule reads 2.4 % high on 6 stills)
        "diffuse.halo.width": 0.012,
        "diffuse.absolute.composition": COMPOSITION,
        "output.directory": str(base / "data")})))
    extract(truth.experiments, extraction_params(truth, base / "ex", **{"output.save_pixels": "off"}),
            progress=False)
    result = merge_run(truth.experiments, [str(base / "ex")],
                       merge_params(base / "merged", **{"absolute_scale.composition": COMPOSITION}))
    return truth, base, result


def test_absolute_scale_recovered(absolute_run):
    """The merged map is flux x (D + Compton) in map units, so the true
    absolute scale is 1 / flux (measured K flux = 1.007)."""
    truth, base, result = absolute_run
    fitted = result["absolute"]
    assert fitted.scale * truth.flux == pytest.approx(1.0, abs=0.03)
    merged = result["merged"]
    electrons = truth.diffuse_voxel_average(merged.hkl, 4)
    use = (merged.n_observations >= 3) & ~merged.on_bragg
    cc = np.corrcoef(fitted.intensity[use], electrons[use])[0, 1]
    cc_without_subtraction = np.corrcoef(merged.intensity[use], electrons[use])[0, 1]
    assert cc >= 0.99, cc  # measured 0.9933
    assert cc > cc_without_subtraction  # measured 0.9917
    # the subtracted curve is the simulator's Compton scattering (own recoil formula)
    true_compton = truth.compton_per_cell(merged.qmag)
    assert np.allclose(fitted.incoherent, true_compton, rtol=0.01)


def test_absolute_scale_outputs(absolute_run, tmp_path):
    from dials_diffuse import merged_files

    truth, base, result = absolute_run
    out = base / "merged"
    doc = json.loads((out / merged_files.ABSOLUTE_NAME).read_text())
    assert doc["scale"] == pytest.approx(result["absolute"].scale)
    assert doc["composition"]["C"] == 600
    assert doc["electrons_per_cell"] == pytest.approx(600 * 6 + 950 + 160 * 7 + 190 * 8 + 8 * 16)
    ratio = np.array(doc["shells"]["ratio_data_to_sum"])
    assert np.all(np.abs(ratio - 1) < 0.1)
    # the profile: the whole map's |s| range, each shell the multiplicity-
    # weighted mean of K I over its voxels (recomputed here per shell)
    merged, fitted = result["merged"], result["absolute"]
    profile = {k: np.array(v) for k, v in doc["profile"].items()}
    ok = np.isfinite(merged.intensity)
    width = np.diff(doc["fit_s_range"])[0] / 20  # n_bins = 20 by default
    assert profile["s"].min() < doc["fit_s_range"][0] - 5 * width
    assert profile["s"].max() > doc["fit_s_range"][1] - width
    for k in (0, len(profile["s"]) // 2, len(profile["s"]) - 1):
        s_k = profile["s"][k]
        edges = width * np.arange(int(np.ceil(merged.qmag.max() / width)) + 1)
        # shells of the fit's width from 0, the last one closed (as numpy's histogram)
        shell = np.minimum(np.digitize(merged.qmag, edges), len(edges) - 1)
        inside = ok & (shell == np.digitize(s_k, edges))
        w = merged.multiplicity[inside]
        expected = fitted.scale * np.sum(w * merged.intensity[inside]) / np.sum(w)
        assert profile["data"][k] == pytest.approx(expected, rel=1e-9), (k, s_k, np.sum(inside))
    assert np.allclose(profile["sum"], profile["coherent"] + profile["incoherent"])
    _, _, voxels, _ = merged_files.read_merged(str(out))
    assert np.allclose(voxels["I_absolute"], result["absolute"].intensity)
    assert (out / merged_files.ABSOLUTE_MAP_NAME).stat().st_size > 1024
    # dials.diffuse_check plots it
    from dials_diffuse.command_line.check import run

    run([str(out), f"output.directory={tmp_path / 'diag'}", f"output.log={tmp_path / 'c.log'}"])
    assert (tmp_path / "diag" / "absolute_scale.png").stat().st_size > 10000


def test_bad_composition_is_one_line(absolute_run, tmp_path):
    truth, base, result = absolute_run
    proc = subprocess.run(
        [sys.executable, "-m", "dials_diffuse.command_line.merge",
         str(base / "data" / "truth.expt"), str(base / "ex"),
         "absolute_scale.composition=C 600 Qq 3", f"output.directory={tmp_path / 'm'}",
         f"output.log={tmp_path / 'm.log'}"],
        capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Sorry" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / "m" / "absolute_scale.json").exists()


def test_sequence_composition(tmp_path):
    """Gly-Ala is C5 H10 N2 O3; a FASTA file reads the same; four copies in
    P 21 21 21 (order 4) with one molecule per asymmetric unit."""
    from cctbx import sgtbx, uctbx

    p1 = sgtbx.space_group_info("P 1").group()
    cell = uctbx.unit_cell((30, 40, 50, 90, 90, 90))
    assert absolute.sequence_element_counts("GA", 1, p1, cell) == {
        "C": 5.0, "H": 10.0, "N": 2.0, "O": 3.0}
    fasta = tmp_path / "seq.fasta"
    fasta.write_text(">dipeptide\nG\nA\n")
    group = sgtbx.space_group_info("P 21 21 21").group()
    counts = absolute.sequence_element_counts(absolute.read_sequence(str(fasta)), 2, group, cell)
    assert counts == {"C": 40.0, "H": 80.0, "N": 16.0, "O": 24.0}
    with pytest.raises(Sorry):
        absolute.read_sequence("GAX1")
