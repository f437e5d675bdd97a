"""A new helper sets up in its first idle moments what its first command's requests would
otherwise set up inside them (__main__._first_command_steps): the doorserve import that the first
BPFILTER_CMD_ADOPT of bin/bpfilter-exec made, the IPv4 backend of its own namespace and its
encoding, which the first GET_INFO made. What must hold:

  - the idle steps leave doorserve imported and that backend, encoded, where a request of the
    helper's namespace finds it: the first GET_INFO then answers from it (same backend object,
    no new engine) with the kernel's empty filter table;
  - a state changed by someone else between the warm-up and the first request is re-adopted,
    not answered from the warm-up (Backend.refresh);
  - a real --listen helper runs the steps (its log says so) before the heap's, and a command
    through the launcher is then served.

Real helpers and engines, in namespaces of ours.
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest

from nsutil import Netns

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
LAUNCHER = os.path.join(ROOT, "build", "bpfilter-exec")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

# in a fresh namespace: a helper's dispatcher, the start-up work run as the serve loops run it
# (BPFILTER_HEAP_RESERVE=0: no heap steps), then GET_INFO served from our own memory
_WARM = r"""
import ctypes, json, os, subprocess, sys
sys.path.insert(0, {root!r})
from bpfilter_umh import __main__ as m, frames
from bpfilter_umh.sockopt import Dispatcher
d = Dispatcher(door=True)
m.preload()
seen = dict(doorserve_before="bpfilter_umh.doorserve" in sys.modules)
m.queue_start_work(d, listen=True)
while m._idle_step():
    pass
key = (d.home_cookie, 2)
be = d.backends.get(key)
seen.update(doorserve="bpfilter_umh.doorserve" in sys.modules, backend=be is not None,
            encoded=be is not None and be._snap is not None)
if {restore!r}:
    # someone else installs a table meanwhile (a second helper, the Python door's own)
    subprocess.run({restore!r}, input={text!r}, text=True, check=True)
opened = []
import bpfilter_umh.sockopt as so
orig = so.Backend.__init__
so.Backend.__init__ = lambda self, fam: (opened.append(fam), orig(self, fam))[1]
info = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
rep = d.serve(frames.Request(64, 0, 2, os.getpid(), 84, ctypes.addressof(info), 0))
seen.update(status=rep.status, same=d.backends.get(key) is be, opened=opened,
            num_entries=int.from_bytes(info.raw[76:80], "little"))   # ipt_getinfo
print(json.dumps(seen))
"""

TEXT = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -s 192.0.2.1/32 -j DROP
-A INPUT -s 192.0.2.2/32 -j DROP
COMMIT
"""


@contextlib.contextmanager
def flushed_netns(tag: str):
    """A namespace of ours whose bpfilter state is flushed before it is deleted, whatever
    happens: `ip netns del` alone leaves the pins and /run/bpfilter/<cookie> of a table installed
    in it (gc.py's leftovers), and a restore here installs one through the door's own helper."""
    with Netns(tag) as ns:
        try:
            yield ns
        finally:
            ns.run([PY, "-m", "bpfilter_umh.cli", "flush"], env=dict(ns.env, PYTHONPATH=ROOT),
                   check=False)


def _warm(ns, restore=None) -> dict:
    env = dict(ns.env, BPFILTER_HEAP_RESERVE="0", PYTHONPATH=ROOT)
    p = ns.run([PY, "-c", _WARM.format(root=ROOT, restore=restore, text=TEXT)], env=env,
               check=True, timeout=120)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_first_command_set_up_while_idle():
    with flushed_netns("fc") as ns:
        seen = _warm(ns)
        assert not seen["doorserve_before"], seen       # else the test proves nothing
        assert seen["doorserve"] and seen["backend"] and seen["encoded"], seen
        # GET_INFO answered from the warmed backend, no Backend made: the empty table's
        # 4 entries (the three policies and the error entry)
        assert seen["status"] == 0 and seen["same"] and seen["opened"] == [], seen
        assert seen["num_entries"] == 4, seen


def test_state_changed_after_warm_up_is_readopted():
    """A table installed by another process after the warm-up: the first GET_INFO sees it."""
    with flushed_netns("fcr") as ns:
        door = [PY, "-S", os.path.join(ROOT, "bin", "bpfilter"), "exec", "--",
                "iptables-legacy-restore"]
        seen = _warm(ns, restore=door)
        assert seen["status"] == 0, seen
        assert seen["num_entries"] == 6, seen


def test_listen_helper_then_launcher():
    """The --listen helper warms up, exits idle, and serves a command through the launcher in
    between (the launcher hands it the door: BPFILTER_CMD_ADOPT)."""
    if not os.path.exists(LAUNCHER):
        subprocess.run(["make", "-C", ROOT, "launcher"], check=True, capture_output=True)
    with flushed_netns("fcl") as ns:
        env = dict(ns.env, PYTHONPATH=ROOT, BPFILTER_LOG="DEBUG", BPFILTER_IDLE_EXIT="2")
        helper = ns.popen([PY, "-m", "bpfilter_umh", "--listen"], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            out = ""
            while "heap reserve warmed" not in out:
                line = helper.stderr.readline()
                assert line, out
                out += line
            # before the heap's steps: the door's code and the table, before any command came
            assert "set up while idle: the door's serving code, the IPv4 table (4 entries)" \
                in out.split("heap reserve warmed")[0], out
            p = ns.run([LAUNCHER, "--", "iptables-legacy-restore"], input=TEXT, env=env,
                       check=False)
            assert p.returncode == 0, p.stderr
            p = ns.run([LAUNCHER, "--", "iptables-legacy", "-S", "INPUT"], env=env)
            assert "-A INPUT -s 192.0.2.2/32 -j DROP" in p.stdout, p.stdout
            assert helper.wait(timeout=60) == 0
            out += helper.stderr.read()
            assert "work while idle failed" not in out, out
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
