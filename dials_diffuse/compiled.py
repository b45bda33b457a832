"""Small compiled loops (numba, Debian's python3-numba) defined on first use,
with a numpy path in the caller when numba is not there: :func:`lazy_jit`.

The extraction's per-pixel kernels (:mod:`dials_diffuse.extraction.kernels`)
and the scaling sweeps (:mod:`dials_diffuse.scaling.kernels`) are modules of
their own; this is for single loops inside other modules (geometry, map
writing).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("dials.diffuse")

_FUNCTIONS = {}


def import_numba():
    """numba, with its on-disk cache made optional: the first call of a
    jitted function compiles it, adds it to the function, then writes the
    cache file, and a full disk (or a file-size limit) made that write raise
    OSError, a traceback in the middle of a command. Here a failed write is
    logged and the compiled function used from memory. Every module of this
    package imports numba through this function."""
    import numba
    from numba.core import caching

    if not getattr(caching.Cache.save_overload, "_tolerant", False):
        save = caching.Cache.save_overload

        def save_overload(self, sig, data):
            try:
                save(self, sig, data)
            except OSError as e:
                logger.debug("numba could not write its cache (%s): compiled in memory only", e)

        save_overload._tolerant = True
        caching.Cache.save_overload = save_overload
    return numba


def lazy_jit(name, define):
    """``define(jit)`` compiled once per process (numba's on-disk cache makes
    later processes load it), or None without numba. ``define`` receives
    numba.njit(cache=True, nogil=True) and returns the jitted function; it
    must not call other functions jitted this way (numba does not cache a
    function that calls another closure's)."""
    if name not in _FUNCTIONS:
        try:
            numba = import_numba()
        except Exception as e:  # no numba, or one that does not work here
            logger.debug("numba unavailable (%s): the numpy path is used", e)
            _FUNCTIONS[name] = None
        else:
            _FUNCTIONS[name] = define(numba.njit(cache=True, nogil=True))
    return _FUNCTIONS[name]


def use_compiled(choice, available, reason="") -> bool:
    """The rule of every ``kernel = auto numba numpy`` parameter: numpy never
    compiles, auto compiles when numba is available, numba insists (a Sorry
    without it; ``reason``: why it is not available)."""
    if choice == "numpy":
        return False
    if choice == "numba" and not available:
        from dials.util import Sorry

        why = reason or "apt-get install python3-numba"
        raise Sorry(f"kernel=numba: numba is not available here ({why})")
    return bool(available)


def disable(name, monkeypatch):
    """For tests: force the numpy path of ``name``."""
    monkeypatch.setitem(_FUNCTIONS, name, None)
