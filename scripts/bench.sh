#!/usr/bin/env bash
# Every benchmark in BENCHMARKS.md, each measured side by side with its reference in the same
# run, in release builds. Not part of CI (a full run takes about half an hour on 2 cores).
#
#   scripts/bench.sh            # everything; JSON under bench/results/, logs next to it
#   scripts/bench.sh --quick    # a smoke run of each harness, into bench/results/quick/ (git-ignored)
#   scripts/bench.sh attack     # only the attack tests (tests/tests/attack.rs), at full size:
#                               # the "load held" table of BENCHMARKS.md, into bench/results/attack.txt
#
# What runs, in order:
#   shale-bench-connect      ssh HOST true: gateway vs sshd on the host vs sshd in a container
#   shale-bench-throughput   1 GiB up/down, two ciphers: the same four-way comparison + metering off
#   shale-bench-load         N interactive sessions from a russh load generator: gateway vs sshd
#   criterion: metering (byte pump, metered vs bare), auth (order lookup, warm vs cold cache),
#              prover (Groth16 per batch size vs the MSMs it cannot avoid)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

quick=false
attack=false
for arg in "$@"; do
    case "$arg" in
        --quick) quick=true ;;
        attack) attack=true ;;
        *) echo "usage: scripts/bench.sh [--quick] [attack]" >&2; exit 2 ;;
    esac
done

scripts/setup.sh
export PATH="$root/.tools/bin:$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
out=$root/bench/results
# A smoke run never overwrites the published results.
$quick && out=$out/quick
mkdir -p "$out"

if $attack; then
    # CI runs these smaller; here at the issue's sizes (and more sockets), one at a time so the
    # figures are the gateway's alone. Each prints its figures on a line of its own.
    SHALE_ATTACK_SOCKETS=${SHALE_ATTACK_SOCKETS:-2000} \
    SHALE_ATTACK_USERNAMES=${SHALE_ATTACK_USERNAMES:-10000} \
    SHALE_ATTACK_CHANNELS=${SHALE_ATTACK_CHANNELS:-1000} \
    SHALE_ATTACK_FORWARDS=${SHALE_ATTACK_FORWARDS:-200} \
    SHALE_ATTACK_ENVS=${SHALE_ATTACK_ENVS:-100000} \
        cargo test --release --locked -p shale-tests --test attack -- --test-threads=1 --nocapture \
        2>&1 | tee "$out/attack.txt"
    exit "${PIPESTATUS[0]}"
fi

cargo build --release --locked -p shale-bench --features system --bins
scripts/build-agent.sh
bin=$CARGO_TARGET_DIR/release

run() { # NAME COMMAND...: runs one harness, keeping its output next to its JSON
    local name=$1
    shift
    echo "== $name" >&2
    "$@" 2>&1 | tee "$out/$name.txt"
}

if $quick; then
    run connect "$bin/shale-bench-connect" 5 1 "$out/connect.json"
    run throughput "$bin/shale-bench-throughput" 16 1 "$out/throughput.json"
    run load "$bin/shale-bench-load" 5 --secs 3 --json "$out/load.json"
    criterion=(--warm-up-time 1 --measurement-time 2)
    export SHALE_BENCH_PROVER_MAX=16
else
    run connect "$bin/shale-bench-connect" 100 5 "$out/connect.json"
    run throughput "$bin/shale-bench-throughput" 1024 3 "$out/throughput.json"
    run load "$bin/shale-bench-load" 10 100 1000 --json "$out/load.json"
    criterion=()
fi
run metering cargo bench --locked -p shale-bench --bench metering -- "${criterion[@]}"
run auth cargo bench --locked -p shale-bench --bench auth -- "${criterion[@]}"
run prover cargo bench --locked -p shale-bench --bench prover -- "${criterion[@]}"
run commp cargo bench --locked -p shale-bench --bench commp -- "${criterion[@]}"
echo "results: $out (criterion's own reports: $CARGO_TARGET_DIR/criterion)" >&2
