"""Voxel observations of a whole run, read from the per-image extraction files.

Each observation is one (image, voxel) pair with the sums written by the
extraction: S (signal), W (correction factor), V (variance of S). Voxels are
mapped to the asymmetric unit (``symmetry.map_to_asu``) and given a compact
index into the list of observed voxels, so that every per-voxel array of the
merge has the size of the observed grid, not of the bounding box.

Memory: the compact per-observation columns are kept in memory (24 bytes per
observation, 2.4 GB for 10^8); the reading streams one file at a time and the
scaling passes work in chunks, so temporaries stay small.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import List

import numpy as np

from dials.util import Sorry

from dials_diffuse import symmetry
from dials_diffuse.diffuse_files import (
    MANIFEST_NAME,
    read_image_file,
    read_manifest,
)

logger = logging.getLogger("dials.diffuse_merge")


@dataclasses.dataclass
class ObservationSet:
    """Observations of a run, as flat columns (one row per image-voxel pair)."""

    voxel: np.ndarray  # int32 compact voxel index
    image: np.ndarray  # int32 index into image_ids
    signal: np.ndarray  # float32 S (per-image sums; merging accumulates in float64)
    factor: np.ndarray  # float32 W
    variance: np.ndarray  # float32 V
    n_pixels: np.ndarray  # int32
    voxel_grid: np.ndarray  # (n_voxels, 3) int32 ASU grid indices of compact voxels
    voxel_qmag: np.ndarray  # (n_voxels,) |q| of the voxel centre, 1/Angstrom
    image_ids: np.ndarray  # still id of each image
    image_gain: np.ndarray  # gain of each image (photons per count)
    metadata: List[dict]

    @property
    def n_obs(self):
        return self.voxel.size

    @property
    def n_voxels(self):
        return len(self.voxel_grid)

    @property
    def n_images(self):
        return self.image_ids.size


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


def read_one(path, ndiv, operators, d_min=None, d_max=None):
    """One extraction file as (ASU keys, S, W, V, n_pixels, metadata)."""
    arrays, meta = read_image_file(path)
    if list(meta.get("ndiv", [])) != list(ndiv):
        raise Sorry(
            f"{path} was extracted with grid ndiv {meta.get('ndiv')}, "
            f"this merge uses {list(ndiv)}: files from another grid"
        )
    keep = np.ones(len(arrays["voxel_indices"]), bool)
    if d_min is not None or d_max is not None:
        q = arrays["voxel_mean_qmag"]
        if d_min is not None:
            keep &= q <= 1.0 / d_min
        if d_max is not None:
            keep &= q >= 1.0 / d_max
    keep &= arrays["voxel_sum_factor"] > 0
    g = arrays["voxel_indices"][keep]
    if g.size and np.abs(g).max() >= _KEY_OFFSET:
        raise Sorry(f"{path}: voxel indices beyond +-{_KEY_OFFSET}: grid too fine")
    return (
        _pack(symmetry.map_to_asu(g, np.asarray(ndiv), operators)),
        arrays["voxel_sum_signal"][keep].astype(np.float32),
        arrays["voxel_sum_factor"][keep].astype(np.float32),
        arrays["voxel_sum_variance"][keep].astype(np.float32),
        arrays["voxel_n_pixels"][keep].astype(np.int32),
        meta,
    )


_READ_ARGS = {}


def _forked_read(path):
    try:
        return read_one(path, **_READ_ARGS)
    except Sorry as e:
        # Sorry does not pickle across processes: hand the message back
        return ("sorry", str(e))


def _read_all(files, ndiv, operators, d_min, d_max, nproc):
    """Results of read_one for every file, in file order (forked workers when
    nproc > 1: reading and the ASU mapping are per file)."""
    kwargs = dict(ndiv=tuple(ndiv), operators=operators, d_min=d_min, d_max=d_max)
    if nproc <= 1 or len(files) < 2:
        for path in files:
            yield read_one(path, **kwargs)
        return
    import concurrent.futures
    import multiprocessing

    _READ_ARGS.update(kwargs)
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=nproc, mp_context=multiprocessing.get_context("fork")
        ) as pool:
            for result in pool.map(_forked_read, files, chunksize=4):
                if len(result) == 2 and result[0] == "sorry":
                    raise Sorry(result[1])
                yield result
    finally:
        _READ_ARGS.clear()


def load_observations(files, grid, operators, d_min=None, d_max=None, nproc=1) -> ObservationSet:
    """Read every file, check it belongs to this grid, map voxels to the ASU.

    Files are read one at a time (by ``nproc`` forked workers); the observed
    voxels are collected as a sorted union of keys, and each observation keeps
    only a compact int32 voxel index and float32 sums (24 bytes per
    observation in all).
    """
    ndiv = np.array(grid.ndiv)
    per_image = []
    metadata = []
    ids = []
    gains = []
    voxel_keys = np.zeros(0, np.int64)
    pending, n_pending = [], 0  # keys not yet in the union (merged in batches)
    for keys, signal, factor, variance, npix, meta in _read_all(
        files, grid.ndiv, operators, d_min, d_max, nproc
    ):
        pending.append(keys)
        n_pending += keys.size
        if n_pending > 10_000_000:
            voxel_keys = np.union1d(voxel_keys, np.concatenate(pending))
            pending, n_pending = [], 0
        per_image.append((keys, signal, factor, variance, npix))
        metadata.append(meta)
        ids.append(int(meta["still_id"]))
        gains.append(float(meta.get("gain", 1.0)))
    if pending:
        voxel_keys = np.union1d(voxel_keys, np.concatenate(pending))
    if len(set(ids)) != len(ids):
        raise Sorry("two extraction files have the same still_id: inputs overlap")
    if voxel_keys.size == 0:
        raise Sorry("no voxel observations within the resolution limits")
    # images in still-id order, whatever the order of the files
    order = np.argsort(ids, kind="stable")
    per_image = [per_image[i] for i in order]
    metadata = [metadata[i] for i in order]
    ids = [ids[i] for i in order]
    gains = [gains[i] for i in order]
    n_obs = sum(len(p[0]) for p in per_image)
    voxel = np.empty(n_obs, np.int32)
    image = np.empty(n_obs, np.int32)
    columns = [np.empty(n_obs, np.float32) for _ in range(3)]
    n_pixels = np.empty(n_obs, np.int32)
    start = 0
    for i, (keys, signal, factor, variance, npix) in enumerate(per_image):
        # within an image, rows sorted by voxel: a deterministic order
        rows = np.argsort(keys, kind="stable")
        sl = slice(start, start + len(keys))
        voxel[sl] = np.searchsorted(voxel_keys, keys[rows])
        image[sl] = i
        for column, values in zip(columns, (signal, factor, variance)):
            column[sl] = values[rows]
        n_pixels[sl] = npix[rows]
        start += len(keys)
        per_image[i] = None  # free as we go
    voxel_grid = _unpack(voxel_keys)
    qmag = np.linalg.norm(grid.q_of(voxel_grid / ndiv), axis=1)
    obs = ObservationSet(
        voxel=voxel,
        image=image,
        signal=columns[0],
        factor=columns[1],
        variance=columns[2],
        n_pixels=n_pixels,
        voxel_grid=voxel_grid,
        voxel_qmag=qmag,
        image_ids=np.array(ids, np.int64),
        image_gain=np.array(gains),
        metadata=metadata,
    )
    logger.info(
        "Read %d voxel observations of %d voxels from %d images",
        obs.n_obs, obs.n_voxels, obs.n_images,
    )
    return obs
