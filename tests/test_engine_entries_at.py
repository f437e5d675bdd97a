"""GET_ENTRIES patches the live counters of the entries that counted into the installed blob;
sockopt._entries_at finds those entries chain by chain instead of listing every entry. It must
name the same entries (same objects, so the same offsets) as Table.entries() for every table
layout: built-in chains only, user chains (head ERROR entries, RETURN entries), the final ERROR
entry, and fall back to the full list where indexes are not what the layout gives."""
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded, to_input  # noqa: E402
from bpfilter_umh.model import AF_INET, Table  # noqa: E402
from bpfilter_umh.sockopt import _entries_at  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: iptables-legacy in a netns")


@pytest.mark.parametrize("shape", ["blocklist", "mixed", "fanout"])
def test_entries_at_names_the_entries_of_the_layout(shape):
    t = decoded(to_input(rulesets.make(shape, 300, seed=2).text))
    entries = t.entries()
    rng = random.Random(shape)
    for wanted in ([0], [len(entries) - 1], list(range(len(entries))),
                   rng.sample(range(len(entries)), 17), rng.sample(range(len(entries)), 1)):
        got = _entries_at(t, wanted)
        assert set(got) == set(wanted)
        assert all(got[i] is entries[i] for i in wanted)


def test_entries_at_falls_back_where_indexes_are_not_the_layouts():
    t = Table.empty("filter", AF_INET)
    entries = t.entries()
    for e in entries:
        e.index = -1            # never laid out
    got = _entries_at(t, [0, len(entries) - 1])
    assert got == {0: entries[0], len(entries) - 1: entries[-1]}
