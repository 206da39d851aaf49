#!/usr/bin/env bash
# Builds the in-container agent as a static executable: it runs inside every order's container,
# whatever libc the image has (or none). Output: $CARGO_TARGET_DIR/agent/shale-agent, where the
# provisioner finds it from target/*/shale (`../agent/shale-agent`) and the tests look for it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# `cargo rustc` gives the flag to the binary's own link alone; its own profile keeps this static
# build from replacing the workspace's ordinary one.
cargo rustc --locked -q -p shale-agent --bin shale-agent --profile agent -- -C target-feature=+crt-static
