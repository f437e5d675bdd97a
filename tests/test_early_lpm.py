"""A new built-in chain's trie made as soon as its runs are known (issue #7: a cold blocklist
restore's last wait is its trie's fill, started when the trie's MapSpec is made):
classify.early_lpm_maps, called by compile._program_key right after the chain's vectors, finds
the chain's runs and makes each long LPM run's MapSpec (so the engine starts its fill) before
the rest of the walk and the chain's compile; the compile takes those runs (classify.chain_runs).
What must hold:

  - during an engine install of a new blocklist, the trie's MapSpec is made before INPUT's
    compile starts, the compiled program holds that very MapSpec, and INPUT's runs are found
    once;
  - the compiled output is the one compile_table makes without an engine (no early maps);
  - an append (the chain's vectors made from the previous chain's) finds nothing early, and
    neither does a compile outside an install.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded, netns_engine  # noqa: E402

from bpfilter_umh import classify, engine  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

N = 2000


def _text(seed: int, extra: str = "") -> str:
    text = rulesets.make("blocklist", N, seed=seed).text.replace("-A FORWARD ", "-A INPUT ")
    if extra:
        head, sep, tail = text.rpartition("COMMIT")
        text = head + extra + "\n" + sep + tail
    return text


def _cold():
    for cache in (classify._RUN_SPECS, C._PROG_CACHE, classify._SEEN_RUNS):
        cache.clear()
    classify._VECS.clear()
    classify._LPM_SEEN.clear()


def _digest(programs) -> list:
    return [(p.name, repr(p.items), repr(p.maps)) for p in programs]


@pytest.fixture
def eng():
    _cold()
    with netns_engine("iel") as e:
        yield e


def _spy(monkeypatch):
    """[event] of the install: ("spec", MapSpec) when a trie's MapSpec is made,
    ("compile", chain name) when a chain's compile starts, ("runs", n rules) when find_runs
    looks at a long chain."""
    events = []
    real_start, real_compile, real_find = engine.Engine._start_fill, C._compile_chain, \
        classify.find_runs

    def start(self, spec):
        if spec.kname == "bpfilter_lpm":
            events.append(("spec", spec))
        return real_start(self, spec)

    def compile_chain(table, chain, *a, **kw):
        events.append(("compile", chain.name))
        return real_compile(table, chain, *a, **kw)

    def find_runs(rules, *a, **kw):
        if len(rules) >= N:
            events.append(("runs", len(rules)))
        return real_find(rules, *a, **kw)
    monkeypatch.setattr(engine.Engine, "_start_fill", start)
    monkeypatch.setattr(C, "_compile_chain", compile_chain)
    monkeypatch.setattr(classify, "find_runs", find_runs)
    return events


def test_trie_spec_made_before_the_chain_compiles(eng, monkeypatch):
    events = _spy(monkeypatch)
    eng.install(decoded(_text(41)))
    assert ("compile", "INPUT") in events
    first_spec = next(i for i, e in enumerate(events) if e[0] == "spec")
    assert first_spec < events.index(("compile", "INPUT")), events[:6]
    assert [e for e in events if e[0] == "runs"] == [("runs", N)], "INPUT's runs found twice"
    early = events[first_spec][1]
    used = [s for ct in eng._compiled_tables for p in ct.programs for s in p.maps
            if s.kname == "bpfilter_lpm"]
    assert used and all(s is early for s in used), "the program holds another MapSpec"
    assert classify._EARLY_RUNS is None


def test_early_maps_compile_the_same_program(eng):
    table = decoded(_text(42))
    eng.install(table)
    got = _digest(p for ct in eng._compiled_tables for p in ct.programs)
    _cold()
    want = C.compile_table(decoded(_text(42)), engine.kernel_facts(), eng.flavors_used[0])
    assert got == _digest(want.programs)


def test_append_and_plain_compiles_find_nothing_early(eng, monkeypatch):
    eng.install(decoded(_text(43)))
    made = []
    real = classify.early_lpm_maps

    def early_lpm_maps(rules, chain, vec):
        real(rules, chain, vec)
        made.extend(classify._EARLY_RUNS)
    monkeypatch.setattr(classify, "early_lpm_maps", early_lpm_maps)
    events = _spy(monkeypatch)
    eng.install(decoded(_text(43, "-A INPUT -s 192.0.2.7/32 -j DROP")))
    assert made == []
    assert [e for e in events if e[0] == "runs"] == [("runs", N + 1)]
    _cold()
    C.compile_table(decoded(_text(44)), engine.kernel_facts(), eng.flavors_used[0])
    assert made == []
