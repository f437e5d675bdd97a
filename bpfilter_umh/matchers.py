"""BPF code for the issue #6 matches (registry entries in xt_ext.py), called from compile.py's
match dispatch: handles(m) says this module answers for a match (every match xt_ext.py
registers), emit(...) applies the hook-dependent kernel checks, then appends the match's
instructions to the rule being compiled or refuses it (EOPNOTSUPP naming the rule) when the
revision is not in xt_ext.COMPILED (IPv4) / COMPILED_V6. Translated: multiport 0/1,
iprange 1, mac 0, mark 1, length 0, ttl 0 (IPv4) / hl 0 (IPv6), comment 0, pkttype 0, tos 1,
dscp 0, limit 0, owner 1, conntrack 1/2/3 (all criteria but --ctexpire), state 0, addrtype
0/1 (addrtype.py: a trie mirroring the local routing table; IPv6 the address classes); for IPv6
also frag, hbh, dst, rt (not --rt-0-addrs) and ah, whose header walk is family.py's
(exthdr_match). IPv6 differs where the kernel's *_mt6 functions do: length is the u16
payload_len + 40, tos/dscp read the traffic class (ipv6_get_dsfield), iprange compares 128-bit
big-endian addresses, pkttype counts a looped-back packet as multicast, conntrack compares the
16-byte tuple addresses under the mask (ipv6_masked_addr_cmp).

Flavors: the packet-reading matches go through the flavor's primitives (cc._slice), so they
run on tc and xdp as on nf; mark and pkttype read struct __sk_buff on tc (at tc ingress the mark
is the one the packet arrived with: a mark set in PREROUTING by mangle/nft is not seen yet, as
INPUT/FORWARD would see it); mac reads the frame's
h_source on tc/xdp; ttl/hl at FORWARD subtract the decrement ip_forward()/ip6_forward() makes
before NF_INET_FORWARD (tc/xdp see the packet as received). On tc egress (OUTPUT), owner,
conntrack and state read the kernel's struct sk_buff through bpf_cast_to_kern_ctx(), with the
nf flavor's code. What a flavor cannot see is refused naming the rule and the reason
(_FLAVOR_LACKS, _flavor_check).

Fields the packet does not carry are read from the kernel's own objects: skb->mark, pkt_type,
_nfct, head/data/mac_header directly through the trusted skb pointer; the socket, file and
credentials (owner), the MAC header bytes and the nf_conn status and tuples through
bpf_probe_read_kernel, which reads zeros on a fault (so a NULL pointer behaves as "absent").

Every matcher follows the compiler's convention (compile.py "conditions"): leave a mismatch value
in r1 (non-zero = the rule does not match) and call cc._acc(); a helper call clobbers r1-r5, so
the accumulated mismatch (r5) is flushed into a branch first. The netfilter flavor keeps the
struct bpf_nf_ctx pointer in r6 and the BTF-typed (trusted) struct sk_buff pointer in r7, so
skb->mark, skb->pkt_type and skb->_nfct are plain loads at offsets taken from vmlinux BTF.

Conntrack is the kernel's own: an nf program at LOCAL_IN/FORWARD/LOCAL_OUT runs after
nf_conntrack_in() (priority NF_IP_PRI_CONNTRACK = -200), so skb->_nfct holds (struct nf_conn * |
enum ip_conntrack_info), exactly what nf_ct_get() gives xt_state/xt_conntrack. It is only filled
once something in the namespace asked for conntrack (nf_ct_netns_get()); conntrack_ref() does
that through nftables (see there).
"""
from __future__ import annotations

import errno
import functools
import subprocess

from . import ebpf as E
from . import xt_ext as X
from .ebpf import FP, R0, R1, R2, R3, R4, R6, R7, Label
from .errors import BpfilterError

BPF_FUNC_probe_read_kernel = 113
IP_CT_IS_REPLY, IP_CT_UNTRACKED = 3, 7
NFCT_INFOMASK = 7
IPS_SRC_NAT, IPS_DST_NAT = 1 << 4, 1 << 5
XT_CONNTRACK_STATE_INVALID = 1 << 0
# xt_conntrack.h: 1 << (IP_CT_NUMBER + 1, + 2, + 3) with IP_CT_NUMBER = 5; xt_state.h has its
# own XT_STATE_UNTRACKED = 1 << (IP_CT_IS_REPLY + 1)
XT_CONNTRACK_STATE_SNAT, XT_CONNTRACK_STATE_DNAT, XT_CONNTRACK_STATE_UNTRACKED = \
    1 << 6, 1 << 7, 1 << 8
XT_STATE_UNTRACKED = 1 << 4
PACKET_BROADCAST, PACKET_MULTICAST, PACKET_LOOPBACK = 1, 2, 5
# XT_STATE_BIT(ctinfo) = 1 << (ctinfo % IP_CT_IS_REPLY + 1) for ctinfo 0..4, one nibble each
_STATE_BITS = sum((1 << (c % IP_CT_IS_REPLY + 1)) << (4 * c) for c in range(5))
# conntrack criteria this compiler translates; any other match_flags bit is refused by name
_CT_DONE = 0x3fff
_CT_FLAG_NAMES = {X.XT_CONNTRACK_PROTO: "--ctproto", X.XT_CONNTRACK_ORIGSRC: "--ctorigsrc",
                  X.XT_CONNTRACK_ORIGDST: "--ctorigdst", X.XT_CONNTRACK_REPLSRC: "--ctreplsrc",
                  X.XT_CONNTRACK_REPLDST: "--ctrepldst", X.XT_CONNTRACK_EXPIRES: "--ctexpire",
                  X.XT_CONNTRACK_ORIGSRC_PORT: "--ctorigsrcport",
                  X.XT_CONNTRACK_ORIGDST_PORT: "--ctorigdstport",
                  X.XT_CONNTRACK_REPLSRC_PORT: "--ctreplsrcport",
                  X.XT_CONNTRACK_REPLDST_PORT: "--ctrepldstport"}

CONNTRACK = {"conntrack", "state"}


@functools.lru_cache(maxsize=None)
def _skb_facts(fake: bool) -> dict:
    """Offsets in struct sk_buff / nf_conn (vmlinux BTF); fixed values for golden listings."""
    if fake:
        return dict(mark=168, nfct=104, pkt_type=(128, 0, 7), status=128, timeout=8)
    from . import btf
    b = btf.vmlinux()
    bitoff, _t, bits = b._member_in(b._composite("sk_buff"), "pkt_type")
    return dict(mark=btf.member_offset("sk_buff", "mark"),
                nfct=btf.member_offset("sk_buff", "_nfct"),
                pkt_type=(bitoff // 8, bitoff % 8, (1 << bits) - 1),
                status=btf.member_offset("nf_conn", "status"),
                timeout=btf.member_offset("nf_conn", "timeout"))


def skb_facts(cc) -> dict:
    from .compile import KernelFacts
    return _skb_facts(cc.facts == KernelFacts.fake())


def handles(m) -> bool:
    """This module answers for the match: it compiles it, or refuses it after the kernel's
    hook-dependent checks. A payload the codec could not decode (wrong size) is left to the
    compiler's generic refusal."""
    return m.name in X.MATCH_NAMES and not isinstance(m.data, (bytes, bytearray))


def compiled(m, v6: bool = False) -> bool:
    return (m.name, m.revision) in (X.COMPILED_V6 if v6 else X.COMPILED)


def needs_l4(m) -> bool:
    """The prologue must parse the transport header (ports) for this match."""
    return m.name == "multiport"


def uses_conntrack(table) -> bool:
    return any(m.name in CONNTRACK for r in table.entries() for m in r.matches)


def _refuse(chain, pos, rule, what):
    return BpfilterError(errno.EOPNOTSUPP, f"chain {chain} rule {pos} (entry offset "
                                           f"{rule.offset}): {what}")


# xt_match.hooks of the extensions that have them (xt_mac.c, xt_owner.c)
NF_INET_PRE_ROUTING, NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING = \
    range(5)
_HOOKS = {"mac": (1 << NF_INET_PRE_ROUTING) | (1 << NF_INET_LOCAL_IN) | (1 << NF_INET_FORWARD),
          "owner": (1 << NF_INET_LOCAL_OUT) | (1 << NF_INET_POST_ROUTING)}
_HOOK_NAMES = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


def hook_check(m, hook: int, rule, chain: str, pos: int):
    """The checks that depend on the hooks reaching the entry (its comefrom in the kernel):
    xt_check_match()'s `hooks` mask and addrtype_mt_checkentry_v1()'s interface limits, both
    EINVAL. The compiler emits every reachable entry once per hook that reaches it, so checking
    here sees the same hooks translate_table() gives the kernel's checks."""
    where = f"chain {chain} rule {pos} (entry offset {rule.offset})"
    bad = m.name in _HOOKS and not _HOOKS[m.name] & (1 << hook)
    if m.name == "addrtype" and m.revision == 1 and not isinstance(m.data, (bytes, bytearray)):
        f = m.data.flags
        bad = (f & X.XT_ADDRTYPE_LIMIT_IFACE_OUT and hook in (NF_INET_PRE_ROUTING,
                                                              NF_INET_LOCAL_IN)) or \
              (f & X.XT_ADDRTYPE_LIMIT_IFACE_IN and hook in (NF_INET_POST_ROUTING,
                                                             NF_INET_LOCAL_OUT))
    if bad:
        raise BpfilterError(errno.EINVAL, f"{where}: match {m.name} is not valid in the "
                                          f"{_HOOK_NAMES[hook]} hook")


# Why a registered match is not compiled at all (appended to the refusal).
_WHY_NOT = {}

# What a match reads that a flavor does not have. Everything else reads the packet through the
# flavor's primitives (load_bytes), so it runs on tc and xdp as on nf.
_FLAVOR_LACKS = {
    ("conntrack", "xdp"): "XDP runs before conntrack: no connection state exists yet",
    ("state", "xdp"): "XDP runs before conntrack: no connection state exists yet",
    ("owner", "xdp"): "XDP sees received packets only; owner is for locally sent ones",
    ("mark", "xdp"): "an XDP frame has no skb, hence no skb->mark",
    ("pkttype", "xdp"): "an XDP frame has no skb, hence no skb->pkt_type",
}
SKB_MARK, SKB_PKT_TYPE, SKB_IFINDEX, XDP_INGRESS_IFINDEX = 8, 4, 40, 12    # __sk_buff, xdp_md
LOOPBACK_IFINDEX = 1
# tc ingress (INPUT, FORWARD) runs before nf_conntrack_in() at PREROUTING; tc egress (OUTPUT)
# after the whole netfilter output path, POSTROUTING included: the entry OUTPUT saw has been
# confirmed there (IPS_CONFIRMED) and maybe source-NATed (status SRC_NAT, reply tuple's dst)
_TC_INGRESS_NO_CT = "tc ingress runs before conntrack (PREROUTING): the packet has no " \
                    "conntrack entry yet"
_TC_EGRESS_CT = "at tc egress the entry has been through POSTROUTING (confirmed, maybe " \
                "source-NATed), unlike at OUTPUT"


def _flavor_check(cc, m, chain, pos, rule):
    """Refusals that depend on flavor and hook, naming the rule, the match and why."""
    why = _FLAVOR_LACKS.get((m.name, cc.fl.name))
    if not why and cc.fl.name == "tc" and m.name in CONNTRACK:
        if cc.chain.hook != NF_INET_LOCAL_OUT:
            why = _TC_INGRESS_NO_CT
        elif m.name == "conntrack":
            d = m.data
            bad = [n for f, n in ((X.XT_CONNTRACK_STATUS, "--ctstatus"),
                                  (X.XT_CONNTRACK_REPLDST, "--ctrepldst"),
                                  (X.XT_CONNTRACK_REPLDST_PORT, "--ctrepldstport"))
                   if d.match_flags & f]
            if d.match_flags & X.XT_CONNTRACK_STATE and d.state_mask & XT_CONNTRACK_STATE_SNAT:
                bad.append("--ctstate SNAT")
            if bad:
                why = f"{', '.join(bad)}: {_TC_EGRESS_CT}"
    if why:
        raise _refuse(chain, pos, rule, f"match {m.name} is not supported by flavor "
                                        f"{cc.fl.name} ({why}); use flavor nf")


def _kern_skb(cc, fail):
    """r7 = the kernel's struct sk_buff (trusted BTF pointer): the nf flavor keeps ctx->skb
    there; a tc program gets it from bpf_cast_to_kern_ctx(ctx) (a kfunc call: r1-r5 die, so the
    accumulated mismatch is flushed first)."""
    if cc.fl.name == "tc":
        _flush(cc, fail)
        cc.emit(E.mov(R1, R6), E.kfunc("bpf_cast_to_kern_ctx"),
                E.mov(R7, R0, comment="r7 = (struct sk_buff *)ctx"))


def emit(cc, m, rule, chain: str, pos: int, fail: str, hot: str):
    hook_check(m, cc.chain.hook, rule, chain, pos)
    if not compiled(m, cc.v6):
        raise _refuse(chain, pos, rule, f"match {m.name} (revision {m.revision}) is not "
                                        f"supported by the compiler"
                                        + (" for IPv6" if cc.v6 and compiled(m) else "")
                                        + _WHY_NOT.get(m.name, ""))
    _flavor_check(cc, m, chain, pos, rule)
    d = m.data
    if m.name == "comment":
        return
    if cc.v6 and needs_l4(m):
        from . import family
        family.check_l4_rule(rule, chain, pos, m)
    if m.name in ("frag", "hbh", "dst", "rt", "ah"):
        from . import family
        return family.exthdr_match(cc, m, rule, chain, pos, fail, hot)
    if m.name == "conntrack":
        bad = d.match_flags & ~_CT_DONE
        if bad:
            names = [n for f, n in _CT_FLAG_NAMES.items() if bad & f] or [f"{bad:#x}"]
            raise _refuse(chain, pos, rule, f"conntrack {', '.join(names)} is not supported "
                                            f"by the compiler")
    if m.name == "multiport":
        return _multiport_any(cc, d, m.revision, fail, hot)
    if m.name == "addrtype":
        from . import addrtype
        return addrtype.emit(cc, m, rule, chain, pos, fail,
                             lambda what: _refuse(chain, pos, rule, what))
    if m.name == "limit":
        hooks = _hooks_reaching(cc.table, chain)
        if len(hooks) > 1:
            # the kernel has one bucket per rule; here each hook's program gets its own map
            raise _refuse(chain, pos, rule, f"match limit in chain {chain}, which is reached "
                                            f"from {', '.join(hooks)}, is not supported (one "
                                            f"token bucket per hook, not per rule)")
        return _limit(cc, d, fail, hot, rule.index)
    if m.name == "conntrack":
        return _conntrack(cc, d, fail, hot, m.revision)
    globals()["_" + m.name](cc, d, fail, hot)


# ------------------------------------------------------------------------------ helpers
def _flush(cc, fail):
    """Before a helper/kfunc call: leave now if an earlier condition already failed (r5 dies)."""
    if cc.acc_live:
        from .compile import ACC
        cc.emit(E.jmp(E.JNE, ACC, 0, fail))
        cc.acc_live = False


def _iphdr(cc, fail):
    """r0 = the first 20 bytes of the IPv4 header, or the 40 of the IPv6 header (the prologue
    read them already, so the slice cannot fail; the check is for the verifier)."""
    _flush(cc, fail)
    cc.emit(*cc._slice(E.mov(R2, 0), 40 if cc.v6 else 20), E.jmp(E.JEQ, R0, 0, fail))


def _dsfield(cc):
    """r1 = the DS field (TOS byte): iph->tos, or ipv6_get_dsfield() = ntohs(first 16 bits) >> 4
    for IPv6 (the traffic class straddles the version nibble); r0 from _iphdr."""
    if cc.v6:
        cc.emit(E.ldx(E.H, R1, R0, 0, "ipv6_get_dsfield()"), E.be16(R1), E.alu(E.RSH, R1, 4),
                E.alu(E.AND, R1, 0xff))
    else:
        cc.emit(E.ldx(E.B, R1, R0, 1, "iph->tos"))


def _nz(cc, reg, invert=False):
    """reg = (reg != 0) [^ 1], through r2 when reg is not r1."""
    tmp = R2 if reg != R2 else R3
    cc.emit(E.mov(tmp, reg), E.neg(tmp), E.alu(E.OR, reg, tmp), E.alu(E.RSH, reg, 63))
    if invert:
        cc.emit(E.alu(E.XOR, reg, 1))


def _outside(cc, dst, src, lo: int, hi: int):
    """dst = 1 when the value in src (0 .. 2^32-1) is outside lo..hi, else 0 (64-bit signed
    differences of values below 2^32: the sign bit says which side). Uses r3, r4."""
    cc.emit(E.ld_imm64(R3, lo), E.mov(R4, src), E.alu(E.SUB, R4, R3), E.alu(E.RSH, R4, 63),
            E.ld_imm64(R3, hi), E.alu(E.SUB, R3, src), E.alu(E.RSH, R3, 63),
            E.alu(E.OR, R4, R3), E.mov(dst, R4))


def _finish(cc, invert: bool):
    if invert:
        cc.emit(E.alu(E.XOR, R1, 1))
    cc._acc()


# ------------------------------------------------------------------------------ stateless
def _mark(cc, d, fail, hot):
    # xt_mark.c mark_mt(): ((skb->mark & mask) == mark) ^ invert
    what = f"{'! ' if d.invert else ''}mark {d.mark:#x}/{d.mask:#x}"
    if cc.fl.name == "tc":
        cc.emit(E.ldx(E.W, R1, R6, SKB_MARK, f"__sk_buff->mark: {what}"))
    else:
        cc.emit(E.ldx(E.W, R1, R7, skb_facts(cc)["mark"], what))
    cc.emit(E.ld_imm64(R2, d.mask), E.alu(E.AND, R1, R2), E.ld_imm64(R2, d.mark),
            E.alu(E.XOR, R1, R2))
    if d.invert:
        _nz(cc, R1, invert=True)
    cc._acc()


def _length(cc, d, fail, hot):
    # xt_length.c length_mt(): ntohs(iph->tot_len) in min..max, ^ invert; length_mt6(): the
    # u16 ntohs(payload_len) + sizeof(struct ipv6hdr), which wraps past 65535
    _iphdr(cc, fail)
    if cc.v6:
        cc.emit(E.ldx(E.H, R1, R0, 4, f"length {d.min}:{d.max}: payload_len + 40"), E.be16(R1),
                E.alu(E.ADD, R1, 40), E.alu(E.AND, R1, 0xffff, comment="u16 pktlen"))
    else:
        cc.emit(E.ldx(E.H, R1, R0, 2, f"length {d.min}:{d.max}"), E.be16(R1))
    _outside(cc, R1, R1, d.min, d.max)
    _finish(cc, bool(d.invert))


def _ttl_like(cc, mode: int, value: int, off: int, what: str, fail):
    # xt_hl.c ttl_mt() / hl_mt6(): EQ, NE, LT, GT (same numbers for ttl and hl); any other
    # mode never matches
    if mode not in (X.IPT_TTL_EQ, X.IPT_TTL_NE, X.IPT_TTL_LT, X.IPT_TTL_GT):
        cc.emit(E.ja(fail, f"{what} mode {mode} never matches"))
        return
    _iphdr(cc, fail)
    cc.emit(E.ldx(E.B, R1, R0, off, f"{what} mode {mode} {value}"))
    if cc.fl.name != "nf" and cc.chain.hook == NF_INET_FORWARD:
        # ip_forward() / ip6_forward() decrement the TTL / hop limit before NF_INET_FORWARD;
        # tc and xdp see the packet as received
        cc.emit(E.alu(E.SUB, R1, 1, comment="as the FORWARD hook sees it"))
    if mode in (X.IPT_TTL_EQ, X.IPT_TTL_NE):
        cc.emit(E.alu(E.XOR, R1, value))
        if mode == X.IPT_TTL_NE:
            _nz(cc, R1, invert=True)
    elif mode == X.IPT_TTL_LT:          # mismatch = !(ttl < v)
        cc.emit(E.alu(E.SUB, R1, value), E.alu(E.RSH, R1, 63), E.alu(E.XOR, R1, 1))
    else:                               # mismatch = !(ttl > v)
        cc.emit(E.mov(R2, value), E.alu(E.SUB, R2, R1), E.alu(E.RSH, R2, 63),
                E.alu(E.XOR, R2, 1), E.mov(R1, R2))
    cc._acc()


def _ttl(cc, d, fail, hot):
    _ttl_like(cc, d.mode, d.ttl, 8, "ttl", fail)


def _hl(cc, d, fail, hot):
    _ttl_like(cc, d.mode, d.hop_limit, 7, "hl", fail)


def _tos(cc, d, fail, hot):
    # xt_dscp.c tos_mt(): ((dsfield & tos_mask) == tos_value) ^ !!invert, for both families
    _iphdr(cc, fail)
    _dsfield(cc)
    cc.emit(E.alu(E.AND, R1, d.tos_mask, comment=f"tos {d.tos_value:#x}/{d.tos_mask:#x}"),
            E.alu(E.XOR, R1, d.tos_value))
    if d.invert:
        _nz(cc, R1, invert=True)
    cc._acc()


def _dscp(cc, d, fail, hot):
    # xt_dscp.c dscp_mt() / dscp_mt6(): (dsfield >> XT_DSCP_SHIFT == dscp) ^ !!invert
    _iphdr(cc, fail)
    _dsfield(cc)
    cc.emit(E.alu(E.RSH, R1, 2, comment=f"dscp {d.dscp:#x}"), E.alu(E.XOR, R1, d.dscp))
    if d.invert:
        _nz(cc, R1, invert=True)
    cc._acc()


def _lt128(cc, slot: int, const: bytes, reverse: bool, out: str):
    """Jump to `out` when the 16-byte address at fp+slot (packet order) is below `const`
    (reverse: above it): xt_iprange.c iprange_ipv6_lt(), a big-endian 128-bit compare, done as
    two unsigned 64-bit halves. Uses r1-r3."""
    hi, lo = int.from_bytes(const[:8], "big"), int.from_bytes(const[8:], "big")
    jlt = E.JGT if reverse else E.JLT
    nxt = cc.label("lt128_no")
    cc.emit(E.ldx(E.DW, R1, FP, slot), E.be64(R1), E.ld_imm64(R3, hi),
            E.jmp(jlt, R1, R3, out), E.jmp(E.JNE, R1, R3, nxt),
            E.ldx(E.DW, R2, FP, slot + 8), E.be64(R2), E.ld_imm64(R3, lo),
            E.jmp(jlt, R2, R3, out), Label(nxt))


def _iprange6(cc, d, fail, hot):
    # xt_iprange.c iprange_mt6(): m = saddr < min | max < saddr, ^ the side's invert
    from .family import S_DADDR6, S_SADDR6
    import ipaddress
    for flag, inv, slot, lo, hi, what in (
            (X.IPRANGE_SRC, X.IPRANGE_SRC_INV, S_SADDR6, d.src_min, d.src_max, "src"),
            (X.IPRANGE_DST, X.IPRANGE_DST_INV, S_DADDR6, d.dst_min, d.dst_max, "dst")):
        if not d.flags & flag:
            continue
        out, done = cc.label("iprange6_out"), cc.label("iprange6_done")
        cc.emit(E.mov(R4, 0, comment=f"{what}-range {ipaddress.IPv6Address(lo)}-"
                                     f"{ipaddress.IPv6Address(hi)}"))
        _lt128(cc, slot, lo, False, out)
        _lt128(cc, slot, hi, True, out)
        cc.emit(E.ja(done), Label(out), E.mov(R4, 1), Label(done), E.mov(R1, R4))
        _finish(cc, bool(d.flags & inv))


def _iprange(cc, d, fail, hot):
    # xt_iprange.c iprange_mt4(): host-order comparisons, each side inverted on its own
    from .compile import S_DADDR, S_SADDR
    if cc.v6:
        return _iprange6(cc, d, fail, hot)
    for flag, inv, slot, lo, hi, what in (
            (X.IPRANGE_SRC, X.IPRANGE_SRC_INV, S_SADDR, d.src_min, d.src_max, "src"),
            (X.IPRANGE_DST, X.IPRANGE_DST_INV, S_DADDR, d.dst_min, d.dst_max, "dst")):
        if not d.flags & flag:
            continue
        lo4, hi4 = int.from_bytes(lo[:4], "big"), int.from_bytes(hi[:4], "big")
        cc.emit(E.ldx(E.DW, R1, FP, slot, f"{what}-range {lo4:#x}-{hi4:#x}"), E.be32(R1))
        _outside(cc, R1, R1, lo4, hi4)
        _finish(cc, bool(d.flags & inv))


def _multiport_ports(d, rev: int):
    """[(lo, hi), ...] as ports_match()/ports_match_v1() walk them (v1: pflags[i] makes ports[i]
    and ports[i + 1] a range; ports[15] would be read from pflags[0..1], as in the kernel)."""
    if rev == 0:
        return [(p, p) for p in d.ports[:d.count]]
    words = list(d.ports) + [d.pflags[0] | d.pflags[1] << 8]
    out, i = [], 0
    while i < d.count:
        if d.pflags[i] if i < 15 else 0:
            out.append((words[i], words[i + 1]))
            i += 2
        else:
            out.append((words[i], words[i]))
            i += 1
    return out


def _multiport_any(cc, d, rev, fail, hot):
    # xt_multiport.c multiport_mt(): fragments never match; it reads only the 4 bytes of ports
    # (skb_header_pointer(skb, par->thoff, 4)) and hotdrops when they are not there. The
    # prologue filled S_SPORT/S_DPORT when 8 bytes were readable (S_L4LEN != 0); otherwise the
    # 4 bytes are read here (a later udp/tcp match still hotdrops on such a packet).
    from .compile import S_DPORT, S_FRAGOFF, S_L4LEN, S_SPORT, S_THOFF
    _flush(cc, fail)
    have = cc.label("multiport_ports")
    cc.emit(E.ldx(E.DW, R1, FP, S_FRAGOFF, "multiport: not a fragment"),
            E.jmp(E.JNE, R1, 0, fail),
            E.ldx(E.DW, R1, FP, S_L4LEN), E.jmp(E.JNE, R1, 0, have),
            *cc._slice(E.ldx(E.DW, R2, FP, S_THOFF), 4),
            E.jmp(E.JEQ, R0, 0, hot, comment="no 4 bytes of ports: hotdrop"),
            E.ldx(E.H, R1, R0, 0), E.be16(R1), E.stx(E.DW, FP, S_SPORT, R1),
            E.ldx(E.H, R1, R0, 2), E.be16(R1), E.stx(E.DW, FP, S_DPORT, R1),
            Label(have))
    slots = {X.XT_MULTIPORT_SOURCE: (S_SPORT,), X.XT_MULTIPORT_DESTINATION: (S_DPORT,),
             X.XT_MULTIPORT_EITHER: (S_SPORT, S_DPORT)}[d.flags]
    ranges = _multiport_ports(d, rev)
    # r1 = AND over (port outside range): 1 = no port matched
    cc.emit(E.mov(R1, 1, comment=f"multiport {ranges}"))
    for lo, hi in ranges:
        for slot in slots:
            cc.emit(E.ldx(E.DW, R0, FP, slot))
            _outside(cc, R0, R0, lo, hi)
            cc.emit(E.alu(E.AND, R1, R0))
    _finish(cc, rev == 1 and bool(d.invert))


def _pkttype(cc, d, fail, hot):
    # xt_pkttype.c pkttype_mt(): PACKET_LOOPBACK counts as multicast for a multicast IPv4
    # destination, as broadcast for another IPv4 one, and always as multicast for IPv6
    from .compile import S_DADDR
    what = f"{'! ' if d.invert else ''}pkttype {d.pkttype}"
    if cc.fl.name == "tc":
        cc.emit(E.ldx(E.W, R1, R6, SKB_PKT_TYPE, f"__sk_buff->pkt_type: {what}"))
    else:
        byte, shift, mask = skb_facts(cc)["pkt_type"]
        cc.emit(E.ldx(E.B, R1, R7, byte, what))
        if shift:
            cc.emit(E.alu(E.RSH, R1, shift))
        cc.emit(E.alu(E.AND, R1, mask))
    cc.emit(
            # r3 = 1 when not loopback
            E.mov(R3, R1), E.alu(E.XOR, R3, PACKET_LOOPBACK))
    _nz(cc, R3)
    if cc.v6:
        cc.emit(E.mov(R4, PACKET_MULTICAST))
    else:
        # r4 = PACKET_BROADCAST + (daddr is 224.0.0.0/4): the type a looped-back packet gets
        cc.emit(E.ldx(E.DW, R4, FP, S_DADDR), E.alu(E.AND, R4, 0xf0), E.alu(E.XOR, R4, 0xe0))
        _nz(cc, R4, invert=True)
        cc.emit(E.alu(E.ADD, R4, PACKET_BROADCAST))
    cc.emit(
            # type = r3 ? pkt_type : r4  ==  r4 + r3 * (pkt_type - r4)
            E.alu(E.SUB, R1, R4), E.alu(E.MUL, R1, R3), E.alu(E.ADD, R1, R4),
            E.alu(E.XOR, R1, d.pkttype))
    if d.invert:
        _nz(cc, R1, invert=True)
    cc._acc()


# ------------------------------------------------------------------------------ conntrack
def _statebit(cc, status: bool, untracked_bit: int = XT_CONNTRACK_STATE_UNTRACKED):
    """r1 = the state bit xt_conntrack computes for this packet (XT_CONNTRACK_STATE_BIT of
    ctinfo with a conntrack entry, UNTRACKED for the untracked template, INVALID without one;
    with `status`, | SNAT/DNAT from ct->status read into the stack at S_BUF); r0 = 1 when the
    packet has a conntrack entry; r4 = ctinfo."""
    from .compile import S_BUF
    f = skb_facts(cc)
    cc.emit(E.ldx(E.DW, R1, R7, f["nfct"], "skb->_nfct"), E.mov(R4, R1),
            E.alu(E.AND, R4, NFCT_INFOMASK), E.mov(R0, R1), E.alu(E.RSH, R0, 3))
    _nz(cc, R0)                                    # r0 = has ct (ptr bits non-zero)
    cc.emit(E.ld_imm64(R1, _STATE_BITS), E.mov(R2, R4), E.alu(E.LSH, R2, 2),
            E.alu(E.RSH, R1, R2), E.alu(E.AND, R1, 0xf),        # r1 = ct state bit
            E.mov(R3, R4), E.alu(E.XOR, R3, IP_CT_UNTRACKED))
    _nz(cc, R3, invert=True)                       # r3 = untracked
    # r2 = the no-ct bit: untracked_bit for the untracked template, INVALID (1) otherwise
    cc.emit(E.mov(R2, R3), E.alu(E.MUL, R2, untracked_bit - 1), E.alu(E.ADD, R2, 1),
            # r1 = r2 + has_ct * (r1 - r2)
            E.alu(E.SUB, R1, R2), E.alu(E.MUL, R1, R0), E.alu(E.ADD, R1, R2))
    if status:
        # test_bit(IPS_SRC_NAT_BIT / IPS_DST_NAT_BIT, &ct->status); zero without ct
        cc.emit(E.ldx(E.DW, R2, FP, S_BUF), E.mov(R3, R2), E.alu(E.AND, R3, IPS_SRC_NAT),
                E.alu(E.LSH, R3, 2),                             # bit 4 -> bit 6 (SNAT)
                E.alu(E.AND, R2, IPS_DST_NAT), E.alu(E.LSH, R2, 2),  # bit 5 -> bit 7 (DNAT)
                E.alu(E.OR, R1, R3), E.alu(E.OR, R1, R2))


def _read_status(cc, fail):
    """ct->status into S_BUF via bpf_probe_read_kernel (zeroed when there is no entry: the
    helper zeroes the destination on a fault)."""
    from .compile import S_BUF
    f = skb_facts(cc)
    _flush(cc, fail)
    cc.emit(E.ldx(E.DW, R3, R7, f["nfct"]), E.ld_imm64(R1, ~NFCT_INFOMASK & (2**64 - 1)),
            E.alu(E.AND, R3, R1), E.alu(E.ADD, R3, f["status"]),
            E.mov(R1, FP), E.alu(E.ADD, R1, S_BUF), E.mov(R2, 8),
            E.call(BPF_FUNC_probe_read_kernel, "ct->status"))


def _state(cc, d, fail, hot):
    # xt_state.c state_mt(): (statemask & statebit) != 0 (XT_STATE_* == XT_CONNTRACK_STATE_*
    # for INVALID and the ctinfo bits; XT_STATE_UNTRACKED is its own)
    _kern_skb(cc, fail)
    _statebit(cc, False, XT_STATE_UNTRACKED)
    cc.emit(E.alu(E.AND, R1, d.statemask))
    _nz(cc, R1, invert=True)
    cc._acc()


_TUPLE_PATHS = {"tuplehash": ("nf_conn", "tuplehash"), "hash": None,
                "tuple": ("nf_conntrack_tuple_hash", "tuple"),
                "src_ip": ("nf_conntrack_tuple_hash", "tuple.src.u3"),
                "src_port": ("nf_conntrack_tuple_hash", "tuple.src.u.all"),
                "dst_ip": ("nf_conntrack_tuple_hash", "tuple.dst.u3"),
                "dst_port": ("nf_conntrack_tuple_hash", "tuple.dst.u.all"),
                "protonum": ("nf_conntrack_tuple_hash", "tuple.dst.protonum")}
_TUPLE_FAKE = dict(tuplehash=16, hash=56, tuple=16, src_ip=16, src_port=32, dst_ip=36,
                   dst_port=52, protonum=54)


@functools.lru_cache(maxsize=None)
def _tuple_facts(fake: bool) -> dict:
    if fake:
        return _TUPLE_FAKE
    from . import btf
    out = {k: btf.member_offset(*v) for k, v in _TUPLE_PATHS.items() if v}
    out["hash"] = btf.struct_size("nf_conntrack_tuple_hash")
    return out


def _swap16(v: int) -> int:
    return ((v & 0xff) << 8) | (v >> 8)


def _ct_tuple_checks(cc, d, rev: int, direction: int):
    """Read ct->tuplehash[direction].tuple's addresses, ports and protocol (40 bytes at S_BUF,
    through bpf_probe_read_kernel: zeros without an entry) and OR the mismatches of the criteria
    on that direction into r8 (they only count for packets with an entry)."""
    from .compile import KernelFacts, S_BUF
    f = skb_facts(cc)
    t = _tuple_facts(cc.facts == KernelFacts.fake())
    fl, inv = d.match_flags, d.invert_flags
    base = t["tuplehash"] + direction * t["hash"] + t["tuple"]
    cc.emit(E.ldx(E.DW, R3, R7, f["nfct"]), E.ld_imm64(R1, ~NFCT_INFOMASK & (2**64 - 1)),
            E.alu(E.AND, R3, R1), E.alu(E.ADD, R3, base),
            E.mov(R1, FP), E.alu(E.ADD, R1, S_BUF), E.mov(R2, 40),
            E.call(BPF_FUNC_probe_read_kernel, f"ct->tuplehash[{direction}].tuple"))
    rel = lambda k: S_BUF + t[k] - t["tuple"]       # noqa: E731

    def acc(flag):
        if inv & flag:
            cc.emit(E.alu(E.XOR, R1, 1))
        cc.emit(E.alu(E.OR, E.R8, R1))

    pre = "orig" if direction == 0 else "repl"
    for side, key in (("src", "src_ip"), ("dst", "dst_ip")):
        flag = getattr(X, f"XT_CONNTRACK_{pre.upper()}{side.upper()}")
        if fl & flag:
            # conntrack_addrcmp(): ((kaddr ^ uaddr) & umask) == 0, the whole ^ !invert
            # (IPv6: ipv6_masked_addr_cmp() over the 16 bytes)
            addr, mask = getattr(d, f"{pre}{side}_addr"), getattr(d, f"{pre}{side}_mask")
            # (the reply tuple's dst.u3 is only 4-byte aligned in the buffer: 32-bit loads)
            cc.emit(E.mov(R4, 0, comment=f"ct{pre}{side}"))
            for w in ((0, 4, 8, 12) if cc.v6 else (0,)):
                cc.emit(E.ldx(E.W, R1, FP, rel(key) + w),
                        E.ld_imm64(R2, int.from_bytes(addr[w:w + 4], "little")),
                        E.alu(E.XOR, R1, R2),
                        E.ld_imm64(R2, int.from_bytes(mask[w:w + 4], "little")),
                        E.alu(E.AND, R1, R2), E.alu(E.OR, R4, R1))
            cc.emit(E.mov(R1, R4))
            _nz(cc, R1)
            acc(flag)
    if direction == 0 and fl & X.XT_CONNTRACK_PROTO:
        # (nf_ct_protonum(ct) == l4proto) ^ !invert
        cc.emit(E.ldx(E.B, R1, FP, rel("protonum"), "ctproto"), E.alu(E.XOR, R1, d.l4proto))
        _nz(cc, R1)
        acc(X.XT_CONNTRACK_PROTO)
    for side, key in (("src", "src_port"), ("dst", "dst_port")):
        flag = getattr(X, f"XT_CONNTRACK_{pre.upper()}{side.upper()}_PORT")
        if not fl & flag:
            continue
        lo = getattr(d, f"{pre}{side}_port")
        cc.emit(E.ldx(E.H, R1, FP, rel(key), f"ct{pre}{side}port"))
        if rev < 3:     # tuple->X.u.all == port (both network order) ^ !invert
            cc.emit(E.alu(E.XOR, R1, _swap16(lo)))
            _nz(cc, R1)
        else:           # !port_match(lo, high, ntohs(u.all), invert)
            cc.emit(E.be16(R1))
            _outside(cc, R1, R1, lo, getattr(d, f"{pre}{side}_port_high"))
        acc(flag)


def _ct_expires(cc, d):
    """--ctexpire: r8 |= !((min <= nf_ct_expires(ct) / HZ <= max) ^ !invert), where
    nf_ct_expires() = max((s32)(ct->timeout - (u32)jiffies), 0) (nfct_time_stamp is the low
    32 bits of jiffies). ct->timeout is read with bpf_probe_read_kernel into S_BUF (0 without
    an entry; the result only counts with one)."""
    from .compile import S_BUF
    f = skb_facts(cc)
    pos = cc.label("ctexpire_pos")
    cc.emit(E.st(E.DW, FP, S_BUF, 0),
            E.ldx(E.DW, R3, R7, f["nfct"]), E.ld_imm64(R1, ~NFCT_INFOMASK & (2**64 - 1)),
            E.alu(E.AND, R3, R1), E.alu(E.ADD, R3, f["timeout"]),
            E.mov(R1, FP), E.alu(E.ADD, R1, S_BUF), E.mov(R2, 4),
            E.call(BPF_FUNC_probe_read_kernel, "ct->timeout"),
            E.call(BPF_FUNC_jiffies64),
            E.ldx(E.W, R1, FP, S_BUF), E.alu(E.SUB, R1, R0, bits=32, comment="u32 difference"),
            E.jmp(E.JSET, R1, 0x80000000, pos, comment="negative as s32: expired"),
            E.ja(pos + "_div"), Label(pos), E.mov(R1, 0), Label(pos + "_div"),
            E.alu(E.DIV, R1, X.kernel_hz(), comment=f"seconds: / HZ "
                                                    f"({d.expires_min}:{d.expires_max})"))
    _outside(cc, R1, R1, d.expires_min, d.expires_max)
    if d.invert_flags & X.XT_CONNTRACK_EXPIRES:
        cc.emit(E.alu(E.XOR, R1, 1))
    cc.emit(E.alu(E.OR, E.R8, R1))


def _conntrack(cc, d, fail, hot, rev: int):
    # xt_conntrack.c conntrack_mt(): state first (for every packet), then, only with a conntrack
    # entry, direction, addresses, protocol and ports, status; without an entry the result is
    # (match_flags & STATE). r9 = mismatch for every packet, r8 = mismatch with an entry.
    fl, inv = d.match_flags, d.invert_flags
    _flush(cc, fail)
    _kern_skb(cc, fail)
    cc.emit(E.mov(E.R8, 0), E.mov(E.R9, 0))
    if fl & (X.XT_CONNTRACK_STATE | X.XT_CONNTRACK_STATUS):
        _read_status(cc, fail)
    from .compile import S_BUF
    _statebit(cc, bool(fl & X.XT_CONNTRACK_STATE))        # r1 statebit, r4 ctinfo
    if fl & X.XT_CONNTRACK_STATE:
        # !!(state_mask & statebit) ^ !(invert & STATE)
        cc.emit(E.ld_imm64(R2, d.state_mask), E.alu(E.AND, R1, R2))
        _nz(cc, R1, invert=not (inv & X.XT_CONNTRACK_STATE))
        cc.emit(E.alu(E.OR, E.R9, R1))
    if fl & X.XT_CONNTRACK_DIRECTION:
        # (CTINFO2DIR(ctinfo) == IP_CT_DIR_ORIGINAL) ^ !(invert & DIRECTION); ORIGINAL is
        # ctinfo < IP_CT_IS_REPLY
        cc.emit(E.mov(R1, R4), E.alu(E.SUB, R1, IP_CT_IS_REPLY), E.alu(E.RSH, R1, 63))
        if not inv & X.XT_CONNTRACK_DIRECTION:
            cc.emit(E.alu(E.XOR, R1, 1))
        cc.emit(E.alu(E.OR, E.R8, R1))
    if fl & X.XT_CONNTRACK_STATUS:
        # !!(status_mask & ct->status) ^ !(invert & STATUS)
        cc.emit(E.ldx(E.DW, R1, FP, S_BUF), E.ld_imm64(R2, d.status_mask), E.alu(E.AND, R1, R2))
        _nz(cc, R1, invert=not (inv & X.XT_CONNTRACK_STATUS))
        cc.emit(E.alu(E.OR, E.R8, R1))
    orig = X.XT_CONNTRACK_ORIGSRC | X.XT_CONNTRACK_ORIGDST | X.XT_CONNTRACK_PROTO \
        | X.XT_CONNTRACK_ORIGSRC_PORT | X.XT_CONNTRACK_ORIGDST_PORT
    repl = X.XT_CONNTRACK_REPLSRC | X.XT_CONNTRACK_REPLDST | X.XT_CONNTRACK_REPLSRC_PORT \
        | X.XT_CONNTRACK_REPLDST_PORT
    for direction, flags in ((0, orig), (1, repl)):
        if fl & flags:
            _ct_tuple_checks(cc, d, rev, direction)
    if fl & X.XT_CONNTRACK_EXPIRES:
        _ct_expires(cc, d)
    # mismatch = r9 | (has_ct ? r8 : !(match_flags & STATE))
    no_ct = 0 if fl & X.XT_CONNTRACK_STATE else 1
    f = skb_facts(cc)
    cc.emit(E.ldx(E.DW, R3, R7, f["nfct"]), E.alu(E.RSH, R3, 3))
    _nz(cc, R3)                                           # r3 = has ct
    cc.emit(E.mov(R1, no_ct), E.alu(E.SUB, E.R8, R1), E.alu(E.MUL, E.R8, R3),
            E.alu(E.ADD, E.R8, R1), E.alu(E.OR, E.R9, E.R8), E.mov(R1, E.R9))
    cc._acc()


# ------------------------------------------------------------------------------ owner
TCP_NEW_SYN_RECV = 12
_OWNER_PATHS = {"sk": ("sk_buff", "sk"), "state": ("sock", "__sk_common.skc_state"),
                "listener": ("request_sock", "__req_common.skc_listener"),
                "socket": ("sock", "sk_socket"), "sknet": ("sock", "__sk_common.skc_net"),
                "file": ("socket", "file"), "cred": ("file", "f_cred"),
                "fsuid": ("cred", "fsuid"), "fsgid": ("cred", "fsgid"),
                "net": ("nf_hook_state", "net"), "dev": ("sk_buff", "dev"),
                "devnet": ("net_device", "nd_net")}
_OWNER_FAKE = dict(sk=24, state=18, listener=96, socket=288, sknet=48, file=16, cred=48,
                   fsuid=32, fsgid=36, net=32, dev=16, devnet=264)


@functools.lru_cache(maxsize=None)
def _owner_facts(fake: bool) -> dict:
    if fake:
        return _OWNER_FAKE
    from . import btf
    return {k: btf.member_offset(*v) for k, v in _OWNER_PATHS.items()}


def _peek(cc, dst: int, size: int, base_slot: int = None, base_reg=None, off: int = 0):
    """fp[dst] = size bytes at (base + off) via bpf_probe_read_kernel (zeros on a fault, so a
    NULL base reads as 0); the slot is zeroed first so a short read leaves a clean u64."""
    cc.emit(E.st(E.DW, FP, dst, 0))
    if base_slot is not None:
        cc.emit(E.ldx(E.DW, R3, FP, base_slot))
    else:
        cc.emit(E.mov(R3, base_reg))
    cc.emit(E.alu(E.ADD, R3, off), E.mov(R1, FP), E.alu(E.ADD, R1, dst), E.mov(R2, size),
            E.call(BPF_FUNC_probe_read_kernel))


def _owner(cc, d, fail, hot):
    """xt_owner.c owner_mt() on the skb's full socket (skb_to_full_sk: a request socket stands
    for its listener): without a socket (or one of another netns) it matches iff
    (match ^ invert) == 0; ! --socket-exists fails on a socket; without a file it matches iff
    no uid/gid test is asked for; then fsuid/fsgid of the file's credentials in uid_min..uid_max
    / gid_min..gid_max, each ^ !invert. Ids are compared as given: the netns belongs to the
    initial user namespace, where make_kuid() is the identity (owner_check() refuses the rest)."""
    from .compile import KernelFacts, S_BUF
    if d.match & X.XT_OWNER_SUPPL_GROUPS:
        raise BpfilterError(errno.EOPNOTSUPP, "owner --suppl-groups is not supported by the "
                                              "compiler")
    f = _owner_facts(cc.facts == KernelFacts.fake())
    SK, SOCK, TMP, NET, FILP = S_BUF, S_BUF + 8, S_BUF + 16, S_BUF + 24, S_BUF + 32
    _flush(cc, fail)
    _kern_skb(cc, fail)
    nosock, nofile, done = cc.label("owner_nosock"), cc.label("owner_nofile"), \
        cc.label("owner_done")
    full = cc.label("owner_full")
    _peek(cc, SK, 8, base_reg=R7, off=f["sk"])                    # skb->sk
    _peek(cc, TMP, 1, base_slot=SK, off=f["state"])               # sk->sk_state
    cc.emit(E.ldx(E.DW, R1, FP, TMP), E.jmp(E.JNE, R1, TCP_NEW_SYN_RECV, full))
    _peek(cc, SK, 8, base_slot=SK, off=f["listener"])             # inet_reqsk(sk)->rsk_listener
    cc.emit(Label(full), E.ldx(E.DW, R1, FP, SK), E.jmp(E.JEQ, R1, 0, nosock))
    _peek(cc, SOCK, 8, base_slot=SK, off=f["socket"])             # sk->sk_socket
    cc.emit(E.ldx(E.DW, R1, FP, SOCK), E.jmp(E.JEQ, R1, 0, nosock))
    if cc.fl.name == "tc":
        # xt_net(par) is the hook's netns: at tc egress, the device's (dev_net(skb->dev))
        cc.emit(E.ldx(E.DW, R4, R7, f["dev"], "skb->dev"))
        _peek(cc, NET, 8, base_reg=R4, off=f["devnet"])           # dev->nd_net.net
    else:
        cc.emit(E.ldx(E.DW, R4, R6, cc.facts.nf_ctx_state, "ctx->state"))
        _peek(cc, NET, 8, base_reg=R4, off=f["net"])              # state->net
    _peek(cc, TMP, 8, base_slot=SK, off=f["sknet"])               # sock_net(sk)
    cc.emit(E.ldx(E.DW, R1, FP, NET), E.ldx(E.DW, R2, FP, TMP), E.jmp(E.JNE, R1, R2, nosock))
    if d.match & d.invert & X.XT_OWNER_SOCKET:
        cc.emit(E.mov(E.R9, 1, comment="! --socket-exists with a socket"), E.ja(done))
    _peek(cc, FILP, 8, base_slot=SOCK, off=f["file"])             # sk->sk_socket->file
    cc.emit(E.ldx(E.DW, R1, FP, FILP), E.jmp(E.JEQ, R1, 0, nofile))
    _peek(cc, TMP, 8, base_slot=FILP, off=f["cred"])              # filp->f_cred
    _peek(cc, NET, 4, base_slot=TMP, off=f["fsuid"])              # (reuses the slot)
    _peek(cc, FILP, 4, base_slot=TMP, off=f["fsgid"])
    cc.emit(E.mov(E.R9, 0))
    for flag, lo, hi, slot in ((X.XT_OWNER_UID, d.uid_min, d.uid_max, NET),
                               (X.XT_OWNER_GID, d.gid_min, d.gid_max, FILP)):
        if d.match & flag:
            # mismatch = in_range ^ !(invert & flag) = outside ^ !!(invert & flag)
            cc.emit(E.ldx(E.DW, R1, FP, slot))
            _outside(cc, R1, R1, lo, hi)
            if d.invert & flag:
                cc.emit(E.alu(E.XOR, R1, 1))
            cc.emit(E.alu(E.OR, E.R9, R1))
    cc.emit(E.ja(done),
            Label(nosock), E.mov(E.R9, int((d.match ^ d.invert) != 0), comment="no socket"),
            E.ja(done),
            Label(nofile), E.mov(E.R9, int(((d.match ^ d.invert)
                                            & (X.XT_OWNER_UID | X.XT_OWNER_GID)) != 0),
                                 comment="no file"),
            Label(done), E.mov(R1, E.R9))
    cc._acc()


# ------------------------------------------------------------------------------ mac
ARPHRD_ETHER, ETH_HLEN = 1, 14
_MAC_PATHS = {"dev": ("sk_buff", "dev"), "head": ("sk_buff", "head"),
              "data": ("sk_buff", "data"), "mac_header": ("sk_buff", "mac_header"),
              "type": ("net_device", "type")}
_MAC_FAKE = dict(dev=16, head=192, data=200, mac_header=182, type=536)


@functools.lru_cache(maxsize=None)
def _mac_facts(fake: bool) -> dict:
    if fake:
        return _MAC_FAKE
    from . import btf
    return {k: btf.member_offset(*v) for k, v in _MAC_PATHS.items()}


def _mac(cc, d, fail, hot):
    """xt_mac.c mac_mt(): an Ethernet device, a MAC header that lies between skb->head and
    skb->data - ETH_HLEN, and eth_hdr(skb)->h_source equal to srcaddr, ^ invert. The header
    bytes are read with bpf_probe_read_kernel (the dynptr starts at the network header)."""
    from .compile import KernelFacts, S_BUF
    if cc.fl.name != "nf":
        return _mac_l2(cc, d, fail)
    f = _mac_facts(cc.facts == KernelFacts.fake())
    DEV, MAC = S_BUF, S_BUF + 8
    _flush(cc, fail)
    out, done = cc.label("mac_no"), cc.label("mac_done")
    cc.emit(E.ldx(E.DW, R4, R7, f["dev"], "skb->dev"))
    _peek(cc, DEV, 2, base_reg=R4, off=f["type"])                 # skb->dev->type (0: no dev)
    cc.emit(E.ldx(E.DW, R1, FP, DEV), E.jmp(E.JNE, R1, ARPHRD_ETHER, out),
            E.ldx(E.DW, R3, R7, f["head"], "skb->head"),
            E.ldx(E.H, R1, R7, f["mac_header"], "skb->mac_header"),
            E.alu(E.ADD, R3, R1, comment="skb_mac_header()"),
            E.mov(R1, R3), E.alu(E.ADD, R1, ETH_HLEN),
            E.ldx(E.DW, R2, R7, f["data"], "skb->data"),
            E.jmp(E.JGT, R1, R2, out, comment="mac header + ETH_HLEN > data"),
            E.alu(E.ADD, R3, 6, comment="h_source"))
    _peek(cc, MAC, 6, base_reg=R3)
    want = int.from_bytes(d.srcaddr, "little")
    cc.emit(E.ldx(E.DW, R1, FP, MAC), E.ld_imm64(R2, want), E.alu(E.XOR, R1, R2))
    _nz(cc, R1, invert=bool(d.invert))
    cc.emit(E.ja(done), Label(out), E.mov(R1, 1, comment="not Ethernet: no match"),
            Label(done))
    cc._acc()


def _mac_l2(cc, d, fail):
    """mac_mt() on tc/xdp, which see the Ethernet frame: h_source is the 6 bytes 8 before the
    network header. Loopback (ifindex 1 in every netns; ARPHRD_LOOPBACK, not ARPHRD_ETHER)
    never matches, as in the kernel."""
    _flush(cc, fail)
    out, done = cc.label("mac_no"), cc.label("mac_done")
    idx = SKB_IFINDEX if cc.fl.name == "tc" else XDP_INGRESS_IFINDEX
    cc.emit(E.ldx(E.W, R1, R6, idx, "ingress ifindex"),
            E.jmp(E.JEQ, R1, LOOPBACK_IFINDEX, out, comment="loopback is not Ethernet"),
            *cc._slice(E.mov(R2, -8), 6), E.jmp(E.JEQ, R0, 0, out),
            E.ldx(E.W, R1, R0, 0, "h_source[0..3]"), E.ldx(E.H, R2, R0, 4, "h_source[4..5]"),
            E.alu(E.LSH, R2, 32), E.alu(E.OR, R1, R2),
            E.ld_imm64(R2, int.from_bytes(d.srcaddr, "little")), E.alu(E.XOR, R1, R2))
    _nz(cc, R1, invert=bool(d.invert))
    cc.emit(E.ja(done), Label(out), E.mov(R1, 1, comment="not Ethernet: no match"),
            Label(done))
    cc._acc()


# ------------------------------------------------------------------------------ limit
BPF_FUNC_jiffies64 = 118
BPF_MAP_TYPE_ARRAY = 2
BPF_CMPXCHG = 0xf0 | 0x01          # BPF_CMPXCHG includes BPF_FETCH: r0 gets the old value
LIMIT_TRIES = 4


def _hooks_reaching(table, chain_name: str) -> list:
    """Names of the built-in chains from which `chain_name` is reached (through jumps/gotos)."""
    from .model import Jump
    by_name = {c.name: c for c in table.chains}
    out = []
    for top in table.chains:
        if not top.builtin:
            continue
        seen, todo = set(), [top.name]
        while todo:
            name = todo.pop()
            if name in seen or name not in by_name:
                continue
            seen.add(name)
            for r in by_name[name].rules:
                if isinstance(r.target, Jump):
                    todo.append(r.target.chain)
        if chain_name in seen:
            out.append(top.name)
    return out


def _cmpxchg(dst, src, off=0):
    return E.Insn(E.BPF_STX | E.DW | E.BPF_ATOMIC, dst, src, off, BPF_CMPXCHG,
                  comment="r0 = cmpxchg(*(u64 *)(dst + off), r0, src)")


def _limit(cc, d, fail, hot, index: int):
    """xt_limit.c limit_mt(): a token bucket per rule, credit += elapsed jiffies *
    CREDITS_PER_JIFFY (u32 arithmetic), capped at credit_cap; a packet matches when it can pay
    `cost`. The kernel holds a spin lock; here the state is one u64 (prev jiffies in the high
    half, credit in the low half) updated with cmpxchg, retried LIMIT_TRIES times (a packet that
    loses every race is treated as over the limit). prev == 0 means "no packet yet": the bucket
    starts full, as limit_mt_check() fills it. Elapsed time is taken modulo 2^32 jiffies."""
    from .compile import S_BUF, S_KEY
    from .classify import MapSpec
    hz = X.kernel_hz()
    cap, cost = X.limit_params(d.avg, d.burst, hz)
    cpj = X.credits_per_jiffy(hz)
    name = f"limit_{index}"
    maps = cc.__dict__.setdefault("cls_maps", {})
    maps[name] = MapSpec(name, BPF_MAP_TYPE_ARRAY, 4, 8, [(bytes(4), cap.to_bytes(8, "little"))],
                         kname="bpfilter_limit")
    _flush(cc, fail)
    done = cc.label("limit_done")
    cc.emit(E.st(E.W, FP, S_KEY, 0, f"limit avg {d.avg} burst {d.burst}: cap {cap} cost {cost}"),
            E.ld_map_fd(R1, name), E.mov(R2, FP), E.alu(E.ADD, R2, S_KEY),
            E.call(E.BPF_FUNC_map_lookup_elem), E.jmp(E.JEQ, R0, 0, fail),
            E.mov(E.R8, R0, comment="r8 = the rule's bucket"),
            E.call(BPF_FUNC_jiffies64), E.mov(R0, R0, bits=32), E.stx(E.DW, FP, S_BUF, R0))
    for k in range(LIMIT_TRIES):
        noadd, nocap = cc.label("limit_noadd"), cc.label("limit_nocap")
        over, build = cc.label("limit_short"), cc.label("limit_build")
        cc.emit(E.ldx(E.DW, E.R9, E.R8, 0, f"try {k + 1}: r9 = old state"),
                E.ldx(E.DW, R3, FP, S_BUF, "r3 = now (low 32 bits)"),
                E.mov(R1, E.R9), E.alu(E.RSH, R1, 32, comment="r1 = prev"),
                E.mov(R2, E.R9, bits=32, comment="r2 = credit"),
                E.jmp(E.JEQ, R1, 0, noadd),
                E.mov(R4, R3), E.alu(E.SUB, R4, R1), E.alu(E.MUL, R4, cpj),
                E.alu(E.ADD, R2, R4), E.mov(R2, R2, bits=32, comment="u32 credit"),
                Label(noadd),
                E.ld_imm64(R4, cap), E.jmp(E.JLE, R2, R4, nocap), E.mov(R2, R4),
                Label(nocap),
                E.ld_imm64(R4, cost), E.jmp(E.JLT, R2, R4, over),
                E.alu(E.SUB, R2, R4), E.mov(E.R5, 0), E.ja(build),
                Label(over), E.mov(E.R5, 1),
                Label(build), E.alu(E.LSH, R3, 32), E.alu(E.OR, R3, R2),
                E.mov(R0, E.R9), _cmpxchg(E.R8, R3),
                E.jmp(E.JEQ, R0, E.R9, done))
    cc.emit(E.mov(E.R5, 1, comment="lost every race: over the limit"),
            Label(done), E.mov(R1, E.R5))
    cc._acc()


# ------------------------------------------------------------------------------ conntrack on/off
CT_TABLE = "bpfilter_conntrack"


def conntrack_ref(enable: bool, family: str = "ip"):
    """Make the kernel track this namespace's connections (or stop asking for it).

    The kernel's xt_conntrack/xt_state checkentry calls nf_ct_netns_get(), which registers the
    conntrack (and defrag) hooks of the netns. bpfilter asks the same way through the kernel's own
    mechanism: an nftables table whose one non-base chain holds a `ct state` expression;
    nft_ct_get_init() calls nf_ct_netns_get() and, having no hook, the chain never sees a
    packet. Deleting the table puts the reference back (nf_ct_netns_put)."""
    table = f"{family} {CT_TABLE}"
    if enable:
        # one transaction, idempotent: the new rule takes its reference before the old table's
        # is put back, so tracking never stops in between
        text = (f"table {table} {{}}\ndelete table {table}\n"
                f"table {table} {{\n chain ct_ref {{\n  ct state established\n }}\n}}\n")
        p = subprocess.run(["nft", "-f", "-"], input=text, text=True, capture_output=True)
        if p.returncode != 0:
            raise BpfilterError(errno.EOPNOTSUPP, f"cannot enable conntrack through nftables: "
                                                  f"{p.stderr.strip()}")
    else:
        subprocess.run(["nft", "delete", "table", *table.split()], capture_output=True)
