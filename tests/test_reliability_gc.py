"""Issue #9, leftovers: a namespace deleted without `bpfilter flush` leaves its pins (programs and
maps held in kernel memory) and its /run/bpfilter/<cookie>/ state; bpfilter_umh.gc.collect()
removes both for dead namespaces only. A live namespace's state, pins and filtering are untouched.
"""
import os
import subprocess
import sys
import time

import pytest

from nsutil import Netns, veth
from test_reliability_util import A_IP, B_IP, P_BOTH_ACCEPT, P_BOTH_DROP, P_FLIP, UdpProbe, \
    two_rulesets
from bpfilter_umh import gc
from bpfilter_umh import kernel as K
from bpfilter_umh.engine import Engine
from bpfilter_umh.errors import BpfilterError
from bpfilter_umh.model import Table

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF pins")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A_VERDICTS = {P_BOTH_DROP: False, P_FLIP: False, P_BOTH_ACCEPT: True}


def snapshot(*dirs) -> dict:
    """{path: (inode, mtime_ns, size)} of everything under dirs."""
    out = {}
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            for f in files + subdirs:
                p = os.path.join(root, f)
                st = os.lstat(p)
                out[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def prog_alive(prog_id: int) -> bool:
    try:
        K.Prog.from_id(prog_id).close()
        return True
    except BpfilterError:
        return False


def freed(ids, timeout: float = 5.0) -> bool:
    """Every program id gone (freed after an RCU grace period, not at unpin): bounded wait."""
    end = time.monotonic() + timeout
    while any(prog_alive(i) for i in ids):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def dead_namespace_leftovers():
    """A namespace with an IPv4 and an IPv6 table (flavor nf) deleted without flush, plus the
    pid file a dead watcher leaves: (cookie, its pin dir, its state dir, its program ids)."""
    ta, _tb = two_rulesets()
    x = Netns("gcx")
    try:
        with x.inside():
            cookie = K.netns_cookie()
            eng = Engine.open()
            eng.install(ta)
            ids = set(eng._slot_ids().values())
            eng6 = Engine.open(10)
            eng6.install(Table.empty("filter", 10))     # policy counters: programs too
            ids |= set(eng6._slot_ids().values())
            eng.close()
            eng6.close()
    finally:
        x.close()                # ip netns del: no flush
    pin_dir = os.path.join(gc.PIN_ROOT, str(cookie))
    state_dir = os.path.join(gc.STATE_ROOT, str(cookie))
    # what a dead watcher leaves: its pid file (it lived in the namespace and died with it)
    with open(os.path.join(state_dir, "watch-ipv4-tc.pid"), "w") as f:
        f.write("999999999")
    return cookie, pin_dir, state_dir, ids


def test_gc_removes_dead_namespace_state_only():
    with Netns("a") as a, Netns("b") as b:
        veth(a, "va", b, "vb", A_IP + "/24", B_IP + "/24")
        probe = UdpProbe(a, b)
        try:
            with b.inside():
                live = Engine.open()
                live.install(two_rulesets()[0])
                live_cookie = K.netns_cookie()
            live_dirs = (os.path.join(gc.PIN_ROOT, str(live_cookie)),
                         os.path.join(gc.STATE_ROOT, str(live_cookie)))
            cookie, pin_dir, state_dir, ids = dead_namespace_leftovers()
            assert os.path.isdir(pin_dir) and os.path.isdir(state_dir)
            assert sorted(os.listdir(state_dir)) == ["ipv4.table", "ipv6.table",
                                                     "watch-ipv4-tc.pid"]
            assert all(prog_alive(i) for i in ids), "pinned programs outlive their namespace"
            before = snapshot(*live_dirs)
            assert before
            # `only`: other engineers' runs on this machine keep their own leftovers for their
            # own tests; the live namespace is a candidate too, so "never touch live" is tested
            removed = gc.collect(only={cookie, live_cookie})
            assert sorted(removed) == sorted([pin_dir, state_dir])
            assert not os.path.exists(pin_dir) and not os.path.exists(state_dir)
            assert freed(ids), "the dead namespace's programs must be freed"
            # the live namespace: same files, same filtering
            assert snapshot(*live_dirs) == before
            assert probe.verdicts(wait=0.5) == A_VERDICTS
            with b.inside():
                assert Engine.open().table.encode() == live.table.encode()
            # nothing of a dead namespace is left: a second pass finds nothing of those
            assert gc.collect(only={cookie, live_cookie}) == []
        finally:
            probe.close()
            with b.inside():
                Engine.open().flush()


def test_gc_keeps_a_namespace_held_only_by_a_bind_mount_elsewhere(tmp_path):
    """A namespace no task is in, reachable only through a bind mount outside /run/netns (as
    container runtimes keep them): alive, so its state stays."""
    target = tmp_path / "held"
    target.touch()
    x = Netns("gch")
    try:
        with x.inside():
            cookie = K.netns_cookie()
            eng = Engine.open()
            eng.install(two_rulesets()[0])
        subprocess.run(["mount", "--bind", x.path, str(target)], check=True)
        try:
            subprocess.run(["ip", "netns", "del", x.name], check=True)  # /run/netns entry gone
            # only the mount table shows it (a scan of tasks and /run/netns misses it)
            assert cookie in gc.live_netns_cookies()
            assert gc.collect(only={cookie}) == []
            assert os.path.isdir(os.path.join(gc.STATE_ROOT, str(cookie)))
            # enter it through the bind mount and clean up properly
            fd = os.open(str(target), os.O_RDONLY)
            try:
                code = ("import os, sys; sys.path.insert(0, %r); from bpfilter_umh import kernel"
                        " as K; K.setns(%d, K.CLONE_NEWNET); from bpfilter_umh.engine import "
                        "Engine; Engine.open().flush()" % (ROOT, fd))
                subprocess.run([sys.executable, "-c", code], check=True, pass_fds=(fd,))
            finally:
                os.close(fd)
        finally:
            subprocess.run(["umount", str(target)], check=False)
    finally:
        x.close()
    assert not os.path.isdir(os.path.join(gc.STATE_ROOT, str(cookie)))


def test_gc_cli_dry_run_lists_and_removes_nothing():
    cookie, pin_dir, state_dir, ids = dead_namespace_leftovers()
    try:
        p = subprocess.run([sys.executable, "-m", "bpfilter_umh.gc", "--dry-run"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert f"would remove {pin_dir}" in p.stdout and f"would remove {state_dir}" in p.stdout
        assert os.path.isdir(pin_dir) and os.path.isdir(state_dir)
    finally:
        removed = gc.collect(only={cookie})
    assert sorted(removed) == sorted([pin_dir, state_dir])
    assert not os.path.exists(pin_dir) and not os.path.exists(state_dir)


def test_gc_keeps_a_namespace_held_only_by_an_open_fd():
    """A namespace no task is in and nothing mounts, kept by an fd a process holds (how
    `ip netns` alternatives and runtimes pass namespaces around): alive, so its state stays."""
    x = Netns("gcf")
    try:
        with x.inside():
            cookie = K.netns_cookie()
            Engine.open().install(two_rulesets()[0])
        fd = os.open(x.path, os.O_RDONLY)
        try:
            subprocess.run(["ip", "netns", "del", x.name], check=True)
            assert gc.collect(only={cookie}) == []
            assert os.path.isdir(os.path.join(gc.STATE_ROOT, str(cookie)))
            code = ("import sys; sys.path.insert(0, %r); from bpfilter_umh import kernel as K; "
                    "K.setns(%d, K.CLONE_NEWNET); from bpfilter_umh.engine import Engine; "
                    "Engine.open().flush()" % (ROOT, fd))
            subprocess.run([sys.executable, "-c", code], check=True, pass_fds=(fd,))
        finally:
            os.close(fd)
    finally:
        x.close()
    assert not os.path.isdir(os.path.join(gc.STATE_ROOT, str(cookie)))
