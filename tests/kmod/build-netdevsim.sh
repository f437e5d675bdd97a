#!/bin/sh
# netdevsim for the qemu guest: Debian's kernel config leaves CONFIG_NETDEVSIM unset, so build
# the driver from the same kernel's source package (linux-source-<major.minor>, fetched with the
# private apt state of tools/kmod-fetch.sh) against the fetched headers, and put netdevsim.ko in
# the guest's module tree (lib/modules/<abi>/updates, depmod).  netdevsim registers a BPF offload
# device (drivers/net/netdevsim/bpf.c: bpf_offload_dev_create, XDP_SETUP_PROG_HW), which is how
# the guest proves `--offload` on a device that has an offload engine (tests/kmod/guest-offload.sh).
# Idempotent: does nothing when the module is there.  Exit status 0 also when it cannot be built
# (no network, no source package): the guest step then says SKIP with the reason in this log.
set -u
BUILD=$1
ABI=$(cat "$BUILD/abi")
MODDIR="$BUILD/root/lib/modules/$ABI"
KO="$MODDIR/updates/netdevsim.ko"
[ -e "$KO" ] && exit 0
SRC="$BUILD/netdevsim-src"
A="$BUILD/apt"
APT="-o Dir::Etc::SourceList=$A/sources.list -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists=$A/lists -o Dir::Cache=$A/cache -o APT::Sandbox::User=root"
MAJMIN=$(echo "$ABI" | sed 's/^\([0-9]*\.[0-9]*\).*/\1/')
log() { echo "build-netdevsim: $*"; }
rm -rf "$SRC" && mkdir -p "$SRC" || exit 0
# shellcheck disable=SC2086
if ! (cd "$SRC" && apt-get -q $APT download "linux-source-$MAJMIN" > apt.log 2>&1); then
    log "cannot download linux-source-$MAJMIN (see $SRC/apt.log): netdevsim not built"; exit 0
fi
# only drivers/net/netdevsim is needed from the 150 MB tarball
if ! (cd "$SRC" && dpkg-deb --fsys-tarfile linux-source-*.deb |
      tar -xO "./usr/src/linux-source-$MAJMIN.tar.xz" |
      tar -xJ "linux-source-$MAJMIN/drivers/net/netdevsim"); then
    log "cannot unpack drivers/net/netdevsim"; exit 0
fi
rm -f "$SRC"/linux-source-*.deb
D="$SRC/linux-source-$MAJMIN/drivers/net/netdevsim"
if ! make -C "$BUILD/root/usr/src/linux-headers-$ABI" M="$D" CONFIG_NETDEVSIM=m \
        CONFIG_DEBUG_INFO_BTF_MODULES= modules > "$SRC/make.log" 2>&1; then
    log "build failed (see $SRC/make.log)"; exit 0
fi
mkdir -p "$MODDIR/updates" && cp "$D/netdevsim.ko" "$KO" && depmod -b "$BUILD/root" "$ABI" &&
    log "netdevsim.ko for $ABI in $MODDIR/updates"
exit 0
