"""The engine with real packets: tables installed with Engine.install into a throwaway namespace,
ping and UDP through a veth pair, verdicts and counters as expected; a table the compiler cannot
translate and a program the verifier rejects both fail with a precise error naming the rule while
the previously installed programs keep filtering; state is adopted by a new Engine and flushed."""
import errno
import os

import pytest

from nsutil import Netns, veth
from test_compile_util import ACCEPT, DROP, icmp, rule, table, udp
from bpfilter_umh import ebpf as E
from bpfilter_umh.engine import Engine
from bpfilter_umh.errors import BpfilterError
from bpfilter_umh.model import ExtTarget

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

A_IP, B_IP = "192.0.2.1", "192.0.2.2"
PING_LEN = 84              # 20 IP + 8 ICMP + 56 data


@pytest.fixture
def pair():
    """Namespaces a and b joined by veth va (192.0.2.1) <-> vb (192.0.2.2)."""
    with Netns("a") as a, Netns("b") as b:
        veth(a, "va", b, "vb", A_IP + "/24", B_IP + "/24")
        yield a, b


def ping(ns) -> bool:
    return ns.run(f"ping -n -q -c 1 -W 1 {B_IP}", check=False).returncode == 0


def udp_noports(ns) -> int:
    """Udp NoPorts of the namespace: datagrams the stack got for a port nobody listens on."""
    lines = [ln.split() for ln in ns.run("cat /proc/net/snmp").stdout.splitlines()
             if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("NoPorts")])


def send_udp(ns, port: int):
    ns.run(f"echo hello | socat -u - UDP4-SENDTO:{B_IP}:{port}", check=False)


def drop_ping_table():
    r = rule(DROP, icmp(8), proto=1, iniface="vb")
    return table({"INPUT": (ACCEPT, [r, rule(DROP, udp(dport=(9999, 9999)), proto=17)])}), r


def test_install_traffic_counters_adopt_flush(pair):
    a, b = pair
    assert ping(a)
    t, r_ping = drop_ping_table()
    with b.inside():
        eng = Engine.open()
        try:
            eng.install(t)
            st = eng.status()
            inp = next(c for c in st["chains"] if c["name"] == "INPUT")
            assert inp["flavor"] == "nf" and inp["prog_id"] and inp["jited_size"] > 0
        except BaseException:
            eng.flush()
            raise
    try:
        assert not ping(a), "ICMP echo request should be dropped at INPUT"
        before = udp_noports(b)
        send_udp(a, 9999)                         # dropped by rule 2
        send_udp(a, 9998)                         # reaches the stack: NoPorts + 1
        assert udp_noports(b) == before + 1
        with b.inside():
            eng2 = Engine.open()                  # adopts the pinned state
            c = eng2.counters()
            assert eng2.table.chain("INPUT").rules[0].ip.iniface.rstrip(b"\0") == b"vb"
            assert c[r_ping.index] == (1, PING_LEN)
            assert c[1][0] == 1                   # udp 9999 rule
            pol = eng2.table.chain("INPUT").policy_entry.index
            assert c[pol][0] >= 1                 # udp 9998 (+ maybe neighbour traffic: ARP is not IP)
            eng2.add_counters([(10, 1000)] + [(0, 0)] * (len(c) - 1))
            assert Engine.open().counters()[r_ping.index] == (11, 1000 + PING_LEN)
    finally:
        with b.inside():
            Engine.open().flush()
    assert ping(a), "flush must remove the programs"
    with b.inside():
        eng3 = Engine.open()
        assert not os.path.exists(eng3.pin_dir) and not os.path.exists(eng3.state_path)
        assert all(c == (0, 0) for c in eng3.counters())


class _CorruptingEngine(Engine):
    """Loads a program the verifier must refuse: rule 2 of INPUT reads r9 before writing it."""

    def _load(self, cp, counters_map, *rest):
        if cp.chain == "INPUT":
            items, seen = [], 0
            for it in cp.items:
                items.append(it)
                if isinstance(it, E.Label) and it.name in cp.where:
                    seen += 1
                    if seen == 2:
                        items.append(E.ldx(E.DW, E.R1, E.R9, 0))
            cp.items = items
        return super()._load(cp, counters_map, *rest)


def test_failed_installs_keep_old_programs(pair):
    a, b = pair
    t, r_ping = drop_ping_table()
    bad_target = table({"INPUT": (ACCEPT, [rule(ACCEPT), rule(ExtTarget("REJECT", 0, b""))])})
    verifier_bad = table({"INPUT": (DROP, [rule(ACCEPT, proto=6), rule(ACCEPT, proto=1)])})
    with b.inside():
        eng = Engine.open()
    try:
        with b.inside():
            eng.install(t)
        assert not ping(a)
        with b.inside():
            with pytest.raises(BpfilterError) as ei:
                eng.install(bad_target)
        assert ei.value.errno == errno.EOPNOTSUPP
        assert "chain INPUT rule 2 (entry offset 100): target REJECT is not supported" \
            in ei.value.message
        assert not ping(a), "the old programs must keep filtering"
        with b.inside():
            bad = _CorruptingEngine.open()
            with pytest.raises(BpfilterError) as ei:
                bad.install(verifier_bad)
        assert ei.value.errno == errno.EACCES
        assert ei.value.message.startswith("chain INPUT rule 2 (entry offset 100): the kernel "
                                           "refused the compiled program"), ei.value.message
        assert "R9 !read_ok" in ei.value.message
        assert not ping(a), "the old programs must keep filtering"
        with b.inside():
            assert Engine.open().counters()[r_ping.index] == (3, 3 * PING_LEN)
            eng = Engine.open()
            eng.install(table({"INPUT": (ACCEPT, [rule(ACCEPT, proto=1)])}))
        assert ping(a)
    finally:
        with b.inside():
            Engine.open().flush()


def test_fresh_namespace_engine_is_empty_and_accepting(pair):
    a, b = pair
    with b.inside():
        eng = Engine.open()
        assert [c.name for c in eng.table.chains] == ["INPUT", "FORWARD", "OUTPUT"]
        assert eng._installed_programs() == {} and all(c == (0, 0) for c in eng.counters())
        assert not os.path.exists(eng.pin_dir), "opening an engine must not create pins"
        assert {c["name"]: c["prog_id"] for c in eng.status()["chains"]} == \
            {"INPUT": None, "FORWARD": None, "OUTPUT": None}
    assert ping(a)


def test_forward_chain_with_interfaces():
    """A router namespace between two hosts: FORWARD sees both devices (-i/-o, '+' wildcard)."""
    with Netns("h1") as h1, Netns("r") as r, Netns("h2") as h2:
        veth(h1, "e0", r, "ra", "192.0.2.1/24", "192.0.2.254/24")
        veth(h2, "e0", r, "rb", "198.51.100.1/24", "198.51.100.254/24")
        r.run("sysctl -qw net.ipv4.ip_forward=1")
        h1.run("ip route add default via 192.0.2.254")
        h2.run("ip route add default via 198.51.100.254")
        ping_h2 = lambda: h1.run("ping -n -q -c 1 -W 1 198.51.100.1", check=False).returncode == 0
        assert ping_h2()
        to_b = rule(DROP, icmp(8), proto=1, iniface="ra", outiface="r+")
        from_b = rule(ACCEPT, iniface="rb", outiface="ra")
        t = table({"FORWARD": (ACCEPT, [from_b, to_b])})
        try:
            with r.inside():
                Engine.open().install(t)
            assert not ping_h2()
            with r.inside():
                c = Engine.open().counters()
            assert c[to_b.index] == (1, PING_LEN)
            # h2 -> h1 passes: its request hits from_b, h1's echo reply (type 0) the policy
            assert h2.run("ping -n -q -c 1 -W 1 192.0.2.1", check=False).returncode == 0
            with r.inside():
                eng = Engine.open()
                c = eng.counters()
            pol = eng.table.chain("FORWARD").policy_entry.index
            assert (c[from_b.index], c[to_b.index], c[pol]) == \
                ((1, PING_LEN), (1, PING_LEN), (1, PING_LEN))
        finally:
            with r.inside():
                Engine.open().flush()
