"""The IPv6 family layer of the compiler: how an AF_INET6 packet's headers are walked into stack
slots, and how ip6t_ip6 and ip6t_icmp are tested against them.

compile.py's _ChainCompiler calls these with itself as `cc` (they use its emit/label and its
condition helpers: _load, _acc, _nz, _hotdrop_if_zero, _ifname, _slice, _frag_and_header,
_range_mismatch), so the accumulate-then-branch scheme described there holds for IPv6 rules too.

Semantics mirrored (net/ipv6/netfilter/ip6_tables.c ip6t_do_table / ip6_packet_match /
icmp6_match, net/ipv6/exthdrs_core.c ipv6_find_hdr):
  - addresses: ipv6_masked_addr_cmp() is ((saddr ^ src) & smsk) != 0, so bits of the rule's
    address outside its mask are ignored (unlike IPv4's (saddr & smsk) != src);
  - interfaces: ifname_compare_aligned(), exactly as IPv4;
  - the protocol is only looked at when IP6T_F_PROTO is set: then ipv6_find_hdr(skb, &thoff, -1,
    &fragoff, NULL) walks hop-by-hop (0), routing (43), fragment (44), AH (51) and destination
    options (60) headers and returns the first other next-header value (59, NEXTHDR_NONE,
    included). A failed walk (header cut short; a non-first fragment followed by another
    extension header gives -ENOENT) hotdrops the packet (its _frag_off is always 0 then). The rule
    matches when protohdr == proto (not inverted), or when they differ and proto is 0 ("-p all")
    or the test is inverted;
  - fragoff is in bytes (ntohs(frag_off) & ~7), never 1, so tcp_mt's "fragoff == 1" hotdrop cannot
    happen for IPv6; a non-first fragment keeps thoff 0 (ipv6_find_hdr returns before writing it);
  - ip6t_do_table resets acpar.thoff for every entry but not acpar.fragoff, and only rules with
    IP6T_F_PROTO set them: tcp/udp/icmp6 in a rule without IP6T_F_PROTO would read the IPv6 header
    as L4 (thoff 0) with a stale fragoff; ip6tables never writes such rules and the compiler
    refuses them (EOPNOTSUPP) rather than copy that;
  - IP6T_F_TOS / IP6T_INV_TOS / IP6T_INV_FRAG are accepted by ip6_checkentry() but never tested by
    ip6_packet_match(): ignored here too;
  - icmp6_type_code_match() has no "any type" (0xFF) wildcard, unlike IPv4's icmp match.

The walk is unrolled MAX_EXTHDRS times (the verifier accepts it, and the join point of every
round only carries imprecise scalars, so it prunes). A packet with more extension headers than
that is treated like a failed walk: rules with IP6T_F_PROTO hotdrop it (the kernel would walk on).
"""
from __future__ import annotations

import errno

from . import ebpf as E
from .ebpf import FP, R0, R1, R2, R3, R8, R9, Label
from .errors import BpfilterError

AF_INET6 = 10

# ip6t_ip6 flags / invflags (include/uapi/linux/netfilter_ipv6/ip6_tables.h)
IP6T_F_PROTO, IP6T_F_TOS, IP6T_F_GOTO = 0x01, 0x02, 0x04
IP6T_INV_VIA_IN, IP6T_INV_VIA_OUT, IP6T_INV_TOS, IP6T_INV_SRCIP, IP6T_INV_DSTIP, IP6T_INV_FRAG, \
    IP6T_INV_PROTO = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
IP6T_ICMP_INV = 0x01

# include/net/ipv6.h NEXTHDR_*; ipv6_ext_hdr() minus NEXTHDR_NONE: the headers the walk crosses
NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT, NEXTHDR_AUTH, NEXTHDR_NONE, NEXTHDR_DEST = \
    0, 43, 44, 51, 59, 60
WALKED = (NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT, NEXTHDR_AUTH, NEXTHDR_DEST)
MAX_EXTHDRS = 16

# IPv6-only stack slots (below compile.py's, which end at S_OPT = -248, and flavors.py's S_FIB,
# -312 .. -249)
S_SADDR6 = -336       # 16 bytes of ipv6hdr->saddr, as in the packet
S_DADDR6 = -352       # 16 bytes of ipv6hdr->daddr
S_WALKERR = -360      # 1 when ipv6_find_hdr() would have failed (or the walk went too deep)


def parse_ipv6(cc, drop: str, s_proto: int, s_fragoff: int, s_thoff: int):
    """The IPv6 header and ipv6_find_hdr(), once per packet: addresses to S_SADDR6/S_DADDR6, the
    upper-layer protocol to s_proto, its offset to s_thoff, the fragment offset (bytes) to
    s_fragoff, and S_WALKERR. r8 = nexthdr, r9 = start during the walk (kfunc calls keep them)."""
    found, bad, done = cc.label("exthdr_found"), cc.label("exthdr_bad"), cc.label("exthdr_done")
    cc.fl.open_packet(cc, drop)
    cc.emit(
        *cc._slice(E.mov(R2, 0), 40),
        E.jmp(E.JEQ, R0, 0, drop, comment="shorter than an IPv6 header"),
    )
    for slot, off, what in ((S_SADDR6, 8, "saddr"), (S_DADDR6, 24, "daddr")):
        cc.emit(E.ldx(E.DW, R1, R0, off, f"{what}[0..7]"), E.stx(E.DW, FP, slot, R1),
                E.ldx(E.DW, R1, R0, off + 8, f"{what}[8..15]"), E.stx(E.DW, FP, slot + 8, R1))
    cc.emit(E.ldx(E.B, R8, R0, 6, "nexthdr"), E.mov(R9, 40, comment="start = sizeof(ipv6hdr)"),
            E.st(E.DW, FP, s_fragoff, 0), E.st(E.DW, FP, s_thoff, 0),
            E.st(E.DW, FP, S_WALKERR, 0))
    if not needs_walk(cc.table):
        # no rule reads protocol, thoff or fragoff: skip the walk (its slots stay 0)
        cc.emit(E.st(E.DW, FP, s_proto, 0))
        return
    for i in range(MAX_EXTHDRS):
        ext, need4, have = cc.label("exthdr"), cc.label("exthdr_need4"), cc.label("exthdr_have")
        notfrag, opt, adv, nxt = (cc.label("exthdr_notfrag"), cc.label("exthdr_opt"),
                                  cc.label("exthdr_adv"), cc.label("exthdr_next"))
        first_frag = cc.label("exthdr_firstfrag")
        for h in WALKED:
            cc.emit(E.jmp(E.JEQ, R8, h, ext, comment="ipv6_ext_hdr()" if h == 0 else ""))
        cc.emit(E.ja(found, "upper-layer header (or NEXTHDR_NONE)"), Label(ext),
                # routing and fragment headers are read 4 bytes wide (ipv6_rt_hdr, frag_off),
                # the others 2 (ipv6_opt_hdr): skb_header_pointer fails exactly when these would
                E.jmp(E.JEQ, R8, NEXTHDR_ROUTING, need4), E.jmp(E.JEQ, R8, NEXTHDR_FRAGMENT, need4),
                *cc._slice(E.mov(R2, R9), 2),
                E.jmp(E.JEQ, R0, 0, bad), E.ja(have),
                Label(need4), *cc._slice(E.mov(R2, R9), 4),
                E.jmp(E.JEQ, R0, 0, bad),
                Label(have),
                E.ldx(E.B, R1, R0, 0, "hp->nexthdr"), E.ldx(E.B, R2, R0, 1, "hp->hdrlen"),
                E.jmp(E.JNE, R8, NEXTHDR_FRAGMENT, notfrag),
                E.ldx(E.H, R3, R0, 2, "frag_off"), E.be16(R3), E.alu(E.AND, R3, 0xfff8),
                E.jmp(E.JEQ, R3, 0, first_frag))
        # a non-first fragment: the walk ends here; followed by another extension header it is
        # -ENOENT
        for h in WALKED:
            cc.emit(E.jmp(E.JEQ, R1, h, bad))
        cc.emit(E.stx(E.DW, FP, s_fragoff, R3), E.stx(E.DW, FP, s_proto, R1),
                E.ja(done, "non-first fragment: thoff stays 0"),
                Label(first_frag), E.mov(R2, 8), E.ja(adv),
                Label(notfrag), E.jmp(E.JNE, R8, NEXTHDR_AUTH, opt),
                E.alu(E.ADD, R2, 2), E.alu(E.LSH, R2, 2, comment="ipv6_authlen()"), E.ja(adv),
                Label(opt), E.alu(E.ADD, R2, 1), E.alu(E.LSH, R2, 3, comment="ipv6_optlen()"),
                Label(adv), E.alu(E.ADD, R9, R2), E.mov(R8, R1),
                Label(nxt))
    for h in WALKED:
        cc.emit(E.jmp(E.JEQ, R8, h, bad, comment=f"more than {MAX_EXTHDRS} extension headers: "
                                                 f"treated as a failed walk" if h == 0 else ""))
    cc.emit(Label(found), E.stx(E.DW, FP, s_proto, R8), E.stx(E.DW, FP, s_thoff, R9),
            E.ja(done),
            Label(bad), E.st(E.DW, FP, S_WALKERR, 1, "ipv6_find_hdr() < 0"),
            E.st(E.DW, FP, s_proto, 0xff + 1, "no protocol (matches nothing)"),
            Label(done))


def needs_walk(table) -> bool:
    """ipv6_find_hdr() only runs for rules with IP6T_F_PROTO, and only those give matches a
    thoff/fragoff; any rule with a match keeps the walk too (cheap insurance for matchers)."""
    return any(r.ip.flags & IP6T_F_PROTO or r.matches
               for c in table.chains for r in c.rules + [c.policy_entry] if r is not None)


def _addr(cc, slot: int, addr, msk, inv: bool, what: str, fail: str):
    """NF_INVF(inv, ipv6_masked_addr_cmp(addr, msk, rule addr)) as a mismatch value."""
    cc._masked16(slot, addr.packed, msk.packed, inv, fail,
                 f"{'! ' if inv else ''}{what} {addr}/{msk}", f"! {what} ::/0 never matches")


def ip6_packet_match(cc, rule, fail: str, s_proto: int):
    """ip6_packet_match(): addresses, interfaces, then (IP6T_F_PROTO) the walked protocol."""
    ip = rule.ip
    inv = ip.invflags
    _addr(cc, S_SADDR6, ip.src, ip.smsk, bool(inv & IP6T_INV_SRCIP), "src", fail)
    _addr(cc, S_DADDR6, ip.dst, ip.dmsk, bool(inv & IP6T_INV_DSTIP), "dst", fail)
    from .compile import S_INNAME, S_OUTNAME
    cc._ifname(S_INNAME, ip.iniface, ip.iniface_mask, bool(inv & IP6T_INV_VIA_IN), "in", fail)
    cc._ifname(S_OUTNAME, ip.outiface, ip.outiface_mask, bool(inv & IP6T_INV_VIA_OUT), "out",
               fail)
    if not ip.flags & IP6T_F_PROTO:
        return
    pinv = bool(inv & IP6T_INV_PROTO)
    cc._load(S_WALKERR, "-p: ipv6_find_hdr() failed?")
    cc.emit(E.alu(E.XOR, R1, 1))                       # 0 iff the walk failed
    cc._hotdrop_if_zero("ipv6_find_hdr() < 0")
    if ip.proto == 0 and not pinv:
        return                                         # -p all: matches whatever was found
    cc._load(s_proto, f"{'! ' if pinv else ''}proto {ip.proto}")
    cc.emit(E.alu(E.XOR, R1, ip.proto))                # 0 iff protohdr == proto
    if pinv:                                           # inverted: mismatch iff equal
        cc._nz(invert=True)
    cc._acc()


def needs_thoff(rule) -> bool:
    return bool(rule.ip.flags & IP6T_F_PROTO)


def check_l4_rule(rule, chain: str, pos: int, m):
    if not needs_thoff(rule):
        raise BpfilterError(errno.EOPNOTSUPP, f"chain {chain} rule {pos} (entry offset "
                                              f"{rule.offset}): match {m.name} without "
                                              f"IP6T_F_PROTO (the kernel would test the IPv6 "
                                              f"header as {m.name} with a stale fragoff) is not "
                                              f"supported by the compiler")


def icmp6_payload(m) -> dict:
    data = m.data
    if isinstance(data, (bytes, bytearray)):
        return dict(type=data[0], code=(data[1], data[2]), invflags=data[3])
    get = (lambda n: data[n]) if isinstance(data, dict) else (lambda n: getattr(data, n))
    return dict(type=get("type"), code=tuple(get("code")), invflags=get("invflags"))


def icmp6_match(cc, m, fail: str, s_icmptype: int, s_icmpcode: int):
    """icmp6_match(): fragments never match, a header shorter than sizeof(struct icmp6hdr) = 8
    hotdrops, then (type == t && lo <= code <= hi) ^ inv (no 0xFF wildcard)."""
    d = icmp6_payload(m)
    inv = bool(d["invflags"] & IP6T_ICMP_INV)
    t, (lo, hi) = d["type"], d["code"]
    cc._frag_and_header(8, "icmp6", False)
    cc._type_code(s_icmptype, s_icmpcode, t, lo, hi, inv, "icmp6")
