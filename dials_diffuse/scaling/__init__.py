"""Relative scaling of diffuse voxel observations between images.

Model, per observation of voxel v on image i (in the extraction's sums):
    S_iv ~ W_iv * (b_i * a_i(|q_v|) * I_v + c_i)
with b_i a per-image scale, a_i(|q|) an optional smooth resolution term
(piecewise linear through a few control points shared by all images) and c_i
optional per-image offsets. I_obs = S / W, so I_obs ~ b_i a_i I_v + c_i.

A resolution term common to all images is indistinguishable from a change of
the merged map, so a_i describes how each image differs from the others: it is
normalised to mean 1 over each image's control points and to mean 1 over the
images at each control point.

Refinement alternates closed-form updates, each the maximum-likelihood (or
weighted least-squares) solution for one block given the others:
* I_v = sum_i (S_iv - c_i W_iv) / sum_i b_i a W_iv   (Poisson ratio estimator:
  no 1/sigma^2 weights, so zero-count observations cannot blow up);
* b_i = sum_v (S_iv - c_i W_iv) / sum_v a W_iv I_v    (likewise);
* c_i and the smoother by weighted least squares with model variances;
then mean(b) = 1 and mean(a) = 1 fix the free overall factors. Observations
more than ``outlier_sigma`` model standard deviations away are rejected.

The package, by concern:

* :mod:`.model`: the model and the refinement result;
* :mod:`.passes`: chunks, partitions and the parallel passes over the
  observations;
* :mod:`.merge_sums`: merged intensities and sigmas, predictions, variances;
* :mod:`.gauss_newton`: the Gauss-Newton scale update (Schur complement);
* :mod:`.refine`: :func:`refine_scales`, rejection, error model, offsets,
  smoother;
* :mod:`.surfaces`: mdx2's optional smooth terms a(x, y, phi), d(x, y) and
  c(|s|, phi) (scaling.surfaces).
"""

from dials_diffuse.scaling.merge_sums import (
    MERGE_SUMS,
    merge_intensities,
    merged_error_k,
    model_prediction,
    model_variance,
)
from dials_diffuse.scaling.model import ScalingModel, ScalingResult, SmoothScaleBasis
from dials_diffuse.scaling.passes import (
    ObservationPasses,
    SharedRows,
    chunks,
    load_kernels,
    partition_bounds,
)
from dials_diffuse.scaling.refine import CHI2_1_MEDIAN, fit_error_model, refine_scales
from dials_diffuse.scaling.surfaces import SurfaceModel, needs_detector_xy, setup_surfaces

__all__ = [
    "CHI2_1_MEDIAN",
    "MERGE_SUMS",
    "ObservationPasses",
    "ScalingModel",
    "ScalingResult",
    "SharedRows",
    "SurfaceModel",
    "SmoothScaleBasis",
    "chunks",
    "fit_error_model",
    "load_kernels",
    "merge_intensities",
    "merged_error_k",
    "model_prediction",
    "model_variance",
    "needs_detector_xy",
    "partition_bounds",
    "refine_scales",
    "setup_surfaces",
]
