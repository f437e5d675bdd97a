"""Throwaway network namespaces for tests: every test makes its own and removes it, also on failure.

Nothing here touches the host's own namespace: commands run through `ip netns exec`, and
`Netns.inside()` switches only the calling thread (setns) and always switches back.
"""
import contextlib
import itertools
import os
import signal
import socket
import struct
import subprocess
import tempfile

_counter = itertools.count()
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71            # include/uapi/asm-generic/socket.h
# the cookies of every namespace this process made: a leak check on a shared machine counts only
# these (other runs make and remove namespaces, and their state directories, at the same time)
COOKIES = set()
# the cookies of the namespaces closed since conftest last checked them for bpfilter state left
# behind (a table installed and never flushed: `ip netns del` leaves its pins and state dir)
CLOSED = []


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET):
    import ctypes
    if _libc().setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Netns:
    """A named network namespace `bpft<pid>x<n>` with lo up and a private xtables lock file."""

    def __init__(self, tag: str = ""):
        self.name = f"bpft{os.getpid()}x{next(_counter)}{tag}"
        self._lockdir = tempfile.mkdtemp(prefix="bpft-lock-")
        self.env = dict(os.environ, XTABLES_LOCKFILE=os.path.join(self._lockdir, "xtables.lock"))
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.run("ip link set lo up")
            with self.inside(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                self.cookie = struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET,
                                                              SO_NETNS_COOKIE, 8))[0]
            COOKIES.add(self.cookie)
        except Exception:
            self.close()
            raise

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def run(self, cmd, check=True, input=None, timeout=60, env=None):
        """Run a shell command inside the namespace; returns CompletedProcess with text output."""
        argv = ["ip", "netns", "exec", self.name, "sh", "-c", cmd] if isinstance(cmd, str) \
            else ["ip", "netns", "exec", self.name, *cmd]
        p = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout,
                           env=env or self.env)
        if check and p.returncode != 0:
            raise RuntimeError(f"[{self.name}] {cmd!r} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return p

    def popen(self, cmd, **kw):
        argv = ["ip", "netns", "exec", self.name, "sh", "-c", cmd] if isinstance(cmd, str) \
            else ["ip", "netns", "exec", self.name, *cmd]
        kw.setdefault("env", self.env)
        return subprocess.Popen(argv, **kw)

    @contextlib.contextmanager
    def inside(self):
        """Switch the calling thread into the namespace for the block, then back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            setns(target)
            yield self
        finally:
            setns(home)
            os.close(home)
            os.close(target)

    def pids(self):
        p = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(x) for x in p.stdout.split()]

    def close(self):
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        if hasattr(self, "cookie"):
            CLOSED.append(self.cookie)
        with contextlib.suppress(OSError):
            for f in os.listdir(self._lockdir):
                os.unlink(os.path.join(self._lockdir, f))
            os.rmdir(self._lockdir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def veth(a: Netns, a_if: str, b: Netns, b_if: str, a_addr: str = None, b_addr: str = None):
    """A veth pair between two namespaces, both ends up, optional addresses ("192.0.2.1/24")."""
    tmp = f"v{os.getpid() % 100000}{next(_counter)}"
    subprocess.run(["ip", "link", "add", tmp + "a", "netns", a.name, "type", "veth",
                    "peer", "name", tmp + "b", "netns", b.name], check=True)
    a.run(f"ip link set {tmp}a name {a_if} && ip link set {a_if} up")
    b.run(f"ip link set {tmp}b name {b_if} && ip link set {b_if} up")
    if a_addr:
        a.run(f"ip addr add {a_addr} dev {a_if}")
    if b_addr:
        b.run(f"ip addr add {b_addr} dev {b_if}")
