#!/usr/bin/env bash
# A side venv with SAELens and sparsify (sae-lens, eai-sparsify from PyPI) on the CPU torch, for the
# interoperability tests (the real libraries load what we export), the fixtures and the benchmarks.
#
#   bash tools/setup_saelens_venv.sh [.venv_saelens]
#   DL_SAELENS_PYTHON=.venv_saelens/bin/python .venv/bin/python -m pytest -q tests/test_interop.py
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv_saelens}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
pin="$(mktemp)"
echo "torch==2.13.0" > "$pin"
"${pip[@]}" -c "$pin" sae-lens eai-sparsify
rm -f "$pin"
venv_python="$(cd "$venv" && pwd)/bin/python"
(cd /tmp && "$venv_python" -c "import sae_lens, sparsify; print('sae-lens', sae_lens.__version__, 'and sparsify ready')")
