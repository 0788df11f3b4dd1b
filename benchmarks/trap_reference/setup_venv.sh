#!/usr/bin/env bash
# Install the reference pipeline, trap 1.4.0 from PyPI, in its own virtual environment.
# It is never a trap-dask dependency: the venv lives outside the repository.
# Usage: benchmarks/trap_reference/setup_venv.sh [VENV_DIR]   (default /tmp/trap14-venv)
set -euo pipefail
venv="${1:-${TRAP14_VENV:-/tmp/trap14-venv}}"
python="${PYTHON:-python3.11}"
if [[ -x "$venv/bin/trap-run" ]]; then
    echo "trap 1.4.0 already installed in $venv"
    exit 0
fi
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "trap==1.4.0" psutil
"$venv/bin/python" -c "import importlib.metadata as m; print('trap', m.version('trap'), 'installed in $venv')"
