"""Indexing ambiguity of stills and multiple crystals (issue 15).

When the lattice has more symmetry than the Laue group of the crystal (P4,
P3, P6, R3, I4, P2_13, I2_13, ..., or a monoclinic cell with a ~ c), every
crystal can be indexed in several settings that the lattice cannot tell
apart. They are the cosets of the Laue group G in the lattice point group L
(the holohedry of the metric, from cctbx ``lattice_symmetry``); one operator
per coset is an *alternative indexing operator*. Stills indexed one by one
pick a setting at random; merged as they are, the map is a mixture of the
true map and its images under those operators.

This module:

* ``reindexing_operators``: the coset representatives (identity first) as
  integer matrices acting on row vectors of hkl, ``hkl' = hkl @ O``, the
  convention of ``dials_diffuse.symmetry`` (e.g. P6_3: {h,k,l}, {k,h,-l});
* ``resolve``: a choice of operator per crystal that makes the data
  consistent, computed on the per-image voxel observations the extraction
  wrote (the ``ObservationSet`` of the merge), in the spirit of Brehm &
  Diederichs (2014): pairwise correlations of the crystals' voxel data under
  every operator, an assignment maximising the sum of correlations, then
  refinement of every crystal against a leave-one-out reference map;
* ``apply``: the observations reindexed (voxel by voxel, vectorised);
* the merge's step (PHIL scope ``ambiguity``, ``ambiguity.json``) is
  ``dials_diffuse.merge_ambiguity``; the operators come from
  ``dials_diffuse.reindexing``.

Because G is a normal subgroup of L (checked), reindexing commutes with the
mapping to the asymmetric unit: ``ASU(g @ O) = ASU(ASU(g) @ O)``, so the
operators act on the already ASU-mapped voxels of the merge; the files are
read once. See docs/SERIAL.md.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from dials_diffuse import symmetry
from dials_diffuse.reindexing import (  # noqa: F401 (as_hkl re-exported for scripts)
    CosetTable,
    as_hkl,
    reindexing_operators,
)

logger = logging.getLogger("dials.diffuse_merge")



def _pack(g):
    g = np.asarray(g, np.int64) + (1 << 20)
    return (g[:, 0] << 42) | (g[:, 1] << 21) | g[:, 2]


def _unpack(k):
    mask = (1 << 21) - 1
    return np.stack([(k >> 42) & mask, (k >> 21) & mask, k & mask], axis=1) - (1 << 20)


def voxel_maps(voxel_grid, ndiv, table: CosetTable):
    """Voxel tables of every operator: (grid (m, 3) of the union of the
    reindexed ASU voxels, idx (n_ops, n_voxels): compact index in that grid of
    ASU(voxel @ ops[k]))."""
    keys = [_pack(symmetry.map_to_asu(np.asarray(voxel_grid, np.int64) @ o, ndiv, table.laue))
            for o in table.ops]
    union = np.unique(np.concatenate(keys))
    idx = np.stack([np.searchsorted(union, k) for k in keys])
    return _unpack(union), idx


def apply(obs, assignment_of_image, grid, table: CosetTable):
    """The observations with image i's voxels reindexed by
    ``ops[assignment_of_image[i]]`` (mapped to the ASU, re-compacted)."""
    ndiv = np.array(grid.ndiv)
    new_grid, idx = voxel_maps(obs.voxel_grid, ndiv, table)
    a = np.asarray(assignment_of_image, np.int64)
    voxel = idx[a[obs.image], obs.voxel]
    used, compact = np.unique(voxel, return_inverse=True)
    voxel_grid = new_grid[used].astype(np.int32)
    qmag = np.linalg.norm(grid.q_of(voxel_grid / ndiv), axis=1)
    return dataclasses.replace(obs, voxel=compact.astype(np.int32), voxel_grid=voxel_grid,
                               voxel_qmag=qmag)


# ---------------------------------------------------------------------------
# data for the correlations
# ---------------------------------------------------------------------------


def standardised_rows(obs, ndiv, n_shells=20):
    """(rows, z): the observation rows used (off Bragg positions, W > 0) and
    their standardised intensities. I = S / W is divided by its image's mean
    (the scale), then the mean and spread of all observations at the same
    resolution (equal-count shells of |q|) are removed:
    z = (I/mean_i - mu(|q|)) / sd(|q|), clipped at +-6. The isotropic part
    (the same in every setting) is gone and every resolution counts alike."""
    on_bragg = np.all(obs.voxel_grid % np.asarray(ndiv) == 0, axis=1)
    factor = np.asarray(obs.factor, np.float64)
    rows = np.flatnonzero((factor > 0) & ~on_bragg[obs.voxel])
    intensity = np.asarray(obs.signal, np.float64)[rows] / factor[rows]
    image = obs.image[rows]
    sums = np.bincount(image, weights=intensity, minlength=obs.n_images)
    counts = np.bincount(image, minlength=obs.n_images)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    mean[~(mean > 0)] = 1.0
    x = intensity / mean[image]
    q = obs.voxel_qmag[obs.voxel[rows]]
    order = np.argsort(q, kind="stable")
    shell = np.empty(q.size, np.int64)
    shell[order] = np.arange(q.size) * n_shells // max(q.size, 1)
    n = np.bincount(shell, minlength=n_shells).astype(np.float64)
    mu = np.bincount(shell, weights=x, minlength=n_shells) / np.maximum(n, 1)
    var = np.bincount(shell, weights=x * x, minlength=n_shells) / np.maximum(n, 1) - mu**2
    sd = np.sqrt(np.maximum(var, 1e-30))
    z = np.clip((x - mu[shell]) / sd[shell], -6, 6)
    return rows, z


def _group_matrix(group_rows, columns, z, n_groups, n_columns):
    """CSR (n_groups x n_columns) of the mean z per (group, column) and its
    pattern (1 where observed)."""
    from scipy import sparse

    shape = (n_groups, n_columns)
    zsum = sparse.csr_matrix((z, (group_rows, columns)), shape=shape)
    cnt = sparse.csr_matrix((np.ones_like(z), (group_rows, columns)), shape=shape)
    zsum.sum_duplicates()
    cnt.sum_duplicates()
    x = zsum.copy()
    x.data = zsum.data / cnt.data
    mask = cnt.copy()
    mask.data = np.ones_like(mask.data)
    return x, mask


def pairwise_correlations(group_of_row, z, voxel_of_row, idx, groups, n_columns):
    """Pearson correlations, over their common voxels, of every pair of the
    given groups with the first reindexed by each operator:
    r[k, i, j] = CC(group i reindexed by k, group j), and the common counts
    n (n_ops, g, g)."""
    local = -np.ones(int(group_of_row.max()) + 1 if group_of_row.size else 0, np.int64)
    local[groups] = np.arange(groups.size)
    sel = local[group_of_row] >= 0
    gr, zz, vv = local[group_of_row[sel]], z[sel], voxel_of_row[sel]
    y, my = _group_matrix(gr, idx[0][vv], zz, groups.size, n_columns)
    y2 = y.multiply(y).tocsr()
    r = np.zeros((idx.shape[0], groups.size, groups.size))
    n = np.zeros_like(r)
    for k in range(idx.shape[0]):
        x, mx = (y, my) if k == 0 else _group_matrix(gr, idx[k][vv], zz, groups.size, n_columns)
        x2 = x.multiply(x).tocsr()
        nk = (mx @ my.T).toarray()
        sx = (x @ my.T).toarray()
        sy = (mx @ y.T).toarray()
        sxx = (x2 @ my.T).toarray()
        syy = (mx @ y2.T).toarray()
        sxy = (x @ y.T).toarray()
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = sxy - sx * sy / nk
            vx = sxx - sx * sx / nk
            vy = syy - sy * sy / nk
            cc = cov / np.sqrt(vx * vy)
        r[k] = np.where(np.isfinite(cc), cc, 0.0)
        n[k] = nk
    return r, n


def pairwise_assignment(r, n, table: CosetTable, min_common, iterations, rng):
    """Brehm-Diederichs assignment: each group in turn takes the operator that
    maximises the sum of its correlations with all others in their current
    settings, until nothing changes. Returns (assignment, passes)."""
    g = r.shape[1]
    w = (n >= min_common).astype(np.float64)
    idx = np.arange(g)
    for k in range(r.shape[0]):
        w[k, idx, idx] = 0.0
    rw = r * w
    a = np.zeros(g, np.int64)
    for it in range(iterations):
        changed = 0
        for i in rng.permutation(g):
            m = table.mul[:, table.inv[a]]  # (n_ops, g): coset of k a_j^-1
            scores = rw[m, i, idx].sum(axis=1)
            best = int(np.argmax(scores))
            if scores[best] > scores[a[i]] + 1e-12:
                a[i] = best
                changed += 1
        if not changed:
            return a, it + 1
    return a, iterations


def reference_scores(group_of_row, z, voxel_of_row, idx, assignment, n_groups,
                     members=None):
    """CC of every group under every operator with the reference map of the
    others: (n_groups, n_ops). The reference is the mean z per voxel of the
    groups in ``members`` (all by default) in their ``assignment``, leaving
    the group itself out; fully vectorised over the observations."""
    n_ops, n_columns = idx.shape[0], int(idx.max()) + 1
    a_row = assignment[group_of_row]
    cur = idx[a_row, voxel_of_row]
    inref = np.ones(z.size, bool) if members is None else members[group_of_row]
    ref_sum = np.bincount(cur[inref], weights=z[inref], minlength=n_columns)
    ref_cnt = np.bincount(cur[inref], minlength=n_columns).astype(np.float64)
    # each group's own contribution per voxel, for the leave-one-out
    own_keys = group_of_row.astype(np.int64) * n_columns + cur
    own_keys_in = own_keys[inref]
    uk, inverse = np.unique(own_keys_in, return_inverse=True)
    own_sum = np.bincount(inverse, weights=z[inref])
    own_cnt = np.bincount(inverse).astype(np.float64)
    scores = np.zeros((n_groups, n_ops))
    for k in range(n_ops):
        t = idx[k, voxel_of_row]
        qk = group_of_row.astype(np.int64) * n_columns + t
        pos = np.minimum(np.searchsorted(uk, qk), max(uk.size - 1, 0))
        hit = (uk[pos] == qk) if uk.size else np.zeros(qk.size, bool)
        s = ref_sum[t] - np.where(hit, own_sum[pos], 0.0)
        c = ref_cnt[t] - np.where(hit, own_cnt[pos], 0.0)
        ok = c > 0
        ref = np.where(ok, s / np.where(ok, c, 1), 0.0)
        gr = group_of_row[ok]
        x, y = z[ok], ref[ok]
        sn = np.bincount(gr, minlength=n_groups).astype(np.float64)
        sx = np.bincount(gr, weights=x, minlength=n_groups)
        sy = np.bincount(gr, weights=y, minlength=n_groups)
        sxx = np.bincount(gr, weights=x * x, minlength=n_groups)
        syy = np.bincount(gr, weights=y * y, minlength=n_groups)
        sxy = np.bincount(gr, weights=x * y, minlength=n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            cc = (sxy - sx * sy / sn) / np.sqrt((sxx - sx * sx / sn) * (syy - sy * sy / sn))
        scores[:, k] = np.where(np.isfinite(cc), cc, np.nan)
    return scores


@dataclasses.dataclass
class Resolution:
    assignment: np.ndarray  # operator index per group (crystal)
    score_before: np.ndarray  # CC with the others' map, as indexed
    score_after: np.ndarray  # CC with the others' map, as reindexed
    # (n_groups, n_ops): CC with the others' (final) map when the group's data
    # as indexed are reindexed by operator k (column k <-> ops[k] as applied)
    scores: np.ndarray
    pairwise_groups: np.ndarray  # groups of the pairwise stage
    pairwise_passes: int
    reference_passes: int
    global_operator: int
    global_choice: str


def resolve(obs, ndiv, table: CosetTable, group_of_image, params, reference=None):
    """A consistent operator per group (crystal) of images.

    ``group_of_image``: (n_images,) group index (0..n_groups-1) of every image
    of ``obs``: all images of a crystal share one choice. ``reference``: None
    or (voxel_grid (m, 3) ASU indices, intensity (m,)) of a map in the
    correct setting, which fixes the absolute choice."""
    rng = np.random.default_rng(params.seed)
    group_of_image = np.asarray(group_of_image, np.int64)
    n_groups = int(group_of_image.max()) + 1
    rows, z = standardised_rows(obs, ndiv)
    group_of_row = group_of_image[obs.image[rows]]
    voxel_of_row = obs.voxel[rows].astype(np.int64)
    grid_ext, idx = voxel_maps(obs.voxel_grid, ndiv, table)
    n_columns = len(grid_ext)

    # 1. pairwise stage on (a random subset of) the groups
    if n_groups <= params.max_pairwise:
        pair_groups = np.arange(n_groups)
    else:
        pair_groups = np.sort(rng.choice(n_groups, params.max_pairwise, replace=False))
    r, n = pairwise_correlations(group_of_row, z, voxel_of_row, idx, pair_groups, n_columns)
    a_pair, pair_passes = pairwise_assignment(r, n, table, params.min_common,
                                              params.iterations, rng)
    assignment = np.zeros(n_groups, np.int64)
    assignment[pair_groups] = a_pair
    # the others against the map of the pairwise groups
    if pair_groups.size < n_groups:
        members = np.zeros(n_groups, bool)
        members[pair_groups] = True
        s = reference_scores(group_of_row, z, voxel_of_row, idx, assignment, n_groups, members)
        rest = ~members
        assignment[rest] = np.nanargmax(np.nan_to_num(s[rest], nan=-2.0), axis=1)

    # 2. every group against the leave-one-out map of all the others
    ref_passes = 0
    for ref_passes in range(1, params.iterations + 1):
        s = reference_scores(group_of_row, z, voxel_of_row, idx, assignment, n_groups)
        best = np.argmax(np.nan_to_num(s, nan=-2.0), axis=1)
        gain = np.take_along_axis(s, best[:, None], 1)[:, 0] - s[np.arange(n_groups), assignment]
        change = (best != assignment) & (np.nan_to_num(gain) > 1e-9)
        if not change.any():
            break
        if change.sum() > 1 and ref_passes > 1:
            # damp: the most improving half first (no oscillation of pairs)
            order = np.argsort(-np.where(change, gain, -np.inf))
            change[order[(change.sum() + 1) // 2:]] = False
        assignment[change] = best[change]
    scores = reference_scores(group_of_row, z, voxel_of_row, idx, assignment, n_groups)
    before = reference_scores(group_of_row, z, voxel_of_row, idx,
                              np.zeros(n_groups, np.int64), n_groups)[:, 0]

    # 3. the absolute choice: a global operator g applied on top of everything
    global_op, how = 0, "identity: the single setting allowed"
    if table.n > 1:
        if reference is not None:
            cc = _reference_agreement(group_of_row, z, voxel_of_row, idx, assignment, table,
                                      grid_ext, reference, ndiv)
            global_op = int(np.nanargmax(cc))
            how = "reference map: CC " + ", ".join(
                f"{table.symbols()[k]} {c:.3f}" for k, c in enumerate(cc))
        else:
            kept = [int(np.sum(table.mul[assignment, g] == 0)) for g in range(table.n)]
            global_op = int(np.argmax(kept))
            how = "majority: the setting most crystals were indexed in"
    final = table.mul[assignment, global_op]
    # scores are invariant under the global operator (all groups move together)
    after = scores[np.arange(n_groups), assignment]
    # scores[i, k] was group i reindexed by k with the others before the
    # global operator g; with everything moved by g, operator k here is
    # operator k g^-1 there
    scores = scores[:, table.mul[np.arange(table.n), table.inv[global_op]]]
    return Resolution(assignment=final, score_before=before, score_after=after,
                      scores=scores, pairwise_groups=pair_groups, pairwise_passes=pair_passes,
                      reference_passes=ref_passes, global_operator=global_op, global_choice=how)


def _reference_agreement(group_of_row, z, voxel_of_row, idx, assignment, table, grid_ext,
                         reference, ndiv):
    """CC with the reference of the merged z map under each global operator."""
    ref_grid, ref_values = reference
    ref_keys = _pack(symmetry.map_to_asu(np.asarray(ref_grid, np.int64), ndiv, table.laue))
    ext_keys = _pack(grid_ext)
    order = np.argsort(ref_keys)
    ref_keys, ref_values = ref_keys[order], np.asarray(ref_values, np.float64)[order]
    out = []
    for g in range(table.n):
        a = table.mul[assignment, g]
        col = idx[a[group_of_row], voxel_of_row]
        n_col = idx.max() + 1
        s = np.bincount(col, weights=z, minlength=n_col)
        c = np.bincount(col, minlength=n_col)
        seen = np.flatnonzero(c > 0)
        pos = np.minimum(np.searchsorted(ref_keys, ext_keys[seen]), ref_keys.size - 1)
        hit = ref_keys[pos] == ext_keys[seen]
        if hit.sum() < 3:
            out.append(np.nan)
            continue
        mine = s[seen][hit] / c[seen][hit]
        theirs = ref_values[pos[hit]]
        out.append(float(np.corrcoef(mine, theirs)[0, 1]))
    return np.array(out)
