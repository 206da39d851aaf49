#!/usr/bin/env bash
# Installs everything Shale needs on a fresh Debian 12 machine, as root, idempotently.
# Debian packages system-wide; chain tooling (anvil, forge, cast, solc-js) pinned in tools/package.json
# into the project-local, git-ignored .tools/ folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

apt_packages=(
    containerd runc            # the container runtime the provisioner drives
    protobuf-compiler          # containerd-client's build script needs protoc
    openssh-client             # the stock ssh/scp/sftp the end-to-end tests drive
    openssh-server             # sshd: the reference the benchmarks compare against
    rsync                      # rsync over ssh, tested end to end
    mmdebstrap                 # builds the default container image from Debian packages
    iproute2                   # network namespaces
    nftables                   # the host-side rules of every order's network (nft)
    postgresql                 # the shared-ledger backend, tested in CI
    python3                    # the simulated internet's servers in the network tests
    docker-registry skopeo     # a real local OCI registry for the pull tests, and pushing into it
    ca-certificates curl git
)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js runs solc-js and installs the foundry binaries; keep one that is already there.
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Chain tooling, pinned in tools/package.json (anvil, forge, cast 1.7.1 with their native
# binaries; solc-js 0.8.37). Reinstall only when the pins change. The copy of package.json in
# .tools/ is the "installed" marker, so it is written only after npm succeeded: an interrupted
# install is retried on the next run.
mkdir -p .tools
if ! cmp -s tools/package.json .tools/installed.json || [ ! -d .tools/node_modules ]; then
    echo "setup: installing chain tooling into .tools/"
    cp tools/package.json .tools/package.json
    (cd .tools && npm install --no-audit --no-fund --loglevel=error >/dev/null)
    cp tools/package.json .tools/installed.json
fi
mkdir -p .tools/bin
for tool in anvil forge cast; do
    ln -sf "$root/.tools/node_modules/@foundry-rs/$tool-linux-amd64/bin/$tool" ".tools/bin/$tool"
done
# forge runs solc-js through this wrapper: `forge test --offline --use .tools/bin/solc`.
ln -sf "$root/scripts/solc-wrapper.sh" .tools/bin/solc
# Fail here, not in the middle of the tests, when a tool is broken.
for tool in anvil forge cast solc; do
    .tools/bin/$tool --version >/dev/null 2>&1 || { echo "setup: .tools/bin/$tool does not run" >&2; exit 1; }
done
echo "setup: ok"
