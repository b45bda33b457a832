"""Bragg masks: the pixels of each image that Bragg peaks reach.

Every mask here is a list (one per panel) of numpy bool arrays of shape
(slow, fast) with True = use the pixel (no Bragg peak there).

* Rotation images (``ScanBraggPredictions``): every reflection predicted for
  the scan, with the frames its rocking curve reaches and the detector box its
  spot covers, from DIALS' Gaussian reciprocal-space profile model
  (sigma_b, the beam divergence, and sigma_m, the mosaicity). As DIALS'
  bounding-box calculator does, a reflection at rotation angle phi_c reaches
  phi_c +- n_sigma sigma_m / |zeta| (zeta the Lorentz term: spots near the
  rotation axis last for many frames) and covers the detector box of the rays
  at +- n_sigma sigma_b about its diffracted beam.
* Stills (``stills_bragg_positions``): discs round every reflection within
  ``max_delpsi`` of the Ewald sphere.
* Found spots (``shoebox_mask``): the foreground pixels of a strong or indexed
  reflection table on the image's absolute frame (catches ice, satellites and
  second lattices, which no crystal model predicts).

Frames are absolute array indices throughout (``geometry.absolute_frame``),
as in ``xyzcal.px`` z and shoebox z.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import numpy as np
from cctbx.array_family import flex as cctbx_flex
from dxtbx import flumpy
from dxtbx.model.experiment_list import ExperimentList
from scipy.ndimage import binary_dilation

from dials.algorithms.profile_model.factory import phil_scope as profile_phil_scope
from dials.algorithms.profile_model.gaussian_rs import BBoxCalculator3D
from dials.algorithms.profile_model.gaussian_rs import Model as GaussianRSModel
from dials.algorithms.shoebox import MaskCode
from dials.algorithms.spot_prediction import StillsReflectionPredictor
from dials.algorithms.spot_prediction import ScanStaticReflectionPredictor
from dials.array_family import flex

logger = logging.getLogger("dials.diffuse_extract")

PanelMasks = List[np.ndarray]

# Used when neither the parameters, the experiment's profile model nor indexed
# spots give the widths: generous for most crystals (DIALS' sigma_m of
# well-ordered protein and small-molecule crystals is typically 0.03-0.15 deg).
FALLBACK_SIGMA_M_DEG = 0.2
FALLBACK_SIGMA_B_DEG = 0.1
# |zeta| below this is treated as this: a reflection on the rotation axis
# would otherwise reach every frame of the scan
MIN_ZETA = 0.02
# the rocking reach is capped, so prediction padding stays bounded
MAX_REACH_DEG = 10.0
# fewer indexed spots than DIALS' integration asks for still give a usable
# estimate; a small-molecule sweep has only tens
MIN_SPOTS_FOR_PROFILE = 10


@dataclasses.dataclass
class ProfileWidths:
    """The Gaussian RS widths of one rotation experiment (degrees)."""

    sigma_b_deg: float
    sigma_m_deg: float
    source: str  # parameters, experiment profile, indexed spots or fallback


def profile_widths(models, reflections, bragg_params) -> dict:
    """ProfileWidths for every rotation experiment of ``models`` (by index).

    Precedence: ``masking.bragg.mosaicity_deg`` / ``beam_divergence_deg``,
    the experiment's own gaussian_rs profile (integrated.expt), an estimate
    from the indexed spots the way ``dials.integrate`` makes one, a fallback.
    """
    rotation = [i for i, e in enumerate(models) if not _is_still(e)]
    if not rotation:
        return {}
    estimated = {}
    needs_estimate = [i for i in rotation if _profile_of(models[i]) is None]
    if needs_estimate and _indexed_with_shoeboxes(reflections):
        estimated = _estimate_from_spots(models, reflections)
    widths = {}
    for i in rotation:
        source, (sigma_b, sigma_m) = "fallback", (FALLBACK_SIGMA_B_DEG, FALLBACK_SIGMA_M_DEG)
        if _profile_of(models[i]) is not None:
            source, (sigma_b, sigma_m) = "experiment profile", _profile_of(models[i])
        elif i in estimated:
            source, (sigma_b, sigma_m) = "indexed spots", estimated[i]
        if bragg_params.beam_divergence_deg is not None:
            sigma_b = bragg_params.beam_divergence_deg
        if bragg_params.mosaicity_deg is not None:
            sigma_m = bragg_params.mosaicity_deg
        if bragg_params.beam_divergence_deg is not None or bragg_params.mosaicity_deg is not None:
            source = "parameters" if source == "fallback" else source + " and parameters"
        widths[i] = ProfileWidths(float(sigma_b), float(sigma_m), source)
        logger.info(
            "Bragg mask of experiment %d: sigma_b %.4f deg, sigma_m %.4f deg (%s), n_sigma %g",
            i, sigma_b, sigma_m, source, bragg_params.n_sigma,
        )
        if source == "fallback":
            logger.warning(
                "No profile model for experiment %d: the rotation Bragg mask uses "
                "sigma_b %.2f and sigma_m %.2f deg. Give indexed.refl or refined.refl "
                "to estimate them from the spots, or set masking.bragg.mosaicity_deg "
                "and masking.bragg.beam_divergence_deg.", i, sigma_b, sigma_m,
            )
    return widths


def _is_still(experiment):
    return experiment.is_still() or experiment.scan is None or experiment.goniometer is None


def _profile_of(experiment):
    profile = experiment.profile
    if profile is None or not hasattr(profile, "sigma_m"):
        return None
    try:
        return float(profile.sigma_b(deg=True)), float(profile.sigma_m(deg=True))
    except Exception:  # a scan-varying profile: flex arrays
        return float(np.max(profile.sigma_b(deg=True))), float(np.max(profile.sigma_m(deg=True)))


def _indexed_with_shoeboxes(reflections):
    return (
        reflections is not None
        and len(reflections) > 0
        and all(k in reflections for k in ("miller_index", "shoebox", "id", "xyzobs.px.value"))
        and reflections.get_flags(reflections.flags.indexed).count(True) > 0
    )


def _estimate_from_spots(models, reflections) -> dict:
    """sigma_b, sigma_m per rotation experiment from indexed spots: DIALS'
    integration recipe (clean reference, match to predictions, Gaussian RS
    calculator). Experiments without enough spots are left out."""
    # local: 0.9 s of DIALS program imports, needed only for rotation data
    # without a profile model
    from dials_diffuse.dials_programs import filter_reference_pixels, process_reference

    rotation = ExperimentList([e for e in models if not _is_still(e)])
    index_of = [i for i, e in enumerate(models) if not _is_still(e)]
    params = profile_phil_scope.extract().profile
    params.gaussian_rs.min_spots.overall = MIN_SPOTS_FOR_PROFILE
    params.gaussian_rs.min_spots.per_degree = 0
    out = {}
    try:
        reference = reflections.copy()
        ids = flumpy.to_numpy(reference["id"])
        keep = np.isin(ids, index_of)
        reference = reference.select(flumpy.from_numpy(keep))
        # renumber to the rotation sub-list; identifiers would tie them to models
        new_ids = np.searchsorted(index_of, ids[keep]).astype(np.int32)
        reference["id"] = flumpy.from_numpy(new_ids)
        for key in list(reference.experiment_identifiers().keys()):
            del reference.experiment_identifiers()[key]
        reference, _ = process_reference(reference)
        reference = filter_reference_pixels(reference, rotation)
        predicted = flex.reflection_table.from_predictions_multi(rotation)
        for key in list(predicted.experiment_identifiers().keys()):
            del predicted.experiment_identifiers()[key]
        _, reference, _ = predicted.match_with_reference(reference)
        ref_ids = flumpy.to_numpy(reference["id"])
        for new, expt in enumerate(rotation):
            subset = reference.select(flumpy.from_numpy(ref_ids == new))
            try:
                model = GaussianRSModel.create_from_reflections(
                    params, subset, expt.crystal, expt.beam, expt.detector,
                    expt.goniometer, expt.scan,
                )
            except (RuntimeError, AssertionError) as e:
                logger.info("Profile model of experiment %d not estimated: %s",
                            index_of[new], str(e).strip().splitlines()[0])
                continue
            out[index_of[new]] = (float(model.sigma_b(deg=True)), float(model.sigma_m(deg=True)))
    except (RuntimeError, ValueError, AssertionError, KeyError) as e:
        logger.info("Profile models not estimated from the spots: %s", str(e).strip()[:200])
    return out


@dataclasses.dataclass
class ScanBraggPredictions:
    """Every reflection that reaches a rotation scan: its panel, detector box
    [x0, x1) x [y0, y1) in pixels and the frames [z_lo, z_hi] (absolute,
    continuous) its rocking curve reaches."""

    panel: np.ndarray
    x0: np.ndarray
    x1: np.ndarray
    y0: np.ndarray
    y1: np.ndarray
    z_lo: np.ndarray
    z_hi: np.ndarray

    def on_frame(self, frame: int) -> np.ndarray:
        """Which reflections touch the image of absolute frame ``frame``."""
        return (self.z_lo < frame + 1) & (self.z_hi > frame)


def predict_scan(experiment, d_min: float, padding_deg: float):
    """DIALS' predictions for a rotation scan padded by ``padding_deg`` at each
    end (``flex.reflection_table.from_predictions``), with one difference:
    for a scan-static model the indices come from DIALS' generator over the
    whole resolution sphere, which DIALS itself chooses for scans of more
    than 50 images. Its cost does not grow with the padding: 0.8 s instead
    of 4.3 s for a 10-image Pilatus 6M scan padded by 10 deg, the same
    12170 reflections at the same positions (tests/test_rotation_bragg.py)."""
    models = (experiment.crystal, experiment.beam, experiment.goniometer)
    n_points = experiment.scan.get_num_images() + 1
    scan_varying = any(getattr(m, "num_scan_points", 0) == n_points for m in models)
    if scan_varying or experiment.profile is not None:
        return flex.reflection_table.from_predictions(experiment, dmin=d_min, padding=padding_deg)
    predictor = ScanStaticReflectionPredictor(experiment, dmin=d_min, padding=padding_deg)
    return predictor.for_ub_old_index_generator(experiment.crystal.get_A())


def scan_bragg_predictions(experiment, d_min: float, widths: ProfileWidths,
                           n_sigma: float) -> ScanBraggPredictions:
    """The reflections of a rotation experiment and their rocking reach."""
    scan = experiment.scan
    osc_width = scan.get_oscillation()[1]
    sigma_m = np.radians(widths.sigma_m_deg)
    reach_deg = min(np.degrees(n_sigma * sigma_m / MIN_ZETA), MAX_REACH_DEG)
    # predict beyond the scan's ends: reflections centred outside it still
    # reach its first or last frames
    table = predict_scan(experiment, d_min, float(reach_deg) + abs(osc_width))
    if len(table) == 0:
        empty = np.zeros(0)
        return ScanBraggPredictions(empty.astype(int), *([empty] * 6))
    zeta = np.abs(flumpy.to_numpy(table.compute_zeta(experiment)))
    z_centre = flumpy.to_numpy(table["xyzcal.px"])[:, 2]
    reach = np.minimum(np.degrees(n_sigma * sigma_m / np.maximum(zeta, MIN_ZETA)), MAX_REACH_DEG)
    half_frames = reach / abs(osc_width)
    delta_b = n_sigma * np.radians(widths.sigma_b_deg)
    calculator = BBoxCalculator3D(
        experiment.beam, experiment.detector, experiment.goniometer, scan,
        delta_b, n_sigma * sigma_m,
    )
    # the detector box only (x0, x1, y0, y1): DIALS clamps z to the scan,
    # the frame reach is computed above without the clamp
    first, last = scan.get_array_range()
    frames = flex.double(np.clip(z_centre, first, last - 1e-6))
    boxes = calculator(table["s1"], frames, table["panel"])
    x0, x1, y0, y1, _, _ = (flumpy.to_numpy(p).astype(np.int64) for p in boxes.parts())
    return ScanBraggPredictions(
        panel=flumpy.to_numpy(table["panel"]).astype(np.int64),
        x0=x0, x1=x1, y0=y0, y1=y1,
        z_lo=z_centre - half_frames,
        z_hi=z_centre + half_frames,
    )


def rotation_bragg_mask(predictions: ScanBraggPredictions, shapes, frame: int,
                        border: int) -> PanelMasks:
    """False on the detector box (widened by ``border`` px) of every reflection
    whose rocking curve reaches absolute frame ``frame``."""
    on = predictions.on_frame(frame)
    p = predictions
    return box_mask(shapes, p.panel[on], p.x0[on] - border, p.x1[on] + border,
                    p.y0[on] - border, p.y1[on] + border)


def box_mask(shapes, panel, x0, x1, y0, y1) -> PanelMasks:
    """True everywhere except the pixel boxes [x0, x1) x [y0, y1) (clipped to
    each panel), expanded without a Python loop over boxes."""
    masks = [np.ones(s, bool) for s in shapes]
    for pid, (n_slow, n_fast) in enumerate(shapes):
        sel = panel == pid
        if not sel.any():
            continue
        bx0 = np.clip(x0[sel], 0, n_fast)
        bx1 = np.clip(x1[sel], 0, n_fast)
        by0 = np.clip(y0[sel], 0, n_slow)
        by1 = np.clip(y1[sel], 0, n_slow)
        width = np.maximum(bx1 - bx0, 0)
        size = width * np.maximum(by1 - by0, 0)
        total = int(size.sum())
        if total == 0:
            continue
        # pixel k of box b: row k // width_b, column k % width_b
        owner = np.repeat(np.arange(size.size), size)
        k = np.arange(total) - np.repeat(np.cumsum(size) - size, size)
        row, col = np.divmod(k, width[owner])
        masks[pid][by0[owner] + row, bx0[owner] + col] = False
    return masks


def disc_mask(shapes, panel, x, y, radius: float) -> PanelMasks:
    """True everywhere except discs of ``radius`` px around (x, y) centres."""
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    masks = [np.ones(s, bool) for s in shapes]
    for pid, shape in enumerate(shapes):
        sel = panel == pid
        if not sel.any():
            continue
        # pixel (i, j) is inside when its centre (i + .5, j + .5) is within radius
        cx = np.floor(x[sel]).astype(int)
        cy = np.floor(y[sel]).astype(int)
        fx = cx[:, None, None] + dx[None]
        fy = cy[:, None, None] + dy[None]
        inside = (fx + 0.5 - x[sel][:, None, None]) ** 2 + (
            fy + 0.5 - y[sel][:, None, None]
        ) ** 2 <= radius**2
        inside &= (fx >= 0) & (fx < shape[1]) & (fy >= 0) & (fy < shape[0])
        masks[pid][fy[inside], fx[inside]] = False
    return masks


def stills_bragg_positions(experiment, d_min: float, max_delpsi_deg: float):
    """(panel, x_px, y_px) of every allowed reflection to ``d_min`` whose
    delta-psi to the Ewald sphere is below ``max_delpsi_deg`` (DIALS' for_ub
    keeps only 0.0015 rad, which misses the weak partials a diffuse map must
    not contain)."""
    cryst = experiment.crystal
    A = np.array(cryst.get_A()).reshape(3, 3)
    s0 = np.array(experiment.beam.get_s0())
    hkl = integer_hkl_within(cryst.get_unit_cell().parameters()[:3], d_min)
    # cheap pre-selection by distance of the lattice point from the Ewald
    # sphere, then DIALS' delta-psi predictor on what is left
    r = hkl @ A.T
    rlen = np.sqrt(np.einsum("ij,ij->i", r, r))
    excitation = np.abs(np.linalg.norm(r + s0, axis=1) - np.linalg.norm(s0))
    keep = (excitation <= 2.0 * np.deg2rad(max_delpsi_deg) * rlen + 1e-9) & (
        rlen <= 1.0 / d_min
    ) & (rlen > 0)
    if not keep.any():
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    columns = np.ascontiguousarray(hkl[keep].T, dtype=np.int32)
    indices = cctbx_flex.miller_index(*(flumpy.from_numpy(c) for c in columns))
    table = StillsReflectionPredictor(experiment, dmin=d_min)(indices)
    delpsi = flumpy.to_numpy(table["delpsical.rad"])
    table = table.select(flumpy.from_numpy(np.abs(delpsi) <= np.deg2rad(max_delpsi_deg)))
    if len(table) == 0:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    xyz = flumpy.to_numpy(table["xyzcal.px"])
    return flumpy.to_numpy(table["panel"]).astype(int), xyz[:, 0], xyz[:, 1]


def stills_bragg_mask(experiment, shapes, d_min, spot_radius_px, border,
                      max_delpsi_deg) -> PanelMasks:
    panel, x, y = stills_bragg_positions(experiment, d_min, max_delpsi_deg)
    return disc_mask(shapes, panel, x, y, spot_radius_px + border)


_HKL_CACHE = {}


def integer_hkl_within(cell_edges, d_min) -> np.ndarray:
    """All integer (h, k, l) with |h| <= a / d_min etc. (a superset of the
    reflections to d_min; cached because every still of a run asks for it)."""
    bounds = tuple(int(np.floor(edge / d_min)) for edge in cell_edges)
    if bounds not in _HKL_CACHE:
        _HKL_CACHE.clear()
        h, k, l = (np.arange(-b, b + 1) for b in bounds)
        grid = np.stack(np.meshgrid(h, k, l, indexing="ij"), axis=-1).reshape(-1, 3)
        _HKL_CACHE[bounds] = grid.astype(np.float64)
    return _HKL_CACHE[bounds]


def shoebox_mask(reflections, shapes, frame: int, border: int,
                 use_centroids: bool = False, centroid_radius=3.0) -> PanelMasks:
    """The guide's option B: mask the foreground/strong shoebox pixels of the
    found spots on absolute frame ``frame`` (shoebox z is absolute), dilated
    by ``border``; or discs around the spot centroids of the spots whose
    bounding box includes the frame."""
    masks = [np.ones(s, bool) for s in shapes]
    if reflections is None or len(reflections) == 0:
        return masks
    bbox = np.stack([flumpy.to_numpy(p) for p in reflections["bbox"].parts()], axis=1)
    on_image = (bbox[:, 4] <= frame) & (bbox[:, 5] > frame)
    if not on_image.any():
        return masks
    refl = reflections.select(flumpy.from_numpy(on_image))
    if use_centroids or "shoebox" not in refl:
        xyz = flumpy.to_numpy(refl["xyzobs.px.value"])
        panel = flumpy.to_numpy(refl["panel"]).astype(int)
        return disc_mask(shapes, panel, xyz[:, 0], xyz[:, 1], centroid_radius + border)
    panels = flumpy.to_numpy(refl["panel"]).astype(int)
    bad = [np.zeros(s, bool) for s in shapes]
    # one shoebox at a time: the found spots on one frame are few
    for shoebox, pid in zip(refl["shoebox"], panels):
        x0, x1, y0, y1, z0, z1 = shoebox.bbox
        code = flumpy.to_numpy(shoebox.mask)
        k = frame - z0
        if not 0 <= k < code.shape[0]:
            continue
        fg = (code[k] & (MaskCode.Foreground | MaskCode.Strong)) != 0
        ys, xs = np.nonzero(fg)
        ys = ys + y0
        xs = xs + x0
        ok = (xs >= 0) & (xs < shapes[pid][1]) & (ys >= 0) & (ys < shapes[pid][0])
        bad[pid][ys[ok], xs[ok]] = True
    for pid in range(len(shapes)):
        if border > 0:
            bad[pid] = binary_dilation(bad[pid], iterations=border)
        masks[pid] &= ~bad[pid]
    return masks


def combine(*panel_masks: Optional[PanelMasks]) -> Optional[PanelMasks]:
    """Pixel-wise AND of masks (None entries are skipped)."""
    present = [m for m in panel_masks if m is not None]
    if not present:
        return None
    out = [m.copy() for m in present[0]]
    for other in present[1:]:
        for a, b in zip(out, other):
            a &= b
    return out
