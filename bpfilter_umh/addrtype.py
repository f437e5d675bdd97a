"""The match addrtype (xt_addrtype.c, revisions 0 and 1), and the mirror of the local routing
table it needs.

IPv4. addrtype_mt_v0/_v1() ask match_type() -> inet_dev_addr_type() (net/ipv4/fib_frontend.c
__inet_dev_addr_type) for each address: 0.0.0.0/8 and 255.255.255.255 are RTN_BROADCAST,
224.0.0.0/4 is RTN_MULTICAST, anything else is looked up in the LOCAL routing table (255;
l3mdev_fib_table(dev) for a VRF slave with --limit-iface-*): the type of the longest matching
route, or RTN_UNICAST when none matches, when the route's type is an error (blackhole,
unreachable, prohibit, throw: fib_table_lookup() returns fib_props[type].error, with no
fallback to a shorter prefix) or, with --limit-iface-in/out, when the route's first nexthop is
not the packet's in/out device. The rule matches when (1 << type) & mask, each side inverted on
its own (rev 0: only bit 0 of invert_source/invert_dest counts, as `ret &= bool ^ u32` keeps).

A netfilter BPF program cannot call bpf_fib_lookup, and the answer depends only on the address
class and table 255, so the helper mirrors that table: an LPM trie per (netns, family), pinned
beside the REJECT/LOG ring (ADDRTYPE_PIN), keyed {prefixlen, address}, valued {route type,
first nexthop ifindex}. The three classes are entries too (0.0.0.0/8, 255.255.255.255/32,
224.0.0.0/4, device "any"), and routes inside them are left out, so the longest prefix found
is what the kernel's class test answers first. A route the lookup would skip (a TOS route,
a dead or link-down nexthop: fib_table_lookup `continue`s past those) is left out too, so the
trie falls back to the shorter prefix as the kernel's backtracking does.

The mirror is kept current by a watcher process per (netns, family), `python -m
bpfilter_umh.addrtype ipv4`, started by the engine with the first install that has an addrtype
rule and stopped like the responder (flush, an install without addrtype, the namespace's end;
it exits by itself when the pin goes). It listens to rtnetlink (RTNLGRP_IPV4_ROUTE,
RTNLGRP_IPV4_IFADDR, RTNLGRP_LINK: a device going down flushes its local routes without an
RTM_DELROUTE, fib_disable_ip()) and on any message dumps table 255 again and rewrites the
difference: new and changed prefixes first, then the gone ones. Lag: a route change is visible
to packets once the watcher has run, a few milliseconds later (measured in
tests/test_ext_addrtype.py); a packet in between sees the table as it was, as if it had been
filtered just before the change.

IPv6 (revision 1 only; xt_addrtype registers rev 0 for IPv4 only): match_type6() tests
ipv6_addr_type() classes for MULTICAST, UNICAST and UNSPEC (pure address arithmetic, done
here), and asks a full route lookup (nf_ip6_route(): policy rules, every table, RTF_REJECT,
RTF_ANYCAST) for LOCAL, ANYCAST and UNREACHABLE: those are refused, naming the rule.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import signal
import socket
import struct
import sys

from . import daemons
from . import ebpf as E
from . import xt_ext as X
from .ebpf import FP, R0, R1, R2, R3, R6, Label
from .errors import BpfilterError

ADDRTYPE_MAP = "addrtype"                 # the symbolic name ld_map_fd refers to
BPF_MAP_TYPE_LPM_TRIE, BPF_F_NO_PREALLOC = 11, 1
MAX_ROUTES = 65536                        # entries of the trie (allocated on demand)
RT_TABLE_LOCAL = 255
RTN_UNICAST, RTN_LOCAL, RTN_BROADCAST, RTN_MULTICAST = 1, 2, 3, 5
RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW = 6, 7, 8, 9
ERROR_TYPES = (RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW)   # fib_props[].error
RTNH_F_DEAD, RTNH_F_LINKDOWN = 1, 16
# a class entry: the same type whatever the device (INT_MAX: ifindexes are positive ints, and
# a 32-bit immediate compares sign-extended, so nothing with the top bit set)
ANY_DEV = 0x7fffffff
# (prefix, length, type) tested by __inet_dev_addr_type() before the table lookup
IPV4_CLASSES = (("0.0.0.0", 8, RTN_BROADCAST), ("255.255.255.255", 32, RTN_BROADCAST),
                ("224.0.0.0", 4, RTN_MULTICAST))
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
POLL = 0.5                                # seconds between checks that the pin is still there
STATE_ROOT = "/run/bpfilter"
# IPv6 masks that need the route lookup match_lookup_rt6() does
XT_ADDRTYPE_UNSPEC, XT_ADDRTYPE_UNICAST, XT_ADDRTYPE_LOCAL = 1 << 0, 1 << 1, 1 << 2
XT_ADDRTYPE_ANYCAST, XT_ADDRTYPE_MULTICAST, XT_ADDRTYPE_UNREACHABLE = 1 << 4, 1 << 5, 1 << 7
V6_ROUTED = XT_ADDRTYPE_LOCAL | XT_ADDRTYPE_ANYCAST | XT_ADDRTYPE_UNREACHABLE


def uses_addrtype(table) -> bool:
    """An IPv4 addrtype rule: its programs need the mirror (IPv6 ones are arithmetic only)."""
    return table.family == socket.AF_INET and \
        any(m.name == "addrtype" for r in table.entries() for m in r.matches)


# ------------------------------------------------------------------------------ the mirror
def _key(addr: str, plen: int) -> bytes:
    return struct.pack("<I", plen) + ipaddress.IPv4Address(addr).packed


def _value(rtype: int, oif: int) -> bytes:
    return struct.pack("<II", rtype, oif)


def entries_from_routes(routes) -> dict:
    """{LPM key: value} for the local table's routes [(dst, dst_len, type, tos, flags, oif)] as
    the kernel's lookup sees them (see the module docstring)."""
    classes = [ipaddress.IPv4Network(f"{a}/{n}") for a, n, _t in IPV4_CLASSES]
    out = {}
    for dst, plen, rtype, tos, flags, oif in routes:
        if tos or flags & (RTNH_F_DEAD | RTNH_F_LINKDOWN):
            continue                       # fib_table_lookup skips it: a shorter prefix answers
        net = ipaddress.IPv4Network(f"{dst or '0.0.0.0'}/{plen}", strict=False)
        if any(net.subnet_of(c) for c in classes):
            continue                       # the class test comes before the lookup
        key = _key(str(net.network_address), plen)
        if key in out:
            continue                       # the first alias of a prefix answers
        if rtype in ERROR_TYPES:
            rtype = RTN_UNICAST            # the lookup fails: inet_addr_type says UNICAST
        out[key] = _value(rtype, oif or 0)
    for a, n, t in IPV4_CLASSES:
        out[_key(a, n)] = _value(t, ANY_DEV)
    return out


def local_routes(family: int = socket.AF_INET) -> list:
    """The calling thread's namespace's table 255: [(dst, dst_len, type, tos, flags, oif)]."""
    from pyroute2 import IPRoute
    out = []
    with IPRoute() as ipr:
        for m in ipr.route("dump", family=family, table=RT_TABLE_LOCAL):
            if (m.get("table") or m["table"]) != RT_TABLE_LOCAL:
                continue
            oif = m.get("oif")
            if oif is None and m.get("multipath"):
                oif = m.get("multipath")[0]["oif"]     # fib_info_nhc(res.fi, 0)
            out.append((m.get("dst"), m["dst_len"], m["type"], m["tos"], m["flags"], oif))
    return out


def local_entries() -> dict:
    return entries_from_routes(local_routes())


def pin_path(cookie: int = None) -> str:
    from . import attach
    return os.path.join(attach.attachment_directory("nf", socket.AF_INET, cookie=cookie),
                        "addrtype")


def open_map():
    """The mirror of this netns: adopted from its pin, or created, filled now and pinned (so a
    program loaded next sees the table as it is, before the watcher runs)."""
    from . import kernel as K
    pin = pin_path()
    if os.path.exists(pin):
        m = K.Map.from_pin(pin)
        if m.map_type == BPF_MAP_TYPE_LPM_TRIE and m.key_size == 8 and m.value_size == 8:
            sync(m)
            return m
        m.close()
        K.unpin(pin)
    os.makedirs(os.path.dirname(pin), mode=0o700, exist_ok=True)
    m = K.Map.create(BPF_MAP_TYPE_LPM_TRIE, 8, 8, MAX_ROUTES, name="bpfilter_addrt",
                     flags=BPF_F_NO_PREALLOC)
    try:
        sync(m)
        m.pin(pin)
    except BaseException:
        m.close()
        raise
    return m


def sync(m, want: dict = None) -> int:
    """Make the map hold exactly `want` (default: the table now); returns the keys changed.
    Additions and changes go first, so an address never finds less than before in between."""
    want = local_entries() if want is None else want
    have = {}
    for k in list(m.keys()):
        v = m.lookup(k)
        if v is not None:
            have[bytes(k)] = bytes(v)
    n = 0
    for k, v in want.items():
        if have.get(k) != v:
            m.update(k, v)
            n += 1
    for k in have:
        if k not in want:
            try:
                m.delete(k)
            except BpfilterError as e:
                if e.errno != errno.ENOENT:
                    raise
            n += 1
    return n


# ------------------------------------------------------------------------------ the watcher
def _pidfile(cookie: int = None) -> str:
    from . import kernel as K
    cookie = K.netns_cookie() if cookie is None else cookie
    return os.path.join(STATE_ROOT, str(cookie), "addrtype-ipv4.pid")


def running() -> bool:
    return daemons.running(_pidfile()) is not None


def start() -> int:
    """Start the watcher of the calling thread's namespace unless one runs; returns its pid.
    Waits (bounded) until it listens to rtnetlink and has synced once."""
    return daemons.start(_pidfile(), "bpfilter_umh.addrtype", ["ipv4"], ready=True)


def stop(cookie: int = None):
    """Stop the watcher (if any) and remove the mirror's pin."""
    if cookie is not None and not os.path.lexists(_pidfile(cookie)) and \
            not os.path.lexists(pin_path(cookie)):
        # every IPv4 install of a table without addrtype comes here: with neither the pid file
        # nor the pin there is nothing to stop (see responder.stop)
        return
    from . import kernel as K
    daemons.stop(_pidfile(cookie))
    pin = pin_path(cookie)
    K.unpin(pin)
    for d in (os.path.dirname(pin), os.path.dirname(os.path.dirname(pin))):
        try:
            os.rmdir(d)
        except OSError:
            break               # not empty (the nf attachment, the ring, the other family)


def _drain(s) -> bool:
    """Read every pending notification; True when there was any (or the socket overflowed:
    ENOBUFS means messages were lost, so a resync is due anyway)."""
    got = False
    while True:
        try:
            if not s.recv(65536, socket.MSG_DONTWAIT):
                return got
            got = True
        except BlockingIOError:
            return got
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            got = True


def watch(ready_fd: int = -1):
    from . import kernel as K
    pin = pin_path()
    m = K.Map.from_pin(pin)
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        # subscribe first, then sync: a change after the dump is a message we will read
        s.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
        sync(m)
        if ready_fd >= 0:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        while os.path.exists(pin):
            if select.select([s], [], [], POLL)[0] and _drain(s):
                try:
                    sync(m)
                except Exception as e:       # keep watching; the next message resyncs
                    print(f"bpfilter addrtype: sync failed: {e!r}", file=sys.stderr)
    finally:
        s.close()
        m.close()


# ------------------------------------------------------------------------------ the code
def _params(m):
    """(source mask, dest mask, invert source, invert dest, limit: None, 'in' or 'out')."""
    d = m.data
    if m.revision == 0:
        return d.source, d.dest, d.invert_source & 1, d.invert_dest & 1, None
    f = d.flags
    limit = "in" if f & X.XT_ADDRTYPE_LIMIT_IFACE_IN else \
        "out" if f & X.XT_ADDRTYPE_LIMIT_IFACE_OUT else None
    return d.source, d.dest, f & X.XT_ADDRTYPE_INVERT_SOURCE, \
        int(bool(f & X.XT_ADDRTYPE_INVERT_DEST)), limit


def emit(cc, m, rule, chain: str, pos: int, fail: str, refuse):
    """Append the match to the rule being compiled (matchers.py convention: mismatch in r1,
    then cc._acc()); `refuse(what)` makes the EOPNOTSUPP naming the rule."""
    src, dst, inv_src, inv_dst, limit = _params(m)
    if cc.v6:
        routed = (src | dst) & V6_ROUTED
        if routed:
            names = [n for b, n in ((XT_ADDRTYPE_LOCAL, "LOCAL"), (XT_ADDRTYPE_ANYCAST,
                     "ANYCAST"), (XT_ADDRTYPE_UNREACHABLE, "UNREACHABLE")) if routed & b]
            raise refuse(f"addrtype {'/'.join(names)} for IPv6 is not supported (xt_addrtype "
                         f"asks a full IPv6 route lookup, nf_ip6_route(), for these; "
                         f"MULTICAST, UNICAST and UNSPEC are)")
        from .family import S_DADDR6, S_SADDR6
        for mask, inv, slot in ((src, inv_src, S_SADDR6), (dst, inv_dst, S_DADDR6)):
            if mask:
                _type6(cc, mask, slot, fail)
                if inv:
                    cc.emit(E.alu(E.XOR, R1, 1))
                cc._acc()
        return
    if limit and cc.fl.name != "nf":
        raise refuse(f"addrtype --limit-iface-{limit} is not supported by flavor {cc.fl.name} "
                     f"(it compares the route's device with the hook's {limit} device, which "
                     f"only a netfilter hook knows); use flavor nf")
    from .compile import S_DADDR, S_SADDR
    for mask, inv, slot, what in ((src, inv_src, S_SADDR, "src"), (dst, inv_dst, S_DADDR, "dst")):
        if mask:
            _type4(cc, mask, slot, limit, fail, f"addrtype {'! ' if inv else ''}{what}-type "
                                                f"{mask:#x}")
            if inv:
                cc.emit(E.alu(E.XOR, R1, 1))
            cc._acc()


def _type4(cc, mask: int, slot: int, limit, fail: str, what: str):
    """r1 = 0 when (1 << inet_dev_addr_type(addr)) & mask, else 1 (one trie lookup)."""
    from .compile import S_KEY
    from .matchers import _flush
    have = cc.label("addrtype_have")
    _flush(cc, fail)
    cc.emit(E.st(E.W, FP, S_KEY, 32, f"{what}: LPM key prefixlen 32"),
            E.ldx(E.W, R1, FP, slot), E.stx(E.W, FP, S_KEY + 4, R1),
            E.ld_map_fd(R1, ADDRTYPE_MAP), E.mov(R2, FP), E.alu(E.ADD, R2, S_KEY),
            E.call(E.BPF_FUNC_map_lookup_elem),
            E.mov(R1, RTN_UNICAST, comment="no local route: RTN_UNICAST"),
            E.jmp(E.JEQ, R0, 0, have),
            E.ldx(E.W, R1, R0, 0, "the route's type"))
    if limit:
        # __inet_dev_addr_type(): the type counts only when dev == the first nexthop's device
        from .targets import _facts
        f = cc.facts
        off = f.state_in if limit == "in" else f.state_out
        cc.emit(E.ldx(E.W, R2, R0, 4, "the route's first nexthop ifindex"),
                E.jmp(E.JEQ, R2, ANY_DEV, have, comment="an address class: any device"),
                E.ldx(E.DW, R3, R6, f.nf_ctx_state, "ctx->state"),
                E.ldx(E.DW, R3, R3, off, f"state->{limit}"),
                E.jmp(E.JEQ, R3, 0, have, comment="no device: the table's answer"),
                E.ldx(E.W, R3, R3, _facts(cc.facts == type(cc.facts).fake())["ifindex"],
                      f"{limit}->ifindex"),
                E.jmp(E.JEQ, R2, R3, have),
                E.mov(R1, RTN_UNICAST, comment="another device's route: RTN_UNICAST"))
    # mismatch = !(mask & (1 << type))
    cc.emit(Label(have), E.mov(R2, 1), E.alu(E.LSH, R2, R1),
            E.alu(E.AND, R2, mask, comment="mask & (1 << type)"), E.mov(R1, R2))
    cc._nz(R1, invert=True)


def _type6(cc, mask: int, slot: int, fail: str):
    """r1 = 0 when match_type6() holds for the mask's classes, else 1: ipv6_addr_type()
    (net/ipv6/addrconf_core.c __ipv6_addr_type) has IPV6_ADDR_MULTICAST for ff00::/8, is
    IPV6_ADDR_ANY for :: only, and has IPV6_ADDR_UNICAST for everything else except ff00::/8,
    :: and ::ffff:0:0/96 (IPV6_ADDR_MAPPED). Uses r1-r3."""
    no, done = cc.label("addrtype6_no"), cc.label("addrtype6_done")
    cc.emit(E.ldx(E.DW, R2, FP, slot, f"addrtype6 {mask:#x}: s6_addr32[0..1]"),
            E.ldx(E.DW, R3, FP, slot + 8, "s6_addr32[2..3]"))
    if mask & XT_ADDRTYPE_MULTICAST:
        cc.emit(E.mov(R1, R2), E.alu(E.AND, R1, 0xff), E.jmp(E.JNE, R1, 0xff, no))
    if mask & XT_ADDRTYPE_UNSPEC:
        cc.emit(E.jmp(E.JNE, R2, 0, no), E.jmp(E.JNE, R3, 0, no))
    if mask & XT_ADDRTYPE_UNICAST:
        ok = cc.label("addrtype6_uni")
        cc.emit(E.mov(R1, R2), E.alu(E.AND, R1, 0xff), E.jmp(E.JEQ, R1, 0xff, no,
                                                             comment="multicast"),
                E.jmp(E.JNE, R2, 0, ok),
                E.jmp(E.JEQ, R3, 0, no, comment="::"),
                E.mov(R1, R3, bits=32), E.ld_imm64(R2, 0xffff0000),
                E.jmp(E.JEQ, R1, R2, no, comment="::ffff:0:0/96 (mapped)"),
                Label(ok))
    cc.emit(E.mov(R1, 0), E.ja(done), Label(no), E.mov(R1, 1), Label(done))


if __name__ == "__main__":
    if len(sys.argv) in (2, 3) and sys.argv[1] == "ipv4":
        watch(int(sys.argv[2]) if len(sys.argv) == 3 else -1)
    else:
        sys.exit("usage: python -m bpfilter_umh.addrtype ipv4 [READY_FD]")
