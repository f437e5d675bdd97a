"""Differential suite at 10 000 rules (issue #7): for every large-ruleset shape of bench/rulesets.py
(prefix blocklist, port list, 5-tuples, mixed shapes, kube-proxy fan-out), the kernel's
iptables-legacy and bpfilter get the same iptables-restore text and the same probes through the
lab's veth pairs, and must deliver/drop every probe alike and end with identical packet and byte
counters on every one of the entries. The probes are aimed at overlapping rules (nested prefixes,
repeated ports and flows), so first-match order matters, and include fragments and truncated
headers where the shape has tcp/udp matches.

    pytest tests/test_differential_large.py                 N = 10 000
    BPFILTER_LARGE_N=1000 pytest tests/test_differential_large.py
"""
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from lab import differential, number  # noqa: E402
from labfixtures import labs  # noqa: E402,F401  (fixture)

N = int(os.environ.get("BPFILTER_LARGE_N", "10000"))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


@pytest.mark.parametrize("shape", rulesets.SHAPES)
def test_large_ruleset(shape, labs):
    ref, cand = labs
    rs = rulesets.make(shape, N, seed=1)
    probes = number(rs.probes + [rs.miss])
    t0 = time.monotonic()
    diffs = differential(ref, cand, rs.text, probes)
    took = time.monotonic() - t0
    assert not diffs, f"{shape} x {N} rules:\n" + "\n".join(diffs[:40])
    c = cand.counters()
    hit = sum(1 for k, v in c.items() if v[0])
    assert hit >= 5, f"{shape}: only {hit} entries counted anything: the probes missed the rules"
    print(f"{shape} x {N}: identical ({len(probes)} probes, {hit} entries counted), {took:.1f} s")
