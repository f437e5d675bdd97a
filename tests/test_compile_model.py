"""Random rulesets and packets: the compiled nf programs (BPF_PROG_TEST_RUN) against a reference
interpreter of ipt_do_table written here in plain Python from net/ipv4/netfilter/ip_tables.c and
net/netfilter/xt_tcpudp.c. Verdicts and every entry's counters must agree.

The reference is independent of the compiler's code (no shared helpers beyond the model), so a
misreading of the kernel in one is likely to show as a disagreement."""
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsutil import Netns
from test_compile_util import (ACCEPT, DROP, RETURN, NF_DROP, Runner, goto, icmp,
                               icmp_hdr, ipv4, jump, rule, table, tcp, tcp_hdr, udp, udp_hdr)
from bpfilter_umh.model import Jump, Verdict, XT_RETURN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads BPF programs")

NETS = ["0.0.0.0/0", "192.0.2.0/24", "192.0.2.1/32", "192.0.2.128/25", "198.51.100.0/24"]
ADDRS = ["192.0.2.1", "192.0.2.2", "192.0.2.200", "198.51.100.7"]
PORTS = [(0, 65535), (53, 53), (80, 80), (1000, 2000), (2000, 1000), (0, 1023)]
IFACES = ["", "lo", "l+", "eth0", "+"]
OPTS = [b"", b"\x02\x04\x05\xb4", b"\x01\x01\x03\x03\x07\x00", b"\x08\x0a" + bytes(8),
        b"\x05\x00\x02\x04\x05\xb4"]


# ---- the reference: ipt_do_table over parsed packet fields ------------------------------------

def parse(pkt: bytes) -> dict:
    ihl = (pkt[0] & 0xf) * 4
    l4 = pkt[ihl:]
    return dict(saddr=pkt[12:16], daddr=pkt[16:20], proto=pkt[9],
                fragoff=struct.unpack("!H", pkt[6:8])[0] & 0x1fff, l4=l4, len=len(pkt))


def ip_match(ip, p, indev: bytes, outdev: bytes) -> bool:
    def inv(flag, cond):
        return cond ^ bool(ip.invflags & flag)
    src = bytes(a & b for a, b in zip(p["saddr"], ip.smsk.packed))
    dst = bytes(a & b for a, b in zip(p["daddr"], ip.dmsk.packed))
    if inv(0x08, src != ip.src.packed) or inv(0x10, dst != ip.dst.packed):
        return False
    for dev, name, mask, flag in ((indev, ip.iniface, ip.iniface_mask, 0x01),
                                  (outdev, ip.outiface, ip.outiface_mask, 0x02)):
        ret = any((d ^ n) & m for d, n, m in zip(dev.ljust(16, b"\0"), name, mask))
        if inv(flag, ret):
            return False
    if ip.proto and inv(0x40, p["proto"] != ip.proto):
        return False
    if inv(0x20, bool(ip.flags & 1) and not p["fragoff"]):
        return False
    return True


class HotDrop(Exception):
    pass


def match_ok(m, p) -> bool:
    d = m.data
    if m.name == "tcp":
        if p["fragoff"]:
            if p["fragoff"] == 1:
                raise HotDrop
            return False
        th = p["l4"]
        if len(th) < 20:
            raise HotDrop
        sport, dport = struct.unpack("!HH", th[:4])
        if not (d["spts"][0] <= sport <= d["spts"][1]) ^ bool(d["invflags"] & 1):
            return False
        if not (d["dpts"][0] <= dport <= d["dpts"][1]) ^ bool(d["invflags"] & 2):
            return False
        if not ((th[13] & d["flg_mask"]) == d["flg_cmp"]) ^ bool(d["invflags"] & 4):
            return False
        if d["option"]:
            doff = th[12] >> 4
            if doff * 4 < 20:
                raise HotDrop
            optlen = doff * 4 - 20
            invert = bool(d["invflags"] & 8)
            if not optlen:
                return invert
            if len(th) < 20 + optlen:
                raise HotDrop
            op = th[20:20 + optlen] + th[20 + optlen:21 + optlen]
            i = 0
            while i < optlen:
                if op[i] == d["option"]:
                    return not invert
                if op[i] < 2:
                    i += 1
                else:
                    i += (op[i + 1] if i + 1 < len(op) else 0) or 1
            return invert
        return True
    if m.name == "udp":
        if p["fragoff"]:
            return False
        if len(p["l4"]) < 8:
            raise HotDrop
        sport, dport = struct.unpack("!HH", p["l4"][:4])
        return ((d["spts"][0] <= sport <= d["spts"][1]) ^ bool(d["invflags"] & 1)) and \
            ((d["dpts"][0] <= dport <= d["dpts"][1]) ^ bool(d["invflags"] & 2))
    if m.name == "icmp":
        if p["fragoff"]:
            return False
        if len(p["l4"]) < 8:
            raise HotDrop
        t, c = p["l4"][0], p["l4"][1]
        return (d["type"] == 0xFF or (t == d["type"] and d["code"][0] <= c <= d["code"][1])) \
            ^ bool(d["invflags"] & 1)
    raise AssertionError(m.name)


def do_table(t, chain_name: str, pkt: bytes, counted: dict, outdev=b"lo", indev=b"") -> int:
    """ipt_do_table: walk entries with a jump stack; count matching entries."""
    p = parse(pkt)
    flat = []                                  # (chain, position) per entry
    for c in t.chains:
        for i, r in enumerate(c.rules + [c.policy_entry]):
            flat.append((c, i, r))
    pos = {id(r): k for k, (_, _, r) in enumerate(flat)}
    start = t.chain(chain_name)
    underflow = pos[id(start.policy_entry)]
    k = pos[id(start.rules[0] if start.rules else start.policy_entry)]
    stack = []
    for _ in range(10000):
        c, i, r = flat[k]
        try:
            ok = ip_match(r.ip, p, indev, outdev) and all(match_ok(m, p) for m in r.matches)
        except HotDrop:
            return NF_DROP
        if not ok:
            k += 1
            continue
        pc, bc = counted.get(r.index, (0, 0))
        counted[r.index] = (pc + 1, bc + len(pkt))
        tg = r.target
        if isinstance(tg, Verdict):
            if tg.verdict != XT_RETURN:
                return -tg.verdict - 1
            k = underflow if not stack else stack.pop() + 1
            continue
        assert isinstance(tg, Jump)
        if not tg.goto:
            stack.append(k)
        tc = t.chain(tg.chain)
        k = pos[id(tc.rules[0] if tc.rules else tc.policy_entry)]
    raise AssertionError("no verdict")


# ---- random tables and packets ----------------------------------------------------------------

@st.composite
def a_rule(draw, chains_after):
    proto = draw(st.sampled_from([0, 1, 6, 17]))
    ms = []
    if proto == 6 and draw(st.integers(0, 3)):
        ms.append(tcp(sport=draw(st.sampled_from(PORTS)), dport=draw(st.sampled_from(PORTS)),
                      flags=draw(st.sampled_from([(0, 0), (0x17, 0x02), (0x12, 0x12)])),
                      option=draw(st.sampled_from([0, 0, 2, 3, 8])), inv=draw(st.integers(0, 15))))
    if proto == 17 and draw(st.integers(0, 3)):
        ms.append(udp(sport=draw(st.sampled_from(PORTS)), dport=draw(st.sampled_from(PORTS)),
                      inv=draw(st.integers(0, 3))))
    if proto == 1 and draw(st.integers(0, 3)):
        ms.append(icmp(draw(st.sampled_from([0, 3, 8, 0xFF])),
                       draw(st.sampled_from([(0, 255), (0, 0), (1, 3)])), inv=draw(st.integers(0, 1))))
    targets = [ACCEPT, DROP, RETURN]
    targets += [jump(c) for c in chains_after] + [goto(c) for c in chains_after]
    return rule(draw(st.sampled_from(targets)), *ms,
                src=draw(st.sampled_from(NETS)), dst=draw(st.sampled_from(NETS)), proto=proto,
                outiface=draw(st.sampled_from(IFACES)), frag=draw(st.booleans()) and not ms,
                inv=draw(st.sampled_from([0, 0, 0x08, 0x10, 0x02, 0x40, 0x20, 0x7f])) & ~(
                    0x40 if ms else 0))


@st.composite
def a_table(draw):
    names = ["u0", "u1", "u2"][:draw(st.integers(0, 3))]
    user = {n: draw(st.lists(a_rule(names[i + 1:]), max_size=3)) for i, n in enumerate(names)}
    out = draw(st.lists(a_rule(names), max_size=5))
    return table({"OUTPUT": (draw(st.sampled_from([ACCEPT, DROP])), out)}, user)


@st.composite
def a_packet(draw):
    proto = draw(st.sampled_from([1, 6, 17, 50]))
    if proto == 6:
        l4 = tcp_hdr(draw(st.sampled_from([53, 80, 1500, 3000])), draw(st.sampled_from([53, 80, 1500])),
                     draw(st.sampled_from([0x02, 0x12, 0x10])), options=draw(st.sampled_from(OPTS)))
    elif proto == 17:
        l4 = udp_hdr(draw(st.sampled_from([53, 80, 1500, 3000])), draw(st.sampled_from([53, 80, 1500])))
    elif proto == 1:
        l4 = icmp_hdr(draw(st.sampled_from([0, 3, 8])), draw(st.sampled_from([0, 1, 3, 4])))
    else:
        l4 = bytes(12)
    cut = draw(st.sampled_from([None, None, 4, 12]))
    if cut is not None:
        l4 = l4[:cut]
    frag = draw(st.sampled_from([0, 0, 1, 2]))
    return ipv4(src=draw(st.sampled_from(ADDRS)), dst=draw(st.sampled_from(ADDRS)), proto=proto,
                payload=l4 if not frag else bytes(16), frag_off=frag,
                mf=draw(st.booleans()))


@pytest.fixture(scope="module")
def ns():
    with Netns("model") as n:
        yield n


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(t=a_table(), packets=st.lists(a_packet(), min_size=1, max_size=8))
def test_compiled_matches_reference(ns, t, packets):
    want = {}
    with ns.inside(), Runner(t) as run:
        for pkt in packets:
            expect = do_table(t, "OUTPUT", pkt, want)
            assert run.run("OUTPUT", pkt) == expect, (pkt.hex(), expect)
        got = {i: c for i, c in enumerate(run.counters()) if c != (0, 0)}
    assert got == want
