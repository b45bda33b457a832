"""
Extract diffuse scattering from the images of indexed experiments.

For every image matched to a crystal model: static, dynamic (hot/dead) and
Bragg masks; per-pixel background subtraction, gain, exposure, polarization,
solid-angle, sensor-efficiency and air-attenuation corrections with Poisson
sigmas; q = s1 - s0 (1/Angstrom, no 2 pi) and fractional hkl; and the sums
per voxel of the fractional-hkl grid (grid.ndiv_h/k/l) that
dials.diffuse_merge scales and merges. One NPZ file per image and an
extraction_manifest.json are written to output.directory.

With a second experiment list (e.g. imported.expt) its images are extracted:
each is matched to its crystal model, and images without one (not indexed) are
reported and skipped.

Examples::

  dials.diffuse_extract refined.expt

  dials.diffuse_extract refined.expt imported.expt grid.ndiv_h=5 grid.ndiv_k=5 grid.ndiv_l=5

  dials.diffuse_extract refined.expt imported.expt refined.refl

  dials.diffuse_extract refined.expt strong.refl masking.bragg.method=spots

  dials.diffuse_extract refined.expt masking.beamstop.type=circle \\
    masking.beamstop.center=1231,1263 masking.beamstop.radius=40 \\
    masking.untrusted.rectangle=0,100,0,2527 filter.pixel_step=2

  dials.diffuse_extract refined.expt phil/quick_test.phil
"""

from __future__ import annotations

import logging
from typing import List

import libtbx.phil

import dials.util
import dials.util.log
from dials.util import Sorry
from dials.util.options import ArgumentParser, flatten_experiments, flatten_reflections

from dials_diffuse.extraction import extract
from dials_diffuse.command_util import check_unhandled, parse_arguments
from dials_diffuse.startup import run_and_exit

logger = logging.getLogger("dials.diffuse_extract")

phil_scope = libtbx.phil.parse(
    """
include scope dials_diffuse.phil_scopes.extract_phil_scope
output
{
  include scope dials_diffuse.phil_scopes.extract_output_phil_scope
  log = dials.diffuse_extract.log
    .type = path
}
""",
    process_includes=True,
)


@dials.util.show_mail_handle_errors()
def run(args: List[str] = None, phil: libtbx.phil.scope = phil_scope) -> None:
    usage = "dials.diffuse_extract [options] refined.expt [imported.expt] [strong.refl]"
    parser = ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=True,
        read_reflections=True,
        check_format=True,
        epilog=__doc__,
    )
    params, options, unhandled = parse_arguments(parser, args, phil, logger)
    check_unhandled(unhandled)
    if not params.input.experiments:
        parser.print_help()
        return
    models = params.input.experiments[0].data
    images = None
    if len(params.input.experiments) > 1:
        images = flatten_experiments(params.input.experiments[1:])
    reflections = flatten_reflections(params.input.reflections)
    reflections = reflections[0] if reflections else None
    models_file = params.input.experiments[0].filename
    if len(models) == 0:
        raise Sorry(f"{models_file} contains no experiments")
    without_crystal = [i for i, e in enumerate(models) if e.crystal is None]
    if without_crystal:
        raise Sorry(
            f"{models_file}: experiment {without_crystal[0]} has no crystal "
            "(give indexed or refined experiments first, e.g. refined.expt)"
        )
    manifest = extract(models, params, images=images, reflections=reflections)
    logger.info(
        "Extracted %d of %d images to %s",
        manifest["n_extracted"],
        manifest["n_images"],
        params.output.directory,
    )


def main() -> None:
    """The console entry point: run(), then exit without the interpreter's
    teardown (startup.run_and_exit)."""
    run_and_exit(run)


if __name__ == "__main__":
    run()
