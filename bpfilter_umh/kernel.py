"""The bpf() system call, through cffi: maps, program load with the verifier log, test-run, links,
bpffs pins, netns cookie and cached feature probes.

libbpf 1.1 is used where it covers the need (map create/lookup/update/delete, pin/get, info by fd,
test-run, link detach); the raw `union bpf_attr` is used where it lags: BPF_PROG_LOAD (libbpf 1.1
knows no `log_true_size`, added in Linux 6.4) and BPF_LINK_CREATE for netfilter links (libbpf 1.1
has no netfilter link options).

API (the compiler/engine build on these names):
  Map.create(map_type, key_size, value_size, max_entries, name="", flags=0, inner_map=None)
  Map.from_pin(path) / Map.from_id(id) / Map.from_fd(fd)
      .fd .id .map_type .key_size .value_size .max_entries .name
      .lookup(key) -> bytes | None          (None: no such key)
      .lookup_percpu(key) -> list[bytes]    (one value per possible CPU, each value_size bytes)
      .update(key, value, flags=BPF_ANY) .delete(key) .keys() .pin(path) .info() .close()
      .dup() -> Map                         (another fd of the same map, attributes copied)
      keys may be bytes or int (an int is packed little-endian into key_size bytes)
  Prog.load(prog_type, insns, license="GPL", name="", expected_attach_type=0, log_level=0,
            fd_array=None, prog_ifindex=0, kern_version=0, prog_flags=0)
  Prog.from_pin(path) / Prog.from_id(id) / Prog.from_fd(fd)
      .fd .id .log .info() -> dict(id, tag, jited_prog_len, xlated_prog_len, name, type, map_ids)
      .test_run(...) .pin(path) .close()
  test_run(prog_fd, data_in=b"", ctx_in=None, repeat=1, data_size_out=None, ctx_size_out=0)
      -> (retval, duration_ns, data_out)
  link_create_netfilter(prog, pf, hooknum, priority, flags=0) -> Link
  Link.from_pin(path) / Link.from_id(id)  .fd .id .info() .pin(path) .detach() .close()
  obj_pin(fd, path), obj_get(path) -> fd, unpin(path), ensure_bpffs(path="/sys/fs/bpf")
  netns_cookie() -> int                     (the network namespace of the calling thread)
  possible_cpus() -> int
  warm_types()                              (cffi parses the request path's C types now)
  features.has(name) -> bool, features.require(name), features.report() -> {name: (ok, detail)}
      names: netfilter_prog, netfilter_link, kfunc_dynptr, tail_call_netfilter, xdp, tcx

Every failure is a BpfilterError carrying the kernel's errno; file descriptors are closed on every
error path (objects also close on garbage collection, but callers should close() explicitly).
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import zlib

from .errors import BpfilterError
from .kernel_cdef import CDEF

# --- constants (include/uapi/linux/bpf.h) -------------------------------------------------------
SYS_bpf = 321  # x86_64

(BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM,
 BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD, BPF_OBJ_PIN, BPF_OBJ_GET) = range(8)
BPF_PROG_TEST_RUN = 10
BPF_LINK_CREATE = 28
BPF_LINK_DETACH = 34

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_RINGBUF = 27

BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_NETFILTER = 32

BPF_NETFILTER = 45          # enum bpf_attach_type
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_XDP = 37

BPF_LINK_TYPE_NETFILTER = 10

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_F_NO_PREALLOC = 1
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_NETFILTER_IP_DEFRAG = 1   # link flag, Linux 6.6+

BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_tail_call = 12
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_KFUNC_CALL = 2

BPF_FS_MAGIC = 0xCAFE4A11
BPF_OBJ_NAME_LEN = 16
SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000

NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
NF_DROP, NF_ACCEPT = 0, 1

# the verifier log: first try without one (fast path); on failure retry with this much, growing
# to the size the kernel says it needs (attr.log_true_size, Linux 6.4+), up to LOG_MAX.
LOG_START = 1 << 20
LOG_MAX = 1 << 28            # kernel limit is UINT_MAX >> 2 (kernel/bpf/log.c bpf_verifier_log_attr_valid)
LOG_TAIL_LINES = 20


def _declared(cdef: str = CDEF):
    """The FFI of `cdef`: the module tools/gen_kernel_ffi.py generated from it
    (bpfilter_umh/_kernel_ffi.py, cffi's out-of-line ABI mode: the declarations stored parsed,
    ~1.5 ms to import), when it was generated from these very declarations; else `cdef`
    parsed now (cffi's in-line ABI mode: pycparser, 40-90 ms of every helper's start here,
    which the door's first command waits for)."""
    try:
        from ._kernel_ffi import CDEF_CRC, ffi
    except ImportError:
        ffi = None
    if ffi is not None and CDEF_CRC == zlib.crc32(cdef.encode()):
        return ffi
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    return ffi


_ffi = _declared()
_libc = _ffi.dlopen(None)
try:
    _libbpf = _ffi.dlopen("libbpf.so.1")
except OSError as e:  # pragma: no cover - the package depends on libbpf1
    raise ImportError(f"bpfilter needs libbpf 1.x (Debian: apt-get install libbpf1): {e}") from e
# libbpf prints its own warnings to stderr; our errors carry the errno and a message instead.
_libbpf.libbpf_set_print(_ffi.NULL)


# the C types the request path names: cffi parses each string on its first use (pycparser
# for an in-line FFI: 0.2-0.3 ms each, ~4 ms for these; the generated FFI's own parser, ~0.4 ms
# for all), so a helper parses them at startup (warm_types), not in its first request
REQUEST_TYPES = ("char[]", "uintptr_t", "long", "unsigned long", "int[]", "uint32_t *",
                 "uint32_t[64]", "char[232]", "char[256]",
                 "struct bpf_map_create_opts", "struct bpf_map_create_opts *",
                 "struct bpf_attr_prog_load", "struct bpf_attr_prog_load *",
                 "struct bpf_attr_link_create_nf *", "struct bpf_attr_link_create_tcx *",
                 "struct bpf_test_run_opts", "struct bpf_test_run_opts *")


def warm_types():
    """Parse REQUEST_TYPES now (cffi caches each parsed string in the FFI object)."""
    for t in REQUEST_TYPES:
        _ffi.typeof(t)


def _err(op: str, e: int, what: str = "") -> BpfilterError:
    detail = f" {what}" if what else ""
    return BpfilterError(e, f"{op}{detail}: {os.strerror(e)}")


def _check(ret: int, op: str, what: str = "") -> int:
    """libbpf 1.x returns -errno (and sets errno) on failure."""
    if ret < 0:
        raise _err(op, -ret, what)
    return ret


def _bpf(cmd: int, attr, size: int) -> int:
    """The raw syscall: returns the result or -errno."""
    ret = _libc.syscall(_ffi.cast("long", SYS_bpf), _ffi.cast("long", cmd), attr,
                        _ffi.cast("unsigned long", size))
    return ret if ret >= 0 else -_ffi.errno


def _close(fd: int):
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _cstr(s: str, n: int = BPF_OBJ_NAME_LEN) -> bytes:
    """Object names: at most 15 chars of [A-Za-z0-9_.] (kernel/bpf/syscall.c bpf_obj_name_cpy)."""
    b = "".join(c if (c.isalnum() or c in "_.") else "_" for c in s).encode()[: n - 1]
    return b


# --- bpffs, pins, netns ------------------------------------------------------------------------
def is_bpffs(path: str) -> bool:
    buf = _ffi.new("char[256]")
    if _libc.statfs(path.encode(), buf) != 0:
        return False
    return struct.unpack_from("<q", _ffi.buffer(buf, 8))[0] == BPF_FS_MAGIC


def ensure_bpffs(path: str = "/sys/fs/bpf"):
    """Mount a bpf filesystem on `path` unless one is there (pins live in bpffs only)."""
    if is_bpffs(path):
        return
    os.makedirs(path, exist_ok=True)
    if _libc.mount(b"bpf", path.encode(), b"bpf", 0, _ffi.NULL) != 0:
        raise _err("mount bpffs on", _ffi.errno, path)


def obj_pin(fd: int, path: str):
    """Pin fd at `path` (parents created). The pin holds a user reference: a pinned prog array
    keeps its entries when the last fd closes (kernel/bpf/arraymap.c prog_array_map_clear runs
    only when the map's usercnt drops to zero)."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    if not is_bpffs(parent or "."):
        raise BpfilterError(errno.EINVAL, f"cannot pin {path}: {parent} is not a bpf filesystem")
    _check(_libbpf.bpf_obj_pin(fd, path.encode()), "BPF_OBJ_PIN", path)


def obj_get(path: str) -> int:
    return _check(_libbpf.bpf_obj_get(path.encode()), "BPF_OBJ_GET", path)


def unpin(path: str, missing_ok: bool = True):
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise BpfilterError(errno.ENOENT, f"no pin at {path}")
    except OSError as e:
        raise BpfilterError(e.errno, f"cannot unpin {path}: {e.strerror}")


def setns(fd: int, nstype: int = CLONE_NEWNET):
    """Move the calling thread into the namespace `fd` refers to."""
    if _libc.setns(fd, nstype) != 0:
        raise _err("setns", _ffi.errno)


def netns_cookie() -> int:
    """Cookie of the calling thread's network namespace (never reused within a boot, unlike
    the namespace inode number): net/core/sock.c sk_getsockopt SO_NETNS_COOKIE."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            return struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        except OSError as e:
            raise BpfilterError(e.errno, f"SO_NETNS_COOKIE: {e.strerror}")


def _parse_cpulist(text: str) -> int:
    n = 0
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            n = max(n, int(b) + 1)
        elif part:
            n = max(n, int(part) + 1)
    return n


_possible = None


def possible_cpus() -> int:
    """Per-CPU maps have one slot per *possible* CPU (kernel/bpf/syscall.c bpf_map_value_size)."""
    global _possible
    if _possible is None:
        with open("/sys/devices/system/cpu/possible") as f:
            _possible = _parse_cpulist(f.read())
    return _possible


# --- objects -----------------------------------------------------------------------------------
class _Obj:
    """An fd owning wrapper; close() is idempotent and also runs on garbage collection."""
    fd: int = -1
    _kind = "object"

    def close(self):
        fd, self.fd = self.fd, -1
        _close(fd)

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _need_fd(self):
        if self.fd < 0:
            raise BpfilterError(errno.EBADF, f"{self._kind} is closed")

    def pin(self, path: str):
        self._need_fd()
        obj_pin(self.fd, path)

    def _info(self, size: int) -> bytes:
        self._need_fd()
        buf = _ffi.new("char[]", size)
        ln = _ffi.new("uint32_t *", size)
        _check(_libbpf.bpf_obj_get_info_by_fd(self.fd, buf, ln), "BPF_OBJ_GET_INFO_BY_FD",
               self._kind)
        return bytes(_ffi.buffer(buf, size))

    @property
    def id(self) -> int:
        return self.info()["id"]


_ANON_NAMES = {"map": ("anon_inode:bpf-map",), "prog": ("anon_inode:bpf-prog",),
               "link": ("anon_inode:bpf-link", "anon_inode:bpf_link")}


def _check_kind(fd: int, kind: str, where: str = ""):
    """Make sure fd is a bpf map/prog/link: OBJ_GET_INFO_BY_FD would happily fill a map-sized
    buffer with a program's info. /proc/self/fdinfo names the kind (kernel/bpf/syscall.c
    bpf_map_show_fdinfo: "map_type:", bpf_prog_show_fdinfo: "prog_type:", bpf_link_show_fdinfo:
    "link_type:"). Closes fd when it is not.
    The anon inode's name says it first, in one readlink (~6 us, against ~27 us for the
    fdinfo's open, read and close: an append reads 7 pins): bpf_map_new_fd, bpf_prog_new_fd
    and bpf_link_new_fd name their files "bpf-map", "bpf-prog" and "bpf-link" (a new link's,
    bpf_link_prime: "bpf_link"), and only they. Any other name, or a failed readlink, is left
    to the fdinfo, which accepts and refuses as it always did."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") in _ANON_NAMES[kind]:
            return fd
    except (OSError, KeyError):
        pass
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            text = f.read()
    except OSError as e:
        _close(fd)
        raise BpfilterError(e.errno or errno.EBADF, f"fd {fd}: {e.strerror}")
    if f"\n{kind}_type:" not in "\n" + text:
        _close(fd)
        raise BpfilterError(errno.EINVAL, f"{where or f'fd {fd}'} is not a BPF {kind}")
    return fd


def _from_id(getter, id_: int, what: str) -> int:
    return _check(getter(id_), f"BPF_{what.upper()}_GET_FD_BY_ID", str(id_))


class Map(_Obj):
    _kind = "map"

    def __init__(self, fd: int, map_type: int, key_size: int, value_size: int,
                 max_entries: int, name: str = "", flags: int = 0):
        self.fd, self.map_type, self.key_size, self.value_size = fd, map_type, key_size, value_size
        self.max_entries, self.name, self.flags = max_entries, name, flags

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, inner_map: "Map" = None) -> "Map":
        opts = _ffi.new("struct bpf_map_create_opts *")
        opts.sz = _ffi.sizeof("struct bpf_map_create_opts")
        opts.map_flags = flags
        if inner_map is not None:
            opts.inner_map_fd = inner_map.fd
        nm = _cstr(name)
        fd = _check(_libbpf.bpf_map_create(map_type, nm or _ffi.NULL, key_size, value_size,
                                           max_entries, opts),
                    "BPF_MAP_CREATE", f"{name or 'map'} (type {map_type}, key {key_size}, "
                    f"value {value_size}, max_entries {max_entries})")
        return cls(fd, map_type, key_size, value_size, max_entries, name, flags)

    @classmethod
    def from_fd(cls, fd: int, checked: bool = False) -> "Map":
        """Adopt fd (closed on error). checked: the caller knows fd is a map (_check_kind done,
        or BPF_MAP_GET_FD_BY_ID, which gives map fds only): no second /proc read."""
        if not checked:
            _check_kind(fd, "map")
        m = cls(fd, 0, 0, 0, 0)
        try:
            i = m.info()
        except BaseException:
            m.close()
            raise
        m.map_type, m.key_size, m.value_size = i["type"], i["key_size"], i["value_size"]
        m.max_entries, m.name, m.flags = i["max_entries"], i["name"], i["map_flags"]
        return m

    @classmethod
    def from_pin(cls, path: str) -> "Map":
        return cls.from_fd(_check_kind(obj_get(path), "map", path), checked=True)

    def dup(self) -> "Map":
        """Another fd of this map with the attributes known here: from_fd's fdinfo read and
        OBJ_GET_INFO_BY_FD (0.1-0.6 ms) are not needed for a map this process made."""
        self._need_fd()
        return Map(os.dup(self.fd), self.map_type, self.key_size, self.value_size,
                   self.max_entries, self.name, self.flags)

    @classmethod
    def from_id(cls, id_: int) -> "Map":
        return cls.from_fd(_from_id(_libbpf.bpf_map_get_fd_by_id, id_, "map"), checked=True)

    def info(self) -> dict:
        b = self._info(88)
        t, id_, ks, vs, me, fl = struct.unpack_from("<6I", b, 0)
        return dict(type=t, id=id_, key_size=ks, value_size=vs, max_entries=me, map_flags=fl,
                    name=b[24:40].split(b"\0")[0].decode())

    def _key(self, key) -> bytes:
        if isinstance(key, int):
            if self.key_size not in (1, 2, 4, 8):
                raise BpfilterError(errno.EINVAL, f"int key for a map with key_size {self.key_size}")
            return key.to_bytes(self.key_size, "little")
        key = bytes(key)
        if len(key) != self.key_size:
            raise BpfilterError(errno.EINVAL,
                                f"key of {len(key)} bytes for map {self.name!r} (key_size {self.key_size})")
        return key

    @property
    def percpu(self) -> bool:
        return self.map_type in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, 10, 21)

    def _value_len(self) -> int:
        if self.percpu:
            return ((self.value_size + 7) & ~7) * possible_cpus()
        return self.value_size

    def _lookup_raw(self, key):
        self._need_fd()
        val = _ffi.new("char[]", max(self._value_len(), 1))
        ret = _libbpf.bpf_map_lookup_elem(self.fd, _ffi.from_buffer(self._key(key)), val)
        if ret == -errno.ENOENT:
            return None
        _check(ret, "BPF_MAP_LOOKUP_ELEM", self.name)
        return bytes(_ffi.buffer(val, self._value_len()))

    def lookup(self, key):
        """The value (bytes), or None if the key is absent. For per-CPU maps: the sum is not
        defined generically, use lookup_percpu()."""
        if self.percpu:
            raise BpfilterError(errno.EINVAL, f"map {self.name!r} is per-CPU: use lookup_percpu")
        return self._lookup_raw(key)

    def lookup_percpu(self, key) -> list:
        """One value_size-byte value per possible CPU (each slot is rounded up to 8 bytes by the
        kernel: kernel/bpf/syscall.c bpf_map_copy_value / round_up(value_size, 8))."""
        if not self.percpu:
            raise BpfilterError(errno.EINVAL, f"map {self.name!r} is not per-CPU")
        raw = self._lookup_raw(key)
        if raw is None:
            return None
        step = (self.value_size + 7) & ~7
        return [raw[i * step:i * step + self.value_size] for i in range(possible_cpus())]

    def update(self, key, value, flags: int = BPF_ANY):
        self._need_fd()
        if isinstance(value, _Obj):            # prog array / map-in-map: the value is an fd
            value = struct.pack("<I", value.fd)
        elif isinstance(value, int) and self.value_size in (4, 8):
            value = value.to_bytes(self.value_size, "little")
        value = bytes(value)
        if self.percpu and len(value) == self.value_size:
            step = (self.value_size + 7) & ~7
            value = (value + b"\0" * (step - self.value_size)) * possible_cpus()
        if len(value) != self._value_len():
            raise BpfilterError(errno.EINVAL, f"value of {len(value)} bytes for map "
                                f"{self.name!r} (expects {self._value_len()})")
        _check(_libbpf.bpf_map_update_elem(self.fd, _ffi.from_buffer(self._key(key)),
                                           _ffi.from_buffer(value), flags),
               "BPF_MAP_UPDATE_ELEM", self.name)

    def delete(self, key):
        self._need_fd()
        _check(_libbpf.bpf_map_delete_elem(self.fd, _ffi.from_buffer(self._key(key))),
               "BPF_MAP_DELETE_ELEM", self.name)

    def keys(self):
        self._need_fd()
        cur = _ffi.NULL
        nxt = _ffi.new("char[]", self.key_size)
        for _ in range(1 << 24):                # bounded: no map holds more keys here
            ret = _libbpf.bpf_map_get_next_key(self.fd, cur, nxt)
            if ret == -errno.ENOENT:
                return
            _check(ret, "BPF_MAP_GET_NEXT_KEY", self.name)
            k = bytes(_ffi.buffer(nxt, self.key_size))
            yield k
            cur = _ffi.new("char[]", k)


class Prog(_Obj):
    _kind = "program"

    def __init__(self, fd: int, prog_type: int = 0, name: str = "", log: str = ""):
        self.fd, self.prog_type, self.name, self.log = fd, prog_type, name, log

    @classmethod
    def load(cls, prog_type: int, insns: bytes, license: str = "GPL", name: str = "",
             expected_attach_type: int = 0, log_level: int = 0, fd_array=None,
             prog_ifindex: int = 0, kern_version: int = 0, prog_flags: int = 0) -> "Prog":
        """Load `insns` (struct bpf_insn array). Without log_level, a failed load is retried once
        with a level-1 verifier log so that the error quotes the verifier's last lines; the log
        buffer grows to attr.log_true_size (kernel/bpf/log.c) when the kernel reports ENOSPC."""
        insns = bytes(insns)
        if not insns or len(insns) % 8:
            raise BpfilterError(errno.EINVAL, f"program {name!r}: {len(insns)} bytes is not a "
                                "non-empty array of 8-byte instructions")
        keep = []          # cdata the attr points into must outlive the syscalls
        attr = _ffi.new("struct bpf_attr_prog_load *")
        attr.prog_type = prog_type
        attr.insn_cnt = len(insns) // 8
        ib = _ffi.from_buffer(insns)
        lic = _ffi.new("char[]", license.encode())
        keep += [ib, lic]
        attr.insns = int(_ffi.cast("uintptr_t", ib))
        attr.license = int(_ffi.cast("uintptr_t", lic))
        attr.kern_version = kern_version
        attr.prog_flags = prog_flags
        attr.prog_name = _cstr(name)
        attr.prog_ifindex = prog_ifindex
        attr.expected_attach_type = expected_attach_type
        if fd_array:
            fa = _ffi.new("int[]", [getattr(x, "fd", x) for x in fd_array])
            keep.append(fa)
            attr.fd_array = int(_ffi.cast("uintptr_t", fa))
        size = _ffi.sizeof("struct bpf_attr_prog_load")

        level = log_level
        log_size = LOG_START if level else 0
        log = ""
        for _attempt in range(8):              # bounded: EAGAIN retries + log growth
            buf = _ffi.new("char[]", log_size) if log_size else _ffi.NULL
            attr.log_level = level
            attr.log_size = log_size
            attr.log_buf = int(_ffi.cast("uintptr_t", buf)) if log_size else 0
            attr.log_true_size = 0
            fd = _bpf(BPF_PROG_LOAD, attr, size)
            if log_size:
                log = _ffi.string(buf, log_size).decode(errors="replace")
            if fd >= 0:
                return cls(fd, prog_type, name, log)
            e = -fd
            if e == errno.EAGAIN:
                continue
            if e == errno.ENOSPC and level and log_size < LOG_MAX:
                # the log was truncated: grow to what the kernel says it needs (6.4+), else x4
                want = attr.log_true_size or log_size * 4
                if want > log_size:
                    log_size = min(max(want + 1, log_size), LOG_MAX)
                    continue
            if not level and e not in (errno.EPERM, errno.E2BIG, errno.EFAULT):
                level, log_size = 1, LOG_START   # retry once to get the verifier's reasons
                continue
            break
        raise BpfilterError(e, _load_message(name or f"type {prog_type}", e, log))

    @classmethod
    def from_fd(cls, fd: int, checked: bool = False) -> "Prog":
        """Adopt fd (closed on error); checked: as Map.from_fd."""
        if not checked:
            _check_kind(fd, "prog")
        p = cls(fd)
        try:
            i = p.info()
        except BaseException:
            p.close()
            raise
        p.prog_type, p.name = i["type"], i["name"]
        return p

    @classmethod
    def from_pin(cls, path: str) -> "Prog":
        return cls.from_fd(_check_kind(obj_get(path), "prog", path), checked=True)

    @classmethod
    def from_id(cls, id_: int) -> "Prog":
        return cls.from_fd(_from_id(_libbpf.bpf_prog_get_fd_by_id, id_, "prog"), checked=True)

    def info(self) -> dict:
        self._need_fd()
        # struct bpf_prog_info: map_ids needs a user buffer; ask for up to 64 ids
        ids = _ffi.new("uint32_t[64]")
        buf = _ffi.new("char[232]")
        struct.pack_into("<IQ", _ffi.buffer(buf), 52, 64, int(_ffi.cast("uintptr_t", ids)))
        ln = _ffi.new("uint32_t *", 232)
        _check(_libbpf.bpf_obj_get_info_by_fd(self.fd, buf, ln), "BPF_OBJ_GET_INFO_BY_FD", "program")
        b = bytes(_ffi.buffer(buf, 232))
        t, id_ = struct.unpack_from("<II", b, 0)
        jl, xl = struct.unpack_from("<II", b, 16)
        nmaps = min(struct.unpack_from("<I", b, 52)[0], 64)
        # verified_insns (offset 216): what the verifier processed, main program and functions
        return dict(type=t, id=id_, tag=b[8:16].hex(), jited_prog_len=jl, xlated_prog_len=xl,
                    name=b[64:80].split(b"\0")[0].decode(), map_ids=list(ids[0:nmaps]),
                    verified_insns=struct.unpack_from("<I", b, 216)[0])

    def test_run(self, *a, **kw):
        self._need_fd()
        return test_run(self.fd, *a, **kw)


def _load_message(what: str, e: int, log: str) -> str:
    msg = f"BPF_PROG_LOAD {what}: {os.strerror(e)}"
    lines = [ln for ln in log.splitlines() if ln.strip()]
    if lines:
        tail = lines[-LOG_TAIL_LINES:]
        msg += f"; verifier log (last {len(tail)} of {len(lines)} lines):\n" + "\n".join(tail)
    elif e == errno.EPERM:
        msg += " (needs CAP_BPF/CAP_SYS_ADMIN)"
    elif e in (errno.E2BIG, errno.EFAULT):
        # (not retried with a log: the verifier would run the whole program again)
        msg += (" (how the verifier refuses a program past its limits: 1 000 000 instructions"
                " processed, or 8 192 branches pending, which 6.18 reports as EFAULT)")
    return msg


def test_run(prog_fd, data_in: bytes = b"", ctx_in: bytes = None, repeat: int = 1,
             data_size_out: int = None, ctx_size_out: int = 0):
    """BPF_PROG_TEST_RUN -> (retval, duration_ns per run, data_out).
    Netfilter programs (net/bpf/test_run.c bpf_prog_test_run_nf): data_in is an Ethernet frame
    (eth_type_trans pulls the header; its EtherType must match pf), ctx_in a struct
    nf_hook_state prefix with hook at byte 0 and pf at byte 1, everything else zero.
    Measured on 6.18: at PRE_ROUTING/LOCAL_IN/FORWARD/POST_ROUTING data_in is an Ethernet frame
    and the program sees the IP header at offset 0; at LOCAL_OUT -- also the default hook when
    ctx_in is None -- data_in is used as is, so pass the bare IP packet (an Ethernet frame there
    would put a MAC address where the program expects the IP header)."""
    fd = getattr(prog_fd, "fd", prog_fd)
    opts = _ffi.new("struct bpf_test_run_opts *")
    opts.sz = _ffi.sizeof("struct bpf_test_run_opts")
    data_in = bytes(data_in)
    din = _ffi.from_buffer(data_in) if data_in else _ffi.NULL
    opts.data_in = din
    opts.data_size_in = len(data_in)
    if data_size_out is None:
        data_size_out = len(data_in) + 256 if data_in else 0
    dout = _ffi.new("char[]", data_size_out) if data_size_out else _ffi.NULL
    opts.data_out = dout
    opts.data_size_out = data_size_out
    if ctx_in is not None:
        ctx_in = bytes(ctx_in)
        cin = _ffi.from_buffer(ctx_in)
        opts.ctx_in = cin
        opts.ctx_size_in = len(ctx_in)
    cout = _ffi.new("char[]", ctx_size_out) if ctx_size_out else _ffi.NULL
    opts.ctx_out = cout
    opts.ctx_size_out = ctx_size_out
    opts.repeat = repeat
    _check(_libbpf.bpf_prog_test_run_opts(fd, opts), "BPF_PROG_TEST_RUN")
    out = bytes(_ffi.buffer(dout, min(opts.data_size_out, data_size_out))) if data_size_out else b""
    return opts.retval, opts.duration, out


class Link(_Obj):
    _kind = "link"

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def from_pin(cls, path: str) -> "Link":
        return cls(_check_kind(obj_get(path), "link", path))

    @classmethod
    def from_id(cls, id_: int) -> "Link":
        return cls(_from_id(_libbpf.bpf_link_get_fd_by_id, id_, "link"))

    def info(self) -> dict:
        b = self._info(48)
        t, id_, prog_id = struct.unpack_from("<III", b, 0)
        d = dict(type=t, id=id_, prog_id=prog_id)
        if t == BPF_LINK_TYPE_NETFILTER:
            pf, hooknum, prio, flags = struct.unpack_from("<IIiI", b, 16)
            d.update(pf=pf, hooknum=hooknum, priority=prio, flags=flags)
        return d

    def detach(self):
        """Detach now (the link becomes defunct even if pinned or held elsewhere): for netfilter
        links, net/netfilter/nf_bpf_link.c bpf_nf_link_detach unregisters the hook."""
        self._need_fd()
        _check(_libbpf.bpf_link_detach(self.fd), "BPF_LINK_DETACH")


def link_create_netfilter(prog, pf: int, hooknum: int, priority: int, flags: int = 0) -> Link:
    """A BPF_LINK_TYPE_NETFILTER link in the calling thread's network namespace
    (net/netfilter/nf_bpf_link.c bpf_nf_link_attach). EBUSY: a BPF hook already sits at this
    (pf, hooknum, priority) is used by any other hook (measured: an instantiated iptables-legacy
    filter table at 0 makes priority 0 busy); NF_IP_PRI_FIRST/LAST give ERANGE, a bad hook EPROTO."""
    pfd = getattr(prog, "fd", prog)
    attr = _ffi.new("struct bpf_attr_link_create_nf *")
    attr.prog_fd = pfd
    attr.attach_type = BPF_NETFILTER
    attr.pf, attr.hooknum, attr.priority, attr.nf_flags = pf, hooknum, priority, flags
    fd = _bpf(BPF_LINK_CREATE, attr, _ffi.sizeof(attr[0]))
    if fd < 0:
        e = -fd
        hint = ""
        if e == errno.EBUSY:
            # net/netfilter/core.c nf_hook_entries_grow: a BPF hook may not share its priority
            # with any other hook of (pf, hooknum): iptables' filter table, an nft chain, a link
            hint = (" (another netfilter hook already uses this priority: iptables' table, an "
                    "nft chain or another BPF link)")
        raise BpfilterError(e, f"BPF_LINK_CREATE netfilter pf={pf} hook={hooknum} "
                               f"priority={priority} flags={flags}: {os.strerror(e)}{hint}")
    return Link(fd)


def link_create_ifindex(prog, ifindex: int, attach_type: int, flags: int = 0) -> Link:
    """BPF_LINK_CREATE on an interface: tcx (BPF_TCX_INGRESS/EGRESS) and XDP (BPF_XDP, flags =
    XDP mode) links share the attr prefix {prog_fd, target_ifindex, attach_type, flags}
    (kernel/bpf/syscall.c link_create)."""
    attr = _ffi.new("struct bpf_attr_link_create_tcx *")
    attr.prog_fd, attr.target_ifindex = getattr(prog, "fd", prog), ifindex
    attr.attach_type, attr.flags = attach_type, flags
    fd = _bpf(BPF_LINK_CREATE, attr, _ffi.sizeof(attr[0]))
    if fd < 0:
        raise BpfilterError(-fd, f"BPF_LINK_CREATE type {attach_type} ifindex {ifindex} "
                                 f"flags {flags:#x}: {os.strerror(-fd)}")
    return Link(fd)


# --- hand-encoded instructions used by probes and the attach dispatcher -------------------------
def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """struct bpf_insn: code u8, dst_reg:4 | src_reg:4 (little-endian bitfield order), off s16,
    imm s32."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_imm64(dst: int, imm: int, src: int = 0) -> bytes:
    return insn(0x18, dst, src, 0, imm & 0xFFFFFFFF) + insn(0, 0, 0, 0, (imm >> 32) & 0xFFFFFFFF)


def mov64_imm(dst: int, imm: int) -> bytes:
    return insn(0xB7, dst, 0, 0, imm)


def mov64_reg(dst: int, src: int) -> bytes:
    return insn(0xBF, dst, src)


def call(imm: int, src: int = 0) -> bytes:
    return insn(0x85, 0, src, 0, imm)


def exit_() -> bytes:
    return insn(0x95)


# --- feature probes ----------------------------------------------------------------------------
class Features:
    """Cached probes of what the running kernel offers. has() never raises; require() raises
    BpfilterError(EOPNOTSUPP, "this kernel lacks X: ...")."""

    DESCRIPTIONS = {
        "netfilter_prog": "BPF_PROG_TYPE_NETFILTER programs (Linux 6.4+)",
        "netfilter_link": "netfilter BPF links (BPF_LINK_CREATE attach type BPF_NETFILTER, 6.4+)",
        "kfunc_dynptr": "kfuncs bpf_dynptr_from_skb + bpf_dynptr_slice callable from netfilter programs",
        "tail_call_netfilter": "bpf_tail_call from BPF_PROG_TYPE_NETFILTER programs",
        "xdp": "XDP programs",
        "tcx": "tcx links (BPF_TCX_INGRESS/EGRESS, 6.6+)",
    }

    def __init__(self):
        self._cache = {}
        self._lock = threading.RLock()   # probes require() other probes

    def report(self) -> dict:
        return {n: self._probe(n) for n in self.DESCRIPTIONS}

    def has(self, name: str) -> bool:
        return self._probe(name)[0]

    def require(self, name: str):
        ok, detail = self._probe(name)
        if not ok:
            raise BpfilterError(errno.EOPNOTSUPP,
                                f"this kernel lacks {self.DESCRIPTIONS[name]}: {detail}")

    def _probe(self, name: str):
        if name not in self.DESCRIPTIONS:
            raise BpfilterError(errno.EINVAL, f"unknown kernel feature {name!r}")
        with self._lock:
            if name not in self._cache:
                try:
                    getattr(self, "_probe_" + name)()
                    self._cache[name] = (True, "")
                except BpfilterError as e:
                    self._cache[name] = (False, e.message)
            return self._cache[name]

    @staticmethod
    def _nf_accept(body: bytes = b"", fd_array=None, name="probe_nf") -> Prog:
        return Prog.load(BPF_PROG_TYPE_NETFILTER, body + mov64_imm(0, NF_ACCEPT) + exit_(),
                         name=name, expected_attach_type=BPF_NETFILTER, fd_array=fd_array)

    def _probe_netfilter_prog(self):
        self._nf_accept().close()

    def _probe_netfilter_link(self):
        self.require("netfilter_prog")
        with self._nf_accept() as p:
            # attach an accept-all program in a throwaway network namespace, on a thread of its
            # own, so that the caller's namespace never sees a hook appear (unshare affects only
            # the calling thread's nsproxy: kernel/fork.c ksys_unshare)
            result = []

            def attempt():
                try:
                    if _libc.unshare(CLONE_NEWNET) != 0:
                        raise _err("unshare(CLONE_NEWNET) for the netfilter link probe", _ffi.errno)
                    link_create_netfilter(p, NFPROTO_IPV4, 3, 1).close()
                    result.append(None)
                except BpfilterError as e:
                    result.append(e)

            t = threading.Thread(target=attempt, name="bpfilter-probe")
            t.start()
            t.join()
            if result[0] is not None:
                raise result[0]

    def _probe_kfunc_dynptr(self):
        self.require("netfilter_prog")
        from . import btf
        try:
            from_skb = btf.func_id("bpf_dynptr_from_skb")
            slice_ = btf.func_id("bpf_dynptr_slice")
            skb_off = btf.member_offset("bpf_nf_ctx", "skb")
        except BpfilterError as e:
            raise BpfilterError(errno.EOPNOTSUPP, e.message)
        # both must be registered for BPF_PROG_TYPE_NETFILTER, not merely present in BTF
        body = (insn(0x79, 1, 1, skb_off)            # r1 = ctx->skb
                + mov64_imm(2, 0)                   # flags
                + mov64_reg(3, 10) + insn(0x07, 3, 0, 0, -16)   # r3 = fp - 16 (struct bpf_dynptr)
                + call(from_skb, BPF_PSEUDO_KFUNC_CALL)
                + mov64_reg(1, 10) + insn(0x07, 1, 0, 0, -16)   # r1 = the dynptr
                + mov64_imm(2, 0)                               # offset
                + mov64_reg(3, 10) + insn(0x07, 3, 0, 0, -24)   # 4-byte bounce buffer
                + mov64_imm(4, 4)
                + call(slice_, BPF_PSEUDO_KFUNC_CALL))
        self._nf_accept(body).close()

    def _probe_tail_call_netfilter(self):
        self.require("netfilter_prog")
        with Map.create(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, "probe_pa") as m:
            body = ld_imm64(2, m.fd, BPF_PSEUDO_MAP_FD) + mov64_imm(3, 0) + call(BPF_FUNC_tail_call)
            self._nf_accept(body).close()

    def _probe_xdp(self):
        Prog.load(BPF_PROG_TYPE_XDP, mov64_imm(0, 2) + exit_(), name="probe_xdp").close()

    def _probe_tcx(self):
        with Prog.load(BPF_PROG_TYPE_SCHED_CLS, mov64_imm(0, 0) + exit_(), name="probe_tcx",
                       expected_attach_type=BPF_TCX_INGRESS) as p:
            # ifindex 0 exists nowhere: a kernel with tcx answers ENODEV, one without EINVAL
            attr = _ffi.new("struct bpf_attr_link_create_tcx *")
            attr.prog_fd, attr.target_ifindex, attr.attach_type = p.fd, 0, BPF_TCX_INGRESS
            fd = _bpf(BPF_LINK_CREATE, attr, _ffi.sizeof(attr[0]))
            if fd >= 0:
                _close(fd)
                return
            if -fd != errno.ENODEV:
                raise _err("BPF_LINK_CREATE tcx", -fd)


features = Features()
