"""Small helpers shared by the dials.diffuse_* commands."""

from __future__ import annotations

import logging
import os
from typing import List, Tuple

import libtbx.phil

from dials.util import Sorry

from dials_diffuse import io
import sys
import json
from dxtbx.model.experiment_list import ExperimentListFactory
from dxtbx.format.Registry import get_format_class_for_file
import dials.util.log
from dials.util.version import dials_version
import libtbx
from dials.util.mp import available_cores


def split_preset_files(args: List[str], phil_scope) -> Tuple[List[str], List[str]]:
    """Turn PHIL parameter-set files into the definitions this command knows.

    The files in ``phil/`` hold settings for the whole pipeline (extraction,
    merging, checks), so a file given to one command may also set parameters of
    another. Those are left out here (and returned, for the log); every
    definition the command knows becomes a ``key=value`` argument.
    ``--phil file`` and plain ``file.phil`` arguments are both handled;
    command-line ``key=value`` arguments stay strict.
    """
    if args is None:

        args = sys.argv[1:]
    known = _definition_paths(phil_scope)
    result, ignored = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        path = None
        if arg == "--phil" and i + 1 < len(args):
            path = args[i + 1]
            i += 1
        elif arg.startswith("--phil="):
            path = arg.split("=", 1)[1]
        elif arg.endswith(".phil") and "=" not in arg:
            path = arg
        if path is None:
            result.append(arg)
        else:
            if not os.path.isfile(path):
                raise Sorry(f"PHIL file not found: {path}")
            try:
                with open(path) as fh:
                    parsed = libtbx.phil.parse(fh.read())
            except Exception as e:
                raise Sorry(f"cannot read {path} as PHIL: {e}")
            for definition in parsed.all_definitions():
                full = definition.path
                value = " ".join(str(w) for w in definition.object.words)
                if _matches(full, known):
                    result.append(f"{full}={value}")
                else:
                    ignored.append(f"{full} (from {path})")
        i += 1
    return result, ignored


def _definition_paths(phil_scope):
    paths = set()
    for d in phil_scope.all_definitions():
        paths.add(d.path)
    return paths


def _matches(path, known):
    if path in known:
        return True
    # allow a path given relative to a scope (PHIL's usual suffix matching)
    return any(k.endswith("." + path) for k in known)


def check_unhandled(unhandled: List[str], allowed_inputs=()) -> List[str]:
    """Positional arguments DIALS could not use: keep allowed inputs (existing
    paths accepted by ``allowed_inputs``), reject everything else in one line."""
    inputs = []
    for arg in unhandled:
        if os.path.exists(arg) and any(accept(arg) for accept in allowed_inputs):
            inputs.append(arg)
            continue
        if "=" in arg and not os.path.exists(arg):
            raise Sorry(f"unknown parameter: {arg}")
        if not os.path.exists(arg):
            raise Sorry(f"file not found: {arg}")
        why = explain_unreadable(arg)
        if why:
            raise Sorry(why)
        raise Sorry(f"cannot use {arg}: not an input this command reads")
    return inputs


def explain_unreadable(path: str):
    """Why DIALS could not read ``path`` as an experiment list (None: no idea)."""
    if not path.endswith((".expt", ".json")) or not os.path.isfile(path):
        return None

    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        return f"{path} is not an experiment list: not JSON ({e})"
    if not isinstance(data, dict) or not isinstance(data.get("experiment"), list):
        return f"{path} is not an experiment list: no list of experiments in the JSON"
    for i, expt in enumerate(data["experiment"]):
        for key, index in expt.items() if isinstance(expt, dict) else ():
            models = data.get(key)
            if isinstance(index, int) and isinstance(models, list) and not 0 <= index < len(models):
                return (f"{path}: experiment {i} refers to {key} {index}, "
                        f"but the file has {len(models)} {key} model(s)")

    try:
        experiments = ExperimentListFactory.from_json_file(path, check_format=False)
    except Exception as e:
        return f"{path} is not a valid experiment list: {type(e).__name__}: {e}"

    for imageset in experiments.imagesets():
        for k in range(len(imageset)):
            image = imageset.get_path(k)
            if not os.path.isfile(image):
                return f"{path}: image {image} not found (moved or deleted after import?)"
            try:
                fmt = get_format_class_for_file(image)
            except Exception:
                fmt = None
            if fmt is None:
                return f"{path}: image {image} is not an image format dxtbx can read"
    return None


def parse_arguments(parser, args, phil_scope, logger):
    """The start every dials.diffuse_* command shares: PHIL parameter-set
    files filtered to this command, DIALS' parser, the log file, the DIALS
    version and the modified parameters in the log.

    Returns (params, options, unhandled positional arguments).
    """

    args, ignored_presets = split_preset_files(args, phil_scope)
    try:
        params, options, unhandled = parser.parse_args(
            args=args, show_diff_phil=False, return_unhandled=True
        )
    except RuntimeError as e:
        # PHIL's value checks (value_min, value_max) raise a RuntimeError
        # that DIALS' parser passes on: a bad value, not a program error
        message = str(e).split(": ", 1)[-1] if "Please report this error" in str(e) else str(e)
        raise Sorry(message)
    log_directory = os.path.dirname(params.output.log or "")
    if log_directory:
        # output.log=run/merge.log: its directory is made, as for output.directory
        try:
            os.makedirs(log_directory, exist_ok=True)
        except OSError as e:
            raise Sorry(f"output.log={params.output.log}: cannot make its directory ({e.strerror})")
    dials.util.log.config(verbosity=options.verbose, logfile=params.output.log)
    for item in ignored_presets:
        logger.debug("Preset parameter not used by this command: %s", item)
    logger.info(dials_version())
    diff = modified_parameters(parser)
    if diff:
        logger.info("The following parameters have been modified:\n%s", diff)
    return params, options, unhandled


def modified_parameters(parser) -> str:
    """DIALS' "modified parameters" text (parser.diff_phil.as_str()) without
    reading the input files again: diff_phil extracts input.experiments and
    input.reflections to compare them, which loads every file a second time
    (2.1 s for 15 real stills against 1.1 s for the parse; 130 s for 10^4
    stills). The other scopes are diffed as DIALS does; the input files are
    listed as given."""
    import libtbx.phil

    def without_input(scope):
        return libtbx.phil.scope(name=scope.name,
                                 objects=[o for o in scope.objects if o.name != "input"])

    text = without_input(parser.system_phil).fetch_diff(
        source=without_input(parser.phil)).as_str()
    given = []
    for scope in (o for o in parser.phil.objects if o.name == "input"):
        for item in scope.objects:
            value = " ".join(str(w) for w in getattr(item, "words", None) or [])
            line = f"  {item.name} = {value}"
            # a file named twice is listed once, as in DIALS' diff
            if item.is_definition and value and value != "None" and line not in given:
                given.append(line)
    if given:
        text += "input {\n" + "\n".join(given) + "\n}\n"
    return text


def ensure_output_directory(path, parameter="output.directory"):
    """Create ``path`` if needed; Sorry unless it is a writable directory."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise Sorry(f"cannot create {parameter} {path}: {e.strerror}")
    if not os.access(path, os.W_OK):
        raise Sorry(f"{parameter} {path} is not writable")
    removed = io.remove_stale_parts(path)
    if removed:
        logging.getLogger("dials.diffuse").info(
            "Removed %d partial file(s) of an interrupted run from %s", removed, path
        )


def resolve_nproc(params):
    """params.mp.nproc as a number: Auto (or unset) means the available cores."""

    nproc = params.mp.nproc
    if nproc is None or nproc is libtbx.Auto:
        nproc = available_cores()
    return max(1, int(nproc))
