"""MARK (issue #6 item 2) on flavor tc, differential against kernel iptables-legacy: the program
writes __sk_buff->mark as xt_MARK.c mark_tg() writes skb->mark ((mark & ~mask) ^ value) and
continues, so a later -m mark in the same traversal sees the new mark. Every form iptables has
(--set-xmark, --set-mark, --and-mark, --or-mark, --xor-mark: all --set-xmark value/mask in the
revision-2 payload) is exercised, in INPUT, FORWARD and OUTPUT; verdicts of crafted probes and
every counter are compared (tests/lab.py differential()).

On flavor nf the ruleset is refused with EOPNOTSUPP naming the rule and suggesting tc
(tests/test_ext_targets.py); through the door iptables is told MARK revision 2 exists
(GET_REVISION), so the refusal comes from SET_REPLACE with that message, not from a missing
extension.
"""
import os
import sys

import pytest

from lab import Lab, differential, number
from test_differential_handwritten import P, table
from test_flavor_differential import FlavorLab, installer_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

RULES = """
    -A INPUT -p udp -m udp --dport 5000 -j MARK --set-xmark 0x5/0xff
    -A INPUT -p udp -m mark --mark 0x5/0xff -j DROP
    -A INPUT -p udp -m udp --dport 5001 -j MARK --or-mark 0x10
    -A INPUT -p udp -m udp --dport 5001 -j MARK --xor-mark 0x3
    -A INPUT -m mark --mark 0x13 -j ACCEPT
    -A INPUT -p udp -m udp --dport 5002 -j MARK --set-mark 0x7
    -A INPUT -p udp -m udp --dport 5002 -j MARK --and-mark 0x6
    -A INPUT -m mark --mark 0x6 -j DROP
    -A INPUT -m mark ! --mark 0x0 -j ACCEPT
    -A INPUT -p udp -m udp --dport 5005 -j DROP
    -A FORWARD -j MARK --set-xmark 0x100/0xf00
    -A FORWARD -p udp -m udp --dport 5003 -m mark --mark 0x100/0xf00 -j DROP
    -A FORWARD -m mark --mark 0x0 -j DROP
    -A OUTPUT -p udp -j MARK --set-mark 0x9
    -A OUTPUT -p udp -m udp --dport 5004 -m mark --mark 0x9 -j DROP
"""


def probes():
    return [P("INPUT", dport=d) for d in (5000, 5001, 5002, 5005, 5006)] + \
        [P("FORWARD", dport=d) for d in (5003, 5006)] + \
        [P("OUTPUT", dport=d) for d in (5004, 5007)]


@pytest.fixture(scope="module")
def tc_labs():
    with Lab(tag="r") as ref, FlavorLab(installer=installer_for("tc"), tag="m") as cand:
        yield ref, cand


def test_mark_then_match_differential(tc_labs):
    ref, cand = tc_labs
    diffs = differential(ref, cand, table(RULES), number(probes()))
    # documented tc difference (test_flavor_differential.py): an OUTPUT drop is EPERM to the
    # sender in the kernel (nf_hook_slow), silent at tc egress
    diffs = [d for d in diffs if not (d.startswith("probe OUTPUT") and
                                      d.endswith("kernel: seen at send:EPERM  "
                                                 "bpfilter-tc: dropped"))]
    assert diffs == [], "\n".join(diffs)


def test_mark_refused_on_nf_through_the_door(netns):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(netns.env, PYTHONPATH=root, BPFILTER_IDLE_EXIT="1")
    cli = [sys.executable, "-m", "bpfilter_umh.cli"]
    try:
        p = netns.run(cli + ["exec", "--", "iptables-legacy", "-A", "FORWARD", "-j", "MARK",
                             "--set-mark", "7"], env=env, check=False)
        assert p.returncode == 1
        assert "Operation not supported" in p.stderr, p.stderr
    finally:
        netns.run(cli + ["flush"], env=env, check=False)
