"""What a decode derives from the entries an append moves whole (issue #7: `iptables -A INPUT`
ahead of a fan-out moves 16 000 entries): model._Memo keeps their offsets and the indexes of
the jumps, chain heads and returns among them as the previous decode's lists and a move
(model._ShiftedInts), joined in C, not as new ints a table; _mark_again reads them without
making the lists. They must read as the lists a cold decode makes.
"""
import bisect
import os
import random
import sys
from socket import AF_INET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.model import _ShiftedInts  # noqa: E402

EXTRA = "-A INPUT -s 203.0.113.{k}/32 -p udp -m udp --dport 4 -j DROP"


def test_shifted_ints_read_as_lists():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.choice([3, 70, 400])
        p = sorted(rng.sample(range(0, 9000), n))
        plain, got = list(p), p
        for _ in range(rng.randrange(1, 5)):
            head = rng.randrange(0, len(plain) + 1)
            tail = rng.randrange(head, len(plain) + 1)
            mid = sorted(rng.sample(range(9000, 9100), rng.randrange(0, 3)))
            d = rng.choice([0, 1, 2, -1, 112, -112])
            plain = plain[:head] + mid + [x + d for x in plain[tail:]]
            got = model._spliced_ints(got, head, mid, tail, d)
            if type(got) is _ShiftedInts:
                # read alone, before anything makes the list
                fresh = _ShiftedInts(got.src, got.t, got.d)
                for a in range(-2, len(plain) + 2, 7):
                    for b in range(a, len(plain) + 3, 5):
                        assert fresh[a:b] == plain[a:b], (a, b)
                assert [fresh[k] for k in range(len(plain))] == plain
                assert fresh._all is None
            assert list(got) == plain and got == plain and len(got) == len(plain)
            assert [got[k] for k in range(-len(plain), len(plain))] == plain + plain
            for a in range(-2, len(plain) + 2, 7):
                for b in range(a, len(plain) + 3, 5):
                    assert got[a:b] == plain[a:b], (a, b)
            assert got[::2] == plain[::2]
            ks = [rng.randrange(0, len(plain)) for _ in range(20)] if plain else []
            assert model._values_at(got, ks) == [plain[k] for k in ks]
            if plain == sorted(plain):
                for x in range(-3, 9300, 41):
                    assert model._bisect_left(got, x) == bisect.bisect_left(plain, x), x
            ends = model._ends_of(got, 10 ** 6)
            assert list(ends) == plain[1:] + [10 ** 6]
            if n >= 2 * model.SHIFTED_FROM and d and len(plain) - tail >= model.SHIFTED_FROM:
                assert type(got) is _ShiftedInts


def test_verdicts_of_shifted_jumps():
    class R:
        def __init__(self, v):
            self.verdict = v
    raws = [R(10 * i) for i in range(500)]
    jumps = model._spliced_ints(list(range(0, 400, 3)), 10, [40], 12, 2)
    assert type(jumps) is _ShiftedInts
    assert model._verdicts_of(raws, jumps) == [raws[j].verdict for j in list(jumps)]


def _memo():
    return model._LAST_WALK[AF_INET][4]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")
@pytest.mark.parametrize("layout", ["FORWARD", "INPUT"])
def test_appends_keep_the_moved_entries_moved(layout):
    text = rulesets.make("fanout", 1200, seed=5).text
    if layout == "INPUT":
        text = text.replace("-A FORWARD ", "-A INPUT ")
    model._LAST_WALK.clear()
    tables = [decoded(text)]
    for k in range(3):
        text = text.replace("COMMIT", EXTRA.format(k=90 + k) + "\nCOMMIT")
        tables.append(decoded(text))
        walk = model._LAST_WALK[AF_INET]
        memo = walk[4]
        assert type(memo.offs) is _ShiftedInts and type(walk[2]) is _ShiftedInts
        assert all(type(x) is _ShiftedInts for x in memo.kinds)
        # nothing made them into lists: moves and joins only
        assert memo.offs._all is None and all(x._all is None for x in memo.kinds)
        assert model.moved_from(tables[-1]) is not None
        warm = (list(memo.offs), [list(x) for x in memo.kinds], list(walk[2]),
                list(memo.lands), list(memo.marks))
        saved = dict(model._LAST_WALK)
        model._LAST_WALK.clear()
        model._ENTRY_CACHE.clear()
        cold_t = decoded(text)
        walk = model._LAST_WALK[AF_INET]
        memo = walk[4]
        assert warm == (list(memo.offs), [list(x) for x in memo.kinds], list(walk[2]),
                        list(memo.lands), list(memo.marks)), k
        assert tables[-1] == cold_t and tables[-1].kept_blob == cold_t.kept_blob
        assert [r.offset for r in tables[-1].entries()] == list(memo.offs)
        model._LAST_WALK.clear()
        model._LAST_WALK.update(saved)
