"""Real rotation data: L-cysteine sweeps (0.1 deg frames, kappa goniometer,
detector on a 30 deg 2theta arm) imported from image 4, so that DIALS' frame
numbers (array indices 3..14) are not positions in the image set.

Processed as a user would (dials.import of a subset, find_spots, index,
refine, then dials.diffuse_extract refined.expt imported.expt refined.refl
with default settings) and checked against DIALS itself:

* the stored fractional hkl of kept pixels equals DIALS'
  ``PixelToMillerIndex`` at the image's absolute centre frame;
* on every frame of every indexed spot's DIALS bounding box the spot's
  centroid pixel is masked.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dxtbx.model.experiment_list import ExperimentListFactory
from scitbx import matrix

from dials.algorithms.spot_prediction import PixelToMillerIndex
from dials.array_family import flex

from diffuse_helpers import assert_same_extraction

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "l_cysteine_rotation"
FIRST_IMAGE = 4
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")


def run(args, cwd):
    """Run a DIALS (or dials.diffuse_*) command; fail with its log tail."""
    exe = BIN / args[0] if (BIN / args[0]).exists() else args[0]
    result = subprocess.run([str(exe)] + [str(a) for a in args[1:]], cwd=cwd,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """Both sweeps from image 4 on: imported, spots found, indexed jointly,
    refined scan-static (refined_static.*) and scan-varying (refined.*, the
    dials.refine default), each extracted with the default settings."""
    work = tmp_path_factory.mktemp("l_cysteine")
    images = sorted(p for p in DATA.glob("l-cyst_0?_000??.cbf.bz2")
                    if int(p.name.split("_")[2][:5]) >= FIRST_IMAGE)
    run(["dials.import"] + images, work)
    run(["dials.find_spots", "imported.expt", "nproc=2"], work)
    run(["dials.index", "imported.expt", "strong.refl", "space_group=P212121"], work)
    run(["dials.refine", "indexed.expt", "indexed.refl"], work)
    run(["dials.refine", "indexed.expt", "indexed.refl", "scan_varying=False",
         "output.experiments=refined_static.expt", "output.reflections=refined_static.refl"], work)
    for stem, out in (("refined", "extracted"), ("refined_static", "extracted_static")):
        run(["dials.diffuse_extract", f"{stem}.expt", "imported.expt", f"{stem}.refl",
             "output.masks=True", "mp.nproc=2", f"output.directory={out}"], work)
    # the images of another import of the same files (template, image_range=)
    # are matched to the models by file
    run(["dials.import"] + sorted(DATA.glob("l-cyst_01_000??.cbf.bz2"))
        + ["image_range=6,15", "output.experiments=subset.expt"], work)
    run(["dials.diffuse_extract", "refined_static.expt", "subset.expt", "refined_static.refl",
         "mp.nproc=2", "output.directory=extracted_subset"], work)
    return work


def extracted_images(directory):
    """(manifest entry, npz arrays, metadata) of each extracted image."""
    manifest = json.loads((directory / "extraction_manifest.json").read_text())
    for entry in manifest["images"]:
        with np.load(directory / entry["file"]) as npz:
            arrays = {k: npz[k] for k in npz.files}
        yield entry, arrays, json.loads(str(arrays["metadata_json"]))


def crystal_at_frame(crystal, scan, frame):
    """A scan-static copy of a scan-varying crystal with A at the frame's
    centre (DIALS' linear interpolation between the scan points at the
    frame's edges), for PixelToMillerIndex, which reads only get_A()."""
    copy = crystal.__class__(crystal)
    if crystal.num_scan_points:
        k = frame - scan.get_array_range()[0]
        a0 = matrix.sqr(crystal.get_A_at_scan_point(k))
        a1 = matrix.sqr(crystal.get_A_at_scan_point(k + 1))
        copy.set_A((a0 + a1) * 0.5)
    return copy


@pytest.mark.parametrize("stem,directory", [("refined_static", "extracted_static"),
                                            ("refined", "extracted")])
def test_hkl_matches_dials_at_absolute_frames(processed, stem, directory):
    experiments = ExperimentListFactory.from_json_file(str(processed / f"{stem}.expt"),
                                                       check_format=False)
    if stem == "refined":
        assert experiments[0].crystal.num_scan_points > 0  # dials.refine made it scan-varying
    deviations, frames = [], set()
    rng = np.random.default_rng(0)
    for entry, arrays, meta in extracted_images(processed / directory):
        expt = experiments[entry["experiment_id"]]
        frame = meta["frame"]
        # imported from image 4: array indices start at 3
        assert frame == expt.scan.get_array_range()[0] + meta["image_index"]
        assert expt.scan.get_array_range()[0] == FIRST_IMAGE - 1
        frames.add(frame)
        reference = PixelToMillerIndex(expt.beam, expt.detector, expt.goniometer, expt.scan,
                                       crystal_at_frame(expt.crystal, expt.scan, frame))
        pick = rng.choice(arrays["hkl"].shape[0], 200, replace=False)
        for i in pick:
            expected = reference.h(int(arrays["original_panel_ids"][i]),
                                   arrays["original_fast_coords"][i] + 0.5,
                                   arrays["original_slow_coords"][i] + 0.5, frame + 0.5)
            deviations.append(np.abs(np.array(expected) - arrays["hkl"][i]).max())
    assert frames == set(range(FIRST_IMAGE - 1, 15))
    # float32 storage of hkl up to ~10: ~1e-6
    assert np.percentile(deviations, 99) < 0.01, np.percentile(deviations, [50, 99])


def spot_frame_pairs_kept(processed, stem, directory):
    """(kept, total) (indexed spot, frame) pairs: the spot's centroid pixel on
    each frame of its DIALS bounding box, kept by the total mask?"""
    refl = flex.reflection_table.from_file(str(processed / f"{stem}.refl"))
    refl = refl.select(refl.get_flags(refl.flags.indexed))
    bbox = np.stack([p.as_numpy_array() for p in refl["bbox"].parts()], axis=1)
    xyz = refl["xyzobs.px.value"].as_numpy_array()
    ids = refl["id"].as_numpy_array()
    panels = refl["panel"].as_numpy_array()
    total_masks = {}
    for entry, _, meta in extracted_images(processed / directory):
        with open(processed / directory / f"total_mask_{entry['still_id']:06d}.pickle", "rb") as fh:
            total_masks[(entry["experiment_id"], meta["frame"])] = [
                m.as_numpy_array() for m in pickle.load(fh)]
    kept = total = 0
    for j in range(len(refl)):
        for frame in range(bbox[j, 4], bbox[j, 5]):
            mask = total_masks.get((ids[j], frame))
            if mask is None:
                continue
            total += 1
            kept += bool(mask[panels[j]][int(xyz[j, 1]), int(xyz[j, 0])])
    return kept, total


@pytest.mark.parametrize("stem,directory", [("refined_static", "extracted_static"),
                                            ("refined", "extracted")])
def test_bragg_mask_covers_every_frame_of_every_spot(processed, stem, directory):
    kept, total = spot_frame_pairs_kept(processed, stem, directory)
    assert total > 200
    assert kept <= 0.02 * total, f"{kept} of {total} (spot, frame) pairs kept"
    log = (processed / "dials.diffuse_extract.log").read_text()
    # the profile widths came from the indexed spots, as dials.integrate does
    assert "(indexed spots)" in log


def test_subset_import_matches_models_by_file(processed):
    """Images 6-15 of sweep 1, imported on their own, are extracted with the
    models of the 4-15 import: the same frames and the same hkl per pixel."""
    full = {Path(e["image_path"]).name: (e, a, m)
            for e, a, m in extracted_images(processed / "extracted_static")}
    subset = list(extracted_images(processed / "extracted_subset"))
    assert [Path(e["image_path"]).name for e, _, _ in subset] == [
        f"l-cyst_01_{n:05d}.cbf.bz2" for n in range(6, 16)]
    for entry, arrays, meta in subset:
        _, full_arrays, full_meta = full[Path(entry["image_path"]).name]
        assert meta["frame"] == full_meta["frame"]  # image 6 is frame 5 of the models' scan
        assert meta["frame"] == int(Path(entry["image_path"]).name[10:15]) - 1

        def by_pixel(a):
            key = (a["original_panel_ids"].astype(np.int64) * 2**22
                   + a["original_slow_coords"].astype(np.int64) * 2**11 + a["original_fast_coords"])
            return key, a["hkl"]

        key_s, hkl_s = by_pixel(arrays)
        key_f, hkl_f = by_pixel(full_arrays)
        common, i_s, i_f = np.intersect1d(key_s, key_f, return_indices=True)
        assert common.size > 0.9 * key_s.size
        assert np.array_equal(hkl_s[i_s], hkl_f[i_f])


def test_compiled_kernel_equals_numpy_on_real_sweeps(processed):
    """The default extraction (the compiled kernel) of both real sweeps, with
    their real masks, panels and scan-varying crystal, equals kernel=numpy."""
    from dials_diffuse.extraction import kernels

    if not kernels.available():
        pytest.skip("numba is not available")
    run(["dials.diffuse_extract", "refined.expt", "imported.expt", "refined.refl",
         "output.masks=True", "mp.nproc=2", "kernel=numpy", "output.directory=extracted_numpy"],
        processed)
    assert_same_extraction(processed / "extracted", processed / "extracted_numpy")
