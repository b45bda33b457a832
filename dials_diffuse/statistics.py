"""Statistics of voxel maps: radial (isotropic) profiles, resolution shells,
half-dataset correlations (CC1/2).

Imported by the merge (:mod:`dials_diffuse.merging`), the writers of its
files (:mod:`dials_diffuse.merged_files`) and the diagnostics; it depends on
no orchestrator (only :func:`dials_diffuse.scaling.merge_intensities`, to
merge the two half maps when the scaling did not already).
"""

from __future__ import annotations

import numpy as np

from dials_diffuse import scaling


def radial_profile(qmag, intensity, n_bins=50, weights=None):
    """Mean intensity in equal-width |q| bins; returns (centres, means, counts)."""
    ok = np.isfinite(intensity)
    q, v = qmag[ok], intensity[ok]
    w = np.ones_like(v) if weights is None else weights[ok]
    edges = np.linspace(q.min(), q.max() * (1 + 1e-9), n_bins + 1) if q.size else np.array([0, 1])
    idx = np.clip(np.digitize(q, edges) - 1, 0, n_bins - 1)
    sums = np.bincount(idx, weights=w * v, minlength=n_bins)
    counts = np.bincount(idx, weights=w, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    centres = 0.5 * (edges[1:] + edges[:-1])
    return centres, means, counts


def isotropic_profile(qmag, intensity, multiplicity, on_bragg, n_bins=50):
    """The radial average of a symmetry-merged map: each asymmetric-unit
    voxel weighted by the number of reciprocal-space voxels it stands for
    (its symmetry multiplicity), voxels centred on a Bragg position left out
    (their residual Bragg intensity is no part of the isotropic diffuse
    scattering). Returns (centres, means, weights) like radial_profile."""
    use = ~on_bragg
    return radial_profile(qmag[use], intensity[use], n_bins,
                          weights=multiplicity[use].astype(np.float64))


def isotropic_at(qmag, centres, means):
    """The radial profile interpolated at each |q| (0 without a profile)."""
    ok = np.isfinite(means)
    if not ok.any():
        return np.zeros_like(qmag)
    return np.interp(qmag, centres[ok], means[ok])


def resolution_shells(qmag, n_shells):
    """Shell index for each |q|: equal numbers of voxels per shell."""
    order = np.argsort(qmag, kind="stable")
    shell = np.empty(qmag.size, np.int64)
    shell[order] = np.arange(qmag.size) * n_shells // max(qmag.size, 1)
    edges = [float(qmag[order[np.searchsorted(shell[order], s)]]) for s in range(n_shells)] if qmag.size else []
    return shell, edges


def pearson(x, y):
    """Pearson correlation; NaN with fewer than 3 pairs or no variance."""
    if x.size < 3:
        return float("nan")
    xm, ym = x - x.mean(), y - y.mean()
    denom = np.sqrt((xm * xm).sum() * (ym * ym).sum())
    return float((xm * ym).sum() / denom) if denom > 0 else float("nan")


def image_halves(n_images, seed=0):
    """The random half of the images (a bool per image) of the CC1/2 maps."""
    rng = np.random.default_rng(seed)
    in_first_half = np.zeros(n_images, bool)
    in_first_half[rng.permutation(n_images)[: n_images // 2]] = True
    return in_first_half


def cc_half(obs, model, use, on_bragg, multiplicity, n_shells=10, seed=0, n_bins=50,
            half_maps=None):
    """Half-dataset correlations per resolution shell (random halves by image).

    ``half_maps``: the (I, sigma, n) of each half when the scaling made them
    already (in its last pass); otherwise both are merged in one pass."""
    if half_maps is None:
        half_maps = scaling.merge_intensities(obs, model, use, halves=image_halves(obs.n_images, seed))
    halves = [(intensity, n) for intensity, _, n in half_maps]
    both = (halves[0][1] > 0) & (halves[1][1] > 0)
    maps = {}
    for name in ("total", "anisotropic"):
        values = []
        for intensity, _ in halves:
            if name == "anisotropic":
                c, m, _ = isotropic_profile(obs.voxel_qmag, intensity, multiplicity, on_bragg,
                                            n_bins)
                intensity = intensity - isotropic_at(obs.voxel_qmag, c, m)
            values.append(intensity)
        maps[name] = values
    shell, _ = resolution_shells(obs.voxel_qmag[both], n_shells)
    qboth = obs.voxel_qmag[both]
    table = []
    for s in range(n_shells):
        in_shell = shell == s
        if not in_shell.any():
            continue
        row = {
            "shell": s,
            "q_min": float(qboth[in_shell].min()),
            "q_max": float(qboth[in_shell].max()),
            "d_max": float(1 / qboth[in_shell].min()) if qboth[in_shell].min() > 0 else None,
            "d_min": float(1 / qboth[in_shell].max()),
            "n_voxels": int(in_shell.sum()),
        }
        bragg = on_bragg[both][in_shell]
        for name, (a, b) in maps.items():
            a, b = a[both][in_shell], b[both][in_shell]
            row[f"cc_half_{name}"] = pearson(a, b)
            row[f"cc_half_{name}_no_bragg"] = pearson(a[~bragg], b[~bragg])
        table.append(row)
    overall = {}
    for name, (a, b) in maps.items():
        overall[f"cc_half_{name}"] = pearson(a[both], b[both])
        overall[f"cc_half_{name}_no_bragg"] = pearson(a[both & ~on_bragg], b[both & ~on_bragg])
    return {"seed": seed, "n_shells": n_shells, "overall": overall, "shells": table,
            "n_voxels_in_both_halves": int(both.sum())}
