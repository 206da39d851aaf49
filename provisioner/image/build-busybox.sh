#!/usr/bin/env bash
# Builds a tiny test image: Debian's static busybox and its applet links, as an OCI image archive.
#
#   build-busybox.sh [CACHE_DIR]     (default: <repo>/.state/images)
#
# Prints the archive's path on stdout; cached like build-default.sh. Fast tests use it; the
# end-to-end path uses the default image. Needs `apt-get download` (no root install of busybox).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${1:-$repo/.state/images}

key=$( { echo busybox-static; cat "$here/build-busybox.sh" "$here/oci-pack.sh"; } | sha256sum | cut -c1-16)
out="$cache/busybox-$key.oci.tar"
if [ -s "$out" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$cache"
# One build at a time per image: a second caller waits, then finds the first one's archive.
exec 9>"$cache/.lock-busybox"
flock 9
if [ -s "$out" ]; then
    echo "$out"
    exit 0
fi
tmp=$(mktemp -d "$cache/.build-busybox.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# A fresh machine may have no package lists yet.
(cd "$tmp" && { apt-get download -qq busybox-static || { apt-get update -qq && apt-get download -qq busybox-static; }; } >&2)
dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/pkg"
root="$tmp/rootfs"
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/work" "$root/data" "$root/proc" "$root/sys" "$root/dev"
cp "$tmp/pkg/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:Shale order user:/work:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' > "$root/etc/group"
chmod 1777 "$root/tmp"
chown 1000:1000 "$root/work"
# Everything is root's (we run as root) except /work, which belongs to the order user.
tar --sort=name --mtime=@1700000000 --numeric-owner -C "$root" -cf "$tmp/rootfs.tar" .
"$here/oci-pack.sh" "$tmp/rootfs.tar" "shale/busybox:latest" "$out"
echo "$out"
