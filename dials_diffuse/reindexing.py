"""Alternative indexing operators of a crystal (issue 15): the cosets of its
Laue group G in the point group L of its lattice's metric (the holohedry,
from cctbx ``lattice_symmetry``); one representative per coset, identity
first, as integer matrices acting on row vectors of hkl (``hkl' = hkl @ O``,
the convention of ``dials_diffuse.symmetry``; e.g. P6_3: {h,k,l}, {k,h,-l}).
``dials_diffuse.ambiguity`` chooses among them per crystal.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from dials_diffuse import symmetry

_AXES = "hkl"




def _rotation_parts(group):
    """Distinct integer rotation parts (row-vector convention) of a cctbx group."""
    mats, seen = [], set()
    for op in group.all_ops():
        r = op.r()
        if r.den() != 1:
            raise ValueError(f"non-integer rotation part {op} in this setting")
        key = tuple(int(x) for x in r.num())
        if key not in seen:
            seen.add(key)
            mats.append(np.array(key, np.int64).reshape(3, 3))
    return mats


def lattice_point_group(unit_cell, space_group, max_delta=3.0):
    """Rotation parts (n, 3, 3) of the lattice point group (holohedry of the
    metric, with the inversion) in the setting of ``space_group``."""
    from cctbx import crystal
    from cctbx.sgtbx import lattice_symmetry

    sg = symmetry._as_space_group(space_group)
    cs = crystal.symmetry(unit_cell=tuple(unit_cell), space_group=sg)
    cb = cs.change_of_basis_op_to_minimum_cell()
    minimum = cs.unit_cell().change_basis(cb)
    lattice = lattice_symmetry.group(minimum, max_delta=max_delta).change_basis(cb.inverse())
    mats = _rotation_parts(lattice)
    keys = {tuple(m.ravel()) for m in mats}
    for m in list(mats):  # add the inversion (lattice_symmetry gives rotations)
        if tuple((-m).ravel()) not in keys:
            keys.add(tuple((-m).ravel()))
            mats.append(-m)
    return np.stack(mats)


def as_hkl(op):
    """'k,h,-l' for the operator hkl' = hkl @ op."""
    op = np.asarray(op)
    parts = []
    for j in range(3):
        terms = ""
        for i in range(3):
            c = int(op[i, j])
            if c == 0:
                continue
            sign = "-" if c < 0 else ("+" if terms else "")
            mag = "" if abs(c) == 1 else str(abs(c))
            terms += f"{sign}{mag}{_AXES[i]}"
        parts.append(terms or "0")
    return ",".join(parts)


def _key(m):
    return tuple(int(x) for x in np.asarray(m).ravel())


@dataclasses.dataclass
class CosetTable:
    """Coset representatives of G in L and their multiplication table.

    ``ops[k]``: representative of coset k (ops[0] the identity);
    ``mul[a, b]``: coset of ``ops[a] @ ops[b]`` (apply a, then b);
    ``inv[a]``: coset of the inverse of ``ops[a]``."""

    ops: np.ndarray
    mul: np.ndarray
    inv: np.ndarray
    laue: np.ndarray

    @property
    def n(self):
        return len(self.ops)

    def symbols(self):
        return [as_hkl(o) for o in self.ops]


def coset_table(lattice_ops, laue_ops) -> CosetTable:
    """Cosets O G of the Laue group G in the lattice group L, with a
    deterministic representative (a proper rotation, a two-fold if there is
    one, with the fewest non-zero elements, then the largest element sum, then the lexicographically
    largest matrix: P4, P6_3, I2_13 give k,h,-l).
    Raises ValueError if G is not a normal subgroup of L or not in L."""
    laue = np.asarray(laue_ops, np.int64)
    lattice = np.asarray(lattice_ops, np.int64)
    lkeys = {_key(m) for m in lattice}
    gkeys = {_key(m) for m in laue}
    if not gkeys <= lkeys:
        raise ValueError("the Laue group is not a subgroup of the lattice group")
    coset_of, members = {}, []
    for m in lattice:
        if _key(m) in coset_of:
            continue
        k = len(members)
        coset = [m @ g for g in laue]
        members.append(coset)
        for c in coset:
            coset_of[_key(c)] = k
    # the identity's coset first
    eye = np.eye(3, dtype=np.int64)
    first = coset_of[_key(eye)]
    order = [first] + [k for k in range(len(members)) if k != first]

    def preference(m):
        involution = np.array_equal(m @ m, np.eye(3, dtype=np.int64))
        return (np.linalg.det(m) < 0, not involution, int(np.count_nonzero(m)), -int(m.sum()),
                tuple(-x for x in _key(m)))

    ops = []
    for k in order:
        ops.append(eye if k == first else min(members[k], key=preference))
    ops = np.stack(ops).astype(np.int64)
    relabel = {old: new for new, old in enumerate(order)}
    index = {key: relabel[k] for key, k in coset_of.items()}
    # normality: O^-1 G O = G for every representative
    for o in ops:
        oinv = np.rint(np.linalg.inv(o)).astype(np.int64)
        for g in laue:
            if _key(oinv @ g @ o) not in gkeys:
                raise ValueError(
                    f"the Laue group is not normal in the lattice group (operator "
                    f"{as_hkl(o)}): reindexing does not commute with the ASU mapping")
    n = len(ops)
    mul = np.empty((n, n), np.int64)
    inv = np.empty(n, np.int64)
    for a in range(n):
        inv[a] = index[_key(np.rint(np.linalg.inv(ops[a])).astype(np.int64))]
        for b in range(n):
            mul[a, b] = index[_key(ops[a] @ ops[b])]
    return CosetTable(ops=ops, mul=mul, inv=inv, laue=laue)


def reindexing_operators(unit_cell, space_group, max_delta=3.0, table=False):
    """The alternative indexing operators of a crystal form: one
    representative per coset of the Laue group of ``space_group`` in the
    lattice point group of ``unit_cell`` (identity first), as (n, 3, 3)
    integer matrices acting as ``hkl' = hkl @ O``. ``table=True`` returns the
    CosetTable instead."""
    lattice = lattice_point_group(unit_cell, space_group, max_delta)
    laue = symmetry.laue_operators(space_group)
    t = coset_table(lattice, laue)
    return t if table else t.ops


# ---------------------------------------------------------------------------
# reindexing the observations
# ---------------------------------------------------------------------------


