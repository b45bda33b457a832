"""The dials.diffuse_* commands: each parses its PHIL parameters, calls the
library and writes. Importing the package defers scikit-learn and pandas,
which DIALS' option parser imports and these commands never use
(:mod:`dials_diffuse.startup`)."""

from dials_diffuse.startup import defer_heavy_imports

defer_heavy_imports()
