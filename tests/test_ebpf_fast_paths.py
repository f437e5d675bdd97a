"""ebpf.prune and ebpf.assemble read opcodes through a table (issue #7: they were ~1 ms of a
10-rule append's compile and load). They must keep, and encode, exactly what the plain
versions (below, as they were: Insn's properties, one successor stacked at a time) do: the
same items, the same bytes, the same error for the same bad program. Checked on every prune
and every program of real compiles (tables iptables-legacy-restore made) and on programs
built to reach each case: long gotos (gotol), jumps too long, lddw with negative values, JMP32
jumps, local calls, kfuncs, dead code, labels past the end, undefined labels."""
import errno
import os
import random
import struct
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import ebpf as E  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table  # noqa: E402
from bpfilter_umh.ebpf import FP, R0, R1, R2, R3, Insn, Label  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402


# ---- the plain versions: what the fast ones must equal -------------------------------------------

def _prune_ref(items):
    insns, where, labels_at = E._insns_and_labels(items)
    reach = [False] * len(insns)
    todo = [0] if insns else []
    while todo:
        i = todo.pop()
        if i >= len(insns) or reach[i]:
            continue
        reach[i] = True
        ins = insns[i]
        if ins.is_exit:
            continue
        if ins.is_local_call:
            if ins.target not in where:
                raise BpfilterError(errno.EINVAL, f"ebpf: call of undefined label {ins.target!r}")
            todo.append(where[ins.target])
        if ins.is_jump:
            if ins.target not in where:
                raise BpfilterError(errno.EINVAL, f"ebpf: jump to undefined label {ins.target!r}")
            todo.append(where[ins.target])
            if ins.is_goto:
                continue
        todo.append(i + 1)
    out = []
    for i, ins in enumerate(insns):
        if reach[i]:
            out.extend(labels_at.get(i, []))
            out.append(ins)
    return out


def _assemble_ref(items, maps=None, kfuncs=None):
    maps = maps or {}
    kfuncs = kfuncs or {}
    insns, where, _ = E._insns_and_labels(items)
    slot_of, n = [], 0
    for ins in insns:
        slot_of.append(n)
        n += ins.slots
    slot_of.append(n)
    out = bytearray()
    for i, ins in enumerate(insns):
        code, off, imm, src = ins.code, ins.off, ins.imm, ins.src
        if ins.target is not None:
            if ins.target not in where:
                raise BpfilterError(errno.EINVAL, f"ebpf: jump to undefined label {ins.target!r}")
            delta = slot_of[where[ins.target]] - slot_of[i] - 1
            if ins.is_local_call:
                imm = delta
            elif -32768 <= delta <= 32767 and not (ins.is_goto and abs(delta) > E.GOTO_SHORT):
                off = delta
            elif ins.is_goto:
                code, off, imm = E.BPF_JMP32 | E.JA, 0, delta
            else:
                raise BpfilterError(errno.E2BIG, f"ebpf: conditional jump to {ins.target!r} "
                                                 f"spans {delta} instructions (limit 32767)")
        if ins.map is not None:
            if ins.map not in maps:
                raise BpfilterError(errno.EINVAL, f"ebpf: no fd for map {ins.map!r}")
            imm = maps[ins.map]
        if ins.kfunc is not None:
            if ins.kfunc not in kfuncs:
                raise BpfilterError(errno.EOPNOTSUPP, f"ebpf: no BTF id for kfunc {ins.kfunc!r}")
            imm = kfuncs[ins.kfunc]
        regs = (ins.dst & 0xf) | ((src & 0xf) << 4)
        if ins.is_lddw:
            out += struct.pack("<BBhi", code, regs, off, E._s32(imm & 0xffffffff))
            out += struct.pack("<BBhi", 0, 0, 0, E._s32((imm >> 32) & 0xffffffff))
        else:
            out += struct.pack("<BBhi", code, regs, off, E._s32(imm))
    return bytes(out)


def _outcome(fn, *a):
    """What fn returned, or the error it raised (errno and message)."""
    try:
        return ("ok", fn(*a))
    except BpfilterError as e:
        return ("error", e.errno, e.message)


def same_prune(items):
    want = _outcome(_prune_ref, list(items))
    got = _outcome(E.prune, list(items))
    assert got == want
    if got[0] == "ok":      # the very objects, in order (labels kept are the same Labels)
        assert [id(x) for x in got[1]] == [id(x) for x in want[1]]
    return got


def same_code(items, maps=None, kfuncs=None):
    want = _outcome(_assemble_ref, list(items), maps, kfuncs)
    got = _outcome(E.assemble, list(items), maps, kfuncs)
    assert got == want
    return got


# ---- programs built to reach each case ----------------------------------------------------------

def test_jump_kinds_and_encodings():
    far = [E.ja("end")] + [E.mov(R0, 1)] * (E.GOTO_SHORT + 5) + [Label("end"), E.exit_()]
    j32 = E.jmp(E.JEQ, R1, 0, "b")
    j32 = Insn(E.BPF_JMP32 | (j32.code & 0xf0) | (j32.code & 0x08), j32.dst, j32.src, 0, 0,
               target="b")
    progs = {
        "gotol": far,
        "gotol back": [Label("top"), E.mov(R0, 0)] + [E.mov(R0, 1)] * (E.GOTO_SHORT + 5) +
                      [E.jmp(E.JEQ, R1, 0, "x"), E.ja("top"), Label("x"), E.exit_()],
        "jump32": [E.mov(R1, 0), j32, E.mov(R0, 1), E.exit_(), Label("b"), E.mov(R0, 2),
                   E.exit_()],
        "lddw": [E.ld_imm64(R1, -5), E.ld_imm64(R2, 1 << 40), E.ld_imm64(R3, -(1 << 40) - 3),
                 E.ld_map_fd(R1, COUNTERS_MAP), E.mov(R0, -1), E.st(E.W, FP, -8, -7),
                 E.jmp(E.JEQ, R0, 0, "e"), E.mov(R0, 0xffffffff), Label("e"), E.exit_()],
        "local call": [E.call_local("f"), E.exit_(), Label("dead"), E.mov(R0, 3),
                       Label("f"), E.mov(R0, 0), E.exit_()],
        "kfunc": [E.kfunc("bpf_dynptr_slice"), E.call(E.BPF_FUNC_map_lookup_elem),
                  E.exit_()],
        "dead code and labels past the end": [E.mov(R0, 0), E.exit_(), Label("d"),
                                              E.mov(R0, 1), E.ja("d"), Label("end1"),
                                              Label("end2")],
        "empty": [],
    }
    for name, items in progs.items():
        p = same_prune(items)
        assert p[0] == "ok", name
        c = same_code(p[1], {COUNTERS_MAP: 7}, {"bpf_dynptr_slice": 4242})
        assert c[0] == "ok", name
    # a jump to a label past the last instruction: prune drops the label (nothing is there to
    # reach), so the pruned program no longer assembles, in both versions alike
    end = [E.jmp(E.JEQ, R1, 0, "out"), E.exit_(), Label("out")]
    assert same_prune(end)[1] == end[:2]
    assert same_code(end[:2])[0] == "error"
    code = same_code(far)[1]
    assert code[0] == E.BPF_JMP32 | E.JA                # the long goto became gotol
    # the dead part of "local call" and "dead code" went
    assert len(same_prune(progs["local call"])[1]) == 5
    assert [type(x) for x in same_prune(progs["dead code and labels past the end"])[1]] == \
        [Insn, Insn]


def test_errors_are_the_same():
    bad = {
        "jump nowhere": [E.jmp(E.JEQ, R1, 0, "nowhere"), E.exit_()],
        "goto nowhere": [E.ja("nowhere")],
        "call nowhere": [E.call_local("nowhere"), E.exit_()],
        "two bad, the stack's order names one": [E.jmp(E.JEQ, R1, 0, "a"),
                                                 E.jmp(E.JEQ, R1, 1, "b"), E.exit_()],
        "twice defined": [Label("a"), Label("a"), E.exit_()],
        "no map fd": [E.ld_map_fd(R1, "m"), E.exit_()],
        "no kfunc": [E.kfunc("f"), E.exit_()],
        "conditional too long": [E.jmp(E.JEQ, R1, 0, "end")] + [E.mov(R0, 1)] * 40000 +
                                [Label("end"), E.exit_()],
    }
    for name, items in bad.items():
        p, c = same_prune(items), same_code(items)
        assert p[0] == "error" or c[0] == "error", name
    assert same_code(bad["conditional too long"])[1] == errno.E2BIG


@pytest.mark.parametrize("seed", range(40))
def test_random_programs(seed):
    """Random instruction mixes with random labels and targets (some undefined, some only past
    the end): prune and assemble agree with the plain versions, results and errors."""
    rnd = random.Random(seed)
    n = rnd.randrange(1, 120)
    names = [f"l{k}" for k in range(rnd.randrange(1, 12))]
    items = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.12:
            items.append(Label(rnd.choice(names) + f"_{len(items)}"))
            continue
        tgt = rnd.choice([it.name for it in items if isinstance(it, Label)] + ["undef", "late"])
        if r < 0.3:
            op = rnd.choice([E.JEQ, E.JNE, E.JGT, E.JSET, E.JSLE])
            ins = E.jmp(op, R1, rnd.randrange(-3, 3), tgt)
            if rnd.random() < 0.3:
                ins = Insn(E.BPF_JMP32 | (ins.code & 0xf8), ins.dst, ins.src, 0, ins.imm,
                           target=tgt)
            items.append(ins)
        elif r < 0.38:
            items.append(E.ja(tgt))
        elif r < 0.44:
            items.append(E.call_local(tgt))
        elif r < 0.52:
            items.append(E.exit_())
        elif r < 0.58:
            items.append(E.ld_imm64(R2, rnd.randrange(-(1 << 63), 1 << 63)))
        elif r < 0.62:
            items.append(Insn(E.BPF_JMP32 | E.EXIT))      # not an exit for either
        elif r < 0.66:
            items.append(Insn(E.BPF_JMP32 | E.CALL, imm=5))
        else:
            items.append(E.mov(rnd.choice([R0, R1, R2]), rnd.randrange(-(1 << 31), 1 << 32)))
    if rnd.random() < 0.5:
        items.append(Label("late"))
    same_prune(items)
    same_code(items)
    pruned = _outcome(_prune_ref, list(items))
    if pruned[0] == "ok":
        same_code(pruned[1])


# ---- real compiles ------------------------------------------------------------------------------

pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def _table(text):
    import kernel_xt as kx
    import lab
    from nsutil import Netns
    from bpfilter_umh.model import AF_INET, decode_replace
    with Netns("ef") as ns:
        lab.restore(ns, text)
        with ns.inside():
            info, blob = kx.snapshot(AF_INET)
    buf = kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                            list(info.hook_entry), list(info.underflow), 4, 0, blob)
    return decode_replace(buf, AF_INET)[1]


@pytestmark_root
@pytest.mark.parametrize("shape,n,global_above", [("blocklist", 40, None), ("mixed", 300, None),
                                                  ("ports", 200, None), ("fanout", 600, 0)])
def test_compiles_prune_and_encode_the_same(monkeypatch, shape, n, global_above):
    """Every prune a compile makes (unpruned chains and functions, dead code included) and every
    program it gives, assembled, equal the plain versions' (tc flavor too: its own prologue)."""
    import rulesets
    from bpfilter_umh import compile as C
    if global_above is not None:
        monkeypatch.setattr(classify, "GLOBAL_ABOVE", global_above)
    fast, calls = E.prune, []

    def both(items):
        calls.append(len(items))
        want = _prune_ref(list(items))
        got = fast(items)
        assert got == want and [id(x) for x in got] == [id(x) for x in want]
        return got
    monkeypatch.setattr(E, "prune", both)
    text = rulesets.make(shape, n, seed=3).text
    table = _table(text.replace("-A FORWARD ", "-A INPUT "))
    facts = KernelFacts.fake()
    for fl in ("nf", "tc"):
        C._PROG_CACHE.clear()
        classify._FN_CACHE.clear()
        for cp in compile_table(table, facts, fl).programs:
            fds = {COUNTERS_MAP: 3, **{m.name: 4 + k for k, m in enumerate(cp.maps)},
                   "ifnames": 9, "served": 10}
            assert E.assemble(cp.items, fds, facts.kfunc_ids) == \
                _assemble_ref(cp.items, fds, facts.kfunc_ids)
            assert cp.assemble(fds) == _assemble_ref(cp.items, fds, facts.kfunc_ids)
    assert calls
