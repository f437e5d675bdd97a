"""REJECT and LOG on flavor tc (issue #6 item 2), differential against kernel iptables-legacy:
the program (tc ingress for INPUT/FORWARD, egress for OUTPUT) counts the rule, records the same
event as flavor nf (read with bpf_skb_load_bytes) and drops (REJECT) or continues (LOG); the
same responder answers. Compared as in test_target_reject.py / test_target_log.py.

A FORWARD rule on tc runs at ingress, before ip_forward() decrements the TTL; the event says so
and the responder applies ip_decrease_ttl() to the header it quotes and logs, so the ICMP error's
quote and the LOG line's TTL= equal the kernel's (the first version masked them: they differed).
"""
import os
import socket

import pytest

import test_target_log as TL
import test_target_reject as TR
from lab import Lab
from test_flavor_differential import FlavorLab, installer_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


@pytest.fixture(scope="module")
def tc_loaded():
    with open(TL.ALL_NETNS) as f:
        old = f.read().strip()
    with open(TL.ALL_NETNS, "w") as f:
        f.write("1")
    try:
        with Lab(tag="r") as ref, FlavorLab(installer=installer_for("tc"), tag="t") as cand:
            logs = [ln for ln in TL.ruleset().splitlines()
                    if ln.startswith("-A") and "-j LOG" in ln and "--log-uid" not in ln]
            text = TR.ruleset().replace("*filter\n", "*filter\n" + "\n".join(logs) + "\n")
            for lab in (ref, cand):
                lab.load(text)
            yield ref, cand
    finally:
        with open(TL.ALL_NETNS, "w") as f:
            f.write(old)


@pytest.mark.parametrize("dst", [TR.HOST, TR.SERVER], ids=["INPUT", "FORWARD"])
def test_tcp_reset_on_tc(tc_loaded, dst):
    pkt = TR.syn(dst, 40010, 23, 0x01020304, 0x02)
    ref, cand = (TR.exchange(lab, pkt, dst, socket.IPPROTO_TCP) for lab in tc_loaded)
    assert len(ref) == 1, ref
    assert [TR.masked(r) for r in cand] == [TR.masked(r) for r in ref]


@pytest.mark.parametrize("dst", [TR.HOST, TR.SERVER], ids=["INPUT", "FORWARD"])
@pytest.mark.parametrize("kind", TR.V4_TYPES)
def test_icmp_error_on_tc(tc_loaded, dst, kind):
    pkt = TR.udp(dst, 41010, TR.PORT0 + TR.V4_TYPES.index(kind), b"tc " * 30)
    ref, cand = (TR.exchange(lab, pkt, dst, socket.IPPROTO_ICMP) for lab in tc_loaded)
    assert len(ref) == 1, ref
    assert [TR.masked(r) for r in cand] == [TR.masked(r) for r in ref]


@pytest.mark.parametrize("case", ["tcp options, sequence, ip options", "tcp plain", "icmp echo",
                                  "forward, --log-macdecode"])
def test_log_line_on_tc(tc_loaded, case):
    send, n = TL.CASES[case]
    got = []
    for lab in tc_loaded:
        k = TL.Kmsg()
        try:
            send(lab)
            got.append(k.lines(n))
        finally:
            k.close()
    ref, cand = got
    assert len(ref) == n and len(cand) == n, (ref, cand)
    for (lr, tr), (lc, tc) in zip(ref, cand):
        assert lc == lr
        fr, fc = tr.split(" "), tc.split(" ")
        assert fc == fr, f"\n{tr}\n{tc}"


def test_counters_on_tc(tc_loaded):
    ref, cand = tc_loaded
    assert cand.counters() == ref.counters()
