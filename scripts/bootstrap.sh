#!/usr/bin/env bash
# Idempotent installer behind both README commands: Debian's DIALS, a venv
# that sees it, and this package (editable, with test extras). Prints nothing
# when everything is already in place.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$here/.venv"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# python3-xraylib: incoherent scattering functions (absolute scale, Compton);
# python3-numba: the compiled per-pixel kernel of the extraction (Debian's,
# built for Debian's numpy; the extraction falls back to numpy without it)
if ! /usr/bin/python3 -c "import dials, dxtbx, cctbx, scitbx, xraylib, numba" >/dev/null 2>&1 \
   || ! command -v dials.import >/dev/null 2>&1; then
  echo "bootstrap: installing Debian's dials, xraylib and numba (about 2 minutes)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dials python3-venv python3-xraylib python3-numba >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi

# cctbx looks for its build tree relative to sys.prefix; in a venv it must be
# told where Debian put it. A .pth line runs at every interpreter start-up, so
# console scripts, pytest and dials.python-style use all work unexported.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
pth="$site/dials_diffuse_libtbx.pth"
line="import os; os.environ.setdefault('LIBTBX_BUILD', '/usr/lib/cctbx/python3.11')"
if [ ! -f "$pth" ] || [ "$(cat "$pth")" != "$line" ]; then
  echo "$line" > "$pth"
fi

stamp="$venv/.installed-$(cat "$here/setup.py" "$here/pyproject.toml" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing dials_diffuse into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here[test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
