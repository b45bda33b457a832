"""dials.diffuse_simulate: images read back exactly, spots where predicted, the
truth recovered by an oracle reduction, Laue symmetry of D, bad input, CLI."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dials.util import Sorry

from dials_diffuse.simulate import (
    laue_rotations,
    load_truth,
    params_from,
    simulate_dataset,
)
from dials_diffuse.simulate.diffuse_model import DiffuseModel, DiffuseParameters

VENV_BIN = pathlib.Path(sys.executable).parent


def _exact_images(truth, i):
    """What the simulator writes for image i with noise off."""
    out = []
    hot = truth.data["hot_pixels"]["value"]
    for p, (mu, gap) in enumerate(zip(truth.expected_counts(i), truth.gaps())):
        counts = np.clip(np.rint(mu), 0, 2**31 - 1).astype(np.int32)
        counts[gap] = -1
        out.append(counts)
    for p, s, f in truth.hot_pixels:
        out[p][s, f] = hot
    for p, s, f in truth.dead_pixels:
        out[p][s, f] = 0
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        # two Pilatus modules: PILATUS header, module gap masked by dxtbx
        {"detector.n_fast": 487, "detector.n_slow": 407, "mode": "stills"},
        {"detector.n_fast": 200, "detector.n_slow": 180, "mode": "rotation"},
        {"detector.type": "multipanel", "detector.multipanel.n_panels_fast": 3},
    ],
    ids=["pilatus-stills", "generic-rotation", "multipanel-3x2"],
)
def test_images_read_back_exactly(tmp_path, overrides):
    if overrides.get("detector.type") == "multipanel":
        overrides = {
            **overrides,
            "detector.multipanel.panel_n_fast": 60,
            "detector.multipanel.panel_n_slow": 50,
            "detector.multipanel.n_panels_slow": 2,
        }
    params = params_from(
        **{**overrides, "n_images": 2, "noise": False, "output.directory": str(tmp_path / "d")}
    )
    path = simulate_dataset(params)
    truth = load_truth(path)
    assert len(truth.detector) == (6 if "multipanel" in str(overrides) else 1)
    if overrides.get("detector.n_fast") == 487:
        assert "PILATUS" in truth.data["detector"]["format"]
        assert truth.data["detector"]["n_gap_pixels"] == 487 * 17
    from dxtbx.model.experiment_list import ExperimentListFactory

    for i in range(truth.n_images):
        raw = truth.raw_data(i)
        for got, expected in zip(raw, _exact_images(truth, i)):
            assert got.dtype.kind == "i"
            np.testing.assert_array_equal(got, expected)
        # the image file alone gives the truth geometry
        from_image = ExperimentListFactory.from_filenames([str(truth.image_path(i))])[0]
        for p_img, p_truth in zip(from_image.detector, truth.detector):
            assert p_img.get_image_size() == p_truth.get_image_size()
            for get in ("get_origin", "get_fast_axis", "get_slow_axis", "get_pixel_size"):
                assert getattr(p_img, get)() == pytest.approx(getattr(p_truth, get)(), abs=1e-12)
            xy = (12.25, 31.5)
            assert p_img.pixel_to_millimeter(xy) == pytest.approx(
                p_truth.pixel_to_millimeter(xy), abs=1e-12
            )
        assert from_image.beam.get_wavelength() == pytest.approx(truth.beam.get_wavelength())
    if params.mode == "rotation":
        expt = truth.experiments[0]
        assert not expt.is_still()
        assert expt.scan.get_oscillation() == pytest.approx((0.0, 0.2))
        assert len(expt.imageset) == 2
    else:
        assert all(e.is_still() for e in truth.experiments)
        assert len({id(e.crystal) for e in truth.experiments}) == truth.n_images


def test_fixture_datasets_consistent(simulated_stills, simulated_rotation, simulated_multipanel):
    for path, n, n_panels in (
        (simulated_stills, 6, 1),
        (simulated_rotation, 10, 1),
        (simulated_multipanel, 4, 4),
    ):
        truth = load_truth(path)
        data = json.loads((path / "truth.json").read_text())
        for key in (
            "mode", "n_images", "random_seed", "images", "crystal", "beam", "detector",
            "diffuse", "scales", "flux", "gain", "exposure_time", "corrections",
            "background", "beamstop", "hot_pixels", "dead_pixels", "bragg", "noise",
        ):
            assert key in data, key
        assert truth.n_images == n and len(truth.scales) == n
        assert np.mean(truth.scales) == pytest.approx(1.0)
        assert len(truth.detector) == n_panels
        assert len(truth.hot_pixels) == 4 and len(truth.dead_pixels) == 8
        assert truth.data["beamstop"]["n_pixels"] > 0
        raw = truth.raw_data(0)
        for p, s, f in truth.hot_pixels:
            assert raw[p][s, f] == truth.data["hot_pixels"]["value"]
        for p, s, f in truth.dead_pixels:
            assert raw[p][s, f] == 0
        # the Poisson draws match their means
        mu = np.concatenate([m[k] for m, k in zip(truth.expected_counts(0), truth.pixel_mask())])
        counts = np.concatenate([r[k] for r, k in zip(raw, truth.pixel_mask())])
        assert 10 < np.median(counts) < 1000
        assert counts.sum() / mu.sum() == pytest.approx(1.0, abs=0.01)
        chi2 = np.mean((counts - mu) ** 2 / np.maximum(mu, 1))
        assert chi2 == pytest.approx(1.0, abs=0.25)


def test_deterministic_and_atomic(tmp_path, monkeypatch):
    common = {"n_images": 2, "detector.n_fast": 64, "detector.n_slow": 60}
    a = simulate_dataset(params_from(**common, **{"output.directory": str(tmp_path / "a")}))
    b = simulate_dataset(params_from(**common, **{"output.directory": str(tmp_path / "b")}))
    for name in ("image_00001.cbf", "image_00002.cbf"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert load_truth(a).scales.tolist() == load_truth(b).scales.tolist()

    # a crash while writing leaves nothing behind
    from dials_diffuse.simulate import writer

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(writer, "write_minicbf", boom)
    with pytest.raises(RuntimeError):
        simulate_dataset(params_from(**common, **{"output.directory": str(tmp_path / "c")}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def _run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _found_vs_predicted(strong, truth, stills):
    from dials.array_family import flex

    table = flex.reflection_table.from_file(str(strong))
    obs = table["xyzobs.px.value"].as_numpy_array()
    ids = table["id"].as_numpy_array()
    distances = []
    for i in range(truth.n_images):
        panel, x, y, counts = truth.bragg_spots(i)
        keep = counts > 8000
        if stills:
            o = obs[ids == i]
        else:
            o = obs[np.floor(obs[:, 2]) == i]
        for xx, yy in zip(x[keep], y[keep]):
            distances.append(np.hypot(o[:, 0] - xx, o[:, 1] - yy).min() if len(o) else 1e9)
    return np.array(distances)


def test_dials_finds_stills_spots_at_predictions(simulated_stills, tmp_path):
    truth = load_truth(simulated_stills)
    images = [str(truth.image_path(i)) for i in range(truth.n_images)]
    _run(["dials.import", *images, "convert_sequences_to_stills=True"], tmp_path)
    _run(
        [
            "dials.find_spots",
            "imported.expt",
            "nproc=1",
            "spotfinder.threshold.dispersion.global_threshold=400",
        ],
        tmp_path,
    )
    d = _found_vs_predicted(tmp_path / "strong.refl", truth, stills=True)
    assert len(d) >= 20
    assert np.all(d < 1.0), d


def test_dials_finds_rotation_spots_at_predictions(simulated_rotation, tmp_path):
    truth = load_truth(simulated_rotation)
    images = [str(truth.image_path(i)) for i in range(truth.n_images)]
    _run(["dials.import", *images], tmp_path)
    _run(
        [
            "dials.find_spots",
            "imported.expt",
            "nproc=1",
            "spotfinder.threshold.dispersion.global_threshold=400",
        ],
        tmp_path,
    )
    from dials.array_family import flex

    table = flex.reflection_table.from_file(str(tmp_path / "strong.refl"))
    obs = table["xyzobs.px.value"].as_numpy_array()
    pred = truth.bragg["xyzcal.px"].as_numpy_array()
    # fully recorded spots well inside the scan
    inside = (pred[:, 2] > 1.5) & (pred[:, 2] < truth.n_images - 1.5)
    d = [np.hypot(obs[:, 0] - x, obs[:, 1] - y).min() for x, y, _ in pred[inside]]
    assert len(d) >= 10
    assert np.all(np.array(d) < 1.0), d


def oracle_voxel_means(truth, ndiv, min_pixels, bragg_radius=4.0):
    """Reduce the images with the known truth; voxel means of D and their centres."""
    keys, values = [], []
    total = truth.correction_total()
    background = truth.background_photons()
    use = truth.pixel_mask()
    for i in range(truth.n_images):
        raw = truth.raw_data(i)
        hkl = truth.hkl(i)
        panel, x, y, _ = truth.bragg_spots(i)
        for p in range(len(raw)):
            mask = use[p] & (raw[p] >= 0)
            slow, fast = np.indices(raw[p].shape)
            for xs, ys in zip(x[panel == p], y[panel == p]):
                mask &= (fast + 0.5 - xs) ** 2 + (slow + 0.5 - ys) ** 2 > bragg_radius**2
            intensity = (
                (raw[p] * truth.gain - background[p])
                / total[p]
                / truth.exposure_time
                / truth.flux
                / truth.scales[i]
            )
            keys.append(np.rint(hkl[p][mask] * ndiv).astype(np.int64))
            values.append(intensity[mask])
    keys = np.concatenate(keys)
    values = np.concatenate(values)
    voxels, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    means = np.bincount(inverse.ravel(), weights=values) / counts
    keep = counts >= min_pixels
    return voxels[keep] / ndiv, means[keep]


@pytest.mark.parametrize(
    "fixture,ndiv,min_pixels",
    [("simulated_stills", 5, 10), ("simulated_rotation", 5, 30)],
)
def test_oracle_reduction_recovers_diffuse(request, fixture, ndiv, min_pixels):
    truth = load_truth(request.getfixturevalue(fixture))
    centres, means = oracle_voxel_means(truth, ndiv, min_pixels)
    assert len(centres) > 1000
    reference = truth.diffuse_voxel_average(centres, ndiv)
    assert np.corrcoef(means, reference)[0, 1] > 0.98
    # and absolutely, not just up to a factor
    assert np.median(means / reference) == pytest.approx(1.0, abs=0.03)


SPACE_GROUPS = [
    ("P1", 2), ("P2", 4), ("P222", 8), ("P41212", 16), ("P3", 6), ("P6", 12),
    ("P-3m1", 12), ("I4", 8), ("R3:H", 6), ("Fm-3m", 48), ("P23", 24),
]
CELLS = {
    "P1": (31, 42, 53, 80, 95, 110), "P2": (31, 42, 53, 90, 104, 90),
    "P222": (31, 42, 53, 90, 90, 90), "P41212": (40, 40, 60, 90, 90, 90),
    "I4": (40, 40, 60, 90, 90, 90), "P3": (40, 40, 60, 90, 90, 120),
    "P6": (40, 40, 60, 90, 90, 120), "P-3m1": (40, 40, 60, 90, 90, 120),
    "R3:H": (40, 40, 60, 90, 90, 120), "Fm-3m": (50, 50, 50, 90, 90, 90),
    "P23": (50, 50, 50, 90, 90, 90),
}


@pytest.mark.parametrize("space_group,n_ops", SPACE_GROUPS)
def test_diffuse_obeys_laue_symmetry(space_group, n_ops):
    model = DiffuseModel(
        DiffuseParameters(unit_cell=CELLS[space_group], space_group=space_group)
    )
    ops = laue_rotations(space_group)
    assert len(ops) == n_ops
    rng = np.random.default_rng(0)
    # points near lattice points (halos and streaks matter) and anywhere
    hkl = np.concatenate(
        [rng.integers(-8, 9, (300, 3)) + rng.normal(0, 0.15, (300, 3)),
         rng.uniform(-8, 8, (300, 3))]
    )
    d = model.diffuse(hkl)
    assert d.std() > 0.05 * d.mean()
    for r in ops:
        np.testing.assert_allclose(model.diffuse(hkl @ r), d, rtol=1e-10, atol=1e-12)
    # but no higher symmetry: a generic rotation of the lattice breaks it
    if space_group == "P1":
        swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)
        assert not np.allclose(model.diffuse(hkl @ swap), d, rtol=1e-3)


def test_voxel_average():
    model = DiffuseModel(DiffuseParameters(unit_cell=(30, 40, 50, 90, 90, 90), space_group="P1"))
    centres = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.5]])
    np.testing.assert_allclose(model.voxel_average(centres, 4, n_sub=1), model.diffuse(centres))
    # a halo narrower than the voxel: the average is well below the centre value
    assert model.voxel_average(centres[:1], 2, n_sub=8)[0] < 0.7 * model.diffuse(centres[:1])[0]


def test_voxel_average_is_converged():
    """The 5^3 midpoint rule alone is 1 % low at 10-20 A (convex Gaussian tails of
    the halos and streaks in a 1/4 voxel); extrapolated with 3^3 it is right."""
    model = DiffuseModel(DiffuseParameters(unit_cell=(30, 40, 50, 90, 90, 90),
                                           space_group="P 21 21 21"))
    rng = np.random.default_rng(1)
    h = rng.integers(-20, 21, (4000, 3)) / 4.0
    qmag = np.linalg.norm(h @ model.B.T, axis=1)
    low = h[(qmag > 0.05) & (qmag < 0.1)][:120]
    fine = [model.voxel_average(low, 4, n_sub=n, extrapolate=False) for n in (19, 21)]
    reference = (21**2 * fine[1] - 19**2 * fine[0]) / (21**2 - 19**2)
    plain = model.voxel_average(low, 4, n_sub=5, extrapolate=False)
    assert np.median(plain / reference) < 0.995
    default = model.voxel_average(low, 4)
    assert np.median(np.abs(default / reference - 1)) < 3e-4
    assert np.percentile(np.abs(default / reference - 1), 95) < 1.5e-3


BAD_INPUT = [
    (["crystal.space_group=P5"], "crystal.space_group"),
    (["crystal.unit_cell=30,-40,50,90,90,90"], "crystal.unit_cell"),
    (["crystal.unit_cell=30,40,50,90,90,90", "crystal.space_group=P6"], "crystal.unit_cell"),
    (["crystal.unit_cell=10,20,30,150,150,150"], "crystal.unit_cell"),
    (["n_images=0"], "n_images"),
    (["n_images=-3"], "n_images"),
    (["beam.wavelength=0"], "beam.wavelength"),
    (["mode=rotation", "detector.type=multipanel"], "detector.type"),
    (["no_such_parameter=1"], "no_such_parameter"),
]


@pytest.mark.parametrize("args,name", BAD_INPUT)
def test_bad_input_gives_sorry_and_no_output(tmp_path, monkeypatch, args, name):
    from dials_diffuse.command_line.simulate import run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(Sorry) as excinfo:
        run(args + ["output.directory=out", "detector.n_fast=32", "detector.n_slow=32"])
    assert name in str(excinfo.value)
    assert "\n" not in str(excinfo.value).strip()
    assert not any(p.name != "dials.diffuse_simulate.log" for p in tmp_path.iterdir())


def test_unwritable_output(tmp_path):
    small = {"n_images": 1, "detector.n_fast": 32, "detector.n_slow": 32}
    # a parent that is a file cannot hold a directory, even for root
    (tmp_path / "file").write_text("")
    with pytest.raises(Sorry, match="output.directory"):
        simulate_dataset(params_from(**small, **{"output.directory": str(tmp_path / "file" / "x")}))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if not os.access(readonly, os.W_OK):
            with pytest.raises(Sorry, match="output.directory"):
                simulate_dataset(
                    params_from(**small, **{"output.directory": str(readonly / "x")})
                )
        assert list(readonly.iterdir()) == []
    finally:
        readonly.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "readonly"]


def test_existing_output_not_clobbered(tmp_path):
    small = {"n_images": 1, "detector.n_fast": 32, "detector.n_slow": 32}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(Sorry, match="output.directory"):
        simulate_dataset(params_from(**small, **{"output.directory": str(tmp_path / "x")}))
    with pytest.raises(Sorry, match="output.directory"):
        simulate_dataset(
            params_from(**small, **{"output.directory": str(tmp_path / "x"), "output.overwrite": True})
        )
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    path = simulate_dataset(params_from(**small, **{"output.directory": str(tmp_path / "y")}))
    again = simulate_dataset(
        params_from(**small, **{"output.directory": str(path), "output.overwrite": True})
    )
    assert (again / "truth.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "y"]


def test_command_line(tmp_path):
    exe = str(VENV_BIN / "dials.diffuse_simulate")
    result = subprocess.run([exe, "-h"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0
    assert "Examples" in result.stdout
    phil = tmp_path / "sim.phil"
    phil.write_text("n_images = 2\ndetector.n_fast = 40\ndetector.n_slow = 30\n")
    result = subprocess.run(
        [exe, "--phil", str(phil), "mode=rotation", "output.directory=out"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "truth.expt").exists()
    assert (tmp_path / "out" / "truth.json").exists()
    assert (tmp_path / "dials.diffuse_simulate.log").exists()
    truth = load_truth(tmp_path / "out")
    assert truth.mode == "rotation" and truth.n_images == 2
    result = subprocess.run(
        [exe, "crystal.space_group=Q1", "output.directory=bad"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Sorry:"), result.stderr
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------
# The reference physics is independent of the code it checks, and agrees
# with DIALS/dxtbx and with the formulas of PHYSICS.md
# --------------------------------------------------------------------------
SIMULATE_DIR = pathlib.Path(__file__).resolve().parents[1] / "dials_diffuse" / "simulate"


def test_simulator_does_not_use_the_project_physics():
    import ast

    for path in sorted(SIMULATE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(
                    ("dials_diffuse.geometry", "dials_diffuse.corrections")
                ), f"{path.name} imports {name}"
    # and importing the simulator does not load them
    code = (
        "import sys, dials_diffuse.simulate, dials_diffuse.simulate.reference_physics;"
        "bad = [m for m in ('dials_diffuse.geometry', 'dials_diffuse.corrections') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _sample_pixels(truth, n=40, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for p, panel in enumerate(truth.detector):
        n_fast, n_slow = panel.get_image_size()
        corners = [(0, 0), (n_slow - 1, n_fast - 1), (0, n_fast - 1), (n_slow - 1, 0)]
        for s, f in corners + list(zip(rng.integers(0, n_slow, n), rng.integers(0, n_fast, n))):
            out.append((p, int(s), int(f)))
    return out


def test_reference_hkl_stills_matches_pixel_to_miller_index(simulated_stills, simulated_multipanel):
    from dials.algorithms.spot_prediction import PixelToMillerIndex

    for path in (simulated_stills, simulated_multipanel):
        truth = load_truth(path)
        for i in range(truth.n_images):
            expt = truth.experiments[i]
            reference = PixelToMillerIndex(expt.beam, expt.detector, expt.crystal)
            hkl = truth.hkl(i)
            for p, s, f in _sample_pixels(truth, seed=i):
                h = reference.h(p, f + 0.5, s + 0.5)
                np.testing.assert_allclose(hkl[p][s, f], h, rtol=0, atol=1e-9)
            np.testing.assert_allclose(
                truth.setting_matrix(i), np.reshape(expt.crystal.get_A(), (3, 3))
            )


def _frame_crystal(crystal, k):
    """A static copy of a scan-varying crystal with A averaged over scan points k, k+1."""
    import copy

    out = copy.deepcopy(crystal)
    if crystal.num_scan_points:
        A = 0.5 * (
            np.array(crystal.get_A_at_scan_point(k)) + np.array(crystal.get_A_at_scan_point(k + 1))
        )
        out.reset_scan_points()
        out.set_A(tuple(A))
    return out


@pytest.mark.parametrize("setting", ["plain", "setting_and_fixed_rotation"])
def test_reference_hkl_rotation_matches_pixel_to_miller_index(
    simulated_rotation_fine, setting
):
    """Absolute frames (images numbered from 5), scan-varying A, S and F."""
    from dials.algorithms.spot_prediction import PixelToMillerIndex
    from dxtbx.model import GoniometerFactory
    from dxtbx.model.experiment_list import Experiment, ExperimentList
    from scitbx import matrix

    from dials_diffuse.simulate import Truth

    truth = load_truth(simulated_rotation_fine)
    expt = truth.experiments[0]
    assert expt.scan.get_array_range() == (4, 24)
    assert truth.first_frame == 4 and truth.frame(19) == 23
    if setting != "plain":
        F = matrix.col((0.3, 1, -0.2)).normalize().axis_and_angle_as_r3_rotation_matrix(25, deg=True)
        S = matrix.col((1, -0.4, 0.5)).normalize().axis_and_angle_as_r3_rotation_matrix(-40, deg=True)
        gonio = GoniometerFactory.make_goniometer((1, 0.2, 0.1), F.elems)
        gonio.set_setting_rotation(S.elems)
        expt = Experiment(
            imageset=expt.imageset, beam=expt.beam, detector=expt.detector,
            goniometer=gonio, scan=expt.scan, crystal=expt.crystal,
        )
        truth = Truth(truth.data, ExperimentList([expt]), truth.directory)
    for i in (0, 7, 19):
        crystal = _frame_crystal(expt.crystal, i)
        reference = PixelToMillerIndex(expt.beam, expt.detector, expt.goniometer, expt.scan, crystal)
        hkl = truth.hkl(i)
        z = expt.scan.get_array_range()[0] + i + 0.5  # absolute frame centre
        for p, s, f in _sample_pixels(truth, seed=i):
            h = reference.h(p, f + 0.5, s + 0.5, z)
            np.testing.assert_allclose(hkl[p][s, f], h, rtol=0, atol=1e-9)
        # q = M hkl with the setting matrix of the image centre
        q = truth.q_lab[0][:50]
        np.testing.assert_allclose(hkl[0].reshape(-1, 3)[:50] @ truth.setting_matrix(i).T, q, atol=1e-12)


def _rectangle_solid_angle(x0, x1, y0, y1, d):
    """Exact solid angle of the rectangle [x0, x1] x [y0, y1] in a plane at distance d
    normal to the view axis (inclusion-exclusion of the corner formula)."""
    def corner(x, y):
        return np.arctan(x * y / (d * np.sqrt(x * x + y * y + d * d)))

    return corner(x1, y1) - corner(x0, y1) - corner(x1, y0) + corner(x0, y0)


def test_reference_solid_angle(simulated_stills):
    from dxtbx.model import SimplePxMmStrategy
    from dxtbx.model.detector import Detector

    from dials_diffuse.simulate import reference_physics as ref

    # the triangle formula: a square of side a at distance d on the axis
    a, d = 3.0, 7.0
    c = np.array([[-a / 2, -a / 2, d], [a / 2, -a / 2, d], [a / 2, a / 2, d], [-a / 2, a / 2, d]])
    omega = ref.triangle_solid_angle(c[0], c[1], c[2]) + ref.triangle_solid_angle(c[0], c[2], c[3])
    assert omega == pytest.approx(4 * np.arcsin(a * a / (a * a + 4 * d * d)), rel=1e-13)

    truth = load_truth(simulated_stills)
    detector = Detector.from_dict(truth.detector.to_dict())
    panel = detector[0]
    panel.set_px_mm_strategy(SimplePxMmStrategy())
    exact = ref.pixel_solid_angles(panel)
    centres = ref.reference_panels(detector)[0].lab_mm
    approx = ref.solid_angle_approximation(panel, centres)
    # px py cos / r^2 is the small-pixel limit: 0.172 mm pixels at 100 mm agree to ~1e-6
    np.testing.assert_allclose(exact, approx, rtol=1e-5)
    # additive: the pixels of the detector add up to the whole rectangle
    n_fast, n_slow = panel.get_image_size()
    (x0, y0), (x1, y1) = (
        np.array(panel.get_lab_coord(panel.pixel_to_millimeter(xy)))[:2]
        for xy in ((0.0, 0.0), (float(n_fast), float(n_slow)))
    )
    whole = _rectangle_solid_angle(min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1),
                                   -panel.get_origin()[2])
    assert exact.sum() == pytest.approx(whole, rel=1e-10)
    # on the parallax-corrected panel the pixel's quadrilateral is the sensor patch
    # whose photons it records: smaller by the mean absorption depth / distance
    applied = truth.corrections[0].solid_angle
    ratio = applied / ref.solid_angle_approximation(truth.detector[0], truth.geometry[0].lab_mm)
    assert 0.995 < ratio.min() <= ratio.max() < 1.0


def test_reference_polarization_efficiency_air(simulated_stills):
    """DIALS' lp() is 1/P and qe() is eta: the factors equal PHYSICS.md's formulas."""
    from dials_diffuse.simulate import reference_physics as ref

    truth = load_truth(simulated_stills)
    beam, panel = truth.beam, truth.detector[0]
    g = truth.geometry[0]
    s1 = g.unit_s1
    s0 = np.array(beam.get_s0()) / np.linalg.norm(beam.get_s0())
    n = np.array(beam.get_polarization_normal())
    pf = beam.get_polarization_fraction()
    P = (1 - 2 * pf) * (1 - (s1 @ n) ** 2) + pf * (1 + (s1 @ s0) ** 2)
    normal = np.array(panel.get_normal())
    eta = 1 - np.exp(-panel.get_mu() * panel.get_thickness() / np.abs(s1 @ normal))
    factors = truth.corrections[0]
    np.testing.assert_allclose(factors.polarization, P, rtol=1e-12)
    np.testing.assert_allclose(factors.efficiency, eta, rtol=1e-12)
    assert 0.5 < factors.polarization.min() and factors.polarization.max() <= 1.0 + 1e-12
    c = truth.data["corrections"]
    mu_air = ref.air_mu_per_mm(beam.get_wavelength(), c["air_temperature"], c["air_pressure"])
    assert truth.data["corrections"]["air_mu_per_mm"] == pytest.approx(mu_air)
    np.testing.assert_allclose(factors.air, np.exp(-mu_air * g.distance_mm), rtol=1e-12)
    # air at 12.4 keV transmits roughly 90-94 % over 200 mm; half as much gas, half the loss
    assert 0.90 < np.exp(-200 * ref.air_mu_per_mm(1.0)) < 0.94
    assert ref.air_mu_per_mm(1.0, 293.15, 0.5) == pytest.approx(0.5 * ref.air_mu_per_mm(1.0))
    assert ref.air_mu_per_mm(1.0, 2 * 293.15) == pytest.approx(0.5 * ref.air_mu_per_mm(1.0))
    np.testing.assert_allclose(
        truth.correction_total()[0].ravel(),
        factors.polarization * factors.solid_angle * factors.efficiency * factors.air,
    )


# --------------------------------------------------------------------------
# Rotation scans: absolute image numbers, rocking curves
# --------------------------------------------------------------------------
def test_rotation_first_image_survives_dials_import(simulated_rotation_fine, tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    truth = load_truth(simulated_rotation_fine)
    assert truth.data["images"][0] == "image_00005.cbf"
    assert truth.data["images"][-1] == "image_00024.cbf"
    scan = truth.experiments[0].scan
    assert scan.get_image_range() == (5, 24) and scan.get_array_range() == (4, 24)
    assert truth.data["rotation"]["array_range"] == [4, 24]
    _run(["dials.import", *(str(truth.image_path(i)) for i in range(truth.n_images))], tmp_path)
    imported = ExperimentListFactory.from_json_file(str(tmp_path / "imported.expt"))
    assert len(imported) == 1
    got = imported[0].scan
    assert got.get_image_range() == (5, 24) and got.get_array_range() == (4, 24)
    assert got.get_oscillation() == pytest.approx(scan.get_oscillation())
    for frame in (4.5, 10.0, 23.5):
        assert got.get_angle_from_array_index(frame) == pytest.approx(
            scan.get_angle_from_array_index(frame)
        )


def test_rocking_curves(simulated_rotation_fine):
    from dials.array_family import flex

    from dials_diffuse.simulate.truth import rocking_fractions

    truth = load_truth(simulated_rotation_fine)
    table = truth.bragg
    expt = truth.experiments[0]
    # zeta as DIALS computes it
    check = flex.reflection_table()
    check["s1"] = table["s1"]
    zeta = check.compute_zeta(expt).as_numpy_array()
    np.testing.assert_allclose(table["zeta"].as_numpy_array(), zeta, atol=1e-12)
    sigma = table["rocking_sigma_deg"].as_numpy_array()
    np.testing.assert_allclose(sigma, 0.1 / np.abs(zeta), rtol=1e-12)
    # the fractions on the images add up to the part of the rocking curve in the scan
    fractions = np.stack([rocking_fractions(truth, table, i) for i in range(truth.n_images)])
    np.testing.assert_allclose(
        fractions.sum(axis=0), table["partiality"].as_numpy_array(), atol=1e-6
    )
    # in angle: image k holds Phi((end - phi_c)/sigma) - Phi((begin - phi_c)/sigma)
    from scipy.stats import norm

    start, width = expt.scan.get_oscillation()
    phi_c = np.rad2deg(table["xyzcal.mm"].as_numpy_array()[:, 2])
    k = 7
    cdf = norm.cdf(start + (k + 1) * width, phi_c, sigma) - norm.cdf(start + k * width, phi_c, sigma)
    np.testing.assert_allclose(fractions[k], np.where(fractions[k] > 0, cdf, 0), atol=1e-12)
    assert np.all(cdf[fractions[k] == 0] < 1e-8)
    # fine slicing: a spot spans several frames, near the rotation axis many more
    span = (fractions > 0.01).sum(axis=0)
    end = start + truth.n_images * width
    inside = (phi_c > start) & (phi_c < end)
    well_inside = (phi_c - 3 * sigma > start) & (phi_c + 3 * sigma < end)
    assert well_inside.sum() >= 10
    assert np.all(span[well_inside] >= 4)
    # a spot recorded whole spans about 4.65 sigma_m / (|zeta| width) frames at > 1 %
    assert np.corrcoef(span[well_inside], 1 / np.abs(zeta[well_inside]))[0, 1] > 0.9
    near_axis = inside & (np.abs(zeta) < 0.5)
    assert near_axis.sum() >= 2
    assert np.median(span[near_axis]) > 1.5 * np.median(span[inside & (np.abs(zeta) > 0.8)])
    # spots centred outside the scan reach in with their tails
    assert np.any((phi_c < start) & (fractions[0] > 0.01))
    # the expected Bragg counts of an image are these fractions as Gaussian spots
    for i in (0, 6):
        panel, x, y, counts = truth.bragg_spots(i)
        distance = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
        np.fill_diagonal(distance, np.inf)
        alone = (x > 6) & (x < 250) & (y > 6) & (y < 250) & (distance.min(axis=1) > 12)
        assert alone.sum() > 5
        image = truth.expected_bragg_counts(i)[0]
        for xx, yy, c in zip(x[alone], y[alone], counts[alone]):
            ix, iy = int(xx), int(yy)
            assert image[iy - 5 : iy + 6, ix - 5 : ix + 6].sum() == pytest.approx(c, rel=1e-3)


def test_rotation_phi_and_subsamples(tmp_path):
    """phi of image i is start + (i + 0.5) * width whatever the first image number;
    phi_subsamples averages D over the oscillation."""
    common = {
        "mode": "rotation", "n_images": 3, "detector.n_fast": 48, "detector.n_slow": 40,
        "rotation.start": 20.0, "rotation.oscillation": 1.0, "noise": False,
        "bragg.enabled": False,
    }
    a = load_truth(simulate_dataset(params_from(**common, **{"output.directory": str(tmp_path / "a")})))
    b = load_truth(simulate_dataset(params_from(
        **common, **{"rotation.first_image": 101, "output.directory": str(tmp_path / "b")})))
    assert b.experiments[0].scan.get_image_range() == (101, 103)
    for i in range(3):
        np.testing.assert_allclose(a.setting_matrix(i), b.setting_matrix(i), atol=1e-14)
        for x, y in zip(a.raw_data(i), b.raw_data(i)):
            np.testing.assert_array_equal(x, y)
    c = load_truth(simulate_dataset(params_from(
        **common, **{"rotation.phi_subsamples": 4, "output.directory": str(tmp_path / "c")})))
    mats = c.setting_matrices(1)
    assert len(mats) == 4
    from scitbx import matrix

    axis = matrix.col(c.experiments[0].goniometer.get_rotation_axis_datum())
    A = np.reshape(c.experiments[0].crystal.get_A(), (3, 3))
    for k, M in enumerate(mats):
        phi = 20.0 + 1.5 + (k + 0.5) / 4 - 0.5
        R = np.reshape(axis.axis_and_angle_as_r3_rotation_matrix(phi, deg=True), (3, 3))
        np.testing.assert_allclose(M, R @ A, atol=1e-14)
    q = c.q_lab[0]
    mean_d = np.mean([c.diffuse(q @ np.linalg.inv(M).T) for M in mats], axis=0)
    expected = mean_d * c.correction_total()[0].ravel() * c.scales[1] * c.flux * c.exposure_time
    np.testing.assert_allclose(c.expected_diffuse_photons(1)[0].ravel(), expected, rtol=1e-10)


# --------------------------------------------------------------------------
# Photon statistics with a gain
# --------------------------------------------------------------------------
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_photons_are_poisson_counts_are_photons_over_gain(tmp_path, gain):
    params = params_from(**{
        "n_images": 2, "random_seed": 3, "gain": gain, "flux": 3e9,
        "detector.n_fast": 120, "detector.n_slow": 100, "detector.distance": 100,
        "output.directory": str(tmp_path / "d"),
    })
    truth = load_truth(simulate_dataset(params))
    seeds = np.random.SeedSequence(params.random_seed).spawn(4)[3].spawn(params.n_images)
    use = truth.pixel_mask()[0]
    chi2 = []
    for i in range(truth.n_images):
        mu = truth.expected_photons(i)[0]
        np.testing.assert_allclose(truth.expected_counts(i)[0], mu / gain)
        # the recipe exactly: photons ~ Poisson(mu), counts = rint(photons / gain)
        photons = np.random.default_rng(seeds[i]).poisson(mu)
        expected = np.rint(photons / gain).astype(np.int32)
        raw = truth.raw_data(i)[0]
        np.testing.assert_array_equal(raw[use], expected[use])
        # so counts * gain scatter like Poisson photons (variance mu, not gain * mu)
        k = use & (mu > 200)
        chi2.append(((raw[k] * gain - mu[k]) ** 2 - gain**2 / 12) / mu[k])
    assert np.mean(np.concatenate(chi2)) == pytest.approx(1.0, abs=0.05)
