#!/usr/bin/env bash
# A side venv with the reference package (dictionary-learning 0.1.0 from PyPI), for the
# compatibility tests and benchmarks. It needs nnsight 0.3.x, so it cannot share our venv.
#
#   bash tools/setup_reference_venv.sh [.venv_reference]
#   DL_REFERENCE_PYTHON=.venv_reference/bin/python .venv/bin/python -m pytest -q -m reference
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_side_venv.sh "${1:-.venv_reference}" \
    "import dictionary_learning.trainers, dictionary_learning.utils; print('reference package ready')" \
    dictionary-learning==0.1.0
