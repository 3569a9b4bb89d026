#!/usr/bin/env bash
# Run the whole test suite in a self-bootstrapped virtual environment (.venv).
# Triton kernels run on the CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
cd "$ROOT"
exec python -m pytest "$@"
