#!/bin/sh
# `make test-kmod`: boot the fetched Debian kernel under qemu (TCG: no KVM needed) with the host's
# root shared read-only, and run tests/kmod/guest-test.sh inside it.  The guest prints
# "N passed, M failed" and powers off; qemu is bounded by `timeout` whatever happens.
# Exit status: 0 only if the summary line was printed with 0 failed.
set -eu
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$(cd "${1:-$REPO/build/kmod}" && pwd)
ABI=$(cat "$BUILD/abi")
TIMEOUT=${KMOD_TEST_TIMEOUT:-230}
# The interpreter that has the project's dependencies (construct, cffi, pyroute2): the helper's.
PY=$(${PYTHON:-python3} -c 'import sys; print(sys.executable)')
sh "$REPO/tests/kmod/build-netdevsim.sh" "$BUILD"
sh "$REPO/tests/kmod/mkinitramfs.sh" "$BUILD"
LOG="$BUILD/guest.log"
ACCEL=tcg
rc=0
timeout -k 5 "$TIMEOUT" qemu-system-x86_64 -accel "$ACCEL" -m 1024 -smp 1 \
    -display none -monitor none -serial stdio -no-reboot -nic none \
    -kernel "$BUILD/root/boot/vmlinuz-$ABI" -initrd "$BUILD/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3 kmodtest_repo=$REPO kmodtest_abi=$ABI kmodtest_python=$PY kmodtest_script=${KMOD_GUEST_SCRIPT:-$REPO/tests/kmod/guest-test.sh} printk.devkmsg=on" \
    -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap" \
    -device "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot" \
    </dev/null | tr -d '\r' | tee "$LOG" || rc=$?
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$LOG" | tail -n1 || true)
if [ -z "$summary" ]; then
    echo "test-kmod: no summary from the guest (qemu status $rc; timeout ${TIMEOUT}s)"
    exit 1
fi
echo "test-kmod: $summary"
case "$summary" in *" 0 failed") exit 0 ;; *) exit 1 ;; esac
