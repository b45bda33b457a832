"""Voxel observations of a whole run, read from the per-image extraction files.

Each observation is one (image, voxel) pair with the sums written by the
extraction: S (signal), W (correction factor), V (variance of S). Voxels are
mapped to the asymmetric unit (``symmetry.map_to_asu``) and given a compact
index into the list of observed voxels, so that every per-voxel array of the
merge has the size of the observed grid, not of the bounding box.

Memory: the compact per-observation columns are kept in memory, in shared
memory so that forked workers read them without copies (20 bytes per
observation, 2 GB for 10^8); the reading fills them file by file and the
scaling passes work in chunks, so temporaries stay small.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import zipfile
from typing import List, Optional

import numpy as np

from dials.util import Sorry

from dials_diffuse import symmetry
from dials_diffuse.parallel import fork_map
from dials_diffuse.diffuse_files import (
    MANIFEST_NAME,
    read_image_file,
    read_manifest,
)
import ctypes

logger = logging.getLogger("dials.diffuse_merge")


@dataclasses.dataclass
class ObservationSet:
    """Observations of a run, as flat columns (one row per image-voxel pair)."""

    voxel: np.ndarray  # int32 compact voxel index
    image: np.ndarray  # int32 index into image_ids
    signal: np.ndarray  # float32 S (per-image sums; merging accumulates in float64)
    factor: np.ndarray  # float32 W
    variance: np.ndarray  # float32 V
    voxel_grid: np.ndarray  # (n_voxels, 3) int32 ASU grid indices of compact voxels
    voxel_qmag: np.ndarray  # (n_voxels,) |q| of the voxel centre, 1/Angstrom
    image_ids: np.ndarray  # still id of each image
    image_gain: np.ndarray  # gain of each image (photons per count)
    metadata: List[dict]
    # mdx2's surfaces (scaling.surfaces; None when they are off):
    detector_x: Optional[np.ndarray] = None  # float32 mean detector-plane x (mm) of each row
    detector_y: Optional[np.ndarray] = None  # float32 mean detector-plane y (mm) of each row
    image_phi: Optional[np.ndarray] = None  # rotation angle (deg) at each image's centre
    surface_gain: Optional[np.ndarray] = None  # float32 a(x, y, phi) d(x, y) of each row
    surface_offset: Optional[np.ndarray] = None  # float32 c(|s|, phi) of each row
    surface_terms: Optional[dict] = None  # float32 a and d of each row, by name

    @property
    def n_obs(self):
        return self.voxel.size

    @property
    def n_voxels(self):
        return len(self.voxel_grid)

    @property
    def n_images(self):
        return self.image_ids.size


# The per-row columns of an ObservationSet (surface_terms' columns too).
ROW_COLUMNS = ("voxel", "image", "signal", "factor", "variance", "detector_x", "detector_y",
               "surface_gain", "surface_offset")


def rows_grouped(obs, chunk=1_000_000) -> bool:
    """Whether the rows are grouped by image in image order and sorted by
    voxel within an image (checked a chunk at a time: no temporaries of
    the size of the columns)."""
    for a in range(0, obs.n_obs, chunk):
        b = min(a + chunk + 1, obs.n_obs)  # one row of overlap
        step_image = np.diff(obs.image[a:b])
        if np.any(step_image < 0) or np.any((step_image == 0) & (np.diff(obs.voxel[a:b]) < 0)):
            return False
    return True


def group_rows(obs):
    """Put the rows in the order every pass expects, in place: grouped by
    image in image order, sorted by voxel within an image (a stable sort).
    The read makes this order; reindexing (ambiguity) or an ObservationSet
    made by hand may not. Columns keep their buffers (shared memory)."""
    if rows_grouped(obs):
        return obs
    order = np.lexsort((obs.voxel, obs.image))
    columns = [getattr(obs, name) for name in ROW_COLUMNS]
    columns += list((obs.surface_terms or {}).values())
    for column in columns:
        if column is not None:
            column[:] = column[order]
    return obs


def find_extraction_files(inputs: List[str]):
    """Per-image files from directories (via their manifest), manifests or NPZ paths."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            manifest = read_manifest(item)
            entries = [e for e in manifest.get("images", []) if e.get("status") == "extracted"]
            files.extend(os.path.join(item, e["file"]) for e in entries)
        elif item.endswith(".json") and os.path.basename(item) == MANIFEST_NAME:
            directory = os.path.dirname(item) or "."
            manifest = read_manifest(directory)
            files.extend(
                os.path.join(directory, e["file"])
                for e in manifest.get("images", [])
                if e.get("status") == "extracted"
            )
        elif item.endswith(".npz"):
            files.append(item)
        elif not os.path.exists(item):
            raise Sorry(f"{item} does not exist")
        else:
            raise Sorry(f"{item} is not an extraction directory, manifest or .npz file")
    if not files:
        raise Sorry("no extracted images found in " + ", ".join(inputs))
    return files


# Grid indices are packed into int64 keys with a fixed offset, so that keys of
# different images compare without knowing the global bounds in advance.
_KEY_OFFSET = 2**19
_KEY_WIDTH = 2**20


def _pack(g):
    g = g.astype(np.int64) + _KEY_OFFSET
    return (g[:, 0] * _KEY_WIDTH + g[:, 1]) * _KEY_WIDTH + g[:, 2]


def _unpack(keys):
    gl = keys % _KEY_WIDTH
    rest = keys // _KEY_WIDTH
    return (np.stack([rest // _KEY_WIDTH, rest % _KEY_WIDTH, gl], axis=1) - _KEY_OFFSET).astype(np.int32)


def shared_array(n, dtype):
    """A zero-filled array in anonymous shared memory: forked workers write
    into it and the parent sees the result without any copy or pickling."""
    dtype = np.dtype(dtype)
    buffer = mmap.mmap(-1, max(1, n * dtype.itemsize))
    return np.frombuffer(buffer, dtype, count=n)


def keep_freed_memory():
    """Let glibc keep freed blocks of up to 32 MB in the heap for reuse.

    The passes over the observations make many temporaries of a few MB to
    tens of MB; by default each is a fresh mmap, returned to the system when
    freed, and the page faults of the next one cost as much system time as
    the arithmetic (measured: 0.78 s instead of 0.42 s for one merge pass
    over 3e7 observations). Forked workers inherit the setting.
    """

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum)
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


# what the merge needs from a file (the per-voxel mean hkl and |q| are not read
# unless resolution limits are set: skipping them saves a third of the inflate)
_MERGE_KEYS = ("voxel_indices", "voxel_sum_signal", "voxel_sum_factor", "voxel_sum_variance")


def _file_header(path):
    """(metadata, number of rows) of an extraction file from its zip headers
    only; a file that is not readable this way gets read_image_file's Sorry."""
    try:
        with zipfile.ZipFile(path) as z:
            with z.open("voxel_sum_signal.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape = read_header(fh)[0]
            with z.open("metadata_json.npy") as fh:
                metadata = json.loads(str(np.lib.format.read_array(fh)))
        return metadata, int(shape[0])
    except Exception:
        arrays, metadata = read_image_file(path)  # raises Sorry naming the problem
        return metadata, len(arrays["voxel_sum_signal"])


def read_one(path, ndiv, operators, d_min=None, d_max=None, detector_xy=False):
    """One extraction file as (ASU keys, S, W, V, metadata), rows sorted by key;
    with ``detector_xy``, (ASU keys, S, W, V, x, y, metadata)."""
    keys = _MERGE_KEYS + (("voxel_mean_qmag",) if d_min is not None or d_max is not None else ())
    if detector_xy:
        keys += ("voxel_mean_xy",)
    arrays, meta = read_image_file(path, keys=keys)
    if detector_xy and "voxel_mean_xy" not in arrays:
        raise Sorry(f"{path} has no voxel_mean_xy (extracted by an earlier version): "
                    "run dials.diffuse_extract again to use scaling.surfaces")
    if list(meta.get("ndiv", [])) != list(ndiv):
        raise Sorry(
            f"{path} was extracted with grid ndiv {meta.get('ndiv')}, "
            f"this merge uses {list(ndiv)}: files from another grid"
        )
    keep = arrays["voxel_sum_factor"] > 0
    if d_min is not None or d_max is not None:
        q = arrays["voxel_mean_qmag"]
        if d_min is not None:
            keep &= q <= 1.0 / d_min
        if d_max is not None:
            keep &= q >= 1.0 / d_max
    g = arrays["voxel_indices"][keep]
    if g.size and np.abs(g).max() >= _KEY_OFFSET:
        raise Sorry(f"{path}: voxel indices beyond +-{_KEY_OFFSET}: grid too fine")
    packed = _pack(symmetry.map_to_asu(g, np.asarray(ndiv), operators))
    # within an image, rows sorted by voxel: a deterministic order
    rows = np.argsort(packed, kind="stable")
    columns = [arrays[k][keep][rows].astype(np.float32)
               for k in ("voxel_sum_signal", "voxel_sum_factor", "voxel_sum_variance")]
    if detector_xy:
        xy = arrays["voxel_mean_xy"][keep][rows]
        columns += [xy[:, 0].astype(np.float32), xy[:, 1].astype(np.float32)]
    return (packed[rows], *columns, meta)


def _read_files(r, task):
    """Read a group of files into the shared columns at their row offsets.

    Returns the kept rows per file and the sorted union of the group's voxel
    keys (small: one entry per distinct voxel). ``r``: the shared columns,
    files, row offsets and reading options (inherited by forked workers).
    """
    union, pending, n_pending, kept = np.zeros(0, np.int64), [], 0, []
    for k, i in enumerate(task):
        if k + 1 < len(task):
            _prefetch(r["files"][task[k + 1]])
        keys, *columns, _ = read_one(r["files"][i], **r["kwargs"])
        sl = slice(r["offsets"][i], r["offsets"][i] + keys.size)
        r["keys"][sl] = keys
        for name, values in zip(r["value_columns"], columns):
            r[name][sl] = values
        r["image"][sl] = i
        kept.append(keys.size)
        pending.append(_sorted_unique(keys))
        n_pending += pending[-1].size
        if n_pending > 10_000_000:  # unions in batches: sorting is the cost
            union = np.union1d(union, np.concatenate(pending))
            pending, n_pending = [], 0
    if pending:
        union = np.union1d(union, np.concatenate(pending))
    return kept, union


def _prefetch(path):
    """Start the kernel reading a file (asynchronously): the disk reads the
    next file while this worker inflates and maps the current one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # read_one reports it
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def _sorted_unique(keys):
    """np.unique of an already sorted array, without sorting again."""
    if keys.size == 0:
        return keys
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))]


def _compact_voxels(r, task):
    """Compact voxel index of each row (a binary search in the sorted union)."""
    start, stop = task
    r["voxel"][start:stop] = np.searchsorted(r["union"], r["keys"][start:stop])
    return None


def _headers(files, ndiv):
    """Metadata and row counts of every file, with the cheap checks done
    before any array is read."""
    headers = [_file_header(path) for path in files]
    for path, (meta, _) in zip(files, headers):
        if list(meta.get("ndiv", [])) != list(ndiv):
            raise Sorry(
                f"{path} was extracted with grid ndiv {meta.get('ndiv')}, "
                f"this merge uses {list(ndiv)}: files from another grid"
            )
    ids = [int(meta["still_id"]) for meta, _ in headers]
    if len(set(ids)) != len(ids):
        raise Sorry("two extraction files have the same still_id: inputs overlap")
    return headers


def load_observations(files, grid, operators, d_min=None, d_max=None, nproc=1,
                      detector_xy=False, while_reading=None) -> ObservationSet:
    """Read every file, check it belongs to this grid, map voxels to the ASU.

    Images are ordered by still id. The files are read by ``nproc`` forked
    workers straight into columns in shared memory (each file at a row offset
    known from its header), so nothing per observation is pickled; each
    worker returns the union of its voxel keys, and a second parallel step
    turns the int64 keys into compact int32 voxel indices. Each observation
    keeps 20 bytes (voxel, image, S, W, V); the int64 keys are freed after
    the read. With ``detector_xy`` the voxels' mean detector-plane x and y
    are read too (8 bytes more per observation). ``while_reading()`` runs
    in this process while the workers read (parallel.fork_map's
    while_waiting).
    """
    keep_freed_memory()
    ndiv = tuple(int(n) for n in grid.ndiv)
    headers = _headers(files, ndiv)
    order = np.argsort([int(meta["still_id"]) for meta, _ in headers], kind="stable")
    files = [files[i] for i in order]
    metadata = [headers[i][0] for i in order]
    counts = np.array([headers[i][1] for i in order], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n_rows = int(offsets[-1])
    value_columns = ("signal", "factor", "variance") + (
        ("detector_x", "detector_y") if detector_xy else ())
    columns = dict(keys=np.int64, image=np.int32, voxel=np.int32,
                   **{name: np.float32 for name in value_columns})
    # the state the reading workers inherit (columns in shared memory)
    shared = {name: shared_array(n_rows, dtype) for name, dtype in columns.items()}
    shared.update(files=files, offsets=offsets, value_columns=value_columns,
                  kwargs=dict(ndiv=ndiv, operators=operators, d_min=d_min, d_max=d_max,
                              detector_xy=detector_xy))
    try:
        # a few groups of consecutive files per worker (balance), whatever nproc
        groups = np.array_split(np.arange(len(files)), min(len(files), 4 * max(nproc, 1)))
        results = fork_map(_read_files, [g for g in groups if g.size], nproc, shared,
                           while_waiting=while_reading)
        kept = np.concatenate([np.asarray(k, np.int64) for k, _ in results])
        voxel_keys = np.unique(np.concatenate([u for _, u in results]))
        if voxel_keys.size == 0:
            raise Sorry("no voxel observations within the resolution limits")
        n_obs = _compact_rows(shared, offsets, kept, ("keys", "image") + value_columns)
        shared["union"] = voxel_keys
        bounds = _row_ranges(n_obs, 8 * max(nproc, 1))
        fork_map(_compact_voxels, bounds, nproc, shared)
        voxel, image, signal, factor, variance = (
            shared[k][:n_obs] for k in ("voxel", "image", "signal", "factor", "variance"))
        detector = {k: shared[k][:n_obs] for k in ("detector_x", "detector_y") if k in shared}
    finally:
        shared.clear()  # frees the int64 keys
    voxel_grid = _unpack(voxel_keys)
    qmag = np.linalg.norm(grid.q_of(voxel_grid / np.array(ndiv)), axis=1)
    obs = ObservationSet(
        voxel=voxel,
        image=image,
        signal=signal,
        factor=factor,
        variance=variance,
        voxel_grid=voxel_grid,
        voxel_qmag=qmag,
        image_ids=np.array([int(m["still_id"]) for m in metadata], np.int64),
        # photons per count (the variance floor); a per-panel list: its mean
        image_gain=np.array([float(np.mean(m.get("gain", 1.0))) for m in metadata]),
        metadata=metadata,
        **detector,
    )
    logger.info(
        "Read %d voxel observations of %d voxels from %d images",
        obs.n_obs, obs.n_voxels, obs.n_images,
    )
    return obs


def _compact_rows(shared, offsets, kept, names):
    """Close the gaps left by rows dropped in the reading (resolution limits,
    W = 0) in the columns ``names``, in file order (a move only overwrites
    rows already moved). Returns the number of rows kept."""
    dest = 0
    for i, k in enumerate(kept):
        src = int(offsets[i])
        if src != dest:
            for name in names:
                column = shared[name]
                column[dest:dest + k] = column[src:src + k]
        dest += int(k)
    return dest


def _row_ranges(n, parts):
    edges = np.linspace(0, n, max(1, min(parts, n)) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
