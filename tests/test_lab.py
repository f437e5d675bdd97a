"""The lab itself: probes arrive exactly where the topology says, the host's ruleset decides, and
two kernel labs agree on every probe and every counter, so that any difference between the
kernel and bpfilter is bpfilter's and not the lab's."""
import os

import pytest

import rulegen
from lab import EGRESS_POOLS, HOST_ADDRS, SENDERS, Lab, differential, expected_point, number
from probes import ALL_FRAGS, COMPLETE_FRAGS, IPPROTO_ICMP, IPPROTO_OTHER, IPPROTO_TCP, \
    IPPROTO_UDP, Probe

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces")

EMPTY = "*filter\n:INPUT {0} [0:0]\n:FORWARD {0} [0:0]\n:OUTPUT {0} [0:0]\nCOMMIT\n"


def every_path_probes():
    """One probe per (hook, sender, destination, protocol, fragmentation) combination."""
    ps = []
    protos = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_OTHER]
    for i, s in enumerate(SENDERS):
        for j, d in enumerate(HOST_ADDRS):
            for f in COMPLETE_FRAGS:
                ps.append(Probe("INPUT", s, "203.0.113.200", d, protos[(i + j) % 4], frag=f,
                                tcp_opts=(2, 8), ip_opts=bool(j % 2)))
        for egress, pool in EGRESS_POOLS.items():
            if SENDERS[s] != egress:
                for k, f in enumerate(ALL_FRAGS):
                    ps.append(Probe("FORWARD", s, "198.51.100.99", pool[k % len(pool)],
                                    protos[k % 4], frag=f, icmp_type=0))
    for egress, pool in EGRESS_POOLS.items():
        for k, f in enumerate(ALL_FRAGS):
            ps.append(Probe("OUTPUT", "host", "192.0.2.1", pool[-1 - k % len(pool)], protos[k % 4],
                            frag=f, ip_opts=True))
    return number(ps)


@pytest.fixture(scope="module")
def lab():
    with Lab(tag="l") as lab:
        yield lab


def test_accept_delivers_every_probe_where_expected(lab):
    probes = every_path_probes()
    lab.load(EMPTY.format("ACCEPT"))
    out = lab.send(probes)
    wrong = [f"{p.describe()}: {out[p.ident]} expected at {expected_point(p)}" for p in probes
             if {pt for pt, _ in out[p.ident]} != {expected_point(p)}
             or len(out[p.ident]) != len(p.expected())]
    assert not wrong, "\n".join(wrong)
    c = lab.counters()
    for hook in ("INPUT", "FORWARD"):
        mine = [p for p in probes if p.hook == hook]
        n = sum(len(p.expected()) for p in mine)
        assert c[(hook, "policy")] == (n, sum(p.size() for p in mine))
    # OUTPUT also counts the host's own replies (TCP RSTs, ICMP errors) to INPUT probes
    assert c[("OUTPUT", "policy")][0] >= sum(len(p.expected()) for p in probes if p.hook == "OUTPUT")


def test_drop_policies_drop_every_probe(lab):
    probes = every_path_probes()
    lab.load(EMPTY.format("DROP"))
    out = lab.send(probes)
    seen = [f"{p.describe()}: {out[p.ident]}" for p in probes
            if {pt for pt, _ in out[p.ident]} - {"send:EPERM"}]
    assert not seen, "\n".join(seen)


def test_ruleset_replacement_resets_counters(lab):
    probes = every_path_probes()[:5]
    lab.load(EMPTY.format("ACCEPT"))
    lab.send(probes)
    lab.load(EMPTY.format("ACCEPT"))
    assert lab.counters()[("INPUT", "policy")] == (0, 0)


def test_every_generated_case_has_user_chains_jumps_gotos_returns():
    for seed in range(300):
        case = rulegen.generate(seed)
        targets = [r.target for r in case.rules]
        assert case.user_chains, seed
        assert any(t.startswith("-j ") for t in targets), seed
        assert any(t.startswith("-g ") for t in targets), seed
        assert "RETURN" in targets, seed


def test_generator_is_reproducible():
    a, b = rulegen.generate(1234), rulegen.generate(1234)
    assert a.text() == b.text() and a.probes == b.probes
    assert rulegen.generate(1235).text() != a.text()


@pytest.mark.parametrize("seed", range(30))
def test_two_kernel_labs_agree(seed, lab, lab2):
    case = rulegen.generate(seed)
    diffs = differential(lab, lab2, case.text(), case.probes)
    assert not diffs, rulegen.describe_case(case) + "\n" + "\n".join(diffs)


@pytest.fixture(scope="module")
def lab2():
    with Lab(tag="m") as lab:
        yield lab


def test_generated_probes_hit_rules_and_both_outcomes(lab):
    """The generated probes are aimed: they hit a good share of the rules (the rest are mostly
    unsatisfiable on purpose, e.g. "-f" with a port match, "-o lo", or shadowed), and the
    delivered/dropped outcomes are both well represented."""
    hit = rules = delivered = total = 0
    for seed in range(40):
        case = rulegen.generate(seed)
        lab.load(case.text())
        out = lab.send(case.probes)
        c = lab.counters()
        rules += sum(1 for k in c if isinstance(k[1], int))
        hit += sum(1 for k, v in c.items() if isinstance(k[1], int) and v[0])
        total += len(out)
        delivered += sum(1 for v in out.values() if v and not v[0][0].startswith("send:"))
    assert hit / rules > 0.45, (hit, rules)
    assert 0.25 < delivered / total < 0.75, (delivered, total)


def test_handwritten_probes_hit_rules(lab):
    import test_differential_handwritten as H
    hit = rules = 0
    for name, make in H.CASES.items():
        text, probes = make()
        lab.load(text)
        lab.send(number(probes))
        c = lab.counters()
        rules += sum(1 for k in c if isinstance(k[1], int))
        hit += sum(1 for k, v in c.items() if isinstance(k[1], int) and v[0])
    assert hit / rules > 0.9, (hit, rules)


def test_entry_counters_agree_with_iptables_save(lab):
    """The counters read with GET_ENTRIES (every entry) are the ones iptables-legacy-save -c
    prints (rules and policies)."""
    from lab import parse_save_counters
    case = rulegen.generate(7)
    lab.load(case.text())
    lab.send(case.probes)
    mine = lab.counters()
    save = parse_save_counters(lab.host.run(["iptables-legacy-save", "-c"]).stdout)
    assert save and all(mine[k] == v for k, v in save.items())
