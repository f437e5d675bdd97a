#!/bin/sh
# Fetch the Debian kernel that bpfilter.ko is built for and tested on, without installing it:
# image (vmlinuz + modules) and headers, unpacked under $BUILD/root.  The ABI is whatever the
# archive's linux-image-amd64 meta package depends on today, so nothing here names a version.
#
# The suite defaults to bookworm-backports (a 6.12 kernel: netfilter BPF links arrived in 6.4,
# and the 6.12 image still builds ip_tables/ip6_tables as modules, so their sockopt range is
# free for bpfilter).  KMOD_SUITE=bookworm gives the 6.1 kernel.  apt runs with a private state
# directory under $BUILD/apt: the host's sources and package lists are left alone.
set -eu
BUILD=${1:-build/kmod}
SUITE=${KMOD_SUITE:-bookworm-backports}
MIRROR=${KMOD_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
A="$BUILD/apt"
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$BUILD/debs"
echo "deb $MIRROR $SUITE main" > "$A/sources.list"
APT="-o Dir::Etc::SourceList=$A/sources.list -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists=$A/lists -o Dir::Cache=$A/cache -o APT::Sandbox::User=root"
# shellcheck disable=SC2086
apt-get -q $APT update >/dev/null
# shellcheck disable=SC2086
IMAGE=$(apt-cache $APT depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[^ ]*-amd64\)$/\1/p' | head -n1)
ABI=${IMAGE#linux-image-}
[ -n "$ABI" ] || { echo "kmod-fetch: no linux-image-amd64 in $SUITE" >&2; exit 1; }
KBUILD=$(apt-cache $APT depends "linux-headers-$ABI" | sed -n 's/^ *Depends: \(linux-kbuild-[^ ]*\)$/\1/p' | head -n1)
COMMON=$(apt-cache $APT depends "linux-headers-$ABI" | sed -n 's/^ *Depends: \(linux-headers-[^ ]*-common[^ ]*\)$/\1/p' | head -n1)
if [ ! -e "$BUILD/root/boot/vmlinuz-$ABI" ] || [ ! -e "$BUILD/root/usr/src/linux-headers-$ABI/Module.symvers" ]; then
    rm -rf "$BUILD/root" "$BUILD/debs"/*.deb
    mkdir -p "$BUILD/root"
    # shellcheck disable=SC2086
    (cd "$BUILD/debs" && apt-get -q $APT download "linux-image-$ABI-unsigned" "linux-headers-$ABI" "$COMMON" "$KBUILD" >/dev/null)
    for deb in "$BUILD/debs"/*.deb; do dpkg-deb -x "$deb" "$BUILD/root"; done
    rm -f "$BUILD/debs"/*.deb
fi
# The headers' Makefile includes the common tree by its installed absolute path.
HDR="$BUILD/root/usr/src/linux-headers-$ABI"
sed -i "s|^include /usr/src/|include $BUILD/root/usr/src/|" "$HDR/Makefile"
echo "$ABI" > "$BUILD/abi"
echo "kmod-fetch: $SUITE kernel $ABI in $BUILD/root"
