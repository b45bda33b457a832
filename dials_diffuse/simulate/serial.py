"""Serial-crystallography additions to the simulator (issue 15).

* ``crystal.cell_spread``: every crystal of a stills data set gets its own
  cell, the nominal one with each edge scaled by ``1 + N(0, cell_spread)``
  and then symmetrised to the space group (cctbx ``average_unit_cell``), so a
  hexagonal crystal stays hexagonal;
* ``crystal.stills_per_crystal``: consecutive stills share one crystal (its
  cell; orientations stay independent and random);
* ``diffuse.streak.direction``: the streak axis in reciprocal-lattice
  coordinates (default a*). A general direction (not on a symmetry element of
  the lattice) makes the diffuse intensity invariant under the Laue group of
  the space group only, not under the lattice's holohedry: for P6_3 (Laue 6/m)
  in its hexagonal lattice (6/mmm) the alternative indexing k,h,-l then gives
  a different map.

The cells are drawn from their own random stream (seeded from
``random_seed``), so data sets without a cell spread are unchanged.
"""

from __future__ import annotations

import numpy as np

#: the stream of the cell spread: independent of the orientation, scale,
#: pixel and noise streams spawned from random_seed
_CELL_STREAM = 15


def crystal_of_still(params):
    """(n_images,) crystal index of every still."""
    per = max(1, int(getattr(params.crystal, "stills_per_crystal", 1) or 1))
    return np.arange(params.n_images) // per


def still_cells(params, unit_cell, space_group_info):
    """A uctbx.unit_cell per still (the nominal cell without a spread)."""
    from cctbx import uctbx

    spread = float(getattr(params.crystal, "cell_spread", 0.0) or 0.0)
    crystal = crystal_of_still(params)
    n_crystals = int(crystal.max()) + 1 if crystal.size else 0
    if spread <= 0:
        return [unit_cell] * params.n_images
    rng = np.random.default_rng([int(params.random_seed), _CELL_STREAM])
    p = np.array(unit_cell.parameters())
    group = space_group_info.group()
    cells = []
    for factors in 1.0 + spread * rng.standard_normal((n_crystals, 3)):
        trial = uctbx.unit_cell(tuple(p[:3] * factors) + tuple(p[3:]))
        cells.append(group.average_unit_cell(trial))
    return [cells[c] for c in crystal]


def reindexed_crystal(crystal, op):
    """A copy of a dxtbx crystal in the alternative setting ``op``: the
    same lattice, indexed so that every fractional hkl becomes ``hkl @ op``
    (row vectors; op an integer 3x3 of the lattice's symmetry). Built from A
    directly: A' = A (op^T)^-1, so hkl' = A'^-1 q = op^T A^-1 q."""
    from dxtbx.model import Crystal

    op = np.asarray(op, dtype=np.float64)
    A = np.array(crystal.get_A(), dtype=np.float64).reshape(3, 3)
    A_new = A @ np.linalg.inv(op.T)
    real = np.linalg.inv(A_new)  # rows: real-space basis vectors a', b', c'
    return Crystal(tuple(real[0]), tuple(real[1]), tuple(real[2]), crystal.get_space_group())


def scramble_settings(experiments, operators, seed):
    """The experiments with each still's crystal replaced by a random one of
    its alternative settings (what indexing stills one by one does): returns
    (new ExperimentList, (n,) index of the operator applied to each). The
    operators are given by the caller (integer 3x3, hkl' = hkl @ op)."""
    import copy

    from dxtbx.model import ExperimentList

    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(operators), len(experiments))
    out = ExperimentList()
    for expt, k in zip(experiments, choice):
        e = copy.copy(expt)
        e.crystal = reindexed_crystal(expt.crystal, operators[k])
        out.append(e)
    return out, choice
