"""The responder's lifecycle (responder.py): started by the first install whose table has a
REJECT or LOG rule, left alone by later such installs, stopped (and its ring unpinned) by an
install without them and by flush, restarted by the next install after it died, and never
outliving its namespace."""
import os
import signal
import time

import pytest

from lab import kernel_snapshot, restore
from nsutil import Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

WITH = "*filter\n-A INPUT -p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset\nCOMMIT\n"
WITH_LOG = "*filter\n-A INPUT -p udp -j LOG --log-prefix \"x: \"\nCOMMIT\n"
WITHOUT = "*filter\n-A INPUT -p tcp -m tcp --dport 23 -j DROP\nCOMMIT\n"


def table_of(text):
    with Netns("ls") as ns:
        restore(ns, text)
        return kernel_snapshot(ns)


def _pid(ns):
    from bpfilter_umh import daemons, responder
    with ns.inside():
        return daemons.running(responder._pidfile("ipv4"))


def _pin(ns):
    from bpfilter_umh import responder
    with ns.inside():
        return os.path.exists(responder.events_pin("ipv4"))


def test_started_kept_stopped_restarted():
    from bpfilter_umh.engine import Engine
    from bpfilter_umh.model import AF_INET
    with_, with_log, without = table_of(WITH), table_of(WITH_LOG), table_of(WITHOUT)
    with Netns("lc") as ns:
        with ns.inside():
            eng = Engine.open(AF_INET)
            eng.install(with_)
        try:
            pid = _pid(ns)
            assert pid is not None and _pin(ns)
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(ns.path).st_ino, \
                "the responder runs in the namespace it serves"
            with ns.inside():
                eng.install(with_log)
            assert _pid(ns) == pid, "a later install adopts the running responder"
            with ns.inside():
                eng.install(without)
            assert _pid(ns) is None and not _pin(ns)
            assert not os.path.exists(f"/proc/{pid}")
            with ns.inside():
                eng.install(with_)
            pid2 = _pid(ns)
            assert pid2 is not None
            os.kill(pid2, signal.SIGKILL)
            for _ in range(50):
                if _pid(ns) is None:
                    break
                time.sleep(0.05)
            with ns.inside():
                eng.install(with_)             # a later helper finds it dead: a new one
            pid3 = _pid(ns)
            assert pid3 not in (None, pid2)
            with ns.inside():
                eng.flush()
            assert _pid(ns) is None and not _pin(ns)
            assert not os.path.exists(f"/proc/{pid3}")
        finally:
            with ns.inside():
                eng.flush()


def test_responder_exits_when_its_ring_goes():
    """A responder whose ring was unpinned behind its back (bpffs cleaned up) exits by itself
    within its poll period."""
    from bpfilter_umh import kernel as K
    from bpfilter_umh import responder
    from bpfilter_umh.engine import Engine
    from bpfilter_umh.model import AF_INET
    t = table_of(WITH)
    with Netns("lc") as ns:
        with ns.inside():
            eng = Engine.open(AF_INET)
            eng.install(t)
        try:
            pid = _pid(ns)
            with ns.inside():
                K.unpin(responder.events_pin("ipv4"))
            for _ in range(40):
                if not os.path.exists(f"/proc/{pid}") or \
                        open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the responder outlived its ring")
        finally:
            with ns.inside():
                eng.flush()


def test_stop_costs_nothing_when_nothing_runs(monkeypatch):
    """Every install of a table without REJECT/LOG (and, IPv4, without addrtype) stops the
    responder and the addrtype watcher: with neither a pid file nor a pin there, neither stop
    reads a pid file nor unpins anything (they cost ~40 us each per install when they did). A
    pin left alone (its process and pid file gone) is still removed."""
    from bpfilter_umh import addrtype, daemons, responder
    from bpfilter_umh import kernel as K
    from bpfilter_umh.engine import Engine
    from bpfilter_umh.model import AF_INET
    without = table_of(WITHOUT)
    calls = []
    real_stop, real_unpin = daemons.stop, K.unpin
    monkeypatch.setattr(daemons, "stop", lambda p: calls.append(("stop", p)) or real_stop(p))

    def unpin(p, *a):
        if os.path.basename(p) in ("events", "addrtype"):     # not the programs' pins
            calls.append(("unpin", p))
        return real_unpin(p, *a)
    monkeypatch.setattr(K, "unpin", unpin)
    with Netns("lz") as ns:
        with ns.inside():
            eng = Engine.open(AF_INET)
        try:
            with ns.inside():
                eng.install(without)
                calls.clear()
                eng.install(without)
            assert calls == [], "the stops did work with nothing to stop"
            with ns.inside():
                pin = responder.events_pin("ipv4", eng.cookie)
                ring = responder.open_events("ipv4")     # a ring pinned, no responder
                ring.close()
                assert os.path.exists(pin)
                eng.install(without)
            assert not os.path.exists(pin), "a left pin must still be removed"
            assert ("unpin", pin) in calls
            assert not any(addrtype.pin_path(eng.cookie) == p for _c, p in calls)
        finally:
            with ns.inside():
                eng.flush()
