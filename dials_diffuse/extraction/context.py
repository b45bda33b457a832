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
from dials_diffuse.compiled import lazy_jit

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
                g, panel, beam, static, params, q_t[:, block], factor[block])
            selected[block] = block_selected
            q_max = max(q_max, block_q_max)
            on_grid = slice(first // parts_step, -(-(first + g.n_pixels // shape[1]) // parts_step))
            for name in CORRECTION_PARTS:
                part = getattr(block_parts, name).reshape(-1, shape[1])
                parts[name][on_grid] = part[::parts_step, ::parts_step]
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


def _context_block(g, panel, beam, static, params, q_t_out, factor_out):
    """One block of raster rows: its correction factors, which pixels are
    selected (static mask and resolution limits) and their largest |q|;
    writes its q into ``q_t_out`` (3, n) float32 and the product of the
    factors into ``factor_out`` (float32, 0 outside the selection: a
    non-finite factor there cannot spread through the running sums)."""
    kernel = None if params.kernel == "numpy" else lazy_jit("context.beam_block",
                                                            _define_beam_block)
    if kernel is not None:
        return _context_block_compiled(kernel, g, panel, beam, static, params, q_t_out,
                                       factor_out)
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
    factor_out[...] = np.where(selected, parts.total, 0.0)
    return parts, selected, q_max


def _sensor_efficiency(g, panel, c):
    """The block's sensor efficiency (1 where switched off), kept on its
    geometry: it depends on the detector only, so stills refined one by one
    (a beam each) compute it once per detector."""
    cache = g.__dict__.setdefault("_efficiency", {})
    key = c.efficiency and (panel.get_mu(), panel.get_thickness())
    if key not in cache:
        cache.clear()
        cache[key] = (corrections.sensor_efficiency(g, panel.get_mu(), panel.get_thickness())
                      if c.efficiency else np.ones(g.n_pixels))
    return cache[key]


def _context_block_compiled(kernel, g, panel, beam, static, params, q_t_out, factor_out):
    """_context_block with the beam-dependent part (polarization, q, |q|,
    selection, the product of the factors) in one compiled pass: the same
    formulas (corrections.polarization_factor, geometry.scattering_vectors)
    without their 6M-size temporaries (0.47 of the 0.63 s a still's context
    took)."""
    c, f = params.corrections, params.filter
    efficiency = _sensor_efficiency(g, panel, c)
    solid = g.solid_angle_sr if c.solid_angle else np.ones(g.n_pixels)
    # air: exp(-mu_air(lambda) r) in the pass (stills' wavelengths differ)
    mu_air = corrections.air_attenuation_coefficient(
        beam.get_wavelength(), c.air_temperature, c.air_pressure) if c.air else 0.0
    air = np.empty(g.n_pixels) if c.air else np.ones(g.n_pixels)
    s0 = np.asarray(beam.get_s0(), np.float64)
    s0_len = float(np.linalg.norm(s0))
    normal = np.asarray(beam.get_polarization_normal(), np.float64)
    pf = beam.get_polarization_fraction() if c.polarization_fraction is None \
        else c.polarization_fraction
    polarization = np.empty(g.n_pixels) if c.polarization else np.ones(g.n_pixels)
    selected = np.empty(g.n_pixels, bool)
    q_max = kernel(
        np.ascontiguousarray(g.unit_s1, np.float64), solid, efficiency, g.distance_mm,
        bool(c.air), mu_air, air, static, s0, s0_len, s0 / s0_len,
        normal / np.linalg.norm(normal), float(pf), bool(c.polarization),
        -1.0 if f.d_max is None else 1.0 / f.d_max, np.inf if f.d_min is None else 1.0 / f.d_min,
        q_t_out, polarization, selected, factor_out)
    parts = corrections.CorrectionFactors(polarization=polarization, solid_angle=solid,
                                          efficiency=efficiency, air=air)
    return parts, selected, float(q_max)


def _define_beam_block(jit):
    @jit
    def beam_block(unit_s1, solid, efficiency, distance, air_on, mu_air, air, static, s0,
                   s0_len, s0_hat, normal, pf, polarization_on, q_lo, q_hi, q_t, polarization,
                   selected, factor):
        """Per pixel: P = (1 - 2 pf)(1 - (n.s1)^2) + pf (1 + (s0.s1)^2), T =
        exp(-mu_air r), q = s1 |s0| - s0 (float32 out), selected = static
        and q_lo <= |q| <= q_hi, factor = P Omega eta T there (0 elsewhere);
        returns the largest selected |q| (0 if none)."""
        q_max = 0.0
        a = 1.0 - 2.0 * pf
        for i in range(unit_s1.shape[0]):
            if air_on:
                air[i] = np.exp(-mu_air * distance[i])
            u0, u1, u2 = unit_s1[i, 0], unit_s1[i, 1], unit_s1[i, 2]
            p = 1.0
            if polarization_on:
                n_dot = u0 * normal[0] + u1 * normal[1] + u2 * normal[2]
                s0_dot = u0 * s0_hat[0] + u1 * s0_hat[1] + u2 * s0_hat[2]
                p = a * (1.0 - n_dot * n_dot) + pf * (1.0 + s0_dot * s0_dot)
                polarization[i] = p
            q0 = u0 * s0_len - s0[0]
            q1 = u1 * s0_len - s0[1]
            q2 = u2 * s0_len - s0[2]
            q_t[0, i] = np.float32(q0)
            q_t[1, i] = np.float32(q1)
            q_t[2, i] = np.float32(q2)
            qmag = np.sqrt(q0 * q0 + q1 * q1 + q2 * q2)
            keep = static[i] and qmag >= q_lo and qmag <= q_hi
            selected[i] = keep
            if keep:
                factor[i] = np.float32(p * solid[i] * efficiency[i] * air[i])
                if qmag > q_max:
                    q_max = qmag
            else:
                factor[i] = np.float32(0.0)
        return q_max

    return beam_block


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
        if known_step == step and _same_detector(known, detector):
            return geometries
    if not any(s == step and _same_detector(d, detector) for d, s in _BUILT_ONCE):
        _BUILT_ONCE[:] = [(detector, step)]
        return None
    _GEOMETRIES[:] = [(detector, step, [])]
    return _GEOMETRIES[0][2]


def _find_context(contexts, task, parts_step):
    for detector, beam, context in contexts:
        if (_same_detector(task.experiment.detector, detector)
                and _same_beam(task.experiment.beam, beam)
                and all(pp.parts_step == parts_step for pp in context.panels)):
            return context
    return None


# Models are matched exactly, not by dxtbx's ==, which takes two beams (or
# detectors) within 1e-6 for the same: refined stills' beams differ by less,
# and an image would get another image's context or not depending on which
# images its process had extracted before (measured on the thaumatin stills:
# 2 of 15 images, two pixels at the resolution limit and q to 1e-6).
def _same_beam(a, b) -> bool:
    return a is b or (a.get_s0() == b.get_s0()
                      and a.get_polarization_normal() == b.get_polarization_normal()
                      and a.get_polarization_fraction() == b.get_polarization_fraction())


def _same_detector(a, b) -> bool:
    return a is b or a.to_dict() == b.to_dict()
