"""Input checks of a run, before anything is written: image files, their
import, the processing mode, one detector type, the reference PDB and the
DIALS PHIL file of overrides. Bad input raises ``Sorry`` (one line)."""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
from pathlib import Path
from typing import Iterable

import iotbx.pdb
import iotbx.phil
from dxtbx.format.Registry import get_format_class_for_file
from dxtbx.model.experiment_list import ExperimentListFactory

from dials.array_family import flex
from dials.util import Sorry

from dials_diffuse import dials_programs
from dials_diffuse.processing import import_images

logger = logging.getLogger("dials.diffuse_process")


class Inputs:
    """Validated inputs: image paths, imported experiments, reference symmetry,
    DIALS overrides from ``dials_phil``. Started from DIALS' refined
    experiments (check_model_inputs), also the crystal ``models``, the
    ``images`` to extract when given apart (imported.expt, else None), the
    ``reflections`` for the Bragg masks (or None) and the ``model_files``
    (their paths: phase 1 is not run)."""

    def __init__(self, image_paths, experiments, reference_symmetry, dials_phil_scope, mode,
                 models=None, images=None, reflections=None, model_files=()):
        self.image_paths = image_paths
        self.experiments = experiments
        self.reference_symmetry = reference_symmetry
        self.dials_phil_scope = dials_phil_scope
        self.mode = mode
        self.models = models
        self.images = images
        self.reflections = reflections
        self.model_files = tuple(model_files)


def check_inputs(image_paths: Iterable, params) -> Inputs:
    """Check every input and import the images; raise ``Sorry`` (one line) on
    bad input. Nothing is written."""
    paths = [str(p) for p in image_paths]
    if not paths:
        raise Sorry("no images given: dials.diffuse_process image_0001.cbf [image_0002.cbf ...]")
    for p in paths:
        if not os.path.exists(p):
            raise Sorry(f"image file not found: {p}")
        if os.path.isdir(p):
            raise Sorry(f"{p} is a directory: give the image files")
    if len({os.path.realpath(p) for p in paths}) != len(paths):
        raise Sorry("the same image file is given more than once")
    _check_image_formats(paths)
    reference, dials_phil_scope = _check_options(params)
    experiments = _import(paths, params.processing.mode)
    mode = _choose_mode(experiments, params.processing.mode)
    _check_detectors(experiments)
    return Inputs(paths, experiments, reference, dials_phil_scope, mode)


def check_model_inputs(experiment_files, reflection_files, params) -> Inputs:
    """The inputs of a run that starts from DIALS' crystal models:
    ``refined.expt [imported.expt] [refined.refl]`` (as dials.diffuse_extract
    takes them). The first experiment list holds the crystals; the second,
    if given, the images to extract, each matched to its crystal; the
    reflections give the Bragg masks their spots and rotation profile
    widths. Raise ``Sorry`` (one line) on bad input; nothing is written."""
    if not experiment_files:
        raise Sorry("a reflection table needs the experiments it belongs to: "
                    "dials.diffuse_process refined.expt [imported.expt] [refined.refl]")
    if len(experiment_files) > 2:
        raise Sorry("at most two experiment lists: refined.expt [imported.expt]")
    if len(reflection_files) > 1:
        raise Sorry("at most one reflection table (e.g. refined.refl)")
    reference, dials_phil_scope = _check_options(params)
    models = _load_experiments(experiment_files[0])
    without_crystal = [i for i, e in enumerate(models) if e.crystal is None]
    if not len(models) or without_crystal:
        raise Sorry(f"{experiment_files[0]}: "
                    + (f"experiment {without_crystal[0]} has no crystal" if without_crystal
                       else "no experiments")
                    + " (give indexed or refined experiments first, e.g. refined.expt)")
    images = _load_experiments(experiment_files[1]) if len(experiment_files) > 1 else None
    reflections = _load_reflections(reflection_files[0]) if reflection_files else None
    experiments = images if images is not None else models
    if not len(experiments):
        raise Sorry(f"{experiment_files[-1]} contains no experiments")
    for path, expts in zip(experiment_files, (models, images)):
        no_images = [i for i, e in enumerate(expts or ()) if e.imageset is None]
        if no_images:
            raise Sorry(f"{path}: experiment {no_images[0]} has no images (imageset): give "
                        "experiments with their images (e.g. refined.expt from dials.refine)")
    paths = []
    for imageset in experiments.imagesets():
        paths.extend(imageset.get_path(k) for k in range(len(imageset)))
    mode = _choose_mode(experiments, params.processing.mode)
    _check_detectors(experiments)
    return Inputs(paths, experiments, reference, dials_phil_scope, mode, models=models,
                  images=images, reflections=reflections,
                  model_files=[*experiment_files, *reflection_files])


def _check_options(params):
    """The reference PDB's symmetry and the DIALS PHIL file (read), and the
    base directory (checked)."""
    reference = read_reference_symmetry(params.reference_pdb) if params.reference_pdb else None
    dials_phil_scope = read_dials_phil(params.dials_phil) if params.dials_phil else None
    if params.output.base_dir in (None, ""):
        raise Sorry("output.base_dir must be set")
    base = Path(params.output.base_dir)
    if base.exists() and not base.is_dir():
        raise Sorry(f"output.base_dir={base} exists and is not a directory")
    return reference, dials_phil_scope


def _load_experiments(path):
    if not os.path.isfile(path):
        raise Sorry(f"experiment list not found: {path}")
    try:
        return ExperimentListFactory.from_json_file(str(path), check_format=True)
    except Exception as e:
        lines = str(e).strip().splitlines()
        raise Sorry(f"{path} cannot be read as an experiment list with its images: "
                    f"{lines[-1] if lines else type(e).__name__}")


def _load_reflections(path):
    if not os.path.isfile(path):
        raise Sorry(f"reflection table not found: {path}")
    try:
        return flex.reflection_table.from_file(str(path))
    except Exception as e:
        lines = str(e).strip().splitlines()
        raise Sorry(f"{path} cannot be read as a reflection table: "
                    f"{lines[-1] if lines else type(e).__name__}")


def unreadable_image(experiments):
    """(path, error) of the first image whose pixels cannot be read, else None."""
    for imageset in experiments.imagesets():
        for k in range(len(imageset)):
            try:
                imageset.get_raw_data(k)
            except Exception as e:
                lines = str(e).strip().splitlines()
                return imageset.get_path(k), (lines[-1] if lines else type(e).__name__)
    return None


def _check_image_formats(paths):
    for p in paths:
        try:
            fmt = get_format_class_for_file(p)
        except Exception as e:  # unreadable file (permissions, broken compression)
            raise Sorry(f"cannot read {p}: {e}")
        if fmt is None:
            raise Sorry(f"{p} is not an image file that dxtbx can read")


def _import(paths, mode):
    convert = {"auto": None, "stills": True, "sequence": False}[mode]
    try:
        return import_images(paths, convert_to_stills=convert)
    except Sorry:
        raise
    except Exception as e:
        raise Sorry(f"cannot import the images: {type(e).__name__}: {e}")


def _choose_mode(experiments, requested):
    stills = [e.is_still() for e in experiments]
    if requested == "auto":
        if all(stills):
            return "stills"
        if not any(stills):
            return "sequence"
        raise Sorry(
            "the images mix stills (zero oscillation) and rotation images: process "
            "them separately or set processing.mode"
        )
    if requested == "stills" and not all(stills):
        raise Sorry("processing.mode=stills but some images import as rotation data")
    if requested == "sequence" and any(stills):
        raise Sorry("processing.mode=sequence but some images are stills")
    return requested


def _check_detectors(experiments):
    """One detector type for all images: the same panels and pixel grid
    (positions may differ, e.g. the distance)."""
    first = experiments[0].detector
    ref = [(p.get_image_size(), p.get_pixel_size()) for p in first]
    for e in experiments[1:]:
        det = e.detector
        if det is first:
            continue
        other = [(p.get_image_size(), p.get_pixel_size()) for p in det]
        if other != ref:
            raise Sorry(
                "the images come from different detectors "
                f"({len(ref)} panel(s) {ref[0][0]} vs {len(other)} panel(s) "
                f"{other[0][0]}, e.g. {path_of(experiments[0])} and {path_of(e)}): "
                "process them separately"
            )


def path_of(expt):
    try:
        return os.path.basename(expt.imageset.get_path(0))
    except Exception:
        return "?"


def read_reference_symmetry(path):
    """cctbx crystal.symmetry from the CRYST1 record of a PDB (or mmCIF) file."""
    if not os.path.isfile(path):
        raise Sorry(f"reference_pdb not found: {path}")
    try:
        with capture_stdout():
            pdb_in = iotbx.pdb.input(file_name=str(path))
            symmetry = pdb_in.crystal_symmetry()
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise Sorry(f"reference_pdb {path} cannot be read: {msg[0] if msg else type(e).__name__}")
    if (
        symmetry is None
        or symmetry.unit_cell() is None
        or symmetry.space_group_info() is None
    ):
        raise Sorry(f"reference_pdb {path} has no unit cell and space group (CRYST1 record)")
    return symmetry


def read_dials_phil(path):
    """A DIALS PHIL file of spotfinder/indexing/refinement overrides; every
    definition must be known to dials.find_spots, dials.index or dials.refine."""
    fs, ix, rf = dials_programs.find_spots_phil, dials_programs.index_phil, dials_programs.refine_phil

    if not os.path.isfile(path):
        raise Sorry(f"dials_phil not found: {path}")
    try:
        scope = iotbx.phil.parse(file_name=str(path))
    except Exception as e:
        raise Sorry(f"dials_phil {path} is not a PHIL file: {e}")
    unused_everywhere = None
    for master in (fs, ix, rf):
        _, unused = master.fetch(source=scope, track_unused_definitions=True)
        names = {u.path for u in unused}
        unused_everywhere = names if unused_everywhere is None else unused_everywhere & names
    if unused_everywhere:
        raise Sorry(
            f"dials_phil {path}: not a dials.find_spots/index/refine parameter: "
            + ", ".join(sorted(unused_everywhere))
        )
    return scope


@contextlib.contextmanager
def capture_stdout():
    """Collect what DIALS/xfel code prints (the stills mosaicity fit prints per
    candidate) and log it at debug level."""
    buffer = _io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            logger.debug(text)

