"""Large rulesets of realistic shapes (issue #7), as iptables-restore text, with lab probes aimed at
them. Shared by tests/test_differential_large.py (kernel vs bpfilter at 10 000 rules) and
bench/ruleset_bench.py (cost against N).

    SHAPES                      names, in the order the benchmark prints them
    make(shape, n, seed=0) -> Ruleset(text, chain, probes, miss)
        text    iptables-restore input (filter table)
        chain   the built-in chain holding the rules ("INPUT" or "FORWARD")
        probes  lab Probes aimed at the rules: overlapping rules, first-match order, fragments and
                truncated headers where the shape has tcp/udp matches
        miss    one Probe that matches no rule (the benchmark's worst case: every rule tested)

No rule of any shape matches FLOOD (udp 192.0.2.1:7 -> 192.0.2.2:7): the benchmark's flood packet
walks every rule and is accepted by the policy.

Addresses a probe carries are documentation ranges only (192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24); the bulk of the rules names other prefixes (10/8, 100.64/10), which no packet
carries, as a real blocklist mostly does.
"""
from __future__ import annotations

import ipaddress
import os
import random
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from probes import (FRAG_FIRST, FRAG_LATER, FRAG_OFF1, FRAG_TINY, FRAG_WHOLE,  # noqa: E402
                    IPPROTO_TCP, IPPROTO_UDP, Probe)

FLOOD = ("192.0.2.1", "192.0.2.2", 7, 7)
SHAPES = ("blocklist", "ports", "tuple", "mixed", "fanout")

# the lab (tests/lab.py): INPUT probes go from c0 to the host's eth0 address; FORWARD probes from
# c0 out through srv0 to the server side (198.51.100.0/24 except the lab's own .1/.2)
INPUT_DST, FWD_SENDER = "192.0.2.1", "c0"
AVOID = {"198.51.100.1", "198.51.100.2", "192.0.2.1", "192.0.2.2", "192.0.2.65", "192.0.2.66",
         "192.0.2.129", "192.0.2.130", "203.0.113.1", "203.0.113.65", "203.0.113.66"}


@dataclass
class Ruleset:
    shape: str
    n: int
    chain: str
    lines: list = field(default_factory=list)
    probes: list = field(default_factory=list)
    miss: Probe = None
    user_chains: list = field(default_factory=list)

    @property
    def text(self) -> str:
        head = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
        head += [f":{c} - [0:0]" for c in self.user_chains]
        return "\n".join(head + self.lines + ["COMMIT", ""])


def _doc_addr(rnd, net="198.51.100.0/24") -> str:
    n = ipaddress.IPv4Network(net)
    while True:
        a = str(n.network_address + rnd.randrange(1, n.num_addresses - 1))
        if a not in AVOID:
            return a


def _cold_prefix(rnd) -> str:
    base = rnd.choice([0x0A000000, 0x64400000])           # 10.0.0.0/8, 100.64.0.0/10
    span = 24 if base == 0x0A000000 else 22
    plen = rnd.choice([16, 20, 24, 24, 24, 28, 32, 32])
    a = base | rnd.getrandbits(span)
    a &= ((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1)
    return f"{ipaddress.IPv4Address(a)}/{plen}"


def _hot_prefix(rnd) -> str:
    plen = rnd.choice([26, 28, 29, 30, 30, 31, 32, 32, 32, 32, 32, 32, 32, 32, 32])
    net = rnd.choice(["198.51.100.0/24", "203.0.113.0/24"])
    a = int(ipaddress.IPv4Address(_doc_addr(rnd, net))) & (((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1))
    return f"{ipaddress.IPv4Address(a)}/{plen}"


def _inside(rnd, prefix: str) -> str:
    """An address of `prefix` a probe may carry."""
    net = ipaddress.IPv4Network(prefix)
    for _ in range(20):
        a = str(net.network_address + rnd.randrange(net.num_addresses))
        if a not in AVOID and not a.endswith((".0", ".255")):
            return a
    return _doc_addr(rnd)


def _verdict(rnd, p_drop=0.6) -> str:
    return "DROP" if rnd.random() < p_drop else "ACCEPT"


def _spread(rnd, n, hot: list, cold) -> list:
    """n rule lines: the hot ones (aimed at by probes) at random places among cold ones."""
    hot = hot[:max(1, n // 4)] if n < 4 * len(hot) else hot
    lines = [cold() for _ in range(n - len(hot))]
    for h in hot:
        lines.insert(rnd.randrange(len(lines) + 1), h)
    return lines


def blocklist(n: int, seed: int = 0) -> Ruleset:
    """A prefix blocklist on INPUT: `-s PREFIX -j DROP` with a few ACCEPT exceptions; the hot
    prefixes nest inside 198.51.100.0/24, so first-match order decides."""
    rnd = random.Random(seed)
    rs = Ruleset("blocklist", n, "INPUT")
    pres = [_hot_prefix(rnd) for _ in range(200)]
    hot = [f"-A INPUT -s {p} -j {_verdict(rnd)}" for p in pres]
    rs.lines = _spread(rnd, n, hot, lambda: f"-A INPUT -s {_cold_prefix(rnd)} -j DROP")
    rs.probes = [Probe("INPUT", "c0", _inside(rnd, rnd.choice(pres[:max(1, n // 4)])), INPUT_DST,
                       IPPROTO_UDP, 1024, 53) for _ in range(120)]
    rs.miss = Probe("INPUT", "c0", "203.0.113.200", INPUT_DST, IPPROTO_UDP, 1024, 53)
    return rs


def _port_spec(rnd, hot_ports) -> str:
    lo = rnd.choice(hot_ports) if rnd.random() < 0.5 else rnd.randrange(16, 65536)
    if rnd.random() < 0.1:
        return f"{lo}:{min(65535, lo + rnd.randrange(1, 16))}"
    return str(lo)


def ports(n: int, seed: int = 0) -> Ruleset:
    """A port allow/deny list on FORWARD: `-p tcp|udp -m tcp|udp --dport P[:Q] -j ACCEPT|DROP`."""
    rnd = random.Random(seed)
    rs = Ruleset("ports", n, "FORWARD")
    hot_ports = rnd.sample(range(1000, 1200), 40)

    def line(hot):
        p = rnd.choice(["tcp", "udp"])
        spec = _port_spec(rnd, hot_ports) if hot else str(rnd.randrange(2000, 65536))
        return f"-A FORWARD -p {p} -m {p} --dport {spec} -j {_verdict(rnd)}"
    rs.lines = _spread(rnd, n, [line(True) for _ in range(200)], lambda: line(False))
    frags = [FRAG_WHOLE] * 8 + [FRAG_OFF1, FRAG_LATER, FRAG_TINY, FRAG_FIRST]
    rs.probes = [Probe("FORWARD", FWD_SENDER, "192.0.2.2", _doc_addr(rnd),
                       rnd.choice([IPPROTO_TCP, IPPROTO_UDP]), rnd.randrange(1024, 1100),
                       rnd.choice(hot_ports + [rnd.randrange(1, 1000)]), frag=rnd.choice(frags))
                 for _ in range(120)]
    rs.miss = Probe("FORWARD", FWD_SENDER, "192.0.2.2", "198.51.100.77", IPPROTO_UDP, 1024, 1999)
    return rs


def tuple5(n: int, seed: int = 0) -> Ruleset:
    """Per-flow 5-tuple rules on FORWARD: `-s A -d B -p tcp|udp --sport X --dport Y`."""
    rnd = random.Random(seed)
    rs = Ruleset("tuple", n, "FORWARD")
    srcs = [_doc_addr(rnd, "192.0.2.0/26") for _ in range(6)]
    dsts = [_doc_addr(rnd) for _ in range(8)]
    sports, dports = [1024, 1025, 1026], [80, 443, 8080]
    flows = [(rnd.choice(srcs), rnd.choice(dsts), rnd.choice(["tcp", "udp"]), rnd.choice(sports),
              rnd.choice(dports)) for _ in range(60)]

    def line(f):
        s, d, p, sp, dp = f
        return f"-A FORWARD -s {s}/32 -d {d}/32 -p {p} -m {p} --sport {sp} --dport {dp} " \
               f"-j {_verdict(rnd)}"

    def cold():
        a = ipaddress.IPv4Address(0x0A000000 | rnd.getrandbits(24))
        b = ipaddress.IPv4Address(0x64400000 | rnd.getrandbits(22))
        return line((str(a), str(b), rnd.choice(["tcp", "udp"]), rnd.randrange(1024, 65536),
                     rnd.randrange(1, 1024)))
    rs.lines = _spread(rnd, n, [line(rnd.choice(flows)) for _ in range(200)], cold)
    frags = [FRAG_WHOLE] * 8 + [FRAG_OFF1, FRAG_LATER, FRAG_TINY, FRAG_FIRST]
    rs.probes = []
    for _ in range(120):
        s, d, p, sp, dp = rnd.choice(flows)
        if rnd.random() < 0.2:
            dp = rnd.choice(dports)
        rs.probes.append(Probe("FORWARD", "c0", s, d, IPPROTO_TCP if p == "tcp" else IPPROTO_UDP,
                               sp, dp, frag=rnd.choice(frags)))
    rs.miss = Probe("FORWARD", "c0", srcs[0], dsts[0], IPPROTO_UDP, 5000, 5000)
    return rs


def mixed(n: int, seed: int = 0) -> Ruleset:
    """Rules of several shapes interleaved on FORWARD, as hand-grown firewalls look: source
    prefixes, destination prefixes, ports, 5-tuples, address pairs with a protocol."""
    rnd = random.Random(seed)
    rs = Ruleset("mixed", n, "FORWARD")

    def line(hot):
        k = rnd.randrange(5)
        addr = (lambda: _doc_addr(rnd)) if hot else \
            (lambda: str(ipaddress.IPv4Address(0x0A000000 | rnd.getrandbits(24))))
        pre = (lambda: _hot_prefix(rnd)) if hot else (lambda: _cold_prefix(rnd))
        p = rnd.choice(["tcp", "udp"])
        if k == 0:
            return f"-A FORWARD -s {pre()} -j {_verdict(rnd)}"
        if k == 1:
            return f"-A FORWARD -d {pre()} -j {_verdict(rnd)}"
        if k == 2:
            port = rnd.randrange(1000, 1100) if hot else rnd.randrange(2000, 65536)
            return f"-A FORWARD -p {p} -m {p} --dport {port} -j {_verdict(rnd)}"
        if k == 3:
            return (f"-A FORWARD -s {addr()}/32 -d {addr()}/32 -p {p} -m {p} --sport "
                    f"{rnd.randrange(1024, 1030)} --dport {rnd.randrange(1000, 1100)} "
                    f"-j {_verdict(rnd)}")
        return f"-A FORWARD -s {addr()}/32 -d {addr()}/32 -p {p} -j {_verdict(rnd)}"
    rs.lines = _spread(rnd, n, [line(True) for _ in range(200)], lambda: line(False))
    frags = [FRAG_WHOLE] * 8 + [FRAG_OFF1, FRAG_LATER, FRAG_TINY, FRAG_FIRST]
    rs.probes = [Probe("FORWARD", "c0", _doc_addr(rnd), _doc_addr(rnd),
                       rnd.choice([IPPROTO_TCP, IPPROTO_UDP]), rnd.randrange(1024, 1030),
                       rnd.randrange(1000, 1100), frag=rnd.choice(frags)) for _ in range(120)]
    rs.miss = Probe("FORWARD", "c0", "203.0.113.200", "203.0.113.250", IPPROTO_UDP, 5000, 5000)
    return rs


def fanout(n: int, seed: int = 0) -> Ruleset:
    """kube-proxy style fan-out on FORWARD: FORWARD -j SVC; SVC holds one rule per service
    `-d VIP -p tcp --dport P -j SVC-k`, each SVC-k a small chain (allowed client prefix ACCEPT,
    else DROP). n counts all rules."""
    rnd = random.Random(seed)
    rs = Ruleset("fanout", n, "FORWARD")
    services = max(1, (n - 1) // 3)
    rs.user_chains = ["SVC"] + [f"SVC-{k}" for k in range(services)]
    rs.lines = ["-A FORWARD -j SVC"]
    vips = {}
    for k in range(services):
        if k < 40:
            vip, port = _doc_addr(rnd), rnd.choice([80, 443, 8080, 9090])
        else:
            vip, port = str(ipaddress.IPv4Address(0x0A600000 | k)), rnd.randrange(1, 65536)
        vips[k] = (vip, port)
        rs.lines.append(f"-A SVC -d {vip}/32 -p tcp -m tcp --dport {port} -j SVC-{k}")
    for k in range(services):
        rs.lines.append(f"-A SVC-{k} -s 192.0.2.0/27 -j ACCEPT")
        rs.lines.append(f"-A SVC-{k} -j DROP")
    rs.probes = []
    for _ in range(120):
        vip, port = vips[rnd.randrange(min(40, services))]
        rs.probes.append(Probe("FORWARD", "c0", _doc_addr(rnd, "192.0.2.0/26"), vip, IPPROTO_TCP,
                               1024, port if rnd.random() < 0.8 else 1))
    rs.miss = Probe("FORWARD", "c0", "192.0.2.3", "198.51.100.77", IPPROTO_TCP, 1024, 5)
    return rs


MAKERS = {"blocklist": blocklist, "ports": ports, "tuple": tuple5, "mixed": mixed,
          "fanout": fanout}


def make(shape: str, n: int, seed: int = 0) -> Ruleset:
    return MAKERS[shape](n, seed)


def iface_chain(n: int) -> Ruleset:
    """n rules `-i IFACE -s 10.X.Y.0/24 -j DROP|ACCEPT` in INPUT, a `-i eth0 -s 10.X.0.0/16 -j
    ACCEPT` after every 500th: a chain no classified run takes (runs read no interface), linear
    code cut into global functions (bpfilter_umh/stretch.py); probes from c0 (arriving on eth0)
    aimed at rules early, in the middle and at the end of the chain, and one no rule matches.
    Not among SHAPES: bench/linear_bench.py and the differential tests use it."""
    ifaces = ("eth0", "eth1", "longifname12345", "eth0")
    rs = Ruleset("iface", n, "INPUT")
    for i in range(n):
        x, y = i // 256 % 256, i % 256
        rs.lines.append(f"-A INPUT -i {ifaces[i % 4]} -s 10.{x}.{y}.0/24 -j "
                        f"{'ACCEPT' if i % 3 == 0 else 'DROP'}")
        if i % 500 == 499:
            rs.lines.append(f"-A INPUT -i eth0 -s 10.{x}.0.0/16 -j ACCEPT")
    rs.probes = [Probe("INPUT", "c0", f"10.{i // 256 % 256}.{i % 256}.7", INPUT_DST,
                       IPPROTO_UDP, 1024, 53)
                 for i in sorted({0, 1, 2, 3, 5, 6, n // 2, n // 2 + 1, n - 3, n - 2, n - 1})]
    rs.miss = Probe("INPUT", "c0", "203.0.113.200", INPUT_DST, IPPROTO_UDP, 1024, 53)
    rs.probes.append(rs.miss)
    return rs

