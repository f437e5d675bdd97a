"""Named fault-injection points, so the reliability tests can make each step of an install fail
on the real kernel and check that the previous ruleset keeps filtering.

The engine calls `faults.point(NAME)` at the places listed in POINTS.  Nothing happens unless the
point is armed, either in-process (`arm`, used by tests that drive Engine directly) or through the
environment of a helper process:

    BPFILTER_FAULTS="after_load=kill"            SIGKILL the helper between load and attach
    BPFILTER_FAULTS="swap=error:EIO@1"           fail the 2nd hook swap (after 1 succeeded)
    BPFILTER_FAULTS="map_create=error:ENOMEM"    as if the memory cgroup refused the map
                                       (the real refusal: tests/test_reliability_kernel_faults.py)

Actions:
    error:ERRNO   raise BpfilterError(ERRNO, "injected fault at NAME")
    kill          SIGKILL this process (a crash: no finally blocks, no atexit)
    on            return True: the engine then does the real thing that fails (e.g. hands the
                  verifier a program it must refuse), so the kernel's own error path is exercised
`@N` skips the first N passes through the point.  Each armed point fires once, then disarms.
"""
from __future__ import annotations

import errno as _errno
import os
import signal

from .errors import BpfilterError

POINTS = {
    "compile": "before compiling the new table",
    "map_create": "before creating the new counters map",
    "verifier": "at each program load: 'on' makes the verifier refuse the program",
    "after_load": "every program loaded, nothing swapped yet",
    "swap": "before each per-hook swap (use @N to fail half way)",
    "stale": "every hook swapped, slots a flavor switch left behind not yet emptied",
    "after_swap": "every hook swapped, state file not yet written",
}

_armed: dict = {}       # name -> [action, skip]
_env_seen = None
fired: list = []        # names of points that fired in this process (for reports)


def arm(name: str, action: str = "error:EIO", skip: int = 0):
    if name not in POINTS:
        raise BpfilterError(_errno.EINVAL, f"no fault point {name!r} (have {sorted(POINTS)})")
    _parse_action(action)
    _armed[name] = [action, skip]


def disarm(name: str = None):
    if name is None:
        _armed.clear()
    else:
        _armed.pop(name, None)


def _parse_action(action: str):
    if action in ("kill", "on"):
        return action, None
    kind, _, code = action.partition(":")
    if kind == "error":
        err = getattr(_errno, code, None) if not code.isdigit() else int(code)
        if err:
            return kind, err
    raise BpfilterError(_errno.EINVAL, f"bad fault action {action!r}")


def _load_env():
    """Arm what BPFILTER_FAULTS names (once per value, so a test can change it)."""
    global _env_seen
    spec = os.environ.get("BPFILTER_FAULTS", "")
    if spec == _env_seen:
        return
    _env_seen = spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        action, _, skip = (action or "error:EIO").partition("@")
        arm(name, action, int(skip or 0))


def point(name: str) -> bool:
    _load_env()
    slot = _armed.get(name)
    if slot is None:
        return False
    if slot[1] > 0:
        slot[1] -= 1
        return False
    del _armed[name]
    fired.append(name)
    kind, err = _parse_action(slot[0])
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "on":
        return True
    raise BpfilterError(err, f"injected fault at {name}")
