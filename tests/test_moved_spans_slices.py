"""The spans of an append's moved chains (model._moved_spans): where the previous table's
chain firsts and ends are its chain starts (bounds) but the last and but the first, as _spans
makes them for a table iptables sends, the moved firsts and ends are taken as slices of the
moved bounds (model._firsts_ends_of_bounds) instead of two lists moved int by int. Here:
the slices are taken on a fan-out append (INPUT -j SVC, 60 service chains behind INPUT),
give exactly the spans the lists moved one by one give, and the decoded table equals the
cold decode's; any other layout of the lists is refused (the lists are then moved as
before). Without the kernel."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.model import AF_INET, AF_INET6, Rule, Verdict, decode_replace  # noqa: E402
from test_model_incremental import _blob, _buf, clear_caches  # noqa: E402
from test_model_moved import _appended, _cold, _fanout, _facts, _ip, _positions  # noqa: E402

DROP = -1


def _moved_one_by_one(p_spans, js, shift):
    """firsts and ends moved as _moved_spans moves them without the slices."""
    _sp, _t, _b, p_firsts, _bo, p_ends, _n, _h = p_spans
    k = js + 1
    return (p_firsts[:k] + [x - shift for x in p_firsts[k:]],
            p_ends[:js] + [x - shift for x in p_ends[js:]])


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_fanout_append_takes_the_slices_and_equals_cold(family, monkeypatch):
    t0 = _fanout(family)
    t1 = _appended(t0, Rule(_ip(family, 99), target=Verdict(DROP)))
    t2 = _appended(t1, Rule(_ip(family, 98), target=Verdict(DROP)))
    bufs = [_buf(*_blob(x)) for x in (t0, t1, t2)]
    want = [_cold(b, family) for b in bufs]
    calls = []
    real_moved, real_slices = model._moved_spans, model._firsts_ends_of_bounds

    def moved_spans(p_spans, nhead, first, shift, *rest):
        out = real_moved(p_spans, nhead, first, shift, *rest)
        calls.append((p_spans, shift, out))
        return out

    taken = []

    def slices(p_bounds, p_firsts, p_ends, lo, k, bounds):
        got = real_slices(p_bounds, p_firsts, p_ends, lo, k, bounds)
        taken.append(got[0] is not None)
        return got

    monkeypatch.setattr(model, "_moved_spans", moved_spans)
    monkeypatch.setattr(model, "_firsts_ends_of_bounds", slices)
    clear_caches()
    decode_replace(bufs[0], family)
    got = [decode_replace(b, family)[1] for b in bufs[1:]]
    # both appends moved the spans, each by slices of the moved bounds
    assert len(calls) == 2 and all(out is not None for _p, _s, out in calls)
    assert taken == [True, True]
    for p_spans, shift, ((_sp, tail, bounds, firsts, bodies, ends, _n, _h), js) in calls:
        lo = js + 1
        f1, e1 = _moved_one_by_one(p_spans, js, shift)
        assert (firsts, ends) == (f1, e1)
        assert bounds == p_spans[2][:lo] + [x - shift for x in p_spans[2][lo:]]
        assert firsts[-1] < ends[-1] == tail and len(firsts) == len(ends) == len(bodies)
    for g, exp in zip(got, want[1:]):
        assert g == exp and _facts(g) == _facts(exp)
        assert _positions(g) == _positions(exp)
        assert g.kept_blob == exp.kept_blob


def test_other_layouts_are_refused():
    bounds = [0, 3, 7, 9, 12]
    firsts, ends = bounds[:-1], bounds[1:]
    moved = [0, 3, 8, 10, 13]
    assert model._firsts_ends_of_bounds(bounds, firsts, ends, 2, 2, moved) == \
        (moved[:-1], moved[1:])
    # the moves of bounds and firsts start at different chains
    assert model._firsts_ends_of_bounds(bounds, firsts, ends, 1, 2, moved) == (None, None)
    # an entry before the first chain start: a span of its own ahead of the bounds
    assert model._firsts_ends_of_bounds(bounds[1:], [0] + bounds[1:-1], ends, 2, 2,
                                        moved[1:]) == (None, None)
    # a chain ending before the next one starts, or firsts not the bounds
    assert model._firsts_ends_of_bounds(bounds, firsts, [3, 7, 8, 12], 2, 2, moved) == \
        (None, None)
    assert model._firsts_ends_of_bounds(bounds, [0, 3, 6, 9], ends, 2, 2, moved) == \
        (None, None)
    # no final ERROR entry among the bounds: as many firsts as bounds
    assert model._firsts_ends_of_bounds(bounds[:-1], firsts, ends[:-1] + [12], 2, 2,
                                        moved[:-1]) == (None, None)
