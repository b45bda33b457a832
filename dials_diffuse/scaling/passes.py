"""Passes over the observations: fixed row partitions of whole chunks (so
every floating-point sum is the same for any number of processes), summed
by compiled sweeps (:mod:`kernels`) in threads, or by numpy in forked
workers (:class:`ObservationPasses`, on
:class:`dials_diffuse.parallel.ForkPool`) that inherit the observation
columns in shared memory."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time

import numpy as np

from dials_diffuse.compiled import use_compiled
from dials_diffuse.observations import keep_freed_memory, shared_array
from dials_diffuse.parallel import ForkPool

logger = logging.getLogger("dials.diffuse_merge")


# Observations are processed in chunks of this many rows, so that the float64
# temporaries of a pass stay small whatever the number of observations.
CHUNK_ROWS = 1_000_000


# A pass sums over at most this many row partitions (whole chunks each), in
# partition order: the partitions, and so every floating-point sum, are the
# same whatever the number of processes.
MAX_PARTITIONS = 16


# Fewer observations than this are summed in one process (see ObservationPasses).
PARALLEL_MIN_OBS = 20_000_000


@dataclasses.dataclass
class ObservationChunk:
    """A slice of an ObservationSet, in float64, with the per-voxel and
    per-image arrays of the whole set (what the model functions need)."""

    voxel: np.ndarray  # intp (what bincount and fancy indexing use)
    image: np.ndarray
    signal: np.ndarray
    factor: np.ndarray
    variance: np.ndarray
    voxel_qmag: np.ndarray
    image_gain: np.ndarray
    gain: object = None  # gain of each row, or one number when every image has the same
    # c(|s|, phi) of each row (scaling.surfaces.offset), None when off; the
    # surfaces' a d is already in ``factor``
    row_offset: object = None


def row_gain(image_gain, image):
    """Gain of each row; a plain number when all images share one (the usual
    case: no per-row lookup)."""
    if image_gain.size and np.all(image_gain == image_gain[0]):
        return float(image_gain[0])
    return image_gain[image]


def chunks(obs, use=None, start=0, stop=None):
    """(chunk, use of its rows, its slice) for consecutive slices of the rows
    start:stop (chunk boundaries at multiples of CHUNK_ROWS)."""
    stop = obs.n_obs if stop is None else stop
    for a in range(start, stop, CHUNK_ROWS):
        sl = slice(a, min(a + CHUNK_ROWS, stop))
        yield observation_chunk(obs, sl), (None if use is None else use[sl]), sl


def observation_chunk(obs, rows):
    """The ObservationChunk of ``rows`` (a slice or an index array) of an
    ObservationSet. With mdx2's surfaces on, W is the extraction's factor
    times a(x, y, phi) d(x, y) of the row, and the row's offset c(|s|, phi)
    comes along: every pass sees the whole model without knowing it."""
    image = obs.image[rows].astype(np.intp)
    factor = obs.factor[rows].astype(np.float64)
    if obs.surface_gain is not None:
        factor *= obs.surface_gain[rows]
    return ObservationChunk(
        voxel=obs.voxel[rows].astype(np.intp),
        image=image,
        signal=obs.signal[rows].astype(np.float64),
        factor=factor,
        variance=obs.variance[rows],  # float32: only the merge uses it
        voxel_qmag=obs.voxel_qmag,
        image_gain=obs.image_gain,
        gain=row_gain(obs.image_gain, image),
        row_offset=(None if obs.surface_offset is None
                    else obs.surface_offset[rows].astype(np.float64)),
    )


def chunk_slices(start, stop):
    """Slices of at most CHUNK_ROWS rows covering start:stop (boundaries at
    multiples of CHUNK_ROWS from start)."""
    return [slice(a, min(a + CHUNK_ROWS, stop)) for a in range(start, stop, CHUNK_ROWS)]


def partition_bounds(n_obs):
    """Row ranges of the partitions: whole chunks, at most MAX_PARTITIONS,
    a function of the number of rows only."""
    n_chunks = max(1, -(-n_obs // CHUNK_ROWS))
    rows = CHUNK_ROWS * -(-n_chunks // MAX_PARTITIONS)
    return [(a, min(a + rows, n_obs)) for a in range(0, max(n_obs, 1), rows)]


@dataclasses.dataclass
class SharedRows:
    """What every pass reads: the observations, and per-row arrays in shared
    memory that a pass may rewrite for its own rows."""

    obs: object
    use: np.ndarray  # bool: kept by the outlier rejection
    coupling: np.ndarray  # float32: C = w W^2 b I of the last Gauss-Newton sums (0 if not used)
    kernels: object = None  # the compiled sweeps (scaling.kernels), None for numpy

    def compiled(self, model):
        """The compiled sweeps when they can run this pass: numba loaded and
        the plain model (E[S] = W b I: no smoother, offsets or surfaces)."""
        if self.kernels is None or model.smoother_q is not None or model.offset.any():
            return None
        return self.kernels


def load_kernels(choice="auto"):
    """scaling.kernels when numba imports (kernel=auto|numba), else None
    (compiled.use_compiled's rule: kernel=numba without numba is a Sorry)."""
    if choice == "numpy":
        return None
    try:
        from dials_diffuse.scaling import kernels
    except Exception as e:  # no numba, or one that does not work here
        use_compiled(choice, False, str(e))  # a Sorry for kernel=numba
        logger.debug("Compiled scaling sweeps unavailable (%s): numpy passes", e)
        return None
    return kernels


def _run_partition(rows, task):
    """One pass over one partition in a worker; ``rows``: the SharedRows the
    workers inherited (no copy, no pickling)."""
    func, start, stop, args = task
    return func(rows, start, stop, *args)


def _ordered_results(executor, n_threads, rows, tasks):
    """The tasks' results in order, at most one task per thread ahead of the
    one being reduced (each result holds per-voxel arrays)."""
    ahead = n_threads
    futures = [executor.submit(_run_partition, rows, t) for t in tasks[:ahead]]
    for k in range(len(tasks)):
        if k + ahead < len(tasks):
            futures.append(executor.submit(_run_partition, rows, tasks[k + ahead]))
        yield futures[k].result()
        futures[k] = None


class ObservationPasses:
    """Sums over all observations, partition by partition, in ``nproc``
    forked workers that read the observation columns they inherited.

    A pass is a function ``func(rows, start, stop, *args)`` (rows: the
    SharedRows) returning a tuple of arrays for its rows; ``reduce`` adds
    them up in partition order (or concatenates the outputs named in
    ``concat``), so that the result is byte-identical for any nproc.
    """

    def __init__(self, obs, nproc=1, kernel="auto"):
        keep_freed_memory()
        self.obs = obs
        # the compiled sweeps know the plain columns only (no mdx2 surfaces)
        plain = obs.surface_gain is None and obs.surface_offset is None
        # untouched pages of shared memory cost nothing: the coupling column
        # takes memory only when the Gauss-Newton solver writes it
        self.rows = SharedRows(obs=obs, use=shared_array(obs.n_obs, bool),
                               coupling=shared_array(obs.n_obs, np.float32),
                               kernels=load_kernels(kernel) if plain else None)
        self.use = self.rows.use
        self.use[:] = True
        self.bounds = partition_bounds(obs.n_obs)
        self.timings = {}  # pass name: (count, seconds)
        self._pool = None
        self._threads = None
        self._side_threads = None
        self.nproc = max(1, int(nproc))
        n_workers = min(nproc, len(self.bounds))
        # below PARALLEL_MIN_OBS the per-voxel arrays each worker makes and
        # sends back cost more than the rows it sums (measured on the 6.6e6
        # observations of a 100-image sweep: numpy passes 7.8 s -> 10.6 s
        # with 2 forked workers; compiled sweeps 3.0 s -> 3.7 s with 2 threads)
        if n_workers > 1 and obs.n_obs >= PARALLEL_MIN_OBS:
            if self.rows.kernels is not None:
                # compiled sweeps release the GIL: threads share everything,
                # nothing is pickled
                self._threads = concurrent.futures.ThreadPoolExecutor(n_workers)
                self._n_threads = n_workers
            else:
                self._pool = ForkPool(self.rows, n_workers).__enter__()

    def reduce(self, func, *args, concat=()):
        t0 = time.perf_counter()
        total = self._reduce(func, args, concat)
        name = func.__name__.strip("_").replace("_partition", "")
        count, seconds = self.timings.get(name, (0, 0.0))
        self.timings[name] = (count + 1, seconds + time.perf_counter() - t0)
        return total

    def _reduce(self, func, args, concat):
        tasks = [(func, a, b, args) for a, b in self.bounds]
        if self._threads is not None:
            results = _ordered_results(self._threads, self._n_threads, self.rows, tasks)
        elif self._pool is not None:
            results = self._pool.map(_run_partition, tasks)
        else:
            results = (func(self.rows, a, b, *args) for a, b in self.bounds)
        total = None
        for result in results:
            if total is None:
                total = [[r] if i in concat else r for i, r in enumerate(result)]
                continue
            for i, r in enumerate(result):
                if i in concat:
                    total[i].append(r)
                else:
                    total[i] += r
        return [np.concatenate(t) if i in concat else t for i, t in enumerate(total)]

    def thread_map(self, func, items):
        """[func(item) for item in items], in up to nproc threads when the
        compiled kernels run (they release the GIL), in order."""
        if self.nproc < 2 or self.rows.kernels is None or len(items) < 2:
            return [func(item) for item in items]
        if self._side_threads is None:
            self._side_threads = concurrent.futures.ThreadPoolExecutor(self.nproc)
        return list(self._side_threads.map(func, items))

    def voxel_rows(self, every):
        """(order, start): the rows of the voxels sampled every ``every``,
        grouped by voxel // every (kernels.voxel_rows); made once per run
        and ``every``, kept for every Gauss-Newton step."""
        if getattr(self, "_voxel_rows", (None,))[0] != every:
            n_sub = -(-self.obs.n_voxels // every)
            start = np.zeros(n_sub + 1, np.int64)
            order = np.empty(self.obs.n_obs, np.int32 if self.obs.n_obs < 2**31 else np.int64)
            self.rows.kernels.voxel_rows(self.obs.voxel, every, n_sub, order, start)
            self._voxel_rows = (every, order[:start[-1]], start)
        return self._voxel_rows[1:]

    def log_timings(self):
        workers = ("1 process" if self._pool is None and self._threads is None else
                   f"{self._pool.nproc} processes" if self._pool else
                   f"{self._n_threads} threads")
        kind = "compiled" if self.rows.kernels is not None else "numpy"
        logger.info("Passes over the observations (%d partitions, %s, %s): %s", len(self.bounds),
                    kind, workers,
                    ", ".join(f"{name} {n}x {t:.1f} s" for name, (n, t) in self.timings.items()))

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for executor in (self._threads, self._side_threads):
            if executor is not None:
                executor.shutdown()
        self._threads = self._side_threads = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bincount(index, weights, n):
    return np.bincount(index, weights=weights, minlength=n)


def used_index(index, u, n):
    """index where u, else n: rows not used go to an extra bin that the sums
    drop (one integer select instead of one float select per sum)."""
    return np.where(u, index, n)


def used_sum(index, weights, n):
    """Sums over bins 0..n-1 of an index made by used_index."""
    return np.bincount(index, weights=weights, minlength=n + 1)[:n]
