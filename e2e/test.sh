#!/usr/bin/env bash
# The test command: unit tests, and the tests against a real local control plane
# (started here, torn down on exit, whatever happens).
#   e2e/test.sh [cargo test args...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export RINGMASTER_E2E_DIR=${RINGMASTER_E2E_DIR:-$repo/.e2e/test-$$}
trap 'e2e/cluster.sh down' EXIT
e2e/cluster.sh up
export KUBECONFIG=$RINGMASTER_E2E_DIR/kubeconfig
cargo test --workspace --locked "$@"
