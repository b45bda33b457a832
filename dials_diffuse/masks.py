"""Pixel masks: static, dynamic (hot/dead) and trusted range (Bragg masks:
``bragg``).

Every mask here is a list (one per panel) of numpy bool arrays of shape
(slow, fast) with True = use the pixel, the dxtbx convention. ``to_flex`` turns
one into the tuple of ``flex.bool`` that DIALS mask pickles hold.
"""

from __future__ import annotations

import logging
from typing import List, Sequence

import numpy as np
from dxtbx import flumpy
import dials.util.masking
from scipy.ndimage import median_filter

logger = logging.getLogger("dials.diffuse_extract")

PanelMasks = List[np.ndarray]


def to_flex(masks: PanelMasks):
    """Tuple of flex.bool per panel: what ``dials.image_viewer mask=`` reads."""
    return tuple(flumpy.from_numpy(np.ascontiguousarray(m)) for m in masks)


def from_flex(masks) -> PanelMasks:
    return [flumpy.to_numpy(m).astype(bool) for m in masks]


def static_mask(imageset, masking_params, beamstop_params=None) -> PanelMasks:
    """dxtbx's static mask and DIALS' masking regions, plus a beamstop shape.

    ``masking_params`` is an extract of ``dials.util.masking.phil_scope``
    (border, untrusted panels/rectangles/circles/polygons/pixels, d_min, d_max,
    resolution ranges, ice rings). The trusted range depends on the counts and
    is applied per image by ``trusted_range_mask``.
    """

    # phil_scope.extract() (without fetch) yields one all-default "untrusted"
    # element, which generate_mask reads as "mask panel 0": drop such elements
    regions = list(masking_params.untrusted)
    masking_params.untrusted = [
        r for r in regions
        if r.panel is not None or any([r.circle, r.rectangle, r.polygon, r.pixel])
    ]
    try:
        dials_mask = dials.util.masking.generate_mask(imageset, masking_params)
    finally:
        masking_params.untrusted = regions
    masks = from_flex(dials_mask)
    external = imageset.external_lookup.mask.data
    if not external.empty():
        for i in range(external.n_tiles()):
            masks[i] &= flumpy.to_numpy(external.tile(i).data()).astype(bool)
    if beamstop_params is not None:
        apply_beamstop(masks, beamstop_params)
    return masks


def apply_beamstop(masks: PanelMasks, beamstop) -> None:
    """Mask a beamstop circle or rectangle (pixel coordinates of one panel)."""
    if beamstop.type is None or beamstop.type == "none":
        return
    mask = masks[beamstop.panel]
    n_slow, n_fast = mask.shape
    slow, fast = np.ogrid[0:n_slow, 0:n_fast]
    if beamstop.type == "circle":
        inside = (fast + 0.5 - beamstop.center[0]) ** 2 + (
            slow + 0.5 - beamstop.center[1]
        ) ** 2 <= beamstop.radius**2
    else:
        x0, x1, y0, y1 = beamstop.rectangle
        inside = (fast >= x0) & (fast < x1) & (slow >= y0) & (slow < y1)
    mask &= ~inside


def trusted_range_mask(detector, raw_data: Sequence[np.ndarray]) -> PanelMasks:
    """dxtbx's rule: low < value < high, per panel."""
    return [within_trusted_range(data, panel.get_trusted_range())
            for panel, data in zip(detector, raw_data)]


def within_trusted_range(data: np.ndarray, trusted_range) -> np.ndarray:
    """low < value < high for one array, (low, high) a panel's trusted range."""
    low, high = trusted_range
    if np.issubdtype(data.dtype, np.integer):
        # for integers low < v < high <=> floor(low) < v < ceil(high),
        # compared without converting the image to float64
        low, high = int(np.floor(low)), int(np.ceil(high))
    mask = data > low
    mask &= data < high
    return mask


def _row_blocks(n_rows: int, rows: int = 64):
    return [slice(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]


class DynamicMaskAccumulator:
    """Finds hot and dead pixels from a pass over all images of a run.

    Only per-pixel sums are kept (memory independent of the number of images):
    the counts, and how often a pixel was at or above ``hot_threshold``.
    """

    def __init__(self, detector, hot_threshold=None, hot_fraction=0.5,
                 hot_ratio=20.0, dead_min_expected_counts=20.0):
        self.detector = detector
        self.hot_threshold = hot_threshold
        self.hot_fraction = hot_fraction
        self.hot_ratio = hot_ratio
        self.dead_min_expected_counts = dead_min_expected_counts
        shapes = [tuple(reversed(p.get_image_size())) for p in detector]
        # integer counts are summed exactly (int64); float images in float64
        self.sum_counts = [np.zeros(s, np.int64) for s in shapes]
        self.n_hot = [np.zeros(s, np.int32) for s in shapes]
        self.n_valid = [np.zeros(s, np.int32) for s in shapes]
        self.n_images = 0

    def add_sums(self, sums) -> None:
        """Add another accumulator's (sum_counts, n_hot, n_valid, n_images)."""
        sum_counts, n_hot, n_valid, n_images = sums
        for i, theirs in enumerate(sum_counts):
            if theirs.dtype != self.sum_counts[i].dtype:
                self.sum_counts[i] = self.sum_counts[i].astype(np.float64)
            self.sum_counts[i] += theirs
        for mine, theirs in zip(self.n_hot + self.n_valid, n_hot + n_valid):
            mine += theirs
        self.n_images += n_images

    def add(self, raw_data: Sequence[np.ndarray], add_panel=None) -> None:
        """Add one image (valid pixels: dxtbx's trusted-range rule).
        ``add_panel(data, low, high, threshold, sum_counts, n_hot, n_valid)``:
        a compiled equivalent of the numpy sums below (in place)."""
        self.n_images += 1
        for i, (panel, data) in enumerate(zip(self.detector, raw_data)):
            low, high = panel.get_trusted_range()
            threshold = self.hot_threshold if self.hot_threshold is not None else high
            if np.issubdtype(data.dtype, np.integer):
                # integer comparisons (no float64 temporaries); same rule
                threshold = int(np.ceil(threshold))
            elif self.sum_counts[i].dtype != np.float64:
                self.sum_counts[i] = self.sum_counts[i].astype(np.float64)
            if add_panel is not None:
                add_panel(data, low, high, threshold, self.sum_counts[i], self.n_hot[i],
                          self.n_valid[i])
                continue
            # blocks of rows keep the temporaries in the CPU cache (1.6x faster)
            for rows in _row_blocks(data.shape[0]):
                block = data[rows]
                valid = trusted_range_mask([panel], [block])[0]
                self.n_hot[i][rows][block >= threshold] += 1
                self.n_valid[i][rows] += valid
                self.sum_counts[i][rows] += block * valid

    def masks(self, local_median=None, compiled=None) -> PanelMasks:
        """Per panel: True where the pixel is neither hot nor dead.
        ``local_median(a)``: the local level below (a compiled equivalent
        may be given; default scipy's median filters). ``compiled``: the
        extraction kernels module, whose mean_counts and dynamic_verdict
        give the same masks with one temporary instead of eight."""
        local_median = local_median or local_level_median

        result = []
        hot_min = self.hot_fraction * max(self.n_images, 1)
        for i in range(len(self.sum_counts)):
            if compiled is not None:
                mean = compiled.mean_counts(self.sum_counts[i], self.n_valid[i])
                result.append(compiled.dynamic_verdict(
                    mean, local_median(mean), self.sum_counts[i], self.n_hot[i],
                    self.n_valid[i], hot_min, self.hot_ratio, self.dead_min_expected_counts))
                continue
            n_valid = np.maximum(self.n_valid[i], 1)
            mean = self.sum_counts[i] / n_valid
            local = local_median(mean)
            hot = self.n_hot[i] >= hot_min
            hot |= mean > self.hot_ratio * local + 10.0
            # a pixel is dead only where its neighbours make all-zero counts
            # implausible (P = exp(-expected) < 2e-9 at the default)
            dead = (self.sum_counts[i] == 0) & (
                local * self.n_valid[i] >= self.dead_min_expected_counts
            )
            result.append(~(hot | dead))
        return result


def local_level_median(image: np.ndarray) -> np.ndarray:
    """The dynamic mask's local level: the median over 5 rows of 5-pixel row
    medians (edges repeated), robust like the 5 x 5 median and 5x faster on
    a Pilatus 6M panel."""
    return median_filter(
        median_filter(image, size=(1, 5), mode="nearest"), size=(5, 1), mode="nearest"
    )
