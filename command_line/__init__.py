"""The dials.diffuse_* commands: each parses its PHIL parameters, calls the
library and writes. Importing the package defers scikit-learn and pandas,
which DIALS' option parser imports and these commands never use
(:mod:`dials_diffuse.startup`), and keeps OpenBLAS to one thread (the
commands' parallelism is mp.nproc)."""

from dials_diffuse.startup import defer_heavy_imports, single_threaded_blas

single_threaded_blas()  # before numpy is imported
defer_heavy_imports()
