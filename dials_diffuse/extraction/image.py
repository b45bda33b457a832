"""The work on one image: read, mask (trusted range, dynamic and Bragg
masks), correct and bin the kept pixels on the voxel grid into per-voxel
sums (:func:`extract_image`); numpy over whole panel rasters (see
docs/PERFORMANCE.md)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import libtbx
import numpy as np
from dxtbx import flumpy

from dials_diffuse import bragg, geometry, grid, masks
from dials_diffuse.extraction import binning, kernels
from dials_diffuse.extraction.context import DetectorContext, panel_gains
from dials_diffuse.extraction.tasks import ImageError, exposure_time, read_image

logger = logging.getLogger("dials.diffuse_extract")


# Per-pixel values shown in the correction summary (kept small on purpose)
CORRECTION_SAMPLE_SIZE = 200


@dataclasses.dataclass
class ImageResult:
    arrays: dict
    stages: dict
    masks: Optional[dict] = None  # full-resolution pixel/bragg/total masks
    # rows and columns between the pixels whose arrays were written (0: none)
    pixel_sample_step: int = 0


def extract_image(task, context: DetectorContext, params, ndiv, background=None,
                  dynamic_mask=None, reflections=None, exposure=None,
                  want_masks=None) -> ImageResult:
    """Corrected intensities of one image and their voxel sums; with
    ``want_masks`` (default params.output.masks) its full-resolution masks."""
    if want_masks is None:
        want_masks = params.output.masks
    raw = read_image(task)
    detector = task.experiment.detector
    trusted = masks.trusted_range_mask(detector, raw) if want_masks else None
    shapes = [a.shape for a in raw]
    bragg_mask = image_bragg_mask(task, params, shapes, context.predictions,
                                  reflections_for(reflections, task))

    gains = panel_gains(detector, params)
    t_exp = exposure if exposure is not None else exposure_time(task, params)
    setting = geometry.setting_matrix(task.experiment, task.frame)
    setting_inv = np.linalg.inv(setting)
    lower, extent = grid.key_box(setting_inv, ndiv, context.q_max)
    bg_constant = params.corrections.background.constant or 0.0

    stages = dict.fromkeys(
        ["total", "static", "resolution", "dynamic", "trusted", "bragg", "intensity"], 0
    )
    key_maker = binning.VoxelKeys(setting_inv, ndiv, lower, extent)
    compiled = kernels.use_compiled(params.kernel)
    panel_voxels = binning.panel_voxels_compiled if compiled else binning.panel_voxels_numpy
    table = kernels.VoxelTable.empty(len(kernels.SUM_COLUMNS) - (background is None)) \
        if compiled else []
    runs = []  # per panel: first raster index and length of each run of kept pixels
    for pp, (usable, n_usable) in zip(context.panels, context.usable(dynamic_mask)):
        pid = pp.panel_id
        stages["total"] += pp.n_total
        stages["static"] += pp.n_static
        stages["resolution"] += pp.n_selected
        stages["dynamic"] += n_usable
        panel = binning.PanelImage(
            counts=pp.raster(raw[pid]),
            bragg=pp.raster(bragg_mask[pid]),
            background=None if background is None else pp.raster(background[pid]),
            usable=usable,
            gain=gains[pid],
            trusted_range=detector[pid].get_trusted_range(),
        )
        intensity_keep = binning.intensity_filter(pp, panel, params.filter, bg_constant, t_exp)
        layout, counted = panel_voxels(pp, panel, intensity_keep, key_maker, table)
        runs.append(layout)
        for name, n in zip(("trusted", "bragg", "intensity"), counted):
            stages[name] += n
    stages["kept"] = stages["intensity"]
    if stages["kept"] == 0:
        raise ImageError(f"{task.image_path}: no pixels left after masking and filters")

    if compiled:
        keys, columns = table.voxels()
        vox = grid.decode(keys, lower, extent).reshape(-1, 3)
        sums = dict(zip(kernels.SUM_COLUMNS, columns.T))
        n_pix = sums.pop("n_pixels").astype(np.int64)
    else:
        vox, n_pix, sums = grid.bin_runs(
            np.concatenate([v[0] for v in table]),
            np.concatenate([v[1] for v in table]),
            {name: np.concatenate([v[2][name] for v in table]) for name in table[0][2]},
            lower, extent,
        )
    bg_sum = n_pix * bg_constant if background is None else sums["background"]
    mean_q = np.stack([sums["qx"], sums["qy"], sums["qz"]], axis=1) / n_pix[:, None]
    arrays = {
        "voxel_indices": vox,
        # float32 keeps 7 digits of a per-image sum; merging accumulates in float64
        "voxel_sum_signal": (sums["photons"] - bg_sum).astype(np.float32),
        "voxel_sum_factor": (sums["factor"] * t_exp).astype(np.float32),
        # photons are Poisson: var(gain * counts) = gain * counts
        "voxel_sum_variance": sums["photons"].astype(np.float32),
        "voxel_n_pixels": n_pix.astype(np.int32),
        "voxel_mean_qmag": np.linalg.norm(mean_q, axis=1).astype(np.float32),
        "voxel_mean_hkl": (mean_q @ setting_inv.T).astype(np.float32),
        # where the voxel's mean scattering vector meets the detector plane
        # (mm): the surfaces a(x, y, phi) and d(x, y) of the merge are
        # evaluated there (the pixels' mean position to second order, with
        # no per-pixel sums)
        "voxel_mean_xy": geometry.detector_plane_xy(
            detector, mean_q + np.asarray(task.experiment.beam.get_s0())).astype(np.float32),
    }
    sample_step = pixel_sample_step(context, params.output)
    if sample_step:
        arrays.update(_pixel_arrays(context, runs, raw, background, bg_constant,
                                    setting_inv, t_exp, gains, sample_step))
    arrays.update(_correction_sample(context, runs, raw, background, bg_constant, t_exp, gains))
    image_masks = None
    if want_masks:
        pixel = [
            st & tr & (dynamic_mask[i] if dynamic_mask is not None else True)
            for i, (st, tr) in enumerate(zip(context.static_full, trusted))
        ]
        image_masks = {
            "pixel": pixel,
            "bragg": bragg_mask,
            "total": [p & b for p, b in zip(pixel, bragg_mask)],
        }
    return ImageResult(arrays=arrays, stages=stages, masks=image_masks,
                       pixel_sample_step=sample_step)


def _kept_pixels(runs):
    """Raster indices of the kept pixels of each panel, in raster order."""
    out = []
    for r in runs:
        # expand each run [start, start + n) without a Python loop
        offsets = np.arange(int(r["n"].sum())) - np.repeat(np.cumsum(r["n"]) - r["n"], r["n"])
        out.append(np.repeat(r["start"], r["n"]) + offsets)
    return out


def _kept_pixels_on_grid(pp, run, step):
    """Raster indices of the kept pixels of a panel on every step-th row and
    column, in raster order: the grid's pixels looked up in the runs (the
    kept pixels are not all expanded first: 1/step^2 of them are wanted)."""
    rows = np.arange(0, pp.shape[0], step)
    columns = np.arange(0, pp.shape[1], step)
    index = (rows[:, None] * pp.shape[1] + columns[None, :]).ravel()
    return index[_is_kept(run, index)]


def _is_kept(run, index):
    """Which raster indices (sorted) lie in a run of kept pixels."""
    if run["start"].size == 0:
        return np.zeros(index.size, bool)
    which = np.searchsorted(run["start"], index, side="right") - 1
    return (which >= 0) & (index < run["start"][np.maximum(which, 0)]
                           + run["n"][np.maximum(which, 0)])


def pixel_sample_step(context, output) -> int:
    """Rows and columns between the pixels whose arrays are written: 1 for
    every kept pixel (save_pixels=all), 0 for off, else the smallest step s
    with at most output.pixel_sample_size pixels on the detector's s x s grid."""
    # True / False: scripts written when save_pixels was a bool
    mode = {True: "all", False: "off"}.get(output.save_pixels, output.save_pixels)
    if mode == "off":
        return 0
    if mode == "all":
        return 1
    n_pixels = sum(pp.q_t.shape[1] for pp in context.panels)
    return max(1, int(np.ceil(np.sqrt(n_pixels / output.pixel_sample_size))))


def _pixel_arrays(context, runs, raw, background, bg_constant, setting_inv, t_exp, gains,
                  sample_step=1):
    """The per-pixel arrays of the guide (output.save_pixels): every kept
    pixel, or those on every sample_step-th row and column of the raster."""
    pieces = {k: [] for k in ("q", "counts", "bg", "factor", "panel", "slow", "fast", "gain")}
    kept = (_kept_pixels(runs) if sample_step == 1 else
            [_kept_pixels_on_grid(pp, r, sample_step) for pp, r in zip(context.panels, runs)])
    for pp, index in zip(context.panels, kept):
        pieces["q"].append(pp.q_t[:, index].T)
        pieces["counts"].append(pp.raster(raw[pp.panel_id])[index])
        pieces["bg"].append(
            np.full(index.size, bg_constant, np.float32) if background is None
            else pp.raster(background[pp.panel_id])[index]
        )
        pieces["factor"].append(pp.factor[index])
        pieces["panel"].append(np.full(index.size, pp.panel_id, np.int16))
        pieces["gain"].append(np.full(index.size, gains[pp.panel_id]))
        slow, fast = pp.slow_fast(index)
        pieces["slow"].append(slow)
        pieces["fast"].append(fast)
    cat = {k: np.concatenate(v) for k, v in pieces.items()}
    photons = cat["counts"] * cat["gain"]
    signal = photons - cat["bg"]
    factor = cat["factor"] * np.float64(t_exp)
    q = np.ascontiguousarray(cat["q"])
    return {
        "q_vectors": q,
        "intensities": (signal / factor).astype(np.float32),
        "sigmas": (np.sqrt(photons) / factor).astype(np.float32),
        "original_panel_ids": cat["panel"],
        "original_fast_coords": cat["fast"],
        "original_slow_coords": cat["slow"],
        "hkl": (q @ setting_inv.T.astype(np.float32)).astype(np.float32),
    }


def _correction_sample(context, runs, raw, background, bg_constant, t_exp, gains):
    """A deterministic sample of kept pixels with every correction factor,
    for the diagnostics' correction summary: evenly spaced in raster order
    over all panels among the kept pixels on the grid of the context's
    separate factors (every parts_step-th row and column)."""
    on_grid = _correction_candidates(context, runs)
    n_kept = np.array([index.size for index in on_grid])
    n = int(n_kept.sum())
    pick = np.unique(np.linspace(0, n - 1, min(CORRECTION_SAMPLE_SIZE, n)).astype(np.int64))
    panel_first = np.cumsum(n_kept) - n_kept
    keys = ("panel", "slow", "fast", "counts", "background", "factor", "q", "gain",
            "polarization", "solid_angle", "efficiency", "air")
    cols = {k: [] for k in keys}
    for k, pp in enumerate(context.panels):
        mine = pick[(pick >= panel_first[k]) & (pick < panel_first[k] + n_kept[k])] - panel_first[k]
        index = on_grid[k][mine]
        slow, fast = pp.slow_fast(index)
        cols["panel"].append(np.full(index.size, pp.panel_id, np.int16))
        cols["gain"].append(np.full(index.size, gains[pp.panel_id]))
        cols["slow"].append(slow)
        cols["fast"].append(fast)
        cols["counts"].append(raw[pp.panel_id][slow, fast])
        cols["background"].append(
            np.full(index.size, bg_constant) if background is None
            else background[pp.panel_id][slow, fast]
        )
        cols["factor"].append(pp.factor[index] * np.float64(t_exp))
        cols["q"].append(pp.q_t[:, index].T.astype(np.float64))
        for name in ("polarization", "solid_angle", "efficiency", "air"):
            cols[name].append(pp.parts[name][pp.parts_index(index)].astype(np.float64))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    sample = {
        "sample_panel": c["panel"],
        "sample_fast": c["fast"],
        "sample_slow": c["slow"],
        "sample_raw_counts": c["counts"],
        "sample_background": c["background"],
        "sample_gain": c["gain"],
        "sample_exposure_time": np.full(pick.size, t_exp),
        "sample_intensity": (c["counts"] * c["gain"] - c["background"]) / c["factor"],
        "sample_sigma": np.sqrt(c["counts"] * c["gain"]) / c["factor"],
        "sample_q": c["q"],
    }
    sample.update({f"sample_{k}": c[k] for k in ("polarization", "solid_angle", "efficiency", "air")})
    return sample


def _correction_candidates(context, runs, oversample=4):
    """Per panel, raster indices of kept pixels on the grid of the separate
    correction factors: of ``oversample`` x CORRECTION_SAMPLE_SIZE grid
    points evenly spaced over all panels, those kept (every kept grid point
    when too few of them are)."""
    shapes = [pp.parts_shape for pp in context.panels]
    n_grid = np.array([a * b for a, b in shapes])
    first = np.cumsum(n_grid) - n_grid
    points = np.unique(np.linspace(0, n_grid.sum() - 1, min(
        int(n_grid.sum()), oversample * CORRECTION_SAMPLE_SIZE)).astype(np.int64))
    out = []
    for pp, run, (_, n_cols), start, n in zip(context.panels, runs, shapes, first, n_grid):
        row, column = np.divmod(points[(points >= start) & (points < start + n)] - start, n_cols)
        index = row * pp.parts_step * pp.shape[1] + column * pp.parts_step
        out.append(index[_is_kept(run, index)])
    if sum(index.size for index in out) < min(CORRECTION_SAMPLE_SIZE, points.size):
        out = [_kept_pixels_on_grid(pp, r, pp.parts_step) for pp, r in zip(context.panels, runs)]
    return out


def image_bragg_mask(task, params, shapes, prediction_cache, reflections=None):
    """The Bragg mask of one image (True = no Bragg peak): the predicted
    and/or found-spot masks of masking.bragg.method, combined."""
    bragg_params = params.masking.bragg
    methods = bragg_methods(bragg_params)
    predicted = spots = None
    if "predicted" in methods:
        if task.frame is None:
            d_min = bragg_params.d_min or _detector_d_min(task.experiment)
            predicted = bragg.stills_bragg_mask(
                task.experiment, shapes, d_min, bragg_params.spot_radius, bragg_params.border,
                max_delpsi_deg(task.experiment.crystal, bragg_params, d_min),
            )
        else:
            predicted = bragg.rotation_bragg_mask(
                scan_predictions(task, params, prediction_cache), shapes, task.frame,
                bragg_params.border,
            )
    if "spots" in methods and reflections is not None:
        spots = bragg.shoebox_mask(
            reflections, shapes, task.frame if task.frame is not None else 0,
            bragg_params.border, use_centroids=bragg_params.use_centroids,
            centroid_radius=bragg_params.spot_radius,
        )
    combined = bragg.combine(predicted, spots)
    return combined if combined is not None else [np.ones(s, bool) for s in shapes]


def bragg_methods(bragg_params) -> set:
    """masking.bragg.method as a set ({"predicted"}, {"predicted", "spots"}, ...);
    a plain string (scripts) and "none" are accepted too."""
    method = bragg_params.method
    if method is None:
        return set()
    if isinstance(method, str):
        method = method.replace("+", " ").split()
    return {m for m in method if m and m != "none"}


def scan_predictions(task, params, cache):
    """The Bragg predictions of a rotation task's scan, made once per process
    and experiment (forked workers inherit them)."""
    bragg_params = params.masking.bragg
    widths = task.bragg_widths
    if widths is None:  # called without extract(): no spots to estimate from
        widths = bragg.profile_widths([task.experiment], None, bragg_params)[0]
    d_min = bragg_params.d_min or _detector_d_min(task.experiment)
    key = (id(task.experiment), d_min, widths.sigma_b_deg, widths.sigma_m_deg,
           bragg_params.n_sigma)
    if key not in cache:
        cache[key] = bragg.scan_bragg_predictions(task.experiment, d_min, widths,
                                                  bragg_params.n_sigma)
    return cache[key]


def max_delpsi_deg(crystal, bragg_params, d_min):
    """The angular reach of the stills Bragg mask (see masking.bragg.max_delpsi).

    On the real thaumatin stills (half mosaicity 0.25-0.46 deg, domain ~1100 A)
    spots are seen up to about three times the model's own acceptance.
    """
    value = bragg_params.max_delpsi
    if value is not None and value is not libtbx.Auto:
        return value
    half_mosaicity = getattr(crystal, "get_half_mosaicity_deg", lambda: None)()
    domain = getattr(crystal, "get_domain_size_ang", lambda: None)()
    if half_mosaicity is None or not domain:
        return 1.0
    reach = 3.0 * (half_mosaicity + np.rad2deg(d_min / (2.0 * domain)))
    return float(np.clip(reach, 0.2, 2.0))


def _detector_d_min(experiment):
    return experiment.detector.get_max_resolution(experiment.beam.get_s0())


def reflections_for(reflections, task):
    if reflections is None:
        return None
    ids = flumpy.to_numpy(reflections["id"]) if "id" in reflections else None
    if ids is None:
        return reflections
    return reflections.select(flumpy.from_numpy(ids == task.experiment_id))
