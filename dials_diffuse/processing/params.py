"""DIALS PHIL for phase 1: the processing defaults (stills indexing and
spot finding) and :func:`make_params`, which applies override sets (strings,
scopes or extracted objects) to a DIALS program's working PHIL."""

from __future__ import annotations

import logging

import libtbx.phil

from dials_diffuse.phil_scopes import argument_interpreter

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
    interpreter = argument_interpreter(working_phil)
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


def symmetry_overrides(known_symmetry) -> list[str]:
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
