"""What stays the same from image to image on one detector and beam
(:class:`DetectorContext`): per panel the pixel raster, the static mask,
lab-frame q and the product of the static corrections, with the
process-wide cache of contexts and per-pixel geometry (inherited by forked
workers)."""

from __future__ import annotations

import dataclasses
import logging
from typing import List

import numpy as np

from dials.util import Sorry

from dials_diffuse import corrections, geometry, masks

logger = logging.getLogger("dials.diffuse_extract")


@dataclasses.dataclass
class PanelPixels:
    """One panel's pixel raster (every ``step``-th pixel along slow and fast)
    with everything about it that is the same on every image.

    Per-image work runs over the whole raster in raster order, never gathering
    the kept pixels: the runs of equal voxel keys along a row are contiguous
    ranges of kept pixels, summed run by run.
    """

    panel_id: int
    step: int
    shape: tuple  # raster (n_slow, n_fast)
    selected: np.ndarray  # (n,) bool: passes the static mask and the resolution limits
    q_t: np.ndarray  # (3, n) float32 lab-frame q (1/Angstrom) of every raster pixel
    factor: np.ndarray  # (n,) float32 P * Omega * eta * T_air (exposure applied per image); 0 if not selected
    # each correction factor separately, float32, on every parts_step-th
    # raster row and column (the correction sample's pixels)
    parts: dict
    parts_step: int
    n_static: int  # raster pixels passing the static mask
    n_selected: int  # raster pixels in ``selected`` (counted once, used per image)

    @property
    def n_total(self):
        return self.selected.size

    def raster(self, image: np.ndarray) -> np.ndarray:
        """A full-resolution (slow, fast) panel array on this raster, flattened."""
        if self.step == 1:
            return image.reshape(-1)
        return np.ascontiguousarray(image[:: self.step, :: self.step]).reshape(-1)

    def blocks(self, rows: int = 64):
        """Slices of the raster covering ``rows`` rows each."""
        n_slow, n_fast = self.shape
        return [slice(r * n_fast, min(r + rows, n_slow) * n_fast) for r in range(0, n_slow, rows)]

    @property
    def parts_shape(self):
        """(rows, columns) of the grid of ``parts``."""
        return parts_grid_shape(self.shape, self.parts_step)

    def parts_index(self, index: np.ndarray) -> np.ndarray:
        """Positions in ``parts`` of raster indices on its grid."""
        row, column = np.divmod(index, self.shape[1])
        return (row // self.parts_step) * self.parts_shape[1] + column // self.parts_step

    def slow_fast(self, index: np.ndarray):
        """Full-resolution (slow, fast) pixel coordinates of raster indices."""
        slow, fast = np.divmod(index, self.shape[1])
        return (slow * self.step).astype(np.int32), (fast * self.step).astype(np.int32)


@dataclasses.dataclass
class DetectorContext:
    """What does not change between images that share a detector and beam."""

    panels: List[PanelPixels]
    static_full: List[np.ndarray]  # static mask of every pixel (for mask output)
    predictions: dict  # cache of Bragg predictions of rotation experiments
    q_max: float  # largest |q| of a selected pixel (bounds the voxel key box)
    dynamic_cache: dict = dataclasses.field(default_factory=dict)

    def usable(self, dynamic_mask):
        """Per panel: selected pixels that the dynamic mask keeps, and their number
        (computed once per dynamic mask)."""
        if dynamic_mask is None:
            return [(pp.selected, pp.n_selected) for pp in self.panels]
        if self.dynamic_cache.get("source") is not dynamic_mask:
            usable = [pp.selected & pp.raster(dynamic_mask[pp.panel_id]) for pp in self.panels]
            self.dynamic_cache = {
                "source": dynamic_mask,
                "usable": [(u, int(np.count_nonzero(u))) for u in usable],
            }
        return self.dynamic_cache["usable"]


#: raster rows per block of the context's computation: its float64
#: temporaries (~4 MB) are reused from block to block instead of each being
#: fresh memory for the whole panel (page faults were most of the cost)
CONTEXT_BLOCK_PIXELS = 2**17

#: the correction factors one by one are kept on every n-th raster row and
#: column (the correction sample's pixels): all of them were 100 MB of a 6M
#: context, and fresh memory is most of a context's cost
CORRECTION_PARTS_STEP = 8


def parts_grid_shape(shape, parts_step):
    """(rows, columns) of every parts_step-th row and column of a raster."""
    return (-(-shape[0] // parts_step), -(-shape[1] // parts_step))


def detector_context(experiment, imageset, params, static_mask,
                     geometries=None, parts_step=CORRECTION_PARTS_STEP) -> DetectorContext:
    """The per-pixel context of an experiment's detector and beam, computed
    in blocks of raster rows into its float32 arrays. ``geometries``: a
    list, per panel, of the blocks' PanelGeometry; filled when empty, used
    when not (the beam-independent part, shared by contexts of one
    detector); ``parts_step``: the grid of the separate correction factors
    (1: every pixel)."""
    if CORRECTION_PARTS_STEP % parts_step:
        raise ValueError(f"parts_step {parts_step} must divide {CORRECTION_PARTS_STEP}")
    beam, detector = experiment.beam, experiment.detector
    reuse = bool(geometries)
    step = params.filter.pixel_step
    panels = []
    q_max = 0.0
    for pid, panel in enumerate(detector):
        n_fast, n_slow = panel.get_image_size()
        shape = (-(-n_slow // step), -(-n_fast // step))
        n = shape[0] * shape[1]
        q_t = np.empty((3, n), np.float32)
        factor = np.empty(n, np.float32)
        parts = {k: np.empty(parts_grid_shape(shape, parts_step), np.float32)
                 for k in CORRECTION_PARTS}
        selected = np.empty(n, bool)
        static_raster = np.ascontiguousarray(static_mask[pid][::step, ::step]).reshape(-1)
        n_static = 0
        # blocks of whole multiples of CORRECTION_PARTS_STEP rows, whatever
        # parts_step (a divisor of it): every block starts on a parts row,
        # and the blocks of kept geometries match every context's
        rows_per_block = CORRECTION_PARTS_STEP * max(
            1, CONTEXT_BLOCK_PIXELS // (shape[1] * CORRECTION_PARTS_STEP))
        if geometries is not None and not reuse:
            geometries.append([])
        for k, first in enumerate(range(0, shape[0], rows_per_block)):
            if reuse:
                g = geometries[pid][k]
            else:
                g = geometry.panel_geometry(panel, pid, step, slice(first, first + rows_per_block))
                if geometries is not None:
                    g.lab_mm = None  # not needed again: distance and direction are kept
                    geometries[pid].append(g)
            block = slice(first * shape[1], first * shape[1] + g.n_pixels)
            static = static_raster[block]
            n_static += int(np.count_nonzero(static))
            block_parts, block_selected, block_q_max = _context_block(
                g, panel, beam, static, params, q_t[:, block])
            selected[block] = block_selected
            q_max = max(q_max, block_q_max)
            on_grid = slice(first // parts_step, -(-(first + g.n_pixels // shape[1]) // parts_step))
            for name in CORRECTION_PARTS:
                part = getattr(block_parts, name).reshape(-1, shape[1])
                parts[name][on_grid] = part[::parts_step, ::parts_step]
            # 0 outside the selection: a non-finite factor there cannot
            # spread through the numpy path's running sums
            factor[block] = np.where(block_selected, block_parts.total, 0.0)
        panels.append(
            PanelPixels(
                panel_id=pid,
                step=step,
                shape=shape,
                selected=selected,
                # float32 halves the memory traffic of the per-image passes;
                # 7 digits are ample for binning and for the factors
                q_t=q_t,
                factor=factor,
                parts={k: v.reshape(-1) for k, v in parts.items()},
                parts_step=parts_step,
                n_static=n_static,
                n_selected=int(np.count_nonzero(selected)),
            )
        )
    return DetectorContext(panels=panels, static_full=static_mask, predictions={}, q_max=q_max)


#: the correction factors kept one by one (for the correction sample)
CORRECTION_PARTS = ("polarization", "solid_angle", "efficiency", "air")


def _context_block(g, panel, beam, static, params, q_t_out):
    """One block of raster rows: its correction factors, which pixels are
    selected (static mask and resolution limits) and their largest |q|;
    writes its q into ``q_t_out`` (3, n) float32."""
    c = params.corrections
    f = params.filter
    parts = corrections.correction_factors(
        g,
        beam,
        panel,
        polarization=c.polarization,
        solid_angle_on=c.solid_angle,
        efficiency=c.efficiency,
        air=c.air,
        air_temperature_k=c.air_temperature,
        air_pressure_atm=c.air_pressure,
        polarization_fraction=c.polarization_fraction,
    )
    q = geometry.scattering_vectors(g.unit_s1, beam.get_s0())
    q_t_out[...] = q.T
    qmag = np.sqrt(np.einsum("ij,ij->i", q, q))
    selected = static.copy()
    if f.d_min is not None:
        selected &= qmag <= 1.0 / f.d_min
    if f.d_max is not None:
        selected &= qmag >= 1.0 / f.d_max
    q_max = float(qmag[selected].max()) if selected.any() else 0.0
    return parts, selected, q_max


def panel_gains(detector, params) -> List[float]:
    """Photons per count of each panel: corrections.gain, else the inverse of
    dxtbx's Panel.get_gain() (counts per photon)."""
    if params.corrections.gain is not None:
        return [float(params.corrections.gain)] * len(detector)
    gains = []
    for i, panel in enumerate(detector):
        counts_per_photon = panel.get_gain()
        if not counts_per_photon > 0:
            raise Sorry(f"detector panel {i} has gain {counts_per_photon}: set corrections.gain")
        gains.append(1.0 / counts_per_photon)
    return gains


def gain_metadata(gains):
    """One gain, or one per panel when they differ (for the file metadata)."""
    return gains[0] if len(set(gains)) == 1 else gains


# Per-process state: contexts are expensive (per-pixel geometry), computed once
# per process and inherited by forked workers. Stills refined one by one have
# a beam each, so a context (~200 MB for 6M pixels) serves one image: only the
# most recent few are kept. The beam-independent per-pixel geometry of a
# detector (~300 MB for 6M pixels) is kept from its second context on: a
# rotation sweep, one beam, never needs it again.
MAX_CONTEXTS = 2
_CONTEXTS = []  # (detector, beam, DetectorContext), most recently used last
_GEOMETRIES = []  # (detector, pixel_step, per panel [block PanelGeometry]) of the latest detector
_BUILT_ONCE = []  # (detector, pixel_step) whose first context was built without keeping it


def clear_caches():
    """Forget every context and geometry (they depend on a run's parameters)."""
    _CONTEXTS.clear()
    _GEOMETRIES.clear()
    _BUILT_ONCE.clear()


def context_for(task, params, parts_step=CORRECTION_PARTS_STEP):
    """The task's context (cached); ``parts_step``: see detector_context
    (a cached context with another grid is made again)."""
    context = _find_context(_CONTEXTS, task, parts_step)
    if context is None:
        static = masks.static_mask(task.imageset, params.masking, params.masking.beamstop)
        context = detector_context(task.experiment, task.imageset, params, static,
                                   _panel_geometries(task.experiment.detector, params),
                                   parts_step)
        _CONTEXTS.append((task.experiment.detector, task.experiment.beam, context))
        del _CONTEXTS[:-MAX_CONTEXTS]
    return context


def _panel_geometries(detector, params):
    """The geometry list detector_context fills or reuses; None for a
    detector's first context (nothing kept)."""
    step = params.filter.pixel_step
    for known, known_step, geometries in _GEOMETRIES:
        if known_step == step and known == detector:
            return geometries
    if not any(s == step and d == detector for d, s in _BUILT_ONCE):
        _BUILT_ONCE[:] = [(detector, step)]
        return None
    _GEOMETRIES[:] = [(detector, step, [])]
    return _GEOMETRIES[0][2]


def _find_context(contexts, task, parts_step):
    for detector, beam, context in contexts:
        if (task.experiment.detector == detector and task.experiment.beam == beam
                and all(pp.parts_step == parts_step for pp in context.panels)):
            return context
    return None
