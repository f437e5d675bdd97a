"""Differential test of IPv6 port runs (classify.py's hash6, issue #7) against the kernel's
ip6tables: N rules `-p tcp|udp --dport P[:Q]` (and a stretch of `--sport` rules), ports that
repeat with other verdicts (first match wins), ranges over them, RETURN between DROP and ACCEPT,
run boundaries made by rules no run takes; restored by ip6tables-legacy-restore into the
kernel's lab and installed by bpfilter's engine (and through the door) in another. Probes to
the rules' ports, to ports no rule holds, and the packets whose fate ip6_packet_match and
tcp_mt decide before any port is read: an extension header before the transport header, a
non-first fragment, a truncated TCP header, a failed extension-header walk. Outcomes and every
entry's packet and byte counters must be equal.

    pytest tests/test_differential_ipv6_ports.py               N = 10 000
    BPFILTER_LARGE_N=1000 pytest tests/test_differential_ipv6_ports.py
"""
import os
import random
import struct

import pytest

from test_compile_ipv6_util import NH_ROUTING, NH_TCP, NH_UDP, frag, ipv6, opts, udp6
from test_differential_ipv6_lab import (C0, H0, BpfilterFilter, DoorFilter, KernelFilter, Lab6,
                                        assert_same_steps, blob_of, noise_entries, with_noise)

N = int(os.environ.get("BPFILTER_LARGE_N", "10000"))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

ACTIONS = ["DROP"] * 4 + ["ACCEPT"] * 4 + ["RETURN"] * 2
HOT = [22, 53, 80, 443, 8080]          # ports many rules hold, with different verdicts
SPORT_BLOCK = (0.40, 0.45)             # the chain's part whose rules test the source port


def _ruleset(n: int, seed: int = 7) -> tuple:
    """(restore text, [(proto, port)] the rules hold): INPUT sends everything to chain p6,
    whose RETURNs and misses meet INPUT's own tcp DROP (udp passes)."""
    rng = random.Random(seed)
    lines, held = [], []
    for i in range(n):
        proto = "tcp" if rng.random() < 0.6 else "udp"
        if i % 997 == 500:          # a rule no run takes: the run before it ends there
            lines.append(f"-A p6 -i h1 -p {proto} -m {proto} --dport {rng.randrange(1, 65535)} "
                         f"-j ACCEPT")
            continue
        field = "--sport" if SPORT_BLOCK[0] * n <= i < SPORT_BLOCK[1] * n else "--dport"
        r = rng.random()
        port = rng.choice(HOT) if r < 0.1 else rng.randrange(1, 60000)
        spec = f"{port}:{port + rng.randrange(1, 40)}" if 0.1 <= r < 0.25 else f"{port}"
        held.append((proto, field, port))
        lines.append(f"-A p6 -p {proto} -m {proto} {field} {spec} -j {rng.choice(ACTIONS)}")
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":p6 - [0:0]", "-A INPUT -j p6",
                      "-A INPUT -p tcp -j DROP", *lines, "COMMIT"])
    return with_noise(text), held


def tcp6(sport: int, dport: int, doff: int = 5) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, 0x02, 1024, 0, 0) + \
        bytes(4 * doff - 20)


def _l4(proto: str, sport: int, dport: int) -> tuple:
    return (NH_TCP, tcp6(sport, dport)) if proto == "tcp" else (NH_UDP, udp6(sport, dport))


def _probes(held: list, seed: int = 5) -> tuple:
    """([(name, packet)] sent to the host, the port no rule holds)."""
    rng = random.Random(seed)
    out = []
    picks = [held[0], held[-1]] + rng.sample(held, 40)
    for k, (proto, field, port) in enumerate(picks):
        sp, dp = (port, 7) if field == "--sport" else (5000, port)
        nh, l4 = _l4(proto, sp, dp)
        out.append((f"{proto}{k}{field}:{port}", ipv6(src=C0, dst=H0, nh=nh, payload=l4)))
    for proto in ("tcp", "udp"):
        for p in HOT:
            nh, l4 = _l4(proto, 5000, p)
            out.append((f"{proto}-hot:{p}", ipv6(src=C0, dst=H0, nh=nh, payload=l4)))
    held_ports = {p for _, _, p in held}
    miss = next(p for p in range(61000, 65000) if p not in held_ports)
    for proto in ("tcp", "udp"):
        nh, l4 = _l4(proto, 5000, miss)
        out.append((f"{proto}-miss:{miss}", ipv6(src=C0, dst=H0, nh=nh, payload=l4)))
    # the walk and the tcp/udp checks, before any port
    nh, l4 = _l4("udp", 5000, HOT[1])
    out.append(("hop-by-hop then udp", ipv6(src=C0, dst=H0, nh=nh, payload=l4,
                                             exthdrs=[opts(0)])))
    nh, l4 = _l4("tcp", 5000, HOT[0])
    out.append(("dstopts then tcp", ipv6(src=C0, dst=H0, nh=nh, payload=l4,
                                          exthdrs=[opts(60, 1)])))
    out.append(("non-first fragment of tcp", ipv6(src=C0, dst=H0, nh=NH_TCP, payload=l4,
                                                  exthdrs=[frag(offset_bytes=64)])))
    out.append(("truncated tcp header", ipv6(src=C0, dst=H0, nh=NH_TCP, payload=l4[:12])))
    out.append(("truncated udp header", ipv6(src=C0, dst=H0, nh=NH_UDP, payload=udp6()[:6])))
    # a routing header of which 2 bytes are there: ipv6_find_hdr reads 4 (-EBADMSG); the IPv6
    # layer handles routing headers after LOCAL_IN, so the filter sees it
    out.append(("failed walk: routing header cut short",
                ipv6(src=C0, dst=H0, nh=NH_ROUTING, payload=bytes([NH_TCP, 4]))))
    return out, miss


def _appended(text: str, miss: int) -> str:
    """`text` with a rule appended to p6 that accepts tcp to `miss` (no rule held it: it met
    INPUT's tcp DROP), and one more that never matches."""
    extra = f"-A p6 -p tcp -m tcp --dport {miss} -j ACCEPT\n-A p6 -p udp -m udp --sport 1 -j DROP\n"
    return text.replace("COMMIT", extra + "COMMIT")


def _run(installer, texts: list, probes: list) -> list:
    out = []
    with Lab6(installer) as lab:
        for text in texts:
            lab.load(text)
            outcomes = {name: lab.send("in", [pkt]) for name, pkt in probes}
            out.append((outcomes, lab.filter.counters()))
    return out


_oracle = {}


@pytest.mark.parametrize("candidate", [BpfilterFilter, DoorFilter], ids=["engine", "door"])
def test_ipv6_port_runs_against_kernel(candidate):
    from bpfilter_umh import classify
    text, held = _ruleset(N)
    table = blob_of(text)
    rules = table.chain("p6").rules
    runs = classify.find_runs(rules)
    # the chain is classified (else this would test linear code again): hash6 runs, the source
    # port stretch its own
    assert runs and {r.kind for r in runs} == {"hash6"}, runs[:3]
    assert sum(len(r.rules) for r in runs) > 0.9 * len(rules)
    assert {r.sig[5] for r in runs} == {"any", "port"}
    probes, miss = _probes(held)
    texts = [text, _appended(text, miss)]
    if "r" not in _oracle:
        _oracle["r"] = _run(KernelFilter, texts, probes)
    want = _oracle["r"]
    got = _run(candidate, texts, probes)
    assert_same_steps(want, got, [n for n, _ in probes], table, 2)
    skip = noise_entries(table)
    # meaningful: probes passed and dropped, many entries counted, the special packets went
    # both ways, and the appended rule turned the missing probe's verdict
    want_out, want_cnt = want[0]
    fate = {n: any(p for p, _ in want_out[n][:3]) for n, _ in probes}
    assert any(fate.values()) and not all(fate.values()), fate
    assert sum(1 for i, c in enumerate(want_cnt) if c[0] and i not in skip) >= 20
    assert not fate["truncated tcp header"] and not fate["failed walk: routing header cut short"]
    name = f"tcp-miss:{miss}"
    assert not fate[name] and any(p for p, _ in want[1][0][name][:3])


def test_hash6_entries_from_the_keys():
    """A long chain's rules have classes (classify._classes6: a template of the IPv6 key without
    addresses, ports and comment text), and hash6_entries reads the ports from the keys then:
    the same entries as read from each rule's match."""
    from bpfilter_umh import classify
    text, _held = _ruleset(3000)
    rules = blob_of(text).chain("p6").rules
    runs = [r for r in classify.find_runs(rules) if r.kind == "hash6"]
    assert runs
    for run in runs:
        cls = classify._run_classes(run)
        assert cls is not None and None not in cls[0]
        assert len(set(cls[0])) < len(run.rules) // 4       # few templates: shared answers
        fast = classify.hash6_entries(run)
        run.cls = None
        assert classify.hash6_entries(run) == fast
