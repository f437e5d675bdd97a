"""A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux): kfunc ids and struct layouts.

  func_id(name) -> int                   BTF id of a BTF_KIND_FUNC (the imm of a kfunc call with
                                         src_reg = BPF_PSEUDO_KFUNC_CALL, off = 0 for vmlinux)
  struct_size(name) -> int               sizeof(struct name)
  member_offset(struct, "a.b") -> int    byte offset; looks through anonymous unions/structs
                                         (sk_buff.mark sits in one) and follows dotted paths
  member(struct, "a.b") -> (offset, size)
  Btf(path) for another file; the module functions use a cached Btf of vmlinux.

Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst. Records are walked once and
indexed by position; a record's size depends on its kind, so every kind's trailer is known here.
"""
from __future__ import annotations

import errno
import functools
import struct

from .errors import BpfilterError

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

(BTF_KIND_UNKN, BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT, BTF_KIND_UNION,
 BTF_KIND_ENUM, BTF_KIND_FWD, BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST,
 BTF_KIND_RESTRICT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO, BTF_KIND_VAR, BTF_KIND_DATASEC,
 BTF_KIND_FLOAT, BTF_KIND_DECL_TAG, BTF_KIND_TYPE_TAG, BTF_KIND_ENUM64) = range(20)

# bytes following the 12-byte struct btf_type: (fixed, per vlen entry)
_TRAILER = {
    BTF_KIND_INT: (4, 0), BTF_KIND_PTR: (0, 0), BTF_KIND_ARRAY: (12, 0),
    BTF_KIND_STRUCT: (0, 12), BTF_KIND_UNION: (0, 12), BTF_KIND_ENUM: (0, 8),
    BTF_KIND_FWD: (0, 0), BTF_KIND_TYPEDEF: (0, 0), BTF_KIND_VOLATILE: (0, 0),
    BTF_KIND_CONST: (0, 0), BTF_KIND_RESTRICT: (0, 0), BTF_KIND_FUNC: (0, 0),
    BTF_KIND_FUNC_PROTO: (0, 8), BTF_KIND_VAR: (4, 0), BTF_KIND_DATASEC: (0, 12),
    BTF_KIND_FLOAT: (0, 0), BTF_KIND_DECL_TAG: (4, 0), BTF_KIND_TYPE_TAG: (0, 0),
    BTF_KIND_ENUM64: (0, 12),
}
_MODIFIERS = (BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT,
              BTF_KIND_TYPE_TAG)
_SIZED = (BTF_KIND_INT, BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_ENUM, BTF_KIND_FLOAT,
          BTF_KIND_ENUM64, BTF_KIND_DATASEC)


class Btf:
    def __init__(self, path: str = VMLINUX):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BpfilterError(e.errno or errno.ENOENT,
                                f"cannot read BTF {path}: {e.strerror} (kernel without "
                                "CONFIG_DEBUG_INFO_BTF?)")
        self.path = path
        if len(data) < 24:
            raise BpfilterError(errno.EINVAL, f"{path}: too short for a BTF header")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BpfilterError(errno.EINVAL, f"{path}: bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<4I", data, 8)
        self._types = data[hdr_len + type_off: hdr_len + type_off + type_len]
        self._strs = data[hdr_len + str_off: hdr_len + str_off + str_len]
        if len(self._types) != type_len or len(self._strs) != str_len:
            raise BpfilterError(errno.EINVAL, f"{path}: truncated BTF sections")
        self._pos = [None]              # type id -> record offset (id 0 is void)
        self._by_name = {}              # (kind, name) -> first type id
        self._index()

    def _index(self):
        t, pos, n = self._types, 0, len(self._types)
        unpack, positions, by_name, strs = struct.Struct("<III").unpack_from, self._pos, \
            self._by_name, self._strs
        wanted = (BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_FUNC, BTF_KIND_TYPEDEF)
        while pos < n:
            name_off, info, _ = unpack(t, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            try:
                fixed, per = _TRAILER[kind]
            except KeyError:
                raise BpfilterError(errno.EINVAL, f"{self.path}: unknown BTF kind {kind} at "
                                    f"type id {len(positions)}")
            positions.append(pos)
            if kind in wanted and name_off:
                end = strs.index(b"\0", name_off)
                key = (kind, strs[name_off:end].decode())
                by_name.setdefault(key, len(positions) - 1)
            pos += 12 + fixed + per * vlen
        if pos != n:
            raise BpfilterError(errno.EINVAL, f"{self.path}: type section ends mid-record")

    # -- raw access ---------------------------------------------------------------------------
    def _name(self, off: int) -> str:
        return self._strs[off:self._strs.index(b"\0", off)].decode()

    def _rec(self, tid: int):
        """(kind, name, vlen, kind_flag, size_or_type, trailer offset)"""
        if not 0 < tid < len(self._pos):
            raise BpfilterError(errno.EINVAL, f"{self.path}: no BTF type id {tid}")
        p = self._pos[tid]
        name_off, info, st = struct.unpack_from("<III", self._types, p)
        return ((info >> 24) & 0x1F, self._name(name_off), info & 0xFFFF, info >> 31, st, p + 12)

    def _find(self, kind: int, name: str) -> int:
        tid = self._by_name.get((kind, name))
        if tid is None:
            raise BpfilterError(errno.ENOENT, f"{self.path}: no {_KIND_NAMES[kind]} {name!r}")
        return tid

    def _resolve(self, tid: int) -> int:
        for _ in range(64):                 # bounded: modifier chains are short
            kind, _n, _v, _k, st, _p = self._rec(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = st
        raise BpfilterError(errno.ELOOP, f"{self.path}: modifier chain too long at {tid}")

    def type_size(self, tid: int) -> int:
        tid = self._resolve(tid)
        kind, name, _v, _k, st, p = self._rec(tid)
        if kind in _SIZED:
            return st
        if kind == BTF_KIND_PTR:
            return 8
        if kind == BTF_KIND_ARRAY:
            elem, _idx, nelems = struct.unpack_from("<III", self._types, p)
            return self.type_size(elem) * nelems
        raise BpfilterError(errno.EINVAL, f"{self.path}: type {name or tid} has no size")

    def _members(self, tid: int):
        """Yield (name, type id, bit offset, bitfield size) of a struct/union."""
        kind, _n, vlen, kflag, _s, p = self._rec(tid)
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._types, p + 12 * i)
            if kflag:   # bitfield encoding: size in the top 8 bits, bit offset in the low 24
                yield self._name(name_off), mtype, off & 0xFFFFFF, off >> 24
            else:
                yield self._name(name_off), mtype, off, 0

    def _member_in(self, tid: int, name: str, depth: int = 0):
        """(bit offset, type id, bitfield size) of `name` in composite tid, searching anonymous
        members depth-first like C name lookup does."""
        if depth > 16:
            return None
        for mname, mtype, boff, bsize in self._members(tid):
            if mname == name:
                return boff, mtype, bsize
            if not mname:
                inner = self._resolve(mtype)
                if self._rec(inner)[0] in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                    hit = self._member_in(inner, name, depth + 1)
                    if hit:
                        return boff + hit[0], hit[1], hit[2]
        return None

    def _composite(self, name: str) -> int:
        tid = self._by_name.get((BTF_KIND_STRUCT, name)) or self._by_name.get((BTF_KIND_UNION, name))
        if tid is None:
            tdef = self._by_name.get((BTF_KIND_TYPEDEF, name))
            if tdef is not None:
                tid = self._resolve(tdef)
        if tid is None:
            raise BpfilterError(errno.ENOENT, f"{self.path}: no struct or union {name!r}")
        return tid

    # -- public -------------------------------------------------------------------------------
    def func_id(self, name: str) -> int:
        return self._find(BTF_KIND_FUNC, name)

    def struct_size(self, name: str) -> int:
        return self.type_size(self._composite(name))

    def member(self, struct_name: str, path: str):
        """(byte offset, byte size) of a member path such as "in" or "a.b.c"."""
        tid, total = self._composite(struct_name), 0
        parts = path.split(".")
        for i, part in enumerate(parts):
            kind = self._rec(tid)[0]
            if kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                raise BpfilterError(errno.EINVAL, f"{struct_name}.{'.'.join(parts[:i])} is not "
                                    "a struct or union")
            hit = self._member_in(tid, part)
            if hit is None:
                raise BpfilterError(errno.ENOENT, f"{self.path}: struct {struct_name} has no "
                                    f"member {'.'.join(parts[:i + 1])}")
            boff, mtype, bsize = hit
            if bsize or boff % 8:
                raise BpfilterError(errno.EINVAL, f"{struct_name}.{path} is a bitfield "
                                    f"(bit offset {boff}, {bsize} bits): no byte offset")
            total += boff // 8
            tid = self._resolve(mtype)
        return total, self.type_size(tid)

    def member_offset(self, struct_name: str, path: str) -> int:
        return self.member(struct_name, path)[0]


_KIND_NAMES = {BTF_KIND_STRUCT: "struct", BTF_KIND_UNION: "union", BTF_KIND_FUNC: "function",
               BTF_KIND_TYPEDEF: "typedef"}


@functools.lru_cache(maxsize=None)
def vmlinux() -> Btf:
    return Btf(VMLINUX)


@functools.lru_cache(maxsize=None)
def func_id(name: str) -> int:
    return vmlinux().func_id(name)


@functools.lru_cache(maxsize=None)
def struct_size(name: str) -> int:
    return vmlinux().struct_size(name)


@functools.lru_cache(maxsize=None)
def member(struct_name: str, path: str):
    return vmlinux().member(struct_name, path)


def member_offset(struct_name: str, path: str) -> int:
    return member(struct_name, path)[0]
