"""LOG (issue #6 item 2), differential against kernel iptables-legacy: the same ruleset in a
kernel lab and a bpfilter lab, the same packets, and the kernel-log lines compared field by
field (the responder formats them as net/netfilter/nf_log_syslog.c does and writes them to
/dev/kmsg; responder.py).

The kernel logs packets of a non-init namespace only while /proc/sys/net/netfilter/
nf_log_all_netns is 1 (net/netfilter/nf_log_syslog.c nf_log_allowed()): the fixture sets it for
this module and puts the old value back. Lines are told apart from anyone else's by a prefix
unique to this run.

Fields that may legitimately differ: none for the same bytes. The packets are crafted with fixed
IP IDs, ports and sequence numbers (OUTPUT: a RST from a raw socket of the host, which the client
answers with nothing), the interface names and MAC addresses of the two labs
are the same. Only the syslog facility differs: a line written to /dev/kmsg gets LOG_USER
(kernel/printk/printk.c devkmsg_write() never lets user space claim LOG_KERN); the level is
the rule's in both.
"""
import os
import socket
import time

import pytest

from labfixtures import labs  # noqa: F401
from test_target_reject import CLIENT, HOST, SERVER, _ipv4, _l4_checksum, _ip_checksum

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

PFX = f"bpfl{os.getpid() % 10000}"
ALL_NETNS = "/proc/sys/net/netfilter/nf_log_all_netns"


def ruleset() -> str:
    return "\n".join([
        "*filter",
        f'-A INPUT -p tcp -m tcp --dport 22 -j LOG --log-prefix "{PFX}a: " --log-level 4 '
        "--log-tcp-sequence --log-tcp-options --log-ip-options",
        f'-A INPUT -p tcp -m tcp --dport 21 -j LOG --log-prefix "{PFX}b: " --log-level 6',
        f'-A INPUT -p udp -j LOG --log-prefix "{PFX}c: " --log-level 7 --log-uid',
        f'-A INPUT -p icmp -j LOG --log-prefix "{PFX}d: " --log-level 3',
        "-A INPUT -p icmp -j DROP",
        f'-A INPUT -p tcp -m tcp --dport 2222 -j LOG --log-prefix "{PFX}g: " --log-uid',
        f'-A FORWARD -p udp -j LOG --log-prefix "{PFX}e: " --log-level 5 --log-macdecode',
        f'-A OUTPUT -p tcp -m tcp --sport 5555 -j LOG --log-prefix "{PFX}f: " --log-uid',
        "COMMIT", ""])


@pytest.fixture(scope="module")
def loaded(labs):
    with open(ALL_NETNS) as f:
        old = f.read().strip()
    with open(ALL_NETNS, "w") as f:
        f.write("1")
    try:
        for lab in labs:
            lab.load(ruleset())
        yield labs
    finally:
        with open(ALL_NETNS, "w") as f:
            f.write(old)


class Kmsg:
    """Records appended to the kernel log after opening (/dev/kmsg, from its end)."""

    def __init__(self):
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def lines(self, want: int, wait: float = 3.0) -> list:
        """(level, text) of our lines, until `want` arrived or `wait` seconds passed."""
        out, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                rec = os.read(self.fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                if len(out) >= want:
                    break
                time.sleep(0.02)
                continue
            except BrokenPipeError:          # overwritten records: go on
                continue
            head, _, msg = rec.partition(";")
            msg = msg.split("\n", 1)[0]
            if msg.startswith(PFX):
                out.append((int(head.split(",")[0]) & 7, msg))
        return out

    def close(self):
        os.close(self.fd)


def send_raw(lab, pkt: bytes, dst: str):
    with lab.client.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.sendto(pkt, (dst, 0))
    finally:
        s.close()


def tcp_with_options(dst: str, dport: int) -> bytes:
    opts = bytes([2, 4, 0x05, 0xb4, 1, 1, 4, 2])        # MSS 1460, NOP, NOP, SACK permitted
    t = bytearray(socket.htons(0).to_bytes(2, "big"))
    import struct
    t = struct.pack("!HHIIBBHHH", 33333, dport, 0xdeadbeef, 0, 7 << 4, 0x02 | 0x40 | 0x80,
                    29200, 0, 7) + opts
    t = t[:16] + struct.pack("!H", _l4_checksum(CLIENT, dst, 6, t)) + t[18:]
    # an IP header with 4 bytes of options (NOP NOP NOP EOL): ihl 6
    ipopt = bytes([1, 1, 1, 0])
    h = struct.pack("!BBHHHBBH4s4s", 0x46, 0x28, 24 + len(t), 0x4321, 0x4000, 63, 6, 0,
                    socket.inet_aton(CLIENT), socket.inet_aton(dst)) + ipopt
    h = h[:10] + struct.pack("!H", _ip_checksum(h)) + h[12:]
    return h + t


def udp_pkt(dst: str, sport: int, dport: int) -> bytes:
    import struct
    u = struct.pack("!HHHH", sport, dport, 8 + 5, 0) + b"hello"
    u = u[:6] + struct.pack("!H", _l4_checksum(CLIENT, dst, 17, u)) + u[8:]
    return _ipv4(17, CLIENT, dst, u, ident=0x777)


def icmp_echo(dst: str) -> bytes:
    import struct
    i = struct.pack("!BBHHH", 8, 0, 0, 0x99, 3) + b"abcdefgh"
    i = i[:2] + struct.pack("!H", _ip_checksum(i)) + i[4:]
    return _ipv4(1, CLIENT, dst, i, ident=0x555)


def host_rst(lab):
    """A TCP RST from a raw socket of the host (fixed IP ID; the client answers nothing to a
    RST): skb->sk is the raw socket, so --log-uid prints its owner in both."""
    import struct
    t = struct.pack("!HHIIBBHHH", 5555, 9, 1, 0, 5 << 4, 0x04, 0, 0, 0)
    t = t[:16] + struct.pack("!H", _l4_checksum(HOST, CLIENT, 6, t)) + t[18:]
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0x2468, 0, 64, 6, 0,
                    socket.inet_aton(HOST), socket.inet_aton(CLIENT))
    with lab.host.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.sendto(h + t, (CLIENT, 0))
    finally:
        s.close()


CASES = {
    "tcp options, sequence, ip options": (lambda lab: send_raw(lab, tcp_with_options(HOST, 22),
                                                               HOST), 1),
    "tcp plain": (lambda lab: send_raw(lab, tcp_with_options(HOST, 21), HOST), 1),
    "udp with --log-uid, no socket": (lambda lab: send_raw(lab, udp_pkt(HOST, 1234, 53), HOST),
                                      1),
    "icmp echo": (lambda lab: send_raw(lab, icmp_echo(HOST), HOST), 1),
    "forward, --log-macdecode": (lambda lab: send_raw(lab, udp_pkt(SERVER, 1235, 53), SERVER),
                                 1),
    "output, --log-uid with a socket": (host_rst, 1),
}


def _fields(text: str) -> list:
    return text.split(" ")


@pytest.mark.parametrize("case", sorted(CASES))
def test_log_line_field_by_field(loaded, case):
    send, n = CASES[case]
    got = []
    for lab in loaded:
        k = Kmsg()
        try:
            send(lab)
            got.append(k.lines(n))
        finally:
            k.close()
    ref, cand = got
    assert len(ref) == n, ref
    assert len(cand) == n, (ref, cand)
    for (lr, tr), (lc, tc) in zip(ref, cand):
        assert lc == lr, (tr, tc)
        fr, fc = _fields(tr), _fields(tc)
        for i, (a, b) in enumerate(zip(fr, fc)):
            assert a == b, f"field {i}: kernel {a!r}, bpfilter {b!r}\n{tr}\n{tc}"
        assert fr == fc


def test_counters_equal(loaded):
    ref, cand = loaded
    assert cand.counters() == ref.counters()


def test_burst_beyond_the_devkmsg_rate_limit(loaded):
    """25 lines in a burst: /dev/kmsg would keep only 10 per open per 5 s; the kernel's LOG
    keeps all, and so does the responder (a fresh open per line)."""
    got = []
    for lab in loaded:
        k = Kmsg()
        try:
            for i in range(25):
                send_raw(lab, icmp_echo(HOST), HOST)
            got.append(k.lines(25, wait=5.0))
        finally:
            k.close()
    assert len(got[0]) == 25
    assert len(got[1]) == 25


def test_log_uid_of_a_real_connection(loaded):
    """A real TCP connection to a listener of the host, accepted: early demux (ip_rcv_finish)
    gives the segments after accept() their established socket, whose file has the credentials,
    so --log-uid prints UID=/GID= for those and not for the SYN (a listener is not attached) nor
    for the handshake's ACK (the request socket, TCP_NEW_SYN_RECV, is not a full socket). Fields that depend on the run
    (ephemeral port, sequence numbers, IP ID, timestamps) differ between the labs; the rest is
    compared per line: flags, DPT, UID, GID."""
    got = []
    for lab in loaded:
        k = Kmsg()
        try:
            _accepted_exchange(lab)
            got.append(k.lines(10, wait=1.0))
        finally:
            k.close()

    def key(line):
        keep = ("DPT=", "UID=", "GID=", "IN=", "OUT=", "LEN=")
        return [f for f in line.split(" ") if f.startswith(keep) or f in
                ("SYN", "ACK", "RST", "FIN", "PSH")]
    ref, cand = ([key(t) for _, t in g] for g in got)
    assert ref and any("UID=0" in r for r in ref), ref
    assert cand == ref


def _accepted_exchange(lab):
    import struct
    with lab.host.inside():
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with lab.client.inside():
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((HOST, 2222))
        ls.listen(1)
        c.settimeout(2)
        c.connect((HOST, 2222))
        conn, _ = ls.accept()
        try:
            c.sendall(b"data")
            conn.settimeout(2)
            conn.recv(10)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()                      # RST: the last segment, to the accepted socket
            time.sleep(0.05)
        finally:
            conn.close()
    finally:
        c.close()
        ls.close()
