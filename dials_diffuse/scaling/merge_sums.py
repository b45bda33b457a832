"""Merging scaled observations: the per-voxel sums, intensities and sigmas
(Poisson ratio estimator), the model's prediction and variance of an
observation, and the error-model term of the merged sigmas."""

from __future__ import annotations

import logging

import numpy as np

from dials_diffuse.scaling.model import ScalingModel
from dials_diffuse.scaling.passes import SharedRows, VoxelSums, all_rows, used_index, used_sum, chunks

logger = logging.getLogger("dials.diffuse_merge")


MAX_ERROR_K = 1024.0


def _image_selections(u, image, halves):
    """The rows of a chunk each sum is over: the used rows, or those of each
    half of the images (CC1/2)."""
    if halves is None:
        return [u]
    first = halves[image]
    return [u & first, u & ~first]


def add_merge_sums(sums, ch, u, model, halves=None, expected=None):
    """Add a chunk's per-voxel merge sums (numerator, denominator, counting
    variance, count, sum of E[S]^2) to sums[0], or those of each half of the
    images to sums[0:2]. ``expected``: E[S] of the rows, for the error
    model's term (k E[S])^2 of the merged variance (MERGE_SUMS)."""
    n = sums.shape[-1]
    a = model.observation_factor(ch)
    b = model.scale[ch.image]
    c = model.observation_offset(ch)
    # Poisson ML in photons (S is in photons, var(S) = E[S])
    numerator = ch.signal - c * ch.factor
    denominator = b * ch.factor if model.smoother_q is None else b * a * ch.factor
    # variance of S with a one-count floor (gain photons) per observation, so
    # that no merged sigma is zero even where every pixel counted nothing
    variance = np.maximum(ch.variance.astype(np.float64), ch.gain)
    for s, sel in enumerate(_image_selections(u, ch.image, halves)):
        voxel = used_index(ch.voxel, sel, n)
        for k, values in enumerate((numerator, denominator, variance)):
            sums[s, k] += used_sum(voxel, values, n)
        sums[s, 3] += used_sum(voxel, None, n)
        if expected is not None:
            sums[s, 4] += used_sum(voxel, expected * expected, n)


def merge_partition(rows, part, model, halves=None):
    """Per-voxel merge sums of the partition's rows (see add_merge_sums)."""
    obs, use = rows.obs, rows.use
    n_sets = 1 if halves is None else 2
    kernels = rows.compiled(model)
    if kernels is not None:
        sums = np.zeros((n_sets, MERGE_SUMS, part.n_voxels))
        compiled_sweep(kernels, rows, part, model, np.zeros(obs.n_voxels),
                       merge=sums, halves=halves)
        return (VoxelSums(part.v0, sums),)
    sums = np.zeros((n_sets, MERGE_SUMS, obs.n_voxels))
    for ch, u, _ in chunks(obs, use, part):
        add_merge_sums(sums, ch, u, model, halves)
    return (sums,)


_NONE_2D = np.zeros((0, 0))
_NONE_3D = np.zeros((0, 0, 0))


def compiled_sweep(kernels, rows, part, model, intensity, error_k=0.0, outlier_sigma=None,
                   totals=None, gauss_newton=None, merge=None, halves=None, merge_expected=False):
    """kernels.sweep over a Partition's voxels with the plain model (see
    there): rejection when ``outlier_sigma``; the Gauss-Newton sums into
    ``gauss_newton`` ((d_b, g_b) per image, (d_I, g_I, sum S) per voxel of
    the partition), with the couplings stored per row; the merge sums of the
    partition's voxels into ``merge``."""
    obs = rows.obs
    gn_image, gn_voxel = (_NONE_2D, _NONE_2D) if gauss_newton is None else gauss_newton
    half = (np.zeros(obs.n_images, np.int8) if halves is None
            else np.where(halves, 0, 1).astype(np.int8))
    kernels.sweep(
        obs.voxel, obs.image, obs.signal, obs.factor, obs.variance, rows.use, part.run_start,
        part.run_stop, part.v0, np.ascontiguousarray(model.scale, np.float64), intensity,
        np.ascontiguousarray(obs.image_gain, np.float64), float(error_k),
        -1.0 if outlier_sigma is None else outlier_sigma * outlier_sigma,
        outlier_sigma is not None, np.zeros(3) if totals is None else totals,
        gn_image, gn_voxel, rows.coupling, _NONE_3D if merge is None else merge, half,
        merge_expected)


# per voxel: numerator, denominator, counting variance, count, sum of E[S]^2
MERGE_SUMS = 5


def intensities(sums, error_k=0.0):
    """I_v = sum (S - c W) / sum b a W and sigma_v = sqrt(counting variance +
    k^2 sum E[S]^2) / the same denominator, and the count."""
    numerator, denominator, variance, n_obs, expected2 = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        intensity = np.where(denominator > 0, numerator / denominator, np.nan)
        sigma = np.where(denominator > 0,
                         np.sqrt(variance + error_k * error_k * expected2) / denominator, np.nan)
    return intensity, sigma, n_obs.astype(np.int64)


CHI2_1_MEDIAN_Z = 0.6744897501960817  # median |z| of a standard normal


def merged_error_k(half_sums, min_obs=2, max_k=None):
    """k of the merged variance (counting + k^2 sum E[S]^2) such that the
    half-dataset differences (I_1 - I_2) / sqrt(sigma_1^2 + sigma_2^2) have
    unit robust width (median |z| of a normal).

    The per-observation k of the outlier test describes how single
    observations scatter; how that scatter averages down in a voxel depends
    on whether it is random or repeats between images (a voxel's intensity
    varies inside it, and images sample similar parts of it): calibrating on
    the two independent half maps measures what the merged sigma must mean.
    """
    (n1, d1, v1, c1, e1), (n2, d2, v2, c2, e2) = half_sums
    both = (c1 >= min_obs) & (c2 >= min_obs) & (d1 > 0) & (d2 > 0)
    if not both.any():
        return 0.0
    diff2 = (n1[both] / d1[both] - n2[both] / d2[both]) ** 2
    p = v1[both] / d1[both] ** 2 + v2[both] / d2[both] ** 2
    q = e1[both] / d1[both] ** 2 + e2[both] / d2[both] ** 2
    target = CHI2_1_MEDIAN_Z ** 2

    if float(np.median(diff2 / p)) <= target:
        return 0.0
    return median_error_k(diff2, p, q, target, MAX_ERROR_K if max_k is None else max_k)


def median_error_k(squared, counting, expected2, target, max_k=MAX_ERROR_K):
    """k >= 0 such that the median of squared / (counting + k^2 expected2) is
    ``target`` (at most max_k). z_j(k) <= m <=> t_j = (squared_j - m
    counting_j) / (m expected2_j) <= k^2, so the median of z is m where k^2
    is the median of t: one median, no search."""
    m = target
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(expected2 > 0,
                     (squared - m * counting) / (m * np.where(expected2 > 0, expected2, 1.0)),
                     np.where(squared > m * counting, np.inf, -np.inf))
    k2 = float(np.median(t))
    return float(min(np.sqrt(k2), max_k)) if k2 > 0 else 0.0


def merge_intensities(obs, model: ScalingModel, use: np.ndarray = None, passes=None, halves=None):
    """I_v, sigma_v and the number of observations per voxel for a given model
    (over ``passes.use``, or ``use`` without passes); with ``halves`` (a bool
    per image), one such triple for each half of the images."""
    if passes is None:
        rows = SharedRows(obs=obs, use=use, coupling=None)
        sums = merge_partition(rows, all_rows(obs), model, halves)[0]
    else:
        sums = passes.reduce(merge_partition, model, halves,
                             compiled=passes.rows.compiled(model) is not None)[0]
    merged = [intensities(s) for s in sums]
    return merged[0] if halves is None else merged


def model_prediction(obs, model: ScalingModel, intensity):
    """E[S] for the rows of ``obs`` (an ObservationChunk)."""
    return prediction(obs, model, intensity)[2]


def prediction(obs, model, intensity):
    """b_i, a_i I_v and E[S] = W (b_i a_i I_v + c_i) of each row (the
    factors the Gauss-Newton sums reuse)."""
    b = model.scale[obs.image]
    x = intensity[obs.voxel]
    if model.smoother_q is not None:
        x *= model.observation_factor(obs)
    expected = b * x
    if model.offset.any():
        expected += model.offset[obs.image]
    if obs.row_offset is not None:
        expected += obs.row_offset
    expected *= obs.factor
    return b, x, expected


def model_variance(obs, expected):
    """var(S) for Poisson photons: E[S] plus the subtracted background's
    photons (what was counted minus S: the observed variance minus the
    signal), with a one-count floor (gain photons). Without the background
    the error model would absorb it and inflate every merged sigma."""
    gain = obs.gain if obs.gain is not None else obs.image_gain[obs.image]
    background = np.maximum(obs.variance - obs.signal, 0.0)
    return np.maximum(expected + background, gain)
