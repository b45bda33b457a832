"""Per-image extraction of corrected diffuse intensities, binned on the voxel grid.

For every kept pixel p of an image:
    signal s_p = counts * gain - background   (gain: photons per count)
    factor F_p = P * Omega * eta * T_air * exposure_time
    I_p = s_p / F_p,  var(s_p) = gain * counts   (Poisson on the photons)
and per voxel v of the image the sums S = sum s_p, W = sum F_p, V = sum var(s_p)
are stored, so that I_v = S / W and var(I_v) = V / W^2. Merging works with the
sums (a Poisson ratio estimator), so zero-count pixels never make a weight
explode.

``extract`` is the library entry point (``dials.python`` scripts and tests call
it); ``dials.diffuse_extract`` only parses parameters and calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Dict, List, Optional

import libtbx
import numpy as np
from dxtbx import flumpy

from dials.util import Sorry

from dials_diffuse.command_util import ensure_output_directory, resolve_nproc
from dials_diffuse import bragg, corrections, geometry, grid, io, masks
from dials_diffuse.parallel import ForkPool
from dials_diffuse.diffuse_files import (
    MANIFEST_NAME,
    image_file_name,
    mask_file_name,
    write_image_file,
)

logger = logging.getLogger("dials.diffuse_extract")

# Per-pixel values shown in the correction summary (kept small on purpose)
CORRECTION_SAMPLE_SIZE = 200


@dataclasses.dataclass
class ImageTask:
    """One image to extract and the experiment that models it."""

    still_id: int  # scale-group id: experiment index for stills, image number for sequences
    experiment_id: int
    experiment: object
    imageset: object
    index_in_imageset: int  # index for imageset.get_raw_data
    frame: Optional[int]  # rotation: absolute array index (geometry.absolute_frame), else None
    image_path: str
    # rotation: the profile widths of the Bragg mask (bragg.profile_widths)
    bragg_widths: Optional[bragg.ProfileWidths] = None


@dataclasses.dataclass
class PanelPixels:
    """One panel's pixel raster (every ``step``-th pixel along slow and fast)
    with everything about it that is the same on every image.

    Per-image work runs over the whole raster in raster order, never gathering
    the kept pixels: pixels that are not kept get a sentinel voxel key, so
    the runs of equal keys along a row are contiguous ranges of kept pixels,
    and the per-run sums of the static columns (factor, q) are differences of
    running sums computed here once.
    """

    panel_id: int
    step: int
    shape: tuple  # raster (n_slow, n_fast)
    selected: np.ndarray  # (n,) bool: passes the static mask and the resolution limits
    q_t: np.ndarray  # (3, n) float32 lab-frame q (1/Angstrom) of every raster pixel
    factor: np.ndarray  # (n,) float32 P * Omega * eta * T_air (exposure applied per image)
    parts: dict  # each correction factor separately, float32 (for the correction sample)
    running: dict  # (n + 1,) float64 running sums of factor, qx, qy, qz over selected pixels
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


def plan_tasks(models, images=None) -> (List[ImageTask], List[dict]):
    """Match each image to its crystal model.

    ``models``: experiments with crystals (refined.expt). ``images``: optional
    experiments whose images are to be extracted (imported.expt); images that
    no model covers are reported as skipped. Returns (tasks, skipped entries).
    """
    for i, expt in enumerate(models):
        if expt.crystal is None:
            raise Sorry(f"experiment {i} of the models has no crystal: index it first")
        if expt.imageset is None:
            raise Sorry(f"experiment {i} of the models has no images")
    tasks: List[ImageTask] = []
    by_path: Dict[tuple, tuple] = {}
    running = 0
    for expt_id, expt in enumerate(models):
        imageset = expt.imageset
        if expt.is_still() or expt.scan is None:
            # a still experiment names one image of its imageset
            indices = list(range(len(imageset))) if len(imageset) == 1 else [0]
            if expt.scan is not None and len(imageset) > 1:
                indices = [expt.scan.get_array_range()[0]]
            for k in indices:
                path = imageset.get_path(k)
                task = ImageTask(expt_id, expt_id, expt, imageset, k, None, path)
                by_path[(os.path.realpath(path), _frame(imageset, k))] = task
                tasks.append(task)
        else:
            first, last = expt.scan.get_array_range()
            for k in range(last - first):
                path = imageset.get_path(k)
                task = ImageTask(running, expt_id, expt, imageset, k,
                                 geometry.absolute_frame(expt.scan, k), path)
                by_path[(os.path.realpath(path), _frame(imageset, k))] = task
                tasks.append(task)
                running += 1
    if any(not t.experiment.is_still() for t in tasks) and any(
        t.experiment.is_still() for t in tasks
    ):
        raise Sorry("the models mix stills and rotation sequences: extract them separately")
    if tasks and all(t.experiment.is_still() for t in tasks):
        for t in tasks:
            t.still_id = t.experiment_id
    skipped = []
    if images is not None:
        wanted = []
        for imageset in images.imagesets():
            for k in range(len(imageset)):
                key = (os.path.realpath(imageset.get_path(k)), _frame(imageset, k))
                if key in by_path:
                    wanted.append(by_path[key])
                else:
                    skipped.append(
                        {
                            "image_path": imageset.get_path(k),
                            "image_index": k,
                            "status": "skipped",
                            "reason": "no crystal model for this image (not indexed)",
                        }
                    )
        seen = set()
        tasks = [t for t in wanted if not (id(t) in seen or seen.add(id(t)))]
    return tasks, skipped


def _frame(imageset, k):
    """Frame of image k within its file: its index in a multi-image file
    (HDF5), 0 for one image per file, so that the same file matches however
    the images were imported (a subset, image_range=)."""
    try:
        if not imageset.reader().is_single_file_reader():
            return 0
        return imageset.indices()[k]
    except Exception:
        return k


def detector_context(experiment, imageset, params, static_mask,
                     geometries=None) -> DetectorContext:
    """The per-pixel context of an experiment's detector and beam;
    ``geometries``: its detector_geometry when already computed."""
    beam, detector = experiment.beam, experiment.detector
    c = params.corrections
    f = params.filter
    panels = []
    q_max = 0.0
    if geometries is None:
        geometries = geometry.detector_geometry(detector, params.filter.pixel_step)
    for g in geometries:
        parts = corrections.correction_factors(
            g,
            beam,
            detector[g.panel_id],
            polarization=c.polarization,
            solid_angle_on=c.solid_angle,
            efficiency=c.efficiency,
            air=c.air,
            air_temperature_k=c.air_temperature,
            air_pressure_atm=c.air_pressure,
            polarization_fraction=c.polarization_fraction,
        )
        q = geometry.scattering_vectors(g.unit_s1, beam.get_s0())
        qmag = np.sqrt(np.einsum("ij,ij->i", q, q))
        static = static_mask[g.panel_id][g.slow, g.fast]
        selected = static.copy()
        if f.d_min is not None:
            selected &= qmag <= 1.0 / f.d_min
        if f.d_max is not None:
            selected &= qmag >= 1.0 / f.d_max
        if selected.any():
            q_max = max(q_max, float(qmag[selected].max()))
        # running sums in float64: a difference of two gives a run's sum exactly
        # enough (|q| < 1, 1e7 pixels: error ~1e-9); unselected pixels add 0
        # so that a non-finite value there cannot spread
        running = {}
        for name, values in (("factor", parts.total), ("qx", q[:, 0]), ("qy", q[:, 1]),
                             ("qz", q[:, 2])):
            running[name] = np.zeros(g.n_pixels + 1)
            np.cumsum(np.where(selected, values, 0.0), out=running[name][1:])
        step = params.filter.pixel_step
        n_slow, n_fast = g.image_shape
        panels.append(
            PanelPixels(
                panel_id=g.panel_id,
                step=step,
                shape=(-(-n_slow // step), -(-n_fast // step)),
                selected=selected,
                # float32 halves the memory traffic of the per-image passes;
                # 7 digits are ample for binning and for the factors
                q_t=np.ascontiguousarray(q.T, dtype=np.float32),
                factor=parts.total.astype(np.float32),
                parts={k: getattr(parts, k).astype(np.float32) for k in
                       ("polarization", "solid_angle", "efficiency", "air")},
                running=running,
                n_static=int(static.sum()),
                n_selected=int(np.count_nonzero(selected)),
            )
        )
    return DetectorContext(panels=panels, static_full=static_mask, predictions={}, q_max=q_max)


def load_background(params, detector):
    """The background to subtract, per panel (numpy (slow, fast)) or a constant."""
    bg = params.corrections.background
    if bg.map is None:
        if bg.constant is not None and not np.isfinite(bg.constant):
            raise Sorry(f"corrections.background.constant={bg.constant} is not finite")
        return None
    path = bg.map
    if not os.path.isfile(path):
        raise Sorry(f"background map {path} does not exist")
    panels = io.read_background_map(path)
    if len(panels) != len(detector):
        raise Sorry(
            f"background map {path} has {len(panels)} panels, the detector {len(detector)}"
        )
    for i, (data, panel) in enumerate(zip(panels, detector)):
        expected = tuple(reversed(panel.get_image_size()))
        if data.shape != expected:
            raise Sorry(
                f"background map {path} panel {i} has shape {data.shape}, "
                f"the detector panel {expected} (slow, fast)"
            )
    return panels


def check_params(params):
    f = params.filter
    if f.pixel_step is None or f.pixel_step < 1:
        raise Sorry(f"filter.pixel_step={f.pixel_step}: must be 1 or more")
    if f.d_min is not None and f.d_max is not None and f.d_min >= f.d_max:
        raise Sorry(f"filter.d_min={f.d_min} must be smaller than filter.d_max={f.d_max}")
    if (
        f.min_intensity is not None
        and f.max_intensity is not None
        and f.min_intensity >= f.max_intensity
    ):
        raise Sorry("filter.min_intensity must be smaller than filter.max_intensity")
    c = params.corrections
    if c.gain is not None and not c.gain > 0:
        raise Sorry(f"corrections.gain={c.gain}: must be positive")
    if c.exposure_time is not None and not c.exposure_time > 0:
        raise Sorry(f"corrections.exposure_time={c.exposure_time}: must be positive")
    if c.air_temperature is None or c.air_temperature <= 0:
        raise Sorry(f"corrections.air_temperature={c.air_temperature}: must be > 0 K")
    if c.air_pressure is None or c.air_pressure < 0:
        raise Sorry(f"corrections.air_pressure={c.air_pressure}: must be >= 0 atm")
    b = params.masking.bragg
    if b.spot_radius is None or b.spot_radius < 0 or b.border is None or b.border < 0:
        raise Sorry("masking.bragg.spot_radius and masking.bragg.border must be >= 0")
    from dials_diffuse.phil_scopes import check_grid_params

    return check_grid_params(params.grid)


def exposure_time(task: ImageTask, params) -> float:
    """PHIL override, else the scan's, else the image header's, else 1 s."""
    if params.corrections.exposure_time is not None:
        return params.corrections.exposure_time
    scan = task.experiment.scan
    k = task.index_in_imageset if task.frame is not None else 0
    if scan is None:
        # stills lose their one-image scan on import: ask the image header
        scan = _header_scan(task.imageset, task.index_in_imageset)
        k = 0
    if scan is not None:
        times = scan.get_exposure_times()
        if len(times) > k and times[k] > 0:
            return float(times[k])
    return 1.0


def _header_scan(imageset, index):
    try:
        kwargs = imageset.params() if hasattr(imageset, "params") else {}
        fmt = imageset.get_format_class().get_instance(imageset.get_path(index), **kwargs)
        return fmt.get_scan()
    except Exception:
        return None


def read_image(task: ImageTask):
    """Raw counts per panel as numpy arrays (slow, fast), in the file's dtype."""
    try:
        raw = task.imageset.get_raw_data(task.index_in_imageset)
    except Exception as e:
        raise ImageError(f"cannot read {task.image_path}: {e}")
    if not isinstance(raw, tuple):
        raw = (raw,)
    detector = task.experiment.detector
    if len(raw) != len(detector):
        raise ImageError(
            f"{task.image_path} has {len(raw)} panels, the detector {len(detector)}"
        )
    arrays = []
    for i, (data, panel) in enumerate(zip(raw, detector)):
        a = flumpy.to_numpy(data)  # zero-copy view of the flex array
        if a.shape != tuple(reversed(panel.get_image_size())):
            raise ImageError(
                f"{task.image_path} panel {i} has shape {a.shape}, the detector "
                f"{tuple(reversed(panel.get_image_size()))}"
            )
        arrays.append(a)
    return arrays


class ImageError(Exception):
    """A single image cannot be used (reported and skipped)."""


@dataclasses.dataclass
class ImageResult:
    arrays: dict
    stages: dict
    masks: Optional[dict] = None  # full-resolution pixel/bragg/total masks


def extract_image(task, context: DetectorContext, params, ndiv, background=None,
                  dynamic_mask=None, reflections=None, exposure=None) -> ImageResult:
    """Corrected intensities of one image and their voxel sums."""
    raw = read_image(task)
    detector = task.experiment.detector
    trusted = masks.trusted_range_mask(detector, raw) if params.output.masks else None
    shapes = [a.shape for a in raw]
    bragg_mask = image_bragg_mask(task, params, shapes, context.predictions,
                                  _reflections_for(reflections, task))

    gains = panel_gains(detector, params)
    t_exp = exposure if exposure is not None else exposure_time(task, params)
    setting = geometry.setting_matrix(task.experiment, task.frame)
    setting_inv = np.linalg.inv(setting)
    lower, extent = grid.key_box(setting_inv, ndiv, context.q_max)
    f = params.filter
    bg_constant = params.corrections.background.constant or 0.0

    stages = dict.fromkeys(
        ["total", "static", "resolution", "dynamic", "trusted", "bragg", "intensity"], 0
    )
    key_maker = VoxelKeys(setting_inv, ndiv, lower, extent)
    runs = []  # per panel: first raster index and length of each run of kept pixels
    block_voxels = []  # per block: (keys, pixel counts, sums) of its voxels
    for pp, (usable, n_usable) in zip(context.panels, context.usable(dynamic_mask)):
        pid = pp.panel_id
        panel_counts = pp.raster(raw[pid])
        panel_bragg = pp.raster(bragg_mask[pid])
        panel_bg = None if background is None else pp.raster(background[pid])
        gain = gains[pid]
        stages["total"] += pp.n_total
        stages["static"] += pp.n_static
        stages["resolution"] += pp.n_selected
        stages["dynamic"] += n_usable
        pieces = []
        # blocks of rows: the dozen passes over each block stay in the CPU
        # cache (1.6x faster than whole-panel passes on a Pilatus 6M)
        for block in pp.blocks():
            counts = panel_counts[block]
            keep = masks.trusted_range_mask([detector[pid]], [counts])[0]
            keep &= usable[block]
            stages["trusted"] += int(np.count_nonzero(keep))
            keep &= panel_bragg[block]
            stages["bragg"] += int(np.count_nonzero(keep))
            bg = None if panel_bg is None else panel_bg[block]
            if f.min_intensity is not None or f.max_intensity is not None:
                signal = counts * gain - (bg_constant if bg is None else bg)
                with np.errstate(divide="ignore", invalid="ignore"):
                    intensity = signal / (pp.factor[block] * t_exp)
                if f.min_intensity is not None:
                    keep &= intensity >= f.min_intensity
                if f.max_intensity is not None:
                    keep &= intensity <= f.max_intensity
            stages["intensity"] += int(np.count_nonzero(keep))
            layout, voxels = _block_runs(pp, block, counts, bg, keep, key_maker, gain)
            pieces.append(layout)
            block_voxels.append(voxels)
        runs.append({k: np.concatenate([r[k] for r in pieces]) for k in pieces[0]})
    stages["kept"] = stages["intensity"]
    if stages["kept"] == 0:
        raise ImageError(f"{task.image_path}: no pixels left after masking and filters")

    vox, n_pix, sums = grid.bin_runs(
        np.concatenate([v[0] for v in block_voxels]),
        np.concatenate([v[1] for v in block_voxels]),
        {name: np.concatenate([v[2][name] for v in block_voxels]) for name in block_voxels[0][2]},
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
    }
    if params.output.save_pixels:
        arrays.update(_pixel_arrays(context, runs, raw, background, bg_constant,
                                    setting_inv, t_exp, gains))
    arrays.update(_correction_sample(context, runs, raw, background, bg_constant, t_exp, gains))
    image_masks = None
    if params.output.masks:
        pixel = [
            st & tr & (dynamic_mask[i] if dynamic_mask is not None else True)
            for i, (st, tr) in enumerate(zip(context.static_full, trusted))
        ]
        image_masks = {
            "pixel": pixel,
            "bragg": bragg_mask,
            "total": [p & b for p, b in zip(pixel, bragg_mask)],
        }
    return ImageResult(arrays=arrays, stages=stages, masks=image_masks)


class VoxelKeys:
    """Voxel keys of pixels from their q: key = sum_a (rint(ndiv_a hkl_a) -
    lower_a) * stride_a with hkl = M^-1 q, in one image's key box."""

    def __init__(self, setting_inv, ndiv, lower, extent):
        self.dtype = np.int32 if np.prod(extent) < 2**31 else np.int64
        self.strides = [int(extent[1] * extent[2]), int(extent[2]), 1]
        self.lower = [np.float32(v) for v in lower]
        self.to_grid = (np.asarray(ndiv, float)[:, None] * setting_inv).astype(np.float32)

    def __call__(self, q_t: np.ndarray) -> np.ndarray:
        """Keys of the (3, n) float32 q of n pixels."""
        grid_coords = self.to_grid @ q_t  # one BLAS call: 4x faster than one per axis
        keys = None
        for axis, g in enumerate(grid_coords):
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
    # per-run sums of the image columns as differences of running sums
    # (2.5x faster than np.add.reduceat over all runs)
    count_type = np.int64 if np.issubdtype(counts.dtype, np.integer) else np.float64
    # integer counts are summed exactly, then made photons
    sums = {"photons": _run_sums(counts, start, end, count_type) * float(gain)}
    if background is not None:
        sums["background"] = _run_sums(background, start, end, np.float64)
    start += block.start
    end += block.start
    for name, running in pp.running.items():
        sums[name] = running.take(end) - running.take(start)
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


def _kept_pixels(runs):
    """Raster indices of the kept pixels of each panel, in raster order."""
    out = []
    for r in runs:
        # expand each run [start, start + n) without a Python loop
        offsets = np.arange(int(r["n"].sum())) - np.repeat(np.cumsum(r["n"]) - r["n"], r["n"])
        out.append(np.repeat(r["start"], r["n"]) + offsets)
    return out


def _pixel_arrays(context, runs, raw, background, bg_constant, setting_inv, t_exp, gains):
    """The per-pixel arrays of the guide (output.save_pixels)."""
    pieces = {k: [] for k in ("q", "counts", "bg", "factor", "panel", "slow", "fast", "gain")}
    for pp, index in zip(context.panels, _kept_pixels(runs)):
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
    """A deterministic sample of kept pixels (evenly spaced in raster order over
    all panels) with every correction factor, for the diagnostics' correction
    summary."""
    n_kept = np.array([int(r["n"].sum()) for r in runs])
    n = int(n_kept.sum())
    pick = np.unique(np.linspace(0, n - 1, min(CORRECTION_SAMPLE_SIZE, n)).astype(np.int64))
    panel_first = np.cumsum(n_kept) - n_kept
    keys = ("panel", "slow", "fast", "counts", "background", "factor", "q", "gain",
            "polarization", "solid_angle", "efficiency", "air")
    cols = {k: [] for k in keys}
    for k, (pp, r) in enumerate(zip(context.panels, runs)):
        mine = pick[(pick >= panel_first[k]) & (pick < panel_first[k] + n_kept[k])] - panel_first[k]
        run_first = np.cumsum(r["n"]) - r["n"]
        which = np.searchsorted(run_first, mine, side="right") - 1
        index = r["start"][which] + (mine - run_first[which])
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
            cols[name].append(pp.parts[name][index].astype(np.float64))
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


def _gain_metadata(gains):
    return gains[0] if len(set(gains)) == 1 else gains


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


def _reflections_for(reflections, task):
    if reflections is None:
        return None
    ids = flumpy.to_numpy(reflections["id"]) if "id" in reflections else None
    if ids is None:
        return reflections
    return reflections.select(flumpy.from_numpy(ids == task.experiment_id))


def extract(models, params, images=None, reflections=None, progress=True,
            profile_reflections=None):
    """Extract every image; write per-image files and the manifest.

    ``reflections``: a strong or indexed reflection table (the spots part of
    the Bragg mask, and the profile widths of rotation Bragg masks when it is
    indexed); ``profile_reflections``: indexed spots for the profile widths
    when ``reflections`` are unindexed strong spots.

    Returns the manifest (a dict, also written as ``extraction_manifest.json``).
    """
    ndiv = check_params(params)
    tasks, skipped = plan_tasks(models, images)
    # contexts depend on this run's parameters (pixel_step, corrections,
    # masks, resolution): never reuse one from an earlier call
    _CONTEXTS.clear()
    _GEOMETRIES.clear()
    if not tasks:
        raise Sorry("no images to extract: no experiment with a crystal covers any image")
    methods = bragg_methods(params.masking.bragg)
    if methods == {"spots"} and reflections is None:
        raise Sorry("masking.bragg.method=spots needs a reflection table (strong.refl or indexed.refl)")
    if "spots" in methods and reflections is None:
        logger.info("No reflection table given: the Bragg mask is the predicted one only")
    if "predicted" in methods:
        widths = bragg.profile_widths(
            models, reflections if profile_reflections is None else profile_reflections,
            params.masking.bragg)
        for task in tasks:
            task.bragg_widths = widths.get(task.experiment_id)
    out_dir = params.output.directory
    ensure_output_directory(out_dir)
    background = load_background(params, tasks[0].experiment.detector)
    # the manifest marks a complete directory: an old one goes before any new
    # file is written, so an interrupted rerun never looks complete
    io.remove_completion_marker(os.path.join(out_dir, MANIFEST_NAME))
    t0 = time.time()
    dynamic = None
    if params.masking.dynamic.enable:
        # while the dynamic-pass workers run, this process makes what the
        # extraction workers will inherit
        dynamic = dynamic_mask(tasks, params,
                               while_waiting=lambda: _prepare_shared_state(tasks, params))
        logger.info("Dynamic mask from %d images in %.1f s", len(tasks), time.time() - t0)
        io.write_pickle(os.path.join(out_dir, DYNAMIC_MASK_NAME), masks.to_flex(dynamic))

    jobs = [
        ImageJob(task, params, ndiv, out_dir, _reflections_for(reflections, task))
        for task in tasks
    ]
    t1 = time.time()
    entries = list(skipped) + run_jobs(jobs, params, background, dynamic, progress)
    logger.info(
        "Extracted %d images in %.1f s (%.2f s per image, %d process(es), %s)",
        len(jobs), time.time() - t1, (time.time() - t1) / max(len(jobs), 1),
        resolve_nproc(params), params.mp.method,
    )

    manifest = {
        "format": "dials_diffuse.extraction/1",
        "ndiv": list(ndiv),
        "is_still": bool(tasks[0].experiment.is_still()),
        "n_images": len(entries),
        "n_extracted": sum(e["status"] == "extracted" for e in entries),
        # timings only in the log: the same run gives the same manifest
        "images": [{k: v for k, v in e.items() if k != "seconds"} for e in entries],
    }
    if manifest["n_extracted"] == 0:
        # nothing usable: leave no intermediate output behind either
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(out_dir, DYNAMIC_MASK_NAME))
        raise Sorry("no image could be extracted: " + "; ".join(
            e.get("reason", "") for e in entries[:3]))
    io.write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
    log_summary(manifest)
    return manifest


DYNAMIC_MASK_NAME = "dynamic_mask.pickle"


@dataclasses.dataclass
class ImageJob:
    """Everything one image's extraction needs besides the shared state."""

    task: ImageTask
    params: object
    ndiv: tuple
    out_dir: str
    reflections: object = None


# Per-process state: contexts are expensive (per-pixel geometry), computed once
# per process and inherited by forked workers. Stills refined one by one have
# a beam each, so a context (~400 MB for 6M pixels) serves one image: only the
# most recent few are kept, and the beam-independent per-pixel geometry of a
# detector is kept apart and shared by all of them.
_CONTEXTS = []  # (detector, beam, DetectorContext), most recently used last
_GEOMETRIES = []  # (detector, pixel_step, [PanelGeometry])
MAX_CONTEXTS = 2
_WORKER_CACHE = {}  # Dask workers: background and dynamic mask of the current run


def context_for(task, params):
    context = _find_context(_CONTEXTS, task)
    if context is None:
        static = masks.static_mask(task.imageset, params.masking, params.masking.beamstop)
        context = detector_context(task.experiment, task.imageset, params, static,
                                   panel_geometries(task.experiment.detector, params))
        _CONTEXTS.append((task.experiment.detector, task.experiment.beam, context))
        del _CONTEXTS[:-MAX_CONTEXTS]
    return context


def panel_geometries(detector, params):
    """geometry.detector_geometry of a detector, computed once per process."""
    step = params.filter.pixel_step
    for known, known_step, geometries in _GEOMETRIES:
        if known_step == step and known == detector:
            return geometries
    geometries = geometry.detector_geometry(detector, step)
    for g in geometries:
        g.lab_mm = None  # not needed here: distance and direction are kept
    _GEOMETRIES[:] = [(detector, step, geometries)]
    return geometries


def extract_one(job: ImageJob, background, dynamic) -> dict:
    """Extract one image, write its file (and masks); return its manifest entry."""
    task, params = job.task, job.params
    entry = {
        "still_id": task.still_id,
        "experiment_id": task.experiment_id,
        "image_path": task.image_path,
        "image_index": task.index_in_imageset,
    }
    if task.frame is not None:
        entry["frame"] = task.frame
    t_image = time.time()
    try:
        context = context_for(task, params)
        entry["exposure_time"] = exposure_time(task, params)
        result = extract_image(
            task, context, params, job.ndiv, background, dynamic, job.reflections,
            exposure=entry["exposure_time"],
        )
    except ImageError as e:
        entry.update(status="skipped", reason=str(e))
        return entry
    name = image_file_name(task.still_id)
    metadata = {
        "still_id": task.still_id,
        "experiment_id": task.experiment_id,
        "image_path": task.image_path,
        "image_index": entry["image_index"],
        # rotation: the absolute array index (phi, xyzcal.px z); None for stills
        "frame": task.frame,
        "wavelength": task.experiment.beam.get_wavelength(),
        "ndiv": list(job.ndiv),
        "is_still": bool(task.experiment.is_still()),
        "exposure_time": entry["exposure_time"],
        # photons per count; one number per panel when they differ
        "gain": _gain_metadata(panel_gains(task.experiment.detector, params)),
        "corrections": {
            "polarization": params.corrections.polarization,
            "solid_angle": params.corrections.solid_angle,
            "efficiency": params.corrections.efficiency,
            "air": params.corrections.air,
            "air_temperature": params.corrections.air_temperature,
            "air_pressure": params.corrections.air_pressure,
        },
        "pixel_step": params.filter.pixel_step,
        "bragg_mask": "+".join(sorted(bragg_methods(params.masking.bragg))) or "none",
        "pixel_counts": result.stages,
    }
    if result.masks is not None:
        for kind, panel_masks in result.masks.items():
            io.write_pickle(
                os.path.join(job.out_dir, mask_file_name(kind, task.still_id)),
                masks.to_flex(panel_masks),
            )
    # the image file last: its presence means the image is complete
    write_image_file(os.path.join(job.out_dir, name), result.arrays, metadata)
    entry.update(
        status="extracted",
        file=name,
        pixel_counts=result.stages,
        n_voxels=int(len(result.arrays["voxel_indices"])),
        seconds=round(time.time() - t_image, 3),
    )
    return entry


def _forked_job(shared, index):
    return extract_one(shared["jobs"][index], shared["background"], shared["dynamic"])


def _dask_job(spec):
    """Run one image on a Dask worker from a serialisable spec."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    if _WORKER_CACHE.get("run_token") != spec["run_token"]:
        _CONTEXTS.clear()
        _GEOMETRIES.clear()
        for key in [k for k in _WORKER_CACHE if isinstance(k, tuple)]:
            del _WORKER_CACHE[key]
        _WORKER_CACHE["run_token"] = spec["run_token"]
    experiment = ExperimentListFactory.from_json(spec["experiment_json"], check_format=True)[0]
    task = ImageTask(
        spec["still_id"], spec["experiment_id"], experiment, experiment.imageset,
        spec["index_in_imageset"], spec["frame"], spec["image_path"],
        spec["bragg_widths"],
    )
    job = ImageJob(task, spec["params"], tuple(spec["ndiv"]), spec["out_dir"], spec["reflections"])
    bg_key = ("background", spec["params"].corrections.background.map)
    if bg_key not in _WORKER_CACHE:
        _WORKER_CACHE[bg_key] = load_background(spec["params"], experiment.detector)
    background = _WORKER_CACHE[bg_key]
    dynamic = None
    if spec["dynamic_mask_path"]:
        key = ("dynamic", spec["dynamic_mask_path"])
        if key not in _WORKER_CACHE:
            import pickle

            with open(spec["dynamic_mask_path"], "rb") as fh:
                _WORKER_CACHE[key] = masks.from_flex(pickle.load(fh))
        dynamic = _WORKER_CACHE[key]
    return extract_one(job, background, dynamic)


def run_jobs(jobs, params, background, dynamic, show_progress=True):
    """Manifest entries of all jobs, in job order, on 1..n processes or Dask."""
    from dials.util import progress

    nproc = min(resolve_nproc(params), len(jobs))
    method = params.mp.method
    if method == "dask":
        return _run_dask(jobs, params, dynamic, nproc)
    if nproc <= 1:
        iterator = (extract_one(job, background, dynamic) for job in jobs)
        entries = []
        for entry in progress(iterator, total=len(jobs), disable=not show_progress or None):
            _log_entry(entry, len(entries), len(jobs))
            entries.append(entry)
        return entries
    # compute the shared context (and scan predictions) once before forking:
    # the workers inherit them (done already when the dynamic pass ran)
    _prepare_shared_state([job.task for job in jobs], params)
    shared = {"jobs": jobs, "background": background, "dynamic": dynamic}
    with ForkPool(shared, nproc) as pool:
        entries = []
        for entry in progress(pool.map(_forked_job, range(len(jobs))), total=len(jobs),
                              disable=not show_progress or None):
            _log_entry(entry, len(entries), len(jobs))
            entries.append(entry)
        return entries


def _predict_scans(tasks, params):
    """Fill the Bragg prediction cache of every rotation scan of the tasks."""
    if "predicted" not in bragg_methods(params.masking.bragg):
        return
    seen = set()
    for task in tasks:
        expt = task.experiment
        if task.frame is None or id(expt) in seen:
            continue
        seen.add(id(expt))
        scan_predictions(task, params, context_for(task, params).predictions)


def _prepare_shared_state(tasks, params):
    """The first context and the scan predictions, made once in this process
    (forked extraction workers inherit them)."""
    context_for(tasks[0], params)
    _predict_scans(tasks, params)


def _run_dask(jobs, params, dynamic, nproc):
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise Sorry("mp.method=dask needs dask.distributed: pip install 'dask[distributed]'")
    from dxtbx.model.experiment_list import ExperimentList

    import uuid

    # long-lived workers of an external cluster forget contexts of other runs
    run_token = uuid.uuid4().hex
    dynamic_path = None
    if dynamic is not None:
        dynamic_path = os.path.abspath(os.path.join(jobs[0].out_dir, DYNAMIC_MASK_NAME))
    specs = [
        {
            "experiment_json": ExperimentList([job.task.experiment]).as_json(),
            "still_id": job.task.still_id,
            "experiment_id": job.task.experiment_id,
            "index_in_imageset": job.task.index_in_imageset,
            "frame": job.task.frame,
            "bragg_widths": job.task.bragg_widths,
            "image_path": job.task.image_path,
            "params": job.params,
            "ndiv": list(job.ndiv),
            "out_dir": os.path.abspath(job.out_dir),
            "reflections": job.reflections,
            "dynamic_mask_path": dynamic_path,
            "run_token": run_token,
        }
        for job in jobs
    ]
    address = params.mp.dask.scheduler_address
    cluster = None
    if address:
        client = Client(address)
    else:
        cluster = LocalCluster(n_workers=nproc, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(_dask_job, specs, pure=False)
        # only the small manifest entries come back; the voxel sums stay in
        # the per-image files each worker wrote
        entries = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    for n, entry in enumerate(entries):
        _log_entry(entry, n, len(entries))
    return entries


def _log_entry(entry, n, total):
    if entry["status"] != "extracted":
        logger.warning("Skipping image %s: %s", entry["image_path"], entry["reason"])
        return
    pc = entry["pixel_counts"]
    logger.debug(
        "Image %d/%d %s: kept %d of %d pixels in %d voxels (%.2f s)",
        n + 1, total, os.path.basename(entry["image_path"]), pc["kept"], pc["total"],
        entry["n_voxels"], entry["seconds"],
    )


def _find_context(contexts, task):
    for detector, beam, context in contexts:
        if task.experiment.detector == detector and task.experiment.beam == beam:
            return context
    return None


def _dynamic_accumulator(tasks, params):
    d = params.masking.dynamic
    return masks.DynamicMaskAccumulator(
        tasks[0].experiment.detector, d.hot_threshold, d.hot_fraction, d.hot_ratio,
        d.dead_min_expected_counts,
    )


def _accumulate_dynamic(tasks, params):
    """Per-pixel sums of the dynamic-mask pass over some images."""
    acc = _dynamic_accumulator(tasks, params)
    for task in tasks:
        try:
            raw = read_image(task)
        except ImageError:
            continue
        acc.add(raw)
    return acc.sums()


def _forked_dynamic(shared, indices):
    return _accumulate_dynamic([shared["tasks"][i] for i in indices], shared["params"])


def dynamic_mask(tasks, params, while_waiting=None):
    """Hot and dead pixels from a pass over every image (in parallel with
    mp.method=multiprocessing: each worker sums its share of the images;
    ``while_waiting()`` runs in this process meanwhile)."""
    acc = _dynamic_accumulator(tasks, params)
    nproc = min(resolve_nproc(params), len(tasks))
    if nproc > 1 and params.mp.method == "multiprocessing":
        shares = [list(range(k, len(tasks), nproc)) for k in range(nproc)]
        with ForkPool({"tasks": tasks, "params": params}, nproc) as pool:
            partial_sums = pool.map(_forked_dynamic, shares)  # submitted (forked) now
            if while_waiting is not None:
                while_waiting()
            for sums in partial_sums:
                acc.add_sums(sums)
    else:
        acc.add_sums(_accumulate_dynamic(tasks, params))
    result = acc.masks()
    n_bad = sum(int((~m).sum()) for m in result)
    logger.info("Dynamic mask: %d hot or dead pixels", n_bad)
    return result


def log_summary(manifest):
    stages = ("total", "static", "resolution", "dynamic", "trusted", "bragg", "kept")
    rows = [("image", "status") + stages + ("voxels",)]
    for e in manifest["images"]:
        pc = e.get("pixel_counts", {})
        rows.append(
            (
                os.path.basename(e["image_path"]),
                e["status"],
                *(str(pc.get(k, "")) for k in stages),
                str(e.get("n_voxels", "")),
            )
        )
    from dials.util import tabulate

    logger.info("\nExtraction summary\n%s", tabulate(rows, headers="firstrow"))
    for e in manifest["images"]:
        if e["status"] != "extracted":
            logger.info("Skipped %s: %s", e["image_path"], e["reason"])
