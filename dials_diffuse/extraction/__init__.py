"""Per-image extraction of corrected diffuse intensities, binned on the voxel grid.

For every kept pixel p of an image:
    signal s_p = counts * gain - background   (gain: photons per count)
    factor F_p = P * Omega * eta * T_air * exposure_time
    I_p = s_p / F_p,  var(s_p) = gain * counts   (Poisson on the photons)
and per voxel v of the image the sums S = sum s_p, W = sum F_p, V = sum var(s_p)
are stored, so that I_v = S / W and var(I_v) = V / W^2. Merging works with the
sums (a Poisson ratio estimator), so zero-count pixels never make a weight
explode.

``extract`` is the library entry point (``dials.python`` scripts and tests call
it); ``dials.diffuse_extract`` only parses parameters and calls it.

The package follows the work's concerns:

* :mod:`.tasks`: planning (images matched to crystal models), raw pixels,
  exposure, parameter checks, the background map;
* :mod:`.context`: the per-detector context (pixel rasters, static mask,
  q, static corrections) and its process-wide cache;
* :mod:`.image`: one image (:func:`extract_image`), its Bragg mask and the
  per-voxel sums;
* :mod:`.binning`: a panel's kept pixels into voxel sums, through the
  compiled kernels of :mod:`.kernels` (numba) or numpy;
* :mod:`.dynamic`: the dynamic (hot/dead pixel) pass over all images;
* :mod:`.run`: :func:`extract`, the jobs on forked processes or Dask, the
  files and the manifest.
"""

from dials_diffuse.extraction.context import (
    DetectorContext,
    PanelPixels,
    detector_context,
    panel_gains,
)
from dials_diffuse.extraction.dynamic import dynamic_mask
from dials_diffuse.extraction.binning import VoxelKeys
from dials_diffuse.extraction.image import (
    ImageResult,
    bragg_methods,
    extract_image,
    image_bragg_mask,
    max_delpsi_deg,
)
from dials_diffuse.extraction.run import DYNAMIC_MASK_NAME, extract, log_summary
from dials_diffuse.extraction.tasks import (
    ImageError,
    ImageTask,
    check_params,
    exposure_time,
    load_background,
    plan_tasks,
    read_image,
)

__all__ = [
    "DYNAMIC_MASK_NAME",
    "DetectorContext",
    "ImageError",
    "ImageResult",
    "ImageTask",
    "PanelPixels",
    "VoxelKeys",
    "bragg_methods",
    "check_params",
    "detector_context",
    "dynamic_mask",
    "exposure_time",
    "extract",
    "extract_image",
    "image_bragg_mask",
    "load_background",
    "log_summary",
    "max_delpsi_deg",
    "panel_gains",
    "plan_tasks",
    "read_image",
]
