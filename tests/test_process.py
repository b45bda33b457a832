"""dials.diffuse_process end to end (dials_diffuse.pipeline, command_line/process.py).

* simulated stills (4 x 320x320 px, P212121 50x60x70, made here): import ->
  spots -> stills indexing (known symmetry) -> shared-detector refinement ->
  extraction -> diagnostics -> merge -> diagnostics; the merged map against
  the simulator's truth; re-runs reuse finished steps, overwrite=True redoes
  them, changed merge parameters redo only the merge;
* validation against a reference PDB (continue / stop);
* real thaumatin stills 0001, 0002 and 0017 (0017 does not index and is
  listed), pixel_step=4;
* started from DIALS' crystal models (refined.expt imported.expt
  refined.refl): phase 1 skipped, the same map as from the images;
* bad input: one-line Sorry, exit status 1, nothing written.

The command runs in a subprocess (exit status, stderr, a fresh log each run).
About 90 s on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import INDEXABLE_STILLS_PARAMS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thaumatin_grid_stills"
THAUMATIN = [DATA / f"thau_3_2_{n:04d}.cbf.bz2" for n in (1, 2, 17)]
PRESETS = Path(__file__).resolve().parents[1] / "phil"

SIM_PARAMS = INDEXABLE_STILLS_PARAMS
SIM_SYMMETRY = [
    "indexing.known_symmetry.space_group=P212121",
    "indexing.known_symmetry.unit_cell=50,60,70,90,90,90",
]
NDIV = 2
# Bragg mask to 3 x the simulated mosaicity: the simulator draws every partial
# spot out to 4 sigma (0.6 deg leaves enough of them for CC 0.89 on all voxels)
SIM_ARGS = SIM_SYMMETRY + [f"grid.ndiv_{a}={NDIV}" for a in "hkl"] + [
    "check.max_plot_points=5000", "masking.bragg.max_delpsi=0.9"]


def run_process(args, cwd, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "dials_diffuse.command_line.process", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"dials.diffuse_process failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def summary_of(base):
    return json.loads((Path(base) / "dials.diffuse_process.json").read_text())


@pytest.fixture(scope="module")
def sim_data(tmp_path_factory):
    from dials_diffuse.simulate import params_from, simulate_dataset

    directory = tmp_path_factory.mktemp("process_sim") / "data"
    return simulate_dataset(params_from(**{**SIM_PARAMS, "output.directory": str(directory)}))


@pytest.fixture(scope="module")
def sim_run(sim_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("process_run")
    images = sorted(sim_data.glob("image_*.cbf"))
    proc = run_process([*images, "output.base_dir=run", *SIM_ARGS], cwd=work)
    return work / "run", images, proc


# --------------------------------------------------------------------------
# PHIL
# --------------------------------------------------------------------------
def test_phil_one_definition_and_short_names():
    from dials_diffuse import pipeline
    from dials_diffuse.command_line import extract, merge

    defs = {d.path: d for d in pipeline.phil_scope.all_definitions()}
    # the commands' definitions, nested; the grid once; DIALS' under their names
    for path in extract.phil_scope.all_definitions():
        if not path.path.startswith(("grid.", "output.log")):
            assert "extract." + path.path in defs, path.path
    for path in merge.phil_scope.all_definitions():
        if not path.path.startswith(("grid.", "output.log")):
            assert "merge." + path.path in defs, path.path
    assert "grid.ndiv_h" in defs and "extract.grid.ndiv_h" not in defs
    for name in ("spotfinder.threshold.dispersion.global_threshold",
                 "indexing.known_symmetry.space_group", "indexing.known_symmetry.unit_cell",
                 "refinement.parameterisation.detector.fix", "mp.nproc"):
        assert name in defs, name
    p = pipeline.params_from("filter.pixel_step=3", "filter.d_min=2.5", "bragg.border=4",
                             "spotfinder.filter.d_min=3", **{"output.base_dir": "x"})
    assert p.extract.filter.pixel_step == 3
    assert p.extract.filter.d_min == 2.5 and p.spotfinder.filter.d_min == 3
    assert p.extract.masking.bragg.border == 4
    # this command's default: the first image's masks (the diagnostics' overlay)
    assert p.extract.output.masks is True and p.extract.output.mask_images == "first"
    assert p.processing.mode == "auto" and p.validation.on_failure == "continue"


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.phil")))
def test_preset_files(preset):
    from dials_diffuse import pipeline
    from dials_diffuse.command_util import split_preset_files

    args, ignored = split_preset_files([str(PRESETS / preset)], pipeline.phil_scope)
    assert not ignored
    params = pipeline.params_from(*args)
    text = (PRESETS / preset).read_text()
    if "pixel_step" in text:
        assert params.extract.filter.pixel_step == int(text.split("pixel_step =")[1].split()[0])
    if preset == "thaumatin_grid_stills.phil":
        assert params.extract.filter.d_min == 2.0 and params.spotfinder.filter.d_min is None
        assert (params.grid.ndiv_h, params.grid.ndiv_k, params.grid.ndiv_l) == (4, 4, 2)


def test_dials_overrides_pass_only_dials_scopes():
    from dials_diffuse import pipeline

    args = ["indexing.method=fft3d", "filter.pixel_step=2", "spotfinder.filter.min_spot_size=3",
            "known_symmetry.space_group=P41212"]
    p = pipeline.params_from(*args)
    explicit = pipeline.dials_arguments(args)
    scopes = pipeline.dials_overrides(p, dials_args=explicit)
    text = "".join(s.as_str() for s in scopes)
    # fft3d is DIALS' default, but given explicitly it overrides the stills fft1d
    assert "fft3d" in text and "min_spot_size = 3" in text and "pixel_step" not in text
    assert "P 41 21 2" in text or "P41212" in text

    from dials.command_line.index import working_phil
    from dials_diffuse.processing import DEFAULT_STILLS_INDEXING, make_params

    params = make_params(working_phil, list(DEFAULT_STILLS_INDEXING), scopes)
    assert params.indexing.method == "fft3d"
    assert params.indexing.stills.indexer == "stills"


# --------------------------------------------------------------------------
# Simulated stills, end to end
# --------------------------------------------------------------------------
def test_simulated_stills_end_to_end(sim_run, sim_data):
    base, images, _ = sim_run
    s = summary_of(base)
    assert s["mode"] == "stills" and s["n_images"] == 4
    assert s["n_indexed"] == 4 and s["n_extracted"] == 4 and not s["failures"]
    steps = s["steps"]
    for name in ("import", "find_spots", "index", "refine", "validation", "extraction",
                 "extraction_diagnostics", "merge", "phase3_diagnostics"):
        assert name in steps, name
        assert steps[name]["status"] in ("done", "passed"), (name, steps[name])
    assert steps["refine"]["shared_detector"] == "done"
    for e in s["images"]:
        assert e["status"] == "extracted"
        np.testing.assert_allclose(e["unit_cell"][:3], (50, 60, 70), rtol=0.01)
    for name in ("imported.expt", "strong.refl", "indexed.expt", "indexed.refl", "refined.expt",
                 "refined.refl", "dials.diffuse_process.log", "intermediate_outputs_manifest.json",
                 "diffuse_extracted/extraction_manifest.json",
                 "diffuse_extracted/total_mask_000000.pickle",
                 "diffuse_merged/global_voxel_grid_definition.json",
                 "diffuse_merged/voxel_data_relative.npz", "diffuse_merged/diffuse_total.ccp4",
                 "extraction_diagnostics/diffuse_pixel_overlay.png",
                 "extraction_diagnostics/extraction_diagnostics_summary.txt",
                 "phase3_diagnostics/merged_intensity_slice_L0.png",
                 "phase3_diagnostics/phase3_diagnostics_summary.txt",
                 "per_image/image_00001_refined.expt"):
        assert (base / name).is_file(), name
    # masks of the first image only (output.mask_images=first)
    assert not list((base / "diffuse_extracted").glob("*_mask_00000[1-9].pickle"))
    manifest = json.loads((base / "intermediate_outputs_manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert "refined.expt" in listed and "diffuse_merged/voxel_data_relative.npz" in listed
    assert not any(Path(p).name.startswith(".") for p in listed)  # no temporary files
    assert s["merge"]["cc_half_overall"]["cc_half_total"] > 0.8

    # the merged map against the truth, voxel by voxel (Laue-invariant truth),
    # as the default job prints it
    from dials_diffuse.simulate.compare import compare_with_truth

    comparison = compare_with_truth(base / "diffuse_merged", sim_data)
    cc, cc_off = comparison["cc_all"], comparison["cc_off_bragg"]
    # measured 0.918 (all voxels) and 0.913 (off Bragg positions) since the
    # simulator draws realistic partial spots (0.947 / 0.940 with DIALS'
    # for_ub spots, which stop at 0.09 deg from the Ewald sphere)
    assert cc > 0.9 and cc_off > 0.9, (cc, cc_off)


def test_rerun_reuses_steps_and_overwrite_redoes(sim_run, tmp_path):
    import shutil

    base, images, _ = sim_run
    work = tmp_path
    shutil.copytree(base, work / "run")
    refined_mtime = (work / "run" / "refined.expt").stat().st_mtime_ns

    proc = run_process([*images, "output.base_dir=run", *SIM_ARGS], cwd=work)
    s = summary_of(work / "run")
    for name in ("index", "extraction", "merge", "phase3_diagnostics"):
        assert s["steps"][name]["status"] == "reused", (name, s["steps"][name])
    assert "Phase 1: reusing" in proc.stdout and "Indexed" not in proc.stdout
    assert (work / "run" / "refined.expt").stat().st_mtime_ns == refined_mtime
    assert s["n_extracted"] == 4

    # a merge parameter changed: only the merge (and its diagnostics) redone
    run_process([*images, "output.base_dir=run", *SIM_ARGS, "merge.symmetry.merge=friedel",
                 "diagnostics.merged=False"], cwd=work)
    s = summary_of(work / "run")
    assert s["steps"]["extraction"]["status"] == "reused"
    assert s["steps"]["merge"]["status"] == "done"
    assert s["merge"]["symmetry_merge"] == "friedel"

    # overwrite=True redoes everything
    run_process([*images, "output.base_dir=run", *SIM_ARGS, "output.overwrite=True",
                 "diagnostics.extraction=False", "diagnostics.merged=False"], cwd=work)
    s = summary_of(work / "run")
    assert s["steps"]["index"]["status"] == "done"
    assert s["steps"]["extraction"]["status"] == "done"
    assert s["steps"]["merge"]["status"] == "done"
    assert (work / "run" / "refined.expt").stat().st_mtime_ns != refined_mtime


def test_validation_against_reference_pdb(sim_run, tmp_path):
    import shutil

    from dials_diffuse import pipeline

    base, images, _ = sim_run
    good = tmp_path / "good.pdb"
    good.write_text("CRYST1   50.000   60.000   70.000  90.00  90.00  90.00 P 21 21 21    4\nEND\n")
    bad = tmp_path / "bad.pdb"
    bad.write_text("CRYST1   55.000   55.000   70.000  90.00  90.00  90.00 P 41 21 2     8\nEND\n")
    expts = pipeline.load_expts(base / "refined.expt", check_format=False)
    params = pipeline.default_params()
    ok = pipeline.validate(expts, params, pipeline.read_reference_symmetry(str(good)))
    assert ok["failed"] == {} and ok["passed"] == 4
    ko = pipeline.validate(expts, params, pipeline.read_reference_symmetry(str(bad)))
    assert sorted(ko["failed"]) == [0, 1, 2, 3]
    reasons = " ".join(ko["failed"][0])
    assert "Laue group" in reasons and "differs from the reference" in reasons

    # on_failure=stop: Sorry, exit 1, the failures in the summary (phase 1 reused)
    shutil.copytree(base, tmp_path / "run")
    proc = run_process([*images, "output.base_dir=run", *SIM_ARGS, f"reference_pdb={bad}",
                        "validation.on_failure=stop"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Sorry" in proc.stderr and "validation failed" in proc.stderr
    s = summary_of(tmp_path / "run")
    assert s["steps"]["validation"]["status"] == "4 failed"
    assert {f["stage"] for f in s["failures"]} == {"validation"}


def test_from_refined_experiments(sim_run, tmp_path):
    """Started from the crystal models after dials.refine (phase 1's
    refined.expt, imported.expt and refined.refl), phase 1 is skipped; the
    same models and images give the same map as the run from the images; a
    rerun reuses the extraction and the merge."""
    base, images, _ = sim_run
    models = [base / "refined.expt", base / "imported.expt", base / "refined.refl"]
    args = [*models, "output.base_dir=run", *SIM_ARGS, "diagnostics.extraction=False"]
    run_process(args, cwd=tmp_path)
    s = summary_of(tmp_path / "run")
    assert s["steps"]["phase1"]["status"] == "skipped"
    assert not {"import", "find_spots", "index", "refine"} & set(s["steps"])
    assert s["mode"] == "stills" and s["n_images"] == 4 and s["n_indexed"] == 4
    assert s["n_extracted"] == 4 and not s["failures"]
    for name in ("extraction", "merge", "phase3_diagnostics"):
        assert s["steps"][name]["status"] == "done", (name, s["steps"][name])
    assert (tmp_path / "run" / "phase3_diagnostics" / "phase3_diagnostics_summary.txt").is_file()
    with np.load(base / "diffuse_merged" / "voxel_data_relative.npz") as a, \
            np.load(tmp_path / "run" / "diffuse_merged" / "voxel_data_relative.npz") as b:
        assert np.array_equal(a["voxel_indices"], b["voxel_indices"])
        assert np.array_equal(a["I_merged_relative"], b["I_merged_relative"], equal_nan=True)

    run_process(args, cwd=tmp_path)
    s = summary_of(tmp_path / "run")
    assert s["steps"]["extraction"]["status"] == "reused"
    assert s["steps"]["merge"]["status"] == "reused"

    # bad input: one-line Sorry, nothing written
    from dxtbx.model.experiment_list import ExperimentListFactory

    crystals_only = ExperimentListFactory.from_json_file(str(base / "refined.expt"),
                                                         check_format=False)
    for expt in crystals_only:
        expt.imageset = None
    crystals_only.as_file(str(tmp_path / "crystals_only.expt"))
    for bad, expected in (([base / "refined.refl"], "needs the experiments"),
                          ([base / "imported.expt"], "has no crystal"),
                          ([tmp_path / "crystals_only.expt"], "has no images"),
                          ([images[0], base / "refined.expt"], "not both")):
        msg = _sorry(run_process([*bad, "output.base_dir=bad"], cwd=tmp_path, check=False))
        assert expected in msg, msg
        assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------
def _sorry(proc):
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("Sorry:"), proc.stderr[-2000:]
    return lines[-1]


def test_bad_input_no_images(tmp_path):
    msg = _sorry(run_process(["output.base_dir=run"], cwd=tmp_path, check=False))
    assert "no images" in msg
    assert not (tmp_path / "run").exists()


def test_bad_input_text_file(tmp_path):
    (tmp_path / "notes.txt").write_text("these are not diffraction images\n")
    msg = _sorry(run_process(["notes.txt", "output.base_dir=run"], cwd=tmp_path, check=False))
    assert "notes.txt" in msg and "not an image" in msg
    assert not (tmp_path / "run").exists()
    msg = _sorry(run_process(["missing.cbf", "output.base_dir=run"], cwd=tmp_path, check=False))
    assert "not found" in msg
    assert not (tmp_path / "run").exists()


def test_bad_input_unreadable_pdb_and_parameters(sim_data, tmp_path):
    image = sorted(sim_data.glob("image_*.cbf"))[0]
    (tmp_path / "model.pdb").write_bytes(b"\x00\x01 no CRYST1 here \xff\n")
    msg = _sorry(run_process([image, "reference_pdb=model.pdb", "output.base_dir=run"],
                             cwd=tmp_path, check=False))
    assert "reference_pdb" in msg
    assert not (tmp_path / "run").exists()
    msg = _sorry(run_process([image, "no_such_parameter=3", "output.base_dir=run"],
                             cwd=tmp_path, check=False))
    assert "no_such_parameter" in msg
    (tmp_path / "dials.phil").write_text("indexing.no_such_thing = 1\n")
    msg = _sorry(run_process([image, "dials_phil=dials.phil", "output.base_dir=run"],
                             cwd=tmp_path, check=False))
    assert "dials_phil" in msg
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not THAUMATIN[0].exists(), reason=f"real thaumatin stills not found in {DATA}")
def test_bad_input_mixed_detectors(sim_data, tmp_path):
    image = sorted(sim_data.glob("image_*.cbf"))[0]
    msg = _sorry(run_process([image, THAUMATIN[0], "output.base_dir=run"], cwd=tmp_path,
                             check=False))
    assert "different detectors" in msg
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------
@pytest.mark.skipif(not all(p.exists() for p in THAUMATIN),
                    reason=f"real thaumatin stills not found in {DATA}")
def test_thaumatin_subset(tmp_path):
    """0001 and 0002 index, 0017 (one strong spot) is reported and left out;
    extraction and merging of the two go on."""
    proc = run_process(
        [*THAUMATIN, PRESETS / "thaumatin_grid_stills.phil",
         "indexing.known_symmetry.space_group=P41212",
         "indexing.known_symmetry.unit_cell=57.9,57.9,150.2,90,90,90",
         "filter.pixel_step=4", "output.save_pixels=off", "check.max_plot_points=5000",
         "output.base_dir=run"],
        cwd=tmp_path,
    )
    base = tmp_path / "run"
    s = summary_of(base)
    by_name = {Path(e["path"]).name: e for e in s["images"]}
    assert by_name["thau_3_2_0001.cbf.bz2"]["status"] == "extracted"
    assert by_name["thau_3_2_0002.cbf.bz2"]["status"] == "extracted"
    failed = by_name["thau_3_2_0017.cbf.bz2"]
    assert failed["status"] == "failed_indexing" and "strong spots" in failed["reason"]
    assert [f["image"] for f in s["failures"]] == ["thau_3_2_0017.cbf.bz2"]
    assert s["n_indexed"] == 2 and s["n_extracted"] == 2
    assert s["steps"]["refine"]["shared_detector"] == "skipped"  # 2 < 3 stills
    for e in (by_name["thau_3_2_0001.cbf.bz2"], by_name["thau_3_2_0002.cbf.bz2"]):
        assert e["space_group"].startswith("P 41 21 2")
        np.testing.assert_allclose(e["unit_cell"][:3], (57.9, 57.9, 150.2), rtol=0.02)
    assert s["steps"]["merge"]["status"] == "done"
    assert (base / "diffuse_merged" / "voxel_data_relative.npz").is_file()
    assert s["merge"]["n_images"] == 2
    assert "thau_3_2_0017.cbf.bz2" in proc.stdout  # listed in the log's summary
    # both diagnostics modes ran on the real data
    for directory, names in (
        ("extraction_diagnostics", ["diffuse_pixel_overlay.png", "q_projection_qx_qy.png",
                                    "extraction_diagnostics_summary.txt"]),
        ("phase3_diagnostics", ["merged_intensity_slice_L0.png", "merged_cc_half.png",
                                "voxel_occupancy_slice_K0.png", "phase3_diagnostics_summary.txt"]),
    ):
        for name in names + ["dials.diffuse_check.html"]:
            assert (base / directory / name).stat().st_size > 500, (directory, name)
    summary = (base / "extraction_diagnostics" / "extraction_diagnostics_summary.txt").read_text()
    assert "kept" in summary.lower()


# --------------------------------------------------------------------------
# Rotation sequence
# --------------------------------------------------------------------------
def test_simulated_sequence(tmp_path):
    """Rotation images: indexed together, scan-varying refinement, every image
    extracted against the one crystal, merged map vs the truth."""
    from dials_diffuse.simulate import load_truth, params_from, simulate_dataset

    params = {**SIM_PARAMS, "mode": "rotation", "n_images": 10, "random_seed": 12,
              "rotation.oscillation": 0.5}
    params.pop("bragg.mosaicity_deg")
    data = simulate_dataset(params_from(**{**params, "output.directory": str(tmp_path / "rot")}))
    images = sorted(data.glob("image_*.cbf"))
    run_process([*images, "output.base_dir=run", *SIM_ARGS, "indexing.method=fft1d",
                 "diagnostics.extraction=False", "diagnostics.merged=False"], cwd=tmp_path)
    s = summary_of(tmp_path / "run")
    assert s["mode"] == "sequence" and s["n_extracted"] == 10 and not s["failures"]
    assert s["steps"]["refine"]["scan_varying"] is True
    assert s["validation"]["scan_rms_misorientation_deg"]["0"] < 0.1
    np.testing.assert_allclose(s["phase1"]["sequence"]["unit_cells"][0][:3], (50, 60, 70), rtol=0.01)
    with np.load(tmp_path / "run" / "diffuse_merged" / "voxel_data_relative.npz") as d:
        hkl = np.stack([d["H_center"], d["K_center"], d["L_center"]], axis=1)
        merged = d["I_merged_relative"]
    cc = np.corrcoef(merged, load_truth(data).diffuse_voxel_average(hkl, NDIV))[0, 1]
    assert cc > 0.93, cc  # 0.969 measured with 20 images


def test_models_fingerprint_tells_models_apart(sim_run):
    """The extraction's upstream signature: the same models (reloaded) give
    the same fingerprint; with empty identifiers, another model set of the
    same size (as a changed validation keeps) or a changed setting does not."""
    from dials_diffuse import pipeline
    from dials_diffuse.pipeline.state import models_fingerprint

    base, _, _ = sim_run
    expts = pipeline.load_expts(base / "refined.expt", check_format=False)
    again = pipeline.load_expts(base / "refined.expt", check_format=False)
    assert models_fingerprint(expts) == models_fingerprint(again)
    for e in list(expts) + list(again):
        e.identifier = ""
    assert models_fingerprint(expts) == models_fingerprint(again)
    from dxtbx.model.experiment_list import ExperimentList

    first_three = ExperimentList([expts[i] for i in (0, 1, 2)])
    other_three = ExperimentList([expts[i] for i in (0, 1, 3)])
    assert models_fingerprint(first_three) != models_fingerprint(other_three)
    a = again[0].crystal.get_A()
    again[0].crystal.set_A(tuple(x * (1 + 1e-7) for x in a))
    assert models_fingerprint(expts) != models_fingerprint(again)
