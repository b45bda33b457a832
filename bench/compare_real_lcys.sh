#!/usr/bin/env bash
# One command for the map comparison on real data (issue 14, item 3): one
# L-cysteine sweep of ../shared/data/l_cysteine_rotation processed with DIALS,
# then with our chain and with mdx2 (installed into bench/.mdx2-venv when
# missing), the two maps compared on their common voxels. Writes
# bench/results/maps_lcys_sweep<s>_ndiv<n>.json. Arguments go to
# compare_real_lcys.py (--sweep, --ndiv, --count-threshold).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/bootstrap.sh"
export LIBTBX_BUILD=/usr/lib/cctbx/python3.11
uptime
exec "$here/.venv/bin/python" "$here/bench/compare_real_lcys.py" "$@"
