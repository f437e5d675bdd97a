"""A walk taken moved from the previous table's (issue #7: an append ahead of a fan-out's hub
and 3 333 service chains): compile._moved_program_key and compile._walk_behind keep the moved
bases (compile._MovedBases) and span starts and ends (compile._ShiftedInts) as the previous
walk's lists and a move, not as 3 333 new pairs and ints a table, and _kept_program finds a
kept program's bases moved uniformly from those moves alone (_uniform_move). They must read
as the lists a walk makes, the records the next table starts from must be a cold walk's, and
the programs a cold compile's.
"""
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_append_moved import _same_programs  # noqa: E402
from test_compile_kept import _clear, _programs  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import KernelFacts  # noqa: E402

EXTRA = "-A INPUT -s 203.0.113.{k}/32 -p udp -m udp --dport 4 -j DROP"


def _plain_moved(bases, p_first, shift, delta):
    return [(i - shift, o + delta) if i >= p_first else (i, o) for i, o in bases]


def _plain_uniform(old, new):
    d = (new[0][0] - old[0][0], new[0][1] - old[0][1])
    return d if all((y[0] - x[0], y[1] - x[1]) == d for x, y in zip(old, new)) else None


def test_moved_bases_read_as_the_moved_pairs():
    rng = random.Random(3)
    for _ in range(300):
        n = rng.choice([5, 70, 300])
        top = [(rng.randrange(0, 20), rng.randrange(0, 900))]
        rest = sorted((rng.randrange(50, 5000), rng.randrange(1000, 90000)) for _ in range(n))
        bases = top + rest
        want, got, seen = list(bases), bases, [bases]
        # appends at one place (entries added: the indexes grow), as a run of them makes;
        # or moves anywhere, either way
        appends = rng.random() < 0.5
        p_first = rng.randrange(0, 30)
        for _ in range(rng.randrange(1, 4)):
            if appends:
                shift, delta = rng.choice([-1, -2]), rng.choice([112, 224])
            else:
                p_first, shift = rng.randrange(0, 30), rng.choice([-1, -2, 1, 0])
                delta = rng.choice([112, -112, 224, 0])
            want = _plain_moved(want, p_first, shift, delta)
            got = C._moved_bases(got, p_first, shift, delta)
            seen.append(got)
            assert list(got) == want and len(got) == len(want)
            assert got == want and want == got
            assert [got[k] for k in range(len(want))] == want
            assert list(got[1:]) == want[1:]
            if n >= C.MOVED_BASES_FROM and appends:
                assert type(got) is C._MovedBases
        # found moved from the moves alone (one src) or pair by pair: as the pairs say
        for old in seen:
            for new in seen:
                assert C._uniform_move(old, new) == _plain_uniform(list(old), list(new))


def test_shifted_ints_read_as_the_moved_ints():
    rng = random.Random(5)
    for _ in range(300):
        ints = sorted(rng.randrange(0, 5000) for _ in range(rng.choice([5, 70, 300])))
        want, got = list(ints), ints
        t = rng.randrange(0, len(ints) + 1)
        for _ in range(rng.randrange(1, 4)):
            tt = t if rng.random() < 0.8 else rng.randrange(0, len(ints) + 1)
            d = rng.choice([1, -1, 2])
            want = want[:tt] + [x + d for x in want[tt:]]
            got = C._shifted(got, tt, d)
            assert list(got) == want and got == want and len(got) == len(want)
            assert [got[k] for k in range(-len(want), len(want))] == want + want
            if len(ints) >= C.MOVED_BASES_FROM:
                assert type(got) is C._ShiftedInts


def test_replaced_spans_of_moved_spans():
    los = list(range(0, 700, 7))
    his = [a + 5 for a in los]
    t = 50
    lo, hi = C._shifted(los, t, 3), C._shifted(his, t, 3)
    cases = [[((lo[3], hi[3]), (lo[3], hi[3] + 2))],          # ahead of the move: kept so
             [((lo[3], hi[3]), (lo[3], hi[3] + 2)), ((lo[9], hi[9]), (lo[9], 1))],
             [((lo[60], hi[60]), (lo[60], hi[60] + 2))],      # a moved one: made
             [((lo[3], hi[3]), (lo[3] + 1, hi[3]))]]          # another start: sorted again
    for k, news in enumerate(cases):
        got = C._spans_replaced(lo, hi, news)
        want = C._spans_replaced(list(lo), list(hi), news)
        assert (list(got[0]), list(got[1])) == (list(want[0]), list(want[1])), k
        assert (type(got[0]) is C._ShiftedInts) == (k < 2), k
    with pytest.raises(ValueError):
        C._spans_replaced(lo, hi, [((1, 2), (1, 3))])


def _records(t, name):
    recs, bases, los, his, rest = C._WALK_RECORDS[id(t)][1][name]
    return recs, list(bases), list(los), list(his), rest[0], rest[2:]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")
@pytest.mark.parametrize("layout", ["FORWARD", "INPUT"])
def test_appends_keep_the_walk_moved(layout):
    """Appends to INPUT ahead of the fan-out: the walk of the chain reaching the hub (FORWARD
    taken moved, or INPUT walked alone and spliced) keeps its bases and spans as moves of the
    first walk's lists; the records equal a cold walk's and the programs a cold compile's."""
    facts = KernelFacts.fake()
    text = rulesets.make("fanout", 1200, seed=5).text
    if layout == "INPUT":
        text = text.replace("-A FORWARD ", "-A INPUT ")
    _clear()
    C._WALK_RECORDS.clear()
    tables = [decoded(text)]
    _programs(tables[0], facts)
    first = C._WALK_RECORDS[id(tables[0])][1][layout][1]
    for k in range(3):
        text = text.replace("COMMIT", EXTRA.format(k=90 + k) + "\nCOMMIT")
        t = decoded(text)
        tables.append(t)
        reused = C.PROG_STATS["reused"]
        warm = _programs(t, facts)
        recs, bases, los, his, rest = C._WALK_RECORDS[id(t)][1][layout]
        assert type(bases) is C._MovedBases and type(los) is C._ShiftedInts and \
            type(his) is C._ShiftedInts
        # the first walk's pairs, moved: not one made per table
        assert bases.src is first or bases.src == first[1:]
        assert bases._all is None and los._all is None and his._all is None
        if layout == "FORWARD":
            assert warm["FORWARD"][3] and C.PROG_STATS["reused"] > reused
        moved = _records(t, layout)
        _clear()
        C._WALK_RECORDS.clear()
        cold = _programs(t, facts)
        _same_programs(warm, cold, k)
        assert moved == _records(t, layout), k
        # the next append goes on from a warm table's records, as the engine's would
        _clear()
        C._WALK_RECORDS.clear()
        _programs(tables[0], facts)
        for u in tables[1:]:
            _programs(u, facts)
        first = C._WALK_RECORDS[id(tables[0])][1][layout][1]
