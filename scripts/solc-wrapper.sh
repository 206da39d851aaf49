#!/usr/bin/env bash
# Presents solc-js (npm `solc`, pinned in tools/package.json) as a native `solc` binary, so that
# forge can use it: `forge test --offline --use .tools/bin/solc`. forge only needs two modes:
#   solc --version                      -> "Version: X.Y.Z+commit..." like the native binary prints
#   solc [paths...] --standard-json     -> standard JSON in on stdin, out on stdout
# solc-js prints diagnostic lines starting with ">>>" on stdout; they would corrupt the JSON.
set -euo pipefail
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
root=$(cd "$here/.." && pwd)
solcjs="$root/.tools/node_modules/solc/solc.js"
if [ ! -f "$solcjs" ]; then
    echo "solc-wrapper: $solcjs is missing; run scripts/setup.sh" >&2
    exit 1
fi

args=("$@")
standard_json=0
version=0
base_path=""
include_paths=()
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version=1 ;;
        --standard-json) standard_json=1 ;;
        --base-path) base_path="$2"; shift ;;
        --base-path=*) base_path="${1#--base-path=}" ;;
        --include-path) include_paths+=(--include-path "$2"); shift ;;
        --include-path=*) include_paths+=(--include-path "${1#--include-path=}") ;;
        # Native-only flags (import permissions, remappings as paths) do not exist in solc-js;
        # with --standard-json every source arrives inline, so they are not needed.
        --allow-paths) shift ;;
        --allow-paths=*) ;;
        *) ;;
    esac
    shift
done

if [ "$version" = 1 ]; then
    v=$(node "$solcjs" --version)
    printf 'solc, the solidity compiler commandline interface\nVersion: %s\n' "$v"
    exit 0
fi
if [ "$standard_json" = 1 ]; then
    # solc-js exits before a pipe drains and cuts its output at 64 KiB; stdout to a regular file
    # is written synchronously, so compile into a temporary file and filter that.
    # forge hands us a non-blocking pipe, and solc-js reads stdin with one readFileSync that
    # fails with EAGAIN when the input is not there yet: copy stdin to a file first, retrying.
    in=$(mktemp)
    out=$(mktemp)
    trap 'rm -f "$in" "$out"' EXIT
    node -e '
        const fs = require("fs");
        const buf = Buffer.alloc(1 << 16), parts = [];
        const nap = new Int32Array(new SharedArrayBuffer(4));
        for (;;) {
            let n;
            try { n = fs.readSync(0, buf, 0, buf.length, null); }
            catch (e) {
                if (e.code === "EAGAIN") { Atomics.wait(nap, 0, 0, 5); continue; }
                if (e.code === "EOF") break;
                throw e;
            }
            if (n === 0) break;
            parts.push(Buffer.from(buf.subarray(0, n)));
        }
        fs.writeFileSync(process.argv[1], Buffer.concat(parts));
    ' "$in"
    node "$solcjs" --standard-json --base-path "${base_path:-.}" "${include_paths[@]}" <"$in" >"$out"
    grep -v '^>>>' "$out"
    exit 0
fi
echo "solc-wrapper: only --version and --standard-json are supported (got: ${args[*]:-nothing})" >&2
exit 2
