#!/usr/bin/env python
"""Our merged map against mdx2's on the same images (issue 14, item 3).

    python bench/compare_maps.py OURS_MERGED_DIR MDX2_MERGED_NXS [--truth SIMULATED_DIR]
                                 [--json out.json]

* ours: the directory of ``dials.diffuse_merge`` (``read_merged``:
  ``I_merged_relative`` of the asymmetric-unit voxels, grid indices
  ``g = hkl * ndiv``).
* mdx2: ``merged.nxs`` of ``mdx2.merge`` (``/entry/hkl_table``: ``h, k, l``
  float voxel centres, ``ndiv``, ``intensity``, ``intensity_error``,
  ``count``). mdx2 bins a pixel into the voxel ``round(hkl * ndiv)``
  (``HKLTable.H``), so its voxel centres are ``g / ndiv`` as ours; it maps them
  to its own asymmetric unit (``Symmetry.to_asu``: the first Laue operator,
  in reverse order, that lands in its ``reciprocal_space_asu`` expression).
  Both maps are put on our canonical voxel (the lexicographically largest
  Laue mate, ``dials_diffuse.symmetry.map_to_asu``), so the convention of
  the asymmetric unit does not matter; voxels of one map that fall onto the
  same canonical voxel (a P1 map, or mates on an ASU boundary) are averaged.
* truth (optional): a ``dials.diffuse_simulate`` directory;
  ``flux * D`` averaged over each voxel (``Truth.diffuse_voxel_average``).

Reported on the common voxels (finite in both maps): CC of the total
intensity and CC of the anisotropic intensity (each map minus its own radial
average, computed identically for every map on the same voxels: equal-width
|s| bins, voxels weighted by their symmetry multiplicity, Bragg positions
left out of the average, interpolated at each voxel's |s|, as
``dials.diffuse_merge`` does for its own I_anisotropic), all voxels and off
Bragg positions (g not a multiple of ndiv on every axis); the same of each
map against the truth; and per resolution shell (equal voxel counts) the
normalised ratios ours/truth, mdx2/truth, mdx2/ours and the per-shell CCs.

The two maps come from the same photons: their CC includes the shared
counting noise, so on a weak data set a high ours-vs-mdx2 CC says the two
reductions agree, not that the map is right; only the truth says that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

MAPS = ("ours", "mdx2")


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


def load_ours(directory):
    """Our merged map: grid indices, intensities, sigma, ndiv, cell, space group."""
    from dials_diffuse.merged_files import read_merged

    grid, _, voxels, _ = read_merged(str(directory))
    ndiv = np.array([grid["ndiv_h"], grid["ndiv_k"], grid["ndiv_l"]], dtype=np.int64)
    hkl = np.stack([voxels["H_center"], voxels["K_center"], voxels["L_center"]], axis=1)
    crystal = grid["crystal_avg_ref"]
    return {
        "g": np.rint(hkl * ndiv).astype(np.int64),
        "I": np.asarray(voxels["I_merged_relative"], dtype=np.float64),
        "sigma": np.asarray(voxels["Sigma_merged_relative"], dtype=np.float64),
        "ndiv": ndiv,
        "unit_cell": [float(x) for x in crystal["unit_cell"]],
        "space_group": crystal.get("space_group_hall") or crystal["space_group"],
    }


def load_mdx2(path):
    """mdx2's merged hkl_table (h5py; no mdx2 needed)."""
    import h5py

    with h5py.File(str(path), "r") as f:
        t = f["entry/hkl_table"]
        ndiv = np.asarray(t["ndiv"][()], dtype=np.int64).reshape(-1)
        if ndiv.size == 1:
            ndiv = np.repeat(ndiv, 3)
        hkl = np.stack([t[a][()] for a in "hkl"], axis=1).astype(np.float64)
        out = {
            "g": np.rint(hkl * ndiv).astype(np.int64),
            "I": t["intensity"][()].astype(np.float64),
            "sigma": t["intensity_error"][()].astype(np.float64),
            "ndiv": ndiv,
        }
    return out


def space_group_of(symbol):
    from cctbx import sgtbx

    s = str(symbol).strip()
    try:
        return sgtbx.space_group_info(symbol=s).group()
    except Exception:
        return sgtbx.space_group_info(symbol="Hall: " + s).group()


# ---------------------------------------------------------------------------
# voxels
# ---------------------------------------------------------------------------


def _keys(g, offset, span):
    g = g + offset
    return (g[:, 0] * span + g[:, 1]) * span + g[:, 2]


def to_canonical(g, values, ndiv, ops):
    """Map grid indices to our canonical voxel and average the values of rows
    that land on the same voxel (inverse-variance weights when sigma is given).
    Returns (unique canonical g, {name: averaged values}, n_collapsed)."""
    from dials_diffuse.symmetry import map_to_asu

    I, sigma = values["I"], values["sigma"]
    ok = np.isfinite(I)
    g = map_to_asu(g[ok], tuple(int(x) for x in ndiv), ops).astype(np.int64)
    I, sigma = I[ok], sigma[ok]
    uniq, inverse = np.unique(g, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(uniq) == len(g):
        order = np.argsort(inverse)
        return uniq, {"I": I[order], "sigma": sigma[order]}, 0
    w = np.where(np.isfinite(sigma) & (sigma > 0), 1.0 / np.where(sigma > 0, sigma, 1.0) ** 2, 1.0)
    sw = np.bincount(inverse, weights=w, minlength=len(uniq))
    Im = np.bincount(inverse, weights=w * I, minlength=len(uniq)) / sw
    sm = 1.0 / np.sqrt(sw)
    return uniq, {"I": Im, "sigma": sm}, int(len(g) - len(uniq))


def match(ga, gb):
    """Row indices (ia, ib) of the grid points common to ga and gb."""
    offset = int(max(np.abs(ga).max(initial=0), np.abs(gb).max(initial=0))) + 1
    span = 2 * offset + 1
    _, ia, ib = np.intersect1d(_keys(ga, offset, span), _keys(gb, offset, span),
                               assume_unique=True, return_indices=True)
    return ia, ib


def s_magnitude(hkl, unit_cell):
    """|s| = 1/d (1/Angstrom) of fractional hkl rows for the cell."""
    from cctbx import uctbx

    a2, b2, c2, ab, ac, bc = uctbx.unit_cell(unit_cell).reciprocal_metrical_matrix()
    h, k, l = hkl.T
    s2 = h * h * a2 + k * k * b2 + l * l * c2 + 2 * (h * k * ab + h * l * ac + k * l * bc)
    return np.sqrt(np.maximum(s2, 0.0))


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def pearson(x, y):
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x, y):
    ok = np.isfinite(x) & np.isfinite(y)
    rx = np.empty(ok.sum())
    ry = np.empty(ok.sum())
    rx[np.argsort(x[ok], kind="stable")] = np.arange(ok.sum())
    ry[np.argsort(y[ok], kind="stable")] = np.arange(ok.sum())
    return pearson(rx, ry)


def anisotropic(smag, intensity, weights, use, n_bins):
    """intensity minus its radial average: equal-width |s| bins over the voxels
    ``use`` (weights = symmetry multiplicity), bin means interpolated at each
    voxel's |s| (as dials.diffuse_merge's I_anisotropic)."""
    s, v, w = smag[use], intensity[use], weights[use]
    edges = np.linspace(s.min(), s.max() * (1 + 1e-9), n_bins + 1)
    idx = np.clip(np.digitize(s, edges) - 1, 0, n_bins - 1)
    sums = np.bincount(idx, weights=w * v, minlength=n_bins)
    wsum = np.bincount(idx, weights=w, minlength=n_bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    ok = wsum > 0
    means = sums[ok] / wsum[ok]
    return intensity - np.interp(smag, centres[ok], means)


def equal_count_shells(smag, n_shells):
    order = np.argsort(smag, kind="stable")
    shell = np.empty(smag.size, np.int64)
    shell[order] = np.arange(smag.size) * n_shells // max(smag.size, 1)
    return shell


def compare(ours_dir, mdx2_file, truth_dir=None, n_bins=30, n_shells=8, truth_n_sub=5,
            mdx2_scales=None):
    """Both maps (and the truth) on common canonical voxels; see the module doc."""
    from dials_diffuse.symmetry import laue_operators, orbit_sizes

    ours = load_ours(ours_dir)
    peer = load_mdx2(mdx2_file)
    if not np.array_equal(ours["ndiv"], peer["ndiv"]):
        raise SystemExit(f"different grids: ours ndiv {ours['ndiv'].tolist()}, "
                         f"mdx2 ndiv {peer['ndiv'].tolist()}")
    ndiv = ours["ndiv"]
    ops = laue_operators(space_group_of(ours["space_group"]))
    maps = {}
    info = {"ndiv": ndiv.tolist(), "unit_cell": ours["unit_cell"], "laue_operators": len(ops),
            "n_bins_radial": n_bins, "n_shells": n_shells}
    for name, m in (("ours", ours), ("mdx2", peer)):
        g, vals, collapsed = to_canonical(m["g"], m, ndiv, ops)
        maps[name] = (g, vals)
        info[f"n_{name}"] = int(len(g))
        info[f"n_{name}_rows_sharing_a_voxel"] = collapsed
    ia, ib = match(maps["ours"][0], maps["mdx2"][0])
    g = maps["ours"][0][ia]
    I = {"ours": maps["ours"][1]["I"][ia], "mdx2": maps["mdx2"][1]["I"][ib]}
    info["n_common"] = int(len(g))
    info["n_only_ours"] = info["n_ours"] - info["n_common"]
    info["n_only_mdx2"] = info["n_mdx2"] - info["n_common"]
    if len(g) < 10:
        info["error"] = "fewer than 10 common voxels"
        return info
    hkl = g / ndiv
    smag = s_magnitude(hkl, ours["unit_cell"])
    on_bragg = np.all(g % ndiv == 0, axis=1)
    off = ~on_bragg
    info["n_common_off_bragg"] = int(off.sum())
    info["d_range"] = [float(1 / smag[smag > 0].min()), float(1 / smag.max())]
    mult = orbit_sizes(g, ops).astype(np.float64)

    if truth_dir is not None:
        from dials_diffuse.simulate.truth import load_truth

        truth = load_truth(truth_dir)
        I["truth"] = truth.flux * truth.diffuse_voxel_average(hkl, tuple(int(x) for x in ndiv),
                                                              n_sub=truth_n_sub)
        info["truth"] = str(truth_dir)
        if mdx2_scales is None:
            mdx2_scales = Path(mdx2_file).with_name("scales.nxs")
        if not truth.is_stills:
            info["scales"] = scale_recovery(ours_dir, mdx2_scales, truth)
    names = list(I)
    aniso = {n: anisotropic(smag, I[n], mult, off, n_bins) for n in names}

    pairs = [("ours", "mdx2")]
    if "truth" in I:
        pairs += [("ours", "truth"), ("mdx2", "truth")]
    cc = {}
    for a, b in pairs:
        key = f"{a}_vs_{b}"
        cc[key] = {
            "cc_total": pearson(I[a], I[b]),
            "cc_total_off_bragg": pearson(I[a][off], I[b][off]),
            "cc_anisotropic": pearson(aniso[a], aniso[b]),
            "cc_anisotropic_off_bragg": pearson(aniso[a][off], aniso[b][off]),
            "spearman_total_off_bragg": spearman(I[a][off], I[b][off]),
            # scale of b relative to a (sum ratio, off Bragg) and the rms of
            # the relative difference after that scale
            "scale_b_over_a": float(I[b][off].sum() / I[a][off].sum()),
        }
        k = cc[key]["scale_b_over_a"]
        rel = (I[b][off] / k - I[a][off]) / np.abs(I[a][off]).mean()
        cc[key]["rms_relative_difference_off_bragg"] = float(np.sqrt(np.mean(rel**2)))

    # per resolution shell, off Bragg positions, equal voxel counts
    so = smag[off]
    shell = equal_count_shells(so, n_shells)
    shells = {"d_max": [], "d_min": [], "n": []}
    ratio_pairs = [("ours", "mdx2")] + ([("ours", "truth"), ("mdx2", "truth")] if "truth" in I else [])
    overall = {f"{a}/{b}": I[a][off].sum() / I[b][off].sum() for a, b in ratio_pairs}
    for a, b in ratio_pairs:
        shells[f"{a}/{b}"] = []
        shells[f"cc_{a}_{b}"] = []
        shells[f"cc_aniso_{a}_{b}"] = []
    for j in range(n_shells):
        sel = shell == j
        shells["d_max"].append(float(1 / so[sel].min()) if so[sel].min() > 0 else float("inf"))
        shells["d_min"].append(float(1 / so[sel].max()))
        shells["n"].append(int(sel.sum()))
        for a, b in ratio_pairs:
            x, y = I[a][off][sel], I[b][off][sel]
            shells[f"{a}/{b}"].append(float(x.sum() / y.sum() / overall[f"{a}/{b}"]))
            shells[f"cc_{a}_{b}"].append(pearson(x, y))
            shells[f"cc_aniso_{a}_{b}"].append(pearson(aniso[a][off][sel], aniso[b][off][sel]))
    return {**info, "cc": cc, "shells": shells}


def scale_recovery(ours_dir, mdx2_scales, truth):
    """Per-image scale factors each chain fitted against the simulator's true
    ones (truth.scales): ours b_i (refined_scaling_model_params.json) and
    mdx2's b(phi) (scales.nxs: piecewise linear between control points,
    evaluated at each image's centre phi), each normalised to mean 1; CC with
    the truth and rms relative error."""
    import h5py

    true = np.asarray(truth.scales, dtype=np.float64)
    n = true.size
    out = {"n_images": int(n)}
    fitted = {}
    path = Path(ours_dir) / "refined_scaling_model_params.json"
    if path.is_file():
        refined = json.loads(path.read_text())["refined_parameters"]
        keys = sorted(refined, key=int)
        if len(keys) == n:
            fitted["ours"] = np.array([refined[k]["multiplicative_scale"] for k in keys])
    if mdx2_scales is not None and Path(mdx2_scales).is_file():
        with h5py.File(str(mdx2_scales), "r") as f:
            if "entry/scaling_model" in f:
                phi_points = f["entry/scaling_model/phi"][()]
                u = f["entry/scaling_model/u"][()]
                phi0, dphi = truth.experiments[0].scan.get_oscillation()
                phi = phi0 + dphi * (np.arange(n) + 0.5)
                fitted["mdx2"] = np.interp(phi, phi_points, u)
                out["mdx2_control_points"] = int(phi_points.size)
    t = true / true.mean()
    for name, b in fitted.items():
        b = b / b.mean()
        out[name] = {"cc": pearson(b, t), "rms_relative_error": float(np.sqrt(np.mean((b / t - 1) ** 2)))}
    out["true_rms_spread"] = float(np.std(t))
    return out


# ---------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------


def format_result(r):
    if "error" in r:
        return f"map comparison: {r['error']}"
    out = [f"Maps on common voxels (ndiv {r['ndiv']}, {r['laue_operators']} Laue operators): "
           f"ours {r['n_ours']}, mdx2 {r['n_mdx2']}, common {r['n_common']} "
           f"({r['n_common_off_bragg']} off Bragg positions), only ours {r['n_only_ours']}, "
           f"only mdx2 {r['n_only_mdx2']}; d {r['d_range'][0]:.2f}-{r['d_range'][1]:.2f} A"]
    rows = []
    for key, c in r["cc"].items():
        rows.append([key.replace("_vs_", " vs "), f"{c['cc_total']:.4f}", f"{c['cc_total_off_bragg']:.4f}",
                     f"{c['cc_anisotropic']:.4f}", f"{c['cc_anisotropic_off_bragg']:.4f}",
                     f"{c['spearman_total_off_bragg']:.4f}", f"{c['scale_b_over_a']:.4g}",
                     f"{c['rms_relative_difference_off_bragg']:.4f}"])
    out.append(common.table(rows, ["maps", "CC total", "CC total no Bragg", "CC aniso",
                                   "CC aniso no Bragg", "Spearman no Bragg", "scale b/a",
                                   "rms rel diff"]))
    sh = r["shells"]
    ratio_keys = [k for k in sh if "/" in k]
    rows = []
    for j in range(len(sh["n"])):
        row = [f"{sh['d_max'][j]:.2f}", f"{sh['d_min'][j]:.2f}", str(sh["n"][j])]
        row += [f"{sh[k][j]:.3f}" for k in ratio_keys]
        row += [f"{sh['cc_' + k.replace('/', '_')][j]:.3f}" for k in ratio_keys]
        row += [f"{sh['cc_aniso_' + k.replace('/', '_')][j]:.3f}" for k in ratio_keys]
        rows.append(row)
    sc = r.get("scales")
    if sc:
        parts = [f"{name} CC {sc[name]['cc']:.3f}, rms error {sc[name]['rms_relative_error']:.3f}"
                 for name in MAPS if name in sc]
        points = sc.get("mdx2_control_points")
        out.append(f"Per-image scales against the truth ({sc['n_images']} images, true spread "
                   f"{sc['true_rms_spread']:.3f}"
                   + (f"; mdx2 b(phi) has {points} control points" if points else "")
                   + "): " + "; ".join(parts))
    out.append("Per resolution shell, off Bragg positions (ratios of sums, normalised to 1 overall):")
    out.append(common.table(rows, ["d_max", "d_min", "voxels"] + ratio_keys
                            + [f"CC {k}" for k in ratio_keys] + [f"CC aniso {k}" for k in ratio_keys]))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ours", help="dials.diffuse_merge output directory")
    ap.add_argument("mdx2", help="mdx2.merge output (merged.nxs)")
    ap.add_argument("--truth", default=None, help="dials.diffuse_simulate directory (optional)")
    ap.add_argument("--n-bins", type=int, default=30, help="|s| bins of the radial average")
    ap.add_argument("--n-shells", type=int, default=8, help="resolution shells of the table")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    r = compare(args.ours, args.mdx2, args.truth, args.n_bins, args.n_shells)
    print(format_result(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=common._json_default) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
