#!/usr/bin/env bash
# Download the published Pythia-70m-deduped dictionaries (10_32768 set, ~2.5 GB) into
# dictionaries/pythia-70m-deduped/. Same as `python -m dictionary_learning download [DEST]`;
# the implementation ships inside the package (dictionary_learning/scripts/).
exec bash "$(dirname "$0")/dictionary_learning/scripts/download_pythia_dictionaries.sh" "$@"
