#!/usr/bin/env bash
# The main job on its built-in default: the drift profiler on small models and scikit-learn's digits.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" all
cd "$ROOT"
exec python -m consopt profile "$@"
