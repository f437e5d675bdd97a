"""The socket-option handlers: one request frame in, one reply frame out, answered as
net/ipv4/netfilter/ip_tables.c (do_ipt_get_ctl / do_ipt_set_ctl) and ip6_tables.c answer.

The caller's buffer lives in the caller's memory: CallerMemory reads and writes it with
process_vm_readv/writev (fallback /proc/PID/mem), the way the kernel uses copy_from_user and
copy_to_user.  Both transports (the helper's stdin/stdout for the kernel shim, the per-netns
abstract socket for `bpfilter exec`) call Dispatcher.serve, which runs each request in the
caller's network namespace and maps every failure to an errno in one place (errors.to_errno).

Order of checks per command, as in the kernel (so the same bad request gets the same errno):
  GET_INFO          *len != sizeof(ipt_getinfo) -> EINVAL; table lookup -> ENOENT
  GET_ENTRIES       *len < sizeof(ipt_get_entries) -> EINVAL; *len != sizeof + get.size -> EINVAL;
                    lookup -> ENOENT; get.size != current size -> EAGAIN
  GET_REVISION_*    *len != sizeof(xt_get_revision) -> EINVAL; unknown name -> ENOENT; known
                    name without that revision -> EPROTONOSUPPORT (x_tables.c xt_find_revision)
  SET_REPLACE       do_replace: len < sizeof(ipt_replace) -> EINVAL, num_counters overflow ->
                    ENOMEM, 0 -> EINVAL, len < sizeof + size -> EINVAL, translate_table
                    checks (codec) -> their errno, lookup -> ENOENT, valid_hooks mismatch -> EINVAL,
                    num_counters != current number -> EAGAIN (xt_replace_table); old counters
                    written to tmp.counters, a failed write ignored as __do_replace does
  SET_ADD_COUNTERS  xt_copy_counters: len < sizeof(info) or
                    len - sizeof(info) != num_counters * 16 -> EINVAL;
                    lookup -> ENOENT; num_counters != current number -> EINVAL
Every command first checks CAP_NET_ADMIN of the caller (-> EPERM).

A SET_REPLACE the compiler cannot translate (EOPNOTSUPP naming the rule) is refused under the
default policy `reject`, and nothing changes. Under policy `xtables` (config.py, door helpers
only) the table is handed to the kernel's own xtables of the caller's namespace instead, and
while it is "delegated" GET_INFO, GET_ENTRIES and SET_ADD_COUNTERS are answered by the kernel's
table (passthrough.py, docs/policy.md).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
import time

from . import libc
from .caller import CallerMemory, netns_cookie, setns_net  # noqa: F401 (re-exported)
from .errors import BpfilterError, to_errno
from .frames import Reply, Request
# the option numbers live in xtopts (the door reads them without importing this module)
from .xtopts import (AF_INET, AF_INET6, CMD_NAMES, FILTER_CMDS, REVISION_CMDS,  # noqa: F401
                     SO_GET_ENTRIES, SO_GET_INFO, SO_NETNS_COOKIE, SO_SET_ADD_COUNTERS,
                     SO_SET_REPLACE, SOL_IP, SOL_IPV6, XT_EXTENSION_MAXNAMELEN,
                     XT_TABLE_MAXNAMELEN)



class _Log:
    """logging.getLogger("bpfilter"), looked up on first use: every `bpfilter exec` imports this
    module (CallerMemory, netns_cookie) and never logs, and importing logging (re, traceback,
    threading behind it) costs a door more than all its other imports."""

    def __getattr__(self, name):
        import logging
        return getattr(logging.getLogger("bpfilter"), name)


log = _Log()

GETINFO = struct.Struct("=32sI5I5III")                 # ipt_getinfo / ip6t_getinfo: 84
GET_ENTRIES_HDR = struct.Struct("=32sI4x")             # ipt_get_entries: 40 (entries 8-aligned)
REPLACE_HDR = struct.Struct("=32sIII5I5IIQ")           # ipt_replace: 96
COUNTERS_INFO_HDR = struct.Struct("=32sI4x")           # xt_counters_info: 40
XT_COUNTERS = struct.Struct("=QQ")                     # xt_counters
ENTRY_SIZE = {AF_INET: 112, AF_INET6: 168}             # sizeof(ipt_entry), sizeof(ip6t_entry)
COMEFROM_OFFSET = {AF_INET: 92, AF_INET6: 144}         # offsetof(ipt_entry / ip6t_entry, comefrom)
GET_REVISION = struct.Struct("=29sB")                  # xt_get_revision: 30
INT_MAX = 2**31 - 1
XT_TABLE_INFO_SIZE, XT_MAX_TABLE_SIZE = 64, 512 * 1024 * 1024
CAP_NET_ADMIN = 12


def cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("latin-1")


# ---------------------------------------------------------------------------------------------
# the host's bpf filesystem (the caller's memory and namespace: caller.py)

BPFFS = "/sys/fs/bpf"


def use_host_bpffs():
    """Make /sys/fs/bpf the host's bpf filesystem for this process.

    `ip netns exec` unshares the mount namespace and mounts a fresh sysfs on /sys, which hides
    the bpffs of /sys/fs/bpf; a bpffs mounted there afterwards would belong to that throwaway
    mount namespace, and the engine's pins (links included) would vanish with it when the
    helper exits, detaching the filter.  A bind mount cannot reach across mount namespaces
    (fs/namespace.c do_loopback: EINVAL), so the helper and the CLI join the mount namespace of
    the first process up the parent chain (or init) that has a bpffs at /sys/fs/bpf; the
    network namespace, the one thing that matters for the request, is unchanged."""
    from .kernel import is_bpffs
    if is_bpffs(BPFFS):
        return
    for pid in _ancestors() + [1]:
        try:
            if not is_bpffs(f"/proc/{pid}/root{BPFFS}"):
                continue
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
        except OSError:
            continue
        try:
            if libc.setns(fd, 0x00020000) != 0:      # CLONE_NEWNS
                e = libc.get_errno()
                raise BpfilterError(e, f"joining the mount namespace of {pid}: {os.strerror(e)}")
        finally:
            os.close(fd)
        return
    # no bpffs anywhere: the engine mounts one where it needs it


def _ancestors():
    out, pid = [], os.getpid()
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
        out.append(pid)
    return out


_capget = None
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def caller_has_net_admin(pid: int) -> bool:
    """CAP_NET_ADMIN in the caller's effective set, with capget(2) (kernel/capability.c: a
    task's sets by pid; ~2 us, where reading /proc/PID/status costs ~60 us of each of the 4
    requests of an iptables command). A caller that is gone has no capabilities."""
    global _capget
    if _capget is None:
        _capget = libc._function("capget")
    # struct __user_cap_header_struct {u32 version; int pid;}, then two
    # struct __user_cap_data_struct {u32 effective, permitted, inheritable;} (bits 0-31, 32-63)
    data = libc.char_buffer(24)
    if _capget(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, pid), data) != 0:
        return False
    return bool(struct.unpack_from("=I", data.raw)[0] >> CAP_NET_ADMIN & 1)


# ---------------------------------------------------------------------------------------------
# the tables of one network namespace

class Backend:
    """The filter table of one family in one netns: the codec's model plus the engine that
    installs it (counters live in the engine's BPF maps).

    The engine class is bpfilter_umh.engine.Engine unless BPFILTER_ENGINE names another
    ("module:Class"): the hook tests use to run the control plane against a stand-in."""
    name = "filter"

    def __init__(self, family: int):
        spec = os.environ.get("BPFILTER_ENGINE")
        if spec:
            import importlib
            mod, _, cls = spec.partition(":")
            engine_cls = getattr(importlib.import_module(mod), cls)
            self._open = lambda: engine_cls.open(family)  # noqa: E731
        else:
            from . import config
            from .engine import Engine
            # the flavor comes from /etc/bpfilter/flavors.conf (or BPFILTER_CONFIG); nf when unset
            self._open = lambda: Engine.open(  # noqa: E731
                family, flavor=config.load().flavor(family),
                xdp_mode=config.load().xdp_mode(family),
                offload=config.load().offload.get(config._family(family)))
        self.family = family
        self.delegation = None          # passthrough.Delegation in a door's helper
        self.engine = self._open()
        self._snap = None
        self._stamp = self._state_stamp()

    def _state_stamp(self):
        """Identity of the engine's state file: another process (`bpfilter flush`, a second
        helper) that changes the state replaces or removes it (engine.py writes it with
        os.replace), and the cached engine would then be stale."""
        path = getattr(self.engine, "state_path", None)
        out = []
        # the table file, and the add_counters base the engine keeps beside it (<fam>.counters)
        for p in (path, path[:-len(".table")] + ".counters") if path else ():
            try:
                st = os.stat(p)
            except OSError:
                out.append(None)
                continue
            out.append((st.st_ino, st.st_mtime_ns))
        return tuple(out) if path and out[0] is not None else None

    def refresh(self):
        """Re-adopt the installed state if someone else changed it since we last looked."""
        if self._state_stamp() != self._stamp:
            log.info("state of family %d changed outside this helper: re-adopting it",
                     self.family)
            self.engine = self._open()
            self._snap = None
            self._stamp = self._state_stamp()

    @property
    def table(self):
        return self.engine.table

    @property
    def delegated(self) -> bool:
        """The kernel's own xtables serve this table (policy xtables, passthrough.py)."""
        return self.delegation is not None and self.delegation.active

    def _snapshot(self):
        """The installed table encoded once (encode costs ~0.15 ms per rule): GET_INFO, the
        entry count and the GET_ENTRIES blob come from it, live counters patched in."""
        t = self.table
        if self._snap is None or self._snap[0] is not t:
            self._snap = self._kept_snapshot(t)
        if self._snap is None:
            # also lays out (Rule.offset is set); counters zero: entries_blob adds the live ones
            blob = t.encode(counters=[(0, 0)] * t.num_entries)
            self._snap = (t, blob, t.entries(), t.getinfo_bytes())
        return self._snap

    def _kept_snapshot(self, t):
        """The snapshot of a table adopted from the state file (engine._read_state), from the
        blob the kernel would keep, which the state holds: None for any other table."""
        kept, hooks = getattr(t, "kept_blob", None), getattr(t, "kept_hooks", None)
        if kept is None or hooks is None or getattr(t, "source_blob", None) is None:
            return None
        from .engine import _entry_count
        he, uf = hooks
        # hooks outside valid_hooks read 0xFFFFFFFF, as do_replace answers them
        vh = t.valid_hooks
        he = [v if vh >> h & 1 else 0xFFFFFFFF for h, v in enumerate(he)]
        uf = [v if vh >> h & 1 else 0xFFFFFFFF for h, v in enumerate(uf)]
        info = GETINFO.pack(t.name.encode(), vh, *he, *uf, _entry_count(t), len(kept))
        return (t, kept, None, info)

    @property
    def valid_hooks(self) -> int:
        return self.table.valid_hooks

    def getinfo(self) -> bytes:
        return self._snapshot()[3]

    def num_entries(self) -> int:
        if self._snap is not None and self._snap[0] is self.table:
            return GETINFO.unpack_from(self._snap[3])[12]     # ipt_getinfo.num_entries
        return self.table.num_entries      # no need to encode just to count

    def entries_blob(self) -> bytes:
        """The blob with the live counters: xt_counters is the last member of ipt_entry /
        ip6t_entry, and the blob holds zeros there, so only entries that counted are patched
        (their offsets found without listing the table's entries: engine.entry_offsets)."""
        t, blob, entries, _info = self._snapshot()
        counts = self.engine.counters_nonzero()
        if not counts:
            return blob
        if entries is not None:
            offs = {i: entries[i].offset for i in counts}
        else:
            from .engine import entry_offsets
            offs = entry_offsets(t, counts)
        back = ENTRY_SIZE[self.family] - XT_COUNTERS.size
        pack = XT_COUNTERS.pack_into
        out = bytearray(blob)
        for i, c in counts.items():
            pack(out, offs[i] + back, *c)
        return out

    def replace(self, table, blob: bytes, getinfo: bytes):
        """Install atomically; returns the counters of the replaced table at the swap.

        What GET_ENTRIES will return is derived from the caller's own blob instead of encoding
        the table again (~0.15 ms per rule): the kernel keeps the entries as given
        (ip_tables.c do_replace copies them, translate_table checks them) except comefrom,
        which mark_source_chains sets (the codec's normalized decode has it), and the counters,
        which start from zero. Extension payloads the kernel shows differently
        (xt_data_to_user) belong to extensions the compiler refuses, so none is installed.
        decode_replace has patched those two already (table.kept_blob)."""
        kept = getattr(table, "kept_blob", None)
        if kept is None or getattr(table, "source_blob", None) is None:
            out = bytearray(blob)
            for r in table.entries():
                struct.pack_into("=I", out, r.offset + COMEFROM_OFFSET[self.family], r.comefrom)
                XT_COUNTERS.pack_into(out, r.offset + ENTRY_SIZE[self.family] - XT_COUNTERS.size,
                                      0, 0)
            kept = bytes(out)
        try:
            old = self.engine.install(table)
        finally:
            self._stamp = self._state_stamp()
        self._snap = (table, kept, None, getinfo)     # table.entries(): on the first GET_ENTRIES
        return old

    def add_counters(self, counters, packed: bytes = None):
        """packed: the same counters as the request's struct xt_counters array, which the
        engine can store as they are."""
        try:
            self.engine.add_counters(counters, packed)
        finally:
            self._stamp = self._state_stamp()


class Dispatcher:
    """Serves requests; keeps one backend per (netns cookie, family).

    door=True: this helper serves `bpfilter exec` doors, so the kernel's own xtables are
    reachable from the caller's namespace and policy `xtables` may hand a table to them. The
    kernel shim's helper (door=False) must never do that: bpfilter.ko owns the socket-option
    range there, so the helper's own setsockopt would come back to itself."""

    def __init__(self, door: bool = False):
        use_host_bpffs()
        self.home_cookie = netns_cookie()
        self.backends = {}
        self.door = door

    def backend(self, cookie: int, family: int):
        key = (cookie, family)
        if key not in self.backends:
            be = self.backends[key] = Backend(family)
            if self.door:
                from .passthrough import Delegation
                be.delegation = Delegation(cookie, family)
        else:
            self.backends[key].refresh()
        return self.backends[key]

    def policy(self, family: int) -> str:
        if not self.door:
            return "reject"
        from . import config
        return config.load().policy(family)

    def serve(self, req: Request) -> Reply:
        # no automatic GC pass inside a request: a SET_REPLACE of 10 000 rules makes ~100 000
        # objects, and the passes they set off (each walking every young object) cost it
        # 30-60 ms; Engine.install collects once (the helper: after the reply, engine.AFTER_REPLY;
        # otherwise during the RCU wait), then freezes the survivors (gc.freeze). A request that
        # makes garbage cycles and installs nothing leaves them to the next automatic pass, after
        # it has answered. In a helper that queued work for after the reply, the GC comes back on
        # only once that work is done: turned on at once, the pass a SET_REPLACE's objects have
        # due runs at the next allocation, i.e. while the helper reads libiptc's SET_ADD_COUNTERS
        # (measured through the door at 10 000 rules: that request's round trip 72-154 ms, 1.4 ms
        # without it).
        import gc
        from . import engine
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._serve_timed(req)
        finally:
            if enabled and engine.AFTER_REPLY:
                engine.GC_HELD = True       # engine.run_after_reply turns it back on
            elif enabled:
                gc.enable()

    def _serve_timed(self, req: Request) -> Reply:
        import resource
        t0, f0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            if req.netns_cookie and req.netns_cookie != self.home_cookie:
                rep = self._serve_in_netns(req)
            else:
                rep = self._serve(req, self.home_cookie)
            # and the minor page faults the request took (~4.8 us each here: heap.py)
            log.debug("pid %d %s: %.1f ms, %d faults", req.pid,
                      CMD_NAMES.get((bool(req.is_set), req.cmd), req.cmd),
                      (time.perf_counter() - t0) * 1e3,
                      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            return rep
        except Exception as e:  # the one place failures become errno
            err = to_errno(e)
            # a refused SET_REPLACE is what an administrator needs to see (which rule, why);
            # failed reads are routine (iptables probes with GET_INFO, GET_REVISION)
            import logging
            level = logging.WARNING if req.is_set else logging.INFO
            log.log(level, "netns %d pid %d %s%s: %s", req.netns_cookie or self.home_cookie,
                    req.pid, "setsockopt " if req.is_set else "getsockopt ",
                    CMD_NAMES.get((bool(req.is_set), req.cmd), req.cmd), e)
            return Reply(-err, 0)

    def _serve_in_netns(self, req: Request) -> Reply:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            try:
                target = os.open(f"/proc/{req.pid}/ns/net", os.O_RDONLY)
            except OSError:
                raise BpfilterError(errno.ESRCH, f"caller {req.pid} is gone") from None
            try:
                setns_net(target)
            finally:
                os.close(target)
            if netns_cookie() != req.netns_cookie:
                raise BpfilterError(errno.ESRCH, f"caller {req.pid} changed namespace")
            return self._serve(req, req.netns_cookie)
        finally:
            setns_net(home)
            os.close(home)

    def _serve(self, req: Request, cookie: int) -> Reply:
        if req.family not in (AF_INET, AF_INET6):
            raise BpfilterError(errno.EAFNOSUPPORT, f"family {req.family}")
        if not caller_has_net_admin(req.pid):
            raise BpfilterError(errno.EPERM, f"caller {req.pid} lacks CAP_NET_ADMIN")
        mem = CallerMemory(req.pid)
        be = lambda: self.backend(cookie, req.family)  # noqa: E731
        rev_match, rev_target = REVISION_CMDS[req.family]
        if req.is_set:
            if req.cmd in (SO_SET_REPLACE, SO_SET_ADD_COUNTERS):
                # one writer at a time across every helper process (the kernel shim's and the
                # doors'), like xt[af].mutex in net/netfilter/x_tables.c: the backend re-adopts
                # the state under the lock, so a replace never builds on a stale table
                with state_lock(cookie):
                    if req.cmd == SO_SET_REPLACE:
                        return do_replace(be(), mem, req, self.policy(req.family))
                    return do_add_counters(be(), mem, req)
        else:
            if req.cmd == SO_GET_INFO:
                return get_info(be(), mem, req)
            if req.cmd == SO_GET_ENTRIES:
                return get_entries(be(), mem, req)
            if req.cmd in (rev_match, rev_target):
                # while the kernel holds the table (whatever the policy is now), iptables must
                # learn the kernel's revisions to print and rebuild the kernel's rules
                policy = self.policy(req.family)
                if self.door and policy != "xtables":
                    from .passthrough import Delegation     # no engine needed to know that
                    if Delegation(cookie, req.family).active:
                        policy = "xtables"
                return get_revision(mem, req, target=req.cmd == rev_target, policy=policy)
        # nf_sockopt_find: no registered range holds this optname
        raise BpfilterError(errno.ENOPROTOOPT, f"unknown socket option {req.cmd}")


STATE_ROOT = "/run/bpfilter"


_held = threading.local()


def _held_locks() -> set:
    """Cookies whose state lock this thread holds: flock is per open file, so taking it again
    through a second fd in the same thread would wait for ourselves."""
    if not hasattr(_held, "cookies"):
        _held.cookies = set()
    return _held.cookies


@contextlib.contextmanager
def state_lock(cookie: int):
    """flock on the namespace's state directory /run/bpfilter/<cookie> (the engine keeps its
    files there). Per namespace, not global like xt[af].mutex: a Python install takes
    milliseconds to seconds, and namespaces do not share tables. The directory is removed again
    if it is left empty (a refused request, a flush), so a waiter checks after locking that the
    directory it locked is still the one at that path, and otherwise locks again."""
    held = _held_locks()
    if cookie in held:
        yield           # re-entered by the same thread (an engine settling a crashed install)
        return
    d = os.path.join(STATE_ROOT, str(cookie))
    for _ in range(1000):
        os.makedirs(d, mode=0o700, exist_ok=True)
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(d).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise BpfilterError(errno.EBUSY, f"cannot lock {d}")
    held.add(cookie)
    try:
        yield
    finally:
        held.discard(cookie)
        try:
            os.rmdir(d)         # only succeeds when empty: nothing left behind
        except OSError:
            pass
        os.close(fd)            # releases the lock


def _lookup(be, name: str):
    if name != be.name:
        raise BpfilterError(errno.ENOENT, f"table {name!r} does not exist")


def get_info(be, mem: CallerMemory, req: Request) -> Reply:
    if req.len != GETINFO.size:
        raise BpfilterError(errno.EINVAL, f"GET_INFO length {req.len} != {GETINFO.size}")
    raw = mem.read(req.addr, XT_TABLE_MAXNAMELEN)
    _lookup(be, cstr(raw[:XT_TABLE_MAXNAMELEN - 1]))
    if be.delegated:
        mem.write(req.addr, be.delegation.kernel.getsockopt(SO_GET_INFO, raw, GETINFO.size))
        return Reply(0, req.len)
    mem.write(req.addr, be.getinfo())
    return Reply(0, req.len)


def get_entries(be, mem: CallerMemory, req: Request) -> Reply:
    if req.len < GET_ENTRIES_HDR.size:
        raise BpfilterError(errno.EINVAL, f"GET_ENTRIES length {req.len} too short")
    raw_name, size = GET_ENTRIES_HDR.unpack(mem.read(req.addr, GET_ENTRIES_HDR.size))
    if req.len != GET_ENTRIES_HDR.size + size:
        raise BpfilterError(errno.EINVAL, f"GET_ENTRIES length {req.len} != "
                                          f"{GET_ENTRIES_HDR.size} + size {size}")
    _lookup(be, cstr(raw_name[:XT_TABLE_MAXNAMELEN - 1]))
    if be.delegated:
        # the kernel checks size against its table (EAGAIN) before copying anything
        k = be.delegation.kernel
        if size != GETINFO.unpack(k.getinfo(be.name))[13]:
            raise BpfilterError(errno.EAGAIN, f"GET_ENTRIES size {size} != the kernel table's")
        out = k.getsockopt(SO_GET_ENTRIES, GET_ENTRIES_HDR.pack(raw_name, size), req.len)
        mem.write(req.addr + GET_ENTRIES_HDR.size, out[GET_ENTRIES_HDR.size:])
        return Reply(0, req.len)
    blob = be.entries_blob()
    if size != len(blob):
        raise BpfilterError(errno.EAGAIN, f"GET_ENTRIES size {size}, table has {len(blob)}")
    mem.write(req.addr + GET_ENTRIES_HDR.size, blob)
    return Reply(0, req.len)


def get_revision(mem: CallerMemory, req: Request, target: bool, policy: str = "reject") -> Reply:
    if req.len != GET_REVISION.size:
        raise BpfilterError(errno.EINVAL, f"GET_REVISION length {req.len} != {GET_REVISION.size}")
    raw, revision = GET_REVISION.unpack(mem.read(req.addr, GET_REVISION.size))
    name = cstr(raw[:XT_EXTENSION_MAXNAMELEN - 1])
    revs = supported_revisions(req.family, name, target)
    if not revs and policy == "xtables":
        # an extension the compiler has no revision of can only be enforced by the kernel's
        # xtables: its answer (x_tables.c xt_find_revision) lets iptables pick the revision the
        # kernel has. One the compiler has keeps the compiler's answer, so iptables picks a
        # revision bpfilter translates.
        from .passthrough import KernelXt
        KernelXt(req.family).revision(raw, revision, target)
        return Reply(0, req.len)
    if not revs:
        raise BpfilterError(errno.ENOENT, f"{'target' if target else 'match'} {name!r} unsupported")
    if revision not in revs:
        raise BpfilterError(errno.EPROTONOSUPPORT, f"{name!r} revision {revision} unsupported")
    return Reply(0, req.len)


def do_replace(be, mem: CallerMemory, req: Request, policy: str = "reject") -> Reply:
    if req.len < REPLACE_HDR.size:
        raise BpfilterError(errno.EINVAL, f"SET_REPLACE length {req.len} < sizeof(ipt_replace)")
    hdr_raw = mem.read(req.addr, REPLACE_HDR.size)
    (raw_name, valid_hooks, num_entries, size, *rest) = REPLACE_HDR.unpack(hdr_raw)
    num_counters, counters_ptr = rest[10], rest[11]
    if num_counters >= INT_MAX // XT_COUNTERS.size:
        raise BpfilterError(errno.ENOMEM, f"num_counters {num_counters} overflows")
    if num_counters == 0:
        raise BpfilterError(errno.EINVAL, "num_counters is 0")
    if req.len < REPLACE_HDR.size + size:
        raise BpfilterError(errno.EINVAL, f"SET_REPLACE length {req.len} < sizeof(ipt_replace)"
                                          f" + size {size}")
    if XT_TABLE_INFO_SIZE + size >= XT_MAX_TABLE_SIZE:
        raise BpfilterError(errno.ENOMEM, f"table size {size} too large")   # xt_alloc_table_info
    if size > max_table_size():
        # the kernel's 512 MiB allows ~3.5 million entries: decoded into Python objects that
        # would take gigabytes, so the helper refuses earlier, before reading the caller's buffer
        raise BpfilterError(errno.ENOMEM, f"table size {size} exceeds the helper's limit "
                                          f"{max_table_size()} (BPFILTER_MAX_TABLE_SIZE)")
    # the entries as the bytes object the decode keeps (table.source_blob): one copy of them
    # (and a block for the decode's copy of them, table.kept_blob, set aside meanwhile)
    from . import heap
    from .model import decode_replace
    try:
        blob = mem.read_bytes(req.addr + REPLACE_HDR.size, size, spare=True)
        hdr, table = decode_replace(hdr_raw, req.family, entries=blob)  # translate_table's checks
    finally:
        heap.drop_spare()
    _lookup(be, hdr.name)
    if valid_hooks != be.valid_hooks:
        raise BpfilterError(errno.EINVAL, f"valid_hooks {valid_hooks:#x} != {be.valid_hooks:#x}")
    delegated = be.delegated
    running = be.delegation.kernel.num_entries(be.name) if delegated else be.num_entries()
    if num_counters != running:
        raise BpfilterError(errno.EAGAIN, f"num_counters {num_counters} != {running} entries "
                                          f"in the running table"
                                          + (" (the kernel's xtables)" if delegated else ""))
    # translate_table: hook_entry/underflow of hooks outside valid_hooks stay 0xFFFFFFFF
    hooks = [v if valid_hooks >> (i % 5) & 1 else 0xFFFFFFFF for i, v in enumerate(rest[:10])]
    getinfo = GETINFO.pack(be.name.encode(), valid_hooks, *hooks, num_entries, size)
    try:
        old = be.replace(table, blob, getinfo)     # or nothing changed
    except BpfilterError as e:
        if e.errno != errno.EOPNOTSUPP or be.delegation is None or policy != "xtables":
            if e.errno == errno.EOPNOTSUPP:
                raise BpfilterError(e.errno, f"{e.message} (policy reject: nothing changed; "
                                             f"see docs/policy.md for policy xtables)") from None
            if delegated:
                raise BpfilterError(e.errno, f"{e.message} (the table stays with the kernel's "
                                             f"xtables)") from None
            raise
        old = be.delegation.hand_over(be, hdr_raw + blob, e)
    else:
        if delegated:
            old = be.delegation.take_back(be)
        heap.installed(size)        # (the heap its next appends take: topped up while idle)
    try:
        mem.write(counters_ptr, pack_counters(old))
    except BpfilterError as e:
        # __do_replace: the new table is in place already, a failed copy is not an error
        log.warning("could not return old counters to %d: %s", req.pid, e)
    return Reply(0, 0)


def do_add_counters(be, mem: CallerMemory, req: Request) -> Reply:
    if req.len < COUNTERS_INFO_HDR.size:
        raise BpfilterError(errno.EINVAL, f"ADD_COUNTERS length {req.len} too short")
    raw_name, num = COUNTERS_INFO_HDR.unpack(mem.read(req.addr, COUNTERS_INFO_HDR.size))
    if num * XT_COUNTERS.size != req.len - COUNTERS_INFO_HDR.size:
        raise BpfilterError(errno.EINVAL, f"ADD_COUNTERS: {num} counters in "
                                          f"{req.len - COUNTERS_INFO_HDR.size} bytes")
    data = mem.read(req.addr + COUNTERS_INFO_HDR.size, num * XT_COUNTERS.size)
    _lookup(be, cstr(raw_name[:XT_TABLE_MAXNAMELEN - 1]))
    if be.delegated:
        be.delegation.kernel.setsockopt(SO_SET_ADD_COUNTERS,
                                        COUNTERS_INFO_HDR.pack(raw_name, num) + data)
        return Reply(0, 0)
    if num != be.num_entries():
        raise BpfilterError(errno.EINVAL, f"ADD_COUNTERS: {num} counters for "
                                          f"{be.num_entries()} entries")
    be.add_counters(unpack_counters(data, num), data)
    return Reply(0, 0)


def pack_counters(counters) -> bytes:
    """[(pcnt, bcnt)] as an array of struct xt_counters (native u64s: array 'Q' is 8 bytes
    wherever the kernel's __u64 is, and fills from the pairs in C)."""
    if counters.count((0, 0)) == len(counters):
        return bytes(16 * len(counters))
    import array
    import itertools
    return array.array("Q", itertools.chain.from_iterable(counters)).tobytes()


# counters compared with zeros at once by unpack_counters: one bytes compare per block
_ZERO_BLOCK = 64 * XT_COUNTERS.size


def unpack_counters(data: bytes, num: int) -> list:
    """An array of `num` struct xt_counters -> [(pcnt, bcnt)]. Most entries of a large table
    never counted, and libiptc sends their zeros back: blocks of zeros are skipped with a bytes
    compare and share one (0, 0) (0.05 ms at 10 000 entries, 0.35 ms unpacking each; a list of
    one repeated (0, 0) is also what the engine's list.count finds zero entries in fastest)."""
    end = XT_COUNTERS.size * num
    zero = bytes(_ZERO_BLOCK)
    busy = [a for a in range(0, end, _ZERO_BLOCK)
            if data[a:min(a + _ZERO_BLOCK, end)] != zero[:min(_ZERO_BLOCK, end - a)]]
    if len(busy) * 4 > end // _ZERO_BLOCK + 1:
        return list(struct.iter_unpack("=QQ", data[:end]))
    out = [(0, 0)] * num
    unpack = XT_COUNTERS.unpack_from
    for a in busy:
        for off in range(a, min(a + _ZERO_BLOCK, end), XT_COUNTERS.size):
            c = unpack(data, off)
            if c[0] or c[1]:
                out[off // XT_COUNTERS.size] = c
    return out


def max_table_size() -> int:
    """The helper's cap on a SET_REPLACE's entries (bytes): 32 MiB (~200 000 rules) unless
    BPFILTER_MAX_TABLE_SIZE says otherwise; never above the kernel's XT_MAX_TABLE_SIZE."""
    try:
        cap = int(os.environ.get("BPFILTER_MAX_TABLE_SIZE", 32 << 20))
    except ValueError:
        cap = 32 << 20
    return min(cap, XT_MAX_TABLE_SIZE - XT_TABLE_INFO_SIZE - 1)


def supported_revisions(family: int, name: str, target: bool) -> set:
    """Revisions of an extension the compiler translates: what GET_REVISION admits to."""
    from . import extensions
    kind = extensions.TARGET if target else extensions.MATCH
    return {k[3] for k, e in extensions._registry.items()
            if k[0] == kind and k[1] == family and k[2] == name and e.compiled}
