#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, the CUDA driver and NCCL (libnccl.so.2): builds the NCCL
# backend, runs its world-of-one test, and benchmarks device all-reduce with one rank (and
# with every GPU when there are several). Usage: collective/gpu-check.sh  (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== GPUs"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || echo "(nvidia-smi unavailable)"
ldconfig -p | grep -E "libnccl\.so|libcuda\.so" || echo "warning: libnccl/libcuda not in the linker cache; set LD_LIBRARY_PATH"

echo "== build (features nccl)"
cargo build --release -p ringmaster-collective --features nccl --bin ringmaster-allreduce-bench
cargo test --release -p ringmaster-collective --features nccl --test nccl --no-run

echo "== NCCL test, world size 1"
cargo test --release -p ringmaster-collective --features nccl --test nccl -- --nocapture

BENCH=target/release/ringmaster-allreduce-bench
echo "== NCCL device all-reduce benchmark, world size 1"
"$BENCH" --backend nccl --world-sizes 1 --max-bytes $((256 << 20)) --target-s 0.5
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)
if [ "${GPUS:-1}" -ge 2 ]; then
  echo "== NCCL device all-reduce benchmark, world size $GPUS (one process per GPU)"
  "$BENCH" --backend nccl --world-sizes "$GPUS" --max-bytes $((256 << 20)) --target-s 0.5
fi
echo "== done"
