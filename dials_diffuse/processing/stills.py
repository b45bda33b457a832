"""Stills indexing: each still on its own with the DIALS stills indexer, in
forked workers (:func:`dials_diffuse.parallel.fork_map`), from the same
random seeds, so results depend neither on the order nor on nproc; failures
are reported per image, never raised."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from dxtbx.model.experiment_list import ExperimentList

from dials.algorithms.indexing.indexer import Indexer
from dials.array_family import flex

from dials_diffuse import dials_programs
from dials_diffuse.dials_compat import ensure_stills_indexing
from dials_diffuse.parallel import fork_map
from dials_diffuse.processing.params import DEFAULT_STILLS_INDEXING, MIN_SPOTS_TO_INDEX, symmetry_overrides, make_params

logger = logging.getLogger("dials.diffuse_process")


INDEXING_SEED = 0


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
    working_phil = dials_programs.index_phil

    if not all(e.is_still() for e in experiments):
        raise ValueError("index_stills needs still experiments (use import_images)")
    ensure_stills_indexing()
    params = make_params(
        working_phil,
        list(DEFAULT_STILLS_INDEXING) + symmetry_overrides(known_symmetry),
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
