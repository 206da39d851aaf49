#!/usr/bin/env bash
# Fuzzes the gateway's untrusted inputs (issue 17): every cargo-fuzz target in fuzz/ for SECONDS
# each (default 300), after one build. Prints the executions each target ran and exits non-zero
# if any target crashed, hung or ran out of memory; libFuzzer leaves the input that did it under
# fuzz/artifacts/<target>/ (replay it: `cd fuzz && cargo +nightly fuzz run <target> <file>`).
#
# The committed seeds in fuzz/corpus/<target>/ are read, never written: what the fuzzer finds
# goes to fuzz/corpus-grown/<target>/ (git-ignored), which later runs start from.
#
# usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-300}
shift || true
cd "$root/fuzz"

# cargo-fuzz needs nightly for -Zsanitizer; this image has it, and nothing here installs one.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is missing (rustup toolchain list); cargo-fuzz needs it" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

started=$(date +%s)
echo "== fuzz: building ${#targets[@]} targets (nightly, AddressSanitizer, release + debug assertions)"
cargo +nightly fuzz build
echo "fuzz: built in $(( $(date +%s) - started )) s"

# Bounds on every run: a hostile input may not take more than 2 GiB or hang for 30 s.
flags=(
    -max_total_time="$seconds"
    -print_final_stats=1
    -rss_limit_mb=2048
    -timeout=30
)
logs="$root/fuzz/target/logs"
mkdir -p "$logs"
failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "corpus-grown/$t" "artifacts/$t"
    echo "== fuzz: $t for ${seconds}s"
    status=0
    cargo +nightly fuzz run "$t" "corpus-grown/$t" "corpus/$t" -- "${flags[@]}" \
        >"$logs/$t.log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    peak=$(sed -n 's/^stat::peak_rss_mb: *//p' "$logs/$t.log" | tail -1)
    summary+=("$(printf '%-12s %12s execs  %6s MB peak  %s' "$t" "${execs:-?}" "${peak:-?}" \
        "$([ $status -eq 0 ] && echo ok || echo "FAILED (exit $status)")")")
    if [ $status -ne 0 ]; then
        failed+=("$t")
        tail -40 "$logs/$t.log" >&2
        echo "fuzz: $t failed; its input is under fuzz/artifacts/$t/, its log $logs/$t.log" >&2
    fi
done

echo "== fuzz: ${seconds}s per target"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]}" >&2
    exit 1
fi
