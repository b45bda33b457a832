"""Passes over the observations: fixed partitions (so every floating-point
sum is the same for any number of processes), summed by compiled sweeps
(:mod:`kernels`) in threads over voxel ranges, or by numpy over row ranges
in forked workers (:class:`ObservationPasses`, on
:class:`dials_diffuse.parallel.ForkPool`) that inherit the observation
columns in shared memory."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time

import numpy as np

from dials_diffuse.compiled import use_compiled
from dials_diffuse.observations import group_rows, keep_freed_memory, shared_array
from dials_diffuse.parallel import ForkPool

logger = logging.getLogger("dials.diffuse_merge")


# Observations are processed in chunks of this many rows, so that the float64
# temporaries of a pass stay small whatever the number of observations.
CHUNK_ROWS = 1_000_000


# A pass sums over at most this many partitions, in partition order: the
# partitions, and so every floating-point sum, are the same whatever the
# number of processes.
MAX_PARTITIONS = 16


# Numpy passes over fewer observations than this run in one process (see
# ObservationPasses); the compiled sweeps run in threads whatever the size.
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


def chunks(obs, use, part):
    """(chunk, use of its rows, its slice) for consecutive slices of a
    Partition's row range (chunk boundaries at multiples of CHUNK_ROWS from
    its start)."""
    for sl in chunk_slices(part.start, part.stop):
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
    """Row ranges of the partitions: as many as chunks, rounded up to a
    multiple of 4 (so that 2 or 4 threads share them evenly), at most
    MAX_PARTITIONS, of about equal size; a function of the number of rows
    only."""
    n_chunks = max(1, -(-n_obs // CHUNK_ROWS))
    n = min(MAX_PARTITIONS, 4 * -(-n_chunks // 4))
    edges = np.linspace(0, n_obs, n + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@dataclasses.dataclass(frozen=True)
class Partition:
    """The k-th of a pass's fixed partitions, in two forms that each cover
    every row once.

    Rows start:stop, for the numpy passes: they sum into arrays over all
    voxels, which are added up in partition order. And the voxels v0:v1
    with all their rows, for the compiled sweeps: the rows are grouped by
    image and sorted by voxel within an image (observations.group_rows), so
    those rows are one run per image, run_start[i]:run_stop[i]. A compiled
    partition writes the sums of its own voxels only (VoxelSums): partitions
    share no per-voxel output, none makes output arrays over all voxels, and
    a voxel's sums add its rows in image order whatever the partitions.
    """

    start: int
    stop: int
    v0: int
    v1: int
    run_start: np.ndarray  # int64, per image
    run_stop: np.ndarray

    @property
    def n_voxels(self):
        return self.v1 - self.v0


@dataclasses.dataclass
class VoxelSums:
    """A compiled partition's per-voxel sums of its voxels v0:v0 + n (last
    axis): the pass's result is these placed side by side, not added."""

    v0: int
    values: np.ndarray


def all_rows(obs):
    """One Partition of every row and voxel (a single run: valid whatever
    the rows' order)."""
    return Partition(start=0, stop=obs.n_obs, v0=0, v1=obs.n_voxels,
                     run_start=np.zeros(1, np.int64), run_stop=np.array([obs.n_obs], np.int64))


def make_partitions(obs):
    """The Partitions of an ObservationSet grouped by image and voxel: the
    voxel ranges split the rows at about the row ranges' sizes."""
    bounds = partition_bounds(obs.n_obs)
    rows_before = np.zeros(obs.n_voxels + 1, np.int64)  # rows of voxels < v
    np.cumsum(np.bincount(obs.voxel, minlength=obs.n_voxels), out=rows_before[1:])
    cuts = np.searchsorted(rows_before, [a for a, _ in bounds[1:]])
    voxel_edges = np.concatenate([[0], cuts, [obs.n_voxels]]).astype(np.int64)
    image_start = np.searchsorted(obs.image, np.arange(obs.n_images + 1))
    runs = np.empty((obs.n_images, voxel_edges.size), np.int64)
    for i in range(obs.n_images):
        a, b = image_start[i], image_start[i + 1]
        runs[i] = a + np.searchsorted(obs.voxel[a:b], voxel_edges)
    return [Partition(start=a, stop=b, v0=int(voxel_edges[k]), v1=int(voxel_edges[k + 1]),
                      run_start=runs[:, k].copy(), run_stop=runs[:, k + 1].copy())
            for k, (a, b) in enumerate(bounds)]


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
    func, part, args = task
    return func(rows, part, *args)


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
    """Sums over all observations, partition by partition: compiled sweeps
    in up to ``nproc`` threads, numpy passes of large runs in ``nproc``
    forked workers that read the observation columns they inherited.

    A pass is a function ``func(rows, part, *args)`` (rows: the SharedRows,
    part: a Partition) returning a tuple of arrays; ``reduce`` adds them up
    in partition order, places VoxelSums side by side, or concatenates the
    outputs named in ``concat``, so that the result is byte-identical for
    any nproc. The observations' rows are grouped by image and voxel first
    (observations.group_rows: a check, and a sort only if reindexing or a
    caller left them otherwise).
    """

    def __init__(self, obs, nproc=1, kernel="auto"):
        keep_freed_memory()
        group_rows(obs)
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
        self.partitions = make_partitions(obs)
        self.timings = {}  # pass name: (count, seconds)
        self._pool = None
        self._threads = None
        self._side_threads = None
        self.nproc = max(1, int(nproc))
        self._n_threads = min(self.nproc, len(self.partitions))
        if self._n_threads > 1 and (self.rows.kernels is not None
                                    or obs.n_obs >= PARALLEL_MIN_OBS):
            # compiled sweeps release the GIL: threads share everything,
            # nothing is pickled (and at any size: a partition allocates
            # only its own voxels' sums)
            self._threads = concurrent.futures.ThreadPoolExecutor(self._n_threads)
        # below PARALLEL_MIN_OBS the per-voxel arrays each numpy worker makes
        # and sends back cost more than the rows it sums (measured on the
        # 6.6e6 observations of a 100-image sweep: 7.8 s -> 10.6 s with 2
        # forked workers)
        if (self._n_threads > 1 and self.rows.kernels is None
                and obs.n_obs >= PARALLEL_MIN_OBS):
            self._pool = ForkPool(self.rows, self._n_threads).__enter__()

    def reduce(self, func, *args, concat=(), compiled=False):
        """The pass ``func`` over every partition, reduced in partition
        order. ``compiled``: the pass runs compiled sweeps (they release the
        GIL: threads with nproc > 1). Numpy passes of runs of at least
        PARALLEL_MIN_OBS observations run in forked workers (in threads when
        the kernels are loaded), of smaller runs here, one after the other."""
        t0 = time.perf_counter()
        total = self._reduce(func, args, concat, compiled)
        name = func.__name__.strip("_").replace("_partition", "")
        count, seconds = self.timings.get(name, (0, 0.0))
        self.timings[name] = (count + 1, seconds + time.perf_counter() - t0)
        return total

    def _reduce(self, func, args, concat, compiled):
        tasks = [(func, part, args) for part in self.partitions]
        if self._pool is not None and not compiled:
            results = self._pool.map(_run_partition, tasks)
        elif self._threads is not None and (compiled or self.obs.n_obs >= PARALLEL_MIN_OBS):
            results = _ordered_results(self._threads, self._n_threads, self.rows, tasks)
        else:
            results = (_run_partition(self.rows, t) for t in tasks)
        total = None
        for result in results:
            if total is None:
                total = [[r] if i in concat else
                         _placed(r, self.obs.n_voxels) if isinstance(r, VoxelSums) else r
                         for i, r in enumerate(result)]
                continue
            for i, r in enumerate(result):
                if i in concat:
                    total[i].append(r)
                elif isinstance(r, VoxelSums):
                    total[i][..., r.v0:r.v0 + r.values.shape[-1]] = r.values
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
        logger.info("Passes over the observations (%d partitions, %s, %s): %s", len(self.partitions),
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


def _placed(sums, n_voxels):
    """An array over every voxel holding a first VoxelSums (the others are
    placed beside it; together the partitions cover every voxel)."""
    total = np.empty(sums.values.shape[:-1] + (n_voxels,))
    total[..., sums.v0:sums.v0 + sums.values.shape[-1]] = sums.values
    return total


def bincount(index, weights, n):
    return np.bincount(index, weights=weights, minlength=n)


def used_index(index, u, n):
    """index where u, else n: rows not used go to an extra bin that the sums
    drop (one integer select instead of one float select per sum)."""
    return np.where(u, index, n)


def used_sum(index, weights, n):
    """Sums over bins 0..n-1 of an index made by used_index."""
    return np.bincount(index, weights=weights, minlength=n + 1)[:n]
