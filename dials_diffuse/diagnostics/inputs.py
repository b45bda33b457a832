"""What the diagnostics were given: classification of the positional arguments
(and the input.* PHIL paths), the choice of mode, and the loaders of masks,
background maps and raw images.

Mode: ``merged`` when a dials.diffuse_merge output directory (or its
voxel_data_relative.npz) is given; otherwise ``extraction`` when a per-image
extraction file or an extraction directory is given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import zipfile
from typing import List, Optional

import numpy as np

from dials.util import Sorry

from dials_diffuse import diffuse_files, merged_files
from dxtbx import flumpy
import dxtbx

logger = logging.getLogger("dials.diffuse_check")

MASK_KINDS = ("pixel", "bragg", "total")


@dataclasses.dataclass
class Inputs:
    mode: Optional[str] = None  # "extraction" or "merged"
    extraction_file: Optional[str] = None
    extraction_dir: Optional[str] = None
    merged_dir: Optional[str] = None
    masks: dict = dataclasses.field(default_factory=dict)  # kind -> path
    background_map: Optional[str] = None
    manifest: Optional[dict] = None


def _npz_keys(path) -> List[str]:
    if not zipfile.is_zipfile(path):
        raise Sorry(f"{path} is not an NPZ file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise Sorry(f"{path} cannot be read as an NPZ file: {e}")


def mask_kind(path) -> Optional[str]:
    """pixel, bragg or total from a mask file name (pixel_mask_000000.pickle...)."""
    base = os.path.basename(path).lower()
    for kind in MASK_KINDS:
        if base.startswith(kind) or f"{kind}_mask" in base or f"{kind}_diffuse_mask" in base:
            return kind
    if "global_pixel" in base:
        return "pixel"
    return None


def classify(paths: List[str], phil_input=None) -> Inputs:
    """Sort the positional arguments; one-line Sorry for anything unusable."""
    found = Inputs()
    extraction_files = []
    for path in paths:
        if not os.path.exists(path):
            raise Sorry(f"file not found: {path}")
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, merged_files.GRID_NAME)) or os.path.isfile(
                os.path.join(path, merged_files.VOXEL_NAME)
            ):
                _set_once(found, "merged_dir", path)
            elif os.path.isfile(os.path.join(path, diffuse_files.MANIFEST_NAME)):
                _set_once(found, "extraction_dir", path)
            else:
                raise Sorry(
                    f"{path} is neither a dials.diffuse_merge nor a dials.diffuse_extract "
                    "output directory"
                )
            continue
        lower = path.lower()
        if lower.endswith(".npz"):
            keys = _npz_keys(path)
            if "metadata_json" in keys and "voxel_indices" in keys:
                extraction_files.append(path)
            elif "I_merged_relative" in keys:
                _set_once(found, "merged_dir", os.path.dirname(os.path.abspath(path)))
            else:
                raise Sorry(f"{path} is neither a dials.diffuse_extract nor a "
                            "dials.diffuse_merge NPZ file")
        elif lower.endswith(".pickle") or lower.endswith(".pkl"):
            kind = mask_kind(path)
            if kind is None:
                raise Sorry(f"cannot tell which mask {path} is: name it pixel_mask_*, "
                            "bragg_mask_* or total_mask_* or use input.*_mask=")
            found.masks[kind] = path
        elif lower.endswith(".npy"):
            _set_once(found, "background_map", path)
        elif os.path.basename(path) == diffuse_files.MANIFEST_NAME:
            _set_once(found, "extraction_dir", os.path.dirname(os.path.abspath(path)))
        else:
            raise Sorry(
                f"cannot use {path}: not experiments, an extraction file or directory, "
                "a merge directory, a mask pickle or a background map (.npy)"
            )
    if phil_input is not None:
        for kind in MASK_KINDS:
            value = getattr(phil_input, f"{kind}_mask")
            if value:
                if not os.path.isfile(value):
                    raise Sorry(f"input.{kind}_mask: file not found: {value}")
                found.masks[kind] = value
        if phil_input.background_map:
            if not os.path.isfile(phil_input.background_map):
                raise Sorry(f"input.background_map: file not found: {phil_input.background_map}")
            found.background_map = phil_input.background_map
    if len(extraction_files) > 1:
        raise Sorry(
            f"{len(extraction_files)} extraction files given: name one, or give the "
            "extraction directory and choose with image=<still id>"
        )
    if extraction_files:
        found.extraction_file = extraction_files[0]
    if found.merged_dir:
        found.mode = "merged"
    elif found.extraction_file or found.extraction_dir:
        found.mode = "extraction"
    return found


def _set_once(found, name, value):
    current = getattr(found, name)
    if current is not None and os.path.abspath(current) != os.path.abspath(value):
        raise Sorry(f"two inputs for the same role: {current} and {value}")
    setattr(found, name, value)


def choose_extraction_file(found: Inputs, image: Optional[int]) -> str:
    """The per-image file to diagnose (from a directory: image=<still id>, default first)."""
    if found.extraction_file:
        if image is not None:
            logger.info("image=%d ignored: an extraction file was named", image)
        return found.extraction_file
    manifest = diffuse_files.read_manifest(found.extraction_dir)
    found.manifest = manifest
    extracted = [e for e in manifest.get("images", []) if e.get("status") == "extracted"]
    if not extracted:
        raise Sorry(f"{found.extraction_dir}: the manifest lists no extracted image")
    if image is None:
        entry = extracted[0]
    else:
        matches = [e for e in extracted if int(e["still_id"]) == image]
        if not matches:
            ids = ", ".join(str(e["still_id"]) for e in extracted[:20])
            raise Sorry(f"image={image} was not extracted in {found.extraction_dir} "
                        f"(extracted still ids: {ids}{' ...' if len(extracted) > 20 else ''})")
        entry = matches[0]
    return os.path.join(found.extraction_dir, entry["file"])


def find_masks_beside(npz_path: str, still_id: int, masks: dict) -> dict:
    """Mask pickles written by output.masks=True next to the extraction file."""
    out = dict(masks)
    directory = os.path.dirname(os.path.abspath(npz_path))
    for kind in MASK_KINDS:
        if kind in out:
            continue
        candidate = os.path.join(directory, diffuse_files.mask_file_name(kind, still_id))
        if os.path.isfile(candidate):
            out[kind] = candidate
            logger.info("Using the %s mask %s", kind, candidate)
    return out


def load_mask(path: str, kind: str) -> List[np.ndarray]:
    """A DIALS mask pickle (tuple of flex.bool per panel, True = use) as numpy."""

    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
    except Exception as e:
        raise Sorry(f"{kind} mask {path} cannot be read as a pickle: {e}")
    objs = obj if isinstance(obj, (tuple, list)) else (obj,)
    try:
        panels = [np.asarray(p if isinstance(p, np.ndarray) else flumpy.to_numpy(p)).astype(bool)
                  for p in objs]
    except Exception as e:
        raise Sorry(f"{kind} mask {path} is not a tuple of per-panel boolean masks: {e}")
    if any(p.ndim != 2 for p in panels):
        raise Sorry(f"{kind} mask {path} is not a tuple of 2-D per-panel masks")
    return panels


def check_panel_shapes(panels, shapes, what) -> Optional[str]:
    """None if the per-panel arrays match the detector shapes, else why not."""
    if shapes is None:
        return None
    if len(panels) != len(shapes):
        return f"{what} has {len(panels)} panels, the detector {len(shapes)}"
    for i, (p, s) in enumerate(zip(panels, shapes)):
        if tuple(p.shape) != tuple(s):
            return f"{what} panel {i} has shape {p.shape}, the detector {tuple(s)}"
    return None


def read_raw_image(metadata: dict, experiments=None):
    """(list of per-panel float arrays (slow, fast), description) or (None, reason).

    The image is the one named by the extraction metadata: experiment
    ``experiment_id``, image ``image_index`` of its imageset when experiments
    are given, else the file ``image_path``.
    """

    path, frame = metadata.get("image_path"), None
    if experiments is not None:
        eid = int(metadata.get("experiment_id", 0))
        if eid >= len(experiments):
            return None, (f"the extraction file refers to experiment {eid}, the experiments "
                          f"have {len(experiments)}")
        iset = experiments[eid].imageset
        k = int(metadata.get("image_index", 0))
        try:
            if iset is not None and k < len(iset):
                path = iset.get_path(k)
                frame = iset.indices()[k]
        except Exception:
            pass
    if not path:
        return None, "no image path in the extraction metadata"
    if not os.path.isfile(path):
        return None, f"raw image {path} not found"
    try:
        fmt = dxtbx.load(path)
        try:
            n_images = fmt.get_num_images()
        except Exception:
            n_images = 1
        raw = fmt.get_raw_data(frame or 0) if n_images > 1 else fmt.get_raw_data()
    except Exception as e:
        return None, f"cannot read raw image {path}: {e}"
    if not isinstance(raw, tuple):
        raw = (raw,)
    arrays = [flumpy.to_numpy(r).astype(np.float64) for r in raw]
    desc = f"{path} frame {frame or 0}" if n_images > 1 else path
    return arrays, desc


def read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise Sorry(f"cannot read {path}: {e}")
