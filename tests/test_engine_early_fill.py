"""A classifier map made and filled while the table still compiles (issue #7: a cold restore's
wait for a 10 000-prefix trie's inserts, engine.Engine._start_fill through classify.SPEC_MADE),
and the install's short GIL switch interval (engine._worker_served). What must hold:

  - a new MapSpec's map is created during the compile and its fill queued then; the program
    loads with that very map (no second map is made and filled), which is full before any
    program is attached, however long the kernel's inserts take;
  - a fill that fails fails the install with its errno; a compile or load that fails after an
    early fill started fails as before, leaves the previous ruleset filtering and no
    descriptor open, and no early map behind;
  - the hook is set only during an install's compile, and the switch interval comes back;
  - a helper's warm-up reads its own start time (_me) before the first install needs it.
"""
import errno
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from test_cplane_scale import netns_engine  # noqa: E402
from test_engine_install_overlap import _blocklist, _slot_maps  # noqa: E402
from test_engine_install_overlap import _refused_keeps_old as refused_keeps_old  # noqa: E402

from bpfilter_umh import attach, classify, daemons, engine  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def _slow_fills(monkeypatch, seconds: float):
    """Every early fill (a map of EARLY_FILL_MIN entries or more) takes `seconds` longer."""
    real_fill = engine._fill_prepared

    def slow(m, entries, batch):
        if len(entries) >= engine.Engine.EARLY_FILL_MIN:
            time.sleep(seconds)
        return real_fill(m, entries, batch)
    monkeypatch.setattr(engine, "_fill_prepared", slow)


@pytest.fixture
def eng():
    # cold compile caches: a kept program (compile._PROG_CACHE) makes no MapSpec at all
    classify._RUN_SPECS.clear()
    C._PROG_CACHE.clear()
    with netns_engine("ief") as e:
        yield e


def _trie_id(eng) -> int:
    """The id of the trie INPUT's installed program uses."""
    maps = _slot_maps(eng)
    try:
        assert "bpfilter_lpm" in maps, "INPUT's program has no trie"
        return maps["bpfilter_lpm"].info()["id"]
    finally:
        for m in maps.values():
            m.close()


def test_trie_made_while_compiling_is_the_one_loaded(eng, monkeypatch):
    made = []           # (map id, fill job) of each map made during the compile
    real_compile = engine.Engine._compile_plan

    def compile_plan(self, table):
        out = real_compile(self, table)
        made.extend((m.info()["id"], job) for _s, m, job in self._early_fills.values())
        assert classify.SPEC_MADE is not None
        return out
    monkeypatch.setattr(engine.Engine, "_compile_plan", compile_plan)
    eng.install(_blocklist(21))
    assert len(made) == 1, "the trie was not made during the compile"
    assert _trie_id(eng) == made[0][0], "the program loaded another map than the early one"
    assert made[0][1].done.is_set()
    assert eng._early_fills == {}
    assert classify.SPEC_MADE is None


def test_slow_early_fill_is_over_before_any_attach(eng, monkeypatch):
    """The kernel's inserts taking longer than everything else: no hook is swapped before the
    trie is full."""
    _slow_fills(monkeypatch, 0.3)
    seen, early = [], []
    real_start = engine.Engine._start_fill

    def start(self, spec):
        real_start(self, spec)
        early.extend(m.info()["id"] for _s, m, _j in self._early_fills.values())
    monkeypatch.setattr(engine.Engine, "_start_fill", start)
    real_swap = attach.NfAttachment.swap

    def swap(self, hook, prog):
        for i in prog.info()["map_ids"]:
            m = K.Map.from_id(i)
            try:
                if m.name == "bpfilter_lpm":
                    seen.append((i, sum(1 for _ in m.keys())))
            finally:
                m.close()
        return real_swap(self, hook, prog)
    monkeypatch.setattr(attach.NfAttachment, "swap", swap)
    eng.install(_blocklist(22))
    spec = next(s for s, _m in eng._cls_maps.values() if s.kname == "bpfilter_lpm")
    assert early, "the trie was not made during the compile"
    assert seen == [(early[0], len(spec.entries))]


def _refused_keeps_old(eng, new_table, err: int):
    """test_engine_install_overlap's checks of a refused install, and no early map left."""
    refused_keeps_old(eng, new_table, err)
    assert eng._early_fills == {}
    assert classify.SPEC_MADE is None


def test_failed_early_fill_fails_the_install(eng, monkeypatch):
    eng.install(_blocklist(23))
    real = engine._fill_prepared
    started = []

    def refused(m, entries, batch):
        if len(entries) >= engine.Engine.EARLY_FILL_MIN:
            started.append(len(entries))
            raise BpfilterError(errno.E2BIG, "injected: the trie's inserts failed")
        return real(m, entries, batch)
    monkeypatch.setattr(engine, "_fill_prepared", refused)
    _refused_keeps_old(eng, _blocklist(24), errno.E2BIG)
    assert started, "no early fill ran"
    monkeypatch.setattr(engine, "_fill_prepared", real)
    eng.install(_blocklist(24))


@pytest.mark.parametrize("where", ["compile", "load"])
def test_failure_after_an_early_fill_keeps_the_old_ruleset(eng, monkeypatch, where):
    eng.install(_blocklist(25))
    # still filling when the install fails: its descriptor must be closed before the error
    _slow_fills(monkeypatch, 0.2)
    started = []
    real_start = engine.Engine._start_fill

    def start(self, spec):
        real_start(self, spec)
        started.extend(self._early_fills)
    monkeypatch.setattr(engine.Engine, "_start_fill", start)
    if where == "compile":
        real_compile = engine.Engine._compile_plan

        def compile_plan(self, table):
            real_compile(self, table)
            raise BpfilterError(errno.EINVAL, "injected: a later chain does not compile")
        monkeypatch.setattr(engine.Engine, "_compile_plan", compile_plan)
        err = errno.EINVAL
    else:
        def load(*a, **kw):
            raise BpfilterError(errno.EACCES, "injected: the verifier refused it")
        monkeypatch.setattr(K.Prog, "load", load)
        monkeypatch.setattr(engine, "load_with_func_info", load)
        err = errno.EACCES
    _refused_keeps_old(eng, _blocklist(26), err)
    assert started, "no early fill ran"


def test_switch_interval_short_during_the_install_only(eng, monkeypatch):
    saved = sys.getswitchinterval()
    sys.setswitchinterval(0.004)        # whatever an earlier install left, a known value
    before = sys.getswitchinterval()
    during = []
    real_compile = engine.Engine._compile_plan

    def compile_plan(self, table):
        during.append(sys.getswitchinterval())
        return real_compile(self, table)
    monkeypatch.setattr(engine.Engine, "_compile_plan", compile_plan)
    try:
        eng.install(_blocklist(27))
        after = sys.getswitchinterval()
    finally:
        sys.setswitchinterval(saved)
    assert during == [pytest.approx(engine.WORKER_SWITCH)]
    assert after == pytest.approx(before)


def test_warm_up_reads_the_start_time(eng, monkeypatch):
    monkeypatch.setattr(engine, "_ME", None)
    engine.warm_up()

    def gone(pid):
        raise AssertionError("the first install read /proc for the helper's start time")
    monkeypatch.setattr(daemons, "start_time", gone)
    eng.install(_blocklist(28))
    assert engine._me() == [os.getpid(), engine._ME[1]] and engine._ME[1] is not None
