"""Compiled AF_INET6 nf programs on the real kernel: loaded (verifier + JIT) and run with
BPF_PROG_TEST_RUN, one case per ip6t_ip6/icmp6/tcp/udp matcher: match, non-match, each inversion,
extension-header chains walked like ipv6_find_hdr(), fragments, the hotdrop cases, and the per-entry
counters (skb->len) read back from the map. As in test_compile_nf.py, the test-run ctx has
out = lo and in = NULL, so rules are tested at OUTPUT."""
import ipaddress
import os

import pytest

from test_compile_ipv6_util import (ACCEPT, DROP, NH_DEST, NH_HOP, NH_ICMP6, NH_NONE, NH_TCP,
                                    NH_UDP, RETURN, Runner6, auth, frag, icmp6, icmp6_hdr, ipv6,
                                    opts, routing, rule6, table6, udp6)
from test_compile_util import NF_ACCEPT, NF_DROP, jump, goto, tcp, tcp_hdr, udp
from bpfilter_umh.compile import KernelFacts, compile_table
from bpfilter_umh.errors import BpfilterError
from bpfilter_umh.family import (IP6T_F_TOS, IP6T_ICMP_INV, IP6T_INV_DSTIP, IP6T_INV_FRAG,
                                 IP6T_INV_PROTO, IP6T_INV_SRCIP, IP6T_INV_TOS, IP6T_INV_VIA_IN,
                                 IP6T_INV_VIA_OUT, MAX_EXTHDRS)
from bpfilter_umh.compile import XT_TCP_INV_DSTPT, XT_TCP_INV_FLAGS, XT_UDP_INV_SRCPT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads BPF programs")

UDP = ipv6(nh=NH_UDP, payload=udp6(1000, 53))
TCP_SYN = ipv6(nh=NH_TCP, payload=tcp_hdr(1000, 80, 0x02))
PING = ipv6(nh=NH_ICMP6, payload=icmp6_hdr(128, 0))
UNREACH3 = ipv6(nh=NH_ICMP6, payload=icmp6_hdr(1, 3))
# extension-header chains in front of a UDP datagram to port 53
HBH_DST_UDP = ipv6(nh=NH_UDP, payload=udp6(), exthdrs=[opts(NH_HOP), opts(NH_DEST, 1)])
RT_UDP = ipv6(nh=NH_UDP, payload=udp6(), exthdrs=[routing(segments_left=0, octets=2)])
AH_UDP = ipv6(nh=NH_UDP, payload=udp6(), exthdrs=[auth(4)])
ALL_UDP = ipv6(nh=NH_UDP, payload=udp6(), exthdrs=[opts(NH_HOP), routing(1, 2), frag(0, True),
                                                   auth(3), opts(NH_DEST)])
FIRST_FRAG_UDP = ipv6(nh=NH_UDP, payload=udp6(), exthdrs=[frag(0, more=True)])
LATER_FRAG_UDP = ipv6(nh=NH_UDP, payload=b"y" * 16, exthdrs=[frag(8, more=False)])
LATER_FRAG_TCP = ipv6(nh=NH_TCP, payload=b"y" * 24, exthdrs=[frag(8)])
LATER_FRAG_THEN_DEST = ipv6(nh=NH_UDP, payload=udp6(), exthdrs=[frag(16), opts(NH_DEST)])
NONE_NEXT = ipv6(nh=NH_NONE, payload=b"")
CUT_DEST = ipv6(nh=NH_UDP, exthdrs=[(NH_DEST, lambda nh: bytes([nh]))])   # 1 byte of the header
CUT_FRAG = ipv6(nh=NH_UDP, exthdrs=[(44, lambda nh: bytes([nh, 0, 0]))])   # frag_off cut
SHORT_DEST_LAST = ipv6(nh=NH_NONE, exthdrs=[(NH_DEST, lambda nh: bytes([nh, 0]))])  # 2 of 8 bytes
DEEP = ipv6(nh=NH_UDP, payload=udp6(), exthdrs=[opts(NH_DEST)] * (MAX_EXTHDRS + 1))
OK_DEPTH = ipv6(nh=NH_UDP, payload=udp6(), exthdrs=[opts(NH_DEST)] * MAX_EXTHDRS)

S1 = "2001:db8::1"


def _outside(r):
    """The rule's address with bits outside its mask: ipv6_masked_addr_cmp() ignores them."""
    r.ip.src = ipaddress.IPv6Address("2001:db8::ffff")
    return r

# (name, rule (policy ACCEPT), packet, expected: "match" | "miss" | "hotdrop")
CASES = [
    # ---- addresses: masks, inversion, rule bits outside the mask ignored
    ("src", rule6(DROP, src="2001:db8::/64"), UDP, "match"),
    ("src-host", rule6(DROP, src=S1 + "/128"), UDP, "match"),
    ("src-miss", rule6(DROP, src="2001:db8:1::/48"), UDP, "miss"),
    ("src-low-half", rule6(DROP, src="2001:db8::2/128"), UDP, "miss"),
    ("src-inv", rule6(DROP, src="2001:db8::/64", inv=IP6T_INV_SRCIP), UDP, "miss"),
    ("src-inv-other", rule6(DROP, src="2001:db8:1::/48", inv=IP6T_INV_SRCIP), UDP, "match"),
    ("src-any-inv", rule6(DROP, inv=IP6T_INV_SRCIP), UDP, "miss"),
    ("dst-mask-odd", rule6(DROP, dst="2001:db8::3/127"), UDP, "match"),       # ::2 in ::2/127
    ("src-bits-outside-mask", _outside(rule6(DROP, src="2001:db8::/64")), UDP, "match"),
    ("dst-mask-odd-miss", rule6(DROP, dst="2001:db8::4/127"), UDP, "miss"),
    ("dst-inv", rule6(DROP, dst="2001:db8::4/127", inv=IP6T_INV_DSTIP), UDP, "match"),
    # ---- protocol with IP6T_F_PROTO: the upper layer found behind extension headers
    ("proto", rule6(DROP, proto=NH_UDP), UDP, "match"),
    ("proto-miss", rule6(DROP, proto=NH_TCP), UDP, "miss"),
    ("proto-inv", rule6(DROP, proto=NH_TCP, inv=IP6T_INV_PROTO), UDP, "match"),
    ("proto-inv-same", rule6(DROP, proto=NH_UDP, inv=IP6T_INV_PROTO), UDP, "miss"),
    ("proto-all", rule6(DROP, proto=0), UDP, "match"),
    ("proto-all-inv", rule6(DROP, proto=0, inv=IP6T_INV_PROTO), UDP, "match"),
    ("proto-behind-hbh-dst", rule6(DROP, proto=NH_UDP), HBH_DST_UDP, "match"),
    ("proto-is-not-an-exthdr", rule6(DROP, proto=NH_DEST), HBH_DST_UDP, "miss"),
    ("proto-behind-routing", rule6(DROP, proto=NH_UDP), RT_UDP, "match"),
    ("proto-behind-ah", rule6(DROP, proto=NH_UDP), AH_UDP, "match"),
    ("proto-behind-all-kinds", rule6(DROP, proto=NH_UDP), ALL_UDP, "match"),
    ("proto-first-fragment", rule6(DROP, proto=NH_UDP), FIRST_FRAG_UDP, "match"),
    ("proto-later-fragment", rule6(DROP, proto=NH_UDP), LATER_FRAG_UDP, "match"),
    ("proto-none", rule6(DROP, proto=NH_NONE), NONE_NEXT, "match"),
    ("proto-max-depth", rule6(DROP, proto=NH_UDP), OK_DEPTH, "match"),
    ("proto-dest-short-but-last", rule6(DROP, proto=NH_NONE), SHORT_DEST_LAST, "match"),
    # ---- ipv6_find_hdr() failures hotdrop every -p rule (even -p all), not rules without -p
    ("walk-cut-dest", rule6(ACCEPT, proto=NH_UDP), CUT_DEST, "hotdrop"),
    ("walk-cut-dest-all", rule6(ACCEPT, proto=0), CUT_DEST, "hotdrop"),
    ("walk-cut-frag", rule6(ACCEPT, proto=NH_UDP), CUT_FRAG, "hotdrop"),
    ("walk-later-frag-then-exthdr", rule6(ACCEPT, proto=NH_UDP), LATER_FRAG_THEN_DEST, "hotdrop"),
    ("walk-cut-no-proto", rule6(DROP, dst="2001:db8::2/128"), CUT_DEST, "match"),
    ("walk-cut-src-miss-first", rule6(ACCEPT, proto=NH_UDP, src="2001:db8:9::/48"), CUT_DEST,
     "miss"),
    ("walk-too-deep", rule6(ACCEPT, proto=NH_UDP), DEEP, "hotdrop"),
    # ---- TOS / frag flags: accepted by ip6_checkentry, never tested by ip6_packet_match
    ("tos-flag-ignored", rule6(DROP, flags=IP6T_F_TOS, inv=IP6T_INV_TOS), UDP, "match"),
    ("inv-frag-ignored", rule6(DROP, inv=IP6T_INV_FRAG), UDP, "match"),
    # ---- interfaces (out = lo, in = none)
    ("out-lo", rule6(DROP, outiface="lo"), UDP, "match"),
    ("out-wildcard", rule6(DROP, outiface="l+"), UDP, "match"),
    ("out-other", rule6(DROP, outiface="veth0"), UDP, "miss"),
    ("out-inv", rule6(DROP, outiface="lo", inv=IP6T_INV_VIA_OUT), UDP, "miss"),
    ("in-none", rule6(DROP, iniface="lo"), UDP, "miss"),
    ("in-none-inv", rule6(DROP, iniface="lo", inv=IP6T_INV_VIA_IN), UDP, "match"),
    # ---- udp / tcp at the offset the walk found
    ("udp-dport", rule6(DROP, udp(dport=(53, 53)), proto=NH_UDP), UDP, "match"),
    ("udp-dport-miss", rule6(DROP, udp(dport=(54, 60)), proto=NH_UDP), UDP, "miss"),
    ("udp-sport-inv", rule6(DROP, udp(sport=(1, 999), inv=XT_UDP_INV_SRCPT), proto=NH_UDP), UDP,
     "match"),
    ("udp-behind-exthdrs", rule6(DROP, udp(dport=(53, 53)), proto=NH_UDP), ALL_UDP, "match"),
    ("udp-first-fragment", rule6(DROP, udp(dport=(53, 53)), proto=NH_UDP), FIRST_FRAG_UDP,
     "match"),
    ("udp-later-fragment", rule6(DROP, udp(dport=(53, 53)), proto=NH_UDP), LATER_FRAG_UDP, "miss"),
    ("udp-truncated", rule6(ACCEPT, udp(dport=(53, 53)), proto=NH_UDP),
     ipv6(nh=NH_UDP, payload=b"\x03\xe8\x00"), "hotdrop"),
    ("tcp-dport", rule6(DROP, tcp(dport=(80, 80)), proto=NH_TCP), TCP_SYN, "match"),
    ("tcp-dport-inv", rule6(DROP, tcp(dport=(80, 80), inv=XT_TCP_INV_DSTPT), proto=NH_TCP),
     TCP_SYN, "miss"),
    ("tcp-syn", rule6(DROP, tcp(flags=(0x17, 0x02)), proto=NH_TCP), TCP_SYN, "match"),
    ("tcp-syn-inv", rule6(DROP, tcp(flags=(0x17, 0x02), inv=XT_TCP_INV_FLAGS), proto=NH_TCP),
     TCP_SYN, "miss"),
    ("tcp-option", rule6(DROP, tcp(option=2), proto=NH_TCP),
     ipv6(nh=NH_TCP, payload=tcp_hdr(options=b"\x02\x04\x05\xa0"), exthdrs=[opts(NH_DEST)]),
     "match"),
    # fragoff is in bytes for IPv6: the 8-byte-offset fragment is not tcp_mt's "fragoff == 1"
    ("tcp-frag-8-bytes-no-hotdrop", rule6(DROP, tcp(dport=(80, 80)), proto=NH_TCP),
     LATER_FRAG_TCP, "miss"),
    ("tcp-truncated", rule6(ACCEPT, tcp(dport=(80, 80)), proto=NH_TCP),
     ipv6(nh=NH_TCP, payload=tcp_hdr()[:12]), "hotdrop"),
    # ---- icmp6: type, code range, inversion, no 0xFF wildcard
    ("icmp6-type", rule6(DROP, icmp6(128), proto=NH_ICMP6), PING, "match"),
    ("icmp6-type-miss", rule6(DROP, icmp6(129), proto=NH_ICMP6), PING, "miss"),
    ("icmp6-code-range", rule6(DROP, icmp6(1, (2, 4)), proto=NH_ICMP6), UNREACH3, "match"),
    ("icmp6-code-miss", rule6(DROP, icmp6(1, (0, 2)), proto=NH_ICMP6), UNREACH3, "miss"),
    ("icmp6-inv", rule6(DROP, icmp6(128, inv=IP6T_ICMP_INV), proto=NH_ICMP6), UNREACH3, "match"),
    ("icmp6-inv-same", rule6(DROP, icmp6(128, inv=IP6T_ICMP_INV), proto=NH_ICMP6), PING, "miss"),
    ("icmp6-ff-is-a-type", rule6(DROP, icmp6(0xFF), proto=NH_ICMP6), PING, "miss"),
    ("icmp6-ff-inv", rule6(DROP, icmp6(0xFF, inv=IP6T_ICMP_INV), proto=NH_ICMP6), PING, "match"),
    ("icmp6-truncated", rule6(ACCEPT, icmp6(128), proto=NH_ICMP6),
     ipv6(nh=NH_ICMP6, payload=b"\x80\x00\x00\x00"), "hotdrop"),
    ("icmp6-fragment", rule6(DROP, icmp6(128), proto=NH_ICMP6),
     ipv6(nh=NH_ICMP6, payload=b"z" * 16, exthdrs=[frag(16)]), "miss"),
    ("icmp6-behind-hbh", rule6(DROP, icmp6(128), proto=NH_ICMP6),
     ipv6(nh=NH_ICMP6, payload=icmp6_hdr(128, 0), exthdrs=[opts(NH_HOP)]), "match"),
]


@pytest.mark.parametrize("name,r,packet,expect", CASES, ids=[c[0] for c in CASES])
def test_matcher6(netns, name, r, packet, expect):
    chain = "OUTPUT"
    t = table6({chain: (ACCEPT, [r])})
    pol = t.chain(chain).policy_entry.index
    with netns.inside(), Runner6(t) as run:
        verdict = run.run(chain, packet)
        c = run.counters()
    want = NF_DROP if expect in ("match", "hotdrop") else NF_ACCEPT
    if expect == "match" and r.target == ACCEPT:
        want = NF_ACCEPT
    assert verdict == want, f"{name}: verdict {verdict}"
    n = len(packet)
    if expect == "match":
        assert (c[r.index], c[pol]) == ((1, n), (0, 0)), c
    elif expect == "miss":
        assert (c[r.index], c[pol]) == ((0, 0), (1, n)), c
    else:
        assert (c[r.index], c[pol]) == ((0, 0), (0, 0)), c


def test_jump_goto_return_ipv6(netns):
    """The inlining/jump logic is family-independent; IPv6 marks goto with IP6T_F_GOTO (0x04)."""
    r_jA = rule6(jump("A"), src="2001:db8::/64")
    a_goB = rule6(goto("B"), proto=NH_UDP)
    a_ret = rule6(RETURN, proto=NH_ICMP6)
    b_dns = rule6(ACCEPT, udp(dport=(53, 53)), proto=NH_UDP)
    t = table6({"INPUT": (DROP, [r_jA])}, {"A": [a_goB, a_ret], "B": [b_dns]})
    pol = t.chain("INPUT").policy_entry
    ret_b = t.chain("B").policy_entry
    ret_a = t.chain("A").policy_entry
    cases = [("INPUT", UDP, NF_ACCEPT, [r_jA, a_goB, b_dns]),
             ("INPUT", ipv6(payload=udp6(dport=54)), NF_DROP, [r_jA, a_goB, ret_b, pol]),
             ("INPUT", PING, NF_DROP, [r_jA, a_ret, pol]),
             ("INPUT", TCP_SYN, NF_DROP, [r_jA, ret_a, pol]),
             ("INPUT", ipv6(src="2001:db8:5::1", payload=udp6()), NF_DROP, [pol])]
    want = {}
    with netns.inside(), Runner6(t) as run:
        for chain, pkt, verdict, path in cases:
            assert run.run(chain, pkt) == verdict, path
            for e in path:
                p, b = want.get(e.index, (0, 0))
                want[e.index] = (p + 1, b + len(pkt))
        got = run.counters()
    assert {i: c for i, c in enumerate(got) if c != (0, 0)} == want


def test_tos_flag_is_not_goto(netns):
    """IPv4's IPT_F_GOTO (0x02) is IP6T_F_TOS for IPv6: a jump with it still returns."""
    r = rule6(jump("A"), flags=IP6T_F_TOS)
    t = table6({"INPUT": (DROP, [r, rule6(ACCEPT, proto=NH_UDP)])}, {"A": []})
    with netns.inside(), Runner6(t) as run:
        assert run.run("INPUT", UDP) == NF_ACCEPT


def test_l4_match_without_f_proto_refused():
    r = rule6(DROP, udp(dport=(53, 53)))
    r.ip.proto = NH_UDP                       # proto set, IP6T_F_PROTO not
    with pytest.raises(BpfilterError) as e:
        compile_table(table6({"INPUT": (ACCEPT, [r])}), KernelFacts.fake())
    assert e.value.errno == 95 and "IP6T_F_PROTO" in e.value.message


def test_icmp_match_refused_for_ipv6():
    r = rule6(DROP, icmp6(128), proto=NH_ICMP6)
    r.matches[0].name = "icmp"
    with pytest.raises(BpfilterError) as e:
        compile_table(table6({"INPUT": (ACCEPT, [r])}), KernelFacts.fake())
    assert e.value.errno == 95


def test_all_three_chains_load(netns):
    t = table6({"INPUT": (DROP, [rule6(ACCEPT, tcp(option=2), proto=NH_TCP, iniface="eth+")]),
                "FORWARD": (DROP, [rule6(ACCEPT, icmp6(128), proto=NH_ICMP6)]),
                "OUTPUT": (ACCEPT, [rule6(DROP, udp(dport=(1, 2)), proto=NH_UDP, outiface="e+")])})
    with netns.inside(), Runner6(t) as run:
        assert set(run.progs) == {"INPUT", "FORWARD", "OUTPUT"}
        assert run.run("FORWARD", PING) == NF_ACCEPT
        assert run.run("FORWARD", UDP) == NF_DROP
        assert run.run("INPUT", TCP_SYN) == NF_DROP


def test_ipv6_compiles_for_tc_and_xdp():
    """tc/xdp serve ip6tables tables too (IPv6 dispatchers in attach.py; traffic differential in
    tests/test_flavor_ipv6.py): SCHED_CLS for every hook on tc, XDP for INPUT/FORWARD."""
    want = {"tc": [("INPUT", 3), ("FORWARD", 3), ("OUTPUT", 3)],
            "xdp": [("INPUT", 6), ("FORWARD", 6)]}
    for fl, progs in want.items():
        got = compile_table(table6({"INPUT": (ACCEPT, [rule6(DROP, proto=NH_UDP)])}),
                            KernelFacts.fake(), flavor=fl).programs
        assert [(p.chain, p.prog_type) for p in got] == progs