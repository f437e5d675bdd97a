"""An append's work around decode and compile (issue #7: one `iptables -A` on a 10 000-rule table):
what the engine moved off the requests' path must keep every guarantee it had.

  - _LateCounts starts the RCU grace period before its early read of the replaced counters map,
    and the final read (in the waiter thread, once the period is over) still comes after the
    early one: the late delta is what counted between them, never a read that raced it;
  - the replaced table the late counts kept is freed after the reply (engine.AFTER_REPLY), not
    inside the request that settles them (the next command's GET_ENTRIES);
  - the pending state's blob is written by the worker thread while the table compiles, its
    header (the programs' ids) afterwards: the committed state file reads back as the table
    installed (an engine opened afterwards adopts it); a worker that has not started the job
    when the install needs the file leaves it to the install, one still writing it is not
    waited for (the install writes its own, the worker removes its), a header longer than the room
    kept is written whole, and a failed install leaves no pending file nor its temporary;
  - the hook offsets of the state file (_hooks_of, which stops at the last built-in chain) are
    the table's own.
"""
import errno
import os
import sys
import threading
import time
import weakref

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded, netns_engine  # noqa: E402 - the Table restore sends

from bpfilter_umh import engine, faults  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402
from bpfilter_umh.model import AF_INET, Table  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF")


class _FakeMap:
    """What _LateCounts asks of a counters map (its reads are engine._map_counts, replaced)."""
    max_entries = 8

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_final_read_waits_for_the_early_read(monkeypatch):
    """The grace period is over at once here, while the early read takes 50 ms: the final read
    must still come after it (else a packet counted during the early read would be in both)."""
    monkeypatch.setattr(engine, "_wait_for_readers", lambda: None)
    reads = []

    def counts(m, n):
        main = threading.current_thread() is threading.main_thread()
        t0 = time.monotonic()
        if main:
            time.sleep(0.05)
            got = {0: (1, 100)}
        else:
            got = {0: (3, 300), 2: (1, 60)}
        reads.append((main, t0, time.monotonic()))
        return got
    monkeypatch.setattr(engine, "_map_counts", counts)
    m = _FakeMap()
    late = engine._LateCounts(m, Table.empty("filter", AF_INET), [(5, 500)], engine._MapsAgain())
    late.finish()
    (early,), (final,) = [r for r in reads if r[0]], [r for r in reads if not r[0]]
    assert final[1] >= early[2], "the final read started before the early read was over"
    assert late.returned[0] == (6, 600)             # the base plus the early read
    assert late.delta == {0: (2, 200), 2: (1, 60)}
    assert m.closed                                 # no reader to clear it: not recycled


def test_failed_early_read_carries_nothing(monkeypatch):
    monkeypatch.setattr(engine, "_wait_for_readers", lambda: None)

    def counts(m, n):
        if threading.current_thread() is threading.main_thread():
            raise BpfilterError(errno.EIO, "read refused")
        return {0: (1, 1)}
    monkeypatch.setattr(engine, "_map_counts", counts)
    m = _FakeMap()
    with pytest.raises(BpfilterError):
        engine._LateCounts(m, Table.empty("filter", AF_INET), [], engine._MapsAgain())
    for _ in range(200):            # the waiter closes the map once it gave up
        if m.closed:
            break
        time.sleep(0.01)
    assert m.closed


def test_settled_late_counts_free_the_old_table_after_the_reply(monkeypatch):
    """The old table goes with the work queued for after the reply, not in _settle_late."""
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    monkeypatch.setattr(engine, "_wait_for_readers", lambda: None)
    monkeypatch.setattr(engine, "_map_counts", lambda m, n: {})
    old = Table.empty("filter", AF_INET)
    gone = weakref.ref(old)
    late = engine._LateCounts(_FakeMap(), old, [], engine._MapsAgain())
    late.added = [(0, 0)] * 4
    eng = engine.Engine.__new__(engine.Engine)
    eng._late, eng.table, eng.base, eng.family = late, Table.empty("filter", AF_INET), [], AF_INET
    del old, late
    eng._settle_late()
    assert eng._late is None
    assert gone() is not None, "the replaced table was freed inside the request"
    engine.run_after_reply()
    assert gone() is None, "the replaced table outlived the work after the reply"


# ---- the pending state written beside the compilation ---------------------------------------

def _blocklist(n: int, seed: int = 3) -> Table:
    return decoded(rulesets.make("blocklist", n, seed=seed).text.replace("-A FORWARD ",
                                                                          "-A INPUT "))


@pytest.fixture(scope="module")
def tables():
    return _blocklist(2500, 3), _blocklist(2500, 4)


@pytest.fixture
def eng():
    with netns_engine("eap") as e:
        yield e


def _state(path: str):
    with open(path, "rb") as f:
        data = f.read()
    return engine._parse_state(data), data


def _leftovers(eng) -> list:
    d = os.path.dirname(eng.state_path)
    return sorted(n for n in os.listdir(d) if "pending" in n or n.endswith(".tmp"))


@needs_root
def test_prewritten_state_reads_back(eng, tables, monkeypatch):
    t1, t2 = tables
    assert len(t1.kept_blob) >= engine.Engine.PREWRITE_MIN       # the path under test
    made = []
    real, take = engine._write_blob_at, engine._take_prewritten
    monkeypatch.setattr(engine, "_write_blob_at", lambda *a: made.append(a[0]) or real(*a))
    # the worker gets to write (on a busy machine the install may claim the work first)
    monkeypatch.setattr(engine, "_take_prewritten", lambda job: (job.done.wait(), take(job))[1])
    eng.install(t1)
    eng.install(t2)
    assert len(made) == 2
    (st, blob), data = _state(eng.state_path)
    assert data.index(b"\n") == engine.Engine.HEAD_ROOM - 1      # the padded header
    assert blob == bytes(t2.kept_blob) and st["blob_size"] == len(blob)
    assert st["generation"] == eng.generation == 2
    assert st["hook_entry"] == list(t2.hook_entry) and st["underflow"] == list(t2.underflow)
    again = engine.Engine.open(AF_INET)
    try:
        assert again.table.num_entries == t2.num_entries and again.generation == 2
        assert again._slot_ids() == {int(h): i for h, i in st["prog_ids"].items()}
    finally:
        again.close()
    assert _leftovers(eng) == []


@needs_root
def test_install_writes_the_blob_when_the_worker_is_late(eng, tables, monkeypatch):
    """The worker busy when the install needs the file: the install writes it whole itself and
    the job, run later, writes nothing."""
    t1, _t2 = tables
    monkeypatch.setattr(engine.Engine, "SPARE_MIN", 10**9)     # no counters map made early
    gate = threading.Event()
    save = engine.Engine._save_state

    def saved(self, *a):
        try:
            return save(self, *a)
        finally:
            gate.set()          # the maps' fills are queued behind the gate: the swap waits
    monkeypatch.setattr(engine.Engine, "_save_state", saved)
    busy = engine._worker(gate.wait, 5)
    try:
        eng.install(t1)
    finally:
        gate.set()
    busy.result()
    engine._worker(lambda: None).result()       # the prewrite job has run (and done nothing)
    (st, blob), data = _state(eng.state_path)
    assert data.index(b"\n") < engine.Engine.HEAD_ROOM - 1       # written whole
    assert blob == bytes(t1.kept_blob)
    assert _leftovers(eng) == []


@needs_root
def test_install_gives_up_on_a_worker_still_writing(eng, tables, monkeypatch):
    """The worker has started the file but not finished it when the install needs it (on a
    loaded machine its last steps wait for the GIL and a CPU): the install does not wait, it
    writes the file whole under its own name; the worker, finishing later, removes its own."""
    t1, _t2 = tables
    monkeypatch.setattr(engine.Engine, "SPARE_MIN", 10**9)     # no counters map made early
    gate, writing = threading.Event(), threading.Event()
    real_pwrite, save = engine._pwrite_all, engine.Engine._save_state

    def slow_pwrite(fd, data, at):
        if threading.current_thread() is not threading.main_thread():
            writing.set()
            assert gate.wait(10)        # the worker stays inside its write
        return real_pwrite(fd, data, at)

    def saved(self, *a):
        assert writing.wait(10)         # the worker has claimed the job and opened its file
        try:
            return save(self, *a)
        finally:
            gate.set()
    monkeypatch.setattr(engine, "_pwrite_all", slow_pwrite)
    monkeypatch.setattr(engine.Engine, "_save_state", saved)
    t0 = time.monotonic()
    try:
        eng.install(t1)
    finally:
        gate.set()
    assert time.monotonic() - t0 < 10           # not waited for the gate's timeout
    engine._worker(lambda: None).result()       # the given-up job has finished
    (st, blob), data = _state(eng.state_path)
    assert data.index(b"\n") < engine.Engine.HEAD_ROOM - 1       # written whole, by the install
    assert blob == bytes(t1.kept_blob) and st["generation"] == eng.generation == 1
    assert _leftovers(eng) == []                # the worker's file removed by the worker


@needs_root
def test_long_header_is_written_whole(eng, tables, monkeypatch):
    monkeypatch.setattr(engine.Engine, "HEAD_ROOM", 64)
    eng.install(tables[0])
    (st, blob), data = _state(eng.state_path)
    assert data.index(b"\n") == len(data) - len(blob) - 1 > 64
    assert blob == bytes(tables[0].kept_blob)
    assert _leftovers(eng) == []


@needs_root
@pytest.mark.parametrize("point", ["compile", "map_create", "verifier", "after_load"])
def test_failed_install_leaves_no_pending_file(eng, tables, point):
    t1, t2 = tables
    eng.install(t1)
    before = _state(eng.state_path)[1]
    ids = eng._slot_ids()
    faults.arm(point, "on" if point == "verifier" else "error:EIO")
    with pytest.raises(BpfilterError):
        eng.install(t2)
    assert _leftovers(eng) == []
    assert _state(eng.state_path)[1] == before and eng._slot_ids() == ids
    assert eng.table is t1


@needs_root
def test_hooks_of_stops_at_the_last_builtin_chain():
    for shape in ("fanout", "blocklist"):
        t = decoded(rulesets.make(shape, 300, seed=5).text)
        assert engine._hooks_of(t) == (list(t.hook_entry), list(t.underflow))
