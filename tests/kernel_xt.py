"""Direct access to the kernel's ip_tables/ip6_tables socket options, for tests.

Runs in the calling thread's network namespace (use Netns.inside()). Python's socket.getsockopt
cannot pass an input buffer (GET_INFO/GET_ENTRIES read the table name from it), hence ctypes.
Every function raises OSError with the kernel's errno on failure.
"""
import ctypes
import os
import socket

from bpfilter_umh import uapi

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]
_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_uint32]


def _sock(family):
    return socket.socket(socket.AF_INET if family == uapi.NFPROTO_IPV4 else socket.AF_INET6,
                         socket.SOCK_RAW, socket.IPPROTO_RAW)


def _name(name: str, n: int = uapi.XT_TABLE_MAXNAMELEN) -> bytes:
    return name.encode().ljust(n, b"\0")[:n]


def getsockopt(family: int, opt: str, inbuf: bytes, outlen: int = None) -> bytes:
    lay = uapi.layout(family)
    outlen = len(inbuf) if outlen is None else outlen
    buf = ctypes.create_string_buffer(bytes(inbuf).ljust(outlen, b"\0"), outlen)
    ln = ctypes.c_uint32(outlen)
    with _sock(family) as s:
        if _libc.getsockopt(s.fileno(), lay.sol, lay.so[opt], buf, ctypes.byref(ln)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return buf.raw[:ln.value]


def setsockopt(family: int, opt: str, buf: bytes) -> None:
    lay = uapi.layout(family)
    cbuf = ctypes.create_string_buffer(bytes(buf), len(buf))
    with _sock(family) as s:
        if _libc.setsockopt(s.fileno(), lay.sol, lay.so[opt], cbuf, len(buf)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def get_info(family: int, table: str = "filter"):
    """IPT_SO_GET_INFO → construct Container of ipt_getinfo (name left as bytes)."""
    out = getsockopt(family, "GET_INFO", _name(table), uapi.ipt_getinfo.sizeof())
    return uapi.ipt_getinfo.parse(out)


def get_entries(family: int, table: str = "filter", size: int = None) -> bytes:
    """IPT_SO_GET_ENTRIES into a zeroed buffer → the entries blob (without ipt_get_entries)."""
    if size is None:
        size = get_info(family, table).size
    hdr = uapi.ipt_get_entries.build(dict(name=_name(table), size=size))
    out = getsockopt(family, "GET_ENTRIES", hdr, len(hdr) + size)
    return out[len(hdr):]


def set_replace(family: int, buf: bytes) -> None:
    """IPT_SO_SET_REPLACE with a complete ipt_replace buffer (header + entries)."""
    setsockopt(family, "SET_REPLACE", buf)


class CounterBuffer:
    """Memory for ipt_replace.counters: the kernel writes the old counters there."""

    def __init__(self, n: int):
        self.n = max(n, 1)
        self.buf = ctypes.create_string_buffer(16 * self.n)

    @property
    def address(self) -> int:
        return ctypes.addressof(self.buf)

    def counters(self):
        raw = self.buf.raw
        return [(int.from_bytes(raw[i:i + 8], "little"), int.from_bytes(raw[i + 8:i + 16], "little"))
                for i in range(0, 16 * self.n, 16)]


def replace_buffer(table: str, valid_hooks: int, num_entries: int, size: int, hook_entry,
                   underflow, num_counters: int, counters_addr: int, entries: bytes) -> bytes:
    return uapi.ipt_replace.build(dict(
        name=_name(table), valid_hooks=valid_hooks, num_entries=num_entries, size=size,
        hook_entry=list(hook_entry), underflow=list(underflow), num_counters=num_counters,
        counters=counters_addr)) + bytes(entries)


def snapshot(family: int, table: str = "filter"):
    """(getinfo Container, entries blob) of the table now installed."""
    info = get_info(family, table)
    return info, get_entries(family, table, info.size)
