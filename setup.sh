#!/usr/bin/env bash
# Creates .venv and installs EmoLoRA's dependencies. torch is installed only where it is missing (an existing
# CUDA build is kept: the venv sees the system's packages); --dev adds the test tools and Debian's chromium.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
py=.venv/bin/python
$py -c "import torch" 2>/dev/null || $py -m pip install -q "torch==2.13.0"
$py -m pip install -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  $py -m pip install -q -r requirements-dev.txt
  # The browser tests drive Debian's chromium (playwright never downloads a browser); without it they skip
  # (and fail under CI=true).
  if ! command -v chromium >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && sudo="sudo -n"; }
    if { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; } && command -v apt-get >/dev/null; then
      $sudo apt-get update -qq
      $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
    else
      echo "note: chromium is not installed: the browser tests will be skipped (and fail under CI=true)" >&2
    fi
  fi
fi
