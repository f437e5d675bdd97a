"""ip6tables REJECT (issue #6 items 2 and 4), differential against kernel ip6tables-legacy in
the IPv6 lab of test_differential_ipv6_lab.py: the same crafted packets from the client, the
reply captured on the client's interface (AF_PACKET), compared byte for byte except the
fields the kernel may leave partial on a veth (transport checksums) and the flow label of an
ICMPv6 error (ip6_make_flowlabel() hashes the flow when auto flow labels are on); and the
counters of every entry."""
import os
import socket
import struct
import time

import pytest

from probes import csum
from test_differential_ipv6_lab import (C0, ETH_P_IPV6, H0, MAC, S0, BpfilterFilter,
                                        KernelFilter, Lab6, _mac, blob_of,
                                        noise_entries, with_noise)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

TYPES = ["icmp6-no-route", "icmp6-adm-prohibited", "icmp6-addr-unreachable",
         "icmp6-port-unreachable", "icmp6-policy-fail", "icmp6-reject-route"]
PORT0 = 4000


def ruleset() -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             "-A INPUT -p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset",
             "-A FORWARD -p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset"]
    for i, t in enumerate(TYPES):
        lines.append(f"-A INPUT -p udp -m udp --dport {PORT0 + i} -j REJECT --reject-with {t}")
        lines.append(f"-A FORWARD -p udp -m udp --dport {PORT0 + i} -j REJECT "
                     f"--reject-with {t}")
    return with_noise("\n".join(lines + ["COMMIT", ""]))


@pytest.fixture(scope="module")
def labs6():
    with Lab6(KernelFilter) as ref, Lab6(BpfilterFilter) as cand:
        for lab in (ref, cand):
            lab.load(ruleset())
        yield ref, cand


def ip6(nh: int, src: str, dst: str, payload: bytes) -> bytes:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    return struct.pack("!IHBB", 6 << 28, len(payload), nh, 64) + s + d + payload


def l4(nh: int, src: str, dst: str, seg: bytearray, at: int) -> bytes:
    ph = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + \
        struct.pack("!IxxxB", len(seg), nh)
    seg[at:at + 2] = struct.pack("!H", csum(ph + bytes(seg)))
    return bytes(seg)


def tcp(dst: str, flags: int, data: bytes = b"") -> bytes:
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 23, 0x01020304, 0x0a0b0c0d, 5 << 4, flags,
                                1024, 0, 0) + data)
    return ip6(6, C0, dst, l4(6, C0, dst, seg, 16))


def udp(dst: str, dport: int) -> bytes:
    seg = bytearray(struct.pack("!HHHH", 41000, dport, 8 + 60, 0) + b"z" * 60)
    return ip6(17, C0, dst, l4(17, C0, dst, seg, 6))


def exchange(lab, pkt: bytes, nh: int, wait: float = 1.0) -> list:
    """Send from the client's c0 and capture the IPv6 packets of next header `nh` coming back
    to C0 on c0."""
    with lab.c.inside():
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IPV6))
    try:
        rx.bind(("c0", ETH_P_IPV6))
        rx.settimeout(0.05)
        lab._pkt.send(_mac(MAC["h0"]) + _mac(MAC["c0"]) + ETH_P_IPV6.to_bytes(2, "big") + pkt)
        out, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                frame, addr = rx.recvfrom(4096)
            except (socket.timeout, TimeoutError):
                if out:
                    break
                continue
            p = frame[14:] if addr[2] != 4 else b""          # not PACKET_OUTGOING
            if len(p) >= 40 and p[6] == nh and p[24:40] == socket.inet_pton(socket.AF_INET6,
                                                                              C0):
                out.append(p)
        return out
    finally:
        rx.close()


def masked(p: bytes) -> bytes:
    r = bytearray(p)
    if r[6] == 58:
        r[1:4] = bytes([r[1] & 0xf0, 0, 0])      # flow label
        r[42:44] = b"\0\0"
    if r[6] == 6:
        r[56:58] = b"\0\0"
    return bytes(r)


@pytest.mark.parametrize("dst", [H0, S0], ids=["INPUT", "FORWARD"])
@pytest.mark.parametrize("flags,data", [(0x02, b""), (0x10, b"x" * 7)], ids=["syn", "ack+data"])
def test_tcp_reset6_bytes(labs6, dst, flags, data):
    pkt = tcp(dst, flags, data)
    ref, cand = (exchange(lab, pkt, 6) for lab in labs6)
    assert len(ref) == 1, ref
    assert [masked(p) for p in cand] == [masked(p) for p in ref]


@pytest.mark.parametrize("dst", [H0, S0], ids=["INPUT", "FORWARD"])
@pytest.mark.parametrize("kind", TYPES)
def test_icmp6_error_bytes(labs6, dst, kind):
    pkt = udp(dst, PORT0 + TYPES.index(kind))
    ref, cand = (exchange(lab, pkt, 58) for lab in labs6)
    assert len(ref) == 1, ref
    assert [masked(p) for p in cand] == [masked(p) for p in ref]


def test_counters6(labs6):
    """Every entry but the NOISE rules (MLD reports come and go on their own)."""
    ref, cand = labs6
    noise = noise_entries(blob_of(ruleset()))
    time.sleep(0.1)
    keep = lambda cs: [c for i, c in enumerate(cs) if i not in noise]    # noqa: E731
    assert keep(cand.filter.counters()) == keep(ref.filter.counters())
