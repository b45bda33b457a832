"""The per-image extraction file (NPZ) and its manifest: the one module that
writes, reads and validates them.

Each ``image_<still_id>.npz`` holds
* voxel observations on the fractional-hkl grid (always):
  ``voxel_indices`` (m, 3) int32 grid indices (P1, not symmetry-mapped),
  ``voxel_sum_signal`` sum of (counts * gain - background),
  ``voxel_sum_factor`` sum of P * Omega * eta * T_air * exposure,
  ``voxel_sum_variance`` sum of gain^2 * counts,
  ``voxel_n_pixels``, ``voxel_mean_qmag`` (1/Angstrom), ``voxel_mean_hkl`` (m, 3),
  ``voxel_mean_xy`` (m, 2) where the voxel's mean scattering vector meets
  the detector plane, in mm (panel 0's fast and slow axes from its origin;
  files of earlier versions lack it);
  the voxel's corrected intensity is sum_signal / sum_factor;
* per-pixel arrays (output.save_pixels: every kept pixel, a grid sample, or none), float32:
  ``q_vectors`` (n, 3), ``intensities``, ``sigmas``, ``hkl`` (n, 3),
  ``original_panel_ids``, ``original_fast_coords``, ``original_slow_coords``;
* ``sample_*``: a few hundred pixels with raw counts and every correction factor;
* ``metadata_json``: still_id, experiment_id, image path and index (place in
  the image set), frame (rotation: absolute array index), wavelength,
  ndiv, corrections applied, pixel counts at each masking stage.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from dials.util import Sorry

from dials_diffuse import io
from dials_diffuse.geometry import absolute_frame

MANIFEST_NAME = "extraction_manifest.json"
VOXEL_KEYS = (
    "voxel_indices",
    "voxel_sum_signal",
    "voxel_sum_factor",
    "voxel_sum_variance",
    "voxel_n_pixels",
    "voxel_mean_qmag",
    "voxel_mean_hkl",
)
#: voxel arrays files written by earlier versions may lack
OPTIONAL_VOXEL_KEYS = ("voxel_mean_xy",)
PIXEL_KEYS = (
    "q_vectors",
    "intensities",
    "sigmas",
    "hkl",
    "original_panel_ids",
    "original_fast_coords",
    "original_slow_coords",
)


def image_file_name(still_id: int) -> str:
    return f"image_{still_id:06d}.npz"


def mask_file_name(kind: str, still_id: int) -> str:
    """kind: pixel, bragg or total."""
    return f"{kind}_mask_{still_id:06d}.pickle"


def write_image_file(path, arrays: dict, metadata: dict) -> None:
    # fast deflate of the per-pixel integer arrays (coordinates and panel ids
    # shrink 3-5x); float arrays and the per-voxel sums are stored: deflating
    # the voxel indices and pixel counts took 15 of the 20 ms a Pilatus 6M
    # image's file took to write, for 0.8 of its 3.4 MB
    io.write_npz(path, compress_level=1, deflate_floats=False,
                 stored=[name for name in arrays if name.startswith("voxel_")],
                 metadata_json=np.array(json.dumps(metadata)), **arrays)


def read_image_file(path, keys=VOXEL_KEYS, require=VOXEL_KEYS):
    """(arrays dict, metadata dict) of one extraction file, validated.

    Raises Sorry naming the file when it is not an extraction file, misses a
    required key, or has arrays of unequal length.
    """
    if not os.path.isfile(path):
        raise Sorry(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        raise Sorry(f"{path} is not an NPZ file: not a dials.diffuse_extract file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            missing = [k for k in tuple(require) + ("metadata_json",) if k not in names]
            if missing:
                raise Sorry(f"{path} is missing {', '.join(missing)}: not a dials.diffuse_extract file")
            metadata = json.loads(str(npz["metadata_json"]))
            arrays = {k: npz[k] for k in keys if k in names}
    except Sorry:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise Sorry(f"{path} cannot be read as an extraction file: {e}")
    _check_lengths(path, arrays, VOXEL_KEYS + OPTIONAL_VOXEL_KEYS)
    _check_lengths(path, arrays, PIXEL_KEYS)
    return arrays, metadata


def _check_lengths(path, arrays, group):
    lengths = {k: len(arrays[k]) for k in group if k in arrays}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise Sorry(f"{path} has arrays of unequal length ({detail})")
    for k in ("voxel_indices", "voxel_mean_hkl", "q_vectors", "hkl"):
        if k in arrays and (arrays[k].ndim != 2 or arrays[k].shape[1] != 3):
            raise Sorry(f"{path}: {k} has shape {arrays[k].shape}, expected (n, 3)")
    if "voxel_mean_xy" in arrays and (arrays["voxel_mean_xy"].ndim != 2
                                      or arrays["voxel_mean_xy"].shape[1] != 2):
        raise Sorry(f"{path}: voxel_mean_xy has shape {arrays['voxel_mean_xy'].shape}, "
                    "expected (n, 2)")


def image_frame(metadata: dict, experiment):
    """The absolute frame (array index) of a rotation image's extraction
    metadata, None for a still. Files written before the metadata carried
    ``frame`` hold the image's place in the scan as ``image_index``."""
    if metadata.get("is_still", True) or experiment.scan is None:
        return None
    if metadata.get("frame") is not None:
        return int(metadata["frame"])
    return absolute_frame(experiment.scan, int(metadata["image_index"]))


def read_manifest(directory):
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise Sorry(f"{directory} has no {MANIFEST_NAME}: not a dials.diffuse_extract output directory (or the run did not finish)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise Sorry(f"{path} cannot be read: {e}")
