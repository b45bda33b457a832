"""Laue symmetry on the fractional-hkl voxel grid.

Conventions (see docs/SYMMETRY.md):

* A voxel is identified by integer grid indices ``g = (gh, gk, gl)`` with
  voxel centre ``hkl = (gh / ndiv_h, gk / ndiv_k, gl / ndiv_l)``; voxel
  centres fall on integer hkl when ``g`` is a multiple of ``ndiv``.
* Operators are integer ``(n_ops, 3, 3)`` arrays acting on **row vectors**:
  ``hkl' = hkl @ ops[i]``.  For the Laue group these matrices are the
  real-space rotation parts ``R`` of the cctbx symmetry operators (Miller
  indices transform with the transpose, ``h' = h R``, exactly as
  ``cctbx.miller.sym_equiv_indices``).  ``ops[0]`` is always the identity.
* Grid indices transform with the same matrices, ``g' = g @ ops[i]``, which is
  exact in integers provided every operator only couples axes sharing the same
  ``ndiv`` (checked by :func:`check_ndiv`, ValueError otherwise).
* The canonical (asymmetric-unit) voxel of a point is the **lexicographically
  largest** ``(gh, gk, gl)`` among all its symmetry mates.  It does not depend
  on the order of the operators.  The optional operator index is that of an
  operator producing it (the identity, index 0, for already-canonical points).

Everything is vectorised over observations (chunked, so memory stays small);
only the <= 48 operators are looped over.
"""

from __future__ import annotations

import numpy as np
from cctbx import sgtbx

__all__ = [
    "laue_operators",
    "check_ndiv",
    "map_to_asu",
    "is_in_asu",
    "expand_to_p1",
    "symmetry_mates",
]

_AXES = "hkl"
# Keys are packed as ((g0 + B) * W + (g1 + B)) * W + (g2 + B) with W = 2B + 1;
# W**3 must fit in int64.
_MAX_W = 2_097_151  # floor((2**63 - 1) ** (1/3))
_CHUNK = 65536


# ---------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------


def _as_space_group(space_group):
    """Accept a symbol string, sgtbx.space_group(_info) or crystal.symmetry."""

    if isinstance(space_group, sgtbx.space_group):
        return space_group
    if isinstance(space_group, sgtbx.space_group_info):
        return space_group.group()
    if isinstance(space_group, str):
        return sgtbx.space_group_info(symbol=space_group).group()
    if hasattr(space_group, "space_group"):  # crystal.symmetry, dxtbx crystal
        return _as_space_group(space_group.space_group())
    raise TypeError(f"cannot interpret {space_group!r} as a space group")


def laue_operators(space_group=None, mode="laue"):
    """Integer operators acting on hkl (row vectors: ``hkl' = hkl @ op``).

    Parameters
    ----------
    space_group : str, cctbx.sgtbx.space_group, space_group_info or
        crystal.symmetry (anything with ``space_group()``).  Ignored (may be
        None) for ``mode="friedel"`` and ``mode="none"``.
    mode : "laue"   -- rotation parts of the Laue group of ``space_group``
                       (point group + inversion; centring and screw/glide
                       translations do not matter for intensities);
           "friedel" -- {identity, -identity};
           "none"    -- {identity}.

    Returns
    -------
    ops : (n_ops, 3, 3) int64 array, ``ops[0]`` the identity, no duplicates.
    """
    eye = np.eye(3, dtype=np.int64)
    if mode == "none":
        return eye[None].copy()
    if mode == "friedel":
        return np.stack([eye, -eye])
    if mode != "laue":
        raise ValueError(f"mode must be 'laue', 'friedel' or 'none', not {mode!r}")
    if space_group is None:
        raise ValueError("mode='laue' needs a space group")
    laue = _as_space_group(space_group).build_derived_laue_group()
    ops = [eye]
    seen = {tuple(eye.ravel())}
    for op in laue.all_ops():
        r = op.r()
        if r.den() != 1:  # never happens for rotation parts
            raise ValueError(f"non-integer rotation part in {op}")
        key = tuple(int(x) for x in r.num())
        if key in seen:
            continue
        seen.add(key)
        ops.append(np.array(key, dtype=np.int64).reshape(3, 3))
    return np.stack(ops)


def _as_ops(operators):
    ops = np.asarray(operators)
    if ops.ndim == 2:
        ops = ops[None]
    if ops.ndim != 3 or ops.shape[1:] != (3, 3):
        raise ValueError(f"operators must have shape (n_ops, 3, 3), got {ops.shape}")
    if not np.issubdtype(ops.dtype, np.integer):
        opsi = np.rint(ops).astype(np.int64)
        if not np.array_equal(opsi, ops):
            raise ValueError("operators must be integer matrices")
        ops = opsi
    return ops.astype(np.int64)


def check_ndiv(ndiv, operators):
    """Check that every operator maps the voxel grid onto itself.

    ``g' = g @ op`` is exact only if ``op[i, j] != 0`` (i != j) implies
    ``ndiv[i] == ndiv[j]``.  Raises ValueError naming the requirement, e.g.
    "ndiv_h must equal ndiv_k for this Laue group".  Returns ``ndiv`` as a
    tuple of 3 positive ints.
    """
    nd = tuple(int(x) for x in np.broadcast_to(np.asarray(ndiv), (3,)))
    if any(x <= 0 for x in nd) or not np.allclose(
        np.broadcast_to(np.asarray(ndiv, dtype=float), (3,)), nd
    ):
        raise ValueError(f"ndiv must be three positive integers, got {ndiv!r}")
    ops = _as_ops(operators)
    coupled = np.any(ops != 0, axis=0)
    bad = []
    for i in range(3):
        for j in range(i + 1, 3):
            if (coupled[i, j] or coupled[j, i]) and nd[i] != nd[j]:
                bad.append(f"ndiv_{_AXES[i]} must equal ndiv_{_AXES[j]}")
    if bad:
        raise ValueError(
            " and ".join(bad)
            + f" for this Laue group (its operators mix those axes); got ndiv={nd}"
        )
    return nd


# ---------------------------------------------------------------------------
# mapping
# ---------------------------------------------------------------------------


def _as_grid(grid_indices):
    g = np.asarray(grid_indices)
    if g.ndim == 1 and g.shape[0] == 3:
        g = g[None]
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"grid_indices must have shape (n, 3), got {g.shape}")
    if not np.issubdtype(g.dtype, np.integer):
        raise TypeError(f"grid_indices must be integers, got dtype {g.dtype}")
    return g


def _pair_ops(ops):
    """Split ops into 'half' ops such that ops == half U -half (if possible).

    Returns (half_indices, minus_indices) with ops[minus[i]] == -ops[half[i]],
    or None if the set is not closed under negation.
    """
    keys = {tuple(op.ravel()): i for i, op in enumerate(ops)}
    half, minus, used = [], [], set()
    for i, op in enumerate(ops):
        if i in used:
            continue
        j = keys.get(tuple((-op).ravel()))
        if j is None or j == i:
            return None
        half.append(i)
        minus.append(j)
        used.update((i, j))
    return np.array(half), np.array(minus)


def _map_chunk_keys(g, ops, W, B, want_op, pairs):
    """Packed-key path: exact while all |g'| <= B and W**3 fits in int64."""
    w = np.array([W * W, W, 1], dtype=np.int64)
    a = ops @ w  # (n_ops, 3): key_op(g) = g @ a[op]   (offset dropped)
    g0 = np.ascontiguousarray(g[:, 0], dtype=np.int64)
    g1 = np.ascontiguousarray(g[:, 1], dtype=np.int64)
    g2 = np.ascontiguousarray(g[:, 2], dtype=np.int64)
    n = len(g0)
    best = np.empty(n, dtype=np.int64)
    best_op = np.zeros(n, dtype=np.int16) if want_op else None
    k = np.empty(n, dtype=np.int64)
    tmp = np.empty(n, dtype=np.int64)
    better = np.empty(n, dtype=bool)

    def key(o, out):
        np.multiply(g0, a[o, 0], out=out)
        np.multiply(g1, a[o, 1], out=tmp)
        out += tmp
        np.multiply(g2, a[o, 2], out=tmp)
        out += tmp
        return out

    if pairs is not None:
        # centrosymmetric set: max(key(M), key(-M)) = |key(M)|; halves the work
        half, minus = pairs
        neg = np.empty(n, dtype=bool) if want_op else None
        for i, (o, mo) in enumerate(zip(half, minus)):
            key(o, k)
            if want_op:
                np.less(k, 0, out=neg)
            np.abs(k, out=k)
            if i == 0:
                best[:] = k
                if want_op:
                    best_op[:] = o
                    best_op[neg] = mo
                continue
            if want_op:
                # strict: earlier operators win ties
                np.greater(k, best, out=better)
                np.copyto(best_op, o, where=better)
                better &= neg
                np.copyto(best_op, mo, where=better)
            np.maximum(best, k, out=best)
    else:
        key(0, best)
        if want_op:
            best_op[:] = 0
        for o in range(1, len(ops)):
            key(o, k)
            if want_op:
                np.greater(k, best, out=better)
                np.copyto(best_op, o, where=better)
            np.maximum(best, k, out=best)

    return _decode(best, W, B), best_op


def _divmod_const(k, W):
    """divmod of a non-negative int64 array by a constant, fast when exact."""
    if k.size and int(k.max()) < 2**50:
        # float quotient is within 1 of the truth; fix up in integers
        q = np.floor(k * (1.0 / W)).astype(np.int64)
        r = k - q * W
        low = r < 0
        q[low] -= 1
        r[low] += W
        high = r >= W
        q[high] += 1
        r[high] -= W
        return q, r
    return np.divmod(k, W)


def _decode(keys, W, B):
    """Packed keys (without offset) -> (n, 3) int64 grid indices."""
    k = keys + B * (W * W + W + 1)
    out = np.empty((len(k), 3), dtype=np.int64)
    q, out[:, 2] = _divmod_const(k, W)
    out[:, 0], out[:, 1] = _divmod_const(q, W)
    out -= B
    return out


def _bound(g, ops):
    """B >= |g @ op| componentwise for all points and operators."""
    if len(g) == 0:
        return 0
    ext = np.array([g.min(axis=0), g.max(axis=0)], dtype=np.int64)
    maxabs = np.abs(ext).max(axis=0)
    # output column j of g @ op: |sum_i g_i M_ij| <= sum_i |M_ij| max|g_i|
    return int((np.abs(ops) * maxabs[None, :, None]).sum(axis=1).max())


def _map_chunk_lex(g, ops, want_op):
    """Fallback for huge indices: explicit lexicographic comparison."""
    g = g.astype(np.int64)
    best = g @ ops[0]
    best_op = np.zeros(len(g), dtype=np.int16)
    for o in range(1, len(ops)):
        c = g @ ops[o]
        gt = (c[:, 0] > best[:, 0]) | (
            (c[:, 0] == best[:, 0])
            & ((c[:, 1] > best[:, 1]) | ((c[:, 1] == best[:, 1]) & (c[:, 2] > best[:, 2])))
        )
        best[gt] = c[gt]
        best_op[gt] = o
    return best, (best_op if want_op else None)


def map_to_asu(grid_indices, ndiv, operators, return_op=False, chunk_size=_CHUNK):
    """Map voxel grid indices to their canonical (asymmetric-unit) voxel.

    Parameters
    ----------
    grid_indices : (n, 3) integer array ``(gh, gk, gl)``.
    ndiv : (ndiv_h, ndiv_k, ndiv_l) grid subdivisions per unit of hkl (only
        used to check compatibility with the operators, see check_ndiv).
    operators : (n_ops, 3, 3) integer array from :func:`laue_operators`.
    return_op : also return, per point, the index ``i`` of an operator with
        ``canonical = g @ operators[i]``.  Deterministic; it is 0 (identity)
        for points that are already canonical.

    Returns
    -------
    canonical : (n, 3) array, lexicographically largest ``g @ op`` over all
        ops; dtype of the input if it can hold the result, else int64.
    op_index : (n,) int16 array (only if ``return_op``).
    """
    g = _as_grid(grid_indices)
    ops = _as_ops(operators)
    check_ndiv(ndiv, ops)
    n = len(g)
    B = _bound(g, ops)
    W = 2 * B + 1
    out_dtype = g.dtype
    if np.issubdtype(out_dtype, np.unsignedinteger) or B > np.iinfo(out_dtype).max:
        out_dtype = np.int64
    canonical = np.empty((n, 3), dtype=out_dtype)
    op_index = np.empty(n, dtype=np.int16) if return_op else None
    use_keys = W <= _MAX_W
    pairs = _pair_ops(ops) if use_keys else None
    for s in range(0, n, chunk_size):
        gc = g[s : s + chunk_size]
        if use_keys:
            c, o = _map_chunk_keys(gc, ops, W, B, return_op, pairs)
        else:
            c, o = _map_chunk_lex(gc, ops, return_op)
        canonical[s : s + len(gc)] = c
        if return_op:
            op_index[s : s + len(gc)] = o
    if return_op:
        return canonical, op_index
    return canonical


def is_in_asu(grid_indices, ndiv, operators, chunk_size=_CHUNK):
    """Boolean (n,) mask: True where the voxel is its own canonical voxel."""
    g = _as_grid(grid_indices)
    return np.all(map_to_asu(g, ndiv, operators, chunk_size=chunk_size) == g, axis=1)


def symmetry_mates(grid_indices, operators):
    """All images ``g @ op``: (n_ops, n, 3) int64 array (duplicates kept)."""
    g = _as_grid(grid_indices).astype(np.int64)
    ops = _as_ops(operators)
    return np.einsum("ni,oij->onj", g, ops)


def orbit_sizes(grid_indices, operators):
    """How many distinct grid points each voxel stands for under the
    operators (its symmetry multiplicity: 1 at the origin, the group order in
    a general position)."""
    g = _as_grid(grid_indices)
    ops = _as_ops(operators).astype(np.int64)
    if len(g) == 0:
        return np.zeros(0, np.int64)
    # mate (x, y, z) -> x span^2 + y span + z: one-to-one while |x|, |y|, |z|
    # < span / 2, and linear in g, so all keys are one (n, 3) @ (3, n_ops)
    # product, exact in float64 (BLAS) below 2^53
    span = 2 * _bound(g, ops) + 3
    weights = ops @ np.array([span * span, span, 1], np.int64)  # (n_ops, 3)
    if float(np.abs(weights).sum(axis=1).max()) * float(np.abs(g).max()) < 2.0**53:
        keys = g.astype(np.float64) @ weights.T.astype(np.float64)
    else:
        keys = g.astype(np.int64) @ weights.T
    keys.sort(axis=1)
    return 1 + np.count_nonzero(np.diff(keys, axis=1), axis=1)


def expand_to_p1(grid_indices, values=None, operators=None, ndiv=None, chunk_size=_CHUNK):
    """Expand a (merged, ASU) map to all its unique symmetry mates.

    Parameters
    ----------
    grid_indices : (n, 3) integer array.
    values : None or array whose first axis has length n (extra axes, e.g.
        [value, sigma] columns, are carried along).
    operators : (n_ops, 3, 3) integer array.
    ndiv : optional; if given the operators are checked against it.

    Returns
    -------
    (indices, values) -- indices (m, 3) int64, unique rows, each with the
    value of the input point it came from (values is None if none given).
    Order: if the input is a reduced ASU map (distinct canonical voxels, the
    fast path) the output is grouped by input point, in input order, each
    point's mates ascending lexicographically; otherwise all rows are sorted
    lexicographically and, where input points are mates of each other, the
    one appearing first in the input wins for their shared images.
    """
    ops = _as_ops(operators)
    if ndiv is not None:
        check_ndiv(ndiv, ops)
    g = _as_grid(grid_indices)
    n = len(g)
    if values is not None:
        values = np.asarray(values)
        if values.shape[0] != n:
            raise ValueError("values must have the same length as grid_indices")
    B = _bound(g, ops)
    W = 2 * B + 1
    if W > _MAX_W:
        flat = symmetry_mates(g, ops).transpose(1, 0, 2).reshape(-1, 3)
        uniq, first = np.unique(flat, axis=0, return_index=True)
        return uniq, (None if values is None else values[first // len(ops)])

    w = np.array([W * W, W, 1], dtype=np.int64)
    a = ops @ w  # (n_ops, 3): packed key of g @ op is g @ a[op]
    g64 = g.astype(np.int64)
    own = g64 @ w
    is_canonical = np.ones(n, dtype=bool)
    key_chunks, src_chunks = [], []
    for s in range(0, n, chunk_size):
        gc = g64[s : s + chunk_size]
        keys = np.empty((len(gc), len(ops)), dtype=np.int64)
        for o in range(len(ops)):
            keys[:, o] = gc[:, 0] * a[o, 0] + gc[:, 1] * a[o, 1] + gc[:, 2] * a[o, 2]
        keys.sort(axis=1)
        is_canonical[s : s + len(gc)] = keys[:, -1] == own[s : s + len(gc)]
        keep = np.ones(keys.shape, dtype=bool)
        np.not_equal(keys[:, 1:], keys[:, :-1], out=keep[:, 1:])
        rows = np.repeat(np.arange(len(gc)), np.count_nonzero(keep, axis=1))
        key_chunks.append(keys[keep])
        src_chunks.append(rows + s)
    if is_canonical.all() and len(np.unique(own)) == n:
        # distinct ASU points have disjoint orbits: per-point dedup suffices
        ukeys = np.concatenate(key_chunks) if key_chunks else np.zeros(0, np.int64)
        src = np.concatenate(src_chunks) if src_chunks else np.zeros(0, np.intp)
    else:
        del key_chunks, src_chunks
        keys = (g64 @ a.T).ravel()  # point-major: the earliest input point wins
        ukeys, first = np.unique(keys, return_index=True)
        src = first // len(ops)
    uniq = _decode(ukeys, W, B)
    return uniq, (None if values is None else values[src])
