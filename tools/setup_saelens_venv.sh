#!/usr/bin/env bash
# A side venv with SAELens and sparsify (sae-lens, eai-sparsify from PyPI), for the interoperability
# tests (the real libraries load what we export), their fixtures and the benchmarks.
#
#   bash tools/setup_saelens_venv.sh [.venv_saelens]
#   DL_SAELENS_PYTHON=.venv_saelens/bin/python .venv/bin/python -m pytest -q tests/test_interop.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_side_venv.sh "${1:-.venv_saelens}" \
    "import sae_lens, sparsify; print('sae-lens', sae_lens.__version__, 'and sparsify ready')" \
    sae-lens eai-sparsify
