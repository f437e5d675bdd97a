"""Registry of xtables extensions (matches and targets), keyed by (kind, name, revision).

Each entry says how the payload after xt_entry_match/xt_entry_target is decoded (a construct
codec, or None: kept as opaque bytes that round-trip), the kernel's matchsize/targetsize, its
usersize (xt_data_to_user() copies only that many bytes back to user space and zeroes the rest of
the aligned payload), the protocol xt_check_match()/xt_check_target() require, the extension's own
checkentry, and whether the compiler can translate it.
"""
import errno
from dataclasses import dataclass
from typing import Callable, Optional

from construct import Array, Bytes, Default, Int8un, Int16un, Int32sn, Struct

from .errors import BpfilterError
from .uapi import (IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, NFPROTO_IPV4,
                   NFPROTO_IPV6, XT_ALIGN, XT_ERROR_TARGET, XT_FUNCTION_MAXNAMELEN,
                   XT_STANDARD_TARGET)

MATCH, TARGET = "match", "target"

# --- payload structs (include/uapi/linux/netfilter/xt_tcpudp.h, ip_tables.h, ip6_tables.h) ---
XT_TCP_INV_SRCPT, XT_TCP_INV_DSTPT, XT_TCP_INV_FLAGS, XT_TCP_INV_OPTION = 0x01, 0x02, 0x04, 0x08
XT_TCP_INV_MASK = 0x0F
XT_UDP_INV_SRCPT, XT_UDP_INV_DSTPT = 0x01, 0x02
XT_UDP_INV_MASK = 0x03
IPT_ICMP_INV = 0x01
IP6T_ICMP_INV = 0x01

xt_tcp = Struct("spts" / Array(2, Int16un), "dpts" / Array(2, Int16un), "option" / Int8un,
                "flg_mask" / Int8un, "flg_cmp" / Int8un, "invflags" / Int8un)      # 12
xt_udp = Struct("spts" / Array(2, Int16un), "dpts" / Array(2, Int16un), "invflags" / Int8un,
                # inside sizeof(struct xt_udp), so xt_data_to_user() copies it back as given
                "pad" / Default(Bytes(1), b"\0"))                                    # 10
ipt_icmp = Struct("type" / Int8un, "code" / Array(2, Int8un), "invflags" / Int8un)  # 4
ip6t_icmp = ipt_icmp
xt_standard_verdict = Struct("verdict" / Int32sn)                                   # 4
xt_error_payload = Struct("errorname" / Bytes(XT_FUNCTION_MAXNAMELEN))              # 30


@dataclass
class Extension:
    kind: str                       # MATCH or TARGET
    name: str
    revision: int
    families: tuple                 # NFPROTO_* it is registered for
    size: int                       # kernel matchsize/targetsize (unaligned); -1 = unknown
    codec: Optional[object] = None  # construct Struct of `size` bytes, or None = opaque
    usersize: int = 0               # bytes copied back to user; 0 = all of `size`
    proto: int = 0                  # required ip.proto (xt_check_match/xt_check_target)
    check: Optional[Callable] = None   # check(rule, family, data) -> None | raise BpfilterError
    compiled: bool = False          # the compiler can translate it
    complete: bool = False          # every revision the kernel has of `name` is registered:
                                    # any other revision fails lookup with ENOENT

    def decode(self, payload: bytes):
        """Payload bytes → construct Container (codec) or the bytes themselves (opaque)."""
        if self.codec is None or len(payload) != XT_ALIGN(self.size):
            return payload
        return self.codec.parse(payload[:self.size])

    def encode(self, data, length: int = None) -> bytes:
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
        body = self.codec.build(data)
        return body + b"\0" * (XT_ALIGN(self.size) - len(body))

    def to_user(self, payload: bytes) -> bytes:
        """What xt_data_to_user() gives back for this payload: `usersize` (or size) bytes, then
        zeros up to XT_ALIGN(size)."""
        if self.size < 0 or len(payload) != XT_ALIGN(self.size):
            return payload
        keep = self.usersize or self.size
        return payload[:keep] + b"\0" * (len(payload) - keep)


_registry: dict = {}


def register(ext: Extension) -> Extension:
    for fam in ext.families:
        _registry[(ext.kind, fam, ext.name, ext.revision)] = ext
    return ext


def lookup(kind: str, family: int, name: str, revision: int) -> Optional[Extension]:
    return _registry.get((kind, family, name, revision))


def owned(kind: str, family: int, name: str) -> bool:
    """True when every revision the kernel has of `name` is registered here (complete=True), so
    an unknown revision is known to fail xt_find_match()/xt_find_target() with ENOENT."""
    return any(k[0] == kind and k[1] == family and k[2] == name and e.complete
               for k, e in _registry.items())


def _einval(rule, what):
    raise BpfilterError(errno.EINVAL, f"entry at offset {rule.offset}: {what}")


# --- checkentry functions, mirroring the kernel's ---------------------------------------------
def _tcp_check(rule, family, data):
    # xt_tcpudp.c tcp_mt_check()
    if data.invflags & ~XT_TCP_INV_MASK:
        _einval(rule, f"tcp match: invflags 0x{data.invflags:x} outside XT_TCP_INV_MASK")


def _udp_check(rule, family, data):
    # xt_tcpudp.c udp_mt_check()
    if data.invflags & ~XT_UDP_INV_MASK:
        _einval(rule, f"udp match: invflags 0x{data.invflags:x} outside XT_UDP_INV_MASK")


def _icmp_check(rule, family, data):
    # ip_tables.c icmp_checkentry()
    if data.invflags & ~IPT_ICMP_INV:
        _einval(rule, f"icmp match: invflags 0x{data.invflags:x} outside IPT_ICMP_INV")


def _icmp6_check(rule, family, data):
    # ip6_tables.c icmp6_checkentry()
    if data.invflags & ~IP6T_ICMP_INV:
        _einval(rule, f"icmp6 match: invflags 0x{data.invflags:x} outside IP6T_ICMP_INV")


BOTH = (NFPROTO_IPV4, NFPROTO_IPV6)
register(Extension(MATCH, "tcp", 0, BOTH, 12, xt_tcp, proto=IPPROTO_TCP, check=_tcp_check,
                   compiled=True, complete=True))
register(Extension(MATCH, "udp", 0, BOTH, 10, xt_udp, proto=IPPROTO_UDP, check=_udp_check,
                   compiled=True, complete=True))
register(Extension(MATCH, "icmp", 0, (NFPROTO_IPV4,), 4, ipt_icmp, proto=IPPROTO_ICMP,
                   check=_icmp_check, compiled=True, complete=True))
register(Extension(MATCH, "icmp6", 0, (NFPROTO_IPV6,), 4, ip6t_icmp, proto=IPPROTO_ICMPV6,
                   check=_icmp6_check, compiled=True, complete=True))
register(Extension(TARGET, XT_STANDARD_TARGET, 0, BOTH, 4, xt_standard_verdict, compiled=True,
                   complete=True))
register(Extension(TARGET, XT_ERROR_TARGET, 0, BOTH, XT_FUNCTION_MAXNAMELEN, xt_error_payload,
                   compiled=True, complete=True))

# Opaque extensions whose kernel module keeps private state after `usersize` (struct members
# marked "Used internally by the kernel"): their payload is kept as bytes but GET_ENTRIES shows
# zeros there. Sizes from include/uapi/linux/netfilter/xt_*.h on x86_64.
register(Extension(MATCH, "limit", 0, BOTH, 40, usersize=8))        # xt_rateinfo: avg, burst
register(Extension(MATCH, "quota", 0, BOTH, 24, usersize=16))       # xt_quota_info: master
register(Extension(MATCH, "statistic", 0, BOTH, 24, usersize=16))   # xt_statistic_info: master

# issue #6: the extensions people use (codecs, checkentry rules) live in xt_ext.py
from . import xt_ext  # noqa: E402,F401
