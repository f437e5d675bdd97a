"""The kernel shim, end to end: `make -C kmod test` fetches Debian's kernel (image + headers, from
the archive, into build/kmod), builds kmod/bpfilter.ko against it without warnings, boots that
kernel under qemu (TCG) with this machine's root shared read-only, and runs
tests/kmod/guest-test.sh there: the unmodified iptables-legacy binaries through bpfilter.ko and
the real helper, rules enforced by BPF between two network namespaces, the helper killed and
stalled in the middle of a request, a caller without CAP_NET_ADMIN.  The guest prints
"N passed, M failed"; this test wants M == 0.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qemu_unusable():
    if os.geteuid() != 0:
        return "needs root: the guest shares this machine's root over 9p and runs depmod"
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    r = subprocess.run([qemu, "-accel", "tcg", "-machine", "none", "-display", "none",
                        "-monitor", "none", "-S", "-no-user-config", "-nodefaults",
                        "-device", "help"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"qemu-system-x86_64 cannot run here: {r.stderr.strip()[:200]}"
    return None


def test_kmod_guest():
    why = _qemu_unusable()
    if why:
        pytest.skip(why)
    env = dict(os.environ, PYTHON=sys.executable)
    # fetch (first run only) + build + boot + guest run; the guest itself is bounded by
    # KMOD_TEST_TIMEOUT (230 s) inside run-guest.sh.
    r = subprocess.run(["make", "-C", os.path.join(ROOT, "kmod"), "test"], env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    print(out[-20000:])
    assert not re.search(r"bpfilter\.c:\d+:\d+: warning", out), "bpfilter.c builds with warnings"
    m = re.search(r"^test-kmod: (\d+) passed, (\d+) failed$", out, re.M)
    assert m, f"no summary from the guest (make status {r.returncode})"
    passed, failed = int(m.group(1)), int(m.group(2))
    assert failed == 0, "\n".join(ln for ln in out.splitlines() if ln.startswith(("FAIL", "    |")))
    assert passed >= 20
    assert r.returncode == 0
