"""eBPF instructions as immutable values, an assembler with symbolic labels and late fixups, and a
disassembler printing annotated listings.

API (stable; other modules and tests use it):
  Insn                      frozen value: code, dst, src, off, imm + symbolic `target` (jump label),
                            `map` (map name for BPF_PSEUDO_MAP_FD lddw), `kfunc` (kfunc name for
                            BPF_PSEUDO_KFUNC_CALL) and `comment` (shown in listings)
  Label(name, comment="")   a position marker in an instruction list
  builders                  mov, alu, neg, be16/be32/be64, ldx, stx, st, jmp, ja, call, kfunc,
                            call_local (bpf-to-bpf call of a label), exit_, ld_imm64, ld_map_fd
  prune(items)              drop instructions no path from insn 0 reaches (the verifier rejects
                            unreachable code: kernel/bpf/verifier.c check_cfg "unreachable insn")
  assemble(items, maps={}, kfuncs={}) -> bytes
                            resolve labels (offsets count 8-byte slots, lddw = 2 slots), map fds
                            and kfunc BTF ids; raises BpfilterError on an unresolvable reference
  decode(bytes) -> list[Insn]   raw bytecode back to values (for listing what the kernel holds)
  listing(items) -> str     annotated text: one line per instruction, label lines, comments
  subprogram_starts(items) -> [(slot, label)]   where each bpf-to-bpf callee starts
  func_btf(frame_size, funcs) -> (btf, func_info)   BTF + func_info records making some
                            subprograms BTF_FUNC_GLOBAL (verified once each, issue #7)

Register names: R0..R10 (R10 = frame pointer). Sizes: W, H, B, DW.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Union

from .errors import BpfilterError

# instruction classes (include/uapi/linux/bpf_common.h, bpf.h)
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_JMP32, BPF_ALU64 = range(8)
# sizes
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
SIZE_BYTES = {W: 4, H: 2, B: 1, DW: 8}
SIZE_NAME = {W: "u32", H: "u16", B: "u8", DW: "u64"}
# modes
BPF_IMM, BPF_MEM, BPF_ATOMIC = 0x00, 0x60, 0xc0
# source
BPF_K, BPF_X = 0x00, 0x08
# alu ops
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV, ARSH, END = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0)
ALU_SYM = {ADD: "+=", SUB: "-=", MUL: "*=", DIV: "/=", OR: "|=", AND: "&=", LSH: "<<=",
           RSH: ">>=", MOD: "%=", XOR: "^=", MOV: "=", ARSH: "s>>="}
BPF_TO_LE, BPF_TO_BE = 0x00, 0x08
# jmp ops
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT, JLT, JLE, JSLT, JSLE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0)
JMP_SYM = {JEQ: "==", JGT: ">", JGE: ">=", JSET: "&", JNE: "!=", JSGT: "s>", JSGE: "s>=",
           JLT: "<", JLE: "<=", JSLT: "s<", JSLE: "s<="}
# the condition that is true exactly when the given one is false (for jumping over a rule)
JMP_NEGATE = {JEQ: JNE, JNE: JEQ, JGT: JLE, JLE: JGT, JGE: JLT, JLT: JGE,
              JSGT: JSLE, JSLE: JSGT, JSGE: JSLT, JSLT: JSGE}

BPF_PSEUDO_MAP_FD = 1
# An unconditional jump longer than this is encoded as gotol: the kernel grows the program when
# it rewrites helper calls (kernel/bpf/verifier.c do_misc_fixups inlines map lookups) and
# bpf_patch_insn_data refuses to stretch a 16-bit offset past 32767 ("insn N cannot be patched
# due to 16-bit range"); gotol's offset is the 32-bit imm. Half the range leaves room for growth.
GOTO_SHORT = 16383
BPF_PSEUDO_CALL = 1          # call src: a bpf-to-bpf call, imm = slots from the next insn
BPF_PSEUDO_KFUNC_CALL = 2



class Reg(int):
    """A register operand. Registers are Reg values so `mov(R1, R6)` copies a register while
    `mov(R1, 6)` loads the immediate 6."""


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = (Reg(i) for i in range(11))
FP = R10

# helper ids used by the compiler (include/uapi/linux/bpf.h, enum bpf_func_id / ___BPF_FUNC_MAPPER)
BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_dynptr_read = 201
HELPER_NAMES = {1: "map_lookup_elem", 2: "map_update_elem", 201: "dynptr_read"}


@dataclass(frozen=True)
class Insn:
    """One instruction (an lddw is one Insn occupying two 8-byte slots)."""
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: Optional[str] = None     # jump label, resolved by assemble()
    map: Optional[str] = None        # map name: lddw src=BPF_PSEUDO_MAP_FD, imm = fd at assemble()
    kfunc: Optional[str] = None      # kfunc name: call src=BPF_PSEUDO_KFUNC_CALL, imm = BTF id
    comment: str = ""

    def __init__(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
                 target: Optional[str] = None, map: Optional[str] = None,
                 kfunc: Optional[str] = None, comment: str = ""):
        # the fields written straight into the instance dict: the frozen dataclass's own
        # __init__ goes through object.__setattr__ per field (~2.3 us an Insn against ~0.6),
        # and a compile makes an Insn per instruction (~500 for a 20-rule chain, issue #7).
        # The value is the same (fields, repr, ==, hash, replace() come from the dataclass)
        d = self.__dict__
        d["code"] = code
        d["dst"] = dst
        d["src"] = src
        d["off"] = off
        d["imm"] = imm
        d["target"] = target
        d["map"] = map
        d["kfunc"] = kfunc
        d["comment"] = comment

    @property
    def cls(self) -> int:
        return self.code & 0x07

    @property
    def is_lddw(self) -> bool:
        return self.code == (BPF_LD | DW | BPF_IMM)

    @property
    def slots(self) -> int:
        return 2 if self.is_lddw else 1

    @property
    def is_jump(self) -> bool:
        return self.cls in (BPF_JMP, BPF_JMP32) and self.code & 0xf0 not in (CALL, EXIT)

    @property
    def is_local_call(self) -> bool:
        """A bpf-to-bpf call of a subprogram in the same program (src=BPF_PSEUDO_CALL)."""
        return self.code == (BPF_JMP | CALL) and self.src == BPF_PSEUDO_CALL

    @property
    def is_exit(self) -> bool:
        return self.cls == BPF_JMP and self.code & 0xf0 == EXIT

    @property
    def is_goto(self) -> bool:
        """Unconditional jump (ja / gotol)."""
        return self.is_jump and self.code & 0xf0 == JA

    def note(self, comment: str) -> "Insn":
        return replace(self, comment=comment)


@dataclass(frozen=True)
class Label:
    name: str
    comment: str = ""

    def __init__(self, name: str, comment: str = ""):
        d = self.__dict__           # as Insn.__init__
        d["name"] = name
        d["comment"] = comment


Item = Union[Insn, Label]


# ---- builders -------------------------------------------------------------------------------

def _src(x):
    """(source flag, src reg, imm) for an operand that is a register (Reg) or an int."""
    if isinstance(x, Reg):
        return BPF_X, int(x), 0
    return BPF_K, 0, int(x)


def alu(op: int, dst: int, x, bits: int = 64, comment: str = "") -> Insn:
    s, src, imm = _src(x)
    return Insn((BPF_ALU64 if bits == 64 else BPF_ALU) | op | s, dst, src, 0, imm, comment=comment)


def mov(dst: int, x, bits: int = 64, comment: str = "") -> Insn:
    return alu(MOV, dst, x, bits, comment)


def neg(dst: int) -> Insn:
    return Insn(BPF_ALU64 | NEG, dst)


def _end(dst: int, width: int) -> Insn:
    return Insn(BPF_ALU | END | BPF_TO_BE, dst, 0, 0, width)


def be16(dst: int) -> Insn:
    """Network-order 16-bit value → host order (a swap on little-endian hosts; upper bits cleared)."""
    return _end(dst, 16)


def be32(dst: int) -> Insn:
    return _end(dst, 32)


def be64(dst: int) -> Insn:
    return _end(dst, 64)


def ldx(size: int, dst: int, src: int, off: int, comment: str = "") -> Insn:
    return Insn(BPF_LDX | size | BPF_MEM, dst, src, off, 0, comment=comment)


def stx(size: int, dst: int, off: int, src: int, comment: str = "") -> Insn:
    return Insn(BPF_STX | size | BPF_MEM, dst, src, off, 0, comment=comment)


def st(size: int, dst: int, off: int, imm: int, comment: str = "") -> Insn:
    return Insn(BPF_ST | size | BPF_MEM, dst, 0, off, imm, comment=comment)


def jmp(op: int, dst: int, x, target: str, bits: int = 64, comment: str = "") -> Insn:
    s, src, imm = _src(x)
    return Insn((BPF_JMP if bits == 64 else BPF_JMP32) | op | s, dst, src, 0, imm,
                target=target, comment=comment)


def ja(target: str, comment: str = "") -> Insn:
    return Insn(BPF_JMP | JA, target=target, comment=comment)


def call(helper: int, comment: str = "") -> Insn:
    return Insn(BPF_JMP | CALL, imm=helper, comment=comment)


def kfunc(name: str, comment: str = "") -> Insn:
    return Insn(BPF_JMP | CALL, src=BPF_PSEUDO_KFUNC_CALL, kfunc=name, comment=comment)


def call_local(label: str, comment: str = "") -> Insn:
    """Call the subprogram starting at `label` (kernel/bpf/verifier.c add_subprog: a call with
    src=BPF_PSEUDO_CALL starts a subprogram at insn + imm + 1; r1-r5 are its arguments, r0 its
    result, r6-r9 and the caller's stack survive the call)."""
    return Insn(BPF_JMP | CALL, src=BPF_PSEUDO_CALL, target=label, comment=comment)


def exit_(comment: str = "") -> Insn:
    return Insn(BPF_JMP | EXIT, comment=comment)


def ld_imm64(dst: int, value: int, comment: str = "") -> Insn:
    return Insn(BPF_LD | DW | BPF_IMM, dst, 0, 0, value, comment=comment)


def ld_map_fd(dst: int, map_name: str, comment: str = "") -> Insn:
    return Insn(BPF_LD | DW | BPF_IMM, dst, BPF_PSEUDO_MAP_FD, 0, 0, map=map_name, comment=comment)


# ---- passes ---------------------------------------------------------------------------------

def _insns_and_labels(items: Iterable[Item]):
    """(list of Insn, {label: insn index}, {insn index: [Label]})."""
    insns, where, labels_at = [], {}, {}
    append = insns.append
    for it in items:
        if it.__class__ is Insn:        # most items: no isinstance call for them
            append(it)
        elif it.__class__ is Label or isinstance(it, Label):
            if it.name in where:
                raise BpfilterError(errno.EINVAL, f"ebpf: label {it.name!r} defined twice")
            where[it.name] = len(insns)
            labels_at.setdefault(len(insns), []).append(it)
        else:
            append(it)
    return insns, where, labels_at


# What prune and assemble need of an opcode, looked up once per instruction instead of through
# Insn's properties (five property calls an instruction: prune and assemble were ~1 ms of a
# 10-rule append's compile and load, issue #7). Same tests as Insn.is_exit/is_jump/is_goto;
# a local call is _K_CALL with src BPF_PSEUDO_CALL (Insn.is_local_call).
_K_OTHER, _K_EXIT, _K_JUMP, _K_GOTO, _K_CALL = range(5)


def _kind_of(code: int) -> int:
    cls, op = code & 0x07, code & 0xf0
    if cls in (BPF_JMP, BPF_JMP32) and op not in (CALL, EXIT):
        return _K_GOTO if op == JA else _K_JUMP
    if cls == BPF_JMP and op == EXIT:
        return _K_EXIT
    if code == (BPF_JMP | CALL):
        return _K_CALL
    return _K_OTHER


_KINDS = bytes(_kind_of(c) for c in range(256))
_LDDW = BPF_LD | DW | BPF_IMM


def _kind(code: int) -> int:
    return _KINDS[code] if 0 <= code < 256 else _kind_of(code)


def prune(items: list) -> list:
    """Remove instructions unreachable from the first one (and labels nobody can jump to first).

    The compiler emits rule after rule without knowing whether an earlier unconditional rule
    makes the rest dead; the verifier refuses dead code (check_cfg: "unreachable insn N").
    The walk follows fall-throughs in a loop and stacks only branch targets and callees: the
    order it meets instructions in (and so which undefined label an error names) is that of a
    stack of every successor."""
    insns, where, labels_at = _insns_and_labels(items)
    n = len(insns)
    reach = bytearray(n)
    todo = [0] if insns else []
    kinds = _KINDS
    while todo:
        i = todo.pop()
        while i < n and not reach[i]:
            reach[i] = 1
            ins = insns[i]
            code = ins.code
            k = kinds[code] if 0 <= code < 256 else _kind_of(code)
            if k == _K_EXIT:
                break
            if k == _K_CALL and ins.src == BPF_PSEUDO_CALL:
                # the callee is reachable, and so is the return point
                j = where.get(ins.target)
                if j is None:
                    raise BpfilterError(errno.EINVAL,
                                        f"ebpf: call of undefined label {ins.target!r}")
                todo.append(j)
            elif k == _K_JUMP or k == _K_GOTO:
                j = where.get(ins.target)
                if j is None:
                    raise BpfilterError(errno.EINVAL,
                                        f"ebpf: jump to undefined label {ins.target!r}")
                todo.append(j)
                if k == _K_GOTO:
                    break
            i += 1
    if isinstance(items, list) and 0 not in reach and n not in labels_at:
        return list(items)          # all reached, no label past the end: the items as they are
    out = []
    for i, ins in enumerate(insns):
        if reach[i]:
            if i in labels_at:
                out += labels_at[i]
            out.append(ins)
    return out


_WORD = struct.Struct("<BBhI")


def assemble(items: Iterable[Item], maps: Optional[dict] = None,
             kfuncs: Optional[dict] = None) -> bytes:
    """Encode to bytecode: jump offsets in slots relative to the next slot, map names → fds
    (lddw src=BPF_PSEUDO_MAP_FD), kfunc names → vmlinux BTF ids (call src=BPF_PSEUDO_KFUNC_CALL,
    off=0 meaning vmlinux BTF). An unconditional jump longer than GOTO_SHORT becomes `gotol`
    (BPF_JMP32|BPF_JA with a 32-bit imm, kernel ≥ 6.4)."""
    maps = maps or {}
    kfuncs = kfuncs or {}
    insns, where, _ = _insns_and_labels(items)
    slot_of, n = [], 0
    for ins in insns:
        slot_of.append(n)
        n += 2 if ins.code == _LDDW else 1
    slot_of.append(n)
    out = bytearray(8 * n)
    pack = _WORD.pack_into
    for i, ins in enumerate(insns):
        code, off, imm, src = ins.code, ins.off, ins.imm, ins.src
        target = ins.target
        if target is not None:
            if target not in where:
                raise BpfilterError(errno.EINVAL, f"ebpf: jump to undefined label {target!r}")
            delta = slot_of[where[target]] - slot_of[i] - 1
            k = _kind(code)
            if k == _K_CALL and src == BPF_PSEUDO_CALL:
                imm = delta
            elif -32768 <= delta <= 32767 and not (k == _K_GOTO and abs(delta) > GOTO_SHORT):
                off = delta
            elif k == _K_GOTO:
                code, off, imm = BPF_JMP32 | JA, 0, delta
            else:
                raise BpfilterError(errno.E2BIG, f"ebpf: conditional jump to {target!r} "
                                                 f"spans {delta} instructions (limit 32767)")
        if ins.map is not None:
            if ins.map not in maps:
                raise BpfilterError(errno.EINVAL, f"ebpf: no fd for map {ins.map!r}")
            imm = maps[ins.map]
        if ins.kfunc is not None:
            if ins.kfunc not in kfuncs:
                raise BpfilterError(errno.EOPNOTSUPP, f"ebpf: no BTF id for kfunc {ins.kfunc!r}")
            imm = kfuncs[ins.kfunc]
        at = slot_of[i] * 8
        # the imm as u32: the same bytes as the s32 the kernel reads (_s32)
        pack(out, at, code, (ins.dst & 0xf) | ((src & 0xf) << 4), off, imm & 0xffffffff)
        if ins.code == _LDDW:
            pack(out, at + 8, 0, 0, 0, (imm >> 32) & 0xffffffff)
    return bytes(out)


def _s32(v: int) -> int:
    v &= 0xffffffff
    return v - (1 << 32) if v & 0x80000000 else v


def decode(code: bytes) -> list:
    """Bytecode → Insn values; jump targets become labels "L<slot>" placed by decode_items()."""
    return [it for it in decode_items(code) if isinstance(it, Insn)]


def decode_items(code: bytes) -> list:
    """Bytecode → items with Label("L<slot>") at every jump target, for listing()."""
    raw = [struct.unpack_from("<BBhi", code, o) for o in range(0, len(code) - len(code) % 8, 8)]
    insns, s = [], 0
    while s < len(raw):
        c, regs, off, imm = raw[s]
        dst, src = regs & 0xf, regs >> 4
        if c == (BPF_LD | DW | BPF_IMM) and s + 1 < len(raw):
            imm = (imm & 0xffffffff) | ((raw[s + 1][3] & 0xffffffff) << 32)
            insns.append((s, Insn(c, dst, src, off, imm)))
            s += 2
        else:
            insns.append((s, Insn(c, dst, src, off, imm)))
            s += 1
    targets, out = {}, []
    for s, ins in insns:
        if ins.is_jump or ins.is_local_call:
            delta = ins.imm if (ins.cls == BPF_JMP32 and ins.code & 0xf0 == JA) \
                or ins.is_local_call else ins.off
            targets[s] = s + 1 + delta
    wanted = set(targets.values())
    for s, ins in insns:
        if s in wanted:
            out.append(Label(f"L{s}"))
        if s in targets:
            ins = replace(ins, target=f"L{targets[s]}")
        out.append(ins)
    return out


# ---- listing --------------------------------------------------------------------------------

def _r(n: int) -> str:
    return f"r{n}"


def format_insn(ins: Insn) -> str:
    """One instruction in the kernel verifier log's syntax (kernel/bpf/disasm.c style)."""
    c, cls, op = ins.code, ins.cls, ins.code & 0xf0
    if cls in (BPF_ALU, BPF_ALU64):
        w = "w" if cls == BPF_ALU else "r"
        if op == END:
            return f"r{ins.dst} = {'be' if c & BPF_TO_BE else 'le'}{ins.imm} r{ins.dst}"
        if op == NEG:
            return f"{w}{ins.dst} = -{w}{ins.dst}"
        s = f"{w}{ins.src}" if c & BPF_X else str(ins.imm)
        return f"{w}{ins.dst} {ALU_SYM.get(op, hex(op))} {s}"
    if cls == BPF_LDX:
        return f"r{ins.dst} = *({SIZE_NAME[c & 0x18]} *)(r{ins.src} {ins.off:+d})"
    if cls == BPF_STX:
        return f"*({SIZE_NAME[c & 0x18]} *)(r{ins.dst} {ins.off:+d}) = r{ins.src}"
    if cls == BPF_ST:
        return f"*({SIZE_NAME[c & 0x18]} *)(r{ins.dst} {ins.off:+d}) = {ins.imm}"
    if ins.is_lddw:
        if ins.src == BPF_PSEUDO_MAP_FD:
            return f"r{ins.dst} = map[{ins.map if ins.map else 'fd:%d' % ins.imm}]"
        return f"r{ins.dst} = {ins.imm:#x} ll"
    if cls in (BPF_JMP, BPF_JMP32):
        tgt = ins.target if ins.target is not None else f"{ins.off:+d}"
        if op == EXIT:
            return "exit"
        if op == CALL:
            if ins.src == BPF_PSEUDO_KFUNC_CALL:
                return f"call kfunc {ins.kfunc or 'btf_id:%d' % ins.imm}"
            if ins.src == BPF_PSEUDO_CALL:
                return f"call {ins.target if ins.target is not None else 'pc%+d' % ins.imm}"
            return f"call {HELPER_NAMES.get(ins.imm, ins.imm)}#{ins.imm}"
        if op == JA:
            return f"{'gotol' if cls == BPF_JMP32 else 'goto'} {tgt}"
        w = "w" if cls == BPF_JMP32 else "r"
        s = f"{w}{ins.src}" if c & BPF_X else str(ins.imm)
        return f"if {w}{ins.dst} {JMP_SYM.get(op, hex(op))} {s} goto {tgt}"
    return f"<code {c:#04x} dst={ins.dst} src={ins.src} off={ins.off} imm={ins.imm}>"


def listing(items: Iterable[Item]) -> str:
    """Annotated listing: slot number, instruction, `; comment`; labels on their own lines."""
    lines, slot = [], 0
    for it in items:
        if isinstance(it, Label):
            lines.append(f"{it.name}:" + (f"  ; {it.comment}" if it.comment else ""))
            continue
        text = f"{slot:6d}: {format_insn(it)}"
        if it.comment:
            text = f"{text:<48} ; {it.comment}"
        lines.append(text)
        slot += it.slots
    return "\n".join(lines) + "\n"


# ---- BTF for global functions ---------------------------------------------------------------
# A subprogram whose BTF func_info says BTF_FUNC_GLOBAL is verified once, on its own, from the
# argument types its BTF prototype declares (kernel/bpf/verifier.c do_check_subprogs,
# btf_prepare_func_args); a call site only checks the arguments against that prototype
# (btf_check_subprog_call). A static subprogram is walked again at every call site. Once any
# func_info is given, every subprogram needs a record (check_btf_func: "number of funcs in
# func_info doesn't match number of subprogs"), the first at instruction 0.
# Every global function here has the prototype `int f(struct bpfilter_frame *frame, int arg)`:
# `frame` points at the caller's packet-field slots (a sized struct: the callee sees it as
# PTR_TO_MEM_OR_NULL of that size), `arg` is a plain scalar.
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_STRUCT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 1, 2, 4, 12, 13
BTF_FUNC_STATIC, BTF_FUNC_GLOBAL = 0, 1
BTF_INT_SIGNED = 1
MAX_SUBPROGS = 256            # kernel/bpf/verifier.c BPF_MAX_SUBPROGS (the main program included)


def subprogram_starts(items: Iterable[Item]) -> list:
    """[(slot, label)] of every subprogram (the targets of bpf-to-bpf calls), in slot order;
    the main program (slot 0) is not listed."""
    insns, where, _ = _insns_and_labels(items)
    slot_of, n = [], 0
    for ins in insns:
        slot_of.append(n)
        n += ins.slots
    found = {}
    for ins in insns:
        if ins.is_local_call:
            found[slot_of[where[ins.target]]] = ins.target
    return sorted(found.items())


def func_btf(frame_size: int, funcs: list) -> tuple:
    """(BTF blob, func_info bytes) for funcs = [(slot, name, is_global)] in slot order, the
    first at slot 0 (include/uapi/linux/btf.h: header, type section, string section;
    struct bpf_func_info {u32 insn_off; u32 type_id;})."""
    strs = bytearray(b"\0")

    def name(s: str) -> int:
        off = len(strs)
        strs.extend(s.encode() + b"\0")
        return off
    types = bytearray()
    int_t = 1
    types.extend(struct.pack("<IIII", name("int"), BTF_KIND_INT << 24, 4,
                             BTF_INT_SIGNED << 24 | 32))
    frame_t = 2
    types.extend(struct.pack("<III", name("bpfilter_frame"), BTF_KIND_STRUCT << 24, frame_size))
    ptr_t = 3
    types.extend(struct.pack("<III", 0, BTF_KIND_PTR << 24, frame_t))
    proto_t = 4
    types.extend(struct.pack("<III", 0, BTF_KIND_FUNC_PROTO << 24 | 2, int_t)
                 + struct.pack("<II", name("frame"), ptr_t)
                 + struct.pack("<II", name("arg"), int_t))
    info = bytearray()
    for k, (slot, fname, is_global) in enumerate(funcs):
        ident = "".join(c if c.isalnum() or c == "_" else "_" for c in fname) or "f"
        types.extend(struct.pack("<III", name(ident), BTF_KIND_FUNC << 24 |
                                 (BTF_FUNC_GLOBAL if is_global else BTF_FUNC_STATIC), proto_t))
        info += struct.pack("<II", slot, 5 + k)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    return hdr + bytes(types) + bytes(strs), bytes(info)
