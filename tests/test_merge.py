"""dials.diffuse_merge against the simulator's truth: map, scales, statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dials.util import Sorry

from dials_diffuse import merged_files, symmetry
from dials_diffuse.extraction import extract
from dials_diffuse.merging import merge_run
from dials_diffuse.simulate import load_truth, params_from, simulate_dataset

from diffuse_helpers import extraction_params, merge_params, robust_width

VENV_BIN = os.path.dirname(sys.executable)
NDIV = 4


def simulate_and_extract(tmp_path_factory, name, **sim):
    base = tmp_path_factory.mktemp(name)
    settings = {
        "detector.format": "generic", "detector.n_fast": 256, "detector.n_slow": 256,
        "detector.distance": 100, "output.directory": str(base / "data"),
    }
    settings.update(sim)
    truth = load_truth(simulate_dataset(params_from(**settings)))
    extract(truth.experiments, extraction_params(truth, base / "extracted",
                                                 **{"output.save_pixels": "off"}))
    return truth, base


def truth_comparison(truth, result):
    merged = result["merged"]
    expected = truth.flux * truth.diffuse_voxel_average(merged.hkl, NDIV)
    return merged, expected


def check_against_truth(truth, result, cc_min=0.99, shell_tolerance=0.02):
    merged, expected = truth_comparison(truth, result)
    well = merged.n_observations >= 3
    assert well.sum() > 500
    cc = np.corrcoef(merged.intensity[well], expected[well])[0, 1]
    assert cc >= cc_min, f"CC with the truth {cc:.4f}"
    # ratio merged / truth flat across 10 resolution shells
    q = merged.qmag[well]
    order = np.argsort(q)
    shells = np.empty(q.size, int)
    shells[order] = np.arange(q.size) * 10 // q.size
    num = np.bincount(shells, weights=merged.intensity[well], minlength=10)
    den = np.bincount(shells, weights=expected[well], minlength=10)
    ratio = num / den
    assert np.all(np.abs(ratio / ratio.mean() - 1) < shell_tolerance), ratio
    # scales: recovered b_i / true scale, coefficient of variation below 1 %
    b = result["scaling"].model.scale
    true = truth.scales[result["observations"].image_ids]
    r = b / true
    assert r.std() / r.mean() < 0.01, r
    return cc, ratio, r


@pytest.fixture(scope="module")
def stills_run(tmp_path_factory):
    truth, base = simulate_and_extract(
        tmp_path_factory, "merge_stills", mode="stills", n_images=40, random_seed=21
    )
    result = merge_run(truth.experiments, [str(base / "extracted")],
                       merge_params(base / "merged"))
    return truth, base, result


def test_stills_map_scales_and_shells(stills_run):
    """Stills: merged / true flat across 10 resolution shells within 1 %."""
    truth, _, result = stills_run
    _, ratio, _ = check_against_truth(truth, result, shell_tolerance=0.01)
    print("merged / true per shell:", np.round(ratio / ratio.mean(), 4))


def check_calibrated_errors(truth, result):
    """Merged sigmas carry the error model: half-map differences and
    merged-minus-truth, each normalised by its sigma, have unit width."""
    (i1, s1, n1), (i2, s2, n2) = result["scaling"].half_maps
    both = (n1 >= 2) & (n2 >= 2)
    z_half = (i1[both] - i2[both]) / np.sqrt(s1[both] ** 2 + s2[both] ** 2)
    merged, expected = truth_comparison(truth, result)
    well = merged.n_observations >= 3
    # the truth is on the scale of the refined b (mean 1): compare shapes
    k = np.sum(merged.intensity[well]) / np.sum(expected[well])
    z_truth = (merged.intensity[well] - k * expected[well]) / merged.sigma[well]
    widths = robust_width(z_half), robust_width(z_truth)
    assert 0.85 <= widths[0] <= 1.2, widths
    assert 0.85 <= widths[1] <= 1.2, widths
    return widths


def test_stills_errors_calibrated(stills_run):
    truth, base, result = stills_run
    check_calibrated_errors(truth, result)
    stats = json.loads((base / "merged" / merged_files.STATS_NAME).read_text())
    assert stats["error_model"]["k"] == pytest.approx(result["scaling"].model.error_k)
    assert stats["error_model"]["k"] > 0
    assert stats["error_model"]["k_merged"] == pytest.approx(result["scaling"].model.merged_error_k)


def test_stills_output_files(stills_run):
    truth, base, result = stills_run
    grid, scaling, voxels, stats = merged_files.read_merged(str(base / "merged"))
    assert grid["ndiv_h"] == NDIV and grid["crystal_avg_ref"]["space_group"].startswith("P 21 21 21")
    assert set(scaling["refined_parameters"]) == {str(i) for i in range(truth.n_images)}
    b = np.array([scaling["refined_parameters"][str(i)]["multiplicative_scale"]
                  for i in range(truth.n_images)])
    assert b.mean() == pytest.approx(1.0)
    assert scaling["refinement_statistics"]["converged"]
    for key in merged_files.VOXEL_KEYS:
        assert len(voxels[key]) == len(voxels["I_merged_relative"])
    assert np.allclose(voxels["H_center"], voxels["voxel_indices"][:, 0] / NDIV)
    # every voxel is its own ASU representative
    ops = symmetry.laue_operators("P 21 21 21")
    assert np.all(symmetry.is_in_asu(voxels["voxel_indices"], (NDIV,) * 3, ops))
    assert stats["overall"]["cc_half_total"] > 0.9
    assert len(stats["shells"]) == 10
    for name in ("diffuse_total.ccp4", "diffuse_anisotropic.ccp4"):
        assert (base / "merged" / name).stat().st_size > 1024


def test_ccp4_map_reads_back_with_symmetry(stills_run):
    from iotbx import mrcfile

    truth, base, result = stills_run
    m = mrcfile.map_reader(file_name=str(base / "merged" / "diffuse_total.ccp4"))
    data = m.map_data().as_numpy_array()
    origin = np.array(m.map_data().origin())
    merged = result["merged"]
    # a voxel and its Friedel/Laue mate (-h, k, l) both hold the merged value
    pick = np.argsort(-merged.n_observations)[:20]
    for g, value in zip(merged.voxel_grid[pick], merged.intensity[pick]):
        for mate in (g, g * np.array([-1, 1, 1]), -g):
            idx = tuple(mate - origin)
            if all(0 <= i < n for i, n in zip(idx, data.shape)):
                assert data[idx] == pytest.approx(value, rel=1e-5)


def test_ccp4_file_is_iotbx_own(tmp_path):
    """The maps are written with mrcfile directly (numpy to file); the file is
    byte for byte the one iotbx's writer makes of the same box (with the
    reciprocal cell, P 1 and the ndiv grid it was given before)."""
    from cctbx import sgtbx, uctbx
    import mrcfile
    from iotbx import mrcfile as iotbx_mrcfile
    from mrcfile.dtypes import HEADER_DTYPE
    from scitbx.array_family import flex

    from dials_diffuse.grid import GlobalVoxelGrid
    from dials_diffuse.phil_scopes import merge_params_scope

    output = merge_params_scope.extract().output
    grid = GlobalVoxelGrid((30.0, 40.0, 50.0, 90.0, 95.0, 90.0), sgtbx.space_group_info("P 2").group(),
                           (4, 2, 3))
    rng = np.random.default_rng(5)
    lo, hi = np.array([-7, -3, 2]), np.array([5, 4, 9])
    dense = rng.normal(size=tuple(hi - lo + 1)).astype(np.float32)
    ours = tmp_path / "ours.ccp4"
    merged_files._write_ccp4_file(str(ours), grid, dense, lo, hi, output, "a label")

    rec = grid.unit_cell.reciprocal_parameters()
    s = output.ccp4_cell_scale
    map_data = flex.double(dense.astype(np.float64).ravel())
    map_data.resize(flex.grid(tuple(int(x) for x in lo), tuple(int(x) for x in hi + 1)))
    theirs = tmp_path / "iotbx.ccp4"
    iotbx_mrcfile.write_ccp4_map(
        file_name=str(theirs),
        unit_cell=uctbx.unit_cell((rec[0] * s, rec[1] * s, rec[2] * s, rec[3], rec[4], rec[5])),
        space_group=sgtbx.space_group_info("P 1").group(), map_data=map_data,
        labels=flex.std_string(["a label",
                                "axes X,Y,Z = h,k,l; 4,2,3 points per reciprocal unit",
                                f"cell = reciprocal cell (1/A) x {s:g}"]),
        unit_cell_grid=(4, 2, 3), out=open(os.devnull, "w"))
    # byte for byte, but for the mean and rms: summed in float64 here
    # (merged_files.map_statistics), in float32 by mrcfile under iotbx
    ours_bytes, theirs_bytes = bytearray(ours.read_bytes()), bytearray(theirs.read_bytes())
    for field in ("dmean", "rms"):
        with mrcfile.open(str(ours), header_only=True) as a, \
                mrcfile.open(str(theirs), header_only=True) as b:
            assert float(a.header[field]) == pytest.approx(float(b.header[field]), rel=1e-6)
        offset = HEADER_DTYPE.fields[field][1]
        ours_bytes[offset:offset + 4] = theirs_bytes[offset:offset + 4] = b"\0" * 4
    assert ours_bytes == theirs_bytes
    m = iotbx_mrcfile.map_reader(file_name=str(ours))
    assert m.map_data().origin() == tuple(lo)
    assert np.array_equal(m.map_data().as_numpy_array(), dense)


@pytest.mark.parametrize("kind", ["compiled", "numpy"])
def test_map_statistics_match_numpy_float64(monkeypatch, kind):
    """The CCP4 header's min, max, mean and rms (map_statistics, compiled or
    numpy) against numpy's own functions in float64; NaN anywhere makes
    them all NaN, as numpy's (and so mrcfile's) do."""
    from dials_diffuse import compiled

    if kind == "numpy":
        compiled.disable("merged_files.map_statistics", monkeypatch)
    elif compiled.lazy_jit("merged_files.map_statistics", merged_files._define_map_statistics) is None:
        pytest.skip("numba is not available")
    rng = np.random.default_rng(3)
    dense = (rng.normal(size=(40, 30, 20)) * 50 + 1000).astype(np.float32)
    dense[::3] = 0.0  # fill value
    ref = dense.astype(np.float64)
    stats = merged_files.map_statistics(dense)
    assert all(isinstance(x, np.float32) for x in stats)
    expected = (ref.min(), ref.max(), ref.mean(), ref.std())
    assert np.allclose(stats, expected, rtol=1e-6, atol=0)
    dense[5, 6, 7] = np.nan
    assert np.all(np.isnan(merged_files.map_statistics(dense)))


@pytest.mark.parametrize("space_group", ["P 2", "P 6 2 2", "I 4 3 2"])
@pytest.mark.parametrize("hkl_box", [None, (-1.0, 1.5, -0.5, 2.0, -2.0, 0.25)])
def test_ccp4_maps_compiled_equal_expand_to_p1(tmp_path, monkeypatch, space_group, hkl_box):
    """write_ccp4_maps filling the box in one compiled pass per map (mates
    computed on the fly) writes the same bytes as the numpy path through
    symmetry.expand_to_p1: ASU voxels with special positions, non-ASU
    voxels whose mates meet (the first voxel wins), NaN values (the fill
    value), with and without output.map_hkl_box."""
    from cctbx import sgtbx

    from dials_diffuse import compiled
    from dials_diffuse.grid import GlobalVoxelGrid
    from dials_diffuse.phil_scopes import merge_params_scope

    if compiled.lazy_jit("merged_files.fill_box", merged_files._define_fill_box) is None:
        pytest.skip("numba is not available")
    output = merge_params_scope.extract().output
    output.map_fill_value = -7.0
    output.map_hkl_box = hkl_box
    group = sgtbx.space_group_info(space_group).group()
    grid = GlobalVoxelGrid((40.0, 40.0, 40.0, 90.0, 90.0, 90.0) if space_group == "I 4 3 2"
                           else (40.0, 40.0, 50.0, 90.0, 90.0, 120.0) if "6" in space_group
                           else (30.0, 40.0, 50.0, 90.0, 95.0, 90.0), group, (4, 4, 4))
    ops = symmetry.laue_operators(group)
    rng = np.random.default_rng(11)
    g = rng.integers(-9, 10, (3000, 3))
    asu = np.unique(symmetry.map_to_asu(g, grid.ndiv, ops), axis=0)
    voxels = np.concatenate([asu, g[:200]])  # then some non-canonical ones
    values = rng.normal(size=(2, len(voxels)))
    values[0, ::17] = np.nan
    outputs = {}
    # compiled in two threads (a map each, as dials.diffuse_merge mp.nproc=2
    # writes them), compiled in this thread, numpy
    for kind, threads in (("threads", 2), ("compiled", 1), ("numpy", 1)):
        if kind == "numpy":
            compiled.disable("merged_files.fill_box", monkeypatch)
        maps = [(str(tmp_path / f"{kind}_{k}.ccp4"), values[k], "label") for k in range(2)]
        merged_files.write_ccp4_maps(maps, grid, voxels, ops, output, threads=threads).result()
        outputs[kind] = [open(path, "rb").read() for path, _, _ in maps]
    assert outputs["threads"] == outputs["compiled"] == outputs["numpy"]


def test_rotation_sequence(tmp_path_factory):
    truth, base = simulate_and_extract(
        tmp_path_factory, "merge_rotation", mode="rotation", n_images=80,
        random_seed=22,
        # 0.25 deg images: at 0.5 deg successive Ewald-sphere sections are
        # half a voxel apart at high resolution, too sparse a sampling of the
        # voxel for its average to be the right reference
        **{"rotation.oscillation": 0.25, "detector.n_fast": 320, "detector.n_slow": 320},
    )
    result = merge_run(truth.experiments, [str(base / "extracted")],
                       merge_params(base / "merged"))
    check_against_truth(truth, result)
    check_calibrated_errors(truth, result)
    # the compiled sweeps (the default here) and the numpy passes agree to
    # rounding: same rejections, scales and map
    numpy_result = merge_run(truth.experiments, [str(base / "extracted")],
                             merge_params(base / "merged_numpy", kernel="numpy"))
    check_same_merge(result, numpy_result)


def check_same_merge(result, other):
    a, b = result["scaling"], other["scaling"]
    assert np.array_equal(a.rejected, b.rejected)
    assert [h["iteration"] for h in a.history] == [h["iteration"] for h in b.history]
    assert np.allclose(a.model.scale, b.model.scale, rtol=1e-9, atol=0)
    assert a.model.merged_error_k == pytest.approx(b.model.merged_error_k, rel=1e-9)
    assert np.array_equal(a.n_observations, b.n_observations)
    for x, y in ((a.intensity, b.intensity), (a.sigma, b.sigma)):
        assert np.array_equal(np.isfinite(x), np.isfinite(y))
        ok = np.isfinite(x)
        assert np.allclose(x[ok], y[ok], rtol=1e-9, atol=1e-9 * np.abs(y[ok]).max())


def test_rotation_smooth_scales(tmp_path_factory):
    """True scales smooth in phi (1 + 0.2 sin(2 pi phi / 40 deg)):
    scaling.scale_model=smooth recovers them with a control point every 2 deg
    (11 parameters for 80 images) as well as per-image scales would."""
    truth, base = simulate_and_extract(
        tmp_path_factory, "merge_smooth", mode="rotation", n_images=80, random_seed=24,
        **{"rotation.oscillation": 0.25, "detector.n_fast": 320, "detector.n_slow": 320,
           "scale.spread": 0.2, "scale.phi_period": 40.0},
    )
    assert truth.scales.max() / truth.scales.min() > 1.15
    result = merge_run(truth.experiments, [str(base / "extracted")],
                       merge_params(base / "merged", **{"scaling.scale_model": "smooth",
                                                        "scaling.scale_interval": 2.0}))
    check_against_truth(truth, result)
    model = result["scaling"].model
    # image centres span 19.75 deg: ceil(19.75 / 2) + 1 control points
    assert model.scale_controls.size == 11
    assert np.allclose(model.scale, model.scale_basis.matrix @ model.scale_controls)
    doc = json.loads((base / "merged" / "refined_scaling_model_params.json").read_text())
    assert doc["scale_model"]["type"] == "smooth"
    assert len(doc["scale_model"]["control_values"]) == 11
    assert len(doc["refined_parameters"]) == 80


def test_smooth_scales_refused_for_stills(stills_run, tmp_path):
    truth, base, _ = stills_run
    with pytest.raises(Sorry, match="scale_model=smooth needs rotation sequences"):
        merge_run(truth.experiments, [str(base / "extracted")],
                  merge_params(tmp_path / "m", **{"scaling.scale_model": "smooth"}))


def test_failed_merge_leaves_no_output(stills_run, tmp_path):
    """A merge that stops after the ambiguity step (scaling not converged,
    with fail_if_not_converged) writes nothing, not even ambiguity.json."""
    truth, base, _ = stills_run
    out = tmp_path / "m"
    with pytest.raises(Sorry, match="did not converge"):
        merge_run(truth.experiments, [str(base / "extracted")], merge_params(
            out, **{"scaling.max_iterations": 1, "scaling.fail_if_not_converged": True}))
    assert not out.exists() or not any(out.iterdir())
    assert (base / "merged" / "ambiguity.json").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_failed_map_write_leaves_no_output(stills_run, tmp_path, nproc):
    """A CCP4 map that cannot be written (its name taken by a directory) is
    a Sorry naming it; with mp.nproc=2 it fails in its own thread while the
    other files are written: either way, nothing else is left behind."""
    truth, base, _ = stills_run
    out = tmp_path / "m"
    (out / merged_files.MAP_NAMES["anisotropic"]).mkdir(parents=True)
    with pytest.raises(Sorry, match="diffuse_anisotropic.ccp4"):
        merge_run(truth.experiments, [str(base / "extracted")],
                  merge_params(out, **{"mp.nproc": nproc}))
    assert [p.name for p in out.iterdir()] == [merged_files.MAP_NAMES["anisotropic"]]


def test_cc_half_pure_noise_is_near_zero(tmp_path_factory):
    """Flat diffuse model: every voxel has the same truth, only noise differs."""
    truth, base = simulate_and_extract(
        tmp_path_factory, "merge_noise", mode="stills", n_images=12, random_seed=23,
        **{"diffuse.isotropic.width": 100.0, "diffuse.halo.amplitude": 0.0,
           "diffuse.streak.amplitude": 0.0, "scale.spread": 0.0},
    )
    result = merge_run(truth.experiments, [str(base / "extracted")],
                       merge_params(base / "merged"))
    cc = result["statistics"]["overall"]["cc_half_total"]
    assert abs(cc) < 0.1, cc


def test_symmetry_modes_and_order_invariance(stills_run, tmp_path):
    truth, base, result = stills_run
    files = sorted(str(p) for p in (base / "extracted").glob("image_*.npz"))
    reordered = merge_run(truth.experiments, files[::-1], merge_params(tmp_path / "rev"))
    assert np.array_equal(reordered["merged"].voxel_grid, result["merged"].voxel_grid)
    assert np.allclose(reordered["merged"].intensity, result["merged"].intensity, rtol=1e-12)
    p1 = merge_run(truth.experiments, [str(base / "extracted")],
                   merge_params(tmp_path / "p1", **{"symmetry.merge": "none"}))
    friedel = merge_run(truth.experiments, [str(base / "extracted")],
                        merge_params(tmp_path / "friedel", **{"symmetry.merge": "friedel"}))
    n_p1, n_fr, n_laue = (len(r["merged"].intensity) for r in (p1, friedel, result))
    # merging mates can only combine voxels: at most |G| P1 voxels per ASU voxel
    assert n_fr < n_p1 <= 2 * n_fr
    assert n_laue < n_fr <= 4 * n_laue
    # every observation is kept whatever the symmetry
    n_obs = [r["observations"].n_obs for r in (p1, friedel, result)]
    assert n_obs[0] == n_obs[1] == n_obs[2]


def test_offsets_and_smoother_run(stills_run, tmp_path):
    truth, base, _ = stills_run
    result = merge_run(
        truth.experiments, [str(base / "extracted")],
        merge_params(tmp_path / "m", **{"scaling.offsets": True,
                                        "scaling.resolution_smoother.enable": True}),
    )
    model = result["scaling"].model
    assert np.abs(model.offset).max() < 0.05 * np.nanmean(result["merged"].intensity)
    assert model.smoother_values.shape == (truth.n_images, 4)
    assert np.allclose(model.smoother_values.mean(axis=1), 1.0)
    r = model.scale / truth.scales[result["observations"].image_ids]
    assert r.std() / r.mean() < 0.02
    with open(tmp_path / "m" / merged_files.SCALING_NAME) as fh:
        assert json.load(fh)["resolution_smoother"]["enabled"]


def run_command(args, cwd):
    return subprocess.run([os.path.join(VENV_BIN, "dials.diffuse_merge"), *args],
                          cwd=cwd, capture_output=True, text=True)


def test_command_line_and_bad_input(stills_run, tmp_path):
    truth, base, _ = stills_run
    expt = str(base / "data" / "truth.expt")
    extracted = str(base / "extracted")
    ok = run_command([expt, extracted, "output.directory=m", "output.hdf5=True"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "m" / merged_files.VOXEL_H5_NAME).exists()
    assert (tmp_path / "dials.diffuse_merge.log").exists()
    (tmp_path / "empty").mkdir()
    cases = [
        ([expt, str(tmp_path / "empty")], "no extraction_manifest.json"),
        ([expt, "nowhere/"], "file not found"),
        ([expt, extracted, "grid.ndiv_h=3"], "files from another grid"),
        ([expt, extracted, "d_min=3", "d_max=2"], "d_min=3.0 must be smaller"),
        ([expt, extracted, "scaling.max_iterations=0"], "max_iterations"),
        ([extracted], "no experiments given"),
    ]
    for args, message in cases:
        result = run_command(args + ["output.directory=bad"], tmp_path)
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        assert result.returncode == 1, (args, result.stdout[-500:])
        assert last.startswith("Sorry:") and message in last, (args, last)
        assert not (tmp_path / "bad" / merged_files.GRID_NAME).exists()


def test_misorientation_check(stills_run, tmp_path):
    """Randomly oriented stills declared to be one crystal are refused."""
    from dials.util import Sorry

    truth, base, _ = stills_run
    params = merge_params(tmp_path / "m", **{"misorientation.single_crystal": "yes",
                                             "misorientation.action": "fail"})
    with pytest.raises(Sorry, match="RMS misorientation"):
        merge_run(truth.experiments, [str(base / "extracted")], params)
    assert not (tmp_path / "m" / merged_files.GRID_NAME).exists()
    # as stills (the default) the orientations are only reported
    result = merge_run(truth.experiments, [str(base / "extracted")],
                       merge_params(tmp_path / "ok", **{"output.ccp4_maps": False}))
    spread = result["grid"].orientation
    assert spread["rms_misorientation_deg"] > 10 and not spread["checked"]


@pytest.mark.parametrize("overrides", [{}, {"kernel": "numpy"},
                                       {"d_min": 3.0, "scaling.offsets": True,
                                        "scaling.resolution_smoother.enable": True}])
def test_parallel_passes_byte_identical(stills_run, tmp_path, monkeypatch, overrides):
    """Scaling passes over several row partitions in 1 process or 2 (threads
    for the compiled sweeps, forked workers for numpy's; and reading by 1
    or 2 workers, with rows dropped by d_min) give the same bytes in every
    output."""
    import filecmp

    from dials_diffuse.scaling import passes

    truth, base, _ = stills_run
    # small chunks: the run has many partitions, as a large one does
    monkeypatch.setattr(passes, "CHUNK_ROWS", 3000)
    monkeypatch.setattr(passes, "PARALLEL_MIN_OBS", 0)  # workers even for a small run
    outputs = []
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        result = merge_run(truth.experiments, [str(base / "extracted")],
                           merge_params(out, **{"mp.nproc": nproc, **overrides}))
        assert len(passes.partition_bounds(result["observations"].n_obs)) > 4
        outputs.append(out)
    names = sorted(p.name for p in outputs[0].iterdir())
    assert "voxel_data_relative.npz" in names
    for name in names:
        assert filecmp.cmp(outputs[0] / name, outputs[1] / name, shallow=False), name


@pytest.mark.parametrize("sparse", [True, False])
def test_schur_matrix_sparse_and_dense_paths(sparse, monkeypatch):
    """Both ways of forming diag(d_b) - k C D^-1 C^T equal the explicit product."""
    from dials_diffuse.scaling import gauss_newton

    rng = np.random.default_rng(5)
    n_img, n_vox, n = 12, 300, 4000
    images = rng.integers(0, n_img, n)
    sampled = rng.integers(0, n_vox, n)
    couplings = rng.random(n)
    inv_d = rng.random(n_vox)
    d_b = rng.random(n_img) + 10
    c = np.zeros((n_img, n_vox))
    np.add.at(c, (images, sampled), couplings)
    expected = np.diag(d_b) - 3.0 * (c * inv_d) @ c.T
    monkeypatch.setattr(gauss_newton, "_sparse_is_cheaper", lambda *a: sparse)
    got = gauss_newton._schur_matrix(d_b, images, sampled, couplings, inv_d, 3)
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-9)


def test_compiled_passes_equal_numpy_for_stills(stills_run, tmp_path):
    """The compiled sweeps with the stills' dense Schur matrix (gathered from
    the couplings stored per row) agree with numpy's passes to rounding."""
    truth, base, result = stills_run
    numpy_result = merge_run(truth.experiments, [str(base / "extracted")],
                             merge_params(tmp_path / "numpy", kernel="numpy"))
    check_same_merge(result, numpy_result)


@pytest.mark.parametrize("every", [1, 3])
def test_compiled_sparse_schur_product(every):
    """kernels.sparse_schur_product over the rows grouped by sampled voxel
    (kernels.voxel_rows), summed over voxel ranges and mirrored, equals the
    explicit C D^-1 C^T of the sampled voxels, with repeated (image, voxel)
    rows and unused (zero) couplings."""
    from dials_diffuse.scaling import kernels

    rng = np.random.default_rng(7)
    n_img, n_vox, n = 15, 400, 6000
    image = rng.integers(0, n_img, n).astype(np.int32)
    voxel = rng.integers(0, n_vox, n).astype(np.int32)
    coupling = rng.random(n).astype(np.float32)
    coupling[rng.random(n) < 0.1] = 0.0
    n_sub = -(-n_vox // every)
    inv_d = rng.random(n_sub)
    order, start = np.empty(n, np.int32), np.zeros(n_sub + 1, np.int64)
    kernels.voxel_rows(voxel, every, n_sub, order, start)
    order = order[:start[-1]]
    sampled = voxel % every == 0
    assert start[-1] == sampled.sum()
    assert np.all(voxel[order] // every == np.repeat(np.arange(n_sub), np.diff(start)))
    c = np.zeros((n_img, n_sub))
    np.add.at(c, (image[sampled], voxel[sampled] // every), coupling[sampled].astype(float))
    expected = (c * inv_d) @ c.T
    # two voxel ranges, each the upper triangle (half diagonal), mirrored
    upper = sum(kernels.sparse_schur_product(n_img, order, start, image, coupling, inv_d, a, b)
                for a, b in ((0, n_sub // 3), (n_sub // 3, n_sub)))
    assert np.allclose(upper + upper.T, expected, rtol=1e-12, atol=1e-12)


def test_merged_error_k_calibrates_half_map_differences():
    """merged_error_k: with k, the half-map differences over their sigmas
    have the median |z| of a standard normal (a check by the formula)."""
    from dials_diffuse.scaling.merge_sums import CHI2_1_MEDIAN_Z, merged_error_k

    rng = np.random.default_rng(8)
    n = 50_001
    expected = rng.uniform(10, 1000, n)  # sum E[S]^2 = E^2 (one observation per half)
    truth = rng.uniform(1, 100, n)
    halves = []
    for _ in range(2):
        photons = truth * 10
        observed = photons + rng.normal(0, np.sqrt(photons + (0.1 * expected) ** 2))
        # numerator, denominator (10), counting variance, count, sum E[S]^2
        halves.append((observed, np.full(n, 10.0), photons, np.ones(n), expected**2))
    k = merged_error_k(halves, min_obs=1)
    assert abs(k - 0.1) < 0.005
    (n1, d1, v1, _, e1), (n2, d2, v2, _, e2) = halves
    z = (n1 / d1 - n2 / d2) / np.sqrt((v1 + k * k * e1) / d1**2 + (v2 + k * k * e2) / d2**2)
    assert np.median(np.abs(z)) == pytest.approx(CHI2_1_MEDIAN_Z, rel=1e-4)
    # pure counting noise: no error term to speak of
    halves0 = [(truth * 10 + rng.normal(0, np.sqrt(truth * 10)), np.full(n, 10.0), truth * 10,
                np.ones(n), expected**2) for _ in range(2)]
    assert merged_error_k(halves0, min_obs=1) < 0.01


def test_error_model_k_makes_the_median_chi2():
    from dials_diffuse.scaling import CHI2_1_MEDIAN, fit_error_model

    rng = np.random.default_rng(6)
    expected = rng.uniform(10, 1000, 200_001)
    poisson = expected.copy()
    resid = rng.normal(0, np.sqrt(poisson + (0.07 * expected) ** 2))
    k = fit_error_model(resid, poisson, expected)
    assert abs(k - 0.07) < 0.003
    assert np.median(resid**2 / (poisson + (k * expected) ** 2)) == pytest.approx(CHI2_1_MEDIAN)
    assert fit_error_model(rng.normal(0, np.sqrt(poisson)), poisson, expected) == 0.0


def test_solver_auto_switches_to_alternating_for_many_scales():
    """solver=auto: Gauss-Newton (a dense scales x scales matrix) up to
    max_gauss_newton_scales, the alternating updates beyond (10^4 stills did
    not converge with Gauss-Newton: bench/serial_10k.py)."""
    from dials_diffuse.scaling.refine import use_gauss_newton

    params = merge_params("unused").scaling
    assert params.solver == "auto"
    assert use_gauss_newton(params, 2000) and not use_gauss_newton(params, 2001)
    params.solver = "gauss_newton"
    assert use_gauss_newton(params, 10_000)
    params.solver, params.offsets = "auto", True
    assert not use_gauss_newton(params, 10)


def test_partitions_cover_every_row_once(stills_run):
    """The passes' partitions, in both forms: the row ranges tile the rows;
    the voxel ranges tile the voxels, and their runs (one per image) hold
    every row exactly once, each row in the run of its image and voxel."""
    from dials_diffuse.scaling import passes

    obs = stills_run[2]["observations"]
    parts = passes.make_partitions(obs)
    assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]]
    assert parts[0].start == 0 and parts[-1].stop == obs.n_obs
    assert [p.v0 for p in parts[1:]] == [p.v1 for p in parts[:-1]]
    assert parts[0].v0 == 0 and parts[-1].v1 == obs.n_voxels
    seen = np.zeros(obs.n_obs, np.int64)
    for p in parts:
        for i, (a, b) in enumerate(zip(p.run_start, p.run_stop)):
            seen[a:b] += 1
            assert np.all(obs.image[a:b] == i)
            assert np.all((obs.voxel[a:b] >= p.v0) & (obs.voxel[a:b] < p.v1))
    assert np.all(seen == 1)


def test_rows_in_any_order_merge_the_same(stills_run):
    """Observations whose rows come in another order (as reindexing leaves
    them) are grouped by image and voxel first: the same scales, rejections
    and map, byte for byte (rows of one image and voxel, the symmetry mates
    an image saw, keep their order: the stable sort restores the rows)."""
    import dataclasses

    from dials_diffuse.observations import rows_grouped
    from dials_diffuse.scaling import refine_scales
    from dials_diffuse.statistics import image_halves

    truth, _, result = stills_run
    obs = result["observations"]
    assert rows_grouped(obs)
    pair = obs.image.astype(np.int64) * obs.n_voxels + obs.voxel
    shuffle = np.argsort(np.random.default_rng(3).random(obs.n_images * obs.n_voxels)[pair],
                         kind="stable")
    shuffled = dataclasses.replace(obs, **{k: getattr(obs, k)[shuffle].copy() for k in
                                           ("voxel", "image", "signal", "factor", "variance")})
    assert not rows_grouped(shuffled)
    params = merge_params("unused").scaling
    halves = image_halves(obs.n_images, 0)
    a = refine_scales(obs, params, halves=halves)
    b = refine_scales(shuffled, params, halves=halves)
    assert rows_grouped(shuffled)
    assert np.array_equal(shuffled.voxel, obs.voxel) and np.array_equal(shuffled.image, obs.image)
    assert np.array_equal(shuffled.signal, obs.signal)
    assert np.array_equal(a.rejected, b.rejected)
    assert np.array_equal(a.model.scale, b.model.scale)
    assert np.array_equal(a.intensity, b.intensity, equal_nan=True)
    assert np.array_equal(a.sigma, b.sigma, equal_nan=True)
