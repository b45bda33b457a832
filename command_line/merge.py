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

from dials_diffuse.merging import merge_run
from dials_diffuse.command_util import check_unhandled, parse_arguments
from dials_diffuse.startup import run_and_exit

logger = logging.getLogger("dials.diffuse_merge")

phil_scope = libtbx.phil.parse(
    """
include scope dials_diffuse.phil_scopes.merge_phil_scope
output
{
  include scope dials_diffuse.phil_scopes.merge_output_phil_scope
  log = dials.diffuse_merge.log
    .type = path
}
""",
    process_includes=True,
)


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
    params, options, unhandled = parse_arguments(parser, args, phil, logger)
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


def main() -> None:
    """The console entry point: run(), then exit without the interpreter's
    teardown (startup.run_and_exit)."""
    run_and_exit(run)


if __name__ == "__main__":
    run()
