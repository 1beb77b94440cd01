#!/usr/bin/env bash
# One-step set-up on a fresh machine: CPU torch first (so nothing pulls a CUDA build), then the
# package with its pinned dependencies. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -e '.[test]'
