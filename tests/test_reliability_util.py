"""Shared pieces of the reliability tests and of tools/reliability.py (no tests in here).

Verdicts are observed with real UDP datagrams through a veth pair: a sender socket in namespace
`a`, one receiver socket per port in namespace `b` (sockets belong to the namespace of the thread
that creates them), so a probe costs microseconds instead of a ping's one-second timeout.
"""
from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time

from test_compile_util import ACCEPT, DROP, rule, table, udp

A_IP, B_IP = "192.0.2.1", "192.0.2.2"
P_BOTH_DROP, P_FLIP, P_BOTH_ACCEPT = 7001, 7002, 7003     # see two_rulesets()
# what ruleset A and B of two_rulesets() let through
A_VERDICTS = {P_BOTH_DROP: False, P_FLIP: False, P_BOTH_ACCEPT: True}
B_VERDICTS = {P_BOTH_DROP: False, P_FLIP: True, P_BOTH_ACCEPT: True}


def two_rulesets():
    """Rulesets A and B with the same entry layout (entry i counts the same port in both):
    7001 dropped by both, 7002 dropped by A and accepted by B, 7003 accepted by both.
    A also has an OUTPUT rule, so an install touches two hooks (a swap can fail half way)."""
    def one(flip):
        return table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(P_BOTH_DROP,) * 2), proto=17),
                                         rule(flip, udp(dport=(P_FLIP,) * 2), proto=17),
                                         rule(ACCEPT, udp(dport=(P_BOTH_ACCEPT,) * 2), proto=17)]),
                      "OUTPUT": (ACCEPT, [rule(ACCEPT, udp(dport=(9,) * 2), proto=17)])})
    return one(DROP), one(ACCEPT)


class UdpProbe:
    """Send datagrams from a to b's ports and count what b's sockets received."""

    def __init__(self, a, b, ports=(P_BOTH_DROP, P_FLIP, P_BOTH_ACCEPT)):
        self.rx = {}
        with b.inside():
            for p in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.bind((B_IP, p))
                s.setblocking(False)
                self.rx[p] = s
        with a.inside():
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.got = {p: 0 for p in ports}
        self.sent = {p: 0 for p in ports}

    def send(self, port: int, n: int = 1):
        for _ in range(n):
            self.tx.sendto(b"x", (B_IP, port))
            self.sent[port] += 1

    def drain(self, wait: float = 0.05):
        """Receive everything that arrives within `wait` seconds of the last datagram."""
        end = time.monotonic() + wait
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            r, _, _ = select.select(list(self.rx.values()), [], [], left)
            for s in r:
                port = s.getsockname()[1]
                while True:
                    try:
                        s.recv(16)
                    except BlockingIOError:
                        break
                    self.got[port] += 1
                end = time.monotonic() + wait

    def passes(self, port: int, wait: float = 0.05) -> bool:
        """One datagram: delivered (True) or dropped (False). `wait` bounds how late a delivered
        datagram may arrive (a loaded machine delays it; a dropped one never arrives)."""
        before = self.got[port]
        self.send(port)
        self.drain(wait)
        return self.got[port] > before

    def verdicts(self, wait: float = 0.05) -> dict:
        return {p: self.passes(p, wait) for p in self.rx}

    def close(self):
        for s in self.rx.values():
            s.close()
        self.tx.close()


class Flood:
    """A background thread sending round-robin to the probe's ports until stopped; another
    drains the receivers. Bounded: stops after `limit` datagrams at the latest."""

    def __init__(self, probe: UdpProbe, limit: int = 5_000_000, pace: float = 0.0):
        self.probe, self.limit, self.pace = probe, limit, pace
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]

    def _send(self):
        ports = list(self.probe.rx)
        n = 0
        while not self._stop.is_set() and n < self.limit:
            for p in ports:
                self.probe.send(p)
            n += len(ports)
            if self.pace:
                time.sleep(self.pace)

    def _recv(self):
        while not self._stop.is_set():
            self.probe.drain(0.02)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self.threads:
            t.join(timeout=10)
        self.probe.drain(0.3)


def open_fds() -> int:
    """This process's open fds, after collecting garbage: objects of earlier tests (engines,
    maps) close their fds when collected, which must not look like a change."""
    import gc
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def pin_files(eng) -> list:
    """Everything the engine has pinned for this netns/family."""
    out = []
    for root, _dirs, files in os.walk(eng.pin_dir):
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def bpf_objects_by_name(prefix: str = "bpfilter") -> dict:
    """{'prog': n, 'map': n, 'link': n}: kernel-wide counts of objects whose name starts with
    `prefix` (bpftool), for before/after leak checks in a quiet system."""
    import json
    import subprocess
    out = {}
    for kind in ("prog", "map", "link"):
        p = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True)
        try:
            items = json.loads(p.stdout or "[]")
        except ValueError:
            items = []
        if kind == "link":
            out[kind] = len(items)
        else:
            out[kind] = sum(1 for it in items if str(it.get("name", "")).startswith(prefix))
    return out


@contextlib.contextmanager
def udp_lab(teardown):
    """Namespaces a and b on a veth and a UdpProbe from a to b: yields (a, b, probe). At the end,
    also on failure: the probe closed, in-process fault points disarmed, then teardown(b)."""
    from nsutil import Netns, veth
    from bpfilter_umh import faults
    with Netns("a") as a, Netns("b") as b:
        veth(a, "va", b, "vb", A_IP + "/24", B_IP + "/24")
        probe = UdpProbe(a, b)
        try:
            yield a, b, probe
        finally:
            probe.close()
            faults.disarm()
            teardown(b)


def flush_engine(b):
    """Remove b's bpfilter state (the nf flavor's engine)."""
    from bpfilter_umh.engine import Engine
    with b.inside():
        Engine.open().flush()
