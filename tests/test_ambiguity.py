"""Indexing ambiguity (issue 15): reindexing operators from cctbx and the
per-still choice on simulated stills of P6_3 indexed in random settings."""

from __future__ import annotations

import numpy as np
import pytest

from dials_diffuse import ambiguity, symmetry


def _matrix(symbol):
    """The row-vector operator hkl' = hkl @ M of an 'k,h,-l' string, parsed
    with cctbx (independently of ambiguity.as_hkl)."""
    from cctbx import sgtbx

    op = sgtbx.change_of_basis_op(symbol)
    # change_of_basis_op.apply maps Miller indices: rows of M are the images of
    # the unit vectors h, k, l
    return np.array([op.apply((1, 0, 0)), op.apply((0, 1, 0)), op.apply((0, 0, 1))], np.int64)


def _same_coset(a, b, laue):
    keys = {tuple((np.asarray(a) @ g).ravel()) for g in laue}
    return tuple(np.asarray(b).ravel()) in keys


HEX = (50, 50, 80, 90, 90, 120)
TET = (50, 50, 80, 90, 90, 90)
CUB = (80, 80, 80, 90, 90, 90)

# textbook alternative indexing operators (e.g. the CCP4 / Brehm & Diederichs tables)
TEXTBOOK = [
    (HEX, "P 63", ["h,k,l", "k,h,-l"]),
    (HEX, "P 6", ["h,k,l", "k,h,-l"]),
    (HEX, "P 3", ["h,k,l", "-h,-k,l", "k,h,-l", "-k,-h,-l"]),
    (HEX, "P 31 2 1", ["h,k,l", "-h,-k,l"]),
    (HEX, "P 31 1 2", ["h,k,l", "-h,-k,l"]),
    (HEX, "R 3:H", ["h,k,l", "k,h,-l"]),
    (TET, "P 4", ["h,k,l", "k,h,-l"]),
    (TET, "I 41", ["h,k,l", "k,h,-l"]),
    (CUB, "I 21 3", ["h,k,l", "k,h,-l"]),
    (CUB, "P 21 3", ["h,k,l", "k,h,-l"]),
    ((50, 60, 50.1, 90, 100, 90), "P 1 21 1", ["h,k,l", "l,-k,h"]),
    # no ambiguity: the Laue group is the lattice group
    (HEX, "P 63 2 2", ["h,k,l"]),
    (TET, "P 41 21 2", ["h,k,l"]),
    ((30, 40, 50, 90, 90, 90), "P 21 21 21", ["h,k,l"]),
    (CUB, "I 21 3 ", ["h,k,l", "k,h,-l"]),
]


@pytest.mark.parametrize("cell,group,expected", TEXTBOOK)
def test_operators_textbook(cell, group, expected):
    table = ambiguity.reindexing_operators(cell, group, table=True)
    laue = symmetry.laue_operators(group)
    assert table.n == len(expected)
    assert np.array_equal(table.ops[0], np.eye(3, dtype=np.int64))
    # one representative per expected coset, in some order
    found = [any(_same_coset(_matrix(e), op, laue) for op in table.ops) for e in expected]
    assert all(found), (group, table.symbols())
    # the lattice symmetry: each operator keeps the metric (|B h| unchanged)
    from cctbx import uctbx

    g = np.array(uctbx.unit_cell(cell).reciprocal_metrical_matrix())
    G = np.array([[g[0], g[3], g[4]], [g[3], g[1], g[5]], [g[4], g[5], g[2]]])
    for op in table.ops:
        assert np.allclose(op @ G @ op.T, G, rtol=1e-2, atol=1e-12)


def test_operator_symbols_and_group_table():
    table = ambiguity.reindexing_operators(HEX, "P 3", table=True)
    assert table.symbols()[1] == "k,h,-l"
    for op, sym in zip(table.ops, table.symbols()):
        assert np.array_equal(_matrix(sym), op)
    # the coset table is a group table (the quotient L/G, here Z2 x Z2)
    n = table.n
    assert sorted(table.mul[0]) == list(range(n))
    for a in range(n):
        assert table.mul[a, table.inv[a]] == 0
        for b in range(n):
            for c in range(n):
                assert table.mul[table.mul[a, b], c] == table.mul[a, table.mul[b, c]]


def test_non_normal_subgroup_refused():
    # a rhombohedral cell with 90 degree angles is cubic: -3 is not normal in m-3m
    with pytest.raises(ValueError, match="not normal"):
        ambiguity.reindexing_operators((60, 60, 60, 90, 90, 90), "R 3:R")


def test_reindexing_commutes_with_asu_mapping():
    """ASU(g @ O) = ASU(ASU(g) @ O): the merge reindexes ASU voxels."""
    rng = np.random.default_rng(0)
    ndiv = np.array([4, 4, 3])
    g = rng.integers(-40, 40, size=(5000, 3))
    for cell, group in ((HEX, "P 3"), (HEX, "P 63"), (CUB, "I 21 3"), (TET, "P 4")):
        table = ambiguity.reindexing_operators(cell, group, table=True)
        nd = ndiv if group != "I 21 3" else np.array([4, 4, 4])
        for op in table.ops:
            direct = symmetry.map_to_asu(g @ op, nd, table.laue)
            via = symmetry.map_to_asu(symmetry.map_to_asu(g, nd, table.laue) @ op, nd, table.laue)
            assert np.array_equal(direct, via)
