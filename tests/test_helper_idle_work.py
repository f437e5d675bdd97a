"""A helper's work between requests (__main__.queue_start_work): the heap its first restore's
objects come from is faulted in while no request waits (heap.reserve_steps), so the first
SET_REPLACE of a fresh helper does not fault its pages in itself. What must hold:

  - after the warm-up, making ~8 MiB of small objects faults in a fraction of the pages it
    faults in a process without it (the arenas stay mapped);
  - both transports run the steps: the stdio helper (the kernel shim's channel) and the
    --listen helper, each still answering its requests.

Real helpers, in namespaces of ours.
"""
import contextlib
import ctypes
import os
import select
import subprocess
import sys
import time

import pytest

from bpfilter_umh import frames
from nsutil import Netns

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
WARMED = "heap reserve warmed"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

# a fresh interpreter: [warm-up], then the faults of making ~8 MiB of small objects
_FAULTS = """
import resource, sys
sys.path.insert(0, {root!r})
from bpfilter_umh import heap
if {warm}:
    for _step in heap.reserve_steps(16 << 20):     # 10 MiB of it in object arenas
        pass
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
keep = [(i, str(i) * 3, [i]) for i in range(40000)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(warm: bool, env: dict) -> int:
    p = subprocess.run([PY, "-c", _FAULTS.format(root=ROOT, warm=warm)], capture_output=True,
                       text=True, check=True, env=env)
    return int(p.stdout)


def _compiled_env(tmp_path) -> dict:
    """The environment of a helper run from compiled modules, as an installed package is:
    without them (PYTHONDONTWRITEBYTECODE, a fresh checkout) every import compiles its source,
    and the memory that compiling frees stays in the interpreter's arenas, where the objects
    measured then come from: the cold count fell below what the comparison needs (1 447 pages
    against ~2 400 with compiled modules). Compiled into a cache of the test's own
    (PYTHONPYCACHEPREFIX), not into the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    subprocess.run([PY, "-m", "compileall", "-q", os.path.join(ROOT, "bpfilter_umh")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return env


def test_warm_heap_serves_later_objects(tmp_path):
    env = _compiled_env(tmp_path)
    cold, warm = _faults(False, env), _faults(True, env)
    assert cold > 1500, cold        # the objects need ~2 000 fresh pages without it
    assert warm < cold / 4, (cold, warm)


def _env(ns, **kw):
    path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
    return dict(ns.env, PYTHONPATH=path, BPFILTER_LOG="DEBUG", **kw)


def _read_until(stream, text: str, timeout: float = 30.0) -> str:
    """stderr lines of a helper until one holds `text`; what was read."""
    seen, end = "", time.monotonic() + timeout
    while text not in seen and time.monotonic() < end:
        if select.select([stream], [], [], max(0.0, end - time.monotonic()))[0]:
            line = stream.readline()
            if not line:
                break
            seen += line.decode() if isinstance(line, bytes) else line
    return seen


@contextlib.contextmanager
def stdio_helper(ns, env: dict):
    """A helper on stdin/stdout (the kernel shim's transport) in `ns`; at the end its channel
    closed and a clean exit asserted, or it is killed."""
    helper = ns.popen([PY, "-m", "bpfilter_umh"], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield helper
        helper.stdin.close()
        assert helper.wait(timeout=30) == 0
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()


def stdio_get_info(helper):
    """IPT_SO_GET_INFO of "filter" sent to a stdio helper (the kernel shim's framing), answered."""
    info = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
    # cookie 0: the helper's own namespace (ours); pid: whose memory holds the buffer
    req = frames.Request(64, 0, 2, os.getpid(), 84, ctypes.addressof(info), 0)
    helper.stdin.write(req.pack())
    helper.stdin.flush()
    rep = frames.Reply.unpack(helper.stdout.read(frames.REPLY.size))
    assert (rep.status, rep.len) == (0, 84)


def test_stdio_helper_warms_between_requests():
    """The kernel shim's transport: a GET_INFO answered, the warm-up done while stdin is idle,
    and the helper ends cleanly when its channel closes."""
    with Netns("iw") as ns, stdio_helper(ns, _env(ns)) as helper:
        stdio_get_info(helper)
        seen = _read_until(helper.stderr, WARMED)
        assert WARMED in seen, seen


def test_listen_helper_warms_while_idle():
    """The --listen helper (what `bpfilter exec` starts): the warm-up done before it exits
    idle."""
    with Netns("iwl") as ns:
        helper = ns.popen([PY, "-m", "bpfilter_umh", "--listen"], cwd=ROOT,
                          env=_env(ns, BPFILTER_IDLE_EXIT="1"), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
        try:
            seen = _read_until(helper.stderr, WARMED)
            assert WARMED in seen, seen
            assert helper.wait(timeout=30) == 0
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
