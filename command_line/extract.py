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
from dials_diffuse.command_util import check_unhandled, parse_command_line
from dials_diffuse.phil_scopes import grid_phil_str

logger = logging.getLogger("dials.diffuse_extract")

extract_phil_str = (
    """
corrections
{
  polarization = True
    .type = bool
    .help = "Divide by the polarization factor (DIALS convention, beam model)."
  polarization_fraction = None
    .type = float(value_min=0, value_max=1)
    .help = "Override the beam's polarization fraction (0.5 = unpolarised)."
  solid_angle = True
    .type = bool
  efficiency = True
    .type = bool
    .help = "Divide by the sensor efficiency 1 - exp(-mu t / cos alpha)."
  air = True
    .type = bool
    .help = "Divide by the air transmission along the sample-pixel path."
  air_temperature = 293.15
    .type = float
    .help = "Air temperature (K)."
  air_pressure = 1.0
    .type = float
    .help = "Air pressure (atm)."
  gain = None
    .type = float
    .help = "Photons per detector count: counts x gain = photons, whose "
            "Poisson variance is gain x counts. Default: 1 / the panel's gain "
            "(dxtbx's Panel.get_gain() is counts per photon)."
  exposure_time = None
    .type = float
    .help = "Exposure time (s); default: the scan's, else 1."
  background
  {
    constant = 0
      .type = float
      .help = "Background (photons per pixel) subtracted from every pixel."
    map = None
      .type = path
      .help = "Background map per panel (.npy (slow, fast) or a pickle of "
              "per-panel arrays), subtracted instead of the constant."
  }
}
filter
{
  pixel_step = 1
    .type = int
    .help = "Use every n-th pixel along fast and slow."
  d_min = None
    .type = float
  d_max = None
    .type = float
  min_intensity = None
    .type = float
  max_intensity = None
    .type = float
}
masking
{
  include scope dials.util.masking.phil_scope
  beamstop
  {
    type = *none circle rectangle
      .type = choice
    panel = 0
      .type = int(value_min=0)
    center = None
      .type = floats(2)
      .help = "Circle centre (fast, slow) in pixels."
    radius = None
      .type = float(value_min=0)
    rectangle = None
      .type = ints(4)
      .help = "x0, x1, y0, y1 in pixels."
  }
  dynamic
  {
    enable = True
      .type = bool
      .help = "Find hot and dead pixels across all images of the run."
    hot_threshold = None
      .type = float
      .help = "Counts at or above which a pixel counts as hot in an image "
              "(default: the panel's upper trusted range)."
    hot_fraction = 0.5
      .type = float(value_min=0, value_max=1)
      .help = "Hot if at or above hot_threshold in this fraction of images."
    hot_ratio = 20
      .type = float(value_min=1)
      .help = "Hot if its mean exceeds hot_ratio x the local median + 10."
    dead_min_expected_counts = 20
      .type = float(value_min=0)
      .help = "Dead if it never counts where its neighbours imply this many "
              "counts over the run."
  }
  bragg
  {
    method = *predicted *spots
      .type = choice(multi=True)
      .help = "predicted: every reflection predicted from the crystal model "
              "(weak unfound peaks too): on rotation images over the frames its "
              "rocking curve reaches (n_sigma sigma_m / |zeta|) and the detector "
              "box of n_sigma sigma_b, on stills discs of spot_radius; spots: "
              "shoebox pixels of a strong/indexed reflection table on their "
              "absolute frames (the guide's option B; also catches spots the "
              "model misplaces or that do not index). The default, "
              "predicted+spots, masks both (spots only when a reflection table "
              "is given); method=None masks neither."
    d_min = None
      .type = float(value_min=0)
      .help = "Predict reflections to this resolution (default: detector corner)."
    spot_radius = 3.0
      .type = float
      .help = "Radius (px) of the masked disc around a predicted spot, or "
              "around a centroid with use_centroids."
    border = 2
      .type = int
      .help = "Extra pixels masked around each spot."
    max_delpsi = Auto
      .type = float(value_min=0)
      .help = "Stills: mask reflections within this angle (deg) of the Ewald "
              "sphere. Auto: 3 x (half mosaicity + d_min / 2 domain size) from "
              "the crystal's mosaicity model (stills indexing writes one), "
              "between 0.2 and 2 deg; 1 deg for crystals without one."
    use_centroids = False
      .type = bool
      .help = "With method=spots: discs around spot centroids instead of shoeboxes."
    mosaicity_deg = None
      .type = float(value_min=0)
      .help = "Rotation data: sigma_m of DIALS' Gaussian profile model (deg). "
              "Default: the experiment's profile model (integrated.expt), else "
              "estimated from the indexed spots of the reflection table given "
              "(indexed.refl, refined.refl) as dials.integrate does, else 0.2."
    beam_divergence_deg = None
      .type = float(value_min=0)
      .help = "Rotation data: sigma_b of DIALS' profile model (deg), the spot's "
              "angular size on the detector. Default as mosaicity_deg, else 0.1."
    n_sigma = 3.0
      .type = float(value_min=0)
      .help = "Rotation data: mask n_sigma sigma_m / |zeta| either side of each "
              "reflection's rotation angle and n_sigma sigma_b round its "
              "diffracted beam (DIALS' integration default is 3)."
  }
}
"""
    + grid_phil_str
    + """
mp
{
  nproc = Auto
    .type = int(value_min=1)
    .help = "Processes for the per-image work; Auto: the available cores."
  method = *multiprocessing dask
    .type = choice
    .help = "multiprocessing: forked processes on this machine; dask: tasks on "
            "a Dask cluster (mp.dask.scheduler_address, or a local cluster of "
            "mp.nproc workers)."
  dask
  {
    scheduler_address = None
      .type = str
      .help = "e.g. tcp://10.0.0.1:8786 (a dask-jobqueue SLURM/PBS cluster)."
  }
}
output
{
  directory = diffuse_extracted
    .type = path
  save_pixels = True
    .type = bool
    .help = "Also store per-pixel arrays (q, I, sigma, hkl, pixel coordinates) "
            "for the diagnostics; large for big detectors."
  masks = False
    .type = bool
    .help = "Write pixel, Bragg and total masks per image as DIALS mask pickles."
  log = dials.diffuse_extract.log
    .type = path
}
"""
)

phil_scope = libtbx.phil.parse(extract_phil_str, process_includes=True)


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
    params, options, unhandled = parse_command_line(parser, args, phil, logger)
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


if __name__ == "__main__":
    run()
