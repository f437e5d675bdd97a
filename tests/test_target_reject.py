"""REJECT (issue #6 item 2), differential against kernel iptables-legacy in the traffic lab:
the same ruleset in a kernel lab and in a bpfilter lab (flavor nf: the program drops and
records an event, the netns's responder sends the reply, responder.py), the same crafted
packets from the client, and then

  - the reply the client receives, byte for byte except the fields the kernel itself chooses
    per packet (the IP ID of an ICMP error: ip_select_ident(); checksums, which the kernel may
    leave partial on a veth: CHECKSUM_PARTIAL is never completed inside the host);
  - what real sockets see: connect() fails with ECONNREFUSED at once (not a timeout), a
    connected UDP socket gets the errno icmp_err_convert[] maps the code to;
  - every rule and policy counter (the reply passes OUTPUT in both: ip_local_out, raw send).
"""
import errno
import os
import socket
import struct
import time

import pytest

from lab import _mac as lab_mac
from labfixtures import labs  # noqa: F401  (module-scoped kernel lab + bpfilter lab)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

CLIENT, HOST, SERVER = "192.0.2.2", "192.0.2.1", "198.51.100.2"
V4_TYPES = ["icmp-net-unreachable", "icmp-host-unreachable", "icmp-proto-unreachable",
            "icmp-port-unreachable", "icmp-net-prohibited", "icmp-host-prohibited",
            "icmp-admin-prohibited"]
# icmp_err_convert[] (net/ipv4/icmp.c): the errno a connected UDP socket reports
ERRNO = {"icmp-net-unreachable": errno.ENETUNREACH, "icmp-host-unreachable": errno.EHOSTUNREACH,
         "icmp-proto-unreachable": errno.ENOPROTOOPT,
         "icmp-port-unreachable": errno.ECONNREFUSED, "icmp-net-prohibited": errno.ENETUNREACH,
         "icmp-host-prohibited": errno.EHOSTUNREACH, "icmp-admin-prohibited": errno.EHOSTUNREACH}
PORT0 = 4000


def ruleset() -> str:
    lines = ["*filter",
             "-A INPUT -p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset",
             "-A FORWARD -p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset"]
    for i, t in enumerate(V4_TYPES):
        lines.append(f"-A INPUT -p udp -m udp --dport {PORT0 + i} -j REJECT --reject-with {t}")
        lines.append(f"-A FORWARD -p udp -m udp --dport {PORT0 + i} -j REJECT --reject-with {t}")
    lines += ["-A INPUT -p icmp -j REJECT",
              "-A OUTPUT -p tcp -m tcp --dport 2323 -j REJECT --reject-with tcp-reset",
              "-A OUTPUT -p udp -m udp --dport 4100 -j REJECT --reject-with icmp-port-unreachable",
              "COMMIT", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def loaded(labs):
    for lab in labs:
        lab.load(ruleset())
    return labs


def _ip_checksum(h: bytes) -> int:
    s = sum(struct.unpack(f"!{len(h) // 2}H", h))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def _ipv4(proto: int, src: str, dst: str, payload: bytes, ident: int = 0x1234) -> bytes:
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 20 + len(payload), ident, 0, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", _ip_checksum(h)) + h[12:] + payload


def _l4_checksum(src: str, dst: str, proto: int, seg: bytes) -> int:
    ph = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, len(seg))
    data = ph + seg + (b"\0" if len(seg) % 2 else b"")
    return _ip_checksum(data)


def syn(dst: str, sport: int, dport: int, seq: int, flags: int = 0x02, data: bytes = b"",
        ack: int = 0) -> bytes:
    t = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 1024, 0, 0) + data
    t = t[:16] + struct.pack("!H", _l4_checksum(CLIENT, dst, 6, t)) + t[18:]
    return _ipv4(6, CLIENT, dst, t)


def udp(dst: str, sport: int, dport: int, data: bytes) -> bytes:
    u = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    u = u[:6] + struct.pack("!H", _l4_checksum(CLIENT, dst, 17, u)) + u[8:]
    return _ipv4(17, CLIENT, dst, u)


def exchange(lab, pkt: bytes, dst: str, proto: int, wait: float = 1.0) -> list:
    """Send a crafted datagram from the client (c0) and collect the `proto` packets that come
    back to it within `wait` seconds (stops early after the first one plus 50 ms)."""
    with lab.client.inside():
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    try:
        rx.settimeout(0.05)
        tx.sendto(pkt, (dst, 0))
        out, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                data, peer = rx.recvfrom(4096)
            except (socket.timeout, TimeoutError):
                if out:
                    break
                continue
            if data[16:20] == socket.inet_aton(CLIENT) and data[12:20] != pkt[12:20]:
                out.append(data)
        return out
    finally:
        tx.close()
        rx.close()


def masked(reply: bytes) -> bytes:
    """The reply without the fields the kernel picks per packet: IP ID (icmp errors), the IP
    and transport checksums (possibly partial on a veth)."""
    r = bytearray(reply)
    ihl = (r[0] & 0xf) * 4
    if r[9] == 1:
        r[4:6] = b"\0\0"
    r[10:12] = b"\0\0"
    csum_at = {6: 16, 1: 2}.get(r[9])
    if csum_at is not None:
        r[ihl + csum_at:ihl + csum_at + 2] = b"\0\0"
    return bytes(r)


def both(labs, fn):
    return [fn(lab) for lab in labs]


@pytest.mark.parametrize("dst", [HOST, SERVER], ids=["INPUT", "FORWARD"])
@pytest.mark.parametrize("flags,data", [(0x02, b""), (0x10, b"x" * 7), (0x01 | 0x10, b"")],
                         ids=["syn", "ack+data", "fin+ack"])
def test_tcp_reset_bytes(loaded, dst, flags, data):
    pkt = syn(dst, 40000, 23, 0x01020304, flags, data, ack=0x0a0b0c0d)
    ref, cand = both(loaded, lambda lab: exchange(lab, pkt, dst, socket.IPPROTO_TCP))
    assert len(ref) == 1, ref
    assert [masked(r) for r in cand] == [masked(r) for r in ref]


def test_no_reset_for_reset(loaded):
    pkt = syn(HOST, 40001, 23, 7, 0x04)
    ref, cand = both(loaded, lambda lab: exchange(lab, pkt, HOST, socket.IPPROTO_TCP, 0.3))
    assert ref == cand == []


@pytest.mark.parametrize("dst", [HOST, SERVER], ids=["INPUT", "FORWARD"])
@pytest.mark.parametrize("kind", V4_TYPES)
def test_icmp_error_bytes(loaded, dst, kind):
    pkt = udp(dst, 41000, PORT0 + V4_TYPES.index(kind), b"hello " * 20)
    ref, cand = both(loaded, lambda lab: exchange(lab, pkt, dst, socket.IPPROTO_ICMP))
    assert len(ref) == 1, ref
    assert [masked(r) for r in cand] == [masked(r) for r in ref]


def test_no_error_about_an_error(loaded):
    """icmp_send() never answers an ICMP error (here: a port unreachable the client sends)."""
    icmp = struct.pack("!BBHI", 3, 3, 0, 0) + udp(HOST, 1, 2, b"")[:28]
    icmp = icmp[:2] + struct.pack("!H", _ip_checksum(icmp)) + icmp[4:]
    pkt = _ipv4(1, CLIENT, HOST, icmp)
    ref, cand = both(loaded, lambda lab: exchange(lab, pkt, HOST, socket.IPPROTO_ICMP, 0.3))
    assert ref == cand == []


def _connect(lab, addr: str, port: int) -> tuple:
    with lab.client.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2.0)
    t0 = time.monotonic()
    try:
        s.connect((addr, port))
        return "connected", 0.0
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e)), time.monotonic() - t0
    finally:
        s.close()


def _udp_errno(lab, addr: str, port: int) -> str:
    with lab.client.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    # IP_RECVERR: report every ICMP error, not only the "fatal" ones of icmp_err_convert[]
    s.setsockopt(socket.IPPROTO_IP, 11, 1)          # IP_RECVERR
    try:
        s.connect((addr, port))
        s.send(b"ping")
        s.recv(100)
        return "answered"
    except OSError as e:
        return errno.errorcode.get(e.errno, "timeout" if isinstance(e, TimeoutError) else str(e))
    finally:
        s.close()


@pytest.mark.parametrize("dst", [HOST, SERVER], ids=["INPUT", "FORWARD"])
def test_real_sockets_and_counters(loaded, dst):
    ref, cand = loaded
    before = both(loaded, lambda lab: lab.counters())
    got = both(loaded, lambda lab: _connect(lab, dst, 23))
    assert got[0][0] == got[1][0] == "ECONNREFUSED"
    assert got[1][1] < 0.5, f"bpfilter's RST took {got[1][1]:.3f} s"
    for i, kind in enumerate(V4_TYPES):
        res = both(loaded, lambda lab: _udp_errno(lab, dst, PORT0 + i))
        assert res[0] == res[1] == errno.errorcode[ERRNO[kind]], (kind, res)
    after = both(loaded, lambda lab: lab.counters())
    delta = [{k: (a[k][0] - b.get(k, (0, 0))[0], a[k][1] - b.get(k, (0, 0))[1]) for k in a}
             for a, b in zip(after, before)]
    assert delta[1] == delta[0]
    assert any(v[0] for k, v in delta[0].items() if k[0] == "OUTPUT"), "replies pass OUTPUT"


def test_ping_rejected_with_port_unreachable(loaded):
    """-j REJECT without --reject-with: icmp-port-unreachable (libipt_REJECT's default)."""
    res = both(loaded, lambda lab: lab.ping(HOST))
    assert res == [False, False]


def _host_socket(lab, kind):
    with lab.host.inside():
        s = socket.socket(socket.AF_INET, kind)
    s.settimeout(2.0)
    try:
        if kind == socket.SOCK_STREAM:
            s.connect((CLIENT, 2323))
            return "connected"
        s.connect((CLIENT, 4100))
        s.send(b"x")
        s.recv(10)
        return "answered"
    except OSError as e:
        return errno.errorcode.get(e.errno, "timeout" if isinstance(e, TimeoutError) else str(e))
    finally:
        s.close()


def test_output_reject_reaches_the_local_sender(loaded):
    """REJECT in OUTPUT: the sender's send fails with EPERM (nf_hook_slow returns -EPERM for
    NF_DROP at LOCAL_OUT) and the reply comes back to the host over lo, passing OUTPUT and INPUT:
    the same in both, and the same counters (the reply's INPUT policy count included)."""
    before = both(loaded, lambda lab: lab.counters())
    # TCP: connect() may report either the dropped SYN (EPERM) or the RST that raced it back
    # (ECONNREFUSED), in the kernel too; what must not happen is a timeout
    res = both(loaded, lambda lab: _host_socket(lab, socket.SOCK_STREAM))
    assert set(res) <= {"EPERM", "ECONNREFUSED"}, res
    res = both(loaded, lambda lab: _host_socket(lab, socket.SOCK_DGRAM))
    assert res[0] == res[1] == "EPERM", res
    time.sleep(0.05)
    after = both(loaded, lambda lab: lab.counters())
    delta = [{k: (a[k][0] - b.get(k, (0, 0))[0], a[k][1] - b.get(k, (0, 0))[1]) for k in a}
             for a, b in zip(after, before)]
    assert delta[1] == delta[0]
    assert delta[0][("INPUT", "policy")][0] >= 1, "a reply came back through INPUT"


def _frame_exchange(lab, pkt: bytes, proto: int, wait: float = 0.5) -> list:
    """Like exchange(), but the datagram leaves c0 in an Ethernet broadcast frame: the host
    receives it with pkt_type PACKET_BROADCAST although its IP destination is the host's own."""
    with lab.client.inside():
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    try:
        tx.bind(("c0", 0))
        rx.settimeout(0.05)
        src = lab_mac(0, 2)                     # c0: the peer side of the host's eth0
        tx.send(b"\xff" * 6 + bytes.fromhex(src.replace(":", "")) + b"\x08\x00" + pkt)
        out, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                data = rx.recv(4096)
            except (socket.timeout, TimeoutError):
                continue
            if data[16:20] == socket.inet_aton(CLIENT):
                out.append(data)
        return out
    finally:
        tx.close()
        rx.close()


def test_link_broadcast_gets_a_reset_but_no_icmp_error(loaded):
    """__icmp_send() answers only PACKET_HOST datagrams; nf_send_reset() looks at the route, not
    at pkt_type: a TCP segment in a broadcast frame gets its RST, a UDP datagram no error."""
    seg = syn(HOST, 40002, 23, 99)
    ref, cand = both(loaded, lambda lab: _frame_exchange(lab, seg, socket.IPPROTO_TCP))
    assert len(ref) == 1 and [masked(r) for r in cand] == [masked(r) for r in ref]
    dgram = udp(HOST, 41001, PORT0 + 3, b"bcast")
    ref, cand = both(loaded, lambda lab: _frame_exchange(lab, dgram, socket.IPPROTO_ICMP))
    assert ref == cand == []
