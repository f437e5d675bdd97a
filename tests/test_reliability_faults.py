"""Issue #9, faults: each step of an install made to fail on the real kernel (bpfilter_umh/faults.py
points) — verifier rejection, counters map creation refused, attach failing half way, the helper
killed between load and attach and between attach and commit. Every failure leaves the previous
ruleset filtering real UDP traffic, returns a precise errno, and leaks no fd, pin or program."""
import errno
import os
import sys

import pytest

from test_reliability_util import (A_VERDICTS, B_VERDICTS, flush_engine, open_fds, pin_files,
                                   two_rulesets, udp_lab)
from bpfilter_umh import faults
from bpfilter_umh.engine import Engine
from bpfilter_umh.errors import BpfilterError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def lab():
    with udp_lab(flush_engine) as lab:
        yield lab


def _slots(b):
    with b.inside():
        eng = Engine.open()
        return eng, eng._slot_ids()


@pytest.mark.parametrize("point,action,want", [
    ("verifier", "on", errno.EINVAL),             # real verifier: "unreachable insn"
    ("map_create", "error:ENOMEM", errno.ENOMEM),
    ("compile", "error:EOPNOTSUPP", errno.EOPNOTSUPP),
    ("after_load", "error:EIO", errno.EIO),
    ("swap", "error:EBUSY@1", errno.EBUSY),       # INPUT swapped, OUTPUT fails: INPUT rolled back
])
def test_fault_keeps_previous_ruleset(lab, point, action, want):
    a, b, probe = lab
    ta, tb = two_rulesets()
    with b.inside():
        eng = Engine.open()
        eng.install(ta)
    assert probe.verdicts() == A_VERDICTS
    _e, before = _slots(b)
    fds, pins = open_fds(), pin_files(eng)
    name, _, skip = action.partition("@")
    faults.arm(point, name, int(skip or 0))
    with b.inside():
        with pytest.raises(BpfilterError) as ei:
            eng.install(tb)
    assert point in faults.fired
    assert ei.value.errno == want, ei.value
    if point == "verifier":
        assert "the kernel refused the compiled program" in ei.value.message
    assert probe.verdicts() == A_VERDICTS, "the previous ruleset must keep filtering"
    eng2, after = _slots(b)
    assert after == before, "the slots must hold the previous programs"
    assert open_fds() <= fds and pin_files(eng) == pins, "no fd or pin leaked"
    assert not os.path.exists(eng._pending_path)
    # the previous table is what a new engine adopts, with its counters
    assert eng2.table.chain("INPUT").rules[1].target.verdict == -1 - 0     # DROP
    with b.inside():
        c = eng2.counters()
    assert c[1][0] >= 2 and c[0][0] >= 2
    # and the next install works
    with b.inside():
        eng.install(tb)
    assert probe.verdicts() == B_VERDICTS


HELPER = """
import os, sys
sys.path[:0] = [{tests!r}, {root!r}]
from bpfilter_umh.sockopt import use_host_bpffs
use_host_bpffs()
from test_reliability_util import two_rulesets
from bpfilter_umh.engine import Engine
Engine.open().install(two_rulesets()[1])
print("installed")
"""


def _killed_install(b, fault: str):
    code = HELPER.format(tests=os.path.join(ROOT, "tests"), root=ROOT)
    env = dict(b.env, BPFILTER_FAULTS=fault)
    p = b.run([sys.executable, "-c", code], check=False, env=env)
    assert p.returncode == -9 or p.returncode == 137, (p.returncode, p.stdout, p.stderr)
    assert "installed" not in p.stdout


@pytest.mark.parametrize("fault,adopted", [
    ("after_load=kill", "A"),          # nothing swapped: A filters, A is adopted
    ("swap=kill@1", "B"),              # INPUT swapped, OUTPUT not: rolled forward to B
    ("after_swap=kill", "B"),          # all swapped, state not committed: B is adopted
])
def test_helper_killed_during_install(lab, fault, adopted):
    a, b, probe = lab
    ta, tb = two_rulesets()
    with b.inside():
        Engine.open().install(ta)
    assert probe.verdicts() == A_VERDICTS
    _killed_install(b, fault)
    if fault.startswith("after_load"):
        # the crash happened before any swap: the kernel freed the new programs with the process
        assert probe.verdicts() == A_VERDICTS
    with b.inside():
        eng = Engine.open()             # settles a pending commit (rolls forward if partial)
        assert not os.path.exists(eng._pending_path)
        flip = eng.table.chain("INPUT").rules[1].target.verdict
    assert flip == (-1 if adopted == "A" else -2)
    assert probe.verdicts() == (A_VERDICTS if adopted == "A" else B_VERDICTS)
    with b.inside():
        eng = Engine.open()
        ids = eng._slot_ids()
        st = eng.status()
    assert set(ids) == {1, 2, 3} and st["generation"] >= 1
    # one map per generation: both hooks count into the same counters map
    maps = set()
    with b.inside():
        progs = eng._installed_programs()
    for p in progs.values():
        maps.add(tuple(p.info()["map_ids"]))
        p.close()
    assert len(maps) == 1


def test_state_without_pins_starts_fresh_and_flushes(lab):
    """The pins went (bpffs remounted, rm -r) but the state file stayed: nothing of that table
    is enforced, so the engine starts from the empty table and says why; flush and install
    work (before, Engine.open failed and even `bpfilter flush` could not clean up)."""
    import shutil
    a, b, probe = lab
    ta, tb = two_rulesets()
    with b.inside():
        eng = Engine.open()
        eng.install(ta)
    assert probe.verdicts() == A_VERDICTS
    shutil.rmtree(eng.pin_dir)              # links unpinned: the kernel detaches them
    with b.inside():
        eng2 = Engine.open()
        assert "pins" in eng2.status()["error"] and eng2.table.num_entries == 4
        eng2.install(tb)
    assert probe.verdicts() == B_VERDICTS
    with b.inside():
        Engine.open().flush()
        assert not os.path.exists(eng.state_path) and not os.path.exists(eng.pin_dir)
