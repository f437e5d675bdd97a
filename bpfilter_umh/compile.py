"""The compiler: a decoded xtables Table → one eBPF program per built-in chain, pure and deterministic.

API (stable; engine.py and tests use it):
  KernelFacts(...)                 BTF offsets and kfunc ids of the running kernel (engine fills it
                                   from btf.py: KernelFacts.from_btf()); KernelFacts.fake() gives
                                   fixed values for golden listings
  compile_table(table, facts, flavor="nf") -> CompiledTable
      .programs: list[CompiledProgram] (built-in chains in hook order)
      .counters_entries: max_entries of the counters map (== number of entries in the blob)
  CompiledProgram: .chain .hook .items (ebpf items) .listing() .assemble(map_fds) -> bytes
      .prog_type .expected_attach_type .license .rule_count
  COUNTERS_MAP = "counters"        BPF_MAP_TYPE_PERCPU_ARRAY, key u32 entry index,
                                   value struct { u64 pcnt; u64 bcnt; }
  A built-in chain whose entries (and those of the chains it reaches) did not change since an
  earlier compile gets that compile's program, its entry indices moved (_PROG_CACHE; counted in
  PROG_STATS; BPFILTER_PROG_CACHE=0 compiles every program afresh).

Semantics mirrored (net/ipv4/netfilter/ip_tables.c ipt_do_table / ip_packet_match,
net/netfilter/xt_tcpudp.c tcp_mt/udp_mt/tcp_find_option, ip_tables.c icmp_match):
  - an entry whose ip part and matches all match gets ADD_COUNTER(+1, skb->len) before its target
    runs: rules, jump rules, the RETURN entry at a user chain's end and the underflow (policy)
    entry of a built-in chain;
  - user chains are inlined at every call site, which makes ipt_do_table's jump stack static:
    a jump continues after the jump rule on RETURN, a goto (IPT_F_GOTO) pushes nothing so RETURN
    resumes after the last *jump*; RETURN with an empty stack lands on the underflow entry;
  - hotdrop (tcp fragment at offset 8 bytes, truncated TCP/UDP/ICMP header, bad TCP data offset,
    unreadable TCP options) ends evaluation with NF_DROP and counts nothing for that rule;
  - non-first fragments (fragoff != 0) never match tcp/udp/icmp; `-f` matches them.
AF_INET6 tables (ip6t_do_table) use the same rule/chain logic; family.py walks the IPv6
extension headers (ipv6_find_hdr) into the same S_PROTO/S_THOFF/S_FRAGOFF slots and emits
ip6_packet_match and icmp6_match (every flavor: the walk reads through the flavor's primitives).

Flavor nf (BPF_PROG_TYPE_NETFILTER): ctx is struct bpf_nf_ctx { state; skb; }; the IP header and
L4 header are read once per packet with the kfuncs bpf_dynptr_from_skb + bpf_dynptr_slice into
stack slots; interface names from state->in/out->name (NULL device = all-zero name, like
ipt_do_table's nulldevname); returns NF_DROP (0) or NF_ACCEPT (1).
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import os
import re
import struct
import weakref
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, eq, is_, is_not, itemgetter
from typing import Optional

from . import ebpf as E
from . import classify, family, flavors, matchers, stretch, targets
from .ebpf import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Insn, Label
from .errors import BpfilterError
from .model import _ShiftedInts, _bisect_left   # the walks' moved spans (_shifted)
from .model import (AF_INET, AF_INET6, NF_ACCEPT, NF_DROP, XT_RETURN, Chain, ExtTarget, Jump,
                    Rule, Table, Verdict, chain_body, chain_entry, chain_outline, chain_source,
                    moved_from, placement)

COUNTERS_MAP = "counters"
BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45

# ipt_ip flags/invflags (include/uapi/linux/netfilter_ipv4/ip_tables.h)
IPT_F_FRAG, IPT_F_GOTO = 0x01, 0x02
IPT_INV_VIA_IN, IPT_INV_VIA_OUT, IPT_INV_TOS, IPT_INV_SRCIP, IPT_INV_DSTIP, IPT_INV_FRAG, \
    IPT_INV_PROTO = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
# xt_tcp / xt_udp / ipt_icmp invflags
XT_TCP_INV_SRCPT, XT_TCP_INV_DSTPT, XT_TCP_INV_FLAGS, XT_TCP_INV_OPTION = 0x01, 0x02, 0x04, 0x08
XT_UDP_INV_SRCPT, XT_UDP_INV_DSTPT = 0x01, 0x02
IPT_ICMP_INV = 0x01

# Stack layout (offsets from r10). Every slot the rules read is written by the prologue on every
# path, so the verifier never sees an uninitialised read.
S_DYNPTR = -16        # struct bpf_dynptr (16 bytes, 8-aligned as the verifier requires)
S_KEY = -24           # u32 counters key
S_LEN = -32           # skb->len (bytes added to bcnt)
S_SADDR = -40         # u32, network order as loaded
S_DADDR = -48
S_PROTO = -56
S_FRAGOFF = -64       # ntohs(frag_off) & IP_OFFSET, in 8-byte units
S_THOFF = -72         # ihl * 4 (par->thoff)
S_L4LEN = -80         # bytes of L4 header readable: 0, 8 (udp/icmp header) or 20 (tcp header)
S_SPORT = -88         # host order
S_DPORT = -96
S_TCPFLAGS = -104     # byte 13 of the TCP header
S_DOFF = -112         # th->doff
S_ICMPTYPE = -120
S_ICMPCODE = -128
S_INNAME = -144       # 16 bytes of in->name (zero when state->in is NULL)
S_OUTNAME = -160
S_BUF = -200          # 40-byte bounce buffer for bpf_dynptr_slice
S_OPT = -248          # 48-byte buffer for TCP options (tcp_find_option's _opt[40]), zeroed first

IP_OFFSET = 0x1fff
ACC = R5              # OR of the current rule's mismatch values (0 = everything matched so far)

# ---- user chains as BPF subprograms (bpf-to-bpf calls) ----
# Inlining a user chain at every call site is exact but multiplies: chains reached from many
# sites, nested, grow a 90-rule table to 276 000 instructions, which the kernel refuses
# (bpf_patch_insn_data: "insn N cannot be patched due to 16-bit range"). Past SUBPROG_ABOVE
# instructions, the chains reached from more than one site become subprograms, each emitted
# once. A subprogram returns the flavor's ACCEPT/DROP verdict (a final verdict or a hotdrop:
# the caller returns it as is) or SUB_RETURN (the chain RETURNed, or fell off its end onto its
# RETURN entry): after a jump the caller goes on with its next entry, after a goto it returns
# in turn (a goto pushes nothing in ipt_do_table, so RETURN resumes after the last *jump*); the
# built-in chain turns SUB_RETURN after a goto into its underflow (policy) entry.
SUBPROG_ABOVE = 16384       # instructions of the inlined program; chosen from measurements
# Measured (kernel 6.18, big generated tables): the verifier walks a static subprogram again for
# every call site, so a subprogram build costs it 3.3-6.1 processed insns per *inlined*
# instruction against 1.3-3 for the inlined build, and a 164 000-instruction table failed at
# the 1 000 000 limit as subprograms while it loads inlined (496 000 processed). Above
# SUBPROG_UPTO, inlining is kept: 131 072 x 6.1 stays under BPF_COMPLEXITY_LIMIT_INSNS.
SUBPROG_UPTO = 131072
SUB_RETURN = 0x7e7e         # no flavor's verdict (NF 0/1, TC -1/0/2, XDP 1/2)
# The packet fields live in the main program's stack slots. A subprogram gets a pointer to the
# main frame in r1 (the verifier allows loads, stores, helper and kfunc arguments through a
# PTR_TO_STACK of a caller frame: kernel/bpf/verifier.c func(env, reg)); every r10-relative
# access of rule code is rewritten to go through it (_via_main_frame). All of r6-r9 are taken
# (r6 ctx, r7 skb, r8/r9 rule scratch), so the pointer lives in the subprogram's own frame:
S_SUB_MAIN = -8             # in a subprogram frame: the main frame pointer
S_SUB_SPILL = -16           # in a subprogram frame: a register saved around a rewritten store
MAX_CALL_FRAMES = 8         # kernel/bpf/verifier.c MAX_CALL_FRAMES (main program included)
MAX_BPF_STACK = 512         # combined stack of the frames of one call chain (check_max_stack_depth)
SUB_FRAME = 32              # a subprogram frame: 16 bytes, rounded up like the interpreter does
# Counting through one subprogram (issue #7). The kernel inlines every bpf_map_lookup_elem of
# an array map (kernel/bpf/verifier.c do_misc_fixups -> map_gen_lookup), and each inlining is a
# bpf_patch_insn_data that moves the whole program and walks every branch (bpf_adj_branches):
# one counter lookup per rule made loading quadratic in the program size (measured on 6.18:
# 120 000 instructions, 16 s, 85% of it in those fixups). Past SHARED_COUNT_ABOVE entries every
# rule calls COUNT_SUB instead: one lookup, one patch; a static call costs the packet a few ns
# and only on the rules that match. Measured again (`-i IFACE -s PREFIX` chains, one program):
# 300 rules load in 96 ms inline, 60 shared; 600 rules 347 / 180 ms; 1 000 rules 1.42 / 0.54 s
# (1 000 rules in linear-stretch pieces, stretch.py: 0.65 / 0.05 s); the same test-run cost
SHARED_COUNT_ABOVE = 256
COUNT_SUB = "count_entry"


@dataclass(frozen=True)
class KernelFacts:
    """What the code depends on in the running kernel's BTF: struct offsets and kfunc ids."""
    nf_ctx_state: int      # offsetof(struct bpf_nf_ctx, state)
    nf_ctx_skb: int        # offsetof(struct bpf_nf_ctx, skb)
    state_in: int          # offsetof(struct nf_hook_state, in)
    state_out: int         # offsetof(struct nf_hook_state, out)
    dev_name: int          # offsetof(struct net_device, name)
    skb_len: int           # offsetof(struct sk_buff, len)
    kfuncs: tuple = ()     # ((name, btf_id), ...)

    # bpf_cast_to_kern_ctx: tc programs reach the kernel's struct sk_buff (matchers.py)
    KFUNCS = ("bpf_dynptr_from_skb", "bpf_dynptr_slice", "bpf_cast_to_kern_ctx")

    @classmethod
    def fake(cls) -> "KernelFacts":
        """Fixed values, so golden listings do not depend on the kernel build."""
        return cls(0, 8, 16, 24, 0, 112, (("bpf_dynptr_from_skb", 1001),
                                           ("bpf_dynptr_slice", 1002),
                                           ("bpf_cast_to_kern_ctx", 1003)))

    @classmethod
    def from_btf(cls) -> "KernelFacts":
        from . import btf
        return cls(nf_ctx_state=btf.member_offset("bpf_nf_ctx", "state"),
                   nf_ctx_skb=btf.member_offset("bpf_nf_ctx", "skb"),
                   state_in=btf.member_offset("nf_hook_state", "in"),
                   state_out=btf.member_offset("nf_hook_state", "out"),
                   dev_name=btf.member_offset("net_device", "name"),
                   skb_len=btf.member_offset("sk_buff", "len"),
                   kfuncs=tuple((k, btf.func_id(k)) for k in cls.KFUNCS))

    @property
    def kfunc_ids(self) -> dict:
        return dict(self.kfuncs)


@dataclass
class CompiledProgram:
    chain: str
    hook: int
    items: list
    rule_count: int
    where: dict = field(default_factory=dict)
    prog_type: int = BPF_PROG_TYPE_NETFILTER
    expected_attach_type: int = BPF_NETFILTER
    license: str = "GPL"
    facts: Optional[KernelFacts] = None
    flavor: str = "nf"
    maps: list = field(default_factory=list)   # classify.MapSpec: created and filled at load
    global_labels: frozenset = frozenset()     # subprograms that are BTF global functions
    # the global functions ending `items`, in order: (classify._FnTemplate, its counter keys);
    # each is placed as its template's bytecode, patched (assemble), not encoded again
    fn_parts: tuple = ()

    def _layout(self):
        """(main items, {label: slot} of the main part, {function head: slot}, slots of the
        main part, the functions' codes) when every function has its template's bytecode,
        else None."""
        lay = self.__dict__.get("_lay")
        if lay is not None or not self.fn_parts:
            return lay or None
        codes = [tpl.code() for tpl, _ in self.fn_parts]
        if None in codes:
            self.__dict__["_lay"] = False
            return None
        n_fn = sum(len(tpl.items) for tpl, _ in self.fn_parts)
        main = self.items[:len(self.items) - n_fn]
        at, slot = _label_slots(main)
        fn_at, pos = {}, slot
        for (tpl, _), code in zip(self.fn_parts, codes):
            fn_at[tpl.head] = pos
            pos += len(code[0]) // 8
        lay = self.__dict__["_lay"] = (main, at, fn_at, slot, codes)
        return lay

    def func_btf(self):
        """(BTF blob, func_info bytes) when the program has global functions, else None (a
        program of static subprograms only loads without BTF, as it always did)."""
        if not self.global_labels:
            return None
        lay = self._layout()
        if lay is None:
            starts = E.subprogram_starts(self.items)
        else:
            main, at, fn_at, _, codes = lay
            called = set(_local_calls(main).values())
            if any(c[1] for c in codes):
                called.add(COUNT_SUB)
            starts = sorted((fn_at[t] if t in fn_at else at[t], t) for t in called)
        funcs = [(0, self.name, False)] + [(slot, label, label in self.global_labels)
                                            for slot, label in starts]
        return E.func_btf(classify.FRAME_LO - 16, funcs)

    @property
    def name(self) -> str:
        return f"bpfilter_{self.chain.lower()}"[:15]

    def listing(self) -> str:
        return f"; program {self.chain} (hook {self.hook})\n" + E.listing(self.items)

    def locate(self, slot: int) -> str:
        """Which entry the instruction at `slot` belongs to, for verifier errors."""
        cur, n = f"chain {self.chain} prologue", 0
        for it in self.items:
            if isinstance(it, Label):
                if it.name in self.where:
                    cur = self.where[it.name]
                continue
            if n >= slot:
                break
            n += it.slots
        return cur

    def assemble(self, map_fds: dict) -> bytes:
        kf = self.facts.kfunc_ids if self.facts else {}
        lay = self._layout()
        if lay is None:
            return E.assemble(self.items, map_fds, kf)
        # the main part with each function's head standing in at its end (the calls into the
        # functions are patched below), then the functions' own bytecode: their jumps stay
        # inside them; the calls of the counting subprogram and the counter keys are patched
        main, at, fn_at, main_slots, codes = lay
        stubs = [x for tpl, _ in self.fn_parts for x in (Label(tpl.head), E.exit_())]
        code = bytearray(self._encode_main(main, stubs, map_fds, kf)[:main_slots * 8])
        for slot, target in _local_calls(main).items():
            if target in fn_at:
                struct.pack_into("<i", code, slot * 8 + 4, fn_at[target] - slot - 1)
        count_at = at.get(COUNT_SUB)
        for (tpl, values), (fcode, calls, rslots) in zip(self.fn_parts, codes):
            start, part = fn_at[tpl.head], bytearray(fcode)
            for c in calls:
                struct.pack_into("<i", part, c * 8 + 4, count_at - start - c - 1)
            for r, v in zip(rslots, values):
                struct.pack_into("<i", part, r * 8 + 4, v)
            code += part
        return bytes(code)

    def _encode_main(self, main: list, stubs: list, map_fds: dict, kf: dict) -> bytes:
        """The main part's bytecode, each function's head standing in at its end (assemble)."""
        return E.assemble(main + stubs, map_fds, kf)


_LDDW, _CALL_LOCAL = E._LDDW, E.BPF_JMP | E.CALL
_ALL64, _IMM_MAX = (1 << 64) - 1, 1 << 31
_MOV_X = E.BPF_ALU64 | E.MOV | E.BPF_X


def _label_slots(items: list) -> tuple:
    """({label: slot}, slots) of `items`: the slot each label stands at, and the slots of the
    whole list (an lddw takes two). Read by opcode, not through Insn's properties (a fan-out
    append's INPUT program has ~500 items: the property calls were ~0.3 ms of its layout)."""
    at, slot = {}, 0
    for it in items:
        if it.__class__ is Label:
            at[it.name] = slot
        elif it.__class__ is Insn:
            slot += 2 if it.code == _LDDW else 1
        elif isinstance(it, Label):
            at[it.name] = slot
        else:
            slot += it.slots
    return at, slot


def _local_calls(items: list) -> dict:
    """{slot: target label} of the bpf-to-bpf calls in `items` (Insn.is_local_call), read by
    opcode as _label_slots reads the slots."""
    out, slot = {}, 0
    for it in items:
        if it.__class__ is Label or isinstance(it, Label):
            continue
        code = it.code
        if code == _CALL_LOCAL and it.src == E.BPF_PSEUDO_CALL:
            out[slot] = it.target
        slot += 2 if code == _LDDW else 1
    return out


@dataclass
class CompiledTable:
    programs: list = field(default_factory=list)
    counters_entries: int = 0

    def listing(self) -> str:
        return "\n".join(p.listing() for p in self.programs)


def _unsupported(chain: str, pos: int, rule: Rule, what: str) -> BpfilterError:
    return BpfilterError(errno.EOPNOTSUPP, f"chain {chain} rule {pos} (entry offset {rule.offset}): "
                                           f"{what} is not supported by the compiler")


def _field(data, name):
    if isinstance(data, dict):
        return data[name]
    return getattr(data, name)


# payload layouts for matches whose codec may not have decoded them (native endian, x86_64)
_RAW_LAYOUTS = {
    "tcp": ("=2H2H4B", lambda v: dict(spts=v[0:2], dpts=v[2:4], option=v[4], flg_mask=v[5],
                                      flg_cmp=v[6], invflags=v[7])),
    "udp": ("=2H2HB", lambda v: dict(spts=v[0:2], dpts=v[2:4], invflags=v[4])),
    "icmp": ("=4B", lambda v: dict(type=v[0], code=v[1:3], invflags=v[3])),
}


def _payload(m) -> dict:
    # a tcp/udp match a template read (model._PortsMatch) parses its payload into a Container
    # when `data` is first read (~6 us); its bytes answer alike: 10 000 IPv6 port rules'
    # classes 0.26 -> 0.1 s
    data = getattr(m, "__dict__", {}).get("data")
    if data is None:
        data = getattr(m, "raw", None)
        if not isinstance(data, (bytes, bytearray)):
            data = m.data
    if isinstance(data, (bytes, bytearray)):
        fmt, make = _RAW_LAYOUTS[m.name]
        return make(struct.unpack_from(fmt, data))
    names = {"tcp": ("spts", "dpts", "option", "flg_mask", "flg_cmp", "invflags"),
             "udp": ("spts", "dpts", "invflags"),
             "icmp": ("type", "code", "invflags")}[m.name]
    return {n: _field(data, n) for n in names}


def _le32(addr) -> int:
    """An IPv4 address/mask as the u32 a BPF_W load of its network-order bytes yields (LE host)."""
    return int.from_bytes(addr.packed, "little")


def _reads(r) -> tuple:
    """(interface names, layer 4, IP header): what the prologue must parse for rule r. Asked
    once per template of a long chain (classify.TEMPLATE_KINDS): of the addresses, ports and
    comment it reads only whether src and dst are zero."""
    ip = r.ip
    return (bool(any(ip.iniface_mask) or any(ip.outiface_mask)),
            any(m.name in ("tcp", "udp", "icmp", "icmp6") or matchers.needs_l4(m)
                for m in r.matches),
            bool(r.matches or ip.proto or ip.flags & IPT_F_FRAG or ip.invflags or int(ip.smsk)
                 or int(ip.dmsk) or int(ip.src) or int(ip.dst) or targets.needs_packet(r.target)))


# The runs of a chain an append moved whole (model.chain_source: its source's rules, the same
# list object from one append to the next while the chain stays unmade; a fan-out hub's 3 333
# rules, ~1 ms to find): classify.find_runs' answer for that list, kept with the table compiled
# (classify.kept_for) and the knobs it depends on, and taken for the next table
# (model.moved_from), a copy of each run handed out (the compile sets fields of its runs). A
# table whose program of that chain is a kept one (an append to INPUT ahead of the hub) gets
# them from the previous table too (classify.carry_bodies: they name their chain), so that the
# next change (iptables -A SVC-3000) finds them (~2 ms).
def _run_copy(run: "classify.Run") -> "classify.Run":
    out = copy.copy(run)
    out.next_same = {}          # filled by emit_run
    return out


def _moved_runs(table: Table, rules: list, chain: str) -> list:
    knobs = (_knobs(), classify.min_run())
    mv = moved_from(table)
    hit = classify.kept_of(mv[0]).get(("runs", id(rules))) if mv is not None else None
    if hit is not None and hit[0] is rules and hit[2] == knobs and len(hit[1]) == len(rules) \
            and all(map(is_, hit[1], rules)):
        runs = list(map(_run_copy, hit[3]))
    else:
        runs = classify.find_runs(rules)
        hit = (rules, tuple(rules), knobs, list(map(_run_copy, runs)), chain)
    classify.kept_for(table)[("runs", id(rules))] = hit
    return runs


def _chain_runs(table: Table, rules: list, chain: str, placed) -> list:
    """The runs of a chain's rules: a moved chain's through _moved_runs; a chain of its own
    entries found anew, and kept the same way (a fan-out hub made by a restore is, after the
    next append moves it, read from these same rules: the first iptables -A SVC-k after an
    append to INPUT finds its runs, ~2 ms)."""
    if placed is not None:
        return _moved_runs(table, rules, chain)
    runs = classify.chain_runs(rules)
    if len(rules) >= RUNS_KEPT_FROM:
        classify.kept_for(table)[("runs", id(rules))] = (
            rules, tuple(rules), (_knobs(), classify.min_run()), list(map(_run_copy, runs)),
            chain)
    return runs


RUNS_KEPT_FROM = 256            # rules of a chain from which _chain_runs keeps its runs


# Instructions every entry emits alike, made once: an Insn is an immutable value, so one object
# may stand at many places of many programs (nothing tells instructions apart by identity but
# index_insns, whose counter keys are made per entry). A 20-rule chain's compile made ~500
# Insns, a quarter of them these (issue #7: one append's compile).
_COUNT_SHARED = (E.mov(R1, FP, comment="r1 = the frame holding S_KEY and S_LEN"),
                 E.call_local(COUNT_SUB, "ADD_COUNTER"))
_COUNT_LOOKUP = (E.ld_map_fd(R1, COUNTERS_MAP), E.mov(R2, FP), E.alu(E.ADD, R2, S_KEY),
                 E.call(E.BPF_FUNC_map_lookup_elem))
_COUNT_ADD = (E.ldx(E.DW, R1, R0, 0), E.alu(E.ADD, R1, 1), E.stx(E.DW, R0, 0, R1),
              E.ldx(E.DW, R1, R0, 8), E.ldx(E.DW, R2, FP, S_LEN), E.alu(E.ADD, R1, R2),
              E.stx(E.DW, R0, 8, R1))
_EXITS: dict = {}


def _verdict_exit(value: int, comment: str) -> tuple:
    """(r0 = value, exit), made once per (value, comment)."""
    got = _EXITS.get((value, comment))
    if got is None:
        got = _EXITS[(value, comment)] = (E.mov(R0, value, comment=comment), E.exit_())
    return got


def _hotdrop_exit(drop: int) -> tuple:
    return _verdict_exit(drop, "hotdrop")


class _ChainCompiler:
    """Emits one program for one built-in chain, inlining user chains."""

    MAX_DEPTH = 64          # deeper than any table the kernel accepts (it rejects loops)
    MAX_INSNS = 1_000_000   # BPF_COMPLEXITY_LIMIT_INSNS: larger programs cannot load anyway
    # A rule's first condition short-circuits to the next rule (_acc) only in a program's first
    # SHORT_CIRCUIT_MAX entries. The verifier walks the match path first and keeps the jump
    # target of every branch it has not taken on a stack (kernel/bpf/verifier.c push_stack);
    # the short-circuit's target, the next rule, stays there until the walk comes back from
    # the end of the chain, one state per rule, and the stack holds at most
    # BPF_COMPLEXITY_LIMIT_JMP_SEQ (8 192). Measured on 6.18: 10 000 rules of
    # `-i IFACE -s PREFIX -j DROP` (linear: no run takes interfaces) were refused after 17 s
    # ("The sequence of 8193 jumps is too complex", returned as EFAULT). Past the cap a rule's
    # conditions are ORed into one test, which leaves nothing behind.
    SHORT_CIRCUIT_MAX = 4096

    def __init__(self, table: Table, chain: Chain, facts: KernelFacts, flavor=None,
                 subprogs=frozenset()):
        self.table, self.chain, self.facts = table, chain, facts
        self.subprogs = frozenset(subprogs)   # user chains called, not inlined
        self.sub_labels = {}                   # (chain, start) -> label of its subprogram
        self.sub_queue = []                    # subprograms still to emit
        self.in_sub = False
        self.in_piece = False                  # emitting a piece of a linear stretch (stretch.py)
        self.fl = flavor if flavor is not None else flavors.get("nf")
        self.v6 = table.family == AF_INET6     # the IPv6 family layer is in family.py
        self.items: list = []
        self.n = 0
        self.rule_count = 0
        self.needs_ifnames = False
        self.needs_l4 = False
        self.needs_ip = False
        self.where = {}          # entry label -> "chain X rule N (entry offset O)"
        self.index_insns = []    # emitted Insns whose imm is an absolute entry index (counter keys)
        count = _entry_count(table)
        # large tables count through one subprogram (see COUNT_SUB)
        self.shared_count = count > SHARED_COUNT_ABOVE
        self._scan(chain, set())

    @property
    def next_offset(self) -> dict:
        """{offset: the next entry's offset} of the table (walked when a jump rule asks)."""
        nxt = self.__dict__.get("_next_offset")
        if nxt is None:
            nxt = self.__dict__["_next_offset"] = _next_offsets(self.table)[1]
        return nxt

    # ---- helpers ----
    def label(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def emit(self, *items):
        self.items.extend(items)
        if len(self.items) > self.MAX_INSNS:
            raise BpfilterError(errno.E2BIG, f"chain {self.chain.name}: the compiled program "
                                             f"exceeds {self.MAX_INSNS} instructions")

    def _scan(self, chain: Chain, seen: set):
        """What the prologue must parse: only what some reachable rule reads."""
        if chain.name in seen:
            return
        if not seen:
            walk = chain_walk(self.table, chain)
            if walk is not None:        # _program_key's walk read every chain it reaches
                ifn, l4, ip = walk[1]
                self.needs_ifnames |= ifn
                self.needs_l4 |= l4
                self.needs_ip |= ip
                return
        seen.add(chain.name)
        rules, pe = chain_body(chain)       # what the entries read: a moved chain's source's
        known = chain_info(self.table).get(id(chain))
        reads = _chain_reads(rules, pe, known[:2] if known is not None else None)
        jumpers = [rules[p] for p in known[2]] if known is not None else None
        if jumpers is None:
            vec = classify.vectors(rules)
            jumpers = list(compress(rules, vec.jump)) if vec is not None else \
                [r for r in rules if isinstance(r.target, Jump)]
        if pe is not None and isinstance(pe.target, Jump):
            jumpers.append(pe)
        ifn, l4, ip = reads
        self.needs_ifnames |= ifn
        self.needs_l4 |= l4
        self.needs_ip |= ip
        for r in jumpers:
            c = self._chains_by_name().get(r.target.chain)
            if c is not None:
                self._scan(c, seen)

    def _chains_by_name(self) -> dict:
        """{name: first chain of that name} (a scan over the chains per jump was quadratic at
        kube-proxy sizes: 3 333 jumps x 3 336 chains)."""
        by = getattr(self, "_by_name", None)
        if by is None:
            by = self._by_name = {}
            for c in self.table.chains:
                by.setdefault(c.name, c)
        return by

    # ---- program ----
    def compile(self) -> list:
        drop = "drop_early"
        # the flavor layer (flavors.py): ctx in r6, S_LEN, interface names where it knows them
        self.needs_ip = self.needs_ip or self.fl.needs_ip
        self.fl.prologue(self, drop)
        # the flavor keeps ctx in r6 and maybe the skb in r7: subprograms get them as arguments
        self.r7_live = any(isinstance(i, Insn) and i.dst == 7 and i.cls in (E.BPF_LDX, E.BPF_ALU64)
                           for i in self.items)
        if self.needs_ip or self.needs_l4:
            self._parse_ip(drop)
            self.fl.after_ip(self)
        if self.needs_l4:
            self._parse_l4()
        # the fail-closed exit sits right after the parser: a conditional jump reaches only
        # 32767 instructions, and the rules may be longer than that
        parsed = "parsed"
        self.emit(E.ja(parsed), Label(drop), E.mov(R0, self.fl.DROP), E.exit_(), Label(parsed))
        top = self.chain
        underflow = "underflow"
        self._chain_body(top, underflow, [top.name], f"{top.name}")
        self.emit(Label(underflow, f"policy of {top.name} (underflow)"))
        self._entry(top.policy_entry, top.name, len(top.rules) + 1, underflow, "policy",
                    [top.name], top.name)
        self._subprograms()
        if self.shared_count:
            self._count_subprogram()
        return self._global_functions(self.items)

    def _count_subprogram(self):
        """COUNT_SUB: ADD_COUNTER on the entry whose index is at r1 + S_KEY, skb->len at
        r1 + S_LEN (r1: the main frame, or the pointer a subprogram or global function holds)."""
        skip = self.label("nocount")
        self.emit(Label(COUNT_SUB, "subprogram: ADD_COUNTER(+1, skb->len) on entry *(r1 + S_KEY)"),
                  E.stx(E.DW, FP, -8, R1),
                  E.mov(R2, R1), E.alu(E.ADD, R2, S_KEY),
                  E.ld_map_fd(R1, COUNTERS_MAP), E.call(E.BPF_FUNC_map_lookup_elem),
                  E.jmp(E.JEQ, R0, 0, skip),
                  E.ldx(E.DW, R1, R0, 0), E.alu(E.ADD, R1, 1), E.stx(E.DW, R0, 0, R1),
                  E.ldx(E.DW, R2, FP, -8), E.ldx(E.DW, R2, R2, S_LEN),
                  E.ldx(E.DW, R1, R0, 8), E.alu(E.ADD, R1, R2), E.stx(E.DW, R0, 8, R1),
                  Label(skip), E.mov(R0, 0), E.exit_())

    def _global_functions(self, items: list) -> list:
        """The program pruned, then the global functions classify.py cut jump cases into, after
        everything else (each pruned from its own head already: a function kept from an earlier
        compile is not walked again). A call site passes a pointer to the slots
        [fp - FRAME_LO, fp - 16): the verifier wants every byte of memory passed to a global
        function initialized (btf_check_subprog_call -> check_mem_reg), so the program starts
        by zeroing what the prologue may not write."""
        funcs = getattr(self, "global_funcs", [])
        if not funcs:
            return E.prune(items)
        # each function's head stands in for it while the rest is pruned
        stubs = [x for body in funcs for x in (body[0], E.exit_())]
        main = E.prune(items + stubs)
        if main[len(main) - len(stubs):] != stubs:
            # a linear stretch's piece after a rule that always decides (an unconditional goto
            # or verdict) is never called: it goes with its call site (stretch.py)
            kept = {x.name for x in main if x.__class__ is Label}
            called = [k for k, body in enumerate(funcs) if body[0].name in kept]
            if any(not funcs[k][0].name.startswith(stretch.PIECE_STEM)
                   for k in set(range(len(funcs))) - set(called)):
                raise BpfilterError(errno.EINVAL, f"chain {self.chain.name}: a global function "
                                                  f"is never called")
            for name in ("global_funcs", "global_labels", "global_parts"):
                whole = getattr(self, name)
                whole[:] = [whole[k] for k in called]
            if not funcs:
                return E.prune(items)
            stubs = [x for body in funcs for x in (body[0], E.exit_())]
            main = E.prune(items + stubs)
        zero = [E.st(E.DW, FP, off, 0, "slots a global function reads: initialized"
                     if off == -classify.FRAME_LO else "")
                for off in range(-classify.FRAME_LO, S_DYNPTR, 8)]
        out = zero + main[:len(main) - len(stubs)] + [x for body in funcs for x in body]
        if len(out) > self.MAX_INSNS:
            raise BpfilterError(errno.E2BIG, f"chain {self.chain.name}: the compiled program "
                                             f"exceeds {self.MAX_INSNS} instructions")
        return out

    def _parse_ip(self, drop: str):
        """The IPv4 header fields every rule may test, read once into stack slots."""
        if self.v6:
            return family.parse_ipv6(self, drop, S_PROTO, S_FRAGOFF, S_THOFF)
        self.fl.open_packet(self, drop)
        self.emit(
            *self._slice(E.mov(R2, 0), 20),
            E.jmp(E.JEQ, R0, 0, drop, comment="shorter than an IPv4 header"),
            E.ldx(E.W, R1, R0, 12, "saddr"), E.stx(E.DW, FP, S_SADDR, R1),
            E.ldx(E.W, R1, R0, 16, "daddr"), E.stx(E.DW, FP, S_DADDR, R1),
            E.ldx(E.B, R1, R0, 9, "protocol"), E.stx(E.DW, FP, S_PROTO, R1),
            E.ldx(E.H, R1, R0, 6, "frag_off"), E.be16(R1), E.alu(E.AND, R1, IP_OFFSET),
            E.stx(E.DW, FP, S_FRAGOFF, R1),
            E.ldx(E.B, R1, R0, 0, "version/ihl"), E.alu(E.AND, R1, 0xf), E.alu(E.LSH, R1, 2),
            E.stx(E.DW, FP, S_THOFF, R1),
        )

    def _slice(self, set_offset: Insn, size: int) -> list:
        """r0 = pointer to `size` bytes at the network-header offset set_offset puts in r2, or
        0 when the packet is shorter (the flavor's primitive: dynptr slice, load-bytes helper)."""
        return self.fl.load_bytes(set_offset, size)

    def _parse_l4(self):
        """The first 20 (TCP) or 8 (UDP/ICMP) bytes at thoff, read once; S_L4LEN says how many
        were there, so each match can hotdrop exactly where skb_header_pointer would fail."""
        done, have8, common = "l4_done", "l4_try8", "l4_common"
        for slot in (S_L4LEN, S_SPORT, S_DPORT, S_TCPFLAGS, S_DOFF, S_ICMPTYPE, S_ICMPCODE):
            self.emit(E.st(E.DW, FP, slot, 0))
        self.emit(
            E.ldx(E.DW, R1, FP, S_FRAGOFF),
            E.jmp(E.JNE, R1, 0, done, comment="non-first fragment: no L4 header"),
            *self._slice(E.ldx(E.DW, R2, FP, S_THOFF), 20),
            E.jmp(E.JEQ, R0, 0, have8),
            E.st(E.DW, FP, S_L4LEN, 20, "a whole TCP header"),
            E.ldx(E.B, R1, R0, 12), E.alu(E.RSH, R1, 4), E.stx(E.DW, FP, S_DOFF, R1),
            E.ldx(E.B, R1, R0, 13), E.stx(E.DW, FP, S_TCPFLAGS, R1),
            E.ja(common),
            Label(have8),
            *self._slice(E.ldx(E.DW, R2, FP, S_THOFF), 8),
            E.jmp(E.JEQ, R0, 0, done),
            E.st(E.DW, FP, S_L4LEN, 8, "a UDP/ICMP header"),
            Label(common),
            E.ldx(E.H, R1, R0, 0), E.be16(R1), E.stx(E.DW, FP, S_SPORT, R1),
            E.ldx(E.H, R1, R0, 2), E.be16(R1), E.stx(E.DW, FP, S_DPORT, R1),
            E.ldx(E.B, R1, R0, 0), E.stx(E.DW, FP, S_ICMPTYPE, R1),
            E.ldx(E.B, R1, R0, 1), E.stx(E.DW, FP, S_ICMPCODE, R1),
            Label(done))

    # ---- chains and rules ----
    def _chain_body(self, chain: Chain, ret: str, path: list, where: str, start: int = 0):
        # a chain an append moved whole is read from its source's entries, not made (a fan-out
        # hub: 3 333 jumps), each at index + d_index, offset + d_offset here (model.chain_source):
        # the runs know it, and a rule no run holds is placed on its own (model.chain_entry)
        rules, pe, d_index, d_offset = chain_source(chain)
        placed = placement(chain)
        # runs of same-shape rules become one map lookup (classify.py, issue #7)
        # (a chain holding fewer rules than a run needs has none: 3 333 kube-proxy service
        # chains are not searched on every compile)
        runs = {r.start: r for r in _chain_runs(self.table, rules, chain.name, placed)
                if r.start >= start} if len(rules) - start >= classify.min_run() else {}
        if d_index or d_offset or placed is not None:
            for run in runs.values():
                run.d_index, run.d_offset, run.placement = d_index, d_offset, placed

        def entry_at(p: int) -> tuple:
            # (rule p, the offset of the entry after it: the chain's next rule or its
            # policy/RETURN entry, as a chain's entries are contiguous, without walking the table)
            after = rules[p + 1] if p + 1 < len(rules) else pe
            rule = rules[p] if not (d_index or d_offset) else chain_entry(chain, p)
            return rule, after.offset + d_offset if after is not None else None
        pos, starts = start, sorted(runs)
        while pos < len(rules):
            if pos in runs:
                classify.emit_run(self, runs[pos], chain.name, ret, where, path)
                pos = runs[pos].end
                continue
            later = bisect_right(starts, pos)
            end = starts[later] if later < len(starts) else len(rules)
            if stretch.wanted(self, end - pos):     # long linear code: global functions
                stretch.emit(self, chain, rules, pos, end, ret, path, where, entry_at)
                pos = end
                continue
            rule, next_off = entry_at(pos)
            self._entry(rule, chain.name, pos + 1, ret, "rule", path, where, next_off)
            pos += 1

    def _chain_return(self, chain: Chain, ret: str, path: list, where: str):
        """The RETURN entry of user chain `chain`, inlined after its body (path and where name
        the chain): read as _chain_body reads the rules, the chain not made."""
        rules, pe, d_index, d_offset = chain_source(chain)
        n = len(rules)
        if d_index or d_offset:
            pe = chain_entry(chain, n)
        self._entry(pe, chain.name, n + 1, ret, "return", path, where)

    def _entry(self, rule: Rule, chain: str, pos: int, ret: str, kind: str,
               path: list, where: str, next_off: int = None):
        """One entry: its conditions (failing → next entry: at offset next_off, when the
        caller knows it), counter, target."""
        if rule is None:
            raise BpfilterError(errno.EINVAL, f"chain {chain}: no policy/RETURN entry")
        self.rule_count += 1
        nxt = self.label("next")
        hot = self.label("hotdrop")
        desc = f"{where} {kind} {pos} (entry {rule.index})" if kind == "rule" else \
            f"{where} {kind} (entry {rule.index})"
        name = self.label("entry")
        self.where[name] = (f"chain {chain} rule {pos}" if kind == "rule" else
                            f"chain {chain} {'policy' if kind == 'policy' else 'RETURN'} entry") \
            + f" (entry offset {rule.offset})"
        self.emit(Label(name, desc))
        t = rule.target
        # Check the target first so an unsupported rule is reported before emitting anything.
        if isinstance(t, ExtTarget) and not targets.handles(t, self.fl.name):
            raise _unsupported(chain, pos, rule, targets.refusal(t, self.fl.name))
        if isinstance(t, Verdict) and t.verdict not in (-NF_ACCEPT - 1, -NF_DROP - 1, XT_RETURN):
            raise _unsupported(chain, pos, rule, f"verdict {t.name}")
        if not isinstance(t, (Verdict, Jump, ExtTarget)):
            raise _unsupported(chain, pos, rule, f"target {type(t).__name__}")
        if isinstance(t, Jump) and t.offset == (next_off if next_off is not None else
                                                self.next_offset.get(rule.offset)):
            # ipt_do_table: a verdict landing on the next entry pushes nothing and simply goes
            # on there (goto or not): count the rule, then continue with the next entry
            t = None
        fail = nxt
        if isinstance(t, Jump):
            fail = self.label("skip")    # the inlined body may be too long for a 16-bit offset
        self.acc_live, self.fail = False, fail
        # (a piece of a linear stretch is verified on its own: stretch.py)
        self.first_cond = self.rule_count <= self.SHORT_CIRCUIT_MAX or self.in_piece
        if self.v6:
            family.ip6_packet_match(self, rule, fail, S_PROTO)
        else:
            self._ip(rule, fail)
        for m in rule.matches:
            self._match(m, rule, chain, pos, fail, hot)
        if self.acc_live:
            last = self.items[-1]
            if last.__class__ is Insn and last.code == _MOV_X and last.dst == ACC:
                # the accumulator holds one condition's value: test that register instead
                self.items[-1] = E.jmp(E.JNE, last.src, 0, fail, comment="a later condition failed")
            else:
                self.emit(E.jmp(E.JNE, ACC, 0, fail, comment="a later condition failed"))
        self._count(rule.index)
        if t is None:
            self.emit(E.ja(nxt, "no target: continue"), *self._hotdrop_tail(hot, nxt))
            return
        if isinstance(t, ExtTarget):        # REJECT, LOG: targets.py (event for the responder)
            targets.emit(self, t, rule, nxt)
            self.emit(*self._hotdrop_tail(hot, nxt))
            return
        if isinstance(t, Verdict):
            if t.verdict == XT_RETURN:
                self.emit(E.ja(ret, "RETURN"))
            else:
                v = -t.verdict - 1
                self.emit(*_verdict_exit(self.fl.ACCEPT if v == NF_ACCEPT else self.fl.DROP,
                                         "ACCEPT" if v == NF_ACCEPT else "DROP"))
            self.emit(*self._hotdrop_tail(hot, nxt))
            return
        # jump / goto: inline the target chain from the landing entry on
        target, start = self._landing(t, chain, pos, rule)
        if target.name in path or len(path) >= self.MAX_DEPTH:
            raise BpfilterError(errno.ELOOP, f"chain {chain} rule {pos} (entry offset "
                                             f"{rule.offset}): loop through chain {t.chain}")
        goto = bool(rule.ip.flags & (family.IP6T_F_GOTO if self.v6 else IPT_F_GOTO)) or t.goto
        body = self.label("body")
        called = target.name in self.subprogs
        self.emit(E.ja(body), Label(fail), E.ja(nxt),
                  Label(hot), E.mov(R0, self.fl.DROP, comment="hotdrop"), E.exit_(),
                  Label(body, f"{'goto' if goto else 'jump'} {t.chain}"
                              + (" (subprogram)" if called else "")))
        inner_ret = ret if goto else nxt
        if called:
            self._call(target, start, inner_ret, goto)
            self.emit(Label(nxt))
            return
        inner_where = f"{where} > {t.chain}"
        self._chain_body(target, inner_ret, path + [target.name], inner_where, start)
        self._chain_return(target, inner_ret, path + [target.name], inner_where)
        self.emit(Label(nxt))

    # ---- subprograms ----
    def _call(self, target: Chain, start: int, on_return: str, goto: bool):
        """Call the subprogram of `target`; SUB_RETURN goes on at on_return, a verdict ends."""
        key = (target.name, start)
        if key not in self.sub_labels:
            self.sub_labels[key] = f"sub_{target.name}" + (f"_{start}" if start else "")
            self.sub_queue.append((target, start))
        self.emit(E.mov(R1, FP, comment="r1 = the main frame (packet fields, counters key)"),
                  E.mov(R2, R6, comment="r2 = ctx"),
                  E.mov(R3, R7, comment="r3 = ctx->skb") if self.r7_live else E.mov(R3, 0),
                  E.call_local(self.sub_labels[key], f"chain {target.name}"),
                  E.jmp(E.JEQ, R0, SUB_RETURN, on_return,
                        comment="RETURN: " + ("the goto's caller returns" if goto else
                                              "continue after the jump")))
        if self.in_sub:
            self.emit(E.exit_("a verdict: pass it up"))
            return
        # the main program returns constants only (check_return_code wants a known range)
        other = self.label("verdict")
        self.emit(E.jmp(E.JNE, R0, self.fl.ACCEPT, other), E.exit_("ACCEPT"),
                  Label(other), E.mov(R0, self.fl.DROP), E.exit_("DROP"))

    def _subprograms(self):
        """Emit each called chain once, after the main program (a subprogram starts where a
        call lands and must end in exit or ja: check_subprogs)."""
        if not self.sub_queue:
            return
        self.in_sub = True
        while self.sub_queue:
            target, start = self.sub_queue.pop(0)
            label = self.sub_labels[(target.name, start)]
            saved, self.items = self.items, []
            ret = self.label("sub_return")
            where = f"sub {target.name}"
            self._chain_body(target, ret, [target.name], where, start)
            self._chain_return(target, ret, [target.name], where)
            self.emit(Label(ret), E.mov(R0, SUB_RETURN), E.exit_("RETURN"))
            # one exit per subprogram: the verifier resumes the caller (prepare_func_exit) once
            # per state reaching an exit, and states meeting at one exit can be pruned there
            # (measured: 1-2% fewer processed insns on the big tables)
            out = self.label("sub_exit")
            body = [E.ja(out, it.comment) if isinstance(it, Insn) and it.is_exit else it
                    for it in _via_main_frame(self.items)] + [Label(out), E.exit_()]
            self.items = saved
            self.emit(Label(label, f"subprogram: chain {target.name}"
                                   + (f" from rule {start + 1}" if start else "")),
                      E.stx(E.DW, FP, S_SUB_MAIN, R1, "keep the main frame pointer"),
                      E.mov(R6, R2, comment="r6 = ctx"),
                      *([E.mov(R7, R3, comment="r7 = ctx->skb")] if self.r7_live else []),
                      # r8/r9 must be readable: rewritten stores save one of them
                      E.mov(E.R8, 0), E.mov(R9, 0),
                      *body)

    def _landing(self, t: Jump, chain: str, pos: int, rule: Rule):
        """The user chain a jump lands in and the index of the landing rule (iptables always
        lands on the first entry after the chain's ERROR head; other offsets are refused)."""
        chains = self.table.chains
        cp = getattr(t, "chain_pos", -1)
        if cp is not None and 0 <= cp < len(chains) and chains[cp].name == t.chain:
            target = chains[cp]
        else:
            target = self._chains_by_name().get(t.chain)   # as Table.chain: the first one
            if target is None:
                raise BpfilterError(errno.EINVAL, f"chain {chain} rule {pos} (entry offset "
                                                  f"{rule.offset}): jump to unknown chain "
                                                  f"{t.chain}")
        if target.builtin:
            raise _unsupported(chain, pos, rule, f"a jump into built-in chain {t.chain}")
        start = getattr(t, "entry", 0)
        # (the number of rules as the source's of a moved chain: not made for the check)
        if start is None or not 0 <= start <= len(chain_body(target)[0]):
            raise _unsupported(chain, pos, rule, f"a jump to offset {t.offset} (not a rule of "
                                                 f"chain {t.chain})")
        return target, start

    def _count(self, index: int):
        """ADD_COUNTER(*counter, skb->len, 1) on this CPU's slot of entry `index`. A piece of a
        linear stretch only stores the key: its caller counts (stretch._call)."""
        key = E.st(E.W, FP, S_KEY, index, f"count entry {index}")
        self.index_insns.append(key)
        self.emit(key)
        if not self.in_piece:
            self.count_key()

    def count_key(self):
        """ADD_COUNTER on the entry whose index S_KEY holds; a key past the map's end (a
        lookup that finds nothing) counts nothing."""
        if self.shared_count:
            self.emit(*_COUNT_SHARED)
            return
        skip = self.label("nocount")
        self.emit(*_COUNT_LOOKUP, E.jmp(E.JEQ, R0, 0, skip), *_COUNT_ADD, Label(skip))

    def _hotdrop_tail(self, hot: str, nxt: str) -> tuple:
        """An entry's end: its hotdrop exit (labelled `hot`), then the next entry's label."""
        return (Label(hot), *_hotdrop_exit(self.fl.DROP), Label(nxt))

    # ---- conditions ----
    # Every condition of a rule computes a 0/1 (or zero/non-zero) "mismatch" value that is ORed
    # into ACC; one branch at the end leaves for the next entry. The verifier explores the
    # fall-through (the short matched path ending in exit) first and pushes the branch target,
    # so one branch per rule keeps its pending-state stack flat; several failure branches per
    # rule would pile up pending states for the rest of the program and hit "The sequence of
    # 8193 jumps is too complex" (kernel/bpf/verifier.c push_stack) near 2000 rules.
    # Hotdrop checks are gated on ACC == 0 (everything before matched) and have the drop as the
    # fall-through for the same reason. The first condition of a rule is a branch of its own
    # (short-circuit for speed), so a rule leaves at most one pending state: about 8000 rules
    # per chain fit (measured: 6000 rules load).

    def _acc(self, reg=R1):
        if self.first_cond:
            # the rule's first condition short-circuits: most packets leave most rules here,
            # which keeps linear chains fast; this is the rule's one other pending state
            self.first_cond = False
            self.emit(E.jmp(E.JNE, E.Reg(reg), 0, self.fail))
            return
        if self.acc_live:
            self.emit(E.alu(E.OR, ACC, E.Reg(reg)))
        else:
            self.emit(E.mov(ACC, E.Reg(reg)))
            self.acc_live = True

    def _nz(self, reg=R1, invert: bool = False):
        """reg = (reg != 0), or (reg == 0) when invert: (v | -v) >> 63 is 1 exactly for v != 0."""
        self.emit(E.mov(R2, E.Reg(reg)), E.neg(R2), E.alu(E.OR, reg, R2), E.alu(E.RSH, reg, 63))
        if invert:
            self.emit(E.alu(E.XOR, reg, 1))

    def _hotdrop_if_zero(self, why: str):
        """Drop now when R1 == 0 and the rule matched so far (ACC == 0)."""
        ok = self.label("nohot")
        if self.acc_live:
            self.emit(E.alu(E.OR, R1, ACC))
        self.emit(E.jmp(E.JNE, R1, 0, ok), E.mov(R0, self.fl.DROP, comment=f"hotdrop: {why}"),
                  E.exit_(), Label(ok))

    def _load(self, slot: int, comment: str = "", mask: int = None):
        self.emit(E.ldx(E.DW, R1, FP, slot, comment))
        if mask is not None:
            self.emit(E.alu(E.AND, R1, E._s32(mask), bits=32))

    def _ip(self, rule: Rule, fail: str):
        """ip_packet_match(): addresses, interfaces, protocol, fragment flag."""
        ip = rule.ip
        inv = ip.invflags
        for slot, addr, msk, flag, what in ((S_SADDR, ip.src, ip.smsk, IPT_INV_SRCIP, "src"),
                                            (S_DADDR, ip.dst, ip.dmsk, IPT_INV_DSTIP, "dst")):
            a, m = _le32(addr), _le32(msk)
            if m == 0 and a == 0:
                if inv & flag:       # (x & 0) != 0 is false; inverted it is always true
                    self.emit(E.ja(fail, f"! {what} 0/0 never matches"))
                continue
            self._load(slot, f"{'! ' if inv & flag else ''}{what} {addr}/{msk}",
                       m if m != 0xffffffff else None)
            if self.first_cond and not inv & flag and m != 0xffffffff:
                # the rule's first condition leaves on its own branch (_acc): the masked
                # address compared as a 32-bit value, one instruction less than XOR and test.
                # Not an unmasked one: r1 would still be the slot's copy (the same id), and
                # the compare would make the slot a known value on the matched path, so the
                # later rules' tests on it are decided, their registers precise and no state
                # prunes (kernel/bpf/verifier.c sync_linked_regs): generated 2 000-rule
                # rulesets went past the verifier's limits (E2BIG)
                self.first_cond = False
                self.emit(E.jmp(E.JNE, R1, E._s32(a), fail, bits=32))
                continue
            self.emit(E.alu(E.XOR, R1, E._s32(a), bits=32))
            if inv & flag:
                self._nz(invert=True)
            self._acc()
        for slot, name, mask, flag, what in (
                (S_INNAME, ip.iniface, ip.iniface_mask, IPT_INV_VIA_IN, "in"),
                (S_OUTNAME, ip.outiface, ip.outiface_mask, IPT_INV_VIA_OUT, "out")):
            self._ifname(slot, name, mask, bool(inv & flag), what, fail)
        if ip.proto:
            self._load(S_PROTO, f"{'! ' if inv & IPT_INV_PROTO else ''}proto {ip.proto}")
            self.emit(E.alu(E.XOR, R1, ip.proto))
            if inv & IPT_INV_PROTO:
                self._nz(invert=True)
            self._acc()
        frag, finv = bool(ip.flags & IPT_F_FRAG), bool(inv & IPT_INV_FRAG)
        if frag or finv:
            if not frag:             # (0 && ..) ^ 1: never matches
                self.emit(E.ja(fail, "! fragment flag without -f never matches"))
            else:                    # -f: mismatch when fragoff == 0; ! -f: when != 0
                self._load(S_FRAGOFF, f"{'! ' if finv else ''}-f")
                if not finv:
                    self._nz(invert=True)
                self._acc()

    def _ifname(self, slot, name: bytes, mask: bytes, inv: bool, what: str, fail: str):
        """ifname_compare_aligned(): OR over the longs of (dev ^ name) & mask; != 0 = mismatch."""
        self._masked16(slot, name, mask, inv, fail,
                       f"{'! ' if inv else ''}{what}iface "
                       f"{name.rstrip(bytes(1)).decode('latin-1')}",
                       f"! {what}iface with empty mask never matches")

    def _masked16(self, slot: int, value: bytes, mask: bytes, inv: bool, fail: str, text: str,
                  empty_text: str):
        """A 16-byte stack field compared under a mask, as the kernel does it for interface names
        (ifname_compare_aligned) and IPv6 addresses (ipv6_masked_addr_cmp): OR over the two
        8-byte words of (field & mask) ^ (value & mask), != 0 = mismatch; into the accumulator.
        An all-zero mask always matches, so inverted it never does."""
        words = []
        for i in (0, 8):
            m = int.from_bytes(mask[i:i + 8], "little")
            if m:
                words.append((i, int.from_bytes(value[i:i + 8], "little") & m, m))
        if not words:
            if inv:
                self.emit(E.ja(fail, empty_text))
            return
        # one word (a name of up to 7 characters, a prefix of up to /64) is its own result; a
        # mask word of all ones needs no AND, and a value below 2^31 is an immediate (an ALU64
        # immediate is sign-extended): fewer instructions for the verifier and the JIT
        out = R1 if len(words) == 1 else R4
        for k, (i, want, m) in enumerate(words):
            self.emit(E.ldx(E.DW, R1, FP, slot + i, text if k == 0 else ""))
            if m != _ALL64:
                self.emit(*((E.alu(E.AND, R1, m),) if m < _IMM_MAX else
                            (E.ld_imm64(R2, m), E.alu(E.AND, R1, R2))))
            if want:
                self.emit(*((E.alu(E.XOR, R1, want),) if want < _IMM_MAX else
                            (E.ld_imm64(R3, want), E.alu(E.XOR, R1, R3))))
            if out == R4:
                self.emit(E.mov(R4, R1) if k == 0 else E.alu(E.OR, R4, R1))
        if inv:
            self._nz(out, invert=True)
        self._acc(out)

    # ---- matches ----
    def _match(self, m, rule: Rule, chain: str, pos: int, fail: str, hot: str):
        if matchers.handles(m):    # issue #6 extensions: BPF code in matchers.py
            return matchers.emit(self, m, rule, chain, pos, fail, hot)
        known = ("tcp", "udp", "icmp6") if self.v6 else ("tcp", "udp", "icmp")
        if m.name not in known or m.revision != 0:
            raise _unsupported(chain, pos, rule, f"match {m.name} (revision {m.revision})")
        if self.v6:
            family.check_l4_rule(rule, chain, pos, m)
            if m.name == "icmp6":
                return family.icmp6_match(self, m, fail, S_ICMPTYPE, S_ICMPCODE)
        d = _payload(m)
        if m.name == "tcp":
            self._tcp(d, fail, hot)
        elif m.name == "udp":
            self._udp(d, fail, hot)
        else:
            self._icmp(d, fail, hot)

    def _frag_and_header(self, need: int, name: str, hotdrop_off1: bool):
        """The start of tcp_mt/udp_mt/icmp_match: fragments never match (tcp hotdrops the one at
        offset 8 bytes: it could rewrite the flags), a header shorter than `need` hotdrops."""
        if hotdrop_off1:
            self._load(S_FRAGOFF, f"-m {name}: fragment at offset 1?")
            self.emit(E.alu(E.XOR, R1, 1))                        # 0 iff fragoff == 1
            self._hotdrop_if_zero("tcp fragment at offset 1")
        self._load(S_FRAGOFF, f"-m {name}: not a fragment")
        self._acc()
        self._load(S_L4LEN, f"-m {name}: {need}-byte header there?")
        self.emit(E.alu(E.SUB, R1, need), E.alu(E.RSH, R1, 63),  # 1 iff l4len < need
                  E.alu(E.XOR, R1, 1))                            # 0 iff truncated
        self._hotdrop_if_zero(f"truncated {name} header")

    def _ports(self, slot: int, lo: int, hi: int, inv: bool, what: str):
        """port_match(): mismatch = ((p < lo) | (p > hi)) ^ inv."""
        if not inv and lo == 0 and hi >= 0xffff:
            return
        self._load(slot, f"{'! ' if inv else ''}{what} {lo}:{hi}")
        if lo == hi:                   # one port: p ^ lo is the mismatch
            self.emit(E.alu(E.XOR, R1, lo))
            if inv:
                self._nz(invert=True)
        else:
            self._range_mismatch(lo, hi, 0xffff)
            if inv:
                self.emit(E.alu(E.XOR, R1, 1))
        self._acc()

    def _range_mismatch(self, lo: int, hi: int, top: int):
        """R1 (a value in 0..top) becomes 1 when outside lo..hi, else 0 (signed 64-bit
        differences of small values: the sign bit says which side)."""
        self.emit(E.mov(R3, 0))
        if lo > 0:
            self.emit(E.mov(R2, R1), E.alu(E.SUB, R2, lo), E.alu(E.RSH, R2, 63),
                      E.alu(E.OR, R3, R2))
        if hi < top:
            self.emit(E.mov(R2, hi), E.alu(E.SUB, R2, R1), E.alu(E.RSH, R2, 63),
                      E.alu(E.OR, R3, R2))
        self.emit(E.mov(R1, R3))

    def _tcp(self, d: dict, fail: str, hot: str):
        inv = d["invflags"]
        self._frag_and_header(20, "tcp", True)
        self._ports(S_SPORT, d["spts"][0], d["spts"][1], bool(inv & XT_TCP_INV_SRCPT), "sport")
        self._ports(S_DPORT, d["dpts"][0], d["dpts"][1], bool(inv & XT_TCP_INV_DSTPT), "dport")
        mask, cmp_, finv = d["flg_mask"], d["flg_cmp"], bool(inv & XT_TCP_INV_FLAGS)
        if mask or cmp_ or finv:
            self._load(S_TCPFLAGS, f"{'! ' if finv else ''}flags {mask:#x}/{cmp_:#x}", mask)
            self.emit(E.alu(E.XOR, R1, cmp_))
            if finv:
                self._nz(invert=True)
            self._acc()
        if d["option"]:
            if self.acc_live:         # the walk needs a helper call: leave now if not matching
                self.emit(E.jmp(E.JNE, ACC, 0, fail))
            self._tcp_option(d["option"], bool(inv & XT_TCP_INV_OPTION), fail, hot)
            self.acc_live = False     # ACC (r5) was clobbered by the call; nothing pending

    def _tcp_option(self, option: int, inv: bool, fail: str, hot: str):
        """tcp_find_option(): walk the options (kinds 0 and 1 are one byte, others carry their
        length, a zero length counts as 1). Unrolled over the 40 possible positions with static
        stack offsets: r9 holds the position of the next option kind, r8 the options length."""
        found, notfound, done = self.label("opt_found"), self.label("opt_none"), self.label("opt_done")
        yes, no = (fail, done) if inv else (done, fail)
        # doff is 4 bits as parsed, but a call of a global function before this rule (a
        # piece of a linear stretch, jump cases) passed the slots to it as writable memory,
        # and the verifier forgets what they held (check_mem_reg): the mask bounds the
        # options' length for bpf_dynptr_read again
        self.emit(E.ldx(E.DW, R8, FP, S_DOFF, f"{'! ' if inv else ''}--tcp-option {option}"),
                  E.alu(E.AND, R8, 0xf),
                  E.jmp(E.JLT, R8, 5, hot, comment="doff*4 < sizeof(struct tcphdr): hotdrop"),
                  E.alu(E.LSH, R8, 2), E.alu(E.SUB, R8, 20),
                  E.jmp(E.JEQ, R8, 0, notfound, comment="no options"))
        for off in range(0, 48, 8):
            self.emit(E.st(E.DW, FP, S_OPT + off, 0))
        self.emit(*self.fl.read_bytes(S_OPT, E.R8, [E.ldx(E.DW, R4, FP, S_THOFF),
                                                     E.alu(E.ADD, R4, 20)]),
                  E.jmp(E.JNE, R0, 0, hot, comment="options not all there: hotdrop"),
                  E.mov(R9, 0))
        for k in range(40):
            skip, long_ = self.label("opt_skip"), self.label("opt_long")
            nz = self.label("opt_len")
            self.emit(E.jmp(E.JNE, R9, k, skip),
                      E.jmp(E.JLE, R8, k, notfound),
                      E.ldx(E.B, R1, FP, S_OPT + k),
                      E.jmp(E.JEQ, R1, option, found),
                      E.jmp(E.JGT, R1, 1, long_),
                      E.mov(R9, k + 1), E.ja(skip),
                      Label(long_),
                      E.ldx(E.B, R1, FP, S_OPT + k + 1),
                      E.jmp(E.JNE, R1, 0, nz), E.mov(R1, 1),
                      Label(nz), E.mov(R9, E.R1), E.alu(E.ADD, R9, k),
                      Label(skip))
        self.emit(E.ja(notfound), Label(found), E.ja(yes), Label(notfound), E.ja(no),
                  Label(done))

    def _udp(self, d: dict, fail: str, hot: str):
        inv = d["invflags"]
        self._frag_and_header(8, "udp", False)
        self._ports(S_SPORT, d["spts"][0], d["spts"][1], bool(inv & XT_UDP_INV_SRCPT), "sport")
        self._ports(S_DPORT, d["dpts"][0], d["dpts"][1], bool(inv & XT_UDP_INV_DSTPT), "dport")

    def _icmp(self, d: dict, fail: str, hot: str):
        """icmp_type_code_match(): (type == 0xFF || (type == t && lo <= code <= hi)) ^ inv."""
        inv = bool(d["invflags"] & IPT_ICMP_INV)
        t, (lo, hi) = d["type"], d["code"]
        self._frag_and_header(8, "icmp", False)
        if t == 0xFF:
            if inv:
                self.emit(E.ja(fail, "! icmp any never matches"))
            return
        self._type_code(S_ICMPTYPE, S_ICMPCODE, t, lo, hi, inv, "icmp")

    def _type_code(self, s_type: int, s_code: int, t: int, lo: int, hi: int, inv: bool,
                   what: str):
        """(type == t && lo <= code <= hi) ^ inv, branch-free into the accumulator: the common
        part of icmp_type_code_match() (ip_tables.c) and icmp6_type_code_match() (ip6_tables.c)."""
        self._load(s_code, f"{'! ' if inv else ''}{what} {t} code {lo}:{hi}")
        self._range_mismatch(lo, hi, 0xff)
        self.emit(E.mov(R4, R1))
        self._load(s_type)
        self.emit(E.alu(E.XOR, R1, t))
        self._nz()
        self.emit(E.alu(E.OR, R1, R4))
        if inv:
            self.emit(E.alu(E.XOR, R1, 1))
        self._acc()


def _uses_defs(ins: Insn):
    """(registers read, registers written) by one instruction, for liveness."""
    cls, op, x = ins.cls, ins.code & 0xf0, ins.code & E.BPF_X
    if ins.is_lddw:
        return 0, 1 << ins.dst
    if cls in (E.BPF_ALU, E.BPF_ALU64):
        src = (1 << ins.src) if x and op not in (E.END, E.NEG) else 0
        return src | (0 if op == E.MOV else 1 << ins.dst), 1 << ins.dst
    if cls == E.BPF_LDX:
        return 1 << ins.src, 1 << ins.dst
    if cls == E.BPF_ST:
        return 1 << ins.dst, 0
    if cls == E.BPF_STX:
        if ins.code & 0xe0 == E.BPF_ATOMIC:      # cmpxchg/fetch ops read and write r0/src
            return (1 << ins.dst) | (1 << ins.src) | 1, (1 << ins.src) | 1
        return (1 << ins.dst) | (1 << ins.src), 0
    if ins.is_exit:
        return 1, 0
    if op == E.CALL:                              # arguments r1-r5; r0-r5 clobbered
        return 0b111110, 0b111111
    if ins.is_goto:
        return 0, 0
    if ins.is_jump:
        return (1 << ins.dst) | ((1 << ins.src) if x else 0), 0
    return 0x7ff, 0


def _dead_after(insns: list, where: dict, ud: list = None) -> list:
    """For each instruction, the registers whose value is not read again before being written
    (a backward liveness fixpoint over the subprogram's jumps; one pass when every jump goes
    forward, as in rule code, plus one to confirm otherwise). `ud`: _uses_defs of each insn."""
    n = len(insns)
    live_in = [0] * (n + 1)
    if ud is None:
        ud = [_uses_defs(i) for i in insns]
    succ, back = [], False
    for k, ins in enumerate(insns):
        code = ins.code
        op = code & 0xf0
        if code & 0x07 in (E.BPF_JMP, E.BPF_JMP32) and op not in (E.CALL, E.EXIT):
            j = where[ins.target]
            back = back or j <= k
            succ.append((j,) if op == E.JA else (k + 1, j))
        else:
            succ.append(() if code == (E.BPF_JMP | E.EXIT) else (k + 1,))
    live_out = [0] * n
    for _ in range(n + 2):                        # converges in a few passes; bounded anyway
        changed = False
        for k in range(n - 1, -1, -1):
            out = 0
            for j in succ[k]:
                out |= live_in[j]
            u, d = ud[k]
            new_in = u | (out & ~d)
            if new_in != live_in[k] or out != live_out[k]:
                live_in[k], live_out[k], changed = new_in, out, True
        if not changed or not back:
            break
    return [~x for x in live_out]


def _via_main_frame(items: list) -> list:
    """Rewrite a subprogram's r10-relative accesses (rule code addresses the packet fields as
    fp-offsets) to go through the main frame pointer kept at S_SUB_MAIN of its own frame.

    The pointer is loaded into a register that is dead there (its value is never read again
    before being overwritten) and reused by the next accesses of the same straight-line run
    while that register keeps it; every extra instruction is paid once per call site by the
    verifier. With no dead register, a store borrows r9/r8 and restores it."""
    insns, where, _ = E._insns_and_labels(items)
    ud = [_uses_defs(i) for i in insns]
    dead = _dead_after(insns, where, ud)
    out, k, held = [], -1, None          # held: the register holding the main frame pointer
    for it in items:
        if isinstance(it, Label):
            held = None                  # a join point: other paths did not load it
            out.append(it)
            continue
        k += 1
        uses, defs = ud[k]
        if FP not in (it.dst, it.src) or it.is_jump or it.is_exit:
            out.append(it)
            if held is not None and defs >> held & 1:
                held = None
            continue
        cls, c = it.cls, it.comment
        if cls == E.BPF_ALU64 and it.code == (E.BPF_ALU64 | E.MOV | E.BPF_X) and it.src == FP:
            out.append(E.mov(it.dst, E.Reg(held), comment=c) if held is not None else
                       E.ldx(E.DW, it.dst, FP, S_SUB_MAIN, c or "the main frame"))
            if held == it.dst:
                held = None
            continue
        is_ldx = cls == E.BPF_LDX and it.src == FP
        if not is_ldx and not (cls in (E.BPF_ST, E.BPF_STX) and it.dst == FP
                               and it.code & 0xe0 == E.BPF_MEM):
            raise BpfilterError(errno.EOPNOTSUPP, f"compile: cannot move {E.format_insn(it)!r} "
                                                  f"into a subprogram")
        base = held
        if base is None:
            busy = uses | defs
            free = [r for r in (9, 8, 4, 3, 2, 1, 0, 5) if dead[k] >> r & 1 and not busy >> r & 1]
            if free:
                base = free[0]
                out.append(E.ldx(E.DW, base, FP, S_SUB_MAIN, "r%d = the main frame" % base))
                held = base
            elif is_ldx:                 # the destination is overwritten anyway
                out += [E.ldx(E.DW, it.dst, FP, S_SUB_MAIN, c), Insn(it.code, it.dst, it.dst,
                                                                       it.off)]
                continue
            else:
                tmp = E.R8 if cls == E.BPF_STX and it.src == 9 else R9
                out += [E.stx(E.DW, FP, S_SUB_SPILL, tmp, c), E.ldx(E.DW, tmp, FP, S_SUB_MAIN),
                        Insn(it.code, tmp, it.src, it.off, it.imm),
                        E.ldx(E.DW, tmp, FP, S_SUB_SPILL)]
                continue
        if is_ldx:
            out.append(Insn(it.code, it.dst, base, it.off, comment=c))
            if it.dst == base:
                held = None
        else:
            out.append(Insn(it.code, base, it.src, it.off, it.imm, comment=c))
    return out


# One compile_table's walk of the table's entries, shared by its chains (10 000 entries walked
# once instead of once per chain and once per jump-site count): {id(table): [table, entry count,
# {offset: the next entry's offset}, {chain name: chain}, chain_info's dict, {id(chain): its
# index}, chain facts still to put in chain_info's dict (_defer_chain_facts), {id(chain): its
# policy entry's index} (policy_indexes_walked)]}, each part made
# when first asked (a program taken from _PROG_CACHE needs no walk), dropped when compile_table
# returns (callers edit tables).
_WALKS: dict = {}


def _walk_of(table: Table):
    """table's _WALKS entry in the compile_table running, or None (outside one, or a table the
    compile did not start with)."""
    hit = _WALKS.get(id(table))
    return hit if hit is not None and hit[0] is table else None


def _next_offsets(table: Table) -> tuple:
    """(number of entries, {offset: offset of the entry after it}): a standard target whose
    verdict is the next entry's offset is how iptables writes a rule without -j (libiptc's
    fall-through jump)."""
    hit = _walk_of(table)
    if hit is not None and hit[2] is not None:
        return hit[1], hit[2]
    entries = table.entries()
    out = len(entries), {a.offset: b.offset for a, b in zip(entries, entries[1:])}
    if hit is not None and hit[0] is table:
        hit[1], hit[2] = out
    return out


def _chain_reads(rules: list, pe, fk, missed: bool = False) -> tuple:
    """What _scan ORs of a chain's entries' _reads (the rules and the policy/RETURN entry),
    memoized on their bytes (fk: (rules' cache_keys, the policy entry's), or None). `missed`:
    as _chain_facts's."""
    reads = _SCAN_FACTS.get(fk) if fk is not None and not missed else None
    if reads is not None:
        return reads
    vec = classify.vectors(rules)
    if vec is not None:             # a long chain: its lists (classify.vectors)
        rs = classify.column_set(rules, vec, "scan", _reads)
    else:
        # a function of the rule's own bytes: memoized on them (classify._memo, issue #7)
        rs = [classify._memo("scan", r, _reads) for r in rules]
    if pe is not None:
        rs = list(rs) + [classify._memo("scan", pe, _reads)]
    reads = tuple(map(any, zip(*rs))) or (False, False, False)
    if fk is not None:
        if len(_SCAN_FACTS) >= CHAIN_FACTS_MAX:
            _SCAN_FACTS.clear()
        _SCAN_FACTS[fk] = reads
    return reads


def _jumping(table: Table, chain: Chain) -> list:
    """The rules of `chain` that jump into a chain: not libiptc's fall-through to the next entry,
    which _entry treats as "no target". The entry after a rule is the next rule or the policy
    entry (a table walk only for a chain without one)."""
    rules, pe = chain.rules, chain.policy_entry
    known = chain_info(table).get(id(chain))
    if known is not None:
        where = known[2]
    else:
        vec = classify.vectors(rules)
        where = compress(range(len(rules)), vec.jump) if vec is not None else \
            (p for p, r in enumerate(rules) if isinstance(r.target, Jump))
    out = []
    for p in where:
        r = rules[p]
        if p + 1 < len(rules):
            nxt = rules[p + 1].offset
        elif pe is not None:
            nxt = pe.offset
        else:
            nxt = _next_offsets(table)[1].get(r.offset)
        if r.target.offset != nxt:
            out.append(r)
    return out


def _jump_sites(table: Table, top: Chain) -> dict:
    """How many jump/goto rules reachable from `top` target each user chain."""
    walk = chain_walk(table, top)
    if walk is not None:                # _program_key counted them on its walk
        return dict(walk[0])
    by_name = {c.name: c for c in table.chains}
    sites, seen, todo = {}, {top.name}, [top]
    while todo:
        for r in _jumping(table, todo.pop()):
            if r.target.chain in by_name:
                name = r.target.chain
                sites[name] = sites.get(name, 0) + 1
                if name not in seen:
                    seen.add(name)
                    todo.append(by_name[name])
    return sites


def _nesting(table: Table, top: Chain, subs: frozenset) -> dict:
    """The deepest subprogram nesting at which each subprogram chain runs (1 = called by the
    main program)."""
    deepest = {}
    _nest(table, {c.name: c for c in table.chains}, subs, deepest, set(), top, 0, (top.name,))
    return deepest


def _nest(table, by_name: dict, subs, deepest: dict, seen: set, chain: Chain, depth: int,
          path: tuple):
    """_nesting's walk from `chain` (a module-level recursion, as classify._halving, so that
    no closure cycle keeps the table alive until a GC pass)."""
    if (chain.name, depth) in seen:
        return
    seen.add((chain.name, depth))
    for r in _jumping(table, chain):
        t = r.target
        if t.chain not in by_name or by_name[t.chain].builtin:
            continue                  # the compiler reports these, naming the rule
        if t.chain in path:
            raise BpfilterError(errno.ELOOP, f"chain {chain.name}: loop through chain "
                                             f"{t.chain}")
        d = depth + (t.chain in subs)
        if t.chain in subs:
            deepest[t.chain] = max(deepest.get(t.chain, 0), d)
        _nest(table, by_name, subs, deepest, seen, by_name[t.chain], d, path + (t.chain,))


def _main_stack(items: list, subprogram_labels) -> int:
    """Bytes of stack the main program uses (deepest fp offset it touches or points at)."""
    depth, prev = 0, None
    for it in items:
        if isinstance(it, Label):
            if it.name in subprogram_labels:
                break
            continue
        if it.cls in (E.BPF_LDX,) and it.src == FP or it.cls in (E.BPF_ST, E.BPF_STX) \
                and it.dst == FP:
            depth = max(depth, -it.off)
        elif prev is not None and it.code == (E.BPF_ALU64 | E.ADD | E.BPF_K) \
                and prev.code == (E.BPF_ALU64 | E.MOV | E.BPF_X) and prev.src == FP \
                and it.dst == prev.dst:
            depth = max(depth, -it.imm)
        prev = it
    return depth


def _compile_chain(table: Table, chain: Chain, facts: KernelFacts, fl, subprog_above: int,
                   subprogs) -> "_ChainCompiler":
    """Inline every user chain (exact, the default) unless the program would have between
    `subprog_above` and SUBPROG_UPTO instructions; then call the chains reached from more than
    one site (or the chains named in `subprogs`) as subprograms, within the verifier's call
    depth and stack limits."""
    sites = _jump_sites(table, chain)
    if subprogs is None:
        # (a fan-out's 3 334 chains are each reached once: max() answers without a Python loop)
        subs = frozenset(n for n, k in sites.items() if k > 1) \
            if max(sites.values(), default=0) > 1 else frozenset()
        if not subs:
            return _compile_ready(table, chain, facts, fl)
        try:
            cc = _compile_ready(table, chain, facts, fl)
            size = sum(it.slots for it in cc.items if isinstance(it, Insn))
            if size <= subprog_above or size > SUBPROG_UPTO:
                return cc
        except BpfilterError as e:      # past MAX_INSNS inlined: subprograms are the only way
            if e.errno != errno.E2BIG:
                raise
    else:
        subs = frozenset(subprogs) & frozenset(sites)
    # counting through COUNT_SUB (large tables) is one more frame under the deepest subprogram
    counting = 1 if _entry_count(table) > SHARED_COUNT_ABOVE else 0
    frames = MAX_CALL_FRAMES - 1 - counting
    while True:
        deepest = _nesting(table, chain, subs)
        too_deep = {n for n, d in deepest.items() if d > frames}
        if too_deep:            # inline the deepest ones: their copies stay bounded
            subs -= too_deep
            continue
        cc = _compile_ready(table, chain, facts, fl, subs)
        main = (_main_stack(cc.items, set(cc.sub_labels.values())) + 31) // 32 * 32
        fit = min(MAX_CALL_FRAMES - 1 - counting,
                  (MAX_BPF_STACK - main) // SUB_FRAME - counting)
        if fit >= max(deepest.values(), default=0):
            return cc
        frames = fit
        if fit < 1:
            raise BpfilterError(errno.E2BIG, f"chain {chain.name}: the main program uses {main} "
                                             f"bytes of stack, no room for subprogram frames")


def _compile_ready(table, chain, facts, fl, subs=frozenset()) -> "_ChainCompiler":
    cc = _ChainCompiler(table, chain, facts, fl, subprogs=subs)
    cc.items = cc.compile()
    return cc


def _entry_count(table: Table) -> int:
    if hasattr(table, "entries"):
        hit = _walk_of(table)
        if hit is not None:
            if hit[1] is None:
                hit[1] = _entries_in(table)
            return hit[1]
        return _entries_in(table)
    idx = [-1]
    for c in table.chains:
        for r in c.rules + [c.policy_entry, c.head_entry]:
            if r is not None:
                idx.append(r.index)
    if table.tail_entry is not None:
        idx.append(table.tail_entry.index)
    return max(idx) + 1


def _entries_in(table: Table) -> int:
    """len(table.entries()) without building the list; a decode_replace table (source_blob:
    never edited) has it already (model.decode_replace, engine._entry_count)."""
    if getattr(table, "source_blob", None) is not None:
        n = table.__dict__.get("_entry_count")
        if n is not None:
            return n
    return sum(len(c.rules) + len(c.trailer) + (c.head_entry is not None)
               + (c.policy_entry is not None) for c in table.chains) \
        + (table.tail_entry is not None)


def compile_table(table: Table, facts: KernelFacts, flavor: str = "nf",
                  subprog_above: int = SUBPROG_ABOVE, subprogs=None) -> CompiledTable:
    """Compile every built-in chain of `table` for `flavor`. Raises BpfilterError naming the rule
    when something cannot be translated. User chains are inlined unless the program would pass
    `subprog_above` items (0 forces subprograms for chains reached from several sites);
    `subprogs` (a set of chain names) forces exactly those chains to be subprograms."""
    fl = flavors.get(flavor) if isinstance(flavor, str) else flavor
    if table.family not in (AF_INET, AF_INET6):
        raise BpfilterError(errno.EOPNOTSUPP, f"family {table.family} is not supported by the "
                                              f"compiler")
    if hasattr(table, "entries"):
        _WALKS[id(table)] = [table, None, None, None, {}, None, [], {}, {}]
    scope, early = classify._VEC_SCOPE, classify._EARLY_RUNS
    classify._VEC_SCOPE = {}
    # an engine install's compile: a new chain's tries made as soon as its runs are known
    classify._EARLY_RUNS = {} if classify.SPEC_MADE is not None else None
    try:
        out = CompiledTable(counters_entries=max(1, _entry_count(table)))
        _compile_chains(table, facts, fl, subprog_above, subprogs, out)
    finally:
        _WALKS.pop(id(table), None)
        classify._VEC_SCOPE, classify._EARLY_RUNS = scope, early
    return out


def _compile_chains(table: Table, facts: KernelFacts, fl, subprog_above: int, subprogs,
                    out: CompiledTable):
    knobs = _knobs()
    chains = table.chains
    # the built-in chains: Chain.hook read by C-level maps, not Chain.builtin (a property call
    # per chain was ~0.35 ms of a fan-out append's 3 337 chains) nor a Python loop over them
    for chain in compress(chains, map(is_not, map(_HOOK, chains), repeat(None))):
        if chain.policy_entry is None:
            raise BpfilterError(errno.EINVAL, f"chain {chain.name}: no underflow entry")
        fl.check_chain(chain)           # refuses, naming the chain, what the flavor cannot serve
        if not fl.serves(chain):
            continue                    # empty ACCEPT chain at a hook the flavor has not
        # a table whose chains moved (an append ahead of them): the previous table's walk of
        # this chain, moved, when it reached no changed entry; else (or when no program is
        # kept for it) the walk
        key, bases = _moved_program_key(table, chain, facts, fl, subprog_above, subprogs,
                                        knobs)
        kept = _kept_program(key, bases)
        if kept is None:
            key, bases = _program_key(table, chain, facts, fl, subprog_above, subprogs, knobs)
            kept = _kept_program(key, bases)
        if kept is not None:
            out.programs.append(kept)
            classify.carry_bodies(table, key[-1])
            continue
        cc = _compile_chain(table, chain, facts, fl, subprog_above, subprogs)
        items = cc.items
        cp = CompiledProgram(chain.name, chain.hook, items, len(chain.rules),
                             where=cc.where, facts=facts,
                             prog_type=fl.prog_type,
                             expected_attach_type=fl.expected_attach_type,
                             license=fl.license, flavor=fl.name,
                             maps=list(getattr(cc, "cls_maps", {}).values()),
                             global_labels=frozenset(getattr(cc, "global_labels", ())),
                             fn_parts=tuple(getattr(cc, "global_parts", ())))
        _keep_program(key, bases, cc, cp)
        out.programs.append(cp)


# ---- whole programs kept across compiles (issue #7: one append on a 10 000-rule table) ---------
# A built-in chain's program is a function of the entries it reaches (its own and those of the
# user chains it jumps to, transitively) and of the compile's context, except for absolute entry
# indices (counter keys) and byte offsets (`where` texts, listing comments). An append to INPUT
# moves every entry of FORWARD and its 3 333 service chains by one, nothing else about them.
# So each program is kept with what it was made from:
#   key    the chain's name, the context (flavor, KernelFacts, subprogram choice, family, shared
#          counting, the classifier's knobs and BPFILTER_* environment) and, for each chain
#          reached (in the order the walk meets them), its entries' cache_keys (model.py: the
#          entry's bytes without comefrom, counters and jump offsets) and each jump's landing
#          (which of the walked chains, which rule, goto, or libiptc's fall-through);
#   bases  (index, offset) of each walked chain's first body entry: a chain's entries are
#          contiguous and keep their order, so "every base moved by the same (d_index, d_offset)"
#          means every entry the program names moved by exactly that.
# A later table with the same key and uniformly moved bases gets the kept program with every
# instruction whose imm is an entry index moved by d_index (_ChainCompiler.index_insns: the
# counter keys of _count and the runs' "+ first entry" adds; the global functions' keys through
# their templates' relocs) and `where` offsets by d_offset. Only programs whose rules are
# verdicts and jumps with tcp/udp/icmp/comment matches are kept (targets.py's events and the
# limit match put entry indices elsewhere), and none with static subprograms (their stores are
# rewritten by _via_main_frame). Label comments and `count entry N` comments of a kept program
# are those of the compile that made it (CompiledProgram.listing says so); a kept classified
# run's maps are the same MapSpec objects, so the engine keeps their maps too. The kept
# program is what a compile made for an equal table, not necessarily what a compile would
# make now: classify._SEEN_RUNS may cut an appended run differently after other compiles
# (both are exact).
# The walk that makes the key costs per chain reached (3 336 for a fan-out). When decode_replace
# found the table to be the previous one with plain rules changed in one place (model.moved_from:
# an append ahead of the fan-out), the previous walk is taken, moved, for every built-in chain
# whose walk reached no changed entry (_moved_program_key), and a built-in chain that holds the
# change itself is walked alone, the chains behind it taken from the previous walk
# (_walk_behind, _splice_behind); so is one whose walk reached the change in a leaf chain (no
# jump: iptables -A SVC-3000 of a fan-out), that chain's record read anew (_changed_leaf,
# _leaf_anew). _WALK_RECORDS keeps each walk for the next table.
PROG_CACHE_MAX = 64
_PROG_CACHE: dict = {}          # key -> (bases, CompiledProgram, slots of its index insns)
_CHAIN_FACTS: dict = {}         # (entries' cache_keys, policy's) -> positions of jumps, or None
_SCAN_FACTS: dict = {}          # (entries' cache_keys, policy's) -> what _scan ORs of their _reads
CHAIN_FACTS_MAX = 1 << 16


def sweep_caches(live: set, programs: set) -> None:
    """Keep only what the installed programs use (engine._sweep_caches, after an install's
    reply, with classify.sweep_caches): `programs` the ids of their _PROG_CACHE copies, `live`
    their entries' cache keys (model.live_keys). A chain's facts hold its 10 000 keys; they
    and the kept programs of replaced tables stayed until the count bound (65 536 and 64)."""
    for k in [k for k, v in _PROG_CACHE.items() if id(v[1]) not in programs]:
        del _PROG_CACHE[k]
    sup = live.issuperset
    for facts in (_CHAIN_FACTS, _SCAN_FACTS):
        for k in [k for k in facts if k[1] not in live or not sup(k[0])]:
            del facts[k]


def kept_copy(cp):
    """The _PROG_CACHE copy an installed program is (or was moved from), or None."""
    kept = cp.__dict__.get("_kept")
    return kept[0] if kept is not None else cp.__dict__.get("_kept_copy")
# walks_moved: keys made by _moved_program_key; walks_spliced: walks _splice_behind ended;
# walks_leaf: those of them with a changed leaf chain made anew (_changed_leaf)
PROG_STATS = {"made": 0, "reused": 0, "walks_moved": 0, "walks_spliced": 0, "walks_leaf": 0}
_KEPT_MATCHES = frozenset({"tcp", "udp", "icmp", "icmp6", "comment"})
_CLASSIFY_KNOBS = ("GLOBAL_ABOVE", "GLOBAL_GROUPS", "GLOBAL_GROUP_SLOTS", "GROUP_SLOTS",
                   "MULTI_FORM", "MULTI_NS_BASE", "MULTI_NS_PER_WORD", "SPLIT_MAX_SHAPES",
                   "LINEAR_NS", "MAX_KEYS", "TAIL_MAX", "CUT_EVERY", "MAX_PORTS_PER_RULE",
                   "SHARED_PER_BODY", "SHARED_DEPTH")


def _knobs() -> tuple:
    """What the code depends on besides the entries: module settings tests change, the
    environment switches, this module's thresholds."""
    ks = tuple(repr(getattr(classify, k, None)) for k in _CLASSIFY_KNOBS)
    env = tuple(sorted((k, os.environ[k]) for k in _bpfilter_names()))
    return ks + (repr(classify.LOOKUP_NS), repr(classify.SPLIT_NS), SHARED_COUNT_ABOVE,
                 SUBPROG_UPTO, MAX_CALL_FRAMES, MAX_BPF_STACK, E.GOTO_SHORT,
                 _ChainCompiler.SHORT_CIRCUIT_MAX, stretch.STRETCH_MIN, stretch.PIECE_RULES) + env


def _bpfilter_names() -> list:
    """The names of the BPFILTER_* environment variables. Only the names are read on the way:
    os.environ.items() decodes every variable's value too, through the Mapping machinery
    (~0.1 ms a call, two calls a compile)."""
    return [k for k in os.environ if k.startswith("BPFILTER_")]


def _flavor_key(fl):
    """The flavor as a key: its class and the settings an instance carries (engine._restricted
    adds skip_served; its check_chain/serves wrappers do not change code), or None."""
    if flavors.FLAVORS.get(getattr(fl, "name", None)) is not type(fl):
        return None
    extra = []
    for k, v in sorted(fl.__dict__.items()):
        if k in ("check_chain", "serves"):
            continue
        try:
            hash(v)
        except TypeError:
            return None
        extra.append((k, v))
    return (type(fl).__name__,) + tuple(extra)


def _rule_kept_ok(r) -> bool:
    """(Asked once per template of a long chain, classify.TEMPLATE_KINDS: it reads no address,
    port or comment.)"""
    t = r.target
    return isinstance(t, (Verdict, Jump)) and \
        all(m.name in _KEPT_MATCHES for m in r.matches)


def _chain_facts(rules: list, pe: Rule, keys: tuple, missed: bool = False):
    """Positions of the chain's jump rules, or None when the chain's program cannot be kept:
    memoized on the entries' bytes (a jump's bytes say it is one; where it lands is not in
    them and is read from the table each time). `missed`: the caller found no memo for them
    just now (the key is a tuple of every rule's cache_key, whose hash is not kept: each
    lookup hashes them all again; this one and _chain_reads' skipped, a 10 000-rule
    blocklist append went from 39.9 to 38.3 M instructions)."""
    k = (keys, pe.cache_key)
    hit = False if missed else _CHAIN_FACTS.get(k, False)
    if hit is not False:
        return hit
    vec = classify.vectors(rules)
    if vec is not None:                 # a long chain: its lists (classify.vectors)
        ok = all(classify.column_set(rules, vec, "kept", _rule_kept_ok)) and _rule_kept_ok(pe)
        out = tuple(compress(range(len(rules)), vec.jump)) if ok else None
    else:
        ok = all(_rule_kept_ok(r) for r in rules) and _rule_kept_ok(pe)
        out = tuple(p for p, r in enumerate(rules) if isinstance(r.target, Jump)) if ok else None
    if len(_CHAIN_FACTS) >= CHAIN_FACTS_MAX:
        _CHAIN_FACTS.clear()
    _CHAIN_FACTS[k] = out
    return out


_CACHE_KEY = attrgetter("cache_key")
_TARGET, _OFFSET, _CHAIN_POS, _NAME, _CHAIN, _ENTRY, _GOTO = map(attrgetter, (
    "target", "offset", "chain_pos", "name", "chain", "entry", "goto"))
PLAIN_LANDS_FROM = 16           # jump rules of a chain from which _plain_lands reads them


def _plain_lands(rules: list, jumps: tuple, pe: Rule, chains: list, by_name: dict, seen: dict,
                 order: list, sites: dict, landed: dict = None):
    """_program_key's landing records of the jump rules at `jumps` read column by column (C
    loops: map, attrgetter; a fan-out chain's thousands of jumps), the walk's seen/order/sites
    updated as its loop does, when every jump is plain: not libiptc's fall-through, its
    chain_pos naming the first chain of its name. Else None, nothing updated (the loop).
    The columns read are put in `landed` (lands_walked's) for classify's jump cases, which
    read the same jumps (classify._landed_columns)."""
    last = len(rules) - 1
    rs = [rules[p] for p in jumps]
    try:
        ts = list(map(_TARGET, rs))
        cps = list(map(_CHAIN_POS, ts))
        entries = list(map(_ENTRY, ts))
        gotos = list(map(bool, map(_GOTO, ts)))
        if any(map(eq, map(_OFFSET, ts), [rules[p + 1].offset if p < last else pe.offset
                                          for p in jumps])):
            return None
    except AttributeError:
        return None
    if None in cps or min(cps) < 0 or max(cps) >= len(chains):
        return None
    tgts = [chains[cp] for cp in cps]
    names = list(map(_CHAIN, ts))
    if list(map(_NAME, tgts)) != names or any(map(is_not, map(by_name.get, names), tgts)):
        return None
    ids = list(map(id, tgts))
    _add_new(seen, order, dict(zip(ids, tgts)))     # in the order of their first jump
    _add_counts(sites, Counter(names))
    if landed is not None:
        landed[id(rs[0])] = (rs, ts, cps, entries, tgts, ids, names)
    return list(zip(jumps, map(seen.__getitem__, ids), entries, gotos))


def _add_new(seen: dict, order: list, found: dict) -> None:
    """The walk's loop `if i not in seen: seen[i] = len(order); order.append(chain)` over
    found ({id: chain}, in order) as C loops: a fan-out hub's 3 333 new chains, ~0.6 ms one at
    a time."""
    if not seen.keys().isdisjoint(found):
        found = {i: c for i, c in found.items() if i not in seen}
    seen.update(zip(found, range(len(order), len(order) + len(found))))
    order.extend(found.values())


def _add_counts(sites: dict, counts: dict) -> None:
    """sites[name] += n for each of counts' (name: n), missing names counted from 0, as C
    loops where the names are new (a fan-out hub's 3 333 chain names)."""
    if not sites.keys().isdisjoint(counts):
        counts = {name: sites.get(name, 0) + n for name, n in counts.items()}
    sites.update(counts)


LEAVES_FROM = 16                # chains left to walk from which _walk_leaves tries them at once
_HOOK = attrgetter("hook")


def _each_content(fks: list) -> dict:
    """{chain content (keys, policy key): the index of its last chain in fks}."""
    return dict(zip(fks, range(len(fks))))


def _walk_leaves(cs: list, info: dict, recs: list, bases: list, spans: list, reads: list,
                 facts_of, scan_of, vec_min: int, policy_at: dict = None) -> bool:
    """_program_key's loop over the chains `cs` column by column (a fan-out's thousands of
    service chains) when none of them jumps (so the walk reaches no other chain) and each has
    its keys and fewer than vec_min rules: their records, bases, spans, reads and chain_info
    added as the loop adds them; True. Else nothing added, False (the loop walks them).
    Each chain is read through model.chain_outline (its keys and entry positions) and each
    content once through model.chain_body: neither makes a _MovedChain's entries (an append
    ahead of a fan-out moves its 3 333 leaves, ~11 us each to make; they are walked when the
    previous walk cannot be taken, _moved_program_key: no kept program for its key).
    `policy_at` (policy_indexes_walked's dict, or None): each chain's policy entry index put in."""
    try:
        keys, pks, heads, fis, fos, pis = zip(*map(chain_outline, cs))
    except AttributeError:
        return False
    if max(map(len, keys)) >= vec_min:
        return False
    if None in pks or any(None in k for k in keys):
        return False
    fks = list(zip(keys, pks))
    # each content once, at its last chain (chains of one content answer the same: the facts
    # and reads are memoized on it), then every chain's answer in one C loop
    last = _each_content(fks)
    for fk, k in last.items():
        if facts_of(fk, False) is False:
            _chain_facts(*chain_body(cs[k]), keys[k])
    jumps = list(map(facts_of, fks, repeat(False)))
    for k in list(compress(range(len(jumps)), map(is_, jumps, repeat(False)))):
        jumps[k] = _chain_facts(*chain_body(cs[k]), keys[k])  # dropped by a full memo meanwhile
    if None in jumps or any(jumps):
        return False
    for fk, k in last.items():
        rd = scan_of(fk) or _chain_reads(*chain_body(cs[k]), fk)
        if True in rd:
            reads[0] |= rd[0]
            reads[1] |= rd[1]
            reads[2] |= rd[2]
    ids = list(map(id, cs))
    info.update(zip(ids, zip(keys, pks, jumps)))
    if policy_at is not None:           # (for classify's case chains: _walked_bodies)
        policy_at.update(zip(ids, pis))
    recs.extend(zip(map(_NAME, cs), map(_HOOK, cs), keys, pks))
    bases.extend(zip(fis, fos))
    spans.extend(zip([f if h is None else h for h, f in zip(heads, fis)],
                     [p + 1 for p in pis]))
    return True


def _program_key(table: Table, top: Chain, facts, fl, subprog_above, subprogs,
                 knobs: tuple) -> tuple:
    """(key, bases) of the program of built-in chain `top` (see above), or (None, None) when
    it is not to be kept."""
    if os.environ.get("BPFILTER_PROG_CACHE", "1") == "0" or not hasattr(table, "entries"):
        return None, None
    flk = _flavor_key(fl)
    if flk is None:
        return None, None
    chains = table.chains
    nchains = len(chains)
    by_name = _FirstByName(table)
    info = chain_info(table)
    order, seen, recs, bases, spans = [top], {id(top): 0}, [], [], []
    facts_of, vec_min, scan_of = _CHAIN_FACTS.get, classify.VEC_MIN, _SCAN_FACTS.get
    cache_key = _CACHE_KEY
    early_maps = classify.early_lpm_maps if classify._EARLY_RUNS is not None else None
    sites, reads = {}, [False, False, False]    # for _jump_sites and _scan (see chain_info)
    # the previous table's walk of the chains behind `top`, when only top's own chain changed
    # (_walk_behind): then the walk stops after top
    behind = _walk_behind(table, top)
    spliced = False
    i = 0
    # (a fan-out table walks 3 336 chains here on every compile: the loop is kept tight)
    leaves_at = 1       # where _walk_leaves is tried next: once per level of the walk
    while i < len(order):
        if i >= leaves_at and len(order) - i >= LEAVES_FROM:
            if _walk_leaves(order[i:], info, recs, bases, spans, reads, facts_of, scan_of,
                            vec_min, policy_indexes_walked(table)):
                break                           # the rest of the walk: chains without jumps
            leaves_at = len(order)
        c = order[i]
        i += 1
        rules = c.rules
        pk = getattr(c.policy_entry, "cache_key", None)
        if pk is None:
            return None, None
        try:
            if len(rules) >= vec_min:
                vec = classify.vectors(rules)
                # (vectors takes no keys with a None: no second scan of a 10 000-rule chain's
                # keys for one, ~1.5 M instructions: classify._keep_seen_runs)
                keys = tuple(vec.keys)
                if early_maps is not None and c is top:
                    early_maps(rules, c.name, vec)
            else:
                keys = tuple(map(cache_key, rules))
                if None in keys:
                    return None, None
        except AttributeError:                  # no vectors, or a rule without cache_key
            return None, None
        fk = (keys, pk)
        jumps = facts_of(fk, False)
        if jumps is False:
            jumps = _chain_facts(rules, c.policy_entry, keys, True)
        if jumps is None:
            return None, None
        info[id(c)] = (keys, pk, jumps)
        rd = scan_of(fk) or _chain_reads(rules, c.policy_entry, fk, True)
        if True in rd:
            reads[0] |= rd[0]
            reads[1] |= rd[1]
            reads[2] |= rd[2]
        lands = _plain_lands(rules, jumps, c.policy_entry, chains, by_name.as_dict(), seen,
                             order, sites, lands_walked(table)) \
            if len(jumps) >= PLAIN_LANDS_FROM else None
        if jumps and lands is None:
            lands = []
            last = len(rules) - 1
            for p in jumps:
                r = rules[p]
                t = r.target
                nxt = rules[p + 1].offset if p < last else c.policy_entry.offset
                if t.offset == nxt:             # libiptc's fall-through: _entry's "no target"
                    lands.append((p,))
                    continue
                cp = getattr(t, "chain_pos", -1)
                if cp is not None and 0 <= cp < nchains and chains[cp].name == t.chain:
                    tgt = chains[cp]
                    if not by_name.first_at(cp):
                        return None, None       # _scan and _landing would disagree: compile it
                else:
                    tgt = by_name.get(t.chain)
                    if tgt is None:
                        return None, None
                k = seen.get(id(tgt))
                if k is None:
                    k = seen[id(tgt)] = len(order)
                    order.append(tgt)
                lands.append((p, k, getattr(t, "entry", 0), bool(t.goto)))
                sites[t.chain] = sites.get(t.chain, 0) + 1
        if jumps:
            recs.append((c.name, c.hook, keys, pk, tuple(lands)))
        else:
            recs.append((c.name, c.hook, keys, pk))
        first = rules[0] if rules else c.policy_entry
        bases.append((first.index, first.offset))
        spans.append(((c.head_entry or first).index, c.policy_entry.index + 1))    # _span(c)
        if i == 1:
            # top's own sites and reads, apart from those of the chains behind it
            top_sites, top_reads = dict(sites), tuple(reads)
            sites.clear()
            reads[0] = reads[1] = reads[2] = False
            if behind is not None:
                got = _splice_behind(table, order, behind, info)
                if got is not None:
                    rest_recs, rest_bases, rest = got
                    recs += rest_recs
                    if type(rest_bases) is _MovedBases:
                        # top's base, then the moved ones (not made into pairs: see there)
                        bases = _MovedBases(tuple(bases) + rest_bases.head, rest_bases.src,
                                            rest_bases.di, rest_bases.do, rest_bases.src_min)
                    else:
                        bases += rest_bases
                    sites.update(rest[2])
                    reads[:] = rest[3]
                    spliced_facts = rest[1]
                    spliced = True
                    break
    rest = (None, None, dict(sites), tuple(reads))
    for name, k in top_sites.items():
        sites[name] = sites.get(name, 0) + k
    info[("walk", id(top))] = (sites, tuple(a or b for a, b in zip(top_reads, reads)))
    recs = _Records(recs)       # (kept with the walk: the next table's key hashes it again)
    # each walked chain's entries from its head (or first rule) to its policy/RETURN entry
    # (pk above: every walked chain has one), in entry order: for the next table's
    # _moved_program_key; and the walked chains' places in table.chains with what the walk
    # found of each, for _walk_behind
    if spliced:
        # the chains behind top moved (behind), top's own span is this table's
        # (and a changed leaf's, _changed_leaf: the new chain's)
        old_top, leaf = behind[5], behind[6]
        news = [(old_top, _span(top))]
        if leaf is not None:
            news.append((leaf[1], _span(table.chains[behind[4][0][leaf[0]]])))
        los, his = _spans_replaced(behind[2], behind[3], news)
        rest = (behind[4][0], [info[id(top)]] + list(spliced_facts[1:])) + rest[2:]
    else:
        spans.sort()
        los, his = list(map(_ITEM0, spans)), list(map(_ITEM1, spans))
        # (C loops: a fan-out walks 3 336 chains)
        ids = list(map(id, order))
        rest = (list(map(_chain_places(table).__getitem__, ids)),
                list(map(info.__getitem__, ids))) + rest[2:]
    _remember_walk(table, top.name, recs, bases, los, his, rest)
    return _key_of(table, top, flk, facts, subprog_above, subprogs, knobs, recs), bases


def _spans_replaced(los: list, his: list, news: list) -> tuple:
    """(los, his) of the spans (first entries sorted, ends) with each span `old` of news
    [(old, new)] replaced by `new`: in place when it starts where the old one did (a change
    ahead of a chain's first entry is in another span; only its end moves), else the spans
    sorted again. Spans moved whole (_ShiftedInts, from one place on) stay so where each span
    replaced lies ahead of that place and starts where it did (the top chain of a walk spliced
    behind it): their lists copied, their ints not made."""
    if type(los) is _ShiftedInts and type(his) is _ShiftedInts and los.t == his.t:
        t = los.t
        src_lo, src_hi = list(los.src), list(his.src)
        for old, new in news:
            k = _bisect_left(los, old[0])
            while k < len(los) and los[k] == old[0] and his[k] != old[1]:
                k += 1
            if k >= t or los[k] != old[0] or new[0] != old[0]:
                break
            src_lo[k], src_hi[k] = new
        else:
            return _ShiftedInts(src_lo, t, los.d), _ShiftedInts(src_hi, t, his.d)
    los, his = list(los), list(his)
    resort = False
    for old, new in news:
        k = _bisect_left(los, old[0])
        while k < len(los) and los[k] == old[0] and his[k] != old[1]:
            k += 1
        if k == len(los) or los[k] != old[0]:
            raise ValueError(f"span {old} not in the walk")
        los[k], his[k] = new
        resort |= new[0] != old[0]
    if resort:
        spans = sorted(zip(los, his))
        los, his = [a for a, _ in spans], [b for _, b in spans]
    return los, his


def _shifted(ints, t: int, d: int):
    """`ints` (a sorted walk's span starts, or the ends beside them) with each from place t on
    moved by d: a _ShiftedInts of the same src where ints is one moved from the same place,
    of ints itself (or its ints, moved from another place) where it is a long list; else a
    list."""
    if type(ints) is _ShiftedInts:
        if ints.t == t:
            return _ShiftedInts(ints.src, t, ints.d + d)
        ints = ints.ints()          # (a list nothing changes, as src must be)
    if len(ints) >= MOVED_BASES_FROM:
        return _ShiftedInts(ints, t, d)
    return ints[:t] + [x + d for x in ints[t:]]


class _MovedBases:
    """A walk's bases (see above: (index, offset) of each walked chain's first body entry) as
    `head`, a few pairs as they are, then each pair of `src` (a previous walk's bases, never
    changed) moved by (di, do): the bases of a walk taken moved from the previous table's
    (_moved_program_key, _walk_behind), whose 3 333 chains behind an append (a fan-out's hub
    and service chains) all moved by one entry, kept as that move instead of 3 333 new pairs a
    table, and _kept_program finds them moved uniformly from the bases kept with a program
    without reading them (_uniform_move). `src_min`: the least index in src. Reads as a
    sequence of the pairs (made once, when first iterated)."""
    __slots__ = ("head", "src", "di", "do", "src_min", "_all")

    def __init__(self, head: tuple, src, di: int, do: int, src_min: int):
        self.head, self.src, self.di, self.do, self.src_min = head, src, di, do, src_min
        self._all = None

    def pairs(self) -> tuple:
        if self._all is None:
            di, do = self.di, self.do
            self._all = self.head + tuple([(i + di, o + do) for i, o in self.src])
        return self._all

    def __len__(self) -> int:
        return len(self.head) + len(self.src)

    def __iter__(self):
        return iter(self.pairs())

    def __getitem__(self, k):
        if isinstance(k, slice):
            if k == slice(1, None) and self.head:
                return _MovedBases(self.head[1:], self.src, self.di, self.do, self.src_min)
            return self.pairs()[k]
        if 0 <= k < len(self.head):
            return self.head[k]
        return self.pairs()[k]

    def __eq__(self, other):
        try:
            return list(self.pairs()) == list(other)
        except TypeError:
            return NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"_MovedBases({list(self.pairs())!r})"


# walks of at least this many chains get their moved bases as a _MovedBases
MOVED_BASES_FROM = 64


def _moved_bases(bases, p_first: int, shift: int, delta: int):
    """`bases` with each pair whose index is p_first or more moved by (-shift, delta): as a
    _MovedBases when all but a few at the start move (a walk from a chain ahead of the change
    into the chains behind it, or one wholly behind it: the head pairs placed one by one, the
    rest one move), else a list of the pairs."""
    def one(i, o):
        return (i - shift, o + delta) if i >= p_first else (i, o)
    if type(bases) is _MovedBases:
        if bases.src_min + bases.di >= p_first:
            return _MovedBases(tuple([one(i, o) for i, o in bases.head]), bases.src,
                               bases.di - shift, bases.do + delta, bases.src_min)
    elif len(bases) >= MOVED_BASES_FROM:
        # a plain walk's list (its least index found once, then carried with it): all of it
        # moved (then the list itself is src: a program kept with it finds the move at
        # once), or all but its top chain's
        low = min(map(_ITEM0, bases[1:]))
        if low >= p_first:
            first = bases[0]
            if first[0] >= p_first:
                return _MovedBases((), bases, -shift, delta, min(low, first[0]))
            return _MovedBases((first,), bases[1:], -shift, delta, low)
    return [one(i, o) for i, o in bases]


def _uniform_move(old_bases, bases):
    """(d_index, d_offset) when every pair of `bases` is the pair of old_bases at its place
    moved by that, else None; from the moves alone where both are one src moved (or bases is
    old_bases moved), else pair by pair."""
    if type(bases) is _MovedBases and len(bases) == len(old_bases):
        if bases.src is old_bases and not bases.head:
            return bases.di, bases.do
        if type(old_bases) is _MovedBases and old_bases.src is bases.src and \
                len(old_bases.head) == len(bases.head):
            d = (bases.di - old_bases.di, bases.do - old_bases.do)
            for (i0, o0), (i1, o1) in zip(old_bases.head, bases.head):
                if (i1 - i0, o1 - o0) != d:
                    return None
            return d
    d_idx, d_off = bases[0][0] - old_bases[0][0], bases[0][1] - old_bases[0][1]
    for (i0, o0), (i1, o1) in zip(old_bases, bases):
        if i1 - i0 != d_idx or o1 - o0 != d_off:
            return None
    return d_idx, d_off


def _span(c: Chain) -> tuple:
    """(first, end) entry indexes of chain c from its head (or first rule) to its policy or
    RETURN entry."""
    return ((c.head_entry or (c.rules[0] if c.rules else c.policy_entry)).index,
            c.policy_entry.index + 1)


def _starting_at(los: list, nhead: int):
    """The place in `los` (the first entries of a walk's chain spans, sorted) of the chain
    whose span starts at nhead, the first changed entry, or None. Rules put before a built-in
    chain's first entry (nhead == p_first: an append to an empty INPUT) are in no span that
    [nhead, p_first) meets (model.moved_from): they are the chain's starting there."""
    k = _bisect_left(los, nhead)
    return k if k < len(los) and los[k] == nhead else None


def _walk_behind(table: Table, top: Chain):
    """The previous table's walk of `top`'s name, moved to this table, when the only walked
    chain holding a changed entry (model.moved_from) is top itself or a leaf behind it
    (_changed_leaf): then every other chain behind top is the previous table's, and top's
    jumps, plain rules aside, are the same jumps (the changed entries are none:
    model._note_moved), so the walk from top's targets on goes as before. (recs, bases, los,
    his, rest, top's old span, leaf), bases, spans and top's span moved to this table; leaf:
    None or (the changed leaf's place in the walk, its old span, not moved), or None."""
    mv = moved_from(table)
    if mv is None:
        return None
    prev, nhead, p_first, shift, delta = mv
    got = _WALK_RECORDS.get(id(prev))
    if got is None or got[0]() is not prev:
        return None
    rec = got[1].get(top.name)
    if rec is None or rec[4] is None or len(table.chains) != len(prev.chains):
        return None
    recs, bases, los, his, rest = rec
    p_top = prev.chains[rest[0][0]]
    if p_top.name != top.name or p_top.hook != top.hook:
        return None
    old_span = _span(p_top)
    j = _bisect_left(los, p_first) - 1
    leaf = None
    if j >= 0 and his[j] > nhead and (los[j], his[j]) != old_span:
        # a chain behind top changed: taken when it is a leaf of the walk (_changed_leaf)
        k = _changed_leaf(recs, bases, rest, los[j], nhead)
        if k is None:
            return None
        leaf = (k, (los[j], his[j]))
    if j >= 1 and his[j - 1] > nhead:
        return None
    # (rules put before a chain's first entry, _starting_at: only a built-in chain's, and
    # the only built-in chain of a walk is its top)
    if shift or delta:
        bases = _moved_bases(bases, p_first, shift, delta)
        # (los is sorted: the spans from p_first on are its tail)
        t = _bisect_left(los, p_first)
        his = _shifted(his, t, -shift)
        los = _shifted(los, t, -shift)
        if old_span[0] >= p_first:
            old_span = (old_span[0] - shift, old_span[1] - shift)
    # (a changed leaf's span starts before p_first, its end is at or after nhead: it did not
    # move with the entries behind the change, and is replaced by the new chain's)
    return recs, bases, los, his, rest, old_span, leaf


def _changed_leaf(recs, bases, rest, lo: int, nhead: int):
    """The place in the previous walk (recs, bases, rest) of the walked chain whose entries
    span from `lo` and hold the changed entries from nhead on, when it is a user chain that
    the walk reached and left as a leaf: no jump (its record has no landings) and no RETURN but
    its own (the changed entries are plain rules: model.moved_from). Then the walk of the new
    table reaches the same chains in the same order, and only that chain's record, base and
    span change, when every jump to it lands on its first entry: a landing's record names the
    rule it lands on by its place in the chain (Jump.entry), which rules put or taken before
    it change. None otherwise."""
    if rest is None or nhead <= lo:
        return None                     # at a span's first entry: a built-in chain's head
    # a user chain's first body entry (its base) follows its head entry (its span's first)
    try:
        k = list(map(_ITEM0, bases)).index(lo + 1)
    except ValueError:
        return None
    if k == 0 or len(recs[k]) != 4 or rest[1][k][2]:
        return None
    for rec in recs:
        if len(rec) != 5:
            continue
        try:
            if not any(map(_ITEM2, rec[4])):    # every landing on a first entry (C loop)
                continue
        except IndexError:                      # a fall-through's record: (position,)
            pass
        if any(len(ld) == 4 and ld[1] == k and ld[2] for ld in rec[4]):
            return None
    return k


_ITEM0, _ITEM1, _ITEM2 = itemgetter(0), itemgetter(1), itemgetter(2)


def _splice_behind(table: Table, order: list, behind, info: dict):
    """The previous walk's records, bases and chain facts of the chains behind top (order[0],
    just walked), when top's jumps reach the chains they reached before, in the same order;
    None otherwise (the walk goes on)."""
    recs, bases, _los, _his, rest, _old, leaf = behind
    where, facts = rest[0], rest[1]
    chains = table.chains
    if len(order) > len(where):
        return None
    for k in range(1, len(order)):
        if chains[where[k]] is not order[k]:
            return None
    if leaf is not None:
        got = _leaf_anew(chains[where[leaf[0]]], recs[leaf[0]], rest[3])
        if got is None:
            return None
        k = leaf[0]
        rec, base, fact, reads = got
        recs, bases, facts = list(recs), list(bases), list(facts)
        recs[k], bases[k], facts[k] = rec, base, fact
        rest = (where, facts, rest[2], reads)
        PROG_STATS["walks_leaf"] += 1
        # the only chain of the table whose entries changed (the change is in its span
        # alone: _walk_behind), for classify's jump cases (_leaf_bodies)
        info.setdefault(CHANGED_LEAF, set()).add((id(chains[where[k]]), where[k]))
    # (column by column: a fan-out's 3 333 case chains; when next read)
    _defer_chain_facts(table, info, chains, where[1:], facts[1:])
    PROG_STATS["walks_spliced"] += 1
    return recs[1:], bases[1:], rest


CHANGED_LEAF = "changed leaf"


def _leaf_anew(c: Chain, old_rec: tuple, old_reads: tuple):
    """(record, base, chain facts, reads of the chains behind top) of the changed leaf chain c
    of a spliced walk, read as _program_key's loop reads a chain, when c is still a leaf named
    as before and what _scan ORs over the chains behind top stays exact: the previous OR with
    c's reads added, when c's new reads cover what its old ones gave (else a read only c had
    may be gone, which the OR cannot tell). None otherwise (the walk goes on)."""
    rules, pe = c.rules, c.policy_entry
    pk = getattr(pe, "cache_key", None)
    if pk is None or c.name != old_rec[0] or c.hook is not None:
        return None
    try:
        if len(rules) >= classify.VEC_MIN:
            keys = tuple(classify.vectors(rules).keys)      # (vectors: no None among them)
        else:
            keys = tuple(map(_CACHE_KEY, rules))
            if None in keys:
                return None
    except AttributeError:
        return None
    fk = (keys, pk)
    jumps = _CHAIN_FACTS.get(fk, False)
    if jumps is False:
        jumps = _chain_facts(rules, pe, keys, True)
    old = _SCAN_FACTS.get((old_rec[2], old_rec[3]))
    if jumps is None or jumps or old is None:
        return None
    rd = _SCAN_FACTS.get(fk) or _chain_reads(rules, pe, fk, True)
    if any(a and not b for a, b in zip(old, rd)):
        return None
    first = rules[0] if rules else pe
    return ((c.name, c.hook, keys, pk), (first.index, first.offset), (keys, pk, jumps),
            tuple(a or b for a, b in zip(old_reads, rd)))


def _key_of(table, top, flk, facts, subprog_above, subprogs, knobs, recs) -> tuple:
    count = _entry_count(table) > SHARED_COUNT_ABOVE
    subs = None if subprogs is None else frozenset(subprogs)
    return (top.name, flk, facts, subprog_above, subs, table.family, count, knobs,
            recs if type(recs) is _Records else _Records(recs))


class _Records(tuple):
    """A walk's records (a tuple, equal to one) that hash once, and from a sample: a compile
    looks its key up in _PROG_CACHE, then keeps its program under it, and the next table whose
    walk is this one moved (_moved_program_key: an append to INPUT) looks the same records up
    again. A walk that reaches a changed chain is new records every time (an append to INPUT
    of a fan-out: INPUT's record, then the hub's and the 3 333 service chains' spliced from
    the previous walk, _splice_behind), and hashing all of them (tuples of tuples: the hub's
    record alone holds 3 333 landings; Python keeps no tuple's hash) took ~0.9 ms of every
    such append. Equal records have equal samples (_record_sample), so the hash agrees with
    equality; records that differ only outside the sample collide, and the dict tells them
    apart by comparing them (in C, records shared with the previous walk by identity), which
    costs no more than hashing them all did. Only _Records are hashed this way: _key_of makes
    every key's records one."""

    def __hash__(self):
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash(_records_sample(self))
        return h


# records sampled at each end of a walk by _Records' hash: the top chain's own (where a
# change to it shows) and the last ones the walk reached
_RECORDS_SAMPLE = 8


def _records_sample(recs: tuple) -> tuple:
    """What _Records' hash reads of a walk's records: their count and a bounded sample of each
    record at both ends (equal records: equal samples)."""
    k = _RECORDS_SAMPLE
    ends = recs if len(recs) <= 2 * k else recs[:k] + recs[-k:]
    return (len(recs),) + tuple(map(_record_sample, ends))


def _record_sample(rec: tuple) -> tuple:
    """A bounded part of one chain record (name, hook, rule keys, policy key[, landings]): the
    name, hook and policy key whole (str, None or int, bytes: their hashes are kept or cheap),
    the rule keys and landings by their count and first few."""
    keys = rec[2]
    out = (rec[0], rec[1], len(keys), keys[:4], rec[3])
    if len(rec) > 4:
        lands = rec[4]
        out += (len(lands), lands[:4], lands[-1:])
    return out


# {id(table): (weakref to the table, {built-in chain name: (recs, bases, los, his, rest)})}:
# what _program_key's walk of each built-in chain found (recs: the key's chain records; los/his:
# the walked chains' entry index spans, sorted; rest: (each walked chain's place in
# table.chains, its chain_info facts, the jump sites and reads of the chains behind the top
# one) or None), for the next table when it is this one with entries changed in one place
# (model.moved_from). A few tables only: the installed one and the one being installed.
_WALK_RECORDS: dict = {}
WALK_RECORDS_MAX = 8


def _remember_walk(table, name: str, recs, bases, los, his, rest=None) -> None:
    got = _WALK_RECORDS.get(id(table))
    if got is None or got[0]() is not table:
        for k in [k for k, v in _WALK_RECORDS.items() if v[0]() is None]:
            del _WALK_RECORDS[k]
        if len(_WALK_RECORDS) >= WALK_RECORDS_MAX:
            _WALK_RECORDS.clear()
        got = _WALK_RECORDS[id(table)] = (weakref.ref(table), {})
    got[1][name] = (recs, bases, los, his, rest)


def _moved_program_key(table: Table, top: Chain, facts, fl, subprog_above, subprogs,
                       knobs: tuple) -> tuple:
    """(key, bases) of `top`'s program without walking its chains, when the table is the
    previous decode_replace table with plain rules changed in one place (model.moved_from)
    and the previous table's walk of the chain of that name reached none of the changed
    entries: every chain it reached is then the same chain (same names, entries, landings;
    model._note_moved says why), its entries moved together, so the walk would give the same
    records, each base moved with its chain. (None, None) otherwise."""
    if os.environ.get("BPFILTER_PROG_CACHE", "1") == "0" or not hasattr(table, "entries"):
        return None, None
    mv = moved_from(table)
    if mv is None:
        return None, None
    prev, nhead, p_first, shift, delta = mv
    got = _WALK_RECORDS.get(id(prev))
    if got is None or got[0]() is not prev or top.name not in got[1]:
        return None, None
    recs, bases, los, his, rest = got[1][top.name]
    if rest is not None and len(table.chains) != len(prev.chains):
        rest = None
    j = _bisect_left(los, p_first) - 1
    if j >= 0 and his[j] > nhead or _starting_at(los, nhead) is not None:
        return None, None               # a walked chain holds a changed entry: walk it
    flk = _flavor_key(fl)
    if flk is None or recs[0][0] != top.name or recs[0][1] != top.hook:
        return None, None
    if shift or delta:
        bases = _moved_bases(bases, p_first, shift, delta)
        # (los is sorted: the spans from p_first on are its tail)
        t = _bisect_left(los, p_first)
        his = _shifted(his, t, -shift)
        los = _shifted(los, t, -shift)
    _remember_walk(table, top.name, recs, bases, los, his, rest)
    PROG_STATS["walks_moved"] += 1
    return _key_of(table, top, flk, facts, subprog_above, subprogs, knobs, recs), bases


class _FirstByName:
    """_first_by_name(table), made on first use: a walk spliced after its top chain
    (_splice_behind: an append to INPUT of --to-input's fan-out) resolves top's few jumps
    alone, each naming its chain's place (chain_pos), and asks only whether no chain before
    that place has its name (first_at): a look at those chains when they are few, instead of
    the name of each of 3 337 chains put in a dict (~0.35 ms of every such append)."""
    __slots__ = ("table", "_by")

    # places up to which first_at reads the chains before it instead of making the dict
    SCAN_MAX = 64

    def __init__(self, table: Table):
        self.table, self._by = table, None

    def as_dict(self) -> dict:
        if self._by is None:
            self._by = _first_by_name(self.table)
        return self._by

    def get(self, name: str, default=None):
        return self.as_dict().get(name, default)

    def first_at(self, cp: int) -> bool:
        """Whether table.chains[cp] is the first chain of its name (Table.chain's, _scan's,
        _landing's by name)."""
        chains = self.table.chains
        c = chains[cp]
        if self._by is None and cp <= self.SCAN_MAX:
            name = c.name
            for x in chains[:cp]:
                if x.name == name:
                    return False
            return True
        return self.as_dict().get(c.name) is c


def _first_by_name(table: Table) -> dict:
    """{name: first chain of that name}, once per compile_table (_WALKS)."""
    hit = _walk_of(table)
    by = hit[3] if hit is not None else None
    if by is None:
        by = {}
        for c in table.chains:
            by.setdefault(c.name, c)
        if hit is not None:
            hit[3] = by
    return by


def _chain_places(table: Table) -> dict:
    """{id(chain): its index in table.chains}, once per compile_table (_WALKS)."""
    hit = _walk_of(table)
    if hit is not None and hit[5] is not None:
        return hit[5]
    out = dict(zip(map(id, table.chains), range(len(table.chains))))
    if hit is not None:
        hit[5] = out
    return out


def chain_info(table: Table) -> dict:
    """{id(chain): (its rules' cache_keys, its policy/RETURN entry's, positions of its jump
    rules)} for the chains _program_key walked in this compile_table, and {("walk", id(top)):
    (the jump sites of each chain reached from top, what _scan ORs over them)} for each built-in
    chain it walked whole, and {CHANGED_LEAF: {(id(chain), its place in table.chains)}} for the
    one chain of the table whose entries changed when a walk found it a leaf (_splice_behind,
    for classify._leaf_bodies), so the compile's other
    walks (_scan, _jump_sites, classify's jump cases) do not walk the chains again (a fan-out
    table: 3 336 chains, each walked four times); {} outside compile_table."""
    hit = _walk_of(table)
    if hit is None:
        return {}
    info = hit[4]
    if len(hit) > 6 and hit[6]:
        # the facts a spliced walk took from the previous one, put in the order they came
        for chains, where, facts in hit[6]:
            _put_chain_facts(info, chains, where, facts)
        hit[6].clear()
    return info


def policy_indexes_walked(table: Table):
    """{id(chain): the index of its policy (RETURN) entry} of the chains _walk_leaves read in
    this compile_table (model.chain_outline reads it with the chain's keys), so classify's
    case chains are not read again (_walked_bodies: a fan-out's 3 333, ~1.2 ms cold); None
    outside compile_table."""
    hit = _walk_of(table)
    return hit[7] if hit is not None and len(hit) > 7 else None


def lands_walked(table: Table):
    """{id(the first jump rule read): (the jump rules, their targets, chain_pos, entries,
    landing chains, their ids, their names)} of the jumps _plain_lands read column by column
    in this compile_table, so classify's jump cases do not read them again (_landed_columns:
    a fan-out hub's 3 333, ~1.3 ms cold); None outside compile_table."""
    hit = _walk_of(table)
    return hit[8] if hit is not None and len(hit) > 8 else None


def chain_walk(table: Table, top: Chain):
    """chain_info(table).get(("walk", id(top))): the jump sites and reads of _program_key's
    walk of built-in chain `top` in this compile_table, or None; read without putting the
    deferred chain facts in (_defer_chain_facts), which a program whose walk is all its
    compile asks of chain_info (an append to INPUT: _scan and _jump_sites) never needs."""
    hit = _walk_of(table)
    return hit[4].get(("walk", id(top))) if hit is not None else None


def _defer_chain_facts(table: Table, info: dict, chains: list, where, facts) -> None:
    """Put the facts of chains[where[k]] (facts[k]) in chain_info's dict `info` when it is
    next read (chain_info), not now: _splice_behind's are those of every chain behind the top
    one (a fan-out's 3 333 service chains, ~0.7 ms a compile), and the compile of an append to
    INPUT, whose program is compiled from the moved walk and the kept bodies of the hub's run
    (classify._moved_bodies), reads none of them. Every reader and writer of the dict gets it
    from chain_info (_program_key at its start: later facts go in after these, as they came),
    but for chain_walk's walk records, which these are not. Outside compile_table (no dict
    kept, or one kept without the list of deferred facts), put in now."""
    hit = _walk_of(table)
    if hit is None or hit[4] is not info or len(hit) < 7:
        _put_chain_facts(info, chains, where, facts)
        return
    hit[6].append((chains, where, facts))


def _put_chain_facts(info: dict, chains: list, where, facts) -> None:
    """chain_info's dict `info` given facts[k] for chains[where[k]] (column by column: a
    fan-out's 3 333 case chains)."""
    info.update(zip(map(id, map(chains.__getitem__, where)), facts))


def _keep_program(key, bases, cc: "_ChainCompiler", cp: CompiledProgram):
    """Keep cp for later tables with the same key (when it can be moved: see above)."""
    if key is None or cc.sub_labels:
        PROG_STATS["made"] += 1
        return
    PROG_STATS["made"] += 1
    for tpl, _ in cp.fn_parts:
        if tpl.relocs is None:
            return
    n_fn = sum(len(tpl.items) for tpl, _ in cp.fn_parts)
    ids = {id(x) for x in cc.index_insns}
    slots = tuple(p for p, it in enumerate(cp.items[:len(cp.items) - n_fn]) if id(it) in ids)
    if len(_PROG_CACHE) >= PROG_CACHE_MAX:
        _PROG_CACHE.clear()
    # a copy: the caller owns cp (offload.py rewrites a program's items)
    mine = dataclasses.replace(cp, items=list(cp.items), where=dict(cp.where),
                               maps=list(cp.maps))
    # the walk's own bases (a list nothing changes once the walk returns it, or a
    # _MovedBases): the same object _WALK_RECORDS holds, so that the next table's bases, that
    # one moved, are found moved uniformly without reading them (_uniform_move)
    _PROG_CACHE[key] = (bases, mine, slots)
    cp.__dict__["_kept_copy"] = mine        # encode_kept


def _kept_program(key, bases) -> Optional[CompiledProgram]:
    """The kept program for `key`, moved to `bases`, or None."""
    if key is None:
        return None
    hit = _PROG_CACHE.get(key)
    if hit is None:
        return None
    old_bases, cp, slots = hit
    d = _uniform_move(old_bases, bases)
    if d is None:
        return None
    d_idx, d_off = d
    if cp.fn_parts:
        # a global function template dropped from classify._FN_CACHE (tests clear it to compile
        # afresh) means "compile afresh" here too
        live = {id(t) for t in classify._FN_CACHE.values()}
        if not all(id(tpl) in live for tpl, _ in cp.fn_parts):
            return None
    PROG_STATS["reused"] += 1
    return _KeptProgram.moved(cp, slots, d_idx, d_off)


class _KeptProgram(CompiledProgram):
    """A program of _PROG_CACHE moved by (d_index, d_offset): its items (the functions' counter
    keys rewritten from their templates) and `where` are made on first use, the bytecode is
    placed from the functions' kept bytecode without them (CompiledProgram.assemble)."""

    @classmethod
    def moved(cls, cp: CompiledProgram, slots: tuple, d_idx: int, d_off: int):
        out = object.__new__(cls)
        for f in dataclasses.fields(CompiledProgram):
            if f.name not in ("items", "where"):
                out.__dict__[f.name] = getattr(cp, f.name)
        out.maps = list(cp.maps)
        out.fn_parts = tuple((tpl, [v + d_idx for v in values]) for tpl, values in cp.fn_parts)
        out.__dict__["_kept"] = (cp, slots, d_idx, d_off)
        n_fn = sum(len(tpl.items) for tpl, _ in cp.fn_parts)
        main = _move_index_insns(cp.items[:len(cp.items) - n_fn], slots, d_idx)
        out.__dict__["_main"] = main
        if not cp.fn_parts:
            out.items = main
        return out

    def _layout(self):
        """The kept program's layout (its functions' bytecode, computed once for every later
        table) with this program's main part."""
        kept = self.__dict__.get("_kept")
        if kept is None:                    # a copy (dataclasses.replace): a program like any
            return super()._layout()
        lay = self.__dict__.get("_lay")
        if lay is None:
            base = kept[0]._layout()
            lay = self.__dict__["_lay"] = (self.__dict__["_main"],) + tuple(base[1:]) \
                if base else False
        return lay or None

    def _fn_items(self, main: list) -> list:
        items = list(main)
        for tpl, values in self.fn_parts:
            part = list(tpl.items)
            for (p, *_), v in zip(tpl.relocs, values):
                old = part[p]
                if old.imm != v:
                    part[p] = Insn(old.code, old.dst, old.src, old.off, v,
                                   comment=f"count entry {v}")
            items += part
        return items

    def __getattr__(self, name):
        kept = self.__dict__.get("_kept")
        if kept is None:
            raise AttributeError(name)
        if name == "items":
            self.items = self._fn_items(self.__dict__["_main"])
            return self.items
        if name == "where":
            cp, _, _, d_off = kept
            self.where = {k: _moved_offsets(v, d_off) for k, v in cp.where.items()}
            return self.where
        raise AttributeError(name)

    def listing(self) -> str:
        kept = self.__dict__.get("_kept")
        d_idx = kept[2] if kept is not None else 0
        if not d_idx:
            return super().listing()
        return (f"; program {self.chain} (hook {self.hook}), kept from an earlier compile: "
                f"entry numbers in comments are that compile's ({d_idx:+d} now)\n"
                + E.listing(self.items))

    def assemble(self, map_fds: dict) -> bytes:
        """A kept program without global functions: the kept program's bytecode, encoded once
        (_kept_code), with the moved counter keys and this install's map fds written in; the
        same bytes as encoding every item (an append reloads the programs of the chains it did
        not change, ~0.15 ms of encoding each at 10 rules). With global functions, the main
        part is placed so (_encode_main), the functions as CompiledProgram.assemble does."""
        kept = self.__dict__.get("_kept")
        if kept is None or self.fn_parts or self.__dict__.get("items") is not \
                self.__dict__.get("_main"):
            return super().assemble(map_fds)    # items of its own (offload.py rewrites keys)
        cp, slots, d_idx, _ = kept
        kf = self.facts.kfunc_ids if self.facts else {}
        got = _moved_code(cp, cp.items, slots, d_idx, map_fds, kf)
        return got if got is not None else super().assemble(map_fds)

    def _encode_main(self, main: list, stubs: list, map_fds: dict, kf: dict) -> bytes:
        kept = self.__dict__.get("_kept")
        if kept is None or main is not self.__dict__.get("_main"):
            return super()._encode_main(main, stubs, map_fds, kf)
        cp, slots, d_idx, _ = kept
        n_fn = sum(len(tpl.items) for tpl, _ in cp.fn_parts)
        got = _moved_code(cp, cp.items[:len(cp.items) - n_fn] + stubs, slots, d_idx, map_fds,
                          kf)
        return got if got is not None else super()._encode_main(main, stubs, map_fds, kf)


_U32 = struct.Struct("<I")


def _moved_code(cp: CompiledProgram, items: list, slots: tuple, d_idx: int, map_fds: dict,
                kf: dict):
    """The bytes E.assemble gives for `items` (cp's own, in which each counter key at `slots`
    is moved by d_idx) with `map_fds`, from cp's bytecode encoded once (_kept_code); None when
    a map has no fd (encoding names the error)."""
    code, at, maps_at = _kept_code(cp, items, kf)
    if any(name not in map_fds for _o, name in maps_at):
        return None
    out = bytearray(code)
    pack = _U32.pack_into
    for p in slots:
        pack(out, at[p] + 4, (items[p].imm + d_idx) & 0xffffffff)
    for o, name in maps_at:
        fd = map_fds[name]
        pack(out, o + 4, fd & 0xffffffff)
        pack(out, o + 12, (fd >> 32) & 0xffffffff)
    return bytes(out)


def _kept_code(cp: CompiledProgram, items: list, kfuncs: dict) -> tuple:
    """(bytecode of `items`, cp's, with every map fd 0, {item index: byte offset of its
    instruction}, [(byte offset, map name) of each map load]), made once per kept program (its
    items, or its main part and the functions' stubs: always the same list for one program):
    a counter key's or a map fd's value changes no instruction's size or place (a key is one
    st, a map load one lddw), so the programs later moved from cp patch these bytes."""
    memo = cp.__dict__.get("_code")
    if memo is not None and memo[0] == kfuncs and memo[1] == len(items):
        return memo[2]
    names = {it.map for it in items if it.__class__ is not Label and it.map is not None}
    code = E.assemble(items, dict.fromkeys(names, 0), kfuncs)
    at, maps_at, pos = {}, [], 0
    for p, it in enumerate(items):
        if it.__class__ is Label:
            continue
        at[p] = pos
        if it.map is not None:
            maps_at.append((pos, it.map))
        pos += 16 if it.code == E._LDDW else 8
    got = (code, at, maps_at)
    cp.__dict__["_code"] = (dict(kfuncs), len(items), got)
    return got


def encode_kept(programs) -> None:
    """The bytecode of the programs kept from `programs` (_PROG_CACHE), which the programs
    moved from them patch (_moved_code), encoded now: a helper calls this once an install's
    reply is out, so the first append after a restore does not encode the programs the
    restore kept (the fan-out's FORWARD: ~0.5 ms at 10 000 rules)."""
    for cp in programs:
        mine = cp.__dict__.get("_kept_copy")
        if mine is None:
            continue
        kf = mine.facts.kfunc_ids if mine.facts else {}
        items = mine.items
        if mine.fn_parts:
            n_fn = sum(len(tpl.items) for tpl, _ in mine.fn_parts)
            items = items[:len(items) - n_fn] + \
                [x for tpl, _ in mine.fn_parts for x in (Label(tpl.head), E.exit_())]
        try:
            _kept_code(mine, items, kf)
        except BpfilterError:
            pass                # encoding it names the error, if a program moved from it is used


def _move_index_insns(items: list, slots: tuple, d: int) -> list:
    if not d:
        return items
    out = list(items)
    for p in slots:
        old = out[p]
        out[p] = Insn(old.code, old.dst, old.src, old.off, old.imm + d, old.target, old.map,
                      old.kfunc, old.comment)
    return out


_ENTRY_OFFSETS = re.compile(r"(entry offsets? )(\d+)(\.\.)?(\d+)?")


def _moved_offsets(text: str, d: int) -> str:
    if not d:
        return text
    return _ENTRY_OFFSETS.sub(
        lambda m: f"{m.group(1)}{int(m.group(2)) + d}" +
        (f"..{int(m.group(4)) + d}" if m.group(3) else ""), text)
