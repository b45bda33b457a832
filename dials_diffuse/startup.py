"""Start-up of the dials.diffuse_* commands: two heavy imports deferred.

Loading DIALS' option parser imports scikit-learn (``dxtbx.model.
detector_helpers``, for one multi-panel projection helper; with it scipy.stats)
and pandas (``dials.array_family.flex_ext``, for one table conversion): about
0.9 s of every command's 2 s start-up on a quiet machine, for modules these
commands never call. :func:`defer_heavy_imports` puts a placeholder module
in ``sys.modules`` for each; the first attribute anybody reads from a
placeholder imports the real package (so a code path that does use them
works as before, one import later).

Only the command-line entry points call it: a ``dials.python`` script that
imports the library gets the real modules.

:func:`single_threaded_blas` keeps OpenBLAS to one thread in the commands:
their parallelism is mp.nproc (processes, or threads of compiled sweeps),
and OpenBLAS's idle threads spin-wait on the other core after every call
(measured: a 100-image 6M extraction with one process spent 19 s of system
time in 23.5 s; 2.8 s with one BLAS thread, and 1.2 s less wall time).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types

#: placeholder modules, parents before children
DEFERRED = ("sklearn", "sklearn.cluster", "pandas")


def run_and_exit(run) -> None:
    """A console entry point: ``run()``, then end the process without the
    interpreter's teardown of the ~1,700 modules DIALS imports (0.35-0.5 s
    of every command's wall time, measured after ``import
    dials.util.options``). Log handlers and the output streams are flushed
    first; the exit status is kept (SystemExit's code, as the interpreter
    would report it); any other exception ends the process as usual."""
    try:
        run()
        status = 0
    except SystemExit as e:
        status = e.code
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe
            pass
    os._exit(status)


def single_threaded_blas():
    """One OpenBLAS/OpenMP thread unless the user chose otherwise; effective
    only before numpy is first imported."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, "1")


class _Deferred(types.ModuleType):
    """A module whose first attribute access imports the real one."""

    def __getattr__(self, attribute):
        if attribute.startswith("__") and attribute.endswith("__"):
            # __file__, __path__, ...: what tools that walk sys.modules read
            # (libtbx.load_env does); a module may lack them
            raise AttributeError(attribute)
        real = _import_real(self.__name__)
        try:
            return getattr(real, attribute)
        except AttributeError:  # a submodule the package does not import itself
            return importlib.import_module(f"{self.__name__}.{attribute}")


def _import_real(name):
    top = name.partition(".")[0]
    for deferred in DEFERRED:
        if deferred.partition(".")[0] == top and isinstance(sys.modules.get(deferred), _Deferred):
            del sys.modules[deferred]
    return importlib.import_module(name)


def defer_heavy_imports() -> None:
    """Placeholders for DEFERRED modules that are installed and not yet
    imported (idempotent)."""
    for name in DEFERRED:
        top = name.partition(".")[0]
        if name in sys.modules or (top not in sys.modules and importlib.util.find_spec(top) is None):
            continue
        if "." in name and not isinstance(sys.modules.get(top), _Deferred):
            continue  # the real parent is loaded: the real child imports normally
        sys.modules[name] = _Deferred(name)
        parent, _, child = name.rpartition(".")
        if parent:
            # `import sklearn.cluster` then `sklearn.cluster.X`: the parent
            # placeholder holds the child placeholder as an attribute
            setattr(sys.modules[parent], child, sys.modules[name])
