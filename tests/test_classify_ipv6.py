"""IPv6 prefix runs (classify.py's lpm6): which ip6tables rules form them, what their tries hold,
and, on the real kernel with BPF_PROG_TEST_RUN, that a classified IPv6 chain gives the same
verdict and per-entry counters as the same chain compiled as linear code (itself checked against
the kernel by the IPv6 differential suites; the 10 000-rule comparison against the kernel is
tests/test_differential_ipv6_large.py)."""
import ipaddress
import os
import random
import struct

import pytest

from test_classify import Loaded, assert_same
from test_compile_ipv6_util import (NH_TCP, NH_UDP, frag, ipv6, nf_ctx6, rule6, table6,
                                    udp6)
from test_compile_util import ACCEPT, DROP, HOOKS, RETURN, jump, tcp, tcp_hdr
from bpfilter_umh import classify
from bpfilter_umh.model import Match

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF maps and programs")
BASE = int(ipaddress.IPv6Address("2001:db8::"))


def _addr(rnd) -> ipaddress.IPv6Address:
    """An address of 2001:db8::/32 with its bits at a few places only: prefixes nest often."""
    a = BASE
    for b in (33, 40, 47, 60, 64, 90, 111, 120, 127):
        if rnd.random() < 0.5:
            a |= 1 << (127 - b)
    return ipaddress.IPv6Address(a)


def _prefix_rule(rnd, field: str, acts):
    """A prefix rule whose address keeps bits outside its mask now and then (ip6tables masks
    them, a SET_REPLACE need not: ipv6_masked_addr_cmp ignores them)."""
    plen = rnd.choice([32, 34, 41, 48, 61, 64, 91, 112, 121, 128])
    net = ipaddress.IPv6Network(f"{_addr(rnd)}/{plen}", strict=False)
    addr = _addr(rnd) if rnd.random() < 0.2 else net.network_address
    r = rule6(rnd.choice(acts))
    if field == "src":
        r.ip.src, r.ip.smsk = addr, net.netmask
    else:
        r.ip.dst, r.ip.dmsk = addr, net.netmask
    return r


def random_table6(seed: int):
    rnd = random.Random(seed)
    va = [ACCEPT, DROP]
    rules = []
    for _ in range(4):
        field = rnd.choice(["src", "dst"])
        rules += [_prefix_rule(rnd, field, va) for _ in range(rnd.randrange(5, 40))]
        rules.append(rule6(ACCEPT, tcp(dport=(22, 22)), proto=6))      # a linear separator
    user = [_prefix_rule(rnd, "src", [ACCEPT, DROP, RETURN, RETURN]) for _ in range(30)] + \
        [_prefix_rule(rnd, "dst", [DROP, RETURN]) for _ in range(20)]
    rules.insert(rnd.randrange(len(rules)), rule6(jump("USER")))
    return table6({"INPUT": (rnd.choice(va), rules)}, {"USER": user})


def random_packets6(seed: int, n: int) -> list:
    rnd = random.Random(seed + 1000)
    out = []
    for _ in range(n):
        src, dst = str(_addr(rnd)), str(_addr(rnd))
        kind = rnd.random()
        if kind < 0.1:
            out.append(ipv6(src, dst, NH_UDP, b"x" * 24, [frag(16, False, 7)]))   # later fragment
        elif kind < 0.2:
            out.append(ipv6(src, dst, NH_TCP, tcp_hdr(4000, 22)))
        else:
            out.append(ipv6(src, dst, NH_UDP, udp6(5000, 53)))
    return out


class Loaded6(Loaded):
    def run(self, pkt) -> int:
        frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x86\xdd" + pkt
        return self.prog.test_run(frame, nf_ctx6(HOOKS["INPUT"]))[0]


# ---- shapes (pure) -------------------------------------------------------------------------

@pytest.mark.parametrize("r, shape", [
    (rule6(DROP, src="2001:db8::/32"), ("lpm6", "src")),
    (rule6(RETURN, dst="2001:db8:1::5/128"), ("lpm6", "dst")),
    (rule6(ACCEPT), ("lpm6", "src")),                          # ::/0: every packet, as IPv4's
    (rule6(ACCEPT, src="2001:db8::/32", dst="2001:db8::/48"), None),
    (rule6(ACCEPT, src="2001:db8::/32", proto=0), None),       # -p all: IP6T_F_PROTO walks
    (rule6(ACCEPT, src="2001:db8::/32", iniface="eth0"), None),
    (rule6(ACCEPT, src="2001:db8::/32", inv=0x08), None),      # ! -s
    (rule6(jump("u"), src="2001:db8::/32"), None),
    (rule6(DROP, Match("comment", 0, {"comment": b"x".ljust(256, b"\0")}),
           src="2001:db8::/32"), ("lpm6", "src")),
])
def test_ipv6_shapes(r, shape):
    assert classify.rule_shape(r) == shape


def test_noncontiguous_ipv6_mask_is_not_a_prefix():
    r = rule6(DROP)
    r.ip.src, r.ip.smsk = ipaddress.IPv6Address("2001:db8::"), \
        ipaddress.IPv6Address("ffff:ffff:ff00::ffff")
    assert classify.rule_shape(r) is None


def test_lpm6_values_are_first_match():
    """Every address: the trie's longest matching key names the first rule whose prefix holds
    the address (address bits outside a rule's mask ignored), as a walk of the rules does."""
    rnd = random.Random(3)
    rules = [_prefix_rule(rnd, "src", [ACCEPT, DROP, RETURN]) for _ in range(200)]
    run = classify.find_runs(rules, minimum=2)[0]
    assert run.kind == "lpm6" and len(run.rules) == 200
    trie = [(struct.unpack("<I", k[:4])[0], int.from_bytes(k[4:], "big"),
             struct.unpack("<II", v)) for k, v in classify.lpm6_entries(run)]
    for _ in range(2000):
        a = int(_addr(rnd))
        want = next((p for p, r in enumerate(rules)
                     if (a ^ int(r.ip.src)) & int(r.ip.smsk) == 0), None)
        best = max((t for t in trie if t[0] == 0 or a >> (128 - t[0]) == t[1] >> (128 - t[0])),
                   key=lambda t: t[0], default=None)
        assert (best[2][0] if best else None) == want


@root
@pytest.mark.parametrize("seed", range(int(os.environ.get("BPFILTER_CLASSIFY_SEEDS", "40"))))
def test_ipv6_classified_equals_linear(seed, monkeypatch):
    tbl = random_table6(seed)
    cls = Loaded6(tbl, monkeypatch, 4)
    lin = Loaded6(tbl, monkeypatch, 0)
    try:
        assert cls.cp.maps and not lin.cp.maps
        assert {m.kname for m in cls.cp.maps} == {"bpfilter_lpm6"}
        assert_same(lin, cls, random_packets6(seed, 400), seed)
    finally:
        cls.close()
        lin.close()
