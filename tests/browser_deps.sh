#!/usr/bin/env bash
# System and Python deps of tests/test_playground.py (the playground driven in a real headless browser):
# Debian's chromium from apt, and Playwright for Python from PyPI. Never `playwright install`: it downloads a
# browser build of its own, which cannot work offline; the test points Playwright at /usr/bin/chromium.
# Run it in the environment pytest uses (CI: after activating .venv): `bash tests/browser_deps.sh`.
set -euo pipefail

if [ ! -x /usr/bin/chromium ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # fonts-dejavu-core: a font for page text (the page loads no web fonts)
  $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
/usr/bin/chromium --version

PY="${PYTHON:-python}"
if ! "$PY" -c "import playwright" 2>/dev/null; then
  "$PY" -m pip install -q "playwright>=1.40"
fi
"$PY" -c 'from importlib.metadata import version; print("playwright", version("playwright"))'
