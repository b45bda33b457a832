"""Merged mode of dials.diffuse_check: grid, occupancy, scaling, merged map.

``run_merged_check(inputs, params, experiments)`` reads a dials.diffuse_merge
output directory (and optionally the experiments and the extraction
manifest for per-still context), writes the plots and summaries of the guide's
check_phase3_outputs.py plus CC1/2 and anisotropic sections, and returns the
Inventory.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from dials_diffuse import diffuse_files, merged_files
from dials_diffuse.statistics import radial_profile
from dials_diffuse.diagnostics.surface_plots import plot_scaling_surfaces
from dials_diffuse.diagnostics import merged_plots as plots
from dials_diffuse.diagnostics import sections as sec
from dials_diffuse.diagnostics.extraction_plots import plot_intensity_histogram
from dials_diffuse.diagnostics.plotting import Inventory, describe, subsample
from cctbx import uctbx

logger = logging.getLogger("dials.diffuse_check")

SUMMARY_NAME = "phase3_diagnostics_summary.txt"
SLICES = (
    # (file prefix, P1 column, title, colour bar label, scale, colour map)
    ("voxel_occupancy", "n_obs", "Voxel occupancy", "observations per voxel", "linear", "viridis"),
    ("merged_intensity", "I", "Merged intensity", "merged intensity (log scale; black: <= 0)",
     "log", "viridis"),
    ("merged_sigma", "sigma", "Merged σ", "σ(I) (log scale)", "log", "magma"),
    ("merged_isigi", "isigi", "Merged I/σ", "I/σ (1-99 % range)", "linear", "viridis"),
    ("merged_anisotropic", "aniso", "Anisotropic intensity", "I - radial average (centred on 0)",
     "diverging", "RdBu_r"),
)

class MergedMap:
    """The merge outputs and the P1 expansion used by every section."""

    def __init__(self, directory, symmetry_mode=None):
        self.directory = directory
        self.grid, self.scaling, self.voxels, self.stats = merged_files.read_merged(directory)
        self.ndiv = np.array([self.grid["ndiv_h"], self.grid["ndiv_k"], self.grid["ndiv_l"]])
        mode = symmetry_mode or (self.stats or {}).get("symmetry_merge")
        if mode is None:
            logger.info("No symmetry_merge in %s: expanding with the Laue group",
                        merged_files.STATS_NAME)
            mode = "laue"
        self.symmetry_mode = mode
        self.operators = sec.operators_for(self.grid, mode)
        v = self.voxels
        self.intensity = v["I_merged_relative"].astype(np.float64)
        self.sigma = v["Sigma_merged_relative"].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            isigi = np.where(self.sigma > 0, self.intensity / self.sigma, np.nan)
        aniso = v["I_anisotropic"] if "I_anisotropic" in v else np.full(self.intensity.size, np.nan)
        self.p1_indices, self.p1 = sec.expand_columns(
            v["voxel_indices"],
            {"I": self.intensity, "sigma": self.sigma, "isigi": isigi,
             "n_obs": v["num_observations"], "aniso": aniso},
            self.operators, self.ndiv,
        )
        self.has_anisotropic = "I_anisotropic" in v

    @property
    def unit_cell(self):

        return uctbx.unit_cell(tuple(self.grid["crystal_avg_ref"]["unit_cell"]))

    def reciprocal(self):
        rp = self.unit_cell.reciprocal_parameters()
        return rp[:3], rp[3:]

    def sections(self, column):
        return sec.central_sections(self.p1_indices, self.p1[column], self.ndiv)


def grid_summary_text(m: MergedMap) -> str:
    g = m.grid
    ref = g.get("crystal_avg_ref", {})
    cell = ref.get("unit_cell", [])
    (ra, rb, rc), angles = m.reciprocal()
    hkl = m.voxels["voxel_indices"] / m.ndiv
    p1_hkl = m.p1_indices / m.ndiv
    lines = [
        "Global voxel grid",
        "=" * 17,
        "Average crystal: cell " + " ".join(f"{x:.4f}" for x in cell) + f", space group {ref.get('space_group')}",
        f"reciprocal cell: a* {ra:.6f} b* {rb:.6f} c* {rc:.6f} 1/A, "
        f"alpha* {angles[0]:.3f} beta* {angles[1]:.3f} gamma* {angles[2]:.3f} deg",
        f"crystal models: {g.get('n_crystals')}",
        f"ndiv (voxels per reciprocal unit): h {g['ndiv_h']}, k {g['ndiv_k']}, l {g['ndiv_l']}",
        f"voxel size: {1 / g['ndiv_h']:.4g} x {1 / g['ndiv_k']:.4g} x {1 / g['ndiv_l']:.4g} r.l.u. = "
        f"{ra / g['ndiv_h']:.5f} x {rb / g['ndiv_k']:.5f} x {rc / g['ndiv_l']:.5f} 1/A",
        f"resolution limits of the grid: d_min {g.get('d_min')}, d_max {g.get('d_max')}",
        f"declared hkl bounds: {g.get('hkl_bounds')}",
        f"declared total voxels: {g.get('total_voxels')}",
        f"symmetry used in merging: {m.symmetry_mode} ({len(m.operators)} operators)",
        f"observed voxels: {len(hkl)} (asymmetric unit), {len(p1_hkl)} after expansion to P1",
        "observed hkl range (ASU): " + ", ".join(
            f"{a} {hkl[:, i].min():.3f}..{hkl[:, i].max():.3f}" for i, a in enumerate("hkl")),
        "observed hkl range (P1): " + ", ".join(
            f"{a} {p1_hkl[:, i].min():.3f}..{p1_hkl[:, i].max():.3f}" for i, a in enumerate("hkl")),
    ]
    q = m.voxels["q_magnitude_center"]
    qpos = q[q > 0]
    if qpos.size:
        lines.append(f"observed |q|: {q.min():.4f}..{q.max():.4f} 1/A (d >= {1 / qpos.max():.3f} A)")
    cs = g.get("cell_spread") or {}
    if cs:
        lines.append("cell spread (std): " + " ".join(f"{x:.4g}" for x in cs.get("std", []))
                     + f", max relative edge deviation {cs.get('max_relative_edge_deviation')}")
    o = g.get("orientation_spread") or {}
    if o:
        lines.append(f"orientation: rms misorientation from the first crystal {o.get('rms_misorientation_deg')} deg "
                     f"(checked as one crystal: {o.get('checked')})")
    return "\n".join(lines)


def scaling_table(scaling):
    """(still ids, b, c) sorted by still id."""
    refined = scaling.get("refined_parameters", {})
    ids = np.array(sorted(int(k) for k in refined))
    b = np.array([refined[str(i)]["multiplicative_scale"] for i in ids], dtype=float)
    c = np.array([refined[str(i)].get("additive_offset", 0.0) for i in ids], dtype=float)
    return ids, b, c


def per_still_context(ids, manifest, experiments):
    """Per still id: image path, kept pixels, voxels (manifest) and cell (experiments)."""
    rows = {int(i): {} for i in ids}
    if manifest is not None:
        for e in manifest.get("images", []):
            if e.get("status") == "extracted" and int(e["still_id"]) in rows:
                rows[int(e["still_id"])].update(
                    image=e.get("image_path"), kept=e.get("pixel_counts", {}).get("kept"),
                    voxels=e.get("n_voxels"), experiment_id=e.get("experiment_id"))
    if experiments is not None:
        for sid, r in rows.items():
            eid = r.get("experiment_id", sid)
            if eid is not None and eid < len(experiments) and experiments[eid].crystal is not None:
                r["cell"] = experiments[eid].crystal.get_unit_cell().parameters()
    return rows


def scaling_summary_text(scaling, ids, b, c, context) -> str:
    st = scaling.get("refinement_statistics", {})
    sm = scaling.get("resolution_smoother", {})
    lines = [
        "Relative scaling parameters",
        "=" * 27,
        f"convention: {scaling.get('convention')}",
        f"stills: {ids.size}",
        "multiplicative scale b_i: " + describe(b, "b"),
        "additive offset c_i: " + (describe(c, "c") if st.get("offsets_refined") else "not refined (0)"),
        f"b_i max/min ratio: {b.max() / b.min() if b.size and b.min() > 0 else float('nan'):.4g}",
        f"converged: {st.get('converged')} after {st.get('n_iterations')} iterations; "
        f"final R {st.get('final_R')}, chi2/dof {st.get('final_chi2_per_dof')}",
        f"observations: {st.get('n_observations')}, rejected as outliers: {st.get('n_rejected')}",
        f"resolution smoother: {'enabled' if sm.get('enabled') else 'not enabled'}",
    ]
    if sm.get("enabled"):
        v = np.array(list(sm.get("values_per_still", {}).values()), dtype=float)
        lines.append(f"  control points |q|: {', '.join(f'{x:.4f}' for x in sm.get('control_points_q', []))}")
        if v.size:
            lines.append("  a_i at the control points: " + describe(v, "a"))
    surfaces = scaling.get("surfaces") or {}
    terms = [k for k in ("absorption", "response", "offset") if surfaces.get(k)]
    lines.append("scaling surfaces: " + (", ".join(
        f"{k}({', '.join(surfaces[k]['coordinates'])}) on "
        f"{' x '.join(map(str, surfaces[k]['shape']))} control values, "
        + describe(np.array(surfaces[k]["control_values"], float).ravel(), k[0])
        for k in terms) if terms else "none"))
    hist = st.get("history") or []
    if hist:
        keys = [k for k in hist[0] if isinstance(hist[0][k], (int, float))]
        lines += ["", "Refinement history", "  ".join(f"{k:>12s}" for k in keys)]
        lines += ["  ".join(f"{h.get(k, float('nan')):12.5g}" for k in keys) for h in hist]
    lines += ["", "Per still", f"{'still':>6} {'b_i':>10} {'c_i':>10} {'kept px':>9} {'voxels':>7}  cell / image"]
    for sid, bi, ci in zip(ids, b, c):
        r = context.get(int(sid), {})
        cell = " ".join(f"{x:.2f}" for x in r["cell"]) if "cell" in r else ""
        lines.append(f"{sid:6d} {bi:10.5f} {ci:10.4g} {str(r.get('kept', '')):>9} "
                     f"{str(r.get('voxels', '')):>7}  {cell} {r.get('image', '')}")
    return "\n".join(lines)


def merged_summary_text(m: MergedMap, found, ids, b, inventory, elapsed, section_peaks) -> str:
    v = m.voxels
    n_obs = v["num_observations"]
    with np.errstate(divide="ignore", invalid="ignore"):
        isigi = np.where(m.sigma > 0, m.intensity / m.sigma, np.nan)
    lines = [
        "dials.diffuse_check: merged-map (phase 3) diagnostics",
        "=" * 53,
        f"merge directory: {m.directory}",
        f"extraction directory: {found.extraction_dir or 'not given'}",
        "",
        "Grid",
        f"  cell {' '.join(f'{x:.3f}' for x in m.grid['crystal_avg_ref']['unit_cell'])}, "
        f"{m.grid['crystal_avg_ref'].get('space_group')}, ndiv {tuple(int(x) for x in m.ndiv)}, "
        f"symmetry {m.symmetry_mode}",
        f"  voxels: {len(m.intensity)} (ASU), {len(m.p1_indices)} (P1)",
        "",
        "Voxel occupancy (observations per ASU voxel)",
        "  " + describe(n_obs, "observations"),
        f"  total observations: {int(n_obs.sum())}; voxels observed once: {int((n_obs == 1).sum())}, "
        f">= 2: {int((n_obs >= 2).sum())}, >= 5: {int((n_obs >= 5).sum())}",
    ]
    if "num_rejected" in v:
        lines.append(f"  rejected observations: {int(v['num_rejected'].sum())}")
    lines += ["", "Scaling"]
    if b is not None and b.size:
        lines.append("  " + describe(b, "b_i"))
        st = m.scaling.get("refinement_statistics", {})
        lines.append(f"  converged {st.get('converged')}, iterations {st.get('n_iterations')}, final R {st.get('final_R')}")
    else:
        lines.append("  no scaling parameters")
    lines += [
        "",
        "Merged intensities",
        "  " + describe(m.intensity, "I"),
        "  " + describe(m.sigma, "sigma"),
        "  " + describe(isigi, "I/sigma"),
        f"  mean I/sigma {np.nanmean(isigi):.4g}, median {np.nanmedian(isigi):.4g}, "
        f"{100 * np.nanmean(isigi > 1):.2f} % of voxels above 1, {100 * np.nanmean(isigi > 3):.2f} % above 3",
        f"  I <= 0: {int((m.intensity <= 0).sum())} voxels",
    ]
    if "on_bragg_position" in v:
        ob = v["on_bragg_position"].astype(bool)
        if ob.any() and (~ob).any():
            lines.append(f"  voxels on Bragg positions: {int(ob.sum())}, mean I {m.intensity[ob].mean():.4g} "
                         f"(others {m.intensity[~ob].mean():.4g})")
    if m.has_anisotropic:
        lines.append("  " + describe(v["I_anisotropic"], "anisotropic I"))
    q = v["q_magnitude_center"]
    lines += ["", "Resolution coverage", "  " + describe(q, "|q| (1/A)")]
    edges = np.linspace(q.min(), q.max(), 11) if q.size else []
    if len(edges):
        counts, _ = np.histogram(q, bins=edges)
        lines.append("  voxels per |q| bin: " + ", ".join(
            f"{lo:.3f}-{hi:.3f}: {n}" for lo, hi, n in zip(edges[:-1], edges[1:], counts)))
    if m.stats and m.stats.get("overall"):
        o = m.stats["overall"]
        lines += ["", "CC1/2 (merging_statistics.json)"] + [f"  {k}: {val:.4f}" for k, val in o.items()
                                                              if isinstance(val, (int, float))]
        lines.append(f"  voxels in both halves: {m.stats.get('n_voxels_in_both_halves')}")
    if section_peaks:
        lines += ["", "Central sections (largest merged intensity, r.l.u.)"]
        lines += [f"  {name}: {peak}" for name, peak in section_peaks.items()]
    lines += ["", "Plot inventory", inventory.inventory_text(extra=[SUMMARY_NAME, "dials.diffuse_check.html"]),
              "", f"time: {elapsed:.1f} s"]
    return "\n".join(lines)


def run_merged_check(found, params, experiments=None) -> Inventory:
    t0 = time.time()
    out = Inventory(params.output.directory)
    m = MergedMap(found.merged_dir)
    logger.info("Merged map %s: %d voxels, %d after expansion to P1 (symmetry %s)",
                found.merged_dir, len(m.intensity), len(m.p1_indices), m.symmetry_mode)
    manifest = None
    if found.extraction_dir:
        manifest = diffuse_files.read_manifest(found.extraction_dir)
    else:
        logger.info("No extraction directory given: no per-still pixel counts in the scaling plots")
    if experiments is None:
        logger.info("No experiments given: no per-still cells in the scaling summary")

    out.save_text(grid_summary_text(m), "grid_summary.txt", "Grid summary")
    n_p1 = len(m.p1_indices)
    pick = subsample(n_p1, params.max_plot_points, params.seed)
    p1_hkl = m.p1_indices / m.ndiv
    out.save_figure(plots.plot_grid_conceptual(p1_hkl[pick], m.p1["I"][pick], p1_hkl.min(axis=0),
                                               p1_hkl.max(axis=0), m.ndiv, n_p1),
                    "grid_visualization_conceptual.png", "Grid coverage (conceptual)")
    lengths, angles = m.reciprocal()
    section_peaks = {}
    for prefix, column, title, label, scale, cmap in SLICES:
        if column == "aniso" and not m.has_anisotropic:
            for name in sec.SECTIONS:
                out.skip(f"{prefix}_slice_{name}.png", "no I_anisotropic in the voxel data")
            continue
        for name, section in m.sections(column).items():
            fname = f"{prefix}_slice_{name}.png"
            if section is None or not np.isfinite(section.values).any():
                out.skip(fname, f"no voxel on the central section {name}")
                continue
            if column == "I":
                u, v = section.argmax()
                section_peaks[name] = f"{section.u_label}={u:.3f}, {section.v_label}={v:.3f}"
            out.save_figure(plots.plot_section(section, title, label, scale, cmap, lengths, angles),
                            fname, f"{title}, central section {name}")
        if column == "n_obs":
            out.save_figure(plots.plot_occupancy_histogram(m.voxels["num_observations"]),
                            "voxel_occupancy_histogram.png", "Voxel occupancy histogram")

    ids = b = None
    if m.scaling is None:
        for name in ("scaling_params_b_i.png", "scaling_resolution_smoother.png",
                     "scaling_surfaces.png", "scaling_parameters_summary.txt"):
            out.skip(name, f"no {merged_files.SCALING_NAME} in {found.merged_dir}")
    else:
        ids, b, c = scaling_table(m.scaling)
        context = per_still_context(ids, manifest, experiments)
        kept = None
        if manifest is not None and all(context[int(i)].get("kept") is not None for i in ids):
            kept = np.array([context[int(i)]["kept"] for i in ids], dtype=float)
        offsets = c if m.scaling.get("refinement_statistics", {}).get("offsets_refined") else None
        out.save_figure(plots.plot_scales(ids, b, offsets, kept), "scaling_params_b_i.png",
                        "Per-still scale factors")
        sm = m.scaling.get("resolution_smoother", {})
        if sm.get("enabled") and sm.get("values_per_still"):
            values = [sm["values_per_still"][str(i)] for i in ids if str(i) in sm["values_per_still"]]
            out.save_figure(plots.plot_smoother(np.array(sm["control_points_q"]), values),
                            "scaling_resolution_smoother.png", "Resolution smoother")
        else:
            out.skip("scaling_resolution_smoother.png", "the resolution smoother was not enabled")
        if m.scaling.get("surfaces"):
            out.save_figure(plot_scaling_surfaces(m.scaling["surfaces"]), "scaling_surfaces.png",
                            "Scaling surfaces a(x, y, phi), d(x, y), c(|s|, phi)")
        else:
            out.skip("scaling_surfaces.png", "no scaling.surfaces term was enabled")
        out.save_text(scaling_summary_text(m.scaling, ids, b, c, context),
                      "scaling_parameters_summary.txt", "Scaling parameters summary")

    qmag = m.voxels["q_magnitude_center"].astype(np.float64)
    profile = (m.stats or {}).get("radial_profile")
    if profile:
        centres = np.array(profile["q_center"], dtype=float)
        means = np.array([np.nan if x is None else x for x in profile["mean_intensity"]], dtype=float)
    else:
        centres, means, _ = radial_profile(qmag, m.intensity, params.merged.radial_bins)
    vpick = subsample(qmag.size, params.max_plot_points, params.seed)
    out.save_figure(plots.plot_radial_average(centres, means, qmag[vpick], m.intensity[vpick], qmag.size),
                    "merged_radial_average.png", "Merged radial average")
    out.save_figure(plot_intensity_histogram(m.intensity, "merged intensity", "voxels"),
                    "merged_intensity_histogram.png", "Merged intensity histogram")
    if m.stats and m.stats.get("shells"):
        out.save_figure(plots.plot_cc_half(m.stats["shells"], m.stats.get("overall", {})),
                        "merged_cc_half.png", "CC1/2 per resolution shell")
    else:
        out.skip("merged_cc_half.png", f"no CC1/2 shells in {merged_files.STATS_NAME}")
    absolute_path = os.path.join(m.directory, merged_files.ABSOLUTE_NAME)
    if os.path.exists(absolute_path):
        with open(absolute_path) as fh:
            out.save_figure(plots.plot_absolute_scale(json.load(fh)), "absolute_scale.png",
                            "Absolute scale: data, coherent, incoherent vs |s|")
    else:
        out.skip("absolute_scale.png", "the merge ran without absolute_scale.composition")
    out.save_text(merged_summary_text(m, found, ids, b, out, time.time() - t0, section_peaks),
                  SUMMARY_NAME, "Merged-map diagnostics summary")
    return out
