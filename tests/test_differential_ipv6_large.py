"""Differential test of IPv6 prefix runs (classify.py's lpm6, issue #7) against the kernel's
ip6tables: a blocklist of N source prefixes (INPUT) and N destination prefixes (FORWARD), nested
and overlapping (/44 .. /128, duplicates, RETURN between DROP and ACCEPT, run boundaries made by
rules no run takes), restored by ip6tables-legacy-restore into the kernel's lab and installed by
bpfilter's engine in another; probes aimed inside the rules' prefixes (and outside all of them)
must pass or drop alike, and every entry's packet and byte counters must be equal.

    pytest tests/test_differential_ipv6_large.py               N = 10 000 (5 000 per chain)
    BPFILTER_LARGE_N=1000 pytest tests/test_differential_ipv6_large.py
"""
import ipaddress
import os
import random

import pytest

from test_compile_ipv6_util import NH_UDP, ipv6, udp6
from test_differential_ipv6_lab import (C0, MAC, BpfilterFilter, DoorFilter, KernelFilter, Lab6,
                                        assert_same_steps, blob_of, noise_entries, with_noise)

N = int(os.environ.get("BPFILTER_LARGE_N", "10000"))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

SRC_SPACE = ipaddress.IPv6Network("2001:db8:4000::/36")     # security counts 2001:db8::/32
DST_SPACE = ipaddress.IPv6Network("2001:db8:2::/64")        # routed to h1 (the server's link)
ACTIONS = ["DROP"] * 4 + ["ACCEPT"] * 4 + ["RETURN"] * 2


def _prefix(rng, space, plens, group: int, groups: int):
    """A prefix of `space` in its group-th slice whose bits below the group are each 0 or 1 at a
    few fixed places only: prefixes of one group often nest, repeat or differ in one bit."""
    gbits = (groups - 1).bit_length()
    top = space.prefixlen + gbits
    plen = rng.choice([p for p in plens if p >= top])
    net = int(space.network_address) | group << (128 - top)
    for b in (top + 1, top + 5, top + 13, top + 29, top + 47, top + 70, 127):
        if b < plen and rng.random() < 0.5:
            net |= 1 << (127 - b)
    return net, plen


def _chain(rng, name: str, field: str, n: int, space, plens) -> tuple:
    """(rule lines, [(network, plen)] of the prefix rules) of a chain of n rules."""
    groups = max(1, n // 16)
    lines, prefixes = [], []
    for i in range(n):
        if i % 997 == 500:          # a rule no run takes: the run before it ends there
            lines.append(f"-A {name} -i h1 {field} {space} -j RETURN" if i % 2 else
                         f"-A {name} {field} {space.network_address}/ffff:ffff:ff00::ffff "
                         f"-j ACCEPT")
            continue
        net, plen = _prefix(rng, space, plens, rng.randrange(groups), groups)
        prefixes.append((net, plen))
        lines.append(f"-A {name} {field} {ipaddress.IPv6Address(net)}/{plen} "
                     f"-j {rng.choice(ACTIONS)}")
    return lines, prefixes


def _ruleset(n: int, seed: int = 3) -> tuple:
    """(restore text, source prefixes, destination prefixes)."""
    rng = random.Random(seed)
    src, sp = _chain(rng, "src6", "-s", n // 2, SRC_SPACE, [44, 48, 52, 56, 60, 64, 96, 128])
    dst, dp = _chain(rng, "dst6", "-d", n - n // 2, DST_SPACE, [72, 80, 88, 96, 112, 120, 128])
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":src6 - [0:0]", ":dst6 - [0:0]",
                      "-A INPUT -j src6", f"-A INPUT -s {SRC_SPACE.supernet(4)} -j DROP",
                      "-A FORWARD -j dst6", f"-A FORWARD -d {DST_SPACE.supernet(8)} -j ACCEPT",
                      "-A FORWARD -j DROP", *src, *dst, "COMMIT"])
    return with_noise(text), sp, dp


def _inside(rng, net: int, plen: int) -> str:
    return str(ipaddress.IPv6Address(net | rng.getrandbits(128 - plen) if plen < 128 else net))


def _probes(sp: list, dp: list, seed: int = 5) -> tuple:
    """([(name, where, dst for a static neighbour or None, packet)], the source no rule holds):
    addresses inside 30 rules' prefixes of each chain (first, last and random rules), and
    outside all of them."""
    from test_differential_ipv6_lab import H0
    rng = random.Random(seed)
    out = []
    for field, prefixes, space in (("src", sp, SRC_SPACE), ("dst", dp, DST_SPACE)):
        picks = [0, len(prefixes) - 1] + rng.sample(range(len(prefixes)), 28)
        addrs = [_inside(rng, *prefixes[k]) for k in picks]
        miss = str(space.network_address + (1 << (127 - space.prefixlen)) - 7)
        addrs.append(miss)
        if field == "src":
            src_miss = miss
        for k, a in enumerate(addrs):
            if field == "src":
                out.append((f"src{k}:{a}", "in", None, ipv6(src=a, dst=H0, nh=NH_UDP,
                                                              payload=udp6(5000, 53))))
            else:
                out.append((f"dst{k}:{a}", "fwd", a, ipv6(src=C0, dst=a, nh=NH_UDP,
                                                          payload=udp6(5000, 53))))
    return out, src_miss


def _appended(text: str, miss: str) -> str:
    """`text` with a rule appended to the source chain that accepts the probe from `miss`
    (which no rule held: it RETURNed into INPUT's DROP), and one more that never matches."""
    extra = f"-A src6 -s {miss}/128 -j ACCEPT\n-A src6 -s fd00::/8 -j DROP\n"
    return text.replace("COMMIT", extra + "COMMIT")


def _run(installer, texts: list, probes: list) -> list:
    """[(outcomes, counters)] after each text is loaded in turn (the second one appends to the
    first: the candidate keeps its runs and adds linear code)."""
    out = []
    with Lab6(installer) as lab:
        for _, _, dst, _ in probes:         # forwarded probes need a neighbour: no NS sent
            if dst is not None:
                lab.h.run(f"ip -6 neigh replace {dst} lladdr {MAC['s0']} dev h1 nud permanent")
        for text in texts:
            lab.load(text)
            outcomes = {name: lab.send(where, [pkt]) for name, where, _, pkt in probes}
            out.append((outcomes, lab.filter.counters()))
    return out


_oracle = {}


@pytest.mark.parametrize("candidate", [BpfilterFilter, DoorFilter], ids=["engine", "door"])
def test_ipv6_prefix_runs_against_kernel(candidate):
    from bpfilter_umh import classify
    text, sp, dp = _ruleset(N)
    table = blob_of(text)
    # the chains are classified (else this would test linear code again): IPv6 LPM runs
    for name in ("src6", "dst6"):
        runs = classify.find_runs(table.chain(name).rules)
        assert runs and {r.kind for r in runs} == {"lpm6"}, (name, runs[:3])
        assert sum(len(r.rules) for r in runs) > 0.9 * len(table.chain(name).rules)
    probes, miss = _probes(sp, dp)
    texts = [text, _appended(text, miss)]
    if "r" not in _oracle:
        _oracle["r"] = _run(KernelFilter, texts, probes)
    want = _oracle["r"]
    got = _run(candidate, texts, probes)
    assert_same_steps(want, got, [n for n, *_ in probes], table, 2)
    skip = noise_entries(table)
    # meaningful: probes were both passed and dropped at both hooks, many entries counted, and
    # the appended rule turned the missing probe's verdict
    want_out, want_cnt = want[0]
    passed = {w for n, w, _, _ in probes if any(p for p, _ in want_out[n][:3])}
    dropped = {w for n, w, _, _ in probes if not any(p for p, _ in want_out[n][:3])}
    assert passed == dropped == {"in", "fwd"}, (passed, dropped)
    hit = sum(1 for i, c in enumerate(want_cnt) if c[0] and i not in skip)
    assert hit >= 20, hit
    name = next(n for n, *_ in probes if n.endswith(":" + miss))
    assert not any(p for p, _ in want[0][0][name][:3]) and any(p for p, _ in want[1][0][name][:3])


def test_lpm6_entries_from_the_keys():
    """A long chain's prefix rules have classes (classify._classes6), and lpm6_entries reads
    each address from its key and the mask from its class then: the same trie entries as read
    from each rule."""
    from bpfilter_umh import classify
    text, _sp, _dp = _ruleset(3000)
    table = blob_of(text)
    for name in ("src6", "dst6"):
        runs = [r for r in classify.find_runs(table.chain(name).rules) if r.kind == "lpm6"]
        assert runs
        for run in runs:
            cls = classify._run_classes(run)
            assert cls is not None and None not in cls[0]
            fast = classify.lpm6_entries(run)
            run.cls = None
            assert classify.lpm6_entries(run) == fast
