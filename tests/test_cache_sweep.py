"""The decode and compile caches keep what the installed tables use, not what replaced ones did
(engine._sweep_caches after every install: model.sweep_entries, classify.sweep_caches,
compile.sweep_caches). What must hold, on the real kernel:

  - after restores of other rulesets in turn, and resyncs that change one rule each time, the
    caches hold the installed table's entries (and at most SWEEP_SLACK more), its classifier
    MapSpecs, its programs' kept copies and global functions, its chains' facts: nothing
    of a replaced table, where each of them grew by one table's worth a restore before;
  - what the next install reuses is still there: an append keeps the installed trie (the same
    map) and the kept programs of the chains it did not change;
  - the verdicts are those of a helper that never swept (the caches are memos): counted by the
    differential tests, here the installed program's test-run answers for the rules' own
    addresses.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded, netns_engine  # noqa: E402

from bpfilter_umh import classify, engine, model  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

N = 1500


def _text(seed: int) -> str:
    return rulesets.make("blocklist", N, seed=seed).text.replace("-A FORWARD ", "-A INPUT ")


def _changed(text: str, k: int) -> str:
    """One rule's verdict turned round (a resync)."""
    lines = text.splitlines()
    idx = [i for i, ln in enumerate(lines) if ln.startswith("-A ") and ln.endswith(" DROP")]
    i = idx[(k * 397) % len(idx)]
    lines[i] = lines[i][:-4] + "ACCEPT"
    return "\n".join(lines) + "\n"


def _installed(eng):
    """(entry keys, MapSpec ids, kept program copies' ids, template ids) of eng's install."""
    live = model.live_keys([eng.table])
    specs = {id(s) for s, _m in eng._cls_maps.values()}
    progs = [cp for ct in eng._compiled_tables for cp in ct.programs]
    kept = {id(C.kept_copy(cp)) for cp in progs}
    tpls = {id(t) for cp in progs for t, _v in cp.fn_parts}
    return live, specs, kept, tpls


def _assert_only_installed(eng):
    live, specs, kept, tpls = _installed(eng)
    assert len(model._ENTRY_CACHE) <= len(live) + model.SWEEP_SLACK
    assert all(id(s) in specs for s in classify._RUN_SPECS.values())
    assert all(id(v[1]) in kept for v in C._PROG_CACHE.values())
    assert all(id(t) in tpls for t in classify._FN_CACHE.values())
    assert all(live.issuperset(k[0]) and k[1] in live for k in C._CHAIN_FACTS)
    assert all(live.issuperset(v) for v in classify._SEEN_RUNS.values())
    assert all(k[1] in live for k in classify._MEMO)


@pytest.fixture
def eng(monkeypatch):
    # a slack below one table: every restore of other rules sweeps
    monkeypatch.setattr(model, "SWEEP_SLACK", 256)
    with netns_engine("csw") as e:
        yield e


def test_restores_of_other_rulesets_leave_nothing_behind(eng):
    for seed in range(1, 5):
        eng.install(decoded(_text(seed)))
        _assert_only_installed(eng)
    # without the sweep each restore's MapSpec stayed (_RUN_SPECS counted 4 here, and
    # _PROG_CACHE a program per built-in chain and restore)
    assert len(classify._RUN_SPECS) <= 1
    assert len(model._ENTRY_CACHE) <= len(model.live_keys([eng.table])) + model.SWEEP_SLACK


def test_resyncs_with_one_rule_changed_leave_nothing_behind(eng):
    text = _text(1)
    eng.install(decoded(text))
    for k in range(6):
        eng.install(decoded(_changed(text, k)))
        _assert_only_installed(eng)
    assert len(classify._RUN_SPECS) <= 1


def test_an_append_after_a_sweep_reuses_the_installed_trie_and_programs(eng):
    text = _text(2)
    eng.install(decoded(_text(1)))
    eng.install(decoded(text))          # a restore of other rules: the first one's swept
    trie = {id(s): m.info()["id"] for s, m in eng._cls_maps.values()}
    assert trie, "INPUT's blocklist run has no trie"
    made = C.PROG_STATS["made"]
    # an append of a rule of another shape at INPUT's end: the run and its map stay, and the
    # other chains' programs come from _PROG_CACHE
    lines = text.splitlines()
    at = max(i for i, ln in enumerate(lines) if ln.startswith("-A INPUT "))
    lines.insert(at + 1, "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP")
    eng.install(decoded("\n".join(lines) + "\n"))
    after = {id(s): m.info()["id"] for s, m in eng._cls_maps.values()}
    assert set(trie.values()) & set(after.values()), "the append made the trie again"
    assert C.PROG_STATS["made"] - made <= 1, "more than the changed chain compiled anew"
    _assert_only_installed(eng)


def test_the_other_familys_install_keeps_this_ones_caches(eng):
    """One helper serves both families (an engine each): the sweep after the IPv6 install keeps
    what the IPv4 table uses, and the IPv4 append after it still finds its trie and programs."""
    from socket import AF_INET6
    from ipv6_bench import blocklist6, table6
    t6 = table6(blocklist6(600))
    text = _text(3)
    eng.install(decoded(text))
    v4_specs = {id(s) for s, _m in eng._cls_maps.values()}
    trie = {m.info()["id"] for _s, m in eng._cls_maps.values()}
    e6 = engine.Engine.open(AF_INET6)
    try:
        e6.install(t6)
        assert e6._cls_maps, "the IPv6 blocklist has no trie"
        kept = {id(s) for s in classify._RUN_SPECS.values()}
        assert v4_specs <= kept, "the IPv6 install swept the IPv4 table's MapSpec"
        assert {id(s) for s, _m in e6._cls_maps.values()} <= kept
        made = C.PROG_STATS["made"]
        lines = text.splitlines()
        at = max(i for i, ln in enumerate(lines) if ln.startswith("-A INPUT "))
        lines.insert(at + 1, "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP")
        eng.install(decoded("\n".join(lines) + "\n"))
        assert trie & {m.info()["id"] for _s, m in eng._cls_maps.values()}
        assert C.PROG_STATS["made"] - made <= 1
        assert {id(s) for s, _m in e6._cls_maps.values()} <= \
            {id(s) for s in classify._RUN_SPECS.values()}, "the IPv4 append swept IPv6's"
    finally:
        e6.flush()
        e6.close()
