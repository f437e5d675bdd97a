"""construct mirrors of the kernel's xtables uapi (include/uapi/linux/netfilter/x_tables.h,
netfilter_ipv4/ip_tables.h, netfilter_ipv6/ip6_tables.h). Names are the kernel's, verbatim.

All integers are native-endian, as the kernel copies these structs byte for byte between user
memory and its own (copy_from_sockptr / copy_to_user in ip_tables.c); layouts and sizes below are
those of x86_64 and are asserted at import time.
"""
import ipaddress
import struct

from construct import (Array, Bytes, ExprAdapter, Int8un, Int16un, Int32sn, Int32un, Int64un,
                       Padding, Struct)

# --- x_tables.h ----------------------------------------------------------------------------
XT_FUNCTION_MAXNAMELEN = 30
XT_EXTENSION_MAXNAMELEN = 29
XT_TABLE_MAXNAMELEN = 32
XT_ALIGN_TO = 8          # __alignof__(struct _xt_align): u8, u16, u32, u64 → 8 on x86_64


def XT_ALIGN(n: int) -> int:
    return (n + XT_ALIGN_TO - 1) & ~(XT_ALIGN_TO - 1)


XT_STANDARD_TARGET = ""
XT_ERROR_TARGET = "ERROR"
XT_CONTINUE = 0xFFFFFFFF
XT_RETURN = -5           # NF_REPEAT - 1 ... stored as -(NF_REPEAT) - 1
XT_INV_PROTO = 0x40
# xt_alloc_table_info(): sizeof(struct xt_table_info) + size must stay below this, else ENOMEM
XT_MAX_TABLE_SIZE = 512 * 1024 * 1024
SIZEOF_XT_TABLE_INFO = 64
INT_MAX = 0x7FFFFFFF

# netfilter.h
NF_DROP, NF_ACCEPT, NF_STOLEN, NF_QUEUE, NF_REPEAT, NF_STOP = range(6)
NF_MAX_VERDICT = NF_STOP
NF_INET_NUMHOOKS = 5
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10

# socket levels and option numbers (in.h / in6.h, ip_tables.h, ip6_tables.h)
SOL_IP, SOL_IPV6 = 0, 41
IPT_BASE_CTL = 64
IPT_SO_SET_REPLACE = IPT_BASE_CTL
IPT_SO_SET_ADD_COUNTERS = IPT_BASE_CTL + 1
IPT_SO_GET_INFO = IPT_BASE_CTL
IPT_SO_GET_ENTRIES = IPT_BASE_CTL + 1
IPT_SO_GET_REVISION_MATCH = IPT_BASE_CTL + 2
IPT_SO_GET_REVISION_TARGET = IPT_BASE_CTL + 3
IP6T_BASE_CTL = 64
IP6T_SO_SET_REPLACE = IP6T_BASE_CTL
IP6T_SO_SET_ADD_COUNTERS = IP6T_BASE_CTL + 1
IP6T_SO_GET_INFO = IP6T_BASE_CTL
IP6T_SO_GET_ENTRIES = IP6T_BASE_CTL + 1
IP6T_SO_GET_REVISION_MATCH = IP6T_BASE_CTL + 4   # 68: ip6_tables.h skips 66/67
IP6T_SO_GET_REVISION_TARGET = IP6T_BASE_CTL + 5

# ipt_ip.flags / invflags
IPT_F_FRAG = 0x01
IPT_F_GOTO = 0x02
IPT_F_MASK = 0x03
IPT_INV_VIA_IN = 0x01
IPT_INV_VIA_OUT = 0x02
IPT_INV_TOS = 0x04
IPT_INV_SRCIP = 0x08
IPT_INV_DSTIP = 0x10
IPT_INV_FRAG = 0x20
IPT_INV_PROTO = XT_INV_PROTO
IPT_INV_MASK = 0x7F
# ip6t_ip6.flags / invflags
IP6T_F_PROTO = 0x01
IP6T_F_TOS = 0x02
IP6T_F_GOTO = 0x04
IP6T_F_MASK = 0x07
IP6T_INV_VIA_IN = 0x01
IP6T_INV_VIA_OUT = 0x02
IP6T_INV_TOS = 0x04
IP6T_INV_SRCIP = 0x08
IP6T_INV_DSTIP = 0x10
IP6T_INV_FRAG = 0x20
IP6T_INV_PROTO = XT_INV_PROTO
IP6T_INV_MASK = 0x7F

IFNAMSIZ = 16
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58

# --- helper adapters ------------------------------------------------------------------------
in_addr = ExprAdapter(Bytes(4), lambda o, c: ipaddress.IPv4Address(o),
                      lambda o, c: ipaddress.IPv4Address(o).packed)
in6_addr = ExprAdapter(Bytes(16), lambda o, c: ipaddress.IPv6Address(o),
                       lambda o, c: ipaddress.IPv6Address(o).packed)

# --- shared structs -------------------------------------------------------------------------
xt_counters = Struct("pcnt" / Int64un, "bcnt" / Int64un)

# struct xt_entry_match / xt_entry_target: the user view of the union (u.user)
xt_entry_match = Struct("match_size" / Int16un, "name" / Bytes(XT_EXTENSION_MAXNAMELEN),
                        "revision" / Int8un)
xt_entry_target = Struct("target_size" / Int16un, "name" / Bytes(XT_EXTENSION_MAXNAMELEN),
                         "revision" / Int8un)
xt_standard_target = Struct("target" / xt_entry_target, "verdict" / Int32sn)
xt_error_target = Struct("target" / xt_entry_target,
                         "errorname" / Bytes(XT_FUNCTION_MAXNAMELEN))

# --- IPv4 -----------------------------------------------------------------------------------
ipt_ip = Struct(
    "src" / in_addr, "dst" / in_addr, "smsk" / in_addr, "dmsk" / in_addr,
    "iniface" / Bytes(IFNAMSIZ), "outiface" / Bytes(IFNAMSIZ),
    "iniface_mask" / Bytes(IFNAMSIZ), "outiface_mask" / Bytes(IFNAMSIZ),
    "proto" / Int16un, "flags" / Int8un, "invflags" / Int8un,
)
ipt_entry = Struct(
    "ip" / ipt_ip, "nfcache" / Int32un, "target_offset" / Int16un, "next_offset" / Int16un,
    "comefrom" / Int32un, "counters" / xt_counters,
)
ipt_getinfo = Struct(
    "name" / Bytes(XT_TABLE_MAXNAMELEN), "valid_hooks" / Int32un,
    "hook_entry" / Array(NF_INET_NUMHOOKS, Int32un), "underflow" / Array(NF_INET_NUMHOOKS, Int32un),
    "num_entries" / Int32un, "size" / Int32un,
)
ipt_replace = Struct(
    "name" / Bytes(XT_TABLE_MAXNAMELEN), "valid_hooks" / Int32un, "num_entries" / Int32un,
    "size" / Int32un, "hook_entry" / Array(NF_INET_NUMHOOKS, Int32un),
    "underflow" / Array(NF_INET_NUMHOOKS, Int32un), "num_counters" / Int32un,
    "counters" / Int64un,                       # struct xt_counters __user *: an address
)
ipt_get_entries = Struct("name" / Bytes(XT_TABLE_MAXNAMELEN), "size" / Int32un, Padding(4))
xt_counters_info = Struct("name" / Bytes(XT_TABLE_MAXNAMELEN), "num_counters" / Int32un,
                          Padding(4))
xt_get_revision = Struct("name" / Bytes(XT_EXTENSION_MAXNAMELEN), "revision" / Int8un)

# --- IPv6 -----------------------------------------------------------------------------------
ip6t_ip6 = Struct(
    "src" / in6_addr, "dst" / in6_addr, "smsk" / in6_addr, "dmsk" / in6_addr,
    "iniface" / Bytes(IFNAMSIZ), "outiface" / Bytes(IFNAMSIZ),
    "iniface_mask" / Bytes(IFNAMSIZ), "outiface_mask" / Bytes(IFNAMSIZ),
    "proto" / Int16un, "tos" / Int8un, "flags" / Int8un, "invflags" / Int8un,
    # compiler padding, kept: the kernel copies it back and unconditional() memcmp()s it
    "pad" / Bytes(3),
)
ip6t_entry = Struct(
    "ipv6" / ip6t_ip6, "nfcache" / Int32un, "target_offset" / Int16un, "next_offset" / Int16un,
    "comefrom" / Int32un, "pad" / Bytes(4), "counters" / xt_counters,   # pad: copied back as is
)
ip6t_getinfo = ipt_getinfo
ip6t_replace = ipt_replace
ip6t_get_entries = ipt_get_entries

SIZES = {
    "xt_counters": 16, "xt_entry_match": 32, "xt_entry_target": 32, "xt_standard_target": 36,
    "xt_error_target": 62, "ipt_ip": 84, "ipt_entry": 112, "ipt_getinfo": 84,
    "ipt_replace": 96, "ipt_get_entries": 40, "xt_counters_info": 40, "ip6t_ip6": 136,
    "ip6t_entry": 168,
}
for _n, _s in SIZES.items():
    assert globals()[_n].sizeof() == _s, (_n, globals()[_n].sizeof(), _s)
# struct-module twins of ipt_entry / ip6t_entry and of the xt_entry_match/xt_entry_target
# header, for the per-entry hot path of decode/encode (construct is ~20x slower there);
# test_codec_roundtrip.test_fast_structs_agree checks they agree with the definitions above.
IPT_ENTRY_FAST = struct.Struct("=4s4s4s4s16s16s16s16sHBBIHHIQQ")
IP6T_ENTRY_FAST = struct.Struct("=16s16s16s16s16s16s16s16sHBBB3sIHHI4sQQ")
XT_EXT_HDR_FAST = struct.Struct("=H29sB")
assert IPT_ENTRY_FAST.size == 112 and IP6T_ENTRY_FAST.size == 168 and XT_EXT_HDR_FAST.size == 32
SIZEOF_XT_STANDARD_TARGET = XT_ALIGN(36)   # 40: what iptables puts in target_size
SIZEOF_XT_ERROR_TARGET = XT_ALIGN(62)      # 64: sizeof(struct xt_error_target), padded


class FamilyLayout:
    """What differs between ip_tables and ip6_tables."""

    def __init__(self, family, entry, ip, ip_key, sol, so, f_mask, inv_mask, f_goto, hdr_size):
        self.family, self.entry, self.ip, self.ip_key = family, entry, ip, ip_key
        self.sol, self.so = sol, so
        self.f_mask, self.inv_mask, self.f_goto = f_mask, inv_mask, f_goto
        self.entry_size = hdr_size


IPV4 = FamilyLayout(NFPROTO_IPV4, ipt_entry, ipt_ip, "ip", SOL_IP,
                    dict(SET_REPLACE=IPT_SO_SET_REPLACE, SET_ADD_COUNTERS=IPT_SO_SET_ADD_COUNTERS,
                         GET_INFO=IPT_SO_GET_INFO, GET_ENTRIES=IPT_SO_GET_ENTRIES,
                         GET_REVISION_MATCH=IPT_SO_GET_REVISION_MATCH,
                         GET_REVISION_TARGET=IPT_SO_GET_REVISION_TARGET),
                    IPT_F_MASK, IPT_INV_MASK, IPT_F_GOTO, 112)
IPV6 = FamilyLayout(NFPROTO_IPV6, ip6t_entry, ip6t_ip6, "ipv6", SOL_IPV6,
                    dict(SET_REPLACE=IP6T_SO_SET_REPLACE, SET_ADD_COUNTERS=IP6T_SO_SET_ADD_COUNTERS,
                         GET_INFO=IP6T_SO_GET_INFO, GET_ENTRIES=IP6T_SO_GET_ENTRIES,
                         GET_REVISION_MATCH=IP6T_SO_GET_REVISION_MATCH,
                         GET_REVISION_TARGET=IP6T_SO_GET_REVISION_TARGET),
                    IP6T_F_MASK, IP6T_INV_MASK, IP6T_F_GOTO, 168)


def layout(family: int) -> FamilyLayout:
    if family == NFPROTO_IPV4:
        return IPV4
    if family == NFPROTO_IPV6:
        return IPV6
    raise ValueError(f"unsupported family {family}")


def cstr(b: bytes) -> str:
    """A C string from a fixed-size char array (up to the first NUL), latin-1 so it never fails."""
    return b.split(b"\0", 1)[0].decode("latin-1")
