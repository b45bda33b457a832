"""Reliability: bad input, faults and reruns (issue 8).

Every bad-input case runs the real command in a subprocess and checks: exit
status 1, a last stderr line ``Sorry: ...`` that names the file or parameter
and what is wrong, no traceback, and no output that could be mistaken for a
result (manifest, grid definition, per-image NPZ, merged voxels, map, report,
simulated images) and no temporary ``.part`` file left behind.

Faults: SIGKILL in the middle of extraction and of merging, then a rerun of
the same command gives outputs byte-identical to an uninterrupted run; one bad
image among 50 (truncated / not indexed) is skipped and named, and the other
49 give the same map as a clean run of those 49; outputs are byte-identical
across runs and mp.nproc values; concurrent runs in different directories do
not interfere. docs/RELIABILITY.md lists every case.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dials_diffuse.diffuse_files import MANIFEST_NAME, VOXEL_KEYS, read_image_file, write_image_file
from dials_diffuse.merged_files import GRID_NAME, VOXEL_NAME

VENV_BIN = os.path.dirname(sys.executable)
NDIV = ["grid.ndiv_h=2", "grid.ndiv_k=2", "grid.ndiv_l=2"]
SMALL = {
    "mode": "stills",
    "detector.format": "generic",
    "detector.n_fast": 128,
    "detector.n_slow": 128,
    "detector.distance": 80,
}


def exe(name):
    return os.path.join(VENV_BIN, f"dials.diffuse_{name}")


def run(name, args, cwd, ulimit_kb=None, timeout=600):
    cmd = [exe(name), *map(str, args)]
    if ulimit_kb is not None:
        # a file-size limit: writes beyond it fail with EFBIG (Python ignores SIGXFSZ)
        cmd = ["bash", "-c", f'ulimit -f {int(ulimit_kb)}; exec "$@"', "bash", *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def simulate(directory, n_images, seed):
    from dials_diffuse.simulate import params_from, simulate_dataset

    settings = dict(SMALL, n_images=n_images, random_seed=seed)
    settings["output.directory"] = str(directory)
    return simulate_dataset(params_from(**settings))


def tree(directory):
    """{relative path: bytes} of every file under directory (hidden included)."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def assert_same_tree(a, b, ignore_hidden_parts=False):
    ta, tb = tree(a), tree(b)
    if ignore_hidden_parts:
        ta = {k: v for k, v in ta.items() if ".part" not in k}
        tb = {k: v for k, v in tb.items() if ".part" not in k}
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if ta[k] != tb[k]]
    assert not different, f"files differ between {a} and {b}: {different}"


# --------------------------------------------------------------------------
# inputs shared by the bad-input cases


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small good run (4 stills, 128x128) and every broken variant of it."""
    base = tmp_path_factory.mktemp("reliability_inputs")
    sim = simulate(base / "sim", 4, 5)
    expt = sim / "truth.expt"
    good = dict(base=base, sim=sim, expt=expt)
    for name, ndiv in (("ex", 2), ("ex3", 3)):
        r = run("extract", [expt, f"output.directory={base / name}", "filter.pixel_step=2",
                            "output.save_pixels=off", *(f"grid.ndiv_{a}={ndiv}" for a in "hkl")],
                base)
        assert r.returncode == 0, r.stderr
    good["ex"], good["ex3"] = base / "ex", base / "ex3"
    data = json.loads(expt.read_text())

    def variant(name, change):
        d = base / name
        shutil.copytree(sim, d)
        change(d)
        return d

    (base / "notjson.expt").write_text("this is not JSON\n")

    def dangling(d):
        j = json.loads(json.dumps(data))
        j["crystal"] = []
        (d / "truth.expt").write_text(json.dumps(j))

    def no_crystal(d):
        j = json.loads(json.dumps(data))
        for e in j["experiment"]:
            e.pop("crystal", None)
        j["crystal"] = []
        (d / "truth.expt").write_text(json.dumps(j))

    def wrong_detector(d):
        j = json.loads(json.dumps(data))
        for p in j["detector"][0]["panels"]:
            p["image_size"] = [120, 128]
        (d / "truth.expt").write_text(json.dumps(j))

    def text_image(d):
        (d / "image_00002.cbf").write_text("just some text, not an image\n")

    def truncate_all(d):
        for p in d.glob("image_*.cbf"):
            with open(p, "r+b") as fh:
                fh.truncate(1500)

    def delete_images(d):
        for p in d.glob("image_*.cbf"):
            p.unlink()

    for name, change in (("dangling", dangling), ("nocrystal", no_crystal),
                         ("wrongdet", wrong_detector), ("textimage", text_image),
                         ("truncated", truncate_all), ("deleted", delete_images)):
        good[name] = variant(name, change) / "truth.expt"
    good["truncated_cbf"] = good["truncated"].parent / "image_00001.cbf"
    good["text_cbf"] = good["textimage"].parent / "image_00002.cbf"

    np.save(base / "bg_shape.npy", np.zeros((3, 3)))
    nan = np.zeros((128, 128))
    nan[5, 5] = np.nan
    np.save(base / "bg_nan.npy", nan)

    from scitbx.array_family import flex

    with open(base / "mask_type.pickle", "wb") as fh:
        pickle.dump({"not": "a mask"}, fh)
    with open(base / "mask_panels.pickle", "wb") as fh:
        pickle.dump(tuple(flex.bool(flex.grid(128, 128), True) for _ in range(2)), fh)

    arrays, meta = read_image_file(str(base / "ex" / "image_000000.npz"))
    npz = base / "npz"
    npz.mkdir()
    missing = dict(arrays)
    del missing["voxel_sum_signal"]
    write_image_file(str(npz / "missing_keys.npz"), missing, meta)
    unequal = dict(arrays)
    unequal["voxel_sum_signal"] = unequal["voxel_sum_signal"][:-3]
    write_image_file(str(npz / "unequal.npz"), unequal, meta)
    (npz / "text.npz").write_text("not a zip file\n")
    (base / "empty_dir").mkdir()
    (base / "a_file").write_text("a regular file, not a directory\n")
    (base / "not_a.pdb").write_text("this is not a PDB file\n")
    good["npz"] = npz
    return good


# (id, command, arguments, expected words in the Sorry line, ulimit -f KB)
BAD_INPUT = [
    # dials.diffuse_extract
    ("extract-missing-file", "extract", ["missing.expt"], ["missing.expt", "not found"], None),
    ("extract-expt-not-json", "extract", ["{base}/notjson.expt"], ["notjson.expt", "not JSON"], None),
    ("extract-expt-dangling-crystal", "extract", ["{dangling}"], ["truth.expt", "refers to crystal 0"], None),
    ("extract-expt-without-crystal", "extract", ["{nocrystal}"], ["has no crystal"], None),
    ("extract-text-file-as-image", "extract", ["{textimage}"],
     ["image_00002.cbf", "not an image format"], None),
    ("extract-truncated-cbf-images", "extract", ["{truncated}", "masking.dynamic.enable=False"],
     ["no image could be extracted", "image_00001.cbf", "cannot read"], None),
    ("extract-detector-size-mismatch", "extract", ["{wrongdet}"],
     ["image_00001.cbf", "has shape (128, 128), the detector (128, 120)"], None),
    ("extract-images-deleted-after-import", "extract", ["{deleted}"],
     ["image_00001.cbf", "not found"], None),
    ("extract-background-wrong-shape", "extract", ["{expt}", "corrections.background.map={base}/bg_shape.npy"],
     ["bg_shape.npy", "has shape (3, 3)"], None),
    ("extract-background-nan", "extract", ["{expt}", "corrections.background.map={base}/bg_nan.npy"],
     ["bg_nan.npy", "NaN"], None),
    ("extract-pixel-step-0", "extract", ["{expt}", "filter.pixel_step=0"], ["filter.pixel_step=0"], None),
    ("extract-ndiv-0", "extract", ["{expt}", "grid.ndiv_h=0"], ["grid.ndiv_h=0"], None),
    ("extract-dmin-above-dmax", "extract", ["{expt}", "filter.d_min=3", "filter.d_max=2"],
     ["filter.d_min=3.0", "smaller"], None),
    ("extract-negative-gain", "extract", ["{expt}", "corrections.gain=-1"], ["corrections.gain=-1.0", "positive"], None),
    ("extract-negative-mosaicity", "extract", ["{expt}", "masking.bragg.mosaicity_deg=-1"],
     ["masking.bragg.mosaicity_deg", "minimum allowed value"], None),
    ("extract-unknown-parameter", "extract", ["{expt}", "no_such.parameter=1"], ["no_such.parameter"], None),
    ("extract-output-under-a-file", "extract", ["{expt}", "output.directory={base}/a_file/out"],
     ["output.directory", "a_file"], None),
    ("extract-disk-full", "extract", ["{expt}", "output.directory=out"], ["image_000000.npz", "File too large"], 20),
    # dials.diffuse_merge
    ("merge-missing-dir", "merge", ["{expt}", "nowhere/"], ["nowhere", "not found"], None),
    ("merge-expt-not-json", "merge", ["{base}/notjson.expt", "{ex}"], ["notjson.expt", "not JSON"], None),
    ("merge-empty-extraction-dir", "merge", ["{expt}", "{base}/empty_dir"],
     ["empty_dir", "no extraction_manifest.json"], None),
    ("merge-mixed-grids", "merge", ["{expt}", "{ex}", "{ex3}"], ["ndiv [3, 3, 3]", "another grid"], None),
    ("merge-npz-missing-keys", "merge", ["{expt}", "{npz}/missing_keys.npz"],
     ["missing_keys.npz", "missing voxel_sum_signal"], None),
    ("merge-npz-unequal-lengths", "merge", ["{expt}", "{npz}/unequal.npz"], ["unequal.npz", "unequal length"], None),
    ("merge-npz-not-a-zip", "merge", ["{expt}", "{npz}/text.npz"], ["text.npz", "not an NPZ file"], None),
    ("merge-dmin-above-dmax", "merge", ["{expt}", "{ex}", "d_min=3", "d_max=2"], ["d_min=3.0", "smaller"], None),
    ("merge-ndiv-0", "merge", ["{expt}", "{ex}", "grid.ndiv_h=0"], ["grid.ndiv_h=0"], None),
    ("merge-experiments-without-crystal", "merge", ["{nocrystal}", "{ex}"], ["no crystal"], None),
    ("merge-output-under-a-file", "merge", ["{expt}", "{ex}", "output.directory={base}/a_file/m"],
     ["output.directory", "a_file"], None),
    ("merge-disk-full", "merge", ["{expt}", "{ex}", "output.directory=out"], ["diffuse_total.ccp4", "File too large"], 8),
    # dials.diffuse_check
    ("check-mask-wrong-type", "check", ["{expt}", "{ex}/image_000000.npz", "input.pixel_mask={base}/mask_type.pickle"],
     ["mask_type.pickle", "not a tuple of per-panel boolean masks"], None),
    ("check-mask-panel-count", "check", ["{expt}", "{ex}/image_000000.npz", "input.bragg_mask={base}/mask_panels.pickle"],
     ["mask_panels.pickle", "has 2 panels, the detector 1"], None),
    ("check-background-nan", "check", ["{expt}", "{ex}/image_000000.npz", "input.background_map={base}/bg_nan.npy"],
     ["bg_nan.npy", "NaN"], None),
    ("check-background-wrong-shape", "check", ["{expt}", "{ex}/image_000000.npz", "input.background_map={base}/bg_shape.npy"],
     ["bg_shape.npy", "has shape (3, 3)"], None),
    ("check-npz-missing-keys", "check", ["{expt}", "{npz}/missing_keys.npz"], ["missing_keys.npz", "missing"], None),
    ("check-empty-dir", "check", ["{base}/empty_dir"], ["empty_dir", "neither"], None),
    # dials.diffuse_simulate
    ("simulate-unknown-space-group", "simulate", ["crystal.space_group=Q42", "output.directory=out"],
     ["crystal.space_group", "unknown space group"], None),
    ("simulate-negative-gain", "simulate", ["gain=-1", "output.directory=out"], ["gain", "must be > 0"], None),
    ("simulate-no-images", "simulate", ["n_images=0", "output.directory=out"], ["n_images"], None),
    ("simulate-cell-incompatible", "simulate", ["crystal.unit_cell=30,40,50,90,90,120", "output.directory=out"],
     ["crystal.unit_cell", "incompatible"], None),
    ("simulate-output-under-a-file", "simulate", ["n_images=1", "output.directory={base}/a_file/s"],
     ["output.directory"], None),
    # dials.diffuse_process
    ("process-reference-not-pdb", "process", ["{sim}/image_00001.cbf", "reference_pdb={base}/not_a.pdb", "output.base_dir=out"],
     ["reference_pdb", "not_a.pdb"], None),
    ("process-text-file-as-image", "process", ["{text_cbf}", "output.base_dir=out"],
     ["image_00002.cbf", "not an image file"], None),
    ("process-truncated-cbf", "process", ["{truncated_cbf}", "output.base_dir=out"],
     ["image_00001.cbf", "truncated"], None),
    ("process-missing-image", "process", ["nothere.cbf", "output.base_dir=out"], ["nothere.cbf", "not found"], None),
    ("process-base-dir-under-a-file", "process", ["{sim}/image_00001.cbf", "output.base_dir={base}/a_file/p"],
     ["output.base_dir", "a_file"], None),
]

# names that would look like results of some command
RESULT_PATTERNS = (MANIFEST_NAME, GRID_NAME, "image_*.npz", VOXEL_NAME, "voxel_data_relative.h5",
                   "*.ccp4", "dials.diffuse_check.html", "*.png", "truth.json", "*.cbf",
                   "dials.diffuse_process.json", "*.part*")


@pytest.fixture(scope="module")
def bad_input_results(inputs, tmp_path_factory):
    """Every bad-input case run once, three at a time (most of each run is
    DIALS' start-up): {case id: (cwd, CompletedProcess)}."""
    import concurrent.futures

    fmt = {k: str(v) for k, v in inputs.items()}

    def one(case):
        name, command, args, _, ulimit_kb = case
        cwd = tmp_path_factory.mktemp(name)
        args = [a.format(**fmt) for a in args]
        if command != "process" and not any(a.startswith("output.directory=") for a in args):
            args.append("output.directory=out")
        return name, (cwd, run(command, args, cwd, ulimit_kb=ulimit_kb))

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, BAD_INPUT))


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(inputs, bad_input_results, case):
    name, command, _, words, _ = case
    cwd, result = bad_input_results[name]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert lines and lines[-1].startswith("Sorry:"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    left = [p for pattern in RESULT_PATTERNS for p in cwd.rglob(pattern)]
    for p in [p for p in left if p.name == "dials.diffuse_process.json"]:
        # the processing summary of a failed run: it records the error
        assert json.loads(p.read_text()).get("error"), p.read_text()
        left.remove(p)
    assert not left, [str(p.relative_to(cwd)) for p in left]
    assert not list(Path(inputs["base"], "a_file").parent.glob(".*.part*"))


def test_at_least_25_cases():
    assert len(BAD_INPUT) >= 25
    assert {c[1] for c in BAD_INPUT} == {"extract", "merge", "check", "simulate", "process"}


# --------------------------------------------------------------------------
# faults and reruns on 50 small stills


@pytest.fixture(scope="module")
def fifty(tmp_path_factory):
    """50 stills of 128x128 px, a clean extraction (mp.nproc=2) and merge."""
    base = tmp_path_factory.mktemp("reliability_fifty")
    sim = simulate(base / "sim", 50, 31)
    expt = sim / "truth.expt"
    (base / "cwd").mkdir()
    r = run("extract", [expt, *NDIV, "output.save_pixels=off", "mp.nproc=2",
                        f"output.directory={base / 'ex'}"], base / "cwd")
    assert r.returncode == 0, r.stderr
    r = run("merge", [expt, base / "ex", f"output.directory={base / 'mg'}"], base / "cwd")
    assert r.returncode == 0, r.stderr
    return {"base": base, "sim": sim, "expt": expt, "ex": base / "ex", "mg": base / "mg"}


def extract_args(expt, out, nproc=1, extra=()):
    return [expt, *NDIV, "output.save_pixels=off", f"mp.nproc={nproc}", f"output.directory={out}", *extra]


def extract_and_merge(expt, cwd):
    """A clean extraction (``cwd``/ex) and merge (``cwd``/mg) of ``expt``."""
    r = run("extract", extract_args(expt, "ex"), cwd)
    assert r.returncode == 0, r.stderr
    r = run("merge", [expt, "ex", "output.directory=mg"], cwd)
    assert r.returncode == 0, r.stderr


def kill_when(args_name, args, cwd, ready, timeout=300):
    """Start a command, SIGKILL it as soon as ``ready()`` is true; return
    whether it was killed (False: it finished first)."""
    proc = subprocess.Popen([exe(args_name), *map(str, args)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < timeout:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_during_extraction_then_rerun(fifty, tmp_path):
    out = tmp_path / "ex"
    args = extract_args(fifty["expt"], out)
    # killed once a few images are written: no manifest, so not complete
    killed = kill_when("extract", args, tmp_path,
                       lambda: len(list(out.glob("image_*.npz"))) >= 3)
    assert killed, "the extraction finished before it could be killed"
    assert not (out / MANIFEST_NAME).exists()
    r = run("merge", [fifty["expt"], out, "output.directory=m"], tmp_path)
    assert r.returncode == 1 and "no extraction_manifest.json" in r.stderr
    # a stale temporary file as an interrupted write leaves it: never read
    (out / ".image_000010.npz.abcd1234.part.npz").write_bytes(b"PK\x03\x04 half a file")
    # part files of this host: a dead writer's is removed, a live writer's kept
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".image_000011.npz.{host}-{dead.pid}.abcd1234.part.npz"
    live = out / f".image_000012.npz.{host}-{os.getpid()}.abcd1234.part.npz"
    for part in (stale, live):
        part.write_bytes(b"PK\x03\x04 half a file")
    r = run("extract", args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and live.exists()
    # the stale part, and any the killed run left mid-write (its pid is dead too)
    assert re.search(r"Removed [1-9]\d* partial file\(s\)",
                     (tmp_path / "dials.diffuse_extract.log").read_text())
    # every output byte-identical to the uninterrupted run (mp.nproc=2 there)
    assert_same_tree(out, fifty["ex"], ignore_hidden_parts=True)


def test_sigkill_during_merge_then_rerun(fifty, tmp_path):
    out = tmp_path / "mg"
    # a large map box makes the writing phase long enough to be caught
    box = ["output.map_hkl_box=-30,30,-30,30,-30,30"]
    args = [fifty["expt"], fifty["ex"], f"output.directory={out}", *box]

    def writing():
        return out.is_dir() and any(out.iterdir())

    killed = kill_when("merge", args, tmp_path, writing)
    assert killed, "the merge finished before it could be killed"
    assert not (out / GRID_NAME).exists()
    r = run("merge", args, tmp_path)
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean"
    clean.mkdir()
    r = run("merge", [*args[:2], f"output.directory={clean / 'mg'}", *box], clean)
    assert r.returncode == 0, r.stderr
    assert_same_tree(out, clean / "mg", ignore_hidden_parts=True)


def _subset(expt_path, keep, out_path):
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    subset = ExperimentList([experiments[i] for i in keep])
    subset.as_file(str(out_path))
    return out_path


def _merged_equal(a, b):
    """Merged voxels and maps byte-identical; scales equal in image order."""
    for name in (VOXEL_NAME, "diffuse_total.ccp4", "diffuse_anisotropic.ccp4"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name

    def scales(d):
        with open(Path(d) / "refined_scaling_model_params.json") as fh:
            p = json.load(fh)["refined_parameters"]
        return [p[k]["multiplicative_scale"] for k in sorted(p, key=int)]

    assert scales(a) == scales(b)


def test_truncated_image_among_50(fifty, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fifty["sim"], data)
    bad = data / "image_00008.cbf"  # still 7
    with open(bad, "r+b") as fh:
        fh.truncate(3000)
    r = run("extract", extract_args(data / "truth.expt", "ex"), tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "ex" / MANIFEST_NAME).read_text())
    skipped = [e for e in manifest["images"] if e["status"] != "extracted"]
    assert len(skipped) == 1 and skipped[0]["image_path"].endswith("image_00008.cbf")
    assert "cannot read" in skipped[0]["reason"]
    assert manifest["n_extracted"] == 49 and manifest["n_images"] == 50
    log = (tmp_path / "dials.diffuse_extract.log").read_text()
    assert "Skipped" in log and "image_00008.cbf" in log.split("Extraction summary")[1]
    r = run("merge", [data / "truth.expt", "ex", "output.directory=mg"], tmp_path)
    assert r.returncode == 0, r.stderr

    # a clean run of the 49 good stills only
    clean = tmp_path / "clean"
    clean.mkdir()
    keep = [i for i in range(50) if i != 7]
    expt49 = _subset(fifty["expt"], keep, fifty["sim"] / "forty_nine.expt")
    try:
        extract_and_merge(expt49, clean)
    finally:
        expt49.unlink()
    _merged_equal(tmp_path / "mg", clean / "mg")


def test_unindexed_image_among_50(fifty, tmp_path):
    keep = [i for i in range(50) if i != 23]
    models = _subset(fifty["expt"], keep, fifty["sim"] / "indexed49.expt")
    try:
        r = run("extract", extract_args(models, "ex", extra=[fifty["expt"]]), tmp_path)
        assert r.returncode == 0, r.stderr
        manifest = json.loads((tmp_path / "ex" / MANIFEST_NAME).read_text())
        skipped = [e for e in manifest["images"] if e["status"] != "extracted"]
        assert len(skipped) == 1 and skipped[0]["image_path"].endswith("image_00024.cbf")
        assert "not indexed" in skipped[0]["reason"]
        log = (tmp_path / "dials.diffuse_extract.log").read_text()
        assert "image_00024.cbf" in log.split("Extraction summary")[1]
        r = run("merge", [models, "ex", "output.directory=mg"], tmp_path)
        assert r.returncode == 0, r.stderr
        clean = tmp_path / "clean"
        clean.mkdir()
        extract_and_merge(models, clean)
    finally:
        models.unlink()
    # the extracted images themselves are identical, and so is the map
    for name in (p.name for p in (clean / "ex").glob("image_*.npz")):
        assert (tmp_path / "ex" / name).read_bytes() == (clean / "ex" / name).read_bytes()
    _merged_equal(tmp_path / "mg", clean / "mg")


def test_deterministic_across_runs_and_nproc(fifty, tmp_path):
    # fifty["ex"] ran with mp.nproc=2; here nproc=1, and the merge twice
    r = run("extract", extract_args(fifty["expt"], "ex"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_tree(tmp_path / "ex", fifty["ex"])
    r = run("merge", [fifty["expt"], "ex", "output.directory=mg"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_tree(tmp_path / "mg", fifty["mg"])


def test_concurrent_runs_do_not_interfere(fifty, tmp_path):
    def start(name, args, cwd):
        cwd.mkdir(exist_ok=True)
        return subprocess.Popen([exe(name), *map(str, args)], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    procs = [start("extract", extract_args(fifty["expt"], tmp_path / f"ex{i}"), tmp_path / f"cwd{i}")
             for i in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    procs = [start("merge", [fifty["expt"], tmp_path / f"ex{i}", f"output.directory={tmp_path / f'mg{i}'}"],
                   tmp_path / f"cwd{i}") for i in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    for i in (1, 2):
        assert_same_tree(tmp_path / f"ex{i}", fifty["ex"])
        assert_same_tree(tmp_path / f"mg{i}", fifty["mg"])
        assert not list((tmp_path / f"ex{i}").glob(".*part*"))


def test_rerun_over_failed_run_is_not_complete(fifty, tmp_path):
    """A rerun into a directory that held a complete result first removes the
    completion marker, so a failure leaves no old-and-new mix that looks done."""
    out = tmp_path / "ex"
    shutil.copytree(fifty["ex"], out)
    r = run("extract", extract_args(fifty["expt"], out), tmp_path, ulimit_kb=20)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("Sorry:")
    assert not (out / MANIFEST_NAME).exists()
    mg = tmp_path / "mg"
    shutil.copytree(fifty["mg"], mg)
    r = run("merge", [fifty["expt"], fifty["ex"], f"output.directory={mg}"], tmp_path, ulimit_kb=8)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("Sorry:")
    assert not (mg / GRID_NAME).exists()
    assert not list(mg.glob(".*part*"))


def test_atomic_writes_in_threads_keep_the_umask(tmp_path):
    """Files written at once by several threads (the merge's maps) get the
    permissions of the umask, and the umask stays the process's."""
    import os
    import stat
    import threading

    from dials_diffuse import io

    before = os.umask(0o027)
    try:
        def write(k):
            for j in range(200):
                with io.atomic_path(str(tmp_path / f"f{k}_{j}.txt")) as tmp:
                    open(tmp, "w").write("x")

        threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert os.umask(0o027) == 0o027
        modes = {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert modes == {0o640}
    finally:
        os.umask(before)


def test_a_worker_killed_mid_write_leaves_no_part_file(fifty, tmp_path, monkeypatch):
    """A worker killed by the system in the middle of writing an image file
    (fault injected: SIGKILL inside the file's atomic write) ends the
    extraction with one Sorry naming mp.nproc; no temporary part file, and
    no manifest, is left behind."""
    from dials.util import Sorry
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffuse import api, io
    from dials_diffuse.extraction import run as extraction_run

    real_atomic_path = io.atomic_path

    @contextlib.contextmanager
    def dying_atomic_path(path):
        with real_atomic_path(path) as tmp:
            if os.path.basename(path) == "image_000007.npz":
                with open(tmp, "wb") as fh:
                    fh.write(b"PK\x03\x04 half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            yield tmp

    monkeypatch.setattr(io, "atomic_path", dying_atomic_path)
    out = tmp_path / "ex"
    params = api.extraction_params(**{"output.directory": str(out), "output.save_pixels": "off",
                                      "mp.nproc": 2, "grid.ndiv_h": 2, "grid.ndiv_k": 2,
                                      "grid.ndiv_l": 2})
    models = ExperimentListFactory.from_json_file(str(fifty["expt"]), check_format=True)
    with pytest.raises(Sorry, match=r"mp.nproc=2\) ended abruptly"):
        extraction_run.extract(models, params, progress=False)
    assert not [p.name for p in out.iterdir() if ".part" in p.name]
    assert not (out / MANIFEST_NAME).exists()
