"""An append ahead of (or behind) a kube-proxy-style hub, decoded warm, against the cold decode
(no kernel):

- model._mark_again checks that every jump names the offset of the entry it lands on; the
  jumps of a hub (consecutive entries of one size and target_offset) all landing behind the
  change, or all before it, are checked as one block: their verdict words in the blob are
  those of the previous blob plus the size change, or plus 0 (_hub_lands_moved,
  _verdicts_moved), the other jumps one by one. A hub jump retargeted (only its verdict
  differs, so _reusable reuses the entry) fails the block, and the decode is the cold one;
- _equal_but_moved finds the hub's block of consecutive jumps in place (_consecutive_in);
- the previous walk's leftovers go with the previous table, not inside the decode
  (_free_with_table);
- the built-in chains behind the change are found once per spans' hooks list
  (_hooked_after), not by testing each of the chains behind it.
"""
from __future__ import annotations

import copy
import os
import random
import sys
import weakref

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.model import AF_INET, AF_INET6, Jump, decode_replace  # noqa: E402
from test_append_runs import (  # noqa: E402
    HUB, _appended, _as_libiptc, _drop_src, _fanout, _warm_equals_cold)
from test_model_incremental import _blob, _buf, clear_caches  # noqa: E402


def _jump_counts(monkeypatch):
    """(what _hub_lands_moved answered, how many jumps it was given) per call."""
    calls = []
    raw = model._hub_lands_moved

    def spy(raws, jumps, *a):
        got = raw(raws, jumps, *a)
        calls.append((got, len(jumps)))
        return got
    monkeypatch.setattr(model, "_hub_lands_moved", spy)
    return calls


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_hub_behind_an_append_is_checked_as_one_block(family, monkeypatch):
    """Appends to INPUT move FORWARD's jump, the hub and the service chains: the hub's jumps
    (every jump but FORWARD's) are checked as one block, landing behind the change."""
    t0 = _fanout(family)
    t1 = _appended(t0, family, 1)
    t2 = _appended(t1, family, 2)
    bufs = [_buf(*_blob(t0)), _as_libiptc(_blob(t1), family), _as_libiptc(_blob(t2), family)]
    calls = _jump_counts(monkeypatch)
    _warm_equals_cold(bufs, family, monkeypatch)
    assert calls == [(1, HUB + 1), (1, HUB + 1)], calls


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_hub_ahead_of_the_change_is_checked_as_one_block(family, monkeypatch):
    """A (conditional: no return) rule appended to the last service chain: the hub lies
    before the change and every jump lands before it (offsets unchanged): one block, moved
    by 0."""
    t0 = _fanout(family)
    t1 = copy.deepcopy(t0)
    last = t1.chains[-1]
    assert last.name == f"SVC-{HUB - 1}"
    last.rules.append(_drop_src(7, family))
    bufs = [_buf(*_blob(t0)), _as_libiptc(_blob(t1), family)]
    calls = _jump_counts(monkeypatch)
    _warm_equals_cold(bufs, family, monkeypatch)
    assert calls == [(1, HUB + 1)], calls


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_retargeted_hub_jump_fails_the_block(family, monkeypatch):
    """An append and one hub jump sent to another service chain (its entry differs only in
    the verdict, so _reusable reuses it with the new one): the block compare fails, the jumps
    are compared one by one, the walk is marked again from scratch, and the decode (landings,
    comefrom of the chain no longer reached) is the cold one."""
    t0 = _fanout(family)
    t1 = _appended(t0, family, 1)
    t1.chain("SVC").rules[HUB // 2].target = Jump("SVC-3")
    bufs = [_buf(*_blob(t0)), _as_libiptc(_blob(t1), family)]
    calls = _jump_counts(monkeypatch)
    warm = _warm_equals_cold(bufs, family, monkeypatch)
    assert calls == [(HUB + 1, HUB + 1)], calls
    svc = warm[1].chain("SVC")
    assert svc.rules[HUB // 2].target.chain == "SVC-3"
    assert warm[1].chain(f"SVC-{HUB // 2}").rules[0].comefrom == 0


def test_verdicts_moved():
    size, n = 12, 40
    rng = random.Random(7)
    words = [rng.randrange(1, 1 << 30) for _ in range(n)]

    def laid(ws, at=8):
        buf = bytearray(at + size * n + 4)
        for i, w in enumerate(ws):
            buf[at + size * i:at + size * i + 4] = w.to_bytes(4, "little", signed=True)
        return bytes(buf)
    old = laid(words)
    for d in (0, 200, -200, -1):
        assert model._verdicts_moved(old, 8, laid([w + d for w in words], 16), 16, size, n, d)
    bad = [w + 200 for w in words]
    bad[n // 2] += 1
    assert not model._verdicts_moved(old, 8, laid(bad), 8, size, n, 200)
    # a negative word (not a jump offset) fails, even where its carry makes the sums equal:
    # 0xffffffff + 1 is 0 in its word and carries one into the next (4 + 1 + 1 == 6, where
    # word by word 4 + 1 != 6)
    old2 = laid([-1, 4] + words[2:])
    new2 = laid([0, 6] + [w + 1 for w in words[2:]])
    assert not model._verdicts_moved(old2, 8, new2, 8, size, n, 1)
    assert not model._verdicts_moved(new2, 8, old2, 8, size, n, -1)


def test_consecutive_in():
    rng = random.Random(3)
    for _ in range(2000):
        xs = sorted(rng.sample(range(40), rng.randrange(0, 15)))
        lo = rng.randrange(0, len(xs) + 1)
        hi = rng.randrange(lo, len(xs) + 1)
        want = next(k for k in range(lo, hi + 1)
                    if all(xs[i] + 1 == xs[i + 1] for i in range(k, hi - 1)))
        assert model._consecutive_in(xs, lo, hi) == want, (xs, lo, hi)
        if len(xs) > 2:
            t = rng.randrange(len(xs))
            shifted = model._ShiftedInts(xs[:t] + [x - 100 for x in xs[t:]], t, 100)
            assert model._consecutive_in(shifted, lo, hi) == want


def test_previous_walk_goes_with_its_table():
    """The walk a decode took over from the previous one (its memo, raws list) lives as long
    as the previous table, and goes with it."""
    family = AF_INET
    t0 = _fanout(family)
    t1 = _appended(t0, family, 1)
    buf = _as_libiptc(_blob(t1), family)
    clear_caches()
    first = decode_replace(_buf(*_blob(t0)), family)[1]
    memo = weakref.ref(model._LAST_WALK[family][4])
    second = decode_replace(buf, family)[1]
    assert memo() is not None
    del first
    assert memo() is None
    assert second.chain("INPUT").rules


def test_hooked_after():
    """The built-in chains behind chain js, from the spans' hooks column: found once per
    hooks list (a moved table keeps the previous one's), each list its own."""
    a = [1, 2, 3, None, None, 0, None]
    assert model._hooked_after(a, 0) == [1, 2, 5]
    assert model._hooked_after(a, 2) == [5]
    assert model._hooked_after(a, 5) == []
    b = [None, 0, None, None, 2, -1]
    assert model._hooked_after(b, 0) == [1, 4, 5]
    assert model._hooked_after(a, 3) == [5]
    got = model._hooked_after(b, 1)
    got.append(99)                      # the answer is the caller's own list
    assert model._hooked_after(b, 1) == [4, 5]
