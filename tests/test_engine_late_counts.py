"""A helper's install replies without waiting for the RCU grace period (engine._LateCounts): the
old counters it returns are read right after the swap, and packets that were still inside the
replaced programs are added afterwards to the new entries libiptc carried the counts to, as the
kernel's final counts would have been (ip_tables.c: xt_replace_table waits, then get_counters).

The late packets are written into the replaced counters map while the (stubbed) grace period
lasts, which is exactly where a packet still running the old program would count them."""
import os
import struct
import threading

import pytest

from nsutil import Netns
from test_compile_util import ACCEPT, DROP, icmp, rule, table, udp
from bpfilter_umh import engine as engine_mod
from bpfilter_umh import kernel as K
from bpfilter_umh.engine import Engine

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF maps")


def _tables():
    r_icmp = rule(DROP, icmp(8), proto=1)
    r_udp = rule(DROP, udp(dport=(9999, 9999)), proto=17)
    t1 = table({"INPUT": (ACCEPT, [r_icmp, r_udp])})
    appended = rule(DROP, udp(dport=(4, 4)), proto=17)
    t2 = table({"INPUT": (ACCEPT, [rule(DROP, icmp(8), proto=1),
                                   rule(DROP, udp(dport=(9999, 9999)), proto=17), appended])})
    return t1, t2


def _add(m, i: int, p: int, b: int):
    """Count (p, b) more in entry i of a per-CPU counters map, on CPU 0."""
    cur = m.lookup_percpu(i)
    p0, b0 = struct.unpack("<QQ", cur[0])
    m.update(i, struct.pack("<QQ", p0 + p, b0 + b) + b"".join(cur[1:]))


@pytest.fixture(params=["batch", "sums reader"])
def helper(monkeypatch, request):
    """An engine in a throwaway namespace, as a helper runs it (engine.AFTER_REPLY), whose
    grace-period wait lasts until the test releases it, and counts late packets meanwhile.
    Its counters maps are read with the batch lookup, or (as a large table's are) by the
    in-kernel sums of engine._SumsReader."""
    monkeypatch.setattr(engine_mod, "AFTER_REPLY", [])
    reads = []
    if request.param == "sums reader":
        monkeypatch.setattr(engine_mod, "READER_MIN", 1)
        real_read = engine_mod._SumsReader.read

        def read(self, n, **kw):
            got = real_read(self, n, **kw)
            reads.append(got is not None)
            return got
        monkeypatch.setattr(engine_mod._SumsReader, "read", read)
    gate, late = threading.Event(), {}
    real_wait = engine_mod._wait_for_readers

    def wait():
        assert gate.wait(10)
        m = late.pop("map", None)
        if m is not None:
            for i, (p, b) in late.pop("counts").items():
                _add(m, i, p, b)
            m.close()
        real_wait()
    monkeypatch.setattr(engine_mod, "_wait_for_readers", wait)
    with Netns("late") as ns:
        with ns.inside():
            eng = Engine.open()
            try:
                yield eng, gate, late
            finally:
                gate.set()
                eng.flush()
                eng.close()
    assert all(reads) and bool(reads) == (request.param == "sums reader")


def _first_installed(eng, gate):
    """The two tables, the first installed with nothing left after its reply."""
    t1, t2 = _tables()
    gate.set()
    eng.install(t1)
    engine_mod.run_after_reply()
    return t1, t2


def _install_with_late(eng, gate, late, new, counts):
    """Install `new` over the installed table with `counts` {old index: (p, b)} counted by the
    old programs after the reply's read; returns the old counters the install returned."""
    gate.clear()
    late["map"] = K.Map.from_fd(os.dup(eng._counters_map().fd))   # closed by the wait
    late["counts"] = counts
    return eng.install(new)


def test_late_packets_follow_the_carried_counts(helper):
    eng, gate, late = helper
    t1, t2 = _first_installed(eng, gate)
    m = eng._counters_map()
    pol = t1.chain("INPUT").policy_entry.index
    _add(m, 0, 5, 500)
    _add(m, pol, 3, 300)
    old = _install_with_late(eng, gate, late, t2, {0: (2, 200), pol: (1, 60), 1: (4, 40)})
    # the reply: the counts read right after the swap, not waiting for the old programs
    assert old[0] == (5, 500) and old[pol] == (3, 300) and old[1] == (0, 0)
    # before SET_ADD_COUNTERS the new entries count from zero, as the kernel's (no waiting)
    assert eng.counters() == [(0, 0)] * t2.num_entries
    # libiptc's -A: every old entry carried to where it is now, the new rule from zero
    at = t2.chain("INPUT").rules[-1].index
    eng.add_counters(old[:at] + [(0, 0)] + old[at:])
    gate.set()
    engine_mod.run_after_reply()
    got = eng.counters()
    new_pol = t2.chain("INPUT").policy_entry.index
    assert got[0] == (7, 700)               # 5 returned + 2 late
    assert got[1] == (4, 40)                # 0 returned (a rule read back), 4 late
    assert got[at] == (0, 0)                # the appended rule
    assert got[new_pol] == (4, 360)
    assert Engine.open().counters() == got  # the counters file has them too


def test_late_packets_of_entries_not_carried_are_dropped(helper):
    """A restore builds every entry anew (COUNTER_MAP_NOMAP: SET_ADD_COUNTERS adds zeros): the
    old table's counts, late ones included, are not the new table's."""
    eng, gate, late = helper
    t1, t2 = _first_installed(eng, gate)
    pol = t1.chain("INPUT").policy_entry.index
    _add(eng._counters_map(), 0, 5, 500)
    _add(eng._counters_map(), pol, 3, 300)
    _install_with_late(eng, gate, late, t2, {0: (2, 200), pol: (1, 60)})
    eng.add_counters([(0, 0)] * t2.num_entries)
    gate.set()
    engine_mod.run_after_reply()
    assert eng.counters() == [(0, 0)] * t2.num_entries


def test_late_counts_settle_before_the_next_read_and_install(helper):
    """No idle moment after the reply: the next request that reads counters waits for the
    settling, and the next install settles before it returns the counts it replaces."""
    eng, gate, late = helper
    t1, t2 = _first_installed(eng, gate)
    _add(eng._counters_map(), 0, 5, 500)
    old = _install_with_late(eng, gate, late, t2, {0: (2, 200)})
    at = t2.chain("INPUT").rules[-1].index
    eng.add_counters(old[:at] + [(0, 0)] + old[at:])
    gate.set()
    assert eng.counters()[0] == (7, 700)        # settled here, not after the reply
    back = eng.install(t1)
    assert back[0] == (7, 700)
    engine_mod.AFTER_REPLY.clear()


def test_next_install_uses_the_spare_counters_map(helper, monkeypatch):
    """The counters map of the next install is made after the reply (~5 ms at 10 000 entries),
    and the install takes it."""
    eng, gate, late = helper
    monkeypatch.setattr(Engine, "SPARE_MIN", 1)
    t1, t2 = _first_installed(eng, gate)
    spare = eng._spare
    assert spare is not None and spare.max_entries >= t2.num_entries
    spare_id = spare.info()["id"]
    eng.install(t2)
    assert eng._counters_map().info()["id"] == spare_id
    engine_mod.run_after_reply()


def test_replaced_counters_map_serves_again_zeroed(helper):
    """The replaced programs' map, once its final read is done, is read and zeroed in one pass
    by its reader (_SumsReader.read(clear=True)) and taken by the next install instead of a new
    map (5-9 ms at 10 000 entries): nothing it counted shows in the table that takes it."""
    eng, gate, late = helper
    t1, t2 = _first_installed(eng, gate)
    first = eng._counters_map()
    first_id = first.info()["id"]
    _add(first, 0, 5, 500)
    eng.counters()                          # makes the reader (READER_MIN 1) or not (batch)
    old = eng.install(t2)
    assert old[0] == (5, 500)
    at = t2.chain("INPUT").rules[-1].index
    eng.add_counters(old[:at] + [(0, 0)] + old[at:])
    assert eng.counters()[0] == (5, 500)    # settled: the final read is done
    engine_mod.run_after_reply()
    back = eng.install(t1)
    assert back[0] == (5, 500)
    m = eng._counters_map()
    reused = engine_mod.READER_MIN == 1     # only a map with a reader is zeroed and kept
    assert (m.info()["id"] == first_id) == reused
    assert engine_mod._map_counts(m, m.max_entries) in ({}, [(0, 0)] * m.max_entries)
    assert eng.counters() == [(0, 0)] * t1.num_entries
    engine_mod.AFTER_REPLY.clear()
