"""Binning one panel's kept pixels into per-voxel sums, two ways with the
same result: :func:`panel_voxels_compiled` (the compiled kernel of
:mod:`kernels`, two passes per panel) and :func:`panel_voxels_numpy` (numpy
over blocks of rows, the fallback); the voxel keys of :class:`VoxelKeys`."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from dials_diffuse import grid, masks
from dials_diffuse.extraction.context import PanelPixels


class VoxelKeys:
    """Voxel keys of pixels from their q: key = sum_a (rint(ndiv_a hkl_a) -
    lower_a) * stride_a with hkl = M^-1 q, in one image's key box.

    Each grid coordinate is (m_a0 qx + m_a1 qy) + m_a2 qz in float32, every
    product and sum rounded on its own: the compiled kernel
    (:mod:`kernels`) does the same operations, so both give the same keys
    (a BLAS product may fuse them and move a pixel on a voxel boundary).
    """

    def __init__(self, setting_inv, ndiv, lower, extent):
        self.dtype = np.int32 if np.prod(extent) < 2**31 else np.int64
        self.strides = [int(extent[1] * extent[2]), int(extent[2]), 1]
        self.lower = np.asarray(lower, np.float32)
        self.to_grid = (np.asarray(ndiv, float)[:, None] * setting_inv).astype(np.float32)

    def __call__(self, q_t: np.ndarray) -> np.ndarray:
        """Keys of the (3, n) float32 q of n pixels."""
        keys = None
        product = np.empty(q_t.shape[1], np.float32)
        for axis, row in enumerate(self.to_grid):
            g = np.multiply(row[0], q_t[0])
            np.multiply(row[1], q_t[1], out=product)
            g += product
            np.multiply(row[2], q_t[2], out=product)
            g += product
            np.rint(g, out=g)
            g -= self.lower[axis]
            term = g.astype(self.dtype)
            if self.strides[axis] != 1:
                term *= self.dtype(self.strides[axis])
            if keys is None:
                keys = term
            else:
                keys += term
        return keys


@dataclasses.dataclass
class PanelImage:
    """One image's arrays on a panel's raster (flattened), with its gain
    (photons per count) and trusted range."""

    counts: np.ndarray
    bragg: np.ndarray  # True = no Bragg peak
    background: Optional[np.ndarray]
    usable: np.ndarray  # static, resolution and dynamic masks
    gain: float
    trusted_range: tuple


def intensity_filter(pp, panel, f, bg_constant, t_exp):
    """filter.min_intensity / max_intensity on the corrected intensity as a
    bool raster, or None when neither is set."""
    if f.min_intensity is None and f.max_intensity is None:
        return None
    signal = panel.counts * panel.gain - (
        bg_constant if panel.background is None else panel.background)
    with np.errstate(divide="ignore", invalid="ignore"):
        intensity = signal / (pp.factor * t_exp)
    keep = np.ones(intensity.shape, bool)
    if f.min_intensity is not None:
        keep &= intensity >= f.min_intensity
    if f.max_intensity is not None:
        keep &= intensity <= f.max_intensity
    return keep


def panel_voxels_compiled(pp, panel, intensity_keep, key_maker, table):
    """One panel through the compiled kernel: its voxel sums go into
    ``table``. Returns the runs' layout and the pixels kept after the trusted
    range, the Bragg mask and the intensity filter."""
    bragg_keep = panel.bragg if intensity_keep is None else panel.bragg & intensity_keep
    layout, (n_trusted, n_kept) = table.add_panel(
        pp.q_t, panel.counts, panel.usable, bragg_keep, panel.trusted_range, pp.factor,
        panel.background, panel.gain, key_maker.to_grid, key_maker.lower, key_maker.strides,
        key_maker.dtype)
    n_bragg = n_kept
    if intensity_keep is not None:  # the filters are rare: counted apart
        n_bragg = int(np.count_nonzero(
            masks.within_trusted_range(panel.counts, panel.trusted_range)
            & panel.usable & panel.bragg))
    return layout, (n_trusted, n_bragg, n_kept)


def panel_voxels_numpy(pp, panel, intensity_keep, key_maker, block_voxels):
    """One panel in numpy, in blocks of rows: the blocks' voxel sums are
    appended to ``block_voxels``. Returns what panel_voxels_compiled does."""
    pieces = []
    n_trusted = n_bragg = n_kept = 0
    # blocks of rows: the dozen passes over each block stay in the CPU
    # cache (1.6x faster than whole-panel passes on a Pilatus 6M)
    for block in pp.blocks():
        counts = panel.counts[block]
        keep = masks.within_trusted_range(counts, panel.trusted_range)
        keep &= panel.usable[block]
        n_trusted += int(np.count_nonzero(keep))
        keep &= panel.bragg[block]
        n_bragg += int(np.count_nonzero(keep))
        if intensity_keep is not None:
            keep &= intensity_keep[block]
        n_kept += int(np.count_nonzero(keep))
        bg = None if panel.background is None else panel.background[block]
        layout, voxels = _block_runs(pp, block, counts, bg, keep, key_maker, panel.gain)
        pieces.append(layout)
        block_voxels.append(voxels)
    layout = {k: np.concatenate([r[k] for r in pieces]) for k in pieces[0]}
    return layout, (n_trusted, n_bragg, n_kept)


def _block_runs(pp: PanelPixels, block: slice, counts, background, keep, key_maker, gain):
    """Runs of equal voxel keys among the kept pixels of a block of a panel's
    raster, and the block's voxel sums.

    Returns ({first raster index, length} of each run, (voxel keys, pixel
    counts, dict of sums of photons (gain x counts), factor, q and
    background)); no per-pixel
    array is gathered.
    """
    keys = key_maker(pp.q_t[:, block])
    np.copyto(keys, keys.dtype.type(-1), where=~keep)

    n = keys.size
    start = np.flatnonzero(keys[1:] != keys[:-1])
    start += 1
    start = np.concatenate([[0], start])
    end = np.append(start[1:], n)
    valid = keys[start] >= 0
    start, end = start[valid], end[valid]
    run_keys = keys[start]
    # per-run sums as differences of running sums (2.5x faster than
    # np.add.reduceat over all runs); float64 sums of the float32 factor
    # and q, as the compiled kernel's
    count_type = np.int64 if np.issubdtype(counts.dtype, np.integer) else np.float64
    # integer counts are summed exactly, then made photons
    sums = {"photons": _run_sums(counts, start, end, count_type) * float(gain),
            "factor": _run_sums(pp.factor[block], start, end, np.float64)}
    q_block = pp.q_t[:, block]
    for axis, name in enumerate(("qx", "qy", "qz")):
        sums[name] = _run_sums(q_block[axis], start, end, np.float64)
    if background is not None:
        sums["background"] = _run_sums(background, start, end, np.float64)
    start += block.start
    end += block.start
    layout = {"start": start, "n": end - start}
    # merging the block's runs here, while they are in the cache, leaves
    # ~1/10 of them for the image-wide sort (each voxel spans ~11 rows)
    return layout, grid.combine_runs(run_keys, layout["n"], sums)


def _run_sums(values, start, end, dtype):
    """Sums of values[start:end] for each run."""
    running = np.empty(values.size + 1, dtype)
    running[0] = 0
    np.cumsum(values, dtype=dtype, out=running[1:])
    return running.take(end) - running.take(start)
