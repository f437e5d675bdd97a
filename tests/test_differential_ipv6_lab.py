"""An IPv6 traffic lab (the IPv4 one in lab.py turns IPv6 off): client, host and server
namespaces, crafted IPv6 packets sent client -> host (INPUT), client -> server via host (FORWARD)
and host -> client (OUTPUT), and the host's ip6tables filter installed either by the kernel
(ip6tables-legacy-restore: the oracle) or by bpfilter_umh.engine (the blob the same restore text
builds, read back with IP6T_SO_GET_ENTRIES in a scratch namespace).

    client ns                     host ns (filter under test)  server ns
    c0 2001:db8:1::2/64  ──────── h0 2001:db8:1::1/64
                                  h1 2001:db8:2::1/64  ─────── s0 2001:db8:2::2/64

No background traffic: no link-local addresses (addr_gen_mode 1), no DAD, no router
solicitations, static neighbour entries with fixed MACs (no neighbour discovery), ICMPv6 rate
limiting off (net.ipv6.icmp.ratelimit 0: icmpv6_xrlim_allow() would make replies depend on time).
MLD reports (sent from :: when a device has no link-local address) may still appear; every lab
ruleset starts each chain with NOISE rules accepting multicast and ::-sourced packets, and those
entries are left out of counter comparisons.

Observation: the host's ip6tables *security* table (ip6table_security, hook priority
NF_IP6_PRI_SECURITY = 50) runs after the filter (priority 0, where both the kernel's filter and
bpfilter's nf links sit), so its per-chain counters say what the filter let through. Probes are
sent one at a time and the deltas of those counters are the probe's outcome.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import time

import kernel_xt
from nsutil import Netns, veth
from bpfilter_umh.model import AF_INET6, Table

MAC = {"c0": "02:00:00:00:01:02", "h0": "02:00:00:00:01:01", "h1": "02:00:00:00:02:01",
       "s0": "02:00:00:00:02:02"}
C0, H0, H1, S0 = "2001:db8:1::2", "2001:db8:1::1", "2001:db8:2::1", "2001:db8:2::2"
NOISE = ["-d ff00::/8 -j ACCEPT", "-s ::/128 -j ACCEPT"]
SYSCTLS = ["net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.addr_gen_mode=1",
           "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
           "net.ipv6.conf.all.dad_transmits=0", "net.ipv6.conf.default.dad_transmits=0",
           "net.ipv6.conf.all.router_solicitations=0",
           "net.ipv6.conf.default.router_solicitations=0",
           "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0",
           "net.ipv6.icmp.ratelimit=0"]
OPTIONAL_SYSCTLS = ["net.ipv4.icmp_msgs_per_sec=100000", "net.ipv4.icmp_msgs_burst=100000"]
SECURITY = ("*security\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "-A INPUT -s 2001:db8::/32\n-A FORWARD -s 2001:db8::/32\n-A OUTPUT -s 2001:db8::/32\n"
            "COMMIT\n")
ETH_P_IPV6 = 0x86dd


def _mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def with_noise(text: str) -> str:
    """Insert the NOISE rules first in every built-in chain of an ip6tables-restore text (right
    after the chain declarations)."""
    lines = text.splitlines()
    decl = [i for i, ln in enumerate(lines) if ln.startswith(":")]
    builtins = [lines[i][1:].split()[0] for i in decl if lines[i].split()[1] != "-"]
    noise = [f"-A {c} {n}" for c in builtins for n in NOISE]
    return "\n".join(lines[:decl[-1] + 1] + noise + lines[decl[-1] + 1:]) + "\n"


def comparable_save(text: str) -> list:
    """ip6tables-save -c output without comments and without the NOISE rules' lines."""
    return [ln for ln in text.splitlines()
            if not ln.startswith("#") and not any(ln.endswith(n) for n in NOISE)]


def noise_entries(table: Table) -> set:
    """Entry indices of the NOISE rules (the first len(NOISE) rules of each built-in chain)."""
    return {r.index for c in table.chains if c.builtin for r in c.rules[:len(NOISE)]}


def assert_same_steps(want: list, got: list, names: list, table: Table, per_step: int) -> None:
    """Each step's [(outcomes by probe name, entry counters)] of the kernel (`want`) and of
    bpfilter (`got`) equal, but for the NOISE rules' counters; step k's table has `per_step`
    more entries than `table` per step (the appended rules)."""
    skip = noise_entries(table)
    for step, ((want_out, want_cnt), (got_out, got_cnt)) in enumerate(zip(want, got)):
        diffs = [f"{n}: kernel {want_out[n]} bpfilter {got_out[n]}" for n in names
                 if want_out[n] != got_out[n]]
        assert len(got_cnt) == len(want_cnt) == len(table.entries()) + per_step * step
        diffs += [f"entry {i}: kernel {w} bpfilter {g}" for i, (w, g) in
                  enumerate(zip(want_cnt, got_cnt)) if i not in skip and w != g]
        assert not diffs, f"step {step}:\n" + "\n".join(diffs[:40])


def blob_of(text: str):
    """The Table ip6tables-legacy-restore builds from `text` (its IP6T_SO_GET_ENTRIES blob read
    back in a scratch netns and decoded)."""
    with Netns("s6") as ns:
        ns.run(["ip6tables-legacy-restore"], input=text)
        with ns.inside():
            info, blob = kernel_xt.snapshot(AF_INET6)
    t = Table.decode(blob, AF_INET6, list(info.hook_entry), list(info.underflow),
                     info.valid_hooks, "filter")
    return t


def _entry_counters(blob: bytes, info) -> list:
    t = Table.decode(blob, AF_INET6, list(info.hook_entry), list(info.underflow), info.valid_hooks,
                     "filter")
    return [tuple(e.counters) for e in t.entries()]


class KernelFilter:
    """The oracle: the host's filter is the kernel's ip6tables."""
    name = "kernel"

    def __init__(self, host: Netns):
        self.host = host

    def load(self, text: str):
        self.host.run(["ip6tables-legacy-restore"], input=text)

    def counters(self) -> list:
        with self.host.inside():
            info, blob = kernel_xt.snapshot(AF_INET6)
        return _entry_counters(blob, info)

    def save(self) -> str:
        return self.host.run(["ip6tables-legacy-save", "-c", "-t", "filter"]).stdout

    def close(self):
        pass


class BpfilterFilter:
    """The candidate: the same blob installed with Engine.open(AF_INET6).install()."""
    name = "bpfilter"

    def __init__(self, host: Netns):
        from bpfilter_umh.engine import Engine
        self.host = host
        with host.inside():
            self.eng = Engine.open(AF_INET6)

    def load(self, text: str):
        t = blob_of(text)
        with self.host.inside():
            self.eng.install(t)

    def counters(self) -> list:
        with self.host.inside():
            return list(self.eng.counters())

    def close(self):
        with self.host.inside():
            self.eng.flush()
            self.eng.close()


class DoorFilter:
    """The unmodified ip6tables-legacy-restore through bpfilter's user-space door
    (`bpfilter exec -- ip6tables-legacy-restore`); counters read back with Engine.open(AF_INET6)
    in the host namespace (the state the door's helper installed)."""
    name = "bpfilter-door"

    def __init__(self, host: Netns):
        self.host = host
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env = dict(host.env, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.cli = [sys.executable, "-m", "bpfilter_umh.cli"]

    def load(self, text: str):
        self.host.run(self.cli + ["exec", "--", "ip6tables-legacy-restore"], input=text,
                      env=self.env)

    def counters(self) -> list:
        from bpfilter_umh.engine import Engine
        from bpfilter_umh.sockopt import use_host_bpffs
        use_host_bpffs()
        with self.host.inside():
            eng = Engine.open(AF_INET6)
            try:
                # served by bpfilter, not by the kernel's ip6_tables behind the door's back
                assert all(c["prog_id"] for c in eng.status()["chains"] if c["hook"]), \
                    "the door did not install programs"
                names = self.host.run("cat /proc/net/ip6_tables_names").stdout.split()
                assert "filter" not in names, "ip6tables reached the kernel's filter table"
                return list(eng.counters())
            finally:
                eng.close()

    def save(self) -> str:
        """ip6tables-legacy-save -c through the door: GET_INFO + GET_ENTRIES with counters."""
        return self.host.run(self.cli + ["exec", "--", "ip6tables-legacy-save", "-c", "-t",
                                         "filter"], env=self.env).stdout

    def close(self):
        self.host.run(self.cli + ["flush"], check=False, env=self.env)


class Lab6:
    def __init__(self, installer=KernelFilter):
        self._stack = contextlib.ExitStack()
        self._installer = installer
        self.filter = None

    def __enter__(self):
        st = self._stack
        try:
            self.c = st.enter_context(Netns("c6"))
            self.h = st.enter_context(Netns("h6"))
            self.s = st.enter_context(Netns("s6"))
            for ns in (self.c, self.h, self.s):
                ns.run("sysctl -qw " + " ".join(SYSCTLS))
                ns.run("sysctl -qw " + " ".join(OPTIONAL_SYSCTLS), check=False)
            self.h.run("sysctl -qw net.ipv6.conf.all.forwarding=1")
            veth(self.c, "c0", self.h, "h0")
            veth(self.h, "h1", self.s, "s0")
            for ns, dev, addr in ((self.c, "c0", C0), (self.h, "h0", H0), (self.h, "h1", H1),
                                  (self.s, "s0", S0)):
                ns.run(f"ip link set {dev} address {MAC[dev]} && "
                       f"ip -6 addr add {addr}/64 dev {dev} nodad")
            self.c.run(f"ip -6 neigh replace {H0} lladdr {MAC['h0']} dev c0 nud permanent && "
                       f"ip -6 route add 2001:db8::/32 via {H0} dev c0")
            self.h.run(f"ip -6 neigh replace {C0} lladdr {MAC['c0']} dev h0 nud permanent && "
                       f"ip -6 neigh replace {S0} lladdr {MAC['s0']} dev h1 nud permanent")
            self.s.run(f"ip -6 neigh replace {H1} lladdr {MAC['h1']} dev s0 nud permanent && "
                       f"ip -6 route add 2001:db8::/32 via {H1} dev s0")
            self.h.run(["ip6tables-legacy-restore"], input=SECURITY)
            self.filter = self._installer(self.h)
            st.callback(self.filter.close)
            with self.c.inside():
                self._pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            st.callback(self._pkt.close)
            self._pkt.bind(("c0", 0))
            with self.h.inside():
                self._raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            st.callback(self._raw.close)
        except BaseException:
            st.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def load(self, text: str):
        self.filter.load(text)

    def observed(self) -> tuple:
        """Counters of the security table's three rules: what passed INPUT, FORWARD, OUTPUT."""
        with self.h.inside():
            info = kernel_xt.get_info(AF_INET6, "security")
            blob = kernel_xt.get_entries(AF_INET6, "security", info.size)
        t = Table.decode(blob, AF_INET6, list(info.hook_entry), list(info.underflow),
                         info.valid_hooks, "security")
        return tuple(tuple(c.rules[0].counters) for c in t.chains if c.builtin)

    def send(self, where: str, packets: list) -> tuple:
        """Send the packets of one probe (client side for "in"/"fwd", host for "out") and
        return the security-counter deltas (INPUT, FORWARD, OUTPUT) once they are stable, and
        how many sends the host's stack refused with EPERM (dropped at OUTPUT)."""
        before = self.observed()
        refused = 0
        for p in packets:
            if where == "out":
                dst = str(ipaddress.IPv6Address(p[24:40]))
                try:
                    self._raw.sendto(p, (dst, 0))
                except PermissionError:     # NF_DROP at LOCAL_OUT: ip6_local_out says -EPERM
                    refused += 1
            else:
                self._pkt.send(_mac(MAC["h0"]) + _mac(MAC["c0"]) +
                               ETH_P_IPV6.to_bytes(2, "big") + p)
        last, stable = None, 0
        # the stack handles a probe (and any ICMPv6 error about it) in softirq soon after the
        # send; on a loaded machine that can lag, so wait until 3 polls 10 ms apart agree
        for _ in range(60):                   # bounded: at most 60 * 10 ms
            time.sleep(0.01)
            now = self.observed()
            stable = stable + 1 if now == last else 0
            last = now
            if stable >= 2:
                break
        return tuple((a[0] - b[0], a[1] - b[1]) for a, b in zip(last, before)) + (refused,)
