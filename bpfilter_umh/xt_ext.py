"""The xtables extensions people use (issue #6): payload codecs, the kernel's checkentry rules and
registry entries for the matches multiport, iprange, mac, mark, length, ttl, hl, comment,
addrtype, limit, pkttype, tos, dscp, owner, conntrack, state, the IPv6 extension-header matches
frag, hbh, dst, rt, ah (netfilter_ipv6/ip6t_*.h) and the targets REJECT, LOG, MARK.

Struct layouts are include/uapi/linux/netfilter/xt_*.h (and netfilter_ipv4/ipt_*.h) on x86_64
(native byte order, unsigned long = 8 bytes); `size` is the kernel's matchsize/targetsize, whose
XT_ALIGN() xt_check_match()/xt_check_target() compare with the payload length.

Each check(rule, family, data) mirrors the extension's checkentry in the kernel and raises the
errno it returns. Checks that depend on the hooks reaching the rule (xt_check_match()'s
`hooks` mask: mac, owner; addrtype's interface limits) need the entry's comefrom, which the
codec's check hook does not get: the compiler applies them per hook instead (matchers.py
hook_check), with the same errno, since it compiles every rule once per hook that reaches it.

`compiled=True` is set by matchers.py (COMPILED) for the revisions the compiler translates
exactly; GET_REVISION (sockopt.supported_revisions) answers from that flag.
"""
from __future__ import annotations

import errno
import functools
import gzip

from construct import Array, Bytes, Int8ul, Int16ub, Int16ul, Int32sl, Int32ul, Padding, Struct

from .errors import BpfilterError
from .extensions import MATCH, TARGET, Extension, register
from .uapi import IPPROTO_TCP, NFPROTO_IPV4, NFPROTO_IPV6

BOTH = (NFPROTO_IPV4, NFPROTO_IPV6)
V4 = (NFPROTO_IPV4,)
V6 = (NFPROTO_IPV6,)
XT_INV_PROTO = 0x40
IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP = 17, 33, 132


def _fail(code, rule, what):
    raise BpfilterError(code, f"entry at offset {rule.offset}: {what}")


# ---------------------------------------------------------------- multiport (xt_multiport.h)
XT_MULTIPORT_SOURCE, XT_MULTIPORT_DESTINATION, XT_MULTIPORT_EITHER = 0, 1, 2
XT_MULTI_PORTS = 15
xt_multiport = Struct("flags" / Int8ul, "count" / Int8ul,
                      "ports" / Array(XT_MULTI_PORTS, Int16ul))                       # 32
xt_multiport_v1 = Struct("flags" / Int8ul, "count" / Int8ul,
                         "ports" / Array(XT_MULTI_PORTS, Int16ul),
                         "pflags" / Array(XT_MULTI_PORTS, Int8ul), "invert" / Int8ul)  # 48


def _multiport_check(rule, family, data):
    # xt_multiport.c check(): a protocol with ports, not inverted, a known direction, count <= 15
    proto = rule.ip.proto
    if proto not in (IPPROTO_TCP, IPPROTO_UDP, 136, IPPROTO_SCTP, IPPROTO_DCCP) \
            or rule.ip.invflags & XT_INV_PROTO:
        _fail(errno.EINVAL, rule, "multiport needs -p tcp, udp, udplite, sctp or dccp "
                                  "(not inverted)")
    if data.flags not in (XT_MULTIPORT_SOURCE, XT_MULTIPORT_DESTINATION, XT_MULTIPORT_EITHER):
        _fail(errno.EINVAL, rule, f"multiport: flags {data.flags} is no direction")
    if data.count > XT_MULTI_PORTS:
        _fail(errno.EINVAL, rule, f"multiport: count {data.count} > XT_MULTI_PORTS")


# ---------------------------------------------------------------- iprange (xt_iprange.h)
IPRANGE_SRC, IPRANGE_DST, IPRANGE_SRC_INV, IPRANGE_DST_INV = 0x01, 0x02, 0x10, 0x20
xt_iprange_mtinfo = Struct("src_min" / Bytes(16), "src_max" / Bytes(16), "dst_min" / Bytes(16),
                           "dst_max" / Bytes(16), "flags" / Int8ul, Padding(3))       # 68

# ---------------------------------------------------------------- mac (xt_mac.h)
xt_mac_info = Struct("srcaddr" / Bytes(6), Padding(2), "invert" / Int32sl)           # 12

# ---------------------------------------------------------------- mark (xt_mark.h)
xt_mark_mtinfo1 = Struct("mark" / Int32ul, "mask" / Int32ul, "invert" / Int8ul, Padding(3))  # 12
xt_mark_tginfo2 = Struct("mark" / Int32ul, "mask" / Int32ul)                         # 8

# ---------------------------------------------------------------- length (xt_length.h)
xt_length_info = Struct("min" / Int16ul, "max" / Int16ul, "invert" / Int8ul, Padding(1))  # 6

# ---------------------------------------------------------------- ttl / hl (ipt_ttl.h, ip6t_hl.h)
IPT_TTL_EQ, IPT_TTL_NE, IPT_TTL_LT, IPT_TTL_GT = 0, 1, 2, 3
ipt_ttl_info = Struct("mode" / Int8ul, "ttl" / Int8ul)                               # 2
ip6t_hl_info = Struct("mode" / Int8ul, "hop_limit" / Int8ul)                         # 2

# ---------------------------------------------------------------- comment (xt_comment.h)
XT_MAX_COMMENT_LEN = 256
xt_comment_info = Struct("comment" / Bytes(XT_MAX_COMMENT_LEN))                      # 256

# ---------------------------------------------------------------- addrtype (xt_addrtype.h)
XT_ADDRTYPE_INVERT_SOURCE, XT_ADDRTYPE_INVERT_DEST = 0x1, 0x2
XT_ADDRTYPE_LIMIT_IFACE_IN, XT_ADDRTYPE_LIMIT_IFACE_OUT = 0x4, 0x8
XT_ADDRTYPE_BROADCAST, XT_ADDRTYPE_BLACKHOLE, XT_ADDRTYPE_PROHIBIT = 1 << 3, 1 << 6, 1 << 8
xt_addrtype_info_v1 = Struct("source" / Int16ul, "dest" / Int16ul, "flags" / Int32ul)  # 8
xt_addrtype_info = Struct("source" / Int16ul, "dest" / Int16ul, "invert_source" / Int32ul,
                          "invert_dest" / Int32ul)                                   # 12


def _addrtype_v1_check(rule, family, data):
    # xt_addrtype.c addrtype_mt_checkentry_v1(); the hook-dependent part is matchers.hook_check
    if data.flags & XT_ADDRTYPE_LIMIT_IFACE_IN and data.flags & XT_ADDRTYPE_LIMIT_IFACE_OUT:
        _fail(errno.EINVAL, rule, "addrtype: both incoming and outgoing interface limitation")
    if family == NFPROTO_IPV6:
        types = data.source | data.dest
        if types & XT_ADDRTYPE_BLACKHOLE or types >= XT_ADDRTYPE_PROHIBIT \
                or types & XT_ADDRTYPE_BROADCAST:
            _fail(errno.EINVAL, rule, "addrtype: BLACKHOLE, PROHIBIT and above, BROADCAST are "
                                      "not supported for IPv6")


# ---------------------------------------------------------------- limit (xt_limit.h)
XT_LIMIT_SCALE = 10000
HZ = 250          # CONFIG_HZ of the kernel whose arithmetic is mirrored (see limit_params)
xt_rateinfo = Struct("avg" / Int32ul, "burst" / Int32ul, "prev" / Bytes(8), "credit" / Int32ul,
                     "credit_cap" / Int32ul, "cost" / Int32ul, Padding(4),
                     "master" / Bytes(8))                                            # 40


@functools.lru_cache(maxsize=None)
def kernel_hz() -> int:
    """CONFIG_HZ of the running kernel: xt_limit's arithmetic depends on it (HZ if unknown)."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=")[1])
    except OSError:
        pass
    return HZ


def credits_per_jiffy(hz: int = HZ) -> int:
    """xt_limit.c CREDITS_PER_JIFFY: the power of two below MAX_CPJ = 0xFFFFFFFF/(HZ*60*60*24)."""
    max_cpj = 0xFFFFFFFF // (hz * 60 * 60 * 24)
    return 1 << (max_cpj.bit_length() - 1)


def user2credits(user: int, hz: int = HZ) -> int:
    """xt_limit.c user2credits(): u32 arithmetic, dividing first when multiplying would overflow."""
    cpj = credits_per_jiffy(hz)
    if user > 0xFFFFFFFF // (hz * cpj):
        return ((user // XT_LIMIT_SCALE) * hz * cpj) & 0xFFFFFFFF
    return ((user * hz * cpj) & 0xFFFFFFFF) // XT_LIMIT_SCALE


def limit_params(avg: int, burst: int, hz: int = HZ) -> tuple:
    """(credit_cap, cost) as limit_mt_check() computes them: the full bucket and one packet."""
    return user2credits((avg * burst) & 0xFFFFFFFF, hz), user2credits(avg, hz)


def _limit_check(rule, family, data):
    # xt_limit.c limit_mt_check(): avg * burst is u32 arithmetic, so an overflow shows as fewer
    # credits for the bucket than for one packet
    hz = kernel_hz()
    if data.burst == 0 or user2credits((data.avg * data.burst) & 0xFFFFFFFF, hz) \
            < user2credits(data.avg, hz):
        _fail(errno.ERANGE, rule, f"limit: overflow, try lower: {data.avg}/{data.burst}")


# ---------------------------------------------------------------- pkttype (xt_pkttype.h)
xt_pkttype_info = Struct("pkttype" / Int32sl, "invert" / Int32sl)                    # 8

# ---------------------------------------------------------------- tos / dscp (xt_dscp.h)
XT_DSCP_MAX = 0x3f
xt_dscp_info = Struct("dscp" / Int8ul, "invert" / Int8ul)                            # 2
xt_tos_match_info = Struct("tos_mask" / Int8ul, "tos_value" / Int8ul, "invert" / Int8ul)  # 3


def _dscp_check(rule, family, data):
    # xt_dscp.c dscp_mt_check(): -EDOM, not -EINVAL
    if data.dscp > XT_DSCP_MAX:
        _fail(errno.EDOM, rule, f"dscp {data.dscp:#x} out of range (max {XT_DSCP_MAX:#x})")


# ---------------------------------------------------------------- owner (xt_owner.h)
XT_OWNER_UID, XT_OWNER_GID, XT_OWNER_SOCKET, XT_OWNER_SUPPL_GROUPS = 0x1, 0x2, 0x4, 0x8
XT_OWNER_MASK = XT_OWNER_UID | XT_OWNER_GID | XT_OWNER_SOCKET | XT_OWNER_SUPPL_GROUPS
xt_owner_match_info = Struct("uid_min" / Int32ul, "uid_max" / Int32ul, "gid_min" / Int32ul,
                             "gid_max" / Int32ul, "match" / Int8ul, "invert" / Int8ul,
                             Padding(2))                                             # 20


def _owner_check(rule, family, data):
    # xt_owner.c owner_check(): known flags; ids must map in the netns' user namespace (the
    # initial one here: (uid_t)-1 is the only invalid id) and min <= max
    if data.match & ~XT_OWNER_MASK:
        _fail(errno.EINVAL, rule, f"owner: unknown match flags {data.match:#x}")
    for flag, lo, hi, what in ((XT_OWNER_UID, data.uid_min, data.uid_max, "uid"),
                               (XT_OWNER_GID, data.gid_min, data.gid_max, "gid")):
        if data.match & flag and (lo == 0xFFFFFFFF or hi == 0xFFFFFFFF or hi < lo):
            _fail(errno.EINVAL, rule, f"owner: {what} range {lo}-{hi} invalid")


# ---------------------------------------------------------------- conntrack / state
XT_CONNTRACK_STATE, XT_CONNTRACK_PROTO = 1 << 0, 1 << 1
XT_CONNTRACK_ORIGSRC, XT_CONNTRACK_ORIGDST = 1 << 2, 1 << 3
XT_CONNTRACK_REPLSRC, XT_CONNTRACK_REPLDST = 1 << 4, 1 << 5
XT_CONNTRACK_STATUS, XT_CONNTRACK_EXPIRES = 1 << 6, 1 << 7
XT_CONNTRACK_ORIGSRC_PORT, XT_CONNTRACK_ORIGDST_PORT = 1 << 8, 1 << 9
XT_CONNTRACK_REPLSRC_PORT, XT_CONNTRACK_REPLDST_PORT = 1 << 10, 1 << 11
XT_CONNTRACK_DIRECTION, XT_CONNTRACK_STATE_ALIAS = 1 << 12, 1 << 13

def _ct_head(port):
    # ports: __be16 (network order) in revisions 1 and 2; revision 3 keeps them, and the *_high
    # ends, in host order (libxt_conntrack conntrack3_mt_parse; xt_conntrack.c port_match())
    return ("origsrc_addr" / Bytes(16), "origsrc_mask" / Bytes(16),
            "origdst_addr" / Bytes(16), "origdst_mask" / Bytes(16),
            "replsrc_addr" / Bytes(16), "replsrc_mask" / Bytes(16),
            "repldst_addr" / Bytes(16), "repldst_mask" / Bytes(16),
            "expires_min" / Int32ul, "expires_max" / Int32ul, "l4proto" / Int16ul,
            "origsrc_port" / port, "origdst_port" / port,
            "replsrc_port" / port, "repldst_port" / port,
            "match_flags" / Int16ul, "invert_flags" / Int16ul)


xt_conntrack_mtinfo1 = Struct(*_ct_head(Int16ub), "state_mask" / Int8ul,
                              "status_mask" / Int8ul)                                    # 152
xt_conntrack_mtinfo2 = Struct(*_ct_head(Int16ub), "state_mask" / Int16ul,
                              "status_mask" / Int16ul, Padding(2))                       # 156
xt_conntrack_mtinfo3 = Struct(*_ct_head(Int16ul), "state_mask" / Int16ul,
                              "status_mask" / Int16ul,
                              "origsrc_port_high" / Int16ul, "origdst_port_high" / Int16ul,
                              "replsrc_port_high" / Int16ul, "repldst_port_high" / Int16ul,
                              Padding(2))                                                # 164
xt_state_info = Struct("statemask" / Int32ul)                                            # 4

# ------------------------------------------- IPv6 extension headers (netfilter_ipv6/ip6t_*.h)
IP6T_FRAG_IDS, IP6T_FRAG_LEN, IP6T_FRAG_RES, IP6T_FRAG_FST, IP6T_FRAG_MF, IP6T_FRAG_NMF = \
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20
IP6T_FRAG_INV_IDS, IP6T_FRAG_INV_LEN, IP6T_FRAG_INV_MASK = 0x01, 0x02, 0x03
ip6t_frag = Struct("ids" / Array(2, Int32ul), "hdrlen" / Int32ul, "flags" / Int8ul,
                   "invflags" / Int8ul, Padding(2))                                  # 16

IP6T_OPTS_LEN, IP6T_OPTS_OPTS, IP6T_OPTS_NSTRICT = 0x01, 0x02, 0x04
IP6T_OPTS_INV_LEN, IP6T_OPTS_INV_MASK = 0x01, 0x01
IP6T_OPTS_OPTSNR = 16
ip6t_opts = Struct("hdrlen" / Int32ul, "flags" / Int8ul, "invflags" / Int8ul,
                   "opts" / Array(IP6T_OPTS_OPTSNR, Int16ul), "optsnr" / Int8ul,
                   Padding(1))                                                       # 40

IP6T_RT_TYP, IP6T_RT_SGS, IP6T_RT_LEN, IP6T_RT_RES = 0x01, 0x02, 0x04, 0x08
IP6T_RT_FST_MASK, IP6T_RT_FST, IP6T_RT_FST_NSTRICT = 0x30, 0x10, 0x20
IP6T_RT_INV_TYP, IP6T_RT_INV_SGS, IP6T_RT_INV_LEN, IP6T_RT_INV_MASK = 0x01, 0x02, 0x04, 0x07
IP6T_RT_HOPS = 16
ip6t_rt = Struct("rt_type" / Int32ul, "segsleft" / Array(2, Int32ul), "hdrlen" / Int32ul,
                 "flags" / Int8ul, "invflags" / Int8ul, Padding(2),
                 "addrs" / Array(IP6T_RT_HOPS, Bytes(16)), "addrnr" / Int8ul,
                 Padding(3))                                                         # 280

IP6T_AH_SPI, IP6T_AH_LEN, IP6T_AH_RES = 0x01, 0x02, 0x04
IP6T_AH_INV_SPI, IP6T_AH_INV_LEN, IP6T_AH_INV_MASK = 0x01, 0x02, 0x03
ip6t_ah = Struct("spis" / Array(2, Int32ul), "hdrlen" / Int32ul, "hdrres" / Int8ul,
                 "invflags" / Int8ul, Padding(2))                                    # 16


def _invmask_check(what, mask):
    # frag_mt6_check(), ah_mt6_check(): unknown inversion flags are -EINVAL
    def check(rule, family, data):
        if data.invflags & ~mask:
            _fail(errno.EINVAL, rule, f"{what}: unknown invflags {data.invflags:#x}")
    return check


def _opts_check(rule, family, data):
    # ip6t_hbh.c hbh_mt6_check() (hbh and dst)
    if data.invflags & ~IP6T_OPTS_INV_MASK:
        _fail(errno.EINVAL, rule, f"hbh/dst: unknown invflags {data.invflags:#x}")
    if data.flags & IP6T_OPTS_NSTRICT:
        _fail(errno.EINVAL, rule, "hbh/dst: non-strict option matching is not implemented "
                                  "by the kernel")


def _rt_check(rule, family, data):
    # ip6t_rt.c rt_mt6_check(): --rt-0-* needs `--rt-type 0` (not inverted)
    if data.invflags & ~IP6T_RT_INV_MASK:
        _fail(errno.EINVAL, rule, f"rt: unknown invflags {data.invflags:#x}")
    if data.flags & (IP6T_RT_RES | IP6T_RT_FST_MASK) and (
            not data.flags & IP6T_RT_TYP or data.rt_type != 0
            or data.invflags & IP6T_RT_INV_TYP):
        _fail(errno.EINVAL, rule, "rt: `--rt-type 0' required before `--rt-0-*'")


# ---------------------------------------------------------------- REJECT (ipt_REJECT.h)
IPT_REJECT_WITH = ("icmp-net-unreachable", "icmp-host-unreachable", "icmp-proto-unreachable",
                   "icmp-port-unreachable", "icmp-echo-reply", "icmp-net-prohibited",
                   "icmp-host-prohibited", "tcp-reset", "icmp-admin-prohibited")
IPT_ICMP_ECHOREPLY, IPT_TCP_RESET = 4, 7
ipt_reject_info = Struct("with" / Int32ul)                                           # 4


def _reject_check(rule, family, data):
    # net/ipv4/netfilter/ipt_REJECT.c reject_tg_check()
    if data["with"] == IPT_ICMP_ECHOREPLY:
        _fail(errno.EINVAL, rule, "REJECT: ECHOREPLY no longer supported")
    if data["with"] == IPT_TCP_RESET and (rule.ip.proto != IPPROTO_TCP
                                           or rule.ip.invflags & XT_INV_PROTO):
        _fail(errno.EINVAL, rule, "REJECT: TCP_RESET invalid for non-tcp")


# ip6t_REJECT.h: the same struct, enum ip6t_reject_with
IP6T_ICMP6_ECHOREPLY, IP6T_TCP_RESET = 5, 6
IP6T_F_PROTO = 0x01


def _reject6_check(rule, family, data):
    # net/ipv6/netfilter/ip6t_REJECT.c reject_tg6_check(): the protocol counts only with
    # IP6T_F_PROTO (ip6t_ip6.flags)
    if data["with"] == IP6T_ICMP6_ECHOREPLY:
        _fail(errno.EINVAL, rule, "REJECT: ECHOREPLY is not supported")
    if data["with"] == IP6T_TCP_RESET and (not rule.ip.flags & IP6T_F_PROTO
                                            or rule.ip.proto != IPPROTO_TCP
                                            or rule.ip.invflags & XT_INV_PROTO):
        _fail(errno.EINVAL, rule, "REJECT: TCP_RESET illegal for non-tcp")


# ---------------------------------------------------------------- LOG (xt_LOG.h)
XT_LOG_TCPSEQ, XT_LOG_TCPOPT, XT_LOG_IPOPT, XT_LOG_UID = 0x01, 0x02, 0x04, 0x08
xt_log_info = Struct("level" / Int8ul, "logflags" / Int8ul, "prefix" / Bytes(30))   # 32


def _log_check(rule, family, data):
    # net/netfilter/xt_LOG.c log_tg_check()
    if data.level >= 8:
        _fail(errno.EINVAL, rule, f"LOG: level {data.level} >= 8")
    if data.prefix[-1] != 0:
        _fail(errno.EINVAL, rule, "LOG: prefix not NUL-terminated")


# ---------------------------------------------------------------- registry
MATCH_NAMES = set()      # every match registered here (matchers.py answers for them)


def _reg(kind, name, rev, fams, size, codec, **kw):
    if kind == MATCH:
        MATCH_NAMES.add(name)
    for fam in fams:      # one entry per family: `compiled` may differ between them
        register(Extension(kind, name, rev, (fam,), size, codec, **kw))


_reg(MATCH, "multiport", 0, BOTH, 32, xt_multiport, check=_multiport_check)
_reg(MATCH, "multiport", 1, BOTH, 48, xt_multiport_v1, check=_multiport_check)
_reg(MATCH, "iprange", 1, BOTH, 68, xt_iprange_mtinfo)
_reg(MATCH, "mac", 0, BOTH, 12, xt_mac_info)
_reg(MATCH, "mark", 1, BOTH, 12, xt_mark_mtinfo1)
_reg(MATCH, "length", 0, BOTH, 6, xt_length_info)
_reg(MATCH, "ttl", 0, V4, 2, ipt_ttl_info)
_reg(MATCH, "hl", 0, V6, 2, ip6t_hl_info)
_reg(MATCH, "comment", 0, BOTH, XT_MAX_COMMENT_LEN, xt_comment_info)
_reg(MATCH, "addrtype", 0, V4, 12, xt_addrtype_info)
_reg(MATCH, "addrtype", 1, BOTH, 8, xt_addrtype_info_v1, check=_addrtype_v1_check)
# usersize: offsetof(struct xt_rateinfo, prev); the rest is the kernel's per-rule bucket
_reg(MATCH, "limit", 0, BOTH, 40, xt_rateinfo, usersize=8, check=_limit_check)
_reg(MATCH, "pkttype", 0, BOTH, 8, xt_pkttype_info)
_reg(MATCH, "dscp", 0, BOTH, 2, xt_dscp_info, check=_dscp_check)
_reg(MATCH, "tos", 1, BOTH, 3, xt_tos_match_info)
_reg(MATCH, "owner", 1, BOTH, 20, xt_owner_match_info, check=_owner_check)
_reg(MATCH, "conntrack", 1, BOTH, 152, xt_conntrack_mtinfo1)
_reg(MATCH, "conntrack", 2, BOTH, 156, xt_conntrack_mtinfo2)
_reg(MATCH, "conntrack", 3, BOTH, 164, xt_conntrack_mtinfo3)
_reg(MATCH, "state", 0, BOTH, 4, xt_state_info)
_reg(MATCH, "frag", 0, V6, 16, ip6t_frag, check=_invmask_check("frag", IP6T_FRAG_INV_MASK))
_reg(MATCH, "hbh", 0, V6, 40, ip6t_opts, check=_opts_check)
_reg(MATCH, "dst", 0, V6, 40, ip6t_opts, check=_opts_check)
_reg(MATCH, "rt", 0, V6, 280, ip6t_rt, check=_rt_check)
_reg(MATCH, "ah", 0, V6, 16, ip6t_ah, check=_invmask_check("ah", IP6T_AH_INV_MASK))
_reg(TARGET, "REJECT", 0, V4, 4, ipt_reject_info, check=_reject_check)
_reg(TARGET, "REJECT", 0, V6, 4, ipt_reject_info, check=_reject6_check)
_reg(TARGET, "LOG", 0, BOTH, 32, xt_log_info, check=_log_check)
_reg(TARGET, "MARK", 2, BOTH, 8, xt_mark_tginfo2)

# (name, revision) of the matches the compiler translates exactly (matchers.py), per family;
# GET_REVISION admits to these revisions only
COMPILED = {("multiport", 0), ("multiport", 1), ("iprange", 1), ("mark", 1), ("length", 0),
            ("ttl", 0), ("comment", 0), ("pkttype", 0), ("tos", 1), ("dscp", 0),
            ("conntrack", 1), ("conntrack", 2), ("conntrack", 3), ("state", 0), ("limit", 0),
            ("owner", 1), ("mac", 0), ("addrtype", 0), ("addrtype", 1)}
# IPv6: the same ones (hl instead of ttl; addrtype has no IPv6 revision 0), plus the
# extension-header matches of ip6tables
COMPILED_V6 = (COMPILED - {("ttl", 0), ("addrtype", 0)}) | {("hl", 0), ("frag", 0), ("hbh", 0), ("dst", 0),
                                          ("rt", 0), ("ah", 0)}


def _mark_compiled():
    from .extensions import _registry
    for (kind, fam, name, rev), e in _registry.items():
        want = COMPILED if fam == NFPROTO_IPV4 else COMPILED_V6
        if kind == MATCH and (name, rev) in want:
            e.compiled = True


_mark_compiled()

# targets the compiler translates (targets.py: REJECT and LOG on flavor nf, MARK on flavor tc).
# GET_REVISION admits to them, or iptables warns "revision 0 not supported" (REJECT, LOG) or gives
# up before SET_REPLACE (MARK's revision 2); on a flavor that cannot carry one out, SET_REPLACE
# refuses naming the rule.
TARGETS_COMPILED = {("REJECT", 0), ("LOG", 0), ("MARK", 2)}


def _mark_targets_compiled():
    from .extensions import _registry
    for (kind, _fam, name, rev), e in _registry.items():
        if kind == TARGET and (name, rev) in TARGETS_COMPILED:
            e.compiled = True


_mark_targets_compiled()
