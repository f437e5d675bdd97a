"""Crafted IPv4 probe packets: every header field is chosen by the test, nothing by a socket.

A Probe describes one datagram (addresses, protocol, ports, TCP flags and options, ICMP type and
code, IP options) and how it is cut into fragments. `Probe.packets()` gives the exact IPv4
packets to send; `Probe.owns(packet)` recognises them again wherever they are observed, so
packets the kernel makes itself (TCP RSTs, ICMP errors and echo replies) are never mistaken for a
probe.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field, replace

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
IPPROTO_OTHER = 253          # RFC 3692 experimental: no handler in the kernel, only raw sockets

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG = 1, 2, 4, 8, 16, 32
IP_MF = 0x2000
IP_DF = 0x4000

# TCP option kinds we may put in a probe, with their encodings (kind, length, data). tcp_find_option
# in net/netfilter/xt_tcpudp.c walks kinds 0/1 as one byte and every other kind by its length.
TCP_OPTIONS = {
    2: b"\x02\x04\x05\xb4",                      # MSS 1460
    3: b"\x03\x03\x07",                          # window scale 7
    4: b"\x04\x02",                              # SACK permitted
    8: b"\x08\x0a" + bytes(range(8)),            # timestamps
    30: b"\x1e\x04\xab\xcd",                     # multipath TCP, just a kind number here
}

# How the datagram is cut. INPUT only ever gets complete sets: ip_local_deliver() reassembles
# before NF_INET_LOCAL_IN, and an incomplete set would time out 30 s later with an ICMP error that
# would disturb the counters of a later ruleset.
FRAG_WHOLE = "whole"       # not fragmented
FRAG_BOTH = "both"         # first fragment (MF) + the rest (complete set)
FRAG_FIRST = "first"       # only the first fragment (offset 0, MF)
FRAG_LATER = "later"       # only a non-first fragment (offset 8-24 bytes, no MF)
FRAG_OFF1 = "off1"         # only a fragment at offset 8 bytes: tcp_mt hotdrops it (fragoff == 1)
FRAG_TINY = "tiny"         # first fragment holding 8 bytes of L4 header only
COMPLETE_FRAGS = (FRAG_WHOLE, FRAG_BOTH)
ALL_FRAGS = (FRAG_WHOLE, FRAG_BOTH, FRAG_FIRST, FRAG_LATER, FRAG_OFF1, FRAG_TINY)


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass
class Probe:
    hook: str                   # "INPUT", "FORWARD" or "OUTPUT": the chain it is meant to traverse
    sender: str                 # client/server interface it leaves from ("c0", "s0", ...) or "host"
    src: str
    dst: str
    proto: int = IPPROTO_UDP
    sport: int = 1024
    dport: int = 53
    tcp_flags: int = TCP_SYN
    tcp_opts: tuple = ()        # option kinds, keys of TCP_OPTIONS
    icmp_type: int = 8
    icmp_code: int = 0
    frag: str = FRAG_WHOLE
    ip_opts: bool = False       # add 4 bytes of IP options (NOP NOP NOP EOL): ihl = 6
    payload_len: int = 24
    tcp_doff: int = 0           # TCP data offset to write (0: the true header length)
    ident: int = 0              # IP id, unique per probe in a batch; set by the lab
    note: str = field(default="", compare=False)

    def l4(self) -> bytes:
        """The transport header + payload (the whole datagram after the IP header)."""
        body = struct.pack("!H", self.ident) + bytes((self.ident * 7 + i) & 0xFF
                                                     for i in range(self.payload_len - 2))
        if self.proto == IPPROTO_TCP:
            opts = b"".join(TCP_OPTIONS[k] for k in self.tcp_opts)
            opts += b"\x01" * (-len(opts) % 4)   # NOP padding to a 32-bit boundary
            doff = self.tcp_doff or (20 + len(opts)) // 4
            hdr = struct.pack("!HHIIBBHHH", self.sport, self.dport, 1000 + self.ident, 0,
                              doff << 4, self.tcp_flags, 8192, 0, 0) + opts
            return self._with_pseudo_csum(hdr + body, 16)
        if self.proto == IPPROTO_UDP:
            seg = struct.pack("!HHHH", self.sport, self.dport, 8 + len(body), 0) + body
            return self._with_pseudo_csum(seg, 6)
        if self.proto == IPPROTO_ICMP:
            msg = struct.pack("!BBHHH", self.icmp_type, self.icmp_code, 0, self.ident, 1) + body
            return msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
        return body

    def _with_pseudo_csum(self, seg: bytes, at: int) -> bytes:
        pseudo = (ipaddress.IPv4Address(self.src).packed + ipaddress.IPv4Address(self.dst).packed
                  + struct.pack("!BBH", 0, self.proto, len(seg)))
        c = csum(pseudo + seg) or 0xFFFF
        return seg[:at] + struct.pack("!H", c) + seg[at + 2:]

    def pieces(self):
        """[(byte offset, bytes, more_fragments)] of the datagram as it is cut for sending."""
        data = self.l4()
        # every fragment but the last carries a multiple of 8 bytes; keep both parts non-empty
        cut = 8 * max(1, min(3, (len(data) - 1) // 8))
        if self.frag == FRAG_WHOLE:
            return [(0, data, False)]
        if self.frag == FRAG_BOTH:
            return [(0, data[:cut], True), (cut, data[cut:], False)]
        if self.frag == FRAG_FIRST:
            return [(0, data[:cut], True)]
        if self.frag == FRAG_LATER:
            return [(cut, data[cut:], False)]
        if self.frag == FRAG_OFF1:
            return [(8, data[8:], False)]
        if self.frag == FRAG_TINY:
            return [(0, data[:8], True)]
        raise ValueError(self.frag)

    def ip_header(self, offset: int, length: int, mf: bool) -> bytes:
        opts = b"\x01\x01\x01\x00" if self.ip_opts else b""
        ihl = (20 + len(opts)) // 4
        frag = (offset // 8) | (IP_MF if mf else 0)
        hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + length, self.ident, frag, 64,
                          self.proto, 0, ipaddress.IPv4Address(self.src).packed,
                          ipaddress.IPv4Address(self.dst).packed) + opts
        return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]

    def packets(self):
        """The IPv4 packets to send, in order."""
        return [self.ip_header(off, len(d), mf) + d for off, d, mf in self.pieces()]

    def expected(self):
        """{(fragment byte offset, payload)} of what may be observed: INPUT sees the reassembled
        datagram, every other place sees the fragments as sent."""
        if self.hook == "INPUT":
            return {(0, self.l4())}
        return {(off, d) for off, d, _ in self.pieces()}

    def owns(self, pkt: bytes):
        """The fragment byte offset if `pkt` (an IPv4 packet) is this probe (or one of its
        fragments, or its reassembly) as sent, else None."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return None
        ihl = (pkt[0] & 15) * 4
        tot, ident, frag, proto = struct.unpack_from("!HHHxB", pkt, 2)
        if (ident != self.ident or proto != self.proto
                or pkt[12:16] != ipaddress.IPv4Address(self.src).packed
                or pkt[16:20] != ipaddress.IPv4Address(self.dst).packed):
            return None
        off = (frag & 0x1FFF) * 8
        return off if (off, pkt[ihl:tot]) in self.expected() else None

    def size(self, offset: int = None) -> int:
        """Bytes the kernel counts for this probe at its hook (skb->len of the IP packet)."""
        ihl = 24 if self.ip_opts else 20
        if self.hook == "INPUT":
            return ihl + len(self.l4())
        return sum(ihl + len(d) for _, d, _ in self.pieces())

    def describe(self) -> str:
        p = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp"}.get(self.proto,
                                                                            str(self.proto))
        s = f"{self.hook} from {self.sender} {self.src} -> {self.dst} {p}"
        if self.proto in (IPPROTO_TCP, IPPROTO_UDP):
            s += f" {self.sport}->{self.dport}"
        if self.proto == IPPROTO_TCP:
            s += f" flags=0x{self.tcp_flags:02x} opts={list(self.tcp_opts)}"
            if self.tcp_doff:
                s += f" doff={self.tcp_doff}"
        if self.proto == IPPROTO_ICMP:
            s += f" type={self.icmp_type} code={self.icmp_code}"
        if self.frag != FRAG_WHOLE:
            s += f" frag={self.frag}"
        if self.ip_opts:
            s += " ipopts"
        return s + f" id={self.ident}" + (f" ({self.note})" if self.note else "")


def with_ident(probe: Probe, ident: int) -> Probe:
    return replace(probe, ident=ident)
