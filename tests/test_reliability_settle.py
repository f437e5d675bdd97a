"""Issue #9, the two-step commit under concurrency: an install killed between its swaps and its
commit leaves <fam>.table.pending behind, and the next Engine.open settles it. When several
processes open the engine at once (the shared helper, a door's private helper, `bpfilter status`,
the kernel shim's helper), all of them see the dead writer's pending file. Each must come out
with the settled state; before settling was serialized, the first renamed the file over the
state and every other one failed in os.replace with FileNotFoundError, which reached iptables
as ENOENT: "iptables: No chain/target/match by that name." (the message of the lost update seen
once in a 10 000-invocation run).
"""
import os
import subprocess
import sys
import time

import pytest

from test_reliability_util import flush_engine, two_rulesets, udp_lab
import test_reliability_faults as F
from bpfilter_umh.engine import Engine

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENERS = 4

# one opener: waits for a common start time (imports take long and vary), opens the engine and
# prints the generation and the INPUT rule 7002's verdict it adopted
OPENER = """
import sys, time
sys.path[:0] = [{root!r}]
from bpfilter_umh.sockopt import use_host_bpffs
use_host_bpffs()
from bpfilter_umh.engine import Engine
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.0005)
try:
    e = Engine.open()
    print("ok", e.generation, e.table.chain("INPUT").rules[1].target.verdict)
except BaseException as x:
    print("FAIL", type(x).__name__, x)
"""


def concurrent_opens(b, n: int = OPENERS) -> list:
    """n processes in b calling Engine.open() at the same instant: their last output lines."""
    code = OPENER.format(root=ROOT)
    start = time.time() + 2.0
    procs = [subprocess.Popen(["ip", "netns", "exec", b.name, sys.executable, "-c", code,
                               str(start)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=b.env) for _ in range(n)]
    out = []
    for p in procs:
        try:
            text = p.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            p.kill()                            # our own child, by its pid
            text = p.communicate()[0] + "\nFAIL timeout"
        out.append((text.strip().splitlines() or ["FAIL no output"])[-1])
    return out


@pytest.fixture
def lab():
    with udp_lab(flush_engine) as lab:
        yield lab


@pytest.mark.parametrize("fault", [
    "after_swap=kill",      # every hook swapped, not committed: settling renames the file
    "swap=kill@1",          # INPUT swapped, OUTPUT not: settling also rolls forward
])
def test_concurrent_opens_settle_a_dead_writers_install_once(lab, fault):
    a, b, probe = lab
    ta, _tb = two_rulesets()
    with b.inside():
        Engine.open().install(ta)
    F._killed_install(b, fault)
    out = concurrent_opens(b)
    assert all(o.startswith("ok") for o in out), out
    # every opener adopted ruleset B (port 7002 ACCEPT: verdict -2); with a roll forward, one
    # that opened while the winner re-installed B has B's previous generation (its helper
    # re-adopts on the state file's change, sockopt.Backend.refresh)
    assert all(o.endswith(" -2") for o in out), out
    with b.inside():
        eng = Engine.open()
        assert not os.path.exists(eng._pending_path)
        assert f"ok {eng.generation} -2" in out
        assert set(eng._slot_ids()) == {1, 2, 3}
        progs = eng._installed_programs()
    # every hook runs the same generation: one counters map
    maps = {tuple(p.info()["map_ids"]) for p in progs.values()}
    for p in progs.values():
        p.close()
    assert len(maps) == 1
    assert probe.verdicts(wait=0.5) == F.B_VERDICTS
