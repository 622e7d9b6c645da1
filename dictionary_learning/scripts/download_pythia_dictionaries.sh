#!/usr/bin/env bash
# Download the published Pythia-70m-deduped dictionaries (the "10_32768" set: 19 AutoEncoders,
# 512 -> 32768, about 2.5 GB) from the Hugging Face Hub and unpack them as
#
#   dictionaries/pythia-70m-deduped/{embed,attn_out_layer0-5,mlp_out_layer0-5,resid_out_layer0-5}/10_32768/
#       ae.pt  config.json
#
# Usage: bash pretrained_dictionary_downloader.sh [DEST_DIR]     (default: the current folder)
# An interrupted download resumes when the script is run again. Load a result with
#   from dictionary_learning import load_dictionary
#   ae, config = load_dictionary("dictionaries/pythia-70m-deduped/mlp_out_layer3/10_32768")
# DL_PRETRAINED_URL overrides the source (a mirror, or a file:// URL).
set -euo pipefail

url="${DL_PRETRAINED_URL:-https://huggingface.co/saprmarks/pythia-70m-deduped-saes/resolve/main/dictionaries_pythia-70m-deduped_10.zip}"
dest="${1:-.}"
zip="$dest/dictionaries_pythia-70m-deduped_10.zip"
root="$dest/dictionaries/pythia-70m-deduped"
sites=(embed)
for i in 0 1 2 3 4 5; do sites+=("attn_out_layer$i" "mlp_out_layer$i" "resid_out_layer$i"); done

missing() {
    local site
    for site in "${sites[@]}"; do
        for file in ae.pt config.json; do
            [ -s "$root/$site/10_32768/$file" ] || echo "$site/10_32768/$file"
        done
    done
}

if [ -z "$(missing)" ]; then
    echo "all ${#sites[@]} dictionaries are already in $root"
    exit 0
fi

mkdir -p "$dest"
if [ ! -s "$zip" ]; then
    echo "downloading $url (about 2.5 GB; rerun to resume if interrupted)"
    if command -v curl >/dev/null; then
        fetch=(curl --fail --location --retry 3 --continue-at - --output "$zip.part" "$url")
    else
        fetch=(wget --continue --tries=3 --output-document="$zip.part" "$url")
    fi
    if ! "${fetch[@]}"; then
        echo "error: could not download $url. Is the Hugging Face Hub reachable from this machine?" \
             "Rerun this script when it is; the partial download in $zip.part will be resumed." >&2
        exit 1
    fi
    mv "$zip.part" "$zip"
fi

echo "unpacking $zip"
# Unpack and check in a scratch folder, then move into place: an interrupted unpack never leaves
# a folder that looks complete.
scratch="$dest/.unpacking"
rm -rf "$scratch"
if ! "${PYTHON:-python3}" -m zipfile -e "$zip" "$scratch"; then
    rm -rf "$scratch"
    echo "error: $zip is not a valid zip archive (corrupted download?). Delete it and rerun." >&2
    exit 1
fi
still_missing="$(root="$scratch/dictionaries/pythia-70m-deduped" missing)"
if [ -n "$still_missing" ]; then
    rm -rf "$scratch"
    echo "error: the archive lacks these files:" >&2
    echo "$still_missing" >&2
    exit 1
fi
mkdir -p "$dest/dictionaries"
rm -rf "$root"
mv "$scratch/dictionaries/pythia-70m-deduped" "$root"
rm -rf "$scratch" "$zip"
echo "done: ${#sites[@]} dictionaries in $root"
