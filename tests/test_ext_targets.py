"""Issue #6 part 2, the refusals that remain: REJECT and LOG are served through the responder on
flavors nf and tc (tests/test_target_reject*.py, tests/test_target_log*.py); MARK writes
skb->mark, which a netfilter BPF program cannot, so it is refused on nf with EOPNOTSUPP naming
the rule, the flavor and the reason (and on xdp: no skb); REJECT and LOG are refused on xdp, LOG
--log-uid on tc (no socket credentials there); the previous ruleset stays in force."""
import errno
import os

import pytest

from lab import kernel_snapshot, restore
from nsutil import Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

RULES = {
    "REJECT": "-A INPUT -p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset",
    "LOG": "-A INPUT -p udp -j LOG --log-prefix \"udp: \" --log-level 6 --log-uid",
    "MARK": "-A FORWARD -j MARK --set-xmark 0x5/0xff",
}


WHY = {("MARK", "nf"): "a netfilter BPF program cannot write skb->mark",
       ("MARK", "xdp"): "an XDP frame has no skb",
       ("REJECT", "xdp"): "REJECT and LOG are served by flavors nf and tc",
       ("LOG", "tc"): "--log-uid needs the socket's file credentials"}


@pytest.mark.parametrize("target,flavor", sorted(WHY))
def test_target_refused_naming_rule_and_flavor(target, flavor):
    from bpfilter_umh.compile import KernelFacts, compile_table
    from bpfilter_umh.errors import BpfilterError
    text = "*filter\n-A INPUT -p icmp -j ACCEPT\n" + RULES[target] + "\nCOMMIT\n"
    with Netns("tg") as ns:
        restore(ns, text)
        table = kernel_snapshot(ns)
    with pytest.raises(BpfilterError) as ei:
        compile_table(table, KernelFacts.fake(), flavor)
    e = ei.value
    assert e.errno == errno.EOPNOTSUPP
    chain = "FORWARD rule 1" if target == "MARK" else "INPUT rule 2"
    assert e.message.startswith(f"chain {chain} (entry offset ")
    assert f"target {target} (flavor {flavor}: " in e.message and WHY[target, flavor] in e.message


@pytest.mark.parametrize("target", ["REJECT", "LOG"])
def test_target_compiles_on_nf(target):
    from bpfilter_umh.compile import KernelFacts, compile_table
    text = "*filter\n-A INPUT -p icmp -j ACCEPT\n" + RULES[target] + "\nCOMMIT\n"
    with Netns("tg") as ns:
        restore(ns, text)
        table = kernel_snapshot(ns)
    listing = compile_table(table, KernelFacts.fake()).listing()
    assert "event for the responder" in listing


def test_door_refuses_and_keeps_the_old_ruleset(netns):
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(netns.env, PYTHONPATH=root, BPFILTER_IDLE_EXIT="1")
    cli = [sys.executable, "-m", "bpfilter_umh.cli", "exec", "--"]
    try:
        netns.run(cli + ["iptables-legacy", "-A", "INPUT", "-p", "icmp", "-j", "ACCEPT"], env=env)
        p = netns.run(cli + ["iptables-legacy", "-A", "INPUT", "-p", "tcp", "-j", "MARK",
                             "--set-xmark", "0x5/0xff"], env=env, check=False)
        assert p.returncode != 0, p
        s = netns.run(cli + ["iptables-legacy", "-S", "INPUT"], env=env).stdout
        assert s == "-P INPUT ACCEPT\n-A INPUT -p icmp -j ACCEPT\n"
    finally:
        netns.run([sys.executable, "-m", "bpfilter_umh.cli", "flush"], env=env, check=False)


def test_limit_in_a_chain_shared_by_two_hooks_is_refused():
    """One token bucket per rule in the kernel; one map per hook program here: refused."""
    from bpfilter_umh.compile import KernelFacts, compile_table
    from bpfilter_umh.errors import BpfilterError
    text = ("*filter\n:lim - [0:0]\n-A INPUT -j lim\n-A OUTPUT -j lim\n"
            "-A lim -m limit --limit 1/s -j ACCEPT\nCOMMIT\n")
    with Netns("lm") as ns:
        restore(ns, text)
        table = kernel_snapshot(ns)
    with pytest.raises(BpfilterError) as ei:
        compile_table(table, KernelFacts.fake())
    assert ei.value.errno == errno.EOPNOTSUPP
    assert "reached from INPUT, OUTPUT" in ei.value.message
