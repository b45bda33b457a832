"""Merging scaled observations into the voxel map, and its statistics.

``merge_run`` is the library entry point behind ``dials.diffuse_merge``: grid
from the crystal models, observations from the extraction files, relative
scaling, weighted merge, isotropic/anisotropic split, CC1/2 per resolution
shell, and every output file (written by ``merged_files``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from dials.util import Sorry

from dials_diffuse import geometry
from dials_diffuse import grid as grid_module
from dials_diffuse import crystal_checks, merged_files, scaling, symmetry
from dials_diffuse.statistics import cc_half, image_halves, isotropic_at, isotropic_profile
from dials_diffuse.diffuse_files import image_frame
from dials_diffuse.observations import find_extraction_files, load_observations
from dials_diffuse.command_util import resolve_nproc
from dials_diffuse import absolute_scale
from dials_diffuse.merge_ambiguity import resolve_in_merge
from dials_diffuse.phil_scopes import check_grid_params
from dials_diffuse.diffuse_files import read_image_file
from dials.util import tabulate

logger = logging.getLogger("dials.diffuse_merge")


@dataclasses.dataclass
class MergedMap:
    voxel_grid: np.ndarray  # (n, 3) ASU grid indices
    hkl: np.ndarray  # (n, 3) voxel centres
    q: np.ndarray  # (n, 3) crystal Cartesian q of the centres
    qmag: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    n_observations: np.ndarray
    n_rejected: np.ndarray
    isotropic: np.ndarray  # radial average at each voxel's |q|
    on_bragg: np.ndarray  # voxel centre on an integer hkl
    multiplicity: np.ndarray  # grid points each ASU voxel stands for


def build_grid(experiments, params, extracted_ndiv=None):
    """The GlobalVoxelGrid of a run, with cell and orientation checks."""
    ndiv = check_grid_params(params.grid, default=extracted_ndiv or (None,) * 3)
    crystals = [e.crystal for e in experiments if e.crystal is not None]
    if not crystals:
        raise Sorry("the experiments have no crystal models")
    groups = crystal_checks.space_group_symbols(crystals)
    if len(groups) > 1:
        raise Sorry(f"the crystal models have different space groups: {', '.join(sorted(groups))}")
    mean, std, cells = grid_module.unit_cell_statistics(crystals)
    spread = crystal_checks.cell_spread(crystals)
    rel = spread.relative_deviation
    bad = spread.outliers(params.cell_tolerance)
    if bad.size:
        msg = (
            f"{bad.size} crystal model(s) have a cell edge more than "
            f"{100 * params.cell_tolerance:.1f} % from the median "
            f"(experiments {', '.join(map(str, bad[:10]))})"
        )
        if params.cell_outliers == "fail":
            raise Sorry(msg + "; raise cell_tolerance or set cell_outliers=exclude")
        logger.warning("%s: excluded", msg)
    logger.info(
        "Average cell of %d crystals: %s (spread %s)",
        len(crystals),
        ", ".join(f"{v:.3f}" for v in mean),
        ", ".join(f"{v:.3f}" for v in std),
    )
    orientation = misorientation_summary(experiments, params)
    sg = crystals[0].get_space_group()
    grid = grid_module.GlobalVoxelGrid(
        mean, sg, ndiv, d_min=params.d_min, d_max=params.d_max,
        cell_spread={"mean": mean.tolist(), "std": std.tolist(),
                     "max_relative_edge_deviation": float(rel.max()),
                     "excluded_experiments": bad.tolist() if params.cell_outliers == "exclude" else []},
        orientation=orientation,
        n_crystals=len(crystals),
    )
    return grid, set(bad.tolist()) if params.cell_outliers == "exclude" else set()


def misorientation_summary(experiments, params):
    """RMS misorientation of the crystal models from the first (modulo symmetry)."""
    crystals = [e.crystal for e in experiments if e.crystal is not None]
    is_sequence = any(not e.is_still() for e in experiments if e.crystal is not None)
    single = params.misorientation.single_crystal
    if single == "auto":
        single = "yes" if is_sequence else "no"
    if len(crystals) < 2:
        return {"n_crystals": len(crystals), "rms_misorientation_deg": 0.0, "checked": single == "yes"}
    angles = crystal_checks.misorientations_from_first(crystals)
    rms = crystal_checks.rms_misorientation(angles)
    summary = {
        "n_crystals": len(crystals),
        "rms_misorientation_deg": rms,
        "max_misorientation_deg": float(np.nanmax(angles)) if np.isfinite(angles).any() else float("nan"),
        "checked": single == "yes",
        "threshold_deg": params.misorientation.max_rms_deg,
    }
    logger.info("RMS misorientation from the first crystal (modulo symmetry): %.3f deg", rms)
    if single == "yes" and rms > params.misorientation.max_rms_deg:
        msg = (f"RMS misorientation {rms:.2f} deg exceeds misorientation.max_rms_deg="
               f"{params.misorientation.max_rms_deg}")
        if params.misorientation.action == "fail":
            raise Sorry(msg + " for what should be one crystal")
        logger.warning("Warning: %s", msg)
    return summary


def extracted_ndiv(path):

    _, meta = read_image_file(path, keys=())
    return tuple(meta.get("ndiv", (None, None, None)))


def merge_map(obs, result, grid, multiplicity) -> MergedMap:
    intensity, sigma, n_obs = result.intensity, result.sigma, result.n_observations
    if sigma is None:
        intensity, sigma, n_obs = scaling.merge_intensities(obs, result.model, ~result.rejected)
    n_rej = np.bincount(obs.voxel[result.rejected], minlength=obs.n_voxels)
    keep = n_obs > 0
    ndiv = np.array(grid.ndiv)
    hkl = obs.voxel_grid / ndiv
    q = grid.q_of(hkl)
    on_bragg = np.all(obs.voxel_grid % ndiv == 0, axis=1)
    centres, means, _ = isotropic_profile(obs.voxel_qmag[keep], intensity[keep],
                                          multiplicity[keep], on_bragg[keep])
    iso = isotropic_at(obs.voxel_qmag, centres, means)
    return MergedMap(
        voxel_grid=obs.voxel_grid[keep],
        hkl=hkl[keep],
        q=q[keep],
        qmag=obs.voxel_qmag[keep],
        intensity=intensity[keep],
        sigma=sigma[keep],
        n_observations=n_obs[keep],
        n_rejected=n_rej[keep].astype(np.int64),
        isotropic=iso[keep],
        on_bragg=on_bragg[keep],
        multiplicity=multiplicity[keep],
    )


def merge_run(experiments, inputs, params):
    """Scale and merge extracted images; write every output. Returns a summary dict."""
    t0 = time.time()
    if params.scaling.max_iterations < 1:
        raise Sorry(f"scaling.max_iterations={params.scaling.max_iterations}: must be >= 1")
    if params.d_min is not None and params.d_max is not None and params.d_min >= params.d_max:
        raise Sorry(f"d_min={params.d_min} must be smaller than d_max={params.d_max}")
    files = find_extraction_files(inputs)
    grid, excluded = build_grid(experiments, params, extracted_ndiv(files[0]))
    cell_contents = absolute_scale.cell_contents(params.absolute_scale, grid)
    operators = symmetry.laue_operators(grid.space_group, params.symmetry.merge)
    try:
        symmetry.check_ndiv(grid.ndiv, operators)
    except ValueError as e:
        raise Sorry(f"symmetry.merge={params.symmetry.merge}: {e}")
    obs = load_observations(files, grid, operators, params.d_min, params.d_max,
                            nproc=resolve_nproc(params),
                            detector_xy=scaling.needs_detector_xy(params.scaling.surfaces),
                            while_reading=_load_compiled_sweeps(params))
    n_expt = len(experiments)
    for meta in obs.metadata:
        if meta["experiment_id"] >= n_expt:
            raise Sorry(
                f"extraction file of image {meta['image_path']} refers to experiment "
                f"{meta['experiment_id']}, but the experiments have only {n_expt}: "
                "experiments and extracted files do not match"
            )
    if excluded:
        keep_images = np.array([m["experiment_id"] not in excluded for m in obs.metadata])
        obs = _select_images(obs, keep_images)
    # indexing ambiguity: every image brought to one setting (its report is
    # written with the other outputs)
    obs, ambiguity_report = resolve_in_merge(experiments, obs, grid, operators, params)
    basis = smooth_scale_basis(experiments, obs, params.scaling)
    # mdx2's surfaces: their shared columns exist before the workers fork
    surfaces = scaling.setup_surfaces(params.scaling, obs, image_angles(experiments, obs))
    t_read = time.time()
    # one set of forked workers for every pass over the observations
    with scaling.ObservationPasses(obs, resolve_nproc(params), params.kernel) as passes:
        result = scaling.refine_scales(
            obs, params.scaling, passes, halves=image_halves(obs.n_images, params.statistics.seed),
            scale_basis=basis, surfaces=surfaces)
        passes.log_timings()
    if not result.converged and params.scaling.fail_if_not_converged:
        raise Sorry("scaling did not converge: raise scaling.max_iterations or check the data")
    multiplicity = symmetry.orbit_sizes(obs.voxel_grid, operators)
    merged = merge_map(obs, result, grid, multiplicity)
    on_bragg = np.all(obs.voxel_grid % np.array(grid.ndiv) == 0, axis=1)
    stats = cc_half(obs, result.model, ~result.rejected, on_bragg, multiplicity,
                    n_shells=params.statistics.n_shells, seed=params.statistics.seed,
                    half_maps=result.half_maps)
    _log_cc_half(stats)
    t_merge = time.time()
    out = params.output.directory
    absolute = absolute_scale.absolute_scale_run(merged, experiments, cell_contents,
                                                 params.absolute_scale)
    merged_files.write_all(out, grid, obs, result, merged, stats, params, operators,
                           absolute=absolute, ambiguity=ambiguity_report,
                           nthreads=resolve_nproc(params))
    logger.info(
        "Read %.1f s, scale and merge %.1f s, write %.1f s",
        t_read - t0, t_merge - t_read, time.time() - t_merge,
    )
    return {"grid": grid, "observations": obs, "scaling": result, "merged": merged,
            "statistics": stats, "absolute": absolute}


def _load_compiled_sweeps(params):
    """numba and the compiled sweeps loaded while the files are read (0.4 s
    of imports that the reading workers, forked before, do not need);
    kernel=numba without numba is still the scaling passes' Sorry."""
    if params.kernel == "numpy":
        return None
    return lambda: scaling.load_kernels("auto")


def smooth_scale_basis(experiments, obs, scaling_params):
    """The SmoothScaleBasis of scaling.scale_model=smooth (None for per_image):
    each image's rotation angle at its centre, one smooth function per sweep."""
    if scaling_params.scale_model != "smooth":
        return None
    interval = scaling_params.scale_interval
    if interval is None or not interval > 0:
        raise Sorry(f"scaling.scale_interval={interval}: must be > 0 degrees")
    phi = image_angles(experiments, obs)
    if phi is None:
        raise Sorry("scaling.scale_model=smooth needs rotation sequences: the images include "
                    "stills (use scale_model=per_image)")
    sweep = [meta["experiment_id"] for meta in obs.metadata]
    basis = scaling.SmoothScaleBasis.from_angles(phi, sweep, interval)
    logger.info(
        "Smooth scales: %d control points (every <= %g deg) for %d images in %d sweep(s)",
        basis.control_phi.size, interval, obs.n_images, len(set(sweep)),
    )
    return basis


def image_angles(experiments, obs):
    """The rotation angle (deg) at the centre of each image, None if any
    image is a still."""
    phi = []
    for meta in obs.metadata:
        expt = experiments[meta["experiment_id"]]
        if meta.get("is_still", expt.is_still()) or expt.scan is None or expt.goniometer is None:
            return None
        phi.append(geometry.frame_centre_angle(expt.scan, image_frame(meta, expt), deg=True))
    return np.array(phi, np.float64)


def _select_images(obs, keep_images):
    keep_obs = keep_images[obs.image]
    new_index = np.cumsum(keep_images) - 1
    for name in ("voxel", "signal", "factor", "variance", "detector_x", "detector_y"):
        if getattr(obs, name) is not None:
            setattr(obs, name, getattr(obs, name)[keep_obs])
    obs.image = new_index[obs.image[keep_obs]].astype(np.int32)
    obs.image_ids = obs.image_ids[keep_images]
    obs.image_gain = obs.image_gain[keep_images]
    obs.metadata = [m for m, k in zip(obs.metadata, keep_images) if k]
    return obs


def _log_cc_half(stats):

    rows = [["d_max", "d_min", "voxels", "CC1/2", "CC1/2 no Bragg", "CC1/2 aniso", "CC1/2 aniso no Bragg"]]
    for r in stats["shells"]:
        rows.append([
            f"{r['d_max']:.2f}" if r["d_max"] else "inf", f"{r['d_min']:.2f}", r["n_voxels"],
            f"{r['cc_half_total']:.3f}", f"{r['cc_half_total_no_bragg']:.3f}",
            f"{r['cc_half_anisotropic']:.3f}", f"{r['cc_half_anisotropic_no_bragg']:.3f}",
        ])
    o = stats["overall"]
    rows.append(["all", "", stats["n_voxels_in_both_halves"], f"{o['cc_half_total']:.3f}",
                 f"{o['cc_half_total_no_bragg']:.3f}", f"{o['cc_half_anisotropic']:.3f}",
                 f"{o['cc_half_anisotropic_no_bragg']:.3f}"])
    logger.info("\nHalf-dataset correlations (random halves by image)\n%s", tabulate(rows, headers="firstrow"))
