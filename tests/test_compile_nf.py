"""Compiled nf programs on the real kernel: loaded (verifier + JIT) and run with BPF_PROG_TEST_RUN,
one case per matcher: match, non-match, protocol guard, every inversion, the hotdrop cases, the
jump/goto/RETURN call-stack semantics, and the per-entry counters read back from the map.

bpf_prog_test_run_nf (net/bpf/test_run.c) gives the program state->out = loopback and
state->in = NULL whatever hook is asked for (verify_and_copy_hook_state() switches on the state's
default hook LOCAL_OUT before copying the user's): outiface is tested here against "lo", iniface
only as "no device"; real interfaces are covered by tests/test_engine_nf.py with veth traffic."""
import os

import pytest

from test_compile_util import (ACCEPT, DROP, RETURN, NF_ACCEPT, NF_DROP, Runner, goto, icmp,
                               icmp_hdr, ipv4, jump, rule, table, tcp, tcp_hdr, udp, udp_hdr)
from bpfilter_umh.compile import (IPT_ICMP_INV, IPT_INV_DSTIP, IPT_INV_FRAG, IPT_INV_PROTO,
                                  IPT_INV_SRCIP, IPT_INV_VIA_IN, IPT_INV_VIA_OUT, XT_TCP_INV_DSTPT,
                                  XT_TCP_INV_FLAGS, XT_TCP_INV_OPTION, XT_TCP_INV_SRCPT,
                                  XT_UDP_INV_DSTPT, XT_UDP_INV_SRCPT)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads BPF programs")

UDP = ipv4(proto=17, payload=udp_hdr(1000, 53))
TCP_SYN = ipv4(proto=6, payload=tcp_hdr(1000, 80, 0x02))
TCP_SYNACK = ipv4(proto=6, payload=tcp_hdr(1000, 80, 0x12))
MSS, NOP, WS, TS = b"\x02\x04\x05\xb4", b"\x01", b"\x03\x03\x07", b"\x08\x0a" + bytes(8)
PING = ipv4(proto=1, payload=icmp_hdr(8, 0))
UNREACH3 = ipv4(proto=1, payload=icmp_hdr(3, 3))

# (name, rule (DROP target; policy ACCEPT), packet, expected: "match" | "miss" | "hotdrop")
CASES = [
    # ---- ipt_ip: addresses with masks and inversion
    ("src", rule(DROP, src="192.0.2.0/24"), UDP, "match"),
    ("src-miss", rule(DROP, src="198.51.100.0/24"), UDP, "miss"),
    ("src-host", rule(DROP, src="192.0.2.1/32"), UDP, "match"),
    ("src-inv", rule(DROP, src="192.0.2.0/24", inv=IPT_INV_SRCIP), UDP, "miss"),
    ("src-inv-other", rule(DROP, src="198.51.100.0/24", inv=IPT_INV_SRCIP), UDP, "match"),
    ("src-any-inv", rule(DROP, inv=IPT_INV_SRCIP), UDP, "miss"),
    ("dst-mask25", rule(DROP, dst="192.0.2.128/25"), ipv4(dst="192.0.2.200", proto=17,
                                                          payload=udp_hdr()), "match"),
    ("dst-mask25-miss", rule(DROP, dst="192.0.2.128/25"), UDP, "miss"),
    ("dst-inv", rule(DROP, dst="192.0.2.128/25", inv=IPT_INV_DSTIP), UDP, "match"),
    ("dst-highbit", rule(DROP, dst="203.0.113.255/32"),
     ipv4(dst="203.0.113.255", proto=17, payload=udp_hdr()), "match"),
    # ---- protocol (0 = all) and its inversion
    ("proto", rule(DROP, proto=17), UDP, "match"),
    ("proto-miss", rule(DROP, proto=6), UDP, "miss"),
    ("proto-inv", rule(DROP, proto=6, inv=IPT_INV_PROTO), UDP, "match"),
    ("proto-inv-same", rule(DROP, proto=17, inv=IPT_INV_PROTO), UDP, "miss"),
    ("proto-all-inv", rule(DROP, proto=0, inv=IPT_INV_PROTO), UDP, "match"),
    # ---- interfaces: test-run gives out = lo, in = none
    ("out-lo", rule(DROP, outiface="lo"), UDP, "match"),
    ("out-wildcard", rule(DROP, outiface="l+"), UDP, "match"),
    ("out-plus-all", rule(DROP, outiface="+"), UDP, "match"),
    ("out-longer", rule(DROP, outiface="lo0"), UDP, "miss"),
    ("out-prefix-is-not-wildcard", rule(DROP, outiface="l"), UDP, "miss"),
    ("out-other", rule(DROP, outiface="veth0"), UDP, "miss"),
    ("out-inv", rule(DROP, outiface="lo", inv=IPT_INV_VIA_OUT), UDP, "miss"),
    ("out-inv-other", rule(DROP, outiface="veth0", inv=IPT_INV_VIA_OUT), UDP, "match"),
    ("out-long-name", rule(DROP, outiface="abcdefghijklmno"), UDP, "miss"),
    ("in-none", rule(DROP, iniface="lo"), UDP, "miss"),
    ("in-none-inv", rule(DROP, iniface="lo", inv=IPT_INV_VIA_IN), UDP, "match"),
    # ---- fragments: -f matches non-first fragments only
    ("frag-whole", rule(DROP, frag=True), UDP, "miss"),
    ("frag-later", rule(DROP, frag=True), ipv4(proto=17, payload=b"x" * 16, frag_off=5), "match"),
    ("frag-first-inv", rule(DROP, frag=True, inv=IPT_INV_FRAG),
     ipv4(proto=17, payload=udp_hdr(), mf=True), "match"),
    ("frag-later-inv", rule(DROP, frag=True, inv=IPT_INV_FRAG),
     ipv4(proto=17, payload=b"x" * 16, frag_off=5), "miss"),
    # ---- tcp: ports, flags, options, inversions
    ("tcp-dport", rule(DROP, tcp(dport=(80, 80)), proto=6), TCP_SYN, "match"),
    ("tcp-dport-miss", rule(DROP, tcp(dport=(81, 90)), proto=6), TCP_SYN, "miss"),
    ("tcp-dport-inv", rule(DROP, tcp(dport=(80, 80), inv=XT_TCP_INV_DSTPT), proto=6), TCP_SYN, "miss"),
    ("tcp-dport-inv-other", rule(DROP, tcp(dport=(81, 90), inv=XT_TCP_INV_DSTPT), proto=6),
     TCP_SYN, "match"),
    ("tcp-sport-range", rule(DROP, tcp(sport=(999, 1001)), proto=6), TCP_SYN, "match"),
    ("tcp-sport-range-miss", rule(DROP, tcp(sport=(1001, 2000)), proto=6), TCP_SYN, "miss"),
    ("tcp-sport-inv", rule(DROP, tcp(sport=(1001, 2000), inv=XT_TCP_INV_SRCPT), proto=6),
     TCP_SYN, "match"),
    ("tcp-syn", rule(DROP, tcp(flags=(0x17, 0x02)), proto=6), TCP_SYN, "match"),
    ("tcp-syn-miss", rule(DROP, tcp(flags=(0x17, 0x02)), proto=6), TCP_SYNACK, "miss"),
    ("tcp-syn-inv", rule(DROP, tcp(flags=(0x17, 0x02), inv=XT_TCP_INV_FLAGS), proto=6),
     TCP_SYNACK, "match"),
    ("tcp-option", rule(DROP, tcp(option=2), proto=6),
     ipv4(proto=6, payload=tcp_hdr(options=MSS)), "match"),
    ("tcp-option-after-others", rule(DROP, tcp(option=8), proto=6),
     ipv4(proto=6, payload=tcp_hdr(options=NOP + NOP + WS + MSS + TS)), "match"),
    ("tcp-option-absent", rule(DROP, tcp(option=8), proto=6),
     ipv4(proto=6, payload=tcp_hdr(options=NOP + WS + MSS)), "miss"),
    ("tcp-option-no-options", rule(DROP, tcp(option=2), proto=6), TCP_SYN, "miss"),
    ("tcp-option-inv", rule(DROP, tcp(option=2, inv=XT_TCP_INV_OPTION), proto=6),
     ipv4(proto=6, payload=tcp_hdr(options=MSS)), "miss"),
    ("tcp-option-inv-absent", rule(DROP, tcp(option=2, inv=XT_TCP_INV_OPTION), proto=6),
     TCP_SYN, "match"),
    ("tcp-option-zero-length", rule(DROP, tcp(option=2), proto=6),   # len 0 advances 1 byte:
     ipv4(proto=6, payload=tcp_hdr(options=b"\x05\x00\x01" + MSS)), "match"),  # 5,0,1,MSS
    ("tcp-option-skips-by-length", rule(DROP, tcp(option=1), proto=6),  # 1 only inside TS data
     ipv4(proto=6, payload=tcp_hdr(options=b"\x08\x0a\x01\x01" + bytes(6) + MSS)), "miss"),
    ("tcp-option-inside-data-not-seen", rule(DROP, tcp(option=4), proto=6),   # 4 is MSS data
     ipv4(proto=6, payload=tcp_hdr(options=b"\x02\x04\x04\x04")), "miss"),
    ("tcp-option-in-last-byte", rule(DROP, tcp(option=7), proto=6),
     ipv4(proto=6, payload=tcp_hdr(options=NOP * 39 + b"\x07")), "match"),
    # ---- tcp hotdrops (tcp_mt): offset-1 fragment, truncated header, bad doff, cut options
    ("tcp-frag-off1", rule(ACCEPT, tcp(dport=(80, 80)), proto=6),
     ipv4(proto=6, payload=b"x" * 16, frag_off=1), "hotdrop"),
    ("tcp-frag-off2", rule(DROP, tcp(dport=(80, 80)), proto=6),
     ipv4(proto=6, payload=b"x" * 16, frag_off=2), "miss"),
    ("tcp-truncated", rule(ACCEPT, tcp(dport=(80, 80)), proto=6),
     ipv4(proto=6, payload=tcp_hdr()[:12]), "hotdrop"),
    ("tcp-bad-doff-option", rule(ACCEPT, tcp(option=2), proto=6),
     ipv4(proto=6, payload=tcp_hdr(doff=4)), "hotdrop"),
    ("tcp-bad-doff-no-option", rule(DROP, tcp(dport=(80, 80)), proto=6),
     ipv4(proto=6, payload=tcp_hdr(doff=4)), "match"),
    ("tcp-options-cut", rule(ACCEPT, tcp(option=2), proto=6),
     ipv4(proto=6, payload=tcp_hdr(options=MSS, doff=8)), "hotdrop"),
    ("tcp-first-fragment-ok", rule(DROP, tcp(dport=(80, 80)), proto=6),
     ipv4(proto=6, payload=tcp_hdr(), mf=True), "match"),
    # ---- udp
    ("udp-dport", rule(DROP, udp(dport=(53, 53)), proto=17), UDP, "match"),
    ("udp-dport-miss", rule(DROP, udp(dport=(54, 60)), proto=17), UDP, "miss"),
    ("udp-dport-inv", rule(DROP, udp(dport=(53, 53), inv=XT_UDP_INV_DSTPT), proto=17), UDP, "miss"),
    ("udp-sport-inv", rule(DROP, udp(sport=(1, 999), inv=XT_UDP_INV_SRCPT), proto=17), UDP, "match"),
    ("udp-both", rule(DROP, udp(sport=(1000, 1000), dport=(50, 60)), proto=17), UDP, "match"),
    ("udp-truncated", rule(ACCEPT, udp(dport=(53, 53)), proto=17),
     ipv4(proto=17, payload=b"\x03\xe8\x00"), "hotdrop"),
    ("udp-fragment", rule(DROP, udp(dport=(53, 53)), proto=17),
     ipv4(proto=17, payload=b"x" * 16, frag_off=1), "miss"),
    # ---- icmp
    ("icmp-type", rule(DROP, icmp(8, (0, 255)), proto=1), PING, "match"),
    ("icmp-type-miss", rule(DROP, icmp(0, (0, 255)), proto=1), PING, "miss"),
    ("icmp-code-range", rule(DROP, icmp(3, (1, 3)), proto=1), UNREACH3, "match"),
    ("icmp-code-miss", rule(DROP, icmp(3, (0, 2)), proto=1), UNREACH3, "miss"),
    ("icmp-any", rule(DROP, icmp(0xFF), proto=1), UNREACH3, "match"),
    ("icmp-any-inv", rule(DROP, icmp(0xFF, inv=IPT_ICMP_INV), proto=1), UNREACH3, "miss"),
    ("icmp-inv", rule(DROP, icmp(8, (0, 255), inv=IPT_ICMP_INV), proto=1), UNREACH3, "match"),
    ("icmp-inv-same", rule(DROP, icmp(8, (0, 255), inv=IPT_ICMP_INV), proto=1), PING, "miss"),
    ("icmp-truncated", rule(ACCEPT, icmp(8), proto=1), ipv4(proto=1, payload=b"\x08\x00\x00\x00"),
     "hotdrop"),
    ("icmp-fragment", rule(DROP, icmp(0xFF), proto=1), ipv4(proto=1, payload=b"x" * 8, frag_off=3),
     "miss"),
]


@pytest.mark.parametrize("name,r,packet,expect", CASES, ids=[c[0] for c in CASES])
def test_matcher(netns, name, r, packet, expect):
    chain = "OUTPUT"          # the hook whose test-run ctx has a device (out = lo)
    t = table({chain: (ACCEPT, [r])})
    pol = t.chain(chain).policy_entry.index
    with netns.inside(), Runner(t) as run:
        verdict = run.run(chain, packet)
        c = run.counters()
    want_verdict = NF_DROP if expect in ("match", "hotdrop") else NF_ACCEPT
    if expect == "match" and r.target == ACCEPT:
        want_verdict = NF_ACCEPT
    assert verdict == want_verdict, f"{name}: verdict {verdict}"
    n = len(packet)
    if expect == "match":
        assert (c[r.index], c[pol]) == ((1, n), (0, 0)), c
    elif expect == "miss":
        assert (c[r.index], c[pol]) == ((0, 0), (1, n)), c
    else:                     # hotdrop: NF_DROP, and no entry counted
        assert (c[r.index], c[pol]) == ((0, 0), (0, 0)), c


def test_jump_goto_return_stack_and_counters(netns):
    """ipt_do_table's jump stack: RETURN resumes after the last *jump*; a goto pushes nothing;
    RETURN with an empty stack and falling off a built-in chain both land on the policy entry,
    which is counted; a user chain's RETURN entry is counted when fallen onto."""
    r_jA = rule(jump("A"), src="192.0.2.0/24")
    r_tcp = rule(ACCEPT, proto=6)
    a_goB = rule(goto("B"), proto=17)
    a_ret = rule(RETURN, proto=1)
    a_ssh = rule(ACCEPT, tcp(dport=(22, 22)), proto=6)
    b_dns = rule(ACCEPT, udp(dport=(53, 53)), proto=17)
    b_jC = rule(jump("C"), udp(dport=(54, 54)), proto=17)
    c_drop = rule(DROP, udp(sport=(7, 7)), proto=17)
    o_ret = rule(RETURN, proto=17)
    o_drop = rule(DROP)
    t = table({"INPUT": (DROP, [r_jA, r_tcp]), "OUTPUT": (ACCEPT, [o_ret, o_drop])},
              {"A": [a_goB, a_ret, a_ssh], "B": [b_dns, b_jC], "C": [c_drop]})
    pol = t.chain("INPUT").policy_entry
    ret = {n: t.chain(n).policy_entry for n in "ABC"}
    o_pol = t.chain("OUTPUT").policy_entry
    u = lambda sport, dport, src="192.0.2.1": ipv4(src=src, proto=17, payload=udp_hdr(sport, dport))
    cases = [  # (chain, packet, verdict, entries counted in order)
        ("INPUT", u(1, 53), NF_ACCEPT, [r_jA, a_goB, b_dns]),
        ("INPUT", u(7, 54), NF_DROP, [r_jA, a_goB, b_jC, c_drop]),
        ("INPUT", u(8, 54), NF_DROP, [r_jA, a_goB, b_jC, ret["C"], ret["B"], pol]),
        ("INPUT", u(8, 55), NF_DROP, [r_jA, a_goB, ret["B"], pol]),
        ("INPUT", PING, NF_DROP, [r_jA, a_ret, pol]),
        ("INPUT", ipv4(proto=6, payload=tcp_hdr(dport=22)), NF_ACCEPT, [r_jA, a_ssh]),
        ("INPUT", ipv4(proto=6, payload=tcp_hdr(dport=80)), NF_ACCEPT, [r_jA, ret["A"], r_tcp]),
        ("INPUT", u(1, 53, src="198.51.100.1"), NF_DROP, [pol]),
        ("OUTPUT", UDP, NF_ACCEPT, [o_ret, o_pol]),
        ("OUTPUT", TCP_SYN, NF_DROP, [o_drop]),
    ]
    want = {}
    with netns.inside(), Runner(t) as run:
        for chain, pkt, verdict, path in cases:
            assert run.run(chain, pkt) == verdict, (chain, path)
            for e in path:
                p, b = want.get(e.index, (0, 0))
                want[e.index] = (p + 1, b + len(pkt))
        got = run.counters()
    assert {i: c for i, c in enumerate(got) if c != (0, 0)} == want


def test_programs_load_for_every_builtin_chain(netns):
    t = table({"INPUT": (DROP, [rule(ACCEPT, tcp(option=2), proto=6)]),
               "FORWARD": (DROP, [rule(ACCEPT, icmp(8), proto=1)]),
               "OUTPUT": (ACCEPT, [rule(DROP, udp(dport=(1, 2)), proto=17, outiface="eth+")])})
    with netns.inside(), Runner(t) as run:
        assert set(run.progs) == {"INPUT", "FORWARD", "OUTPUT"}
        for p in run.progs.values():
            info = p.info()
            assert info["type"] == 32 and info["jited_prog_len"] > 0
        assert run.run("FORWARD", PING) == NF_ACCEPT
        assert run.run("FORWARD", UDP) == NF_DROP
