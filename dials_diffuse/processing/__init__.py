"""Phase 1 processing with the DIALS Python API: import, spot finding, indexing.

Library functions behind phase 1 of ``dials.diffuse_process``.  No
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

Modules: :mod:`.params` (defaults, override handling), :mod:`.spots`
(import, spot finding), :mod:`.stills` (stills indexing), :mod:`.refine`
(shared-detector and sequence refinement).
"""

from dials_diffuse.processing.params import (
    DEFAULT_STILLS_INDEXING,
    DEFAULT_STILLS_SPOTFINDING,
    MIN_SPOTS_TO_INDEX,
    make_params,
)
from dials_diffuse.processing.refine import index_and_refine_sequence, refine_shared_detector
from dials_diffuse.processing.spots import find_spots, import_images
from dials_diffuse.processing.stills import (
    INDEXING_SEED,
    ImageIndexingReport,
    StillsIndexingResult,
    index_stills,
)

__all__ = [
    "DEFAULT_STILLS_INDEXING",
    "DEFAULT_STILLS_SPOTFINDING",
    "INDEXING_SEED",
    "ImageIndexingReport",
    "MIN_SPOTS_TO_INDEX",
    "StillsIndexingResult",
    "find_spots",
    "import_images",
    "index_and_refine_sequence",
    "index_stills",
    "make_params",
    "refine_shared_detector",
]
