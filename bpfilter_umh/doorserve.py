"""The door's serving side (door.py describes the whole): the notification loop, the caller's
memory and the connection to the helper (doorspawn.py starts one when there is none).

The door's parent process imports this module right after the fork, while the child installs
the filter and starts CMD (measured: 0.2-0.5 ms less per command than importing it before the
fork, when the modules are compiled at each start).  The helper serves a Door too: the one
whose listener bin/bpfilter-exec handed over (BPFILTER_CMD_ADOPT, __main__.serve_listen), with
a link that calls its own dispatcher instead of a socket.
"""
import _socket
import errno
import posix
import select
import struct
import time
from fcntl import ioctl

from .caller import CallerMemory, netns_cookie, setns_net
from .door import SYS_openat, SYS_setsockopt
from .errors import BpfilterError, to_errno
from .frames import HELPER_SOCKET, REPLY, Reply, Request, read_exact
from .xtopts import AF_INET, AF_INET6, FILTER_CMDS, SOL_IP

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
O_CLOEXEC = 0o2000000

TABLE_NAMES_FILES = {"/proc/net/ip_tables_names": "/proc/net/ip_tables_names",
                     "/proc/self/net/ip_tables_names": "/proc/net/ip_tables_names",
                     "/proc/net/ip6_tables_names": "/proc/net/ip6_tables_names",
                     "/proc/self/net/ip6_tables_names": "/proc/net/ip6_tables_names"}


# ---------------------------------------------------------------------------------------------
# the helper connection


def connect_helper(timeout: float = 10.0) -> "_socket.socket":
    """Connect to this netns's helper, starting it if absent (like request_module, on demand)."""
    deadline = time.monotonic() + timeout
    spawned = False
    while True:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            s.connect(HELPER_SOCKET)
            return s
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
        if not spawned:
            from .doorspawn import spawn_helper
            spawn_helper()
            spawned = True
        if time.monotonic() > deadline:
            raise BpfilterError(errno.EHOSTDOWN, "the bpfilter helper did not start")
        time.sleep(0.01)


class HelperLink:
    """The door's side of the frame stream to the helper; reconnects once if the helper left
    (it exits when idle, possibly between two requests of one long CMD). With flags, the
    helper is this door's own (spawn_private_helper)."""

    def __init__(self, flags=()):
        self.sock = None
        self.flags = list(flags)
        self.proc = None

    def _connect(self) -> "_socket.socket":
        if not self.flags:
            return connect_helper()
        self._reap()
        from .doorspawn import spawn_private_helper
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
        return posix.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        raise BpfilterError(errno.ESRCH, f"caller {pid} is gone") from None


def _table_names_memfd(kernel_file: str) -> int:
    """A memfd listing the kernel's own tables of this netns plus "filter" (served by bpfilter),
    in the kernel's format: one name per line (net/netfilter/x_tables.c xt_table_seq_show)."""
    try:
        with open(kernel_file, "rb") as f:
            names = [n for n in f.read().split() if n != b"filter"]
    except OSError:
        names = []
    # the kernel lists the most recently registered table first; filter exists from the start
    data = b"".join(n + b"\n" for n in names + [b"filter"])
    fd = posix.memfd_create("bpfilter-tables", posix.MFD_CLOEXEC)
    posix.write(fd, data)
    posix.lseek(fd, 0, 0)        # SEEK_SET
    return fd


class Door:
    """Serves the notifications of one seccomp listener; `helper` answers the requests (a
    HelperLink in the door's process, the dispatcher itself in the helper's)."""

    def __init__(self, listener: int, helper):
        self.listener = listener
        self.helper = helper
        self.poll = select.poll()
        self.poll.register(listener, select.POLLIN)
        self.cookies = {}       # netns inode -> cookie, filled by the first request from there
        # BPFILTER_DOOR_TRACE=FILE: one line per trapped call appended to FILE, with the time
        # the door took and the helper's share of it (where a command's time goes)
        self.trace_path = posix.environ.get(b"BPFILTER_DOOR_TRACE")
        self.trace = [] if self.trace_path else None
        self.helper_s = 0.0

    def caller_cookie(self, pid: int) -> int:
        """The caller's network namespace: usually the door's own, but CMD may have moved
        (`bpfilter exec -- ip netns exec X iptables ...`); the helper then serves the request
        in the caller's namespace (it setns()es to /proc/PID/ns/net and checks the cookie)."""
        ino = _netns_ino(pid)
        if ino not in self.cookies and ino == _netns_ino("self"):
            self.cookies[ino] = netns_cookie()
        if ino not in self.cookies:
            home = posix.open("/proc/thread-self/ns/net", posix.O_RDONLY)
            try:
                target = posix.open(f"/proc/{pid}/ns/net", posix.O_RDONLY)
                try:
                    setns_net(target)
                    self.cookies[ino] = netns_cookie()
                finally:
                    setns_net(home)
                    posix.close(target)
            finally:
                posix.close(home)
        return self.cookies[ino]

    def id_valid(self, nid: int) -> bool:
        try:
            ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
            return True
        except OSError:
            return False

    def respond(self, nid: int, val: int = 0, error: int = 0, flags: int = 0):
        try:
            ioctl(self.listener, SECCOMP_IOCTL_NOTIF_SEND, NOTIF_RESP.pack(nid, val, error, flags))
        except OSError as e:
            if e.errno != errno.ENOENT:    # the caller died meanwhile: nothing to answer
                raise

    def recv(self):
        buf = bytearray(NOTIF.size)     # zeroed, as NOTIF_RECV requires
        try:
            ioctl(self.listener, SECCOMP_IOCTL_NOTIF_RECV, buf)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR):   # the caller died before we got it
                return None
            raise
        nid, pid, _flags, nr, _arch, _ip, *args = NOTIF.unpack(buf)
        return nid, pid, nr, args

    def serve_one(self):
        got = self.recv()
        if got is None:
            return
        nid, pid, nr, args = got
        start, self.helper_s = time.perf_counter(), 0.0
        try:
            if nr == SYS_openat:
                self.openat(nid, pid, args)
            else:
                self.sockopt(nid, pid, nr, args)
        except Exception as e:   # never leave the caller blocked
            self.respond(nid, error=-to_errno(e))
        if self.trace is not None:
            what = "openat" if nr == SYS_openat else \
                f"{'set' if nr == SYS_setsockopt else 'get'}sockopt {args[2] & 0xFFFFFFFF}"
            self.trace.append((pid, what, start, time.perf_counter(), self.helper_s))

    def write_trace(self):
        lines = [f"{pid} {start:.6f} {what}: door {(end - start - helper) * 1e3:.3f} ms, "
                 f"helper {helper * 1e3:.3f} ms\n" for pid, what, start, end, helper in self.trace]
        with open(self.trace_path, "a") as f:
            f.write("".join(lines))

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
            try:
                ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ADDFD,
                      NOTIF_ADDFD.pack(nid, SECCOMP_ADDFD_FLAG_SEND, fd, 0, flags))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        finally:
            posix.close(fd)

    def sockopt(self, nid, pid, nr, args):
        # getsockopt/setsockopt(fd, level, optname, optval, optlen): int arguments use the
        # low 32 bits only, as the kernel's int parameters do
        level, optname, optval, optlen = args[1] & 0xFFFFFFFF, args[2] & 0xFFFFFFFF, \
            args[3], args[4]
        is_set = nr == SYS_setsockopt
        family = AF_INET if level == SOL_IP else AF_INET6
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
        req = Request(cmd=optname, is_set=int(is_set), family=family, pid=pid, len=length,
                      addr=optval, netns_cookie=self.caller_cookie(pid))
        start = time.perf_counter()
        rep = self.helper.call(req)
        self.helper_s = time.perf_counter() - start
        if rep.status < 0:
            return self.respond(nid, error=rep.status)
        if not is_set:
            try:
                mem.write(optlen, struct.pack("=i", rep.len))
            except BpfilterError as e:
                return self.respond(nid, error=-e.errno)
        self.respond(nid, val=0)

    def serve_ready(self, timeout_ms: int = 0) -> bool:
        """Serve a notification if one comes within timeout_ms; False once no task uses the
        filter any more (seccomp_notify_poll: EPOLLHUP when the filter has no users; a
        notification still pending then is served first, EPOLLIN)."""
        for _fd, ev in self.poll.poll(timeout_ms):
            if ev & select.POLLIN:
                self.serve_one()
            elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return False
        return True

    def run(self, child: int) -> int:
        """Serve until every process holding the filter is gone; returns the child's wait status."""
        status = None
        while True:
            if not self.serve_ready(200):
                status = status if status is not None else posix.waitpid(child, 0)[1]
                self.helper.close()
                if self.trace:
                    self.write_trace()
                return status
            if status is None:
                pid, st = posix.waitpid(child, posix.WNOHANG)
                if pid == child:
                    status = st   # descendants may still hold the filter: keep serving them
