"""Counters through the door while appends move a fan-out's chains (issue #7): a helper keeps
the table an `iptables-legacy -A` ahead of a fan-out leaves, whose service chains are moved and
unmade (model._MovedChain); the next command's GET_ENTRIES patches the counts of the entries
that counted, some in those chains (engine.entry_offsets, without making them). Packets flow
between the appends into a bpfilter namespace and a kernel one alike; iptables-legacy-save -c
must print the same counters in both.

Real helper, the C launcher, iptables-legacy and the kernel's xtables, UDP through veths."""
import os
import socket

import pytest

from lab import parse_save_counters
from nsutil import Netns, veth
from test_door import flush
from test_door_launcher import env_of, launch, launcher, start_helper  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF")

SERVICES = 300
HOST, PEER = "192.0.2.1", "192.0.2.2"
ROUNDS = [{3: 5, 17: 2, 259: 4}, {3: 1, 42: 6}, {0: 3, 17: 1, 299: 2}]


def _fanout_text() -> str:
    """INPUT -j SVC, SVC jumping to one chain per UDP port, each chain an ACCEPT of the peer's
    /27 and a DROP (a fan-out like bench/rulesets.py's, with ports the test sends to)."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":SVC - [0:0]"] + [f":SVC-{k} - [0:0]" for k in range(SERVICES)]
    lines.append("-A INPUT -j SVC")
    lines += [f"-A SVC -d {HOST}/32 -p udp -m udp --dport {1000 + k} -j SVC-{k}"
              for k in range(SERVICES)]
    for k in range(SERVICES):
        lines += [f"-A SVC-{k} -s 192.0.2.0/27 -j ACCEPT", f"-A SVC-{k} -j DROP"]
    return "\n".join(lines + ["COMMIT", ""])


def _send(peer: Netns, counts: dict):
    """counts {service k: packets} of UDP from the peer to the service's port."""
    with peer.inside(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.bind((PEER, 0))
        for k, n in sorted(counts.items()):
            for _ in range(n):
                tx.sendto(b"x" * (10 + k), (HOST, 1000 + k))


def _receivers(ns: Netns) -> list:
    """A bound socket per service port: no ICMP port unreachable goes back (OUTPUT stays
    quiet, and its rate limit does not make the two namespaces differ)."""
    socks = []
    with ns.inside():
        for k in range(SERVICES):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOST, 1000 + k))
            socks.append(s)
    return socks


def _appends_with_traffic(ns, peer, run):
    run(["iptables-legacy-restore"], _fanout_text())
    for r, counts in enumerate(ROUNDS):
        _send(peer, counts)
        run(["iptables-legacy", "-A", "INPUT", "-s", f"203.0.113.{10 + r}/32", "-p", "udp",
             "-m", "udp", "--dport", "4", "-j", "DROP"], None)
    _send(peer, {5: 1})
    return parse_save_counters(run(["iptables-legacy-save", "-c", "-t", "filter"], None))


def test_counts_in_moved_chains_match_the_kernels(launcher):  # noqa: F811
    with Netns("kb") as b, Netns("kbp") as bp, Netns("kk") as k, Netns("kkp") as kp:
        veth(b, "h0", bp, "p0", f"{HOST}/24", f"{PEER}/24")
        veth(k, "h0", kp, "p0", f"{HOST}/24", f"{PEER}/24")
        socks = _receivers(b) + _receivers(k)
        helper = None
        try:
            helper = start_helper(b, idle="30")

            def through_door(argv, text):
                p, _ = launch(b, argv, env=env_of(b, BPFILTER_IDLE_EXIT="30"), input=text)
                assert p.returncode == 0, p.stderr
                return p.stdout

            def kernel(argv, text):
                return k.run(argv, input=text).stdout
            got = _appends_with_traffic(b, bp, through_door)
            want = _appends_with_traffic(k, kp, kernel)
        finally:
            for s in socks:
                s.close()
            flush(b)
            if helper is not None:
                helper.kill()
                helper.wait(timeout=30)
        assert got == want
        # the counts are where the packets went: SVC's jumps, the service chains' ACCEPTs
        assert want[("SVC", 3)] == (6, 6 * 28 + 6 * 13) and want[("SVC-42", 0)][0] == 6
        assert want[("INPUT", 0)][0] == sum(sum(c.values()) for c in ROUNDS) + 1
