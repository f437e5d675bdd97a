"""Long linear stretches of a chain as BPF global functions (issue #7: the verifier must not see a
giant program).

Rules no classified run takes (an interface match, `-m` extensions the classifier does not read,
a docker-style `-i br0 -o eth0 -s X` chain) are linear code, and the verifier's time on one
linear program grows faster than its length on 6.18 (`-i IFACE -s PREFIX` rules, counting
through one subprogram: 1 000 rules 0.66 s to compile and load, 3 000 rules 4.3 s for 3x the
processed instructions, 10 000 rules 17-20 s), and every `iptables -A` on such a table paid it
again.
In pieces, with the caller counting (_call): 0.34, 0.35 and 1.4 s with the first compile; an
edit of the 10 000-rule chain (append, insert at the top, delete in the middle) 0.27-0.38 s
through the door, ~0.2 s of it the verifier's walk of every piece (bench/linear_bench.py).

A global function (BTF_FUNC_GLOBAL) is verified once, on its own, with its arguments as its BTF
says (btf_check_subprog_call, do_check_subprogs), not once per call site and not inside its
caller's path. So a stretch of at least STRETCH_MIN consecutive linear rules is cut into pieces
of about PIECE_RULES rules, each a global function that takes the main frame's packet-field slots
through a pointer (classify.FRAME_LO, as the jump-case functions do: rule code addresses the
slots fp-relative and is rewritten to go through the pointer, held in r9: _via_r9) and
answers:
  FN_CONTINUE   no rule of the piece decided: go on with the rule after it
  FN_RETURN     a RETURN rule matched: the chain returns (the caller's `ret`)
  ACCEPT / DROP a verdict (a matched ACCEPT or DROP rule, or a hotdrop)
A matched rule stores its entry's key in the main frame's S_KEY and answers; the caller counts
that entry (_call), so counters stay per entry. The cuts follow the entries'
contents (_cut), and a piece whose rules a later compile finds again is kept with its counter
keys moved (_piece): an edit compiles the pieces around it only.

A piece holds only rules whose code reads nothing but the slots (classify._uses_context: no
ctx, skb or kfunc, no helper other than map lookups, every stack access among the slots) and
whose target is ACCEPT, DROP or RETURN; a rule that is not (a jump, LOG, REJECT, conntrack) is
emitted inline between pieces, where it was. Only the main program's own chain walk cuts
pieces (not a static subprogram's, nor a jump-case function's: their frame is not the main one),
and only for the flavors that take global functions (classify.GLOBAL_FLAVORS).
"""
from __future__ import annotations

import os
import zlib

from . import classify
from . import ebpf as E
from .ebpf import FP, R0, R1, R2, R9, Label
from .model import NF_ACCEPT, NF_DROP, XT_RETURN, Verdict

STRETCH_MIN = 512          # linear rules in a row from which they become functions
PIECE_RULES = 128          # rules per function, about (see _cut)
PIECE_STEM = "piece_"      # its label's start: compile.py drops a piece never called


def _settings() -> tuple:
    """(STRETCH_MIN, PIECE_RULES), or the environment's (tests: BPFILTER_STRETCH_MIN=0 never
    cuts, a small one cuts every chain; BPFILTER_STRETCH_PIECE)."""
    env = os.environ.get
    return int(env("BPFILTER_STRETCH_MIN", STRETCH_MIN)), \
        max(1, int(env("BPFILTER_STRETCH_PIECE", PIECE_RULES)))


def wanted(cc, n: int) -> bool:
    """Should n linear rules in a row of the chain being compiled become functions?"""
    least = _settings()[0]
    if least <= 0 or n < least or cc.in_sub or getattr(cc, "in_global", False):
        return False
    return cc.fl.name in classify.GLOBAL_FLAVORS and _budget(cc) >= 2


def _budget(cc) -> int:
    return classify.GLOBAL_GROUPS - len(cc.__dict__.get("global_labels", ()))


def _plain(rule) -> bool:
    """Can the rule's target be answered by a piece (ACCEPT, DROP or RETURN)?"""
    t = rule.target
    if isinstance(t, Verdict):
        return t.verdict in (-NF_ACCEPT - 1, -NF_DROP - 1, XT_RETURN)
    return False


def emit(cc, chain, rules: list, pos: int, end: int, ret: str, path: list, where: str,
         entry_at) -> None:
    """Rules pos..end-1 of `chain` (entry_at(p) -> (rule, the next entry's offset)), emitted as
    pieces where they can be and inline where not."""
    piece = _settings()[1]
    # pieces hold at least half of `per` rules: the program's functions stay within the budget
    per = max(piece, -(-2 * (end - pos) // max(1, _budget(cc) - 1)))
    while pos < end:
        if not _plain(rules[pos]):
            _inline(cc, chain, pos, ret, path, where, entry_at)
            pos += 1
            continue
        stop = _cut(rules, pos, end, per)
        if stop - pos < max(1, piece // 4) or _budget(cc) < 1 or \
                not _piece(cc, chain, rules, pos, stop, ret, path, where, entry_at):
            for p in range(pos, stop):
                _inline(cc, chain, p, ret, path, where, entry_at)
        pos = stop


def _cut(rules: list, pos: int, end: int, per: int) -> int:
    """Where the piece starting at `pos` ends: before the first rule that is not plain, or after
    at least per // 2 rules at the first whose entry hashes to 0 mod per // 2, or at 2 * per
    rules. Cuts defined by content (as rsync's chunks are) stay where they were when a rule is
    inserted or deleted elsewhere (`iptables -I INPUT 1`), so the other pieces are the same
    rules as before and their functions are kept (_piece)."""
    half = max(1, per // 2)
    stop = pos
    while stop < end and _plain(rules[stop]):
        stop += 1
        n = stop - pos
        if n >= 2 * per:
            break
        if n >= half:
            k = getattr(rules[stop - 1], "cache_key", None)
            if k is not None and zlib.crc32(k) % half == 0:
                break
    return stop


def _inline(cc, chain, p: int, ret: str, path: list, where: str, entry_at):
    rule, next_off = entry_at(p)
    cc._entry(rule, chain.name, p + 1, ret, "rule", path, where, next_off)


class _Piece(classify._FnTemplate):
    """A piece's function as kept for later compiles (classify._FN_CACHE, beside the jump-case
    functions, so compile.py's kept programs find it alive): relocs are (item position, the
    rule's ordinal in the piece) of its counter keys; ordinals names each entry label's rule."""
    __slots__ = ("ordinals",)


def _piece(cc, chain, rules: list, lo: int, hi: int, ret: str, path: list, where: str,
           entry_at) -> bool:
    """Rules lo..hi-1 as one global function and its call; False: nothing emitted (some rule's
    code needs more than the slots). A piece of the same rules compiled before (an append to a
    long chain: every piece but the last) is that compile's function, counter keys moved."""
    key = _piece_key(cc, rules, lo, hi)
    used = cc.__dict__.setdefault("fn_templates_used", set())
    tpl = classify._FN_CACHE.get(key) if key is not None else None
    if tpl is not None and id(tpl) not in used:
        entries = [entry_at(p)[0] for p in range(lo, hi)]
        items, values = list(tpl.items), []
        for p, k in tpl.relocs:
            v = entries[k].index
            values.append(v)
            old = items[p]
            if old.imm != v:
                items[p] = E.Insn(old.code, old.dst, old.src, old.off, v,
                                  comment=f"count entry {v}")
        for name, k in tpl.ordinals.items():
            cc.where[name] = f"chain {chain.name} rule {lo + k + 1} (entry offset " \
                             f"{entries[k].offset})"
        cc.rule_count += hi - lo
        classify.FN_STATS["reused"] += 1
    else:
        tpl = _make_piece(cc, chain, lo, hi, ret, path, where, entry_at)
        if tpl is None:
            return False
        items = tpl.items
        values = [items[p].imm for p, _k in tpl.relocs]
        classify.FN_STATS["made"] += 1
        if key is not None and all(k >= 0 for _p, k in tpl.relocs):
            if len(classify._FN_CACHE) >= classify.FN_CACHE_MAX:
                classify._FN_CACHE.clear()
            classify._FN_CACHE[key] = tpl
    used.add(id(tpl))
    _call(cc, tpl.head, ret, f"{where} rules {lo + 1}..{hi}")
    cc.__dict__.setdefault("global_funcs", []).append(items)
    cc.__dict__.setdefault("global_labels", []).append(tpl.head)
    cc.__dict__.setdefault("global_parts", []).append((tpl, values))
    return True


def _piece_key(cc, rules: list, lo: int, hi: int):
    """What a piece's code is a function of: the rules' entries (cache_key: the bytes without
    comefrom, counters and jump offsets), the flavor and the family; None when some rule has no
    cache_key or caching is off (BPFILTER_FN_CACHE=0). Not what the program's prologue parses
    (needs_l4 and the like): a rule that reads a slot makes the prologue fill it, and a piece
    reads nothing but its rules' slots; nor how the table counts (the caller counts: _call).
    An append of the table's first `-p tcp --dport` rule to a 10 000-rule chain compiled
    every piece again (0.87 s) while the key held them."""
    if os.environ.get("BPFILTER_FN_CACHE", "1") == "0":
        return None
    from .compile import _flavor_key
    fk = _flavor_key(cc.fl)
    if fk is None:
        return None
    keys = tuple(getattr(r, "cache_key", None) for r in rules[lo:hi])
    if None in keys:
        return None
    return ("piece", fk, cc.table.family, keys)


def _make_piece(cc, chain, lo: int, hi: int, ret: str, path: list, where: str, entry_at):
    """The piece's function compiled, or None (nothing emitted: some rule's code needs more
    than the slots)."""
    from . import compile as C
    saved, count = cc.items, cc.rule_count
    cc.items, cc.in_global, cc.in_piece = [], True, True
    try:
        for p in range(lo, hi):
            _inline(cc, chain, p, ret, path, where, entry_at)
        body = cc.items
    finally:
        cc.items, cc.in_global, cc.in_piece = saved, False, False
    labels = {it.name for it in body if it.__class__ is Label}
    # jumps leave the piece only for the chain's RETURN (calls: the counting subprogram)
    leaves = {it.target for it in body if it.__class__ is not Label} - labels
    moved = None
    if not classify._uses_context(body) and not leaves - {None, ret, C.COUNT_SUB} and \
            _in_window(body):
        moved = _via_r9(body)
    if moved is None:
        cc.rule_count = count           # emitted again inline by the caller
        for name in labels:
            cc.where.pop(name, None)
        return None
    # the k-th entry label is rule lo + k's (_entry names one per entry), and its counter key
    # is that entry's index
    entries = [it.name for it in body if it.__class__ is Label and it.name in cc.where]
    ordinal = {entry_at(p)[0].index: p - lo for p in range(lo, hi)}
    fn, fret = cc.label(f"{PIECE_STEM}{chain.name}_{lo + 1}"), cc.label("fn_return")
    body = [E.Insn(it.code, it.dst, it.src, it.off, it.imm, fret, it.map, it.kfunc, it.comment)
            if it.__class__ is not Label and it.target == ret else it for it in moved]
    body += [E.mov(R0, classify.FN_CONTINUE), E.exit_("no rule of the piece decided"),
             Label(fret), E.mov(R0, classify.FN_RETURN), E.exit_("RETURN")]
    ok = cc.label("fn_frame")
    out = [Label(fn, f"global function: {where} rules {lo + 1}..{hi} (linear)"),
           E.jmp(E.JNE, R1, 0, ok), E.mov(R0, cc.fl.DROP), E.exit_(), Label(ok),
           E.mov(R9, R1), E.alu(E.ADD, R9, classify.FRAME_LO,
                                comment="r9 = the caller's frame pointer")] + \
        classify._prune_function(body)
    relocs = [(p, ordinal.get(it.imm, -1)) for p, it in enumerate(out)
              if it.__class__ is not Label and it.code == classify._ST_KEY and it.off == C.S_KEY]
    renamed, names, sfx = classify._own_labels(out)
    tpl = _Piece(fn + sfx, renamed, relocs, {})
    tpl.ordinals = {}
    for k, name in enumerate(entries):
        text = cc.where.pop(name)
        if name in names:
            cc.where[name + sfx] = text
            tpl.ordinals[name + sfx] = k
    return tpl


def _call(cc, head: str, ret: str, what: str):
    """The main program's side: the call, then the answer, counted here. The piece stores the
    matched entry's key in S_KEY and leaves (compile._count), so the counting subprogram's
    code is verified at the three answers of each call, not at each of the piece's rules (a
    static subprogram is verified again at every call site: it was half of the instructions a
    10 000-rule chain's pieces made the verifier process). S_KEY starts past the counters'
    end, so a hotdrop, which stores no key, counts nothing (ipt_do_table)."""
    from .compile import S_KEY
    fl = cc.fl
    nc, nr, vd, go = (cc.label(x) for x in ("fn_nc", "fn_nr", "fn_drop", "fn_go"))
    cc.emit(E.mov(R1, -1), E.stx(E.W, FP, S_KEY, R1, "no entry matched yet"),
            E.mov(R1, FP), E.alu(E.ADD, R1, -classify.FRAME_LO, comment="arg: the slots"),
            E.mov(R2, 0),
            E.call_local(head, f"global function: {what}"),
            E.jmp(E.JNE, R0, classify.FN_CONTINUE, nc), E.ja(go, "no rule decided"),
            Label(nc), E.jmp(E.JNE, R0, classify.FN_RETURN, nr))
    cc.count_key()
    cc.emit(E.ja(ret, "RETURN"), Label(nr), E.jmp(E.JNE, R0, fl.ACCEPT, vd))
    cc.count_key()
    cc.emit(E.mov(R0, fl.ACCEPT), E.exit_("ACCEPT"), Label(vd))
    cc.count_key()
    cc.emit(E.mov(R0, fl.DROP), E.exit_("DROP"), Label(go))


def _via_r9(items: list) -> list:
    """The piece's code with its fp-relative slot accesses made r9-relative, r9 holding the
    caller's frame pointer for the whole piece; None when the code uses r9 itself (the rules
    stay inline then). Rule code that reads only the slots leaves r9 alone (r6-r9 are the
    context-reading matchers' and --tcp-option's), and calls keep it (callee-saved): one load
    an access, where compile._via_main_frame (the jump-case functions') reloads the pointer
    after every label, ~2 ns a rule (3 000 `-i -s` rules: 28 -> 23 us a packet, as linear code
    inline). Opcodes read directly: a 10 000-rule chain has ~200 000."""
    out = []
    put = out.append
    Insn = E.Insn
    ldx, st, stx, mem = E.BPF_LDX, E.BPF_ST, E.BPF_STX, E.BPF_MEM
    mov_x = E.BPF_ALU64 | E.MOV | E.BPF_X
    for it in items:
        if it.__class__ is Label:
            put(it)
            continue
        d, r = it.dst, it.src
        if d == 9 or r == 9:
            return None
        if d != 10 and r != 10:
            put(it)
            continue
        code = it.code
        cls = code & 0x07
        if cls == ldx and r == 10:
            put(Insn(code, d, R9, it.off, it.imm, comment=it.comment))
        elif (cls == st or cls == stx) and d == 10 and code & 0xe0 == mem:
            put(Insn(code, R9, r, it.off, it.imm, comment=it.comment))
        elif code == mov_x and r == 10:
            put(E.mov(d, R9, comment=it.comment))
        else:
            return None
    return out


def _in_window(items: list) -> bool:
    """Does every stack access fall among the slots the function sees,
    [fp - classify.FRAME_LO, fp - 16)?"""
    lo, hi = -classify.FRAME_LO, -16
    mem = (E.BPF_LDX, E.BPF_ST, E.BPF_STX)
    size = {E.W: 4, E.H: 2, E.B: 1, E.DW: 8}
    for it in items:
        if it.__class__ is Label or (it.dst != 10 and it.src != 10):
            continue
        if it.code & 0x07 in mem and not lo <= it.off <= hi - size[it.code & 0x18]:
            return False
    return True
