"""The dynamic pass: hot and dead pixels from every image of the run
(:func:`dynamic_mask`), summed by forked workers and this process, each
taking the next image not yet taken."""

from __future__ import annotations

import logging
import multiprocessing

import numpy as np

from dials_diffuse.command_util import resolve_nproc
from dials_diffuse import masks
from dials_diffuse.observations import shared_array
from dials_diffuse.parallel import ForkPool
from dials_diffuse.extraction import kernels
from dials_diffuse.extraction.tasks import ImageError, read_image

logger = logging.getLogger("dials.diffuse_extract")


def _dynamic_accumulator(tasks, params):
    d = params.masking.dynamic
    return masks.DynamicMaskAccumulator(
        tasks[0].experiment.detector, d.hot_threshold, d.hot_fraction, d.hot_ratio,
        d.dead_min_expected_counts,
    )


def _accumulate_dynamic(tasks, params, acc=None, preread=None):
    """The dynamic-mask pass's accumulator of per-pixel sums over some images
    (added to ``acc`` when given). ``preread``: (task, raw data) of an image
    already read, used instead of reading it again."""
    acc = acc if acc is not None else _dynamic_accumulator(tasks, params)
    add_panel = kernels.add_dynamic_panel if kernels.use_compiled(params.kernel) else None
    for task in tasks:
        try:
            raw = preread[1] if preread is not None and task is preread[0] else read_image(task)
        except ImageError:
            continue
        acc.add(raw, add_panel)
    return acc


def _sum_next_images(shared, acc=None):
    """Add images until none is left: each process takes the next image not
    yet taken (a counter in shared memory), so a process that starts late or
    reads slowly takes fewer. ``acc`` is made at the first image taken (a
    process that finds none left allocates nothing); None if none."""
    tasks, counter = shared["tasks"], shared["next_image"]
    params = shared["params"]
    while True:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= len(tasks):
            return acc
        if acc is None:
            acc = _dynamic_accumulator(tasks, params)
        _accumulate_dynamic([tasks[i]], params, acc, shared["preread"])


def _shared_accumulator(shared, k, dtype=np.int64, n_images=0):
    """An accumulator whose sums are worker k's buffers in shared memory
    (its counts read as ``dtype``, int64 or float64)."""
    acc = _dynamic_accumulator(shared["tasks"], shared["params"])  # zeros: never touched
    acc.sum_counts, acc.n_hot, acc.n_valid = (
        [b.view(dtype) for b in shared["sum_counts"][k]],
        list(shared["n_hot"][k]), list(shared["n_valid"][k]))
    acc.n_images = n_images
    return acc


def _forked_dynamic(shared, k):
    """Worker k's sums, written into its buffers in shared memory (nothing
    per pixel travels back through a pipe); returns the number of images
    summed and the counts' dtype."""
    acc = _shared_accumulator(shared, k)
    if shared["shares"] is None:
        acc = _sum_next_images(shared, acc)
    else:  # float images: a fixed share each, for sums that do not depend on timing
        acc = _accumulate_dynamic([shared["tasks"][i] for i in shared["shares"][k]],
                                  shared["params"], acc, shared["preread"])
    for buffer, sums in zip(shared["sum_counts"][k], acc.sum_counts):
        if sums.dtype == np.float64:  # float images: summed in float64 (private arrays)
            buffer.view(np.float64)[...] = sums
    return acc.n_images, acc.sum_counts[0].dtype.str


def _shared_sums(detector, n_workers):
    """Per worker and panel: the sums' buffers in shared memory (8 bytes a
    pixel for the counts, int64 or float64; int32 for the others)."""
    shapes = [tuple(reversed(p.get_image_size())) for p in detector]

    def buffers(dtype):
        return [[shared_array(int(np.prod(shape)), dtype).reshape(shape) for shape in shapes]
                for _ in range(n_workers)]

    return buffers(np.int64), buffers(np.int32), buffers(np.int32)


def _first_readable(tasks):
    """(task, raw data) of the first image that reads, or None."""
    for task in tasks:
        try:
            return task, read_image(task)
        except ImageError:
            continue
    return None


def _masks(acc, params):
    if kernels.use_compiled(params.kernel):
        return acc.masks(kernels.local_level_median, compiled=kernels)
    return acc.masks()


def sampled_tasks(tasks, max_images):
    """At most ``max_images`` tasks evenly spaced over the run (all for 0)."""
    if not max_images or len(tasks) <= max_images:
        return list(tasks)
    picks = np.unique(np.round(np.linspace(0, len(tasks) - 1, max_images)).astype(int))
    return [tasks[i] for i in picks]


def dynamic_mask(tasks, params, while_waiting=None):
    """Hot and dead pixels from a pass over the images (masking.dynamic.
    max_images of them, evenly spaced).

    With mp.method=multiprocessing and mp.nproc > 1, forked workers sum the
    images into buffers in shared memory while this process runs
    ``while_waiting()`` (one worker fewer then, so that nproc processes
    share nproc cores); then this process adds their sums and makes the
    masks. Integer images (exact sums in any order) go to whichever process
    takes the next one, this process joining in after ``while_waiting``;
    float images, whose float64 sums depend on the order, go to the workers
    in fixed shares, the same for every run. Only the first image is read
    before forking (its dtype chooses between the two; a worker reuses it):
    the workers load the compiled kernels themselves, beside this process's
    own work, rather than before the fork on its time."""
    tasks = sampled_tasks(tasks, params.masking.dynamic.max_images)
    nproc = resolve_nproc(params)
    n_workers = min(nproc - (while_waiting is not None), len(tasks))
    if (nproc > 1 and n_workers >= 1 and len(tasks) > 1
            and params.mp.method == "multiprocessing"):
        preread = _first_readable(tasks)
        float_images = preread is not None and not np.issubdtype(preread[1][0].dtype, np.integer)
        sum_counts, n_hot, n_valid = _shared_sums(tasks[0].experiment.detector, n_workers)
        counter = multiprocessing.get_context("fork").Value("l", 0)
        shared = {"tasks": tasks, "params": params, "sum_counts": sum_counts,
                  "n_hot": n_hot, "n_valid": n_valid, "next_image": counter, "preread": preread,
                  "shares": [list(range(k, len(tasks), n_workers)) for k in range(n_workers)]
                  if float_images else None}
        with ForkPool(shared, n_workers) as pool:
            results = pool.map(_forked_dynamic, range(n_workers))  # submitted (forked) now
            try:
                if while_waiting is not None:
                    while_waiting()
            except BaseException:
                with counter.get_lock():  # the workers stop after their current image
                    counter.value = len(tasks)
                raise
            mine = None if float_images else _sum_next_images(shared)
            results = list(results)
        # worker 0's buffers become the total: no copy, no fresh memory
        acc, *others = [_shared_accumulator(shared, k, dtype, n_images)
                        for k, (n_images, dtype) in enumerate(results)]
        for other in others + ([mine] if mine is not None else []):
            acc.add_sums((other.sum_counts, other.n_hot, other.n_valid, other.n_images))
        result = _masks(acc, params)
    else:
        result = _masks(_accumulate_dynamic(tasks, params), params)
    n_bad = sum(int((~m).sum()) for m in result)
    logger.info("Dynamic mask: %d hot or dead pixels", n_bad)
    return result
