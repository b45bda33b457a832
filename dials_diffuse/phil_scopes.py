"""PHIL scopes shared by several commands (one definition of each parameter)."""

from libtbx.phil import parse

grid_phil_str = """
grid
  .help = "The fractional-hkl voxel grid, shared by extraction and merging."
{
  ndiv_h = None
    .type = int
    .help = "Voxel subdivisions per reciprocal-lattice unit along h. "
            "Extraction default: 4; merging default: the extracted files' value."
  ndiv_k = None
    .type = int
  ndiv_l = None
    .type = int
}
"""

grid_phil_scope = parse(grid_phil_str)

DEFAULT_NDIV = 4


def check_grid_params(grid, default=(DEFAULT_NDIV,) * 3):
    """(ndiv_h, ndiv_k, ndiv_l); unset values take ``default``. Raise Sorry
    unless every subdivision is a positive integer."""
    from dials.util import Sorry

    for axis, fallback in zip("hkl", default):
        value = getattr(grid, f"ndiv_{axis}")
        if value is None:
            value = fallback
            setattr(grid, f"ndiv_{axis}", value)
        if value is None or value < 1:
            raise Sorry(f"grid.ndiv_{axis}={value}: must be a positive integer")
    return (grid.ndiv_h, grid.ndiv_k, grid.ndiv_l)
