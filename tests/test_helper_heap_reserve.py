"""A helper's heap reserve (heap.py): the memory its first big commands take faulted in while it
is idle, not inside them; given back when its tables stay small; none with
BPFILTER_HEAP_RESERVE=0. What must hold:

  - a started helper's first restore of 10 000 rules (the fan-out: the shape that takes most
    memory) takes a fraction of the page faults in its SET_REPLACE (the helper's debug log line
    counts them) that a helper without the reserve takes, and so does the first append after it
    (what is left there is mostly the caller's own pages that process_vm_writev faults in,
    counted to the helper);
  - a big table keeps the reserve; a helper whose table is small releases it once idle, and its
    resident size falls back;
  - BPFILTER_HEAP_RESERVE=0: no reserve, and a smaller helper.

Real helpers, the launcher and iptables-legacy, in namespaces of ours.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from nsutil import Netns

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
LAUNCHER = os.path.join(ROOT, "build", "bpfilter-exec")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402

WARMED, RELEASED = "heap reserve warmed", "heap reserve released"
APPEND = "-A INPUT -s 203.0.113.99/32 -p tcp --dport 22 -j DROP"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


@pytest.fixture(scope="module", autouse=True)
def launcher():
    subprocess.run(["make", "-s", "-C", ROOT, "launcher", f"PYTHON={PY}"], check=True,
                   capture_output=True)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def _wait_for(log: str, text: str, helper, timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    while True:
        seen = open(log).read()
        if text in seen:
            return seen
        assert time.monotonic() < end and helper.poll() is None, seen[-3000:]
        time.sleep(0.05)


def _serve(text: str, reserve, appends: int = 0, idle: float = 0.0):
    """A --listen helper (BPFILTER_HEAP_RESERVE=reserve unless None), started and idle (its
    reserve warmed) before a restore of `text` and `appends` appends through the launcher; then
    `idle` seconds without a command. The faults of each SET_REPLACE, the helper's resident KiB
    once ready and after the idle time, and its log."""
    with Netns("hr") as ns:
        path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
        env = dict(ns.env, PYTHONPATH=path)
        log = os.path.join(ns._lockdir, "helper.log")
        henv = dict(env, BPFILTER_LOG="DEBUG", BPFILTER_IDLE_EXIT="10")
        if reserve is not None:
            henv["BPFILTER_HEAP_RESERVE"] = str(reserve)
        with open(log, "w") as err:
            helper = ns.popen([PY, "-m", "bpfilter_umh", "--listen"], cwd=ROOT, env=henv,
                              stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_for(log, "serving netns", helper)
            if reserve != 0:
                _wait_for(log, WARMED, helper)
            time.sleep(0.3)
            ready = _rss_kib(helper.pid)
            ns.run([LAUNCHER, "--", "iptables-legacy-restore"], input=text, env=env,
                   timeout=300)
            for k in range(appends):
                ns.run([LAUNCHER, "--", "iptables-legacy"] + APPEND.replace(
                    "99/", f"{99 - k}/").split(), env=env, timeout=300)
            time.sleep(idle)
            after = _rss_kib(helper.pid)
        finally:
            helper.kill()
            helper.wait()
            ns.run([PY, "-m", "bpfilter_umh.cli", "flush"], check=False, env=env)
        text = open(log).read()
    faults = [int(m.group(1)) for m in re.finditer(r"pid \d+ SET_REPLACE: [0-9.]+ ms, (\d+) faults",
                                                   text)]
    assert len(faults) == 1 + appends, text[-3000:]
    return faults, ready, after, text


def test_first_big_restore_and_append_fault_less():
    text = rulesets.make("fanout", 10000).text
    without, ready0, _after0, log0 = _serve(text, 0, appends=1)
    assert WARMED not in log0
    # then idle past heap.RELEASE_IDLE: a 10 000-rule table keeps the reserve
    warm, ready, _after, log = _serve(text, None, appends=1, idle=3.2)
    assert WARMED in log and RELEASED not in log, log[-3000:]
    assert without[0] > 3000, without          # ~4 000-6 600 pages without the reserve
    assert warm[0] < without[0] / 10, (warm, without)
    assert warm[1] < without[1] * 0.75, (warm, without)     # ~750 against ~1 300-1 900
    # the reserve is resident once the helper is ready; the knob's helper has none of it
    assert ready - ready0 > 24 << 10, (ready, ready0)


def test_small_table_gives_the_reserve_back():
    text = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" + \
        "".join(f"-A INPUT -s 192.0.2.{i}/32 -j DROP\n" for i in range(1, 11)) + "COMMIT\n"
    _faults, ready, after, log = _serve(text, None, idle=3.2)
    assert RELEASED in log, log[-3000:]
    # 48 MiB but the 12 MiB of arenas and the 8 MiB heap top a released reserve keeps (~26)
    assert ready - after > 16 << 10, (ready, after)


def test_stdio_helper_gives_the_reserve_back():
    """The kernel shim's transport: its helper lives as long as the shim, so it too gives a
    reserve its (empty) tables do not need back once idle; and it still answers after that."""
    import select
    from test_helper_idle_work import stdio_get_info, stdio_helper
    with Netns("hrs") as ns:
        path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
        with stdio_helper(ns, dict(ns.env, PYTHONPATH=path, BPFILTER_LOG="DEBUG")) as helper:
            seen, end = "", time.monotonic() + 30
            while RELEASED not in seen and time.monotonic() < end:
                if select.select([helper.stderr], [], [], 1.0)[0]:
                    seen += helper.stderr.readline().decode()
            assert WARMED in seen and RELEASED in seen, seen
            stdio_get_info(helper)


_START = """
import resource
from bpfilter_umh import engine, heap
heap.configure()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f0 = faults()
engine.warm_up()
start = faults() - f0
steps = heap.reserve_steps()
for _ in range((heap.REQUEST_BUFFER >> 20) + 1 if heap.RESERVE else 0):
    next(steps)
f0 = faults()
blob = bytearray(3 << 20)   # a fan-out's 2.8 MB SET_REPLACE buffer, written as it is read
print(start, faults() - f0)
"""


def _start_faults(reserve: str) -> tuple:
    """(page faults of engine.warm_up, before a helper serves; those of a 3 MiB request buffer
    after the reserve's first REQUEST_BUFFER steps) in a fresh process."""
    env = dict(os.environ, BPFILTER_HEAP_RESERVE=reserve,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([PY, "-c", _START], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(int(x) for x in out.stdout.split())


def test_request_buffer_heap_is_idle_work_not_start_up():
    """A helper with a reserve serves without first faulting in the heap a SET_REPLACE's
    buffer takes (engine._prefault_heap: ~2 000 pages, 7.5-9 ms of every on-demand start);
    the reserve's first idle steps do it, so a restore coming in those first steps finds it;
    a helper without a reserve still prefaults it at its start."""
    on, off = _start_faults("48"), _start_faults("0")
    assert on[0] < 1000, on                    # ~20
    assert on[1] < 64, on                      # 768 if the reserve faulted its arenas first
    assert off[0] > on[0] + 1500, (on, off)    # ~3 470: the heap prefaulted at the start
