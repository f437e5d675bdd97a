"""A helper's install replies without waiting for the RCU grace period (engine._LateCounts): the
old counters it returns are read right after the swap, and packets that were still inside the
replaced programs are added afterwards to the new entries libiptc carried the counts to, as the
kernel's final counts would have been (ip_tables.c: xt_replace_table waits, then get_counters).

The late packets are written into the replaced counters map while the (stubbed) grace period
lasts, which is exactly where a packet still running the old program would count them."""
import os
import socket
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


# ---- which new entry continues a late one, in a fan-out whose chains an append moved ---------

def _continuations_by_walk(old, new, wanted: set) -> dict:
    """The oracle: every entry of both tables walked, each rule keyed by (chain, its
    engine._rule_key, its rank among the chain's rules with that key), each policy by its
    chain; {old index: (new index, new offset, is a rule)}."""
    def where(t):
        out = {}
        for c in t.chains:
            seen = {}
            for r in c.rules:
                k = engine_mod._rule_key(r)
                seen[k] = rank = seen.get(k, -1) + 1
                out[(c.name, k, rank)] = (r.index, r.offset, True)
            if c.policy_entry is not None:
                out[(c.name, None, 0)] = (c.policy_entry.index, c.policy_entry.offset, False)
        return out
    now = where(new)
    return {j: now[k] for k, (j, _o, _r) in where(old).items() if j in wanted and k in now}


def _moved_fanouts(family, services=30):
    """Four bufs of a fan-out (FORWARD -j SVC, SVC jumping to `services` chains), each after
    the first an append to INPUT ahead of them (the decode moves the chains behind it); the
    fourth also inserts, at the head of SVC-3, a copy of its second rule (a chain changed:
    its rules are found by key and rank)."""
    from test_model_lazy import _fanout_fwd
    from test_model_moved import _appended, _ip
    from test_model_incremental import _blob, _buf
    from bpfilter_umh.model import Rule, Verdict
    import copy
    t0 = _fanout_fwd(family, services)
    t1 = _appended(t0, Rule(_ip(family, 90), target=Verdict(-1)))
    t2 = _appended(t1, Rule(_ip(family, 91), target=Verdict(-1)))
    t3 = _appended(t2, Rule(_ip(family, 92), target=Verdict(-1)))
    s3 = t3.chain("SVC-3")
    s3.rules.insert(0, copy.deepcopy(s3.rules[1]))
    return [_buf(*_blob(t)) for t in (t0, t1, t2, t3)]


def _late_entries(t) -> set:
    """What a flood counts late, and more: FORWARD's jump to SVC, a jump of SVC and SVC's
    RETURN, rules and RETURN entries of moved service chains (SVC-3: the changed one), INPUT's
    policy, a head (ERROR) entry and the table's tail entry (continued by none)."""
    from bpfilter_umh.model import chain_outline, policy_indexes
    idx = {t.chain("FORWARD").rules[0].index}
    svc, s3, s7, last = (t.chain(n) for n in ("SVC", "SVC-3", "SVC-7", t.chains[-1].name))
    _k, _p, _h, first, _o, pol = chain_outline(svc)
    idx |= {first + 5, pol}
    for c in (s3, s7, last):
        _k, _p, head, first, _o, pol = chain_outline(c)
        idx |= {first, first + 1, pol, head}
    idx |= set(policy_indexes([t.chain("INPUT")]))
    idx.add(engine_mod._entry_count(t) - 1)
    return idx


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_continuations_leave_moved_chains_unmade(family):
    """engine._continuations over tables whose service chains an append moved (model's
    _MovedChain) reads only the chains holding a late entry, makes none of them, and answers
    what a walk over every entry of cold decodes of the same blobs answers."""
    from bpfilter_umh import model
    from test_model_incremental import clear_caches
    bufs = _moved_fanouts(family)
    cold = []
    for b in bufs:
        clear_caches()
        cold.append(model.decode_replace(b, family)[1])
    clear_caches()
    tables = [model.decode_replace(b, family)[1] for b in bufs]

    def unmade(t):
        return sum(model._unmade(c) is not None for c in t.chains)
    # (their unmade chains counted after the last decode, which makes some of the third's)
    seen = []
    for k in range(3):
        old, new, cold_old, cold_new = tables[k], tables[k + 1], cold[k], cold[k + 1]
        before = unmade(old), unmade(new)
        seen.append(before)
        wanted = _late_entries(cold_old)
        got = engine_mod._continuations(old, new, wanted)
        assert (unmade(old), unmade(new)) == before, "a chain's entries were made"
        want = _continuations_by_walk(cold_old, cold_new, wanted)
        assert got == want
        assert len(want) >= 9                    # the head, tail entries are not continued
    assert seen[1][0] > 0 and seen[1][1] > 0 and seen[2][0] > 0, seen
    # SVC-3's rules after the insert: its old first rule is the new second; the old second is
    # continued by the first rule equal to it, the copy put ahead (the k-th equal rule: what
    # _continuations matched before it read moved chains without making them)
    s3_old, s3_new = cold[2].chain("SVC-3"), cold[3].chain("SVC-3")
    cont = engine_mod._continuations(tables[2], tables[3], {r.index for r in s3_old.rules})
    new_ix = [r.index for r in s3_new.rules]
    assert [cont[r.index][0] for r in s3_old.rules] == [new_ix[1], new_ix[0]]


def test_late_counts_in_moved_chains_carried_exactly(helper):
    """An append ahead of a fan-out (the new table's service chains moved, unmade) with late
    packets in the chains it moved: each late count lands on the entry libiptc carried its
    entry's count to, and settling makes none of the new table's chains."""
    from bpfilter_umh import model
    from test_model_incremental import clear_caches
    eng, gate, late = helper
    bufs = _moved_fanouts(socket.AF_INET)[:2]
    clear_caches()
    cold = [model.decode_replace(b, socket.AF_INET)[1] for b in bufs]
    clear_caches()
    t0 = model.decode_replace(bufs[0], socket.AF_INET)[1]
    gate.set()
    eng.install(t0)
    engine_mod.run_after_reply()
    t1 = model.decode_replace(bufs[1], socket.AF_INET)[1]
    svc7, fwd = cold[0].chain("SVC-7"), cold[0].chain("FORWARD")
    counted = {fwd.rules[0].index: (9, 900), svc7.rules[1].index: (3, 300),
               svc7.policy_entry.index: (6, 600), cold[0].chain("INPUT").policy_entry.index:
               (2, 200)}
    m = eng._counters_map()
    for i, (p, b) in counted.items():
        _add(m, i, p, b)
    lates = {svc7.rules[1].index: (1, 10), svc7.policy_entry.index: (2, 20),
             fwd.rules[0].index: (4, 40), cold[0].chain("SVC").policy_entry.index: (5, 50)}
    old = _install_with_late(eng, gate, late, t1, lates)
    unmade = sum(model._unmade(c) is not None for c in t1.chains)
    # libiptc's -A: each old entry's count to the entry continuing it, the new rule zero
    cont = _continuations_by_walk(cold[0], cold[1], set(range(len(old))))
    added = [(0, 0)] * cold[1].num_entries
    for j, (i, _off, _rule) in cont.items():
        added[i] = old[j]
    eng.add_counters(added)
    gate.set()
    engine_mod.run_after_reply()
    want = list(added)
    for j, (p, b) in lates.items():
        i = cont[j][0]
        want[i] = (want[i][0] + p, want[i][1] + b)
    assert eng.counters() == want
    assert want[cont[svc7.rules[1].index][0]] == (4, 310)
    assert want[cont[svc7.policy_entry.index][0]] == (8, 620)
    # the install left the service chains unmade (compile reads their outlines), and so did
    # the settling, though late counts were in two of them
    assert unmade == len(t1.chains) - 3
    assert sum(model._unmade(c) is not None for c in t1.chains) == unmade
