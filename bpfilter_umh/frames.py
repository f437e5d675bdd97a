"""The request/reply frames a door exchanges with the helper: a mirror of kmod/bpfilter_msg.h.

One request, one reply, in order, host byte order; tests/test_frames.py compiles the C header and
checks sizes and offsets agree with the formats below.  The same frames travel over the helper's
stdin/stdout (the kernel shim's channel) and over the per-netns abstract unix socket that
`bpfilter exec` uses, so one dispatch function serves both transports.
"""
import errno
import struct

from .errors import BpfilterError

BPFILTER_MSG_MAGIC = 0x62706631  # "bpf1"

# the helper's per-netns socket, and the two requests with which a door hands its seccomp
# listener to the helper (bpfilter_msg.h, bin/bpfilter-exec.c)
HELPER_SOCKET = b"\0bpfilter"
BPFILTER_CMD_HOLD = 0x100
BPFILTER_CMD_ADOPT = 0x101

# struct bpfilter_request: magic cmd is_set family pid len (u32) addr netns_cookie (u64)
REQUEST = struct.Struct("=IIIIIIQQ")
# struct bpfilter_reply: magic (u32) status (s32) len pad (u32)
REPLY = struct.Struct("=IiII")

REQUEST_FIELDS = ("magic", "cmd", "is_set", "family", "pid", "len", "addr", "netns_cookie")
REPLY_FIELDS = ("magic", "status", "len", "pad")


def field_offsets(st: struct.Struct, names) -> dict:
    """Offset of each field of a '='-packed format (no implicit padding: the C structs have none)."""
    out, off = {}, 0
    for name, code in zip(names, st.format.lstrip("=")):
        out[name] = off
        off += struct.calcsize("=" + code)
    return out


class _Frame:
    """Plain classes, not dataclasses: every `bpfilter exec` imports this module, and
    dataclasses (with inspect and re behind it) would cost it more than the frames do."""
    __slots__ = ()

    def __eq__(self, other):
        return type(other) is type(self) and all(
            getattr(self, f) == getattr(other, f) for f in self.__slots__)

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({args})"


class Request(_Frame):
    __slots__ = ("cmd", "is_set", "family", "pid", "len", "addr", "netns_cookie")

    def __init__(self, cmd: int, is_set: int, family: int, pid: int, len: int, addr: int,
                 netns_cookie: int = 0):
        self.cmd, self.is_set, self.family, self.pid = cmd, is_set, family, pid
        self.len, self.addr, self.netns_cookie = len, addr, netns_cookie

    def pack(self) -> bytes:
        return REQUEST.pack(BPFILTER_MSG_MAGIC, self.cmd, self.is_set, self.family, self.pid,
                            self.len, self.addr, self.netns_cookie)

    @classmethod
    def unpack(cls, buf: bytes) -> "Request":
        if len(buf) != REQUEST.size:
            raise BpfilterError(errno.EINVAL, f"request frame of {len(buf)} bytes, want {REQUEST.size}")
        magic, *rest = REQUEST.unpack(buf)
        if magic != BPFILTER_MSG_MAGIC:
            raise BpfilterError(errno.EINVAL, f"bad request magic {magic:#x}")
        return cls(*rest)


class Reply(_Frame):
    __slots__ = ("status", "len")

    def __init__(self, status: int, len: int = 0):
        self.status = status      # 0 or -errno
        self.len = len            # getsockopt: optlen handed back to the caller

    def pack(self) -> bytes:
        return REPLY.pack(BPFILTER_MSG_MAGIC, self.status, self.len, 0)

    @classmethod
    def unpack(cls, buf: bytes) -> "Reply":
        if len(buf) != REPLY.size:
            raise BpfilterError(errno.EIO, f"reply frame of {len(buf)} bytes, want {REPLY.size}")
        magic, status, length, _pad = REPLY.unpack(buf)
        if magic != BPFILTER_MSG_MAGIC:
            raise BpfilterError(errno.EIO, f"bad reply magic {magic:#x}")
        return cls(status, length)


def read_exact(read, n: int) -> bytes:
    """Read exactly n bytes with `read(k)`; b"" at a clean end of stream, EIO on a torn frame."""
    buf = b""
    while len(buf) < n:
        chunk = read(n - len(buf))
        if not chunk:
            if not buf:
                return b""
            raise BpfilterError(errno.EIO, f"stream ended inside a frame ({len(buf)}/{n} bytes)")
        buf += chunk
    return buf
