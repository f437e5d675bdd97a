"""engine._me, the writer a state file names (engine._alive tells a crashed writer from a
live one by it): this process's pid and start time, read from /proc once per process, and a
forked child's own."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bpfilter_umh import daemons, engine  # noqa: E402


def test_me_is_this_process_and_a_forked_childs_own():
    want = [os.getpid(), daemons.start_time(os.getpid())]
    assert want[1] is not None
    assert engine._me() == want and engine._me() == want
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:        # the child: its own pid and start time, not the parent's remembered
        try:
            ok = engine._me() == [os.getpid(), daemons.start_time(os.getpid())] and \
                engine._me()[0] != want[0]
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"1"
    # the parent is not a live writer of its own (_alive: "and not us"); another pid with the
    # start time read is not this process
    assert not engine._alive(engine._me())
    assert engine._alive([pid, want[1]]) is False
