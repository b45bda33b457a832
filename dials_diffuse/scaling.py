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
"""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import numpy as np

logger = logging.getLogger("dials.diffuse_merge")


@dataclasses.dataclass
class ScalingModel:
    scale: np.ndarray  # b_i
    offset: np.ndarray  # c_i (zeros when offsets are off)
    smoother_q: Optional[np.ndarray] = None  # control point |q| (1/Angstrom)
    smoother_values: Optional[np.ndarray] = None  # (n_images, k): a_i at the control points

    def interpolation(self, qmag):
        """Control-point index j and weight t: a(q) = (1-t) v_j + t v_{j+1}."""
        qs = self.smoother_q
        j = np.clip(np.searchsorted(qs, qmag, side="right") - 1, 0, qs.size - 2)
        t = np.clip((qmag - qs[j]) / (qs[j + 1] - qs[j]), 0.0, 1.0)
        return j, t

    def resolution_factor(self, qmag: np.ndarray, image: np.ndarray) -> np.ndarray:
        """a_image(|q|) for each (|q|, image) pair."""
        if self.smoother_q is None:
            return np.ones_like(qmag)
        j, t = self.interpolation(qmag)
        v = self.smoother_values
        return (1 - t) * v[image, j] + t * v[image, j + 1]

    def observation_factor(self, obs) -> np.ndarray:
        return self.resolution_factor(obs.voxel_qmag[obs.voxel], obs.image)


@dataclasses.dataclass
class ScalingResult:
    model: ScalingModel
    intensity: np.ndarray  # merged I_v (per compact voxel)
    rejected: np.ndarray  # bool per observation
    history: List[dict]
    converged: bool


# Observations are processed in chunks of this many rows, so that the float64
# temporaries of a pass stay small whatever the number of observations.
CHUNK_ROWS = 2_000_000


@dataclasses.dataclass
class ObservationChunk:
    """A slice of an ObservationSet, in float64, with the per-voxel and
    per-image arrays of the whole set (what the model functions need)."""

    voxel: np.ndarray
    image: np.ndarray
    signal: np.ndarray
    factor: np.ndarray
    variance: np.ndarray
    voxel_qmag: np.ndarray
    image_gain: np.ndarray


def chunks(obs, use=None, rows=None):
    """(chunk, use of its rows) for consecutive slices of the observations."""
    rows = rows or CHUNK_ROWS
    for start in range(0, obs.n_obs, rows):
        sl = slice(start, min(start + rows, obs.n_obs))
        yield ObservationChunk(
            voxel=obs.voxel[sl],
            image=obs.image[sl],
            signal=obs.signal[sl].astype(np.float64),
            factor=obs.factor[sl].astype(np.float64),
            variance=obs.variance[sl].astype(np.float64),
            voxel_qmag=obs.voxel_qmag,
            image_gain=obs.image_gain,
        ), (None if use is None else use[sl])


def _bincount(index, weights, n):
    return np.bincount(index, weights=weights, minlength=n)


def merge_intensities(obs, model: ScalingModel, use: np.ndarray):
    """I_v, sigma_v and the number of observations per voxel for a given model."""
    n = obs.n_voxels
    numerator, denominator, variance, n_obs = (np.zeros(n) for _ in range(4))
    for ch, u in chunks(obs, use):
        a = model.observation_factor(ch)
        b = model.scale[ch.image]
        c = model.offset[ch.image]
        gain = ch.image_gain[ch.image]
        # Poisson ML in counts (S / gain): images weigh by their expected
        # counts, whatever their gain (the unit of S)
        numerator += _bincount(ch.voxel, np.where(u, (ch.signal - c * ch.factor) / gain, 0.0), n)
        denominator += _bincount(ch.voxel, np.where(u, b * a * ch.factor / gain, 0.0), n)
        # variance of S with a one-count floor per observation, so that no
        # merged sigma is zero even where every pixel counted nothing
        variance += _bincount(
            ch.voxel, np.where(u, np.maximum(ch.variance, gain * gain) / (gain * gain), 0.0), n)
        n_obs += _bincount(ch.voxel, u.astype(np.float64), n)
    with np.errstate(invalid="ignore", divide="ignore"):
        intensity = np.where(denominator > 0, numerator / denominator, np.nan)
        sigma = np.where(denominator > 0, np.sqrt(variance) / denominator, np.nan)
    return intensity, sigma, n_obs.astype(np.int64)


def model_prediction(obs, model: ScalingModel, intensity):
    """E[S] for the rows of ``obs`` (an ObservationChunk or a whole set)."""
    a = model.observation_factor(obs)
    return obs.factor * (model.scale[obs.image] * a * intensity[obs.voxel] + model.offset[obs.image])


def model_variance(obs, expected):
    """var(S) for Poisson counts: gain * E[S], with a one-count floor."""
    gain = obs.image_gain[obs.image]
    return np.maximum(gain * np.maximum(expected, 0.0), gain * gain)


def _update_scales(obs, model, intensity, use):
    """b_i = sum_v (S - c W) / sum_v W a I_v (Poisson maximum likelihood)."""
    n = obs.n_images
    num, den = np.zeros(n), np.zeros(n)
    for ch, u in chunks(obs, use):
        x = model.observation_factor(ch) * intensity[ch.voxel]
        num += _bincount(ch.image, np.where(u, ch.signal - model.offset[ch.image] * ch.factor, 0.0), n)
        den += _bincount(ch.image, np.where(u, ch.factor * x, 0.0), n)
    model.scale = np.where(den > 0, num / np.where(den > 0, den, 1), model.scale)


# Largest number of (image, voxel) couplings held for the Gauss-Newton matrix;
# beyond it the matrix is estimated from a regular subset of the voxels.
MAX_COUPLINGS = 20_000_000


def _gauss_newton_scales(obs, model, intensity, use):
    """One Gauss-Newton step for b on the joint problem in (b, I).

    The alternating updates converge slowly when images overlap only with
    their neighbours (a rotation sweep: a chain of images). Solving for all
    b_i together, with the I_v eliminated through the Schur complement of the
    normal equations, moves the whole chain at once. The gradient is exact;
    for very large runs the images x images matrix is estimated from every
    k-th voxel (scaled by k), which keeps memory bounded and the step a good
    quasi-Newton step.
    """
    from scipy import sparse

    n_img, n_vox = obs.n_images, obs.n_voxels
    d_b, d_i = np.zeros(n_img), np.zeros(n_vox)
    g_b, g_i = np.zeros(n_img), np.zeros(n_vox)

    def terms(ch, u):
        b = model.scale[ch.image]
        x = intensity[ch.voxel]
        W = ch.factor
        mu = b * W * x
        w = np.where(u, 1.0 / model_variance(ch, mu), 0.0)
        return b, x, W, w, ch.signal - mu

    for ch, u in chunks(obs, use):
        b, x, W, w, r = terms(ch, u)
        d_b += _bincount(ch.image, w * W * W * x * x, n_img)
        d_i += _bincount(ch.voxel, w * W * W * b * b, n_vox)
        g_b += _bincount(ch.image, w * W * x * r, n_img)
        g_i += _bincount(ch.voxel, w * W * b * r, n_vox)
    inv_d_i = np.where(d_i > 0, 1.0 / np.where(d_i > 0, d_i, 1.0), 0.0)
    every = max(1, -(-obs.n_obs // MAX_COUPLINGS))
    rhs = g_b.copy()
    coupling_matrix = sparse.csr_matrix((n_img, n_vox))
    for ch, u in chunks(obs, use):
        b, x, W, w, _ = terms(ch, u)
        coupling = w * W * W * b * x
        rhs -= _bincount(ch.image, coupling * (g_i * inv_d_i)[ch.voxel], n_img)
        sub = (ch.voxel % every) == 0
        # a voxel's observations may sit in different chunks: sum C first
        coupling_matrix = coupling_matrix + sparse.csr_matrix(
            (coupling[sub], (ch.image[sub], ch.voxel[sub])), shape=(n_img, n_vox)
        )
    scaled = coupling_matrix.multiply(inv_d_i[None, :]).tocsr()
    schur = np.diag(d_b) - every * (scaled @ coupling_matrix.T).toarray()
    # the overall factor is free (b -> k b, I -> I / k): pin the mean step
    gauge = np.trace(schur) / n_img
    schur += gauge * np.ones((n_img, n_img)) / n_img
    try:
        step = np.linalg.solve(schur, rhs)
    except np.linalg.LinAlgError:
        step = np.linalg.lstsq(schur, rhs, rcond=None)[0]
    new = model.scale + step
    # never let a scale go to or below zero: fall back to a damped step
    while np.any(new <= 0):
        step *= 0.5
        new = model.scale + step
    model.scale = new


def _residual_sample(obs, model, intensity, use, max_samples=1_000_000):
    """Residuals, Poisson variances and expectations of a regular subsample of
    the used observations (for the error-model fit)."""
    # a regular stride first, so no index array of every observation is made
    step = max(1, obs.n_obs // max_samples)
    idx = np.arange(0, obs.n_obs, step)
    idx = idx[use[::step]]
    sample = ObservationChunk(
        voxel=obs.voxel[idx], image=obs.image[idx],
        signal=obs.signal[idx].astype(np.float64), factor=obs.factor[idx].astype(np.float64),
        variance=obs.variance[idx].astype(np.float64),
        voxel_qmag=obs.voxel_qmag, image_gain=obs.image_gain,
    )
    expected = model_prediction(sample, model, intensity)
    return sample.signal - expected, model_variance(sample, expected), expected


def refine_scales(obs, params) -> ScalingResult:
    """Alternating refinement of b_i (and optionally c_i, a_i(|q|)) and I_v."""
    n_img = obs.n_images
    model = ScalingModel(scale=np.ones(n_img), offset=np.zeros(n_img))
    sm = params.resolution_smoother
    if sm.enable:
        q_lo, q_hi = float(obs.voxel_qmag.min()), float(obs.voxel_qmag.max())
        model.smoother_q = np.linspace(q_lo, q_hi, max(sm.n_control_points, 2))
        model.smoother_values = np.ones((n_img, model.smoother_q.size))
    use = np.ones(obs.n_obs, bool)
    history = []
    converged = False
    n_params = n_img + (n_img if params.offsets else 0) + (
        model.smoother_q.size * n_img if sm.enable else 0
    )
    reject = params.outlier_sigma is not None and params.outlier_sigma > 0
    intensity = np.nan_to_num(merge_intensities(obs, model, use)[0])
    for iteration in range(1, params.max_iterations + 1):
        old_scale = model.scale.copy()
        # I_v from the end of the previous iteration (one pass fewer per
        # iteration; it only lags the last outlier update)
        if params.solver == "gauss_newton" and not params.offsets and not sm.enable:
            _gauss_newton_scales(obs, model, intensity, use)
        else:
            _update_scales(obs, model, intensity, use)
        if params.offsets:
            _update_offsets(obs, model, intensity, use)
        if sm.enable:
            _update_smoother(obs, model, intensity, use)
        # fix the free overall factor: mean scale 1
        mean_scale = model.scale.mean()
        if mean_scale > 0:
            model.scale /= mean_scale
        intensity = np.nan_to_num(merge_intensities(obs, model, use)[0])
        error_k = fit_error_model(*_residual_sample(obs, model, intensity, use))
        sum_abs_resid = sum_abs_signal = chi2_sum = 0.0
        new_use = np.empty_like(use)
        for start, (ch, u) in zip(range(0, obs.n_obs, CHUNK_ROWS), chunks(obs, use)):
            expected = model_prediction(ch, model, intensity)
            resid = ch.signal - expected
            z = resid / np.sqrt(model_variance(ch, expected) + (error_k * expected) ** 2)
            u_new = np.abs(z) <= params.outlier_sigma if reject else u
            new_use[start : start + u.size] = u_new
            sum_abs_resid += np.abs(resid[u_new]).sum()
            sum_abs_signal += np.abs(ch.signal[u_new]).sum()
            chi2_sum += (z[u_new] ** 2).sum()
        use = new_use
        n_use = int(use.sum())
        r_factor = float(sum_abs_resid / max(sum_abs_signal, 1e-300))
        chi2 = float(chi2_sum / max(n_use - n_params - obs.n_voxels, 1))
        shift = float(np.max(np.abs(model.scale - old_scale) / np.maximum(old_scale, 1e-12)))
        history.append(
            {
                "iteration": iteration,
                "R": r_factor,
                "chi2_per_dof": chi2,
                "max_relative_scale_shift": shift,
                "n_observations_used": n_use,
                "n_rejected": int(obs.n_obs - n_use),
                "error_model_k": error_k,
            }
        )
        if shift < params.convergence_tolerance:
            converged = True
            break
    _log_history(history, converged)
    intensity, _, _ = merge_intensities(obs, model, use)
    return ScalingResult(model=model, intensity=intensity, rejected=~use,
                         history=history, converged=converged)


CHI2_1_MEDIAN = 0.45493642311957  # median of chi-squared with one degree of freedom


def fit_error_model(resid, poisson_var, expected):
    """k of var = var_Poisson + (k * E[S])^2, such that the median of the
    squared normalised residuals is that of chi-squared(1).

    Intensity varies inside a voxel, and different images sample different
    parts of it: observations of one voxel scatter more than counting
    statistics say, in proportion to the intensity. Without this term the
    outlier test would reject good data. The median makes the fit robust to
    the outliers themselves.
    """
    r2 = resid**2
    pv = poisson_var
    e2 = expected**2
    if r2.size == 0 or np.median(r2 / pv) <= CHI2_1_MEDIAN:
        return 0.0
    lo, hi = 0.0, 1.0
    while np.median(r2 / (pv + hi * hi * e2)) > CHI2_1_MEDIAN and hi < 1e3:
        hi *= 2
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if np.median(r2 / (pv + mid * mid * e2)) > CHI2_1_MEDIAN:
            lo = mid
        else:
            hi = mid
    return float(hi)


def _update_offsets(obs, model, intensity, use):
    """Per-image weighted least squares for (b_i, c_i) given I_v."""
    n = obs.n_images
    sxx, sx1, s11, sxs, s1s = (np.zeros(n) for _ in range(5))
    for ch, u in chunks(obs, use):
        x = model.observation_factor(ch) * intensity[ch.voxel]
        expected = ch.factor * (model.scale[ch.image] * x + model.offset[ch.image])
        w = np.where(u, 1.0 / model_variance(ch, expected), 0.0)
        W, S = ch.factor, ch.signal
        # minimise sum w (S - W (b x + c))^2 -> 2x2 normal equations per image
        sxx += _bincount(ch.image, w * W * W * x * x, n)
        sx1 += _bincount(ch.image, w * W * W * x, n)
        s11 += _bincount(ch.image, w * W * W, n)
        sxs += _bincount(ch.image, w * W * x * S, n)
        s1s += _bincount(ch.image, w * W * S, n)
    det = sxx * s11 - sx1 * sx1
    ok = np.abs(det) > 1e-12 * np.maximum(sxx * s11, 1e-300)
    b = np.where(ok, (sxs * s11 - s1s * sx1) / np.where(ok, det, 1), model.scale)
    c = np.where(ok, (sxx * s1s - sx1 * sxs) / np.where(ok, det, 1), model.offset)
    model.scale, model.offset = b, c


def _update_smoother(obs, model, intensity, use):
    """Per-image weighted least squares for the control-point values of a_i."""
    k = model.smoother_q.size
    n = obs.n_images
    normal = np.zeros(n * k * k)
    rhs = np.zeros(n * k)
    for ch, u in chunks(obs, use):
        j, t = model.interpolation(ch.voxel_qmag[ch.voxel])
        base = ch.factor * model.scale[ch.image] * intensity[ch.voxel]
        offset = ch.factor * model.offset[ch.image]
        target = ch.signal - offset
        expected = base * model.observation_factor(ch) + offset
        w = np.where(u, 1.0 / model_variance(ch, expected), 0.0)
        cols = [(j, (1 - t) * base), (j + 1, t * base)]
        for ja, va in cols:
            rhs += np.bincount(ch.image * k + ja, weights=w * va * target, minlength=n * k)
            for jb, vb in cols:
                normal += np.bincount(
                    (ch.image * k + ja) * k + jb, weights=w * va * vb, minlength=n * k * k
                )
    normal = normal.reshape(n, k, k)
    rhs = rhs.reshape(n, k)
    # a light ridge towards the current values keeps empty ranges defined
    ridge = 1e-6 * np.trace(normal, axis1=1, axis2=2) / k + 1e-300
    values = np.linalg.solve(
        normal + ridge[:, None, None] * np.eye(k)[None],
        (rhs + ridge[:, None] * model.smoother_values)[..., None],
    )[..., 0]
    values = np.where(values > 0, values, model.smoother_values)
    for _ in range(3):
        values /= values.mean(axis=1, keepdims=True)
        values /= values.mean(axis=0, keepdims=True)
    model.smoother_values = values


def _log_history(history, converged):
    from dials.util import tabulate

    rows = [["iteration", "R", "chi2/dof", "max shift(b)", "used", "rejected", "error k"]]
    for h in history:
        rows.append(
            [
                h["iteration"],
                f"{h['R']:.4f}",
                f"{h['chi2_per_dof']:.3f}",
                f"{h['max_relative_scale_shift']:.2e}",
                h["n_observations_used"],
                h["n_rejected"],
                f"{h['error_model_k']:.4f}",
            ]
        )
    logger.info("\nRelative scaling\n%s", tabulate(rows, headers="firstrow"))
    if converged:
        logger.info("Scaling converged after %d iterations", len(history))
    else:
        logger.warning(
            "Scaling did not converge in %d iterations (last relative shift %.2e)",
            len(history), history[-1]["max_relative_scale_shift"] if history else float("nan"),
        )
