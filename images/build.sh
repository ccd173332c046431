#!/usr/bin/env bash
# Builds the three images from the release binaries without Docker (images/oci.py): an
# OCI layout and its image.tar per image under target/images/<name>/, and prints digest
# and size. Same sources, same toolchain, same digests.
#   images/build.sh [TAG]        # TAG defaults to the workspace version
# Into a containerd node:  ctr -n k8s.io images import target/images/ringmaster/image.tar
# With Docker instead: images/Dockerfile (CPU) and images/Dockerfile.cuda give the same
# file layout.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)}
registry=${REGISTRY:-ghcr.io/ringmaster-dev}
cargo build --release --locked --manifest-path "$repo/Cargo.toml" \
  -p ringmaster-trainer -p ringmaster-operator >&2
# The trainer opens OpenBLAS at run time when it is there (its f32 products run ~2.7x
# faster on it): ship it in the trainer's image.
openblas=$(ldconfig -p | awk '/libopenblas\.so\.0 /{print $NF; exit}')
trainer_extras=()
if [[ -n $openblas ]]; then
  trainer_extras=(--library "$openblas")
else
  echo "no libopenblas.so.0 (Debian: libopenblas0): the trainer image does its products without it" >&2
fi
python3 "$repo/images/oci.py" "$repo/target/release/ringmaster" "$registry/ringmaster:$tag" \
  "$repo/target/images/ringmaster" "${trainer_extras[@]}"
for name in ringmaster-operator ringmaster-scheduler; do
  python3 "$repo/images/oci.py" "$repo/target/release/$name" "$registry/$name:$tag" \
    "$repo/target/images/$name"
done
