"""Rotation Bragg masks on fine-sliced simulated data: 0.1 deg frames, a
0.1 deg mosaicity whose rocking curve the simulator spreads over sigma_m / |zeta|
(spots near the rotation axis last for many frames), images numbered from 5.

The simulator's Bragg counts are the truth: how many of them land in pixels
the extraction keeps."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from dials_diffuse.extraction import extract
from dials_diffuse.simulate import load_truth

from diffuse_helpers import extraction_params


def bragg_leak(truth, directory):
    """Fraction of the true Bragg counts (on usable pixels) that the
    extraction keeps, over all images; and the frames written."""
    manifest = json.loads((directory / "extraction_manifest.json").read_text())
    usable = truth.pixel_mask()
    total = kept = 0.0
    frames = []
    for entry in manifest["images"]:
        i = entry["still_id"]
        frames.append(entry["frame"])
        with open(directory / f"total_mask_{i:06d}.pickle", "rb") as fh:
            mask = [m.as_numpy_array() for m in pickle.load(fh)]
        for p, counts in enumerate(truth.expected_bragg_counts(i)):
            total += counts[usable[p]].sum()
            kept += counts[mask[p] & usable[p]].sum()
    return kept / total, frames


def run_extraction(truth, directory, **overrides):
    params = extraction_params(truth, directory, **{"output.masks": True,
                                                    "output.save_pixels": False, **overrides})
    extract(truth.experiments, params, progress=False)
    return bragg_leak(truth, directory)


@pytest.mark.parametrize("overrides", [
    {},  # no reflection table: the fallback widths
    # the simulator's own widths: sigma_m, and sigma_b of its 0.8 px spots at 100 mm
    {"masking.bragg.mosaicity_deg": 0.1, "masking.bragg.beam_divergence_deg": 0.08},
])
def test_rotation_bragg_leak_below_one_percent(simulated_rotation_fine, tmp_path, overrides):
    truth = load_truth(simulated_rotation_fine)
    scan = truth.experiments[0].scan
    assert scan.get_array_range()[0] == 4  # images from 5: frames are not positions
    leak, frames = run_extraction(truth, tmp_path / "out", **overrides)
    assert frames == list(range(4, 4 + truth.n_images))
    assert leak < 0.01, f"{100 * leak:.2f} % of the Bragg counts kept"


def test_narrow_rocking_window_leaks(simulated_rotation_fine, tmp_path):
    """The measure can fail: one sigma_m either side leaves the rocking
    curve's tails (and the near-axis spots' many frames) in the data."""
    truth = load_truth(simulated_rotation_fine)
    leak, _ = run_extraction(truth, tmp_path / "out", **{
        "masking.bragg.mosaicity_deg": 0.1, "masking.bragg.beam_divergence_deg": 0.08,
        "masking.bragg.n_sigma": 1.0})
    assert leak > 0.01
