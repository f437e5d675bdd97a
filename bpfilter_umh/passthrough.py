"""Policy `xtables` (docs/policy.md): a table the compiler cannot translate is handed to the
kernel's own xtables of the caller's network namespace, and taken back when it translates again.

The helper speaks to the kernel's table itself, through the same socket options iptables uses, on
a UDP socket created in the calling thread's network namespace (the Dispatcher has setns()ed to
the caller's): udp_setsockopt/udp_getsockopt pass SOL_IP/SOL_IPV6 to ip_setsockopt/
ipv6_setsockopt, which hand an optname they do not know to nf_setsockopt/nf_getsockopt
(net/ipv4/ip_sockglue.c, net/ipv6/ipv6_sockglue.c), so no raw socket and no CAP_NET_RAW are
needed; do_ipt_set_ctl/do_ipt_get_ctl only ask for CAP_NET_ADMIN in the netns's user namespace,
which the helper keeps. The helper is never a child of the door's seccomp filter, so its own
calls reach the kernel, not the door.

A table is "delegated" while /run/bpfilter/<netns cookie>/<family>.delegated exists: GET_INFO,
GET_ENTRIES and SET_ADD_COUNTERS are then answered by the kernel's table and bpfilter's slots hold
the accept-all table. The file outlives the helper, so a new helper answers the same way.

Order of the two switches (never an unfiltered instant; for an instant both filter):
  hand over: the kernel's table gets the caller's ruleset, then bpfilter installs accept-all;
  take back: bpfilter installs the caller's ruleset, then the kernel's table is emptied.
The netfilter BPF links must be attached before the kernel's filter table exists in the netns:
nf_hook_entries_grow (net/netfilter/core.c) refuses a BPF hook whose priority another hook of
that hook point already has (EBUSY), while iptable_filter's ops are accepted beside a BPF link
at the same priority (and run before it). So when bpfilter has nothing that must keep filtering,
its accept-all table is installed first (claiming the links), and it is never flushed while
delegated.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import socket
import struct
import time

from .errors import BpfilterError

log = logging.getLogger("bpfilter")

AF_INET, AF_INET6 = 2, 10
LEVEL = {AF_INET: 0, AF_INET6: 41}                     # SOL_IP, SOL_IPV6
SO_SET_REPLACE, SO_SET_ADD_COUNTERS = 64, 65
SO_GET_INFO, SO_GET_ENTRIES = 64, 65
REVISION_CMDS = {AF_INET: (66, 67), AF_INET6: (68, 69)}
GETINFO = struct.Struct("=32sI5I5III")                 # ipt_getinfo: 84
GET_ENTRIES_HDR = struct.Struct("=32sI4x")             # ipt_get_entries: 40
REPLACE_HDR = struct.Struct("=32sIII5I5IIQ")           # ipt_replace: 96
XT_COUNTERS = struct.Struct("=QQ")
FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}
STATE_ROOT = "/run/bpfilter"

_libc = ctypes.CDLL(None, use_errno=True)


class KernelXt:
    """The kernel's xtables of one family in the calling thread's network namespace."""

    def __init__(self, family: int):
        self.family = family
        self.level = LEVEL[family]

    def _socket(self) -> socket.socket:
        return socket.socket(self.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def getsockopt(self, optname: int, inbuf: bytes, length: int) -> bytes:
        """getsockopt with a buffer whose first bytes are `inbuf` (the table or extension name
        the kernel reads from it); the kernel's errno becomes a BpfilterError."""
        buf = ctypes.create_string_buffer(inbuf, max(length, len(inbuf)))
        ln = ctypes.c_uint32(length)
        with self._socket() as s:
            if _libc.getsockopt(s.fileno(), self.level, optname, buf, ctypes.byref(ln)) != 0:
                e = ctypes.get_errno()
                raise BpfilterError(e, f"kernel xtables getsockopt {optname}: {os.strerror(e)}")
        return buf.raw[:ln.value]

    def setsockopt(self, optname: int, data) -> None:
        buf = data if isinstance(data, ctypes.Array) else \
            ctypes.create_string_buffer(bytes(data), len(data))
        with self._socket() as s:
            if _libc.setsockopt(s.fileno(), self.level, optname, buf, len(buf)) != 0:
                e = ctypes.get_errno()
                raise BpfilterError(e, f"kernel xtables setsockopt {optname}: {os.strerror(e)}")

    def getinfo(self, name: str = "filter") -> bytes:
        """ipt_getinfo of the kernel's table (do_ipt_get_ctl instantiates the per-netns table
        from its template on first use: xt_find_table_lock -> table_init)."""
        return self.getsockopt(SO_GET_INFO, name.encode(), GETINFO.size)

    def num_entries(self, name: str = "filter") -> int:
        return GETINFO.unpack(self.getinfo(name))[12]

    def replace(self, buf: bytes, num_counters: int) -> list:
        """SET_REPLACE of an ipt_replace buffer whose num_counters is set to `num_counters` (the
        kernel table's entry count: the caller computed its own from bpfilter's GET_INFO) and
        whose counters pointer is ours; returns the kernel's old counters."""
        out = ctypes.create_string_buffer(max(1, num_counters) * XT_COUNTERS.size)
        data = ctypes.create_string_buffer(bytes(buf), len(buf))
        # num_counters and counters are the last two members of ipt_replace / ip6t_replace
        struct.pack_into("=IQ", data, REPLACE_HDR.size - 12, num_counters,
                         ctypes.addressof(out))
        self.setsockopt(SO_SET_REPLACE, data)
        raw = out.raw
        return [XT_COUNTERS.unpack_from(raw, 16 * i) for i in range(num_counters)]

    def replace_table(self, table) -> list:
        """Install a model Table (e.g. Table.empty) in the kernel; returns the old counters."""
        blob = table.encode()
        info = GETINFO.unpack(table.getinfo_bytes())
        hdr = REPLACE_HDR.pack(table.name.encode(), table.valid_hooks, table.num_entries,
                               len(blob), *info[2:12], 0, 0)
        return self.replace(hdr + blob, self.num_entries(table.name))

    def revision(self, name: bytes, revision: int, target: bool) -> None:
        """GET_REVISION_MATCH/TARGET: returns if the kernel has it, raises its errno if not."""
        cmd = REVISION_CMDS[self.family][1 if target else 0]
        self.getsockopt(cmd, struct.pack("=29sB", name, revision), 30)


class Delegation:
    """The delegated flag of one (netns cookie, family), and the two switches."""

    def __init__(self, cookie: int, family: int):
        self.family = family
        self.kernel = KernelXt(family)
        self.path = os.path.join(STATE_ROOT, str(cookie), f"{FAMILY_NAMES[family]}.delegated")

    @property
    def active(self) -> bool:
        return os.path.exists(self.path)

    def _set(self, why: str = None):
        if why is None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(dict(since=time.time(), reason=why), f)
        os.replace(tmp, self.path)

    def reason(self):
        try:
            with open(self.path) as f:
                return json.load(f).get("reason")
        except (OSError, ValueError):
            return None

    def hand_over(self, be, buf: bytes, why: BpfilterError) -> list:
        """The caller's table to the kernel; returns the counters the caller computed its
        replace from: bpfilter's at the switch, or the kernel's if the table was delegated
        already (then num_counters came from the kernel's GET_INFO)."""
        from .model import Table
        empty = Table.empty(be.name, self.family)

        def bpfilter_accept_all():
            return be.replace(empty, empty.encode(), empty.getinfo_bytes())

        if self.active:
            old = self.kernel.replace(buf, self.kernel.num_entries(be.name))
            if not _accept_all(be.table):       # a switch that stopped half-way: finish it
                _try(bpfilter_accept_all)
        elif _accept_all(be.table):
            # nothing to keep enforcing: claim the netfilter links before the kernel's table
            # exists (see the module docstring); this returns the caller's old counters
            try:
                old, claimed = bpfilter_accept_all(), True
            except BpfilterError as e:
                if e.errno != errno.EBUSY:
                    raise
                # the kernel's table exists already (iptables-legacy ran without the door):
                # bpfilter cannot attach beside it, but the kernel can still enforce the table
                log.warning("bpfilter cannot attach its hooks (%s); the kernel's table alone "
                            "will filter", e.message)
                old, claimed = be.engine.counters(), False
            try:
                self.kernel.replace(buf, self.kernel.num_entries(be.name))
            except BpfilterError:
                if claimed:
                    be.add_counters(old)    # the kernel refused it: nothing changed, counts kept
                raise
            self._set(why.message)
        else:
            self.kernel.replace(buf, self.kernel.num_entries(be.name))
            self._set(why.message)
            # from here both filter until bpfilter's slots are emptied: stricter, never looser
            old = _try(bpfilter_accept_all)
            if old is None:
                old = be.engine.counters()
        log.warning("%s filter table served by the kernel's xtables (policy xtables): %s",
                    FAMILY_NAMES[self.family], why.message)
        return old

    def take_back(self, be) -> list:
        """After bpfilter installed the caller's table: empty the kernel's table (built-in chains,
        policy ACCEPT, what `iptables -F; iptables -X; iptables -P ... ACCEPT` leaves) and return
        its old counters, the ones the caller computed its replace from."""
        from .model import Table
        try:
            old = self.kernel.replace_table(Table.empty(be.name, self.family))
        except BpfilterError:
            # the kernel kept the old table (and keeps answering): bpfilter back to accept-all
            empty = Table.empty(be.name, self.family)
            try:
                be.replace(empty, empty.encode(), empty.getinfo_bytes())
            except BpfilterError as e:
                log.warning("could not empty bpfilter's slots again: %s", e)
            raise
        self._set(None)
        log.info("%s filter table translatable again: served by bpfilter",
                 FAMILY_NAMES[self.family])
        return old


def status_fields(cookie: int, family: int) -> dict:
    """For Engine.status / `bpfilter status`: the configured policy, and whether the kernel's
    xtables serve the table (then bpfilter's chains hold the accept-all table)."""
    from . import config
    try:
        policy = config.load().policy(family)
    except BpfilterError as e:
        policy = f"unknown ({e.message})"
    d = Delegation(cookie, family)
    out = dict(policy=policy, delegated=d.active)
    if out["delegated"]:
        out["delegated_reason"] = d.reason()
    return out


def _try(fn):
    """A step after the kernel took the table: its failure leaves bpfilter's old rules filtering
    beside the kernel's (stricter), and the next replace completes it, so it is logged only."""
    try:
        return fn()
    except BpfilterError as e:
        log.warning("bpfilter's slots keep their old rules beside the kernel's table: %s", e)
        return None


def _accept_all(table) -> bool:
    from .engine import _accept_all as accept_all
    return accept_all(table)
