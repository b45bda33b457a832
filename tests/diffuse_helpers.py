"""Helpers shared by the tests (not fixtures: plain functions)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dials_diffuse.command_line import extract as extract_command


def set_params(params, **overrides):
    """Set dotted-name values (``{"scaling.offsets": True}``) on a PHIL extract."""
    for key, value in overrides.items():
        obj = params
        *path, last = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return params


def merge_params(directory, **overrides):
    """dials.diffuse_merge parameters writing to ``directory``."""
    from dials_diffuse.command_line import merge as merge_command

    params = merge_command.phil_scope.fetch().extract()
    params.output.directory = str(directory)
    return set_params(params, **overrides)


def simulated_profile_widths(truth):
    """(sigma_m, sigma_b) in degrees of a simulated dataset's Bragg spots:
    its mosaicity, and the angle its spot size (bragg.sigma_px, with the
    beam divergence if any) subtends at the detector."""
    bragg = truth.data["bragg"]
    panel = truth.detector[0]
    spot_deg = np.degrees(np.arctan(bragg["sigma_px"] * panel.get_pixel_size()[0]
                                    / panel.get_distance()))
    divergence = float(bragg.get("divergence_deg", 0.0) or 0.0)
    return float(bragg["mosaicity_deg"]), float(np.hypot(spot_deg, divergence))


def extraction_params(truth, directory, **overrides):
    """Extraction parameters for a simulated dataset: its beamstop and background."""
    params = extract_command.phil_scope.fetch().extract()
    params.output.directory = str(directory)
    params.grid.ndiv_h = params.grid.ndiv_k = params.grid.ndiv_l = 4
    panel = truth.detector[0]
    centre = panel.get_beam_centre_px(truth.beam.get_s0())
    params.masking.beamstop.type = "circle"
    params.masking.beamstop.center = centre
    params.masking.beamstop.radius = truth.beamstop["radius_mm"] / panel.get_pixel_size()[0] + 2
    bg_path = os.path.join(str(directory) + "_bg.npy")
    os.makedirs(os.path.dirname(bg_path), exist_ok=True)
    background = truth.background_photons()
    if len(background) == 1:
        np.save(bg_path, background[0])
    else:
        np.save(bg_path, np.stack(background))
    params.corrections.background.map = bg_path
    params.corrections.gain = truth.gain
    # stills: reflections within 6 sigma_m of the Ewald sphere (the default
    # 1.0 deg is for real crystals without a mosaicity model)
    params.masking.bragg.max_delpsi = max(0.3, 6 * truth.data["bragg"]["mosaicity_deg"])
    # rotation: the widths the simulator drew its spots with, as a user who
    # knows the crystal would give them (no reflection table to estimate from)
    params.masking.bragg.mosaicity_deg, params.masking.bragg.beam_divergence_deg = (
        simulated_profile_widths(truth))
    return set_params(params, **overrides)




def robust_width(z):
    """1.4826 x median absolute deviation: the sigma of a normal core."""
    return 1.4826 * np.median(np.abs(z - np.median(z)))


def swept_voxels(merged, observations):
    """Of the merged voxels, those the Ewald sphere swept through inside a
    rotation scan: observed on neither its first nor its last image. A voxel
    cut by the scan's ends is sampled only in part; its merged value is the
    average over that part, not over the voxel."""
    on_edge = np.isin(observations.image, [0, observations.n_images - 1])
    cut = np.bincount(observations.voxel[on_edge], minlength=observations.n_voxels) > 0
    # each merged voxel's row among the observed ones, by its grid key
    lower = observations.voxel_grid.min(axis=0)
    shape = observations.voxel_grid.max(axis=0) - lower + 1
    keys = np.ravel_multi_index((observations.voxel_grid - lower).T, shape)
    order = np.argsort(keys)
    wanted = np.ravel_multi_index((merged.voxel_grid - lower).T, shape)
    return ~cut[order[np.searchsorted(keys[order], wanted)]]


def assert_same_extraction(directory_a, directory_b, rtol=1e-6):
    """Two extractions of the same images agree: the same images, pixel
    counts, voxels and per-voxel pixel counts exactly, the voxel sums to
    float32 rounding, the per-pixel arrays exactly."""
    manifests = [json.loads((Path(d) / "extraction_manifest.json").read_text())
                 for d in (directory_a, directory_b)]
    assert manifests[0]["images"] == manifests[1]["images"]
    for entry in manifests[0]["images"]:
        if entry["status"] != "extracted":
            continue
        a, b = ({k: npz[k] for k in npz.files if k != "metadata_json"}
                for npz in (np.load(Path(d) / entry["file"]) for d in (directory_a, directory_b)))
        assert set(a) == set(b)
        for name in a:
            if name in ("voxel_indices", "voxel_n_pixels") or not name.startswith("voxel"):
                assert np.array_equal(a[name], b[name]), name
            else:
                np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=0, err_msg=name)
