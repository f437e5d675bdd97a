"""Differential test against the kernel's ip6tables: the same ip6tables-legacy-restore ruleset
applied by the kernel in one IPv6 lab and installed with bpfilter_umh.engine (Engine.open(AF_INET6)
.install of the blob the same text builds) in another; the same crafted IPv6 packets (extension
header chains, fragments, truncated headers, every matcher) sent client -> host (INPUT), client ->
server via host (FORWARD) and host -> client (OUTPUT). Per probe, what got past each filter hook
must be identical; at the end every entry's packet and byte counters must be equal.

L4 checksums are left zero on purpose: the receiving stacks drop the probes after the filter
without answering, so the only packets in the labs are the probes (and ICMPv6 errors about
malformed extension headers, which both labs send alike with rate limiting off)."""
import os

import pytest

from test_compile_ipv6_util import (NH_DEST, NH_HOP, NH_ICMP6, NH_NONE, NH_TCP, NH_UDP, auth,
                                    frag, icmp6_hdr, ipv6, opts, routing, udp6)
from test_compile_util import tcp_hdr
from test_differential_ipv6_lab import (C0, H0, S0, BpfilterFilter, DoorFilter, KernelFilter,
                                        Lab6, blob_of, comparable_save, noise_entries,
                                        with_noise)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

RULESET = with_noise("""*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:udpin - [0:0]
:icmpin - [0:0]
:fwdchk - [0:0]
-A INPUT -p udp -j udpin
-A INPUT -p ipv6-icmp -g icmpin
-A INPUT -p tcp -m tcp --tcp-flags SYN,RST,ACK SYN --dport 80 -j ACCEPT
-A INPUT -p tcp -m tcp ! --dport 22 -j DROP
-A INPUT -p 59 -j ACCEPT
-A INPUT -s 2001:db8:1::/64 -i h+ -p all -j ACCEPT
-A udpin -p udp -m udp --dport 53 -j DROP
-A udpin -p udp -m udp --sport 1000:1999 -j ACCEPT
-A udpin -p udp -m udp ! --dport 7:9 -j RETURN
-A udpin -j ACCEPT
-A icmpin -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT
-A icmpin -p ipv6-icmp -m icmp6 --icmpv6-type 1/3 -j DROP
-A icmpin -p ipv6-icmp -m icmp6 ! --icmpv6-type 1 -j ACCEPT
-A FORWARD -i h0 -o h1 -j fwdchk
-A FORWARD -d 2001:db8:2::/64 ! -p tcp -j DROP
-A fwdchk ! -p udp -j RETURN
-A fwdchk -p udp -m udp --dport 7:9 -j ACCEPT
-A fwdchk -s 2001:db8:1::2/128 -p udp -j DROP
-A OUTPUT -o h0 -p udp -m udp --dport 53 -j DROP
-A OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG SYN -j DROP
-A OUTPUT ! -d 2001:db8:1::/64 -j DROP
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 129 -j DROP
-A OUTPUT -p all -j ACCEPT
COMMIT
""")

ENDS = {"in": (C0, H0), "fwd": (C0, S0), "out": (H0, C0)}
CUT_DEST = [(NH_DEST, lambda nh: bytes([nh]))]


def _probes():
    """(name, where, [packets]) for every direction."""
    out = []
    for where, (src, dst) in ENDS.items():
        mine = []
        def p(nh, payload=b"", exthdrs=(), s=src):
            return ipv6(src=s, dst=dst, nh=nh, payload=payload, exthdrs=list(exthdrs))
        body = udp6(1000, 53, b"q" * 24)
        mine += [
            ("udp53", [p(NH_UDP, udp6(5000, 53))]),
            ("udp-sport1500", [p(NH_UDP, udp6(1500, 100))]),
            ("udp-dport8", [p(NH_UDP, udp6(5000, 8))]),
            ("udp-dport200", [p(NH_UDP, udp6(5000, 200))]),
            ("udp-other-src", [p(NH_UDP, udp6(5000, 8), s="2001:db8:9::1")]),
            ("tcp-syn80", [p(NH_TCP, tcp_hdr(4000, 80, 0x02))]),
            ("tcp-syn22", [p(NH_TCP, tcp_hdr(4000, 22, 0x02))]),
            ("tcp-ack80", [p(NH_TCP, tcp_hdr(4000, 80, 0x10))]),
            ("tcp-synack443", [p(NH_TCP, tcp_hdr(4000, 443, 0x12))]),
            ("tcp-cut", [p(NH_TCP, tcp_hdr(4000, 80, 0x02)[:10])]),
            ("echo", [p(NH_ICMP6, icmp6_hdr(128, 0))]),
            ("echo-reply", [p(NH_ICMP6, icmp6_hdr(129, 0))]),
            ("unreach-1-3", [p(NH_ICMP6, icmp6_hdr(1, 3))]),
            ("unreach-1-0", [p(NH_ICMP6, icmp6_hdr(1, 0))]),
            ("too-big", [p(NH_ICMP6, icmp6_hdr(2, 0))]),
            ("icmp6-cut", [p(NH_ICMP6, b"\x80\x00\x00")]),
            ("none", [p(NH_NONE)]),
            ("udp-hbh-dest", [p(NH_UDP, udp6(5000, 53), [opts(NH_HOP), opts(NH_DEST, 1)])]),
            ("udp-dest-dest", [p(NH_UDP, udp6(5000, 8), [opts(NH_DEST), opts(NH_DEST, 2)])]),
            ("udp-routing0", [p(NH_UDP, udp6(1500, 100), [routing(0, 2)])]),
            ("udp-ah", [p(NH_UDP, udp6(5000, 8), [auth(4)])]),
            ("tcp-dest", [p(NH_TCP, tcp_hdr(4000, 80, 0x02), [opts(NH_DEST)])]),
            ("frag-set-udp53", [p(NH_UDP, body[:16], [frag(0, True, 7)]),
                                p(NH_UDP, body[16:], [frag(16, False, 7)])]),
            ("frag-set-udp8", [p(NH_UDP, udp6(1000, 8, b"r" * 24)[:16], [frag(0, True, 8)]),
                               p(NH_UDP, udp6(1000, 8, b"r" * 24)[16:], [frag(16, False, 8)])]),
            ("frag-later-only", [p(NH_UDP, b"s" * 24, [frag(24, False, 9)])]),
            ("frag-later-tcp", [p(NH_TCP, b"t" * 24, [frag(8, False, 10)])]),
            ("frag-later-then-dest", [p(NH_UDP, udp6(), [frag(16, False, 11), opts(NH_DEST)])]),
            ("cut-dest-udp", [p(NH_UDP, b"", CUT_DEST)]),
        ]
        if where != "in":     # a lone first fragment at INPUT would time out into an ICMP error
            mine.append(("frag-first-only", [p(NH_UDP, udp6(1000, 53, b"u" * 24),
                                               [frag(0, True, 12)])]))
        out += [(f"{where}:{name}", where, pkts) for name, pkts in mine]
    return out


PROBES = _probes()


def run_lab(installer):
    with Lab6(installer) as lab:
        lab.load(RULESET)
        outcomes = {name: lab.send(where, pkts) for name, where, pkts in PROBES}
        counters = lab.filter.counters()
        save = comparable_save(lab.filter.save()) if hasattr(lab.filter, "save") else None
    return outcomes, counters, save


_oracle = {}


def oracle():
    """The kernel lab's result, computed once for both candidates."""
    if not _oracle:
        _oracle["r"] = run_lab(KernelFilter)
    return _oracle["r"]


@pytest.mark.parametrize("candidate", [BpfilterFilter, DoorFilter], ids=["engine", "door"])
def test_differential_ipv6_against_kernel(candidate):
    table = blob_of(RULESET)
    want_out, want_cnt, want_save = oracle()
    got_out, got_cnt, got_save = run_lab(candidate)
    if got_save is not None:       # the door: ip6tables-legacy-save -c shows the same thing
        assert got_save == want_save and len(want_save) > 25, (got_save, want_save)
    assert len(got_cnt) == len(want_cnt) == len(table.entries())
    diffs = [f"{n}: kernel {want_out[n]} bpfilter {got_out[n]}" for n, _, _ in PROBES
             if want_out[n] != got_out[n]]
    skip = noise_entries(table)
    where = {}
    for c in table.chains:
        for k, r in enumerate(c.entries()):
            where[r.index] = f"{c.name}#{k}"
    diffs += [f"entry {i} ({where.get(i)}): kernel {w} bpfilter {g}"
              for i, (w, g) in enumerate(zip(want_cnt, got_cnt)) if i not in skip and w != g]
    assert not diffs, "\n".join(diffs)
    # the comparison is meaningful: most rules were hit, and probes were both passed and dropped
    hit = [i for i, c in enumerate(want_cnt) if c[0] and i not in skip]
    assert len(hit) >= 15, hit
    passed = sum(1 for o in want_out.values() if any(p for p, _ in o[:3]))
    assert 10 <= passed <= len(PROBES) - 10, (passed, len(PROBES))
