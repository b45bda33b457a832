"""Planning an extraction: which images, matched to which crystal model
(:class:`ImageTask`), their exposure times and raw pixels, the run's
parameter checks and the background map."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, List, Optional

import numpy as np
from dxtbx import flumpy

from dials.util import Sorry

from dials_diffuse import bragg, geometry, io
from dials_diffuse.phil_scopes import check_grid_params

logger = logging.getLogger("dials.diffuse_extract")


@dataclasses.dataclass
class ImageTask:
    """One image to extract and the experiment that models it."""

    still_id: int  # scale-group id: experiment index for stills, image number for sequences
    experiment_id: int
    experiment: object
    imageset: object
    index_in_imageset: int  # index for imageset.get_raw_data
    frame: Optional[int]  # rotation: absolute array index (geometry.absolute_frame), else None
    image_path: str
    # rotation: the profile widths of the Bragg mask (bragg.profile_widths)
    bragg_widths: Optional[bragg.ProfileWidths] = None


def plan_tasks(models, images=None) -> (List[ImageTask], List[dict]):
    """Match each image to its crystal model.

    ``models``: experiments with crystals (refined.expt). ``images``: optional
    experiments whose images are to be extracted (imported.expt); images that
    no model covers are reported as skipped. Returns (tasks, skipped entries).
    """
    for i, expt in enumerate(models):
        if expt.crystal is None:
            raise Sorry(f"experiment {i} of the models has no crystal: index it first")
        if expt.imageset is None:
            raise Sorry(f"experiment {i} of the models has no images")
    tasks: List[ImageTask] = []
    by_path: Dict[tuple, tuple] = {}
    running = 0
    for expt_id, expt in enumerate(models):
        imageset = expt.imageset
        if expt.is_still() or expt.scan is None:
            # a still experiment names one image of its imageset
            indices = list(range(len(imageset))) if len(imageset) == 1 else [0]
            if expt.scan is not None and len(imageset) > 1:
                indices = [expt.scan.get_array_range()[0]]
            for k in indices:
                path = imageset.get_path(k)
                task = ImageTask(expt_id, expt_id, expt, imageset, k, None, path)
                by_path[(os.path.realpath(path), _frame(imageset, k))] = task
                tasks.append(task)
        else:
            first, last = expt.scan.get_array_range()
            for k in range(last - first):
                path = imageset.get_path(k)
                task = ImageTask(running, expt_id, expt, imageset, k,
                                 geometry.absolute_frame(expt.scan, k), path)
                by_path[(os.path.realpath(path), _frame(imageset, k))] = task
                tasks.append(task)
                running += 1
    if any(not t.experiment.is_still() for t in tasks) and any(
        t.experiment.is_still() for t in tasks
    ):
        raise Sorry("the models mix stills and rotation sequences: extract them separately")
    if tasks and all(t.experiment.is_still() for t in tasks):
        for t in tasks:
            t.still_id = t.experiment_id
    skipped = []
    if images is not None:
        wanted = []
        for imageset in images.imagesets():
            for k in range(len(imageset)):
                key = (os.path.realpath(imageset.get_path(k)), _frame(imageset, k))
                if key in by_path:
                    wanted.append(by_path[key])
                else:
                    skipped.append(
                        {
                            "image_path": imageset.get_path(k),
                            "image_index": k,
                            "status": "skipped",
                            "reason": "no crystal model for this image (not indexed)",
                        }
                    )
        seen = set()
        tasks = [t for t in wanted if not (id(t) in seen or seen.add(id(t)))]
    return tasks, skipped


def _frame(imageset, k):
    """Frame of image k within its file: its index in a multi-image file
    (HDF5), 0 for one image per file, so that the same file matches however
    the images were imported (a subset, image_range=)."""
    try:
        if not imageset.reader().is_single_file_reader():
            return 0
        return imageset.indices()[k]
    except Exception:
        return k


def _header_scan(imageset, index):
    try:
        kwargs = imageset.params() if hasattr(imageset, "params") else {}
        fmt = imageset.get_format_class().get_instance(imageset.get_path(index), **kwargs)
        return fmt.get_scan()
    except Exception:
        return None


def read_image(task: ImageTask):
    """Raw counts per panel as numpy arrays (slow, fast), in the file's dtype."""
    try:
        raw = task.imageset.get_raw_data(task.index_in_imageset)
    except Exception as e:
        raise ImageError(f"cannot read {task.image_path}: {e}")
    if not isinstance(raw, tuple):
        raw = (raw,)
    detector = task.experiment.detector
    if len(raw) != len(detector):
        raise ImageError(
            f"{task.image_path} has {len(raw)} panels, the detector {len(detector)}"
        )
    arrays = []
    for i, (data, panel) in enumerate(zip(raw, detector)):
        a = flumpy.to_numpy(data)  # zero-copy view of the flex array
        if a.shape != tuple(reversed(panel.get_image_size())):
            raise ImageError(
                f"{task.image_path} panel {i} has shape {a.shape}, the detector "
                f"{tuple(reversed(panel.get_image_size()))}"
            )
        arrays.append(a)
    return arrays


class ImageError(Exception):
    """A single image cannot be used (reported and skipped)."""


def exposure_time(task: ImageTask, params) -> float:
    """PHIL override, else the scan's, else the image header's, else 1 s."""
    if params.corrections.exposure_time is not None:
        return params.corrections.exposure_time
    scan = task.experiment.scan
    k = task.index_in_imageset if task.frame is not None else 0
    if scan is None:
        # stills lose their one-image scan on import: ask the image header
        scan = _header_scan(task.imageset, task.index_in_imageset)
        k = 0
    if scan is not None:
        times = scan.get_exposure_times()
        if len(times) > k and times[k] > 0:
            return float(times[k])
    return 1.0


def check_params(params):
    f = params.filter
    if f.pixel_step is None or f.pixel_step < 1:
        raise Sorry(f"filter.pixel_step={f.pixel_step}: must be 1 or more")
    if f.d_min is not None and f.d_max is not None and f.d_min >= f.d_max:
        raise Sorry(f"filter.d_min={f.d_min} must be smaller than filter.d_max={f.d_max}")
    if (
        f.min_intensity is not None
        and f.max_intensity is not None
        and f.min_intensity >= f.max_intensity
    ):
        raise Sorry("filter.min_intensity must be smaller than filter.max_intensity")
    c = params.corrections
    if c.gain is not None and not c.gain > 0:
        raise Sorry(f"corrections.gain={c.gain}: must be positive")
    if c.exposure_time is not None and not c.exposure_time > 0:
        raise Sorry(f"corrections.exposure_time={c.exposure_time}: must be positive")
    if c.air_temperature is None or c.air_temperature <= 0:
        raise Sorry(f"corrections.air_temperature={c.air_temperature}: must be > 0 K")
    if c.air_pressure is None or c.air_pressure < 0:
        raise Sorry(f"corrections.air_pressure={c.air_pressure}: must be >= 0 atm")
    b = params.masking.bragg
    if b.spot_radius is None or b.spot_radius < 0 or b.border is None or b.border < 0:
        raise Sorry("masking.bragg.spot_radius and masking.bragg.border must be >= 0")
    return check_grid_params(params.grid)


def load_background(params, detector):
    """The background to subtract, per panel (numpy (slow, fast)) or a constant."""
    bg = params.corrections.background
    if bg.map is None:
        if bg.constant is not None and not np.isfinite(bg.constant):
            raise Sorry(f"corrections.background.constant={bg.constant} is not finite")
        return None
    path = bg.map
    if not os.path.isfile(path):
        raise Sorry(f"background map {path} does not exist")
    panels = io.read_background_map(path)
    if len(panels) != len(detector):
        raise Sorry(
            f"background map {path} has {len(panels)} panels, the detector {len(detector)}"
        )
    for i, (data, panel) in enumerate(zip(panels, detector)):
        expected = tuple(reversed(panel.get_image_size()))
        if data.shape != expected:
            raise Sorry(
                f"background map {path} panel {i} has shape {data.shape}, "
                f"the detector panel {expected} (slow, fast)"
            )
    return panels
