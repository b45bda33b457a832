"""Files written by dials.diffuse_merge (and read back by dials.diffuse_check).

* ``global_voxel_grid_definition.json``: average crystal, hkl bounds, ndiv.
* ``refined_scaling_model_params.json``: per still id (0-based experiment
  index for stills, image number for sequences, as a string) the
  ``multiplicative_scale`` b_i and ``additive_offset`` c_i, with the convention
  I_obs ~ b_i * a_i(|q|) * I_merged + c_i; refinement statistics; smoother.
* ``voxel_data_relative.npz`` (optionally ``.h5``): the merged ASU voxels,
  keys of the DiffusePipe guide plus isotropic/anisotropic parts.
* ``merging_statistics.json``: CC1/2 tables and the radial profile.
* ``absolute_scale.json`` (with ``absolute_scale.composition``): the fitted
  scale K and the shell means of data, coherent and incoherent scattering;
  the voxel file then also holds ``I_absolute`` = K I - incoherent,
  ``Sigma_absolute`` and ``I_incoherent`` (electron units per unit cell), and
  ``diffuse_absolute.ccp4`` is written with the other maps.
* ``ambiguity.json``: the report of the indexing-ambiguity step
  (:mod:`dials_diffuse.merge_ambiguity`), written with the other outputs so
  that a merge that fails leaves none of them.
* ``diffuse_total.ccp4`` / ``diffuse_anisotropic.ccp4``: the map expanded by
  symmetry to an hkl box. Axes X, Y, Z = h, k, l; the map's cell is one
  reciprocal cell (a*, b*, c*, alpha*, beta*, gamma*) times
  ``output.ccp4_cell_scale`` with ndiv grid points per cell, so grid point
  (i, j, k) is hkl = (i / ndiv_h, j / ndiv_k, k / ndiv_l).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dials.util import Sorry

from dials_diffuse.command_util import ensure_output_directory
from dials_diffuse.compiled import lazy_jit
from dials_diffuse import io, symmetry
from dials_diffuse.statistics import isotropic_profile
import mrcfile

logger = logging.getLogger("dials.diffuse_merge")

GRID_NAME = "global_voxel_grid_definition.json"
SCALING_NAME = "refined_scaling_model_params.json"
AMBIGUITY_NAME = "ambiguity.json"  # the report of dials_diffuse.merge_ambiguity
VOXEL_NAME = "voxel_data_relative.npz"
VOXEL_H5_NAME = "voxel_data_relative.h5"
STATS_NAME = "merging_statistics.json"
ABSOLUTE_NAME = "absolute_scale.json"
ABSOLUTE_MAP_NAME = "diffuse_absolute.ccp4"
MAP_NAMES = {"total": "diffuse_total.ccp4", "anisotropic": "diffuse_anisotropic.ccp4"}

VOXEL_KEYS = (
    "voxel_indices", "H_center", "K_center", "L_center", "q_center_x", "q_center_y",
    "q_center_z", "q_magnitude_center", "I_merged_relative", "Sigma_merged_relative",
    "num_observations",
)


def voxel_arrays(merged):
    return {
        "voxel_indices": merged.voxel_grid.astype(np.int32),
        "H_center": merged.hkl[:, 0],
        "K_center": merged.hkl[:, 1],
        "L_center": merged.hkl[:, 2],
        "q_center_x": merged.q[:, 0],
        "q_center_y": merged.q[:, 1],
        "q_center_z": merged.q[:, 2],
        "q_magnitude_center": merged.qmag,
        "I_merged_relative": merged.intensity,
        "Sigma_merged_relative": merged.sigma,
        "num_observations": merged.n_observations,
        "num_rejected": merged.n_rejected,
        "I_isotropic": merged.isotropic,
        "I_anisotropic": merged.intensity - merged.isotropic,
        "on_bragg_position": merged.on_bragg,
    }


def scaling_dict(obs, result, params):
    model = result.model
    refined = {
        str(int(sid)): {
            "multiplicative_scale": float(model.scale[i]),
            "additive_offset": float(model.offset[i]),
        }
        for i, sid in enumerate(obs.image_ids)
    }
    last = result.history[-1] if result.history else {}
    smoother = {"enabled": model.smoother_q is not None}
    if model.smoother_q is not None:
        smoother["control_points_q"] = model.smoother_q.tolist()
        smoother["values_per_still"] = {
            str(int(sid)): model.smoother_values[i].tolist() for i, sid in enumerate(obs.image_ids)
        }
    return {
        "convention": "I_obs ~ multiplicative_scale * a_i(|q|) * I_merged + additive_offset; "
        "still ids are 0-based experiment indices (stills) or image numbers (sequences)",
        "refined_parameters": refined,
        "refinement_statistics": {
            "converged": result.converged,
            "n_iterations": len(result.history),
            "final_R": last.get("R"),
            "final_chi2_per_dof": last.get("chi2_per_dof"),
            "n_observations": int(obs.n_obs),
            "n_rejected": int(result.rejected.sum()),
            "history": result.history,
            "offsets_refined": bool(params.scaling.offsets),
        },
        "error_model": _error_model_document(model),
        "resolution_smoother": smoother,
        "scale_model": _scale_model_document(model),
        "surfaces": None if result.surfaces is None else result.surfaces.as_dict(),
    }


def _scale_model_document(model):
    basis = model.scale_basis
    if basis is None:
        return {"type": "per_image"}
    return {
        "type": "smooth",
        "description": "per sweep, b(phi) piecewise linear through the control points; "
        "multiplicative_scale above is b at each image's centre angle",
        "interval_deg": basis.interval,
        "control_phi_deg": basis.control_phi.tolist(),
        "control_sweep_experiment_id": basis.control_sweep.astype(int).tolist(),
        "control_values": model.scale_controls.tolist(),
    }


def _error_model_document(model):
    return {
        "k": float(model.error_k),
        "k_merged": float(model.merged_error_k),
        "variance": "per observation var(S) = max(photons, gain) + (k E[S])^2 (outlier "
                    "test); sigma_merged^2 = (sum max(photons, gain) + k_merged^2 sum E[S]^2) "
                    "/ (sum b W)^2, k_merged calibrated so that the half-map differences "
                    "have unit width",
    }


def write_all(out_dir, grid, obs, result, merged, stats, params, operators, absolute=None,
              ambiguity=None, nthreads=1):
    """Every merge output in ``out_dir``; ``nthreads`` > 1 writes the CCP4
    maps in that many threads beside the other files."""
    ensure_output_directory(out_dir)
    centres, means, counts = isotropic_profile(merged.qmag, merged.intensity,
                                               merged.multiplicity, merged.on_bragg)
    stats = dict(stats)
    stats["radial_profile"] = {
        "weighting": "symmetry multiplicity; voxels on Bragg positions left out",
        "q_center": centres.tolist(),
        "mean_intensity": [None if not np.isfinite(m) else float(m) for m in means],
        "n_voxels": counts.astype(int).tolist(),  # weighted: voxels of the full sphere
    }
    stats["error_model"] = _error_model_document(result.model)
    stats["symmetry_merge"] = params.symmetry.merge
    stats["n_voxels"] = int(len(merged.intensity))
    stats["n_images"] = int(obs.n_images)
    arrays = voxel_arrays(merged)
    if absolute is not None:
        arrays.update(I_absolute=absolute.intensity, Sigma_absolute=absolute.sigma,
                      I_incoherent=absolute.incoherent)
    # maps first, metadata-style JSON last: a directory whose grid file exists
    # is complete. An old grid file goes first, and a failed write removes
    # what this run wrote: never a mix of old and new, or a half set.
    grid_path = os.path.join(out_dir, GRID_NAME)
    io.remove_completion_marker(grid_path)
    written = []
    maps_written = _MapWrites()

    def path_of(name):
        written.append(os.path.join(out_dir, name))
        return written[-1]

    try:
        if params.output.ccp4_maps:
            maps = [(path_of(name), arrays["I_merged_relative"] if kind == "total"
                     else arrays["I_anisotropic"], f"dials.diffuse_merge {kind} map")
                    for kind, name in MAP_NAMES.items()]
            if absolute is not None:
                maps.append((path_of(ABSOLUTE_MAP_NAME), absolute.intensity,
                             "dials.diffuse_merge electron units per cell"))
            # with two or more cores each map is filled and written in its own
            # thread (both release the GIL) while this one writes the rest
            maps_written = write_ccp4_maps(maps, grid, merged.voxel_grid, operators,
                                           params.output, threads=nthreads)
        io.write_npz(path_of(VOXEL_NAME), compress_level=1, deflate_floats=False, **arrays)
        if params.output.hdf5:
            write_hdf5(path_of(VOXEL_H5_NAME), arrays)
        io.write_json(path_of(STATS_NAME), stats)
        if absolute is not None:
            io.write_json(path_of(ABSOLUTE_NAME), absolute.as_dict())
        io.write_json(path_of(SCALING_NAME), scaling_dict(obs, result, params))
        if ambiguity is not None:
            io.write_json(path_of(AMBIGUITY_NAME), ambiguity)
        maps_written.result()  # the maps' errors are raised here
        io.write_json(path_of(GRID_NAME), grid.as_dict())
    except BaseException as e:
        maps_written.wait()  # no thread still writing a file about to be removed
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        # the error of the first file in the writing order (the maps, then
        # the rest), whichever thread met its error first
        first = maps_written.first_error()
        if first is not None and first is not e:
            raise first from e
        raise
    logger.info("Wrote merged map of %d voxels to %s", len(merged.intensity), out_dir)


def write_hdf5(path, arrays):
    # local: h5py is optional, needed only with output.hdf5=True
    import h5py

    with io.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            for k, v in arrays.items():
                fh.create_dataset(k, data=v, compression="gzip", track_times=False)


MAP_THREADS_BYTES = 1 << 30  # what the map threads' buffers may take together


class _MapWrites:
    """The maps written in threads (none pending when written in this one):
    result() waits for all and raises the first error in the maps' order;
    first_error() waits and returns it; wait() waits."""

    def __init__(self, executor=None, futures=()):
        self._executor, self._futures = executor, list(futures)

    def wait(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def first_error(self):
        self.wait()
        return next((f.exception() for f in self._futures if f.exception() is not None), None)

    def result(self):
        error = self.first_error()
        if error is not None:
            raise error


def write_ccp4_maps(maps, grid, voxel_grid, operators, output, threads=1):
    """Expand ASU maps by symmetry into an hkl box and write each as CCP4/MRC;
    ``maps``: (path, values per voxel, label). Compiled, each map's box is
    filled by one pass over voxels and operators (no expanded copy); else
    the symmetry expansion is made once for all of them.

    threads=1 writes every map before returning (one buffer for all); with
    more, and compiled, the maps are filled and written in that many threads
    (a buffer each: the fill and the file write release the GIL) and the
    return value's result() waits for them and raises their errors. The
    files are the same either way."""
    ndiv = np.array(grid.ndiv)
    fill = lazy_jit("merged_files.fill_box", _define_fill_box)
    if fill is not None:
        # mates computed in the fill itself: no expanded copy of the map
        g = np.ascontiguousarray(voxel_grid, np.int64)
        ops = np.ascontiguousarray(np.asarray(operators, np.int64).reshape(-1, 3, 3))
        symmetry.check_ndiv(ndiv, ops)
        lo, hi = _map_box(output, ndiv, lambda: _mate_range(g, ops))
    else:
        columns = np.stack([np.asarray(v, dtype=np.float64) for _, v, _ in maps], axis=1)
        full, vals = symmetry.expand_to_p1(voxel_grid, columns, operators, ndiv)
        lo, hi = _map_box(output, ndiv, lambda: (full.min(axis=0), full.max(axis=0)))
        inside = np.all((full >= lo) & (full <= hi), axis=1)
        # C-order positions in the box, computed once for every map
        flat_index = np.ravel_multi_index(tuple((full[inside] - lo).T), tuple(hi - lo + 1))
    shape = tuple(hi - lo + 1)

    def fill_and_write(dense, path, values, label):
        dense.view(np.uint32).fill(_UNSET)
        fill(g, ops, np.asarray(lo, np.int64), np.asarray(dense.shape, np.int64),
             np.ascontiguousarray(values, np.float64), dense.reshape(-1),
             dense.reshape(-1).view(np.uint32), np.float32(output.map_fill_value))
        _write_ccp4_file(path, grid, dense, lo, hi, output, label)

    # a buffer per thread, within MAP_THREADS_BYTES (a box can reach 0.8 GB)
    n_threads = min(threads, len(maps), max(1, MAP_THREADS_BYTES // (4 * int(np.prod(shape)))))
    if fill is not None and n_threads > 1:
        lazy_jit("merged_files.map_statistics", _define_map_statistics)  # once, not per thread
        executor = ThreadPoolExecutor(n_threads, "ccp4-map")
        futures = [executor.submit(lambda m: fill_and_write(np.empty(shape, np.float32), *m), m)
                   for m in maps]
        return _MapWrites(executor, futures)
    dense = np.empty(shape, dtype=np.float32)  # one buffer for every map
    for k, (path, values, label) in enumerate(maps):
        if fill is not None:
            fill_and_write(dense, path, values, label)
            continue
        dense.fill(output.map_fill_value)
        v = vals[inside, k]
        ok = np.isfinite(v)
        dense.reshape(-1)[flat_index[ok]] = v[ok]
        _write_ccp4_file(path, grid, dense, lo, hi, output, label)
    return _MapWrites()


def _map_box(output, ndiv, mate_range):
    """(lo, hi) grid corners of the CCP4 box: output.map_hkl_box, else the
    range of every mate (``mate_range()``); a Sorry beyond map_max_points."""
    if output.map_hkl_box is not None:
        box = np.array(output.map_hkl_box, dtype=float).reshape(3, 2)
        lo = np.ceil(box[:, 0] * ndiv).astype(int)
        hi = np.floor(box[:, 1] * ndiv).astype(int)
    else:
        lo, hi = mate_range()
    n_points = int(np.prod(hi - lo + 1))
    if n_points > output.map_max_points:
        raise Sorry(
            f"the CCP4 map box has {n_points} points (more than output.map_max_points="
            f"{output.map_max_points}); set output.map_hkl_box or output.ccp4_maps=False"
        )
    return lo, hi


def _mate_range(g, ops):
    """Componentwise min and max of g @ op over every voxel and operator."""
    if len(g) == 0:
        zero = np.zeros(3, np.int64)
        return zero, zero - 1
    mate_range = lazy_jit("merged_files.mate_range", _define_mate_range)
    if mate_range is not None:
        # no (voxels, operators, 3) temporary: 70 MB of fresh memory for
        # 3.6e5 voxels and 8 operators cost 0.2 s here
        lo, hi = np.empty(3, np.int64), np.empty(3, np.int64)
        mate_range(g, ops, lo, hi)
        return lo, hi
    # every operator in one float64 product (exact for grid indices): 16
    # integer products were 0.15-0.5 s for 8 operators and 3.6e5 voxels
    mates = g.astype(np.float64) @ ops.transpose(1, 0, 2).reshape(3, -1).astype(np.float64)
    lo = mates.min(axis=0).reshape(-1, 3).min(axis=0)
    hi = mates.max(axis=0).reshape(-1, 3).max(axis=0)
    return lo.astype(np.int64), hi.astype(np.int64)


def _define_mate_range(jit):
    @jit
    def mate_range(g, ops, lo, hi):
        """lo, hi = componentwise min and max of g[v] @ ops[o] (int64)."""
        for c in range(3):
            lo[c] = np.iinfo(np.int64).max
            hi[c] = np.iinfo(np.int64).min
        for v in range(g.shape[0]):
            for o in range(ops.shape[0]):
                for c in range(3):
                    m = g[v, 0] * ops[o, 0, c] + g[v, 1] * ops[o, 1, c] + g[v, 2] * ops[o, 2, c]
                    if m < lo[c]:
                        lo[c] = m
                    if m > hi[c]:
                        hi[c] = m

    return mate_range


# bits of a float32 NaN that no value or fill can have: "no voxel wrote this
# point yet" while the box is filled
_UNSET = np.uint32(0x7FA00001)


def _define_fill_box(jit):
    @jit
    def fill_box(g, ops, lo, shape, values, dense, dense_bits, fill):
        """Every mate g @ op of each voxel inside the box gets the voxel's
        value (float32; non-finite -> fill); where mates of two voxels meet,
        the first voxel wins (symmetry.expand_to_p1's rule); points no mate
        reaches get fill."""
        unset = _UNSET  # a compile-time constant
        for v in range(g.shape[0]):
            value = np.float32(values[v]) if np.isfinite(values[v]) else fill
            for o in range(ops.shape[0]):
                i = g[v, 0] * ops[o, 0, 0] + g[v, 1] * ops[o, 1, 0] + g[v, 2] * ops[o, 2, 0] - lo[0]
                j = g[v, 0] * ops[o, 0, 1] + g[v, 1] * ops[o, 1, 1] + g[v, 2] * ops[o, 2, 1] - lo[1]
                k = g[v, 0] * ops[o, 0, 2] + g[v, 1] * ops[o, 1, 2] + g[v, 2] * ops[o, 2, 2] - lo[2]
                if 0 <= i < shape[0] and 0 <= j < shape[1] and 0 <= k < shape[2]:
                    flat = (i * shape[1] + j) * shape[2] + k
                    if dense_bits[flat] == unset:
                        dense[flat] = value
        for p in range(dense.size):
            if dense_bits[p] == unset:
                dense[p] = fill

    return fill_box


def map_statistics(dense):
    """(min, max, mean, rms deviation from the mean) of a float32 map as
    float32, summed in float64; all NaN when any value is NaN (numpy's
    rule, which mrcfile's header statistics follow)."""
    values = np.ascontiguousarray(dense, np.float32).reshape(-1)
    if values.size == 0:
        return (np.float32(0), np.float32(-1), np.float32(-2), np.float32(-1))  # mrcfile's "unset"
    stats = lazy_jit("merged_files.map_statistics", _define_map_statistics)
    if stats is not None:
        result = stats(values)
    else:
        mean = values.mean(dtype=np.float64)
        result = (values.min(), values.max(), mean,
                  np.sqrt(np.mean(np.square(values - mean, dtype=np.float64))))
    return tuple(np.float32(x) for x in result)


def _define_map_statistics(jit):
    @jit
    def map_statistics(values):
        """Two passes: min, max and sum; then the squared deviations."""
        lo = hi = values[0]
        total = 0.0
        for x in values:
            if x != x:  # NaN
                nan = np.float64(np.nan)
                return nan, nan, nan, nan
            lo = min(lo, x)
            hi = max(hi, x)
            total += x
        mean = total / values.size
        squares = 0.0
        for x in values:
            squares += (x - mean) ** 2
        return np.float64(lo), np.float64(hi), mean, np.sqrt(squares / values.size)

    return map_statistics


def _write_ccp4_file(path, grid, dense, lo, hi, output, label):
    """One CCP4/MRC map through the mrcfile package, with the header iotbx's
    writer (which calls mrcfile the same way) gives a P 1 map of this box:
    axes (mapc, mapr, maps) = (3, 2, 1), so the array's C order is the file's;
    the reciprocal cell scaled by output.ccp4_cell_scale; the grid ndiv per
    reciprocal unit. Numpy straight to the file: iotbx's flex copies took
    0.6 s per 65 MB map."""
    ndiv = np.array(grid.ndiv)
    rec = grid.unit_cell.reciprocal_parameters()
    s = output.ccp4_cell_scale
    labels = [
        label[:80],
        f"axes X,Y,Z = h,k,l; {int(ndiv[0])},{int(ndiv[1])},{int(ndiv[2])} points per reciprocal unit"[:80],
        f"cell = reciprocal cell (1/A) x {s:g}"[:80],
    ]
    with io.atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 2, 1
            # no copy of a C-ordered float32 array. The header's statistics
            # (dmin, dmax, dmean, rms) come from map_statistics: mrcfile's
            # own take five passes and a temporary the size of the map
            # (0.3 s for a 65 MB map), in float32 sums
            mrc.update_header_stats = lambda: None  # this instance only
            mrc.set_data(np.asarray(dense, dtype=np.float32))
            del mrc.update_header_stats
            header = mrc.header
            header.dmin, header.dmax, header.dmean, header.rms = map_statistics(dense)
            mrc.header.nlabl = len(labels)
            for k, text in enumerate(labels):
                mrc.header.label[k] = text
            mrc.update_header_from_data()
            mrc.header.cella = (rec[0] * s, rec[1] * s, rec[2] * s)
            mrc.header.cellb = tuple(rec[3:])
            mrc.header.ispg = 1
            # the box's first grid point along columns, rows, sections (l, k, h)
            mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = (
                int(lo[2]), int(lo[1]), int(lo[0]))
            mrc.header.mx, mrc.header.my, mrc.header.mz = (int(n) for n in ndiv)
            mrc.header.origin.x = mrc.header.origin.y = mrc.header.origin.z = 0.0


def read_merged(directory):
    """(grid dict, scaling dict, voxel arrays, statistics dict or None) of a merge directory."""
    paths = {n: os.path.join(directory, n) for n in (GRID_NAME, SCALING_NAME, VOXEL_NAME, STATS_NAME)}
    for name in (GRID_NAME, VOXEL_NAME):
        if not os.path.isfile(paths[name]):
            raise Sorry(f"{directory} has no {name}: not a dials.diffuse_merge output directory")
    try:
        with open(paths[GRID_NAME]) as fh:
            grid = json.load(fh)
        scaling = None
        if os.path.isfile(paths[SCALING_NAME]):
            with open(paths[SCALING_NAME]) as fh:
                scaling = json.load(fh)
        stats = None
        if os.path.isfile(paths[STATS_NAME]):
            with open(paths[STATS_NAME]) as fh:
                stats = json.load(fh)
        with np.load(paths[VOXEL_NAME], allow_pickle=False) as npz:
            voxels = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise Sorry(f"cannot read the merged outputs in {directory}: {e}")
    missing = [k for k in VOXEL_KEYS if k not in voxels]
    if missing:
        raise Sorry(f"{paths[VOXEL_NAME]} is missing {', '.join(missing)}")
    return grid, scaling, voxels, stats
