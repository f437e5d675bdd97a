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

The extension-header matches frag, hbh, dst, rt and ah (exthdr_match, at the end) each run
ipv6_find_hdr() with their header type as the target (find_hdr: -ENOENT = no match, -EBADMSG =
hotdrop), then test that header's fields as net/ipv6/netfilter/ip6t_{frag,hbh,rt,ah}.c do. The
walk is emitted per match, not once per packet in the prologue: measured, prologue results in
stack slots made the verifier's work grow several-fold with two header types in one table
(10 frag + 10 hbh rules: 114 000 -> 674 000 processed instructions); the price is ~40 ns per
frag rule on a packet with three extension headers (measured with BPF_PROG_TEST_RUN).

The walk is unrolled MAX_EXTHDRS times (the verifier accepts it, and the join point of every
round only carries imprecise scalars, so it prunes). A packet with more extension headers than
that is treated like a failed walk: rules with IP6T_F_PROTO hotdrop it (the kernel would walk on).
"""
from __future__ import annotations

import errno

from . import ebpf as E
from .ebpf import FP, R0, R1, R2, R3, R4, R8, R9, Label
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
# 1 when ipv6_find_hdr() would have failed (or the walk went too deep): in compile.py's
# S_SADDR, which an IPv6 table never uses (its addresses are the two above), so that every slot
# rule code reads is among those a global function sees (classify.FRAME_LO: a linear stretch's
# pieces, stretch.py), and the frame is no deeper than an IPv4 one
S_WALKERR = -40


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


# ---- the extension-header matches (net/ipv6/netfilter/ip6t_frag.c, ip6t_hbh.c, ip6t_rt.c,
# ip6t_ah.c): each finds its header with ipv6_find_hdr(skb, &ptr, NEXTHDR_X, NULL, NULL) ----
_TARGETS = {"frag": NEXTHDR_FRAGMENT, "hbh": NEXTHDR_HOP, "dst": NEXTHDR_DEST,
            "rt": NEXTHDR_ROUTING, "ah": NEXTHDR_AUTH}


def find_hdr(cc, target: int, hot: str, enoent: str):
    """ipv6_find_hdr() with a target: r9 = offset of the first header of type `target`, or a
    jump to `enoent` (the chain ends at an upper-layer header or NEXTHDR_NONE first, or a
    non-first fragment header comes first: -ENOENT, the match fails) or to `hot` (a header cut
    short: -EBADMSG, the match hotdrops). Unrolled MAX_EXTHDRS times; a longer chain is treated
    like -EBADMSG (the kernel walks on without bound). Uses r8 (nexthdr), r9 (start), r0-r5."""
    found = cc.label("findhdr_found")
    cc.emit(*cc._slice(E.mov(R2, 0), 40), E.jmp(E.JEQ, R0, 0, hot),
            E.ldx(E.B, R8, R0, 6, f"ipv6_find_hdr(target {target}): nexthdr"), E.mov(R9, 40))
    for _ in range(MAX_EXTHDRS):
        ext, need4, have, notfrag, opt, adv = (cc.label("findhdr_ext"), cc.label("findhdr_need4"),
                                               cc.label("findhdr_have"),
                                               cc.label("findhdr_notfrag"),
                                               cc.label("findhdr_opt"), cc.label("findhdr_adv"))
        for h in WALKED:
            cc.emit(E.jmp(E.JEQ, R8, h, ext))
        cc.emit(E.ja(enoent, "not an extension header (or NEXTHDR_NONE): -ENOENT"), Label(ext),
                E.jmp(E.JEQ, R8, NEXTHDR_ROUTING, need4), E.jmp(E.JEQ, R8, NEXTHDR_FRAGMENT, need4),
                *cc._slice(E.mov(R2, R9), 2), E.jmp(E.JEQ, R0, 0, hot), E.ja(have),
                Label(need4), *cc._slice(E.mov(R2, R9), 4), E.jmp(E.JEQ, R0, 0, hot),
                Label(have),
                E.jmp(E.JNE, R8, NEXTHDR_FRAGMENT, notfrag),
                E.ldx(E.H, R3, R0, 2, "frag_off"), E.be16(R3), E.alu(E.AND, R3, 0xfff8),
                E.jmp(E.JEQ, R8, target, found, comment="found: break, whatever the offset"),
                E.jmp(E.JNE, R3, 0, enoent, comment="non-first fragment before it: -ENOENT"),
                E.mov(R2, 8), E.ja(adv),
                Label(notfrag), E.jmp(E.JEQ, R8, target, found),
                E.ldx(E.B, R2, R0, 1, "hdrlen"),
                E.jmp(E.JNE, R8, NEXTHDR_AUTH, opt),
                E.alu(E.ADD, R2, 2), E.alu(E.LSH, R2, 2, comment="ipv6_authlen()"), E.ja(adv),
                Label(opt), E.alu(E.ADD, R2, 1), E.alu(E.LSH, R2, 3, comment="ipv6_optlen()"),
                Label(adv), E.ldx(E.B, R8, R0, 0, "hp->nexthdr"), E.alu(E.ADD, R9, R2))
    for h in WALKED:
        cc.emit(E.jmp(E.JEQ, R8, h, hot, comment=f"more than {MAX_EXTHDRS} extension headers"
                                                  if h == 0 else ""))
    cc.emit(E.ja(enoent), Label(found))


def _header(cc, size: int, hot: str):
    """r0 = `size` bytes at r9 (skb_header_pointer(skb, ptr, size)), hotdrop when short."""
    cc.emit(*cc._slice(E.mov(R2, R9), size), E.jmp(E.JEQ, R0, 0, hot,
                                                    comment=f"{size}-byte header cut short"))


def _in_range(cc, lo: int, hi: int, invert: bool, what: str):
    """r4 |= !((lo <= r1 <= hi) ^ invert), for u32 r1 (id_match, spi_match, segsleft_match).
    Uses r2, r3."""
    cc.emit(E.ld_imm64(R2, lo, f"{'! ' if invert else ''}{what} {lo}:{hi}"), E.mov(R3, R1),
            E.alu(E.SUB, R3, R2), E.alu(E.RSH, R3, 63),
            E.ld_imm64(R2, hi), E.alu(E.SUB, R2, R1), E.alu(E.RSH, R2, 63),
            E.alu(E.OR, R3, R2))                       # r3 = outside
    if invert:
        cc.emit(E.alu(E.XOR, R3, 1))
    cc.emit(E.alu(E.OR, R4, R3))


def _equal_test(cc, want: int, invert: bool):
    """r4 |= !((r1 == want) ^ invert). Uses r2."""
    cc.emit(E.ld_imm64(R2, want), E.alu(E.XOR, R1, R2),
            E.mov(R2, R1), E.neg(R2), E.alu(E.OR, R1, R2), E.alu(E.RSH, R1, 63))  # r1 = differ
    if invert:
        cc.emit(E.alu(E.XOR, R1, 1))
    cc.emit(E.alu(E.OR, R4, R1))


def _too_short(cc, no: str):
    """`skb->len - ptr < hdrlen`: the match fails (no hotdrop); hdrlen in r2, ptr in r9."""
    from .compile import S_LEN
    cc.emit(E.ldx(E.DW, R3, FP, S_LEN), E.alu(E.SUB, R3, R9),
            E.jmp(E.JSLT, R3, R2, no, comment="packet smaller than its length field"))


def exthdr_match(cc, m, rule, chain: str, pos: int, fail: str, hot: str):
    """frag, hbh, dst, rt, ah: find the header, then test its fields. The mismatch is built in
    r4 and handed to the accumulator as r1."""
    from . import matchers
    from . import xt_ext as X
    d = m.data
    where = f"chain {chain} rule {pos} (entry offset {rule.offset})"
    if m.name == "rt" and d.flags & X.IP6T_RT_FST_MASK:
        raise BpfilterError(errno.EOPNOTSUPP, f"{where}: match rt --rt-0-addrs (type 0 routing "
                                              f"header addresses, deprecated by RFC 5095) is not "
                                              f"supported by the compiler")
    if m.name in ("hbh", "dst") and d.flags & X.IP6T_OPTS_OPTS \
            and d.optsnr > X.IP6T_OPTS_OPTSNR:
        raise BpfilterError(errno.EOPNOTSUPP, f"{where}: match {m.name} with {d.optsnr} options "
                                              f"(the kernel would read past opts[16]) is not "
                                              f"supported by the compiler")
    matchers._flush(cc, fail)
    no, done = cc.label("exthdr_no"), cc.label("exthdr_done")
    find_hdr(cc, _TARGETS[m.name], hot, no)
    if m.name == "frag":
        _frag(cc, d, hot)
    elif m.name == "ah":
        _ah(cc, d, hot)
    elif m.name == "rt":
        _rt(cc, d, hot, no)
    else:
        _opts(cc, d, hot, no)
    cc.emit(E.mov(R1, R4), E.ja(done), Label(no), E.mov(R1, 1, comment="no match"), Label(done))
    cc._acc()


def _frag(cc, d, hot):
    # frag_mt6(): id_match(ids, ntohl(identification)) && !(RES && (reserved || frag_off & 6))
    # && !(FST && offset) && !(MF && !M) && !(NMF && M); --fraglen (IP6T_FRAG_LEN) is never
    # tested by the kernel
    from . import xt_ext as X
    _header(cc, 8, hot)
    cc.emit(E.mov(R4, 0), E.ldx(E.W, R1, R0, 4, "identification"), E.be32(R1))
    _in_range(cc, d.ids[0], d.ids[1], bool(d.invflags & X.IP6T_FRAG_INV_IDS), "frag id")
    cc.emit(E.ldx(E.H, R1, R0, 2, "frag_off"), E.be16(R1), E.ldx(E.B, R2, R0, 1, "reserved"))
    if d.flags & X.IP6T_FRAG_RES:
        cc.emit(E.mov(R3, R1), E.alu(E.AND, R3, 6), E.alu(E.OR, R3, R2),
                E.mov(R2, R3), E.neg(R2), E.alu(E.OR, R3, R2), E.alu(E.RSH, R3, 63),
                E.alu(E.OR, R4, R3, comment="--fragres: reserved bits set"))
    if d.flags & X.IP6T_FRAG_FST:
        cc.emit(E.mov(R3, R1), E.alu(E.AND, R3, 0xfff8), E.mov(R2, R3), E.neg(R2),
                E.alu(E.OR, R3, R2), E.alu(E.RSH, R3, 63),
                E.alu(E.OR, R4, R3, comment="--fragfirst: offset != 0"))
    if d.flags & X.IP6T_FRAG_MF:
        cc.emit(E.mov(R3, R1), E.alu(E.AND, R3, 1), E.alu(E.XOR, R3, 1),
                E.alu(E.OR, R4, R3, comment="--fragmore: M clear"))
    if d.flags & X.IP6T_FRAG_NMF:
        cc.emit(E.mov(R3, R1), E.alu(E.AND, R3, 1),
                E.alu(E.OR, R4, R3, comment="--fraglast: M set"))


def _ah(cc, d, hot):
    # ah_mt6(): spi_match(spis, ntohl(spi)) && (!hdrlen || (hdrlen == ipv6_authlen()) ^ inv)
    # && !(hdrres && reserved); the header is sizeof(struct ip_auth_hdr) = 12 bytes
    from . import xt_ext as X
    _header(cc, 12, hot)
    cc.emit(E.mov(R4, 0), E.ldx(E.W, R1, R0, 4, "spi"), E.be32(R1))
    _in_range(cc, d.spis[0], d.spis[1], bool(d.invflags & X.IP6T_AH_INV_SPI), "ah spi")
    if d.hdrlen:
        cc.emit(E.ldx(E.B, R1, R0, 1, f"ahlen {d.hdrlen}"), E.alu(E.ADD, R1, 2),
                E.alu(E.LSH, R1, 2))
        _equal_test(cc, d.hdrlen, bool(d.invflags & X.IP6T_AH_INV_LEN))
    if d.hdrres:
        cc.emit(E.ldx(E.H, R1, R0, 2, "--ahres: reserved"), E.mov(R2, R1), E.neg(R2),
                E.alu(E.OR, R1, R2), E.alu(E.RSH, R1, 63), E.alu(E.OR, R4, R1))


def _rt(cc, d, hot, no):
    # rt_mt6(): the 4-byte ipv6_rt_hdr, then ipv6_optlen() must fit in the packet; segsleft
    # range ^ inv, (!LEN || (hdrlen == ...) ^ inv), (!TYP || (type == ...) ^ inv), and with
    # --rt-0-res the 32-bit reserved word of the type 0 header must be 0 (it lies within
    # hdrlen >= 8 bytes, so the read cannot fail)
    from . import xt_ext as X
    _header(cc, 4, hot)
    cc.emit(E.ldx(E.B, R2, R0, 1, "hdrlen"), E.alu(E.ADD, R2, 1), E.alu(E.LSH, R2, 3))
    cc.emit(E.mov(E.R8, R2))
    _too_short(cc, no)
    _header(cc, 4, hot)            # the slice may live in the bounce buffer: read it again
    cc.emit(E.mov(R4, 0), E.ldx(E.B, R1, R0, 3, "segments_left"))
    _in_range(cc, d.segsleft[0], d.segsleft[1], bool(d.invflags & X.IP6T_RT_INV_SGS), "rt segsleft")
    if d.flags & X.IP6T_RT_LEN:
        cc.emit(E.mov(R1, E.R8))
        _equal_test(cc, d.hdrlen, bool(d.invflags & X.IP6T_RT_INV_LEN))
    if d.flags & X.IP6T_RT_TYP:
        cc.emit(E.ldx(E.B, R1, R0, 2, "type"))
        _equal_test(cc, d.rt_type, bool(d.invflags & X.IP6T_RT_INV_TYP))
    if d.flags & X.IP6T_RT_RES:
        cc.emit(E.mov(E.R8, R4))                 # the slice call clobbers r4
        _header(cc, 8, hot)
        cc.emit(E.mov(R4, E.R8), E.ldx(E.W, R1, R0, 4, "rt0 reserved"), E.mov(R2, R1),
                E.neg(R2), E.alu(E.OR, R1, R2), E.alu(E.RSH, R1, 63), E.alu(E.OR, R4, R1))


def _opts(cc, d, hot, no):
    # hbh_mt6() (hbh and dst): the 2-byte ipv6_opt_hdr, ipv6_optlen() must fit in the packet;
    # ret = !LEN || (hdrlen == ipv6_optlen()) ^ inv; with --hbh-opts/--dst-opts the options
    # from ptr + 2 must be, in order, opts[i] >> 8 (type) with length opts[i] & 0xff (0xff: any
    # length; Pad1 has none); running out of header or packet before optsnr options is no match
    from . import xt_ext as X
    _header(cc, 2, hot)
    cc.emit(E.ldx(E.B, R2, R0, 1, "hdrlen"), E.alu(E.ADD, R2, 1), E.alu(E.LSH, R2, 3))
    cc.emit(E.mov(E.R8, R2))
    _too_short(cc, no)
    cc.emit(E.mov(R4, 0))
    if d.flags & X.IP6T_OPTS_LEN:
        cc.emit(E.mov(R1, E.R8))
        _equal_test(cc, d.hdrlen, bool(d.invflags & X.IP6T_OPTS_INV_LEN))
    if not d.flags & X.IP6T_OPTS_OPTS:
        return
    from .compile import S_BUF, S_LEN
    # r9 = ptr, r8 = hdrlen left; the LEN result waits in S_BUF + 32 across the slice calls
    cc.emit(E.stx(E.DW, FP, S_BUF + 32, R4), E.alu(E.ADD, R9, 2), E.alu(E.SUB, E.R8, 2))
    n = d.optsnr
    for i in range(n):
        want_t, want_l = d.opts[i] >> 8, d.opts[i] & 0xff
        cc.emit(E.jmp(E.JLT, E.R8, 1, no, comment=f"option {i}: type {want_t} len {want_l}"),
                *cc._slice(E.mov(R2, R9), 1), E.jmp(E.JEQ, R0, 0, no),
                E.ldx(E.B, R1, R0, 0), E.jmp(E.JNE, R1, want_t, no))
        if want_t:
            cc.emit(E.jmp(E.JLT, E.R8, 2, no), *cc._slice(E.mov(R2, R9), 2),
                    E.jmp(E.JEQ, R0, 0, no), E.ldx(E.B, R1, R0, 1))
            if want_l != 0xff:
                cc.emit(E.jmp(E.JNE, R1, want_l, no))
            cc.emit(E.alu(E.ADD, R1, 2, comment="optlen"))
        else:
            cc.emit(E.mov(R1, 1, comment="Pad1"))
        if i < n - 1:
            # (ptr > skb->len - optlen || hdrlen < optlen) ends the walk early
            cc.emit(E.jmp(E.JLT, E.R8, R1, no), E.ldx(E.DW, R2, FP, S_LEN),
                    E.alu(E.SUB, R2, R1), E.jmp(E.JSGT, R9, R2, no))
        cc.emit(E.alu(E.ADD, R9, R1), E.alu(E.SUB, E.R8, R1))
    cc.emit(E.ldx(E.DW, R4, FP, S_BUF + 32))
