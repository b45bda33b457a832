"""The parts of DIALS programs that dials_diffuse calls as a library.

DIALS keeps some library entry points and the PHIL scopes of its programs in
its ``dials`` command modules (``dials.find_spots``, ``dials.index``,
``dials.refine``, ``dials.integrate``). This module is the one place that
imports them; everything else in dials_diffuse imports these names from here.
(dials_diffuse's own commands are never imported by the
library: they include the library's scopes, see :mod:`dials_diffuse.phil_scopes`.)

Importing this module costs about 0.9 s (DIALS' indexing, refinement and
integration programs); modules needing it only on one path import it there.
"""

from dials.command_line import find_spots as _find_spots
from dials.command_line import index as _index
from dials.command_line import integrate as _integrate
from dials.command_line import refine as _refine

#: dials.find_spots' working PHIL scope
find_spots_phil = _find_spots.working_phil
#: dials.index's working PHIL scope and master scope (with its output files)
index_phil = _index.working_phil
index_master_phil = _index.phil_scope
#: dials.refine's working PHIL scope
refine_phil = _refine.working_phil
#: dials.index's library entry: index(experiments, reflections, params)
index = _index.index
#: dials.refine's library entry (calls sys.exit() on some failures)
run_dials_refine = _refine.run_dials_refine
#: dials.integrate's reference-profile helpers (sigma_b, sigma_m from spots)
filter_reference_pixels = _integrate.filter_reference_pixels
process_reference = _integrate.process_reference
#: the logger name of DIALS' programs
PROGRAMS_LOGGER = _index.__name__.rsplit(".", 1)[0]
