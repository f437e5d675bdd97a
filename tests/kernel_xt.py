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


# ---- what the iptables binaries send, made from the kernel's own entries ----------------------

def restored(blob: bytes, family: int) -> bytes:
    """The blob as iptables-restore sends it: comefrom 0 and zero counters in every entry."""
    from bpfilter_umh import model
    cf, cnt, _ = model._VOLATILE[family]
    out = bytearray(blob)
    off = 0
    while off < len(out):
        nxt = int.from_bytes(out[off + cf - 2:off + cf], "little")
        out[off + cf:off + cf + 4] = bytes(4)
        out[off + cnt:off + cnt + 16] = bytes(16)
        off += nxt
    return bytes(out)


def entries(blob: bytes, family: int):
    """(offset, next_offset, target name, standard verdict) of each entry of blob."""
    from bpfilter_umh import model
    cf = model._VOLATILE[family][0]
    o = 0
    while o < len(blob):
        n = int.from_bytes(blob[o + cf - 2:o + cf], "little")
        to = int.from_bytes(blob[o + cf - 4:o + cf - 2], "little")
        name = blob[o + to + 2:o + to + 31].split(b"\0")[0]
        verdict = int.from_bytes(blob[o + to + 32:o + to + 36], "little", signed=True)
        yield o, n, name, verdict
        o += n


def libiptc_appended(info, blob: bytes, new: int, family: int, counted: bool = False) -> bytes:
    """What iptables-legacy -A sends, from the kernel's entries after the same append (checked
    byte for byte against a capture at the door): each rule with the comefrom GET_ENTRIES
    showed, the new rule (offset `new`), the policies and the user chains' RETURN entries
    (libiptc builds them) with comefrom 0; `counted`: every other rule with live counters, as
    if it had counted packets."""
    from bpfilter_umh import model
    cf, cnt, _ = model._VOLATILE[family]
    out = bytearray(blob)
    es = list(entries(blob, family))
    zero = {new} | {info.underflow[h] for h in range(5) if info.valid_hooks >> h & 1}
    zero |= {o for (o, _, name, v), nxt in zip(es, es[1:])
             if name == b"" and v == model.XT_RETURN and nxt[2] == b"ERROR"}
    for o in zero:
        out[o + cf:o + cf + 4] = bytes(4)
    if counted:
        rules = [o for o, _, name, _ in es if o not in zero and name != b"ERROR"]
        for k, o in enumerate(rules[::2]):
            out[o + cnt:o + cnt + 16] = (k + 1).to_bytes(8, "little") + \
                (60 * k + 60).to_bytes(8, "little")
    return bytes(out)
