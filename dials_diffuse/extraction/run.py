"""An extraction run (:func:`extract`): plan, dynamic pass, one job per
image on 1..n forked processes or a Dask cluster, the per-image files, the
masks and the manifest."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import pickle
import time
import uuid

from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

from dials.util import Sorry, tabulate
from dials.util import progress as progress_bar

from dials_diffuse.command_util import ensure_output_directory, resolve_nproc
from dials_diffuse import bragg, io, masks
from dials_diffuse.observations import keep_freed_memory
from dials_diffuse.parallel import ForkPool
from dials_diffuse.diffuse_files import (
    MANIFEST_NAME,
    image_file_name,
    mask_file_name,
    write_image_file,
)
from dials_diffuse.extraction.context import clear_caches, context_for, gain_metadata, panel_gains
from dials_diffuse.extraction.dynamic import dynamic_mask, sampled_tasks
from dials_diffuse.extraction.image import (
    bragg_methods,
    extract_image,
    reflections_for,
    scan_predictions,
)
from dials_diffuse.extraction import kernels
from dials_diffuse.extraction.tasks import (
    ImageError,
    ImageTask,
    check_params,
    exposure_time,
    load_background,
    plan_tasks,
    read_image,
)

logger = logging.getLogger("dials.diffuse_extract")


DYNAMIC_MASK_NAME = "dynamic_mask.pickle"


@dataclasses.dataclass
class ImageJob:
    """Everything one image's extraction needs besides the shared state."""

    task: ImageTask
    params: object
    ndiv: tuple
    out_dir: str
    reflections: object = None
    masks: bool = False  # write this image's masks (output.masks, mask_images)


_WORKER_CACHE = {}  # Dask workers: background and dynamic mask of the current run


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
    # every image makes ~15 MB of temporaries: reused heap pages instead of
    # fresh ones (a page fault each; 439,000 faults in a 100-image 6M run)
    keep_freed_memory()
    tasks, skipped = plan_tasks(models, images)
    # contexts depend on this run's parameters (pixel_step, corrections,
    # masks, resolution): never reuse one from an earlier call
    clear_caches()
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
    prepared = []
    if params.masking.dynamic.enable:
        # while the dynamic-pass workers run, this process makes what the
        # extraction workers will inherit
        dynamic = dynamic_mask(tasks, params, while_waiting=lambda: prepared.append(
            _prepare_shared_state(tasks, params)))
        logger.info("Dynamic mask from %d of %d images in %.1f s",
                    len(sampled_tasks(tasks, params.masking.dynamic.max_images)), len(tasks),
                    time.time() - t0)

    # output.mask_images=first: the first image's masks only (the one the
    # extraction diagnostics overlay)
    jobs = [
        ImageJob(task, params, ndiv, out_dir, reflections_for(reflections, task),
                 masks=params.output.masks and (params.output.mask_images == "all" or k == 0))
        for k, task in enumerate(tasks)
    ]

    def write_dynamic_mask():
        if dynamic is not None:
            io.write_mask_pickle(os.path.join(out_dir, DYNAMIC_MASK_NAME), dynamic)

    t1 = time.time()
    # the dynamic mask's file is written while the extraction workers run
    entries = list(skipped) + run_jobs(jobs, params, background, dynamic, progress,
                                       prepared=bool(prepared), while_running=write_dynamic_mask)
    logger.info(
        "Extracted %d images in %.1f s (%.2f s per image, %d process(es), %s)",
        len(jobs), time.time() - t1, (time.time() - t1) / max(len(jobs), 1),
        resolve_nproc(params), params.mp.method,
    )
    _masks_of_first_extracted(jobs, entries[len(skipped):], background, dynamic)

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


def _masks_of_first_extracted(jobs, entries, background, dynamic):
    """output.mask_images=first: when the first image could not be
    extracted, the first image that was gets its masks (extracted once more,
    with the same result): the diagnostics overlay the first extracted image."""
    output = jobs[0].params.output if jobs else None
    if output is None or not output.masks or output.mask_images != "first":
        return
    for job, entry in zip(jobs, entries):
        if entry["status"] == "extracted":
            if not job.masks:
                logger.info("Masks written for image %s, the first extracted", entry["still_id"])
                extract_one(dataclasses.replace(job, masks=True), background, dynamic)
            return


def extract_one(job: ImageJob, background, dynamic, writer=None) -> dict:
    """Extract one image, write its file (and masks); return its manifest
    entry. ``writer(func)``: runs the file writes (by default now)."""
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
            exposure=entry["exposure_time"], want_masks=job.masks,
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
        "gain": gain_metadata(panel_gains(task.experiment.detector, params)),
        "corrections": {
            "polarization": params.corrections.polarization,
            "solid_angle": params.corrections.solid_angle,
            "efficiency": params.corrections.efficiency,
            "air": params.corrections.air,
            "air_temperature": params.corrections.air_temperature,
            "air_pressure": params.corrections.air_pressure,
        },
        "pixel_step": params.filter.pixel_step,
        # per-pixel arrays: every kept pixel on every n-th raster row and
        # column (1: all of them, 0: none written)
        "pixel_sample_step": result.pixel_sample_step,
        "bragg_mask": "+".join(sorted(bragg_methods(params.masking.bragg))) or "none",
        "pixel_counts": result.stages,
    }

    def write_files():
        if result.masks is not None:
            for kind, panel_masks in result.masks.items():
                io.write_mask_pickle(
                    os.path.join(job.out_dir, mask_file_name(kind, task.still_id)), panel_masks)
        # the image file last: its presence means the image is complete
        write_image_file(os.path.join(job.out_dir, name), result.arrays, metadata)

    (writer or (lambda func: func()))(write_files)
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
    if _WORKER_CACHE.get("run_token") != spec["run_token"]:
        clear_caches()
        for key in [k for k in _WORKER_CACHE if isinstance(k, tuple)]:
            del _WORKER_CACHE[key]
        _WORKER_CACHE["run_token"] = spec["run_token"]
    experiment = ExperimentListFactory.from_json(spec["experiment_json"], check_format=True)[0]
    task = ImageTask(
        spec["still_id"], spec["experiment_id"], experiment, experiment.imageset,
        spec["index_in_imageset"], spec["frame"], spec["image_path"],
        spec["bragg_widths"],
    )
    job = ImageJob(task, spec["params"], tuple(spec["ndiv"]), spec["out_dir"], spec["reflections"],
                   masks=spec["masks"])
    bg_key = ("background", spec["params"].corrections.background.map)
    if bg_key not in _WORKER_CACHE:
        _WORKER_CACHE[bg_key] = load_background(spec["params"], experiment.detector)
    background = _WORKER_CACHE[bg_key]
    dynamic = None
    if spec["dynamic_mask_path"]:
        key = ("dynamic", spec["dynamic_mask_path"])
        if key not in _WORKER_CACHE:
            with open(spec["dynamic_mask_path"], "rb") as fh:
                _WORKER_CACHE[key] = masks.from_flex(pickle.load(fh))
        dynamic = _WORKER_CACHE[key]
    return extract_one(job, background, dynamic)


def run_jobs(jobs, params, background, dynamic, show_progress=True, prepared=False,
             while_running=None):
    """Manifest entries of all jobs, in job order, on 1..n processes or Dask.
    ``prepared``: the shared state is made already (by the dynamic pass);
    ``while_running()``: runs in this process once the jobs are under way
    (before any job with one process)."""
    nproc = min(resolve_nproc(params), len(jobs))
    method = params.mp.method
    if method == "dask":
        if while_running is not None:
            while_running()
        return _run_dask(jobs, params, dynamic, nproc)
    if nproc <= 1:
        # with one process the file writes (while_running's, then each
        # image's) run in a thread while the next image is extracted: the
        # compiled kernels, zlib and the file system release the GIL
        side = concurrent.futures.ThreadPoolExecutor(1)
        side_jobs = [side.submit(while_running)] if while_running is not None else []

        def writer(func):
            # one image's files pending at most: the next image waits for
            # the one before (its error, if any, is raised here)
            while side_jobs:
                side_jobs.pop(0).result()
            side_jobs.append(side.submit(func))

        try:
            iterator = (extract_one(job, background, dynamic, writer) for job in jobs)
            entries = []
            for entry in progress_bar(iterator, total=len(jobs),
                                      disable=not show_progress or None):
                _log_entry(entry, len(entries), len(jobs))
                entries.append(entry)
            while side_jobs:
                side_jobs.pop(0).result()
        finally:
            side.shutdown()
        return entries
    # compute the shared context (and scan predictions) once before forking:
    # the workers inherit them (done already when the dynamic pass ran)
    if not prepared:
        _prepare_shared_state([job.task for job in jobs], params)
    shared = {"jobs": jobs, "background": background, "dynamic": dynamic}
    try:
        with ForkPool(shared, nproc) as pool:
            entries = []
            results = pool.map(_forked_job, range(len(jobs)))  # the workers are forked now
            if while_running is not None:
                while_running()
            for entry in progress_bar(results, total=len(jobs),
                                      disable=not show_progress or None):
                _log_entry(entry, len(entries), len(jobs))
                entries.append(entry)
            return entries
    except Sorry:
        # a worker killed mid-write leaves a part file named by its pid, dead
        # now (the pool has stopped the others): not left for the next run
        io.remove_stale_parts(params.output.directory)
        raise


def _scan_tasks(tasks, params):
    """One task of each rotation scan whose Bragg mask needs predictions."""
    if "predicted" not in bragg_methods(params.masking.bragg):
        return []
    seen, out = set(), []
    for task in tasks:
        if task.frame is None or id(task.experiment) in seen:
            continue
        seen.add(id(task.experiment))
        out.append(task)
    return out


def _forked_predictions(shared, index):
    """A scan's Bragg predictions, made in a forked helper: {cache key:
    predictions} (the key names the experiment by id, the same object in
    the parent that forked the helper)."""
    cache = {}
    scan_predictions(shared["tasks"][index], shared["params"], cache)
    return cache


def _prepare_shared_state(tasks, params):
    """The first context, the scan predictions and the compiled kernel, made
    once in this process (forked extraction workers inherit them). With
    mp.nproc > 1 a forked helper predicts the scans while this process
    builds the context (0.4-0.7 s and 0.8-1.3 s on the 100-image 6M sweep
    of bench/run_comparison.sh, beside the dynamic pass's worker)."""
    scans = _scan_tasks(tasks, params)
    helper = None
    if scans and resolve_nproc(params) > 1 and params.mp.method == "multiprocessing":
        helper = ForkPool({"tasks": scans, "params": params}, 1).__enter__()
        predicted = helper.map(_forked_predictions, range(len(scans)))  # forked now
    try:
        context_for(tasks[0], params)
        if helper is None:
            for task in scans:
                scan_predictions(task, params, context_for(task, params).predictions)
        else:
            for task, cache in zip(scans, predicted):
                context_for(task, params).predictions.update(cache)
    finally:
        if helper is not None:
            helper.close()
    if kernels.use_compiled(params.kernel):
        try:
            dtype = read_image(tasks[0])[0].dtype
        except ImageError:  # reported when its turn comes
            return
        kernels.warm_up(dtype, with_background=params.corrections.background.map is not None)


def _run_dask(jobs, params, dynamic, nproc):
    try:  # local: dask is an optional dependency (extras "dask")
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise Sorry("mp.method=dask needs dask.distributed: pip install 'dask[distributed]'")
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
            "masks": job.masks,
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
    logger.info("\nExtraction summary\n%s", tabulate(rows, headers="firstrow"))
    for e in manifest["images"]:
        if e["status"] != "extracted":
            logger.info("Skipped %s: %s", e["image_path"], e["reason"])
