"""Compiler on blobs written by the real iptables-legacy (not tables built in code): the encodings
libiptc chooses must compile and test-run like the kernel walks them.

| iptables encoding                                   | kernel behaviour (ipt_do_table)          |
|-----------------------------------------------------|------------------------------------------|
| rule without -j: standard verdict = next entry offset | no jump-stack push, continue at next entry, rule still counted |
"""
from kernel_xt import snapshot
from test_compile_util import Runner, ipv4, udp_hdr

from bpfilter_umh.model import AF_INET, Table

NF_DROP, NF_ACCEPT = 0, 1


def kernel_table(netns, rules: str) -> Table:
    netns.run(f"iptables-legacy-restore <<'EOF'\n*filter\n{rules}\nCOMMIT\nEOF")
    with netns.inside():
        info, blob = snapshot(AF_INET)
    return Table.decode(blob, AF_INET, list(info.hook_entry), list(info.underflow),
                        info.valid_hooks)


def test_rule_without_target_counts_and_falls_through(netns):
    tbl = kernel_table(netns, "-A INPUT -p udp\n-A INPUT -p udp --dport 53 -j DROP\n"
                              "-A INPUT -p udp")
    pkt = ipv4(proto=17, payload=udp_hdr(dport=53))
    other = ipv4(proto=17, payload=udp_hdr(dport=54))
    with Runner(tbl) as r:
        assert r.run("INPUT", pkt) == NF_DROP
        assert r.run("INPUT", other) == NF_ACCEPT
        rules = [c for c in r.counters()]
    counted = {e.index: rules[e.index] for e in tbl.chain("INPUT").rules}
    first, drop, last = sorted(counted)
    assert counted[first][0] == 2          # both packets pass the no-target rule
    assert counted[drop][0] == 1
    assert counted[last][0] == 1           # only the accepted one reaches the third rule
    assert counted[first][1] == len(pkt) + len(other)
