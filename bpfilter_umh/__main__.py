"""The helper: `python3 -m bpfilter_umh` serves request frames on stdin and answers on stdout (the
channel the kernel shim starts it with); `python3 -m bpfilter_umh --listen` serves the doors of its
own network namespace (`bpfilter exec`) on the abstract unix socket "\\0bpfilter";
`python3 -m bpfilter_umh --door` serves one door on stdin/stdout (a door given flags starts its own
helper this way, so the flags hold for exactly its command).

Flags (config.py; a flag wins over /etc/bpfilter/flavors.conf): --flavor nf|tc|xdp,
--flavor-dev IFNAMES, --xdp-mode auto|native|generic, --offload IFNAME, --policy reject|xtables.
Policy xtables needs a door (--listen or --door): the kernel shim's helper always rejects
(docs/policy.md).

`python3 -m bpfilter_umh exec [FLAGS] [--] CMD ARGS` runs CMD under the door (door.exec_main);
`status`, `flush` and `helper` are the `bpfilter` command's (cli.py).

Both transports hand each frame to the same Dispatcher, one request at a time: requests are
serialized like the xtables lock serializes the kernel's replace (net/netfilter/x_tables.c
xt_find_table_lock holds xt[af].mutex).  In --listen mode the helper exits once it has had no
client for BPFILTER_IDLE_EXIT seconds (default 5; BPFILTER_IDLE_EXIT_BIG, default 600, while it
holds a table of 1 000 entries or more, which a new helper would take ~0.3-0.6 s to adopt and
compile again): all state is pinned by the engine, so the next door simply starts a new helper,
and nothing keeps running after a test (a test's namespace ends its processes).
"""
import ctypes
import errno
import os
import socket
import struct
import sys
import time

from .errors import BpfilterError
from . import heap
from .frames import (BPFILTER_CMD_ADOPT, BPFILTER_CMD_HOLD, HELPER_SOCKET, REQUEST, Reply,
                     Request, read_exact)
from .sockopt import log        # logging imported on first use: `exec` runs through here too

# ---- least privilege (issue #9) -----------------------------------------------------------------
# What the helper's work needs (include/uapi/linux/capability.h numbers):
#   CAP_NET_ADMIN 12  netfilter BPF links, programs of type NETFILTER
#   CAP_SYS_ADMIN 21  setns() into the caller's network namespace and the host mount namespace
#   CAP_SYS_PTRACE 19 process_vm_readv/writev of callers with more capabilities than it has
#   CAP_BPF 39, CAP_PERFMON 38   bpf(): maps, loads, pins, BTF
# Everything else (module loading, raw I/O, setuid, kill, chown, DAC override, net raw ...) is
# dropped from the effective, permitted, inheritable and bounding sets at start-up, so neither the
# helper nor anything it runs can use it.
NEEDED_CAPS = (12, 19, 21, 38, 39)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
SYS_capset = 126


def drop_capabilities(keep=NEEDED_CAPS):
    libc = ctypes.CDLL(None, use_errno=True)
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if cap not in keep:
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)      # EPERM without CAP_SETPCAP: fine
    mask = sum(1 << c for c in keep)
    with open("/proc/self/status") as f:
        eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    mask &= eff                                         # cannot gain what we do not have
    hdr = struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = struct.pack("=6I", mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0,
                       mask >> 32, mask >> 32, 0)      # {effective, permitted, inheritable} x2
    if libc.syscall(SYS_capset, hdr, data) != 0:
        e = ctypes.get_errno()
        log.warning("could not drop capabilities: %s", os.strerror(e))


def peer_allowed(conn: socket.socket) -> bool:
    """Only a peer with CAP_NET_ADMIN may speak to the helper: the abstract socket has no file
    permissions, and a request names a pid and addresses whose memory the helper writes, so an
    unprivileged process must not be able to forge one (the kernel shim's channel is the
    helper's stdin, which only the kernel holds)."""
    from .sockopt import caller_has_net_admin
    pid, _uid, _gid = struct.unpack("=iII", conn.getsockopt(socket.SOL_SOCKET,
                                                            socket.SO_PEERCRED, 12))
    return caller_has_net_admin(pid)


# work an install leaves for after its reply (engine.AFTER_REPLY: freeing the replaced table;
# the RCU wait's end and the counts the replaced programs made meanwhile, the gc.freeze, the
# next install's counters map; a GC pass over the whole heap waits for an idle moment:
# _full_pass_if_due) starts once no request has come for this long, or when the command
# has ended (serve_listen: its door went away): libiptc sends SET_ADD_COUNTERS right after
# SET_REPLACE returns, and that one should not wait behind a GC pass.
# BPFILTER_AFTER_REPLY_IDLE=-1: no queue (the engine waits for the RCU grace period before its
# reply, collecting meanwhile). It takes the work off the requests, not off the machine: on a
# busy 2-CPU host an append's wall time stays about the same.
AFTER_REPLY_IDLE = 0.03
try:
    AFTER_REPLY_IDLE = float(os.environ.get("BPFILTER_AFTER_REPLY_IDLE", AFTER_REPLY_IDLE))
except ValueError:
    pass


# past this many queued items (two per install: the replaced table, Engine._after_install) the
# work is done at once: a burst of commands with no idle gap must not keep old tables alive
# unbounded
AFTER_REPLY_MAX = 6


def _after_reply_pending() -> int:
    """0: nothing queued; 1: queued, wait for an idle moment; 2: queued past AFTER_REPLY_MAX."""
    engine = sys.modules.get(__package__ + ".engine")
    n = len(engine.AFTER_REPLY) if engine is not None and engine.AFTER_REPLY else 0
    return 0 if not n else 2 if n > AFTER_REPLY_MAX else 1


def _run_after_reply():
    engine = sys.modules.get(__package__ + ".engine")
    if engine is None:
        return
    try:
        engine.run_after_reply()
    except Exception as e:      # noqa: BLE001 - a GC pass or a free: never fatal to serving
        log.warning("work after the reply failed: %s", e)


# serve_stdio: how long no request must come before a due GC pass runs (serve_listen: its
# select's idle timeout, the same)
IDLE_PASS_AFTER = 0.5


def _full_pass_pending() -> bool:
    engine = sys.modules.get(__package__ + ".engine")
    return engine is not None and hasattr(engine, "full_pass_due") and engine.full_pass_due()


def _full_pass_if_due() -> bool:
    """The GC pass over the whole heap, when the engine says the process has grown
    (engine._collect_and_freeze): here, where no request has come for the select's idle
    timeout and no door is connected, rather than after the reply of whichever command made it
    due, where the next command (~2 ms later) would wait behind it."""
    if not _full_pass_pending():
        return False
    engine = sys.modules[__package__ + ".engine"]
    t0 = time.perf_counter()
    try:
        found = engine.full_pass_if_due()
    except Exception as e:      # noqa: BLE001 - a GC pass: never fatal to serving
        log.warning("GC pass failed: %s", e)
        return False
    log.debug("GC pass while idle: %s unreachable, %.1f ms", found,
              (time.perf_counter() - t0) * 1e3)
    return True


def serve_stdio(dispatcher) -> int:
    import select
    rd = lambda n: os.read(0, n)  # noqa: E731
    while True:
        while _idle_work and not select.select([0], [], [], 0)[0] and _idle_step():
            pass
        pending = _after_reply_pending()
        if pending == 2 or pending and not select.select([0], [], [], AFTER_REPLY_IDLE)[0]:
            _run_after_reply()
        if _full_pass_pending() and not select.select([0], [], [], IDLE_PASS_AFTER)[0]:
            _full_pass_if_due()
        if heap.held() and not select.select([0], [], [], heap.RELEASE_IDLE)[0]:
            heap.release_if_small(dispatcher)
        try:
            buf = read_exact(rd, REQUEST.size)
            if not buf:
                return 0
            req = Request.unpack(buf)
        except BpfilterError as e:
            # a torn or foreign frame: the stream cannot be resynchronized, so stop
            log.error("bad frame on stdin: %s", e)
            return 1
        rep = dispatcher.serve(req)
        data = rep.pack()
        while data:
            data = data[os.write(1, data):]
        _queue_topup()


def _recv_frame(conn: socket.socket):
    """One request frame from a door's connection, and the descriptors passed with it
    (SCM_RIGHTS: bin/bpfilter-exec's listener). (b"", []) at a clean end of stream."""
    fds = []

    def read(k: int) -> bytes:
        data, anc, _flags, _addr = conn.recvmsg(k, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"={len(cdata) // 4}i", cdata[:len(cdata) // 4 * 4]))
        return data
    try:
        buf = read_exact(read, REQUEST.size)
    except BaseException:
        _close_all(fds)
        raise
    if not buf:
        _close_all(fds)
        return b"", []
    return buf, fds


def _close_all(fds):
    for fd in fds:
        os.close(fd)


class _DispatcherLink:
    """The link of a Door served inside the helper: its requests go to the dispatcher
    directly (doorserve.Door's `helper`)."""

    def __init__(self, dispatcher):
        self.call = dispatcher.serve

    def close(self):
        pass


def _adopt(dispatcher, req: Request, fds):
    """A door's seccomp listener to serve here (BPFILTER_CMD_ADOPT, bin/bpfilter-exec.c), or
    the error to reply. The descriptor must be a seccomp listener: NOTIF_ID_VALID of id 0 fails
    ENOENT there and ENOTTY (or EINVAL) on anything else (kernel/seccomp.c
    seccomp_notify_ioctl)."""
    from fcntl import ioctl
    from .doorserve import SECCOMP_IOCTL_NOTIF_ID_VALID, Door
    if len(fds) != 1:
        raise BpfilterError(errno.EINVAL, f"adopt: {len(fds)} descriptors, want 1")
    try:
        ioctl(fds[0], SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", 0))
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise BpfilterError(errno.EBADF, "adopt: not a seccomp listener") from None
    door = Door(fds.pop(), _DispatcherLink(dispatcher))
    door.trace = None       # BPFILTER_DOOR_TRACE is a door process's file, written at its end
    return door


# How long a --listen helper stays without a client. A helper holding a big table stays longer:
# a new one needs ~0.2 s to start (interpreter, modules, engine.warm_up) and ~0.15 s more to
# adopt a 10 000-rule table from the state file before its first command is answered, then
# compiles that table anew on its first change (measured at 10 000 rules: one iptables -A
# through a new helper 0.35 s for a blocklist and 0.55 s for a fan-out, 35-47 ms through a
# running one).
# BPFILTER_IDLE_EXIT set alone holds for every table (tests and benches set it).
IDLE_EXIT = 5.0
IDLE_EXIT_BIG = 600.0


def idle_exit() -> tuple:
    """(seconds idle before exiting, the same while holding a table of heap.SMALL_TABLE
    entries or more): BPFILTER_IDLE_EXIT and BPFILTER_IDLE_EXIT_BIG."""
    small = os.environ.get("BPFILTER_IDLE_EXIT")
    big = os.environ.get("BPFILTER_IDLE_EXIT_BIG")
    if big is None:
        big = small if small is not None else IDLE_EXIT_BIG
    return float(small if small is not None else IDLE_EXIT), float(big)


def serve_listen(dispatcher, idle: float, idle_big: float = None) -> int:
    import selectors
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        srv.bind(HELPER_SOCKET)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:     # another helper serves this netns already
            return 0
        raise
    srv.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    clients = 0
    ended = False           # a door went away since the last pass
    last = time.monotonic()
    log.info("helper %d serving netns cookie %d", os.getpid(), dispatcher.home_cookie)
    while True:
        _queue_topup()          # (after a request served here or by an adopted door)
        pending = _after_reply_pending()
        # the last door gone and nothing waiting: the command that queued the work has ended
        # (a door closes its connection, an adopted listener hangs up, at its command's end),
        # so its work need not wait for AFTER_REPLY_IDLE; the next command's first request
        # (bin/bpfilter-exec: ~2 ms later) finds it done or nearly. What that work queues
        # again (a wait not over yet) waits for AFTER_REPLY_IDLE.
        if pending == 2 or pending and ended and clients == 0 and not sel.select(timeout=0):
            _run_after_reply()
            pending = _after_reply_pending()
        ended = False
        events = sel.select(timeout=0 if _idle_work else AFTER_REPLY_IDLE if pending else 0.5)
        now = time.monotonic()
        if not events:
            if _idle_step():
                continue
            if pending:
                _run_after_reply()
                continue
            if clients == 0 and _full_pass_if_due():
                continue
            if clients == 0 and now - last >= heap.RELEASE_IDLE and \
                    heap.release_if_small(dispatcher):
                continue
            if clients == 0 and now - last >= idle and (
                    idle_big is None or now - last >= idle_big or
                    heap.installed_entries(dispatcher) < heap.SMALL_TABLE):
                srv.close()
                log.info("helper %d idle for %.1fs, exiting", os.getpid(), now - last)
                return 0
            continue
        last = now
        for key, _ in events:
            if key.fileobj is srv:
                conn, _addr = srv.accept()
                sel.register(conn, selectors.EVENT_READ, data=bool(peer_allowed(conn)))
                clients += 1
                continue
            if not isinstance(key.data, bool):
                # an adopted door's listener: a client until no task uses its filter
                door = key.data
                try:
                    if door.serve_ready():
                        continue
                except (OSError, BpfilterError) as e:
                    log.warning("dropping an adopted door: %s", e)
                sel.unregister(door.listener)
                os.close(door.listener)
                clients -= 1
                ended = True
                continue
            conn = key.fileobj
            fds = []
            try:
                buf, fds = _recv_frame(conn)
                if buf:
                    req = Request.unpack(buf)
                    if not key.data:
                        log.warning("refusing a request from a peer without CAP_NET_ADMIN")
                        conn.sendall(Reply(-errno.EPERM, 0).pack())
                        continue
                    if req.cmd == BPFILTER_CMD_HOLD:
                        # accepted: this connection keeps the helper from exiting idle
                        conn.sendall(Reply(0, 0).pack())
                        continue
                    if req.cmd == BPFILTER_CMD_ADOPT:
                        try:
                            door = _adopt(dispatcher, req, fds)
                        except BpfilterError as e:
                            log.warning("refusing a door's listener: %s", e.message)
                            conn.sendall(Reply(-e.errno, 0).pack())
                            continue
                        sel.register(door.listener, selectors.EVENT_READ, data=door)
                        clients += 1
                        conn.sendall(Reply(0, 0).pack())
                        continue
                    conn.sendall(dispatcher.serve(req).pack())
                    continue
            except (OSError, BpfilterError) as e:
                log.warning("dropping a door connection: %s", e)
            finally:
                for fd in fds:          # passed with anything but an adopted listener
                    os.close(fd)
            sel.unregister(conn)
            conn.close()
            clients -= 1
            ended = True


def preload():
    """Import what serving a request imports lazily (the engine, compiler, model and codec:
    100-200 ms), now instead of inside the first request: the request-serving modules import
    lazily so that `bpfilter exec` and the CLI stay light, but the helper needs them all."""
    import importlib
    try:
        for name in ("config", "engine", "passthrough"):
            importlib.import_module("." + name, __package__)
        # and what the first install would do on first use (cffi's type parsing, the kernel
        # feature probes, the kernel facts): engine.warm_up
        sys.modules[__package__ + ".engine"].warm_up()
        # the bytes layout heap.new_bytes checks once (the first SET_REPLACE's buffer)
        heap.can_write()
    except Exception as e:     # noqa: BLE001 - the request that needs it reports the error
        log.warning("preloading the request handlers failed: %s", e)


# short steps of work a helper runs only while no request waits: iterators, each next() one step
_idle_work = []


def queue_start_work(dispatcher=None, listen: bool = False):
    """What a new helper does in its first idle moments instead of at its start: faulting in
    the heap its first restore and appends take their memory from (heap.reserve_steps: ~12 000
    page faults, ~60 ms here). A door that starts the helper waits for its socket, bound after
    preload, so done there it would delay every first command; done in steps between requests
    it runs before the first command when the helper was started ahead of it, or while
    iptables-restore parses its input between GET_ENTRIES and SET_REPLACE (libiptc reads the
    table at "*filter" and sends it back at COMMIT: ~30 ms at 10 000 rules), in another
    process. A request that comes meanwhile waits for one step at most. Before it, what a new
    helper's first command would otherwise set up inside its requests (_first_command_steps)."""
    _idle_work.append(_first_spare_step())
    if dispatcher is not None:
        _idle_work.append(_first_command_steps(dispatcher, listen))
    _idle_work.append(heap.reserve_steps())


def _first_spare_step():
    """The first two installs' counters maps (engine.make_first_spare): queued to the engine's
    worker thread first, so the kernel's allocations (~25-50 ms each at 32 768 entries) run
    beside the steps below, not inside the first restore and the command after it."""
    engine = sys.modules.get(__package__ + ".engine")
    if engine is not None and hasattr(engine, "make_first_spare"):
        engine.make_first_spare()
        log.debug("set up while idle: the first two installs' counters maps (%d entries each)",
                  engine.first_spare_entries())
    yield


def _first_command_steps(dispatcher, listen: bool):
    """What the first command of a new helper would otherwise pay for inside its requests,
    ~1 ms each here: in a --listen helper, the import of doorserve (and of caller.py behind
    it), which the first BPFILTER_CMD_ADOPT of bin/bpfilter-exec made (_adopt serves the
    listener with doorserve.Door); the IPv4 backend of the helper's own namespace, which the
    first GET_INFO made (Engine.open: the empty table, or the state a previous helper pinned
    and the pending install it may have left, settled as that request would); and the table
    encoded once, which GET_INFO answers from. It is the backend a request of this namespace
    gets (Dispatcher.backend keys it by the home cookie); a state changed after this is
    re-adopted at the next request (Backend.refresh). A failure here is left for the request
    that needs it to report. Only IPv4: iptables is the common first command, and an IPv6
    backend nobody asks for would hold its table for nothing."""
    if listen:
        from . import doorserve  # noqa: F401
        yield
    from .xtopts import AF_INET
    backend = dispatcher.backend(dispatcher.home_cookie, AF_INET)
    yield
    backend.getinfo()           # Backend._snapshot: 0.35 ms for the empty table
    log.debug("set up while idle: %sthe IPv4 table (%d entries)",
              "the door's serving code, " if listen else "", backend.table.num_entries)


def _queue_topup():
    """After a request: the heap a big table's next appends take, faulted in while idle, when
    that request read a table of a bigger size class than any before (heap.topup_steps)."""
    if heap.topup_due():
        _idle_work.append(heap.topup_steps())


def _idle_step() -> bool:
    """Run one step of the idle work; False when none is left."""
    while _idle_work:
        try:
            next(_idle_work[0])
            return True
        except StopIteration:
            _idle_work.pop(0)
        except Exception as e:      # noqa: BLE001 - a warm-up: never fatal to serving
            log.warning("work while idle failed: %s", e)
            _idle_work.pop(0)
    return False


USAGE = ("usage: python3 -m bpfilter_umh [--listen | --door] [--flavor nf|tc|xdp] "
         "[--flavor-dev IFNAMES] [--xdp-mode MODE] [--offload IFNAME] "
         "[--policy reject|xtables]\n"
         "       python3 -m bpfilter_umh exec [FLAGS] [--] CMD [ARGS]\n"
         "       python3 -m bpfilter_umh status|flush ...")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exec"]:
        from .door import exec_main
        return exec_main(argv[1:])
    if argv[:1] and argv[0] in ("status", "flush", "helper"):
        from .cli import main as cli_main
        return cli_main(argv)
    import logging
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("BPFILTER_LOG", "INFO"),
                        format="bpfilter[%(process)d] %(levelname)s %(message)s")
    from . import config
    try:
        mode = config.set_flags(argv)   # every config.load() of this helper applies them
    except BpfilterError as e:
        print(f"bpfilter: {e.message}\n{USAGE}", file=sys.stderr)
        return 2
    if mode not in ([], ["--listen"], ["--door"]):
        print(USAGE, file=sys.stderr)
        return 2
    from .sockopt import Dispatcher
    os.umask(0o077)                     # state files, logs and pins: root-only
    # joins the host mount namespace first (CAP_SYS_ADMIN); only a door's helper may hand a
    # table to the kernel's xtables (policy xtables): under the kernel shim they are not there
    dispatcher = Dispatcher(door=bool(mode))
    heap.configure()                    # before preload starts the engine's threads
    if os.environ.get("BPFILTER_KEEP_CAPS") != "1":
        drop_capabilities()
    preload()
    engine = sys.modules.get(__package__ + ".engine")
    if engine is not None and AFTER_REPLY_IDLE >= 0:
        engine.AFTER_REPLY = []         # this process answers requests: see AFTER_REPLY_IDLE
    if engine is not None:
        queue_start_work(dispatcher, listen=mode == ["--listen"])
    if mode == ["--listen"]:
        return serve_listen(dispatcher, *idle_exit())
    return serve_stdio(dispatcher)      # the kernel shim's channel, or one door's (--door)


if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["exec"]:
        from .door import leave
        leave(code)
    sys.exit(code)
