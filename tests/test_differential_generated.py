"""Differential suite, generated: seeded random rulesets (user chains, jumps, gotos, RETURNs,
every ipt_ip field and inversion, tcp/udp/icmp matches) and probes aimed at their rules; the
kernel's iptables-legacy and bpfilter must deliver/drop every probe alike and end with the same
packet and byte counters on every entry.

    pytest tests/test_differential_generated.py                      200 seeds (0..199)
    BPFILTER_DIFF_SEEDS=1000 BPFILTER_DIFF_SEED_BASE=5000 pytest ...   other seeds
    BPFILTER_LAB_CANDIDATE=kernel pytest ...                          kernel vs kernel
A failure prints the seed, the ruleset, each differing probe and counter, each differing probe
replayed alone, and (for the first BPFILTER_DIFF_SHRINK=3 failures) the smallest ruleset that
still differs for one probe: a minimal reproduction to hand to whoever owns the bug.
"""
import os

import pytest

import rulegen
from lab import differential, shrink
from labfixtures import labs  # noqa: F401  (fixture)

N = int(os.environ.get("BPFILTER_DIFF_SEEDS", "200"))
BASE = int(os.environ.get("BPFILTER_DIFF_SEED_BASE", "0"))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def minimal_reproductions(ref, cand, case, diffs, limit=3) -> list:
    """Replay each differing probe alone on the same ruleset; keep the ones that still differ."""
    out = []
    for p in [p for p in case.probes if any(d.startswith(f"probe {p.describe()}\n") for d in diffs)]:
        if len(out) >= limit:
            break
        d = differential(ref, cand, case.text(), [p])
        if any(line.startswith("probe") for line in d):
            out.append("alone, still differs:\n" + "\n".join("  " + x for x in d))
    return out


@pytest.mark.parametrize("seed", range(BASE, BASE + N))
def test_generated_ruleset(seed, labs):
    ref, cand = labs
    case = rulegen.generate(seed)
    diffs = differential(ref, cand, case.text(), case.probes)
    if diffs:
        msg = [f"seed {seed} (rerun: BPFILTER_DIFF_SEED_BASE={seed} BPFILTER_DIFF_SEEDS=1 "
               f"pytest tests/test_differential_generated.py)", case.text()] + diffs
        msg += minimal_reproductions(ref, cand, case, diffs)
        if _shrinks_left[0] > 0:          # shrinking costs seconds: only the first failures
            _shrinks_left[0] -= 1
            probes = [p for p in case.probes if any(d.startswith(f"probe {p.describe()}\n")
                                                     for d in diffs)][:1]
            msg += ["smallest ruleset still differing" + (f" for {probes[0].describe()}"
                                                          if probes else "") + ":",
                    shrink(ref, cand, case.text(), probes)]
        pytest.fail("\n".join(msg), pytrace=False)


_shrinks_left = [int(os.environ.get("BPFILTER_DIFF_SHRINK", "3"))]


@pytest.mark.parametrize("seed", range(BASE, BASE + min(N, 40)))
def test_generated_ruleset_conditions_ored(seed, labs, monkeypatch):
    """The same rulesets with no rule's first condition short-circuiting (a program's entries
    past _ChainCompiler.SHORT_CIRCUIT_MAX: every condition ORed into one test): the same
    outcome and counters as the kernel's."""
    from bpfilter_umh import compile as C
    monkeypatch.setattr(C._ChainCompiler, "SHORT_CIRCUIT_MAX", 0)
    ref, cand = labs
    case = rulegen.generate(seed)
    diffs = differential(ref, cand, case.text(), case.probes)
    if diffs:
        pytest.fail("\n".join([f"seed {seed}, conditions ORed", case.text()] + diffs[:20]),
                    pytrace=False)


BIG_N = int(os.environ.get("BPFILTER_DIFF_BIG_SEEDS", "10"))
BIG_LIMIT = 45       # seconds per case: the kernel's own iptables takes well under one


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(BIG_N))
def test_generated_big_ruleset(seed, labs):
    """Larger tables (40-90 rules, 5-8 user chains, nested jumps and gotos): same outcome and
    counters, within BIG_LIMIT seconds for the whole case."""
    import signal

    def too_slow(*_):
        raise TimeoutError(f"case took more than {BIG_LIMIT} s")
    ref, cand = labs
    case = rulegen.generate(seed, big=True)
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(BIG_LIMIT)
    try:
        diffs = differential(ref, cand, case.text(), case.probes)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if diffs:
        pytest.fail("\n".join([f"big seed {seed} (rerun: pytest -m slow "
                                f"'tests/test_differential_generated.py::test_generated_big_ruleset[{seed}]')",
                                case.text()] + diffs[:20]), pytrace=False)
