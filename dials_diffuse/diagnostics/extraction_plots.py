"""Plots of one extracted image (the guide's check_diffuse_extraction.py).

Each function takes numpy arrays and returns a matplotlib Figure; nothing here
reads or writes files. Scatter plots take already subsampled arrays (see
``plotting.subsample``); histograms, profiles and heatmaps use every value.
"""

from __future__ import annotations

import numpy as np
from matplotlib.patches import Patch

from dials_diffuse.diagnostics.plotting import (
    histogram_panel,
    new_figure,
    radial_scatter_figure,
)

AXIS_NAMES = ("qx", "qy", "qz")
MAX_DISPLAY_PIXELS = 900  # raw images are block-reduced to about this many pixels a side
OVERLAY_COLOURS = {
    "kept": (0.1, 0.85, 0.2, 0.35),
    "bragg": (1.0, 0.1, 0.1, 0.95),
    "pixel": (0.2, 0.4, 1.0, 0.8),
}


def block_reduce(image: np.ndarray, factor: int, how: str = "max") -> np.ndarray:
    """Reduce a 2-D array by ``factor`` along both axes (max, any or nanmean)."""
    if factor <= 1:
        return image
    ny, nx = image.shape
    py, px = (-ny) % factor, (-nx) % factor
    fill = {"max": -np.inf, "any": False, "nanmean": np.nan}[how]
    if image.dtype == bool:
        fill = False
    padded = np.pad(image, ((0, py), (0, px)), constant_values=fill)
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    if how == "max":
        return blocks.max(axis=(1, 3))
    if how == "any":
        return blocks.any(axis=(1, 3))
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(blocks).sum(axis=(1, 3))
        sums = np.nansum(blocks, axis=(1, 3))
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def display_factor(shape, max_pixels=MAX_DISPLAY_PIXELS) -> int:
    return max(1, int(np.ceil(max(shape) / max_pixels)))


def pixels_to_mask(panel_ids, fast, slow, shapes):
    """Per-panel boolean images with True at the listed pixels."""
    out = []
    for pid, shape in enumerate(shapes):
        m = np.zeros(shape, bool)
        sel = panel_ids == pid
        m[slow[sel], fast[sel]] = True
        out.append(m)
    return out


def _panel_grid(n):
    ncols = int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / ncols)), ncols


def plot_pixel_overlay(raw, kept=None, bragg=None, pixel=None, title=""):
    """Raw counts (log scale) per panel with kept diffuse pixels (green), pixels
    removed by the Bragg mask (red) and by the pixel mask (blue) overlaid.

    ``raw``: list of (slow, fast) arrays; masks: lists of boolean arrays, True =
    kept / used (DIALS convention), or None.
    """
    n = len(raw)
    nrows, ncols = _panel_grid(n)
    size = 7.5 if n == 1 else min(14.0, 3.2 * ncols)
    fig, axes = new_figure(nrows, ncols, width=size, height=size * nrows / ncols + 0.8)
    vmax = max(float(np.percentile(r[r > 0], 99.9)) if (r > 0).any() else 1.0 for r in raw)
    for pid, ax in enumerate(axes.ravel()):
        if pid >= n:
            ax.set_axis_off()
            continue
        f = display_factor(raw[pid].shape)
        img = block_reduce(np.log10(1 + np.clip(raw[pid], 0, None)), f, "max")
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=np.log10(1 + vmax), origin="upper",
                  interpolation="nearest")
        rgba = np.zeros(img.shape + (4,), np.float32)
        if kept is not None:
            rgba[block_reduce(kept[pid], f, "any")] = OVERLAY_COLOURS["kept"]
        if pixel is not None:
            rgba[block_reduce(~pixel[pid], f, "any")] = OVERLAY_COLOURS["pixel"]
        if bragg is not None:
            rgba[block_reduce(~bragg[pid], f, "any")] = OVERLAY_COLOURS["bragg"]
        ax.imshow(rgba, origin="upper", interpolation="nearest")
        ax.set_title(f"panel {pid}" + (f" (1:{f} display)" if f > 1 else ""), fontsize=9)
        if n == 1 or pid % ncols == 0:
            ax.set_ylabel(f"slow / {f} px" if f > 1 else "slow (px)")
        if n == 1 or pid >= n - ncols:
            ax.set_xlabel(f"fast / {f} px" if f > 1 else "fast (px)")
    handles = [Patch(color=OVERLAY_COLOURS[k], label=label) for k, label, m in (
        ("kept", "kept diffuse pixels", kept),
        ("bragg", "Bragg-masked", bragg),
        ("pixel", "pixel-masked (static/dynamic/trusted)", pixel),
    ) if m is not None]
    if handles:
        axes[0, 0].legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.9)
    fig.suptitle(title or "Raw image (log10 counts) with masks", fontsize=10)
    return fig


def plot_q_projection(q, intensity, axes=(0, 1), n_total=None):
    """Scatter of two q components coloured by intensity (clipped 1-99 %)."""
    fig, ax = new_figure(width=6.5, height=5.5)
    ax = ax[0, 0]
    i, j = axes
    lo, hi = (np.percentile(intensity, [1, 99]) if intensity.size else (0, 1))
    order = np.argsort(intensity, kind="stable")  # brightest on top
    sc = ax.scatter(q[order, i], q[order, j], c=intensity[order], s=2, cmap="viridis",
                    vmin=lo, vmax=hi, rasterized=True, linewidths=0)
    fig.colorbar(sc, ax=ax, label="corrected intensity (1-99 % range)")
    ax.set_xlabel(f"{AXIS_NAMES[i]} (1/Å)")
    ax.set_ylabel(f"{AXIS_NAMES[j]} (1/Å)")
    ax.set_aspect("equal", adjustable="datalim")
    shown = f"{q.shape[0]} of {n_total}" if n_total and n_total > q.shape[0] else f"{q.shape[0]}"
    ax.set_title(f"q projection {AXIS_NAMES[i]}-{AXIS_NAMES[j]} ({shown} points)", fontsize=10)
    return fig


def plot_radial(qmag_sample, intensity_sample, profile, n_total=None):
    """I vs |q| scatter (subsample) with the binned mean of all pixels."""
    centres, means, counts = profile
    return radial_scatter_figure(
        qmag_sample, intensity_sample, centres, np.where(counts > 0, means, np.nan), n_total,
        sample_name="pixels", mean_label="mean in |q| bins (all pixels)",
        ylabel="corrected intensity", title="Radial distribution",
    )


def plot_intensity_histogram(intensity, label="corrected intensity", unit="pixels"):
    """Linear histogram (0.1-99.9 % range) and histogram of log10 of positive values."""
    fig, axes = new_figure(1, 2, width=11, height=4.5)
    v = intensity[np.isfinite(intensity)]
    lo, hi = np.percentile(v, [0.1, 99.9]) if v.size else (0, 1)
    histogram_panel(axes[0, 0], np.clip(v, lo, hi), bins=150)
    axes[0, 0].set_xlabel(f"{label} (clipped to 0.1-99.9 %)")
    axes[0, 0].set_ylabel(unit)
    axes[0, 0].set_title(f"linear: n={v.size}, mean={v.mean() if v.size else np.nan:.4g}, "
                         f"median={np.median(v) if v.size else np.nan:.4g}", fontsize=9)
    histogram_panel(axes[0, 1], v, bins=150, log_x=True, color="C1")
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_xlabel(f"log10({label})")
    axes[0, 1].set_ylabel(unit)
    n_nonpos = int((v <= 0).sum())
    axes[0, 1].set_title(f"log: {n_nonpos} values <= 0 not shown "
                         f"({100 * n_nonpos / max(v.size, 1):.2f} %)", fontsize=9)
    return fig


def heatmap_image(fast, slow, intensity, shape, step=1):
    """(slow, fast) image of intensities at pixel positions, NaN elsewhere; with a
    pixel step the image is on the sampled grid."""
    ny, nx = -(-shape[0] // step), -(-shape[1] // step)
    img = np.full((ny, nx), np.nan, np.float32)
    img[slow // step, fast // step] = intensity
    return img


def plot_heatmap(img, panel_id, step=1):
    fig, ax = new_figure(width=7, height=6)
    ax = ax[0, 0]
    f = display_factor(img.shape, MAX_DISPLAY_PIXELS // 2)
    shown = block_reduce(img, f, "nanmean")
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0, 1)
    scale = step * f
    im = ax.imshow(shown, origin="upper", cmap="magma", vmin=lo, vmax=hi,
                   interpolation="nearest",
                   extent=(0, shown.shape[1] * scale, shown.shape[0] * scale, 0))
    im.cmap.set_bad("lightgrey")
    fig.colorbar(im, ax=ax, label="corrected intensity (1-99 % range)")
    ax.set_xlabel("fast (px)")
    ax.set_ylabel("slow (px)")
    ax.set_title(f"Panel {panel_id}: corrected intensity of kept pixels "
                 f"(grey: not kept){'; mean of ' + str(f) + 'x' + str(f) if f > 1 else ''}",
                 fontsize=9)
    return fig


def plot_sigma_vs_intensity(intensity, sigma, reference=None, n_total=None):
    """log-log sigma vs I with the Poisson reference sigma = sqrt(g I / F).

    ``reference``: dict with gain and the 5, 50, 95 % correction factors F
    (P Omega eta T_air t), or None.
    """
    fig, ax = new_figure(width=7, height=5.5)
    ax = ax[0, 0]
    ok = (intensity > 0) & (sigma > 0) & np.isfinite(intensity) & np.isfinite(sigma)
    ax.scatter(intensity[ok], sigma[ok], s=1, alpha=0.3, rasterized=True, linewidths=0,
               label=f"pixels with I > 0 ({int(ok.sum())}"
               + (f" of a {len(intensity)}-point sample of {n_total})" if n_total and n_total > len(intensity) else ")"))
    if ok.any():
        x = np.logspace(np.log10(intensity[ok].min()), np.log10(intensity[ok].max()), 200)
        if reference is not None:
            g = reference["gain"]
            f50 = reference["F50"]
            ax.plot(x, np.sqrt(g * x / f50), "r-", lw=1.5,
                    label=f"Poisson σ = √(g·I/F), median F = {f50:.3g}")
            ax.fill_between(x, np.sqrt(g * x / reference["F95"]), np.sqrt(g * x / reference["F05"]),
                            color="r", alpha=0.12, label="F from 5 % to 95 %")
        else:
            ax.plot(x, np.sqrt(x), "r-", lw=1.5, label="σ = √I")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("corrected intensity I")
    ax.set_ylabel("σ(I)")
    ax.legend(fontsize=8)
    ax.set_title("Error model: σ vs I (background adds to σ at low I)", fontsize=10)
    return fig


def plot_isigi_histogram(isigi):
    fig, ax = new_figure(width=7, height=5)
    ax = ax[0, 0]
    v = isigi[np.isfinite(isigi)]
    lo, hi = np.percentile(v, [0.1, 99.9]) if v.size else (0, 1)
    histogram_panel(ax, np.clip(v, lo, hi), bins=150)
    if v.size:
        mean, median = float(v.mean()), float(np.median(v))
        ax.axvline(mean, color="C3", lw=1.5, label=f"mean {mean:.3g}")
        ax.axvline(median, color="k", ls="--", lw=1.5, label=f"median {median:.3g}")
        ax.axvline(1.0, color="grey", ls=":", lw=1, label="I/σ = 1")
        ax.legend(fontsize=8)
    ax.set_xlabel("I/σ (clipped to 0.1-99.9 %)")
    ax.set_ylabel("pixels")
    ax.set_title(f"I/σ of {v.size} pixels ({100 * (v > 1).mean() if v.size else 0:.1f} % above 1)",
                 fontsize=10)
    return fig


def plot_background_map(panels):
    n = len(panels)
    nrows, ncols = _panel_grid(n)
    fig, axes = new_figure(nrows, ncols, width=min(14, 4.5 * ncols), height=4 * nrows + 0.5)
    lo, hi = np.percentile(np.concatenate([p.ravel() for p in panels]), [1, 99])
    for pid, ax in enumerate(axes.ravel()):
        if pid >= n:
            ax.set_axis_off()
            continue
        f = display_factor(panels[pid].shape)
        im = ax.imshow(block_reduce(panels[pid], f, "nanmean"), cmap="viridis", vmin=lo, vmax=hi)
        ax.set_title(f"panel {pid}", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="background (photons per pixel)")
    fig.suptitle("Background map", fontsize=10)
    return fig


