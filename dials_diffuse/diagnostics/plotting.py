"""Shared pieces of the diagnostics: atomic figure/text output, the inventory
of what was produced or skipped, seeded subsampling and small statistics.

Every plot function of the diagnostics takes numpy arrays and returns a
matplotlib Figure (created with the Agg backend, never shown); the run
functions save them through :class:`Inventory`, which writes atomically and
records each file (or why it was skipped) for the summaries and the report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import List, Optional

import numpy as np

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from dials_diffuse import io  # noqa: E402

logger = logging.getLogger("dials.diffuse_check")

DPI = 110


D_TICKS = (100, 50, 30, 20, 15, 10, 7, 5, 4, 3, 2.5, 2, 1.7, 1.5, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8)


def add_d_axis(ax, q_lo, q_hi):
    """A top axis with resolution d = 1/|q| at round values."""
    top = ax.secondary_xaxis("top", functions=(inverse, inverse))
    # round d values, at least 7 % of the |q| range apart, none in the first 7 %
    gap = 0.07 * (q_hi - q_lo)
    ticks, last = [], q_lo
    for d in D_TICKS:
        if 1.0 / d - last >= gap and 1.0 / d <= q_hi:
            ticks.append(d)
            last = 1.0 / d
    top.set_xticks(ticks)
    top.xaxis.set_major_formatter("{x:g}")
    top.set_xlabel("d (Å)")
    return top


def inverse(x):
    x = np.asarray(x, dtype=float)
    safe = np.where(x != 0, x, np.inf)
    return 1.0 / safe


def radial_scatter_figure(qmag_sample, intensity_sample, centres, means, n_total,
                          sample_name, mean_label, ylabel, title, alpha=0.3):
    """Intensity against |q|: a scatter of a subsample (n_total in all) and the
    binned means as a line, with a resolution axis on top."""
    fig, ax = new_figure(width=7, height=5)
    ax = ax[0, 0]
    n = len(qmag_sample)
    of_total = f" of {n_total})" if n_total and n_total > n else ")"
    ax.scatter(qmag_sample, intensity_sample, s=1, alpha=alpha, color="C0", rasterized=True,
               linewidths=0, label=f"{sample_name} ({n}" + of_total)
    ok = np.isfinite(means)
    ax.plot(centres[ok], means[ok], "-", color="C3", lw=2, label=mean_label)
    if intensity_sample.size:
        lo, hi = np.percentile(intensity_sample, [0.5, 99.5])
        pad = 0.1 * (hi - lo if hi > lo else 1)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("|q| (1/Å)")
    ax.set_ylabel(ylabel)
    if n:
        add_d_axis(ax, max(float(np.min(qmag_sample)), 1e-3), float(np.max(qmag_sample)))
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def new_figure(nrows=1, ncols=1, width=7.0, height=5.5, **kwargs):
    """A Figure (not attached to pyplot) and its axes."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


@dataclasses.dataclass
class Entry:
    name: str
    kind: str  # "png" or "txt"
    title: str
    status: str  # "written" or "skipped"
    reason: str = ""


class Inventory:
    """Writes the outputs of a run into one directory and remembers them."""

    def __init__(self, directory: str):
        self.directory = directory
        self.entries: List[Entry] = []

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def save_figure(self, fig: Figure, name: str, title: str = "") -> str:
        path = self.path(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # colour bars spanning several axes
            fig.tight_layout()
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
        self.entries.append(Entry(name, "png", title or name, "written"))
        logger.info("Wrote %s", path)
        return path

    def save_text(self, text: str, name: str, title: str = "") -> str:
        path = self.path(name)
        write_text(path, text)
        self.entries.append(Entry(name, "txt", title or name, "written"))
        logger.info("Wrote %s", path)
        return path

    def skip(self, name: str, reason: str, title: str = "") -> None:
        self.entries.append(Entry(name, "png" if name.endswith(".png") else "txt",
                                  title or name, "skipped", reason))
        logger.info("Skipping %s: %s", name, reason)

    def written(self, kind: Optional[str] = None) -> List[str]:
        return [e.name for e in self.entries
                if e.status == "written" and (kind is None or e.kind == kind)]

    def skipped(self) -> List[Entry]:
        return [e for e in self.entries if e.status == "skipped"]

    def inventory_text(self, extra: List[str] = ()) -> str:
        """The plot inventory section of a summary (``extra``: files written later)."""
        lines = ["Generated files:"]
        lines += [f"  {n}" for n in self.written()] + [f"  {n}" for n in extra]
        skipped = self.skipped()
        if skipped:
            lines.append("Skipped:")
            lines += [f"  {e.name}: {e.reason}" for e in skipped]
        return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    with io.atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_points`` of ``n`` items (seeded, sorted); all if fewer."""
    if max_points is None or max_points <= 0 or n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def describe(values, name: str = "", fmt: str = ".4g") -> str:
    """One line: n, mean, median, std, min, max of the finite values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return f"{name}: no finite values"
    return (f"{name}: n={v.size} mean={v.mean():{fmt}} median={np.median(v):{fmt}} "
            f"std={v.std():{fmt}} min={v.min():{fmt}} max={v.max():{fmt}}")


def positive_log_limits(values, lo_pct=1.0, hi_pct=99.9):
    """(vmin, vmax) for a log colour scale from the positive finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 1e-3, 1.0
    vmin, vmax = np.percentile(v, [lo_pct, hi_pct])
    if not vmax > vmin:
        vmin, vmax = v.min(), max(v.max(), v.min() * 10)
    return float(vmin), float(vmax)


def symmetric_limit(values, pct=99.0) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = np.abs(v[np.isfinite(v)])
    if v.size == 0:
        return 1.0
    lim = float(np.percentile(v, pct))
    return lim if lim > 0 else float(v.max() or 1.0)


def histogram_panel(ax, values, bins=100, log_x=False, color="C0", label=None):
    """Histogram of finite values (of log10 of the positive ones with log_x)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if log_x:
        v = np.log10(v[v > 0])
    if v.size == 0:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        return np.zeros(0), np.zeros(0)
    counts, edges = np.histogram(v, bins=bins)
    ax.stairs(counts, edges, fill=True, color=color, alpha=0.7, label=label)
    return counts, edges
