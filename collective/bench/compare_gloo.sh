#!/usr/bin/env bash
# Side-by-side all-reduce benchmark: torch.distributed Gloo (bench-baselines/allreduce_bench.py)
# against the ringmaster TCP ring, same machine, same run, same sizes and definitions.
# Prints a markdown table with busbw ratios (ring / Gloo) and 1 KiB latency.
#
# Needs a Python venv with torch (never in CI), e.g.
#   python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch numpy
# Usage: collective/bench/compare_gloo.sh [extra args for both, e.g. --max-bytes 67108864]
# Env: TORCH_PY (default /tmp/venv-torch/bin/python), BASELINES (default /work/shared/bench-baselines),
#      WORLD_SIZES (default 2,4), ROUNDS (default 1; >1 alternates which side runs first).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TORCH_PY="${TORCH_PY:-/tmp/venv-torch/bin/python}"
BASELINES="${BASELINES:-/work/shared/bench-baselines}"
WORLD_SIZES="${WORLD_SIZES:-2,4}"
ROUNDS="${ROUNDS:-1}"

WORK="$(mktemp -d /tmp/ringmaster-gloo-XXXXXX)"
cp -r "$BASELINES"/. "$WORK/"
mkdir -p "$WORK/results"
(cd "$ROOT" && cargo build --release -q -p ringmaster-collective --bin ringmaster-allreduce-bench)
RING="$ROOT/target/release/ringmaster-allreduce-bench"

for round in $(seq 1 "$ROUNDS"); do
  for w in ${WORLD_SIZES//,/ }; do
    gloo() { (cd "$WORK" && "$TORCH_PY" allreduce_bench.py --world-sizes "$w" --json "$WORK/results/gloo.jsonl" "$@" >&2); }
    ring() { "$RING" --world-sizes "$w" --json "$WORK/results/ring.jsonl" "$@" >&2; }
    if [ $(( (round + w) % 2 )) -eq 0 ]; then gloo "$@"; ring "$@"; else ring "$@"; gloo "$@"; fi
  done
done

python3 - "$WORK/results" <<'PY'
import json, sys, statistics, collections
d = sys.argv[1]
def load(name, bench):
    out = collections.defaultdict(list)
    for line in open(f"{d}/{name}"):
        r = json.loads(line)
        if r.get("bench") == bench:
            out[(r["world_size"], r["bytes"])].append(r)
    return out
g = load("gloo.jsonl", "gloo_allreduce")
t = load("ring.jsonl", "ringmaster_tcp_allreduce")
def hb(b):
    for u, s in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if b >= 1 << u and b % (1 << u) == 0:
            return f"{b >> u} {s}"
    return f"{b} B"
print("| ranks | size | Gloo median (us) | ring median (us) | Gloo busbw (GB/s) | ring busbw (GB/s) | ring / Gloo | check |")
print("|---:|---:|---:|---:|---:|---:|---:|:---:|")
for key in sorted(set(g) & set(t)):
    gm = statistics.median(r["median_s"] for r in g[key]); tm = statistics.median(r["median_s"] for r in t[key])
    gb = statistics.median(r["busbw_GBps"] for r in g[key]); tb = statistics.median(r["busbw_GBps"] for r in t[key])
    ok = all(r["correct"] for r in g[key] + t[key])
    print(f"| {key[0]} | {hb(key[1])} | {gm*1e6:.1f} | {tm*1e6:.1f} | {gb:.3f} | {tb:.3f} | {gm/tm:.2f}x | {'ok' if ok else 'FAIL'} |")
print(f"\n(raw JSON lines in {d}; ratio = Gloo median time / ring median time = busbw ratio)")
PY
