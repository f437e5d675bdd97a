"""XDP hardware offload: the pure check that names the first rule an offload engine cannot run,
and the clear error on a device without an offload engine (veth here: no NFP on this machine)."""
import errno
import os

import pytest

from nsutil import Netns, veth
from test_compile_util import ACCEPT, DROP, rule, table, tcp, udp
from bpfilter_umh import attach, ebpf as E, flavors as F
from bpfilter_umh.compile import XT_TCP_INV_OPTION, KernelFacts, compile_table
from bpfilter_umh.errors import BpfilterError

OK_MAPS = {"counters": 2, "ifnames": 1}      # as if counters were a plain array


def xdp_program(rules):
    return compile_table(table({"INPUT": (ACCEPT, rules)}), KernelFacts.fake(), "xdp").programs[0]


def test_check_names_the_prologue_helper():
    p = xdp_program([rule(DROP, udp(dport=(53, 53)), proto=17)])
    with pytest.raises(BpfilterError, match=r"chain INPUT prologue: cannot be offloaded: helper "
                                            r"xdp_load_bytes") as ei:
        F.check_offload(p, OK_MAPS)
    assert ei.value.errno == errno.EOPNOTSUPP


def test_check_names_the_first_offending_rule():
    """Replace the prologue's packet reads by a permitted stand-in: the first rule left that
    calls a forbidden helper (the TCP option walk reads with xdp_load_bytes) is named."""
    p = xdp_program([rule(DROP, udp(dport=(53, 53)), proto=17),
                     rule(DROP, tcp(option=8, inv=XT_TCP_INV_OPTION), proto=6)])
    entry2 = [k for k, v in p.where.items() if "rule 2" in v][0]
    seen, items = False, []
    for it in p.items:
        if isinstance(it, E.Label) and it.name == entry2:
            seen = True
        if not seen and isinstance(it, E.Insn) and it.code == (E.BPF_JMP | E.CALL) \
                and it.imm == F.BPF_FUNC_xdp_load_bytes:
            it = E.call(1)      # stand-in: map_lookup_elem is permitted
        items.append(it)
    p.items = items
    with pytest.raises(BpfilterError, match=r"chain INPUT rule 2 \(entry offset \d+\): cannot be "
                                            r"offloaded: helper xdp_load_bytes"):
        F.check_offload(p, OK_MAPS)


def test_check_refuses_percpu_maps_kfuncs_and_other_flavors():
    p = xdp_program([rule(DROP, udp(dport=(53, 53)), proto=17)])
    p.items = [it if not (isinstance(it, E.Insn) and it.code == (E.BPF_JMP | E.CALL)) else E.call(1)
               for it in p.items]
    with pytest.raises(BpfilterError, match=r"map 'counters' of type 6"):
        F.check_offload(p, {"counters": 6, "ifnames": 1})
    F.check_offload(p, OK_MAPS)              # nothing else in it: would be accepted
    nf = compile_table(table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(1, 1)), proto=17)])}),
                       KernelFacts.fake(), "nf").programs[0]
    with pytest.raises(BpfilterError, match="only XDP programs can be offloaded"):
        F.check_offload(nf, OK_MAPS)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF")
def test_offload_on_a_device_without_engine_is_a_clear_error():
    with Netns("o") as a, Netns("p") as b:
        veth(a, "vo", b, "vp")
        code = E.assemble([E.mov(E.R0, F.XDP_PASS), E.exit_()])
        with a.inside():
            with pytest.raises(BpfilterError, match=r"--offload: interface vo cannot run "
                                                    r"offloaded BPF programs") as ei:
                attach.offload_xdp(code, "vo")
            assert ei.value.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV)
            with pytest.raises(BpfilterError, match="no interface 'nope'"):
                attach.offload_xdp(code, "nope")
