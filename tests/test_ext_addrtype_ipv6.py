"""Issue #6, addrtype on ip6tables (revision 1): the address classes match_type6() takes from
ipv6_addr_type() (UNICAST, MULTICAST, UNSPEC; several types in one mask must ALL hold) against
the kernel's ip6tables-legacy with real packets through the IPv6 lab: same verdicts, same
counters on every entry (the lab's noise rules aside). The lab's security table observes only
2001:db8::/32 sources, so for the other sources the per-entry counters are the comparison:
every rule only counts except the last, whose DROP is seen for 2001:db8:1::2."""
import os

import pytest

from test_differential_ext_ipv6 import udp
from test_compile_ipv6_util import NH_UDP, ipv6
from test_differential_ipv6_lab import (C0, H0, S0, BpfilterFilter, KernelFilter, Lab6,
                                        blob_of, noise_entries, with_noise)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

RULES = ["-m addrtype --src-type UNICAST",
         "-m addrtype ! --src-type UNICAST",
         "-m addrtype --dst-type UNICAST",
         "-m addrtype ! --dst-type MULTICAST",
         "-m addrtype --src-type UNICAST,MULTICAST",          # both at once: never
         "-m addrtype ! --src-type UNICAST,UNSPEC",           # so its inverse: always
         "-m addrtype --src-type UNSPEC",
         "-m addrtype --dst-type UNICAST --limit-iface-in",
         "-p udp --dport 9 -m addrtype --src-type UNICAST -j DROP"]
OUT_RULES = [r.replace("--limit-iface-in", "--limit-iface-out") for r in RULES]


def _text():
    out = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for chain in ("INPUT", "FORWARD"):
        out += [f"-A {chain} {r}" for r in RULES]
    out += [f"-A OUTPUT {r}" for r in OUT_RULES]
    return with_noise("\n".join(out + ["COMMIT", ""]))


def _probes():
    """(name, where, packet): sources across ipv6_addr_type()'s classes (those a host takes in:
    ip6_rcv_core() drops multicast sources, the noise rules take ::)."""
    out = []
    for src in (C0, "fe80::2", "::5", "::1", "::ffff:192.0.2.9", "0:0:0:1::7", "fc00::9",
                "3fff::1"):
        for dport in (53, 9):
            for where, dst in (("in", H0), ("fwd", S0)):
                out.append((f"{where}:{src}:{dport}", where,
                            ipv6(src=src, dst=dst, nh=NH_UDP,
                                 payload=udp(src, dst, 1000, dport))))
    for dport in (53, 9):
        out.append((f"out:{dport}", "out", ipv6(src=H0, dst=C0, nh=NH_UDP,
                                                payload=udp(H0, C0, 1000, dport))))
    return out


def _run(installer, text, probes):
    with Lab6(installer) as lab:
        lab.load(text)
        outcomes = {name: lab.send(where, [p]) for name, where, p in probes}
        return outcomes, lab.filter.counters()


def test_addrtype6_against_kernel():
    text, probes = _text(), _probes()
    want_o, want_c = _run(KernelFilter, text, probes)
    got_o, got_c = _run(BpfilterFilter, text, probes)
    table = blob_of(text)
    skip = noise_entries(table)
    diffs = [f"{n}: kernel {want_o[n]} bpfilter {got_o[n]}" for n in want_o
             if want_o[n] != got_o[n]]
    diffs += [f"entry {i}: kernel {w} bpfilter {g}" for i, (w, g) in
              enumerate(zip(want_c, got_c)) if i not in skip and w != g]
    assert not diffs, "\n".join(diffs)
    hit = [i for i, c in enumerate(want_c) if c[0] and i not in skip]
    assert len(hit) >= 12, want_c
