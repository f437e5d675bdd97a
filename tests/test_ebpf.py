"""The instruction model, assembler and disassembler (pure: no kernel needed)."""
import struct

import pytest

from bpfilter_umh import ebpf as E
from bpfilter_umh.ebpf import FP, R0, R1, R2, R6, Label
from bpfilter_umh.errors import BpfilterError


def words(code: bytes):
    return [struct.unpack_from("<BBhi", code, o) for o in range(0, len(code), 8)]


def test_registers_vs_immediates():
    assert E.mov(R1, R6).code == 0xbf and E.mov(R1, R6).src == 6      # mov r1, r6
    assert E.mov(R1, 6).code == 0xb7 and E.mov(R1, 6).imm == 6        # mov r1, 6


def test_jump_offsets_count_lddw_as_two_slots():
    items = [E.jmp(E.JEQ, R1, 0, "out"), E.ld_imm64(R2, 1 << 40), E.mov(R0, 1), Label("out"),
             E.exit_()]
    w = words(E.assemble(items))
    assert len(w) == 5                       # jeq, lddw (2 slots), mov, exit
    assert w[0][2] == 3                      # skips lddw (2) + mov (1)
    assert (w[1][3], w[2][3]) == (0, 1 << 8)  # low/high halves of the 64-bit immediate


def test_backward_jump():
    items = [Label("top"), E.mov(R0, 0), E.ja("top")]
    assert words(E.assemble(items))[1][2] == -2


def test_map_and_kfunc_fixups():
    items = [E.ld_map_fd(R1, "counters"), E.kfunc("bpf_dynptr_slice"), E.exit_()]
    w = words(E.assemble(items, maps={"counters": 7}, kfuncs={"bpf_dynptr_slice": 4242}))
    assert w[0][0] == 0x18 and w[0][1] >> 4 == E.BPF_PSEUDO_MAP_FD and w[0][3] == 7
    assert w[2][0] == 0x85 and w[2][1] >> 4 == E.BPF_PSEUDO_KFUNC_CALL and w[2][3] == 4242


def test_unresolved_references_are_errors():
    with pytest.raises(BpfilterError, match="undefined label"):
        E.assemble([E.ja("nowhere")])
    with pytest.raises(BpfilterError, match="no fd for map"):
        E.assemble([E.ld_map_fd(R1, "m"), E.exit_()])
    with pytest.raises(BpfilterError, match="no BTF id"):
        E.assemble([E.kfunc("f"), E.exit_()])
    with pytest.raises(BpfilterError, match="defined twice"):
        E.assemble([Label("a"), Label("a"), E.exit_()])


def test_far_goto_becomes_gotol_and_far_conditional_is_refused():
    far = [E.ja("end")] + [E.mov(R0, 0)] * 40000 + [Label("end"), E.exit_()]
    w = words(E.assemble(far))
    assert w[0][0] == (E.BPF_JMP32 | E.JA) and w[0][3] == 40000
    cond = [E.jmp(E.JEQ, R1, 0, "end")] + far[1:]
    with pytest.raises(BpfilterError, match="spans 40000"):
        E.assemble(cond)


def test_prune_removes_unreachable_code_only():
    items = [E.jmp(E.JEQ, R1, 0, "b"), E.mov(R0, 1), E.exit_(), E.mov(R0, 9), Label("b"),
             E.mov(R0, 0), E.exit_(), Label("dead"), E.mov(R0, 3), E.exit_()]
    out = E.prune(items)
    assert E.mov(R0, 9) not in out and E.mov(R0, 3) not in out
    assert Label("b") in out and Label("dead") not in out
    assert len([i for i in out if isinstance(i, E.Insn)]) == 5


def test_decode_round_trip_and_listing():
    items = [E.mov(R6, R1, comment="ctx"), E.ldx(E.W, R1, R6, 4), E.stx(E.DW, FP, -8, R1),
             E.st(E.W, FP, -12, 5), E.alu(E.AND, R1, 0xff, bits=32), E.be16(R1),
             E.jmp(E.JGT, R1, 10, "x", bits=32), E.ld_map_fd(R1, "m"),
             E.call(E.BPF_FUNC_map_lookup_elem), Label("x"), E.mov(R0, 1), E.exit_()]
    code = E.assemble(items, maps={"m": 3})
    again = E.assemble(E.decode_items(code))
    assert again == code
    text = E.listing(items)
    assert "r6 = r1" in text and "; ctx" in text
    assert "r1 = *(u32 *)(r6 +4)" in text and "*(u64 *)(r10 -8) = r1" in text
    assert "if w1 > 10 goto x" in text and "r1 = map[m]" in text
    assert "call map_lookup_elem#1" in text and "r1 = be16 r1" in text
    assert "\nx:\n" in text


def test_insns_are_immutable_values():
    a = E.mov(R0, 1)
    with pytest.raises(Exception):
        a.imm = 2
    assert a == E.mov(R0, 1) and a.note("hello") != a and a.note("hello").imm == 1
