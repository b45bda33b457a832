"""Import (images -> ExperimentList, zero-oscillation images as stills) and
spot finding (``dials.find_spots`` without files)."""

from __future__ import annotations

import logging
from typing import Iterable

from dxtbx.imageset import ImageSequence, ImageSetFactory
from dxtbx.model import Experiment
from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

from dials.algorithms.shoebox import MaskCode
from dials.array_family import flex
from dials.util.multi_dataset_handling import generate_experiment_identifiers

from dials_diffuse import dials_programs
from dials_diffuse.processing.params import DEFAULT_STILLS_SPOTFINDING, make_params

logger = logging.getLogger("dials.diffuse_process")


# --------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------
def import_images(paths: Iterable, convert_to_stills: bool | None = None):
    """Import image files into an ``ExperimentList``.

    ``convert_to_stills=None`` (default) converts sequences whose scan has zero
    oscillation width into stills, one experiment per image with its own
    single-image imageset and no scan or goniometer (what ``dials.import
    convert_sequences_to_stills=True`` does); rotation sequences stay one
    experiment per sequence.  ``True`` converts every sequence; ``False``
    keeps sequences as dxtbx groups them.  Experiment identifiers are set.
    Use ``expt.is_still()`` to tell stills from rotation data.
    """

    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no image paths given")
    imported = ExperimentListFactory.from_filenames(paths)
    if len(imported) == 0:
        raise ValueError(f"no images could be read from {len(paths)} path(s)")

    experiments = ExperimentList()
    for imageset in imported.imagesets():
        if isinstance(imageset, ImageSequence):
            scan = imageset.get_scan()
            zero_width = scan is None or scan.get_oscillation()[1] == 0
            to_stills = zero_width if convert_to_stills is None else convert_to_stills
            if not to_stills:
                experiments.append(
                    Experiment(
                        imageset=imageset,
                        beam=imageset.get_beam(),
                        detector=imageset.get_detector(),
                        goniometer=imageset.get_goniometer(),
                        scan=scan,
                    )
                )
                continue
            imageset = ImageSetFactory.imageset_from_anyset(imageset)
            for j in range(len(imageset)):
                imageset.set_scan(None, j)
                imageset.set_goniometer(None, j)
        for i in range(len(imageset)):
            experiments.append(
                Experiment(
                    imageset=imageset[i : i + 1],
                    beam=imageset.get_beam(i),
                    detector=imageset.get_detector(i),
                    goniometer=imageset.get_goniometer(i),
                    scan=imageset.get_scan(i),
                )
            )
    generate_experiment_identifiers(experiments)
    n_still = sum(e.is_still() for e in experiments)
    logger.info(
        "Imported %d image file(s): %d still experiment(s), %d sequence experiment(s)",
        len(paths),
        n_still,
        len(experiments) - n_still,
    )
    return experiments


# --------------------------------------------------------------------------
# Spot finding
# --------------------------------------------------------------------------
def find_spots(experiments, params_overrides=None):
    """Find strong spots (``dials.find_spots``) -> reflection table.

    Defaults are DIALS' plus ``spotfinder.filter.min_spot_size=2`` when all
    experiments are stills.  The table has ``id`` = experiment index and the
    experiment identifiers set (generated if missing) and an ``n_signal``
    column; shoeboxes are kept as in ``dials.find_spots`` (whose default is
    ``output.shoeboxes=True``; pass ``output.shoeboxes=False`` to drop them).
    Nothing is written to disk.
    """
    working_phil = dials_programs.find_spots_phil

    defaults = DEFAULT_STILLS_SPOTFINDING if all(e.is_still() for e in experiments) else ()
    params = make_params(working_phil, list(defaults), params_overrides)
    # as dials.find_spots' do_spotfinding, without writing files
    if not all(i != "" for i in experiments.identifiers()):
        generate_experiment_identifiers(experiments)
    saved_trusted = {}
    if params.maximum_trusted_value is not None:
        for d, detector in enumerate(experiments.detectors()):
            for p, panel in enumerate(detector):
                saved_trusted[(d, p)] = trusted = panel.get_trusted_range()
                panel.set_trusted_range((trusted[0], params.maximum_trusted_value))
    try:
        reflections = flex.reflection_table.from_observations(experiments, params)
    finally:
        for d, detector in enumerate(experiments.detectors()):
            for p, panel in enumerate(detector):
                if (d, p) in saved_trusted:
                    panel.set_trusted_range(saved_trusted[(d, p)])
    good = MaskCode.Foreground | MaskCode.Valid
    reflections["n_signal"] = reflections["shoebox"].count_mask_values(good)
    if not params.output.shoeboxes:
        del reflections["shoebox"]
    logger.info("Found %d strong spots on %d experiment(s)", len(reflections), len(experiments))
    return reflections
