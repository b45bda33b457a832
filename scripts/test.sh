#!/usr/bin/env bash
# Install whatever is missing, then run the test suite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/bootstrap.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest "$@"
