#!/usr/bin/env bash
# All benchmarks in turn: extraction per image, merge throughput, side by side.
# Check `uptime` first: timings are only meaningful on an otherwise idle machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/bootstrap.sh"
export LIBTBX_BUILD=/usr/lib/cctbx/python3.11
uptime
"$here/.venv/bin/python" "$here/bench/bench_extract.py"
"$here/.venv/bin/python" "$here/bench/bench_merge.py"
"$here/.venv/bin/python" "$here/bench/bench_vs_mdx2.py" "$@"
