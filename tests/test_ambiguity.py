"""Indexing ambiguity (issue 15): reindexing operators from cctbx and the
per-still choice on simulated stills of P6_3 indexed in random settings."""

from __future__ import annotations

import numpy as np
import pytest

from dials_diffuse import ambiguity, merge_ambiguity, symmetry


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


def _synthetic_observations(cell, group, n_images, settings, seed, n_voxels=1500):
    """An ObservationSet of stills that each see a random part of a random map
    invariant under the Laue group only, labelled in the given settings
    (index into ``settings``, hkl_label = hkl_true @ O): the truth is built
    from symmetry.map_to_asu and random numbers, not from ambiguity.py."""
    from dials_diffuse.grid import GlobalVoxelGrid
    from dials_diffuse.observations import ObservationSet

    rng = np.random.default_rng(seed)
    ndiv = np.array([4, 4, 4])
    laue = symmetry.laue_operators(group)
    box = np.stack(np.meshgrid(*[np.arange(-14, 15)] * 3, indexing="ij"), -1).reshape(-1, 3)
    asu = symmetry.map_to_asu(box, ndiv, laue)
    keys, inverse = np.unique(asu, axis=0, return_inverse=True)
    value = rng.lognormal(0, 0.5, len(keys))[inverse.ravel()]  # invariant under G only
    grid = GlobalVoxelGrid(cell, symmetry._as_space_group(group), ndiv)
    rows = []
    for i, s in enumerate(settings):
        pick = rng.choice(len(box), n_voxels, replace=False)
        label = symmetry.map_to_asu(box[pick] @ _matrix(s), ndiv, laue)
        scale = rng.lognormal(0, 0.3)
        signal = rng.poisson(200 * scale * value[pick]).astype(np.float32)
        rows.append((label, signal, np.full(n_voxels, i), box[pick]))
    label = np.concatenate([r[0] for r in rows])
    uniq, voxel = np.unique(label, axis=0, return_inverse=True)
    signal = np.concatenate([r[1] for r in rows])
    obs = ObservationSet(
        voxel=voxel.ravel().astype(np.int32), image=np.concatenate([r[2] for r in rows]).astype(np.int32),
        signal=signal, factor=np.ones_like(signal), variance=np.maximum(signal, 1),
        voxel_grid=uniq.astype(np.int32),
        voxel_qmag=np.linalg.norm(grid.q_of(uniq / ndiv), axis=1),
        image_ids=np.arange(n_images), image_gain=np.ones(n_images),
        metadata=[{"still_id": i, "experiment_id": i} for i in range(n_images)])
    return obs, grid, np.concatenate([r[3] for r in rows])


@pytest.mark.parametrize("cell,group,n_pairwise", [
    (HEX, "P 3", 500), (CUB, "I 21 3", 500), (TET, "P 4", 15), (HEX, "P 63", 10)])
def test_resolve_synthetic(cell, group, n_pairwise):
    """The choice on synthetic observations: every still consistent, also
    when only some stills go through the pairwise stage (the rest against
    their map); applying it brings every still's voxels to one setting."""
    from dials_diffuse.command_line import merge as merge_command

    table = ambiguity.reindexing_operators(cell, group, table=True)
    rng = np.random.default_rng(3)
    n = 50
    symbols = table.symbols()
    settings = [symbols[k] for k in rng.integers(0, table.n, n)]
    obs, grid, true_g = _synthetic_observations(cell, group, n, settings, seed=5)
    p = merge_command.phil_scope.extract().ambiguity
    p.max_pairwise = n_pairwise
    res = ambiguity.resolve(obs, np.array(grid.ndiv), table, np.arange(n), p)
    total = [tuple((_matrix(s) @ table.ops[a]).ravel()) for s, a in zip(settings, res.assignment)]
    keys = [next(k for k in range(table.n) if _same_coset(table.ops[k], np.reshape(t, (3, 3)),
                                                          table.laue)) for t in total]
    assert np.bincount(keys).max() == n, keys
    assert np.nanmean(res.score_after) > np.nanmean(res.score_before)
    assert res.pairwise_groups.size == min(n, n_pairwise)
    # applied: every observation's voxel is its true voxel in that one setting
    new = ambiguity.apply(obs, res.assignment, grid, table)
    common = table.ops[keys[0]]
    expected = symmetry.map_to_asu(true_g @ common, np.array(grid.ndiv), table.laue)
    assert np.array_equal(new.voxel_grid[new.voxel], expected)
    assert np.allclose(new.voxel_qmag, np.linalg.norm(grid.q_of(new.voxel_grid / 4), axis=1))


def test_resolve_groups_of_images():
    """Images of one crystal (a sweep, or several stills of one crystal
    indexed together) share one choice: groups, not images, are assigned."""
    from dials_diffuse.command_line import merge as merge_command

    table = ambiguity.reindexing_operators(HEX, "P 63", table=True)
    rng = np.random.default_rng(8)
    group = np.repeat(np.arange(15), 3)  # 15 crystals of 3 images each
    setting_of_group = rng.integers(0, 2, 15)
    settings = [table.symbols()[setting_of_group[g]] for g in group]
    obs, grid, _ = _synthetic_observations(HEX, "P 63", group.size, settings, seed=9,
                                           n_voxels=600)
    p = merge_command.phil_scope.extract().ambiguity
    res = ambiguity.resolve(obs, np.array(grid.ndiv), table, group, p)
    assert res.assignment.shape == (15,)
    total = table.mul[setting_of_group, res.assignment]
    assert len(set(total.tolist())) == 1, total


# ---------------------------------------------------------------------------
# simulated stills indexed in random settings
# ---------------------------------------------------------------------------

import json  # noqa: E402

from dials_diffuse.extraction import extract  # noqa: E402
from dials_diffuse.merging import merge_run  # noqa: E402
from dials_diffuse.simulate import load_truth, params_from, simulate_dataset  # noqa: E402
from dials_diffuse.simulate.serial import scramble_settings  # noqa: E402

from diffuse_helpers import extraction_params, merge_params  # noqa: E402

# Stills of P6_3 (or P3) crystals with a cell spread, two stills per crystal,
# and a diffuse model with lobes that only the Laue group keeps (diffuse.lobe):
# the alternative settings give different maps.
SERIAL_PARAMS = {
    "mode": "stills",
    "crystal.unit_cell": "60 60 90 90 90 120",
    "crystal.cell_spread": 0.005,
    "crystal.stills_per_crystal": 2,
    "diffuse.lobe.amplitude": 1.0,
    # lobes 25 degrees out of the hk plane (-h,-k,l of P3 is distinct too),
    # 14 degrees wide: most central sections of the map cross some
    "diffuse.lobe.direction": "1 0.35 0.9",
    "diffuse.lobe.angle": 0.25,
    "diffuse.lobe.q0": 0.12,
    "diffuse.lobe.q_width": 0.1,
    "diffuse.halo.amplitude": 0.5,
    "detector.format": "generic",
    "detector.n_fast": 256,
    "detector.n_slow": 256,
    "detector.distance": 100,
}


def _serial_run(tmp_path_factory, name, space_group, symbols, n_images, seed):
    """Simulate, index every still in a random alternative setting (the
    operators given as textbook strings, parsed by cctbx: the truth does not
    use the code under test), extract."""
    base = tmp_path_factory.mktemp(name)
    settings = dict(SERIAL_PARAMS, **{"crystal.space_group": space_group, "n_images": n_images,
                                      "random_seed": seed, "output.directory": str(base / "data")})
    truth = load_truth(simulate_dataset(params_from(**settings)))
    ops = [_matrix(s) for s in symbols]
    experiments, choice = scramble_settings(truth.experiments, ops, seed + 1)
    extract(experiments, extraction_params(truth, base / "extracted",
                                           **{"output.save_pixels": "off"}), progress=False)
    return truth, base, experiments, choice, ops


def _merge(experiments, base, name, inputs=None, **overrides):
    result = merge_run(experiments, inputs or [str(base / "extracted")],
                       merge_params(base / name, **overrides))
    report = json.loads((base / name / merge_ambiguity.REPORT_NAME).read_text())
    return result, report


def _truth_cc(truth, result, op=None, min_obs=3):
    """CC of the merged map with the voxel-averaged truth (voxels seen >= 3
    times), the truth taken in the setting ``op`` (hkl @ op) if given."""
    merged = result["merged"]
    well = merged.n_observations >= min_obs
    hkl = merged.hkl[well] if op is None else merged.hkl[well] @ op
    expected = truth.diffuse_voxel_average(hkl, 4, n_sub=3)
    return float(np.corrcoef(merged.intensity[well], expected)[0, 1]), int(well.sum())


def _consistency(report, choice, ops):
    """Fraction of stills brought back to one common setting: the operator
    applied by the merge composed with the scrambling one, the same for all
    (up to the global choice). Returns (fraction, the common operator)."""
    table = {tuple(_matrix(s).ravel()): s for s in report["operators"]}
    applied = {im["experiment_id"]: _matrix(im["operator"]) for im in report["images"]}
    products = []
    for i, k in enumerate(choice):
        total = ops[k] @ applied[i]  # the still's setting relative to the truth
        products.append(tuple(total.ravel()))
    keys, counts = np.unique(np.array(products), axis=0, return_counts=True)
    best = keys[np.argmax(counts)].reshape(3, 3)
    return counts.max() / len(choice), best, table


@pytest.fixture(scope="module")
def p63_run(tmp_path_factory):
    return _serial_run(tmp_path_factory, "p63", "P 63", ["h,k,l", "k,h,-l"], 60, 31)


def test_p63_stills_resolved(p63_run):
    """60 stills of 30 P6_3 crystals in random settings: one setting for all
    (>= 98 %), consistency up, map against the truth far better than the
    scrambled merge, and as good as the data indexed in the true setting."""
    truth, base, experiments, choice, ops = p63_run
    assert 0.3 < choice.mean() < 0.7  # both settings present
    resolved, report = _merge(experiments, base, "resolved", **{"ambiguity.resolve": "true"})
    scrambled, report_off = _merge(experiments, base, "scrambled",
                                   **{"ambiguity.resolve": "false"})
    assert report_off["done"] is False
    assert report["done"] and report["operators"] == ["h,k,l", "k,h,-l"]
    fraction, common, _ = _consistency(report, choice, ops)
    assert fraction >= 0.98, fraction
    # the merged map is in the setting `common` relative to the truth
    cc_resolved, n = _truth_cc(truth, resolved, op=None if np.array_equal(common, np.eye(3)) else
                               np.linalg.inv(common).round().astype(int))
    cc_scrambled, _ = _truth_cc(truth, scrambled)
    cc_scrambled_alt, _ = _truth_cc(truth, scrambled, op=ops[1])
    print(f"P6_3 {len(choice)} stills: consistent {fraction:.3f}, CC with truth resolved "
          f"{cc_resolved:.4f} ({n} voxels), scrambled {cc_scrambled:.4f} / {cc_scrambled_alt:.4f}; "
          f"consistency CC {report['mean_score_before']:.3f} -> {report['mean_score_after']:.3f}")
    assert cc_resolved > max(cc_scrambled, cc_scrambled_alt) + 0.03
    assert cc_resolved >= 0.98  # measured 0.991 (scrambled 0.923 / 0.933)
    assert report["mean_score_after"] > report["mean_score_before"] + 0.05
    for im in report["images"]:
        assert im["score_after"] is not None and im["score_before"] is not None
        # the applied operator is the best for every still against the others
        own = im["scores"][report["operators"].index(im["operator"])]
        assert abs(own - im["score_after"]) < 1e-9
        assert own >= max(im["scores"]) - 1e-9 and im["margin"] >= 0
    assert len(report["images"]) == len(choice)


def test_reference_fixes_absolute_choice(p63_run):
    """A reference map in the true setting (the merge of the stills that
    happened to be indexed in it) makes every still end in the true setting."""
    truth, base, experiments, choice, ops = p63_run
    files = sorted((base / "extracted").glob("*.npz"))
    true_setting = [str(f) for f in files
                    if choice[json.loads(str(np.load(f)["metadata_json"]))["experiment_id"]] == 0]
    _merge(experiments, base, "reference", inputs=true_setting,
           **{"ambiguity.resolve": "false"})
    result, report = _merge(experiments, base, "with_reference",
                            **{"ambiguity.resolve": "true",
                               "ambiguity.reference": str(base / "reference")})
    fraction, common, _ = _consistency(report, choice, ops)
    assert fraction >= 0.98
    assert np.array_equal(common, np.eye(3)), common
    assert report["absolute_choice"].startswith("reference map")
    cc, _ = _truth_cc(truth, result)
    assert cc >= 0.98


def test_auto_and_refusals(p63_run, tmp_path):
    truth, base, experiments, choice, ops = p63_run
    # auto: stills of an ambiguous lattice are resolved
    _, report = _merge(experiments, base, "auto")
    assert report["done"] and report["resolve"] == "auto"
    # P1 merging: nothing to resolve in (refused when asked for)
    _, report = _merge(experiments, base, "p1", **{"symmetry.merge": "none"})
    assert report["done"] is False
    from dials.util import Sorry

    with pytest.raises(Sorry, match="symmetry.merge=laue"):
        _merge(experiments, base, "p1_true", **{"symmetry.merge": "none",
                                                "ambiguity.resolve": "true"})


def test_p3_four_settings(tmp_path_factory):
    """P3 in a hexagonal lattice: four settings (-h,-k,l; k,h,-l; -k,-h,-l)."""
    symbols = ["h,k,l", "-h,-k,l", "k,h,-l", "-k,-h,-l"]
    truth, base, experiments, choice, ops = _serial_run(tmp_path_factory, "p3", "P 3", symbols,
                                                        48, 41)
    assert len(np.unique(choice)) == 4
    resolved, report = _merge(experiments, base, "resolved", **{"ambiguity.resolve": "true"})
    assert len(report["operators"]) == 4
    fraction, common, _ = _consistency(report, choice, ops)
    cc, n = _truth_cc(truth, resolved, op=np.linalg.inv(common).round().astype(int))
    scrambled, _ = _merge(experiments, base, "scrambled", **{"ambiguity.resolve": "false"})
    cc_scrambled = max(_truth_cc(truth, scrambled, op=op)[0] for op in ops)
    print(f"P3 {len(choice)} stills: consistent {fraction:.3f}, CC with truth {cc:.4f} ({n} voxels), "
          f"scrambled {cc_scrambled:.4f}; consistency CC {report['mean_score_before']:.3f} -> "
          f"{report['mean_score_after']:.3f}")
    assert fraction >= 0.98, fraction
    assert cc >= 0.98  # measured 0.990
    assert cc > cc_scrambled + 0.05
