"""Phase 1 processing on real thaumatin stills (dials_diffuse.processing, dials_compat).

Uses 3 of the 19 grid-scan stills: 0001 and 0009 (crystal) and 0017 (beam off
the crystal, 1 strong spot), plus a synthetic rotation sweep (predicted spots,
no images) for index_and_refine_sequence.  About 30 s on 2 cores.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thaumatin_grid_stills"
IMAGES = {n: DATA / f"thau_3_2_{n:04d}.cbf.bz2" for n in (1, 9, 17)}
SYMMETRY = ("P41212", (57.9, 57.9, 150.2, 90, 90, 90))

needs_data = pytest.mark.skipif(
    not all(p.exists() for p in IMAGES.values()),
    reason=f"real thaumatin stills not found in {DATA} (expects ../shared beside the checkout)",
)


def test_compat_shim_makes_mono_simulation_importable():
    from dials_diffuse.dials_compat import ensure_stills_indexing

    status = ensure_stills_indexing()
    assert status in ("native", "shimmed")
    assert ensure_stills_indexing() == status  # idempotent

    from xfel.mono_simulation.max_like import minimizer
    from xfel.mono_simulation.util import green_curve_area

    assert callable(minimizer) and callable(green_curve_area)
    assert minimizer.__module__ == "xfel.mono_simulation.max_like"  # the real code
    if status == "shimmed":
        import xfel.mono_simulation as pkg

        # nothing from the missing extension is stubbed: it still fails loudly
        assert "xfel_mono_sim_ext" not in sys.modules
        with pytest.raises(ImportError):
            from xfel.mono_simulation import bandpass_gaussian  # noqa: F401
        with pytest.raises(AttributeError, match="xfel_mono_sim_ext"):
            pkg.bandpass_gaussian


def test_make_params_overrides():
    from dials.command_line.index import working_phil

    from dials_diffuse.processing import make_params

    p = make_params(working_phil, ["indexing.method=fft1d"], ["d_min_start=2.5", "method=fft3d"])
    assert p.indexing.method == "fft3d"
    assert p.indexing.refinement_protocol.d_min_start == 2.5
    # an extracted object passes through, later overrides still apply
    q = make_params(working_phil, p, "stills.indexer=stills")
    assert q.indexing.refinement_protocol.d_min_start == 2.5
    assert q.indexing.stills.indexer == "stills"


@pytest.fixture(scope="module")
def imported():
    from dials_diffuse.processing import import_images

    return import_images([IMAGES[n] for n in (1, 9, 17)])


@pytest.fixture(scope="module")
def strong(imported):
    from dials_diffuse.processing import find_spots

    return find_spots(imported)


@pytest.fixture(scope="module")
def indexed(imported, strong):
    from dials_diffuse.processing import index_stills

    return index_stills(imported, strong, known_symmetry=SYMMETRY)


@needs_data
def test_import_zero_oscillation_cbfs_as_stills(imported):
    assert len(imported) == 3
    for expt, n in zip(imported, (1, 9, 17)):
        assert expt.is_still()
        assert expt.scan is None and expt.goniometer is None
        assert len(expt.imageset) == 1
        assert Path(expt.imageset.get_path(0)).name == IMAGES[n].name
        assert expt.identifier
    assert abs(imported[0].detector[0].get_distance() - 351.0) < 0.01


@needs_data
def test_find_spots(imported, strong):
    ids = list(strong["id"])
    counts = [ids.count(i) for i in range(3)]
    assert counts[0] > 100 and counts[1] > 500 and counts[2] < 10
    assert "shoebox" in strong and "n_signal" in strong  # as dials.find_spots
    assert set(strong.experiment_identifiers().values()) <= set(imported.identifiers())


@needs_data
def test_index_real_stills(indexed):
    by_image = {Path(r.path).name: r for r in indexed.report}
    assert len(indexed.report) == 3
    assert len(indexed.experiments) == 2 == indexed.n_indexed_images
    for n in (1, 9):
        r = by_image[IMAGES[n].name]
        assert r.status == "indexed", r.reason
        a, b, c, al, be, ga = r.unit_cell
        # per-still cells are ~1 % large with the header distance
        assert math.isclose(a, 57.9, rel_tol=0.02) and math.isclose(b, 57.9, rel_tol=0.02)
        assert math.isclose(c, 150.2, rel_tol=0.02)
        assert all(math.isclose(x, 90, abs_tol=0.01) for x in (al, be, ga))
        assert r.space_group.startswith("P 41 21 2")
        assert r.n_indexed > 30 and r.rmsd_x_px < 2 and r.rmsd_y_px < 2
        expt = indexed.experiments[r.experiment_id]
        assert Path(expt.imageset.get_path(0)).name == IMAGES[n].name
        assert expt.crystal.get_space_group().type().number() == 92
        sel = indexed.reflections["id"] == r.experiment_id
        assert sel.count(True) == r.n_indexed
        assert indexed.reflections.experiment_identifiers()[r.experiment_id] == expt.identifier


@needs_data
def test_parallel_indexing_equals_serial(indexed, imported, strong):
    """Two worker processes give the same crystals (to rounding: a worker
    starts from the parent's state, not from the previous still's),
    reflections and report (every still is indexed from the same seeds)."""
    from dials_diffuse.processing import index_stills

    parallel = index_stills(imported, strong, known_symmetry=SYMMETRY, nproc=2)
    assert [r.status for r in parallel.report] == [r.status for r in indexed.report]
    assert [r.unit_cell for r in parallel.report] == [r.unit_cell for r in indexed.report]
    for a, b in zip(parallel.experiments, indexed.experiments):
        assert a.identifier == b.identifier
        assert np.allclose(a.crystal.get_A(), b.crystal.get_A(), rtol=1e-9, atol=1e-12)
        assert a.imageset.get_path(0) == b.imageset.get_path(0)
    assert len(parallel.reflections) == len(indexed.reflections)
    assert list(parallel.reflections["miller_index"]) == list(indexed.reflections["miller_index"])


@needs_data
def test_image_without_crystal_is_a_reported_failure(indexed, imported, strong):
    r = next(r for r in indexed.report if Path(r.path).name == IMAGES[17].name)
    assert r.status == "failed" and not r.indexed
    assert "strong spots" in r.reason and r.experiment_id is None
    # with the spot-count guard off, the indexer's own exception is reported too
    from dials.array_family import flex

    from dials_diffuse.processing import index_stills

    spots = strong.select(strong["id"] == 2)
    spots["id"] = flex.int(len(spots), 0)
    ids = spots.experiment_identifiers()
    for k in list(ids.keys()):
        del ids[k]
    ids[0] = imported[2].identifier
    res = index_stills(imported[2:], spots, SYMMETRY, min_spots=0)
    assert [x.status for x in res.report] == ["failed"]
    assert res.report[0].reason
    assert len(res.experiments) == 0 and len(res.reflections) == 0


@needs_data
def test_refine_shared_detector(indexed):
    from dials_diffuse.processing import refine_shared_detector

    expts, refl, info = refine_shared_detector(indexed.experiments, indexed.reflections)
    assert len(expts.detectors()) == 1 and len(expts) == 2
    assert info["n_reflections_used"] > 100
    # two stills already pull the distance well below the 351.0 mm header value
    assert 340 < info["distance_after_mm"] < 350.5
    assert indexed.experiments[0].detector[0].get_distance() == pytest.approx(351.0)


def _synthetic_rotation_sweep(n_images=60, osc=0.1, d_min=3.0):
    """Rotation experiment (no image files) + 'strong spots' = jittered predictions.

    A thaumatin crystal in a known orientation on a simple 1000x1000 PAD; the
    imageset points at nonexistent files (check_format=False), which is all
    indexing and refinement need.
    """
    from cctbx import crystal as cctbx_crystal
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model import (
        BeamFactory,
        Crystal,
        DetectorFactory,
        Experiment,
        GoniometerFactory,
        ScanFactory,
    )
    from dxtbx.model.experiment_list import ExperimentList
    from scitbx import matrix

    from dials.array_family import flex

    beam = BeamFactory.simple(0.96859)
    detector = DetectorFactory.simple(
        "PAD", 200.0, (86.0, 86.0), "+x", "-y", (0.172, 0.172), (1000, 1000), (-1, 1e6)
    )
    gonio = GoniometerFactory.known_axis((1, 0, 0))
    scan = ScanFactory.make_scan(
        (1, n_images), osc, (0.0, osc), {i: 0.1 * i for i in range(1, n_images + 1)}
    )
    seq = ImageSetFactory.make_sequence(
        "/nonexistent/rot_#####.cbf",
        list(range(1, n_images + 1)),
        beam=beam,
        detector=detector,
        goniometer=gonio,
        scan=scan,
        check_format=False,
    )
    sym = cctbx_crystal.symmetry(unit_cell=SYMMETRY[1], space_group_symbol=SYMMETRY[0])
    B = matrix.sqr(sym.unit_cell().fractionalization_matrix()).transpose()
    U = matrix.col((1, 2, 3)).normalize().axis_and_angle_as_r3_rotation_matrix(0.7)
    Ai = (U * B).inverse()
    truth = Crystal(
        matrix.col(Ai[0:3]), matrix.col(Ai[3:6]), matrix.col(Ai[6:9]), space_group=sym.space_group()
    )
    pred = flex.reflection_table.from_predictions(
        Experiment(imageset=seq, beam=beam, detector=detector, goniometer=gonio, scan=scan, crystal=truth),
        dmin=d_min,
    )
    rng = flex.mersenne_twister(0)
    x, y, z = pred["xyzcal.px"].parts()
    x += rng.random_double(len(x)) * 0.6 - 0.3
    y += rng.random_double(len(x)) * 0.6 - 0.3
    z += rng.random_double(len(x)) * 0.3 - 0.15
    strong = flex.reflection_table()
    strong["xyzobs.px.value"] = flex.vec3_double(x, y, z)
    strong["xyzobs.px.variance"] = flex.vec3_double(len(x), (0.1, 0.1, 0.1))
    strong["panel"] = pred["panel"]
    strong["id"] = flex.int(len(x), 0)
    strong["bbox"] = flex.int6(
        [(int(a) - 2, int(a) + 3, int(b) - 2, int(b) + 3, max(0, int(c) - 1), min(n_images, int(c) + 2))
         for a, b, c in zip(x, y, z)]
    )
    strong.set_flags(flex.bool(len(x), True), strong.flags.strong)
    experiments = ExperimentList(
        [Experiment(imageset=seq, beam=beam, detector=detector, goniometer=gonio, scan=scan)]
    )
    experiments[0].identifier = "synthetic-rotation"
    strong.experiment_identifiers()[0] = "synthetic-rotation"
    strong.centroid_px_to_mm(experiments)
    return experiments, strong


def test_index_and_refine_synthetic_sequence():
    from dials_diffuse.processing import index_and_refine_sequence

    experiments, strong = _synthetic_rotation_sweep()
    assert not experiments[0].is_still()
    # fft1d: the default fft3d grid search takes ~15 s here
    expts, refl, info = index_and_refine_sequence(
        experiments, strong, SYMMETRY, params_overrides=["indexing.method=fft1d"]
    )
    assert info["n_indexed"] > 0.95 * info["n_strong"]
    assert info["space_groups"] == ["P 41 21 2 (No. 92)"]
    a, b, c = info["unit_cells"][0][:3]
    assert a == pytest.approx(57.9, abs=0.05) and c == pytest.approx(150.2, abs=0.15)
    crystal = expts[0].crystal
    assert crystal.num_scan_points == len(expts[0].imageset) + 1  # scan-varying
    assert info["final_rmsds"]["RMSD_X_mm"] < 0.1
