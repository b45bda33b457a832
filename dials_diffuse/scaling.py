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
import time
from typing import List, Optional

import numpy as np

from dials_diffuse.observations import keep_freed_memory, shared_array
from dials_diffuse.parallel import ForkPool

logger = logging.getLogger("dials.diffuse_merge")


@dataclasses.dataclass
class ScalingModel:
    scale: np.ndarray  # b_i
    offset: np.ndarray  # c_i (zeros when offsets are off)
    smoother_q: Optional[np.ndarray] = None  # control point |q| (1/Angstrom)
    smoother_values: Optional[np.ndarray] = None  # (n_images, k): a_i at the control points
    scale_basis: Optional["SmoothScaleBasis"] = None  # b = basis.matrix @ scale_controls
    scale_controls: Optional[np.ndarray] = None
    # error model: var(S) = var_Poisson + (error_k E[S])^2 (fit_error_model),
    # and its term in the merged variance (merged_error_k)
    error_k: float = 0.0
    merged_error_k: float = 0.0

    def set_scale_controls(self, controls):
        self.scale_controls = controls
        self.scale = self.scale_basis.matrix @ controls

    def __getstate__(self):
        # the workers of a pass need b, not how it is parametrised (the basis
        # is images x controls: not worth pickling for every partition)
        state = dict(self.__dict__)
        state["scale_basis"] = None
        return state

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

    def observation_factor(self, obs):
        """a_i(|q_v|) of each row; the number 1 without a smoother (no
        per-row array)."""
        if self.smoother_q is None:
            return 1.0
        return self.resolution_factor(obs.voxel_qmag[obs.voxel], obs.image)


@dataclasses.dataclass
class SmoothScaleBasis:
    """b_i of rotation images as a smooth function of the rotation angle:
    per sweep, piecewise linear through control points at most ``interval``
    degrees apart spanning the sweep's image centres (b = matrix @ controls)."""

    matrix: np.ndarray  # (n_images, n_controls) hat-function weights, rows sum to 1
    control_phi: np.ndarray  # (n_controls,) degrees
    control_sweep: np.ndarray  # (n_controls,) sweep (experiment) of each control point
    interval: float

    @classmethod
    def from_angles(cls, phi_deg, sweep, interval_deg):
        phi_deg = np.asarray(phi_deg, float)
        sweep = np.asarray(sweep)
        control_phi, control_sweep = [], []
        matrix_blocks = []
        for s_id in np.unique(sweep):
            rows = np.flatnonzero(sweep == s_id)
            lo, hi = phi_deg[rows].min(), phi_deg[rows].max()
            n_ctrl = max(2, int(np.ceil((hi - lo) / interval_deg - 1e-9)) + 1)
            knots = np.linspace(lo, hi, n_ctrl) if hi > lo else np.array([lo, lo + interval_deg])
            j = np.clip(np.searchsorted(knots, phi_deg[rows], side="right") - 1, 0, n_ctrl - 2)
            t = np.clip((phi_deg[rows] - knots[j]) / (knots[j + 1] - knots[j]), 0.0, 1.0)
            matrix_blocks.append((rows, j, t, n_ctrl))
            control_phi.append(knots)
            control_sweep.append(np.full(n_ctrl, s_id))
        n_ctrl_total = sum(b[3] for b in matrix_blocks)
        matrix = np.zeros((phi_deg.size, n_ctrl_total))
        first = 0
        for rows, j, t, n_ctrl in matrix_blocks:
            matrix[rows, first + j] = 1.0 - t
            matrix[rows, first + j + 1] += t
            first += n_ctrl
        return cls(matrix, np.concatenate(control_phi), np.concatenate(control_sweep),
                   float(interval_deg))

    def fit(self, values, weights):
        """Controls c minimising sum_i w_i (values_i - (M c)_i)^2."""
        m = self.matrix
        normal = m.T @ (weights[:, None] * m)
        rhs = m.T @ (weights * values)
        return _solver(normal + 1e-12 * np.trace(normal) * np.eye(normal.shape[0]))(rhs)


@dataclasses.dataclass
class ScalingResult:
    model: ScalingModel
    intensity: np.ndarray  # merged I_v (per compact voxel)
    rejected: np.ndarray  # bool per observation
    history: List[dict]
    converged: bool
    sigma: Optional[np.ndarray] = None  # sigma of I_v, with the final model and rejections
    n_observations: Optional[np.ndarray] = None  # used observations per voxel
    half_maps: Optional[list] = None  # (I_v, sigma_v, n) of each half of the images


# Observations are processed in chunks of this many rows, so that the float64
# temporaries of a pass stay small whatever the number of observations.
CHUNK_ROWS = 1_000_000
# A pass sums over at most this many row partitions (whole chunks each), in
# partition order: the partitions, and so every floating-point sum, are the
# same whatever the number of processes.
MAX_PARTITIONS = 16
# Fewer observations than this are summed in one process (see ObservationPasses).
PARALLEL_MIN_OBS = 20_000_000


@dataclasses.dataclass
class ObservationChunk:
    """A slice of an ObservationSet, in float64, with the per-voxel and
    per-image arrays of the whole set (what the model functions need)."""

    voxel: np.ndarray  # intp (what bincount and fancy indexing use)
    image: np.ndarray
    signal: np.ndarray
    factor: np.ndarray
    variance: np.ndarray
    voxel_qmag: np.ndarray
    image_gain: np.ndarray
    gain: object = None  # gain of each row, or one number when every image has the same


def row_gain(image_gain, image):
    """Gain of each row; a plain number when all images share one (the usual
    case: no per-row lookup)."""
    if image_gain.size and np.all(image_gain == image_gain[0]):
        return float(image_gain[0])
    return image_gain[image]


def chunks(obs, use=None, start=0, stop=None):
    """(chunk, use of its rows, its slice) for consecutive slices of the rows
    start:stop (chunk boundaries at multiples of CHUNK_ROWS)."""
    stop = obs.n_obs if stop is None else stop
    for a in range(start, stop, CHUNK_ROWS):
        sl = slice(a, min(a + CHUNK_ROWS, stop))
        image = obs.image[sl].astype(np.intp)
        yield ObservationChunk(
            voxel=obs.voxel[sl].astype(np.intp),
            image=image,
            signal=obs.signal[sl].astype(np.float64),
            factor=obs.factor[sl].astype(np.float64),
            variance=obs.variance[sl],  # float32: only the merge uses it
            voxel_qmag=obs.voxel_qmag,
            image_gain=obs.image_gain,
            gain=row_gain(obs.image_gain, image),
        ), (None if use is None else use[sl]), sl


def partition_bounds(n_obs):
    """Row ranges of the partitions: whole chunks, at most MAX_PARTITIONS,
    a function of the number of rows only."""
    n_chunks = max(1, -(-n_obs // CHUNK_ROWS))
    rows = CHUNK_ROWS * -(-n_chunks // MAX_PARTITIONS)
    return [(a, min(a + rows, n_obs)) for a in range(0, max(n_obs, 1), rows)]


@dataclasses.dataclass
class SharedRows:
    """What every pass reads: the observations, and per-row arrays in shared
    memory that a pass may rewrite for its own rows."""

    obs: object
    use: np.ndarray  # bool: kept by the outlier rejection
    coupling: np.ndarray  # float32: C = w W^2 b I of the last Gauss-Newton sums (0 if not used)


def _run_partition(rows, task):
    """One pass over one partition in a worker; ``rows``: the SharedRows the
    workers inherited (no copy, no pickling)."""
    func, start, stop, args = task
    return func(rows, start, stop, *args)


class ObservationPasses:
    """Sums over all observations, partition by partition, in ``nproc``
    forked workers that read the observation columns they inherited.

    A pass is a function ``func(rows, start, stop, *args)`` (rows: the
    SharedRows) returning a tuple of arrays for its rows; ``reduce`` adds
    them up in partition order (or concatenates the outputs named in
    ``concat``), so that the result is byte-identical for any nproc.
    """

    def __init__(self, obs, nproc=1):
        keep_freed_memory()
        self.obs = obs
        # untouched pages of shared memory cost nothing: the coupling column
        # takes memory only when the Gauss-Newton solver writes it
        self.rows = SharedRows(obs=obs, use=shared_array(obs.n_obs, bool),
                               coupling=shared_array(obs.n_obs, np.float32))
        self.use = self.rows.use
        self.use[:] = True
        self.bounds = partition_bounds(obs.n_obs)
        self.timings = {}  # pass name: (count, seconds)
        self._pool = None
        # below PARALLEL_MIN_OBS the per-voxel arrays each worker sends back
        # cost more than the rows it sums (measured: no gain at 1e7, 6.6e6
        # observations of a 100-image sweep 7.8 s -> 10.6 s with 2 workers)
        if nproc > 1 and len(self.bounds) > 1 and obs.n_obs >= PARALLEL_MIN_OBS:
            self._pool = ForkPool(self.rows, min(nproc, len(self.bounds))).__enter__()

    def reduce(self, func, *args, concat=()):
        t0 = time.perf_counter()
        total = self._reduce(func, args, concat)
        name = func.__name__.strip("_").replace("_partition", "")
        count, seconds = self.timings.get(name, (0, 0.0))
        self.timings[name] = (count + 1, seconds + time.perf_counter() - t0)
        return total

    def _reduce(self, func, args, concat):
        tasks = [(func, a, b, args) for a, b in self.bounds]
        if self._pool is None:
            results = (func(self.rows, a, b, *args) for a, b in self.bounds)
        else:
            results = self._pool.map(_run_partition, tasks)
        total = None
        for result in results:
            if total is None:
                total = [[r] if i in concat else r for i, r in enumerate(result)]
                continue
            for i, r in enumerate(result):
                if i in concat:
                    total[i].append(r)
                else:
                    total[i] += r
        return [np.concatenate(t) if i in concat else t for i, t in enumerate(total)]

    def log_timings(self):
        logger.info("Passes over the observations (%d partitions, %s): %s", len(self.bounds),
                    f"{self._pool.nproc} processes" if self._pool else "1 process",
                    ", ".join(f"{name} {n}x {t:.1f} s" for name, (n, t) in self.timings.items()))

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _bincount(index, weights, n):
    return np.bincount(index, weights=weights, minlength=n)


def _used_index(index, u, n):
    """index where u, else n: rows not used go to an extra bin that the sums
    drop (one integer select instead of one float select per sum)."""
    return np.where(u, index, n)


def _used_sum(index, weights, n):
    """Sums over bins 0..n-1 of an index made by _used_index."""
    return np.bincount(index, weights=weights, minlength=n + 1)[:n]


def _image_selections(u, image, halves):
    """The rows of a chunk each sum is over: the used rows, or those of each
    half of the images (CC1/2)."""
    if halves is None:
        return [u]
    first = halves[image]
    return [u & first, u & ~first]


def _add_merge_sums(sums, ch, u, model, halves=None, expected=None):
    """Add a chunk's per-voxel merge sums (numerator, denominator, counting
    variance, count, sum of E[S]^2) to sums[0], or those of each half of the
    images to sums[0:2]. ``expected``: E[S] of the rows, for the error
    model's term (k E[S])^2 of the merged variance (MERGE_SUMS)."""
    n = sums.shape[-1]
    a = model.observation_factor(ch)
    b = model.scale[ch.image]
    c = model.offset[ch.image]
    # Poisson ML in photons (S is in photons, var(S) = E[S])
    numerator = ch.signal - c * ch.factor
    denominator = b * ch.factor if model.smoother_q is None else b * a * ch.factor
    # variance of S with a one-count floor (gain photons) per observation, so
    # that no merged sigma is zero even where every pixel counted nothing
    variance = np.maximum(ch.variance.astype(np.float64), ch.gain)
    for s, sel in enumerate(_image_selections(u, ch.image, halves)):
        voxel = _used_index(ch.voxel, sel, n)
        for k, values in enumerate((numerator, denominator, variance)):
            sums[s, k] += _used_sum(voxel, values, n)
        sums[s, 3] += _used_sum(voxel, None, n)
        if expected is not None:
            sums[s, 4] += _used_sum(voxel, expected * expected, n)


def _merge_partition(rows, start, stop, model, halves=None):
    """Per-voxel merge sums of the partition's rows (see _add_merge_sums)."""
    obs, use = rows.obs, rows.use
    sums = np.zeros((1 if halves is None else 2, MERGE_SUMS, obs.n_voxels))
    for ch, u, _ in chunks(obs, use, start, stop):
        _add_merge_sums(sums, ch, u, model, halves)
    return (sums,)


# per voxel: numerator, denominator, counting variance, count, sum of E[S]^2
MERGE_SUMS = 5


def _intensities(sums, error_k=0.0):
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

    def median_z2(k):
        return float(np.median(diff2 / (p + k * k * q)))

    if median_z2(0.0) <= target:
        return 0.0
    lo, hi = 0.0, MAX_ERROR_K if max_k is None else max_k
    if median_z2(hi) > target:
        return hi
    for _ in range(60):  # bisection: the median falls as k grows
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if median_z2(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def merge_intensities(obs, model: ScalingModel, use: np.ndarray = None, passes=None, halves=None):
    """I_v, sigma_v and the number of observations per voxel for a given model
    (over ``passes.use``, or ``use`` without passes); with ``halves`` (a bool
    per image), one such triple for each half of the images."""
    if passes is None:
        rows = SharedRows(obs=obs, use=use, coupling=None)
        sums = _merge_partition(rows, 0, obs.n_obs, model, halves)[0]
    else:
        sums = passes.reduce(_merge_partition, model, halves)[0]
    merged = [_intensities(s) for s in sums]
    return merged[0] if halves is None else merged


def model_prediction(obs, model: ScalingModel, intensity):
    """E[S] for the rows of ``obs`` (an ObservationChunk or a whole set)."""
    return _prediction(obs, model, intensity)[2]


def _prediction(obs, model, intensity):
    """b_i, a_i I_v and E[S] = W (b_i a_i I_v + c_i) of each row (the
    factors the Gauss-Newton sums reuse)."""
    b = model.scale[obs.image]
    x = intensity[obs.voxel]
    if model.smoother_q is not None:
        x *= model.observation_factor(obs)
    expected = b * x
    if model.offset.any():
        expected += model.offset[obs.image]
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


def _scale_partition(rows, start, stop, model, intensity):
    obs, use = rows.obs, rows.use
    n = obs.n_images
    num, den = np.zeros(n), np.zeros(n)
    for ch, u, _ in chunks(obs, use, start, stop):
        x = model.observation_factor(ch) * intensity[ch.voxel]
        num += _bincount(ch.image, np.where(u, ch.signal - model.offset[ch.image] * ch.factor, 0.0), n)
        den += _bincount(ch.image, np.where(u, ch.factor * x, 0.0), n)
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


# Largest number of (image, voxel) couplings sampled for the Gauss-Newton
# matrix, and largest cost (multiply-adds) of the images x images product:
# beyond either, the matrix is estimated from every k-th voxel.
MAX_COUPLINGS = 20_000_000
MAX_SCHUR_MACS = 1e10
# Rows of the dense voxels x images block are made this many entries at a
# time (memory).
DENSE_BLOCK = 10_000_000


def schur_sample_step(obs):
    """k: the images x images matrix is estimated from every k-th voxel."""
    return int(max(1, -(-obs.n_obs // MAX_COUPLINGS),
                   np.ceil(float(obs.n_images) ** 2 * obs.n_voxels / MAX_SCHUR_MACS)))


# Outputs of a Gauss-Newton pass: per-image and per-voxel sums, then the
# sampled couplings (concatenated in partition order, not added).
GN_SUMS, GN_SAMPLES = 5, 3


def _new_gauss_newton_sums(obs):
    """d_b, d_I (diagonals), g_b, g_I (gradients), and sum S per voxel
    (the numerator of the next merge), and lists for the sampled couplings."""
    n_img, n_vox = obs.n_images, obs.n_voxels
    return [np.zeros(n_img), np.zeros(n_vox), np.zeros(n_img), np.zeros(n_vox), np.zeros(n_vox)], [[], [], []]


def _add_gauss_newton_rows(rows, ch, u, sl, b, x, variance, resid, every, sums, samples):
    """Add a chunk to the Gauss-Newton sums of the joint least squares in
    (b, I), store its couplings C = w W^2 b I (for the gradient's coupling
    term, next pass) and keep those of every k-th voxel (for the matrix)."""
    n_img, n_vox = sums[0].size, sums[1].size
    image, voxel = _used_index(ch.image, u, n_img), _used_index(ch.voxel, u, n_vox)
    wW = ch.factor / variance
    wWb = wW * b
    wWx = wW * x
    sums[0] += _used_sum(image, wWx * ch.factor * x, n_img)
    sums[1] += _used_sum(voxel, wWb * ch.factor * b, n_vox)
    sums[2] += _used_sum(image, wWx * resid, n_img)
    sums[3] += _used_sum(voxel, wWb * resid, n_vox)
    # the GN solver runs without offsets: the merge numerator is sum S
    sums[4] += _used_sum(voxel, ch.signal, n_vox)
    coupling = wWb
    coupling *= ch.factor
    coupling *= x
    coupling[~u] = 0.0
    rows.coupling[sl] = coupling
    sub = u & _sampled_voxels(sums[1].size, every)[ch.voxel]
    samples[0].append(ch.image[sub].astype(np.int32))
    samples[1].append((ch.voxel[sub] // every).astype(np.int32))
    samples[2].append(coupling[sub])


def _samples(first):
    """Indices of the sampled-coupling outputs of a Gauss-Newton pass whose
    sums start at output ``first``."""
    return tuple(range(first + GN_SUMS, first + GN_SUMS + GN_SAMPLES))


def _sampled_voxels(n_vox, every):
    """Bool per voxel: is it one of the every-k-th voxels of the matrix (a
    byte lookup per row instead of an integer division)."""
    sampled = np.zeros(n_vox, bool)
    sampled[::every] = True
    return sampled


def _gauss_newton_partition(rows, start, stop, model, intensity, every):
    sums, samples = _new_gauss_newton_sums(rows.obs)
    for ch, u, sl in chunks(rows.obs, rows.use, start, stop):
        b, x, mu = _prediction(ch, model, intensity)
        _add_gauss_newton_rows(rows, ch, u, sl, b, x, model_variance(ch, mu), ch.signal - mu,
                               every, sums, samples)
    return sums + [np.concatenate(s) for s in samples]


def _coupling_partition(rows, start, stop, g_over_d):
    """sum_v C_iv g_v / d_v per image, from the stored couplings."""
    return (_coupling_sums(rows, start, stop, g_over_d, per_image=True),)


def _coupling_transpose_partition(rows, start, stop, x):
    """sum_i C_iv x_i per voxel, from the stored couplings."""
    return (_coupling_sums(rows, start, stop, x, per_image=False),)


def _coupling_sums(rows, start, stop, values, per_image):
    """Sums of C times ``values`` of the other index, by image or by voxel."""
    obs = rows.obs
    group, other, n = (
        (obs.image, obs.voxel, obs.n_images) if per_image else (obs.voxel, obs.image, obs.n_voxels)
    )
    total = np.zeros(n)
    for a in range(start, stop, CHUNK_ROWS):
        sl = slice(a, min(a + CHUNK_ROWS, stop))
        total += _bincount(group[sl], rows.coupling[sl] * values[other[sl]], n)
    return total


def _schur_product(passes, d_b, inv_d_i, x):
    """The exact S x = diag(d_b) x - C D^-1 C^T x (two light passes over the
    stored couplings)."""
    y, = passes.reduce(_coupling_transpose_partition, x)
    z, = passes.reduce(_coupling_partition, y * inv_d_i)
    return d_b * x - z


# Corrections of a Gauss-Newton step solved with the sampled matrix, each
# against the exact matrix (iterative refinement): the sampled matrix alone
# leaves ~10-20 % of the step's error, which costs whole iterations.
REFINEMENT_STEPS = 1


def _denominator_partition(rows, start, stop, scale):
    """sum_i b_i W_iv per voxel (a with no smoother, c = 0): the
    merge denominator, the only part of the merge that the scales change."""
    obs, n = rows.obs, rows.obs.n_voxels
    den = np.zeros(n)
    for a in range(start, stop, CHUNK_ROWS):
        sl = slice(a, min(a + CHUNK_ROWS, stop))
        image = obs.image[sl]
        values = scale[image] * obs.factor[sl]
        den += _used_sum(_used_index(obs.voxel[sl], rows.use[sl], n), values, n)
    return (den,)


def _schur_matrix(d_b, images, sampled, couplings, inv_d_sampled, every):
    """diag(d_b) - k C D^-1 C^T from the sampled voxels' couplings: by dense
    blocks of voxels (BLAS syrk) when a voxel is seen by a large fraction of
    the images, as a sparse product when by a few (a rotation sweep)."""
    from scipy.linalg import blas

    n_img, n_sub = d_b.size, inv_d_sampled.size
    if _sparse_is_cheaper(sampled, n_img, n_sub):
        return np.diag(d_b) - _sparse_coupling_product(
            d_b.size, images, sampled, couplings, inv_d_sampled, every)
    upper = np.zeros((n_img, n_img), order="F")
    block = max(1, DENSE_BLOCK // n_img)
    for s0 in range(0, n_sub, block):
        nb = min(block, n_sub - s0)
        sel = (sampled >= s0) & (sampled < s0 + nb) if nb < n_sub else slice(None)
        # (voxels, images) in C order is (images, voxels) in Fortran order:
        # what syrk takes without a copy
        dense = _bincount((sampled[sel] - s0).astype(np.intp) * n_img + images[sel],
                          couplings[sel], nb * n_img).reshape(nb, n_img)
        dense *= np.sqrt(inv_d_sampled[s0:s0 + nb])[:, None]
        upper = blas.dsyrk(float(every), dense.T, beta=1.0, c=upper, overwrite_c=True)
    product = np.triu(upper) + np.triu(upper, 1).T
    return np.diag(d_b) - product


def _sparse_is_cheaper(sampled, n_img, n_sub):
    """A sparse product costs sum_v (images seeing v)^2 (times ~20 for the
    sparse bookkeeping), the dense one n_voxels x n_images^2: a rotation sweep,
    where each voxel is seen by a few neighbouring images, is sparse."""
    degree = np.bincount(sampled, minlength=n_sub).astype(np.float64)
    return 20.0 * float(degree @ degree) < float(n_sub) * n_img * n_img


def _sparse_coupling_product(n_img, images, sampled, couplings, inv_d_sampled, every):
    """k C D^-1 C^T with C the (images x sampled voxels) couplings, sparse."""
    import scipy.sparse

    weights = couplings * np.sqrt(inv_d_sampled[sampled])
    c = scipy.sparse.csr_matrix((weights, (images, sampled)),
                                shape=(n_img, inv_d_sampled.size))
    return float(every) * (c @ c.T).toarray()


def _solver(matrix):
    """x -> matrix^-1 x (LU once; least squares if singular)."""
    import scipy.linalg

    try:
        lu = scipy.linalg.lu_factor(matrix, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return lambda b: np.linalg.lstsq(matrix, b, rcond=None)[0]
    if not np.all(np.isfinite(lu[0])) or np.any(np.diag(lu[0]) == 0):
        return lambda b: np.linalg.lstsq(matrix, b, rcond=None)[0]
    return lambda b: scipy.linalg.lu_solve(lu, b, check_finite=False)


def _gauss_newton_scales(passes, model, gn, every):
    """One Gauss-Newton step for b on the joint problem in (b, I).

    The alternating updates converge slowly when images overlap only with
    their neighbours (a rotation sweep: a chain of images). Solving for all
    b_i together, with the I_v eliminated through the Schur complement of the
    normal equations, moves the whole chain at once. ``gn`` are the sums of
    a Gauss-Newton pass (fused by the caller with the outlier rejection),
    which also stored the couplings per row. The gradient is exact; for large
    runs the images x images matrix is estimated from every k-th voxel
    (scaled by k), which bounds memory and time and keeps the step a good
    quasi-Newton step.
    """
    n_img = passes.obs.n_images
    d_b, d_i, g_b, g_i, _, images, sampled, couplings = gn
    inv_d_i = np.where(d_i > 0, 1.0 / np.where(d_i > 0, d_i, 1.0), 0.0)
    coupling_rhs, = passes.reduce(_coupling_partition, g_i * inv_d_i)
    rhs = g_b - coupling_rhs
    schur = _schur_matrix(d_b, images, sampled, couplings, inv_d_i[::every], every)
    # the overall factor is free (b -> k b, I -> I / k): pin the mean step
    gauge = np.trace(schur) / n_img
    schur += gauge * np.ones((n_img, n_img)) / n_img
    # smooth scales: the same step restricted to b = M c (M^T S M dc = M^T g)
    basis = None if model.scale_basis is None else model.scale_basis.matrix
    project = (lambda v: v) if basis is None else (lambda v: basis.T @ v)
    solve = _solver(schur if basis is None else basis.T @ schur @ basis)
    step = solve(project(rhs))
    expand = (lambda v: v) if basis is None else (lambda v: basis @ v)
    for _ in range(REFINEMENT_STEPS if every > 1 else 0):
        step += solve(project(rhs - _schur_product(passes, d_b, inv_d_i, expand(step))))
    current = model.scale if basis is None else model.scale_controls
    new = current + step
    # never let a scale go to or below zero: fall back to a damped step
    while np.any(expand(new) <= 0):
        step *= 0.5
        new = current + step
    if basis is None:
        model.scale = new
    else:
        model.set_scale_controls(new)


def _residual_sample(obs, model, intensity, use, max_samples=1_000_000):
    """Residuals, Poisson variances and expectations of a regular subsample of
    the used observations (for the error-model fit)."""
    # a regular stride first, so no index array of every observation is made
    step = max(1, obs.n_obs // max_samples)
    idx = np.arange(0, obs.n_obs, step)
    idx = idx[use[::step]]
    sample = ObservationChunk(
        voxel=obs.voxel[idx].astype(np.intp), image=obs.image[idx].astype(np.intp),
        signal=obs.signal[idx].astype(np.float64), factor=obs.factor[idx].astype(np.float64),
        variance=obs.variance[idx].astype(np.float64),
        voxel_qmag=obs.voxel_qmag, image_gain=obs.image_gain,
    )
    sample.gain = row_gain(obs.image_gain, sample.image)
    expected = model_prediction(sample, model, intensity)
    return sample.signal - expected, model_variance(sample, expected), expected


def _rejection_partition(rows, start, stop, model, intensity, error_k, outlier_sigma,
                         then=None, halves=None, every=1):
    """Outlier rejection of the partition's rows (rewrites their ``use``) and
    the R / chi^2 sums over the rows kept. In the same sweep (same model, so
    one pass instead of two): then="gauss_newton", the next iteration's
    Gauss-Newton pass; then="merge", the final merge sums (for each half of
    the images if ``halves``)."""
    obs, use = rows.obs, rows.use
    totals = np.zeros(3)  # sum |resid|, sum |S|, sum z^2 over the rows kept
    sums, samples = _new_gauss_newton_sums(obs) if then == "gauss_newton" else ([], [])
    if then == "merge":
        sums = [np.zeros((1 if halves is None else 2, MERGE_SUMS, obs.n_voxels))]
    for ch, u, sl in chunks(obs, use, start, stop):
        b, x, expected = _prediction(ch, model, intensity)
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
            _add_gauss_newton_rows(rows, ch, u, sl, b, x, variance, resid, every, sums, samples)
        elif then == "merge":
            _add_merge_sums(sums[0], ch, u, model, halves, expected)
    return [totals] + sums + [np.concatenate(s) for s in samples]


def refine_scales(obs, params, passes=None, halves=None, scale_basis=None) -> ScalingResult:
    """Refinement of b_i (and optionally c_i, a_i(|q|)) and I_v.

    ``passes`` (an ObservationPasses) runs the sums over the observations,
    possibly in parallel; its ``use`` holds the rows kept at the end. With
    ``halves`` (a bool per image) the result also has the two half-dataset
    maps (CC1/2), from the same last pass. With ``scale_basis`` (a
    SmoothScaleBasis of the images) b is refined as a smooth function of the
    rotation angle instead of one value per image.
    """
    if passes is None:
        with ObservationPasses(obs) as passes:
            return refine_scales(obs, params, passes, halves, scale_basis)
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
    )
    reject = params.outlier_sigma is not None and params.outlier_sigma > 0
    gauss_newton = params.solver == "gauss_newton" and not params.offsets and not sm.enable
    every = schur_sample_step(obs) if gauss_newton else 1
    merge_sums = passes.reduce(_merge_partition, model)[0][0]
    numerator = merge_sums[0]
    intensity = np.nan_to_num(_intensities(merge_sums)[0])
    if gauss_newton:
        gn = passes.reduce(_gauss_newton_partition, model, intensity, every, concat=_samples(0))
    for iteration in range(1, params.max_iterations + 1):
        old_scale = model.scale.copy()
        # I_v from the end of the previous iteration (one pass fewer per
        # iteration; it only lags the last outlier update)
        if gauss_newton:
            _gauss_newton_scales(passes, model, gn, every)
        else:
            _update_scales(passes, model, intensity)
        if params.offsets:
            _update_offsets(passes, model, intensity)
        if sm.enable:
            _update_smoother(passes, model, intensity)
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
            den, = passes.reduce(_denominator_partition, model.scale)
            intensity = np.where(den > 0, numerator / np.where(den > 0, den, 1.0), 0.0)
        else:
            intensity = np.nan_to_num(merge_intensities(obs, model, passes=passes)[0])
        error_k = fit_error_model(*_residual_sample(obs, model, intensity, passes.use))
        model.error_k = error_k
        shift = float(np.max(np.abs(model.scale - old_scale) / np.maximum(old_scale, 1e-12)))
        last = shift < params.convergence_tolerance or iteration == params.max_iterations
        then = "merge" if last else ("gauss_newton" if gauss_newton else None)
        totals, *sums = passes.reduce(
            _rejection_partition, model, intensity, error_k, params.outlier_sigma if reject else None,
            then, halves, every, concat=_samples(1) if then == "gauss_newton" else ())
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
        if shift < params.convergence_tolerance:
            converged = True
            break
    _log_history(history, converged)
    # the last rejection pass made the merge sums with the final use
    merge_sums = sums[0]
    # the merged sigma's error term: calibrated on the half maps when there
    # are two, else the per-observation k
    model.merged_error_k = (merged_error_k(merge_sums) if merge_sums.shape[0] == 2
                            else model.error_k)
    intensity, sigma, n_obs = _intensities(merge_sums.sum(axis=0), model.merged_error_k)
    return ScalingResult(model=model, intensity=intensity, rejected=~passes.use,
                         history=history, converged=converged, sigma=sigma, n_observations=n_obs,
                         half_maps=None if halves is None else [
                             _intensities(h, model.merged_error_k) for h in merge_sums])


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
    # z_j(k) = r_j^2 / (p_j + k^2 e_j^2) <= m  <=>  t_j = (r_j^2 - m p_j) / (m e_j^2) <= k^2,
    # so median(z) = m where k^2 = median(t): one median, no search
    m = CHI2_1_MEDIAN
    if resid.size == 0:
        return 0.0
    r2, pv, e2 = resid**2, poisson_var, expected**2
    above = r2 > m * pv
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(e2 > 0, (r2 - m * pv) / (m * np.where(e2 > 0, e2, 1.0)),
                     np.where(above, np.inf, -np.inf))
    k2 = float(np.median(t))
    return float(min(np.sqrt(k2), MAX_ERROR_K)) if k2 > 0 else 0.0


MAX_ERROR_K = 1024.0


def _offset_partition(rows, start, stop, model, intensity):
    """Per-image sums of the 2x2 normal equations of (b_i, c_i)."""
    obs, use = rows.obs, rows.use
    n = obs.n_images
    sums = np.zeros((5, n))
    for ch, u, _ in chunks(obs, use, start, stop):
        x = model.observation_factor(ch) * intensity[ch.voxel]
        expected = ch.factor * (model.scale[ch.image] * x + model.offset[ch.image])
        w = np.where(u, 1.0 / model_variance(ch, expected), 0.0)
        W, S = ch.factor, ch.signal
        # minimise sum w (S - W (b x + c))^2 -> 2x2 normal equations per image
        for k, values in enumerate((w * W * W * x * x, w * W * W * x, w * W * W, w * W * x * S, w * W * S)):
            sums[k] += _bincount(ch.image, values, n)
    return (sums,)


def _update_offsets(passes, model, intensity):
    """Per-image weighted least squares for (b_i, c_i) given I_v."""
    sxx, sx1, s11, sxs, s1s = passes.reduce(_offset_partition, model, intensity)[0]
    det = sxx * s11 - sx1 * sx1
    ok = np.abs(det) > 1e-12 * np.maximum(sxx * s11, 1e-300)
    b = np.where(ok, (sxs * s11 - s1s * sx1) / np.where(ok, det, 1), model.scale)
    c = np.where(ok, (sxx * s1s - sx1 * sxs) / np.where(ok, det, 1), model.offset)
    model.scale, model.offset = b, c


def _smoother_partition(rows, start, stop, model, intensity):
    """Per-image normal equations of the control-point values of a_i."""
    obs, use = rows.obs, rows.use
    k = model.smoother_q.size
    n = obs.n_images
    normal = np.zeros(n * k * k)
    rhs = np.zeros(n * k)
    for ch, u, _ in chunks(obs, use, start, stop):
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
