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


# ---- appends to a classified run (classify._keep_seen_runs) -----------------------------------

def _aimed(chain: str):
    """A probe no rule of any shape matches (192.0.2.0/24 sources are not in the rulesets),
    which reaches the chain in the lab."""
    from probes import IPPROTO_UDP, Probe
    dst = rulesets.INPUT_DST if chain == "INPUT" else "198.51.100.77"
    return Probe(chain, "c0", "192.0.2.10", dst, IPPROTO_UDP, 1024, 1999)


def _appended(shape: str, chain: str, m) -> list:
    """Rules of the run's own shape aimed at probe `m` (so they decide its verdict)."""
    if shape == "blocklist":
        return [f"-A {chain} -s {m.src}/32 -j DROP", f"-A {chain} -s 192.0.2.0/24 -j ACCEPT"]
    if shape == "ports":
        return [f"-A {chain} -p udp -m udp --dport {m.dport} -j DROP",
                f"-A {chain} -p udp -m udp --dport {m.dport + 1} -j ACCEPT"]
    five = f"-s {m.src}/32 -d {m.dst}/32 -p udp -m udp --sport {m.sport}"
    return [f"-A {chain} {five} --dport {m.dport} -j DROP",
            f"-A {chain} {five} --dport {m.dport + 1} -j ACCEPT"]


@pytest.mark.parametrize("shape", ["blocklist", "ports", "tuple", "mixed"])
def test_appends_to_a_run(shape, labs):
    """`iptables -A` twice after a large classified run: the candidate installs the run it
    already has (same map) plus the new rules as linear code, and must still give the kernel's
    verdicts and counters, the appended rules deciding one probe."""
    from bpfilter_umh import classify
    ref, cand = labs
    rs = rulesets.make(shape, min(N, 2000), seed=7)
    aimed = _aimed(rs.chain)
    probes = number(rs.probes + [aimed])
    extra = _appended(shape, rs.chain, aimed)
    for k in range(len(extra) + 1):
        text = rs.text.replace("COMMIT", "".join(x + "\n" for x in extra[:k]) + "COMMIT")
        diffs = differential(ref, cand, text, probes)
        assert not diffs, f"{shape} + {k} appended:\n" + "\n".join(diffs[:40])
        table = getattr(cand.installer, "table", None)
        if k and table is not None:         # EngineInstaller: the table it installed
            rules = table.chain(rs.chain).rules
            runs = classify.find_runs(rules)
            assert runs and runs[-1].end == len(rules) - k, \
                f"{shape}: the appended rules joined the run (its map was rebuilt)"
    first = sum(1 for x in rs.lines if x.startswith(f"-A {rs.chain} "))
    assert cand.counters()[(rs.chain, first)][0], "the appended rule did not count its probe"


# ---- a large chain no run takes: linear code past the verifier's jump-sequence limit ------------

def _iface_chain(n: int) -> tuple:
    """(restore text, probes) of rulesets.iface_chain(n), the probes numbered."""
    rs = rulesets.iface_chain(n)
    return rs.text, number(rs.probes)


def test_large_linear_chain(labs):
    """N rules that stay linear code, two conditions each, cut into global functions of about
    stretch.PIECE_RULES rules (stretch.py: each verified once, on its own). Before the pieces,
    the verifier walked every rule's match path first and kept each branch it did not take on
    a stack of at most 8 192 (BPF_COMPLEXITY_LIMIT_JMP_SEQ): 10 000 such rules were refused
    (EFAULT) after 17 s of verification, and with the conditions ORed past
    _ChainCompiler.SHORT_CIRCUIT_MAX rules loaded in 17-20 s. The kernel's verdicts and
    counters."""
    ref, cand = labs
    text, probes = _iface_chain(N)
    t0 = time.monotonic()
    diffs = differential(ref, cand, text, probes)
    took = time.monotonic() - t0
    assert not diffs, f"iface chain x {N} rules:\n" + "\n".join(diffs[:40])
    hit = sum(1 for k, v in cand.counters().items() if v[0])
    assert hit >= 6, f"only {hit} entries counted anything: the probes missed the rules"
    print(f"iface chain x {N}: identical ({len(probes)} probes, {hit} entries counted), "
          f"{took:.1f} s")
