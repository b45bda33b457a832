"""From raw images to merged diffuse maps and diagnostics in one call.

``process(image_paths, params)`` is the library entry point behind
``dials.diffuse_process`` (the command only parses, calls and writes the log):

1. **Phase 1, DIALS processing** (:mod:`dials_diffuse.processing`): import,
   spot finding, indexing (stills each on their own through the DIALS stills
   indexer, made to work on Debian's DIALS 3.12 by
   :func:`dials_diffuse.dials_compat.ensure_stills_indexing`; rotation
   sequences together with scan-varying refinement) and refinement (stills: one
   detector shared by all indexed stills when there are enough of them).
   An image that does not index is reported and left out.
2. **Validation** of the crystal models against ``reference_pdb`` (unit cell
   within tolerance, same Laue group) and between images (cell spread of the
   stills, RMS misorientation of a sequence); failing images are left out
   (``validation.on_failure=continue``) or stop the run (``stop``).
3. **Extraction** (:func:`dials_diffuse.extraction.extract`) into
   ``diffuse_extracted/`` with masks, and extraction diagnostics of the first
   extracted image (``extraction_diagnostics/``).
4. With two or more extracted images, **merging**
   (:func:`dials_diffuse.merging.merge_run`, ``diffuse_merged/``) and the
   merged-map diagnostics (``phase3_diagnostics/``).

Every step records a signature (its parameters and inputs) in
``dials.diffuse_process.json``; a later run on the same ``output.base_dir``
reuses a step whose outputs are complete and whose signature is unchanged,
unless ``overwrite=True``.

The parameters are one PHIL scope (:data:`phil_scope`) built from the scopes of
``dials.diffuse_extract`` (``extract {...}``), ``dials.diffuse_merge``
(``merge {...}``) and ``dials.diffuse_check`` (``check {...}``), the shared
``grid`` scope, and DIALS' own ``spotfinder``, ``indexing`` and ``refinement``
scopes, so each parameter has one definition.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io as _io
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Iterable, List, Optional

import iotbx.phil

from dials.util import Sorry

from dials_diffuse import dials_programs, io, phil_scopes
from dials_diffuse.phil_scopes import grid_phil_str
from dials_diffuse.command_util import resolve_nproc

logger = logging.getLogger("dials.diffuse_process")

# --------------------------------------------------------------------------
# File layout
# --------------------------------------------------------------------------
LOG_NAME = "dials.diffuse_process.log"
SUMMARY_NAME = "dials.diffuse_process.json"
INTERMEDIATE_MANIFEST_NAME = "intermediate_outputs_manifest.json"
IMPORTED = "imported.expt"
STRONG = "strong.refl"
INDEXED_EXPT, INDEXED_REFL = "indexed.expt", "indexed.refl"
REFINED_EXPT, REFINED_REFL = "refined.expt", "refined.refl"
PER_IMAGE_DIR = "per_image"
EXTRACTION_DIAGNOSTICS_DIR = "extraction_diagnostics"
PHASE3_DIAGNOSTICS_DIR = "phase3_diagnostics"

#: The DIALS scopes included under their usual names; their changed values are
#: passed to :mod:`dials_diffuse.processing` as PHIL overrides.
DIALS_SCOPES = ("spotfinder", "indexing", "refinement")
#: The scopes of the diffuse commands (short names resolve to these first).
DIFFUSE_SCOPES = ("extract", "grid", "merge", "check")

#: Spot-finding threshold for simulated images (dials_diffuse.simulate):
#: their diffuse halos exceed DIALS' default strong-pixel limit.
SIMULATED_SPOTFINDING = "spotfinder.threshold.dispersion.global_threshold=400"

process_phil_str = """
dials_phil = None
  .type = path
  .help = "A DIALS PHIL file of overrides for spot finding, indexing and "
          "refinement (spotfinder.*, indexing.*, refinement.* definitions), "
          "applied before the command-line values."
reference_pdb = None
  .type = path
  .help = "PDB (or mmCIF) file whose CRYST1 unit cell and space group the "
          "crystal models are validated against."
processing
{
  mode = *auto stills sequence
    .type = choice
    .help = "auto: stills when every imported experiment is a still "
            "(zero oscillation), else sequence. stills: each image indexed on "
            "its own; sequence: rotation images indexed together and refined "
            "scan-varying."
  refine_shared_detector = *auto yes no
    .type = choice
    .help = "Stills: refine one detector shared by all indexed stills (with "
            "per-still crystals). auto: when at least "
            "shared_detector_min_stills stills are indexed."
  shared_detector_min_stills = 3
    .type = int(value_min=1)
  min_spots = 10
    .type = int(value_min=0)
    .help = "Stills with fewer strong spots fail without an indexing attempt."
  scan_varying = True
    .type = bool
    .help = "Sequences: scan-varying refinement after the static one."
}
validation
{
  cell_length_tolerance = 0.03
    .type = float(value_min=0)
    .help = "reference_pdb: largest relative difference of a cell edge."
  cell_angle_tolerance = 2.0
    .type = float(value_min=0)
    .help = "reference_pdb: largest difference of a cell angle (degrees)."
  max_cell_spread = 0.02
    .type = float(value_min=0)
    .help = "Stills: largest relative deviation of a cell edge from the median "
            "cell of the indexed stills."
  max_rms_misorientation_deg = 2.0
    .type = float(value_min=0)
    .help = "Sequences: largest RMS misorientation (degrees) of the crystal "
            "along the scan (scan points against the first) and between "
            "sequences (modulo symmetry)."
  on_failure = *continue stop
    .type = choice
    .help = "continue: leave failing images out and go on; stop: end the run "
            "with the failures listed."
}
mp
{
  nproc = Auto
    .type = int(value_min=1)
    .help = "Processes for spot finding, stills indexing (one still per "
            "process at a time) and, unless their own mp.nproc is set, the "
            "extraction and the merge; Auto: the available cores."
}
diagnostics
{
  extraction = True
    .type = bool
    .help = "Diagnostics of the first extracted image (extraction_diagnostics/)."
  merged = True
    .type = bool
    .help = "Diagnostics of the merged map (phase3_diagnostics/)."
}
output
{
  base_dir = diffuse_run
    .type = path
    .help = "Every output goes here; extract.output.directory and "
            "merge.output.directory are relative to it."
  save_intermediate_outputs = True
    .type = bool
    .help = "Write intermediate_outputs_manifest.json listing every file, and "
            "per-image DIALS files of indexed stills."
  overwrite = False
    .type = bool
    .help = "Redo every step, even when base_dir holds its finished outputs "
            "from a run with the same parameters."
}
"""


def _body(scope, drop=()):
    """The definitions of a command's scope as PHIL text, minus ``drop``
    (top-level names or dotted paths)."""
    copy_ = iotbx.phil.parse(scope.as_str(attributes_level=2))
    _remove(copy_, set(drop))
    return copy_.as_str(attributes_level=2)


def _remove(scope, paths, prefix=""):
    kept = []
    for obj in scope.objects:
        path = prefix + obj.name
        if path in paths:
            continue
        if obj.is_scope:
            _remove(obj, paths, path + ".")
        kept.append(obj)
    scope.objects = kept


def _build_phil_scope():
    text = (
        process_phil_str
        + grid_phil_str
        # the grid is shared: one top-level scope instead of one per command;
        # logs: the one dials.diffuse_process.log
        + "extract\n  .help = \"dials.diffuse_extract parameters\"\n{\n"
        + _body(phil_scopes.extract_params_scope, ("grid",))
        + "}\nmerge\n  .help = \"dials.diffuse_merge parameters\"\n{\n"
        + _body(phil_scopes.merge_params_scope, ("grid",))
        + "}\ncheck\n  .help = \"dials.diffuse_check parameters\"\n{\n"
        + _body(phil_scopes.check_params_scope, ("output.directory",))
        + "}\n"
        + "\ninclude scope dials.algorithms.spot_finding.factory.phil_scope\n"
        # dials.index's scope (the indexer's, the basis-vector searches',
        # refinement) without its output files
        + _body(dials_programs.index_master_phil, ("output",))
    )
    master = iotbx.phil.parse(text, process_includes=True)
    # defaults of this command that differ from the single commands':
    # masks are written so the extraction diagnostics can overlay them
    return master.fetch(source=iotbx.phil.parse("extract.output.masks = True"))


phil_scope = _build_phil_scope()


def default_params():
    return phil_scope.extract()


def params_from(*args, **kwargs):
    """Parameters from ``key=value`` strings and/or dotted keyword names, e.g.
    ``params_from("filter.pixel_step=4", **{"output.base_dir": "run"})``.
    Short names resolve as on the command line (diffuse scopes first)."""
    items = list(args) + [f"{k}={_phil_value(v)}" for k, v in kwargs.items()]
    items = resolve_short_names(items)
    interpreter = phil_scope.command_line_argument_interpreter()
    sources = [interpreter.process(arg=a) for a in items]
    return phil_scope.fetch(sources=sources).extract()


def _phil_value(v):
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def resolve_short_names(args: List[str], master=None) -> List[str]:
    """Rewrite ``key=value`` arguments whose key is ambiguous between the DIALS
    scopes and exactly one definition of the diffuse scopes (e.g.
    ``filter.d_min`` -> ``extract.filter.d_min`` rather than
    ``spotfinder.filter.d_min``) to the full path of the diffuse one. Other
    arguments pass unchanged (PHIL reports real ambiguities)."""
    master = master or phil_scope
    paths = [d.path for d in master.all_definitions()]
    interpreter = master.command_line_argument_interpreter()
    out = []
    for arg in args:
        if "=" not in arg or os.path.exists(arg) or "://" in arg:
            out.append(arg)
            continue
        key, value = arg.split("=", 1)
        key = key.strip()
        if key in paths:
            out.append(arg)
            continue
        candidates = [p for p in paths if p.endswith("." + key)]
        ours = [p for p in candidates if p.split(".", 1)[0] in DIFFUSE_SCOPES]
        if len(candidates) > 1 and len(ours) == 1:
            logger.debug("%s resolved to %s", key, ours[0])
            out.append(f"{ours[0]}={value}")
        else:
            out.append(arg)
    del interpreter
    return out


# --------------------------------------------------------------------------
# Input checks (before anything is written)
# --------------------------------------------------------------------------
class Inputs:
    """Validated inputs: image paths, imported experiments, reference symmetry,
    DIALS overrides from ``dials_phil``."""

    def __init__(self, image_paths, experiments, reference_symmetry, dials_phil_scope, mode):
        self.image_paths = image_paths
        self.experiments = experiments
        self.reference_symmetry = reference_symmetry
        self.dials_phil_scope = dials_phil_scope
        self.mode = mode


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
    reference = read_reference_symmetry(params.reference_pdb) if params.reference_pdb else None
    dials_phil_scope = read_dials_phil(params.dials_phil) if params.dials_phil else None
    if params.output.base_dir in (None, ""):
        raise Sorry("output.base_dir must be set")
    base = Path(params.output.base_dir)
    if base.exists() and not base.is_dir():
        raise Sorry(f"output.base_dir={base} exists and is not a directory")
    experiments = _import(paths, params.processing.mode)
    mode = _choose_mode(experiments, params.processing.mode)
    _check_detectors(experiments)
    return Inputs(paths, experiments, reference, dials_phil_scope, mode)


def _unreadable_image(experiments):
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
    from dxtbx.format.Registry import get_format_class_for_file

    for p in paths:
        try:
            fmt = get_format_class_for_file(p)
        except Exception as e:  # unreadable file (permissions, broken compression)
            raise Sorry(f"cannot read {p}: {e}")
        if fmt is None:
            raise Sorry(f"{p} is not an image file that dxtbx can read")


def _import(paths, mode):
    from dials_diffuse.processing import import_images

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
                f"{other[0][0]}, e.g. {_path_of(experiments[0])} and {_path_of(e)}): "
                "process them separately"
            )


def _path_of(expt):
    try:
        return os.path.basename(expt.imageset.get_path(0))
    except Exception:
        return "?"


def read_reference_symmetry(path):
    """cctbx crystal.symmetry from the CRYST1 record of a PDB (or mmCIF) file."""
    import iotbx.pdb

    if not os.path.isfile(path):
        raise Sorry(f"reference_pdb not found: {path}")
    try:
        with _capture_stdout():
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


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _capture_stdout():
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


def _signature(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scope_text(params, names) -> str:
    """The non-default values of the named top-level scopes (PHIL text)."""
    diff = phil_scope.fetch_diff(source=phil_scope.format(python_object=params))
    diff.objects = [o for o in diff.objects if o.name in names]
    return diff.as_str()


def dials_overrides(params, dials_phil_scope=None, dials_args=None) -> list:
    """DIALS PHIL overrides for :mod:`processing`, applied after its defaults:
    the ``dials_phil`` file, the spotfinder/indexing/refinement values of
    ``params`` that differ from this command's defaults, then ``dials_args``
    (the ones the user gave explicitly, see :func:`dials_arguments`: a value
    equal to DIALS' default still overrides a processing default, e.g.
    ``indexing.method=fft3d`` for stills)."""
    out = []
    if dials_phil_scope is not None:
        out.append(dials_phil_scope)
    text = _scope_text(params, DIALS_SCOPES)
    if text.strip():
        out.append(iotbx.phil.parse(text))
    out.extend(dials_args or [])
    return out


def dials_arguments(args: List[str], master=None) -> list:
    """The ``key=value`` arguments that set DIALS parameters, as PHIL scopes
    with full paths (for :func:`process`'s ``dials_args``)."""
    master = master or phil_scope
    interpreter = master.command_line_argument_interpreter()
    out = []
    for arg in args:
        if "=" not in arg or os.path.exists(arg):
            continue
        try:
            parsed = interpreter.process(arg=arg)
        except Exception:
            continue  # reported by the command's parser
        paths = [d.path for d in parsed.all_definitions()]
        if paths and all(p.split(".", 1)[0] in DIALS_SCOPES for p in paths):
            out.append(parsed)
    return out


def _write_refl(path, table):
    with io.atomic_path(str(path)) as tmp:
        table.as_file(tmp)


def _load_expts(path, check_format=True):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_json_file(str(path), check_format=check_format)


def _load_refl(path):
    from dials.array_family import flex

    return flex.reflection_table.from_file(str(path))


def _cell(crystal):
    return [round(float(v), 4) for v in crystal.get_unit_cell().parameters()]


class _Run:
    """State of one run: summary, previous summary, timings, file list."""

    def __init__(self, params, inputs: Inputs):
        self.params = params
        self.inputs = inputs
        self.base = Path(params.output.base_dir)
        self.previous = {}
        summary_path = self.base / SUMMARY_NAME
        if summary_path.is_file() and not params.output.overwrite:
            try:
                self.previous = json.loads(summary_path.read_text())
            except (OSError, ValueError):
                self.previous = {}
        self.summary = {
            "command": "dials.diffuse_process",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "base_dir": str(self.base.resolve()),
            "mode": inputs.mode,
            "n_images": len(inputs.image_paths),
            "images": [
                {"image": i, "path": p, "status": "imported"}
                for i, p in enumerate(inputs.image_paths)
            ],
            "steps": {},
            "signatures": {},
            "failures": [],
        }

    # ---- bookkeeping ----------------------------------------------------
    def reusable(self, step, signature, *markers) -> bool:
        if self.params.output.overwrite:
            return False
        prev = self.previous.get("signatures", {}).get(step)
        if prev != signature:
            if prev is not None:
                logger.info("%s: inputs or parameters changed since the last run: redoing", step)
            return False
        return all(Path(m).exists() for m in markers)

    def step(self, name, status, seconds=0.0, **info):
        entry = {"status": status, "seconds": round(seconds, 2)}
        entry.update(info)
        self.summary["steps"][name] = entry
        logger.info("Step %s: %s%s", name, status, f" ({seconds:.1f} s)" if seconds else "")

    def image_entry(self, path):
        real = os.path.realpath(path)
        for e in self.summary["images"]:
            if os.path.realpath(e["path"]) == real:
                return e
        return None

    def fail_image(self, path, stage, reason):
        e = self.image_entry(path)
        if e is not None:
            e["status"] = f"failed_{stage}"
            e["reason"] = reason
        self.summary["failures"].append(
            {"image": os.path.basename(path), "path": path, "stage": stage, "reason": reason}
        )

    def save(self):
        self.summary["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        io.write_json(str(self.base / SUMMARY_NAME), self.summary)


# --------------------------------------------------------------------------
# Phase 1
# --------------------------------------------------------------------------
def _phase1_signature(run: _Run):
    p = run.params
    dials_file = ""
    if p.dials_phil:
        dials_file = Path(p.dials_phil).read_text()
    return _signature(
        "phase1/1",
        [os.path.realpath(x) for x in run.inputs.image_paths],
        run.inputs.mode,
        _scope_text(p, DIALS_SCOPES),
        [a.as_str() for a in getattr(run, "dials_args", [])],
        dials_file,
        p.processing.refine_shared_detector,
        p.processing.shared_detector_min_stills,
        p.processing.min_spots,
        p.processing.scan_varying,
    )


def run_phase1(run: _Run):
    """Import, spot finding, indexing, refinement; returns the refined
    experiments (imagesets loaded) and reflections."""
    from dials_diffuse import processing

    params = run.params
    base = run.base
    signature = _phase1_signature(run)
    refined_path = base / REFINED_EXPT
    if run.reusable("phase1", signature, refined_path, base / REFINED_REFL, base / STRONG):
        t0 = time.perf_counter()
        refined = _load_expts(refined_path)
        refined_refl = _load_refl(base / REFINED_REFL)
        strong = _load_refl(base / STRONG)
        prev = run.previous
        run.summary["images"] = prev.get("images", run.summary["images"])
        # indexing failures stand; later stages are redone or reused below
        run.summary["failures"] = [
            f for f in prev.get("failures", []) if f.get("stage") == "indexing"
        ]
        for e in run.summary["images"]:
            if e.get("status") != "failed_indexing" and e.get("status") != "imported":
                e["status"] = "indexed"
                for key in ("reason", "extraction_file", "pixels_kept"):
                    e.pop(key, None)
        run.summary["n_indexed"] = prev.get("n_indexed")
        run.summary["phase1"] = prev.get("phase1", {})
        for name in ("import", "find_spots", "index", "refine"):
            if name in prev.get("steps", {}):
                entry = dict(prev["steps"][name])
                entry["status"] = "reused"
                run.summary["steps"][name] = entry
        run.summary["signatures"]["phase1"] = signature
        logger.info(
            "Phase 1: reusing %s (%d experiments) from a previous run (%.1f s)",
            refined_path, len(refined), time.perf_counter() - t0,
        )
        return refined, refined_refl, strong

    overrides = dials_overrides(params, run.inputs.dials_phil_scope, run.dials_args)
    nproc_override = []
    if params.mp.nproc not in (None, libtbx_auto()):
        nproc_override = [f"spotfinder.mp.nproc={params.mp.nproc}"]

    experiments = run.inputs.experiments
    t0 = time.perf_counter()
    io.write_experiments(str(base / IMPORTED), experiments)
    run.step("import", "done", time.perf_counter() - t0, n_experiments=len(experiments),
             outputs=[IMPORTED])

    # -- spot finding
    t0 = time.perf_counter()
    spot_defaults = [SIMULATED_SPOTFINDING] if _simulated(experiments) else []
    if spot_defaults:
        logger.info("Simulated images (dials.diffuse_simulate): %s", spot_defaults[0])
    try:
        with _capture_stdout():
            strong = processing.find_spots(experiments, spot_defaults + nproc_override + overrides)
    except Sorry:
        raise
    except Exception as e:
        bad = _unreadable_image(experiments)
        if bad:
            raise Sorry(f"cannot read image {bad[0]} (truncated or corrupt?): {bad[1]}")
        raise Sorry(f"spot finding failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    _write_refl(base / STRONG, strong)
    counts = _spots_per_experiment(strong, len(experiments))
    for e, n in zip(run.summary["images"], _per_image(counts, experiments, run)):
        e["n_spots"] = n
    run.step("find_spots", "done", time.perf_counter() - t0, n_spots=len(strong), outputs=[STRONG])
    run.save()

    if run.inputs.mode == "stills":
        refined, refined_refl = _phase1_stills(run, experiments, strong, overrides)
    else:
        refined, refined_refl = _phase1_sequence(run, experiments, strong, overrides)
    run.summary["signatures"]["phase1"] = signature
    run.save()
    return refined, refined_refl, strong


def libtbx_auto():
    import libtbx

    return libtbx.Auto


def _simulated(experiments) -> bool:
    """Images written by dials.diffuse_simulate (truth.json beside them)."""
    try:
        directory = os.path.dirname(experiments[0].imageset.get_path(0))
    except Exception:
        return False
    return os.path.isfile(os.path.join(directory, "truth.json"))


def _spots_per_experiment(strong, n):
    import numpy as np
    from dxtbx import flumpy

    ids = flumpy.to_numpy(strong["id"]) if len(strong) else np.zeros(0, int)
    return np.bincount(ids, minlength=n).tolist()


def _per_image(counts, experiments, run):
    """Spot counts per input image (stills: one experiment per image)."""
    if len(experiments) == len(run.summary["images"]):
        return counts
    return [None] * len(run.summary["images"])


def _phase1_stills(run: _Run, experiments, strong, overrides):
    from dials_diffuse import processing

    params = run.params
    base = run.base
    t0 = time.perf_counter()
    with _capture_stdout():
        result = processing.index_stills(
            experiments, strong, known_symmetry=None, params_overrides=overrides,
            min_spots=params.processing.min_spots, nproc=resolve_nproc(params),
        )
    for r in result.report:
        entry = run.image_entry(r.path) or run.summary["images"][r.index]
        entry.update(
            {
                "n_spots": r.n_spots,
                "n_indexed": r.n_indexed,
                "indexing_seconds": round(r.time_s, 2),
            }
        )
        if r.indexed:
            entry.update(
                status="indexed",
                experiment_id=r.experiment_id,
                unit_cell_indexed=list(r.unit_cell),
                space_group=r.space_group,
                rmsd_px=[round(r.rmsd_x_px, 3), round(r.rmsd_y_px, 3)],
            )
        else:
            run.fail_image(r.path, "indexing", r.reason)
            logger.warning("Not indexed: %s: %s", os.path.basename(r.path), r.reason)
    n_ok = result.n_indexed_images
    run.summary["n_indexed"] = n_ok
    outputs = []
    if n_ok:
        io.write_experiments(str(base / INDEXED_EXPT), result.experiments)
        _write_refl(base / INDEXED_REFL, result.reflections)
        outputs = [INDEXED_EXPT, INDEXED_REFL]
    run.step(
        "index", "done" if n_ok else "failed", time.perf_counter() - t0,
        n_indexed=n_ok, n_failed=len(result.failures), outputs=outputs,
    )
    run.save()
    if n_ok == 0:
        raise Sorry(
            f"no image could be indexed ({len(experiments)} tried); first reason: "
            + (result.failures[0].reason if result.failures else "unknown")
        )

    # -- joint refinement of a shared detector
    t0 = time.perf_counter()
    choice = params.processing.refine_shared_detector
    do_shared = choice == "yes" or (
        choice == "auto" and n_ok >= params.processing.shared_detector_min_stills
    )
    refined, refined_refl = result.experiments, result.reflections
    info = {}
    status = "skipped"
    if do_shared:
        try:
            refine_overrides = [o for o in overrides]
            with _capture_stdout():
                refined, refined_refl, info = processing.refine_shared_detector(
                    result.experiments, result.reflections, refine_overrides
                )
            status = "done"
        except Exception as e:  # graceful: keep the per-still models
            status = "failed"
            info = {"reason": f"{type(e).__name__}: {e}".splitlines()[0]}
            logger.warning(
                "Shared-detector refinement failed (%s): keeping the per-still models",
                info["reason"],
            )
    else:
        logger.info(
            "Shared-detector refinement skipped (%d indexed stills, "
            "refine_shared_detector=%s)", n_ok, choice,
        )
    io.write_experiments(str(base / REFINED_EXPT), refined)
    _write_refl(base / REFINED_REFL, refined_refl)
    for e in run.summary["images"]:
        if e.get("experiment_id") is not None:
            e["unit_cell"] = _cell(refined[e["experiment_id"]].crystal)
    outputs = [REFINED_EXPT, REFINED_REFL]
    if params.output.save_intermediate_outputs:
        outputs += _write_per_image(base, refined, refined_refl)
    run.summary["phase1"] = {"shared_detector": info}
    run.step("refine", status if status != "skipped" else "done", time.perf_counter() - t0,
             shared_detector=status, outputs=outputs, **_refine_info(info))
    return refined, refined_refl


def _refine_info(info):
    keep = ("distance_before_mm", "distance_after_mm", "final_rmsds", "n_reflections_used", "reason")
    return {k: info[k] for k in keep if k in info}


def _write_per_image(base, experiments, reflections):
    """Per-still refined.expt/.refl in per_image/ (cheap: a few kB each)."""
    from dxtbx import flumpy
    from dxtbx.model.experiment_list import ExperimentList

    from dials.array_family import flex

    out_dir = base / PER_IMAGE_DIR
    out_dir.mkdir(exist_ok=True)
    written = []
    ids = flumpy.to_numpy(reflections["id"])
    for i, expt in enumerate(experiments):
        stem = Path(expt.imageset.get_path(0)).name.split(".")[0]
        single = ExperimentList([expt])
        io.write_experiments(str(out_dir / f"{stem}_refined.expt"), single)
        refl = reflections.select(flumpy.from_numpy(ids == i))
        refl.clean_experiment_identifiers_map()
        refl["id"] = flex.int(len(refl), 0)
        refl.experiment_identifiers()[0] = expt.identifier
        _write_refl(out_dir / f"{stem}_refined.refl", refl)
        written += [f"{PER_IMAGE_DIR}/{stem}_refined.expt", f"{PER_IMAGE_DIR}/{stem}_refined.refl"]
    return written


def _phase1_sequence(run: _Run, experiments, strong, overrides):
    from dials_diffuse import processing

    params = run.params
    base = run.base
    t0 = time.perf_counter()
    try:
        with _capture_stdout():
            refined, refined_refl, info = processing.index_and_refine_sequence(
                experiments, strong, known_symmetry=None, params_overrides=overrides,
                refine_overrides=overrides, scan_varying=params.processing.scan_varying,
            )
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        for p in run.inputs.image_paths:
            run.fail_image(p, "indexing", reason)
        run.step("index", "failed", time.perf_counter() - t0, reason=reason)
        run.save()
        raise Sorry(f"the sequence could not be indexed: {reason}")
    for e in run.summary["images"]:
        e["status"] = "indexed"
        e["experiment_id"] = 0 if len(refined) == 1 else None
    run.summary["n_indexed"] = len(run.summary["images"])
    run.summary["phase1"] = {
        "sequence": {
            "n_indexed": info["n_indexed"],
            "n_strong": info["n_strong"],
            "unit_cells": [list(c) for c in info["unit_cells"]],
            "space_groups": info["space_groups"],
            "final_rmsds": info["final_rmsds"],
        }
    }
    io.write_experiments(str(base / INDEXED_EXPT), refined)
    io.write_experiments(str(base / REFINED_EXPT), refined)
    _write_refl(base / REFINED_REFL, refined_refl)
    _write_refl(base / INDEXED_REFL, refined_refl)
    run.step("index", "done", info["time_index_s"], n_indexed_reflections=info["n_indexed"],
             outputs=[INDEXED_EXPT, INDEXED_REFL])
    run.step("refine", "done", info["time_total_s"] - info["time_index_s"],
             scan_varying=params.processing.scan_varying, outputs=[REFINED_EXPT, REFINED_REFL])
    return refined, refined_refl


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def validate(experiments, params, reference_symmetry=None, image_of=None) -> dict:
    """Check the crystal models. Returns ``{"checks": [...], "failed": {experiment
    id: [reasons]}, ...}``; nothing is raised.

    * against ``reference_symmetry`` (cctbx crystal.symmetry): same Laue group,
      cell edges within ``cell_length_tolerance`` (relative), angles within
      ``cell_angle_tolerance`` (degrees);
    * stills: every cell edge within ``max_cell_spread`` of the median cell;
      the RMS misorientation from the first still (modulo symmetry) is reported;
    * sequences: RMS misorientation along the scan (scan-varying models) and
      between sequences (modulo symmetry) below ``max_rms_misorientation_deg``.
    """
    import numpy as np

    v = params.validation
    crystals = [e.crystal for e in experiments]
    failed = {}
    report = {"n_models": len(crystals)}

    def fail(i, reason):
        failed.setdefault(i, []).append(reason)

    if reference_symmetry is not None:
        ref_cell = reference_symmetry.unit_cell().parameters()
        ref_sg = reference_symmetry.space_group()
        ref_laue = ref_sg.build_derived_patterson_group().type().number()
        report["reference"] = {
            "unit_cell": [round(x, 3) for x in ref_cell],
            "space_group": str(reference_symmetry.space_group_info()),
        }
        for i, c in enumerate(crystals):
            sg = c.get_space_group()
            laue = sg.build_derived_patterson_group().type().number()
            if laue != ref_laue:
                fail(i, f"space group {sg.info()} is not compatible with the reference "
                        f"{reference_symmetry.space_group_info()} (different Laue group)")
            cell = c.get_unit_cell().parameters()
            rel = max(abs(a - b) / b for a, b in zip(cell[:3], ref_cell[:3]))
            ang = max(abs(a - b) for a, b in zip(cell[3:], ref_cell[3:]))
            if rel > v.cell_length_tolerance or ang > v.cell_angle_tolerance:
                fail(i, "unit cell " + ", ".join(f"{x:.2f}" for x in cell)
                        + f" differs from the reference by {100 * rel:.1f} % / {ang:.1f} deg "
                        f"(tolerance {100 * v.cell_length_tolerance:.1f} % / "
                        f"{v.cell_angle_tolerance} deg)")

    is_still = all(e.is_still() for e in experiments)
    if crystals:
        cells = np.array([c.get_unit_cell().parameters() for c in crystals])
        median = np.median(cells, axis=0)
        rel = np.abs(cells[:, :3] - median[:3]) / median[:3]
        report["cell_median"] = [round(float(x), 4) for x in median]
        report["cell_max_relative_deviation"] = round(float(rel.max()), 5)
        if is_still and len(crystals) > 1:
            for i in np.flatnonzero(rel.max(axis=1) > v.max_cell_spread):
                fail(int(i), f"cell edge {100 * rel[i].max():.1f} % from the median cell of the "
                             f"stills (max_cell_spread {100 * v.max_cell_spread:.1f} %)")
    angles = _misorientations(crystals)
    if angles:
        report["rms_misorientation_from_first_deg"] = round(float(np.sqrt(np.mean(np.square(angles)))), 4)
    if not is_still:
        if angles:
            rms = report["rms_misorientation_from_first_deg"]
            if rms > v.max_rms_misorientation_deg:
                for i in range(1, len(crystals)):
                    fail(i, f"RMS misorientation between sequences {rms:.2f} deg > "
                            f"{v.max_rms_misorientation_deg}")
        for i, e in enumerate(experiments):
            drift = _scan_drift(e)
            if drift is not None:
                report.setdefault("scan_rms_misorientation_deg", {})[i] = round(drift, 4)
                if drift > v.max_rms_misorientation_deg:
                    fail(i, f"RMS misorientation along the scan {drift:.2f} deg > "
                            f"{v.max_rms_misorientation_deg}")
    report["failed"] = {int(k): r for k, r in failed.items()}
    report["passed"] = len(crystals) - len(failed)
    return report


def _misorientations(crystals):
    """Angles (deg) of crystals[1:] from crystals[0], modulo symmetry."""
    from dials.algorithms.indexing.compare_orientation_matrices import (
        difference_rotation_matrix_axis_angle,
    )

    out = []
    for c in crystals[1:]:
        try:
            _, _, angle, _ = difference_rotation_matrix_axis_angle(crystals[0], c)
            out.append(float(angle))
        except Exception:
            pass
    return out


def _scan_drift(expt):
    """RMS angle (deg) of the scan-point U matrices from the first one."""
    import math

    from scitbx import matrix

    c = expt.crystal
    n = c.num_scan_points
    if not n:
        return None
    u0 = matrix.sqr(c.get_U_at_scan_point(0))
    angles = []
    for i in range(1, n):
        r = matrix.sqr(c.get_U_at_scan_point(i)) * u0.transpose()
        cos_t = max(-1.0, min(1.0, (r.trace() - 1) / 2))
        angles.append(math.degrees(math.acos(cos_t)))
    if not angles:
        return 0.0
    return math.sqrt(sum(a * a for a in angles) / len(angles))


def apply_validation(run: _Run, experiments, reflections):
    """Validate, log, record per image; returns the experiments (and
    reflections) that go on."""
    from dxtbx import flumpy
    from dxtbx.model.experiment_list import ExperimentList

    t0 = time.perf_counter()
    params = run.params
    report = validate(experiments, params, run.inputs.reference_symmetry)
    failed = report["failed"]
    for i, reasons in failed.items():
        for path in _paths_of(experiments[i]):
            run.fail_image(path, "validation", "; ".join(reasons))
        logger.warning("Validation failed for experiment %d (%s): %s", i,
                       _path_of(experiments[i]), "; ".join(reasons))
    run.summary["validation"] = report
    status = "passed" if not failed else f"{len(failed)} failed"
    run.step("validation", status, time.perf_counter() - t0, on_failure=params.validation.on_failure)
    if failed and params.validation.on_failure == "stop":
        run.save()
        raise Sorry(
            f"validation failed for {len(failed)} of {len(experiments)} crystal model(s) "
            f"(validation.on_failure=stop); first: {_path_of(experiments[min(failed)])}: "
            f"{failed[min(failed)][0]}"
        )
    if not failed:
        return experiments, reflections
    keep = [i for i in range(len(experiments)) if i not in failed]
    if not keep:
        run.save()
        raise Sorry(f"no crystal model passed validation; first reason: {failed[min(failed)][0]}")
    kept = ExperimentList([experiments[i] for i in keep])
    ids = flumpy.to_numpy(reflections["id"])
    import numpy as np

    sel = np.isin(ids, keep)
    refl = reflections.select(flumpy.from_numpy(sel))
    new_ids = np.full(len(experiments), -1)
    new_ids[keep] = np.arange(len(keep))
    from dials.array_family import flex

    refl["id"] = flumpy.from_numpy(new_ids[flumpy.to_numpy(refl["id"])].astype(np.int32))
    refl.clean_experiment_identifiers_map()
    for j, e in enumerate(kept):
        refl.experiment_identifiers()[j] = e.identifier
    del flex
    logger.info("%d of %d crystal models go on after validation", len(kept), len(experiments))
    return kept, refl


def _paths_of(expt):
    try:
        return [expt.imageset.get_path(k) for k in range(len(expt.imageset))]
    except Exception:
        return []


# --------------------------------------------------------------------------
# Extraction, merging, diagnostics
# --------------------------------------------------------------------------
def _sub_params(params, name, target_scope):
    """The parameters of a single command (``target_scope``) from the ``name``
    scope of ``params`` and the shared ``grid`` scope; definitions this
    command leaves out (its log, ...) keep their defaults."""
    working = phil_scope.format(python_object=params)
    parts = []
    for obj in working.objects:
        if obj.name == name:
            parts.extend(o.as_str() for o in obj.objects)
        elif obj.name == "grid":
            parts.append(obj.as_str())
    return target_scope.fetch(source=iotbx.phil.parse("\n".join(parts))).extract()


def _in_base(base, path):
    path = Path(path)
    return path if path.is_absolute() else base / path


def _strong_for(models, strong):
    """Strong spots renumbered to the model experiments (matched by experiment
    identifier), for the spots part of masking.bragg.method."""
    import numpy as np
    from dxtbx import flumpy

    ident_to_strong = {v: k for k, v in strong.experiment_identifiers()}
    ids = flumpy.to_numpy(strong["id"])
    new = np.full(len(ids), -1, dtype=np.int32)
    for j, e in enumerate(models):
        i = ident_to_strong.get(e.identifier)
        if i is not None:
            new[ids == i] = j
    refl = strong.select(flumpy.from_numpy(new >= 0))
    refl["id"] = flumpy.from_numpy(new[new >= 0].copy())
    refl.clean_experiment_identifiers_map()
    for j, e in enumerate(models):
        refl.experiment_identifiers()[j] = e.identifier
    return refl


def _inherit_nproc(sub, params):
    """The command's mp.nproc reaches a step whose own mp.nproc is unset."""
    if (
        hasattr(sub, "mp")
        and params.mp.nproc not in (None, libtbx_auto())
        and sub.mp.nproc in (None, libtbx_auto())
    ):
        sub.mp.nproc = params.mp.nproc


def run_extraction(run: _Run, models, strong, upstream_signature, indexed=None):
    from dials_diffuse.diffuse_files import MANIFEST_NAME
    from dials_diffuse.extraction import bragg_methods, extract

    params = run.params
    sub = _sub_params(params, "extract", phil_scopes.extract_params_scope)
    out_dir = _in_base(run.base, params.extract.output.directory)
    sub.output.directory = str(out_dir)
    _inherit_nproc(sub, params)
    signature = _signature(
        "extract/1", upstream_signature, _scope_text(params, ("extract", "grid")),
        [e.identifier for e in models],
    )
    manifest_path = out_dir / MANIFEST_NAME
    if run.reusable("extraction", signature, manifest_path):
        manifest = json.loads(manifest_path.read_text())
        run.step("extraction", "reused", n_extracted=manifest["n_extracted"],
                 directory=_rel(run.base, out_dir))
    else:
        t0 = time.perf_counter()
        reflections = None
        methods = bragg_methods(sub.masking.bragg)
        # stills: the found spots only when asked for alone (spot finding on
        # stills picks up strong diffuse halos, which the per-still predicted
        # mask leaves alone); rotation: both, the spots covering every frame
        # of every found spot
        if "spots" in methods and (run.inputs.mode != "stills" or "predicted" not in methods):
            reflections = _strong_for(models, strong)
        images = run.inputs.experiments if run.inputs.mode == "stills" else None
        if manifest_path.exists():
            manifest_path.unlink()  # unfinished until the new one is written
        # indexed spots give rotation Bragg masks their profile widths
        manifest = extract(models, sub, images=images, reflections=reflections,
                           profile_reflections=indexed if run.inputs.mode != "stills" else None)
        run.step("extraction", "done", time.perf_counter() - t0,
                 n_extracted=manifest["n_extracted"], directory=_rel(run.base, out_dir))
    for entry in manifest["images"]:
        e = run.image_entry(entry["image_path"])
        if e is None:
            continue
        if entry["status"] == "extracted":
            e["status"] = "extracted"
            e["extraction_file"] = _rel(run.base, out_dir / entry["file"])
            e["pixels_kept"] = entry.get("pixel_counts", {}).get("kept")
        elif not e["status"].startswith("failed_"):
            run.fail_image(entry["image_path"], "extraction", entry.get("reason", "skipped"))
    run.summary["signatures"]["extraction"] = signature
    run.save()
    return out_dir, manifest, signature


def run_merge(run: _Run, models, extract_dir, manifest, upstream_signature):
    from dials_diffuse.merged_files import GRID_NAME, STATS_NAME
    from dials_diffuse.merging import merge_run

    params = run.params
    sub = _sub_params(params, "merge", phil_scopes.merge_params_scope)
    _inherit_nproc(sub, params)
    out_dir = _in_base(run.base, params.merge.output.directory)
    sub.output.directory = str(out_dir)
    signature = _signature("merge/1", upstream_signature, _scope_text(params, ("merge", "grid")))
    grid_path = out_dir / GRID_NAME
    if run.reusable("merge", signature, grid_path, out_dir / STATS_NAME):
        run.step("merge", "reused", directory=_rel(run.base, out_dir))
    else:
        t0 = time.perf_counter()
        if grid_path.exists():
            grid_path.unlink()  # the grid file marks a finished merge
        files = [
            str(extract_dir / e["file"]) for e in manifest["images"] if e["status"] == "extracted"
        ]
        merge_run(models, files, sub)
        run.step("merge", "done", time.perf_counter() - t0, directory=_rel(run.base, out_dir))
    stats = json.loads((out_dir / STATS_NAME).read_text())
    run.summary["merge"] = _merge_summary(stats, out_dir)
    run.summary["signatures"]["merge"] = signature
    run.save()
    return out_dir, signature


def _merge_summary(stats, out_dir):
    out = {
        "n_images": stats.get("n_images"),
        "n_voxels": stats.get("n_voxels"),
        "symmetry_merge": stats.get("symmetry_merge"),
        "cc_half_overall": stats.get("overall", {}),
        "cc_half_shells": stats.get("shells", []),
    }
    scaling_path = out_dir / "refined_scaling_model_params.json"
    if scaling_path.is_file():
        scaling = json.loads(scaling_path.read_text())
        out["scaling"] = {
            "converged": scaling.get("refinement_statistics", {}).get("converged"),
            "final_R": scaling.get("refinement_statistics", {}).get("final_R"),
            "scales": {
                k: round(v["multiplicative_scale"], 4)
                for k, v in scaling.get("refined_parameters", {}).items()
            },
        }
    return out


def run_diagnostics(run: _Run, kind, models, inputs, out_dir, upstream_signature):
    """Extraction (``kind="extraction"``) or merged-map diagnostics; failures
    are logged and recorded, never raised (the guide: non-fatal)."""
    from dials_diffuse.diagnostics import REPORT_NAME, run_check
    from dials_diffuse.diagnostics.inputs import classify

    step = f"{kind}_diagnostics"
    params = run.params
    sub = _sub_params(params, "check", phil_scopes.check_params_scope)
    sub.output.directory = str(out_dir)
    signature = _signature(f"check/{kind}/1", upstream_signature, _scope_text(params, ("check",)))
    marker = out_dir / ("extraction_diagnostics_summary.txt" if kind == "extraction"
                        else "phase3_diagnostics_summary.txt")
    if run.reusable(step, signature, marker):
        run.step(step, "reused", directory=_rel(run.base, out_dir))
        run.summary["signatures"][step] = signature
        return
    t0 = time.perf_counter()
    try:
        if marker.exists():
            marker.unlink()
        found = classify([str(p) for p in inputs], sub.input)
        if found.mode != ("extraction" if kind == "extraction" else "merged"):
            raise RuntimeError(f"diagnostics inputs not recognised as {kind} outputs")
        inventory = run_check(found, sub, models)
        n_files = len(getattr(inventory, "entries", []) or [])
        html = out_dir / REPORT_NAME
        run.step(step, "done", time.perf_counter() - t0, directory=_rel(run.base, out_dir),
                 n_outputs=n_files, report=_rel(run.base, html) if html.exists() else None)
        run.summary["signatures"][step] = signature
    except Exception as e:  # diagnostics never end the run
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        logger.warning("%s diagnostics failed: %s", kind.capitalize(), reason)
        logger.debug("diagnostics failure", exc_info=True)
        run.step(step, "failed", time.perf_counter() - t0, reason=reason)
    run.save()


def _rel(base, path):
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------
def process(image_paths, params, inputs: Optional[Inputs] = None, dials_args=None) -> dict:
    """Run the whole pipeline on ``image_paths``; returns the summary dict
    (also written to ``output.base_dir/dials.diffuse_process.json``).

    ``params``: from :data:`phil_scope` (``default_params()``,
    ``params_from(...)``). ``inputs``: the result of :func:`check_inputs`
    when already called (the command checks inputs before it opens the log).
    ``dials_args``: DIALS parameters the user set explicitly
    (:func:`dials_arguments`), applied last.
    Raises ``Sorry`` on bad input or when nothing is left to process; per-image
    failures are listed in ``summary["failures"]`` and the run goes on.
    """
    t_start = time.perf_counter()
    if inputs is None:
        inputs = check_inputs(image_paths, params)
    base = Path(params.output.base_dir)
    base.mkdir(parents=True, exist_ok=True)
    run = _Run(params, inputs)
    run.dials_args = list(dials_args or [])
    logger.info(
        "dials.diffuse_process: %d image(s), %s mode, output in %s",
        len(inputs.image_paths), inputs.mode, base,
    )
    if inputs.reference_symmetry is not None:
        logger.info("Reference symmetry from %s: %s", params.reference_pdb,
                    str(inputs.reference_symmetry).replace("\n", ", "))
    try:
        models, refl, strong = run_phase1(run)
        models, refl = apply_validation(run, models, refl)
        upstream = _signature(run.summary["signatures"]["phase1"],
                              [e.identifier for e in models])

        extract_dir, manifest, sig_extract = run_extraction(run, models, strong, upstream,
                                                            indexed=refl)
        if params.diagnostics.extraction:
            run_diagnostics(run, "extraction", models, [extract_dir],
                            run.base / EXTRACTION_DIAGNOSTICS_DIR, sig_extract)
        else:
            run.step("extraction_diagnostics", "skipped", reason="diagnostics.extraction=False")

        if manifest["n_extracted"] >= 2:
            merged_dir, sig_merge = run_merge(run, models, extract_dir, manifest, sig_extract)
            if params.diagnostics.merged:
                run_diagnostics(run, "phase3", models, [merged_dir, extract_dir],
                                run.base / PHASE3_DIAGNOSTICS_DIR, sig_merge)
            else:
                run.step("phase3_diagnostics", "skipped", reason="diagnostics.merged=False")
        else:
            logger.info("One extracted image: no merging (the phase-2 path)")
            run.step("merge", "skipped", reason="fewer than 2 extracted images")
    except Sorry as e:
        run.summary["error"] = str(e)
        run.summary["seconds_total"] = round(time.perf_counter() - t_start, 2)
        run.save()
        raise
    run.summary["seconds_total"] = round(time.perf_counter() - t_start, 2)
    _finish(run)
    return run.summary


def _finish(run: _Run):
    images = run.summary["images"]
    run.summary["n_extracted"] = sum(e.get("status") == "extracted" for e in images)
    run.summary["n_failed"] = sum(str(e.get("status", "")).startswith("failed_") for e in images)
    run.summary["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    run.save()
    if run.params.output.save_intermediate_outputs:
        write_intermediate_manifest(run.base, run.summary)
    log_summary(run.summary)


def write_intermediate_manifest(base, summary):
    """List every file under base_dir (path, bytes) grouped by directory."""
    base = Path(base)
    files = []
    for root, dirs, names in os.walk(base):
        dirs.sort()
        for name in sorted(names):
            if name.startswith("."):
                continue  # temporary files of atomic writes
            p = Path(root) / name
            if p.name == INTERMEDIATE_MANIFEST_NAME:
                continue
            files.append({"path": _rel(base, p), "bytes": p.stat().st_size})
    manifest = {
        "format": "dials_diffuse.process_outputs/1",
        "base_dir": str(base.resolve()),
        "n_files": len(files),
        "steps": {k: v.get("status") for k, v in summary.get("steps", {}).items()},
        "files": files,
    }
    io.write_json(str(base / INTERMEDIATE_MANIFEST_NAME), manifest)
    return manifest


def log_summary(summary):
    from dials.util import tabulate

    rows = [("image", "status", "spots", "indexed", "cell a, b, c", "reason")]
    for e in summary["images"]:
        cell = e.get("unit_cell") or e.get("unit_cell_indexed")
        rows.append((
            os.path.basename(e["path"]), e.get("status", ""), str(e.get("n_spots", "")),
            str(e.get("n_indexed", "")),
            ", ".join(f"{x:.2f}" for x in cell[:3]) if cell else "",
            (e.get("reason") or "")[:70],
        ))
    logger.info("\nPer-image summary\n%s", tabulate(rows, headers="firstrow"))
    steps = [("step", "status", "seconds")]
    for name, s in summary["steps"].items():
        steps.append((name, s["status"], f"{s.get('seconds', 0):.1f}"))
    logger.info("\nSteps\n%s", tabulate(steps, headers="firstrow"))
    cc = summary.get("merge", {}).get("cc_half_overall")
    if cc:
        logger.info("CC1/2 overall: %s", ", ".join(
            f"{k} {v:.3f}" for k, v in cc.items() if isinstance(v, (int, float))))
    if summary["failures"]:
        logger.info("%d image(s) left out:", len(summary["failures"]))
        for f in summary["failures"]:
            logger.info("  %s (%s): %s", f["image"], f["stage"], f["reason"])
