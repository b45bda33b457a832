"""
Scale and merge extracted diffuse scattering into a 3-D fractional-hkl map.

Reads the per-image files written by dials.diffuse_extract, maps every voxel
observation to the asymmetric unit of the Laue group (symmetry.merge=laue),
to Friedel pairs (friedel) or keeps P1 (none), refines a per-image scale
(optionally offsets and a smooth resolution term) with outlier rejection,
merges with Poisson-propagated sigmas, and reports half-dataset CC1/2 per
resolution shell for the total and the anisotropic map.

Outputs in output.directory: global_voxel_grid_definition.json,
refined_scaling_model_params.json, voxel_data_relative.npz (and .h5 with
output.hdf5=True), merging_statistics.json, and CCP4/MRC maps
diffuse_total.ccp4 and diffuse_anisotropic.ccp4 (axes h, k, l).

Examples::

  dials.diffuse_merge refined.expt diffuse_extracted/

  dials.diffuse_merge refined.expt diffuse_extracted/ symmetry.merge=friedel

  dials.diffuse_merge refined.expt diffuse_extracted/ scaling.offsets=True \\
    scaling.resolution_smoother.enable=True d_min=2.0

  dials.diffuse_merge refined.expt diffuse_extracted/image_000001.npz \\
    diffuse_extracted/image_000002.npz output.directory=two_images
"""

from __future__ import annotations

import logging
import os
from typing import List

import libtbx.phil

import dials.util
import dials.util.log
from dials.util import Sorry
from dials.util.options import ArgumentParser, flatten_experiments

from dials_diffuse.ambiguity import ambiguity_phil_str  # issue 15
from dials_diffuse.merging import merge_run
from dials_diffuse.command_util import check_unhandled, parse_command_line
from dials_diffuse.phil_scopes import grid_phil_str

logger = logging.getLogger("dials.diffuse_merge")

merge_phil_str = (
    grid_phil_str
    + """
d_min = None
  .type = float(value_min=0)
  .help = "High-resolution limit of the merged map (Angstrom)."
d_max = None
  .type = float(value_min=0)
cell_tolerance = 0.03
  .type = float(value_min=0)
  .help = "Largest relative deviation of a cell edge from the mean cell."
cell_outliers = *fail exclude
  .type = choice
  .help = "What to do with crystals whose cell is outside cell_tolerance."
misorientation
{
  single_crystal = *auto yes no
    .type = choice
    .help = "Whether the models should share one orientation (auto: yes for "
            "rotation sequences, no for stills)."
  max_rms_deg = 2.0
    .type = float(value_min=0)
  action = *warn fail
    .type = choice
}
symmetry
{
  merge = *laue friedel none
    .type = choice
}
scaling
{
  solver = *gauss_newton alternating
    .type = choice
    .help = "gauss_newton: all scales together per iteration (the merged "
            "intensities eliminated); alternating: closed-form Poisson updates "
            "of scales and intensities in turn. Offsets or the resolution term "
            "use the alternating updates."
  max_iterations = 20
    .type = int
  convergence_tolerance = 1e-4
    .type = float(value_min=0)
    .help = "Stop when no scale changes by more than this fraction."
  outlier_sigma = 10
    .type = float
    .help = "Reject observations this many model sigmas from the merged value "
            "(0 or None: no rejection)."
  scale_model = *per_image smooth
    .type = choice
    .help = "per_image: one scale b_i per image (stills and sequences). smooth: "
            "rotation sequences only, b varies smoothly with the rotation angle "
            "(piecewise linear through control points every scale_interval "
            "degrees per sweep): fewer parameters, robust for thin images."
  scale_interval = 5.0
    .type = float
    .help = "Degrees between control points of scale_model=smooth."
  offsets = False
    .type = bool
    .help = "Refine an additive offset per image."
  fail_if_not_converged = False
    .type = bool
  resolution_smoother
  {
    enable = False
      .type = bool
    n_control_points = 4
      .type = int(value_min=2, value_max=20)
  }
}
statistics
{
  n_shells = 10
    .type = int(value_min=1)
  seed = 0
    .type = int
    .help = "Seed of the random split of images into halves for CC1/2."
}
mp
{
  nproc = Auto
    .type = int(value_min=1)
    .help = "Processes reading the extracted files (ASU mapping per file); "
            "Auto: the available cores."
}
output
{
  directory = diffuse_merged
    .type = path
  hdf5 = False
    .type = bool
  ccp4_maps = True
    .type = bool
  map_hkl_box = None
    .type = floats(6)
    .help = "h_min,h_max,k_min,k_max,l_min,l_max of the CCP4 maps "
            "(default: everything observed, expanded by symmetry)."
  map_max_points = 200000000
    .type = int
  map_fill_value = 0
    .type = float
    .help = "Value of unobserved grid points in the CCP4 maps."
  ccp4_cell_scale = 100
    .type = float(value_min=0)
    .help = "The CCP4 map cell is the reciprocal cell (1/A) times this."
  log = dials.diffuse_merge.log
    .type = path
}
"""
)

merge_phil_str += ambiguity_phil_str  # issue 15: ambiguity { resolve reference ... }

phil_scope = libtbx.phil.parse(merge_phil_str)


@dials.util.show_mail_handle_errors()
def run(args: List[str] = None, phil: libtbx.phil.scope = phil_scope) -> None:
    usage = "dials.diffuse_merge [options] refined.expt diffuse_extracted/"
    parser = ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=True,
        check_format=False,
        epilog=__doc__,
    )
    params, options, unhandled = parse_command_line(parser, args, phil, logger)
    inputs = check_unhandled(
        unhandled,
        allowed_inputs=(os.path.isdir, lambda p: p.endswith((".npz", ".json"))),
    )
    if not params.input.experiments and not inputs:
        parser.print_help()
        return
    experiments = flatten_experiments(params.input.experiments)
    if not experiments:
        raise Sorry("no experiments given: dials.diffuse_merge refined.expt diffuse_extracted/")
    if not inputs:
        raise Sorry("no extracted data given: name the dials.diffuse_extract output directory")
    merge_run(experiments, inputs, params)


if __name__ == "__main__":
    run()
