"""The tests' stand-in engine (test_door_standin.MemoryEngine, BPFILTER_ENGINE) serves the whole
control plane as the real engine does: sockopt.Backend calls the same members on both
(counters_nonzero for GET_ENTRIES, add_counters with the request's packed array), so libiptc's
request sequence of a restore and an append works against it and GET_ENTRIES shows the counts
the append carried."""
import os
import struct
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import cplane_bench as cb  # noqa: E402
import rulesets  # noqa: E402
from nsutil import Netns  # noqa: E402
from test_door_standin import MemoryEngine  # noqa: E402
from bpfilter_umh.sockopt import XT_COUNTERS, Dispatcher  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: iptables-legacy in a netns")


def test_standin_serves_a_restore_and_an_append(monkeypatch):
    monkeypatch.setenv("BPFILTER_ENGINE", "test_door_standin:MemoryEngine")
    text = rulesets.make("blocklist", 30, seed=1).text.replace("-A FORWARD ", "-A INPUT ")
    (info0, blob0), (info1, blob1) = cb.kernel_blobs(text, 1)
    with Netns("si") as ns, ns.inside():
        d = Dispatcher()
        be = lambda: d.backend(d.home_cookie, 2)  # noqa: E731
        cb.commit(d, be, info0, cb.restore_blob(blob0),
                  lambda old: [(0, 0)] * info0.num_entries)
        assert isinstance(be().engine, MemoryEngine)
        be().engine._counters[0] = (5, 500)          # the first rule counted
        at = cb._appended_at(be())
        cb.commit(d, be, info1, blob1, lambda old: old[:at] + [(0, 0)] + old[at:])
        assert be().engine.counters()[0] == (5, 500)
        assert be().engine.counters_nonzero() == {0: (5, 500)}
        got = be().entries_blob()
        back = 112 - XT_COUNTERS.size                 # xt_counters ends struct ipt_entry
        assert struct.unpack_from("=QQ", got, back) == (5, 500)
