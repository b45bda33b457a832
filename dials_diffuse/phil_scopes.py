"""PHIL parameter definitions of dials_diffuse, one definition of each parameter.

The library owns its parameters (as DIALS' algorithms do): each scope here is
read by the module named in its comment. The dials.diffuse_* commands
``include scope`` them and add only their own ``output.log``;
:mod:`dials_diffuse.pipeline` nests them
under ``extract``, ``merge`` and ``check`` for ``dials.diffuse_process``.

* ``grid``: the fractional-hkl voxel grid (extraction and merging);
* ``extract_phil_scope`` + ``extract_output_phil_scope``:
  :func:`dials_diffuse.extraction.extract`;
* ``merge_phil_scope`` + ``merge_output_phil_scope``:
  :func:`dials_diffuse.merging.merge_run` (its ``absolute_scale`` and
  ``ambiguity`` scopes are defined beside their algorithms, in
  :mod:`dials_diffuse.absolute_scale` and :mod:`dials_diffuse.merge_ambiguity`,
  and ``scaling.surfaces`` in :mod:`dials_diffuse.scaling.surfaces`);
* ``check_phil_scope`` + ``check_output_phil_scope``:
  :func:`dials_diffuse.diagnostics.run_check`;
* ``extract_params_scope``, ``merge_params_scope``, ``check_params_scope``:
  each library scope with its output definitions (the parameters those
  functions take; the commands' scopes without ``output.log``).
"""

from libtbx.phil import parse

from dials.util import Sorry

from dials_diffuse.absolute_scale import absolute_scale_phil_str
from dials_diffuse.merge_ambiguity import ambiguity_phil_str
from dials_diffuse.scaling.surfaces import surfaces_phil_str

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
    for axis, fallback in zip("hkl", default):
        value = getattr(grid, f"ndiv_{axis}")
        if value is None:
            value = fallback
            setattr(grid, f"ndiv_{axis}", value)
        if value is None or value < 1:
            raise Sorry(f"grid.ndiv_{axis}={value}: must be a positive integer")
    return (grid.ndiv_h, grid.ndiv_k, grid.ndiv_l)


# --------------------------------------------------------------------------
# Extraction (dials_diffuse.extraction)
# --------------------------------------------------------------------------
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
      .help = "Find hot and dead pixels across the images of the run."
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
              "counts over the images read."
    max_images = 20
      .type = int(value_min=0)
      .help = "Images the pass reads, evenly spaced over the run (0: every "
              "image). A hot pixel is hot on most images and a dead one on "
              "all, so a sample finds them at a fraction of the cost: the pass "
              "is a second read of every image otherwise."
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
kernel = *auto numba numpy
  .type = choice
  .help = "The per-pixel loop of each image: numba (compiled kernels; Debian's "
          "python3-numba), numpy, or auto: numba when it is available. Both "
          "give the same voxels and pixel counts; sums differ only by the order "
          "of float64 additions."
  .expert_level = 2
"""
)

extract_phil_scope = parse(extract_phil_str, process_includes=True)

#: output definitions the extraction reads (the command adds output.log)
extract_output_phil_str = """
  directory = diffuse_extracted
    .type = path
  save_pixels = all *sample off
    .type = choice
    .help = "Per-pixel arrays (q, I, sigma, hkl, pixel coordinates) in each "
            "image's file, for the diagnostics. sample: the kept pixels on a "
            "regular grid of every s-th row and column, s chosen so that a "
            "detector holds at most pixel_sample_size of them (a 256 x 256 "
            "detector keeps every pixel; a Pilatus 6M every 8th row and "
            "column, ~4 MB per image); all: every kept pixel (~190 MB per "
            "6M image); off: voxel sums only."
  pixel_sample_size = 100000
    .type = int(value_min=1)
    .help = "save_pixels=sample: at most this many pixels per detector (before masking)."
  masks = False
    .type = bool
    .help = "Write pixel, Bragg and total masks per image as DIALS mask pickles."
  mask_images = *all first
    .type = choice
    .help = "masks=True: the masks of every image (all, 3 x 6 MB per Pilatus "
            "6M image), or of the run's first extracted image only (first: "
            "what the extraction diagnostics overlay)."
"""

extract_output_phil_scope = parse(extract_output_phil_str)


# --------------------------------------------------------------------------
# Scaling and merging (dials_diffuse.merging)
# --------------------------------------------------------------------------
merge_phil_str = (
    grid_phil_str
    + absolute_scale_phil_str
    + ambiguity_phil_str
    + """
d_min = None
  .type = float(value_min=0)
  .help = "High-resolution limit of the merged map (Angstrom)."
d_max = None
  .type = float(value_min=0)
cell_tolerance = 0.03
  .type = float(value_min=0)
  .help = "Largest relative deviation of a cell edge from the median cell of "
          "the crystal models (the rule of dials_diffuse.crystal_checks)."
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
  solver = *auto gauss_newton alternating
    .type = choice
    .help = "gauss_newton: all scales together per iteration (the merged "
            "intensities eliminated; a dense scales x scales matrix: 800 MB "
            "and minutes per iteration at 10^4 images); alternating: "
            "closed-form Poisson updates of scales and intensities in turn "
            "(memory linear in the observations). auto: gauss_newton up to "
            "max_gauss_newton_scales scale parameters, alternating beyond. "
            "Offsets or the resolution term use the alternating updates."
  max_gauss_newton_scales = 2000
    .type = int(value_min=1)
    .help = "solver=auto: the most scale parameters solved by Gauss-Newton."
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
"""
    + surfaces_phil_str
    + """
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
    .help = "Processes reading the extracted files (ASU mapping per file), "
            "and threads of the scaling passes; Auto: the available cores."
}
kernel = *auto numba numpy
  .type = choice
  .help = "The scaling passes over the observations: numba (compiled sweeps; "
          "Debian's python3-numba), numpy, or auto: numba when it is available. "
          "They agree to rounding (per-voxel sums add row by row, not chunk by "
          "chunk). The compiled sweeps run the plain model (no "
          "resolution_smoother, offsets or surfaces); the others use numpy."
  .expert_level = 2
"""
)

merge_phil_scope = parse(merge_phil_str)

#: output definitions the merge reads (the command adds output.log)
merge_output_phil_str = """
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
"""

merge_output_phil_scope = parse(merge_output_phil_str)


# --------------------------------------------------------------------------
# Diagnostics (dials_diffuse.diagnostics)
# --------------------------------------------------------------------------
check_phil_str = """
image = None
  .type = int(value_min=0)
  .help = "Extraction mode with a directory: the still id of the image to "
          "diagnose (default: the first extracted)."
max_plot_points = 50000
  .type = int(value_min=1)
  .help = "At most this many points in each scatter plot (seeded random subsample)."
seed = 0
  .type = int
  .help = "Seed of the subsampling."
input
{
  pixel_mask = None
    .type = path
    .help = "Pixel mask pickle (tuple of flex.bool per panel, True = use)."
  bragg_mask = None
    .type = path
  total_mask = None
    .type = path
  background_map = None
    .type = path
    .help = "Background map (.npy (slow, fast) or (panel, slow, fast), or a pickle)."
}
extraction
{
  sample_rows = 50
    .type = int(value_min=1)
    .help = "Rows of the correction sample listed in intensity_correction_summary.txt."
}
merged
{
  radial_bins = 50
    .type = int(value_min=2)
}
"""

check_phil_scope = parse(check_phil_str)

#: output definitions the diagnostics read (the command adds output.log)
check_output_phil_str = """
  directory = None
    .type = path
    .help = "Default: extraction_visual_check (extraction) or phase3_diagnostics (merged)."
  html = True
    .type = bool
    .help = "Write dials.diffuse_check.html, every plot and summary on one page."
"""

check_output_phil_scope = parse(check_output_phil_str)


def _with_output(scope_str, output_str):
    return parse(scope_str + "output\n{\n" + output_str + "}\n", process_includes=True)


#: each library scope with the output definitions it reads: the parameters
#: extract(), merge_run() and run_check() take (the commands' scopes without
#: output.log)
extract_params_scope = _with_output(extract_phil_str, extract_output_phil_str)
merge_params_scope = _with_output(merge_phil_str, merge_output_phil_str)
check_params_scope = _with_output(check_phil_str, check_output_phil_str)


def argument_interpreter(scope):
    """libtbx's interpreter of ``key=value`` arguments for ``scope`` (the one
    place this name, libtbx's, appears in the library)."""
    return scope.command_line_argument_interpreter()
