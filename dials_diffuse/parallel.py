"""One way to run work in forked processes: :class:`ForkPool` and :func:`fork_map`.

The workers are forked from this process, so they inherit the *shared* state
given to the pool (imagesets, per-pixel contexts, observation columns in
shared memory) without pickling it; only the tasks (small: indices, row
ranges) and the results travel between processes. A worker function is called
as ``func(shared, task)``: the state it reads is an explicit argument, not a
module global of the caller.

``dials.util.Sorry`` does not survive the trip back from a worker (it does not
pickle with its message intact), so a worker's ``Sorry`` is returned as a
relay object and raised again, with the same message, in the parent.

Used by the extraction (dynamic-mask pass, per-image jobs), the merge's file
reading (:mod:`dials_diffuse.observations`), the scaling passes over the
observations (:class:`dials_diffuse.scaling.ObservationPasses`) and stills
indexing (:func:`dials_diffuse.processing.index_stills`). With ``nproc=1``
everything runs in this process, in task order, with the same results.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing

from dials.util import Sorry

#: state inherited by forked workers, by pool token (set before forking)
_INHERITED = {}
_TOKENS = itertools.count()


class _SorryRelay:
    """A worker's Sorry message, raised again in the parent."""

    def __init__(self, message):
        self.message = message


def _call(args):
    token, func, task = args
    try:
        return func(_INHERITED[token], task)
    except Sorry as e:
        return _SorryRelay(str(e))


def _unrelay(result):
    if isinstance(result, _SorryRelay):
        raise Sorry(result.message)
    return result


def _results(results, nproc):
    """The workers' results in task order; a worker that died without a
    word (killed by the system: out of memory, most often) ends the command
    with a Sorry saying what to do, not a traceback."""
    try:
        for r in results:
            yield _unrelay(r)
    except concurrent.futures.process.BrokenProcessPool:  # one line, no chain
        raise Sorry(
            f"a worker process (mp.nproc={nproc}) ended abruptly, killed by the system "
            "(out of memory?): run again with a smaller mp.nproc") from None


class ForkPool:
    """``nproc`` forked workers that inherit ``shared``; a context manager.

    ``map(func, tasks)`` submits every task at once and returns an iterator
    of the results in task order (``func(shared, task)`` in a worker); a
    worker's ``Sorry`` is raised again here. ``initializer`` runs once in
    each worker. A worker killed by the system ends the map with a Sorry
    (from ``BrokenProcessPool``) rather than a hang.
    """

    def __init__(self, shared, nproc, initializer=None):
        self.shared = shared
        self.nproc = int(nproc)
        self._initializer = initializer
        self._token = None
        self._executor = None

    def __enter__(self):
        self._token = next(_TOKENS)
        _INHERITED[self._token] = self.shared
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.nproc, mp_context=multiprocessing.get_context("fork"),
            initializer=self._initializer,
        )
        return self

    def map(self, func, tasks):
        results = self._executor.map(_call, [(self._token, func, t) for t in tasks])
        return _results(results, self.nproc)

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        _INHERITED.pop(self._token, None)

    def __exit__(self, *exc):
        self.close()


def fork_map(func, tasks, nproc, shared=None, initializer=None, while_waiting=None):
    """``[func(shared, task) for task in tasks]``, in forked workers when
    ``nproc > 1`` and there are at least two tasks, else in this process.
    ``while_waiting()`` runs in this process once the workers are forked
    (after the tasks with one process): work of this process that the
    workers need not inherit, done while it would wait for them."""
    tasks = list(tasks)
    nproc = min(int(nproc or 1), len(tasks))
    if nproc <= 1:
        results = [func(shared, t) for t in tasks]
        if while_waiting is not None:
            while_waiting()
        return results
    with ForkPool(shared, nproc, initializer=initializer) as pool:
        results = pool.map(func, tasks)  # every worker forked now
        if while_waiting is not None:
            while_waiting()
        return list(results)
