"""The scaling refinement (:func:`refine_scales`): alternating closed-form
updates (or Gauss-Newton for the scales), outlier rejection, the error
model, offsets and the resolution smoother, and the iteration log."""

from __future__ import annotations

import logging

import numpy as np

from dials.util import tabulate

from dials_diffuse.scaling.gauss_newton import add_gauss_newton_rows, compiled_gauss_newton_outputs, compiled_gauss_newton_sums, denominator_partition, gauss_newton_partition, gauss_newton_scales, new_gauss_newton_sums, sample_columns, schur_sample_step
from dials_diffuse.scaling.merge_sums import MERGE_SUMS, add_merge_sums, compiled_sweep, intensities, median_error_k, merge_partition, prediction, merge_intensities, merged_error_k, model_prediction, model_variance
from dials_diffuse.scaling.model import ScalingModel, ScalingResult
from dials_diffuse.scaling.surface_steps import update_surfaces
from dials_diffuse.scaling.surfaces import enabled as surfaces_enabled
from dials_diffuse.scaling.passes import ObservationPasses, VoxelSums, bincount, chunks, observation_chunk

logger = logging.getLogger("dials.diffuse_merge")


def use_gauss_newton(params, n_scale_params) -> bool:
    """Whether the scales are refined by Gauss-Newton (solver, offsets,
    smoother; solver=auto: at most max_gauss_newton_scales scales, because its
    dense normal matrix grows as their square: 10^4 stills did not converge)."""
    if params.offsets or params.resolution_smoother.enable or surfaces_enabled(params.surfaces):
        return False
    if params.solver == "auto":
        chosen = n_scale_params <= params.max_gauss_newton_scales
        if not chosen:
            logger.info("solver=auto: %d scale parameters (more than max_gauss_newton_scales="
                        "%d): alternating updates", n_scale_params, params.max_gauss_newton_scales)
        return chosen
    return params.solver == "gauss_newton"


CHI2_1_MEDIAN = 0.45493642311957  # median of chi-squared with one degree of freedom


def _scale_partition(rows, part, model, intensity):
    obs, use = rows.obs, rows.use
    n = obs.n_images
    num, den = np.zeros(n), np.zeros(n)
    for ch, u, _ in chunks(obs, use, part):
        x = model.observation_factor(ch) * intensity[ch.voxel]
        num += bincount(ch.image, np.where(u, ch.signal - model.observation_offset(ch) * ch.factor, 0.0), n)
        den += bincount(ch.image, np.where(u, ch.factor * x, 0.0), n)
    return num, den


def _update_scales(passes, model, intensity):
    """b_i = sum_v (S - c W) / sum_v W a I_v (Poisson maximum likelihood);
    smooth scales: the controls whose b is closest to those, weighted by the
    denominators (the same maximum likelihood to second order)."""
    num, den = passes.reduce(_scale_partition, model, intensity)
    per_image = np.where(den > 0, num / np.where(den > 0, den, 1), model.scale)
    if model.scale_basis is None:
        model.scale = per_image
    else:
        model.set_scale_controls(model.scale_basis.fit(per_image, den))


class ResidualSample:
    """Every k-th observation (about ``max_samples``), for the error-model
    fit: gathered once per refinement, as the columns do not change (again
    for every fit with mdx2's surfaces, which change W and the offsets)."""

    def __init__(self, obs, max_samples=1_000_000):
        self.obs = obs
        self.step = max(1, obs.n_obs // max_samples)
        self._rows = None
        self._fixed = obs.surface_gain is None and obs.surface_offset is None

    def rows(self):
        if self._rows is None or not self._fixed:
            self._rows = observation_chunk(self.obs, slice(0, self.obs.n_obs, self.step))
            self._rows.variance = self._rows.variance.astype(np.float64)
        return self._rows

    def residuals(self, model, intensity, use):
        """Residuals, Poisson variances and expectations of the sample's
        used rows."""
        sample = self.rows()
        used = use[::self.step]
        expected = model_prediction(sample, model, intensity)
        return ((sample.signal - expected)[used], model_variance(sample, expected)[used],
                expected[used])


def _rejection_partition(rows, part, model, intensity, error_k, outlier_sigma,
                         then=None, halves=None, every=1):
    """Outlier rejection of the partition's rows (rewrites their ``use``) and
    the R / chi^2 sums over the rows kept. In the same sweep (same model, so
    one pass instead of two): then="gauss_newton", the next iteration's
    Gauss-Newton pass; then="merge", the final merge sums (for each half of
    the images if ``halves``)."""
    obs, use = rows.obs, rows.use
    totals = np.zeros(3)  # sum |resid|, sum |S|, sum z^2 over the rows kept
    n_sets = 1 if halves is None else 2
    kernels = rows.compiled(model)
    if kernels is not None:
        gn = compiled_gauss_newton_sums(obs.n_images, part) if then == "gauss_newton" else None
        merge = np.zeros((n_sets, MERGE_SUMS, part.n_voxels)) if then == "merge" else None
        compiled_sweep(kernels, rows, part, model, intensity, error_k, outlier_sigma,
                       totals, gauss_newton=gn, merge=merge, halves=halves, merge_expected=True)
        if then == "gauss_newton":
            return [totals] + compiled_gauss_newton_outputs(gn, part)
        return [totals] + ([VoxelSums(part.v0, merge)] if then == "merge" else [])
    sums, samples = new_gauss_newton_sums(obs) if then == "gauss_newton" else ([], [])
    if then == "merge":
        sums = [np.zeros((n_sets, MERGE_SUMS, obs.n_voxels))]
    for ch, u, sl in chunks(obs, use, part):
        b, x, expected = prediction(ch, model, intensity)
        resid = ch.signal - expected
        variance = model_variance(ch, expected)
        z2 = resid * resid
        z2 /= variance + (error_k * expected) ** 2 if error_k else variance
        if outlier_sigma is not None:
            u = z2 <= outlier_sigma * outlier_sigma
            use[sl] = u
        totals += (np.sum(np.abs(resid), where=u), np.sum(np.abs(ch.signal), where=u),
                   np.sum(z2, where=u))
        if then == "gauss_newton":
            add_gauss_newton_rows(rows, ch, u, sl, b, x, variance, resid, every, sums, samples)
        elif then == "merge":
            add_merge_sums(sums[0], ch, u, model, halves, expected)
    return [totals] + sums + [np.concatenate(s) for s in samples]


def refine_scales(obs, params, passes=None, halves=None, scale_basis=None,
                  surfaces=None) -> ScalingResult:
    """Refinement of b_i (and optionally c_i, a_i(|q|)) and I_v.

    ``passes`` (an ObservationPasses) runs the sums over the observations,
    possibly in parallel; its ``use`` holds the rows kept at the end. With
    ``halves`` (a bool per image) the result also has the two half-dataset
    maps (CC1/2), from the same last pass. With ``scale_basis`` (a
    SmoothScaleBasis of the images) b is refined as a smooth function of the
    rotation angle instead of one value per image. With ``surfaces`` (a
    scaling.surfaces.SurfaceModel, set up on ``obs`` before the passes were
    made) mdx2's smooth terms are refined too, after the scales.
    """
    if passes is None:
        with ObservationPasses(obs) as passes:
            return refine_scales(obs, params, passes, halves, scale_basis, surfaces)
    n_img = obs.n_images
    model = ScalingModel(scale=np.ones(n_img), offset=np.zeros(n_img))
    if scale_basis is not None:
        model.scale_basis = scale_basis
        model.set_scale_controls(np.ones(scale_basis.matrix.shape[1]))
    sm = params.resolution_smoother
    if sm.enable:
        q_lo, q_hi = float(obs.voxel_qmag.min()), float(obs.voxel_qmag.max())
        model.smoother_q = np.linspace(q_lo, q_hi, max(sm.n_control_points, 2))
        model.smoother_values = np.ones((n_img, model.smoother_q.size))
    passes.use[:] = True
    history = []
    converged = False
    n_scale_params = n_img if scale_basis is None else scale_basis.matrix.shape[1]
    n_params = n_scale_params + (n_img if params.offsets else 0) + (
        model.smoother_q.size * n_img if sm.enable else 0
    ) + (surfaces.n_parameters if surfaces is not None else 0)
    reject = params.outlier_sigma is not None and params.outlier_sigma > 0
    gauss_newton = use_gauss_newton(params, n_scale_params)
    every = schur_sample_step(obs) if gauss_newton else 1
    residual_sample = ResidualSample(obs)

    def compiled():
        """Whether this model's passes run compiled sweeps (the plain model:
        offsets, once refined, make it another)."""
        return passes.rows.compiled(model) is not None

    merge_sums = passes.reduce(merge_partition, model, compiled=compiled())[0][0]
    numerator = merge_sums[0]
    intensity = np.nan_to_num(intensities(merge_sums)[0])
    if gauss_newton:
        gn = passes.reduce(gauss_newton_partition, model, intensity, every,
                           concat=sample_columns(0), compiled=compiled())
    for iteration in range(1, params.max_iterations + 1):
        old_scale = model.scale.copy()
        # I_v from the end of the previous iteration (one pass fewer per
        # iteration; it only lags the last outlier update)
        if gauss_newton:
            gauss_newton_scales(passes, model, gn, every)
        else:
            _update_scales(passes, model, intensity)
        if params.offsets:
            _update_offsets(passes, model, intensity)
        if sm.enable:
            _update_smoother(passes, model, intensity)
        surface_change = 0.0
        if surfaces is not None:
            surface_change = update_surfaces(passes, model, intensity, surfaces)
        # fix the free overall factor: mean scale 1
        mean_scale = model.scale.mean()
        if mean_scale > 0:
            if model.scale_basis is None:
                model.scale /= mean_scale
            else:
                model.set_scale_controls(model.scale_controls / mean_scale)
        if gauss_newton:
            # with no offsets or smoother only the merge denominator depends
            # on the scales (the numerator came with the last rejection)
            den, = passes.reduce(denominator_partition, model.scale, compiled=compiled())
            intensity = np.where(den > 0, numerator / np.where(den > 0, den, 1.0), 0.0)
        else:
            intensity = np.nan_to_num(merge_intensities(obs, model, passes=passes)[0])
        error_k = fit_error_model(*residual_sample.residuals(model, intensity, passes.use))
        model.error_k = error_k
        shift = float(np.max(np.abs(model.scale - old_scale) / np.maximum(old_scale, 1e-12)))
        done = max(shift, surface_change) < params.convergence_tolerance
        last = done or iteration == params.max_iterations
        then = "merge" if last else ("gauss_newton" if gauss_newton else None)
        totals, *sums = passes.reduce(
            _rejection_partition, model, intensity, error_k, params.outlier_sigma if reject else None,
            then, halves, every, concat=sample_columns(1) if then == "gauss_newton" else (),
            compiled=compiled())
        if then == "gauss_newton":
            gn, numerator = sums, sums[4]
        sum_abs_resid, sum_abs_signal, chi2_sum = totals
        n_use = int(np.count_nonzero(passes.use))
        r_factor = float(sum_abs_resid / max(sum_abs_signal, 1e-300))
        chi2 = float(chi2_sum / max(n_use - n_params - obs.n_voxels, 1))
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
        if surfaces is not None:
            history[-1]["max_surface_change"] = surface_change
        if done:
            converged = True
            break
    _log_history(history, converged)
    # the last rejection pass made the merge sums with the final use
    merge_sums = sums[0]
    # the merged sigma's error term: calibrated on the half maps when there
    # are two, else the per-observation k
    model.merged_error_k = (merged_error_k(merge_sums) if merge_sums.shape[0] == 2
                            else model.error_k)
    intensity, sigma, n_obs = intensities(merge_sums.sum(axis=0), model.merged_error_k)
    return ScalingResult(model=model, intensity=intensity, rejected=~passes.use, surfaces=surfaces,
                         history=history, converged=converged, sigma=sigma, n_observations=n_obs,
                         half_maps=None if halves is None else [
                             intensities(h, model.merged_error_k) for h in merge_sums])


def fit_error_model(resid, poisson_var, expected):
    """k of var = var_Poisson + (k * E[S])^2, such that the median of the
    squared normalised residuals is that of chi-squared(1).

    Intensity varies inside a voxel, and different images sample different
    parts of it: observations of one voxel scatter more than counting
    statistics say, in proportion to the intensity. Without this term the
    outlier test would reject good data. The median makes the fit robust to
    the outliers themselves.
    """
    if resid.size == 0:
        return 0.0
    return median_error_k(resid**2, poisson_var, expected**2, CHI2_1_MEDIAN)


def _offset_partition(rows, part, model, intensity):
    """Per-image sums of the 2x2 normal equations of (b_i, c_i)."""
    obs, use = rows.obs, rows.use
    n = obs.n_images
    sums = np.zeros((5, n))
    for ch, u, _ in chunks(obs, use, part):
        x = model.observation_factor(ch) * intensity[ch.voxel]
        expected = ch.factor * (model.scale[ch.image] * x + model.offset[ch.image])
        w = np.where(u, 1.0 / model_variance(ch, expected), 0.0)
        W, S = ch.factor, ch.signal
        # minimise sum w (S - W (b x + c))^2 -> 2x2 normal equations per image
        for k, values in enumerate((w * W * W * x * x, w * W * W * x, w * W * W, w * W * x * S, w * W * S)):
            sums[k] += bincount(ch.image, values, n)
    return (sums,)


def _update_offsets(passes, model, intensity):
    """Per-image weighted least squares for (b_i, c_i) given I_v."""
    sxx, sx1, s11, sxs, s1s = passes.reduce(_offset_partition, model, intensity)[0]
    det = sxx * s11 - sx1 * sx1
    ok = np.abs(det) > 1e-12 * np.maximum(sxx * s11, 1e-300)
    b = np.where(ok, (sxs * s11 - s1s * sx1) / np.where(ok, det, 1), model.scale)
    c = np.where(ok, (sxx * s1s - sx1 * sxs) / np.where(ok, det, 1), model.offset)
    model.scale, model.offset = b, c


def _smoother_partition(rows, part, model, intensity):
    """Per-image normal equations of the control-point values of a_i."""
    obs, use = rows.obs, rows.use
    k = model.smoother_q.size
    n = obs.n_images
    normal = np.zeros(n * k * k)
    rhs = np.zeros(n * k)
    for ch, u, _ in chunks(obs, use, part):
        j, t = model.interpolation(ch.voxel_qmag[ch.voxel])
        base = ch.factor * model.scale[ch.image] * intensity[ch.voxel]
        offset = ch.factor * model.observation_offset(ch)
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
    return normal, rhs


def _update_smoother(passes, model, intensity):
    """Per-image weighted least squares for the control-point values of a_i."""
    k = model.smoother_q.size
    n = passes.obs.n_images
    normal, rhs = passes.reduce(_smoother_partition, model, intensity)
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
    surfaces = bool(history) and "max_surface_change" in history[0]
    rows = [["iteration", "R", "chi2/dof", "max shift(b)"] + (["max change(surfaces)"] if surfaces else [])
            + ["used", "rejected", "error k"]]
    for h in history:
        rows.append(
            [h["iteration"], f"{h['R']:.4f}", f"{h['chi2_per_dof']:.3f}",
             f"{h['max_relative_scale_shift']:.2e}"]
            + ([f"{h['max_surface_change']:.2e}"] if surfaces else [])
            + [h["n_observations_used"], h["n_rejected"], f"{h['error_model_k']:.4f}"]
        )
    logger.info("\nRelative scaling\n%s", tabulate(rows, headers="firstrow"))
    if converged:
        logger.info("Scaling converged after %d iterations", len(history))
    else:
        last = history[-1] if history else {}
        logger.warning(
            "Scaling did not converge in %d iterations (last relative shift %.2e)",
            len(history), max(last.get("max_relative_scale_shift", float("nan")),
                              last.get("max_surface_change", 0.0)),
        )
