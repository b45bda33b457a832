"""Laue symmetry on the fractional-hkl voxel grid, checked against cctbx."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cctbx import crystal, miller, sgtbx
from cctbx.array_family import flex

from dials_diffuse.symmetry import (
    check_ndiv,
    expand_to_p1,
    is_in_asu,
    laue_operators,
    map_to_asu,
    symmetry_mates,
)

# (space group, Laue class, order of the Laue group)
GROUPS = [
    ("P1", "-1", 2),
    ("P-1", "-1", 2),
    ("P 1 2/m 1", "2/m", 4),  # unique axis b
    ("C2", "2/m", 4),  # centred, unique axis b
    ("P 1 1 21", "2/m", 4),  # unique axis c
    ("P212121", "mmm", 8),
    ("Fmmm", "mmm", 8),
    ("I4", "4/m", 8),
    ("P4/mmm", "4/mmm", 16),
    ("P43212", "4/mmm", 16),
    ("P3", "-3", 6),
    ("R3:H", "-3", 6),
    ("R3:R", "-3", 6),
    ("P-3m1", "-3m", 12),
    ("P-31m", "-3m", 12),
    ("P3121", "-3m", 12),
    ("R-3m:H", "-3m", 12),
    ("R32:R", "-3m", 12),
    ("P63", "6/m", 12),
    ("P6/mmm", "6/mmm", 24),
    ("P6122", "6/mmm", 24),
    ("F23", "m-3", 24),
    ("Pa-3", "m-3", 24),
    ("I432", "m-3m", 48),
    ("Fm-3m", "m-3m", 48),
]
SYMBOLS = [g[0] for g in GROUPS]
_OPS = {}


def ops_for(symbol):
    if symbol not in _OPS:
        _OPS[symbol] = laue_operators(symbol)
    return _OPS[symbol]


def compatible_ndiv(ops, base=(2, 3, 5)):
    """Smallest change of `base` that makes coupled axes share ndiv."""
    nd = list(base)
    coupled = np.any(ops != 0, axis=0)
    for _ in range(3):
        for i in range(3):
            for j in range(3):
                if i != j and (coupled[i, j] or coupled[j, i]):
                    nd[i] = nd[j] = max(nd[i], nd[j])
    return tuple(nd)


def random_grid(rng, n, lim=40):
    return rng.integers(-lim, lim + 1, size=(n, 3))


def cctbx_asu(symbol, hkl):
    """cctbx's map_to_asu (Laue equivalence: anomalous_flag=False)."""
    cs = crystal.symmetry(space_group_symbol=symbol)
    ms = miller.set(
        cs, flex.miller_index([tuple(int(x) for x in h) for h in hkl]), anomalous_flag=False
    ).map_to_asu()
    return np.array(list(ms.indices()), dtype=np.int64)


def same_partition(a, b):
    """Rows of a and rows of b induce the same equivalence classes."""
    _, ia = np.unique(a, axis=0, return_inverse=True)
    _, ib = np.unique(b, axis=0, return_inverse=True)
    ia, ib = ia.ravel(), ib.ravel()
    n_pairs = len(np.unique(ia * (ib.max() + 1) + ib))
    return n_pairs == ia.max() + 1 == ib.max() + 1


# ---------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("symbol,laue,order", GROUPS)
def test_operators_form_laue_group(symbol, laue, order):
    ops = ops_for(symbol)
    assert ops.shape == (order, 3, 3) and ops.dtype == np.int64
    assert np.array_equal(ops[0], np.eye(3))
    keys = {tuple(o.ravel()) for o in ops}
    assert len(keys) == order
    # closed under products and contains the inversion
    for a in ops:
        assert tuple((-a).ravel()) in keys
        for b in ops:
            assert tuple((a @ b).ravel()) in keys
    sg = sgtbx.space_group_info(symbol).group()
    assert sg.laue_group_type() == laue
    assert sg.build_derived_laue_group().order_p() == order


@pytest.mark.parametrize("symbol", ["P-31m", "P-3m1", "R3:H", "P6", "R3:R", "P 1 2/m 1", "C2"])
def test_row_vector_convention_matches_sym_equiv_indices(symbol):
    """h' = h @ op reproduces cctbx's sym_equiv_indices (i.e. h R, not R h)."""
    ops = ops_for(symbol)
    sg = sgtbx.space_group_info(symbol).group()
    rng = np.random.default_rng(0)
    for h in random_grid(rng, 20, 9):
        ours = {tuple(int(x) for x in h @ op) for op in ops}
        se = miller.sym_equiv_indices(sg, tuple(int(x) for x in h))
        theirs = set()
        for i in range(se.multiplicity(False)):
            hh = se(i).h()
            theirs.add(hh)
            theirs.add(tuple(-x for x in hh))
        assert ours == theirs


def test_transpose_would_be_wrong_for_trigonal():
    """Guard the convention: the transposed operators give a different group for -31m."""
    ops = ops_for("P-31m")
    keys = {tuple(o.ravel()) for o in ops}
    assert any(tuple(o.T.ravel()) not in keys for o in ops)


def test_friedel_and_none_operators():
    f = laue_operators(None, mode="friedel")
    assert np.array_equal(f, np.array([np.eye(3), -np.eye(3)], dtype=np.int64))
    assert np.array_equal(laue_operators("P432", mode="none"), np.eye(3, dtype=int)[None])
    with pytest.raises(ValueError):
        laue_operators("P1", mode="bogus")
    with pytest.raises(ValueError):
        laue_operators(None, mode="laue")


def test_space_group_input_types():
    ref = ops_for("P4/mmm")
    info = sgtbx.space_group_info("P4/mmm")
    for sg in (info, info.group(), crystal.symmetry(space_group_symbol="P4/mmm")):
        assert np.array_equal(laue_operators(sg), ref)


# ---------------------------------------------------------------------------
# map_to_asu, per Laue class
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_symmetric_map_merges_and_expands_losslessly(symbol):
    """(a) A map symmetrised over the group is constant on canonical voxels and
    expand_to_p1 of the merged ASU map restores it exactly."""
    ops = ops_for(symbol)
    nd = compatible_ndiv(ops)
    r = 6
    ax = np.arange(-r, r + 1)
    box = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    box, _ = expand_to_p1(box, None, ops)  # close the box under the group

    def base(g):  # arbitrary non-symmetric integer function
        g = g.astype(np.int64)
        return (g[:, 0] * 7 + g[:, 1] * 131 + g[:, 2] * 1009) ** 2 + g[:, 0] * g[:, 1] * g[:, 2]

    f = sum(base(box @ op) for op in ops)
    can = map_to_asu(box, nd, ops)
    # constant on classes
    _, inv = np.unique(can, axis=0, return_inverse=True)
    inv = inv.ravel()
    fmin = np.full(inv.max() + 1, np.iinfo(np.int64).max)
    fmax = np.full(inv.max() + 1, np.iinfo(np.int64).min)
    np.minimum.at(fmin, inv, f)
    np.maximum.at(fmax, inv, f)
    assert np.array_equal(fmin, fmax)
    # merge to ASU (in-ASU voxels) and expand back
    asu = is_in_asu(box, nd, ops)
    assert np.array_equal(np.unique(can, axis=0), np.unique(box[asu], axis=0))
    full, vals = expand_to_p1(box[asu], f[asu], ops, ndiv=nd)
    lookup = {tuple(g): v for g, v in zip(full.tolist(), vals.tolist())}
    assert all(lookup[tuple(g)] == v for g, v in zip(box.tolist(), f.tolist()))


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_mates_idempotence_and_orbit_size(symbol):
    """(b) mates agree, (c) idempotent, (d) orbit of a general point = group order."""
    ops = ops_for(symbol)
    nd = compatible_ndiv(ops)
    rng = np.random.default_rng(1)
    g = random_grid(rng, 3000)
    can, op_idx = map_to_asu(g, nd, ops, return_op=True)
    # the reported operator produces the canonical voxel
    assert np.array_equal(np.einsum("ni,nij->nj", g, ops[op_idx]), can)
    # (b)
    for m in symmetry_mates(g, ops):
        assert np.array_equal(map_to_asu(m, nd, ops), can)
    # canonical = lexicographic maximum of the mates
    mates = symmetry_mates(g, ops).transpose(1, 0, 2)  # (n, ops, 3)
    for i in range(0, len(g), 97):
        assert tuple(can[i]) == max(map(tuple, mates[i].tolist()))
    # (c)
    can2, op2 = map_to_asu(can, nd, ops, return_op=True)
    assert np.array_equal(can2, can)
    assert np.all(op2 == 0)
    assert np.all(is_in_asu(can, nd, ops))
    # (d) a general point has |G| distinct mates, all in one canonical voxel
    general = np.array([[17, 5, 3]])
    mates = symmetry_mates(general, ops)[:, 0]
    assert len(np.unique(mates, axis=0)) == len(ops)
    assert len(np.unique(map_to_asu(mates, nd, ops), axis=0)) == 1
    full, _ = expand_to_p1(general, None, ops)
    assert len(full) == len(ops)
    # in a set closed under the group: #in-ASU == #orbits ~= size / |G|
    closed, _ = expand_to_p1(random_grid(rng, 20000, 1000), None, ops)
    n_asu = is_in_asu(closed, nd, ops).sum()
    assert n_asu == len(np.unique(map_to_asu(closed, nd, ops), axis=0))
    assert abs(n_asu * len(ops) / len(closed) - 1) < 0.01


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_agrees_with_cctbx_map_to_asu(symbol):
    """(e) integer hkl and (scaled) fractional hkl: same voxel iff cctbx-equivalent."""
    ops = ops_for(symbol)
    nd = compatible_ndiv(ops)
    # integer hkl: voxel centres on lattice points
    r = 4
    ax = np.arange(-r, r + 1)
    hkl = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    ours = map_to_asu(hkl * np.array(nd), nd, ops)
    theirs = cctbx_asu(symbol, hkl)
    assert same_partition(ours, theirs)
    # fractional points: scale to a common denominator -> integer Miller indices
    rng = np.random.default_rng(2)
    g = random_grid(rng, 2000, 15)
    g = np.concatenate([g, symmetry_mates(g[:50], ops).reshape(-1, 3)])
    lcm = math.lcm(*nd)
    ours = map_to_asu(g, nd, ops)
    theirs = cctbx_asu(symbol, g * (lcm // np.array(nd)))
    assert same_partition(ours, theirs)


# ---------------------------------------------------------------------------
# friedel / none / ndiv / misc
# ---------------------------------------------------------------------------


def test_friedel_mode():
    ops = laue_operators(None, mode="friedel")
    rng = np.random.default_rng(3)
    g = random_grid(rng, 5000, 5)
    can = map_to_asu(g, (2, 3, 4), ops)
    assert np.array_equal(can, map_to_asu(-g, (2, 3, 4), ops))
    assert np.all(np.all(can == g, axis=1) | np.all(can == -g, axis=1))
    # only h and -h together: classes match the {g, -g} partition
    key = np.maximum(g[:, 0] * 121 + g[:, 1] * 11 + g[:, 2], -(g[:, 0] * 121 + g[:, 1] * 11 + g[:, 2]))
    assert same_partition(can, key[:, None])
    assert same_partition(can, cctbx_asu("P1", g))  # P1 with anomalous_flag=False is Friedel


def test_none_mode_is_identity():
    ops = laue_operators("Fm-3m", mode="none")
    g = random_grid(np.random.default_rng(4), 1000)
    can, op = map_to_asu(g, (2, 3, 5), ops, return_op=True)
    assert np.array_equal(can, g) and np.all(op == 0)
    assert np.all(is_in_asu(g, (2, 3, 5), ops))


@pytest.mark.parametrize(
    "symbol,ndiv,message",
    [
        ("P4/mmm", (2, 3, 3), "ndiv_h must equal ndiv_k"),
        ("I4", (4, 2, 2), "ndiv_h must equal ndiv_k"),
        ("P6/mmm", (3, 2, 2), "ndiv_h must equal ndiv_k"),
        ("P-3m1", (3, 2, 2), "ndiv_h must equal ndiv_k"),
        ("R3:H", (3, 2, 2), "ndiv_h must equal ndiv_k"),
        ("R3:R", (2, 2, 3), "ndiv_h must equal ndiv_l"),
        ("Fm-3m", (2, 2, 3), "ndiv_h must equal ndiv_l"),
        ("P23", (2, 3, 3), "ndiv_h must equal ndiv_k"),
    ],
)
def test_incompatible_ndiv_raises(symbol, ndiv, message):
    ops = ops_for(symbol)
    with pytest.raises(ValueError, match=message):
        map_to_asu(np.zeros((1, 3), dtype=int), ndiv, ops)
    with pytest.raises(ValueError, match=message):
        check_ndiv(ndiv, ops)


@pytest.mark.parametrize("symbol", ["P1", "P 1 2/m 1", "P 1 1 2/m", "Pmmm"])
def test_any_ndiv_fine_without_axis_mixing(symbol):
    assert check_ndiv((2, 3, 5), ops_for(symbol)) == (2, 3, 5)
    with pytest.raises(ValueError):
        check_ndiv((2, 0, 5), ops_for(symbol))


@pytest.mark.parametrize("symbol", ["P6/mmm", "Fm-3m", "P-1"])
def test_huge_indices_fallback_path(symbol):
    """Beyond the packed-int64 key range the lexicographic fallback is used;
    the canonical choice is invariant under positive scaling."""
    ops = ops_for(symbol)
    nd = compatible_ndiv(ops)
    g = random_grid(np.random.default_rng(5), 2000)
    big = g * 10**7
    can_big, op = map_to_asu(big, nd, ops, return_op=True)
    assert np.array_equal(can_big, map_to_asu(g, nd, ops) * 10**7)
    assert np.array_equal(np.einsum("ni,nij->nj", big, ops[op]), can_big)


def test_dtypes_chunking_and_empty():
    ops = ops_for("P6/mmm")
    g = random_grid(np.random.default_rng(6), 10001)
    ref = map_to_asu(g, (2, 2, 3), ops)
    assert ref.dtype == g.dtype
    for dt in (np.int32, np.int16):
        out = map_to_asu(g.astype(dt), (2, 2, 3), ops, chunk_size=777)
        assert out.dtype == dt and np.array_equal(out, ref)
    assert np.array_equal(map_to_asu(g.astype(np.uint32) + 0, (2, 2, 3), ops[:1]), g.astype(np.uint32))
    assert map_to_asu(np.zeros((0, 3), dtype=int), (2, 2, 3), ops).shape == (0, 3)
    assert map_to_asu(np.zeros((1, 3), dtype=int), (2, 2, 3), ops, return_op=True)[1][0] == 0
    with pytest.raises(TypeError):
        map_to_asu(np.zeros((2, 3)), (2, 2, 3), ops)


def test_expand_to_p1_values_and_non_asu_input():
    ops = ops_for("P 1 2/m 1")
    g = np.array([[1, 2, 3], [0, 0, 0], [1, 0, 1], [-1, 2, -3]])  # last is a mate of the first
    vals = np.array([[1.0, 0.1], [2.0, 0.2], [3.0, 0.3], [4.0, 0.4]])
    full, v = expand_to_p1(g, vals, ops, ndiv=(2, 3, 4))
    assert len(full) == 4 + 1 + 2  # general: 4, origin: 1, (1,0,1) on the mirror: 2
    d = {tuple(a): tuple(b) for a, b in zip(full.tolist(), v.tolist())}
    assert d[(1, 2, 3)] == d[(-1, 2, -3)] == d[(1, -2, 3)] == (1.0, 0.1)  # first wins
    assert d[(0, 0, 0)] == (2.0, 0.2)
    assert d[(-1, 0, -1)] == (3.0, 0.3)
    # non-ASU input: sorted lexicographically
    assert [tuple(r) for r in full.tolist()] == sorted(tuple(r) for r in full.tolist())
    # ASU input (fast path): grouped by input point, same set as the general path
    asu = np.unique(map_to_asu(g, (2, 3, 4), ops), axis=0)[::-1]
    full2, src = expand_to_p1(asu, np.arange(len(asu)), ops, chunk_size=2)
    assert np.all(np.diff(src) >= 0)
    assert np.array_equal(np.unique(full2, axis=0), full)
    assert np.array_equal(map_to_asu(full2, (2, 3, 4), ops), asu[src])


@pytest.mark.parametrize("symbol", ["P-1", "P6/mmm", "Fm-3m", "R3:R"])
def test_expand_to_p1_fast_path_matches_global(symbol):
    ops = ops_for(symbol)
    nd = compatible_ndiv(ops)
    g = random_grid(np.random.default_rng(7), 3000, 8)
    asu = np.unique(map_to_asu(g, nd, ops), axis=0)
    vals = np.arange(len(asu)) * 1.5
    fast, vf = expand_to_p1(asu, vals, ops, chunk_size=100)
    # duplicate one input point -> forces the global (sorted) path
    slow, vs = expand_to_p1(np.concatenate([asu, asu[:1]]), np.append(vals, -1.0), ops)
    order = np.lexsort(fast.T[::-1])
    assert np.array_equal(fast[order], slow) and np.array_equal(vf[order], vs)
    assert np.array_equal(map_to_asu(fast, nd, ops), asu[np.searchsorted(vals, vf / 1.5 * 1.5)])


# ---------------------------------------------------------------------------
# property test
# ---------------------------------------------------------------------------

_coord = st.integers(min_value=-10**5, max_value=10**5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    symbol=st.sampled_from(SYMBOLS),
    pts=st.lists(st.tuples(_coord, _coord, _coord), min_size=1, max_size=20),
    base=st.tuples(*(st.integers(1, 12),) * 3),
)
def test_property_idempotent_and_mates_agree(symbol, pts, base):
    ops = ops_for(symbol)
    nd = compatible_ndiv(ops, base)
    g = np.array(pts, dtype=np.int64)
    can = map_to_asu(g, nd, ops)
    assert np.array_equal(map_to_asu(can, nd, ops), can)
    for m in symmetry_mates(g, ops):
        assert np.array_equal(map_to_asu(m, nd, ops), can)
    # canonical is itself one of the mates
    mates = symmetry_mates(g, ops)
    assert np.all(np.any(np.all(mates == can[None], axis=2), axis=0))


@pytest.mark.parametrize("space_group", ["P1", "P2", "P212121", "P41212", "P6322", "I213", "R3"])
def test_orbit_sizes_are_cctbx_multiplicities(space_group):
    """Symmetry multiplicity of integer grid points (ndiv 1) against cctbx's
    miller.set.multiplicities (Laue group: anomalous_flag=False)."""
    from cctbx import crystal, miller, sgtbx
    from cctbx.array_family import flex as cflex

    from dials_diffuse.symmetry import laue_operators, orbit_sizes

    info = sgtbx.space_group_info(space_group)
    symm = crystal.symmetry(unit_cell=info.any_compatible_unit_cell(volume=1000),
                            space_group_info=info)
    rng = np.random.default_rng(3)
    hkl = rng.integers(-4, 5, size=(400, 3))
    hkl = np.concatenate([hkl, [[0, 0, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1], [2, 1, 0]]])
    indices = cflex.miller_index([tuple(int(v) for v in h) for h in hkl])
    expected = miller.set(symm, indices, anomalous_flag=False).multiplicities().data()
    ops = laue_operators(symm.space_group(), "laue")
    assert list(orbit_sizes(hkl, ops)) == list(expected)
    assert list(orbit_sizes(hkl, laue_operators(None, "none"))) == [1] * len(hkl)
