"""Engine.open(AF_INET6) with real IPv6 traffic: an ip6tables ruleset installed by the engine in
the host namespace of the IPv6 lab, ping6 and UDP from real sockets (not crafted packets), verdicts
and per-rule counters (skb->len: IPv6 header + payload), then state adopted by a fresh Engine and
flushed."""
import os
import socket

import pytest

from test_differential_ipv6_lab import H0, BpfilterFilter, Lab6, blob_of, with_noise
from bpfilter_umh.engine import Engine
from bpfilter_umh.model import AF_INET6

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

RULES = with_noise("""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -s 2001:db8:1::2/128 -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j DROP
-A INPUT -i h0 -p udp -m udp --dport 9999 -j DROP
-A INPUT -p udp -m udp --dport 7000 -j ACCEPT
COMMIT
""")
PING6_LEN = 40 + 8 + 56        # ping's default 56 data bytes


def ping6(ns, addr) -> bool:
    return ns.run(f"ping -6 -n -q -c 1 -W 1 {addr}", check=False).returncode == 0


def test_ipv6_table_installed_with_real_traffic():
    t = blob_of(RULES)
    inp = t.chain("INPUT")
    r_ping, r_9999, r_7000 = inp.rules[2], inp.rules[3], inp.rules[4]
    with Lab6(BpfilterFilter) as lab:
        assert ping6(lab.c, H0), "no IPv6 connectivity before any rule"
        lab.load(RULES)
        assert not ping6(lab.c, H0), "echo request to the host must be dropped at INPUT"
        with lab.h.inside():
            srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with srv:
            srv.bind((H0, 7000))
            srv.settimeout(2)
            lab.c.run(f"echo hello | socat -u - UDP6-SENDTO:[{H0}]:7000")
            assert srv.recvfrom(100)[0] == b"hello\n"
            lab.c.run(f"echo dropped | socat -u - UDP6-SENDTO:[{H0}]:9999")
        c = lab.filter.counters()
        assert c[r_ping.index] == (1, PING6_LEN)
        assert c[r_7000.index] == (1, 40 + 8 + 6)
        assert c[r_9999.index] == (1, 40 + 8 + 8)
        # a fresh Engine adopts what is installed (state file + pins) and sees the same counters
        with lab.h.inside():
            other = Engine.open(AF_INET6)
            try:
                assert other.table == lab.filter.eng.table
                assert other.counters()[r_ping.index] == (1, PING6_LEN)
                st = other.status()
                assert st["family"] == "ipv6"
                assert {ch["name"]: ch["prog_id"] is not None for ch in st["chains"]} == \
                    {"INPUT": True, "FORWARD": True, "OUTPUT": True}
            finally:
                other.close()
            lab.filter.eng.flush()
        assert ping6(lab.c, H0), "flush must remove the IPv6 programs"
        with lab.h.inside():
            assert not os.path.exists(lab.filter.eng.pin_dir)
