"""The responder: acts on the events the REJECT and LOG rules of flavor nf record (targets.py).

One process per (netns, family), `python -m bpfilter_umh.responder ipv4|ipv6`, started by the
engine with the first install whose table has such a rule (start()), found again through its pid
file by a later helper, stopped by flush or by an install without such rules (stop()), and by
the namespace's end with the rest of its processes. It exits by itself when the ring's pin goes.

It reads the BPF ring buffer (kernel/bpf/ringbuf.c: a consumer page we write, a producer page
and the data pages mapped twice, records with an 8-byte header whose BUSY bit says "being
written" and DISCARD bit "skip") and
  REJECT: builds the reply as net/ipv4/netfilter/nf_reject_ipv4.c (nf_send_reset) and
          net/ipv4/icmp.c (__icmp_send, via nf_send_unreach) do, and for IPv6
          net/ipv6/netfilter/nf_reject_ipv6.c and net/ipv6/icmp.c, and sends it from the
          namespace with a raw socket, so it passes OUTPUT like the kernel's reply does
          (ip_local_out);
  LOG:    formats the line as net/netfilter/nf_log_syslog.c does and writes it to /dev/kmsg with
          the rule's level. /dev/kmsg limits each open file to a burst of 10 lines per 5 s when
          printk_devkmsg is "ratelimit" (kernel/printk/printk.c devkmsg_write, the ratelimit
          state lives in the open file), while the kernel's LOG is not limited: every line is
          written through a fresh open.
"""
from __future__ import annotations

import ipaddress
import mmap
import os
import select
import signal
import socket
import struct
import sys

from . import daemons
from . import targets as T

BPF_RINGBUF_BUSY_BIT, BPF_RINGBUF_DISCARD_BIT, BPF_RINGBUF_HDR_SZ = 1 << 31, 1 << 30, 8
POLL = 0.5                         # seconds between checks that the ring is still pinned
PAGE = mmap.PAGESIZE
STATE_ROOT = "/run/bpfilter"
NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT = 1, 2, 3

# ipt_REJECT.h enum ipt_reject_with -> ICMP code of ICMP_DEST_UNREACH (ipt_REJECT.c reject_tg)
IPT_TCP_RESET = 7
ICMP_CODE = {0: 0, 1: 1, 2: 2, 3: 3, 5: 9, 6: 10, 8: 13}
# ip6t_REJECT.h enum ip6t_reject_with -> ICMPV6_DEST_UNREACH code (ip6t_REJECT.c reject_tg6)
IP6T_TCP_RESET = 6
ICMP6_CODE = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 7: 5, 8: 6}
ICMP_ERRORS = {3, 4, 5, 11, 12}     # icmp_pointers[type].error (net/ipv4/icmp.c)
NR_ICMP_TYPES = 18
IPTOS_TOS_MASK, IPTOS_PREC_MASK, IPTOS_PREC_INTERNETCONTROL = 0x1E, 0xE0, 0xC0
XT_LOG_TCPSEQ, XT_LOG_TCPOPT, XT_LOG_IPOPT, XT_LOG_UID, XT_LOG_MACDECODE = 1, 2, 4, 8, 0x20
ARPHRD_ETHER = 1
PACKET_HOST = 0
RTCF_BROADCAST, RTCF_MULTICAST = 0x10000000, 0x20000000      # include/uapi/linux/in_route.h
TCP_RESERVED_BITS = 0x0E000000      # include/net/tcp.h (host order)


# ------------------------------------------------------------------------------ lifecycle
def events_pin(family_dir: str, cookie: int = None) -> str:
    from . import attach
    fam = 2 if family_dir == "ipv4" else 10
    return os.path.join(attach.attachment_directory("nf", fam, cookie=cookie), "events")


def _pidfile(family_dir: str, cookie: int = None) -> str:
    from . import kernel as K
    cookie = K.netns_cookie() if cookie is None else cookie
    return os.path.join(STATE_ROOT, str(cookie), f"responder-{family_dir}.pid")


def open_events(family_dir: str):
    """The ring of this netns and family: adopted from its pin, or created and pinned."""
    from . import kernel as K
    pin = events_pin(family_dir)
    if os.path.exists(pin):
        m = K.Map.from_pin(pin)
        if m.map_type == T.BPF_MAP_TYPE_RINGBUF:
            return m
        m.close()
        K.unpin(pin)
    os.makedirs(os.path.dirname(pin), mode=0o700, exist_ok=True)
    m = K.Map.create(T.BPF_MAP_TYPE_RINGBUF, 0, 0, T.EVENTS_BYTES, name="bpfilter_ev")
    try:
        m.pin(pin)
    except BaseException:
        m.close()
        raise
    return m


def start(family_dir: str) -> int:
    """Start the responder of the calling thread's namespace unless one runs; returns its pid.
    Waits (bounded) until it has mapped the ring and opened its sockets, so the first rejected
    packet is answered at once; events recorded earlier stay in the ring anyway."""
    return daemons.start(_pidfile(family_dir), "bpfilter_umh.responder", [family_dir],
                         ready=True)


def stop(family_dir: str, cookie: int = None):
    """Stop the responder (if any) and remove the ring's pin."""
    if cookie is not None and not os.path.lexists(_pidfile(family_dir, cookie)) and \
            not os.path.lexists(events_pin(family_dir, cookie)):
        # every install of a table without REJECT or LOG comes here: with neither the pid
        # file nor the pin there is nothing to stop, two stats instead of a pid file opened,
        # an unlink and an rmdir that fail (~40 us)
        return
    from . import kernel as K
    daemons.stop(_pidfile(family_dir, cookie))
    pin = events_pin(family_dir, cookie)
    K.unpin(pin)
    # flavor tc keeps its pins elsewhere: the ring's directory may now be empty
    for d in (os.path.dirname(pin), os.path.dirname(os.path.dirname(pin))):
        try:
            os.rmdir(d)
        except OSError:
            break               # not empty (the nf attachment, the other family) or gone


def running(family_dir: str) -> bool:
    return daemons.running(_pidfile(family_dir)) is not None


# ------------------------------------------------------------------------------ the ring
class Ring:
    """User-space consumer of a BPF_MAP_TYPE_RINGBUF (the layout libbpf's ring_buffer uses)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size, self.mask = fd, size, size - 1
        self.cons = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        # the producer page, then the data pages twice (a record never wraps for the reader)
        self.prod = mmap.mmap(fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=PAGE)
        self.ep = select.epoll()
        self.ep.register(fd, select.EPOLLIN)

    def records(self):
        """Every committed record since the last call (consumed as they are yielded)."""
        cpos = struct.unpack_from("<Q", self.cons, 0)[0]
        while True:
            ppos = struct.unpack_from("<Q", self.prod, 0)[0]
            if cpos >= ppos:
                break
            hdr = struct.unpack_from("<I", self.prod, PAGE + (cpos & self.mask))[0]
            if hdr & BPF_RINGBUF_BUSY_BIT:
                break
            n = hdr & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)
            start = PAGE + (cpos & self.mask) + BPF_RINGBUF_HDR_SZ
            data = None if hdr & BPF_RINGBUF_DISCARD_BIT else bytes(self.prod[start:start + n])
            cpos += (n + BPF_RINGBUF_HDR_SZ + 7) & ~7
            struct.pack_into("<Q", self.cons, 0, cpos)
            if data is not None:
                yield data

    def wait(self, timeout: float):
        self.ep.poll(timeout)

    def close(self):
        self.ep.close()
        self.cons.close()
        self.prod.close()


# ------------------------------------------------------------------------------ events
class Event:
    def __init__(self, raw: bytes):
        (self.kind, self.param, self.hook, self.family, self.inif, self.outif, self.mark,
         self.len, self.caplen) = struct.unpack_from("<9I", raw, 0)
        self.devtype, self.hhlen, self.machdr, self.nethdr = struct.unpack_from("<4H", raw,
                                                                                T.EV_DEVTYPE)
        self.have_uid, self.pkt_type = struct.unpack_from("<2H", raw, T.EV_HAVE_UID)
        self.uid, self.gid, self.rule, self.rt_flags = struct.unpack_from("<4I", raw, T.EV_UID)
        self.mac = raw[T.EV_MAC:T.EV_MAC + 16]
        self.prefix = raw[T.EV_PREFIX:T.EV_PREFIX + 32].split(b"\0", 1)[0]
        self.flags = struct.unpack_from("<I", raw, T.EV_FLAGS)[0]
        self.pkt = raw[T.EV_PKT:T.EV_PKT + min(self.caplen, T.EVENT_CAP)]
        if self.flags & T.EVF_TTL_PENDING:
            self.pkt = decrease_ttl(self.pkt, self.family)


def decrease_ttl(pkt: bytes, family: int) -> bytes:
    """What ip_forward()/ip6_forward() do to the header before NF_INET_FORWARD: ip_decrease_ttl()
    (include/net/ip.h: the checksum adjusted incrementally, as the kernel does) or hop_limit--."""
    p = bytearray(pkt)
    if family == 2 and len(p) >= 20 and p[8]:
        check = struct.unpack_from("=H", p, 10)[0] + socket.htons(0x0100)
        struct.pack_into("=H", p, 10, (check + (check >= 0xFFFF)) & 0xFFFF)
        p[8] -= 1
    elif family == 10 and len(p) >= 40 and p[7]:
        p[7] -= 1
    return bytes(p)


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def _sysctl(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/net/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError):
        return default


def _no_reply_to(daddr: bytes) -> bool:
    """nf_send_reset / icmp_send send nothing for a broadcast or multicast destination."""
    a = ipaddress.IPv4Address(daddr)
    return a.is_multicast or a == ipaddress.IPv4Address("255.255.255.255")


def tcp_reset_v4(pkt: bytes, skb_len: int):
    """nf_send_reset(): the RST for the TCP segment `pkt` (the IPv4 datagram), or None."""
    if len(pkt) < 20:
        return None
    ihl = (pkt[0] & 0xf) * 4
    frag, proto = struct.unpack_from("!H", pkt, 6)[0], pkt[9]
    if frag & 0x1fff or proto != socket.IPPROTO_TCP or len(pkt) < ihl + 20:
        return None
    saddr, daddr = pkt[12:16], pkt[16:20]
    sport, dport, seq, ack_seq, off_flags = struct.unpack_from("!HHIIH", pkt, ihl)
    doff, flags = off_flags >> 12, off_flags & 0x1ff
    if flags & 0x04 or _no_reply_to(daddr):         # no RST for RST
        return None
    if flags & 0x10:                                 # oth->ack
        nseq, nack, nflags = ack_seq, 0, 0x04
    else:
        nseq = 0
        nack = (seq + bool(flags & 0x02) + bool(flags & 0x01) + skb_len - ihl - doff * 4) \
            & 0xffffffff
        nflags = 0x14
    tcp = struct.pack("!HHIIHHHH", dport, sport, nseq, nack, (5 << 12) | nflags, 0, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", csum(daddr + saddr + struct.pack("!BBH", 0, 6, 20)
                                            + tcp)) + tcp[18:]
    ttl = _sysctl("ipv4/ip_default_ttl", 64)        # ip4_dst_hoplimit() of a plain route
    # nf_reject_iphdr_put(): tos 0, id 0, DF; tot_len and check are filled by the raw socket
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, ttl, socket.IPPROTO_TCP, 0,
                      daddr, saddr)
    return iph + tcp, socket.inet_ntoa(saddr)


def icmp_unreach_v4(pkt: bytes, code: int, hook: int):
    """nf_send_unreach() -> __icmp_send(ICMP_DEST_UNREACH, code): the ICMP error quoting the
    datagram, or None when icmp_send would not answer."""
    if len(pkt) < 20:
        return None
    ihl = (pkt[0] & 0xf) * 4
    frag, proto = struct.unpack_from("!H", pkt, 6)[0], pkt[9]
    saddr, daddr = pkt[12:16], pkt[16:20]
    if frag & 0x1fff or _no_reply_to(daddr):
        return None
    if proto == socket.IPPROTO_ICMP:
        # never an error about an error (or about an unknown type)
        if len(pkt) < ihl + 1 or pkt[ihl] > NR_ICMP_TYPES or pkt[ihl] in ICMP_ERRORS:
            return None
    tos = (pkt[1] & IPTOS_TOS_MASK) | IPTOS_PREC_INTERNETCONTROL
    # room = 576 - iphdr - icmphdr (no options are echoed: the datagram's own are not quoted
    # back as options); the rest of the datagram is cut
    quote = pkt[:576 - 20 - 8]
    body = struct.pack("!BBHI", 3, code, 0, 0) + quote
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    ttl = _sysctl("ipv4/ip_default_ttl", 64)
    # saddr: the datagram's destination when it was for us (RTCF_LOCAL), else 0 = the routing
    # decision picks it (icmp_send without icmp_errors_use_inbound_ifaddr); id 0: the raw
    # socket picks one (ip_select_ident), frag_off 0 (icmp sockets do not set DF)
    src = daddr if hook == NF_INET_LOCAL_IN else b"\0\0\0\0"
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(body), 0, 0, ttl,
                      socket.IPPROTO_ICMP, 0, src, saddr)
    return iph + body, socket.inet_ntoa(saddr)


def tcp_reset_v6(pkt: bytes, skb_len: int):
    """nf_send_reset6(): the RST (without the IPv6 header: the raw socket builds it)."""
    found = _ip6_l4(pkt)
    if found is None or found[0] != socket.IPPROTO_TCP or len(pkt) < found[1] + 20:
        return None
    thoff = found[1]
    saddr, daddr = pkt[8:24], pkt[24:40]
    if daddr[0] == 0xff:
        return None
    sport, dport, seq, ack_seq, off_flags = struct.unpack_from("!HHIIH", pkt, thoff)
    doff, flags = off_flags >> 12, off_flags & 0x1ff
    if flags & 0x04:
        return None
    if flags & 0x10:
        nseq, nack, nflags = ack_seq, 0, 0x04
    else:
        nseq = 0
        nack = (seq + bool(flags & 0x02) + bool(flags & 0x01) + skb_len - thoff - doff * 4) \
            & 0xffffffff
        nflags = 0x14
    tcp = struct.pack("!HHIIHHHH", dport, sport, nseq, nack, (5 << 12) | nflags, 0, 0, 0)
    return tcp, daddr, saddr


def _ip6_l4(pkt: bytes):
    """(nexthdr, offset) of the upper-layer header (ipv6_skip_exthdr), or None; a non-first
    fragment gives None (no reply to it)."""
    if len(pkt) < 40:
        return None
    nh, off = pkt[6], 40
    for _ in range(16):
        if nh in (0, 43, 60):                          # hop-by-hop, routing, dstopts
            if len(pkt) < off + 2:
                return None
            nh, off = pkt[off], off + (pkt[off + 1] + 1) * 8
        elif nh == 44:                                 # fragment
            if len(pkt) < off + 8:
                return None
            if struct.unpack_from("!H", pkt, off + 2)[0] & 0xfff8:
                return None
            nh, off = pkt[off], off + 8
        elif nh == 51:                                 # AH
            if len(pkt) < off + 2:
                return None
            nh, off = pkt[off], off + (pkt[off + 1] + 2) * 4
        else:
            return nh, off
    return None


def icmp6_unreach(pkt: bytes, code: int, hook: int):
    """nf_send_unreach6() -> icmpv6_send(ICMPV6_DEST_UNREACH, code): quoting up to
    IPV6_MIN_MTU - 40 - 8 bytes; none about an ICMPv6 error or to a multicast source."""
    found = _ip6_l4(pkt)
    if len(pkt) < 40:
        return None
    saddr, daddr = pkt[8:24], pkt[24:40]
    if saddr[0] == 0xff or saddr == bytes(16) or daddr[0] == 0xff:
        return None
    if found is not None and found[0] == 58:
        if len(pkt) < found[1] + 1 or pkt[found[1]] < 128:     # an ICMPv6 error
            return None
    body = struct.pack("!BBHI", 1, code, 0, 0) + pkt[:1280 - 40 - 8]
    src = daddr if hook == NF_INET_LOCAL_IN else bytes(16)
    return body, src, saddr


# ------------------------------------------------------------------------------ LOG
def _ifname(index: int) -> str:
    if not index:
        return ""
    try:
        return socket.if_indextoname(index)
    except OSError:
        return ""


def _transport_fields(pkt: bytes, off: int, proto: int, flags: int, skb_len: int,
                      fragment: bool):
    """(text, complete) for TCP, UDP and UDP-Lite, printed alike for both families as
    nf_log_dump_tcp_header / nf_log_dump_udp_header do; None for another protocol."""
    if proto == 6:
        text = _tcp_fields(pkt, off, flags, skb_len, fragment)
        return text, not ("INCOMPLETE" in text or text.endswith("(TRUNCATED)"))
    if proto in (17, 136):
        return _udp_fields(pkt, off, proto, skb_len, fragment)
    return None


def _tcp_fields(pkt: bytes, off: int, flags: int, skb_len: int, fragment: bool) -> str:
    out = "PROTO=TCP "
    if fragment:
        return out
    if len(pkt) < off + 20:
        return out + f"INCOMPLETE [{skb_len - off} bytes] "
    sport, dport, seq, ack, word, win, _c, urg = struct.unpack_from("!HHIIHHHH", pkt, off)
    out += f"SPT={sport} DPT={dport} "
    if flags & XT_LOG_TCPSEQ:
        out += f"SEQ={seq} ACK={ack} "
    out += f"WINDOW={win} "
    # (u8)(ntohl(tcp_flag_word(th) & TCP_RESERVED_BITS) >> 22)
    res = (struct.unpack_from("!I", pkt, off + 12)[0] & TCP_RESERVED_BITS) >> 22
    out += f"RES=0x{res & 0xff:02x} "
    fl = pkt[off + 13]
    ae = pkt[off + 12] & 0x01
    for bit, name in ((None, "AE"), (0x80, "CWR"), (0x40, "ECE"), (0x20, "URG"), (0x10, "ACK"),
                      (0x08, "PSH"), (0x04, "RST"), (0x02, "SYN"), (0x01, "FIN")):
        if (ae if bit is None else fl & bit):
            out += name + " "
    out += f"URGP={urg} "
    doff = pkt[off + 12] >> 4
    if flags & XT_LOG_TCPOPT and doff * 4 > 20:
        opt = pkt[off + 20:off + doff * 4]
        if len(opt) < doff * 4 - 20:
            return out + "OPT (TRUNCATED)"
        out += "OPT (" + opt.hex().upper() + ") "
    return out


def _udp_fields(pkt: bytes, off: int, proto: int, skb_len: int, fragment: bool):
    out = "PROTO=UDP " if proto == 17 else "PROTO=UDPLITE "
    if fragment:
        return out, True
    if len(pkt) < off + 8:
        return out + f"INCOMPLETE [{skb_len - off} bytes] ", False
    sport, dport, ulen = struct.unpack_from("!HHH", pkt, off)
    return out + f"SPT={sport} DPT={dport} LEN={ulen} ", True


_ICMP_REQUIRED = {0: 4, 3: 28, 4: 28, 5: 28, 8: 4, 11: 28, 12: 28, 13: 20, 14: 20, 17: 12,
                  18: 12}


def log_ipv4(pkt: bytes, flags: int, skb_len: int, iphoff: int = 0):
    """dump_ipv4_packet(); returns (text, complete) where complete=False means the kernel
    returned early (no UID/MARK)."""
    if len(pkt) < iphoff + 20:
        return "TRUNCATED", False
    ih = pkt[iphoff:]
    tos, totlen, ident, frag, ttl, proto = ih[1], *struct.unpack_from("!HHH", ih, 2), ih[8], ih[9]
    ihl = (ih[0] & 0xf) * 4
    out = f"SRC={socket.inet_ntoa(ih[12:16])} DST={socket.inet_ntoa(ih[16:20])} "
    out += (f"LEN={totlen} TOS=0x{tos & IPTOS_TOS_MASK:02X} PREC=0x{tos & IPTOS_PREC_MASK:02X} "
            f"TTL={ttl} ID={ident} ")
    if frag & 0x8000:
        out += "CE "
    if frag & 0x4000:
        out += "DF "
    if frag & 0x2000:
        out += "MF "
    if frag & 0x1fff:
        out += f"FRAG:{frag & 0x1fff} "
    if flags & XT_LOG_IPOPT and ihl > 20:
        opt = ih[20:ihl]
        if len(opt) < ihl - 20:
            return out + "TRUNCATED", False
        out += "OPT (" + opt.hex().upper() + ") "
    fragment = bool(frag & 0x1fff)
    l4 = iphoff + ihl
    transport = _transport_fields(pkt, l4, proto, flags, skb_len, fragment)
    if transport is not None:
        out += transport[0]
        if not transport[1]:
            return out, False
    elif proto == 1:
        out += "PROTO=ICMP "
        if not fragment:
            if len(pkt) < l4 + 8:
                out += f"INCOMPLETE [{skb_len - l4} bytes] "
            else:
                typ, code = pkt[l4], pkt[l4 + 1]
                out += f"TYPE={typ} CODE={code} "
                need = _ICMP_REQUIRED.get(typ, 0) if typ <= NR_ICMP_TYPES else 0
                if need and skb_len - l4 < need:
                    out += f"INCOMPLETE [{skb_len - l4} bytes] "
                elif typ in (0, 8):
                    i, s = struct.unpack_from("!HH", pkt, l4 + 4)
                    out += f"ID={i} SEQ={s} "
                elif typ == 12:
                    out += f"PARAMETER={pkt[l4 + 4]} "
                elif typ in (3, 4, 5, 11):
                    if typ == 5:
                        out += f"GATEWAY={socket.inet_ntoa(pkt[l4 + 4:l4 + 8])} "
                    if not iphoff:
                        inner, _ = log_ipv4(pkt, flags, skb_len, l4 + 8)
                        out += "[" + inner + "] "
                    if typ == 3 and code == 4:
                        out += f"MTU={struct.unpack_from('!H', pkt, l4 + 6)[0]} "
    elif proto == 51:
        if not fragment:
            out += "PROTO=AH "
            if len(pkt) < l4 + 12:
                out += f"INCOMPLETE [{skb_len - l4} bytes] "
            else:
                out += f"SPI=0x{struct.unpack_from('!I', pkt, l4 + 4)[0]:x} "
    elif proto == 50:
        out += "PROTO=ESP "
        if not fragment:
            if len(pkt) < l4 + 8:
                out += f"INCOMPLETE [{skb_len - l4} bytes] "
            else:
                out += f"SPI=0x{struct.unpack_from('!I', pkt, l4)[0]:x} "
    else:
        out += f"PROTO={proto} "
    return out, True


def log_line(ev: Event) -> str:
    """The text nf_log_ip_packet() / nf_log_ip6_packet() print for this event."""
    flags = ev.param >> 8                     # the level is the /dev/kmsg prefix
    out = (ev.prefix.decode("latin-1") + f"IN={_ifname(ev.inif)} OUT={_ifname(ev.outif)} ")
    if ev.inif:                               # dump_mac_header(), only when there is `in`
        if flags & XT_LOG_MACDECODE and ev.devtype == ARPHRD_ETHER:
            m = ev.mac
            if ev.nethdr - ev.machdr >= 14 and ev.machdr != 0xffff:
                out += (f"MACSRC={m[6:12].hex(':')} MACDST={m[0:6].hex(':')} "
                        f"MACPROTO={m[12:14].hex()} ")
        else:
            out += "MAC="
            if ev.hhlen and ev.machdr != ev.nethdr:
                out += ev.mac[:min(ev.hhlen, 16)].hex(":")
            out += " "
    if ev.family == 2:
        text, complete = log_ipv4(ev.pkt, flags, ev.len)
    else:
        text, complete = log_ipv6(ev.pkt, flags, ev.len)
    out += text
    if complete:
        if flags & XT_LOG_UID and ev.have_uid:
            out += f"UID={ev.uid} GID={ev.gid} "
        if ev.mark:
            out += f"MARK=0x{ev.mark:x} "
    return out


def _ip6_str(b: bytes) -> str:
    """%pI6 (lib/vsprintf.c ip6_string): eight groups of four hex digits, never compressed."""
    return ":".join(b[i:i + 2].hex() for i in range(0, 16, 2))


def log_ipv6(pkt: bytes, flags: int, skb_len: int, off: int = 0, recurse: bool = True):
    """dump_ipv6_packet()."""
    if len(pkt) < off + 40:
        return "TRUNCATED", False
    ih = pkt[off:]
    word, plen = struct.unpack_from("!IH", ih, 0)
    out = f"SRC={_ip6_str(ih[8:24])} DST={_ip6_str(ih[24:40])} "
    out += (f"LEN={plen + 40} TC={(word & 0x0ff00000) >> 20} HOPLIMIT={ih[7]} "
            f"FLOWLBL={word & 0xfffff} ")
    fragment = False
    ptr, nh = off + 40, ih[6]
    while nh != 59 and nh in (0, 43, 44, 51, 50, 60):
        if len(pkt) < ptr + 2:
            return out + "TRUNCATED", False
        if flags & XT_LOG_IPOPT:
            out += "OPT ( "
        if nh == 44:
            out += "FRAG:"
            if len(pkt) < ptr + 8:
                return out + "TRUNCATED ", False
            fo, ident = struct.unpack_from("!HI", pkt, ptr + 2)
            out += f"{fo & 0xFFF8} "
            if fo & 1:
                out += "INCOMPLETE "
            out += f"ID:{ident:08x} "
            if fo & 0xFFF8:
                fragment = True
            hdrlen = 8
        elif nh in (0, 43, 60):
            if fragment:
                if flags & XT_LOG_IPOPT:
                    out += ")"
                return out, False
            hdrlen = (pkt[ptr + 1] + 1) * 8
        elif nh == 51:
            if flags & XT_LOG_IPOPT:
                out += "AH "
                if fragment:
                    return out + ")", False
                if len(pkt) < ptr + 12:
                    return out + f"INCOMPLETE [{skb_len - ptr} bytes] )", False
                out += f"SPI=0x{struct.unpack_from('!I', pkt, ptr + 4)[0]:x} "
            hdrlen = (pkt[ptr + 1] + 2) * 4
        else:                                   # ESP
            if flags & XT_LOG_IPOPT:
                out += "ESP "
                if fragment:
                    return out + ")", False
                if len(pkt) < ptr + 8:
                    return out + f"INCOMPLETE [{skb_len - ptr} bytes] )", False
                out += f"SPI=0x{struct.unpack_from('!I', pkt, ptr)[0]:x} )"
            return out, False
        if flags & XT_LOG_IPOPT:
            out += ") "
        nh, ptr = pkt[ptr], ptr + hdrlen
    transport = _transport_fields(pkt, ptr, nh, flags, skb_len, fragment)
    if transport is not None:
        out += transport[0]
        if not transport[1]:
            return out, False
    elif nh == 58:
        out += "PROTO=ICMPv6 "
        if not fragment:
            if len(pkt) < ptr + 8:
                return out + f"INCOMPLETE [{skb_len - ptr} bytes] ", False
            typ, code = pkt[ptr], pkt[ptr + 1]
            out += f"TYPE={typ} CODE={code} "
            if typ in (128, 129):
                i, s = struct.unpack_from("!HH", pkt, ptr + 4)
                out += f"ID={i} SEQ={s} "
            elif typ in (1, 2, 3, 4):
                if typ == 4:
                    out += f"POINTER={struct.unpack_from('!I', pkt, ptr + 4)[0]:08x} "
                if recurse:
                    inner, _ = log_ipv6(pkt, flags, skb_len, ptr + 8, False)
                    out += "[" + inner + "] "
                if typ == 2:
                    out += f"MTU={struct.unpack_from('!I', pkt, ptr + 4)[0]} "
    else:
        out += f"PROTO={nh} "
    return out, recurse


def write_kmsg(level: int, line: str):
    """One line to the kernel log at `level`, through its own open of /dev/kmsg (see the
    module docstring: the rate limit is per open file)."""
    fd = os.open("/dev/kmsg", os.O_WRONLY)
    try:
        # the newline ends the record (nf_log_buf_close prints "%s\n"); without it printk
        # keeps the record open for a continuation and readers see it only with the next one
        os.write(fd, f"<{level}>{line[:1000]}\n".encode("latin-1", "replace"))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ main loop
class Responder:
    def __init__(self):
        self.raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.raw_tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
        self.raw_icmp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        IPV6_CHECKSUM = 7
        self.raw_tcp6.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 16)   # kernel fills it
        IPV6_FREEBIND, IPV6_AUTOFLOWLABEL = 78, 70
        for s in (self.raw_tcp6, self.raw_icmp6):
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        # nf_send_reset6 writes flow label 0 (ip6_flow_hdr(ip6h, 0, 0)); no automatic label
        self.raw_tcp6.setsockopt(socket.IPPROTO_IPV6, IPV6_AUTOFLOWLABEL, 0)

    def handle(self, raw: bytes):
        ev = Event(raw)
        if ev.kind == T.KIND_LOG:
            write_kmsg(ev.param & 7, log_line(ev))
        elif ev.kind == T.KIND_REJECT:
            if ev.family == 2:
                self._reject4(ev)
            else:
                self._reject6(ev)

    def _reject4(self, ev: Event):
        if ev.rt_flags & (RTCF_BROADCAST | RTCF_MULTICAST):
            return                # nf_send_reset and __icmp_send: no reply to such a route
        if ev.param == IPT_TCP_RESET:
            r = tcp_reset_v4(ev.pkt, ev.len)
        elif ev.param in ICMP_CODE:
            if ev.pkt_type != PACKET_HOST:
                return            # __icmp_send: "no replies to physical multicast/broadcast"
            r = icmp_unreach_v4(ev.pkt, ICMP_CODE[ev.param], ev.hook)
        else:
            return
        if r is not None:
            try:
                self.raw4.sendto(r[0], (r[1], 0))
            except OSError:
                pass              # no route back: the kernel's reply would be lost as well

    def _reject6(self, ev: Event):
        if ev.param == IP6T_TCP_RESET:
            r = tcp_reset_v6(ev.pkt, ev.len)
            sock = self.raw_tcp6
        elif ev.param in ICMP6_CODE:
            if ev.pkt_type != PACKET_HOST:
                return            # icmp6_send: no error about a packet not sent to us alone
            r = icmp6_unreach(ev.pkt, ICMP6_CODE[ev.param], ev.hook)
            sock = self.raw_icmp6
        else:
            return
        if r is None:
            return
        data, src, dst = r
        anc = []
        if src != bytes(16):
            # IPV6_PKTINFO: the source address (the original destination)
            anc.append((socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, src + struct.pack("I", 0)))
        try:
            sock.sendmsg([data], anc, 0, (socket.inet_ntop(socket.AF_INET6, dst), 0))
        except OSError:
            pass


def serve(family_dir: str, ready_fd: int = -1):
    from . import kernel as K
    pin = events_pin(family_dir)
    m = K.Map.from_pin(pin)
    ring = Ring(m.fd, m.max_entries)
    resp = Responder()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    if ready_fd >= 0:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    try:
        while os.path.exists(pin):
            for raw in ring.records():
                try:
                    resp.handle(raw)
                except Exception as e:     # one bad event must not stop the others
                    print(f"bpfilter responder: event dropped: {e!r}", file=sys.stderr)
            ring.wait(POLL)
    finally:
        ring.close()
        m.close()


if __name__ == "__main__":
    if len(sys.argv) in (2, 3) and sys.argv[1] in ("ipv4", "ipv6"):
        serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else -1)
    else:
        sys.exit("usage: python -m bpfilter_umh.responder ipv4|ipv6 [READY_FD]")
