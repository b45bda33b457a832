"""
Simulate diffuse-scattering images with exact ground truth.

Writes image files that dials.import reads (miniCBF for a single panel, full
multi-array CBF for a tiled detector), truth.expt (the experiments on those
images: one experiment per still with its own crystal, or one rotation
sequence), truth.json (every parameter, per-image scale factors, hot/dead
pixels, beamstop, background, flux, gain, exposure) and bragg.refl (the Bragg
spots drawn). The truth is loaded in Python with
dials_diffuse.simulate.load_truth(directory).

Counts are drawn as Poisson(mu) with
  mu = (scale_i * D(hkl) * P * Omega * eta * T_air * exposure_time * flux
        + background) / gain  (+ Bragg spots)

Examples::

  dials.diffuse_simulate output.directory=sim

  dials.diffuse_simulate mode=rotation n_images=90 rotation.oscillation=0.5 \\
    crystal.unit_cell=60,60,90,90,90,120 crystal.space_group=P6 \\
    output.directory=rotation

  dials.diffuse_simulate detector.type=multipanel n_images=10 \\
    detector.multipanel.n_panels_fast=3 output.directory=tiles

  dials.diffuse_simulate detector.n_fast=2463 detector.n_slow=2527 \\
    detector.distance=250 n_images=2 output.directory=pilatus6m
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

import dials.util
import dials.util.log
from dials.util.options import ArgumentParser
from dials.util.version import dials_version

from dials_diffuse.simulate.params import phil_scope
from dials_diffuse.simulate.simulator import simulate_dataset
from dials_diffuse.startup import run_and_exit

logger = logging.getLogger("dials.diffuse_simulate")


@dials.util.show_mail_handle_errors()
def run(args: Optional[List[str]] = None, phil=phil_scope) -> None:
    """Parse the command line and simulate a dataset."""
    usage = "usage: dials.diffuse_simulate [options] [param.phil] key=value ..."
    parser = ArgumentParser(
        usage=usage,
        phil=phil,
        epilog=__doc__,
        read_experiments=False,
        read_reflections=False,
        check_format=False,
    )
    params, options = parser.parse_args(args=args, show_diff_phil=False)
    dials.util.log.config(verbosity=options.verbose, logfile=params.output.log)
    logger.info(dials_version())
    diff_phil = parser.diff_phil.as_str()
    if diff_phil:
        logger.info("The following parameters have been modified:\n%s", diff_phil)
    path = simulate_dataset(params)
    logger.info("Dataset written to %s", path)


def main() -> None:
    """The console entry point: run(), then exit without the interpreter's
    teardown (startup.run_and_exit)."""
    run_and_exit(run)


if __name__ == "__main__":
    run(sys.argv[1:])
