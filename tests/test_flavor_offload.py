"""XDP hardware offload: the pure check that names the first rule an offload engine cannot run,
and the clear error on a device without an offload engine (veth here: no NFP on this machine)."""
import errno
import os
import struct

import pytest

from nsutil import Netns, veth
from test_compile_util import ACCEPT, DROP, rule, table, tcp, udp
from bpfilter_umh import ebpf as E, flavors as F, offload
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
    """veth has no BPF offload engine: prepare() refuses before anything is attached."""
    with Netns("o") as a, Netns("p") as b:
        veth(a, "vo", b, "vp")
        t = table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(1, 1)), proto=17)])})
        with a.inside():
            with pytest.raises(BpfilterError, match=r"--offload: device vo has no BPF offload "
                                                    r"engine") as ei:
                offload.prepare(t, "vo", local_addrs=[])
            assert ei.value.errno == errno.EOPNOTSUPP
            with pytest.raises(BpfilterError, match="no interface 'nope'") as ei:
                offload.prepare(t, "nope", local_addrs=[])
            assert ei.value.errno == errno.ENODEV


# ---- the offload code mode (bpfilter_umh/offload.py) ---------------------------------------
from test_compile_util import ether, icmp, icmp_hdr, ipv4, jump, tcp_hdr, udp_hdr  # noqa: E402

LOCAL = "192.0.2.254"


def plain_table():
    """Addresses, ports, protocols, interfaces, tcp flags, icmp, a user chain: what an offload
    engine can run."""
    return table({"INPUT": (ACCEPT, [
        rule(DROP, udp(dport=(53, 53)), proto=17, iniface="vo"),
        rule(jump("web"), proto=6, src="192.0.2.0/24"),
        rule(DROP, icmp(8), proto=1, iniface="other"),
        rule(DROP, src="203.0.113.0/24"),
    ])}, {"web": [rule(ACCEPT, tcp(dport=(80, 80), flags=(0x12, 0x02)), proto=6),
                  rule(DROP, tcp(dport=(1, 1023)), proto=6)]})


def test_offload_code_passes_the_check():
    op = offload.compile_offload(plain_table(), "vo", [LOCAL])
    op.check()
    calls = {it.imm for it in op.program.items
             if isinstance(it, E.Insn) and it.code == (E.BPF_JMP | E.CALL)}
    assert calls == {1}, calls               # map_lookup_elem (the counters) only
    assert not any(getattr(it, "kfunc", None) for it in op.program.items)
    assert op.map_types == {"counters": offload.BPF_MAP_TYPE_ARRAY}
    # dense counter keys: every counted entry of INPUT and of "web", numbered from 0
    assert sorted(op.keys.values()) == list(range(len(op.keys))) and len(op.keys) >= 7


def test_offload_check_names_the_first_offending_rule():
    t = table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(53, 53)), proto=17),
                                  rule(DROP, tcp(option=8, inv=XT_TCP_INV_OPTION), proto=6),
                                  rule(DROP, tcp(option=2), proto=6)])})
    op = offload.compile_offload(t, "vo", [LOCAL])
    with pytest.raises(BpfilterError, match=r"chain INPUT rule 2 \(entry offset \d+\): cannot be "
                                            r"offloaded: helper xdp_load_bytes") as ei:
        op.check()
    assert ei.value.errno == errno.EOPNOTSUPP


def test_offload_refuses_forward_and_output_rules_naming_the_chain():
    for chain in ("FORWARD", "OUTPUT"):
        t = table({"INPUT": (ACCEPT, []), chain: (ACCEPT, [rule(DROP, proto=17)])})
        with pytest.raises(BpfilterError, match=f"chain {chain}: flavor xdp-offload cannot serve "
                                                f"the {chain} hook") as ei:
            offload.compile_offload(t, "vo", [LOCAL])
        assert ei.value.errno == errno.EOPNOTSUPP
    t6 = table({"INPUT": (ACCEPT, [])}, family=10)
    with pytest.raises(BpfilterError, match="only ipv4 tables can be offloaded"):
        offload.compile_offload(t6, "vo", [LOCAL])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF")
def test_offload_code_runs_in_the_kernel_with_the_expected_verdicts():
    """The offload program as the host kernel's verifier and interpreter/JIT run it (an
    offload engine runs the same instructions): BPF_PROG_TEST_RUN on crafted frames."""
    from bpfilter_umh import kernel as K
    t = plain_table()
    op = offload.compile_offload(t, "vo", [LOCAL])
    with K.Map.create(offload.BPF_MAP_TYPE_ARRAY, 4, 16, len(op.keys), "t_hwcnt") as cnt:
        code = op.program.assemble({"counters": cnt.fd})
        with K.Prog.load(F.BPF_PROG_TYPE_XDP, code, name="t_offload",
                         expected_attach_type=F.BPF_XDP) as prog:
            def run(pkt, raw=False):
                return prog.test_run(pkt if raw else ether(pkt))[0]
            P, D = F.XDP_PASS, F.XDP_DROP
            cases = [
                (ipv4(dst=LOCAL, proto=17, payload=udp_hdr(dport=53)), D),       # -i vo udp 53
                (ipv4(dst="192.0.2.9", proto=17, payload=udp_hdr(dport=53)), P),  # not local
                (ipv4(dst=LOCAL, proto=17, payload=udp_hdr(dport=54)), P),
                (ipv4(src="192.0.2.7", dst=LOCAL, proto=6,
                      payload=tcp_hdr(dport=80, flags=0x02)), P),                # web: SYN 80
                (ipv4(src="192.0.2.7", dst=LOCAL, proto=6,
                      payload=tcp_hdr(dport=22, flags=0x02)), D),                # web: < 1024
                (ipv4(src="198.51.100.7", dst=LOCAL, proto=6,
                      payload=tcp_hdr(dport=22, flags=0x02)), P),                # not web
                (ipv4(dst=LOCAL, proto=1, payload=icmp_hdr(8)), P),              # -i other
                (ipv4(src="203.0.113.5", dst="255.255.255.255", proto=17,
                      payload=udp_hdr(dport=9)), D),                             # broadcast
                (ipv4(src="203.0.113.5", dst="224.0.0.1", proto=2), D),          # multicast
            ]
            got = [run(p) for p, _ in cases]
            assert got == [v for _, v in cases], got
            v6 = bytes(12) + b"\x86\xdd" + bytes(40)
            assert run(v6, raw=True) == P, "IPv6 is another family's"
            short = ether(ipv4(dst=LOCAL, proto=17, payload=udp_hdr(dport=53)))[:30]
            assert run(short, raw=True) == D, "cut IPv4 header: fail closed, as the xdp flavor"
            # the -i vo udp/53 rule counted its one packet with its IP length (28 + 20)
            key = op.keys[t.chains[0].rules[0].index]
            assert struct.unpack("<QQ", bytes(cnt.lookup(key))) == (1, 20 + 8 + 8)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF")
def test_offload_install_on_a_device_without_engine_is_a_clear_error():
    """offload.install() checks, then asks the device for its counters map: veth has no engine."""
    with Netns("o") as a, Netns("p") as b:
        veth(a, "vo", b, "vp", LOCAL + "/24")
        with a.inside():
            with pytest.raises(BpfilterError, match=r"--offload: device vo has no BPF offload "
                                                    r"engine \(its driver offers none") as ei:
                offload.install(plain_table(), "vo")
            assert ei.value.errno == errno.EOPNOTSUPP
            assert LOCAL in offload.local_addresses()
            with pytest.raises(BpfilterError, match="cannot be offloaded: helper xdp_load_bytes"):
                offload.install(table({"INPUT": (ACCEPT, [
                    rule(DROP, tcp(option=8, inv=XT_TCP_INV_OPTION), proto=6)])}), "vo")
