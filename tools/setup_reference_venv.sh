#!/usr/bin/env bash
# A side venv with the reference package (dictionary-learning 0.1.0 from PyPI), for the
# compatibility tests and benchmarks. It needs nnsight 0.3.x, so it cannot share our venv, and
# torchvision must go (nnsight 0.3.7 pulls one that breaks every import on this torch).
#
#   bash tools/setup_reference_venv.sh [.venv_reference]
#   DL_REFERENCE_PYTHON=.venv_reference/bin/python .venv/bin/python -m pytest -q -m reference
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv_reference}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
pin="$(mktemp)"
echo "torch==2.13.0" > "$pin"
"${pip[@]}" -c "$pin" dictionary-learning==0.1.0
rm -f "$pin"
"$venv/bin/python" -m pip uninstall --quiet -y torchvision || true
venv_python="$(cd "$venv" && pwd)/bin/python"
(cd /tmp && "$venv_python" -c "import dictionary_learning.trainers, dictionary_learning.utils; print('reference package ready')")
