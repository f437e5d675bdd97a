"""The door (`bpfilter exec`) and the helper, on the real kernel with the real binaries.

Each test runs in fresh namespaces; helpers started on demand exit after BPFILTER_IDLE_EXIT
seconds, and the netns fixture kills whatever is left."""
import ctypes
import errno
import json
import os
import struct
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


def env_of(ns, **kw):
    path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
    return dict(ns.env, PYTHONPATH=path, BPFILTER_IDLE_EXIT="1", **kw)


def bexec(ns, cmd, check=False, **kw):
    """Run a shell command under `bpfilter exec` in ns."""
    return ns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", "sh", "-c", cmd],
                  check=check, env=env_of(ns), **kw)


def wait_no_pids(ns, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not ns.pids():
            return True
        time.sleep(0.1)
    return False


def test_exit_status_and_signals(netns):
    assert bexec(netns, "exit 7").returncode == 7
    p = bexec(netns, "echo out; echo err >&2; exit 0")
    assert (p.returncode, p.stdout, p.stderr) == (0, "out\n", "err\n")
    p = bexec(netns, "kill -TERM $$")
    assert p.returncode in (-15, 143)
    p = netns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", "/nonexistent/cmd"],
                  check=False, env=env_of(netns))
    assert p.returncode == 127


def test_table_names_file(netns):
    # iptables-save reads the tables to dump from /proc/net/ip_tables_names
    assert bexec(netns, "cat /proc/net/ip_tables_names").stdout == "filter\n"
    assert bexec(netns, "cat /proc/net/ip6_tables_names").stdout == "filter\n"
    # a table the kernel serves (nat) is instantiated by the kernel and listed before filter
    assert bexec(netns, "iptables-legacy -t nat -L -n >/dev/null").returncode == 0
    assert bexec(netns, "cat /proc/net/ip_tables_names").stdout == "nat\nfilter\n"
    assert netns.run("cat /proc/net/ip_tables_names").stdout == "nat\n"
    # other files open normally
    assert bexec(netns, "head -c 4 /proc/self/status").stdout == "Name"


def test_list_empty_table_like_kernel(netns):
    from nsutil import Netns
    for cmd in ("iptables-legacy -L -n", "ip6tables-legacy -L -n -v --line-numbers",
                "iptables-legacy -S", "iptables-legacy-save -t filter | grep -v '^#'"):
        with Netns("k") as k:
            want = k.run(cmd, check=False)
        got = bexec(netns, cmd)
        assert (got.returncode, got.stdout, got.stderr) == \
               (want.returncode, want.stdout, want.stderr), cmd


def test_helper_goes_away(netns):
    assert bexec(netns, "iptables-legacy -L -n >/dev/null").returncode == 0
    assert wait_no_pids(netns), f"left running: {netns.pids()}"


def test_unsupported_extension_revision(netns):
    # GET_REVISION_TARGET for a target the compiler lacks: ENOENT, so iptables refuses it the
    # way it refuses a target the kernel lacks
    p = bexec(netns, "iptables-legacy -A INPUT -j REJECT")
    assert p.returncode != 0
    assert "REJECT" in p.stderr


ERRNO_PROBE = os.path.join(HERE, "test_door_errno.py")


def test_errno_like_kernel(netns):
    """Malformed requests (wrong lengths, bad sizes, bad counters) get the kernel's errno."""
    from nsutil import Netns
    with Netns("k") as k:
        want = json.loads(k.run([PY, ERRNO_PROBE], env=env_of(k)).stdout)
    got = json.loads(netns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", PY, ERRNO_PROBE],
                               env=env_of(netns)).stdout)
    assert got == want


def test_stdio_helper_serves_the_callers_netns(netns):
    """`python3 -m bpfilter_umh` on stdin/stdout (the kernel shim's transport): the helper runs
    outside the caller's namespace and serves each request in the netns named by its cookie,
    reading and writing the caller's buffer in the caller's memory."""
    import threading
    from bpfilter_umh import frames
    from bpfilter_umh.sockopt import netns_cookie
    helper = subprocess.Popen([PY, "-m", "bpfilter_umh"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env_of(netns), cwd=ROOT)
    try:
        from nsutil import Netns
        with Netns("k") as k:
            want = json.loads(k.run([PY, ERRNO_PROBE], env=env_of(k)).stdout)

        def call(cmd, is_set, family, buf, length=None):
            req = frames.Request(cmd, is_set, family, tid, len(buf) if length is None else length,
                                 ctypes.addressof(buf), cookie)
            helper.stdin.write(req.pack())
            helper.stdin.flush()
            return frames.Reply.unpack(helper.stdout.read(frames.REPLY.size))

        with netns.inside():
            cookie, tid = netns_cookie(), threading.get_native_id()
            for family, fam in ((2, "ipv4"), (10, "ipv6")):
                info = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
                rep = call(64, 0, family, info)
                assert (rep.status, rep.len) == (0, 84)
                assert info.raw.hex() == want[fam]["info"][1]
                short = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
                assert call(64, 0, family, short, 83).status == -errno.EINVAL
                rev = ctypes.create_string_buffer(struct.pack("=29sB", b"tcp", 0), 30)
                rev_match = 68 if family == 10 else 66
                assert call(rev_match, 0, family, rev).status == 0
                struct.pack_into("=29sB", rev, 0, b"nosuchmatch", 0)
                assert call(rev_match, 0, family, rev).status == -errno.ENOENT
        # the caller left the namespace it named: refused, not served in the wrong one
        info = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
        assert call(64, 0, 2, info).status == -errno.ESRCH
        # a foreign frame ends the helper (the stream cannot be resynchronized)
        helper.stdin.write(b"\0" * frames.REQUEST.size)
        helper.stdin.close()
        assert helper.wait(timeout=10) == 1
    finally:
        helper.kill()
        helper.wait()
