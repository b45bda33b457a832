"""PHIL parameters of dials.diffuse_simulate (shared by the command and the library)."""

from __future__ import annotations

import libtbx.phil

phil_str = """
mode = *stills rotation
  .type = choice
  .help = "stills: every image a randomly oriented crystal (serial/grid experiment);"
          "rotation: one crystal rotated by a fixed oscillation per image."
n_images = 6
  .type = int
  .help = "Number of images (must be >= 1)."
random_seed = 42
  .type = int
  .help = "Seed of every random choice (orientations, scales, hot/dead pixels, noise)."
crystal {
  unit_cell = 30 40 50 90 90 90
    .type = floats(size=6)
    .help = "a b c (Angstrom) alpha beta gamma (degrees)."
  space_group = "P 21 21 21"
    .type = str
    .help = "Space group symbol (any setting cctbx understands, e.g. P41212, R3:H, Fm-3m)."
  cell_spread = 0.0
    .type = float(value_min=0)
    .help = "Stills: relative sigma of each crystal's cell edges about unit_cell"
            "(symmetrised to the space group; simulate/serial.py)."
  stills_per_crystal = 1
    .type = int(value_min=1)
    .help = "Stills: consecutive stills from one crystal (same cell, random orientations)."
}
beam {
  wavelength = 1.0
    .type = float
    .help = "Angstrom."
  polarization_fraction = 0.999
    .type = float
    .help = "DIALS convention: 0.5 unpolarised, ~1 fully polarised in the plane normal to polarization_normal."
  polarization_normal = 0 1 0
    .type = floats(size=3)
}
detector {
  type = *single multipanel
    .type = choice
    .help = "single: one panel written as miniCBF; multipanel: tiles with gaps written as full (multi-array) CBF (stills only)."
  distance = 150
    .type = float
    .help = "Sample to detector distance (mm)."
  pixel_size = 0.172
    .type = float
    .help = "Square pixel size (mm)."
  n_fast = 487
    .type = int
    .help = "Single panel: pixels along fast (x)."
  n_slow = 619
    .type = int
    .help = "Single panel: pixels along slow (y)."
  beam_centre = None
    .type = floats(size=2)
    .help = "Single panel: beam centre (fast, slow) in mm; default the panel centre."
  format = *auto pilatus generic
    .type = choice
    .help = "Single panel miniCBF header: pilatus (PILATUS_1.2 header; needs Pilatus"
            "module tiling, e.g. 487x195, 487x619, 2463x2527; inter-module gaps are"
            "written as -1 and masked by dxtbx), generic (GENERIC_MINI header, any"
            "size), auto (pilatus when the size tiles into Pilatus modules)."
  overload = 1048500
    .type = int
    .help = "Count cutoff written to the header (upper trusted value)."
  sensor {
    material = *Si CdTe none
      .type = choice
    thickness = 0.45
      .type = float
      .help = "mm; mu comes from cctbx attenuation tables as dxtbx computes it."
  }
  multipanel {
    n_panels_fast = 2
      .type = int
    n_panels_slow = 2
      .type = int
    panel_n_fast = 100
      .type = int
    panel_n_slow = 110
      .type = int
    gap_fast = 7
      .type = int
      .help = "Gap between tiles along fast (pixels)."
    gap_slow = 17
      .type = int
      .help = "Gap between tiles along slow (pixels)."
  }
}
rotation {
  start = 0.0
    .type = float
    .help = "Rotation angle at the start of the first image (degrees)."
  first_image = 1
    .type = int
    .help = "Number of the first image: files image_<first_image>.cbf ..., scan"
            "image range (first_image, first_image + n_images - 1), array range"
            "starting at first_image - 1 (as dials.import reads them)."
  oscillation = 0.2
    .type = float
    .help = "Oscillation per image (degrees), axis (1,0,0) as miniCBF's single-axis goniometer."
  scan_varying = False
    .type = bool
    .help = "Make the crystal scan-varying: U drifts by drift_deg over the scan."
  drift_deg = 0.3
    .type = float
  phi_subsamples = 1
    .type = int
    .help = "Diffuse signal of an image averaged over this many angles across its"
            "oscillation (1: evaluated at the image centre, the extraction convention)."
}
exposure_time = 0.1
  .type = float
  .help = "Seconds per image (written to the header)."
flux = 3e8
  .type = float
  .help = "Photons per unit D per steradian per second: expected diffuse photons in a"
          "pixel = scale_i * D(hkl) * P * Omega * eta * T_air * exposure_time * flux."
gain = 1.0
  .type = float
  .help = "Photons per count: photons ~ Poisson(mean photons), counts = rint(photons / gain);"
          "the written panels keep dxtbx gain 1."
scale {
  spread = 0.15
    .type = float
    .help = "Sigma of the log-normal per-image scale factors (normalised to mean 1)."
  phi_period = None
    .type = float(value_min=0)
    .help = "Rotation mode: scales vary smoothly with the rotation angle instead, "
            "1 + spread * sin(2 pi phi / phi_period) at each image's centre "
            "(phi in degrees), normalised to mean 1."
}
diffuse {
  isotropic {
    amplitude = 1.0
      .type = float
    q0 = 0.25
      .type = float
      .help = "Ring centre |q| (1/Angstrom)."
    width = 0.06
      .type = float
      .help = "Gaussian sigma of the ring in |q| (1/Angstrom)."
  }
  halo {
    amplitude = 2.0
      .type = float
    width = 0.006
      .type = float
      .help = "Gaussian sigma (1/Angstrom) of the halo around every integer lattice point."
  }
  streak {
    amplitude = 1.0
      .type = float
    length = 0.01
      .type = float
      .help = "Gaussian sigma along a* (1/Angstrom)."
    width = 0.002
      .type = float
      .help = "Gaussian sigma perpendicular to a* (1/Angstrom)."
  }  absolute {
    composition = None
      .type = str
      .help = "Element / count pairs per unit cell (e.g. 'C 600 H 950 N 160 O 190 S 8'):"
              "D becomes electron units per cell, sum_j n_j f_j(|s|)^2 (1 + contrast"
              "(halos and streaks / their mean - 1)), and the images also hold the"
              "cell's incoherent (Compton) scattering. flux is then photons per"
              "electron unit per steradian per second (about 1e4 times less than for"
              "the default D of order 1). See dials_diffuse/simulate/absolute.py."
    contrast = 0.3
      .type = float(value_min=0)
  }
  lobe {
    amplitude = 0.0
      .type = float
      .help = "Smooth anisotropic lobes (0: none): A exp(-(|q| - q0)^2 / 2 q_width^2)"
              "times the sum over the Laue group of exp((cos angle(q, u) - 1) / angle^2),"
              "u the direction. A general direction makes D invariant under the Laue"
              "group only, not the lattice's holohedry (indexing ambiguity)."
    direction = 1 0.35 0.3
      .type = floats(size=3)
      .help = "Lobe axis u in reciprocal-lattice coordinates (h k l of a direction)."
    angle = 0.15
      .type = float(value_min=0)
      .help = "Angular width of a lobe (radians)."
    q0 = 0.2
      .type = float
    q_width = 0.08
      .type = float(value_min=0)
  }
}
surfaces
  .help = "Smooth multiplicative surfaces on the diffuse photons, as mdx2 models"
          "them (dials_diffuse/simulate/surfaces.py); 0 switches one off."
{
  absorption = 0.0
    .type = float(value_min=0, value_max=0.9)
    .help = "Depth A of the absorption surface a(x, y, phi), in [1 - A, 1]."
  absorption_period_deg = 60.0
    .type = float(value_min=0)
    .help = "Period in phi of the absorption surface's variation."
  response = 0.0
    .type = float(value_min=0, value_max=0.9)
    .help = "Amplitude R of the detector response d(x, y), in [1 - R, 1 + R]."
}
bragg {
  enabled = True
    .type = bool
  intensity = 20000
    .type = float
    .help = "Photons of a fully recorded spot (times the image scale factor and partiality)."
  sigma_px = 0.8
    .type = float
    .help = "Gaussian sigma of a spot on the detector (pixels)."
  mosaicity_deg = 0.1
    .type = float
    .help = "sigma_m (degrees; 0.1 is typical of a well-ordered crystal). Stills: sigma of the partiality"
            "exp(-delpsi^2/2 sigma_m^2); rotation: each spot's rocking curve is a"
            "Gaussian in phi of sigma sigma_m / |zeta| (DIALS' zeta = m2 . e1)."
  divergence_deg = 0.0
    .type = float
    .help = "Beam divergence (sigma, degrees): widens each spot on the detector to"
            "sqrt(sigma_px^2 + (r sigma_D / pixel size)^2), r the sample-spot distance."
  d_min = None
    .type = float
    .help = "Resolution limit of the predictions (default: the detector's)."
}
background {
  constant = 2.0
    .type = float
    .help = "Photons per pixel per image."
  radial_amplitude = 3.0
    .type = float
    .help = "Photons per pixel per image at |q| = 0 of a Gaussian in |q|."
  radial_width = 0.15
    .type = float
    .help = "Sigma (1/Angstrom) of the radial background."
}
beamstop {
  radius = 2.0
    .type = float
    .help = "Shadow: pixels within this distance (mm) of the direct-beam axis; 0 for none."
  transmission = 0.0
    .type = float
    .help = "Fraction of scatter and background transmitted in the shadow."
}
hot_pixels {
  count = 4
    .type = int
  value = 60000
    .type = int
    .help = "Counts in a hot pixel on every image (below overload: not masked by dxtbx)."
}
dead_pixels {
  count = 8
    .type = int
    .help = "Pixels that read 0 on every image."
}
noise = True
  .type = bool
  .help = "Poisson noise on the photons; off: counts = rint(expected photons / gain)."
corrections {
  polarization = True
    .type = bool
  solid_angle = True
    .type = bool
  efficiency = True
    .type = bool
  air = True
    .type = bool
  air_temperature = 293.15
    .type = float
    .help = "Kelvin."
  air_pressure = 1.0
    .type = float
    .help = "Atmospheres."
}
output {
  directory = simulated
    .type = path
    .help = "Dataset directory (written atomically; must not exist unless overwrite)."
  prefix = image
    .type = str
  overwrite = False
    .type = bool
  log = dials.diffuse_simulate.log
    .type = str
}
"""

phil_scope = libtbx.phil.parse(phil_str)


def default_params():
    """A fresh copy of the default parameters (a scope_extract)."""
    return phil_scope.extract()


def params_from(**overrides):
    """Default parameters with dotted-name overrides, e.g.
    ``params_from(**{"mode": "rotation", "detector.n_fast": 200})``."""
    lines = []
    for key, value in overrides.items():
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        elif isinstance(value, str) and (" " in value or value == ""):
            value = '"%s"' % value
        lines.append(f"{key} = {value}")
    user = libtbx.phil.parse("\n".join(lines))
    working, unused = phil_scope.fetch(sources=[user], track_unused_definitions=True)
    if unused:
        raise KeyError("unknown parameters: " + ", ".join(str(u.path) for u in unused))
    return working.extract()
