#!/usr/bin/env bash
# The main job on the built-in default dataset: simulate it (once), then
# extract, merge and check it. Installs whatever is missing first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/bootstrap.sh"
bin="$here/.venv/bin"
run_dir="${1:-$here/diffuse_default_run}"
mkdir -p "$run_dir"
cd "$run_dir"
if [ ! -f simulated/truth.expt ]; then
  "$bin/dials.diffuse_simulate" output.directory=simulated mode=stills n_images=8
fi
"$bin/dials.diffuse_extract" simulated/truth.expt output.directory=diffuse_extracted output.masks=True
"$bin/dials.diffuse_merge" simulated/truth.expt diffuse_extracted output.directory=diffuse_merged
if [ -x "$bin/dials.diffuse_check" ]; then
  "$bin/dials.diffuse_check" simulated/truth.expt diffuse_extracted output.directory=extraction_visual_check
  "$bin/dials.diffuse_check" diffuse_merged output.directory=phase3_diagnostics
  echo "Report pages: $run_dir/extraction_visual_check/dials.diffuse_check.html and $run_dir/phase3_diagnostics/dials.diffuse_check.html"
fi
echo "Simulated dataset: $run_dir/simulated; merged map: $run_dir/diffuse_merged"
