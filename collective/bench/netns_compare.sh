#!/usr/bin/env bash
# The ring against Gloo with every rank in its own network namespace, the namespaces joined
# by veth pairs on a bridge: each byte takes the kernel's whole network path (TCP/IP, veth,
# bridge), as between hosts, instead of loopback. Optionally rate-limited, equally for both
# sides (RATE, tbf on every veth end; this kernel has no netem, so no added delay). The ring
# is forced onto TCP (its shared-memory transport would find one host). Root.
# Prints a markdown table per world size: busbw of both and the ratio per size, plus the
# 1 KiB latency; ROUNDS > 1 alternates which side runs first and reports medians.
#   collective/bench/netns_compare.sh
# Env: TORCH_PY (default /tmp/venv-torch/bin/python), BASELINES (default
#      ../shared/bench-baselines beside the repository), WORLD_SIZES (2,4), RATE (e.g.
#      10gbit; empty: unshaped), MAX_BYTES (268435456), ROUNDS (1), CARGO_TARGET_DIR.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TORCH_PY="${TORCH_PY:-/tmp/venv-torch/bin/python}"
BASELINES="$(cd "${BASELINES:-$ROOT/../shared/bench-baselines}" && pwd)"
WORLD_SIZES="${WORLD_SIZES:-2,4}"
RATE="${RATE:-}"
MAX_BYTES="${MAX_BYTES:-268435456}"
ROUNDS="${ROUNDS:-1}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
MAX_RANKS=0
for w in ${WORLD_SIZES//,/ }; do ((w > MAX_RANKS)) && MAX_RANKS=$w; done

(cd "$ROOT" && cargo build --release -q -p ringmaster-collective --bin ringmaster-allreduce-bench)
BENCH="$TARGET_DIR/release/ringmaster-allreduce-bench"
# shellcheck source=netns.sh
source "$HERE/netns.sh"
WORK="$(mktemp -d /tmp/ringmaster-netns-XXXXXX)"
trap 'remove_namespaces "$MAX_RANKS"; rm -rf "$WORK"' EXIT
make_namespaces "$MAX_RANKS" "$RATE"

quiet() { (cd "$BASELINES" && "$TORCH_PY" wait_quiet.py --window 5 --max-cores 0.1 --timeout 120 >&2) || true; }

ring() { # world round
  local n=$1 out="$WORK/ring-$1-$2.txt" token port=29611 pids=()
  token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  for ((i = n - 1; i >= 0; i--)); do
    ip netns exec "rmb$i" env RANK="$i" WORLD_SIZE="$n" MASTER_ADDR="$(address 0)" MASTER_PORT="$port" \
      RINGMASTER_TOKEN="$token" RINGMASTER_TRANSPORT=tcp "$BENCH" rank --max-bytes "$MAX_BYTES" \
      >"$out.$i" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  grep RINGMASTER-BENCH-ROW "$out.0" >"$out"
}

gloo() { # world round
  local n=$1 out="$WORK/gloo-$1-$2.txt" port=29612 pids=()
  for ((i = n - 1; i >= 0; i--)); do
    ip netns exec "rmb$i" "$TORCH_PY" "$HERE/gloo_rank.py" "$BASELINES" --rank "$i" --world "$n" \
      --master "$(address 0)" --port "$port" --ifname eth0 --max-bytes "$MAX_BYTES" >"$out.$i" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  cp "$out.0" "$out"
}

for round in $(seq 1 "$ROUNDS"); do
  for w in ${WORLD_SIZES//,/ }; do
    if ((round % 2)); then quiet; ring "$w" "$round"; quiet; gloo "$w" "$round"
    else quiet; gloo "$w" "$round"; quiet; ring "$w" "$round"; fi
    echo "# world $w round $round done" >&2
  done
done

python3 - "$WORK" "$WORLD_SIZES" "$ROUNDS" <<'PY'
import glob, json, statistics, sys
work, worlds, rounds = sys.argv[1], [int(w) for w in sys.argv[2].split(",")], int(sys.argv[3])

def busbw(n, nbytes, median_s):
    return nbytes / median_s * 2 * (n - 1) / n / 1e9

def ring_rows(path):
    for line in open(path):
        _, n, nbytes, iters, median_s, min_s, correct, transport = line.split()
        assert transport == "tcp", f"the ring ran over {transport}, not TCP"
        yield int(nbytes), float(median_s), correct == "true"

def gloo_rows(path):
    for line in open(path):
        r = json.loads(line)
        yield r["bytes"], r["median_s"], r["correct"]

for n in worlds:
    sides = {}
    for side, read in (("ring", ring_rows), ("gloo", gloo_rows)):
        per_size = {}
        for r in range(1, rounds + 1):
            for nbytes, median_s, ok in read(f"{work}/{side}-{n}-{r}.txt"):
                assert ok, f"{side} world {n} size {nbytes}: wrong result"
                per_size.setdefault(nbytes, []).append(median_s)
        sides[side] = {b: statistics.median(t) for b, t in per_size.items()}
    print(f"\n## {n} ranks, one network namespace each (median of {rounds} round(s))\n")
    print("| size | ring median | Gloo median | ring busbw GB/s | Gloo busbw GB/s | ring / Gloo |")
    print("|---|---|---|---|---|---|")
    for nbytes in sorted(sides["ring"]):
        rt, gt = sides["ring"][nbytes], sides["gloo"][nbytes]
        size = f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"
        print(f"| {size} | {rt * 1e6:.0f} us | {gt * 1e6:.0f} us | {busbw(n, nbytes, rt):.3f} | "
              f"{busbw(n, nbytes, gt):.3f} | **{gt / rt:.2f}x** |")
PY
