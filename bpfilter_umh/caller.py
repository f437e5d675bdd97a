"""The calling process as the kernel's setsockopt/getsockopt handlers see it: its memory
(copy_from_user / copy_to_user) and its network namespace. Used by the helper (sockopt.py:
whole tables) and by the door (doorserve.py: optlen, the table name, an openat path), so it
imports only what the door may (libc.py, posix, _socket: tests/test_door_lean.py).
"""
import _socket
import errno
import posix
import struct

from . import libc
from .errors import BpfilterError
from .xtopts import SO_NETNS_COOKIE

IOVEC = struct.Struct("=QQ")          # struct iovec { void *iov_base; size_t iov_len; }
CLONE_NEWNET = 0x40000000


class CallerMemory:
    """copy_from_user/copy_to_user in another process: process_vm_readv/writev, so a page the
    caller could not read or write is EFAULT as for the kernel (a short access too); /proc/PID/mem
    only where those system calls are refused (ENOSYS, EPERM)."""

    def __init__(self, pid: int):
        self.pid = pid

    def _vm(self, fn, addr: int, local: int, n: int) -> bool:
        got = fn(self.pid, IOVEC.pack(local, n), 1, IOVEC.pack(addr, n), 1, 0)
        if got == n:
            return True
        e = libc.get_errno() if got < 0 else errno.EFAULT
        if e in (errno.ENOSYS, errno.EPERM):
            return False
        if e == errno.ESRCH:
            raise BpfilterError(errno.ESRCH, f"caller {self.pid} is gone")
        raise BpfilterError(errno.EFAULT, f"bad address {addr:#x}+{n} in caller {self.pid}")

    def read(self, addr: int, n: int) -> bytes:
        if n == 0:
            return b""
        buf = libc.char_buffer(n)
        if self._vm(libc.process_vm_readv, addr, libc.addressof(buf), n):
            return buf.raw
        return self._proc_mem(addr, n, None)

    def read_bytes(self, addr: int, n: int, spare: bool = False) -> bytes:
        """read(addr, n) straight into the bytes object returned: a table's megabytes copied
        once (read() copies them twice, into a C buffer and out of it; a bytearray read into
        and then made bytes, twice too). The object is new and nobody else holds it until it
        is returned, so it is filled in place, as os.read and os.pread fill theirs; a copy
        fewer is ~680 fewer pages faulted in when the heap has no room for it (2.7 MB). Its
        block is of a size class (heap.new_bytes): the next append's blob, a rule longer, fits
        the hole this one leaves. spare: and a block of that class set aside for the copy
        the caller makes next (heap.new_bytes)."""
        if n == 0:
            return b""
        from .heap import new_bytes     # (the helper's: the door never reads a table)
        out = new_bytes(n, spare)   # n > 0: a new object, never a shared one
        local, keep = libc.data_address(out)
        if self._vm(libc.process_vm_readv, addr, local, n):
            del keep
            return out
        return self._proc_mem(addr, n, None)

    def write(self, addr: int, data):
        if not data:
            return
        # the data where it lies (GET_ENTRIES: a table's megabytes): process_vm_writev only
        # reads the local buffer, so a bytes object's own storage serves without a copy
        local, keep = libc.data_address(data)
        if not self._vm(libc.process_vm_writev, addr, local, len(data)):
            self._proc_mem(addr, len(data), bytes(data))
        del keep

    def _proc_mem(self, addr, n, data):
        try:
            fd = posix.open(f"/proc/{self.pid}/mem",
                            posix.O_RDWR if data is not None else posix.O_RDONLY)
        except OSError as e:
            raise BpfilterError(errno.EFAULT, f"cannot open memory of {self.pid}: {e}") from None
        try:
            if data is None:
                out = posix.pread(fd, n, addr)
                if len(out) != n:
                    raise BpfilterError(errno.EFAULT, f"bad address {addr:#x}+{n}")
                return out
            if posix.pwrite(fd, data, addr) != n:
                raise BpfilterError(errno.EFAULT, f"bad address {addr:#x}+{n}")
        except OSError:
            raise BpfilterError(errno.EFAULT, f"bad address {addr:#x}+{n}") from None
        finally:
            posix.close(fd)

    def read_cstring(self, addr: int, maxlen: int) -> str:
        # page-bounded chunks, so that a short string at the end of a mapping still reads
        out = b""
        while len(out) < maxlen:
            chunk = min(maxlen - len(out), 4096 - ((addr + len(out)) & 4095))
            part = self.read(addr + len(out), chunk)
            if b"\0" in part:
                return (out + part.split(b"\0", 1)[0]).decode("latin-1")
            out += part
        return out.decode("latin-1")


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, net/core/sock.c)."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        return struct.unpack("=Q", s.getsockopt(_socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    finally:
        s.close()


def setns_net(fd: int):
    """setns(fd, CLONE_NEWNET) for the calling thread; OSError on failure."""
    libc.check(libc.setns(fd, CLONE_NEWNET))
