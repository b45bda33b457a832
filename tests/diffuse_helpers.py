"""Helpers shared by the tests (not fixtures: plain functions)."""

from __future__ import annotations

import os

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
    # the simulated spots have a 0.05 deg mosaic spread: 0.3 deg covers them
    # with margin (the default 1.0 deg is for real crystals)
    params.masking.bragg.max_delpsi = max(0.3, 6 * truth.data["bragg"]["mosaicity_deg"])
    return set_params(params, **overrides)


