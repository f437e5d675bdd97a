"""GET_ENTRIES patches the live counters of the entries that counted into the installed blob;
engine.entry_offsets finds their offsets chain by chain instead of listing every entry. It must
give the offsets Table.entries() gives for every table layout: built-in chains only, user
chains (head ERROR entries, RETURN entries), the final ERROR entry, a table whose chains an
append moved (model._MovedChain), which it must leave unmade (under traffic every GET_ENTRIES
has counts to patch), and fall back to the full list where indexes are not what the layout
gives."""
import os
import random
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded, to_input  # noqa: E402
from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.engine import entry_offsets  # noqa: E402
from bpfilter_umh.model import AF_INET, Table  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: iptables-legacy in a netns")


def _samples(n, seed):
    rng = random.Random(seed)
    return ([0], [n - 1], list(range(n)), rng.sample(range(n), 17), rng.sample(range(n), 1))


@needs_root
@pytest.mark.parametrize("shape", ["blocklist", "mixed", "fanout"])
def test_entry_offsets_are_the_layouts(shape):
    t = decoded(to_input(rulesets.make(shape, 300, seed=2).text))
    entries = t.entries()
    for wanted in _samples(len(entries), shape):
        assert entry_offsets(t, wanted) == {i: entries[i].offset for i in wanted}


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_entry_offsets_leave_moved_chains_unmade(family):
    """After appends ahead of a fan-out (its service chains moved, unmade), the offsets of any
    entries are a cold decode's, and no chain is made."""
    from test_engine_late_counts import _moved_fanouts
    from test_model_incremental import clear_caches
    bufs = _moved_fanouts(family)[:3]
    clear_caches()
    tables = [model.decode_replace(b, family)[1] for b in bufs]
    clear_caches()
    cold = model.decode_replace(bufs[2], family)[1].entries()
    t = tables[2]
    unmade = sum(model._unmade(c) is not None for c in t.chains)
    assert unmade == len(t.chains) - 3
    for wanted in _samples(len(cold), family):
        assert entry_offsets(t, wanted) == {i: cold[i].offset for i in wanted}
        assert sum(model._unmade(c) is not None for c in t.chains) == unmade


def test_entry_offsets_fall_back_where_indexes_are_not_the_layouts():
    t = Table.empty("filter", AF_INET)
    entries = t.entries()
    for k, e in enumerate(entries):
        e.index, e.offset = -1, 1000 + k     # never laid out
    assert entry_offsets(t, [0, len(entries) - 1]) == {0: 1000, len(entries) - 1:
                                                       1000 + len(entries) - 1}
