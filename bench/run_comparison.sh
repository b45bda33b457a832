#!/usr/bin/env bash
# One command for the side-by-side benchmark of issue 7 (dials_diffuse vs mdx2
# vs dials.rs_mapper). Installs what is missing (the project's bootstrap, mdx2
# into bench/.mdx2-venv), simulates the images once, prints the table and
# writes bench/results/comparison_<n>.json. After the timings it compares the
# maps (bench/compare_maps.py: common voxels, CC total/anisotropic, against the
# simulator's truth; docs/MDX2_COMPARISON.md). Arguments go to bench_vs_mdx2.py,
# e.g. --n-images 10 for a smoke run, --no-background for the truth check.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/bootstrap.sh"
export LIBTBX_BUILD=/usr/lib/cctbx/python3.11
uptime
exec "$here/.venv/bin/python" "$here/bench/bench_vs_mdx2.py" "$@"
