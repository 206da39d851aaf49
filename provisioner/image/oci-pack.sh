#!/usr/bin/env bash
# Packs one root filesystem tarball as a single-layer OCI image archive (a tar of an OCI image layout).
#
#   oci-pack.sh ROOTFS_TAR IMAGE_NAME OUT_ARCHIVE [USER]
#
# The layer is stored uncompressed: the archive never leaves the machine, and skipping gzip keeps
# both the pack and containerd's unpack cheap on small CI machines. Every timestamp and ordering is
# fixed so the same rootfs tarball always gives the same image digest.
set -euo pipefail
rootfs_tar=$1
image_name=$2
out=$3
user=${4:-1000:1000}

work=$(mktemp -d "${out}.pack.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/blobs/sha256"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

layer_digest=$(sha "$rootfs_tar")
layer_size=$(size "$rootfs_tar")
# A hard link keeps a multi-hundred-megabyte layer from being copied when both live on one filesystem.
ln "$rootfs_tar" "$work/blobs/sha256/$layer_digest" 2>/dev/null || cp "$rootfs_tar" "$work/blobs/sha256/$layer_digest"

printf '%s' \
'{"architecture":"amd64","os":"linux",'\
'"config":{"User":"'"$user"'","Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8","HOME=/work"],'\
'"Cmd":["/bin/sh"],"WorkingDir":"/work"},'\
'"rootfs":{"type":"layers","diff_ids":["sha256:'"$layer_digest"'"]}}' > "$work/config.json"
config_digest=$(sha "$work/config.json")
config_size=$(size "$work/config.json")
mv "$work/config.json" "$work/blobs/sha256/$config_digest"

printf '%s' \
'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'\
'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_digest"'","size":'"$config_size"'},'\
'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:'"$layer_digest"'","size":'"$layer_size"'}]}' \
    > "$work/manifest.json"
manifest_digest=$(sha "$work/manifest.json")
manifest_size=$(size "$work/manifest.json")
mv "$work/manifest.json" "$work/blobs/sha256/$manifest_digest"

printf '%s' \
'{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",'\
'"digest":"sha256:'"$manifest_digest"'","size":'"$manifest_size"','\
'"annotations":{"io.containerd.image.name":"'"$image_name"'","org.opencontainers.image.ref.name":"'"$image_name"'"}}]}' \
    > "$work/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$work/oci-layout"

# Small files first so a reader finds index.json and the manifest before the big layer.
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$work" -cf "$work/archive.tar" oci-layout index.json "blobs/sha256/$config_digest" \
    "blobs/sha256/$manifest_digest" "blobs/sha256/$layer_digest"
# Atomic: a reader never sees a half-written archive.
mv "$work/archive.tar" "$out"
