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
# list, the suite, the apt sources and these scripts, so a second call returns at once; delete the
# file (or change the list) to rebuild. A fresh build removes the variant's older archives. Needs
# root and `mmdebstrap`.
#
# Reproducibility: mmdebstrap honours SOURCE_DATE_EPOCH, the build host's resolv.conf and hostname
# are not kept, and packing fixes all metadata, so the same package versions give the same bytes.
# Without a snapshot mirror the versions follow Debian's point releases and security updates; a
# cached archive pins what a machine runs until it is rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${1:-$repo/.state/images}

suite=${SHALE_IMAGE_SUITE:-bookworm}
mirror=${SHALE_IMAGE_MIRROR:-http://deb.debian.org/debian}
security=${SHALE_IMAGE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# The image's apt sources, also the ones it is built from: the release, its stable updates and its
# security updates, as on any Debian 12 machine.
sources=(
    "deb $mirror $suite main"
    "deb $mirror $suite-updates main"
    "deb $security $suite-security main"
)
# What a client renting a machine expects (issue 13): a Debian system it changes as root, with apt,
# python3 with pip, venv and numpy, a C/C++ compiler and make (build-essential, which also brings
# dpkg-dev for building .debs and local repositories), git, curl, wget, an editor, a pager, tmux,
# bash as root's login shell and a locale. The gateway runs the image's SFTP server for
# `sftp`/`scp` and needs the `scp` binary for legacy `scp -O`; rsync, TLS roots, ps/top and
# `ip`/`ss` (port forwarding) complete it. Recommends are not installed here (mmdebstrap's default);
# apt inside the container installs them as Debian does.
packages=(
    apt bash coreutils locales ca-certificates procps iproute2 less tmux vim-tiny
    python3 python3-pip python3-venv python3-numpy build-essential git curl wget rsync
    openssh-sftp-server openssh-client
)
variant=${SHALE_IMAGE_VARIANT:-default}
case "$variant" in *[!a-z0-9-]*|"") echo "bad SHALE_IMAGE_VARIANT: $variant" >&2; exit 2;; esac
read -r -a extra <<< "${SHALE_IMAGE_EXTRA_PACKAGES:-}"
packages+=("${extra[@]}")
epoch=1700000000

# This script's text is part of the key, so a changed package list or hook is a new archive
# without anything to bump; the environment's inputs are hashed explicitly.
key=$( { printf '%s\n' "$suite" "$epoch" "${sources[@]}" "${packages[@]}"; cat "$here/build-default.sh" "$here/oci-pack.sh"; } \
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
# Orders run as root in a user namespace with HOME=/work, so root's home is /work as well (the ssh
# client and `su -` read it from /etc/passwd, not from $HOME). The uid-1000 `user` stays for what
# still runs as it (the benchmarks' sshd-in-a-container reference); the provisioner gives the
# volume mounted at /work its owner. /data holds the datasets.
#
# The dpkg path filters stay in the image (/etc/dpkg/dpkg.cfg.d/99mmdebstrap), so what a client
# installs later is trimmed the same way; apt deletes the .debs it installed, which would otherwise
# sit on the order's disk. Nothing is left in dpkg's or apt's way: mmdebstrap restores
# policy-rc.d and start-stop-daemon, and base-passwd provides apt's sandbox user `_apt` (uid 42,
# gid 65534), which apt drops to for every download, a `file:` repository's included.
#
# Debian marks its Python as externally managed (PEP 668), which makes `pip install` refuse
# outright; on a machine of one's own root installs with pip into /usr/local beside the Debian
# packages, so /etc/pip.conf allows it, without the warning about running as root (a venv is
# still the tidy way, and python3-venv is there).
SOURCE_DATE_EPOCH=$epoch mmdebstrap --quiet --mode=root --variant=essential --format=tar \
    --include="$include" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='chroot "$1" sh -ec "
        echo locales locales/locales_to_be_generated multiselect en_US.UTF-8 UTF-8 | debconf-set-selections
        echo locales locales/default_environment_locale select C.UTF-8 | debconf-set-selections
        rm -f /etc/locale.gen
        dpkg-reconfigure --frontend=noninteractive locales 2>&1"' \
    --customize-hook='sed -i "s|^root:x:0:0:root:/root:/bin/bash\$|root:x:0:0:root:/work:/bin/bash|" "$1/etc/passwd"' \
    --customize-hook='echo "user:x:1000:1000:Shale order user:/work:/bin/bash" >> "$1/etc/passwd"' \
    --customize-hook='echo "user:x:1000:" >> "$1/etc/group"' \
    --customize-hook='echo "user:*:19000:0:99999:7:::" >> "$1/etc/shadow"' \
    --customize-hook='mkdir -p "$1/work" "$1/data"' \
    --customize-hook='printf "[global]\nbreak-system-packages = true\nroot-user-action = ignore\n" > "$1/etc/pip.conf"' \
    --customize-hook='echo "APT::Keep-Downloaded-Packages \"false\";" > "$1/etc/apt/apt.conf.d/90shale-no-kept-debs"' \
    --customize-hook='grep -qx "root:x:0:0:root:/work:/bin/bash" "$1/etc/passwd" && grep -q "^_apt:x:42:" "$1/etc/passwd"' \
    --customize-hook='echo localhost > "$1/etc/hostname" && : > "$1/etc/resolv.conf" && chmod 644 "$1/etc/hostname" "$1/etc/resolv.conf"' \
    --customize-hook='rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/* "$1/var/log"/* "$1/var/lib/dpkg"/*-old "$1/var/cache/debconf"/*-old' \
    "$suite" "$tmp/rootfs.tar" "${sources[@]}" >&2

# The configured user is what the orders' processes are: root, inside their user namespace.
"$here/oci-pack.sh" "$tmp/rootfs.tar" "shale/$variant:latest" "$out" 0:0
# Older builds of this variant are stale (containerd keeps its own copy of what it imported).
for old in "$cache/$variant"-????????????????.oci.tar; do
    [ "$old" = "$out" ] || rm -f "$old"
done
echo "$out"
