#!/usr/bin/env bash
# `ringmaster bench ddp-step` with every rank in its own network namespace (veth pairs on
# a bridge, optionally rate-limited: the ranks talk as hosts do, over TCP), to see how
# much of the gradient averaging DDP hides under backward. Prints the 1-rank step and
# the N-rank step with averaging during and after backward, medians in ms. Root.
#   trainer/benches/ddp_step_netns.sh
# Env: WORLD (2), RATE (e.g. 1gbit; empty: unshaped), BATCH (16), SEQ (128), THREADS (1
#      per rank), ITERS (5), CARGO_TARGET_DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORLD="${WORLD:-2}" RATE="${RATE:-}" BATCH="${BATCH:-16}" SEQ="${SEQ:-128}"
THREADS="${THREADS:-1}" ITERS="${ITERS:-5}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
(cd "$ROOT" && cargo build --release -q -p ringmaster-trainer --bin ringmaster)
EXE="$TARGET_DIR/release/ringmaster"
# shellcheck source=../../collective/bench/netns.sh
source "$ROOT/collective/bench/netns.sh"
trap 'remove_namespaces "$WORLD"' EXIT
make_namespaces "$WORLD" "$RATE"

ranks() { # n: prints rank 0's "during after"
  local n=$1 pids=() out token
  out="$(mktemp)" token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  for ((i = n - 1; i >= 0; i--)); do
    ip netns exec "rmb$i" env RANK="$i" WORLD_SIZE="$n" MASTER_ADDR="$(address 0)" \
      MASTER_PORT=29621 RINGMASTER_TOKEN="$token" RINGMASTER_TRANSPORT=tcp \
      RAYON_NUM_THREADS="$THREADS" CANDLE_NUM_THREADS="$THREADS" \
      "$EXE" bench ddp-step-rank --batch "$BATCH" --seq "$SEQ" --iters "$ITERS" \
      >"$out.$i" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  cat "$out.0"
  rm -f "$out" "$out".*
}

read -r one _ < <(ranks 1)
read -r during after < <(ranks "$WORLD")
echo "| ranks | batch per rank | link | step ms, averaged during backward | after backward |"
echo "|---|---|---|---|---|"
printf '| 1 | %s | - | %.0f | - |\n' "$BATCH" "$one"
printf '| %s | %s | %s | %.0f (%.2fx) | %.0f (%.2fx) |\n' "$WORLD" "$BATCH" "${RATE:-veth}" \
  "$during" "$(awk "BEGIN { print $during / $one }")" "$after" "$(awk "BEGIN { print $after / $one }")"
