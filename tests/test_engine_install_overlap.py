"""The install's kernel work done beside other work (issue #7, a cold restore's cost outside
decode and compile): the counters map made by the worker thread while the table compiles
(Engine._early_counters_map), the classifier maps filled by it while the programs load
(engine._fill_later), and the helper's start-up warm-up (engine.warm_up). What must hold:

  - a map filled by the worker holds exactly what one BPF_MAP_UPDATE_ELEM per entry puts there
    (read back from the kernel), for an LPM trie and a hash map;
  - an installed table's maps are complete: the classifier map read back from the kernel equals
    its spec, the counters map made early has the table's entries (plus SPARE_SLACK) all zero;
  - a fill that fails, or a failure after the early map was started, fails the install with
    its errno, the previous ruleset keeps filtering (same programs in the slots, same table),
    no pending state is left and no descriptor leaks.
"""
import contextlib
import errno
import os
import random
import struct
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded, netns_engine  # noqa: E402 - the Table restore sends

from bpfilter_umh import engine, faults  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def _blocklist(seed: int):
    return decoded(rulesets.make("blocklist", 2000, seed=seed).text.replace("-A FORWARD ",
                                                                              "-A INPUT "))


def _contents(m) -> dict:
    return {k: m.lookup(k) for k in m.keys()}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- the worker's fill ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lpm", "hash"])
def test_worker_fill_equals_per_element_fill(kind):
    rnd = random.Random(7)
    if kind == "lpm":
        # nested and disjoint prefixes, as a blocklist has
        keys = set()
        while len(keys) < 3000:
            plen = rnd.choice((8, 16, 20, 24, 28, 32))
            net = rnd.getrandbits(32) & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF
            keys.add(struct.pack("<I", plen) + net.to_bytes(4, "big"))
        make = lambda: K.Map.create(K.BPF_MAP_TYPE_LPM_TRIE, 8, 4, len(keys),  # noqa: E731
                                    name="t_lpm", flags=K.BPF_F_NO_PREALLOC)
    else:
        keys = {rnd.getrandbits(64).to_bytes(8, "little") for _ in range(3000)}
        make = lambda: K.Map.create(K.BPF_MAP_TYPE_HASH, 8, 4, len(keys),  # noqa: E731
                                    name="t_hash")
    entries = [(k, struct.pack("<I", i)) for i, k in enumerate(sorted(keys))]
    one, batch, later = make(), make(), make()
    try:
        for k, v in entries:
            one.update(k, v)
        engine._fill(batch, entries)
        before = _fds()
        job = engine._fill_later(later, entries)
        job.result()
        assert _fds() == before, "the job's own descriptor of the map was not closed"
        want = _contents(one)
        assert len(want) == len(entries)
        assert _contents(batch) == want
        assert _contents(later) == want
    finally:
        for m in (one, batch, later):
            m.close()


# ---- installs ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _early_maps_engine(monkeypatch, name: str):
    """An engine in a throwaway namespace that makes every counters map early (SPARE_MIN 1)."""
    monkeypatch.setattr(engine.Engine, "SPARE_MIN", 1)
    with netns_engine(name) as e:
        yield e


@pytest.fixture
def eng(monkeypatch):
    with _early_maps_engine(monkeypatch, "iov") as e:
        yield e


def _slot_maps(eng) -> dict:
    """{name: Map} of the maps INPUT's installed program uses."""
    progs = eng._installed_programs()
    try:
        ids = progs[1].info()["map_ids"]
    finally:
        for p in progs.values():
            p.close()
    return {m.name: m for m in (K.Map.from_id(i) for i in ids)}


def test_installed_maps_are_complete(eng):
    t = _blocklist(11)
    eng.install(t)
    maps = _slot_maps(eng)
    try:
        lpm = maps["bpfilter_lpm"]
        spec = next(s for s, m in eng._cls_maps.values() if s.kname == lpm.name)
        assert _contents(lpm) == dict(spec.entries)
        cnt = maps[engine.COUNTERS_MAP_NAME]
        n = engine._entry_count(t)
        assert cnt.max_entries == n + engine.Engine.SPARE_SLACK
        assert eng.counters() == [(0, 0)] * n
    finally:
        for m in maps.values():
            m.close()


def _refused_keeps_old(eng, new_table, err: int):
    old_table = eng.table
    ids = eng._slot_ids()
    before = _fds()
    with pytest.raises(BpfilterError) as e:
        eng.install(new_table)
    assert e.value.errno == err
    assert eng.table is old_table
    assert eng._slot_ids() == ids
    assert not os.path.exists(eng._pending_path)
    assert _fds() == before, "a refused install left descriptors open"


def test_failed_fill_keeps_the_old_ruleset(eng, monkeypatch):
    eng.install(_blocklist(11))
    real = engine._fill_prepared

    def refused(m, entries, batch):
        if len(entries) > 100:      # the blocklist's trie, not the small maps
            raise BpfilterError(errno.ENOMEM, "injected: the trie's inserts failed")
        return real(m, entries, batch)
    monkeypatch.setattr(engine, "_fill_prepared", refused)
    _refused_keeps_old(eng, _blocklist(12), errno.ENOMEM)
    monkeypatch.setattr(engine, "_fill_prepared", real)
    eng.install(_blocklist(12))         # and the next install works


def test_failure_after_the_early_map_keeps_the_old_ruleset(eng):
    eng.install(_blocklist(11))
    faults.arm("map_create", "error:ENOMEM")
    _refused_keeps_old(eng, _blocklist(12), errno.ENOMEM)


def test_warm_up_is_repeatable():
    engine.warm_up()
    engine.warm_up()
    assert K.features.has("netfilter_link")


# ---- a helper's reads and spare map --------------------------------------------------------------

def _small_tables():
    from test_compile_util import ACCEPT, DROP, icmp, rule, table, udp
    t1 = table({"INPUT": (ACCEPT, [rule(DROP, icmp(8), proto=1),
                                   rule(DROP, udp(dport=(9999, 9999)), proto=17)])})
    t2 = table({"INPUT": (ACCEPT, [rule(DROP, icmp(8), proto=1),
                                   rule(DROP, udp(dport=(9999, 9999)), proto=17),
                                   rule(DROP, udp(dport=(4, 4)), proto=17)])})
    return t1, t2


def _count(m, i: int, p: int, b: int):
    """(p, b) more in entry i of a per-CPU counters map, on CPU 0."""
    cur = m.lookup_percpu(i)
    p0, b0 = struct.unpack("<QQ", cur[0])
    m.update(i, struct.pack("<QQ", p0 + p, b0 + b) + b"".join(cur[1:]))


@pytest.fixture
def helper_eng(monkeypatch):
    """An engine as a helper runs it (engine.AFTER_REPLY), whose counters maps are made early
    and spare (SPARE_MIN 1)."""
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    with _early_maps_engine(monkeypatch, "iovh") as e:
        try:
            yield e
        finally:
            engine.AFTER_REPLY.clear()


def test_entries_read_during_the_grace_period_has_the_late_counts(helper_eng, monkeypatch):
    """GET_ENTRIES right after an install (counters_nonzero) reads the new map before it waits
    for the replaced programs' grace period, and still shows the packets they counted
    meanwhile (carried to the entry libiptc carried the count to), as the kernel's would."""
    import threading
    eng = helper_eng
    t1, t2 = _small_tables()
    eng.install(t1)
    engine.run_after_reply()
    first = eng._counters_map()
    _count(first, 0, 5, 500)
    old_map = K.Map.from_id(first.info()["id"])
    gate = threading.Event()
    real_wait = engine._wait_for_readers

    def wait():
        assert gate.wait(10)
        _count(old_map, 0, 2, 200)      # a packet still inside the old program
        real_wait()
    monkeypatch.setattr(engine, "_wait_for_readers", wait)
    try:
        old = eng.install(t2)
        assert old[0] == (5, 500)
        at = t2.chain("INPUT").rules[-1].index
        eng.add_counters(old[:at] + [(0, 0)] + old[at:])
        _count(eng._counters_map(), 0, 1, 100)     # the new program counts too
        threading.Timer(0.05, gate.set).start()
        assert eng.counters_nonzero() == {0: (8, 800)}
        assert eng.counters()[0] == (8, 800)
    finally:
        gate.set()
        old_map.close()
    engine.run_after_reply()


def test_spare_map_made_by_the_worker(helper_eng):
    """The next install's counters map, made after the reply by the worker thread, is zeroed,
    sized for the installed table plus SPARE_SLACK, and taken by the next install."""
    eng = helper_eng
    t1, t2 = _small_tables()
    eng.install(t1)
    engine.run_after_reply()
    spare = eng._spare
    assert spare is not None
    assert spare.max_entries == engine._entry_count(t1) + engine.Engine.SPARE_SLACK
    assert engine._map_counts(spare, spare.max_entries) in ({}, [(0, 0)] * spare.max_entries)
    spare_id = spare.info()["id"]
    eng.install(t2)
    assert eng._counters_map().info()["id"] == spare_id
    engine.run_after_reply()
