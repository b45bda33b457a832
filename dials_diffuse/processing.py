"""Phase 1 processing with the DIALS Python API: import, spot finding, indexing.

Library functions for the (future) ``dials.diffuse_process`` command.  No
subprocesses: everything calls DIALS 3.12 in-process.

* :func:`import_images` - images -> ExperimentList (zero-oscillation images as
  stills, like ``dials.import convert_sequences_to_stills=True``);
* :func:`find_spots` - strong spots (``dials.find_spots``);
* :func:`index_stills` - index each still on its own with the DIALS stills
  indexer; failures are reported per image, never raised;
* :func:`index_and_refine_sequence` - rotation data: ``dials.index`` then
  ``dials.refine`` (static, then scan-varying);
* :func:`refine_shared_detector` - joint refinement of one detector shared by
  all indexed stills (fixes the ~1 % cell inflation from the header distance).

Every function takes DIALS PHIL overrides as ``params_overrides``: ``None``, a
``"key=value"`` string or a list of them (short names resolved as on the DIALS
command line, e.g. ``"min_spot_size=2"``; PHIL blocks are accepted too), a
parsed ``libtbx.phil.scope``, or an already extracted parameter object of the
matching DIALS program (used as is, after a deep copy).

Logging goes to loggers under ``dials.diffuse_process`` (``dials.util.log``
drops loggers outside ``dials.``).  Stills indexing calls
:func:`dials_diffuse.dials_compat.ensure_stills_indexing` first (Debian's cctbx
lacks ``xfel_mono_sim_ext``; see that module).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from dials_diffuse import dials_programs
from dials_diffuse.dials_compat import ensure_stills_indexing
from dials_diffuse.parallel import fork_map

logger = logging.getLogger("dials.diffuse_process")

#: Settings that index the thaumatin grid-scan stills with DIALS 3.12
#: (docs/STILLS_INDEXING.md).  Applied before the user's overrides.
DEFAULT_STILLS_INDEXING = (
    "indexing.stills.indexer=stills",
    "indexing.method=fft1d",
    "indexing.refinement_protocol.d_min_start=2.0",
    "indexing.stills.ewald_proximal_volume_max=0.01",
    # One still cannot separate the detector distance from the cell: refined
    # per still, the distance wanders (341.7 mm on image 9, cell 57.0/147.4).
    # Keep the header geometry here; refine_shared_detector() refines it over
    # all stills together.
    "refinement.parameterisation.detector.fix=all",
)

#: Spot-finding defaults for stills (min_spot_size=3 is DIALS' own default for
#: pixel-array detectors; 2 keeps the weak high-resolution spots of a still).
DEFAULT_STILLS_SPOTFINDING = ("spotfinder.filter.min_spot_size=2",)

#: Images with fewer strong spots are reported as failures without trying.
MIN_SPOTS_TO_INDEX = 10


# --------------------------------------------------------------------------
# PHIL helpers
# --------------------------------------------------------------------------
def _as_list(overrides) -> list:
    if overrides is None:
        return []
    if isinstance(overrides, (str, bytes)):
        return [overrides]
    return list(overrides)


def make_params(working_phil, *override_sets):
    """Extract parameters of a DIALS program from ``working_phil``.

    Each element of ``override_sets`` is one of the accepted override forms
    (see the module docstring); they are applied in order, later ones win.  An
    extracted parameter object (``libtbx.phil.scope_extract``) replaces
    everything before it.
    """
    import libtbx.phil

    interpreter = working_phil.command_line_argument_interpreter()
    sources = []
    base = None
    for overrides in override_sets:
        if isinstance(overrides, libtbx.phil.scope_extract):
            base = working_phil.format(python_object=overrides)
            sources = []
            continue
        for item in _as_list(overrides):
            if isinstance(item, libtbx.phil.scope):
                sources.append(item)
            elif isinstance(item, str):
                text = item.strip()
                if not text:
                    continue
                if "\n" in text or "{" in text:
                    sources.append(libtbx.phil.parse(text))
                else:
                    sources.append(interpreter.process(arg=text))
            else:
                raise TypeError(f"unsupported PHIL override {item!r}")
    master = working_phil if base is None else working_phil.fetch(source=base)
    return master.fetch(sources=sources).extract() if sources else master.extract()


def _symmetry_overrides(known_symmetry) -> list[str]:
    """(space_group, unit_cell) -> PHIL strings; None -> []."""
    if known_symmetry is None:
        return []
    space_group, unit_cell = known_symmetry
    out = []
    if space_group is not None:
        out.append(f"indexing.known_symmetry.space_group={str(space_group).replace(' ', '')}")
    if unit_cell is not None:
        if hasattr(unit_cell, "parameters"):
            unit_cell = unit_cell.parameters()
        if not isinstance(unit_cell, str):
            unit_cell = ",".join(f"{float(v):g}" for v in unit_cell)
        out.append(f"indexing.known_symmetry.unit_cell={unit_cell}")
    return out


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
    from dxtbx.imageset import ImageSequence, ImageSetFactory
    from dxtbx.model import Experiment
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    from dials.util.multi_dataset_handling import generate_experiment_identifiers

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
    from dials.array_family import flex
    working_phil = dials_programs.find_spots_phil
    from dials.algorithms.shoebox import MaskCode
    from dials.util.multi_dataset_handling import generate_experiment_identifiers

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


# --------------------------------------------------------------------------
# Stills indexing
# --------------------------------------------------------------------------
@dataclass
class ImageIndexingReport:
    """Outcome of indexing one still."""

    index: int  #: position in the input ExperimentList
    path: str
    status: str  #: "indexed" or "failed"
    reason: str = ""  #: why it failed ("" when indexed)
    n_spots: int = 0
    n_indexed: int = 0
    rmsd_x_px: float | None = None
    rmsd_y_px: float | None = None
    rmsd_delpsi_deg: float | None = None
    unit_cell: tuple | None = None
    space_group: str | None = None
    time_s: float = 0.0
    experiment_id: int | None = None  #: id in the combined result (indexed only)

    @property
    def indexed(self) -> bool:
        return self.status == "indexed"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StillsIndexingResult:
    """Indexed stills: one experiment per indexed image, plus a report per image."""

    experiments: object  #: ExperimentList of the indexed stills
    reflections: object  #: reflection table, indexed reflections only, id -> experiments
    report: list = field(default_factory=list)  #: ImageIndexingReport per input image

    @property
    def n_indexed_images(self) -> int:
        return sum(r.indexed for r in self.report)

    @property
    def failures(self) -> list:
        return [r for r in self.report if not r.indexed]

    def summary_table(self) -> str:
        """Plain-text (markdown) table of the per-image report."""
        lines = [
            "| image | status | spots | indexed | cell a, b, c (A) | rmsd x, y (px) | time (s) | reason |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.report:
            cell = ", ".join(f"{v:.2f}" for v in r.unit_cell[:3]) if r.unit_cell else ""
            rmsd = f"{r.rmsd_x_px:.2f}, {r.rmsd_y_px:.2f}" if r.rmsd_x_px is not None else ""
            lines.append(
                f"| {Path(r.path).name} | {r.status} | {r.n_spots} | {r.n_indexed} | "
                f"{cell} | {rmsd} | {r.time_s:.1f} | {r.reason} |"
            )
        return "\n".join(lines)


def _image_path(expt) -> str:
    try:
        return expt.imageset.get_path(0)
    except Exception:  # pragma: no cover - imagesets without paths
        return ""


def _still_rmsds(refl):
    """(rmsd_x_px, rmsd_y_px, rmsd_delpsi_deg) of indexed reflections of one still."""
    from dials.array_family import flex

    if len(refl) == 0 or "xyzcal.px" not in refl:
        return None, None, None
    x_o, y_o, _ = refl["xyzobs.px.value"].parts()
    x_c, y_c, _ = refl["xyzcal.px"].parts()
    rx = math.sqrt(flex.mean(flex.pow2(x_o - x_c)))
    ry = math.sqrt(flex.mean(flex.pow2(y_o - y_c)))
    rpsi = None
    if "delpsical.rad" in refl:
        rpsi = math.degrees(math.sqrt(flex.mean(flex.pow2(refl["delpsical.rad"]))))
    return rx, ry, rpsi


def _select_experiment_reflections(reflections, i):
    from dials.array_family import flex

    refl = reflections.select(reflections["id"] == i)
    refl.clean_experiment_identifiers_map()
    refl["id"] = flex.int(len(refl), 0)
    refl["imageset_id"] = flex.int(len(refl), 0)
    return refl


def index_stills(
    experiments,
    reflections,
    known_symmetry=None,
    params_overrides=None,
    min_spots: int = MIN_SPOTS_TO_INDEX,
    nproc: int = 1,
) -> StillsIndexingResult:
    """Index each still on its own with the DIALS stills indexer.

    Args:
        experiments: still experiments (one image each, e.g. from
            :func:`import_images`); crystals, if present, are ignored.
        reflections: strong spots with ``id`` = index into ``experiments``
            (as from :func:`find_spots`).
        known_symmetry: ``(space_group, unit_cell)``, e.g.
            ``("P41212", (57.9, 57.9, 150.2, 90, 90, 90))``, or None.  Either
            element may be None.
        params_overrides: ``dials.index`` PHIL overrides, applied after
            :data:`DEFAULT_STILLS_INDEXING` and ``known_symmetry``.
        min_spots: images with fewer strong spots fail without an attempt.
        nproc: stills indexed at once in forked worker processes. Every still
            is indexed from the same random seeds, so the result does not
            depend on nproc or on the order of the images.

    Returns:
        :class:`StillsIndexingResult`: ``experiments`` has one indexed and
        refined experiment per successful still (imageset = that image,
        identifier kept from the input); ``reflections`` holds their indexed
        reflections with ``id`` renumbered to match; ``report`` has one
        :class:`ImageIndexingReport` per input experiment, failures included.
        Indexing errors are caught and reported, never raised.
    """
    from dxtbx.model.experiment_list import ExperimentList

    from dials.array_family import flex
    working_phil = dials_programs.index_phil

    if not all(e.is_still() for e in experiments):
        raise ValueError("index_stills needs still experiments (use import_images)")
    ensure_stills_indexing()
    params = make_params(
        working_phil,
        list(DEFAULT_STILLS_INDEXING) + _symmetry_overrides(known_symmetry),
        params_overrides,
    )
    jobs = [
        (i, expt, _select_experiment_reflections(reflections, i))
        for i, expt in enumerate(experiments)
    ]
    indexed_experiments = ExperimentList()
    tables = []
    report = []
    for entry, models, refl_out in _run_indexing(jobs, params, min_spots, nproc):
        if models is not None:
            expt = experiments[entry.index]
            new = copy.copy(expt)
            new.crystal, new.beam, new.detector = models
            new.identifier = expt.identifier
            eid = len(indexed_experiments)
            ids_map = refl_out.experiment_identifiers()
            for k in list(ids_map.keys()):
                del ids_map[k]
            refl_out["id"] = flex.int(len(refl_out), eid)
            refl_out["imageset_id"] = flex.int(len(refl_out), eid)
            refl_out.experiment_identifiers()[eid] = expt.identifier
            indexed_experiments.append(new)
            tables.append(refl_out)
            entry.experiment_id = eid
        report.append(entry)
        _log_indexing(entry)

    if tables:
        combined = flex.reflection_table.concat(tables)
    else:
        combined = flex.reflection_table()
    n_ok = len(indexed_experiments)
    logger.info("Indexed %d of %d stills", n_ok, len(experiments))
    return StillsIndexingResult(indexed_experiments, combined, report)


def _run_indexing(jobs, params, min_spots, nproc):
    """(report entry, (crystal, beam, detector) or None, indexed reflections)
    of every job, in job order, on 1..nproc processes (forked: the workers
    inherit the jobs, whose imagesets do not pickle)."""
    shared = {"jobs": jobs, "params": params, "min_spots": min_spots}
    return fork_map(_forked_index_one, range(len(jobs)), nproc, shared,
                    initializer=_quiet_indexer_logs)


def _quiet_indexer_logs():
    # two workers writing DIALS' indexing tables into one log interleave them;
    # the parent logs one line per still
    logging.getLogger("dials.algorithms").setLevel(logging.WARNING)
    logging.getLogger(dials_programs.PROGRAMS_LOGGER).setLevel(logging.WARNING)


def _forked_index_one(shared, k):
    return _index_one(shared["jobs"][k], shared["params"], shared["min_spots"])


def _index_one(job, params, min_spots):
    """Index one still; never raises (a failure is reported in the entry)."""
    import random

    import numpy as np
    from dxtbx.model.experiment_list import ExperimentList

    from dials.algorithms.indexing.indexer import Indexer
    from dials.array_family import flex

    i, expt, refl = job
    t0 = time.perf_counter()
    path = _image_path(expt)
    entry = ImageIndexingReport(index=i, path=path, status="failed", n_spots=len(refl))
    single = ExperimentList([copy.copy(expt)])
    single[0].crystal = None
    models = refl_out = None
    # the same seeds for every still: results independent of order and nproc
    random.seed(INDEXING_SEED)
    np.random.seed(INDEXING_SEED)
    flex.set_random_seed(INDEXING_SEED)
    try:
        if len(refl) < min_spots:
            raise _TooFewSpots(f"only {len(refl)} strong spots (< {min_spots})")
        idxr = Indexer.from_parameters(refl, single, params=copy.deepcopy(params))
        idxr.index()
        expts = idxr.refined_experiments
        refl_out = idxr.refined_reflections
        if expts is None or len(expts) == 0:
            raise _NoSolution("indexer returned no experiment")
        if len(expts) > 1:
            logger.info("%s: %d lattices found; keeping the first", Path(path).name, len(expts))
        refl_out = refl_out.select(refl_out["id"] == 0)
        refl_out = refl_out.select(refl_out.get_flags(refl_out.flags.indexed))
        new = expts[0]
        models = (new.crystal, new.beam, new.detector)
        rx, ry, rpsi = _still_rmsds(refl_out)
        entry.status = "indexed"
        entry.n_indexed = len(refl_out)
        entry.rmsd_x_px, entry.rmsd_y_px, entry.rmsd_delpsi_deg = rx, ry, rpsi
        entry.unit_cell = tuple(round(v, 4) for v in new.crystal.get_unit_cell().parameters())
        entry.space_group = new.crystal.get_space_group().info().symbol_and_number()
    except Exception as exc:  # reported, not raised: a still may simply not index
        entry.reason = _failure_reason(exc)
        models = refl_out = None
    entry.time_s = time.perf_counter() - t0
    return entry, models, refl_out


INDEXING_SEED = 0


def _log_indexing(entry):
    name = Path(entry.path).name
    if entry.indexed:
        logger.info(
            "%s: indexed %d/%d spots, cell %s, rmsd %.2f %.2f px (%.1f s)",
            name,
            entry.n_indexed,
            entry.n_spots,
            ", ".join(f"{v:.2f}" for v in entry.unit_cell),
            entry.rmsd_x_px,
            entry.rmsd_y_px,
            entry.time_s,
        )
    else:
        logger.info("%s: not indexed: %s (%.1f s)", name, entry.reason, entry.time_s)


class _TooFewSpots(Exception):
    pass


class _NoSolution(Exception):
    pass


def _failure_reason(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    msg = msg[0] if msg else ""
    name = type(exc).__name__
    if isinstance(exc, (_TooFewSpots, _NoSolution)):
        return msg
    return f"{name}: {msg}" if msg else name


def _final_rmsds(refiner, history) -> dict:
    """Last-step RMSDs as {"RMSD_X_mm": ..., "RMSD_Y_mm": ..., ...}."""
    try:
        values = [float(v) for v in history["rmsd"][-1]]
        target = refiner._target  # no public accessor for names/units in 3.12
        names = [f"{n}_{u}" for n, u in zip(target.rmsd_names, target.rmsd_units)]
        return dict(zip(names, values))
    except Exception:  # pragma: no cover - best effort only
        return {}


# --------------------------------------------------------------------------
# Joint refinement of a shared detector over indexed stills
# --------------------------------------------------------------------------
def _run_dials_refine(*args, **kwargs):
    """dials.refine's library entry, which calls sys.exit() on some failures
    (e.g. "No reflections available for refinement"): raise instead."""
    try:
        return dials_programs.run_dials_refine(*args, **kwargs)
    except SystemExit as e:
        raise RuntimeError(f"dials.refine: {e}") from None


def refine_shared_detector(experiments, reflections, params_overrides=None):
    """Refine one detector shared by all indexed stills, with per-still crystals.

    All experiments are given the same (copied) detector model, then
    ``dials.refine`` refines that detector (all parameters unless overridden)
    and, per still, the crystal orientation and unit cell; each still keeps
    its own beam model, fixed (``refinement.parameterisation.beam.fix=all``).
    Stills indexed separately each refine their crystal against a fixed header
    distance, which biases the cell; sharing the detector over many stills
    makes the distance determinable.

    Returns ``(experiments, reflections, info)``, ``info`` a dict with the
    detector distance before/after (mm, panel 0 along its normal), the number
    of reflections used, the final RMSDs (``{"RMSD_X_mm": .., "RMSD_Y_mm": ..,
    "RMSD_DeltaPsi_rad": ..}``) and the time taken.  About 9 s for the 15
    thaumatin stills (8548 reflections) on 2 cores.
    """
    working_phil = dials_programs.refine_phil

    if len(experiments) == 0:
        raise ValueError("no experiments to refine")
    if not all(e.is_still() for e in experiments):
        raise ValueError("refine_shared_detector needs still experiments")
    experiments = copy.deepcopy(experiments)
    reflections = copy.deepcopy(reflections)
    detector = experiments[0].detector
    for e in experiments:
        e.detector = detector
    d0 = detector[0].get_directed_distance()
    params = make_params(
        working_phil,
        ["refinement.parameterisation.beam.fix=all"],
        params_overrides,
    )
    t0 = time.perf_counter()
    experiments, reflections, refiner, history = _run_dials_refine(
        experiments, reflections, params
    )
    d1 = experiments[0].detector[0].get_directed_distance()
    info = {
        "distance_before_mm": abs(d0),
        "distance_after_mm": abs(d1),
        "n_experiments": len(experiments),
        "n_reflections_used": len(refiner.get_matches()),
        "final_rmsds": _final_rmsds(refiner, history),
        "time_s": time.perf_counter() - t0,
    }
    logger.info(
        "Shared-detector refinement of %d stills: distance %.2f -> %.2f mm",
        len(experiments),
        info["distance_before_mm"],
        info["distance_after_mm"],
    )
    return experiments, reflections, info


# --------------------------------------------------------------------------
# Rotation data
# --------------------------------------------------------------------------
def index_and_refine_sequence(
    experiments,
    reflections,
    known_symmetry=None,
    params_overrides=None,
    refine_overrides=None,
    scan_varying: bool = True,
):
    """Index a rotation sequence (``dials.index``) and refine it (``dials.refine``).

    Args:
        experiments: sequence experiments (not stills).
        reflections: strong spots from :func:`find_spots`.
        known_symmetry: ``(space_group, unit_cell)`` or None.
        params_overrides: ``dials.index`` PHIL overrides.
        refine_overrides: ``dials.refine`` PHIL overrides (applied after
            ``scan_varying``).
        scan_varying: static refinement followed by a scan-varying macrocycle
            (``refinement.parameterisation.scan_varying=True``).

    Returns ``(experiments, reflections, info)``; raises
    ``dials.algorithms.indexing.DialsIndexError`` if indexing fails.
    """
    index, index_phil = dials_programs.index, dials_programs.index_phil
    refine_phil = dials_programs.refine_phil

    if any(e.is_still() for e in experiments):
        raise ValueError("index_and_refine_sequence needs rotation (sequence) experiments")
    params = make_params(index_phil, _symmetry_overrides(known_symmetry), params_overrides)
    t0 = time.perf_counter()
    reflections = copy.deepcopy(reflections)
    indexed_expts, indexed_refl = index(copy.deepcopy(experiments), [reflections], params)
    t_index = time.perf_counter() - t0
    indexed_only = indexed_refl.select(indexed_refl.get_flags(indexed_refl.flags.indexed))
    rparams = make_params(
        refine_phil,
        [f"refinement.parameterisation.scan_varying={bool(scan_varying)}"],
        refine_overrides,
    )
    refined_expts, refined_refl, refiner, history = _run_dials_refine(
        indexed_expts, indexed_only, rparams
    )
    info = {
        "n_indexed": int(indexed_only.size()),
        "n_strong": int(reflections.size()),
        "unit_cells": [c.get_unit_cell().parameters() for c in refined_expts.crystals()],
        "space_groups": [
            c.get_space_group().info().symbol_and_number() for c in refined_expts.crystals()
        ],
        "final_rmsds": _final_rmsds(refiner, history),
        "time_index_s": t_index,
        "time_total_s": time.perf_counter() - t0,
    }
    logger.info(
        "Sequence indexed (%d/%d spots) and refined (scan_varying=%s)",
        info["n_indexed"],
        info["n_strong"],
        scan_varying,
    )
    return refined_expts, refined_refl, info
