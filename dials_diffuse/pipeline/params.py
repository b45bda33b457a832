"""The parameters of ``dials.diffuse_process``: one PHIL scope built from the
library's scopes (:mod:`dials_diffuse.phil_scopes`: ``extract {...}``,
``merge {...}``, ``check {...}``, the shared ``grid``) and DIALS' own
``spotfinder``, ``indexing`` and ``refinement`` scopes, so each parameter has
one definition; short names, DIALS overrides and each step's parameters.
"""

from __future__ import annotations

import logging
import os
from typing import List

import iotbx.phil
import libtbx

from dials_diffuse import dials_programs, phil_scopes
from dials_diffuse.phil_scopes import argument_interpreter, grid_phil_str

logger = logging.getLogger("dials.diffuse_process")

#: The DIALS scopes included under their usual names; their changed values are
#: passed to :mod:`dials_diffuse.processing` as PHIL overrides.
DIALS_SCOPES = ("spotfinder", "indexing", "refinement")


#: The scopes of the diffuse commands (short names resolve to these first).
DIFFUSE_SCOPES = ("extract", "grid", "merge", "check")


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
    # defaults of this command that differ from the single commands': the
    # first image's masks are written, for the extraction diagnostics to
    # overlay (every image's were 21 MB per 6M image)
    return master.fetch(source=iotbx.phil.parse(
        "extract.output.masks = True\nextract.output.mask_images = first"))


phil_scope = _build_phil_scope()


def default_params():
    return phil_scope.extract()


def params_from(*args, **kwargs):
    """Parameters from ``key=value`` strings and/or dotted keyword names, e.g.
    ``params_from("filter.pixel_step=4", **{"output.base_dir": "run"})``.
    Short names resolve as on the command line (diffuse scopes first)."""
    items = list(args) + [f"{k}={_phil_value(v)}" for k, v in kwargs.items()]
    items = resolve_short_names(items)
    interpreter = argument_interpreter(phil_scope)
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
    interpreter = argument_interpreter(master)
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


def scope_text(params, names) -> str:
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
    text = scope_text(params, DIALS_SCOPES)
    if text.strip():
        out.append(iotbx.phil.parse(text))
    out.extend(dials_args or [])
    return out


def dials_arguments(args: List[str], master=None) -> list:
    """The ``key=value`` arguments that set DIALS parameters, as PHIL scopes
    with full paths (for :func:`process`'s ``dials_args``)."""
    master = master or phil_scope
    interpreter = argument_interpreter(master)
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


def libtbx_auto():
    return libtbx.Auto


def sub_params(params, name, target_scope):
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


def inherit_nproc(sub, params):
    """The command's mp.nproc reaches a step whose own mp.nproc is unset."""
    if (
        hasattr(sub, "mp")
        and params.mp.nproc not in (None, libtbx_auto())
        and sub.mp.nproc in (None, libtbx_auto())
    ):
        sub.mp.nproc = params.mp.nproc

