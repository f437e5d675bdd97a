"""Differential suite through the door: the unmodified iptables-legacy-restore and
iptables-legacy-save -c run under `bpfilter exec` in the lab's host namespace (the whole path a
user takes: seccomp door -> helper -> codec -> compiler -> engine), against the kernel's own
iptables-legacy in the twin lab. Counters are compared as iptables-save prints them. Runs the
hand-written cases and the first BPFILTER_DOOR_SEEDS (default 20) generated ones; then the
hand-written cases and 5 seeds through build/bpfilter-exec (the door handed to the helper)."""
import os

import pytest

import rulegen
from lab import DoorInstaller, Lab, LauncherInstaller, SaveCountersKernelInstaller, differential, number
from test_differential_handwritten import CASES

SEEDS = int(os.environ.get("BPFILTER_DOOR_SEEDS", "20"))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def _labs(installer):
    try:
        import bpfilter_umh.door  # noqa: F401
        import bpfilter_umh.engine  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the door or the engine is not importable yet ({e})")
    with Lab(installer=SaveCountersKernelInstaller, tag="r") as ref, \
            Lab(installer=installer, tag="d") as cand:
        yield ref, cand


@pytest.fixture(scope="module")
def door_labs():
    yield from _labs(DoorInstaller)


@pytest.fixture(scope="module")
def launcher_labs():
    yield from _labs(LauncherInstaller)


@pytest.mark.parametrize("name", sorted(CASES))
def test_handwritten_through_door(name, door_labs):
    text, probes = CASES[name]()
    diffs = differential(*door_labs, text, number(probes))
    assert not diffs, f"case {name}\n{text}\n" + "\n".join(diffs)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_generated_through_door(seed, door_labs):
    case = rulegen.generate(seed)
    diffs = differential(*door_labs, case.text(), case.probes)
    assert not diffs, rulegen.describe_case(case) + "\n" + "\n".join(diffs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_handwritten_through_launcher(name, launcher_labs):
    text, probes = CASES[name]()
    diffs = differential(*launcher_labs, text, number(probes))
    assert not diffs, f"case {name}\n{text}\n" + "\n".join(diffs)


@pytest.mark.parametrize("seed", range(5))
def test_generated_through_launcher(seed, launcher_labs):
    case = rulegen.generate(seed)
    diffs = differential(*launcher_labs, case.text(), case.probes)
    assert not diffs, rulegen.describe_case(case) + "\n" + "\n".join(diffs)
