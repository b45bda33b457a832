"""Shared session-scoped fixtures: small simulated datasets with exact truth.

Each fixture returns the dataset directory (pathlib.Path) written by
``dials_diffuse.simulate.simulate_dataset``; load its truth with
``dials_diffuse.simulate.load_truth(path)``. Keep them small: downstream tests
(extraction, scaling, merging) reuse them.
"""

from __future__ import annotations

import pytest

# Parameters of the shared datasets (importable, e.g. to simulate a variant).
STILLS_PARAMS = {
    "mode": "stills",
    "n_images": 6,
    "random_seed": 11,
    "detector.format": "generic",
    "detector.n_fast": 256,
    "detector.n_slow": 256,
    "detector.distance": 100,
}
ROTATION_PARAMS = {
    "mode": "rotation",
    "n_images": 10,
    "random_seed": 12,
    "rotation.oscillation": 0.5,
    "detector.format": "generic",
    "detector.n_fast": 256,
    "detector.n_slow": 256,
    "detector.distance": 100,
}
#: fine-sliced rotation data: 0.1 deg frames, realistic 0.1 deg mosaicity (spots
#: span several frames, more near the rotation axis), images numbered from 5
#: (array range 4..24), scan-varying crystal
#: small simulated stills that index reliably from raw images (about 50-140
#: strong spots each): dials.diffuse_process tests and bench/compare_outputs.py
INDEXABLE_STILLS_PARAMS = {
    "mode": "stills",
    "n_images": 4,
    "random_seed": 11,
    "crystal.unit_cell": "50 60 70 90 90 90",
    "detector.format": "generic",
    "detector.n_fast": 320,
    "detector.n_slow": 320,
    "detector.distance": 80,
    "bragg.mosaicity_deg": 0.3,
}
ROTATION_FINE_PARAMS = {
    "mode": "rotation",
    "n_images": 20,
    "random_seed": 14,
    "rotation.oscillation": 0.1,
    "rotation.first_image": 5,
    "rotation.start": 10.0,
    "rotation.scan_varying": True,
    "bragg.mosaicity_deg": 0.1,
    "detector.format": "generic",
    "detector.n_fast": 256,
    "detector.n_slow": 256,
    "detector.distance": 100,
}
MULTIPANEL_PARAMS = {
    "mode": "stills",
    "n_images": 4,
    "random_seed": 13,
    "detector.type": "multipanel",
    "detector.distance": 100,
    "detector.multipanel.n_panels_fast": 2,
    "detector.multipanel.n_panels_slow": 2,
    "detector.multipanel.panel_n_fast": 120,
    "detector.multipanel.panel_n_slow": 130,
}


def _simulate(tmp_path_factory, name, overrides):
    from dials_diffuse.simulate import params_from, simulate_dataset

    directory = tmp_path_factory.mktemp(name) / "data"
    params = params_from(**{**overrides, "output.directory": str(directory)})
    return simulate_dataset(params)


@pytest.fixture(scope="session")
def simulated_stills(tmp_path_factory):
    """6 randomly oriented stills, 256x256 px miniCBF (GENERIC_MINI), 100 mm,
    P212121 30x40x50, all corrections on, Bragg spots, beamstop, hot/dead
    pixels, radial background, Poisson noise."""
    return _simulate(tmp_path_factory, "sim_stills", STILLS_PARAMS)


@pytest.fixture(scope="session")
def simulated_rotation(tmp_path_factory):
    """10-image rotation sequence, 0.5 deg per image, scan-static crystal, same
    detector and physics as simulated_stills."""
    return _simulate(tmp_path_factory, "sim_rotation", ROTATION_PARAMS)


@pytest.fixture(scope="session")
def simulated_rotation_fine(tmp_path_factory):
    """20 fine-sliced rotation images (0.1 deg, mosaicity 0.1 deg) numbered
    image_00005.cbf ... image_00024.cbf, scan-varying crystal."""
    return _simulate(tmp_path_factory, "sim_rotation_fine", ROTATION_FINE_PARAMS)


@pytest.fixture(scope="session")
def simulated_multipanel(tmp_path_factory):
    """4 stills on a 2x2 tiled detector (120x130 px tiles, 7/17 px gaps), full
    multi-array CBF read by dxtbx as a 4-panel detector."""
    return _simulate(tmp_path_factory, "sim_multipanel", MULTIPANEL_PARAMS)
