"""Issue #6 on ip6tables: the extension matches against the kernel's ip6tables-legacy.

The same ip6tables-legacy-restore rulesets go to the kernel (one IPv6 lab, the oracle) and to
bpfilter (another lab: Engine.open(AF_INET6).install of the blob the same text builds); the same
crafted IPv6 packets are sent through both (client -> host INPUT, client -> server FORWARD,
host -> client OUTPUT). Most rules have no target: they only count and go on, so every entry's
packet and byte counters say, for every probe, whether that one match matched; a few rules drop,
so verdicts are compared too (the security-table counters after the filter).

Ruleset STATELESS: multiport, iprange (v6 ranges), length (payload_len + 40), hl, tos/dscp
(traffic class), pkttype, mark (SO_MARK on the OUTPUT probes), comment, limit, mac, owner and
the extension-header matches frag, hbh, dst, rt, ah (ipv6_find_hdr with a target). Without
conntrack, so fragments cross INPUT and FORWARD as sent.
Ruleset STATEFUL: conntrack (state, direction, v6 tuples, ports, status) and state on packets
with valid checksums (the kernel's conntrack tracks them; the host answers some)."""
import ipaddress
import os
import socket
import struct

import pytest

from test_compile_ipv6_util import NH_AUTH, NH_DEST, NH_FRAG, NH_HOP, NH_ICMP6, NH_ROUTING, \
    NH_TCP, NH_UDP, ipv6, opts
from probes import csum
from test_compile_util import tcp_hdr
from test_differential_ipv6_lab import (C0, H0, S0, BpfilterFilter, DoorFilter,
                                        KernelFilter, Lab6,
                                        blob_of, comparable_save, noise_entries, with_noise)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

ENDS = {"in": (C0, H0), "fwd": (C0, S0), "out": (H0, C0)}
CHAINS = {"in": "INPUT", "fwd": "FORWARD", "out": "OUTPUT"}

COMMON = """
-p udp -m multiport --dports 53,100:200
-p tcp -m multiport ! --ports 22,80
-p udp -m multiport --sports 1000:1999,7
-m iprange --src-range 2001:db8:1::1-2001:db8:1::2
-m iprange ! --dst-range 2001:db8:2::-2001:db8:2::ffff
-m iprange --src-range 2001:db8:1::3-2001:db8:1::2
-m length --length 0:80
-m length ! --length 60:100
-m hl --hl-eq 64
-m hl --hl-lt 10
-m hl --hl-gt 200
-m hl ! --hl-eq 64
-m tos --tos 0x10/0x3f
-m tos ! --tos 0xb8
-m dscp --dscp 0x2e
-m dscp ! --dscp 0
-m pkttype --pkt-type host
-m pkttype ! --pkt-type host
-m mark --mark 0x5/0xff
-m mark ! --mark 0
-m comment --comment "just counting"
-m frag --fragid 100:200
-m frag --fragfirst
-m frag --fragmore
-m frag --fraglast ! --fragid 7
-m frag --fragres
-m hbh --hbh-len 8
-m hbh ! --hbh-len 8
-m hbh --hbh-opts 1:4
-m hbh --hbh-opts 5:2,1
-m dst --dst-opts 0,1:3
-m dst --dst-len 16
-m dst --dst-opts 1
-m rt --rt-type 0 --rt-segsleft 2:5
-m rt --rt-len 24
-m rt ! --rt-type 2
-m rt --rt-type 0 --rt-0-res
-m frag --fraglen 16
-m hbh --hbh-opts 1:4,0
-m dst --dst-opts 0,1:3,1
-m dst ! --dst-len 8 --dst-opts 1:12
-m rt ! --rt-len 24 --rt-segsleft 0
-m rt --rt-segsleft 3 ! --rt-type 0
-m ah --ahlen 16
-m ah --ahspi 100:200
-m ah --ahlen 24 --ahres
-m ah ! --ahspi 150
-m limit --limit 1/hour --limit-burst 4
-p udp -m udp --dport 9 -m hl --hl-eq 33 -j DROP
-m frag --fragid 666 -j DROP
-m dst --dst-len 24 -j DROP
-m ah --ahspi 777 -j DROP
"""
# mac only where xt_mac's hooks allow it, owner only on OUTPUT
ONLY = {"INPUT": ["-m mac --mac-source 02:00:00:00:01:02",
                  "-m mac ! --mac-source 02:00:00:00:01:02"],
        "FORWARD": ["-m mac --mac-source 02:00:00:00:01:02 -p tcp -j DROP"],
        "OUTPUT": ["-m owner --uid-owner 0",
                   "-m owner ! --uid-owner 1-100 -m hl --hl-eq 3 -j DROP",
                   "-m owner --socket-exists --gid-owner 0"]}


def _table(lines: dict) -> str:
    out = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for chain, rules in lines.items():
        out += [f"-A {chain} {r}" for r in rules]
    return with_noise("\n".join(out + ["COMMIT", ""]))


STATELESS = _table({c: [ln for ln in COMMON.strip().splitlines()] + ONLY[c]
                    for c in ("INPUT", "FORWARD", "OUTPUT")})

STATEFUL = _table({c: ["-m conntrack --ctstate NEW",
                       "-m state --state INVALID",
                       "-m state --state ESTABLISHED,RELATED",
                       "-m conntrack --ctstate UNTRACKED",
                       "-m conntrack --ctdir REPLY",
                       "-m conntrack --ctorigsrc 2001:db8:1::/64 --ctstate NEW,ESTABLISHED",
                       "-m conntrack ! --ctrepldst 2001:db8:1::2",
                       "-m conntrack --ctorigdst 2001:db8:2::2/128",
                       "-m conntrack --ctproto udp --ctorigdstport 53",
                       "-m conntrack --ctproto 58",
                       "-m conntrack --ctreplsrcport 1000:1999",
                       "-m conntrack --ctstatus SEEN_REPLY",
                       "-p udp -m udp --dport 7 -m conntrack --ctstate NEW -j DROP"]
                   for c in ("INPUT", "FORWARD", "OUTPUT")})


# ---- packets -------------------------------------------------------------------------------
def l4(src: str, dst: str, proto: int, seg: bytes, at: int) -> bytes:
    """The segment with its checksum (pseudo header of RFC 8200 8.1) written at byte `at`."""
    pseudo = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + \
        struct.pack("!IxxxB", len(seg), proto)
    c = csum(pseudo + seg[:at] + b"\0\0" + seg[at + 2:]) or 0xffff
    return seg[:at] + struct.pack("!H", c) + seg[at + 2:]


def udp(src, dst, sport, dport, n=8):
    return l4(src, dst, NH_UDP, struct.pack("!HHHH", sport, dport, 8 + n, 0) + b"u" * n, 6)


def echo(src, dst, ident):
    return l4(src, dst, NH_ICMP6, struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"ping", 2)


def tlv_hdr(kind, body: bytes):
    """A hop-by-hop / destination options header whose options area is `body` (padded with
    PadN to a multiple of 8 bytes, header included)."""
    def build(nh):
        pad = -(2 + len(body)) % 8
        b = body + (b"\0" if pad == 1 else bytes([1, pad - 2]) + bytes(pad - 2) if pad else b"")
        return bytes([nh, (2 + len(b)) // 8 - 1]) + b
    return (kind, build)


def frag_hdr(offset=0, more=False, ident=0, res=0):
    def build(nh):
        return struct.pack("!BBHI", nh, 0, (offset & ~7) | (res << 1) | int(more), ident)
    return (NH_FRAG, build)


def rt_hdr(rtype=0, segsleft=0, octets=2, reserved=0):
    def build(nh):
        return bytes([nh, octets, rtype, segsleft]) + struct.pack("!I", reserved) + \
            bytes(octets * 8)
    return (NH_ROUTING, build)


def ah_hdr(spi=0, plen=4, res=0):
    def build(nh):
        total = (plen + 2) * 4
        return bytes([nh, plen]) + struct.pack("!HII", res, spi, 1) + bytes(total - 12)
    return (NH_AUTH, build)


def pkt(where, nh, payload=b"", exthdrs=(), tc=0, hl=64, src=None):
    s, d = ENDS[where]
    p = ipv6(src=src or s, dst=d, nh=nh, payload=payload, exthdrs=list(exthdrs))
    first = (6 << 28) | (tc << 20)
    return struct.pack("!I", first) + p[4:7] + bytes([hl]) + p[8:]


def stateless_probes():
    """(name, where, [packets], SO_MARK for OUTPUT probes)."""
    out = []
    for where, (s, d) in ENDS.items():
        u = lambda sp, dp, n=8: udp(s, d, sp, dp, n)     # noqa: E731
        mine = [
            ("udp53", [pkt(where, NH_UDP, u(5000, 53))], 0),
            ("udp150-ef-hl5", [pkt(where, NH_UDP, u(1500, 150), tc=0xb8, hl=5)], 0),
            ("udp9-hl33", [pkt(where, NH_UDP, u(7, 9), hl=33)], 0),
            ("udp-long", [pkt(where, NH_UDP, u(1000, 300, 64))], 0),
            ("udp-hl3", [pkt(where, NH_UDP, u(1000, 301), hl=3)], 0),
            ("tcp22-tos10", [pkt(where, NH_TCP, tcp_hdr(4000, 22, 0x02), tc=0x10, hl=201)], 0),
            ("tcp443-hl250", [pkt(where, NH_TCP, tcp_hdr(4000, 443, 0x02), tc=0x11, hl=250)], 0),
            ("udp-other-src", [pkt(where, NH_UDP, u(1000, 53), src="2001:db8:1::7")], 0),
            ("udp-mark5", [pkt(where, NH_UDP, u(1000, 400))], 5),
            ("udp-mark-105", [pkt(where, NH_UDP, u(1000, 401))], 0x105),
            ("frag-set-150", [pkt(where, NH_UDP, u(1000, 53, 24)[:16],
                                  [frag_hdr(0, True, 150)]),
                              pkt(where, NH_UDP, u(1000, 53, 24)[16:],
                                  [frag_hdr(16, False, 150)])], 0),
            ("frag-later-7", [pkt(where, NH_UDP, b"s" * 24, [frag_hdr(24, False, 7)])], 0),
            ("frag-later-300", [pkt(where, NH_UDP, b"t" * 16, [frag_hdr(8, False, 300)])], 0),
            ("frag-later-666", [pkt(where, NH_UDP, b"t" * 16, [frag_hdr(8, False, 666)])], 0),
            ("frag-later-res", [pkt(where, NH_UDP, b"r" * 16, [frag_hdr(8, False, 120, 2)])], 0),
            ("frag-atomic", [pkt(where, NH_UDP, u(1000, 54), [frag_hdr(0, False, 180)])], 0),
            ("hbh8", [pkt(where, NH_UDP, u(1000, 55), [opts(NH_HOP)])], 0),
            ("hbh16", [pkt(where, NH_UDP, u(1000, 56), [opts(NH_HOP, 1)])], 0),
            ("hbh-ra", [pkt(where, NH_UDP, u(1000, 57),
                            [tlv_hdr(NH_HOP, bytes([5, 2, 0, 0]))])], 0),
            ("dst-pad1", [pkt(where, NH_UDP, u(1000, 58),
                              [tlv_hdr(NH_DEST, b"\0" + bytes([1, 3, 0, 0, 0]))])], 0),
            ("dst16", [pkt(where, NH_UDP, u(1000, 59), [opts(NH_DEST, 1)])], 0),
            ("dst24", [pkt(where, NH_UDP, u(1000, 60), [opts(NH_DEST, 2)])], 0),
            ("hbh-dst", [pkt(where, NH_UDP, u(1000, 61), [opts(NH_HOP), opts(NH_DEST)])], 0),
            ("frag-then-dst", [pkt(where, NH_UDP, b"d" * 16,
                                   [frag_hdr(16, False, 160), opts(NH_DEST)])], 0),
            ("rt0", [pkt(where, NH_UDP, u(1000, 62), [rt_hdr(0, 0, 2)])], 0),
            ("rt0-res", [pkt(where, NH_UDP, u(1000, 63), [rt_hdr(0, 0, 2, 9)])], 0),
            ("rt2", [pkt(where, NH_UDP, u(1000, 64), [rt_hdr(2, 0, 2)])], 0),
            ("rt-cut", [pkt(where, NH_UDP, b"", [(NH_ROUTING, lambda nh: bytes([nh, 4, 0, 0]))])],
             0),
            ("ah-150", [pkt(where, NH_UDP, u(1000, 65), [ah_hdr(150)])], 0),
            ("ah-120-res", [pkt(where, NH_UDP, u(1000, 66), [ah_hdr(120, 4, 1)])], 0),
            ("ah-777", [pkt(where, NH_UDP, u(1000, 67), [ah_hdr(777, 2)])], 0),
            ("ah-cut", [pkt(where, NH_UDP, b"", [(NH_AUTH, lambda nh: bytes([nh, 1, 0, 0]))])],
             0),
            ("echo", [pkt(where, NH_ICMP6, echo(s, d, 1))], 0),
            # multiport reads only the 4 bytes of ports (udp_mt would hotdrop: no 8-byte header)
            ("udp-ports-only", [pkt(where, NH_UDP, struct.pack("!HHB", 1000, 53, 0))], 0),
        ]
        if where == "fwd":
            mine += [("rt0-segs3", [pkt(where, NH_UDP, u(1000, 68), [rt_hdr(0, 3, 2)])], 0),
                     ("hbh-dst-rt-ah", [pkt(where, NH_UDP, u(1000, 69),
                                            [opts(NH_HOP), opts(NH_DEST, 1), rt_hdr(0, 4, 2),
                                             ah_hdr(190, 4)])], 0)]
        out += [(f"{where}:{n}", where, p, mark) for n, p, mark in mine]
    return out


def stateful_probes():
    out = []
    for where, (s, d) in ENDS.items():
        mine = [("udp53-a", [pkt(where, NH_UDP, udp(s, d, 1000, 53))]),
                ("udp53-b", [pkt(where, NH_UDP, udp(s, d, 1000, 53))]),
                ("udp7", [pkt(where, NH_UDP, udp(s, d, 1001, 7))]),
                ("udp-badsum", [pkt(where, NH_UDP, struct.pack("!HHHH", 1, 2, 8, 1))]),
                ("echo-1", [pkt(where, NH_ICMP6, echo(s, d, 7))]),
                ("echo-2", [pkt(where, NH_ICMP6, echo(s, d, 7))]),
                ("tcp-syn", [pkt(where, NH_TCP, l4(s, d, NH_TCP, tcp_hdr(4000, 22, 0x02), 16))]),
                ("tcp-ack", [pkt(where, NH_TCP, l4(s, d, NH_TCP, tcp_hdr(4001, 23, 0x10), 16))])]
        out += [(f"{where}:{n}", where, p, 0) for n, p in mine]
    return out


def run_lab(installer):
    results = []
    with Lab6(installer) as lab:
        for text, probes in ((STATELESS, stateless_probes()), (STATEFUL, stateful_probes())):
            lab.load(text)
            outcomes = {}
            for name, where, pkts, mark in probes:
                lab._raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                outcomes[name] = lab.send(where, pkts)
            lab._raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)
            save = comparable_save(lab.filter.save()) if hasattr(lab.filter, "save") else None
            results.append((outcomes, lab.filter.counters(), save))
    return results


def _where(table):
    out = {}
    for c in table.chains:
        for k, r in enumerate(c.entries()):
            out[r.index] = f"{c.name}#{k}"
    return out


_oracle = []


@pytest.mark.parametrize("candidate", [BpfilterFilter, DoorFilter], ids=["engine", "door"])
def test_ipv6_matches_against_kernel(candidate):
    """engine: the blob installed with Engine.install; door: the unmodified
    ip6tables-legacy-restore through `bpfilter exec` (GET_REVISION, SET_REPLACE, the helper)."""
    if not _oracle:
        _oracle.append(run_lab(KernelFilter))
    want = _oracle[0]
    got = run_lab(candidate)
    diffs = []
    for text, (wo, wc, ws), (go, gc, gs) in zip((STATELESS, STATEFUL), want, got):
        if gs is not None:       # the door: ip6tables-legacy-save -c lists rules and counters alike
            assert gs == ws and len(ws) > 40, "\n".join(
                f"kernel: {a}\nbpfilter: {b}" for a, b in zip(ws, gs) if a != b)
        table = blob_of(text)
        skip, where = noise_entries(table), _where(table)
        diffs += [f"{n}: kernel {wo[n]} bpfilter {go[n]}" for n in wo if wo[n] != go[n]]
        diffs += [f"entry {i} ({where.get(i)}): kernel {w} bpfilter {g}"
                  for i, (w, g) in enumerate(zip(wc, gc)) if i not in skip and w != g]
        # not vacuous: most counting rules saw packets, and some did not
        hit = [i for i, c in enumerate(wc) if c[0] and i not in skip]
        assert len(hit) >= len(wc) // 3, (len(hit), len(wc))
        assert len(hit) < len(wc) - len(skip)
    assert not diffs, "\n".join(diffs)
