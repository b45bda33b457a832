"""dials.diffuse_extract against the simulator's exact truth and DIALS' references."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
from pathlib import Path
import pytest

from dials.algorithms.spot_prediction import PixelToMillerIndex

from dials_diffuse.command_line import extract as extract_command
from dials_diffuse.diffuse_files import MANIFEST_NAME, read_image_file
from dials_diffuse.extraction import extract
from dials_diffuse.simulate import load_truth, params_from, simulate_dataset

from diffuse_helpers import assert_same_extraction, extraction_params

VENV_BIN = os.path.join(os.path.dirname(sys.executable))


def load_pixels(directory, still_id):
    arrays, meta = read_image_file(
        os.path.join(directory, f"image_{still_id:06d}.npz"),
        keys=None or (
            "q_vectors", "intensities", "sigmas", "hkl", "original_panel_ids",
            "original_fast_coords", "original_slow_coords", "voxel_indices",
            "voxel_sum_signal", "voxel_sum_factor", "voxel_n_pixels",
        ),
    )
    return arrays, meta


def expected_intensity(truth, i, arrays):
    """scale_i * flux * D at each kept pixel (phi-averaged for rotation images),
    from the truth's expected photons divided by its own correction factors."""
    photons = truth.expected_diffuse_photons(i)
    factors = truth.correction_total()
    panel = arrays["original_panel_ids"].astype(int)
    fast = arrays["original_fast_coords"]
    slow = arrays["original_slow_coords"]
    out = np.empty(panel.size)
    for p in range(len(photons)):
        sel = panel == p
        out[sel] = photons[p][slow[sel], fast[sel]] / (
            factors[p][slow[sel], fast[sel]] * truth.exposure_time
        )
    return out


def binned_ratio(observed, expected, bins, n_bins):
    """sum(I_obs) / sum(I_true) per bin: an unbiased ratio under Poisson noise."""
    num = np.bincount(bins, weights=observed, minlength=n_bins)
    den = np.bincount(bins, weights=expected, minlength=n_bins)
    return num / den


def flatness(truth, directory, n_images):
    """Ratios of recovered to true intensity: overall, per detector region and
    per resolution shell (all images together)."""
    obs, exp, region, qmag = [], [], [], []
    for i in range(n_images):
        arrays, _ = load_pixels(directory, i)
        obs.append(arrays["intensities"].astype(np.float64))
        exp.append(expected_intensity(truth, i, arrays))
        n_slow, n_fast = truth.detector[0].get_image_size()[::-1]
        region.append(
            (arrays["original_panel_ids"].astype(int) * 16)
            + (arrays["original_slow_coords"] * 4 // n_slow) * 4
            + arrays["original_fast_coords"] * 4 // n_fast
        )
        qmag.append(np.linalg.norm(arrays["q_vectors"], axis=1))
    obs, exp, region, qmag = map(np.concatenate, (obs, exp, region, qmag))
    keep = exp > 0
    obs, exp, region, qmag = obs[keep], exp[keep], region[keep], qmag[keep]
    n_regions = int(region.max()) + 1
    by_region = binned_ratio(obs, exp, region, n_regions)
    counts = np.bincount(region, minlength=n_regions)
    by_region = by_region[counts > 2000]
    shells = np.minimum((qmag - qmag.min()) / np.ptp(qmag) * 5, 4.999).astype(int)
    by_shell = binned_ratio(obs, exp, shells, 5)
    return obs.sum() / exp.sum(), by_region, by_shell


@pytest.fixture(scope="module")
def stills_extracted(simulated_stills, tmp_path_factory):
    truth = load_truth(simulated_stills)
    out = tmp_path_factory.mktemp("extract_stills") / "diffuse_extracted"
    params = extraction_params(truth, out, **{"output.masks": True})
    manifest = extract(truth.experiments, params)
    return truth, out, manifest


def test_stills_manifest_and_files(stills_extracted):
    truth, out, manifest = stills_extracted
    assert manifest["n_extracted"] == truth.n_images
    with open(out / MANIFEST_NAME) as fh:
        on_disk = json.load(fh)
    assert on_disk == json.loads(json.dumps(manifest))
    for entry in manifest["images"]:
        counts = entry["pixel_counts"]
        stages = ["total", "static", "resolution", "dynamic", "trusted", "bragg", "intensity"]
        values = [counts[s] for s in stages]
        assert values == sorted(values, reverse=True)
        assert counts["kept"] == counts["intensity"] > 0
        arrays, meta = load_pixels(out, entry["still_id"])
        assert meta["still_id"] == entry["still_id"] == entry["experiment_id"]
        assert arrays["intensities"].dtype == np.float32
        assert arrays["voxel_n_pixels"].sum() == counts["kept"]
        # the voxel sums reproduce the per-pixel intensities
        i_voxel = arrays["voxel_sum_signal"] / arrays["voxel_sum_factor"]
        assert np.all(np.isfinite(i_voxel))
        # masks as DIALS pickles: tuple of flex.bool per panel, True = use
        with open(out / f"total_mask_{entry['still_id']:06d}.pickle", "rb") as fh:
            total = pickle.load(fh)
        assert isinstance(total, tuple) and len(total) == len(truth.detector)
        assert type(total[0]).__name__ == "bool"
    # voxel files much smaller than the images would be without per-pixel data
    assert (out / "image_000000.npz").stat().st_size > 0


def test_stills_hkl_matches_pixel_to_miller_index(stills_extracted):
    truth, out, _ = stills_extracted
    for i in (0, 3):
        arrays, _ = load_pixels(out, i)
        expt = truth.experiments[i]
        reference = PixelToMillerIndex(expt.beam, expt.detector, expt.crystal)
        pick = np.random.default_rng(i).choice(arrays["hkl"].shape[0], 50, replace=False)
        for k in pick:
            h = reference.h(
                int(arrays["original_panel_ids"][k]),
                arrays["original_fast_coords"][k] + 0.5,
                arrays["original_slow_coords"][k] + 0.5,
            )
            # stored as float32: compare to its precision
            assert arrays["hkl"][k] == pytest.approx(h, abs=2e-5 * max(1, np.abs(h).max()))


def test_stills_intensity_flat_across_detector_and_resolution(stills_extracted):
    truth, out, _ = stills_extracted
    overall, by_region, by_shell = flatness(truth, out, truth.n_images)
    assert overall == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(by_region - 1) < 0.01), by_region
    assert np.all(np.abs(by_shell - 1) < 0.01), by_shell


def test_no_bragg_or_bad_pixels_leak(stills_extracted):
    truth, out, _ = stills_extracted
    hot = {tuple(p) for p in truth.hot_pixels.tolist()}
    dead = {tuple(p) for p in truth.dead_pixels.tolist()}
    for i in range(truth.n_images):
        arrays, _ = load_pixels(out, i)
        panel, x, y, _ = truth.bragg_spots(i)
        px = arrays["original_fast_coords"] + 0.5
        py = arrays["original_slow_coords"] + 0.5
        for p, sx, sy in zip(panel, x, y):
            near = (arrays["original_panel_ids"] == p) & (
                (px - sx) ** 2 + (py - sy) ** 2 <= 2.0**2
            )
            assert not near.any(), f"image {i}: kept pixels within 2 px of a spot"
        kept = set(
            zip(
                arrays["original_panel_ids"].tolist(),
                arrays["original_slow_coords"].tolist(),
                arrays["original_fast_coords"].tolist(),
            )
        )
        assert not (kept & hot), "hot pixels kept"
        assert not (kept & dead), "dead pixels kept"


@pytest.mark.parametrize("switch", ["polarization", "solid_angle", "efficiency", "air"])
def test_missing_correction_is_detected(simulated_stills, tmp_path, switch):
    truth = load_truth(simulated_stills)
    params = extraction_params(
        truth, tmp_path / "out", **{f"corrections.{switch}": False,
                                    "masking.dynamic.enable": False}
    )
    extract(truth.experiments, params)
    overall, by_region, by_shell = flatness(truth, tmp_path / "out", truth.n_images)
    deviation = max(abs(overall - 1), np.abs(by_region - 1).max(), np.abs(by_shell - 1).max())
    assert deviation > 0.01, f"switching off {switch} went unnoticed"


def test_rotation_sequence(simulated_rotation, tmp_path):
    truth = load_truth(simulated_rotation)
    params = extraction_params(truth, tmp_path / "out")
    manifest = extract(truth.experiments, params)
    assert manifest["n_extracted"] == truth.n_images
    assert not manifest["is_still"]
    # hkl of rotation images includes R(phi): compare with PixelToMillerIndex
    expt = truth.experiments[0]
    reference = PixelToMillerIndex(
        expt.beam, expt.detector, expt.goniometer, expt.scan, expt.crystal
    )
    for i in (0, 9):
        arrays, meta = load_pixels(tmp_path / "out", i)
        assert meta["image_index"] == i
        for k in np.random.default_rng(i).choice(len(arrays["hkl"]), 30, replace=False):
            h = reference.h(
                0, arrays["original_fast_coords"][k] + 0.5,
                arrays["original_slow_coords"][k] + 0.5, i + 0.5,
            )
            assert arrays["hkl"][k] == pytest.approx(h, abs=2e-5 * max(1, np.abs(h).max()))
    overall, by_region, by_shell = flatness(truth, tmp_path / "out", truth.n_images)
    assert overall == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(by_region - 1) < 0.01), by_region
    assert np.all(np.abs(by_shell - 1) < 0.01), by_shell


def test_dynamic_mask_from_a_sample_of_images(simulated_rotation, tmp_path):
    """masking.dynamic.max_images=3 of 10 images: the simulator's hot and dead
    pixels are all found, as with every image, and only they."""
    from dials_diffuse.extraction import DYNAMIC_MASK_NAME

    truth = load_truth(simulated_rotation)
    found = {}
    for n in (3, 0):
        out = tmp_path / f"max_{n}"
        extract(truth.experiments, extraction_params(
            truth, out, **{"masking.dynamic.max_images": n, "output.save_pixels": "off"}),
            progress=False)
        with open(out / DYNAMIC_MASK_NAME, "rb") as fh:
            mask = [m.as_numpy_array() for m in pickle.load(fh)]
        found[n] = {(p, s, f) for p, m in enumerate(mask) for s, f in zip(*np.nonzero(~m))}
    bad = {tuple(p) for p in truth.hot_pixels.tolist()} | {
        tuple(p) for p in truth.dead_pixels.tolist()}
    assert found[3] == found[0]
    assert bad <= found[3] and len(found[3]) <= len(bad) + 2


def test_multipanel(simulated_multipanel, tmp_path):
    truth = load_truth(simulated_multipanel)
    # the full-CBF images carry no sensor model or exposure time: use the truth
    params = extraction_params(
        truth, tmp_path / "out", **{"corrections.exposure_time": truth.exposure_time}
    )
    manifest = extract(truth.experiments, params)
    assert manifest["n_extracted"] == truth.n_images
    arrays, _ = load_pixels(tmp_path / "out", 0)
    assert set(np.unique(arrays["original_panel_ids"])) == set(range(len(truth.detector)))
    overall, _, by_shell = flatness(truth, tmp_path / "out", truth.n_images)
    assert overall == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(by_shell - 1) < 0.02), by_shell


def test_correction_sample_matches_every_pixel_factors(simulated_multipanel, tmp_path):
    """The correction sample's separate factors, kept by the context on a
    coarse grid of pixels only, are the factors api.extract_image computes
    for every kept pixel (the same panel, slow, fast) on every panel; the
    sample spreads over the panels and lies on the grid."""
    from dials_diffuse import api
    from dials_diffuse.extraction.context import CORRECTION_PARTS_STEP

    truth = load_truth(simulated_multipanel)
    params = extraction_params(
        truth, tmp_path / "out", **{"corrections.exposure_time": truth.exposure_time})
    extract(truth.experiments, params, progress=False)
    with np.load(tmp_path / "out" / "image_000000.npz") as npz:
        sample = {k: npz[k] for k in npz.files if k.startswith("sample_")}
    assert sample["sample_panel"].size == 200
    assert len(np.unique(sample["sample_panel"])) > len(truth.detector) // 2
    assert np.all(sample["sample_slow"] % CORRECTION_PARTS_STEP == 0)
    assert np.all(sample["sample_fast"] % CORRECTION_PARTS_STEP == 0)
    table = api.extract_image(truth.experiments[0], 0, params)
    fast, slow, _ = (np.asarray(c) for c in table["xyzobs.px"].parts())
    panel = np.asarray(table["panel"]).astype(np.int64)
    row = {(p, int(y), int(x)): i for i, (p, y, x) in enumerate(zip(panel, slow, fast))}
    rows = [row[(p, y, x)] for p, y, x in zip(
        sample["sample_panel"], sample["sample_slow"], sample["sample_fast"])]
    for name in ("polarization", "solid_angle", "efficiency", "air"):
        every_pixel = np.asarray(table[f"correction.{name}"])[rows]
        assert np.allclose(sample[f"sample_{name}"], every_pixel, rtol=1e-6, atol=0), name


def test_gain_and_exposure(tmp_path):
    directory = simulate_dataset(
        params_from(
            **{
                "mode": "stills", "n_images": 2, "random_seed": 5,
                "detector.format": "generic", "detector.n_fast": 200,
                "detector.n_slow": 200, "detector.distance": 100,
                "gain": 2.5, "exposure_time": 0.2, "output.directory": str(tmp_path / "data"),
            }
        )
    )
    truth = load_truth(directory)
    params = extraction_params(truth, tmp_path / "out", **{"corrections.exposure_time": 0.2})
    extract(truth.experiments, params)
    overall, _, by_shell = flatness(truth, tmp_path / "out", 2)
    assert overall == pytest.approx(1.0, abs=0.015)
    # sigma: Poisson on the raw counts, propagated through gain and factors
    with np.load(tmp_path / "out" / "image_000000.npz") as npz:
        s = {k: npz[k] for k in npz.files if k.startswith("sample_")}
    factor = (
        s["sample_polarization"] * s["sample_solid_angle"] * s["sample_efficiency"]
        * s["sample_air"] * s["sample_exposure_time"]
    )
    assert np.allclose(s["sample_gain"], 2.5)
    assert np.allclose(
        s["sample_intensity"],
        (s["sample_raw_counts"] * 2.5 - s["sample_background"]) / factor,
    )
    # photons (gain x counts), not counts, are Poisson: var = gain x counts
    assert np.allclose(s["sample_sigma"], np.sqrt(2.5 * s["sample_raw_counts"]) / factor)

    # without corrections.gain the detector model's gain is used: dxtbx's
    # Panel.get_gain() is counts per photon, the inverse
    for panel in truth.experiments[0].detector:
        panel.set_gain(1.0 / 2.5)
    params = extraction_params(truth, tmp_path / "from_model", **{"corrections.exposure_time": 0.2})
    params.corrections.gain = None
    extract(truth.experiments, params)
    with np.load(tmp_path / "from_model" / "image_000000.npz") as npz:
        assert np.allclose(npz["sample_gain"], 2.5)
        assert np.allclose(npz["sample_sigma"], s["sample_sigma"])


def test_images_without_crystal_are_reported(simulated_stills, tmp_path):
    truth = load_truth(simulated_stills)
    from dxtbx.model.experiment_list import ExperimentList

    models = ExperimentList([truth.experiments[i] for i in (0, 2, 3)])
    params = extraction_params(truth, tmp_path / "out")
    manifest = extract(models, params, images=truth.experiments)
    status = {os.path.basename(e["image_path"]): e["status"] for e in manifest["images"]}
    assert list(status.values()).count("extracted") == 3
    skipped = [e for e in manifest["images"] if e["status"] == "skipped"]
    assert len(skipped) == 3
    assert all("not indexed" in e["reason"] for e in skipped)


def test_unreadable_image_in_batch_is_skipped(simulated_stills, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(simulated_stills, copy)
    truth = load_truth(copy)
    broken = truth.image_path(1)
    with open(broken, "r+b") as fh:
        fh.truncate(2000)
    params = extraction_params(truth, tmp_path / "out", **{"masking.dynamic.enable": False})
    manifest = extract(truth.experiments, params)
    entries = {e["image_path"]: e for e in manifest["images"]}
    bad = [e for e in manifest["images"] if e["status"] == "skipped"]
    assert len(bad) == 1 and os.path.basename(bad[0]["image_path"]) == os.path.basename(str(broken))
    assert manifest["n_extracted"] == truth.n_images - 1
    assert not (tmp_path / "out" / "image_000001.npz").exists()
    assert len(entries) == truth.n_images


@pytest.mark.parametrize("nproc", [1, 2])
def test_masks_of_first_extracted_image(simulated_stills, tmp_path, nproc):
    """output.mask_images=first when the first image cannot be read: the
    first image that was extracted gets the masks (the one the diagnostics
    overlay), and its file is the same as without masks."""
    copy = tmp_path / "data"
    shutil.copytree(simulated_stills, copy)
    truth = load_truth(copy)
    with open(truth.image_path(0), "r+b") as fh:
        fh.truncate(2000)
    params = extraction_params(truth, tmp_path / "out", **{
        "masking.dynamic.enable": False, "output.masks": True,
        "output.mask_images": "first", "mp.nproc": nproc})
    manifest = extract(truth.experiments, params)
    first = next(e for e in manifest["images"] if e["status"] == "extracted")
    assert manifest["images"][0]["status"] == "skipped" and first["still_id"] == 1
    written = sorted(p.name for p in (tmp_path / "out").glob("*_mask_*.pickle"))
    assert written == [f"{kind}_mask_000001.pickle" for kind in ("bragg", "pixel", "total")]
    params.output.masks = False
    params.output.directory = str(tmp_path / "nomasks")
    extract(truth.experiments, params)
    with np.load(tmp_path / "out" / first["file"]) as a, \
            np.load(tmp_path / "nomasks" / first["file"]) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key


def run_command(args, cwd):
    return subprocess.run(
        [os.path.join(VENV_BIN, "dials.diffuse_extract"), *args],
        cwd=cwd, capture_output=True, text=True,
    )


def test_command_line(simulated_stills, tmp_path):
    result = run_command(
        [str(simulated_stills / "truth.expt"), "filter.pixel_step=2",
         "output.save_pixels=off", "output.directory=ex"], tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ex" / MANIFEST_NAME).exists()
    assert (tmp_path / "dials.diffuse_extract.log").exists()
    arrays, meta = read_image_file(str(tmp_path / "ex" / "image_000000.npz"), keys=None or ("voxel_indices",))
    assert meta["pixel_step"] == 2
    with np.load(tmp_path / "ex" / "image_000000.npz") as npz:
        assert "intensities" not in npz.files

    help_text = run_command(["-h"], tmp_path)
    assert help_text.returncode == 0 and "Examples" in help_text.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.expt"], "file not found: missing.expt"),
        (["{expt}", "filter.pixel_step=0"], "filter.pixel_step=0"),
        (["{expt}", "filter.d_min=3", "filter.d_max=2"], "filter.d_min=3.0 must be smaller"),
        (["{expt}", "corrections.gain=-1"], "corrections.gain=-1.0"),
        (["{expt}", "grid.ndiv_h=0"], "grid.ndiv_h=0"),
        (["{expt}", "no_such.parameter=1"], "no_such.parameter"),
        (["{expt}", "corrections.background.map={bad_bg}"], "has shape"),
        (["{expt}", "corrections.background.map={nan_bg}"], "NaN"),
        (["{imported}"], "has no crystal"),
        (["{expt}", "filter.d_min=1000", "filter.d_max=2000"], "no image could be extracted"),
    ],
)
def test_bad_input(simulated_stills, tmp_path, args, message):
    np.save(tmp_path / "bad_bg.npy", np.zeros((3, 3)))
    nan_bg = np.zeros((256, 256))
    nan_bg[5, 5] = np.nan
    np.save(tmp_path / "nan_bg.npy", nan_bg)
    from dxtbx.model.experiment_list import ExperimentListFactory

    imported = ExperimentListFactory.from_json_file(str(simulated_stills / "truth.expt"))
    for e in imported:
        e.crystal = None
    imported.as_file(str(tmp_path / "imported.expt"))
    args = [
        a.format(expt=simulated_stills / "truth.expt", bad_bg=tmp_path / "bad_bg.npy",
                 nan_bg=tmp_path / "nan_bg.npy", imported=tmp_path / "imported.expt")
        for a in args
    ]
    result = run_command(args + ["output.directory=out"], tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Sorry:"), result.stderr
    assert message in lines[-1]
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    assert not (out / MANIFEST_NAME).exists()
    assert not any(out.glob("image_*.npz")) if out.exists() else True


THAUMATIN = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thaumatin_grid_stills"
)


@pytest.mark.skipif(not THAUMATIN.is_dir(), reason=f"real data not found in {THAUMATIN}")
def test_real_thaumatin_still(tmp_path):
    """Index one real PILATUS3 6M still, extract it: found spots are all masked,
    q and hkl are consistent, the corrections are in their physical ranges."""
    from dials_diffuse import processing

    experiments = processing.import_images([str(THAUMATIN / "thau_3_2_0001.cbf.bz2")])
    strong = processing.find_spots(experiments)
    indexed = processing.index_stills(
        experiments, strong, known_symmetry=("P41212", (57.9, 57.9, 150.2, 90, 90, 90))
    )
    assert indexed.n_indexed_images == 1
    params = extract_command.phil_scope.fetch().extract()
    params.output.directory = str(tmp_path / "out")
    params.filter.pixel_step = 2
    params.masking.dynamic.enable = False
    params.grid.ndiv_l = 2
    manifest = extract(indexed.experiments, params)
    entry = manifest["images"][0]
    assert entry["status"] == "extracted"
    counts = entry["pixel_counts"]
    assert 0.6 * counts["total"] < counts["kept"] < counts["trusted"]
    assert counts["bragg"] < counts["trusted"]  # the Bragg mask removed pixels
    with np.load(tmp_path / "out" / "image_000000.npz") as npz:
        a = {k: npz[k] for k in npz.files}
    # the strong spots' centroids lie in masked pixels: all but a few that the
    # crystal model does not predict (e.g. from a second lattice or a zinger)
    xyz = strong["xyzobs.px.value"].as_numpy_array()
    kept = set(zip(a["original_fast_coords"].tolist(), a["original_slow_coords"].tolist()))
    leaked = [
        any((int(x) + dx, int(y) + dy) in kept for dx in (-1, 0, 1) for dy in (-1, 0, 1))
        for x, y, _ in xyz
    ]
    assert sum(leaked) <= 0.03 * len(xyz), f"{sum(leaked)} of {len(xyz)} spots not masked"
    # the guide's option B masks the found spots' shoeboxes: none leak
    params.masking.bragg.method = "spots"
    params.output.directory = str(tmp_path / "spots")
    extract(indexed.experiments, params, reflections=strong)
    with np.load(tmp_path / "spots" / "image_000000.npz") as npz:
        kept_b = set(zip(npz["original_fast_coords"].tolist(), npz["original_slow_coords"].tolist()))
    assert not any((int(round(x - 0.5)), int(round(y - 0.5))) in kept_b for x, y, _ in xyz)
    # |q| within the detector's resolution range; hkl = A^-1 q
    qmag = np.linalg.norm(a["q_vectors"], axis=1)
    expt = indexed.experiments[0]
    d_min = expt.detector.get_max_resolution(expt.beam.get_s0())
    assert qmag.max() <= 1 / d_min * 1.0001
    A = np.array(expt.crystal.get_A()).reshape(3, 3)
    assert np.allclose(a["q_vectors"] @ np.linalg.inv(A).T, a["hkl"], atol=1e-3)
    for name, low, high in (("polarization", 0.5, 1.0), ("efficiency", 0.3, 1.0),
                            ("air", 0.85, 1.0)):
        values = a[f"sample_{name}"]
        assert np.all((values > low) & (values <= high)), name
    # the header exposure time (not 1 s) was used
    assert 0 < a["sample_exposure_time"][0] < 1


def test_scan_varying_rotation(tmp_path):
    """A scan-varying crystal (U drifting over the scan): each image uses A at
    its own scan point, so the intensities stay flat against the truth."""
    directory = simulate_dataset(
        params_from(
            **{
                "mode": "rotation", "n_images": 6, "random_seed": 8,
                "rotation.oscillation": 0.5, "rotation.scan_varying": True,
                "rotation.drift_deg": 2.0, "detector.format": "generic",
                "detector.n_fast": 200, "detector.n_slow": 200, "detector.distance": 100,
                "output.directory": str(tmp_path / "data"),
            }
        )
    )
    truth = load_truth(directory)
    assert truth.experiments[0].crystal.num_scan_points == 7
    extract(truth.experiments, extraction_params(truth, tmp_path / "out"))
    overall, by_region, by_shell = flatness(truth, tmp_path / "out", truth.n_images)
    assert overall == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(by_shell - 1) < 0.015), by_shell


def test_pixel_arrays_sampled_by_default(simulated_stills, tmp_path):
    """output.save_pixels=sample (the default) keeps the arrays of the kept
    pixels on every s-th row and column, s from pixel_sample_size: exactly
    the save_pixels=all arrays there; a 256 x 256 detector keeps them all."""
    truth = load_truth(simulated_stills)
    default = extraction_params(truth, tmp_path / "default")
    assert default.output.save_pixels == "sample"
    runs = {}
    for name, overrides in (("all", {"output.save_pixels": "all"}),
                            ("sample", {"output.pixel_sample_size": 5000}),
                            ("default", {}),
                            ("off", {"output.save_pixels": "off"})):
        extract(truth.experiments, extraction_params(truth, tmp_path / name, **overrides),
                progress=False)
        path = tmp_path / name / "image_000000.npz"
        with np.load(path) as npz:
            runs[name] = ({k: npz[k] for k in npz.files if k != "metadata_json"},
                          json.loads(str(npz["metadata_json"])))
    every, every_meta = runs["all"]
    sampled, meta = runs["sample"]
    assert every_meta["pixel_sample_step"] == 1 and runs["default"][1]["pixel_sample_step"] == 1
    assert meta["pixel_sample_step"] == 4  # ceil(sqrt(65536 / 5000))
    on_grid = (every["original_slow_coords"] % 4 == 0) & (every["original_fast_coords"] % 4 == 0)
    assert 0 < sampled["intensities"].size == on_grid.sum() < every["intensities"].size / 10
    for key in ("intensities", "q_vectors", "original_fast_coords"):
        assert np.array_equal(sampled[key], every[key][on_grid])
    assert np.array_equal(runs["default"][0]["intensities"], every["intensities"])
    # the voxel sums do not depend on it
    for name in ("sample", "off"):
        assert np.array_equal(runs[name][0]["voxel_sum_signal"], every["voxel_sum_signal"])
    assert "intensities" not in runs["off"][0] and runs["off"][1]["pixel_sample_step"] == 0


@pytest.mark.parametrize("dataset,overrides", [
    # background map, an intensity filter, every pixel's arrays
    ("simulated_stills", {"filter.min_intensity": 0.5, "output.save_pixels": "all"}),
    ("simulated_multipanel", {"filter.max_intensity": 1e4}),
    ("simulated_rotation", {"corrections.background.map": None,
                            "corrections.background.constant": 1.5}),
])
def test_compiled_kernel_equals_numpy(dataset, overrides, request, tmp_path):
    """kernel=numba (one compiled pass per panel, hash table of voxels) and
    kernel=numpy (the row-block numpy path) extract the same voxels."""
    from dials_diffuse.extraction import kernels

    if not kernels.available():
        pytest.skip("numba is not available")
    truth = load_truth(request.getfixturevalue(dataset))
    if dataset == "simulated_multipanel":
        overrides = {**overrides, "corrections.exposure_time": truth.exposure_time}
    for kernel in ("numba", "numpy"):
        extract(truth.experiments, extraction_params(truth, tmp_path / kernel, kernel=kernel,
                                                     **overrides))
    assert_same_extraction(tmp_path / "numba", tmp_path / "numpy")


def test_compiled_table_grows(simulated_stills, tmp_path):
    """An image with more voxels than the hash table's first capacity (fine
    voxels: ndiv 16) is extracted as the numpy path extracts it."""
    from dials_diffuse.extraction import kernels

    if not kernels.available():
        pytest.skip("numba is not available")
    truth = load_truth(simulated_stills)
    images = truth.experiments[:1]
    for kernel in ("numba", "numpy"):
        params = extraction_params(truth, tmp_path / kernel, kernel=kernel,
                                   **{"masking.dynamic.enable": False})
        params.grid.ndiv_h = params.grid.ndiv_k = params.grid.ndiv_l = 16
        kernels._TABLES.clear()
        extract(images, params)
    n_voxels = json.loads((tmp_path / "numba" / MANIFEST_NAME).read_text())["images"][0]["n_voxels"]
    assert n_voxels > 2**15  # more than half the first capacity: it grew
    assert_same_extraction(tmp_path / "numba", tmp_path / "numpy")


def test_compiled_local_level_equals_scipy():
    """The dynamic mask's local level (median of 5 along rows, then along
    columns, edges repeated) compiled equals scipy's median filters, with
    ties, hot pixels and panels narrower than the window."""
    from dials_diffuse import masks
    from dials_diffuse.extraction import kernels

    if not kernels.available():
        pytest.skip("numba is not available")
    rng = np.random.default_rng(3)
    images = [rng.poisson(3.0, (60, 75)).astype(float), rng.random((1, 1)),
              rng.integers(0, 3, (2, 9)).astype(float), rng.random((7, 4))]
    images[0][10:14, 20] = 5e4
    for image in images:
        assert np.array_equal(kernels.local_level_median(image),
                              masks.local_level_median(image)), image.shape


def test_compiled_key_widths_agree():
    """The kernel's int32 and int64 key buffers give the same voxels and sums
    (int64 is used when an image's key box reaches 2^31)."""
    from dials_diffuse.extraction import kernels

    if not kernels.available():
        pytest.skip("numba is not available")
    rng = np.random.default_rng(9)
    n = 20000
    q_t = np.ascontiguousarray(np.sort(rng.uniform(-0.5, 0.5, (3, n)), axis=1), np.float32)
    counts = rng.poisson(20, n).astype(np.int32)
    usable, bragg = rng.random(n) > 0.05, rng.random(n) > 0.05
    factor = rng.uniform(0.5, 1, n).astype(np.float32)
    to_grid = (np.eye(3) * 40).astype(np.float32)
    lower = np.full(3, -21, np.float32)
    strides = np.array([43 * 43, 43, 1])
    results = []
    for key_dtype in (np.int32, np.int64):
        table = kernels.VoxelTable(6, capacity=2**8)  # grows too
        layout, counted = table.add_panel(q_t, counts, usable, bragg, (-1, 1e6), factor, None,
                                          2.0, to_grid, lower, strides, key_dtype)
        results.append((layout, counted, *table.voxels()))
    (layout_a, counted_a, keys_a, sums_a), (layout_b, counted_b, keys_b, sums_b) = results
    assert counted_a == counted_b
    assert all(np.array_equal(layout_a[k], layout_b[k]) for k in layout_a)
    assert np.array_equal(keys_a, keys_b) and np.array_equal(sums_a, sums_b)
    assert sums_a[:, 0].sum() == counted_a[1]  # every kept pixel in one voxel


def test_compiled_dynamic_sums_equal_numpy():
    """The dynamic pass's per-pixel sums (counts, hot, valid) compiled equal
    the numpy ones, for integer and float images."""
    from dials_diffuse import masks
    from dials_diffuse.extraction import kernels
    from dxtbx.model.detector import DetectorFactory

    if not kernels.available():
        pytest.skip("numba is not available")
    detector = DetectorFactory.make_detector(
        "PAD", (1, 0, 0), (0, -1, 0), (-10, 10, -100), (0.1, 0.1), (70, 90), (-1, 5000))
    rng = np.random.default_rng(4)
    for dtype in (np.int32, np.float64):
        accumulators = [masks.DynamicMaskAccumulator(detector, hot_threshold=300) for _ in range(2)]
        for _ in range(3):
            image = rng.poisson(100, (90, 70)).astype(dtype)
            image[rng.random(image.shape) < 0.01] = -2
            image[rng.random(image.shape) < 0.01] = 7000
            accumulators[0].add([image])
            accumulators[1].add([image], kernels.add_dynamic_panel)
        numpy_sums, compiled_sums = ((a.sum_counts, a.n_hot, a.n_valid) for a in accumulators)
        for a, b in zip(numpy_sums, compiled_sums):
            assert a[0].dtype == b[0].dtype and np.array_equal(a[0], b[0])


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_compiled_dynamic_masks_equal_numpy(dtype):
    """The dynamic mask's decision compiled (mean, hot and dead in one pass)
    gives numpy's masks: hot by count and by ratio, dead pixels, pixels
    never valid, and values exactly at each threshold."""
    from dials_diffuse import masks
    from dials_diffuse.extraction import kernels
    from dxtbx.model.detector import DetectorFactory

    if not kernels.available():
        pytest.skip("numba is not available")
    detector = DetectorFactory.make_detector(
        "PAD", (1, 0, 0), (0, -1, 0), (-10, 10, -100), (0.1, 0.1), (70, 90), (-1, 5000))
    rng = np.random.default_rng(5)
    acc = masks.DynamicMaskAccumulator(detector, hot_fraction=0.5, hot_ratio=20.0,
                                       dead_min_expected_counts=20.0)
    acc.n_images = 10
    n_valid = rng.integers(0, 11, (90, 70)).astype(np.int32)
    n_valid[:, :20] = 10  # a flat region: exact thresholds below
    counts = rng.poisson(5.0 * n_valid).astype(dtype)
    counts[:, :20] = 20  # mean 2, local level 2: dead needs 2 * 10 >= 20 (exactly)
    counts[rng.random(counts.shape) < 0.03] = 0  # dead candidates
    counts[40, 10] = 10 * (20 * 2 + 10)  # mean exactly hot_ratio * local + 10: not hot
    counts[41, 10] = counts[40, 10] + 1  # just above: hot
    n_hot = np.zeros((90, 70), np.int32)
    n_hot[rng.random(n_hot.shape) < 0.02] = 5  # exactly hot_fraction * n_images: hot
    n_hot[rng.random(n_hot.shape) < 0.02] = 4
    acc.sum_counts, acc.n_valid, acc.n_hot = [counts], [n_valid], [n_hot]
    for local in (None, kernels.local_level_median):
        expected = acc.masks(local)[0]
        compiled = acc.masks(local, compiled=kernels)[0]
        assert compiled.dtype == bool and np.array_equal(compiled, expected)
    assert not expected[41, 10] and expected[40, 10]
    assert (~expected).sum() > 100 and expected.sum() > 5000


@pytest.mark.parametrize("first_unreadable", [False, True])
@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_dynamic_pass_the_same_for_any_sharing(dtype, first_unreadable, monkeypatch):
    """The dynamic pass over images shared by 1-3 processes (with and
    without the parent's own work) gives one set of masks, run after run:
    integer sums are exact in any order; float images go in fixed shares.
    Every image is read once in all (the first is read before the fork to
    learn its dtype, and not again), also when the first one cannot be
    read."""
    import multiprocessing
    import types

    from dials_diffuse.extraction import dynamic
    from dials_diffuse.extraction.tasks import ImageError
    from dxtbx.model.detector import DetectorFactory

    detector = DetectorFactory.make_detector(
        "PAD", (1, 0, 0), (0, -1, 0), (-10, 10, -100), (0.1, 0.1), (60, 50), (-1, 5000))
    tasks = [types.SimpleNamespace(experiment=types.SimpleNamespace(detector=detector), index=i)
             for i in range(13)]
    reads = multiprocessing.get_context("fork").Array("l", len(tasks))

    def read_image(task):
        with reads.get_lock():
            reads[task.index] += 1
        if first_unreadable and task.index == 0:
            raise ImageError("unreadable")
        rng = np.random.default_rng(task.index)
        image = (rng.poisson(40.0, (50, 60)) * (1 + 0.1 * rng.random((50, 60)))).astype(dtype)
        image[rng.random(image.shape) < 0.01] = 0
        image[rng.random(image.shape) < 0.005] = 4000
        image[5, 7] = 4000  # hot in every image
        image[10, 10:12] = 0  # dead
        return [image]

    monkeypatch.setattr(dynamic, "read_image", read_image)
    params = extract_command.phil_scope.fetch().extract()
    params.masking.dynamic.max_images = 0
    masks = []
    for nproc, waiting in ((1, None), (2, None), (3, None), (3, lambda: None), (2, lambda: None),
                           (3, None)):
        params.mp.nproc = nproc
        reads[:] = [0] * len(tasks)
        masks.append(dynamic.dynamic_mask(tasks, params, while_waiting=waiting)[0])
        # the unreadable first image is tried twice with processes: for its
        # dtype and by the process whose turn it is
        expected = [1] * len(tasks)
        if first_unreadable and nproc > 1:
            expected[0] = 2
        assert list(reads) == expected, (nproc, list(reads))
    assert all(np.array_equal(m, masks[0]) for m in masks)
    assert 0 < (~masks[0]).sum() < masks[0].size


def test_compiled_kernel_with_an_unbounded_trusted_range():
    """A trusted range beyond the image's integer type (1e300) is compared
    as dxtbx's rule says: every count is below it."""
    from dials_diffuse.extraction import kernels

    if not kernels.available():
        pytest.skip("numba is not available")
    n = 50
    counts = np.arange(n, dtype=np.int32) * 1000
    table = kernels.VoxelTable(6, capacity=2**8)
    _, (n_trusted, n_kept) = table.add_panel(
        np.zeros((3, n), np.float32), counts, np.ones(n, bool), np.ones(n, bool), (-1, 1e300),
        np.ones(n, np.float32), None, 1.0, np.eye(3, dtype=np.float32),
        np.zeros(3, np.float32), np.array([1, 1, 1]))
    assert n_trusted == n_kept == n


def test_contexts_share_the_detector_geometry(simulated_stills, tmp_path):
    """Stills with a beam each (as refined real stills have): from a
    detector's second context on its beam-independent geometry is kept and
    reused, and every context equals one built from nothing."""
    from dxtbx.model import BeamFactory

    from dials_diffuse.extraction import context as extraction_context
    from dials_diffuse.extraction.tasks import plan_tasks

    truth = load_truth(simulated_stills)
    experiments = truth.experiments
    for k, experiment in enumerate(experiments):  # a beam each, as after refinement
        beam = BeamFactory.from_dict(experiment.beam.to_dict())
        beam.set_wavelength(beam.get_wavelength() * (1 + 1e-4 * k))
        experiment.beam = beam
    params = extraction_params(truth, tmp_path / "unused")
    tasks, _ = plan_tasks(experiments)
    extraction_context.clear_caches()
    shared = [extraction_context.context_for(task, params) for task in tasks[:3]]
    assert extraction_context._GEOMETRIES  # kept from the second context on
    for task, got in zip(tasks[:3], shared):
        extraction_context.clear_caches()
        fresh = extraction_context.context_for(task, params)
        for a, b in zip(got.panels, fresh.panels):
            assert np.array_equal(a.q_t, b.q_t) and np.array_equal(a.factor, b.factor)
            assert np.array_equal(a.selected, b.selected)
            assert all(np.array_equal(a.parts[k], b.parts[k]) for k in a.parts)
        assert got.q_max == fresh.q_max
    # every pixel's factors (api.extract_image's grid) from the kept geometry:
    # the same factors, and on the coarse grid the same separate ones
    extraction_context.clear_caches()
    shared = [extraction_context.context_for(task, params) for task in tasks[:3]]
    every = extraction_context.context_for(tasks[2], params, parts_step=1)
    assert extraction_context._GEOMETRIES
    for a, b in zip(shared[2].panels, every.panels):
        assert b.parts_step == 1 and np.array_equal(a.factor, b.factor)
        grid = np.arange(a.selected.size).reshape(a.shape)[::a.parts_step, ::a.parts_step].ravel()
        assert all(np.array_equal(a.parts[k], b.parts[k][grid]) for k in a.parts)
    extraction_context.clear_caches()


@pytest.mark.parametrize("overrides", [
    {},
    {"filter.d_min": 2.5, "filter.d_max": 20.0, "corrections.polarization_fraction": 0.9},
    {"corrections.polarization": False, "corrections.efficiency": False, "corrections.air": False},
])
def test_compiled_context_equals_numpy(overrides, monkeypatch):
    """The context's beam-dependent pass compiled (polarization, q, |q|,
    selection, factor product) equals the numpy formulas: a real PILATUS3 6M
    still (parallax-corrected panel, its own beam) at every 4th pixel, with
    resolution limits, another polarization fraction, corrections off; a
    second context of the same detector reuses the kept geometry and its
    efficiency and air factors."""
    from dxtbx.model import BeamFactory

    from dials_diffuse import compiled, processing
    from dials_diffuse import masks as diffuse_masks
    from dials_diffuse.extraction import context as extraction_context

    if compiled.lazy_jit("context.beam_block", extraction_context._define_beam_block) is None:
        pytest.skip("numba is not available")
    experiment = processing.import_images([str(THAUMATIN / "thau_3_2_0001.cbf.bz2")])[0]
    params = extract_command.phil_scope.fetch().extract()
    params.filter.pixel_step = 4
    for key, value in overrides.items():
        scope, name = key.split(".")
        setattr(getattr(params, scope), name, value)
    static = diffuse_masks.static_mask(experiment.imageset, params.masking, params.masking.beamstop)
    tilted = BeamFactory.from_dict(experiment.beam.to_dict())
    tilted.set_direction((0.001, -0.002, 1.0))  # a second still's refined beam
    contexts = {}
    for kind in ("compiled", "numpy"):
        if kind == "numpy":
            compiled.disable("context.beam_block", monkeypatch)
        geometries = []
        first = extraction_context.detector_context(experiment, experiment.imageset, params,
                                                    static, geometries)
        experiment.beam, beam = tilted, experiment.beam
        second = extraction_context.detector_context(experiment, experiment.imageset, params,
                                                     static, geometries)
        experiment.beam = beam
        contexts[kind] = (first, second)
    for got, expected in zip(contexts["compiled"], contexts["numpy"]):
        assert got.q_max == pytest.approx(expected.q_max, rel=1e-12)
        for a, b in zip(got.panels, expected.panels):
            assert np.array_equal(a.selected, b.selected)
            assert np.array_equal(a.q_t, b.q_t)
            assert np.allclose(a.factor, b.factor, rtol=1e-6, atol=0)
            assert a.n_selected == b.n_selected and a.n_selected > 100000
            for k in a.parts:
                assert np.allclose(a.parts[k], b.parts[k], rtol=1e-12, atol=0), k
    # the tilted beam moved q: the second context is not the first again
    assert not np.array_equal(contexts["compiled"][0].panels[0].q_t,
                              contexts["compiled"][1].panels[0].q_t)


def test_modified_parameters_as_dials_diff_phil(simulated_rotation, tmp_path):
    """The log's "modified parameters" are DIALS' diff_phil text, made
    without reading the experiment and reflection files again."""
    from dials.util.options import ArgumentParser

    from dials_diffuse.command_util import modified_parameters

    preset = tmp_path / "preset.phil"
    preset.write_text("grid.ndiv_l = 2\nmasking { bragg { n_sigma = 4 } }\n")
    for args in (
        [str(simulated_rotation / "truth.expt"), str(simulated_rotation / "bragg.refl"),
         str(preset), "mp.nproc=2", "filter.d_min=2.5"],
        [str(simulated_rotation / "truth.expt")],
        [str(simulated_rotation / "truth.expt"), str(simulated_rotation / "truth.expt"),
         "output.directory=elsewhere"],
    ):
        parser = ArgumentParser(phil=extract_command.phil_scope, read_experiments=True,
                                read_reflections=True, check_format=False)
        parser.parse_args(args=args, show_diff_phil=False, return_unhandled=True)
        assert modified_parameters(parser) == parser.diff_phil.as_str()
    assert "experiments = " in modified_parameters(parser)


def test_context_of_a_nearly_equal_beam_is_its_own(simulated_stills, tmp_path):
    """Two stills whose beams dxtbx takes for equal (within 1e-6) but which
    differ: each image gets the context of its own beam, whichever was made
    first (else the result would depend on which images a process had
    extracted before)."""
    from dxtbx.model import BeamFactory

    from dials_diffuse.extraction import context as extraction_context
    from dials_diffuse.extraction.tasks import plan_tasks

    truth = load_truth(simulated_stills)
    experiments = truth.experiments
    beam = BeamFactory.from_dict(experiments[1].beam.to_dict())
    beam.set_wavelength(beam.get_wavelength() * (1 + 1e-8))
    assert beam == experiments[0].beam and beam.get_s0() != experiments[0].beam.get_s0()
    experiments[1].beam = beam
    params = extraction_params(truth, tmp_path / "unused")
    tasks, _ = plan_tasks(experiments)
    contexts = {}
    for order in ((0, 1), (1, 0)):
        extraction_context.clear_caches()
        for i in order:
            contexts[order, i] = extraction_context.context_for(tasks[i], params)
    extraction_context.clear_caches()
    for i in (0, 1):
        a, b = contexts[(0, 1), i], contexts[(1, 0), i]
        assert all(np.array_equal(p.q_t, q.q_t) for p, q in zip(a.panels, b.panels))
    assert contexts[(0, 1), 0] is not contexts[(0, 1), 1]


def test_mask_pickle_is_flex_bools_own(tmp_path):
    """io.write_mask_pickle writes, from numpy, the bytes of pickling the
    masks as flex.bool (masks.to_flex), which DIALS reads: empty, one-pixel,
    count bytes of every length (255, 256, 65536, a Pilatus 6M panel)."""
    from dials_diffuse import io, masks

    rng = np.random.default_rng(4)
    shapes = [(0,), (1,), (3, 85), (1, 256), (256, 256), (2527, 2463)]
    panel_masks = [rng.random(shape) > 0.3 for shape in shapes]
    path = tmp_path / "mask.pickle"
    io.write_mask_pickle(str(path), panel_masks)
    expected = pickle.dumps(masks.to_flex(panel_masks), protocol=pickle.HIGHEST_PROTOCOL)
    assert path.read_bytes() == expected
    with open(path, "rb") as fh:
        loaded = masks.from_flex(pickle.load(fh))
    for got, want in zip(loaded, panel_masks):
        assert got.shape == want.shape and np.array_equal(got, want)
