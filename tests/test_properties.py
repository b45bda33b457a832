"""Property tests (hypothesis) of geometry, symmetry in the merge, and merging.

* pixel -> q -> hkl (dials_diffuse.geometry) -> q = A hkl -> s1 = s0 + q ->
  the panel's ray intersection gives the same pixel back, for random beams,
  crystals and multi-panel detectors with tilted panels;
* the merge maps any Laue-symmetry mate of the observations to the same ASU
  voxels (the symmetry tests of the functions themselves are in
  test_symmetry.py);
* merging is invariant to the order of the image files;
* data multiplied by known factors f_i per image give scales b_i in the ratio
  of f_i;
* the extraction's binning primitives: the radix sort orders any keys, runs
  combine into the same sums as np.unique, and the key box of an image holds
  the voxel of every pixel within its resolution.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dials_diffuse import geometry, symmetry
from dials_diffuse.diffuse_files import read_image_file, write_image_file
from dials_diffuse.merging import merge_run

import diffuse_helpers as helpers

SLOW = settings(max_examples=6, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------
# geometry round trip


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rotation(axis, angle_deg):
    from scitbx import matrix

    return np.array(matrix.col(tuple(_unit(axis))).axis_and_angle_as_r3_rotation_matrix(
        angle_deg, deg=True)).reshape(3, 3)


angles = st.floats(-25, 25)
axes = st.tuples(*(st.floats(-1, 1) for _ in range(3))).filter(lambda v: np.linalg.norm(v) > 0.2)


@st.composite
def geometries(draw):
    """(beam, detector, crystal): 1-4 tilted panels, an oblique beam, a random crystal."""
    from dxtbx.model import BeamFactory, Crystal, Detector, Panel

    wavelength = draw(st.floats(0.5, 2.0))
    direction = _unit([draw(st.floats(-0.05, 0.05)), draw(st.floats(-0.05, 0.05)), 1.0])
    beam = BeamFactory.simple_directional(tuple(direction), wavelength)
    detector = Detector()
    n_panels = draw(st.integers(1, 4))
    for k in range(n_panels):
        n_fast, n_slow = draw(st.integers(5, 40)), draw(st.integers(5, 40))
        pixel = draw(st.floats(0.05, 0.2))
        tilt = _rotation(draw(axes), draw(angles))
        fast = tilt @ np.array([1.0, 0, 0])
        slow = tilt @ np.array([0, -1.0, 0])
        distance = draw(st.floats(60, 300))
        # panels side by side round the beam, each tilted about its own axis
        centre = np.array([(k % 2 - 0.5) * 30, (k // 2 - 0.5) * 30, -distance])
        origin = centre - fast * n_fast * pixel / 2 - slow * n_slow * pixel / 2
        panel = Panel()
        panel.set_frame(tuple(fast), tuple(slow), tuple(origin))
        panel.set_pixel_size((pixel, pixel))
        panel.set_image_size((n_fast, n_slow))
        panel.set_trusted_range((-1, 1e6))
        detector.add_panel(panel)
    a, b, c = (draw(st.floats(20, 120)) for _ in range(3))
    U = _rotation(draw(axes), draw(st.floats(0, 180)))
    real = U @ np.diag([a, b, c])
    crystal = Crystal(tuple(real[:, 0]), tuple(real[:, 1]), tuple(real[:, 2]), space_group_symbol="P1")
    return beam, detector, crystal


@given(geom=geometries(), data=st.data())
@settings(max_examples=60, deadline=None)
def test_pixel_hkl_pixel_round_trip(geom, data):
    beam, detector, crystal = geom
    s0 = np.array(beam.get_s0())
    A = np.array(crystal.get_A()).reshape(3, 3)
    for g in geometry.detector_geometry(detector):
        panel = detector[g.panel_id]
        picks = data.draw(st.lists(st.integers(0, g.n_pixels - 1), min_size=1, max_size=5))
        q = geometry.scattering_vectors(g.unit_s1[picks], s0)
        hkl = geometry.miller_indices(q, A)
        for n, h in zip(picks, hkl):
            q_back = A @ h
            s1 = s0 + q_back
            assert math.isclose(np.linalg.norm(s1), np.linalg.norm(s0), rel_tol=1e-9)
            x, y = panel.get_ray_intersection_px(tuple(s1))
            assert abs(x - (g.fast[n] + 0.5)) < 1e-6 and abs(y - (g.slow[n] + 0.5)) < 1e-6
        # the whole detector agrees on the panel (panels do not overlap along these rays)
        panel_id, _ = detector.get_ray_intersection(tuple(s0 + A @ hkl[0]))
        assert panel_id == g.panel_id


# --------------------------------------------------------------------------
# merging properties on a small extraction


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    from diffuse_helpers import extraction_params

    from dials_diffuse.extraction import extract
    from dials_diffuse.simulate import load_truth, params_from, simulate_dataset

    base = tmp_path_factory.mktemp("properties")
    truth = load_truth(simulate_dataset(params_from(**{
        "mode": "stills", "n_images": 6, "random_seed": 41, "detector.format": "generic",
        "detector.n_fast": 128, "detector.n_slow": 128, "detector.distance": 80,
        "output.directory": str(base / "data")})))
    params = extraction_params(truth, base / "ex", **{
        "output.save_pixels": "off", "filter.pixel_step": 2, "mp.nproc": 1})
    params.grid.ndiv_h = params.grid.ndiv_k = params.grid.ndiv_l = 2
    manifest = extract(truth.experiments, params, progress=False)
    files = [str(base / "ex" / e["file"]) for e in manifest["images"]]
    return truth, base, files


def merge_params(directory, **overrides):
    return helpers.merge_params(directory, **{"output.ccp4_maps": False, **overrides})


@pytest.fixture(scope="module")
def reference(extraction, tmp_path_factory):
    truth, _, files = extraction
    return merge_run(truth.experiments, files, merge_params(tmp_path_factory.mktemp("ref")))


def _same_map(a, b):
    ma, mb = a["merged"], b["merged"]
    assert np.array_equal(ma.voxel_grid, mb.voxel_grid)
    assert np.array_equal(ma.intensity, mb.intensity)
    assert np.array_equal(ma.sigma, mb.sigma)
    assert np.array_equal(a["scaling"].model.scale, b["scaling"].model.scale)


@given(order=st.permutations(range(6)))
@SLOW
def test_merge_invariant_to_image_order(extraction, reference, tmp_path, order):
    truth, _, files = extraction
    result = merge_run(truth.experiments, [files[i] for i in order], merge_params(tmp_path / "m"))
    _same_map(result, reference)


@given(picks=st.lists(st.integers(0, 10**6), min_size=6, max_size=6))
@SLOW
def test_merge_maps_symmetry_mates_to_the_same_asu(extraction, reference, tmp_path, picks):
    """Each image's voxels replaced by a symmetry mate (a Laue operator chosen
    per image): the merged ASU map is unchanged."""
    truth, _, files = extraction
    ops = symmetry.laue_operators(truth.experiments[0].crystal.get_space_group(), "laue")
    mates = tmp_path / "mates"
    mates.mkdir(exist_ok=True)
    copies = []
    for path, pick in zip(files, picks):
        arrays, meta = read_image_file(path)
        R = np.asarray(ops[pick % len(ops)])
        arrays["voxel_indices"] = (arrays["voxel_indices"] @ R).astype(np.int32)
        copies.append(str(mates / path.rsplit("/", 1)[1]))
        write_image_file(copies[-1], arrays, meta)
    result = merge_run(truth.experiments, copies, merge_params(tmp_path / "m"))
    assert np.all(symmetry.is_in_asu(result["merged"].voxel_grid, (2, 2, 2), ops))
    _same_map(result, reference)


@given(factors=st.lists(st.floats(0.3, 3.0), min_size=6, max_size=6))
@SLOW
def test_scaling_recovers_known_factors(extraction, reference, tmp_path, factors):
    truth, _, files = extraction
    scaled = tmp_path / "scaled"
    if scaled.exists():
        shutil.rmtree(scaled)
    scaled.mkdir()
    copies = []
    for path, f in zip(files, factors):
        arrays, meta = read_image_file(path)
        # the same photons recorded with corrections f times smaller (e.g. a
        # shorter exposure time): the image's intensities are f times larger,
        # its counting statistics unchanged, so b_i must come out f times larger
        arrays["voxel_sum_factor"] = (arrays["voxel_sum_factor"].astype(np.float64) / f).astype(np.float32)
        copies.append(str(scaled / path.rsplit("/", 1)[1]))
        write_image_file(copies[-1], arrays, meta)
    overrides = {"scaling.convergence_tolerance": 1e-9, "scaling.max_iterations": 200}
    base = merge_run(truth.experiments, files, merge_params(tmp_path / "b", **overrides))
    result = merge_run(truth.experiments, copies, merge_params(tmp_path / "m", **overrides))
    ratio = result["scaling"].model.scale / base["scaling"].model.scale
    f = np.array(factors)
    np.testing.assert_allclose(ratio / ratio.mean(), f / f.mean(), rtol=1e-3)


# --------------------------------------------------------------------------
# binning primitives of the extraction


@given(keys=st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=300),
       wide=st.booleans())
@settings(max_examples=80, deadline=None)
def test_sort_keys_is_a_stable_argsort(keys, wide):
    from dials_diffuse.grid import sort_keys

    k = np.array(keys, dtype=np.int64 if wide else np.int32)
    assert np.array_equal(sort_keys(k), np.argsort(k, kind="stable"))


@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_combine_runs_equals_unique_sums(data):
    from dials_diffuse.grid import bin_runs, combine_runs

    n = data.draw(st.integers(1, 200))
    extent = np.array(data.draw(st.lists(st.integers(1, 9), min_size=3, max_size=3)))
    lower = np.array(data.draw(st.lists(st.integers(-5, 5), min_size=3, max_size=3)))
    keys = np.array(data.draw(st.lists(st.integers(0, int(np.prod(extent)) - 1),
                                       min_size=n, max_size=n)), np.int32)
    counts = np.array(data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n)))
    values = np.array(data.draw(st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n)))
    unique, inverse = np.unique(keys, return_inverse=True)
    got_keys, got_counts, got_sums = combine_runs(keys, counts, {"v": values})
    assert np.array_equal(got_keys, unique)
    assert np.array_equal(got_counts, np.bincount(inverse, weights=counts).astype(int))
    assert np.allclose(got_sums["v"], np.bincount(inverse, weights=values), atol=1e-9)
    # decoded voxels: the grid indices whose keys these are
    vox, _, _ = bin_runs(keys, counts, {"v": values}, lower, extent)
    strides = np.array([extent[1] * extent[2], extent[2], 1])
    assert np.array_equal((vox - lower) @ strides, unique)


@given(geom=geometries(), ndiv=st.sampled_from([(1, 1, 1), (4, 4, 2), (5, 3, 7)]))
@settings(max_examples=40, deadline=None)
def test_key_box_holds_every_pixel_voxel(geom, ndiv):
    """Keys of every pixel within q_max lie in [0, prod(extent)) and decode
    back to rint(ndiv * hkl) of the pixel."""
    from dials_diffuse.extraction import VoxelKeys
    from dials_diffuse.grid import decode, key_box, voxel_indices

    beam, detector, crystal = geom
    setting_inv = np.linalg.inv(np.array(crystal.get_A()).reshape(3, 3))
    q = np.concatenate([
        geometry.scattering_vectors(g.unit_s1, beam.get_s0())
        for g in geometry.detector_geometry(detector, 3)
    ])
    q_max = float(np.sqrt(np.einsum("ij,ij->i", q, q)).max())
    lower, extent = key_box(setting_inv, ndiv, q_max)
    keys = VoxelKeys(setting_inv, ndiv, lower, extent)(np.ascontiguousarray(q.T, np.float32))
    assert keys.min() >= 0 and keys.max() < np.prod(extent)
    hkl = q @ setting_inv.T
    expected = voxel_indices(hkl, ndiv)
    # float32 rounding may move a pixel within 1e-4 of a voxel boundary
    near_boundary = np.any(np.abs(hkl * np.asarray(ndiv) % 1.0 - 0.5) < 1e-4, axis=1)
    got = decode(keys, lower, extent)
    assert np.array_equal(got[~near_boundary], expected[~near_boundary])
