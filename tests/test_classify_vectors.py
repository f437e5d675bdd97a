"""classify.vectors (issue #7): a long chain's per-rule facts kept as lists between compiles,
taken from the chain seen before where a prefix and a suffix of its rules are the same. find_runs
and the compiled programs must be exactly what asking every rule gives (vectors off:
VEC_MIN above any chain), across edits of a table compiled before: a rule appended, one
inserted at the top, one deleted in the middle, one changed, for every ruleset shape.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def _variants(text: str, chain: str) -> list:
    lines = [ln for ln in text.splitlines() if ln.startswith(f"-A {chain} ")]
    extra = f"-A {chain} -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"
    same = lines[-1]                                  # a rule of the last run's shape
    mid = lines[len(lines) // 2]
    flip = mid.rsplit(" -j ", 1)[0] + " -j " + ("ACCEPT" if mid.endswith("DROP") else "DROP")
    return [text,
            text.replace("COMMIT", extra + "\nCOMMIT"),
            text.replace("COMMIT", same.replace("-j ", "-m comment --comment x -j ") +
                         "\nCOMMIT"),
            text.replace(lines[0], extra + "\n" + lines[0]),
            text.replace(mid + "\n", "", 1),
            text.replace(mid, flip, 1)]


def _code(table, facts) -> dict:
    out = {}
    for cp in compile_table(table, facts).programs:
        fds = {COUNTERS_MAP: 3, **{m.name: 4 + k for k, m in enumerate(cp.maps)}}
        out[cp.chain] = (cp.assemble(fds), [(m.name, m.entries) for m in cp.maps])
    return out


@pytest.mark.parametrize("shape", ["blocklist", "ports", "tuple", "mixed"])
def test_vectors_equal_asking_each_rule(monkeypatch, shape):
    rs = rulesets.make(shape, 1200, seed=11)
    facts = KernelFacts.fake()
    tables = [decoded(t) for t in _variants(rs.text, rs.chain)]
    classify._VECS.clear()
    for k, t in enumerate(tables):
        rules = t.chain(rs.chain).rules
        classify._SEEN_RUNS.clear()
        fast = classify.find_runs(rules)
        assert classify.vectors(rules) is not None
        C._PROG_CACHE.clear()
        classify._SEEN_RUNS.clear()
        fast_code = _code(t, facts)
        with monkeypatch.context() as m:
            m.setattr(classify, "VEC_MIN", 1 << 30)
            classify._SEEN_RUNS.clear()
            slow = classify.find_runs(rules)
            C._PROG_CACHE.clear()
            classify._SEEN_RUNS.clear()
            slow_code = _code(t, facts)
        assert fast == slow, f"{shape} variant {k}"
        # the form (split or bitmap) and the shapes with their positions; the cost is the
        # choice's, made in _with_multi (the lists decide from _multi_cost alone)
        assert [classify._run_form(r)[:2] if r.kind == "multi" else None for r in fast] == \
            [classify._run_form(r)[:2] if r.kind == "multi" else None for r in slow], \
            f"{shape} variant {k}"
        assert fast_code == slow_code, f"{shape} variant {k}"
