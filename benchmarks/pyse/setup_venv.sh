#!/usr/bin/env bash
# Make a separate virtual environment with PySE (radio-pyse), never a trap-dask dependency.
# Usage: benchmarks/pyse/setup_venv.sh [VENV_DIR]   (default: benchmarks/.venv-pyse)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/../.venv-pyse}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "radio-pyse==0.7.1"
"$venv/bin/python" -c "import sourcefinder; print('PySE installed in $venv')"
