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

bin/bpfilter-exec.c is the same door without Python's start-up: it installs this module's filter
(filter_c_initializer, compiled in), hands the listener to the running helper
(BPFILTER_CMD_HOLD, then BPFILTER_CMD_ADOPT with SCM_RIGHTS; kmod/bpfilter_msg.h) and execs CMD
itself; the helper serves the notifications with doorserve.Door (__main__.serve_listen).  It
runs this door instead when given flags, BPFILTER_DOOR_TRACE, or no helper to hand over to.

The door is three modules: this one (the process: filter, fork, exec), doorserve.py (the
notification loop, the caller's memory, the helper connection; imported by the parent after the
fork) and doorspawn.py (starting a helper, imported only then).

Cost (issues #7, #8): a door runs once per iptables command, so what it pays is interpreter
start-up and imports, not the requests (a trapped call costs the door ~0.1 ms; a 2 MB
GET_ENTRIES or SET_REPLACE is copied by the helper, never by the door; BPFILTER_DOOR_TRACE=FILE
logs each call with the door's and the helper's share). It imports no more than the few C
modules it uses (_socket, _signal, _struct, select, fcntl, and _ctypes through libc.py) and
posix rather than os: the Python layers of os, socket, signal and ctypes (enum, collections.abc,
the ctypes type zoo) cost more than all of its work; os.execvp is replaced for the same reason
(it imports warnings). tests/test_door_lean.py holds the door to that module list. The fast
way to start it is the launcher, `bin/bpfilter exec -- CMD` (`python3 -S`, no runpy):
~12 ms for `exec -- true`, where `python3 -S -c pass` takes ~7.5 ms and a `python3 -S` that
forks and execs true itself ~9 ms (bytecode cached in __pycache__; ~19 ms when every module is
compiled at each start: PYTHONDONTWRITEBYTECODE and no cache, which `python3 -m compileall
bpfilter_umh` makes once). `python3 -S -m bpfilter_umh[.cli] exec` still works, at the cost of
runpy and the imports of __main__ or cli. The helper imports everything a request needs
before it serves (__main__.preload) and stays between commands. openat is trapped for every
path (a filter cannot read one), but iptables opens ~7-10 files (ld.so, its libraries and
extensions, the table names): ~1 ms per command.

Limits: only x86_64 system calls are trapped (a 32-bit iptables binary would reach the kernel's
xtables directly); CMD's descendants that outlive it keep the door open until they exit.
"""
import _signal
import _socket
import errno
import posix
import struct
import sys

from .errors import BpfilterError
from .xtopts import SOL_IP, SOL_IPV6

# kernel/seccomp.c and include/uapi/linux/seccomp.h
SYS_setsockopt, SYS_getsockopt, SYS_openat, SYS_seccomp = 54, 55, 257, 317
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000

# classic BPF (include/uapi/linux/filter.h)
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06


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


def filter_c_initializer() -> str:
    """seccomp_filter() as the C initializer bin/bpfilter-exec.c compiles in (the Makefile
    writes it to build/door_filter.h), so that the filter has one definition."""
    rows = [f"\t{{ {code:#06x}, {jt}, {jf}, {k:#010x} }},"
            for code, jt, jf, k in struct.iter_unpack("=HBBI", seccomp_filter())]
    return "#define DOOR_FILTER { \\\n" + " \\\n".join(rows) + " \\\n}\n"


def install_filter() -> int:
    """Install the filter on the calling process; returns the listener fd."""
    from . import libc
    code = libc.char_buffer(seccomp_filter())
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("=H6xQ", len(code) // 8, libc.addressof(code))
    libc.check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    return libc.check(libc.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                                   SECCOMP_FILTER_FLAG_NEW_LISTENER, fprog))


def _send_fd(sock, fd: int):
    """socket.send_fds without the socket module (its import, enum behind it, costs a door
    ~9 ms): one byte and one descriptor in SCM_RIGHTS."""
    sock.sendmsg([b"L"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("=i", fd))])


def _recv_fd(sock) -> int:
    _msg, ancdata, _flags, _addr = sock.recvmsg(1, _socket.CMSG_LEN(4), _socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS and len(data) >= 4:
            return struct.unpack_from("=i", data)[0]
    raise BpfilterError(errno.EIO, "child did not pass the seccomp listener")


def leave(code: int):
    """End a door process: it holds nothing that needs the interpreter's teardown (module and
    object finalization cost several ms per iptables command), so flush and exit at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    posix._exit(code)


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


def _search_path() -> str:
    os = sys.modules.get("os")      # os.environ if loaded (it may have been changed), else
    if os is not None:              # the environment the process started with
        return os.environ.get("PATH", os.defpath)
    path = posix.environ.get(b"PATH")
    return "/bin:/usr/bin" if path is None else path.decode(sys.getfilesystemencoding(),
                                                             "surrogateescape")


def _execvp(file: str, argv):
    """os.execvp, which imports warnings for os.get_exec_path (~1 ms in the child, between
    the filter and CMD): try each directory of PATH the way os._execvpe does, and raise the
    first error other than ENOENT/ENOTDIR if there was one, else the last."""
    if "/" in file:
        posix.execv(file, argv)
    saved = last = None
    for d in _search_path().split(":"):
        try:
            posix.execv((d or ".") + "/" + file, argv)
        except (FileNotFoundError, NotADirectoryError) as e:
            last = e
        except OSError as e:
            last = e
            saved = saved or e
    raise saved or last or FileNotFoundError(errno.ENOENT, "no PATH to search", file)


def exec_command(argv, flags=()) -> int:
    """Run argv under the door; returns an exit code for sys.exit (128+signal like a shell when
    the command was killed, after re-raising the signal on ourselves if possible). `flags`
    (config.py's) give the door a helper of its own that applies them."""
    # libc (install_filter in the child, doorserve here) loaded once, before the fork
    from . import libc  # noqa: F401
    parent_sock, child_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    pid = posix.fork()
    if pid == 0:
        try:
            parent_sock.close()
            listener = install_filter()
            _send_fd(child_sock, listener)
            posix.close(listener)
            child_sock.close()
            # Python ignores SIGPIPE and SIGXFSZ; CMD must get the defaults a shell gives it
            for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
                _signal.signal(sig, _signal.SIG_DFL)
            _execvp(argv[0], argv)
        except FileNotFoundError:
            posix.write(2, f"bpfilter: {argv[0]}: command not found\n".encode())
            posix._exit(127)
        except BaseException as e:  # noqa: BLE001 - the child must never return into Python
            posix.write(2, f"bpfilter: cannot run {argv[0]}: {e}\n".encode())
            posix._exit(126)
    child_sock.close()
    forwarded = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
    for s in forwarded:
        _signal.signal(s, lambda sig, _f: posix.kill(pid, sig))
    # the serving side is imported while the child installs the filter and starts CMD
    from .doorserve import Door, HelperLink
    try:
        listener = _recv_fd(parent_sock)
    except (BpfilterError, OSError):
        _, st = posix.waitpid(pid, 0)
        return posix.waitstatus_to_exitcode(st) if posix.WIFEXITED(st) else 126
    finally:
        parent_sock.close()
    door = Door(listener, HelperLink(flags))
    status = door.run(pid)
    posix.close(listener)
    if posix.WIFSIGNALED(status):
        sig = posix.WTERMSIG(status)
        _signal.signal(sig, _signal.SIG_DFL)
        posix.kill(posix.getpid(), sig)
        return 128 + sig
    return posix.WEXITSTATUS(status)
