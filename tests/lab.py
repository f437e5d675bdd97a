"""The traffic lab: client, host and server namespaces joined by veth pairs, probes sent through
them, and the host's filter ruleset installed by a pluggable installer (kernel iptables-legacy,
or bpfilter).

    client ns            host ns (the filter under test)            server ns
    c0 192.0.2.2    ──── eth0   192.0.2.1     (192.0.2.0/26)
    c1 192.0.2.66   ──── eth1   192.0.2.65    (192.0.2.64/26)
    c2 192.0.2.130  ──── veth-a 192.0.2.129   (192.0.2.128/25, 203.0.113.0/26)
    c3 203.0.113.66 ──── longifname12345 203.0.113.65 (203.0.113.64/26)
                         srv0   198.51.100.1  (default route) ──── s0 198.51.100.2
                         dmz0   203.0.113.1   (veth to nowhere: one more local address)

Every address is a /32 and every other destination is routed through the peer, whose MAC is a
permanent neighbour entry: no ARP, ever. IPv6 is off in every namespace (no DAD, RS or MLD
packets), ICMP rate limiting is off (net.ipv4.icmp_ratemask=0: icmpv4_global_allow() and
icmpv4_xrlim_allow() would otherwise make the kernel's replies depend on time) and the host
forwards. Destinations of forwarded and output probes are never an address the peer owns, and
the peers do not forward, so they drop them silently (ip_error() sends nothing when forwarding
is off): the only packets in the lab are the probes and the host's own replies to them.

Observation points: "host" = raw IPv4 sockets in the host (raw_local_deliver() runs after
NF_INET_LOCAL_IN in ip_local_deliver_finish(), so they see exactly what INPUT let through);
"c0".."c3", "s0" = AF_PACKET sockets on the client/server interfaces (what FORWARD or OUTPUT
let out of the host).

All sockets live in this process: a socket keeps the namespace it was created in, so a probe
batch costs no process start.

API (the differential suites, the demo and later issues use these names):
    with Lab(installer=KernelInstaller) as lab:     creates everything, removes it on any exit
        lab.load(text)                              iptables-restore text -> the host's filter
        lab.send(number(probes)) -> {ident: outcome}   outcome: sorted ((point, frag offset), ..)
        lab.counters() -> {(chain, n | "policy" | "return"): (pcnt, bcnt)}
        lab.tcp_connect / lab.udp_exchange / lab.ping   real sockets through the same host
    differential(ref_lab, cand_lab, text, probes) -> [difference lines]   (empty = identical)
    INSTALLERS: "kernel" (oracle, GET_ENTRIES counters), "kernel-save" (iptables-save -c),
                "bpfilter" (Engine.install of the blob iptables-legacy-restore builds),
                "bpfilter-door" (`bpfilter exec -- iptables-legacy-restore` / `-save -c`)
An installer is any class taking the host Netns with .name, .load(text), .counters(), .close().
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time

from nsutil import Netns
from probes import IPPROTO_ICMP, IPPROTO_OTHER, IPPROTO_TCP, IPPROTO_UDP, Probe, with_ident

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SO_BINDTODEVICE = 25

# host interface -> (host address, peer namespace, peer interface, peer address, nets routed there)
LINKS = {
    "eth0": ("192.0.2.1", "client", "c0", "192.0.2.2", ["192.0.2.0/26"]),
    "eth1": ("192.0.2.65", "client", "c1", "192.0.2.66", ["192.0.2.64/26"]),
    "veth-a": ("192.0.2.129", "client", "c2", "192.0.2.130", ["192.0.2.128/25", "203.0.113.0/26"]),
    # IFNAMSIZ - 1 characters: the name fills the whole 16-byte compare in ip_packet_match()
    "longifname12345": ("203.0.113.65", "client", "c3", "203.0.113.66", ["203.0.113.64/26"]),
    "srv0": ("198.51.100.1", "server", "s0", "198.51.100.2", ["0.0.0.0/0"]),
}
DUMMY = ("dmz0", "203.0.113.1")
HOST_ADDRS = [v[0] for v in LINKS.values()] + [DUMMY[1]]
PEER_ADDRS = [v[3] for v in LINKS.values()]
SENDERS = {v[2]: k for k, v in LINKS.items()}            # sender interface -> host interface
HOST_IFACES = list(LINKS) + [DUMMY[0]]

# Destinations by the host interface a packet to them leaves from (never a peer's own address).
EGRESS_POOLS = {
    "eth0": ["192.0.2.3", "192.0.2.10", "192.0.2.33", "192.0.2.62"],
    "eth1": ["192.0.2.67", "192.0.2.100", "192.0.2.126"],
    "veth-a": ["192.0.2.131", "192.0.2.200", "192.0.2.254", "203.0.113.5", "203.0.113.60"],
    "longifname12345": ["203.0.113.67", "203.0.113.100", "203.0.113.126"],
    "srv0": ["198.51.100.3", "198.51.100.77", "198.51.100.200", "203.0.113.129",
             "203.0.113.250"],
}


def egress_of(dst: str) -> str:
    """The host interface the host routes `dst` out of (longest prefix, as the lab's routes)."""
    a = ipaddress.IPv4Address(dst)
    best, blen = None, -1
    for ifname, (_, _, _, peer, nets) in LINKS.items():
        for n in nets + [peer + "/32"]:
            net = ipaddress.IPv4Network(n)
            if a in net and net.prefixlen > blen:
                best, blen = ifname, net.prefixlen
    return best


def _mac(i: int, side: int) -> str:
    return f"02:00:00:00:{side:02x}:{i:02x}"


class LoadError(Exception):
    """The installer refused the ruleset (message = its output)."""


# ---------------------------------------------------------------------------------- installers
#
# An installer puts an iptables-restore text into the lab's host namespace and reads back the
# counters of every entry, keyed (chain, rule number) for rules, (chain, "policy") for a built-in
# chain's underflow entry and (chain, "return") for the RETURN entry ending a user chain (which
# ipt_do_table() counts too, though iptables-save never shows it).

def parse_save_counters(text: str) -> dict:
    """iptables-save -c output of the filter table -> {(chain, rule#|"policy"): (pcnt, bcnt)}."""
    out, seen = {}, {}
    for line in text.splitlines():
        m = re.match(r"^:(\S+) (\S+) \[(\d+):(\d+)\]", line)
        if m and m.group(2) != "-":
            out[(m.group(1), "policy")] = (int(m.group(3)), int(m.group(4)))
            continue
        m = re.match(r"^\[(\d+):(\d+)\] -A (\S+)", line)
        if m:
            chain = m.group(3)
            n = seen.get(chain, 0)
            seen[chain] = n + 1
            out[(chain, n)] = (int(m.group(1)), int(m.group(2)))
    return out


def table_counters(table, by_index=None) -> dict:
    """{(chain, n|"policy"|"return"): (pcnt, bcnt)} of a model Table, from its own counters or
    from `by_index` (entry index -> (pcnt, bcnt), e.g. the engine's counters map)."""
    def get(rule):
        return tuple(rule.counters) if by_index is None else tuple(by_index[rule.index])
    out = {}
    for c in table.chains:
        for n, r in enumerate(c.rules):
            out[(c.name, n)] = get(r)
        if c.policy_entry is not None:
            out[(c.name, "policy" if c.builtin else "return")] = get(c.policy_entry)
    return out


def kernel_snapshot(ns: Netns):
    """The filter table the kernel holds in `ns` (model Table with counters), via
    IPT_SO_GET_INFO + IPT_SO_GET_ENTRIES."""
    import kernel_xt
    from bpfilter_umh.model import AF_INET, Table
    with ns.inside():
        info, blob = kernel_xt.snapshot(AF_INET)
    return Table.decode(blob, AF_INET, list(info.hook_entry), list(info.underflow),
                        info.valid_hooks, num_entries=info.num_entries)


def restore(ns: Netns, text: str):
    p = ns.run(["iptables-legacy-restore"], input=text, check=False)
    if p.returncode != 0:
        raise LoadError(p.stdout + p.stderr)


class KernelInstaller:
    """The oracle: the kernel's own ip_tables, programmed by iptables-legacy-restore."""
    name = "kernel"

    def __init__(self, ns: Netns):
        self.ns = ns

    def load(self, text: str):
        restore(self.ns, text)

    def counters(self) -> dict:
        return table_counters(kernel_snapshot(self.ns))

    def close(self):
        pass


class SaveCountersKernelInstaller(KernelInstaller):
    """The kernel, counters read through iptables-legacy-save -c (no codec involved)."""
    name = "kernel-save"

    def counters(self) -> dict:
        return parse_save_counters(self.ns.run(["iptables-legacy-save", "-c", "-t", "filter"]).stdout)


class EngineInstaller:
    """bpfilter's engine, fed the exact blob iptables would send: the text is restored into a
    scratch namespace's kernel tables, read back with GET_INFO/GET_ENTRIES, decoded with the
    codec, and installed with Engine.install() from inside the lab's host namespace."""
    name = "bpfilter"

    def __init__(self, ns: Netns):
        from bpfilter_umh.engine import Engine
        from bpfilter_umh.model import AF_INET
        self.ns = ns
        self.scratch = Netns("x")
        self.table = None
        try:
            with ns.inside():
                self.engine = Engine.open(AF_INET)
        except BaseException:
            self.scratch.close()
            raise

    def load(self, text: str):
        restore(self.scratch, text)
        self.table = kernel_snapshot(self.scratch)
        with self.ns.inside():
            self.engine.install(self.table)

    def counters(self) -> dict:
        return table_counters(self.table, list(self.engine.counters()))

    def close(self):
        try:
            with self.ns.inside():
                for name in ("flush", "close"):
                    if hasattr(self.engine, name):
                        getattr(self.engine, name)()
        finally:
            self.scratch.close()


class DoorInstaller:
    """The unmodified binaries through bpfilter's user-space door, exactly as a user runs them:
    `bpfilter exec -- iptables-legacy-restore` to load, `bpfilter exec -- iptables-legacy-save -c`
    to read the counters (so only the entries iptables-save shows are compared)."""
    name = "bpfilter-door"

    def __init__(self, ns: Netns):
        self.ns = ns
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env = dict(ns.env, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.cli = [sys.executable, "-m", "bpfilter_umh.cli"]
        self.door = self.cli + ["exec", "--"]

    def _run(self, argv, text=None):
        p = self.ns.run(argv, input=text, check=False, env=self.env)
        if p.returncode != 0:
            raise LoadError(f"{' '.join(argv)} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p.stdout

    def load(self, text: str):
        self._run(self.door + ["iptables-legacy-restore"], text)

    def counters(self) -> dict:
        return parse_save_counters(self._run(self.door + ["iptables-legacy-save", "-c", "-t",
                                                          "filter"]))

    def close(self):
        self.ns.run(self.cli + ["flush"], check=False, env=self.env)


class LauncherInstaller(DoorInstaller):
    """The same through build/bpfilter-exec (`make launcher`): the first command runs the Python
    door, which starts the helper; the later ones hand their door to that helper."""
    name = "bpfilter-launcher"

    def __init__(self, ns: Netns):
        super().__init__(ns)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        subprocess.run(["make", "-s", "-C", root, "launcher", f"PYTHON={sys.executable}"],
                       check=True, capture_output=True)
        self.door = [os.path.join(root, "build", "bpfilter-exec"), "--"]
        self.env["BPFILTER_IDLE_EXIT"] = "30"     # stays between the cases


INSTALLERS = {"kernel": KernelInstaller, "kernel-save": SaveCountersKernelInstaller,
              "bpfilter": EngineInstaller, "bpfilter-door": DoorInstaller,
              "bpfilter-launcher": LauncherInstaller}


# ------------------------------------------------------------------------------------- the lab

class Lab:
    """Three namespaces and every socket needed to send probes and watch where they arrive.

    `installer` is a factory taking the host Netns (KernelInstaller by default)."""

    def __init__(self, installer=KernelInstaller, tag: str = ""):
        self._stack = contextlib.ExitStack()
        self.socks = []
        try:
            self.client = self._stack.enter_context(Netns(tag + "c"))
            self.host = self._stack.enter_context(Netns(tag + "h"))
            self.server = self._stack.enter_context(Netns(tag + "s"))
            self._build()
            self._open_sockets()
            self.installer = installer(self.host)
            self._stack.callback(self.installer.close)
        except BaseException:
            self.close()
            raise

    # -- topology
    def ns_named(self, name: str) -> Netns:
        return {"client": self.client, "host": self.host, "server": self.server}[name]

    def _build(self):
        sysctl_base = ("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
                       " net.ipv4.icmp_ratemask=0 net.ipv4.conf.all.rp_filter=0"
                       " net.ipv4.conf.default.rp_filter=0")
        for ns in (self.client, self.host, self.server):
            ns.run(sysctl_base)
        self.host.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0"
                      " net.ipv4.conf.default.send_redirects=0")
        tmp = f"lb{os.getpid() % 10000}{id(self) % 1000}"
        host_cmds = [f"ip link add {DUMMY[0]} type veth peer name {DUMMY[0]}p",
                     f"ip link set {DUMMY[0]}p up", f"ip link set {DUMMY[0]} up",
                     f"ip addr add {DUMMY[1]}/32 dev {DUMMY[0]}"]
        peer_cmds = {"client": [], "server": []}
        for i, (hif, (haddr, peer_ns, pif, paddr, nets)) in enumerate(LINKS.items()):
            hmac, pmac = _mac(i, 1), _mac(i, 2)
            subprocess.run(["ip", "link", "add", f"{tmp}h{i}", "netns", self.host.name,
                            "address", hmac, "type", "veth", "peer", "name", f"{tmp}p{i}",
                            "netns", self.ns_named(peer_ns).name, "address", pmac], check=True)
            host_cmds += [f"ip link set {tmp}h{i} name {hif}", f"ip link set {hif} up",
                          f"ip addr add {haddr}/32 dev {hif}",
                          f"ip route add {paddr}/32 dev {hif}",
                          f"ip neigh replace {paddr} lladdr {pmac} dev {hif} nud permanent"]
            for n in nets:
                host_cmds.append(f"ip route add {'default' if n == '0.0.0.0/0' else n}"
                                 f" via {paddr} dev {hif}")
            peer_cmds[peer_ns] += [f"ip link set {tmp}p{i} name {pif}", f"ip link set {pif} up",
                                   f"ip addr add {paddr}/32 dev {pif}",
                                   f"ip route add {haddr}/32 dev {pif}",
                                   f"ip neigh replace {haddr} lladdr {hmac} dev {pif} nud permanent",
                                   # one default route per interface: a raw socket bound to the
                                   # interface (SO_BINDTODEVICE) finds the one whose oif matches
                                   f"ip route add default via {haddr} dev {pif} metric {10 + i}"]
        self.host.run(" && ".join(host_cmds))
        for peer_ns, cmds in peer_cmds.items():
            self.ns_named(peer_ns).run(" && ".join(cmds))

    def _sock(self, ns: Netns, *args) -> socket.socket:
        with ns.inside():
            s = socket.socket(*args)
        self.socks.append(s)
        return s

    def _open_sockets(self):
        # /proc/net/snmp opened inside a namespace keeps showing that namespace's counters
        self.snmp = {}
        for name in ("client", "host", "server"):
            with self.ns_named(name).inside():
                self.snmp[name] = os.open("/proc/thread-self/net/snmp", os.O_RDONLY)
        self.senders = {}
        for hif, (_, peer_ns, pif, _, _) in LINKS.items():
            s = self._sock(self.ns_named(peer_ns), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, pif.encode())
            self.senders[pif] = s
        self.senders["host"] = self._sock(self.host, socket.AF_INET, socket.SOCK_RAW,
                                          socket.IPPROTO_RAW)
        self.observers = []      # (point name, socket, is_packet_socket)
        for proto in (IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_OTHER):
            s = self._sock(self.host, socket.AF_INET, socket.SOCK_RAW, proto)
            self.observers.append(("host", s, False))
        for hif, (_, peer_ns, pif, _, _) in LINKS.items():
            s = self._sock(self.ns_named(peer_ns), socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            s.bind((pif, ETH_P_IP))
            self.observers.append((pif, s, True))
        for _, s, _ in self.observers:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            s.setblocking(False)

    # -- rulesets
    def load(self, text: str):
        """Install an iptables-restore text in the host with this lab's installer."""
        self.installer.load(text)

    def counters(self) -> dict:
        return self.installer.counters()

    # -- traffic
    def _drain(self):
        """{point: [packets]} of everything queued on the observers now."""
        got = {}
        for point, s, is_packet in self.observers:
            while True:
                try:
                    data, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                if is_packet and addr[2] == PACKET_OUTGOING:
                    continue
                got.setdefault(point, []).append(data)
        return got

    def _ip_mib(self) -> dict:
        """{namespace: {"InReceives": n, "OutTransmits": n, ...}} from /proc/net/snmp."""
        out = {}
        for name, fd in self.snmp.items():
            lines = [ln.split() for ln in os.pread(fd, 65536, 0).decode().splitlines()
                     if ln.startswith("Ip:")]
            out[name] = dict(zip(lines[0][1:], map(int, lines[1][1:])))
        return out

    def _barrier(self, before: dict, to_host: int, deadline: float):
        """Wait (bounded) until ip_rcv() in the host has counted the `to_host` packets sent to
        it, and the peers have counted as many packets as the host transmitted (InReceives is
        counted in ip_rcv_core(), after the AF_PACKET taps; OutTransmits in ip_finish_output2())."""
        while time.monotonic() < deadline:
            now = self._ip_mib()
            d = {ns: {k: now[ns][k] - before[ns][k] for k in now[ns]} for ns in now}
            if (d["host"]["InReceives"] >= to_host and
                    d["client"]["InReceives"] + d["server"]["InReceives"]
                    >= d["host"].get("OutTransmits", 0)):
                return
            time.sleep(0.002)

    def send(self, probes, settle: float = 0.02, limit: float = 1.0) -> dict:
        """Send every probe (their `ident`s must be unique and non-zero), wait until the lab is
        quiet, and return {ident: sorted tuple of (point, fragment offset)} where each probe or
        fragment was seen (point "send:EPERM" etc. = the sender got that error); an empty tuple
        means dropped silently."""
        self._drain()
        before = self._ip_mib()
        to_host = sum(len(p.pieces()) for p in probes if p.sender != "host")
        errors = {}
        for p in probes:
            sender = self.senders[p.sender]
            for off, pkt in zip((o for o, _, _ in p.pieces()), p.packets()):
                try:
                    sender.sendto(pkt, (p.dst, 0))
                except OSError as e:
                    # a drop at NF_INET_LOCAL_OUT comes back to the sender: nf_hook_slow()
                    # turns NF_DROP into -EPERM; keep it as part of the outcome
                    errors.setdefault(p.ident, []).append((f"send:{errno.errorcode[e.errno]}", off))
        # veth_xmit() hands each packet to a per-CPU backlog, usually processed before sendto
        # returns, but ksoftirqd may defer it on a busy machine: wait until the host has taken
        # in every packet sent to it and the peers every packet the host sent out, then for quiet.
        got, deadline = {}, time.monotonic() + limit
        self._barrier(before, to_host, deadline)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            more = self._drain()
            for k, v in more.items():
                got.setdefault(k, []).extend(v)
            now = time.monotonic()
            if more:
                quiet_since = now
            elif now - quiet_since >= settle:
                break
            select.select([s for _, s, _ in self.observers], [], [], settle / 2)
        by_ident = {p.ident: p for p in probes}
        out = {p.ident: list(errors.get(p.ident, ())) for p in probes}
        for point, pkts in got.items():
            for pkt in pkts:
                if len(pkt) < 6:
                    continue
                p = by_ident.get(int.from_bytes(pkt[4:6], "big"))
                if p is not None:
                    off = p.owns(pkt)
                    if off is not None:
                        out[p.ident].append((point, off))
        return {k: tuple(sorted(v)) for k, v in out.items()}

    # -- real sockets (kernel-built packets, for realism next to the crafted probes)
    def tcp_connect(self, server: str, addr: str, port: int, wait: float = 0.3) -> str:
        """A TCP connection from the client to a listener at addr:port in `server` ("host" or
        "server"): "connected", "refused" (RST) or "timeout". The client then aborts with an RST
        (SO_LINGER 0) and the listener closes, which drops any half-open request without a
        retransmission (reqsk_timer_handler gives up once the listener is gone), so the
        packets the hooks see do not depend on time."""
        listener = self._sock(self.ns_named(server), socket.AF_INET, socket.SOCK_STREAM)
        client = self._sock(self.client, socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((addr, port))
            listener.listen(4)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.settimeout(wait)
            try:
                client.connect((addr, port))
                result = "connected"
            except ConnectionRefusedError:
                result = "refused"
            except (socket.timeout, TimeoutError):
                result = "timeout"
            return result
        finally:
            client.close()
            time.sleep(0.02)
            listener.close()
            self.socks = [s for s in self.socks if s not in (client, listener)]

    def udp_exchange(self, server: str, addr: str, port: int, wait: float = 0.1) -> str:
        """A datagram client -> addr:port and the answer back: "answered", "request lost" or
        "answer lost"."""
        srv = self._sock(self.ns_named(server), socket.AF_INET, socket.SOCK_DGRAM)
        cli = self._sock(self.client, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            srv.bind((addr, port))
            srv.settimeout(wait)
            cli.settimeout(wait)
            cli.sendto(b"ping", (addr, port))
            try:
                data, peer = srv.recvfrom(100)
            except (socket.timeout, TimeoutError):
                return "request lost"
            try:
                srv.sendto(b"pong", peer)
            except PermissionError:
                return "answer lost"
            try:
                cli.recvfrom(100)
                return "answered"
            except (socket.timeout, TimeoutError):
                return "answer lost"
        finally:
            srv.close()
            cli.close()
            self.socks = [s for s in self.socks if s not in (srv, cli)]

    def ping(self, addr: str) -> bool:
        """One echo request with the ping binary from the client."""
        return self.client.run(["ping", "-n", "-q", "-c", "1", "-W", "1", addr],
                               check=False).returncode == 0

    def close(self):
        for s in self.socks:
            s.close()
        self.socks = []
        for fd in getattr(self, "snmp", {}).values():
            os.close(fd)
        self.snmp = {}
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def number(probes, start: int = 1):
    """Give each probe a distinct non-zero IP id (also the key of the outcome)."""
    return [with_ident(p, start + i) for i, p in enumerate(probes)]


def expected_point(p: Probe) -> str:
    """Where a probe is seen when the host lets it through."""
    if p.hook == "INPUT":
        return "host"
    return LINKS[egress_of(p.dst)][2]


def run_case(lab: Lab, text: str, probes) -> tuple:
    """Load `text`, send the probes, return (outcomes, counters)."""
    lab.load(text)
    outcomes = lab.send(probes)
    return outcomes, lab.counters()


def outcome_text(outcome) -> str:
    """("c0", 0), ("c0", 8) -> "seen at c0 (offset 0), c0 (offset 8)"; () -> "dropped"."""
    if not outcome:
        return "dropped"
    return "seen at " + ", ".join(f"{pt}" + (f" (fragment offset {off})" if off else "")
                                  for pt, off in outcome)


def differential(ref: Lab, cand: Lab, text: str, probes) -> list:
    """Run the same ruleset and probes in both labs; return the differences as readable lines
    (empty = same delivered/dropped outcome for every probe and same counters for every rule)."""
    o_ref, c_ref = run_case(ref, text, probes)
    rn, cn = ref.installer.name, cand.installer.name
    try:
        o_cand, c_cand = run_case(cand, text, probes)
    except Exception as e:      # the oracle took it: any refusal is a difference
        return [f"{cn} refused a ruleset {rn} accepted: {type(e).__name__}: {e}"]
    diffs = [f"probe {p.describe()}\n    {rn}: {outcome_text(o_ref[p.ident])}  {cn}: "
             f"{outcome_text(o_cand[p.ident])}" for p in probes if o_ref[p.ident] != o_cand[p.ident]]
    for k in sorted(set(c_ref) | set(c_cand), key=str):
        if c_ref.get(k) != c_cand.get(k):
            where = f"rule #{k[1] + 1}" if isinstance(k[1], int) else f"{k[1]} entry"
            diffs.append(f"counters {k[0]} {where}"
                         f": {rn} {c_ref.get(k)}  {cn} {c_cand.get(k)}")
    return diffs


def shrink(ref: Lab, cand: Lab, text: str, probes, budget: int = 60) -> str:
    """The ruleset with as few rules as still show a difference for these probes (greedy: drop
    one "-A" line at a time, keep the drop when the difference stays; then drop user chains no
    rule mentions). For bug reports: a minimal ruleset + one probe."""
    lines = text.splitlines()

    def still_differs(ls):
        try:
            return bool(differential(ref, cand, "\n".join(ls) + "\n", probes))
        except LoadError:             # the oracle refuses it: not a smaller case
            return False

    i = len(lines) - 1
    while i >= 0 and budget > 0:
        if lines[i].startswith("-A "):
            budget -= 1
            trial = lines[:i] + lines[i + 1:]
            if still_differs(trial):
                lines = trial
        i -= 1
    used = " ".join(ln for ln in lines if ln.startswith("-A "))
    lines = [ln for ln in lines if not (ln.startswith(":") and ln.split()[1] == "-"
                                        and re.search(rf"[ ]{re.escape(ln[1:].split()[0])}( |$)",
                                                      used) is None)]
    return "\n".join(lines) + "\n"
