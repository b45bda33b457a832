"""Why the per-pixel core stays numpy: the two hot operations of the
per-image work on a Pilatus-6M-sized set of pixels (6.2 M), in numpy (as the
extraction does them) and in flex (scitbx), and the cost of handing a
result to DIALS as flex (dials_diffuse.api).

  python bench/numpy_vs_flex.py [n_pixels]

1. fractional hkl = M^-1 q of every pixel (matrix times vec3 column);
2. corrected intensity and variance: (counts * gain - bg) / factor,
   counts * gain / factor^2;
3. the conversion of one (n, 3) float64 array and one (n,) array to
   flex.vec3_double / flex.double (flumpy, as api.extract_image does: a
   view of the numpy memory where the dtype and layout allow, so almost free).
"""

import sys
import time

import numpy as np
from dxtbx import flumpy
from scitbx import matrix

from dials.array_family import flex


def best(func, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(n=2463 * 2527):
    rng = np.random.default_rng(0)
    q = rng.random((n, 3)) - 0.5
    m_inv = rng.random((3, 3))
    counts = rng.poisson(20, n).astype(np.float64)
    factor = rng.random(n) + 0.5
    bg = rng.random(n)
    q_flex = flex.vec3_double(flumpy.vec_from_numpy(q))
    counts_f, factor_f, bg_f = (flumpy.from_numpy(a.copy()) for a in (counts, factor, bg))
    m_sqr = matrix.sqr(m_inv.ravel().tolist())
    gain = 1.3

    rows = [
        # the fastest flex form (C++ vec3 x mat3); matrix.sqr * vec3_double is slower still
        ("hkl = M^-1 q", best(lambda: q @ m_inv.T), best(lambda: q_flex * m_sqr.transpose().elems)),
        ("I, var", best(lambda: ((counts * gain - bg) / factor, counts * gain / factor**2)),
         best(lambda: ((counts_f * gain - bg_f) / factor_f,
                       counts_f * gain / (factor_f * factor_f)))),
    ]
    t_conv = best(lambda: (flex.vec3_double(flumpy.vec_from_numpy(q)), flumpy.from_numpy(counts)))
    print(f"{n} pixels, best of 3 (s):")
    for name, t_np, t_flex in rows:
        print(f"  {name:14s} numpy {t_np:.3f}  flex {t_flex:.3f}  (flex/numpy {t_flex / t_np:.1f}x)")
    print(f"  numpy -> flex conversion of a vec3 and a double column: {t_conv:.3f}"
          f" ({t_conv / n * 1e6:.3f} s per million pixels)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
