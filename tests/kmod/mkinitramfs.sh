#!/bin/sh
# Build the guest's initramfs: static busybox, tests/kmod/init, and the (decompressed) modules
# needed to reach the host's root: netfs, 9pnet, 9pnet_virtio, 9p, overlay.
set -eu
BUILD=$1
ABI=$(cat "$BUILD/abi")
MODS="$BUILD/root/lib/modules/$ABI/kernel"
D="$BUILD/initramfs"
rm -rf "$D"
mkdir -p "$D/bin" "$D/lib" "$D/proc" "$D/sys" "$D/dev"
cp "$(command -v busybox)" "$D/bin/busybox"
cp "$(dirname "$0")/init" "$D/init"
chmod +x "$D/init"
for m in fs/netfs/netfs net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p fs/overlayfs/overlay; do
    xz -dc "$MODS/$m.ko.xz" > "$D/lib/$(basename $m).ko"
done
(cd "$D" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$BUILD/initramfs.cpio.gz"
