"""Ground-truth simulator of diffuse scattering images (dials.diffuse_simulate).

Public API::

    from dials_diffuse.simulate import simulate_dataset, load_truth, params_from
    path = simulate_dataset(params_from(**{"output.directory": "sim", "n_images": 4}))
    truth = load_truth(path)
    truth.diffuse(hkl)                      # D at (n, 3) fractional hkl
    truth.diffuse_voxel_average(centres, ndiv=4)
    truth.scales, truth.experiments, truth.expected_counts(i), truth.pixel_mask()

See docs/SIMULATOR.md.
"""

from dials_diffuse.simulate.diffuse_model import (  # noqa: F401
    DiffuseModel,
    DiffuseParameters,
    laue_rotations,
)
from dials_diffuse.simulate.params import (  # noqa: F401
    default_params,
    params_from,
    phil_scope,
)
from dials_diffuse.simulate.simulator import simulate_dataset  # noqa: F401
from dials_diffuse.simulate.truth import Truth, load_truth  # noqa: F401

__all__ = [
    "DiffuseModel",
    "DiffuseParameters",
    "Truth",
    "default_params",
    "laue_rotations",
    "load_truth",
    "params_from",
    "phil_scope",
    "simulate_dataset",
]
