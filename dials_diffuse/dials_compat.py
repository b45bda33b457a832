"""Compatibility fixes for Debian's DIALS 3.12 (cctbx/xfel as packaged by Debian).

The problem
-----------
The DIALS stills indexer (``dials.index stills.indexer=stills``, and everything
built on it: ``dials.ssx_index``, ``dials.stills_process``) refines a mosaicity
model for each candidate lattice in
``dials.algorithms.indexing.nave_parameters.NaveParameters.__call__``, which
does::

    from xfel.mono_simulation.max_like import minimizer   # pure Python
    from xfel.mono_simulation.util import green_curve_area  # pure Python

Importing a submodule first executes the package's ``__init__.py``, and
``xfel/mono_simulation/__init__.py`` is only::

    import boost_adaptbx.boost.python as bp
    ext = bp.import_ext("xfel_mono_sim_ext")
    from xfel_mono_sim_ext import *

Debian's cctbx does not ship the compiled ``xfel_mono_sim_ext``, so this raises
``ImportError``.  The stills indexer catches the exception per candidate
lattice and only logs it (at debug level), so every candidate is rejected and
indexing ends in ``DialsIndexError: No suitable indexing solution``.

What is actually used
---------------------
On that code path only two names are used, both defined in pure-Python
submodules that import nothing from the extension:

* ``xfel.mono_simulation.max_like.minimizer`` (imports math, sys, copy,
  scitbx.array_family.flex, scitbx.lbfgs, six, and lazily libtbx.utils,
  scitbx.simplex, matplotlib);
* ``xfel.mono_simulation.util.green_curve_area`` (imports six, scitbx flex,
  math).

Names from the extension (e.g. ``bandpass_gaussian``) are used only by
``xfel.mono_simulation.mono_treatment``, a legacy module DIALS does not import
(checked with ``grep -rn mono_simulation`` over the DIALS 3.12 sources: the two
imports above are the only ones).  The ``dials.*`` console scripts are not
patched; the fix applies to in-process use.

The fix
-------
:func:`ensure_stills_indexing` first tries the normal import.  If it works
(a cctbx build that has the extension) nothing is changed.  If it fails *because
``xfel_mono_sim_ext`` is missing*, it registers ``xfel.mono_simulation`` in
``sys.modules`` as the real package *without executing its* ``__init__.py``:
a module created with :func:`importlib.util.module_from_spec` from the real
spec, so ``__path__``, ``__file__`` and ``__spec__`` point at the installed
directory and ``import xfel.mono_simulation.max_like`` / ``.util`` load and run
the unmodified installed files.  No fake ``xfel_mono_sim_ext`` module is
created (code elsewhere that probes for the extension still sees it missing),
and no function is replaced.

Names that would have come from the extension are *not* stubbed: the package
module has a module-level ``__getattr__`` that raises ``AttributeError`` (so
``from xfel.mono_simulation import bandpass_gaussian`` raises ``ImportError``)
with a message naming the missing extension.  Anything that really needs the
compiled code therefore fails loudly, exactly as before.

The function then imports ``max_like`` and ``util`` and checks that
``minimizer`` and ``green_curve_area`` exist, so a missing dependency shows up
here rather than as a silently-logged indexing failure.

It is idempotent and cheap after the first call; call it before any stills
indexing (``dials_diffuse.processing`` does).  It changes only
``sys.modules["xfel.mono_simulation"]`` and the ``mono_simulation`` attribute
of the ``xfel`` package, in the current process (and in processes forked from
it).  It also restores ``sys.getdlopenflags()``, which
``boost_adaptbx.boost.python.import_ext`` leaves modified when its import
fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

logger = logging.getLogger("dials.diffuse_process.compat")

PACKAGE = "xfel.mono_simulation"
EXTENSION = "xfel_mono_sim_ext"
#: (submodule, name) pairs that DIALS 3.12 imports from xfel.mono_simulation
#: (dials/algorithms/indexing/nave_parameters.py).
USED_NAMES = (
    ("xfel.mono_simulation.max_like", "minimizer"),
    ("xfel.mono_simulation.util", "green_curve_area"),
)

#: attribute set on the package module when it was registered by this shim
SHIM_MARKER = "__dials_diffuse_shim__"

_status: str | None = None


def _missing_extension_getattr(name: str):
    """Module ``__getattr__`` of the shimmed package: nothing is stubbed."""
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"module {PACKAGE!r} has no attribute {name!r}: names from the compiled "
        f"extension {EXTENSION!r} are unavailable (not shipped by this cctbx "
        f"build; dials_diffuse.dials_compat loaded only the pure-Python "
        f"submodules)"
    )


def _is_missing_extension_error(exc: ImportError) -> bool:
    return getattr(exc, "name", None) == EXTENSION or EXTENSION in str(exc)


def _install_package_without_init():
    spec = importlib.util.find_spec(PACKAGE)  # imports the parent 'xfel'
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"cannot locate the {PACKAGE} package")
    module = importlib.util.module_from_spec(spec)  # does NOT run __init__.py
    module.__doc__ = (
        f"{PACKAGE} registered by dials_diffuse.dials_compat without running its "
        f"__init__.py (compiled {EXTENSION} unavailable); pure-Python "
        f"submodules import normally."
    )
    setattr(module, SHIM_MARKER, True)
    module.__getattr__ = _missing_extension_getattr
    sys.modules[PACKAGE] = module
    parent_name, _, child = PACKAGE.rpartition(".")
    setattr(sys.modules[parent_name], child, module)
    return module


def _check_used_names():
    for modname, attr in USED_NAMES:
        mod = importlib.import_module(modname)
        if not callable(getattr(mod, attr, None)):
            raise ImportError(f"{modname}.{attr} is missing")


def ensure_stills_indexing() -> str:
    """Make ``xfel.mono_simulation`` importable so the DIALS stills indexer works.

    Returns how the package is provided:

    * ``"native"``: the normal import works (extension present), nothing changed;
    * ``"shimmed"``: the package was registered without its ``__init__.py``
      (see the module docstring).

    Idempotent.  Raises ``ImportError`` if ``xfel`` itself is missing, if the
    import fails for another reason than the missing extension, or if the
    pure-Python submodules DIALS uses cannot be imported.
    """
    global _status
    if _status is not None and PACKAGE in sys.modules:
        return _status

    existing = sys.modules.get(PACKAGE)
    if existing is not None:
        _status = "shimmed" if getattr(existing, SHIM_MARKER, False) else "native"
    else:
        flags = sys.getdlopenflags() if hasattr(sys, "getdlopenflags") else None
        try:
            importlib.import_module(PACKAGE)
            _status = "native"
        except ImportError as exc:
            if not _is_missing_extension_error(exc):
                raise
            sys.modules.pop(PACKAGE, None)
            _install_package_without_init()
            _status = "shimmed"
            logger.debug(
                "%s: compiled %s missing; registered the package without its "
                "__init__ (pure-Python submodules only)",
                PACKAGE,
                EXTENSION,
            )
        finally:
            if flags is not None:
                sys.setdlopenflags(flags)

    _check_used_names()
    return _status


def stills_indexing_status() -> str | None:
    """``"native"``, ``"shimmed"`` or None if :func:`ensure_stills_indexing`
    has not run in this process."""
    return _status
