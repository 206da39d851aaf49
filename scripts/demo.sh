#!/usr/bin/env bash
# The README's first command: installs what Shale needs (scripts/setup.sh; a Rust toolchain must
# already be there), builds the `shale` binary, brings the local stack up (`shale dev up`:
# anvil, the marketplace, containerd, the default image, the gateway, a demo SP with the digits
# dataset), runs `shale demo`, and takes the stack down again.
#
#   scripts/demo.sh          # the whole story, then everything is stopped and removed
#   scripts/demo.sh --keep   # leave the local stack running afterwards (`shale dev down` stops it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

keep=false
for arg in "$@"; do
    case "$arg" in
        --keep) keep=true ;;
        *) echo "usage: scripts/demo.sh [--keep]" >&2; exit 2 ;;
    esac
done

scripts/setup.sh
export PATH="$root/.tools/bin:$HOME/.cargo/bin:$PATH"

# Debian's own cargo is older than the workspace's rust-version (1.89): a rustup stable toolchain
# is the one prerequisite the scripts do not install.
if ! command -v cargo >/dev/null; then
    echo "demo: no cargo found; install a stable Rust toolchain (rustup, 1.89 or newer) and run again" >&2
    exit 1
fi

echo "demo: building shale (first time: a few minutes)"
cargo build -p shale --locked --quiet
# The agent the containers start processes through (found by shale in target/agent/).
scripts/build-agent.sh
shale="${CARGO_TARGET_DIR:-$root/target}/debug/shale"

if [ "$keep" = false ]; then
    # Stop whatever `dev up` started, also when the demo fails or is interrupted.
    trap '"$shale" dev down' EXIT
fi
"$shale" dev up
"$shale" demo
