"""PHIL scopes shared by several commands (one definition of each parameter)."""

from libtbx.phil import parse

grid_phil_str = """
grid
  .help = "The fractional-hkl voxel grid, shared by extraction and merging."
{
  ndiv_h = 4
    .type = int
    .help = "Voxel subdivisions per reciprocal-lattice unit along h."
  ndiv_k = 4
    .type = int
  ndiv_l = 4
    .type = int
}
"""

grid_phil_scope = parse(grid_phil_str)

mp_phil_str = """
mp
{
  nproc = Auto
    .type = int(value_min=1)
    .help = "Processes to use; Auto uses the available cores."
}
"""


def check_grid_params(grid):
    """Raise Sorry unless every subdivision is a positive integer."""
    from dials.util import Sorry

    for axis in "hkl":
        value = getattr(grid, f"ndiv_{axis}")
        if value is None or value < 1:
            raise Sorry(f"grid.ndiv_{axis}={value}: must be a positive integer")
    return (grid.ndiv_h, grid.ndiv_k, grid.ndiv_l)
