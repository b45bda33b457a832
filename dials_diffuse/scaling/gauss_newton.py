"""The Gauss-Newton update of the per-image scales: the images x images
Schur complement of the (images, voxels) normal equations, estimated from a
sample of voxels when the exact product is too costly, with iterative
refinement against the exact matrix. One algorithm (~270 lines)."""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse
from scipy.linalg import blas

from dials_diffuse.scaling.merge_sums import compiled_sweep, prediction, model_variance
from dials_diffuse.scaling.model import solver
from dials_diffuse.scaling.passes import VoxelSums, bincount, chunk_slices, chunks, used_index, used_sum

logger = logging.getLogger("dials.diffuse_merge")


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


def new_gauss_newton_sums(obs):
    """d_b, d_I (diagonals), g_b, g_I (gradients), and sum S per voxel
    (the numerator of the next merge), and lists for the sampled couplings."""
    n_img, n_vox = obs.n_images, obs.n_voxels
    return [np.zeros(n_img), np.zeros(n_vox), np.zeros(n_img), np.zeros(n_vox), np.zeros(n_vox)], [[], [], []]


def add_gauss_newton_rows(rows, ch, u, sl, b, x, variance, resid, every, sums, samples):
    """Add a chunk to the Gauss-Newton sums of the joint least squares in
    (b, I), store its couplings C = w W^2 b I (for the gradient's coupling
    term, next pass) and keep those of every k-th voxel (for the matrix)."""
    n_img, n_vox = sums[0].size, sums[1].size
    image, voxel = used_index(ch.image, u, n_img), used_index(ch.voxel, u, n_vox)
    wW = ch.factor / variance
    wWb = wW * b
    wWx = wW * x
    sums[0] += used_sum(image, wWx * ch.factor * x, n_img)
    sums[1] += used_sum(voxel, wWb * ch.factor * b, n_vox)
    sums[2] += used_sum(image, wWx * resid, n_img)
    sums[3] += used_sum(voxel, wWb * resid, n_vox)
    # the GN solver runs without offsets: the merge numerator is sum S
    sums[4] += used_sum(voxel, ch.signal, n_vox)
    coupling = wWb
    coupling *= ch.factor
    coupling *= x
    coupling[~u] = 0.0
    rows.coupling[sl] = coupling
    sub = u & sampled_voxels(sums[1].size, every)[ch.voxel]
    samples[0].append(ch.image[sub].astype(np.int32))
    samples[1].append((ch.voxel[sub] // every).astype(np.int32))
    samples[2].append(coupling[sub])


def sample_columns(first):
    """Indices of the sampled-coupling outputs of a Gauss-Newton pass whose
    sums start at output ``first``."""
    return tuple(range(first + GN_SUMS, first + GN_SUMS + GN_SAMPLES))


def sampled_voxels(n_vox, every):
    """Bool per voxel: is it one of the every-k-th voxels of the matrix (a
    byte lookup per row instead of an integer division)."""
    sampled = np.zeros(n_vox, bool)
    sampled[::every] = True
    return sampled


def compiled_gauss_newton_sums(n_images, part):
    """The per-image (d_b, g_b) and per-voxel (d_I, g_I, sum S) arrays that
    kernels.sweep fills over a Partition's voxels."""
    return np.zeros((2, n_images)), np.zeros((3, part.n_voxels))


def compiled_gauss_newton_outputs(gn, part):
    """A compiled pass's outputs in the numpy pass's order: the sums, then
    no sampled couplings (the matrix reads the couplings stored per row)."""
    per_image, per_voxel = gn
    return [per_image[0], VoxelSums(part.v0, per_voxel[0]), per_image[1],
            VoxelSums(part.v0, per_voxel[1]), VoxelSums(part.v0, per_voxel[2]),
            np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0)]


def gauss_newton_partition(rows, part, model, intensity, every):
    kernels = rows.compiled(model)
    if kernels is not None:
        gn = compiled_gauss_newton_sums(rows.obs.n_images, part)
        compiled_sweep(kernels, rows, part, model, intensity, gauss_newton=gn)
        return compiled_gauss_newton_outputs(gn, part)
    sums, samples = new_gauss_newton_sums(rows.obs)
    for ch, u, sl in chunks(rows.obs, rows.use, part):
        b, x, mu = prediction(ch, model, intensity)
        add_gauss_newton_rows(rows, ch, u, sl, b, x, model_variance(ch, mu), ch.signal - mu,
                               every, sums, samples)
    return sums + [np.concatenate(s) for s in samples]


def _coupling_partition(rows, part, g_over_d):
    """sum_v C_iv g_v / d_v per image, from the stored couplings."""
    return (_coupling_sums(rows, part, g_over_d, per_image=True),)


def _coupling_transpose_partition(rows, part, x):
    """sum_i C_iv x_i per voxel, from the stored couplings."""
    return (_coupling_sums(rows, part, x, per_image=False),)


def _coupling_sums(rows, part, values, per_image):
    """Sums of C times ``values`` of the other index, by image or by voxel."""
    obs = rows.obs
    group, other, n = (
        (obs.image, obs.voxel, obs.n_images) if per_image else (obs.voxel, obs.image, obs.n_voxels)
    )
    if rows.kernels is not None:
        # per voxel: the partition's voxels only
        group0, n = (0, n) if per_image else (part.v0, part.n_voxels)
        total = np.zeros(n)
        rows.kernels.coupling_sums(group, other, rows.coupling, part.run_start, part.run_stop,
                                   group0, values, total)
        return total if per_image else VoxelSums(part.v0, total)
    total = np.zeros(n)
    for sl in chunk_slices(part.start, part.stop):
        total += bincount(group[sl], rows.coupling[sl] * values[other[sl]], n)
    return total


def _schur_product(passes, d_b, inv_d_i, x):
    """The exact S x = diag(d_b) x - C D^-1 C^T x (two light passes over the
    stored couplings)."""
    compiled = passes.rows.kernels is not None
    y, = passes.reduce(_coupling_transpose_partition, x, compiled=compiled)
    z, = passes.reduce(_coupling_partition, y * inv_d_i, compiled=compiled)
    return d_b * x - z


# Corrections of a Gauss-Newton step solved with the sampled matrix, each
# against the exact matrix (iterative refinement): the sampled matrix alone
# leaves ~10-20 % of the step's error, which costs whole iterations.
REFINEMENT_STEPS = 1


def denominator_partition(rows, part, scale):
    """sum_i b_i W_iv per voxel (a with no smoother, c = 0): the
    merge denominator, the only part of the merge that the scales change."""
    obs, n = rows.obs, rows.obs.n_voxels
    if rows.kernels is not None:
        den = np.zeros(part.n_voxels)
        rows.kernels.denominator(obs.voxel, obs.image, obs.factor, rows.use, part.run_start,
                                 part.run_stop, part.v0, np.ascontiguousarray(scale, np.float64),
                                 den)
        return (VoxelSums(part.v0, den),)
    den = np.zeros(n)
    for sl in chunk_slices(part.start, part.stop):
        image = obs.image[sl]
        values = scale[image] * obs.factor[sl]
        den += used_sum(used_index(obs.voxel[sl], rows.use[sl], n), values, n)
    return (den,)


def _schur_matrix(d_b, images, sampled, couplings, inv_d_sampled, every):
    """diag(d_b) - k C D^-1 C^T from the sampled voxels' couplings: by dense
    blocks of voxels (BLAS syrk) when a voxel is seen by a large fraction of
    the images, as a sparse product when by a few (a rotation sweep)."""
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
        dense = bincount((sampled[sel] - s0).astype(np.intp) * n_img + images[sel],
                          couplings[sel], nb * n_img).reshape(nb, n_img)
        dense *= np.sqrt(inv_d_sampled[s0:s0 + nb])[:, None]
        upper = blas.dsyrk(float(every), dense.T, beta=1.0, c=upper, overwrite_c=True)
    product = np.triu(upper) + np.triu(upper, 1).T
    return np.diag(d_b) - product


def _compiled_schur_matrix(passes, d_b, inv_d_sampled, every):
    """_schur_matrix from the couplings the compiled passes stored per row
    (no sampled copies): compiled as a sparse product when that is cheaper,
    else the dense blocks of the rows gathered by voxel."""
    kernels, obs = passes.rows.kernels, passes.obs
    order, start = passes.voxel_rows(every)
    n_img, n_sub = d_b.size, inv_d_sampled.size
    degree = np.diff(start).astype(np.float64)
    cost = np.cumsum(degree * degree)
    if COMPILED_SPARSE_COST * float(cost[-1]) < float(n_sub) * n_img * n_img:
        # SCHUR_PARTS voxel ranges of equal cost, summed in order: the same
        # matrix whether they run one after the other or in threads
        bounds = np.searchsorted(cost, np.linspace(0, cost[-1], SCHUR_PARTS + 1)[1:-1])
        bounds = [0, *bounds.tolist(), n_sub]
        parts = passes.thread_map(
            lambda v: kernels.sparse_schur_product(n_img, order, start, obs.image,
                                                   passes.rows.coupling, inv_d_sampled, *v),
            list(zip(bounds[:-1], bounds[1:])))
        upper = parts[0]
        for part in parts[1:]:
            upper += part
        return np.diag(d_b) - float(every) * (upper + upper.T)
    couplings = passes.rows.coupling[order].astype(np.float64)
    used = couplings != 0.0
    sampled = np.repeat(np.arange(n_sub, dtype=np.int32), np.diff(start))
    return _schur_matrix(d_b, obs.image[order][used], sampled[used], couplings[used],
                         inv_d_sampled, every)


# Voxel ranges of the compiled sparse product (see _compiled_schur_matrix).
SCHUR_PARTS = 4


# Cost of a compiled sparse pair (per (image, image, voxel) term) relative to
# a dense BLAS multiply-add (measured: 100 images of a rotation sweep,
# sum of degree^2 2.2e8, 0.25 s sparse against 0.55 s dense).
COMPILED_SPARSE_COST = 8.0


def _sparse_is_cheaper(sampled, n_img, n_sub):
    """A sparse product costs sum_v (images seeing v)^2 (times ~20 for the
    sparse bookkeeping), the dense one n_voxels x n_images^2: a rotation sweep,
    where each voxel is seen by a few neighbouring images, is sparse."""
    degree = np.bincount(sampled, minlength=n_sub).astype(np.float64)
    return 20.0 * float(degree @ degree) < float(n_sub) * n_img * n_img


def _sparse_coupling_product(n_img, images, sampled, couplings, inv_d_sampled, every):
    """k C D^-1 C^T with C the (images x sampled voxels) couplings, sparse."""
    weights = couplings * np.sqrt(inv_d_sampled[sampled])
    c = scipy.sparse.csr_matrix((weights, (images, sampled)),
                                shape=(n_img, inv_d_sampled.size))
    return float(every) * (c @ c.T).toarray()


def gauss_newton_scales(passes, model, gn, every):
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
    coupling_rhs, = passes.reduce(_coupling_partition, g_i * inv_d_i,
                                  compiled=passes.rows.kernels is not None)
    rhs = g_b - coupling_rhs
    if passes.rows.kernels is not None:
        schur = _compiled_schur_matrix(passes, d_b, inv_d_i[::every], every)
    else:
        schur = _schur_matrix(d_b, images, sampled, couplings, inv_d_i[::every], every)
    # the overall factor is free (b -> k b, I -> I / k): pin the mean step
    gauge = np.trace(schur) / n_img
    schur += gauge * np.ones((n_img, n_img)) / n_img
    # smooth scales: the same step restricted to b = M c (M^T S M dc = M^T g)
    basis = None if model.scale_basis is None else model.scale_basis.matrix
    project = (lambda v: v) if basis is None else (lambda v: basis.T @ v)
    solve = solver(schur if basis is None else basis.T @ schur @ basis)
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
