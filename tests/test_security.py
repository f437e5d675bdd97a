"""Issue #9, security: callers without CAP_NET_ADMIN get EPERM (same output as the kernel's
xtables gives them); an unprivileged process cannot forge requests on the helper's socket; the
helper runs with only the capabilities it needs; its files and directories are root-only; a
request touches only the requested range of the requesting process's memory."""
import ctypes
import errno
import os
import stat
import subprocess
import sys
import time

import pytest

from nsutil import Netns
from bpfilter_umh.frames import Request

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def env_of(ns, **kw):
    path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
    return dict(ns.env, **{"PYTHONPATH": path, "BPFILTER_IDLE_EXIT": "2", **kw})


@pytest.fixture
def dns(netns):
    try:
        yield netns
    finally:
        netns.run([PY, "-m", "bpfilter_umh.cli", "flush"], check=False, env=env_of(netns))


NO_ADMIN = "setpriv --bounding-set=-net_admin --inh-caps=-net_admin -- "


@pytest.mark.parametrize("cmd", ["iptables-legacy -L -n", "iptables-legacy -A INPUT -j DROP",
                                 "ip6tables-legacy -L -n", "iptables-legacy-save"])
def test_without_net_admin_like_kernel(dns, cmd):
    with Netns("k") as kern:
        # bpfilter's filter tables exist from the start; the kernel's once something used them
        kern.run("iptables-legacy -L -n >/dev/null; ip6tables-legacy -L -n >/dev/null")
        k = kern.run(NO_ADMIN + cmd, check=False)
    b = dns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", "sh", "-c", NO_ADMIN + cmd],
                check=False, env=env_of(dns))
    assert (b.returncode, b.stdout, b.stderr) == (k.returncode, k.stdout, k.stderr)
    assert k.returncode != 0
    # and nothing was installed
    st = dns.run([PY, "-m", "bpfilter_umh.cli", "status", "--json"], env=env_of(dns)).stdout
    assert '"prog_id": null' in st and '"prog_id": 1' not in st


FORGE = r"""
import ctypes, socket, struct, sys
sys.path.insert(0, {root!r})
from bpfilter_umh.frames import Request, Reply, REPLY
target_pid, addr = {pid}, {addr}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(b"\0bpfilter")
# GET_INFO would write 84 bytes at addr in the *target's* memory
s.sendall(Request(cmd=64, is_set=0, family=2, pid=target_pid, len=84, addr=addr).pack())
print(Reply.unpack(s.recv(REPLY.size)).status)
"""


def _wait_socket(ns, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if "@bpfilter" in ns.run("ss -xlp", check=False).stdout:
            return True
        time.sleep(0.05)
    return False


def test_unprivileged_peer_cannot_forge_requests(dns):
    buf = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
    before = buf.raw
    helper = dns.popen([PY, "-m", "bpfilter_umh", "--listen"], env=env_of(dns),
                       stderr=subprocess.PIPE)
    try:
        assert _wait_socket(dns)
        code = FORGE.format(root=ROOT, pid=os.getpid(), addr=ctypes.addressof(buf))
        p = dns.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", PY, "-c",
                     code], check=False)
        assert p.stdout.strip() == str(-errno.EPERM), (p.stdout, p.stderr)
        assert buf.raw == before, "the helper wrote into memory for an unprivileged peer"
        # a privileged peer gets the same request served (it is well-formed)
        p = dns.run([PY, "-c", code], check=False)
        assert p.stdout.strip() == "0", p.stderr
        assert buf.raw != before and buf.raw[:6] == b"filter"
        # the helper's capabilities: only what it needs
        status = open(f"/proc/{_helper_pid(dns)}/status").read()
        caps = {ln.split(":")[0]: int(ln.split()[1], 16) for ln in status.splitlines()
                if ln.startswith("Cap")}
        from bpfilter_umh.__main__ import NEEDED_CAPS
        want = sum(1 << c for c in NEEDED_CAPS)
        assert caps["CapEff"] == want and caps["CapPrm"] == want and caps["CapBnd"] == want, caps
        assert caps["CapInh"] == 0
    finally:
        helper.kill()
        helper.wait()


def _helper_pid(ns):
    for pid in ns.pids():
        try:
            if b"--listen" in open(f"/proc/{pid}/cmdline", "rb").read():
                return pid
        except OSError:
            pass
    raise AssertionError("no helper")


def test_state_files_root_only(dns):
    dns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", "iptables-legacy", "-A", "INPUT",
             "-j", "ACCEPT"], env=env_of(dns))
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from bpfilter_umh.engine import Engine\n"
            "print(Engine.open().state_path)") % ROOT
    path = dns.run([PY, "-c", code], env=env_of(dns)).stdout.strip()
    for p in (path, os.path.dirname(path), "/run/bpfilter", "/run/bpfilter/helper.log"):
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
        assert os.stat(p).st_uid == 0


def test_request_touches_only_its_range():
    """Served in-process (no door): a GET_ENTRIES into a buffer with guard bytes either side,
    and a SET_REPLACE whose counters pointer targets a guarded buffer; the guards never change."""
    from bpfilter_umh.sockopt import Dispatcher, GET_ENTRIES_HDR
    with Netns("m") as ns:
        with ns.inside():
            d = Dispatcher()
            guard = b"\xa5" * 64
            info = ctypes.create_string_buffer(guard + b"filter".ljust(84, b"\0") + guard)
            rep = d.serve(Request(cmd=64, is_set=0, family=2, pid=os.getpid(), len=84,
                                  addr=ctypes.addressof(info) + 64))
            assert rep.status == 0
            raw = info.raw[:-1]
            assert raw[:64] == guard and raw[-64:] == guard
            size = int.from_bytes(raw[64 + 80:64 + 84], "little")
            n = GET_ENTRIES_HDR.size + size
            ent = ctypes.create_string_buffer(guard + GET_ENTRIES_HDR.pack(b"filter", size)
                                              + b"\0" * size + guard)
            rep = d.serve(Request(cmd=65, is_set=0, family=2, pid=os.getpid(), len=n,
                                  addr=ctypes.addressof(ent) + 64))
            assert rep.status == 0
            raw = ent.raw[:-1]
            assert raw[:64] == guard and raw[-64:] == guard
            # a range that crosses into unmapped memory is EFAULT, not a crash
            rep = d.serve(Request(cmd=64, is_set=0, family=2, pid=os.getpid(), len=84,
                                  addr=8))
            assert rep.status == -errno.EFAULT
