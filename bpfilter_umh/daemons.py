"""The per-namespace processes bpfilter starts: the tc/xdp interface watcher (attach.py), the
REJECT/LOG responder (responder.py) and the addrtype route mirror (addrtype.py).

Each runs in the network namespace of the thread that starts it (clone copies the calling
thread's nsproxy, so a thread that did setns starts it in the target namespace), is found again
through a pid file under /run/bpfilter/<cookie>/, and is stopped by the install or flush that no
longer needs it. The pid file holds the pid and the process's start time: together they name
one process even after the pid is reused, and they are valid from the moment the child exists
(its command line is not: a just-forked child does not show it yet).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

READY_WAIT = 5.0        # at most this long for a new process to say it is ready
STOP_WAIT = 5.0         # at most this long for a stopped process to go


def start_time(pid: int):
    """Field 22 of /proc/PID/stat (clock ticks since boot); None if there is no such process or
    it has exited and waits to be reaped (a zombie, state Z or X, runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def running(pidfile: str):
    """The pid of the process the file names, if that very process still runs."""
    try:
        with open(pidfile) as f:
            pid, started = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    return pid if start_time(pid) == started else None


def start(pidfile: str, module: str, args=(), ready: bool = False) -> int:
    """Start `python3 -m module args` unless the pid file names a live process; returns the pid.
    With ready, the child gets a pipe's write end as its last argument and start() waits
    (bounded) until the child writes to it or closes it."""
    pid = running(pidfile)
    if pid is not None:
        return pid
    os.makedirs(os.path.dirname(pidfile), mode=0o700, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r, w = os.pipe() if ready else (-1, -1)
    try:
        argv = [sys.executable, "-m", module, *args] + ([str(w)] if ready else [])
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, env=env,
                             close_fds=True, pass_fds=(w,) if ready else ())
        if ready:
            os.close(w)
            w = -1
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{p.pid} {start_time(p.pid)}")
        os.replace(pidfile + ".tmp", pidfile)
        if ready:
            select.select([r], [], [], READY_WAIT)
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    return p.pid


def stop(pidfile: str):
    """SIGTERM the process the pid file names, wait (bounded) until it is gone, remove the file."""
    pid = running(pidfile)
    if pid is not None:
        started = start_time(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_WAIT
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break       # our child: reaped
            except ChildProcessError:
                if start_time(pid) != started:
                    break       # someone else's child: gone
            time.sleep(0.05)
    try:
        os.unlink(pidfile)
    except OSError:
        pass
