"""Session 8, round 3 (issue #7: a restore over the loaded table with one rule changed, as
kube-proxy's periodic full sync does): classify.lpm_entries takes an LPM run's trie keys and first
positions from the run compiled before (_LPM_SEEN) when the rules that changed kept their
prefixes, and reads only the values again. The maps so compiled must be byte-equal to a cold
compile of the changed table:

  - the last rule's verdict turned (what bench/ruleset_bench.py's one_changed does);
  - the verdict of a /8 that is the first match of many longer prefixes after it turned (many
    entries change their value);
  - one rule's prefix changed (the columns must be built again, not reused);

and a deliberately broken reuse (columns taken from any seen run of the same length, the
changed rules' prefixes not compared) must be caught by the same comparison.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rulesets  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.engine import kernel_facts  # noqa: E402

N = 3000
WIDE = "-A INPUT -s 10.0.0.0/8 -j DROP"


def _cold():
    for d in (C._PROG_CACHE, classify._FN_CACHE, classify._RUN_SPECS, classify._SEEN_RUNS,
              classify._MEMO, classify._CLASSES, classify._LAYOUTS, classify._LAYOUT_OF):
        d.clear()
    classify._VECS.clear()
    classify._LPM_SEEN.clear()


def _maps(tab) -> list:
    """[(name, type, key size, value size, flags, entries)] of every program's maps."""
    out = []
    for cp in C.compile_table(tab, kernel_facts(), "nf").programs:
        for m in cp.maps:
            out.append((cp.chain, m.name, m.map_type, m.key_size, m.value_size, m.flags,
                        list(m.entries)))
    return out


def _lpm_entry_count(maps) -> int:
    return sum(len(m[6]) for m in maps if m[2] == classify.BPF_MAP_TYPE_LPM_TRIE)


@pytest.fixture(scope="module")
def texts():
    """The blocklist with a /8 a third of the way in (before longer 10.x prefixes), and its
    variants: {name: restore text}."""
    lines = rulesets.make("blocklist", N).text.splitlines()
    rules = [i for i, l in enumerate(lines) if l.startswith("-A ")]
    lines.insert(rules[len(rules) // 3], WIDE)
    base = "\n".join(lines) + "\n"
    last = max(i for i, l in enumerate(lines)
               if l.startswith("-A ") and ("-j DROP" in l or "-j ACCEPT" in l))
    turned = lines[last].replace("-j DROP", "-j ACCEPT") if "-j DROP" in lines[last] else \
        lines[last].replace("-j ACCEPT", "-j DROP")
    moved = [i for i in rules[len(rules) // 2:] if "/24 " in lines[i]][0]
    net = lines[moved].split()[3]

    def variant(i, line):
        out = list(lines)
        out[i] = line
        return "\n".join(out) + "\n"
    wide_at = lines.index(WIDE)
    return {
        "base": base,
        "last_turned": variant(last, turned),
        "wide_turned": variant(wide_at, WIDE.replace("DROP", "ACCEPT")),
        "prefix_moved": variant(moved, lines[moved].replace(net, "198.51.100.0/24")),
    }


@pytest.fixture(scope="module")
def tables(texts):
    return {k: decoded(v) for k, v in texts.items()}


def _warm_then(tables, name, monkeypatch):
    """(the maps of `name` compiled right after the base table, _lpm_columns calls in that
    compile), then the maps of `name` compiled cold."""
    _cold()
    _maps(tables["base"])
    calls = []
    real = classify._lpm_columns

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(classify, "_lpm_columns", spy)
    warm = _maps(tables[name])
    monkeypatch.setattr(classify, "_lpm_columns", real)
    _cold()
    return warm, len(calls), _maps(tables[name])


@pytest.mark.parametrize("name", ["last_turned", "wide_turned"])
def test_verdict_turned_reuses_columns_and_is_a_cold_compile(tables, name, monkeypatch):
    warm, calls, cold = _warm_then(tables, name, monkeypatch)
    assert _lpm_entry_count(cold) > N // 2
    assert calls == 0                 # the trie keys and positions came from the base's run
    assert warm == cold


def test_wide_turned_changes_many_values(tables, monkeypatch):
    """The /8's verdict is the value of the longer 10.x prefixes after it: the check above
    compares maps where many values differ from the base's."""
    _cold()
    base = _maps(tables["base"])
    _cold()
    turned = _maps(tables["wide_turned"])
    diff = sum(a != b for m, t in zip(base, turned) for a, b in zip(m[6], t[6]))
    assert diff > 10


def test_prefix_moved_builds_columns_again(tables, monkeypatch):
    warm, calls, cold = _warm_then(tables, "prefix_moved", monkeypatch)
    assert calls > 0
    assert warm == cold


def test_broken_reuse_is_caught(tables, monkeypatch):
    """Columns reused from any seen run of the field and length (the changed rules' prefixes
    not compared): the moved prefix's table gets the base's trie keys."""
    def broken(run, field):
        for seen in reversed(classify._LPM_SEEN):
            if seen.field == field and len(seen.codes) == len(run.rules):
                return classify._LpmSeen(field, getattr(run, "keys", None), seen.codes,
                                         seen.lpm_keys, seen.bests)
        return None
    monkeypatch.setattr(classify, "_lpm_seen_like", broken)
    warm, _, cold = _warm_then(tables, "prefix_moved", monkeypatch)
    assert warm != cold
