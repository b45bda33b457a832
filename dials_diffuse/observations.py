"""Voxel observations of a whole run, read from the per-image extraction files.

Each observation is one (image, voxel) pair with the sums written by the
extraction: S (signal), W (correction factor), V (variance of S). Voxels are
mapped to the asymmetric unit (``symmetry.map_to_asu``) and given a compact
index into the list of observed voxels, so that every per-voxel array of the
merge has the size of the observed grid, not of the bounding box.

Memory: the compact per-observation columns are kept in memory (about 26 bytes
per observation, 2.6 GB for 10^8); the reading itself streams one file at a
time.
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
    signal: np.ndarray  # float64 S
    factor: np.ndarray  # float64 W
    variance: np.ndarray  # float64 V
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


def load_observations(files, grid, operators, d_min=None, d_max=None) -> ObservationSet:
    """Read every file, check it belongs to this grid, map voxels to the ASU."""
    ndiv = np.array(grid.ndiv)
    per_image = []
    metadata = []
    ids = []
    gains = []
    for path in files:
        arrays, meta = read_image_file(path)
        if list(meta.get("ndiv", [])) != list(grid.ndiv):
            raise Sorry(
                f"{path} was extracted with grid ndiv {meta.get('ndiv')}, "
                f"this merge uses {list(grid.ndiv)}: files from another grid"
            )
        keep = np.ones(len(arrays["voxel_indices"]), bool)
        if d_min is not None or d_max is not None:
            q = arrays["voxel_mean_qmag"]
            if d_min is not None:
                keep &= q <= 1.0 / d_min
            if d_max is not None:
                keep &= q >= 1.0 / d_max
        keep &= arrays["voxel_sum_factor"] > 0
        asu = symmetry.map_to_asu(arrays["voxel_indices"][keep], ndiv, operators)
        per_image.append(
            (
                asu.astype(np.int64),
                arrays["voxel_sum_signal"][keep].astype(np.float64),
                arrays["voxel_sum_factor"][keep].astype(np.float64),
                arrays["voxel_sum_variance"][keep].astype(np.float64),
                arrays["voxel_n_pixels"][keep].astype(np.int32),
            )
        )
        metadata.append(meta)
        ids.append(int(meta["still_id"]))
        gains.append(float(meta.get("gain", 1.0)))
    if len(set(ids)) != len(ids):
        raise Sorry("two extraction files have the same still_id: inputs overlap")
    all_grid = np.concatenate([p[0] for p in per_image])
    if all_grid.size == 0:
        raise Sorry("no voxel observations within the resolution limits")
    lower = all_grid.min(axis=0)
    extent = all_grid.max(axis=0) - lower + 1
    keys = ((all_grid[:, 0] - lower[0]) * extent[1] + (all_grid[:, 1] - lower[1])) * extent[2] + (
        all_grid[:, 2] - lower[2]
    )
    unique_keys, voxel = np.unique(keys, return_inverse=True)
    gl = unique_keys % extent[2]
    rest = unique_keys // extent[2]
    voxel_grid = (np.stack([rest // extent[1], rest % extent[1], gl], axis=1) + lower).astype(np.int32)
    image = np.concatenate(
        [np.full(len(p[0]), i, np.int32) for i, p in enumerate(per_image)]
    )
    hkl = voxel_grid / ndiv
    qmag = np.linalg.norm(grid.q_of(hkl), axis=1)
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(order, np.arange(len(ids))):
        # order images by still id so that results do not depend on file order
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        image = rank[image].astype(np.int32)
        metadata = [metadata[i] for i in order]
        ids = [ids[i] for i in order]
        gains = [gains[i] for i in order]
    obs = ObservationSet(
        voxel=voxel.astype(np.int32),
        image=image,
        signal=np.concatenate([p[1] for p in per_image]),
        factor=np.concatenate([p[2] for p in per_image]),
        variance=np.concatenate([p[3] for p in per_image]),
        n_pixels=np.concatenate([p[4] for p in per_image]),
        voxel_grid=voxel_grid,
        voxel_qmag=qmag,
        image_ids=np.array(ids, np.int64),
        image_gain=np.array(gains),
        metadata=metadata,
    )
    # a deterministic observation order (by image then voxel) whatever the file order
    sort = np.lexsort((obs.voxel, obs.image))
    for name in ("voxel", "image", "signal", "factor", "variance", "n_pixels"):
        setattr(obs, name, getattr(obs, name)[sort])
    logger.info(
        "Read %d voxel observations of %d voxels from %d images",
        obs.n_obs, obs.n_voxels, obs.n_images,
    )
    return obs
