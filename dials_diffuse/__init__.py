"""dials_diffuse: corrected, scaled and merged 3-D maps of diffuse X-ray scattering.

Conventions used in every module (see docs/CONVENTIONS.md):

* reciprocal space in DIALS s-space: |s0| = 1/lambda, q = s1 - s0, |q| = 1/d,
  units 1/Angstrom, no factor 2*pi anywhere;
* pixel centres at (i + 0.5, j + 0.5) in (fast, slow) pixel coordinates;
  per-panel arrays have shape (slow, fast), flattened in C order;
* masks: True means "use this pixel" (as dxtbx's get_mask);
* fractional Miller indices hkl = M^-1 q with M the full setting matrix of the
  image (A for a still, S R(phi) F A for a rotation image);
* experiment (still) ids are 0-based indices into the experiment list.
"""

import os

# cctbx finds its build tree relative to sys.prefix, which a venv changes.
os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")

__version__ = "0.1.0"
