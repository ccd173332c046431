#!/usr/bin/env bash
# The slow convergence tier (minutes to tens of minutes on 2 cores; CI runs reduced
# versions in trainer/tests/images.rs and launch.rs). Prints one table:
#   - ResNet-18 from random weights on Fashion-MNIST (examples/resnet-fashion-pretrain.yaml),
#     then fine-tuned on MNIST-5k with the stem and first stage frozen
#     (examples/resnet-mnist.yaml), beside the same fine-tuning from random weights;
#   - distillation on SMS spam (the PyTorch baseline's split,
#     ../shared/bench-baselines/reference/spam_split.json): a 2-layer MiniLM student
#     distilled from the fine-tuned 6-layer MiniLM (examples/bert-spam.yaml) against the
#     same student trained alone for the same steps;
#   - with TORCH_PYTHON (a Python with torch + transformers), the teacher's best/ loaded
#     by transformers unchanged must score the validation file as ringmaster did
#     (trainer/benches/check_transformers.py).
# Usage: [TORCH_PYTHON=venv/bin/python] trainer/benches/convergence.sh [OUT_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
"$repo/examples/fetch-data.sh" --fashion-mnist >/dev/null 2>&1
cargo build --release --quiet -p ringmaster-trainer --manifest-path "$repo/Cargo.toml"
ringmaster="$repo/target/release/ringmaster"
examples="$repo/examples"

# The baseline's split as two TSV files.
python3 "$(dirname "$0")/spam_split.py" "$repo/../shared/bench-baselines/reference/spam_split.json" \
  "$examples/data/spam_collection.tsv" "$out/spam-train.tsv" "$out/spam-val.tsv"
spam=(--set "data.train=$out/spam-train.tsv" --set "data.validation=$out/spam-val.tsv")

run() { # name, then launch arguments
  local name=$1; shift
  local start=$SECONDS
  "$ringmaster" launch "$@" --output "$out/$name" >"$out/$name.log" 2>&1 ||
    { echo "$name failed, see $out/$name.log" >&2; tail -5 "$out/$name.log" >&2; exit 1; }
  python3 - "$out/$name/metrics.jsonl" "$name" $((SECONDS - start)) <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
best = max(l["validation"]["accuracy"] for l in lines)
last = lines[-1]["validation"]
print(f"| {sys.argv[2]} | {last['accuracy']:.4f} | {best:.4f} | {last['macro_f1']:.4f} | {lines[-1]['step']} | {sys.argv[3]} |")
PY
}

printf '| run | final accuracy | best accuracy | final macro-F1 | steps | seconds |\n|---|---|---|---|---|---|\n'
run fashion-pretrain "$examples/resnet-fashion-pretrain.yaml"
run mnist-finetuned "$examples/resnet-mnist.yaml" --set "model.source=$out/fashion-pretrain"
run mnist-from-random "$examples/resnet-mnist.yaml" --set model.source=random:resnet18 --set 'model.freeze=[]'
run spam-teacher-6-layers "$examples/bert-spam.yaml" "${spam[@]}"
run spam-student-2-layers-distilled "$examples/bert-spam.yaml" "${spam[@]}" --set model.layers=2 \
  --set "training.distillation={teacher: $out/spam-teacher-6-layers, temperature: 2.0, alpha: 0.5}"
run spam-student-2-layers-alone "$examples/bert-spam.yaml" "${spam[@]}" --set model.layers=2

if [[ -n "${TORCH_PYTHON:-}" ]]; then
  teacher="$out/spam-teacher-6-layers"
  expected=$(python3 -c 'import json,sys; print(max(json.loads(l)["validation"]["accuracy"] for l in open(sys.argv[1])))' "$teacher/metrics.jsonl")
  "$TORCH_PYTHON" "$(dirname "$0")/check_transformers.py" "$teacher/best" "$out/spam-val.tsv" 64 "$expected"
fi
