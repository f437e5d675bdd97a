"""The reused entries behind an append (issue #7: `iptables -A INPUT` ahead of a fan-out's hub
and its 3 333 service chains): model._reusable compares the old entries between the head and
the common suffix with the blob in one run when the first of them is the same moved
(_moved_alike), instead of runs of growing length (eight comparisons over the hub's jumps), and
falls back to those runs where that one run is not equal; the common suffix of the kept blob
and the blob, which _restored_over reads too, is found once. The decode must be the cold one.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.model import Chain, _MovedChain  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

EXTRA = "-A INPUT -s 203.0.113.{k}/32 -p udp -m udp --dport 4 -j DROP"


def _fanout(n=1200, seed=5):
    return rulesets.make("fanout", n, seed=seed).text


def _cold(text):
    model._LAST_WALK.clear()
    model._ENTRY_CACHE.clear()
    return decoded(text)


def _same_table(warm, cold):
    """Every entry where the cold decode has it, with its bytes, position and comefrom, and
    the bytes GET_ENTRIES would show."""
    a, b = warm.entries(), cold.entries()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.cache_key, x.index, x.offset, x.comefrom) == \
            (y.cache_key, y.index, y.offset, y.comefrom), y.index
    assert warm.kept_blob == cold.kept_blob
    assert warm == cold


class _Spy:
    """Records model._equal_but_moved's moved runs (lo, hi, delta) and what _reusable
    returned (len(head), len(tail))."""

    def __init__(self, monkeypatch):
        self.runs, self.cuts, self.suffixes = [], [], 0
        ebm, reu, suf = model._equal_but_moved, model._reusable, model._common_suffix

        def equal_but_moved(old, blob, raws, ends, jumps, lo, hi, delta, *a):
            got = ebm(old, blob, raws, ends, jumps, lo, hi, delta, *a)
            if delta:
                self.runs.append((lo, hi, got))
            return got

        def reusable(*a, **k):
            head, tail = reu(*a, **k)
            self.cuts.append((len(head), len(tail)))
            return head, tail

        def common_suffix(a, b):
            self.suffixes += 1
            return suf(a, b)
        monkeypatch.setattr(model, "_equal_but_moved", equal_but_moved)
        monkeypatch.setattr(model, "_reusable", reusable)
        monkeypatch.setattr(model, "_common_suffix", common_suffix)


def test_append_ahead_of_a_hub_compares_it_in_one_run(monkeypatch):
    text = _fanout()
    model._LAST_WALK.clear()
    decoded(text)
    spy = _Spy(monkeypatch)
    done = []
    for k in range(2):
        text = text.replace("COMMIT", EXTRA.format(k=90 + k) + "\nCOMMIT")
        spy.runs.clear()
        spy.suffixes = 0
        warm = decoded(text)
        # INPUT's policy, FORWARD, OUTPUT and the hub's 400 jumps (the service chains behind
        # it are the common suffix): one run, equal
        assert len(spy.runs) == 1, spy.runs
        lo, hi, ok = spy.runs[0]
        assert ok and hi - lo > 400, spy.runs
        # the common suffix found once, not again by _reusable after _restored_over
        assert spy.suffixes == 1
        head, tail = spy.cuts[-1]
        assert head + 1 + tail == len(warm.entries())   # the new rule alone walked
        done.append((text, warm))
    monkeypatch.undo()
    for text, warm in done:
        _same_table(warm, _cold(text))


def test_a_region_changed_inside_falls_back_to_growing_runs(monkeypatch):
    """An append to INPUT and a changed hub rule in one blob: the region's first entry is the
    same moved, the one run over it is not equal, and the runs of growing length then find the
    tail up to the changed rule, as before; the decode is the cold one."""
    text = _fanout()
    model._LAST_WALK.clear()
    decoded(text)
    hub = [ln for ln in text.splitlines() if ln.startswith("-A SVC ")]
    k = len(hub) // 2
    new = text.replace(hub[k], hub[k].replace("--dport", "--sport")).replace(
        "COMMIT", EXTRA.format(k=90) + "\nCOMMIT")
    spy = _Spy(monkeypatch)
    warm = decoded(new)
    assert spy.runs[0][2] is False and spy.runs[0][1] - spy.runs[0][0] > 400, spy.runs
    assert any(ok for _lo, _hi, ok in spy.runs[1:])
    head, tail = spy.cuts[-1]
    monkeypatch.undo()
    cold = _cold(new)
    _same_table(warm, cold)
    # the tail: every entry after the changed hub rule
    assert tail == len(cold.entries()) - cold.chain("SVC").rules[k].index - 1


def test_a_rule_grown_at_the_region_start_takes_no_whole_run(monkeypatch):
    """An INPUT rule replaced by a longer one ahead of the hub: the old entry where the region
    starts is not the same moved, so no run over the whole region is tried (the runs grow from
    16, as before)."""
    text = _fanout(600)
    first = next(ln for ln in text.splitlines() if ln.startswith("-A FORWARD "))
    short = "-A INPUT -p udp -j DROP"
    text = text.replace(first, short + "\n-A INPUT -p tcp -j DROP\n" + first)
    model._LAST_WALK.clear()
    decoded(text)
    new = text.replace(short, "-A INPUT -p udp -m udp --dport 5 -j DROP", 1)
    spy = _Spy(monkeypatch)
    warm = decoded(new)
    assert spy.runs and spy.runs[0][1] - spy.runs[0][0] == 16, spy.runs
    monkeypatch.undo()
    _same_table(warm, _cold(new))


def test_placed_by():
    pos, other = ([], [], [], []), ([], [], [], [])
    src = Chain("SVC-1")
    made = object.__new__(_MovedChain)
    made.name, made._src, made._at, made._pos = "SVC-1", None, 7, None
    unmade = object.__new__(_MovedChain)
    unmade.name, unmade._src, unmade._at, unmade._pos = "SVC-1", src, 7, pos
    assert model.placed_by([unmade, unmade], pos)
    assert model.placed_by([], pos)
    assert not model.placed_by([unmade], other)
    assert not model.placed_by([unmade, made], pos)
    assert not model.placed_by([unmade, src], pos)
    assert not model.placed_by([src], pos)
