"""Generated differential test of the extension-header walk: seeded random chains of hop-by-hop,
routing, fragment (first and later), AH and destination-options headers in front of UDP, TCP,
ICMPv6, NEXTHDR_NONE or an unknown protocol, sometimes cut short at a random byte, sent
client -> host (INPUT), client -> server (FORWARD) and host -> client (OUTPUT) through the kernel's ip6tables and through
bpfilter's engine with the same ruleset of protocol/port/type rules and counting rules. What passes
each hook and every entry's counters must be identical (ipv6_find_hdr's results, its -EBADMSG /
-ENOENT hotdrops and the fragment offsets all show in them).

The seed is fixed so a failure reproduces; BPFILTER_IPV6_SEED=<n> explores another one."""
import os
import random

import pytest

from test_compile_ipv6_util import (NH_AUTH, NH_DEST, NH_FRAG, NH_HOP, NH_ICMP6, NH_NONE,
                                    NH_ROUTING, NH_TCP, NH_UDP, auth, frag, icmp6_hdr, ipv6, opts,
                                    routing, udp6)
from test_compile_util import tcp_hdr
from test_differential_ipv6_lab import (C0, H0, S0, BpfilterFilter, KernelFilter, Lab6, blob_of,
                                        noise_entries, with_noise)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

SEED = int(os.environ.get("BPFILTER_IPV6_SEED", "20261128"))
N_PROBES = 40               # per direction

_RULES = """-A {c} -p udp -m udp --dport 53 -j DROP
-A {c} -p tcp -m tcp --dport 80 -j ACCEPT
-A {c} -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j DROP
-A {c} -p 59
-A {c} -p 253 -j DROP
-A {c} ! -p udp
-A {c} -p 60
-A {c} -p all -j ACCEPT
-A {c} -j DROP
"""
RULESET = with_noise("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                     + "".join(_RULES.format(c=c) for c in ("INPUT", "FORWARD", "OUTPUT"))
                     + "COMMIT\n")


def _exthdr(rng):
    kind = rng.choice([NH_HOP, NH_DEST, NH_ROUTING, NH_AUTH, NH_FRAG, NH_FRAG])
    if kind in (NH_HOP, NH_DEST):
        return opts(kind, rng.choice([0, 0, 1, 3]))
    if kind == NH_ROUTING:
        return routing(0, rng.choice([0, 1, 2]))
    if kind == NH_AUTH:
        return auth(rng.choice([1, 4]))
    return frag(rng.choice([0, 0, 8, 64]), rng.random() < 0.5, rng.randrange(1 << 16))


def _upper(rng):
    nh = rng.choice([NH_UDP, NH_UDP, NH_TCP, NH_ICMP6, NH_NONE, 253])
    body = {NH_UDP: lambda: udp6(rng.randrange(1, 65536), rng.choice([53, 54, 8])),
            NH_TCP: lambda: tcp_hdr(1000, rng.choice([80, 81]), 0x02),
            NH_ICMP6: lambda: icmp6_hdr(rng.choice([128, 129, 1]), 0),
            NH_NONE: lambda: b"",
            253: lambda: b"opaque!!"}[nh]()
    return nh, body


def probes():
    rng = random.Random(SEED)
    out = []
    for where, (src, dst) in (("in", (C0, H0)), ("fwd", (C0, S0)), ("out", (H0, C0))):
        for k in range(N_PROBES):
            hdrs = [_exthdr(rng) for _ in range(rng.choice([0, 1, 1, 2, 3, 5]))]
            nh, body = _upper(rng)
            pkt = ipv6(src=src, dst=dst, nh=nh, payload=body, exthdrs=hdrs)
            if rng.random() < 0.2 and len(pkt) > 41:          # cut at a random byte
                cut = rng.randrange(41, len(pkt))
                pkt = pkt[:4] + (cut - 40).to_bytes(2, "big") + pkt[6:cut]
            out.append((f"{where}:{k}", where, [pkt]))
    return out


PROBES = probes()


def run_lab(installer):
    with Lab6(installer) as lab:
        lab.load(RULESET)
        outcomes = {name: lab.send(where, pkts) for name, where, pkts in PROBES}
        return outcomes, lab.filter.counters()


_KERNEL = {}


@pytest.mark.parametrize("runs", [False, True], ids=["linear", "port-runs"])
def test_generated_exthdr_chains_against_kernel(runs, monkeypatch):
    """runs: the two port rules at the top of each chain as one hash lookup (classify.py
    hash6, BPFILTER_CLASSIFY_MIN_RUN=2): its walk, fragment and truncated-header checks met by
    every probe before any port is read."""
    from bpfilter_umh import classify
    monkeypatch.setenv("BPFILTER_CLASSIFY_MIN_RUN", "2" if runs else "0")
    table = blob_of(RULESET)
    kinds = {r.kind for c in table.chains for r in classify.find_runs(c.rules)}
    assert kinds == ({"hash6"} if runs else set()), kinds
    if "k" not in _KERNEL:
        _KERNEL["k"] = run_lab(KernelFilter)
    want_out, want_cnt = _KERNEL["k"]
    got_out, got_cnt = run_lab(BpfilterFilter)
    assert len(got_cnt) == len(want_cnt) == len(table.entries())
    diffs = [f"{n} ({pk[0].hex()}): kernel {want_out[n]} bpfilter {got_out[n]}"
             for n, _, pk in PROBES if want_out[n] != got_out[n]]
    skip = noise_entries(table)
    diffs += [f"entry {i}: kernel {w} bpfilter {g}"
              for i, (w, g) in enumerate(zip(want_cnt, got_cnt)) if i not in skip and w != g]
    assert not diffs, f"seed {SEED}:\n" + "\n".join(diffs)
    # meaningful: several rules hit per chain, and some probes hotdropped (counted nowhere)
    hit = [i for i, c in enumerate(want_cnt) if c[0] and i not in skip]
    assert len(hit) >= 10, hit
