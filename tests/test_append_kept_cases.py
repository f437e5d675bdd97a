"""The first append to INPUT after a fan-out's restore: what it no longer reads per case chain
(session 19, issue #7).

classify._moved_bodies takes the hub run's shared bodies kept by the restore's compile when
every case chain moved with the hub (placed_by). It used to read each case's chain position
from the kept rules on that first append (kept.cps: 3 333 targets, ~3.1M instructions) and to
test the positions for None, min and max and look each chain up on every append (~2.4M). Now
the restore's compile keeps the positions _walked_bodies read (walked_cps), finds them after
its reply (a helper's: model._defer) to be one range of the table's chains (_cover_of: a
fan-out's case chains follow one another, sorted by name, so not in the hub's order), and
every append slices that range.
model._hooked_after's list of the built-in chains is the leading range where iptables puts
them (_hooked_of), not a comprehension over every chain.

Checked: the kept positions are the rules' own after the restore, their range is found after
its reply, the append takes the kept bodies through the range and compiles as a cold decode;
_cover_of's and _hooked_of's answers on the layouts they take and the ones they turn down.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_model_incremental import clear_caches  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import model  # noqa: E402


def _kept_of(table):
    got = [v for k, v in classify.kept_of(table).items() if k[0] == "bodies"]
    assert len(got) == 1
    return got[0]


def test_first_append_takes_the_kept_cases_as_one_range(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    from test_compile_kept import _clear, _programs
    from test_compile_lazy import _code, _first_append_texts, _hits
    from test_cplane_scale import decoded
    from bpfilter_umh.compile import KernelFacts
    from bpfilter_umh import engine
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    base, first = _first_append_texts(True)
    clear_caches()
    _clear()
    hits = _hits(monkeypatch)
    # a helper's queue of the work after its reply (model._defer goes there)
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    restored = decoded(base)
    _programs(restored, facts)
    kept = _kept_of(restored)
    # the restore's compile kept each case's chain position, as the rules have it
    assert kept.cps is not None
    assert kept.cps == [r.target.chain_pos for r in map(kept.rules.__getitem__, kept.by_k)]
    # and their range is found after the reply
    assert kept.span is None
    engine.run_after_reply()
    lo, hi = kept.span
    assert sorted(kept.cps) == list(range(lo, hi))
    # (the case chains sorted by name: one range, not in the hub's order)
    assert kept.cps != sorted(kept.cps)
    classify._FN_CACHE.clear()
    t = decoded(first)
    warm = _programs(t, facts)
    engine.run_after_reply()
    assert hits == [False, True]
    assert kept.span == (lo, hi)
    assert model.placed_by(t.chains[lo:hi], model.placement(t.chain("SVC")))
    clear_caches()
    _clear()
    cold = _programs(decoded(first), facts)
    assert _code(warm) == _code(cold)


def test_cover_of():
    assert classify._cover_of([5, 3, 4, 6]) == (3, 7)
    assert classify._cover_of([0]) == (0, 1)
    # (a repeat with a range as long: the slice asks of one chain more, never less)
    assert classify._cover_of([3, 3, 5]) == (3, 6)
    for cps in ([], [3, 5], [3, None, 4], [None], [-1, 0], [2, 2]):
        assert classify._cover_of(cps) is False, cps


@pytest.mark.parametrize("hooks", [
    [], [None, None], [0, 1, 2], [1, 2, 3, None, None, None], [0, None, 4, None],
    [None, 1, 2], [1, -1, None, None], [1, None, None, 3], [1, None, -1]])
def test_hooked_of(hooks):
    assert model._hooked_of(hooks) == [k for k, h in enumerate(hooks) if h is not None]
    for js in range(-1, len(hooks)):
        assert model._hooked_after(hooks, js) == \
            [k for k, h in enumerate(hooks) if h is not None and k > js]


def test_placed_range_answers_as_placed_by(monkeypatch):
    """model.placed_range of the chains an append to INPUT moved whole (the last run _build
    made _MovedChains of: the hub and its case chains) without a look at each, and as placed_by
    for any other range, and for every range once one of those chains is made."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    from test_compile_lazy import _first_append_texts
    from test_cplane_scale import decoded
    base, first = _first_append_texts(True)
    clear_caches()
    decoded(base)
    t = decoded(first)
    chains, _places, lo, hi, pos = t._moved_whole
    assert chains is t.chains and pos is model.placement(t.chain("SVC"))
    assert [c.name for c in t.chains[:lo]] == ["INPUT", "FORWARD", "OUTPUT"]
    assert hi == len(t.chains)
    asked = []
    real = model.placed_by
    monkeypatch.setattr(model, "placed_by", lambda cs, p: asked.append(len(cs)) or real(cs, p))
    ranges = [(lo, hi), (lo + 5, hi - 5), (lo - 1, hi), (0, 3), (lo, lo)]
    got = [model.placed_range(t, a, b, pos) for a, b in ranges]
    assert got == [real(t.chains[a:b], pos) for a, b in ranges] == [True, True, False, False,
                                                                    True]
    assert asked == [hi - lo + 1, 3]            # only the ranges outside the run
    # one of them made (its entries read): the run is no longer taken whole
    k = lo + 7
    assert len(t.chains[k].rules) > 0
    got = [model.placed_range(t, a, b, pos) for a, b in ranges + [(lo, k), (k + 1, hi)]]
    assert got == [real(t.chains[a:b], pos) for a, b in ranges + [(lo, k), (k + 1, hi)]] == \
        [False, False, False, False, True, True, True]
