"""Compiled and numpy paths of the components changed in issue 16 (session 7),
timed side by side on the side-by-side benchmark's 100-image 6M sweep.

Needs the data of ``bash bench/run_comparison.sh`` (``bench/data/p6m_rot_100``
and our one-process extraction in ``bench/data/cmp_100/ours_np1/extracted``).
Each component runs both paths in this process, best of ``--repeats``:

* the merge's scaling passes (``kernel=numba`` against ``kernel=numpy``);
* the Gauss-Newton matrix from the real couplings (compiled sparse product
  against the dense BLAS blocks);
* orbit sizes (one BLAS product against sorting the packed mates);
* the two CCP4 maps (compiled box fill against ``expand_to_p1``);
* pixel lab coordinates of the whole 6M detector (compiled against numpy);
* one image's extraction (``kernel=numba`` against ``kernel=numpy``);
* with ``--commands``: the one-process extraction command run with the
  default environment and with ``OPENBLAS_NUM_THREADS=1`` (system time and
  page faults of the child, from getrusage).

``--session8`` adds the components changed in session 8 (``session8``):

* the CCP4 header statistics (``merged_files.map_statistics`` against
  mrcfile's own, on a 6M sweep's map);
* the 6M context with the separate correction factors on the 8-pixel grid
  against every pixel's (``parts_step=1``);
* the Gauss-Newton matrix's voxel ranges in one thread and in two;
* one 6M image's file written with the per-voxel arrays stored and deflated;
* 400 MB of fresh memory touched, and again at once (this VM's first-touch
  cost);
* the exit of a Python that imported DIALS' option parser, with and without
  the interpreter's teardown (``startup.run_and_exit``).

``--session9`` adds those of session 9 (``session9``): the scaling
refinement with its compiled passes over voxel ranges in one thread and in
two; three error-model fits with the sample gathered once or for each; a 6M
mask pickled through flex.bool and written from numpy; the CCP4 box range
compiled and in numpy; each command's start-up (``-c``).

``--session10`` adds those of session 10 (``session10``): a 6M detector
context, its first and a next beam's reusing the kept geometry, with the
beam pass compiled and in numpy; the dynamic mask's decision on a 6M panel
compiled and in numpy; the merge's two CCP4 maps in one thread and two;
DIALS' diff_phil against the log's modified_parameters.

    .venv/bin/python bench/components.py [--repeats 3] [--commands] [--session8] [--session9] [--session10]
        [--output components_session7.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

os.environ.setdefault("LIBTBX_BUILD", common.LIBTBX_BUILD)

import numpy as np  # noqa: E402
from dxtbx.model.experiment_list import ExperimentListFactory  # noqa: E402

from dials_diffuse import api, compiled, geometry, merged_files, merging, symmetry  # noqa: E402
from dials_diffuse.extraction import context as extraction_context  # noqa: E402
from dials_diffuse.extraction import image as extraction_image  # noqa: E402
from dials_diffuse.extraction.tasks import plan_tasks  # noqa: E402
from dials_diffuse.merging import image_halves  # noqa: E402
from dials_diffuse.observations import find_extraction_files, keep_freed_memory  # noqa: E402
from dials_diffuse.observations import load_observations  # noqa: E402
from dials_diffuse import scaling  # noqa: E402
from dials_diffuse.scaling import gauss_newton  # noqa: E402

EXPT = common.DATA / "p6m_rot_100" / "truth.expt"
EXTRACTED = common.DATA / "cmp_100" / "ours_np1" / "extracted"


def best(func, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return round(min(times), 4)


class NumpyPath:
    """A compiled loop of dials_diffuse.compiled disabled while inside."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.saved = compiled._FUNCTIONS.pop(self.name, "absent")
        compiled._FUNCTIONS[self.name] = None

    def __exit__(self, *exc):
        compiled._FUNCTIONS.pop(self.name)
        if self.saved != "absent":
            compiled._FUNCTIONS[self.name] = self.saved


def sorted_mates_orbit_sizes(g, ops):
    """The orbit sizes by sorting every voxel's packed mates (the method
    before session 7)."""
    mates = symmetry.symmetry_mates(g, ops)
    offset = np.abs(mates).max() + 1
    span = 2 * offset + 1
    keys = ((mates[..., 0] + offset) * span + (mates[..., 1] + offset)) * span + (mates[..., 2] + offset)
    keys.sort(axis=0)
    return 1 + np.count_nonzero(np.diff(keys, axis=0), axis=0)


def sweep_observations(experiments):
    """The merge's default parameters, the grid, the Laue operators and the
    observations of the side-by-side run's extraction (one process)."""
    params = api.merge_params()
    files = find_extraction_files([str(EXTRACTED)])
    grid, _ = merging.build_grid(experiments, params, merging.extracted_ndiv(files[0]))
    ops = symmetry.laue_operators(grid.space_group, params.symmetry.merge)
    obs = load_observations(files, grid, ops, nproc=1)
    return params, grid, ops, obs


def merge_components(experiments, repeats):
    params, grid, ops, obs = sweep_observations(experiments)
    out = {"n_observations": int(obs.n_obs), "n_voxels": int(obs.n_voxels)}
    halves = image_halves(obs.n_images, 0)
    for kernel in ("numba", "numpy"):
        refine_s, passes_s = [], []
        for _ in range(repeats):
            with scaling.ObservationPasses(obs, 1, kernel) as passes:
                t0 = time.perf_counter()
                result = scaling.refine_scales(obs, params.scaling, passes, halves=halves)
                refine_s.append(time.perf_counter() - t0)
                passes_s.append(sum(t for _, t in passes.timings.values()))
        out[f"refine_{kernel}_s"] = round(min(refine_s), 3)
        out[f"passes_{kernel}_s"] = round(min(passes_s), 3)
    # the Gauss-Newton matrix from the couplings of the last compiled pass
    with scaling.ObservationPasses(obs, 1, "numba") as passes:
        model = result.model
        intensity = np.nan_to_num(result.intensity)
        gn = passes.reduce(gauss_newton.gauss_newton_partition, model, intensity, 1,
                           concat=gauss_newton.sample_columns(0))
        d_b, d_i = gn[0], gn[1]
        inv_d = np.where(d_i > 0, 1.0 / np.where(d_i > 0, d_i, 1.0), 0.0)
        passes.voxel_rows(1)
        out["schur_compiled_sparse_s"] = best(
            lambda: gauss_newton._compiled_schur_matrix(passes, d_b, inv_d, 1), repeats)
        order, start = passes.voxel_rows(1)
        couplings = passes.rows.coupling[order].astype(np.float64)
        used = couplings != 0
        sampled = np.repeat(np.arange(obs.n_voxels, dtype=np.int32), np.diff(start))[used]
        images = obs.image[order][used]
        gauss_newton_dense = gauss_newton._sparse_is_cheaper
        gauss_newton._sparse_is_cheaper = lambda *a: False
        try:
            out["schur_dense_blas_s"] = best(
                lambda: gauss_newton._schur_matrix(d_b, images, sampled, couplings[used], inv_d, 1),
                repeats)
        finally:
            gauss_newton._sparse_is_cheaper = gauss_newton_dense
    out["orbit_sizes_blas_s"] = best(lambda: symmetry.orbit_sizes(obs.voxel_grid, ops), repeats)
    out["orbit_sizes_sorted_mates_s"] = best(
        lambda: sorted_mates_orbit_sizes(obs.voxel_grid, ops), repeats)
    values = np.nan_to_num(result.intensity)
    with tempfile.TemporaryDirectory() as tmp:
        maps = [(os.path.join(tmp, f"m{k}.ccp4"), values, "map") for k in range(2)]
        write = lambda: merged_files.write_ccp4_maps(maps, grid, obs.voxel_grid, ops, params.output)  # noqa: E731
        write()
        out["ccp4_two_maps_compiled_s"] = best(write, repeats)
        with NumpyPath("merged_files.fill_box"):
            out["ccp4_two_maps_numpy_s"] = best(write, repeats)
    return out


def extraction_components(experiments, repeats):
    params = api.extraction_params(**{"grid.ndiv_h": 4, "grid.ndiv_k": 4, "grid.ndiv_l": 4,
                                      "masking.bragg.mosaicity_deg": 0.1,
                                      "masking.bragg.beam_divergence_deg": 0.03154,
                                      "output.save_pixels": "off"})
    tasks, _ = plan_tasks(experiments, None)
    detector = experiments[0].detector
    out = {}
    pixels = [(panel, *np.meshgrid(np.arange(panel.get_image_size()[0]) + 0.5,
                                   np.arange(panel.get_image_size()[1]) + 0.5))
              for panel in detector]
    lab = lambda: [geometry.pixel_lab_coordinates(p, x.ravel(), y.ravel()) for p, x, y in pixels]  # noqa: E731
    lab()
    out["lab_coordinates_6m_compiled_s"] = best(lab, repeats)
    with NumpyPath("geometry.lab_coordinates"):
        out["lab_coordinates_6m_numpy_s"] = best(lab, repeats)
    extraction_context.clear_caches()
    out["context_6m_s"] = best(lambda: (extraction_context.clear_caches(),
                                        extraction_context.context_for(tasks[0], params)), 1)
    context = extraction_context.context_for(tasks[0], params)
    from dials_diffuse import bragg

    widths = bragg.profile_widths(experiments, None, params.masking.bragg)
    for task in tasks:
        task.bragg_widths = widths.get(task.experiment_id)
    ndiv = (params.grid.ndiv_h, params.grid.ndiv_k, params.grid.ndiv_l)
    for kernel in ("numba", "numpy"):
        params.kernel = kernel
        extraction_image.extract_image(tasks[0], context, params, ndiv)
        out[f"extract_image_{kernel}_s"] = best(
            lambda: extraction_image.extract_image(tasks[5], context, params, ndiv), repeats)
    return out


def first_call(func):
    """Seconds of one call after 3 s of rest: the pages an earlier call freed
    are handed back to the host by then, so what the call allocates is fresh
    memory, as in a command's single call (best() reuses it)."""
    time.sleep(3)
    t0 = time.perf_counter()
    func()
    return round(time.perf_counter() - t0, 4)


def session8_components(experiments, repeats):
    out = {}
    params, grid, ops, obs = sweep_observations(experiments)
    # a map of the sweep's size: the two CCP4 maps' header statistics
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.ccp4")
        merged_files.write_ccp4_maps([(path, np.nan_to_num(obs.voxel_qmag), "m")], grid,
                                     obs.voxel_grid, ops, params.output)
        import mrcfile

        with mrcfile.open(path) as mrc:
            dense = np.array(mrc.data)
        out["map_points"] = int(dense.size)
        with mrcfile.new(os.path.join(tmp, "n.ccp4")) as mrc:
            mrc.set_data(dense)
            out["map_statistics_mrcfile_first_s"] = first_call(mrc.update_header_stats)
            out["map_statistics_mrcfile_s"] = best(mrc.update_header_stats, repeats)
        out["map_statistics_ours_first_s"] = first_call(lambda: merged_files.map_statistics(dense))
        out["map_statistics_ours_s"] = best(lambda: merged_files.map_statistics(dense), repeats)
    # the Gauss-Newton matrix in one thread and in two
    with scaling.ObservationPasses(obs, 1, "numba") as passes:
        result = scaling.refine_scales(obs, params.scaling, passes,
                                       halves=image_halves(obs.n_images, 0))
    for nproc in (1, 2):
        with scaling.ObservationPasses(obs, nproc, "numba") as passes:
            gn = passes.reduce(gauss_newton.gauss_newton_partition, result.model,
                               np.nan_to_num(result.intensity), 1,
                               concat=gauss_newton.sample_columns(0))
            d_b, d_i = gn[0], gn[1]
            inv_d = np.where(d_i > 0, 1.0 / np.where(d_i > 0, d_i, 1.0), 0.0)
            passes.voxel_rows(1)
            out[f"schur_{nproc}_threads_s"] = best(
                lambda: gauss_newton._compiled_schur_matrix(passes, d_b, inv_d, 1), repeats)
    # the 6M context: separate factors on the grid and on every pixel
    eparams = api.extraction_params(**{"masking.bragg.mosaicity_deg": 0.1,
                                       "masking.bragg.beam_divergence_deg": 0.03154})
    tasks, _ = plan_tasks(experiments, None)
    for step in (extraction_context.CORRECTION_PARTS_STEP, 1):
        extraction_context.clear_caches()
        out[f"context_6m_parts_step_{step}_first_s"] = first_call(
            lambda: extraction_context.context_for(tasks[0], eparams, parts_step=step))
        out[f"context_6m_parts_step_{step}_s"] = best(
            lambda: (extraction_context.clear_caches(),
                     extraction_context.context_for(tasks[0], eparams, parts_step=step)), repeats)
    extraction_context.clear_caches()
    # one extraction file, the per-voxel arrays stored or deflated
    from dials_diffuse import io as diffuse_io
    from dials_diffuse.diffuse_files import write_image_file

    with np.load(EXTRACTED / "image_000050.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "metadata_json"}
        metadata = json.loads(str(npz["metadata_json"]))
    with tempfile.TemporaryDirectory() as tmp:
        out["image_file_write_stored_s"] = best(
            lambda: write_image_file(os.path.join(tmp, "a.npz"), arrays, metadata), repeats)
        out["image_file_stored_MB"] = round(os.path.getsize(os.path.join(tmp, "a.npz")) / 1e6, 2)
        out["image_file_write_deflated_s"] = best(
            lambda: diffuse_io.write_npz(os.path.join(tmp, "b.npz"), compress_level=1,
                                         deflate_floats=False,
                                         metadata_json=np.array(json.dumps(metadata)), **arrays),
            repeats)
        out["image_file_deflated_MB"] = round(os.path.getsize(os.path.join(tmp, "b.npz")) / 1e6, 2)
    # fresh memory: 400 MB touched for the first time, then again at once
    time.sleep(3)  # freed pages handed back meanwhile
    t0 = time.perf_counter()
    block = np.ones(50_000_000)
    out["fresh_400MB_s"] = round(time.perf_counter() - t0, 3)
    del block
    t0 = time.perf_counter()
    block = np.ones(50_000_000)
    out["reused_400MB_s"] = round(time.perf_counter() - t0, 3)
    del block
    # a process's exit after DIALS' imports, with and without the teardown
    code = ("import os, sys, time, dials.util.options; "
            "open(sys.argv[1], 'w').write(repr(time.time())); "
            "os._exit(0) if sys.argv[2] == '1' else None")
    with tempfile.TemporaryDirectory() as tmp:
        stamp = os.path.join(tmp, "t")
        for label, hard in (("exit_with_teardown_s", "0"), ("exit_without_teardown_s", "1")):
            times = []
            for _ in range(repeats):
                subprocess.run([sys.executable, "-c", code, stamp, hard], check=True)
                times.append(time.time() - float(open(stamp).read()))
            out[label] = round(min(times), 3)
    return out


def session9_components(experiments, repeats):
    """The components changed in session 9 (issue 16)."""
    import pickle

    from dials_diffuse import io as diffuse_io
    from dials_diffuse import masks as diffuse_masks
    from dials_diffuse.scaling.refine import ResidualSample

    out = {}
    params, grid, ops, obs = sweep_observations(experiments)
    halves = image_halves(obs.n_images, 0)
    # the scaling refinement's compiled passes over voxel ranges, 1 and 2 threads
    for nproc in (1, 2):
        refine_s, passes_s = [], []
        for _ in range(repeats):
            with scaling.ObservationPasses(obs, nproc, "numba") as passes:
                t0 = time.perf_counter()
                result = scaling.refine_scales(obs, params.scaling, passes, halves=halves)
                refine_s.append(time.perf_counter() - t0)
                passes_s.append(sum(t for _, t in passes.timings.values()))
        out[f"refine_{nproc}_threads_s"] = round(min(refine_s), 3)
        out[f"passes_{nproc}_threads_s"] = round(min(passes_s), 3)
    # the error model's sample: gathered once for three fits, or for each
    intensity = np.nan_to_num(result.intensity)
    use = ~result.rejected

    def three_fits(sample_of):
        for _ in range(3):
            sample_of().residuals(result.model, intensity, use)

    once = ResidualSample(obs)
    out["residuals_3_fits_gathered_once_s"] = best(lambda: three_fits(lambda: once), repeats)
    out["residuals_3_fits_gathered_each_s"] = best(
        lambda: three_fits(lambda: ResidualSample(obs)), repeats)
    # a 6M panel's mask pickle: flex.bool's own state against numpy's
    mask = [np.random.default_rng(0).random((2527, 2463)) > 0.001]
    out["mask_pickle_flex_s"] = best(
        lambda: pickle.dumps(diffuse_masks.to_flex(mask), pickle.HIGHEST_PROTOCOL), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out["mask_pickle_numpy_write_s"] = best(
            lambda: diffuse_io.write_mask_pickle(os.path.join(tmp, "m.pickle"), mask), repeats)
    # the CCP4 box range: compiled loop against numpy's one product
    g = np.ascontiguousarray(obs.voxel_grid, np.int64)
    op = np.ascontiguousarray(np.asarray(ops, np.int64).reshape(-1, 3, 3))
    out["mate_range_compiled_s"] = best(lambda: merged_files._mate_range(g, op), repeats)
    with NumpyPath("merged_files.mate_range"):
        out["mate_range_numpy_s"] = best(lambda: merged_files._mate_range(g, op), repeats)
    # each command's start-up and exit (-c prints the parameters)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    for command in ("dials.diffuse_extract", "dials.diffuse_merge", "dials.diffuse_process"):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([str(common.VENV_BIN / command), "-c"], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
        out[f"startup_{command}_s"] = round(min(times), 3)
    return out


def session10_components(experiments, repeats):
    """The components changed in session 10 (issue 16)."""
    from dxtbx.model import BeamFactory

    from dials.util.options import ArgumentParser

    from dials_diffuse import masks as diffuse_masks
    from dials_diffuse.command_line import extract as extract_command
    from dials_diffuse.command_util import modified_parameters
    from dials_diffuse.extraction import kernels

    out = {}
    params = api.extraction_params()
    experiment = experiments[0]
    static = diffuse_masks.static_mask(experiment.imageset, params.masking, params.masking.beamstop)
    # a 6M context: the first of a detector, then a still's with its own
    # beam reusing the kept geometry; compiled beam pass against numpy
    geometries = []
    tilted = BeamFactory.from_dict(experiment.beam.to_dict())
    tilted.set_direction((0.001, -0.002, 1.0))

    def contexts():
        geometries.clear()
        first = time.perf_counter()
        extraction_context.detector_context(experiment, experiment.imageset, params, static,
                                            geometries)
        second = time.perf_counter()
        beam, experiment.beam = experiment.beam, tilted
        extraction_context.detector_context(experiment, experiment.imageset, params, static,
                                            geometries)
        experiment.beam = beam
        return second - first, time.perf_counter() - second

    for kind in ("compiled", "numpy"):
        with NumpyPath("context.beam_block") if kind == "numpy" else contextlib.nullcontext():
            runs = [contexts() for _ in range(repeats)]
        out[f"context_6m_first_{kind}_s"] = round(min(r[0] for r in runs), 3)
        out[f"context_6m_next_beam_{kind}_s"] = round(min(r[1] for r in runs), 3)
    # the dynamic mask's decision on a 6M panel: compiled against numpy
    acc = diffuse_masks.DynamicMaskAccumulator(experiment.detector)
    rng = np.random.default_rng(1)
    acc.sum_counts[0][:] = rng.poisson(200, acc.sum_counts[0].shape)
    acc.n_valid[0][:], acc.n_images = 20, 20
    kernels.available()
    out["dynamic_masks_6m_compiled_s"] = best(
        lambda: acc.masks(kernels.local_level_median, compiled=kernels), repeats)
    out["dynamic_masks_6m_numpy_decision_s"] = best(
        lambda: acc.masks(kernels.local_level_median), repeats)
    # the merge's two CCP4 maps written in one thread or two
    merge_params, grid, ops, obs = sweep_observations(experiments)
    with tempfile.TemporaryDirectory() as tmp:
        maps = [(os.path.join(tmp, f"m{k}.ccp4"), np.nan_to_num(obs.voxel_qmag) * (k + 1), "m")
                for k in range(2)]
        for threads in (1, 2):
            out[f"two_maps_{threads}_threads_s"] = best(lambda: merged_files.write_ccp4_maps(
                maps, grid, obs.voxel_grid, ops, merge_params.output, threads=threads).result(),
                repeats)
    # the log's modified parameters: DIALS' diff_phil against ours
    parser = ArgumentParser(phil=extract_command.phil_scope, read_experiments=True,
                            read_reflections=True, check_format=True)
    parser.parse_args(args=[str(EXPT), str(EXPT.parent / "bragg.refl"), "mp.nproc=2"],
                      show_diff_phil=False, return_unhandled=True)
    out["diff_phil_s"] = best(lambda: parser.diff_phil.as_str(), repeats)
    out["modified_parameters_s"] = best(lambda: modified_parameters(parser), repeats)
    return out


def command_components():
    """The one-process extraction command, default environment against one
    OpenBLAS thread: wall, user and system time and minor page faults."""
    out = {}
    for label, threads in (("default_env", None), ("openblas_1", "1")):
        env = dict(os.environ)
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(k, None)
        # the commands set one thread unless told otherwise: OpenBLAS's own
        # default (a thread per core) has to be asked for
        env["OPENBLAS_NUM_THREADS"] = threads or str(os.cpu_count())
        with tempfile.TemporaryDirectory() as tmp:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(
                [str(common.VENV_BIN / "dials.diffuse_extract"), str(EXPT),
                 "masking.bragg.mosaicity_deg=0.1", "masking.bragg.beam_divergence_deg=0.03154",
                 "mp.nproc=1", "output.save_pixels=off", f"output.directory={tmp}/ex",
                 f"output.log={tmp}/ex.log"],
                env=env, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out[label] = {"wall_s": round(wall, 2),
                      "user_s": round(after.ru_utime - before.ru_utime, 2),
                      "system_s": round(after.ru_stime - before.ru_stime, 2),
                      "minor_faults": after.ru_minflt - before.ru_minflt}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commands", action="store_true",
                    help="also run the extraction command twice (OpenBLAS threads)")
    ap.add_argument("--session8", action="store_true",
                    help="also time the components changed in session 8")
    ap.add_argument("--session9", action="store_true",
                    help="also time the components changed in session 9")
    ap.add_argument("--session10", action="store_true",
                    help="also time the components changed in session 10")
    ap.add_argument("--output", default=None, help="JSON file name in bench/results")
    args = ap.parse_args()
    if not EXTRACTED.is_dir():
        sys.exit(f"{EXTRACTED} is missing: run bash bench/run_comparison.sh first")
    keep_freed_memory()
    experiments = ExperimentListFactory.from_json_file(str(EXPT), check_format=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_before": common.loadavg(),
           "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True,
                                        cwd=common.ROOT).stdout.strip(),
           "repeats": args.repeats}
    doc["merge"] = merge_components(experiments, args.repeats)
    doc["extraction"] = extraction_components(experiments, args.repeats)
    if args.session8:
        doc["session8"] = session8_components(experiments, args.repeats)
    if args.session9:
        doc["session9"] = session9_components(experiments, args.repeats)
    if args.session10:
        doc["session10"] = session10_components(experiments, args.repeats)
    if args.commands:
        doc["command"] = command_components()
    print(json.dumps(doc, indent=1))
    if args.output:
        (common.RESULTS / args.output).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
