"""The counters map a new helper makes while idle for its first install (engine.make_first_spare,
queued by __main__.queue_start_work): a helper's first restore of a large table no longer makes
its counters map beside the compile. What must hold:

  - the helper's start-up idle steps queue it (once per process), of first_spare_entries()
    entries, made by the worker thread;
  - the first install of SPARE_MIN..that many entries runs on it (the installed programs'
    counters map is that map), makes no counters map of its own, and reads (GET_ENTRIES'
    counters, the replaced counts) are the table's counts: the map counts and is read in its
    first entries + SPARE_SLACK only (_counted), the in-kernel reader included;
  - replaced, it serves a later install again (the helper's recycling, _MapsAgain) like a map
    made for its table;
  - a second map of its size, made by a thread of its own once the first is made, serves the
    second install: no counters map is made by the first two installs nor after their replies
    (the spare made after the first reply cost an append right after a large restore 10-13 ms);
  - a table it does not fit (fewer than SPARE_MIN entries, or more than it has) gets a map of
    its own, without waiting for the worker, and the spare is closed by the worker, the second
    by its thread (or never made);
  - a spare the kernel refused leaves the install to make its map, which succeeds;
  - a process exits only once the worker's jobs are over (engine._worker_drained): a helper
    that exited while the worker was still inside the first spare's BPF_MAP_CREATE (libbpf)
    crashed with SIGSEGV at exit.

Real engines in throwaway namespaces; small tables, with the sizes scaled down.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from test_cplane_scale import netns_engine  # noqa: E402
from test_engine_install_overlap import _count, _small_tables  # noqa: E402

from bpfilter_umh import engine  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

SPARE = 64          # the first spare's entries here (FIRST_SPARE_MAX)
SLACK = 4           # Engine.SPARE_SLACK here: a table of 6-7 entries counts in 10-11 of 64


@pytest.fixture
def sizes(monkeypatch):
    """A helper's engine (engine.AFTER_REPLY) with the sizes scaled to small tables; no first
    spare left behind for other tests."""
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    monkeypatch.setattr(engine.Engine, "SPARE_MIN", 1)
    monkeypatch.setattr(engine.Engine, "SPARE_SLACK", SLACK)
    monkeypatch.setattr(engine, "FIRST_SPARE_MAX", SPARE)
    monkeypatch.setattr(engine, "READER_MIN", 1)      # the in-kernel reader for these too
    engine.drop_first_spare()
    try:
        yield
    finally:
        engine.drop_first_spare()
        engine.AFTER_REPLY.clear()


def _made_counters_maps(monkeypatch) -> list:
    """The max_entries of every counters map created from now on (any thread)."""
    made = []
    real = K.Map.create.__func__

    def create(cls, map_type, key_size, value_size, max_entries, name="", *a, **kw):
        if name == engine.COUNTERS_MAP_NAME:
            made.append(max_entries)
        return real(cls, map_type, key_size, value_size, max_entries, name, *a, **kw)
    monkeypatch.setattr(K.Map, "create", classmethod(create))
    return made


def _spare_map():
    """The first spare, once the worker has made it (without taking it)."""
    job = engine._first_spare
    assert job is not None
    return job.result()


def test_idle_steps_queue_it_once(sizes):
    from bpfilter_umh import __main__ as m
    saved = list(m._idle_work)
    m._idle_work[:] = []
    try:
        m.queue_start_work()
        m._idle_work[1:] = []           # not the heap reserve's steps
        while m._idle_step():
            pass
    finally:
        m._idle_work[:] = saved
    job = engine._first_spare
    assert job is not None and job.entries == SPARE == engine.first_spare_entries()
    spare = _spare_map()
    assert (spare.map_type, spare.max_entries) == (K.BPF_MAP_TYPE_PERCPU_ARRAY, SPARE)
    engine.make_first_spare()
    assert engine._first_spare is job           # once per process


def test_no_first_spare_where_it_would_be_too_small(sizes, monkeypatch):
    monkeypatch.setattr(engine.Engine, "SPARE_MIN", SPARE + 1)
    assert engine.first_spare_entries() == 0
    engine.make_first_spare()
    assert engine._first_spare is None


def test_first_install_runs_on_it(sizes, monkeypatch):
    engine.make_first_spare()
    spare = _spare_map()
    spare_id = spare.info()["id"]
    second = engine._second_spare
    second_id = second.result().info()["id"]
    made = _made_counters_maps(monkeypatch)
    t1, t2 = _small_tables()
    n1 = engine._entry_count(t1)
    with netns_engine("ifs") as eng:
        eng.install(t1)
        assert made == []                   # no counters map made by the install
        assert engine._first_spare is second and engine._second_spare is None
        engine.run_after_reply()            # the reader (no spare: the second one serves)
        assert made == [] and eng._spare is None
        cnt = eng._counters_map()
        assert cnt.info()["id"] == spare_id
        assert engine._counted(cnt) == n1 + SLACK
        reader = cnt.__dict__.get("_sums_reader")
        assert reader and reader.entries == n1 + SLACK
        assert eng.counters() == [(0, 0)] * n1
        _count(cnt, 0, 3, 300)
        _count(cnt, n1 - 1, 1, 100)
        assert eng.counters_nonzero() == {0: (3, 300), n1 - 1: (1, 100)}
        # replaced: its counts are returned, and it is zeroed for a later install; the second
        # install runs on the second spare, and makes no map either
        old = eng.install(t2)
        assert old == [(3, 300)] + [(0, 0)] * (n1 - 2) + [(1, 100)]
        assert made == [] and engine._first_spare is None
        assert eng._counters_map().info()["id"] == second_id
        assert engine._counted(eng._counters_map()) == engine._entry_count(t2) + SLACK
        at = t2.chain("INPUT").rules[-1].index
        eng.add_counters(old[:at] + [(0, 0)] + old[at:])
        assert eng.counters() == old[:at] + [(0, 0)] + old[at:]
        engine.run_after_reply()
        # the third install recycles it (_MapsAgain: sized by _counted, as a map made for t1)
        eng.install(t1)
        again = eng._counters_map()
        assert again.info()["id"] == spare_id
        assert eng.counters() == [(0, 0)] * n1
        engine.run_after_reply()


def test_a_table_it_does_not_fit_makes_its_own(sizes, monkeypatch):
    monkeypatch.setattr(engine.Engine, "SPARE_MIN", 7)
    t1, _t2 = _small_tables()
    assert engine._entry_count(t1) < 7
    engine.make_first_spare()
    spare = _spare_map()
    made = _made_counters_maps(monkeypatch)
    second = engine._second_spare
    with netns_engine("ifn") as eng:
        eng.install(t1)
        assert engine._first_spare is None and engine._second_spare is None
        cnt = eng._counters_map()
        assert cnt.max_entries == engine._entry_count(t1) == engine._counted(cnt)
        assert made[:1] == [engine._entry_count(t1)]
        engine._worker(lambda: None).result()     # the worker's jobs before it are over
        assert spare.fd == -1                       # closed by the worker
        _second_given_up(second)
        engine.run_after_reply()


def _second_given_up(second):
    """The second spare closed by its thread, or never made (its job ended empty)."""
    engine._worker(lambda: None).result()   # the worker has started its thread, or not
    t = engine._second_thread
    if t is not None:
        t.join(10)
    assert second.done.is_set() and second.unwanted and second.error is None
    assert second.value is None or second.value.fd == -1


def test_drop_gives_up_both(sizes):
    engine.make_first_spare()
    first, second = _spare_map(), engine._second_spare
    engine.drop_first_spare()
    assert first.fd == -1
    assert engine._first_spare is None and engine._second_spare is None
    _second_given_up(second)


def test_a_second_spare_given_up_before_its_thread_is_never_made(sizes, monkeypatch):
    """The worker starts the second spare's thread after the first spare's job; given up before
    that (the first install did not fit), it is not made at all."""
    gate = engine._Job(lambda: None)
    engine._worker(gate.done.wait)      # the worker waits here, before both spares' jobs
    made = _made_counters_maps(monkeypatch)
    try:
        engine.make_first_spare()
        second = engine._second_spare
        engine._give_up_second(second)
    finally:
        gate.done.set()
    engine._worker(lambda: None).result()
    assert second.done.is_set() and second.value is None
    assert made == [SPARE]              # the first spare alone
    _second_given_up(second)


def test_a_larger_table_makes_its_own(sizes, monkeypatch):
    monkeypatch.setattr(engine, "FIRST_SPARE_MAX", 4)
    t1, _t2 = _small_tables()
    assert engine._entry_count(t1) > 4
    engine.make_first_spare()
    spare = _spare_map()
    with netns_engine("ifl") as eng:
        eng.install(t1)
        cnt = eng._counters_map()
        assert cnt.max_entries == engine._entry_count(t1) + SLACK
        engine._worker(lambda: None).result()
        assert spare.fd == -1
        assert eng.counters() == [(0, 0)] * engine._entry_count(t1)
        engine.run_after_reply()


def test_a_refused_spare_leaves_the_install_its_own(sizes, monkeypatch):
    real = K.Map.create.__func__

    def refuse(cls, *a, **kw):
        raise BpfilterError(12, "BPF_MAP_CREATE: refused here")
    monkeypatch.setattr(K.Map, "create", classmethod(refuse))
    engine.make_first_spare()
    with pytest.raises(BpfilterError):
        engine._first_spare.result()
    monkeypatch.setattr(K.Map, "create", classmethod(real))
    t1, _t2 = _small_tables()
    with netns_engine("ifr") as eng:
        eng.install(t1)
        assert engine._first_spare is None
        assert eng._counters_map().max_entries == engine._entry_count(t1) + SLACK
        assert eng.counters() == [(0, 0)] * engine._entry_count(t1)
        engine.run_after_reply()


def test_exit_waits_for_the_workers_jobs(tmp_path):
    done = tmp_path / "done"
    script = f"""
import sys, time
sys.path.insert(0, {ROOT!r})
from bpfilter_umh import engine
def job():
    time.sleep(0.3)
    open({str(done)!r}, "w").close()
engine._worker(job)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert done.exists()
