#!/bin/sh
# Regenerates src/gorand_cooked.rs from the installed Go toolchain's math/rand source.
set -e
cd "$(dirname "$0")/../.."
SRC="$(go env GOROOT)/src/math/rand/rng.go"
{
  echo "// Generated from Go's src/math/rand/rng.go (rngCooked); regenerate with tools/gorand/cooked.sh."
  echo "pub(crate) const RNG_COOKED: [i64; 607] = ["
  awk '/rngCooked \[rngLen\]int64 = \[...\]int64\{/{f=1;next} f&&/^\t}/{f=0} f' "$SRC" | tr -d '\t' | sed 's/^/    /'
  echo "];"
} > src/gorand_cooked.rs
