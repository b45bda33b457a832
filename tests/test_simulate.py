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
