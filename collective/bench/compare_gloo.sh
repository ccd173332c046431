#!/usr/bin/env bash
# Side-by-side all-reduce benchmark: torch.distributed Gloo (bench-baselines/allreduce_bench.py)
# against the ringmaster ring with each bulk-data transport, same machine, same run, same sizes
# and definitions:
#   ring tcp   RINGMASTER_TRANSPORT=tcp: loopback TCP between the ranks, like Gloo
#   ring auto  the default: ranks on one host share memory (/dev/shm) for bulk data
# Prints a markdown table with busbw ratios (ring / Gloo) and the noise of every run.
#
# Needs a Python venv with torch (never in CI), e.g.
#   python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch numpy
# Usage: collective/bench/compare_gloo.sh [extra args for all sides, e.g. --max-bytes 67108864]
# Env: TORCH_PY (default /tmp/venv-torch/bin/python), BASELINES (default ../shared/bench-baselines
#      beside the repository), CARGO_TARGET_DIR (honoured, as cargo does),
#      WORLD_SIZES (default 2,4), ROUNDS (default 1; >1 rotates which side runs first),
#      QUIET_WAIT_S (default 120: before each run, wait up to this long for a quiet machine; 0 = no wait).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TORCH_PY="${TORCH_PY:-/tmp/venv-torch/bin/python}"
BASELINES="${BASELINES:-$ROOT/../shared/bench-baselines}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
WORLD_SIZES="${WORLD_SIZES:-2,4}"
ROUNDS="${ROUNDS:-1}"
QUIET_WAIT_S="${QUIET_WAIT_S:-120}"

WORK="$(mktemp -d /tmp/ringmaster-gloo-XXXXXX)"
cp -r "$BASELINES"/. "$WORK/"
mkdir -p "$WORK/results"
(cd "$ROOT" && cargo build --release -q -p ringmaster-collective --bin ringmaster-allreduce-bench)
cp "$TARGET_DIR/release/ringmaster-allreduce-bench" "$WORK/"
cd "$WORK"

quiet() {
  [ "$QUIET_WAIT_S" = 0 ] && return 0
  "$TORCH_PY" wait_quiet.py --window 5 --max-cores 0.1 --timeout "$QUIET_WAIT_S" >&2 || true
}
# The ring's processes run from this folder, so the baselines' CpuMonitor counts only
# other processes as foreign, as it does for the Gloo script.
monitored() {
  local label="$1" w="$2"; shift 2
  "$TORCH_PY" - "$label" "$w" "$@" <<'PY'
import json, subprocess, sys, time
from common import CpuMonitor
label, w, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
t0 = time.monotonic()
with CpuMonitor(interval=0.5) as m:
    rc = subprocess.call(cmd)
with open("results/monitor.jsonl", "a") as f:
    f.write(json.dumps({"side": label, "world_size": w, "wall_s": time.monotonic() - t0, **m.summary()}) + "\n")
sys.exit(rc)
PY
}
gloo() { quiet; "$TORCH_PY" allreduce_bench.py --world-sizes "$1" --json results/gloo.jsonl "${@:2}" >&2; }
ring() {
  local transport="$1" w="$2"; shift 2
  quiet
  RINGMASTER_TRANSPORT="$transport" monitored "ring-$transport" "$w" \
    ./ringmaster-allreduce-bench --world-sizes "$w" --json "results/ring-$transport.jsonl" "$@" >&2
}

for round in $(seq 1 "$ROUNDS"); do
  for w in ${WORLD_SIZES//,/ }; do
    case $(( (round + w) % 3 )) in
      0) gloo "$w" "$@"; ring tcp "$w" "$@"; ring auto "$w" "$@" ;;
      1) ring tcp "$w" "$@"; ring auto "$w" "$@"; gloo "$w" "$@" ;;
      2) ring auto "$w" "$@"; gloo "$w" "$@"; ring tcp "$w" "$@" ;;
    esac
  done
done

python3 - results <<'PY'
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
t = load("ring-tcp.jsonl", "ringmaster_tcp_allreduce")
a = load("ring-auto.jsonl", "ringmaster_tcp_allreduce")
def hb(b):
    for u, s in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if b >= 1 << u and b % (1 << u) == 0:
            return f"{b >> u} {s}"
    return f"{b} B"
med = lambda rows, k: statistics.median(r[k] for r in rows)
print("| ranks | size | Gloo median (us) | ring tcp median (us) | ring auto median (us) | Gloo busbw (GB/s) | ring tcp busbw (GB/s) | ring auto busbw (GB/s) | auto transport | tcp / Gloo | auto / Gloo | check |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|:---|---:|---:|:---:|")
for key in sorted(set(g) & set(t) & set(a)):
    gm, tm, am = med(g[key], "median_s"), med(t[key], "median_s"), med(a[key], "median_s")
    gb, tb, ab = med(g[key], "busbw_GBps"), med(t[key], "busbw_GBps"), med(a[key], "busbw_GBps")
    ok = all(r["correct"] for r in g[key] + t[key] + a[key])
    via = "/".join(sorted({r["transport"] for r in a[key]}))
    print(f"| {key[0]} | {hb(key[1])} | {gm*1e6:.1f} | {tm*1e6:.1f} | {am*1e6:.1f} | {gb:.3f} | {tb:.3f} | {ab:.3f} | {via} | {gm/tm:.2f}x | {gm/am:.2f}x | {'ok' if ok else 'FAIL'} |")
print("\nNoise: CPU seconds used by other processes during each run (foreign_cpu_s), per side and world size:")
noise = collections.defaultdict(list)
for line in open(f"{d}/gloo.jsonl"):
    r = json.loads(line)
    if r.get("bench") == "gloo_allreduce_monitor":
        noise[("gloo", r["world_size"])].append((r["foreign_cpu_s"], r.get("wall_s")))
for line in open(f"{d}/monitor.jsonl"):
    r = json.loads(line)
    noise[(r["side"], r["world_size"])].append((r["foreign_cpu_s"], r.get("wall_s")))
for (side, w), v in sorted(noise.items()):
    runs = ", ".join(f"{f:.1f} s of {s:.1f} s" if s else f"{f:.1f} s" for f, s in v)
    print(f"- {side}, {w} ranks: {runs}")
print(f"\n(raw JSON lines in {d}; ratio = Gloo median time / ring median time = busbw ratio)")
PY
