"""The target code (targets.py) through the verifier in the shapes the compiler produces: REJECT
and LOG (with --log-uid, the longest event) inlined and inside a user chain compiled as a BPF
subprogram (its stack slots reached through the main frame pointer), on IPv4 and IPv6; MARK on
flavor tc."""
import os

import pytest

from lab import kernel_snapshot, restore
from nsutil import Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF")

RULES = """:rej - [0:0]
-A INPUT -p tcp -j rej
-A INPUT -p udp -j rej
-A OUTPUT -j rej
-A rej -p tcp -m tcp --dport 23 -j LOG --log-uid --log-prefix "x " --log-tcp-options
-A rej -p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset
-A rej -p udp -j REJECT
-A OUTPUT -j LOG
"""


def _table(text, cmd="iptables-legacy-restore"):
    from bpfilter_umh.model import AF_INET6
    with Netns("tc") as ns:
        if cmd == "iptables-legacy-restore":
            restore(ns, text)
            return kernel_snapshot(ns)
        import kernel_xt
        from bpfilter_umh.model import Table
        ns.run([cmd], input=text)
        with ns.inside():
            info, blob = kernel_xt.snapshot(AF_INET6)
        return Table.decode(blob, AF_INET6, list(info.hook_entry), list(info.underflow),
                            info.valid_hooks, "filter")


def _load_all(ct):
    from bpfilter_umh import kernel as K
    from bpfilter_umh import targets as T
    cnt = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 64)
    ev = K.Map.create(T.BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 16)
    try:
        for cp in ct.programs:
            fds = {"counters": cnt.fd, "events": ev.fd}
            assert not cp.maps, "no classifier maps in these tables"
            p = K.Prog.load(cp.prog_type, cp.assemble(fds), license=cp.license, name=cp.name,
                            expected_attach_type=cp.expected_attach_type)
            p.close()
    finally:
        cnt.close()
        ev.close()


@pytest.mark.parametrize("subprog_above", [1 << 30, 0], ids=["inlined", "subprograms"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_reject_and_log_load(subprog_above, family):
    from bpfilter_umh.compile import compile_table
    from bpfilter_umh.engine import kernel_facts
    text = "*filter\n" + RULES + "COMMIT\n"
    if family == "ipv6":
        t = _table(text.replace("-p udp -j REJECT", "-p udp -j REJECT --reject-with "
                                "icmp6-adm-prohibited"), "ip6tables-legacy-restore")
    else:
        t = _table(text)
    ct = compile_table(t, kernel_facts(), subprog_above=subprog_above)
    if subprog_above == 0:
        assert any("subprogram: chain rej" in (getattr(i, "comment", "") or "")
                   for p in ct.programs for i in p.items)
    _load_all(ct)


def test_mark_loads_on_tc_and_is_refused_on_xdp():
    from bpfilter_umh import kernel as K
    from bpfilter_umh.compile import compile_table
    from bpfilter_umh.engine import kernel_facts
    from bpfilter_umh.errors import BpfilterError
    t = _table("*filter\n-A INPUT -j MARK --set-xmark 0x1/0x3\n-A INPUT -m mark --mark 0x1/0x3 "
               "-j DROP\nCOMMIT\n")
    ct = compile_table(t, kernel_facts(), "tc")
    cnt = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 8)
    names = K.Map.create(1, 4, 16, 4)          # BPF_MAP_TYPE_HASH ifindex -> name
    try:
        for cp in ct.programs:
            p = K.Prog.load(cp.prog_type, cp.assemble({"counters": cnt.fd, "ifnames": names.fd}),
                            license=cp.license, name=cp.name)
            p.close()
    finally:
        names.close()
        cnt.close()
    with pytest.raises(BpfilterError) as ei:
        compile_table(t, kernel_facts(), "xdp")
    assert "target MARK (flavor xdp: an XDP frame has no skb" in ei.value.message
