#!/usr/bin/env bash
# Creates a virtual environment (default .venv, or $VENV) with torch, this project (its C++
# extension compiled against that torch, hence --no-build-isolation) and the test and
# training tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
export PATH="$PWD/$VENV/bin:$PATH"  # the build finds the venv's ninja
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first (the CPU wheel; a CUDA machine can install its own torch before running this),
# plus what building without isolation needs.
"${PIP[@]}" torch==2.13.0 "setuptools>=64" wheel ninja
# The Triton releases the kernels are tested with (interpreter on CPU, ahead-of-time compile):
# the same range as pyproject.toml's triton extra (docs/triton_static_check.md says why).
"${PIP[@]}" "triton>=3.7,<3.8"
"${PIP[@]}" --no-build-isolation -e ".[test]"
echo "environment ready: $VENV"
