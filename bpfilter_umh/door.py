"""The user-space door: `bpfilter exec -- CMD` runs CMD with its iptables socket options trapped by
seccomp user notification and served by the helper of the caller's network namespace.

How (kernel/seccomp.c):
  - the child installs a classic-BPF filter (SECCOMP_SET_MODE_FILTER with
    SECCOMP_FILTER_FLAG_NEW_LISTENER) that returns SECCOMP_RET_USER_NOTIF for
      getsockopt/setsockopt at SOL_IP with optname 64..67 (IPT_SO_*) and at SOL_IPV6 with 64, 65,
      68, 69 (IP6T_SO_*: 66/67 are IPV6_RECVTCLASS/IPV6_TCLASS, so ip6_tables.h moved the revision
      options to 68/69), and every openat (a filter cannot read the path);
    it passes the listener fd to the parent over a socketpair (SCM_RIGHTS), then execs CMD, so
    every descendant of CMD inherits the filter;
  - the parent receives each notification (zeroed struct, as seccomp_notify_recv requires), checks
    SECCOMP_IOCTL_NOTIF_ID_VALID before touching the caller's memory (the caller may have died and
    its pid been reused), and
      * for an IPT_SO_GET_INFO/GET_ENTRIES/SET_REPLACE/SET_ADD_COUNTERS naming a table other than
        "filter" replies SECCOMP_USER_NOTIF_FLAG_CONTINUE: the kernel's xtables serves nat, mangle,
        raw, security as before;
      * for openat of /proc/net/ip_tables_names (ip6_tables_names) injects a memfd listing the
        kernel's tables plus "filter" (SECCOMP_IOCTL_NOTIF_ADDFD with SECCOMP_ADDFD_FLAG_SEND),
        because iptables-save reads the table names from there; every other openat continues;
      * otherwise forwards a request frame to the helper of this netns and replies its status;
        for getsockopt the door itself reads *optlen before and writes it back after, as
        ip_getsockopt does around nf_getsockopt.
The helper is found through the abstract unix socket "\\0bpfilter" (abstract names are per network
namespace) and started on demand if absent, the user-space equivalent of request_module.  It exits
on its own when idle (BPFILTER_IDLE_EXIT seconds, default 5), so nothing stays running; all state
is pinned by the engine, and the next helper adopts it.  Each request carries the netns cookie of
the *caller* (CMD may have moved to another namespace), and the helper serves it there.

A door given flags (`bpfilter exec --flavor tc --policy xtables -- CMD`, config.py) does not use
the shared helper, which may be running with other settings: it starts a helper of its own
(`python3 -m bpfilter_umh --door FLAGS`) on a socketpair, which exits when the door closes it.
The state lock and the state files keep both helpers consistent (sockopt.state_lock).

Cost (issue #8): a door runs once per iptables command, so what it pays is interpreter start-up
and imports, not the requests (each trapped call is a ~20 us round trip, a helper reply of an
empty table ~1 ms). It imports the standard library and errors, frames, sockopt only (config.py
only when flags are given; tests/test_door_lean.py holds it to that), so `python3 -S -m
bpfilter_umh exec -- CMD` runs from the checkout without site-packages. The helper imports
everything a request needs before it serves (__main__.preload) and stays between commands.
openat is trapped for every path (a filter cannot read one), but iptables opens ~7 files (ld.so,
its libraries, the table names): ~0.15 ms per command.

Limits: only x86_64 system calls are trapped (a 32-bit iptables binary would reach the kernel's
xtables directly); CMD's descendants that outlive it keep the door open until they exit.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

from .errors import BpfilterError, to_errno
from .frames import REPLY, Reply, Request, read_exact
from .sockopt import FILTER_CMDS, SOL_IP, SOL_IPV6, CallerMemory, netns_cookie, setns_net

HELPER_SOCKET = b"\0bpfilter"

# kernel/seccomp.c and include/uapi/linux/seccomp.h
SYS_setsockopt, SYS_getsockopt, SYS_openat, SYS_seccomp = 54, 55, 257, 317
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SEND = 1 << 1
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100      # _IOWR('!', 0, struct seccomp_notif)
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101      # _IOWR('!', 1, struct seccomp_notif_resp)
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103     # _IOW('!', 3, struct seccomp_notif_addfd)

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
# struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
NOTIF = struct.Struct("=QIIiIQ6Q")
NOTIF_RESP = struct.Struct("=QqiI")       # id, val, error, flags
NOTIF_ADDFD = struct.Struct("=QIIII")     # id, flags, srcfd, newfd, newfd_flags

# classic BPF (include/uapi/linux/filter.h)
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
O_CLOEXEC = 0o2000000

TABLE_NAMES_FILES = {"/proc/net/ip_tables_names": "/proc/net/ip_tables_names",
                     "/proc/self/net/ip_tables_names": "/proc/net/ip_tables_names",
                     "/proc/net/ip6_tables_names": "/proc/net/ip6_tables_names",
                     "/proc/self/net/ip6_tables_names": "/proc/net/ip6_tables_names"}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _ioctl(fd: int, req: int, buf) -> int:
    return _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(req), buf))


def seccomp_filter() -> bytes:
    """The classic-BPF program, as sock_filter {u16 code; u8 jt; u8 jf; u32 k} with jumps
    written to labels and resolved to the relative offsets classic BPF wants."""
    # seccomp_data offsets: nr 0, arch 4, args[i] low word at 16 + 8 * i (little endian)
    prog = [
        ("ld", 4, None, None),
        ("jeq", AUDIT_ARCH_X86_64, None, "allow"),
        ("ld", 0, None, None),
        ("jeq", SYS_openat, "notify", None),
        ("jeq", SYS_getsockopt, "level", None),
        ("jeq", SYS_setsockopt, "level", "allow"),
        ("level:ld", 24, None, None),                 # level = args[1]
        ("jeq", SOL_IPV6, "ip6", None),
        ("jeq", SOL_IP, None, "allow"),
        ("ld", 32, None, None),                       # optname = args[2]
        ("jge", 64, None, "allow"),
        ("jge", 68, "allow", "notify"),
        ("ip6:ld", 32, None, None),
        ("jeq", 64, "notify", None),
        ("jeq", 65, "notify", None),
        ("jeq", 68, "notify", None),
        ("jeq", 69, "notify", "allow"),
        ("notify:ret", SECCOMP_RET_USER_NOTIF, None, None),
        ("allow:ret", SECCOMP_RET_ALLOW, None, None),
    ]
    labels = {op.split(":")[0]: i for i, (op, *_r) in enumerate(prog) if ":" in op}
    codes = {"ld": BPF_LD_W_ABS, "jeq": BPF_JEQ_K, "jge": BPF_JGE_K, "ret": BPF_RET_K}
    out = []
    for i, (op, k, jt, jf) in enumerate(prog):
        rel = lambda lbl: 0 if lbl is None else labels[lbl] - i - 1  # noqa: E731
        out.append(struct.pack("=HBBI", codes[op.split(":")[-1]], rel(jt), rel(jf), k))
    return b"".join(out)


def install_filter() -> int:
    """Install the filter on the calling process; returns the listener fd."""
    code = seccomp_filter()
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("=H6xQ", len(code) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    return _check(_libc.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                                SECCOMP_FILTER_FLAG_NEW_LISTENER, fbuf))


# ---------------------------------------------------------------------------------------------
# the helper connection


def helper_argv():
    return [sys.executable, "-m", "bpfilter_umh", "--listen"]


def _log_path() -> str:
    d = "/run/bpfilter"
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)          # the helper's state and log are root-only (issue #9)
    return os.path.join(d, "helper.log")


def connect_helper(timeout: float = 10.0) -> socket.socket:
    """Connect to this netns's helper, starting it if absent (like request_module, on demand)."""
    deadline = time.monotonic() + timeout
    spawned = False
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(HELPER_SOCKET)
            return s
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
        if not spawned:
            spawn_helper()
            spawned = True
        if time.monotonic() > deadline:
            raise BpfilterError(errno.EHOSTDOWN, "the bpfilter helper did not start")
        time.sleep(0.01)


def spawn_helper():
    """Start a detached helper in this netns; it binds the abstract socket or exits if another
    helper already did (two doors racing both spawn, one wins)."""
    import subprocess       # only when a helper must be started: not on every command's path
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(os.open(_log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        os.fchmod(log.fileno(), 0o600)      # also a log an older version created 0644
        subprocess.Popen(helper_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=log, env=env, start_new_session=True, close_fds=True)


def spawn_private_helper(flags) -> tuple:
    """A helper serving only this door, with `flags` over the config file: its stdin and
    stdout are one end of a socketpair. Returns (our end, the process)."""
    import subprocess
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        with open(os.open(_log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                  "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "bpfilter_umh", "--door", *flags],
                                    stdin=theirs, stdout=theirs, stderr=log, env=env,
                                    start_new_session=True, close_fds=True)
    finally:
        theirs.close()
    ours.set_inheritable(False)
    return ours, proc


class HelperLink:
    """The door's side of the frame stream to the helper; reconnects once if the helper left
    (it exits when idle, possibly between two requests of one long CMD). With flags, the
    helper is this door's own (spawn_private_helper)."""

    def __init__(self, flags=()):
        self.sock = None
        self.flags = list(flags)
        self.proc = None

    def _connect(self) -> socket.socket:
        if not self.flags:
            return connect_helper()
        self._reap()
        sock, self.proc = spawn_private_helper(self.flags)
        return sock

    def _reap(self):
        if self.proc is not None:
            import subprocess       # already imported by spawn_private_helper
            try:
                self.proc.wait(timeout=10)      # it exits on EOF of its stdin
            except subprocess.TimeoutExpired:
                self.proc.kill()                # our own child, by its pid
                self.proc.wait()
            self.proc = None

    def call(self, req: Request) -> Reply:
        for attempt in (0, 1):
            if self.sock is None:
                self.sock = self._connect()
            try:
                self.sock.sendall(req.pack())
                buf = read_exact(self.sock.recv, REPLY.size)
                if buf:
                    return Reply.unpack(buf)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.sock.close()
            self.sock = None
        raise BpfilterError(errno.EIO, "the bpfilter helper went away during a request")

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._reap()


# ---------------------------------------------------------------------------------------------
# the notification loop


def _netns_ino(pid) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        raise BpfilterError(errno.ESRCH, f"caller {pid} is gone") from None


def _table_names_memfd(kernel_file: str) -> int:
    """A memfd listing the kernel's own tables of this netns plus "filter" (served by bpfilter),
    in the kernel's format: one name per line (net/netfilter/x_tables.c xt_table_seq_show)."""
    try:
        with open(kernel_file) as f:
            names = [n for n in f.read().split() if n != "filter"]
    except OSError:
        names = []
    # the kernel lists the most recently registered table first; filter exists from the start
    data = "".join(n + "\n" for n in names + ["filter"]).encode()
    fd = os.memfd_create("bpfilter-tables", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class Door:
    def __init__(self, listener: int, flags=()):
        self.listener = listener
        self.helper = HelperLink(flags)
        self.cookies = {_netns_ino("self"): netns_cookie()}

    def caller_cookie(self, pid: int) -> int:
        """The caller's network namespace: usually the door's own, but CMD may have moved
        (`bpfilter exec -- ip netns exec X iptables ...`); the helper then serves the request
        in the caller's namespace (it setns()es to /proc/PID/ns/net and checks the cookie)."""
        ino = _netns_ino(pid)
        if ino not in self.cookies:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
                try:
                    setns_net(target)
                    self.cookies[ino] = netns_cookie()
                finally:
                    setns_net(home)
                    os.close(target)
            finally:
                os.close(home)
        return self.cookies[ino]

    def id_valid(self, nid: int) -> bool:
        try:
            _ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.byref(ctypes.c_uint64(nid)))
            return True
        except OSError:
            return False

    def respond(self, nid: int, val: int = 0, error: int = 0, flags: int = 0):
        buf = ctypes.create_string_buffer(NOTIF_RESP.pack(nid, val, error, flags), NOTIF_RESP.size)
        try:
            _ioctl(self.listener, SECCOMP_IOCTL_NOTIF_SEND, buf)
        except OSError as e:
            if e.errno != errno.ENOENT:    # the caller died meanwhile: nothing to answer
                raise

    def recv(self):
        buf = ctypes.create_string_buffer(NOTIF.size)   # zeroed, as NOTIF_RECV requires
        try:
            _ioctl(self.listener, SECCOMP_IOCTL_NOTIF_RECV, buf)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR):   # the caller died before we got it
                return None
            raise
        nid, pid, _flags, nr, _arch, _ip, *args = NOTIF.unpack(buf.raw)
        return nid, pid, nr, args

    def serve_one(self):
        got = self.recv()
        if got is None:
            return
        nid, pid, nr, args = got
        try:
            if nr == SYS_openat:
                self.openat(nid, pid, args)
            else:
                self.sockopt(nid, pid, nr, args)
        except Exception as e:   # never leave the caller blocked
            self.respond(nid, error=-to_errno(e))

    def openat(self, nid, pid, args):
        mem = CallerMemory(pid)
        try:
            path = mem.read_cstring(args[1], 64)
        except (OSError, BpfilterError):
            path = None          # not ours to judge: let the kernel answer it
        if not self.id_valid(nid):
            return
        target = TABLE_NAMES_FILES.get(path) if path else None
        if target is None:
            self.respond(nid, flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            return
        # the caller's own view: /proc/PID/net is the network namespace of PID
        fd = _table_names_memfd(target.replace("/proc/net/", f"/proc/{pid}/net/"))
        try:
            flags = O_CLOEXEC if args[2] & O_CLOEXEC else 0
            buf = ctypes.create_string_buffer(
                NOTIF_ADDFD.pack(nid, SECCOMP_ADDFD_FLAG_SEND, fd, 0, flags), NOTIF_ADDFD.size)
            try:
                _ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ADDFD, buf)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        finally:
            os.close(fd)

    def sockopt(self, nid, pid, nr, args):
        # getsockopt/setsockopt(fd, level, optname, optval, optlen): int arguments use the
        # low 32 bits only, as the kernel's int parameters do
        level, optname, optval, optlen = args[1] & 0xFFFFFFFF, args[2] & 0xFFFFFFFF, \
            args[3], args[4]
        is_set = nr == SYS_setsockopt
        family = socket.AF_INET if level == SOL_IP else socket.AF_INET6
        mem = CallerMemory(pid)
        if is_set:
            length = optlen & 0xFFFFFFFF
        else:
            try:
                length = struct.unpack("=i", mem.read(optlen, 4))[0]
            except BpfilterError as e:
                return self.respond(nid, error=-e.errno) if self.id_valid(nid) else None
            if length < 0:
                return self.respond(nid, error=-errno.EINVAL)
        if (is_set, optname) in FILTER_CMDS:
            # the requests naming a table: tables bpfilter does not serve go to the kernel
            try:
                name = mem.read(optval, 32).split(b"\0", 1)[0]
            except BpfilterError:
                name = None      # the helper reports the EFAULT, as the kernel would
            if name is not None and name != b"filter":
                if self.id_valid(nid):
                    self.respond(nid, flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)
                return
        if not self.id_valid(nid):
            return
        rep = self.helper.call(Request(cmd=optname, is_set=int(is_set), family=family, pid=pid,
                                       len=length, addr=optval,
                                       netns_cookie=self.caller_cookie(pid)))
        if rep.status < 0:
            return self.respond(nid, error=rep.status)
        if not is_set:
            try:
                mem.write(optlen, struct.pack("=i", rep.len))
            except BpfilterError as e:
                return self.respond(nid, error=-e.errno)
        self.respond(nid, val=0)

    def run(self, child: int) -> int:
        """Serve until every process holding the filter is gone; returns the child's wait status."""
        poll = select.poll()
        poll.register(self.listener, select.POLLIN)
        status = None
        while True:
            for _fd, ev in poll.poll(200):
                if ev & select.POLLIN:
                    self.serve_one()
                elif ev & (select.POLLHUP | select.POLLERR):
                    # no task uses the filter any more (seccomp_notify_poll)
                    status = status if status is not None else os.waitpid(child, 0)[1]
                    self.helper.close()
                    return status
            if status is None:
                pid, st = os.waitpid(child, os.WNOHANG)
                if pid == child:
                    status = st   # descendants may still hold the filter: keep serving them


def _recv_fd(sock: socket.socket) -> int:
    _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
    if not fds:
        raise BpfilterError(errno.EIO, "child did not pass the seccomp listener")
    return fds[0]


def leave(code: int):
    """End a door process: it holds nothing that needs the interpreter's teardown (module and
    object finalization cost several ms per iptables command), so flush and exit at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exec_main(argv) -> int:
    """`exec [FLAGS] [--] CMD ARGS` (python3 -m bpfilter_umh exec ...): the flags are config.py's
    (--flavor, --xdp-mode, --offload, --policy) and hold for this command's requests only."""
    if argv[:1] == ["--"] or (argv and not argv[0].startswith("-")):
        flags, cmd = [], argv[1:] if argv[0] == "--" else argv
    else:
        # flags to check: config.py (and the flavor table behind it) only then, not for
        # every plain `exec -- CMD`
        from .config import split_flags
        try:
            flags, cmd = split_flags(argv)
        except BpfilterError as e:
            print(f"bpfilter exec: {e.message}", file=sys.stderr)
            return 2
    if not cmd:
        print("bpfilter exec: missing command", file=sys.stderr)
        return 2
    return exec_command(cmd, flags)


def exec_command(argv, flags=()) -> int:
    """Run argv under the door; returns an exit code for sys.exit (128+signal like a shell when
    the command was killed, after re-raising the signal on ourselves if possible). `flags`
    (config.py's) give the door a helper of its own that applies them."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            parent_sock.close()
            listener = install_filter()
            socket.send_fds(child_sock, [b"L"], [listener])
            os.close(listener)
            child_sock.close()
            # Python ignores SIGPIPE and SIGXFSZ; CMD must get the defaults a shell gives it
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            os.execvp(argv[0], argv)
        except FileNotFoundError:
            os.write(2, f"bpfilter: {argv[0]}: command not found\n".encode())
            os._exit(127)
        except BaseException as e:  # noqa: BLE001 - the child must never return into Python
            os.write(2, f"bpfilter: cannot run {argv[0]}: {e}\n".encode())
            os._exit(126)
    child_sock.close()
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    for s in forwarded:
        signal.signal(s, lambda sig, _f: os.kill(pid, sig))
    try:
        listener = _recv_fd(parent_sock)
    except (BpfilterError, OSError):
        _, st = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 126
    finally:
        parent_sock.close()
    door = Door(listener, flags)
    status = door.run(pid)
    os.close(listener)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.WEXITSTATUS(status)
