"""A restore's work around decode and compile (issue #7: iptables-legacy-restore of 10 000 rules
within 2x the kernel's wall time): what the engine does earlier, or beside other work, must keep
every guarantee it had.

  - the programs whose maps have the most entries are loaded first (their fills start sooner),
    but the swaps keep the plan's order and every hook gets its own program;
  - a first install loads its dispatchers (NfAttachment.prepare) while the maps fill: the hooks
    are attached once the install is done, and a swap that fails leaves neither a link nor a
    descriptor of a prepared dispatcher;
  - an install without --offload does not import offload.py.
"""
import errno
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded, netns_engine  # noqa: E402 - the Table restore sends

from bpfilter_umh import attach, engine, faults  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402
from bpfilter_umh.model import AF_INET  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- installs ------------------------------------------------------------------------------------

def _classified_forward(seed: int = 5):
    """A table whose FORWARD chain has classifier maps (5-tuple rules) and INPUT/OUTPUT none."""
    return decoded(rulesets.make("tuple", 2000, seed=seed).text)


@pytest.fixture
def eng():
    with netns_engine("rsp") as e:
        yield e


def _slot_names(eng) -> dict:
    progs = eng._installed_programs()
    try:
        return {h: p.info()["name"] for h, p in progs.items()}
    finally:
        for p in progs.values():
            p.close()


def test_maps_first_loads_keep_the_plan_order(eng, monkeypatch):
    loaded, swapped = [], []
    real_create, real_swap = engine.create_maps, attach.NfAttachment.swap

    def create(cp, *a, **kw):
        loaded.append(cp.hook)
        return real_create(cp, *a, **kw)

    def swap(self, hook, prog):
        swapped.append(hook)
        return real_swap(self, hook, prog)
    monkeypatch.setattr(engine, "create_maps", create)
    monkeypatch.setattr(attach.NfAttachment, "swap", swap)
    eng.install(_classified_forward())
    assert loaded[0] == 2, "FORWARD, the program with classifier maps, was not loaded first"
    assert sorted(loaded) == [1, 2, 3]
    assert swapped == [1, 2, 3]
    assert _slot_names(eng) == {1: "bpfilter_input", 2: "bpfilter_forwar",
                                3: "bpfilter_output"}


def test_first_install_attaches_every_hook(eng):
    eng.install(_classified_forward())
    with attach.NfAttachment.open(AF_INET) as att:
        assert sorted(att.links) == [1, 2, 3]
        assert att._dispatchers == {}


def test_failed_first_swap_leaves_no_dispatcher(eng, monkeypatch):
    prepared = []       # references of our own: a Prog's fd would close on its collection
    real = attach.NfAttachment.prepare

    def prepare(self, hook):
        real(self, hook)
        prepared.append(self._dispatchers[hook])
    monkeypatch.setattr(attach.NfAttachment, "prepare", prepare)
    before = _fds()
    faults.arm("swap", "error:EIO")
    with pytest.raises(BpfilterError) as e:
        eng.install(_classified_forward())
    assert e.value.errno == errno.EIO
    faults.disarm()
    assert len(prepared) == 3
    assert [p.fd for p in prepared] == [-1] * 3, "a prepared dispatcher was not closed"
    del prepared[:]
    assert _fds() == before
    with attach.NfAttachment.open(AF_INET) as att:
        assert att.links == {}
    eng.install(_classified_forward())      # and the next install works
    assert sorted(_slot_names(eng)) == [1, 2, 3]


def test_install_without_offload_does_not_import_it(eng, monkeypatch):
    import bpfilter_umh
    monkeypatch.delitem(sys.modules, "bpfilter_umh.offload", raising=False)
    monkeypatch.delattr(bpfilter_umh, "offload", raising=False)
    eng.install(_classified_forward())
    assert "bpfilter_umh.offload" not in sys.modules
