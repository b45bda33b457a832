"""dials.diffuse_check on simulated data run through the real pipeline
(dials.diffuse_extract, dials.diffuse_merge): every output exists, summaries
carry numbers recomputed here from the inputs, central sections show the
simulated features at the right hkl, and bad or missing inputs behave."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dials.util import Sorry

from dials_diffuse import diffuse_files, merged_files

EXTRACTION_FILES = [
    "diffuse_pixel_overlay.png",
    "intensity_correction_summary.txt",
    "q_projection_qx_qy.png",
    "q_projection_qx_qz.png",
    "q_projection_qy_qz.png",
    "radial_q_distribution.png",
    "intensity_histogram.png",
    "intensity_heatmap_panel_0.png",
    "sigma_vs_intensity.png",
    "isigi_histogram.png",
    "extraction_diagnostics_summary.txt",
    "dials.diffuse_check.html",
]
SECTIONS = ("L0", "K0", "H0")
MERGED_FILES = (
    ["grid_summary.txt", "grid_visualization_conceptual.png", "voxel_occupancy_histogram.png",
     "scaling_params_b_i.png", "scaling_parameters_summary.txt", "merged_radial_average.png",
     "merged_intensity_histogram.png", "merged_cc_half.png", "phase3_diagnostics_summary.txt",
     "dials.diffuse_check.html"]
    + [f"voxel_occupancy_slice_{s}.png" for s in SECTIONS]
    + [f"merged_{k}_slice_{s}.png" for k in ("intensity", "sigma", "isigi", "anisotropic")
       for s in SECTIONS]
)


def _extract(args):
    from dials_diffuse.command_line.extract import run

    run([str(a) for a in args])


def _merge(args):
    from dials_diffuse.command_line.merge import run

    run([str(a) for a in args])


def check(args):
    from dials_diffuse.command_line.check import run

    run([str(a) for a in args])


@pytest.fixture(scope="module")
def pipeline(simulated_stills, tmp_path_factory):
    """Extraction (with masks), merge (plain and with offsets + smoother) and
    both diagnostics of the shared simulated stills."""
    work = tmp_path_factory.mktemp("check")
    expt = simulated_stills / "truth.expt"
    ext, mrg, mrg_sm = work / "extracted", work / "merged", work / "merged_smoother"
    _extract([expt, "output.masks=True", f"output.directory={ext}", f"output.log={work / 'ex.log'}"])
    _merge([expt, ext, f"output.directory={mrg}", "output.ccp4_maps=False", f"output.log={work / 'mg.log'}"])
    _merge([expt, ext, f"output.directory={mrg_sm}", "output.ccp4_maps=False", "scaling.offsets=True",
            "scaling.resolution_smoother.enable=True", f"output.log={work / 'mg2.log'}"])
    out_ext, out_mrg = work / "ext_check", work / "mrg_check"
    check([expt, ext / "image_000000.npz", f"output.directory={out_ext}",
           f"output.log={work / 'check_ext.log'}"])
    check([mrg, ext, expt, f"output.directory={out_mrg}", f"output.log={work / 'check_mrg.log'}"])
    return {"work": work, "expt": expt, "ext": ext, "mrg": mrg, "mrg_smoother": mrg_sm,
            "out_ext": out_ext, "out_mrg": out_mrg, "data": simulated_stills}


def assert_png_with_content(path):
    import matplotlib.image

    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.02, f"{path} looks uniform"
    assert len(np.unique(img[..., :3].reshape(-1, 3)[::7], axis=0)) > 20, f"{path} has too few colours"


def number_after(text, label):
    m = re.search(re.escape(label) + r"\s*([-+0-9.eE]+)", text)
    assert m, f"'{label}' not in summary"
    return float(m.group(1))


# --------------------------------------------------------------------------- extraction


def test_extraction_outputs(pipeline):
    out = pipeline["out_ext"]
    for name in EXTRACTION_FILES:
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert_png_with_content(out / name)
    assert not [p for p in os.listdir(out) if ".part" in p], "temporary files left behind"
    page = (out / "dials.diffuse_check.html").read_text()
    assert page.count("data:image/png;base64,") == sum(n.endswith(".png") for n in EXTRACTION_FILES)
    assert page.count("<pre>") == 2 and "src='http" not in page
    assert "Pixel counts at each masking stage" in page


def test_extraction_summary_numbers(pipeline):
    arrays, meta = diffuse_files.read_image_file(
        pipeline["ext"] / "image_000000.npz", keys=diffuse_files.VOXEL_KEYS + diffuse_files.PIXEL_KEYS)
    text = (pipeline["out_ext"] / "extraction_diagnostics_summary.txt").read_text()
    i, s = arrays["intensities"].astype(float), arrays["sigmas"].astype(float)
    ok = s > 0
    assert number_after(text, "kept pixels:") == arrays["intensities"].size == meta["pixel_counts"]["kept"]
    assert number_after(text, "voxels:") == len(arrays["voxel_indices"])
    assert number_after(text, "I/sigma: mean") == pytest.approx(np.mean(i[ok] / s[ok]), rel=1e-3)
    assert number_after(text, "intensity: n=") == i.size
    assert number_after(text, "sigma == 0:") == int((s == 0).sum())
    for stage, n in meta["pixel_counts"].items():
        assert re.search(rf"^{stage}\s+{n}\s", text, re.M), stage
    from dials_diffuse.diagnostics.inputs import load_mask

    bragg = load_mask(str(pipeline["ext"] / "bragg_mask_000000.pickle"), "bragg")
    n_ok = sum(int(m.sum()) for m in bragg)
    assert f"bragg mask: {n_ok} of {sum(m.size for m in bragg)} pixels usable" in text
    assert "Skipped" not in text  # everything was available


def test_correction_summary_matches_sample(pipeline):
    with np.load(pipeline["ext"] / "image_000000.npz") as npz:
        sample = {k: npz[k] for k in npz.files if k.startswith("sample_")}
    text = (pipeline["out_ext"] / "intensity_correction_summary.txt").read_text()
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\d+\s+[0-9.]+\s", line)]
    assert len(rows) == min(50, sample["sample_gain"].size)
    first = rows[0]
    assert int(first[1]) == sample["sample_fast"][0] and int(first[2]) == sample["sample_slow"][0]
    assert float(first[3]) == pytest.approx(sample["sample_raw_counts"][0], abs=0.05)
    f = (sample["sample_polarization"] * sample["sample_solid_angle"] * sample["sample_efficiency"]
         * sample["sample_air"] * sample["sample_exposure_time"])
    expected_i = (sample["sample_raw_counts"][0] * sample["sample_gain"][0] - sample["sample_background"][0]) / f[0]
    assert float(first[12]) == pytest.approx(expected_i, rel=1e-4)
    assert float(first[15]) == pytest.approx(np.linalg.norm(sample["sample_q"][0]), abs=1e-4)
    assert number_after(text, "polarization P") == pytest.approx(sample["sample_polarization"].min(), rel=1e-4)


def test_extraction_directory_and_image_choice(pipeline, tmp_path):
    check([pipeline["expt"], pipeline["ext"], "image=2", "max_plot_points=500",
           f"output.directory={tmp_path / 'o'}", f"output.log={tmp_path / 'c.log'}"])
    text = (tmp_path / "o" / "extraction_diagnostics_summary.txt").read_text()
    assert "image_000002.npz" in text and "still id 2" in text
    n = diffuse_files.read_image_file(pipeline["ext"] / "image_000002.npz",
                                      keys=("intensities",), require=())[0]["intensities"].size
    assert f"Scatter plots show 500 of {n} pixels" in (tmp_path / "c.log").read_text()
    with pytest.raises(Sorry, match="image=99 was not extracted"):
        check([pipeline["ext"], "image=99", f"output.directory={tmp_path / 'o2'}",
               f"output.log={tmp_path / 'c2.log'}"])


def test_missing_optional_inputs_are_skipped(pipeline, tmp_path):
    """No experiments, no masks beside the file, raw image gone: overlay skipped."""
    with np.load(pipeline["ext"] / "image_000000.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "metadata_json"}
        meta = json.loads(str(npz["metadata_json"]))
    meta["image_path"] = str(tmp_path / "moved_away.cbf")
    lone = tmp_path / "lone" / "image_000000.npz"
    lone.parent.mkdir()
    diffuse_files.write_image_file(lone, arrays, meta)
    log = tmp_path / "c.log"
    check([lone, f"output.directory={tmp_path / 'o'}", f"output.log={log}"])
    logged = log.read_text()
    assert "No pixel, bragg, total mask given" in logged
    assert "Skipping diffuse_pixel_overlay.png: no raw image" in logged
    out = tmp_path / "o"
    assert not (out / "diffuse_pixel_overlay.png").exists()
    for name in EXTRACTION_FILES:
        if name != "diffuse_pixel_overlay.png":
            assert (out / name).is_file(), name
    assert "diffuse_pixel_overlay.png: no raw image" in (out / "extraction_diagnostics_summary.txt").read_text()


def test_voxel_level_fallback_without_pixel_arrays(pipeline, tmp_path):
    with np.load(pipeline["ext"] / "image_000000.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k not in diffuse_files.PIXEL_KEYS and k != "metadata_json"}
        meta = json.loads(str(npz["metadata_json"]))
    path = tmp_path / "image_000000.npz"
    diffuse_files.write_image_file(path, arrays, meta)
    log = tmp_path / "c.log"
    check([pipeline["expt"], path, pipeline["ext"] / "total_mask_000000.pickle",
           f"output.directory={tmp_path / 'o'}", f"output.log={log}"])
    logged = log.read_text()
    assert "no per-pixel arrays" in logged and "Skipping intensity_heatmap_panel_0.png" in logged
    for name in ("diffuse_pixel_overlay.png", "q_projection_qx_qy.png", "isigi_histogram.png"):
        assert_png_with_content(tmp_path / "o" / name)
    text = (tmp_path / "o" / "extraction_diagnostics_summary.txt").read_text()
    assert number_after(text, "intensity: n=") == len(arrays["voxel_indices"])


def test_multipanel_overlay_and_heatmaps(simulated_multipanel, tmp_path):
    expt = simulated_multipanel / "truth.expt"
    _extract([expt, "output.masks=True", f"output.directory={tmp_path / 'ext'}",
              f"output.log={tmp_path / 'ex.log'}"])
    check([expt, tmp_path / "ext", f"output.directory={tmp_path / 'o'}", f"output.log={tmp_path / 'c.log'}"])
    arrays, _ = diffuse_files.read_image_file(tmp_path / "ext" / "image_000000.npz",
                                              keys=("original_panel_ids",), require=())
    panels = np.unique(arrays["original_panel_ids"])
    assert len(panels) == 4
    for pid in panels:
        assert_png_with_content(tmp_path / "o" / f"intensity_heatmap_panel_{pid}.png")
    assert_png_with_content(tmp_path / "o" / "diffuse_pixel_overlay.png")


def test_overlay_shows_masks():
    from dials_diffuse.diagnostics.extraction_plots import block_reduce, pixels_to_mask

    kept = pixels_to_mask(np.array([0, 0, 1]), np.array([1, 2, 0]), np.array([0, 3, 1]), [(4, 4), (2, 2)])
    assert kept[0].sum() == 2 and kept[0][3, 2] and kept[1][1, 0]
    a = np.zeros((5, 7), bool)
    a[4, 6] = True
    assert block_reduce(a, 3, "any").shape == (2, 3) and block_reduce(a, 3, "any")[1, 2]


def test_subsample_is_seeded():
    from dials_diffuse.diagnostics.plotting import subsample

    a, b = subsample(10**6, 1000, seed=3), subsample(10**6, 1000, seed=3)
    assert a.size == 1000 and np.array_equal(a, b) and np.all(np.diff(a) > 0)
    assert subsample(10, 1000).size == 10


# --------------------------------------------------------------------------- merged


def test_merged_outputs(pipeline):
    out = pipeline["out_mrg"]
    for name in MERGED_FILES:
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert_png_with_content(out / name)
    assert not (out / "scaling_resolution_smoother.png").exists()
    assert ("Skipping scaling_resolution_smoother.png: the resolution smoother was not enabled"
            in (pipeline["work"] / "check_mrg.log").read_text())
    page = (out / "dials.diffuse_check.html").read_text()
    assert page.count("data:image/png;base64,") == sum(n.endswith(".png") for n in MERGED_FILES)


def test_merged_summary_numbers(pipeline):
    grid, scaling, voxels, stats = merged_files.read_merged(pipeline["mrg"])
    text = (pipeline["out_mrg"] / "phase3_diagnostics_summary.txt").read_text()
    n_obs = voxels["num_observations"]
    assert number_after(text, "voxels:") == len(voxels["I_merged_relative"]) == stats["n_voxels"]
    assert number_after(text, "total observations:") == n_obs.sum()
    assert number_after(text, "observations: n=") == n_obs.size
    b = np.array([v["multiplicative_scale"] for v in scaling["refined_parameters"].values()])
    assert number_after(text, "b_i: n=") == b.size == 6
    assert number_after(text, "b_i: n=6 mean=") == pytest.approx(b.mean(), rel=1e-3)
    isigi = voxels["I_merged_relative"] / voxels["Sigma_merged_relative"]
    assert number_after(text, "mean I/sigma") == pytest.approx(np.nanmean(isigi), rel=1e-3)
    assert number_after(text, "cc_half_total:") == pytest.approx(stats["overall"]["cc_half_total"], abs=1e-4)
    scal = (pipeline["out_mrg"] / "scaling_parameters_summary.txt").read_text()
    assert number_after(scal, "stills:") == 6
    # per-still context from the manifest and experiments
    manifest = diffuse_files.read_manifest(pipeline["ext"])
    kept0 = [e for e in manifest["images"] if e["still_id"] == 0][0]["pixel_counts"]["kept"]
    assert re.search(rf"^\s+0\s+{b[0]:.5f}\s+0\s+{kept0}\s", scal, re.M)
    gtext = (pipeline["out_mrg"] / "grid_summary.txt").read_text()
    assert "ndiv (voxels per reciprocal unit): h 4, k 4, l 4" in gtext.replace(
        f"h {grid['ndiv_h']}, k {grid['ndiv_k']}, l {grid['ndiv_l']}", "h 4, k 4, l 4")
    assert f"observed voxels: {len(n_obs)} (asymmetric unit)" in gtext


def test_sections_are_true_central_sections(pipeline):
    """Every P1 voxel on l=0 carries the value of its ASU voxel."""
    from dials_diffuse import symmetry
    from dials_diffuse.diagnostics.merged_check import MergedMap

    m = MergedMap(str(pipeline["mrg"]))
    s = m.sections("I")["L0"]
    assert s.u_label == "h" and s.v_label == "k"
    gh = np.rint(s.u * m.ndiv[0]).astype(int)
    gk = np.rint(s.v * m.ndiv[1]).astype(int)
    G = np.stack(np.meshgrid(gh, gk), axis=-1).reshape(-1, 2)
    grid_pts = np.column_stack([G, np.zeros(len(G), int)])
    vals = s.values.reshape(-1)
    seen = np.isfinite(vals)
    asu = symmetry.map_to_asu(grid_pts[seen], m.ndiv, m.operators)
    lookup = {tuple(g): v for g, v in zip(m.voxels["voxel_indices"].tolist(), m.intensity)}
    expected = np.array([lookup[tuple(g)] for g in asu.tolist()])
    assert np.allclose(vals[seen], expected)
    assert seen.sum() > 100
    # and the voxels not drawn are really unobserved
    missing = symmetry.map_to_asu(grid_pts[~seen], m.ndiv, m.operators)
    assert not any(tuple(g) in lookup for g in missing.tolist())


@pytest.fixture(scope="module")
def streak_dataset(tmp_path_factory):
    """Stills whose only anisotropic feature is a long streak along a* through
    every lattice point (no halo), extracted, merged and diagnosed."""
    from conftest import STILLS_PARAMS

    from dials_diffuse.simulate import params_from, simulate_dataset

    work = tmp_path_factory.mktemp("streak")
    data = simulate_dataset(params_from(**{
        **STILLS_PARAMS, "output.directory": str(work / "data"), "n_images": 8,
        "diffuse.halo.amplitude": 0, "diffuse.streak.amplitude": 3, "diffuse.streak.length": 0.03,
        "diffuse.streak.width": 0.003, "diffuse.isotropic.amplitude": 0.3,
    }))
    expt = data / "truth.expt"
    _extract([expt, f"output.directory={work / 'ext'}", "output.save_pixels=off",
              f"output.log={work / 'ex.log'}"])
    _merge([expt, work / "ext", f"output.directory={work / 'mrg'}", "output.ccp4_maps=False",
            f"output.log={work / 'mg.log'}"])
    check([work / "mrg", f"output.directory={work / 'o'}", f"output.log={work / 'c.log'}"])
    return data, work


def _mean_at_offsets(section, du, dv):
    """Mean section value at lattice points shifted by +-(du, dv)."""
    us = np.arange(np.ceil(section.u.min()), np.floor(section.u.max()) + 1)
    vs = np.arange(np.ceil(section.v.min()), np.floor(section.v.max()) + 1)
    U, V = np.meshgrid(us, vs)
    vals = []
    for sign in (-1, 1):
        iu = np.rint((U.ravel() + sign * du - section.u[0]) / (section.u[1] - section.u[0])).astype(int)
        iv = np.rint((V.ravel() + sign * dv - section.v[0]) / (section.v[1] - section.v[0])).astype(int)
        ok = (iu >= 0) & (iu < section.u.size) & (iv >= 0) & (iv < section.v.size)
        vals.append(section.values[iv[ok], iu[ok]])
    vals = np.concatenate(vals)
    return np.nanmean(vals)


def test_streak_along_h_in_l0_and_k0_sections(streak_dataset):
    from dials_diffuse.diagnostics.merged_check import MergedMap
    from dials_diffuse.simulate import load_truth

    data, work = streak_dataset
    for name in MERGED_FILES:
        if name.endswith(".png"):
            assert_png_with_content(work / "o" / name)
    m = MergedMap(str(work / "mrg"))
    truth = load_truth(data)
    sections = m.sections("aniso")
    for name in ("L0", "K0"):
        s = sections[name]
        assert s.u_label == "h"
        along_h = _mean_at_offsets(s, 1 / m.ndiv[0], 0)
        across = _mean_at_offsets(s, 0, 1 / m.ndiv[s.v_axis])
        assert along_h > 3 * abs(across), (name, along_h, across)
    # the whole section follows the truth at the same hkl
    for name, s in m.sections("I").items():
        U, V = np.meshgrid(s.u, s.v)
        hkl = np.zeros(U.shape + (3,))
        hkl[..., s.u_axis], hkl[..., s.v_axis] = U, V
        d = truth.diffuse(hkl.reshape(-1, 3)).reshape(U.shape)
        ok = np.isfinite(s.values)
        assert np.corrcoef(s.values[ok], d[ok])[0, 1] > 0.8, name


def test_smoother_and_offsets_plotted(pipeline, tmp_path):
    check([pipeline["mrg_smoother"], f"output.directory={tmp_path / 'o'}", f"output.log={tmp_path / 'c.log'}"])
    assert_png_with_content(tmp_path / "o" / "scaling_resolution_smoother.png")
    _, scaling, _, _ = merged_files.read_merged(pipeline["mrg_smoother"])
    text = (tmp_path / "o" / "scaling_parameters_summary.txt").read_text()
    c = np.array([v["additive_offset"] for v in scaling["refined_parameters"].values()])
    assert number_after(text, "additive offset c_i: c: n=6 mean=") == pytest.approx(c.mean(), rel=1e-3, abs=1e-9)
    assert "resolution smoother: enabled" in text
    assert "No experiments given" in (tmp_path / "c.log").read_text()


def test_merged_without_statistics_skips_cc_half(pipeline, tmp_path):
    mrg = tmp_path / "merged"
    shutil.copytree(pipeline["mrg"], mrg)
    os.remove(mrg / merged_files.STATS_NAME)
    log = tmp_path / "c.log"
    check([mrg, f"output.directory={tmp_path / 'o'}", f"output.log={log}"])
    logged = log.read_text()
    assert "Skipping merged_cc_half.png" in logged
    assert "expanding with the Laue group" in logged
    assert (tmp_path / "o" / "merged_intensity_slice_L0.png").is_file()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.npz", "file not found"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "cannot use"),
    (lambda d: (d / "fake.npz").write_text("x") and d / "fake.npz", "is not an NPZ file"),
    (lambda d: np.savez(d / "other.npz", a=np.zeros(3)) or d / "other.npz", "neither a dials.diffuse_extract"),
    (lambda d: d, "neither a dials.diffuse_merge nor"),
    (lambda d: (d / "x_mask.pickle").write_text("x") and d / "x_mask.pickle", "cannot tell which mask"),
])
def test_bad_inputs_raise_sorry(tmp_path, make, message):
    with pytest.raises(Sorry, match=message):
        check([make(tmp_path), f"output.directory={tmp_path / 'o'}", f"output.log={tmp_path / 'c.log'}"])


def test_bad_mask_file(pipeline, tmp_path):
    bad = tmp_path / "bragg_mask_000000.pickle"
    bad.write_text("not a pickle")
    with pytest.raises(Sorry, match="bragg mask .* cannot be read"):
        check([pipeline["ext"] / "image_000000.npz", bad, f"output.directory={tmp_path / 'o'}",
               f"output.log={tmp_path / 'c.log'}"])


def test_command_line_sorry_and_exit_status(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "dials.diffuse_check")
    (tmp_path / "notes.txt").write_text("x")
    result = subprocess.run([exe, "notes.txt"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    sorry = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(sorry) == 1 and sorry[0].startswith("Sorry: cannot use notes.txt")
    help_text = subprocess.run([exe, "-h"], cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout
    assert "diffuse_merged/" in help_text and "image_000000.npz" in help_text


def test_background_map(pipeline, tmp_path):
    """A background map is drawn and compared with what the extraction subtracted."""
    from dials_diffuse.diagnostics.inputs import load_mask

    shape = load_mask(str(pipeline["ext"] / "pixel_mask_000000.pickle"), "pixel")[0].shape
    bg = tmp_path / "bg.npy"
    np.save(bg, np.full(shape, 2.5))
    check([pipeline["expt"], pipeline["ext"] / "image_000000.npz", bg, "max_plot_points=2000",
           f"output.directory={tmp_path / 'o'}", f"output.log={tmp_path / 'c.log'}"])
    assert (tmp_path / "o" / "background_map.png").is_file()
    text = (tmp_path / "o" / "extraction_diagnostics_summary.txt").read_text()
    # the extraction subtracted no background (constant 0): the map differs by 2.5
    assert "Background map: mean 2.5" in text and "by at most 2.5 (the extraction did not use this map)" in text
    np.save(tmp_path / "wrong.npy", np.zeros((3, 3)))
    with pytest.raises(Sorry, match="background map .* has shape"):
        check([pipeline["ext"] / "image_000000.npz", tmp_path / "wrong.npy",
               f"output.directory={tmp_path / 'o2'}", f"output.log={tmp_path / 'c2.log'}"])
