"""The dynamic pass: hot and dead pixels from every image of the run
(:func:`dynamic_mask`), in forked workers that each sum a share of the
images."""

from __future__ import annotations

import logging

import numpy as np

from dials_diffuse.command_util import resolve_nproc
from dials_diffuse import masks
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


def _accumulate_dynamic(tasks, params):
    """The dynamic-mask pass's accumulator of per-pixel sums over some images."""
    acc = _dynamic_accumulator(tasks, params)
    add_panel = kernels.add_dynamic_panel if kernels.use_compiled(params.kernel) else None
    for task in tasks:
        try:
            raw = read_image(task)
        except ImageError:
            continue
        acc.add(raw, add_panel)
    return acc


def _forked_dynamic(shared, indices):
    """A worker's share of the sums; the only worker makes the masks too
    (6 MB sent back instead of 100 MB of sums, and the medians run while
    the parent builds the extraction's context)."""
    acc = _accumulate_dynamic([shared["tasks"][i] for i in indices], shared["params"])
    return _masks(acc, shared["params"]) if shared["only_worker"] else acc.sums()


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
    max_images of them, evenly spaced; in parallel with
    mp.method=multiprocessing: each worker sums its share of the images, a
    single worker makes the masks too; ``while_waiting()`` runs in this
    process meanwhile, on one of the mp.nproc cores)."""
    tasks = sampled_tasks(tasks, params.masking.dynamic.max_images)
    nproc = min(resolve_nproc(params), len(tasks) + (while_waiting is not None))
    if nproc > 1 and params.mp.method == "multiprocessing":
        # numba imported once, here, before the forks: the workers inherit it
        # (else each imports it, 0.4 s, beside this process's own import
        # while it makes the context)
        kernels.use_compiled(params.kernel)
        # this process works meanwhile (while_waiting): one worker fewer, so
        # that nproc processes share nproc cores
        n_workers = min(nproc - (while_waiting is not None), len(tasks))
        shares = [list(range(k, len(tasks), n_workers)) for k in range(n_workers)]
        shared = {"tasks": tasks, "params": params, "only_worker": n_workers == 1}
        with ForkPool(shared, n_workers) as pool:
            results = pool.map(_forked_dynamic, shares)  # submitted (forked) now
            if while_waiting is not None:
                while_waiting()
            if n_workers == 1:
                result = next(results)
            else:
                acc = _dynamic_accumulator(tasks, params)
                for sums in results:
                    acc.add_sums(sums)
                result = _masks(acc, params)
    else:
        result = _masks(_accumulate_dynamic(tasks, params), params)
    n_bad = sum(int((~m).sum()) for m in result)
    logger.info("Dynamic mask: %d hot or dead pixels", n_bad)
    return result
