"""Flavors tc and xdp with real packets: a router namespace r between a (192.0.2.0/24) and
b (198.51.100.0/24); rulesets installed in r with Engine.open(flavor=...); INPUT, FORWARD and
OUTPUT told apart as the kernel does; -i/-o names; counters; an interface created after the
install is filtered without any iptables command (the watcher); atomic replacement keeps
filtering; flush removes links, pins and the watcher."""
import os
import subprocess
import time

import pytest

from nsutil import Netns, veth
from test_compile_util import ACCEPT, DROP, icmp, rule, table, udp
from bpfilter_umh import attach
from bpfilter_umh.engine import Engine
from bpfilter_umh.errors import BpfilterError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

A, RA, RB, B = "192.0.2.1", "192.0.2.254", "198.51.100.254", "198.51.100.1"
PING_LEN = 84


@pytest.fixture
def net():
    with Netns("a") as a, Netns("r") as r, Netns("b") as b:
        veth(a, "va", r, "ra", A + "/24", RA + "/24")
        veth(r, "rb", b, "vb", RB + "/24", B + "/24")
        a.run(f"ip route add default via {RA}")
        b.run(f"ip route add default via {RB}")
        r.run("sysctl -qw net.ipv4.ip_forward=1")
        yield a, r, b


def ping(ns, dst) -> bool:
    return ns.run(f"ping -n -q -c 1 -W 1 {dst}", check=False).returncode == 0


def udp_noports(ns) -> int:
    lines = [ln.split() for ln in ns.run("cat /proc/net/snmp").stdout.splitlines()
             if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("NoPorts")])


def send_udp(ns, dst, port):
    ns.run(f"echo hello | socat -u - UDP4-SENDTO:{dst}:{port}", check=False)


def ruleset():
    r_in = rule(DROP, icmp(8), proto=1, iniface="ra")               # ping a -> r
    r_fwd = rule(DROP, udp(dport=(7777, 7777)), proto=17, iniface="ra", outiface="rb")
    r_out = rule(DROP, icmp(8), proto=1, outiface="rb")             # ping r -> b
    return table({"INPUT": (ACCEPT, [r_in]), "FORWARD": (ACCEPT, [r_fwd]),
                  "OUTPUT": (ACCEPT, [r_out])}), r_in, r_fwd, r_out


def install(r, t, flavor):
    with r.inside():
        eng = Engine.open(flavor=flavor)
        try:
            eng.install(t)
        except BaseException:
            eng.flush()
            raise
        return eng


def flush(r, flavor):
    with r.inside():
        Engine.open(flavor=flavor).flush()


def test_tc_input_forward_output(net):
    a, r, b = net
    assert ping(a, RA) and ping(a, B) and ping(r, B)
    t, r_in, r_fwd, r_out = ruleset()
    install(r, t, "tc")
    try:
        assert not ping(a, RA), "INPUT: echo request from ra dropped"
        assert ping(a, B), "forwarded echo is FORWARD's, not INPUT's"
        assert not ping(r, B), "OUTPUT: r's echo request out of rb dropped"
        assert ping(r, A), "OUTPUT rule has -o rb: out of ra passes"
        assert ping(b, RB), "INPUT rule has -i ra: from rb passes (and r's reply is not OUTPUT-dropped)"
        n = udp_noports(b)
        send_udp(a, B, 7777)         # FORWARD drop (ra -> rb)
        send_udp(a, B, 7778)
        assert udp_noports(b) == n + 1
        with r.inside():
            eng = Engine.open(flavor="tc")
            c = eng.counters()
            st = eng.status()
        assert c[r_in.index] == (1, PING_LEN)
        assert c[r_fwd.index][0] == 1
        # ping resends a request the device refused (ENOBUFS, see docs/flavors.md): >= 1
        assert c[r_out.index][0] >= 1 and c[r_out.index][1] == c[r_out.index][0] * PING_LEN
        chains = {ch["name"]: ch for ch in st["chains"]}
        assert chains["INPUT"]["flavor"] == "tc" and chains["OUTPUT"]["prog_id"]
    finally:
        flush(r, "tc")
    assert ping(a, RA) and ping(r, B)
    with r.inside():
        assert not os.path.exists(attach.L2Attachment.directory("tc"))
        assert not attach.watcher_running("tc")


def test_xdp_input_forward_and_output_refused(net):
    a, r, b = net
    t, r_in, r_fwd, r_out = ruleset()
    with r.inside():
        with pytest.raises(BpfilterError, match="chain OUTPUT: flavor xdp cannot serve"):
            Engine.open(flavor="xdp").install(t)
    t2 = table({"INPUT": (ACCEPT, [rule(DROP, icmp(8), proto=1, iniface="ra")]),
                "FORWARD": (ACCEPT, [rule(DROP, udp(dport=(7777, 7777)), proto=17,
                                          outiface="rb")])})
    install(r, t2, "xdp")
    try:
        assert not ping(a, RA)
        assert ping(a, B)
        assert ping(r, B), "xdp has no OUTPUT"
        n = udp_noports(b)
        send_udp(a, B, 7777)
        send_udp(a, B, 7778)
        assert udp_noports(b) == n + 1
        with r.inside():
            c = Engine.open(flavor="xdp").counters()
            modes = r.run("ip -d link show ra").stdout + r.run("ip -d link show lo").stdout
        assert c[0] == (1, PING_LEN)
        assert "xdp" in modes            # native on veth, generic on lo
    finally:
        flush(r, "xdp")
    assert ping(a, RA)


def test_tc_new_and_renamed_interface_filtered_by_watcher(net):
    a, r, b = net
    t = table({"INPUT": (ACCEPT, [rule(DROP, icmp(8), proto=1, iniface="rc")])})
    install(r, t, "tc")
    try:
        with Netns("c") as c:
            veth(r, "tmpc", c, "vc", "203.0.113.254/24", "203.0.113.1/24")
            r.run("ip link set tmpc down && ip link set tmpc name rc && ip link set rc up")
            ok = False
            for _ in range(30):                      # the watcher attaches within ~1 s
                if not ping(c, "203.0.113.254"):
                    ok = True
                    break
                time.sleep(0.2)
            assert ok, "ping through a new, renamed interface should be dropped by -i rc"
            assert ping(a, RA)
    finally:
        flush(r, "tc")


def test_tc_atomic_replace_keeps_filtering(net):
    """A flood of UDP to a dropped port while the ruleset is replaced 20 times: nothing leaks."""
    a, r, b = net
    t = table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(9999, 9999)), proto=17)])})
    install(r, t, "tc")
    try:
        n = udp_noports(r)
        flood = a.popen(f"for i in $(seq 400); do echo x; done | socat -u - "
                        f"UDP4-SENDTO:{RA}:9999", stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        with r.inside():
            eng = Engine.open(flavor="tc")
            for _ in range(20):
                eng.install(t)
        flood.wait(timeout=30)
        assert udp_noports(r) == n
    finally:
        flush(r, "tc")
