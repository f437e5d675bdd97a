"""Golden disassembly listing of an IPv6 ruleset (tests/golden/ipv6_matchers.txt): the
extension-header walk, ip6t_ip6 address/interface/protocol tests, icmp6, tcp/udp at the walked
offset and a user chain, so IPv6 codegen changes are visible in review. Pure: KernelFacts.fake().

Regenerate after an intended codegen change:
    BPFILTER_UPDATE_GOLDEN=1 pytest tests/test_compile_ipv6_golden.py
"""
import os

from test_compile_ipv6_util import (ACCEPT, DROP, NH_ICMP6, NH_TCP, NH_UDP, RETURN, icmp6, rule6,
                                    table6)
from test_compile_util import jump, tcp, udp
from bpfilter_umh.compile import KernelFacts, compile_table
from bpfilter_umh.family import IP6T_INV_PROTO, IP6T_INV_SRCIP

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "ipv6_matchers.txt")


def ruleset():
    return table6({
        "INPUT": (DROP, [rule6(ACCEPT, src="2001:db8::/32", inv=IP6T_INV_SRCIP, iniface="eth+"),
                         rule6(ACCEPT, tcp(dport=(22, 22), flags=(0x17, 0x02)), proto=NH_TCP),
                         rule6(DROP, udp(sport=(1, 1023)), proto=NH_UDP,
                               dst="2001:db8:1::7/128"),
                         rule6(ACCEPT, icmp6(128, (0, 255)), proto=NH_ICMP6),
                         rule6(jump("sub"), proto=NH_UDP, inv=IP6T_INV_PROTO),
                         rule6(ACCEPT, proto=0)]),
        "OUTPUT": (ACCEPT, [rule6(DROP, outiface="veth0")])},
        {"sub": [rule6(RETURN, dst="2001:db8:2::/64")]})


def test_golden_listing_ipv6():
    text = compile_table(ruleset(), KernelFacts.fake()).listing()
    if os.environ.get("BPFILTER_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            f.write(text)
    with open(GOLDEN) as f:
        want = f.read()
    assert text == want, "IPv6 codegen changed: rerun with BPFILTER_UPDATE_GOLDEN=1 and review"


def test_compile_ipv6_is_deterministic():
    a, b = (compile_table(ruleset(), KernelFacts.fake()) for _ in range(2))
    assert a.listing() == b.listing()
    assert [p.assemble({"counters": 3}) for p in a.programs] == \
        [p.assemble({"counters": 3}) for p in b.programs]
