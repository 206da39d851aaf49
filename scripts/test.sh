#!/usr/bin/env bash
# The whole test suite: set-up, formatting and lints, Solidity tests, Rust tests (real anvil, containerd, ssh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
export PATH="$root/.tools/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features shale-bench/system --locked -- -D warnings
echo "== forge test"
(cd contracts && forge test --offline --use "$root/.tools/bin/solc")
echo "== the static agent"
scripts/build-agent.sh
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
