"""A helper's GC pass over its whole heap (engine.full_pass) runs where no command waits.

A helper freezes what each install leaves (engine._collect_and_freeze) and collects its whole
heap only once the process has grown (its peak resident size: FULL_PASS_GROWTH). That pass, 10-17 ms at 10 rules and
70-250 ms at 10 000, once ran after every 16th install's reply, where the next command of a
back-to-back burst (bin/bpfilter-exec: ~2 ms later) waited behind it. Now serve_listen runs it
only when no request has come for its select's idle timeout and no door is connected. Here the
pass is due after every install (BPFILTER_FULL_PASS_GROWTH=0) and a burst of appends goes
through the launcher: the helper's log shows one pass, after the burst's last request.

A real helper, launcher and iptables-legacy, in a namespace of ours.
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

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def test_gc_pass_waits_for_the_burst_to_end():
    subprocess.run(["make", "-s", "-C", ROOT, "launcher", f"PYTHON={PY}"], check=True,
                   capture_output=True)
    n = 8
    with Netns("gcp") as ns:
        path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
        env = dict(ns.env, PYTHONPATH=path)
        log = os.path.join(ns._lockdir, "helper.log")
        with open(log, "w") as err:
            helper = ns.popen([PY, "-m", "bpfilter_umh", "--listen"], cwd=ROOT,
                              env=dict(env, BPFILTER_LOG="DEBUG", BPFILTER_IDLE_EXIT="2",
                                       BPFILTER_FULL_PASS_GROWTH="0"),
                              stdout=subprocess.DEVNULL, stderr=err)
        try:
            # listening before the first command: else the launcher starts a helper of its own
            end = time.monotonic() + 30
            while "serving netns" not in open(log).read():
                assert time.monotonic() < end and helper.poll() is None, open(log).read()
                time.sleep(0.05)
            script = "".join(f"{LAUNCHER} -- iptables-legacy -A INPUT -s 192.0.2.{i} -j DROP\n"
                             for i in range(1, n + 1))
            ns.run(["bash", "-ec", script], env=env, timeout=120)
            assert helper.wait(timeout=60) == 0
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
            # the appends' programs, pins and state file go with the namespace's state
            ns.run([PY, "-m", "bpfilter_umh.cli", "flush"], check=False, env=env)
        text = open(log).read()
    lines = text.splitlines()
    served = [i for i, l in enumerate(lines) if re.search(r"pid \d+ \S+: [0-9.]+ ms", l)]
    passes = [i for i, l in enumerate(lines) if "GC pass while idle" in l]
    replaces = [l for l in lines if re.search(r"pid \d+ SET_REPLACE", l)]
    assert len(replaces) == n, text[-3000:]
    assert passes, "the due pass never ran: " + text[-3000:]
    assert passes[0] > served[-1], "a GC pass ran between the burst's commands: " + text[-3000:]
    assert len(passes) == 1, text[-3000:]
