"""Global functions loaded as their own programs (BPF_PROG_TYPE_EXT, "freplace") so that an
install verifies only the main program and the functions that changed (issue #7: "the verifier
must not see a giant program").

Not used by the engine: this kernel's security policy refuses extension programs (EPERM), so it
stays a prototype beside tools/freplace_probe.py (issue #7 notes: measured costs, integration plan).

A compiled fan-out program (classify.py "jump cases as BPF global functions") is split in two:

  stub_program(cp)     the main program with every global function replaced by a two-instruction
                       stub (`r0 = FN_CONTINUE; exit`). The verifier checks a global function on
                       its own and a call site only by its BTF prototype (kernel/bpf/verifier.c
                       do_check_subprogs, btf_check_subprog_call), so the main program verifies
                       the same whatever the stub does; its load costs the main part only.
  extension_code(cp, i, map_fds)
                       global function i as a program of its own: its instructions, then a copy
                       of the counting subprogram (COUNT_SUB) it calls, with BTF whose first
                       function has the same prototype (btf_check_type_match compares kinds,
                       int sizes and the names of pointed-to structs: `struct bpfilter_frame *`).

The kernel side (kernel/bpf/syscall.c, trampoline.c):

  load_extension(code, btf, func_info, target, btf_id)
                       BPF_PROG_LOAD type EXT with attach_prog_fd = a loaded main program and
                       attach_btf_id = the BTF id of the global function it replaces; verified as
                       that function (btf_prepare_func_args: arg 1 PTR_TO_MEM of the frame size).
  link_extension(ext, target=None, btf_id=0)
                       BPF_LINK_CREATE: the replaced function's JITed entry becomes a jump into
                       the extension (bpf_trampoline_link_prog, BPF_TRAMP_REPLACE ->
                       bpf_arch_text_poke). With target + btf_id, an extension already loaded
                       (and linked elsewhere) is linked to another main program whose function
                       has the same prototype (bpf_tracing_prog_attach: tgt_prog_fd given), so a
                       function that did not change is linked, not loaded, by the next install.

One extension may be linked to two main programs at once (the installed one and the next one):
an install links everything to the new main program before the swap and drops the old links
after it, so the swap stays one atomic slot update, and a failed load or link closes only what
the install made (the installed program and its links are untouched).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import struct
import types

from bpfilter_umh import classify
from bpfilter_umh import ebpf as E
from bpfilter_umh import kernel as K
from bpfilter_umh.compile import COUNT_SUB
from bpfilter_umh.ebpf import Insn, Label
from bpfilter_umh.errors import BpfilterError

BPF_PROG_TYPE_EXT = 28


# ---- splitting a compiled program --------------------------------------------------------------

def _parts(cp):
    """(main items, [(head label, items)] of the global functions) of a program whose functions
    were placed by classify._global_calls (the last items, in fn_parts order)."""
    n_fn = sum(len(tpl.items) for tpl, _ in cp.fn_parts)
    if not cp.fn_parts or n_fn == 0:
        raise BpfilterError(errno.EINVAL, f"program {cp.name}: no global functions to extend")
    main = cp.items[:len(cp.items) - n_fn]
    funcs, at = [], len(main)
    for tpl, _ in cp.fn_parts:
        funcs.append((tpl.head, cp.items[at:at + len(tpl.items)]))
        at += len(tpl.items)
    return main, funcs


def stub_items(head: str) -> list:
    return [Label(head, "global function stub (replaced by an extension)"),
            E.mov(E.R0, classify.FN_CONTINUE), E.exit_()]


def stub_program(cp):
    """A copy of cp whose global functions are stubs (see the module docstring)."""
    main, funcs = _parts(cp)
    parts = []
    items = list(main)
    for (head, _), (tpl, _values) in zip(funcs, cp.fn_parts):
        stub = classify._FnTemplate(head, stub_items(head), [], {})
        parts.append((stub, []))
        items += stub.items
    return dataclasses.replace(cp, items=items, fn_parts=tuple(parts))


def function_btf_ids(cp) -> dict:
    """head label -> BTF type id of that global function in cp.func_btf() (an extension's
    attach_btf_id). ebpf.func_btf gives function k (func_info order) type id 5 + k."""
    _btf, info = cp.func_btf()
    lay = cp._layout()
    if lay is None:
        raise BpfilterError(errno.EINVAL, f"program {cp.name}: functions without bytecode")
    fn_at = lay[2]
    type_of = {slot: tid for slot, tid in struct.iter_unpack("<II", info)}
    return {head: type_of[slot] for head, slot in fn_at.items()}


def _count_items(main: list) -> list:
    """The counting subprogram's items (Label COUNT_SUB .. its one exit), copied from the main
    program so an extension counts exactly as the main program does."""
    for i, it in enumerate(main):
        if isinstance(it, Label) and it.name == COUNT_SUB:
            out = []
            for x in main[i:]:
                out.append(x)
                if isinstance(x, Insn) and x.is_exit:
                    return out
    return []


def extension_code(cp, i: int, map_fds: dict) -> tuple:
    """(bytecode, BTF blob, func_info) of global function i of cp as an extension program."""
    main, funcs = _parts(cp)
    head, items = funcs[i]
    called = any(isinstance(x, Insn) and x.is_local_call and x.target == COUNT_SUB
                 for x in items)
    tail = _count_items(main) if called else []
    kf = cp.facts.kfunc_ids if cp.facts else {}
    code = E.assemble(list(items) + tail, map_fds, kf)
    fi = [(0, head, True)]
    if tail:
        fi.append((E.subprogram_starts(list(items) + tail)[-1][0], COUNT_SUB, False))
    btf, info = E.func_btf(classify.FRAME_LO - 16, fi)
    return code, btf, info


def function_count(cp) -> int:
    return len(cp.fn_parts)


# ---- the same function as a netfilter program of its own (a tail-call target, or a measure of
# what loading one function costs) -----------------------------------------------------------------
SCRATCH_MAP = "bpfilter_scratch"    # per-CPU: the frame slots [0, FRAME_LO - 16), then k (u32)
SCRATCH_SIZE = classify.FRAME_LO - 16 + 8


def standalone_items(cp, i: int) -> tuple:
    """(items, func list for ebpf.func_btf) of a netfilter program running global function i on
    the frame slots a per-CPU SCRATCH_MAP value holds (passed as the function's pointer argument:
    a map value of SCRATCH_SIZE bytes is memory of the frame's size, btf_check_subprog_call).
    The function is verified exactly as inside the whole program; the verdict is its answer & 1."""
    main, funcs = _parts(cp)
    head, items = funcs[i]
    out = [E.st(E.W, E.FP, -4, 0), E.ld_map_fd(E.R1, SCRATCH_MAP), E.mov(E.R2, E.FP),
           E.alu(E.ADD, E.R2, -4), E.call(E.BPF_FUNC_map_lookup_elem),
           E.jmp(E.JNE, E.R0, 0, "scratch_ok"), E.exit_(),
           Label("scratch_ok"), E.mov(E.R1, E.R0),
           E.ldx(E.W, E.R2, E.R0, classify.FRAME_LO - 16, "k"),
           E.call_local(head), E.alu(E.AND, E.R0, 1), E.exit_()]
    out += list(items)
    if any(isinstance(x, Insn) and x.is_local_call and x.target == COUNT_SUB for x in items):
        out += _count_items(main)
    starts = E.subprogram_starts(out)
    fl = [(0, "bpfilter_fn", False)] + [(slot, lbl, lbl == head) for slot, lbl in starts]
    return out, fl


# ---- kernel ------------------------------------------------------------------------------------

def load_extension(code: bytes, btf: bytes, func_info: bytes, target, btf_id: int,
                   name: str = "bpfilter_ext") -> "K.Prog":
    """BPF_PROG_LOAD of an extension replacing global function btf_id of program `target`
    (attach_prog_fd), through the engine's loader; EPERM says what refuses it."""
    from bpfilter_umh.engine import load_with_func_info
    ext = types.SimpleNamespace(prog_type=BPF_PROG_TYPE_EXT, name=name, license="GPL",
                                expected_attach_type=0)
    try:
        return load_with_func_info(ext, code, btf, func_info,
                                   attach_prog_fd=getattr(target, "fd", target),
                                   attach_btf_id=btf_id)
    except BpfilterError as e:
        if e.errno != errno.EPERM:
            raise
        # with CAP_BPF and CAP_PERFMON (checked first by kernel/bpf/syscall.c bpf_prog_load)
        # an EPERM is the security policy's (security_bpf_prog_load) or a capability missing
        raise BpfilterError(e.errno, f"BPF_PROG_LOAD {name}: extension programs refused before "
                                     f"verification (EPERM: capabilities or the security "
                                     f"policy)") from None


def link_extension(ext, target=None, btf_id: int = 0) -> "K.Link":
    """BPF_LINK_CREATE of an extension: to the program it was loaded for (target None), or to
    another program's global function (target + its btf_id). union bpf_attr link_create:
    prog_fd, target_fd, attach_type (ignored for EXT), flags, target_btf_id."""
    attr = K._ffi.new("char[]", 32)
    struct.pack_into("<IIIII", K._ffi.buffer(attr), 0, getattr(ext, "fd", ext),
                     getattr(target, "fd", target) if target is not None else 0, 0, 0,
                     btf_id if target is not None else 0)
    fd = K._bpf(K.BPF_LINK_CREATE, attr, 32)
    if fd < 0:
        raise BpfilterError(-fd, f"BPF_LINK_CREATE extension (target btf id {btf_id}): "
                                 f"{os.strerror(-fd)}")
    return K.Link(fd)


def extensions_supported() -> tuple:
    """(True, "") when this kernel and its security policy load and link an extension of a
    netfilter program's global function, else (False, why). Measured on 6.18 in this project's
    test machine: EPERM before the verifier runs (no log) although the capability checks of
    kernel/bpf/syscall.c bpf_prog_load pass (CAP_BPF, CAP_PERFMON: a kprobe program loads), i.e.
    security_bpf_prog_load refused it; fentry on a BPF program is refused the same way."""
    from bpfilter_umh.engine import load_with_func_info
    frame = classify.FRAME_LO - 16
    body = [Label("fn"), E.jmp(E.JEQ, E.R1, 0, "fn_out"), E.ldx(E.DW, E.R0, E.R1, 0),
            Label("fn_out"), E.mov(E.R0, 0), E.exit_()]
    main = [E.st(E.DW, E.FP, off, 0) for off in range(-classify.FRAME_LO, -16, 8)]
    main += [E.mov(E.R1, E.FP), E.alu(E.ADD, E.R1, -classify.FRAME_LO), E.mov(E.R2, 0),
             E.call_local("fn"), E.mov(E.R0, 1), E.exit_()]
    slot = E.subprogram_starts(main + body)[0][0]
    btf, info = E.func_btf(frame, [(0, "probe_main", False), (slot, "fn", True)])

    class _Cp:
        prog_type, license, name = K.BPF_PROG_TYPE_NETFILTER, "GPL", "bpfilter_probe"
        expected_attach_type = K.BPF_NETFILTER
    prog = ext = link = None
    try:
        prog = load_with_func_info(_Cp, E.assemble(main + body), btf, info)
        ebtf, einfo = E.func_btf(frame, [(0, "fn", True)])
        ext = load_extension(E.assemble(body), ebtf, einfo, prog, 6, "bpfilter_probe")
        link = link_extension(ext)
        return True, ""
    except BpfilterError as e:
        return False, e.message
    finally:
        for o in (link, ext, prog):
            if o is not None:
                o.close()
