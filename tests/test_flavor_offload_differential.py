"""The offload code mode (bpfilter_umh/offload.py) against kernel iptables-legacy with real
packets. No offload engine runs packets on this machine (netdevsim in the qemu guest verifies and
holds the program but does not execute it), so the very instructions an engine would run are
attached in native XDP mode to every device of the lab's host, one program per device (each with
its own -i name), sharing one plain counters array. Rulesets: the hand-written and generated
differential cases, with FORWARD and OUTPUT emptied (offload serves INPUT: the other chains are
refused, checked per case), INPUT probes only; a case whose code the checker refuses (what an
offload engine could not run) is skipped naming the rule. Fragmented INPUT probes are left out
(docs/flavors.md difference 2, as on xdp).

    pytest tests/test_flavor_offload_differential.py
"""
import os

import pytest

import rulegen
import test_differential_handwritten as H
from lab import Lab, differential, kernel_snapshot, restore, table_counters
from nsutil import Netns
from probes import FRAG_WHOLE
from test_flavor_differential import FlavorLab
from bpfilter_umh.errors import BpfilterError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

N = int(os.environ.get("BPFILTER_OFFLOAD_SEEDS", "20"))


class OffloadCodeInstaller:
    """The offload programs, attached natively (XDP_FLAGS_DRV_MODE; lo: generic) to every device
    of the host namespace."""
    name = "bpfilter-offload"

    def __init__(self, ns: Netns):
        self.ns, self.scratch = ns, Netns("x")
        self.table, self.links, self.map, self.keys = None, [], None, {}

    def _drop(self):
        for link in self.links:
            try:
                link.detach()
            finally:
                link.close()
        self.links = []
        if self.map is not None:
            self.map.close()
            self.map = None

    def load(self, text: str):
        import socket
        from bpfilter_umh import attach, kernel as K, offload
        restore(self.scratch, text)
        table = kernel_snapshot(self.scratch)
        with self.ns.inside():
            local = offload.local_addresses()
            devices = dict(socket.if_nameindex())
            progs = {i: offload.compile_offload(table, name, local) for i, name in devices.items()}
            for op in progs.values():
                op.check()              # what the NIC would refuse: BpfilterError names it
            keys = next(iter(progs.values())).keys
            assert all(op.keys == keys for op in progs.values())
            self._drop()
            self.map = K.Map.create(offload.BPF_MAP_TYPE_ARRAY, 4, 16, max(1, len(keys)),
                                    "t_hwcnt")
            for i, op in progs.items():
                code = op.program.assemble({"counters": self.map.fd})
                with K.Prog.load(op.program.prog_type, code, name="t_offload",
                                 expected_attach_type=op.program.expected_attach_type) as p:
                    mode = attach.XDP_FLAGS_SKB_MODE if i == 1 else attach.XDP_FLAGS_DRV_MODE
                    self.links.append(K.link_create_ifindex(p, i, K.BPF_XDP, mode))
        self.table, self.keys = table, keys

    def counters(self) -> dict:
        import struct
        by_index = {}
        for r in self.table.entries():
            k = self.keys.get(r.index)
            v = self.map.lookup(k) if k is not None else None
            by_index[r.index] = struct.unpack("<QQ", bytes(v)) if v is not None else (0, 0)
        return table_counters(self.table, by_index)

    def close(self):
        with self.ns.inside():
            self._drop()
        self.scratch.close()


@pytest.fixture(scope="module")
def offload_labs():
    with Lab(tag="r") as ref, FlavorLab(installer=OffloadCodeInstaller, tag="o") as cand:
        yield ref, cand


def _input_only(text: str) -> str:
    out = []
    for ln in text.splitlines():
        if ln.startswith("-A FORWARD") or ln.startswith("-A OUTPUT"):
            continue
        out.append(ln.replace(":FORWARD DROP", ":FORWARD ACCEPT")
                   .replace(":OUTPUT DROP", ":OUTPUT ACCEPT"))
    return "\n".join(out) + "\n"


def _run(ref, cand, text, probes, what):
    from bpfilter_umh import offload
    if text != _input_only(text):
        # the full ruleset is refused naming the first chain offload cannot serve
        with pytest.raises(BpfilterError, match=r"chain (FORWARD|OUTPUT): flavor xdp-offload "
                                                r"cannot serve"):
            restore(cand.installer.scratch, text)
            offload.compile_offload(kernel_snapshot(cand.installer.scratch), "h0", [])
    text = _input_only(text)
    probes = [p for p in probes if p.hook == "INPUT" and p.frag == FRAG_WHOLE]
    if not probes:
        pytest.skip(f"{what}: no unfragmented INPUT probe")
    diffs = differential(ref, cand, text, probes)
    if diffs and diffs[0].startswith("bpfilter-offload refused") and \
            "cannot be offloaded" in diffs[0]:
        pytest.skip(f"{what}: the offload check refuses it: {diffs[0]}")
    diffs = [d for d in diffs if not d.startswith(("counters FORWARD", "counters OUTPUT"))]
    assert not diffs, f"{what}\n{text}\n" + "\n".join(diffs)


@pytest.mark.parametrize("name", sorted(H.CASES))
def test_handwritten_on_offload_code(name, offload_labs):
    ref, cand = offload_labs
    text, probes = H.CASES[name]()
    _run(ref, cand, text, probes, f"case {name}")


@pytest.mark.parametrize("seed", range(N))
def test_generated_on_offload_code(seed, offload_labs):
    ref, cand = offload_labs
    case = rulegen.generate(seed)
    _run(ref, cand, case.text(), list(case.probes), f"seed {seed}")
