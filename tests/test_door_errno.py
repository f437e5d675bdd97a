"""Probe script (no tests here): issues well-formed and malformed xtables socket options on the
filter table and prints, as JSON, the errno and returned bytes of each.  test_door.py runs it
against the kernel and under `bpfilter exec` and requires identical output."""
import ctypes
import json
import socket
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
SOL = {socket.AF_INET: 0, socket.AF_INET6: 41}
REV = {socket.AF_INET: (66, 67), socket.AF_INET6: (68, 69)}


def get(fd, level, opt, buf, length=None):
    b = ctypes.create_string_buffer(bytes(buf), max(len(buf), 1))
    n = ctypes.c_uint(len(buf) if length is None else length)
    r = libc.getsockopt(fd, level, opt, b, ctypes.byref(n))
    return (0 if r == 0 else ctypes.get_errno()), b.raw[:len(buf)], n.value


def set_(fd, level, opt, buf, length=None):
    b = ctypes.create_string_buffer(bytes(buf), max(len(buf), 1))
    r = libc.setsockopt(fd, level, opt, b, len(buf) if length is None else length)
    return (0 if r == 0 else ctypes.get_errno()), b.raw[:len(buf)]


def probe(family):
    s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    fd, lvl, out = s.fileno(), SOL[family], {}
    name = b"filter".ljust(32, b"\0")
    e, info, n = get(fd, lvl, 64, name + b"\0" * 52)
    out["info"] = [e, info.hex(), n]
    out["info_short"] = get(fd, lvl, 64, name + b"\0" * 51)[0]
    out["info_long"] = get(fd, lvl, 64, name + b"\0" * 53)[0]
    valid_hooks, *rest = struct.unpack_from("=I5I5III", info, 32)
    hook_entry, underflow, num, size = rest[0:5], rest[5:10], rest[10], rest[11]
    hdr = struct.pack("=32sI4x", name, size)
    e, ent, n = get(fd, lvl, 65, hdr + b"\0" * size)
    out["entries"] = [e, ent.hex(), n]
    blob = ent[40:]
    out["entries_short_hdr"] = get(fd, lvl, 65, hdr[:39])[0]
    out["entries_len_mismatch"] = get(fd, lvl, 65, hdr + b"\0" * size, 40 + size - 1)[0]
    bigger = struct.pack("=32sI4x", name, size + 8)
    out["entries_wrong_size"] = get(fd, lvl, 65, bigger + b"\0" * (size + 8))[0]
    rm, rt = REV[family]
    for what, opt in (("match", rm), ("target", rt)):
        for ext, rev in (("tcp", 0), ("tcp", 5), ("udp", 0), ("nosuchext", 0), ("ERROR", 0),
                         ("standard", 0)):
            req = struct.pack("=29sB", ext.encode(), rev)
            out[f"rev_{what}_{ext}_{rev}"] = get(fd, lvl, opt, req)[0]
        out[f"rev_{what}_badlen"] = get(fd, lvl, opt, struct.pack("=29sB", b"tcp", 0) + b"\0")[0]
    counters = ctypes.create_string_buffer(16 * num)
    cptr = ctypes.addressof(counters)

    def replace(vh=valid_hooks, ncnt=num, body=blob, sz=None, dlen=0):
        hdr = struct.pack("=32sIII5I5IIQ", name, vh, num, len(body) if sz is None else sz,
                          *hook_entry, *underflow, ncnt, cptr)
        return set_(fd, lvl, 64, hdr + body, len(hdr + body) + dlen)[0]
    out["replace_len_below_header"] = replace(dlen=-len(blob) - 1)
    out["replace_len_below_size"] = replace(dlen=-1)
    out["replace_zero_counters"] = replace(ncnt=0)
    out["replace_wrong_counters"] = replace(ncnt=num + 1)
    out["replace_wrong_hooks"] = replace(vh=valid_hooks | 1)
    out["replace_short_body"] = replace(body=blob[:-8])
    out["replace_ok"] = replace()
    out["replace_len_above_size"] = replace(dlen=64)
    out["replace_old_counters"] = counters.raw.hex()

    def add(ncnt, nbytes):
        return set_(fd, lvl, 65, struct.pack("=32sI4x", name, ncnt) + b"\0" * nbytes)[0]
    out["add_counters_ok"] = add(num, 16 * num)
    out["add_counters_len_below_header"] = set_(fd, lvl, 65, struct.pack(
        "=32sI4x", name, num) + b"\0" * 16 * num, 20)[0]
    out["add_counters_len_mismatch"] = add(num, 16 * num - 1)
    out["add_counters_wrong_number"] = add(num + 1, 16 * (num + 1))
    e, info2, _ = get(fd, lvl, 64, name + b"\0" * 52)
    out["info_after"] = [e, info2.hex()]
    s.close()
    return out


if __name__ == "__main__":
    json.dump({"ipv4": probe(socket.AF_INET), "ipv6": probe(socket.AF_INET6)}, sys.stdout,
              indent=1)
