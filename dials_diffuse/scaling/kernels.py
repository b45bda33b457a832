"""The scaling passes of the plain model as compiled sweeps (numba, Debian's
python3-numba), each one loop over a partition's rows instead of a dozen
numpy temporaries and bincounts per chunk.

The plain model is E[S] = W b_i I_v (no resolution smoother, no offsets, no
mdx2 surfaces): the default, and the only model the Gauss-Newton solver
refines. The row arithmetic is that of :mod:`merge_sums` and
:mod:`gauss_newton` in the same order, in float64 from the float32 columns;
the per-voxel sums add row by row in row order (numpy adds per-chunk sums),
so the two paths agree to rounding. A sweep runs over a partition's voxel
range v0:v1 (rows given as one run per image, passes.Partition) and writes
that range's per-voxel sums at v - v0. The kernels release the GIL: a
pass's partitions run in threads (:class:`passes.ObservationPasses`).

This module imports numba at import time; :func:`passes.load_kernels` imports
it lazily.
"""

from __future__ import annotations

import numpy as np

from dials_diffuse.compiled import import_numba

numba = import_numba()
jit = numba.njit(cache=True, nogil=True)


@jit
def sweep(voxel, image, signal, factor, variance, use, run_start, run_stop, v0, scale,
          intensity, image_gain, error_k, outlier2, reject, totals, gn_image, gn_voxel,
          coupling, merge, half, merge_expected):
    """One pass over the rows run_start[k]:run_stop[k] (every k) with the
    plain model; per-voxel outputs are indexed v - v0.

    reject: rewrite use[row] as z^2 <= outlier2 (else read it); totals: sums
    of |S - E[S]|, |S| and z^2 over the rows used. gn_image (2, n_img) and
    gn_voxel (3, n) over the voxels v0:v0 + n, with a non-empty first axis:
    the Gauss-Newton sums (d_b, g_b; d_I, g_I, sum S) and the row's coupling
    C = w W^2 b I (0 if not used: sparse_schur_product reads them). merge
    (n_sets, 5, n) non-empty: the merge sums (numerator, denominator, counting variance, count, E[S]^2 if
    merge_expected), into set half[image] (one set: half all 0).
    """
    want_gn = gn_image.shape[0] > 0
    want_merge = merge.shape[0] > 0
    sum_resid = 0.0
    sum_signal = 0.0
    sum_z2 = 0.0
    for k in range(run_start.size):
        for row in range(run_start[k], run_stop[k]):
            i = image[row]
            v = voxel[row]
            lv = v - v0
            s = np.float64(signal[row])
            w = np.float64(factor[row])
            var = np.float64(variance[row])
            gain = image_gain[i]
            b = scale[i]
            x = intensity[v]
            expected = b * x
            expected *= w
            background = var - s
            if background < 0.0:
                background = 0.0
            model_var = expected + background
            if model_var < gain:
                model_var = gain
            resid = s - expected
            z2 = resid * resid
            if error_k != 0.0:
                t = error_k * expected
                z2 /= model_var + t * t
            else:
                z2 /= model_var
            if reject:
                u = z2 <= outlier2
                use[row] = u
            else:
                u = use[row]
            if u:
                sum_resid += abs(resid)
                sum_signal += abs(s)
                sum_z2 += z2
            if want_gn:
                if u:
                    w_w = w / model_var
                    w_wb = w_w * b
                    w_wx = w_w * x
                    gn_image[0, i] += w_wx * w * x
                    gn_voxel[0, lv] += w_wb * w * b
                    gn_image[1, i] += w_wx * resid
                    gn_voxel[1, lv] += w_wb * resid
                    gn_voxel[2, lv] += s
                    coupling[row] = w_wb * w * x
                else:
                    coupling[row] = 0.0
            if want_merge and u:
                h = half[i]
                merge[h, 0, lv] += s
                merge[h, 1, lv] += b * w
                merge[h, 2, lv] += var if var > gain else gain
                merge[h, 3, lv] += 1.0
                if merge_expected:
                    merge[h, 4, lv] += expected * expected
    totals[0] += sum_resid
    totals[1] += sum_signal
    totals[2] += sum_z2


@jit
def denominator(voxel, image, factor, use, run_start, run_stop, v0, scale, out):
    """out[v - v0] += b_i W over the used rows of the runs."""
    for k in range(run_start.size):
        for row in range(run_start[k], run_stop[k]):
            if use[row]:
                out[voxel[row] - v0] += scale[image[row]] * np.float64(factor[row])


@jit
def coupling_sums(group, other, coupling, run_start, run_stop, group0, values, out):
    """out[group - group0] += C values[other] over the rows of the runs (C
    is 0 where unused)."""
    for k in range(run_start.size):
        for row in range(run_start[k], run_stop[k]):
            out[group[row] - group0] += np.float64(coupling[row]) * values[other[row]]


@jit
def voxel_rows(voxel, every, n_sub, order, start):
    """The rows of the sampled voxels (voxel % every == 0) grouped by
    sampled voxel v = voxel // every, in row order within a voxel (a
    counting sort): rows order[start[v]:start[v + 1]] are voxel v's."""
    for row in range(voxel.size):
        if voxel[row] % every == 0:
            start[voxel[row] // every + 1] += 1
    for v in range(n_sub):
        start[v + 1] += start[v]
    fill = start[:-1].copy()
    for row in range(voxel.size):
        if voxel[row] % every == 0:
            v = voxel[row] // every
            order[fill[v]] = row
            fill[v] += 1


@jit
def sparse_schur_product(n_img, order, start, image, coupling, inv_d_sampled, v_start, v_stop):
    """sum_v C_iv C_jv / d_v over the sampled voxels v_start:v_stop (images x
    images), from the couplings stored per row (0 where unused) and the rows
    grouped by voxel (voxel_rows). Rows of one (image, voxel) pair need not
    be combined first: the sum over pairs of rows is the same product.
    Symmetric: the pairs q >= p only (the caller mirrors: half the diagonal
    here)."""
    upper = np.zeros((n_img, n_img))
    max_degree = 0
    for v in range(v_start, v_stop):
        max_degree = max(max_degree, start[v + 1] - start[v])
    images = np.empty(max_degree, np.int64)
    weights = np.empty(max_degree, np.float64)
    for v in range(v_start, v_stop):
        # the voxel's nonzero couplings gathered first: the pair loop then
        # reads two small arrays
        n = 0
        for p in range(start[v], start[v + 1]):
            c = np.float64(coupling[order[p]])
            if c != 0.0:
                images[n] = image[order[p]]
                weights[n] = c
                n += 1
        inv_d = inv_d_sampled[v]
        for p in range(n):
            row = upper[images[p]]
            wp = weights[p] * inv_d
            row[images[p]] += 0.5 * wp * weights[p]
            for q in range(p + 1, n):
                row[images[q]] += wp * weights[q]
    return upper
