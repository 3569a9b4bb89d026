# Bootstrap .venv in the repository root (sourced by main.sh and test.sh).
# CPU-only machines get torch's CPU build; machines with an NVIDIA driver get the default (CUDA) build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CONSOPT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.consopt-installed-$1"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    $PIP install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            $PIP install -q torch
        else
            # CPU build: on this project's machines pip finds it on local disk; elsewhere the CPU index serves it.
            $PIP install -q torch==2.13.0 2>/dev/null \
                || $PIP install -q torch --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
    $PIP install -q -e "$ROOT[$1]"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
