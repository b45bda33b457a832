"""Plots of a merged map (the guide's check_phase3_outputs.py, plus CC1/2 and
anisotropic sections). Functions take arrays and return Figures."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm
from matplotlib.ticker import MaxNLocator

from dials_diffuse.diagnostics.plotting import (
    add_d_axis,
    histogram_panel,
    new_figure,
    positive_log_limits,
    radial_scatter_figure,
    symmetric_limit,
)

def section_norm(values, scale):
    """Colour normalisation for a section: log, linear (1-99 %) or diverging about 0."""
    finite = values[np.isfinite(values)]
    if scale == "log":
        vmin, vmax = positive_log_limits(finite)
        return LogNorm(vmin=vmin, vmax=vmax)
    if scale == "diverging":
        lim = symmetric_limit(finite)
        return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0, 1)
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)


def plot_section(section, title, label, scale="linear", cmap="viridis", recip_lengths=None,
                 recip_angles=None):
    """A central section in reciprocal-lattice units; grey = no voxel.

    ``recip_lengths``: |a*|, |b*|, |c*| (1/A) so that one r.l.u. along each axis
    has its true length on the page; ``recip_angles``: alpha*, beta*, gamma*.
    """
    fig, ax = new_figure(width=7, height=6.2)
    ax = ax[0, 0]
    values = section.values
    shown = values
    norm = section_norm(values, scale)
    if scale == "log":
        # non-positive values: below the colour range, not "no voxel"
        shown = np.where(np.isfinite(values) & (values <= 0), norm.vmin * 0.5, values)
    cm = matplotlib.colormaps[cmap].copy()
    cm.set_bad("lightgrey")
    cm.set_under("black" if scale == "log" else cm(0.0))
    im = ax.imshow(shown, origin="lower", extent=section.extent(), cmap=cm, norm=norm,
                   interpolation="nearest")
    extend = "min" if scale == "log" and np.any(np.isfinite(values) & (values <= 0)) else "neither"
    fig.colorbar(im, ax=ax, label=label, extend=extend, shrink=0.9)
    if recip_lengths is not None:
        ax.set_aspect(recip_lengths[section.v_axis] / recip_lengths[section.u_axis])
    ax.set_xlabel(f"{section.u_label} (r.l.u.)")
    ax.set_ylabel(f"{section.v_label} (r.l.u.)")
    fixed = "hkl"[section.fixed_axis]
    angle = ""
    if recip_angles is not None:
        greek = ("α*", "β*", "γ*")[section.fixed_axis]
        angle = f"; {greek} = {recip_angles[section.fixed_axis]:.1f}°"
    plane = "".join("0" if a == section.fixed_axis else "hkl"[a] for a in range(3))
    ax.set_title(f"{title}\ncentral section {fixed} = 0 ({plane} plane{angle})",
                 fontsize=10)
    ax.axhline(0, color="white", lw=0.4, alpha=0.6)
    ax.axvline(0, color="white", lw=0.4, alpha=0.6)
    return fig


def plot_grid_conceptual(hkl_sample, intensity_sample, lo, hi, ndiv, n_total):
    """3-D wireframe of the observed hkl box with a sample of voxel centres."""
    fig, _ = new_figure(width=7.5, height=6.5)
    fig.clear()
    ax = fig.add_subplot(projection="3d")
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    for a in range(8):
        for b in range(a + 1, 8):
            if np.sum(corners[a] != corners[b]) == 1:
                ax.plot(*zip(corners[a], corners[b]), color="k", lw=0.8)
    norm = LogNorm(*positive_log_limits(intensity_sample))
    c = np.where(intensity_sample > 0, intensity_sample, norm.vmin)
    sc = ax.scatter(hkl_sample[:, 0], hkl_sample[:, 1], hkl_sample[:, 2], c=c, norm=norm, s=1,
                    cmap="viridis", depthshade=False, rasterized=True)
    fig.colorbar(sc, ax=ax, label="merged intensity (log)", shrink=0.7)
    ax.set_xlabel("h")
    ax.set_ylabel("k")
    ax.set_zlabel("l")
    ax.set_title(f"Observed hkl box (P1) h {lo[0]:.2f}..{hi[0]:.2f}, k {lo[1]:.2f}..{hi[1]:.2f}, "
                 f"l {lo[2]:.2f}..{hi[2]:.2f}\nndiv {tuple(ndiv)}; {len(hkl_sample)} of {n_total} voxel centres",
                 fontsize=9)
    return fig


def plot_occupancy_histogram(n_obs):
    fig, ax = new_figure(width=7, height=5)
    ax = ax[0, 0]
    n_obs = np.asarray(n_obs, dtype=np.int64)
    top = int(n_obs.max()) if n_obs.size else 1
    counts = np.bincount(n_obs, minlength=top + 1)
    ax.bar(np.arange(counts.size), counts, width=1.0, color="C0")
    ax.set_yscale("log")
    ax.set_xlabel("observations per voxel")
    ax.set_ylabel("voxels (ASU)")
    if n_obs.size:
        ax.axvline(n_obs.mean(), color="C3", label=f"mean {n_obs.mean():.2f}")
        ax.axvline(np.median(n_obs), color="k", ls="--", label=f"median {np.median(n_obs):g}")
        ax.legend(fontsize=8)
    ax.set_title(f"Voxel occupancy: {n_obs.size} voxels, {int((n_obs == 1).sum())} observed once",
                 fontsize=10)
    return fig


def plot_scales(still_ids, scales, offsets=None, kept_pixels=None):
    """b_i per still, their histogram, and c_i (if refined) / b_i vs kept pixels."""
    extra = [x for x in (offsets, kept_pixels) if x is not None]
    fig, axes = new_figure(1, 2 + len(extra), width=5 * (2 + len(extra)), height=4.5)
    ax = axes[0, 0]
    ax.plot(still_ids, scales, "o-", ms=3, lw=0.6)
    ax.axhline(scales.mean(), color="C3", lw=1, label=f"mean {scales.mean():.4g}")
    ax.set_xlabel("still id")
    ax.set_ylabel("multiplicative scale b_i")
    ax.legend(fontsize=8)
    ax.set_title(f"b_i of {scales.size} stills (std {scales.std():.3g})", fontsize=10)
    histogram_panel(axes[0, 1], scales, bins=min(50, max(5, scales.size // 2)))
    axes[0, 1].set_xlabel("b_i")
    axes[0, 1].set_ylabel("stills")
    axes[0, 1].set_title(f"min {scales.min():.4g}, max {scales.max():.4g}", fontsize=10)
    col = 2
    if offsets is not None:
        axes[0, col].plot(still_ids, offsets, "o-", ms=3, lw=0.6, color="C2")
        axes[0, col].set_xlabel("still id")
        axes[0, col].set_ylabel("additive offset c_i")
        axes[0, col].set_title(f"c_i: mean {offsets.mean():.4g}", fontsize=10)
        col += 1
    if kept_pixels is not None:
        axes[0, col].plot(kept_pixels, scales, "o", ms=3, color="C4")
        axes[0, col].xaxis.set_major_locator(MaxNLocator(4))
        axes[0, col].set_xlabel("kept pixels (extraction manifest)")
        axes[0, col].set_ylabel("b_i")
        axes[0, col].set_title("scale vs kept pixels", fontsize=10)
    return fig


def plot_smoother(control_q, values_per_still):
    """a_i(|q|), piecewise linear through the control points, for every still."""
    fig, ax = new_figure(width=7, height=5)
    ax = ax[0, 0]
    v = np.asarray(values_per_still, dtype=float)
    ax.plot(control_q, v.T, "-", color="C0", alpha=max(0.05, min(0.6, 10.0 / max(len(v), 1))), lw=0.8)
    ax.plot(control_q, np.median(v, axis=0), "o-", color="C3", lw=2, label="median over stills")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set_xlabel("|q| (1/Å)")
    ax.set_ylabel("resolution factor a_i(|q|)")
    ax.legend(fontsize=8)
    ax.set_title(f"Resolution smoother: {len(v)} stills, {len(control_q)} control points", fontsize=10)
    return fig


def plot_radial_average(centres, means, qmag_sample, intensity_sample, n_total):
    return radial_scatter_figure(
        qmag_sample, intensity_sample, centres, means, n_total,
        sample_name="voxels", mean_label="radial average",
        ylabel="merged intensity", title="Merged radial average", alpha=0.25,
    )


def plot_cc_half(shells, overall):
    fig, ax = new_figure(width=7, height=5)
    ax = ax[0, 0]
    q = np.array([0.5 * (s["q_min"] + s["q_max"]) for s in shells])
    for key, style, label in (
        ("cc_half_total", "o-", "total"),
        ("cc_half_total_no_bragg", "s--", "total, no Bragg voxels"),
        ("cc_half_anisotropic", "^-", "anisotropic"),
        ("cc_half_anisotropic_no_bragg", "v--", "anisotropic, no Bragg voxels"),
    ):
        y = np.array([np.nan if s.get(key) is None else s[key] for s in shells], dtype=float)
        o = overall.get(key)
        ax.plot(q, y, style, ms=4, label=f"{label} (overall {o:.3f})" if o is not None else label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylim(min(-0.1, np.nanmin([s.get("cc_half_anisotropic") or 0 for s in shells]) - 0.05), 1.02)
    ax.set_xlabel("|q| (1/Å), shell centre")
    ax.set_ylabel("CC1/2")
    ax.legend(fontsize=8, loc="lower left")
    if q.size:
        add_d_axis(ax, max(float(np.min([s["q_min"] for s in shells])), 1e-3),
                   float(np.max([s["q_max"] for s in shells])))
    ax.set_title("Half-dataset correlation per resolution shell", fontsize=10)
    return fig


def plot_absolute_scale(doc):
    """Shell means of the scaled map against the sum rule's model (from
    absolute_scale.json): data, coherent, incoherent and their sum vs |s|,
    over the map's whole |s| range when the file has the profile (the fit
    range shaded, its shells marked)."""
    fig, ax = new_figure(width=7, height=5)
    ax = ax[0, 0]
    shells = doc["shells"]
    curves = doc.get("profile") or shells  # files of earlier versions: the fit shells
    s = np.array(curves["s"], dtype=float)
    styles = {"data": "o-" if curves is shells else "-", "coherent": "-", "incoherent": "--",
              "sum": "-"}
    for key, label in (("data", "data x K"), ("coherent", "coherent sum n f^2"),
                       ("incoherent", "incoherent (Compton, as recorded)"),
                       ("sum", "coherent + incoherent")):
        ax.plot(s, np.array(curves[key], dtype=float), styles[key], ms=4, label=label)
    if curves is not shells:
        ax.plot(np.array(shells["s"], dtype=float), np.array(shells["data"], dtype=float), "o",
                ms=4, color="C0", label="data x K, fit shells")
    lo, hi = doc["fit_s_range"]
    ax.axvspan(lo, hi, color="grey", alpha=0.1, label="fit range")
    ax.set_xlabel("|s| (1/Å)")
    ax.set_ylabel("electron units per unit cell")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(f"Absolute scale K = {doc['scale']:.4g} "
                 f"({doc['electrons_per_cell']:.0f} electrons per cell)", fontsize=10)
    return fig
