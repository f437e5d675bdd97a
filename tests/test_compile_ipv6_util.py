"""Helpers for the IPv6 compiler/engine tests: ip6tables model Tables built in code (entry indices
in blob order, as Table.decode gives them), crafted IPv6 packets with extension headers, and a
test-run Runner for AF_INET6 programs."""
from __future__ import annotations

import ipaddress
import struct

from test_compile_util import ACCEPT, DROP, HOOKS, RETURN, Runner, _iface, table  # noqa: F401
from bpfilter_umh.family import IP6T_F_GOTO, IP6T_F_PROTO
from bpfilter_umh.model import AF_INET6, NF_INET_LOCAL_OUT, IpHeader, Jump, Match, Rule, Table

NFPROTO_IPV6 = 10
ETH_P_IPV6 = 0x86dd


def ip6(src="::/0", dst="::/0", proto=None, iniface="", outiface="", inv=0, goto=False,
        flags=0) -> IpHeader:
    """ip6t_ip6 as ip6tables writes it: `-p X` sets IP6T_F_PROTO (proto=None: no -p)."""
    s, d = ipaddress.ip_network(src, strict=False), ipaddress.ip_network(dst, strict=False)
    inn, inm = _iface(iniface)
    outn, outm = _iface(outiface)
    f = flags | (IP6T_F_PROTO if proto is not None else 0) | (IP6T_F_GOTO if goto else 0)
    return IpHeader(src=s.network_address, dst=d.network_address, smsk=s.netmask, dmsk=d.netmask,
                    iniface=inn, outiface=outn, iniface_mask=inm, outiface_mask=outm,
                    proto=proto or 0, flags=f, invflags=inv)


def rule6(target=ACCEPT, *matches, **kw) -> Rule:
    if isinstance(target, Jump) and target.goto:
        kw["goto"] = True
    return Rule(ip=ip6(**kw), matches=list(matches), target=target)


def icmp6(type_, code=(0, 0xFF), inv=0) -> Match:
    return Match("icmp6", 0, dict(type=type_, code=list(code), invflags=inv))


def table6(builtin: dict, user: dict = None) -> Table:
    return table(builtin, user, AF_INET6, ip6, stride=200)


# ---- packets ---------------------------------------------------------------------------------
NH_HOP, NH_TCP, NH_UDP, NH_ROUTING, NH_FRAG, NH_AUTH, NH_ICMP6, NH_NONE, NH_DEST = \
    0, 6, 17, 43, 44, 51, 58, 59, 60


def ipv6(src="2001:db8::1", dst="2001:db8::2", nh=NH_UDP, payload=b"", exthdrs=(),
         plen=None) -> bytes:
    """An IPv6 packet; exthdrs = [(kind, builder(next_header) -> bytes), ...] chained in order."""
    kinds = [k for k, _ in exthdrs] + [nh]
    body = b"".join(build(kinds[i + 1]) for i, (_, build) in enumerate(exthdrs)) + payload
    first = kinds[0]
    n = len(body) if plen is None else plen
    return struct.pack("!IHBB16s16s", 0x60000000, n, first, 64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + body


def opts(kind, octets=0):
    """Hop-by-hop (0) or destination options (60) header of (octets + 1) * 8 bytes (PadN)."""
    def build(nh):
        n = (octets + 1) * 8 - 2
        return bytes([nh, octets]) + (bytes([1, n - 2]) + bytes(n - 2) if n >= 2 else b"")
    return (kind, build)


def routing(segments_left=0, octets=0):
    def build(nh):
        return bytes([nh, octets, 0, segments_left]) + bytes(4 + octets * 8)
    return (NH_ROUTING, build)


def frag(offset_bytes=0, more=False, ident=0x1234):
    def build(nh):
        return struct.pack("!BBHI", nh, 0, (offset_bytes & ~7) | (1 if more else 0), ident)
    return (NH_FRAG, build)


def auth(payload_len=4):
    """AH: length field is (total / 4) - 2 (ipv6_authlen)."""
    def build(nh):
        total = (payload_len + 2) * 4
        return bytes([nh, payload_len, 0, 0]) + bytes(total - 4)
    return (NH_AUTH, build)


def udp6(sport=1000, dport=53, data=b"x" * 8) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def icmp6_hdr(type_=128, code=0, data=b"ping") -> bytes:
    return struct.pack("!BBHHH", type_, code, 0, 1, 1) + data


def nf_ctx6(hook: int) -> bytes:
    """struct nf_hook_state prefix for BPF_PROG_TEST_RUN: hook at byte 0, pf NFPROTO_IPV6 at 1."""
    return bytes([hook, NFPROTO_IPV6]) + bytes(6)


class Runner6(Runner):
    """Runner for AF_INET6 tables: Ethernet type 0x86dd and pf NFPROTO_IPV6 in the test-run ctx."""

    def run(self, chain: str, packet: bytes) -> int:
        hook = HOOKS[chain]
        data = packet if hook == NF_INET_LOCAL_OUT else \
            b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02" + struct.pack("!H", ETH_P_IPV6) + packet
        ret, _dur, _ = self.progs[chain].test_run(data, nf_ctx6(hook))
        return ret
