"""ip6tables LOG (issue #6 items 2 and 4), differential against kernel ip6tables-legacy: the
same crafted IPv6 packets in the IPv6 lab (test_differential_ipv6_lab.py), the kernel's line
(nf_log_ip6_packet / dump_ipv6_packet) and the responder's compared field by field. The
kernel-log capture, the nf_log_all_netns switch and the unique prefix are those of
test_target_log.py."""
import os
import struct

import pytest

from test_differential_ipv6_lab import (C0, ETH_P_IPV6, H0, MAC, S0, BpfilterFilter,
                                        KernelFilter, Lab6, _mac, with_noise)
from test_target_log import ALL_NETNS, PFX, Kmsg
from test_target_reject6 import ip6, l4

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def ruleset() -> str:
    return with_noise("\n".join([
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        f'-A INPUT -p tcp -m tcp --dport 22 -j LOG --log-prefix "{PFX}6a: " --log-level 4 '
        "--log-tcp-sequence --log-tcp-options --log-ip-options",
        f'-A INPUT -p udp -j LOG --log-prefix "{PFX}6b: " --log-level 6 --log-ip-options',
        f'-A INPUT -p ipv6-icmp -j LOG --log-prefix "{PFX}6c: " --log-level 2',
        f'-A FORWARD -p udp -j LOG --log-prefix "{PFX}6d: " --log-macdecode',
        "COMMIT", ""]))


@pytest.fixture(scope="module")
def labs6():
    with open(ALL_NETNS) as f:
        old = f.read().strip()
    with open(ALL_NETNS, "w") as f:
        f.write("1")
    try:
        with Lab6(KernelFilter) as ref, Lab6(BpfilterFilter) as cand:
            for lab in (ref, cand):
                lab.load(ruleset())
            yield ref, cand
    finally:
        with open(ALL_NETNS, "w") as f:
            f.write(old)


def tcp_opts(dst):
    opts = bytes([2, 4, 0x05, 0xa0, 1, 1, 4, 2])
    seg = bytearray(struct.pack("!HHIIBBHHH", 33333, 22, 0xdeadbeef, 7, 7 << 4, 0x12, 29200, 0,
                                0) + opts)
    return ip6(6, C0, dst, l4(6, C0, dst, seg, 16))


def udp_dstopts(dst, dport=53):
    """UDP behind a destination-options header (PadN): --log-ip-options shows "OPT ( ) "."""
    seg = bytearray(struct.pack("!HHHH", 1234, dport, 13, 0) + b"hello")
    seg = l4(17, C0, dst, seg, 6)
    dopt = bytes([17, 0, 1, 4, 0, 0, 0, 0])
    p = ip6(60, C0, dst, dopt + seg)
    return p[:4] + struct.pack("!H", len(dopt + seg)) + p[6:]


def udp_plain(dst):
    seg = bytearray(struct.pack("!HHHH", 1234, 53, 13, 0) + b"hello")
    p = ip6(17, C0, dst, l4(17, C0, dst, seg, 6))
    return p[:1] + bytes([0x5a, 0xbc, 0xde]) + p[4:]       # traffic class 0x05, flow 0xabcde


def echo(dst):
    seg = bytearray(struct.pack("!BBHHH", 128, 0, 0, 0x42, 9) + b"ping")
    return ip6(58, C0, dst, l4(58, C0, dst, seg, 2))


CASES = {"tcp options, sequence": tcp_opts(H0), "udp behind dstopts": udp_dstopts(H0),
         "udp, tclass and flow label": udp_plain(H0), "icmpv6 echo": echo(H0),
         "forward, --log-macdecode": udp_plain(S0)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_log6_line_field_by_field(labs6, case):
    got = []
    for lab in labs6:
        k = Kmsg()
        try:
            lab._pkt.send(_mac(MAC["h0"]) + _mac(MAC["c0"]) + ETH_P_IPV6.to_bytes(2, "big")
                          + CASES[case])
            got.append(k.lines(1))
        finally:
            k.close()
    ref, cand = got
    assert len(ref) == 1, ref
    assert len(cand) == 1, (ref, cand)
    (lr, tr), (lc, tc) = ref[0], cand[0]
    assert lc == lr
    fr, fc = tr.split(" "), tc.split(" ")
    for i, (a, b) in enumerate(zip(fr, fc)):
        assert a == b, f"field {i}: kernel {a!r}, bpfilter {b!r}\n{tr}\n{tc}"
    assert fr == fc
