#!/usr/bin/env bash
# A side venv on the CPU torch 2.13.0 holding packages that cannot share our venv (each pins its own
# versions of nnsight, transformers, ...). Used by setup_reference_venv.sh and setup_saelens_venv.sh.
#
#   bash tools/setup_side_venv.sh VENV "PYTHON CHECK" PACKAGE...
set -euo pipefail
venv="$1"
check="$2"
shift 2
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
pin="$(mktemp)"
echo "torch==2.13.0" > "$pin"
"${pip[@]}" -c "$pin" "$@"
rm -f "$pin"
# nnsight 0.3.x pulls a torchvision that breaks every import on this torch; nothing here needs one.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision || true
venv_python="$(cd "$venv" && pwd)/bin/python"
(cd /tmp && "$venv_python" -c "$check")
