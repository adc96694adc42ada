#!/usr/bin/env bash
# Creates a virtual environment (default .venv, or $VENV) with torch, this project and the
# test and training tools, then compiles the C++ extension against that torch. Safe to re-run:
# pip reinstalls in seconds and the compile is incremental (nothing to do when csrc/ is unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first (the CPU wheel; a CUDA machine can install its own torch before running this).
"${PIP[@]}" torch==2.13.0
# The Triton releases the kernels are tested with (interpreter on CPU, ahead-of-time compile):
# the same range as pyproject.toml's triton extra (docs/triton_static_check.md says why).
"${PIP[@]}" "triton>=3.7,<3.8"
"${PIP[@]}" -e ".[test]"
# The first import compiles csrc/ (where: piumr_kernels/_extension.py); then the summary.
# A failed compile fails the setup: the tests would otherwise skip the cpp backend.
"$VENV/bin/python" -m piumr_kernels --require cpp
echo "environment ready: $VENV"
