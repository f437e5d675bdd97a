"""Data plane through the door: rulesets loaded with the unmodified iptables-legacy-restore under
`bpfilter exec` filter the lab's real packets exactly like the kernel's xtables, and the counters
iptables-legacy-save -c reads back through the door (GET_ENTRIES, counters from the BPF maps)
equal the kernel's.  Uses the traffic lab (tests/lab.py) and the seeded ruleset generator
(tests/rulegen.py) of the differential suites; here the whole path is the product's: door,
helper, codec, compiler, engine."""
import os
import sys

import pytest

import rulegen
from lab import Lab, LoadError, SaveCountersKernelInstaller, differential, parse_save_counters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = range(int(os.environ.get("BPFILTER_DOOR_SEEDS", "12")))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


class DoorInstaller:
    """bpfilter as a user sees it: iptables-legacy-restore and -save through `bpfilter exec`."""
    name = "bpfilter-door"

    def __init__(self, ns):
        self.ns = ns
        path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
        self.env = dict(ns.env, PYTHONPATH=path, BPFILTER_IDLE_EXIT="2")

    def _door(self, *argv, input=None):
        return self.ns.run([sys.executable, "-m", "bpfilter_umh.cli", "exec", "--", *argv],
                           input=input, check=False, env=self.env)

    def load(self, text: str):
        p = self._door("iptables-legacy-restore", input=text)
        if p.returncode != 0:
            raise LoadError(p.stdout + p.stderr)

    def counters(self) -> dict:
        p = self._door("iptables-legacy-save", "-c", "-t", "filter")
        assert p.returncode == 0, p.stderr
        return parse_save_counters(p.stdout)

    def close(self):
        self.ns.run([sys.executable, "-m", "bpfilter_umh.cli", "flush"], check=False,
                    env=self.env)


@pytest.fixture(scope="module")
def door_labs():
    try:
        import bpfilter_umh.engine  # noqa: F401
    except ImportError as e:
        pytest.skip(f"bpfilter_umh.engine is not importable ({e})")
    with Lab(installer=SaveCountersKernelInstaller, tag="r") as ref, \
            Lab(installer=DoorInstaller, tag="d") as cand:
        yield ref, cand


@pytest.mark.parametrize("seed", SEEDS)
def test_door_filters_like_kernel(seed, door_labs):
    ref, cand = door_labs
    case = rulegen.generate(seed)
    diffs = differential(ref, cand, case.text(), case.probes)
    assert not diffs, "\n".join([f"seed {seed}", case.text()] + diffs)
