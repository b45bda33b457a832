"""Extraction mode of dials.diffuse_check: every diagnostic of one extracted image.

``run_extraction_check(inputs, params, experiments)`` reads the per-image file
(and what else was given or lies beside it), writes the plots and summaries of
the guide's check_diffuse_extraction.py and returns the Inventory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional

import numpy as np

from dials.util import Sorry

from dials_diffuse.io import read_background_map
from dials_diffuse import diffuse_files, geometry
from dials_diffuse.diffuse_files import image_frame
from dials_diffuse.statistics import radial_profile
from dials_diffuse.diagnostics import extraction_plots as plots
from dials_diffuse.diagnostics import inputs as inp
from dials_diffuse.diagnostics.plotting import Inventory, describe, subsample

logger = logging.getLogger("dials.diffuse_check")

SAMPLE_KEYS = (
    "sample_panel", "sample_fast", "sample_slow", "sample_raw_counts", "sample_background",
    "sample_gain", "sample_exposure_time", "sample_polarization", "sample_solid_angle",
    "sample_efficiency", "sample_air", "sample_intensity", "sample_sigma", "sample_q",
)
STAGES = ("total", "static", "dynamic", "trusted", "bragg", "resolution", "intensity", "kept")
STAGE_TEXT = {
    "total": "pixels considered (after pixel_step)",
    "static": "after the static mask (untrusted regions, beamstop, gaps)",
    "dynamic": "after the dynamic mask (hot/dead pixels)",
    "trusted": "after the trusted range of each image",
    "bragg": "after the Bragg mask",
    "resolution": "after the resolution limits",
    "intensity": "after the intensity limits",
    "kept": "kept (written to the file)",
}
# the per-pixel arrays plotted (not hkl: large and not needed)
PIXEL_KEYS = tuple(k for k in diffuse_files.PIXEL_KEYS if k != "hkl")
SUMMARY_NAME = "extraction_diagnostics_summary.txt"
CORRECTION_NAME = "intensity_correction_summary.txt"


@dataclasses.dataclass
class Observations:
    """The values plotted: per pixel, or per voxel when the file has no pixel arrays."""

    level: str  # "pixel" or "voxel"
    intensity: np.ndarray
    sigma: np.ndarray
    qmag: np.ndarray
    q: Optional[np.ndarray] = None  # (n, 3) lab-frame q, 1/Angstrom
    panel: Optional[np.ndarray] = None
    fast: Optional[np.ndarray] = None
    slow: Optional[np.ndarray] = None

    @property
    def isigi(self):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.sigma > 0, self.intensity / np.where(self.sigma > 0, self.sigma, 1),
                            np.nan)


def observations_from(arrays, metadata, experiments=None) -> Observations:
    if "intensities" in arrays and "q_vectors" in arrays:
        q = arrays["q_vectors"]
        return Observations(
            level="pixel",
            intensity=arrays["intensities"].astype(np.float64),
            sigma=arrays["sigmas"].astype(np.float64),
            qmag=np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64)),
            q=q,
            panel=arrays.get("original_panel_ids"),
            fast=arrays.get("original_fast_coords"),
            slow=arrays.get("original_slow_coords"),
        )
    logger.info("The extraction file has no per-pixel arrays (output.save_pixels=off): "
                "plotting per-voxel values; the intensity heatmaps need pixel arrays")
    factor = arrays["voxel_sum_factor"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        intensity = arrays["voxel_sum_signal"] / factor
        sigma = np.sqrt(arrays["voxel_sum_variance"]) / factor
    q = None
    if experiments is not None:
        try:
            expt = experiments[int(metadata["experiment_id"])]
            m = geometry.setting_matrix(expt, image_frame(metadata, expt))
            q = arrays["voxel_mean_hkl"].astype(np.float64) @ m.T
        except Exception as e:  # a model that does not match: no q vectors
            logger.info("Cannot compute voxel q vectors from the experiments: %s", e)
    return Observations("voxel", intensity, sigma, arrays["voxel_mean_qmag"].astype(np.float64), q)


def detector_shapes(experiments, metadata, raw, masks, obs=None):
    """(slow, fast) shape of each panel, from whatever describes the detector
    (last resort: the extent of the kept pixel coordinates)."""
    if experiments is not None and int(metadata.get("experiment_id", 0)) < len(experiments):
        det = experiments[int(metadata["experiment_id"])].detector
        if det is not None:
            return [tuple(reversed(p.get_image_size())) for p in det]
    if raw is not None:
        return [r.shape for r in raw]
    for m in masks.values():
        return [p.shape for p in m]
    if obs is not None and obs.panel is not None and obs.panel.size:
        logger.info("No detector model: panel sizes from the extent of the kept pixels")
        shapes = []
        for pid in range(int(obs.panel.max()) + 1):
            sel = obs.panel == pid
            shapes.append((int(obs.slow[sel].max()) + 1, int(obs.fast[sel].max()) + 1)
                          if sel.any() else (1, 1))
        return shapes
    return None


def correction_reference(sample):
    """Gain and 5/50/95 % of F = P Omega eta T_air t from the correction sample."""
    if sample is None or sample["sample_gain"].size == 0:
        return None
    f = (sample["sample_polarization"] * sample["sample_solid_angle"] * sample["sample_efficiency"]
         * sample["sample_air"] * sample["sample_exposure_time"])
    f05, f50, f95 = np.percentile(f, [5, 50, 95])
    return {"gain": float(np.median(sample["sample_gain"])), "F05": f05, "F50": f50, "F95": f95}


def correction_summary_text(sample, metadata, n_rows=50) -> str:
    """The sample pixels with raw counts, every factor, corrected I, sigma, I/sigma, q."""
    s = sample
    f = (s["sample_polarization"] * s["sample_solid_angle"] * s["sample_efficiency"]
         * s["sample_air"] * s["sample_exposure_time"])
    recomputed = (s["sample_raw_counts"] * s["sample_gain"] - s["sample_background"]) / f
    with np.errstate(divide="ignore", invalid="ignore"):
        isigi = s["sample_intensity"] / s["sample_sigma"]
    q = s["sample_q"]
    qmag = np.sqrt(np.einsum("ij,ij->i", q, q))
    n = s["sample_gain"].size
    corr = metadata.get("corrections", {})
    lines = [
        "Intensity corrections of a sample of kept pixels",
        f"image: {metadata.get('image_path')} (still {metadata.get('still_id')}, "
        f"experiment {metadata.get('experiment_id')})",
        "I = (counts * gain - background) / F,  F = P * Omega * eta * T_air * t_exp,",
        "sigma = gain * sqrt(counts) / F  (Poisson on the raw counts)",
        "corrections applied: " + ", ".join(
            f"{k}={'on' if v else 'off'}" for k, v in corr.items() if isinstance(v, bool)),
        f"sample: {n} pixels evenly spaced through the kept pixels; {min(n, n_rows)} listed",
        "",
        "Ranges over the sample (min / median / max):",
    ]
    for label, values in (
        ("raw counts", s["sample_raw_counts"]), ("background", s["sample_background"]),
        ("gain", s["sample_gain"]), ("exposure time (s)", s["sample_exposure_time"]),
        ("polarization P", s["sample_polarization"]), ("solid angle Omega (sr)", s["sample_solid_angle"]),
        ("efficiency eta", s["sample_efficiency"]), ("air transmission T", s["sample_air"]),
        ("total factor F", f), ("corrected I", s["sample_intensity"]), ("sigma", s["sample_sigma"]),
        ("I/sigma", isigi), ("|q| (1/A)", qmag),
    ):
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            lines.append(f"  {label:24s} {v.min():12.5g} {np.median(v):12.5g} {v.max():12.5g}")
    dev = np.abs(recomputed - s["sample_intensity"]) / np.maximum(np.abs(s["sample_intensity"]), 1e-30)
    lines.append(f"  max relative difference of I recomputed from the factors: {np.nanmax(dev) if n else 0:.2e}")
    lines.append("")
    header = (f"{'panel':>5} {'fast':>5} {'slow':>5} {'counts':>9} {'bg':>8} {'gain':>6} {'t_exp':>7} "
              f"{'P':>7} {'Omega':>10} {'eta':>7} {'T_air':>7} {'F':>10} {'I':>11} {'sigma':>10} "
              f"{'I/sig':>7} {'|q|':>7} {'qx':>8} {'qy':>8} {'qz':>8}")
    lines.append(header)
    rows = np.unique(np.linspace(0, n - 1, min(n, n_rows)).astype(int)) if n else []
    for i in rows:
        lines.append(
            f"{int(s['sample_panel'][i]):5d} {int(s['sample_fast'][i]):5d} {int(s['sample_slow'][i]):5d} "
            f"{s['sample_raw_counts'][i]:9.1f} {s['sample_background'][i]:8.3g} {s['sample_gain'][i]:6.3g} "
            f"{s['sample_exposure_time'][i]:7.3g} {s['sample_polarization'][i]:7.4f} "
            f"{s['sample_solid_angle'][i]:10.4e} {s['sample_efficiency'][i]:7.4f} {s['sample_air'][i]:7.4f} "
            f"{f[i]:10.4e} {s['sample_intensity'][i]:11.5g} {s['sample_sigma'][i]:10.4g} "
            f"{isigi[i]:7.3f} {qmag[i]:7.4f} {q[i, 0]:8.4f} {q[i, 1]:8.4f} {q[i, 2]:8.4f}"
        )
    return "\n".join(lines)


def stage_table(pixel_counts: dict) -> str:
    lines = [f"{'stage':12s} {'pixels':>10} {'% of total':>10} {'removed':>10}  meaning"]
    total = pixel_counts.get("total") or 0
    previous = None
    for stage in STAGES:
        if stage not in pixel_counts:
            continue
        n = int(pixel_counts[stage])
        removed = "" if previous is None else str(previous - n)
        pct = 100.0 * n / total if total else float("nan")
        lines.append(f"{stage:12s} {n:10d} {pct:10.2f} {removed:>10}  {STAGE_TEXT[stage]}")
        previous = n
    return "\n".join(lines)


def extraction_summary_text(path, metadata, arrays, obs, sample, masks, mask_paths, raw_desc,
                            background_map, inventory, elapsed, extra=()) -> str:
    n_vox = len(arrays["voxel_indices"])
    i, isigi = obs.intensity, obs.isigi
    finite = np.isfinite(i)
    lines = [
        "dials.diffuse_check: extraction diagnostics",
        "=" * 44,
        f"extraction file: {path}",
        f"image: {metadata.get('image_path')} (index {metadata.get('image_index')}, still id "
        f"{metadata.get('still_id')}, experiment {metadata.get('experiment_id')})",
        f"raw image for the overlay: {raw_desc}",
        "masks: " + (", ".join(f"{k}={v}" for k, v in sorted(mask_paths.items())) or "none"),
        f"background map: {background_map or 'none'}",
        f"wavelength {metadata.get('wavelength')} A, ndiv {metadata.get('ndiv')}, pixel_step "
        f"{metadata.get('pixel_step')}, Bragg mask: {metadata.get('bragg_mask')}, gain "
        f"{metadata.get('gain')}, exposure time {metadata.get('exposure_time')} s",
        "",
        "Pixel counts at each masking stage (from the extraction metadata)",
        stage_table(metadata.get("pixel_counts", {})),
    ]
    for kind in ("pixel", "bragg", "total"):
        if kind in masks:
            m = masks[kind]
            n_true = sum(int(p.sum()) for p in m)
            n_all = sum(p.size for p in m)
            lines.append(f"{kind} mask: {n_true} of {n_all} pixels usable "
                         f"({100.0 * n_true / max(n_all, 1):.2f} %), {n_all - n_true} masked")
    lines += ["", "Corrections"]
    corr = metadata.get("corrections", {})
    lines.append("  applied: " + ", ".join(f"{k}={v}" for k, v in corr.items()))
    if sample is not None and sample["sample_gain"].size:
        for key, label in (("sample_polarization", "polarization P"), ("sample_solid_angle", "solid angle Omega"),
                           ("sample_efficiency", "efficiency eta"), ("sample_air", "air transmission T"),
                           ("sample_background", "background"), ("sample_raw_counts", "raw counts")):
            v = sample[key]
            lines.append(f"  {label:20s} range {v.min():.5g} .. {v.max():.5g} (median {np.median(v):.5g}, "
                         f"{v.size} sampled pixels)")
    else:
        lines.append("  no correction sample in the file")
    lines += [
        "",
        f"Statistics ({obs.level} level: {'kept pixels' if obs.level == 'pixel' else 'voxels of this image'})",
        f"  kept pixels: {int(metadata.get('pixel_counts', {}).get('kept', 0))}"
        + (f" (pixel arrays: {obs.intensity.size}"
           + (f", every {int(metadata['pixel_sample_step'])}th row and column"
              if int(metadata.get("pixel_sample_step") or 1) > 1 else "") + ")"
           if obs.level == "pixel" else ""),
        f"  voxels: {n_vox}, pixels per voxel: mean {arrays['voxel_n_pixels'].mean():.2f}, "
        f"max {int(arrays['voxel_n_pixels'].max()) if n_vox else 0}",
        "  " + describe(i, "intensity"),
        "  " + describe(obs.sigma, "sigma"),
        "  " + describe(isigi, "I/sigma"),
        f"  I/sigma: mean {np.nanmean(isigi):.4g}, median {np.nanmedian(isigi):.4g}, "
        f"{100.0 * np.nanmean(isigi > 1):.2f} % above 1",
        f"  intensities <= 0: {int((i[finite] <= 0).sum())} ({100.0 * (i[finite] <= 0).mean():.2f} %)",
        f"  sigma == 0: {int((obs.sigma == 0).sum())}",
        "  " + describe(obs.qmag, "|q| (1/A)"),
    ]
    qpos = obs.qmag[obs.qmag > 0]
    if qpos.size:
        lines.append(f"  resolution: d from {1 / qpos.max():.3f} to {1 / qpos.min():.2f} A")
    if obs.panel is not None:
        pids, counts = np.unique(obs.panel, return_counts=True)
        lines.append("  kept pixels per panel: " + ", ".join(f"{p}: {c}" for p, c in zip(pids, counts)))
    lines += list(extra)
    lines += ["", "Plot inventory", inventory.inventory_text(extra=[SUMMARY_NAME, "dials.diffuse_check.html"]),
              "", f"time: {elapsed:.1f} s"]
    return "\n".join(lines)


def run_extraction_check(found: inp.Inputs, params, experiments=None) -> Inventory:
    t0 = time.time()
    out = Inventory(params.output.directory)
    path = inp.choose_extraction_file(found, params.image)
    arrays, metadata = diffuse_files.read_image_file(
        path, keys=diffuse_files.VOXEL_KEYS + PIXEL_KEYS + SAMPLE_KEYS)
    logger.info("Extraction file %s: image %s", path, metadata.get("image_path"))
    still_id = int(metadata.get("still_id", 0))
    mask_paths = inp.find_masks_beside(path, still_id, found.masks)
    missing = [k for k in inp.MASK_KINDS if k not in mask_paths]
    if missing:
        logger.info("No %s mask given or beside %s (output.masks=True writes them)",
                    ", ".join(missing), os.path.basename(path))
    masks = {k: inp.load_mask(p, k) for k, p in mask_paths.items()}

    raw, raw_desc = inp.read_raw_image(metadata, experiments)
    if raw is None:
        logger.info("No raw image: %s", raw_desc)
    obs = observations_from(arrays, metadata, experiments)
    shapes = detector_shapes(experiments, metadata, raw, masks, obs)
    for kind in list(masks):
        problem = inp.check_panel_shapes(masks[kind], shapes, f"{kind} mask {mask_paths[kind]}")
        if problem:
            raise Sorry(problem)
    if raw is not None and inp.check_panel_shapes(raw, shapes, "raw image"):
        logger.info("Not using the raw image: %s", inp.check_panel_shapes(raw, shapes, "raw image"))
        raw, raw_desc = None, "does not match the detector"
    background = None
    if found.background_map:
        background = read_background_map(found.background_map)
        problem = inp.check_panel_shapes(background, shapes, f"background map {found.background_map}")
        if problem:
            raise Sorry(problem)

    sample = {k: arrays[k] for k in SAMPLE_KEYS} if all(k in arrays for k in SAMPLE_KEYS) else None
    n = obs.intensity.size
    pick = subsample(n, params.max_plot_points, params.seed)
    if pick.size < n:
        logger.info("Scatter plots show %d of %d %ss (max_plot_points)", pick.size, n, obs.level)
    have_coords = obs.level == "pixel" and obs.fast is not None and shapes is not None

    # 1. overlay
    name = "diffuse_pixel_overlay.png"
    if raw is None:
        out.skip(name, f"no raw image ({raw_desc})")
    else:
        kept = (plots.pixels_to_mask(obs.panel, obs.fast, obs.slow, shapes) if have_coords
                else masks.get("total"))
        if kept is None:
            logger.info("Overlay without kept pixels: no pixel coordinates and no total mask")
        fig = plots.plot_pixel_overlay(
            raw, kept=kept, bragg=masks.get("bragg"), pixel=masks.get("pixel"),
            title=f"{os.path.basename(str(metadata.get('image_path')))}: log10(1 + counts); "
                  + ("kept pixels" if have_coords else "total mask") + " and masks")
        out.save_figure(fig, name, "Raw image with kept diffuse pixels and masks")
    # 2. correction summary
    if sample is None:
        out.skip(CORRECTION_NAME, "the extraction file has no sample_* correction arrays")
    else:
        out.save_text(correction_summary_text(sample, metadata, params.extraction.sample_rows),
                      CORRECTION_NAME, "Intensity corrections of sampled pixels")
    # 3. q projections
    for i, j in ((0, 1), (0, 2), (1, 2)):
        name = f"q_projection_{plots.AXIS_NAMES[i]}_{plots.AXIS_NAMES[j]}.png"
        if obs.q is None:
            out.skip(name, "no q vectors (no pixel arrays and no experiments for the voxel hkl)")
            continue
        out.save_figure(plots.plot_q_projection(obs.q[pick], obs.intensity[pick], (i, j), n),
                        name, f"q projection {plots.AXIS_NAMES[i]}-{plots.AXIS_NAMES[j]}")
    # 4. radial
    profile = radial_profile(obs.qmag, obs.intensity)
    out.save_figure(plots.plot_radial(obs.qmag[pick], obs.intensity[pick], profile, n),
                    "radial_q_distribution.png", "Intensity vs |q|")
    # 5. histogram
    out.save_figure(plots.plot_intensity_histogram(obs.intensity), "intensity_histogram.png",
                    "Intensity histograms (linear and log)")
    # 6. heatmaps
    if not have_coords:
        out.skip("intensity_heatmap_panel_0.png",
                 "no per-pixel coordinates in the file (output.save_pixels=off)"
                 if obs.level == "voxel" else "no detector description")
    else:
        # pixel arrays sampled on every n-th raster row and column (save_pixels=sample)
        step = int(metadata.get("pixel_step") or 1) * max(1, int(metadata.get("pixel_sample_step") or 1))
        for pid, shape in enumerate(shapes):
            sel = obs.panel == pid
            if not sel.any():
                out.skip(f"intensity_heatmap_panel_{pid}.png", f"no kept pixels on panel {pid}")
                continue
            img = plots.heatmap_image(obs.fast[sel], obs.slow[sel], obs.intensity[sel], shape, step)
            out.save_figure(plots.plot_heatmap(img, pid, step), f"intensity_heatmap_panel_{pid}.png",
                            f"Intensity on panel {pid}")
    # 7. sigma vs I
    out.save_figure(plots.plot_sigma_vs_intensity(obs.intensity[pick], obs.sigma[pick],
                                                  correction_reference(sample), n),
                    "sigma_vs_intensity.png", "Sigma vs intensity with the Poisson reference")
    # 8. I/sigma
    out.save_figure(plots.plot_isigi_histogram(obs.isigi), "isigi_histogram.png", "I/sigma histogram")
    if background is not None:
        out.save_figure(plots.plot_background_map(background), "background_map.png", "Background map")
    extra = []
    if background is not None and sample is not None:
        extra = ["", background_comparison(background, sample)]
    text = extraction_summary_text(path, metadata, arrays, obs, sample, masks, mask_paths, raw_desc,
                                   found.background_map, out, time.time() - t0, extra)
    out.save_text(text, SUMMARY_NAME, "Extraction diagnostics summary")
    return out


def background_comparison(background, sample) -> str:
    """The map at the sampled pixels vs the background the extraction subtracted."""
    p, f, s = sample["sample_panel"], sample["sample_fast"], sample["sample_slow"]
    values = np.empty(p.size)
    for pid, panel in enumerate(background):
        sel = p == pid
        values[sel] = panel[s[sel], f[sel]]
    diff = np.abs(values - sample["sample_background"])
    allv = np.concatenate([b.ravel() for b in background])
    return (f"Background map: mean {allv.mean():.4g}, min {allv.min():.4g}, max {allv.max():.4g}; "
            f"at the {p.size} sampled pixels it differs from the background subtracted by the "
            f"extraction by at most {diff.max() if diff.size else 0:.4g}"
            + (" (the extraction used this map)" if diff.size and diff.max() < 1e-6 else
               " (the extraction did not use this map)"))
