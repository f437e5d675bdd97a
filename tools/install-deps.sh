#!/bin/sh
# Installs what bpfilter, its demo and its tests need on a fresh Debian machine (idempotent).
set -eu
APT_PKGS="iptables iproute2 libbpf-dev libbpf1 bpftool iputils-ping socat python3-dev gcc make
          qemu-system-x86 busybox-static kmod xz-utils libelf1 libssl3 zlib1g nftables util-linux"
missing=""
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
PY=${PYTHON:-python3}
$PY -c 'import construct, cffi, pyroute2, pytest, hypothesis' 2>/dev/null ||
    $PY -m pip install -q --disable-pip-version-check "construct==2.10.70" "cffi>=1.15" \
        "pyroute2>=0.7" "pytest>=7" "hypothesis>=6"
