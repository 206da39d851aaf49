#!/usr/bin/env bash
# Builds Shale's default order image from Debian packages and packs it as an OCI image archive.
#
#   build-default.sh [CACHE_DIR]     (default: <repo>/.state/images)
#
# A variant adds packages and gets its own archive and image name:
#   SHALE_IMAGE_VARIANT=bench-sshd SHALE_IMAGE_EXTRA_PACKAGES="openssh-server" build-default.sh
# (the benchmarks' sshd-in-a-container reference is one; orders always run the plain default).
#
# Prints the archive's path on stdout. The archive is cached under a key that hashes the package
# list, the suite, the mirror and these scripts, so a second call returns at once; delete the file
# (or change the list) to rebuild. Needs root and `mmdebstrap`.
#
# Reproducibility: mmdebstrap honours SOURCE_DATE_EPOCH, and packing fixes all metadata, so the same
# package versions give the same bytes. Without a snapshot mirror the versions follow Debian's
# point releases; a cached archive pins what a machine runs until it is rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${1:-$repo/.state/images}

suite=${SHALE_IMAGE_SUITE:-bookworm}
mirror=${SHALE_IMAGE_MIRROR:-http://deb.debian.org/debian}
# What an order's user expects: a shell and coreutils, python3 with numpy, the SFTP server the
# gateway runs for `sftp`/`scp`, the `scp` binary for legacy `scp -O`, rsync, TLS roots, ps/top,
# and `ip`/`ss` for port forwarding.
packages=(
    bash coreutils ca-certificates procps iproute2 rsync
    python3 python3-numpy openssh-sftp-server openssh-client
)
variant=${SHALE_IMAGE_VARIANT:-default}
case "$variant" in *[!a-z0-9-]*|"") echo "bad SHALE_IMAGE_VARIANT: $variant" >&2; exit 2;; esac
read -r -a extra <<< "${SHALE_IMAGE_EXTRA_PACKAGES:-}"
packages+=("${extra[@]}")
epoch=1700000000

key=$( { printf '%s\n' "$suite" "$mirror" "$epoch" "${packages[@]}"; cat "$here/build-default.sh" "$here/oci-pack.sh"; } \
    | sha256sum | cut -c1-16)
out="$cache/$variant-$key.oci.tar"
if [ -s "$out" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$cache"
# One build at a time per image: a second caller waits, then finds the first one's archive.
exec 9>"$cache/.lock-$variant"
flock 9
if [ -s "$out" ]; then
    echo "$out"
    exit 0
fi
tmp=$(mktemp -d "$cache/.build-$variant.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

include=$(IFS=,; echo "${packages[*]}")
# The user (uid 1000) owns the per-order volume mounted at /work; /data holds the datasets.
SOURCE_DATE_EPOCH=$epoch mmdebstrap --quiet --mode=root --variant=essential --format=tar \
    --include="$include" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='echo "user:x:1000:1000:Shale order user:/work:/bin/bash" >> "$1/etc/passwd"' \
    --customize-hook='echo "user:x:1000:" >> "$1/etc/group"' \
    --customize-hook='echo "user:*:19000:0:99999:7:::" >> "$1/etc/shadow"' \
    --customize-hook='mkdir -p "$1/work" "$1/data" && chown 1000:1000 "$1/work"' \
    --customize-hook='rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/* "$1/var/log"/*' \
    "$suite" "$tmp/rootfs.tar" "$mirror" >&2

"$here/oci-pack.sh" "$tmp/rootfs.tar" "shale/$variant:latest" "$out"
echo "$out"
