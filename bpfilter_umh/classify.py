"""Classifier for large chains (issue #7): runs of consecutive rules of one shape become one map
lookup whose value names the first matching rule, so a packet costs one lookup instead of one
test per rule, with iptables' first-match order and per-rule counters kept exactly.

API (compile.py calls it where a chain's rules are emitted; tests and the benchmark use it):
  find_runs(rules) -> list[Run]      the runs worth a lookup (consecutive rules of one shape,
                                     at least min_run() of them), in rule order
  min_run() -> int                   the run length from which a lookup is cheaper (cost model
                                     below; BPFILTER_CLASSIFY_MIN_RUN overrides, 0 = never)
  emit_run(cc, run, chain, ret, where)   emit the lookup code for `run` into the chain compiler
                                     `cc` (uses cc.emit/label/where/rule_count, adds a MapSpec
                                     to cc.cls_maps)
  MapSpec                            a map the program needs besides the counters: type, sizes,
                                     flags and every (key, value) to fill in before load
  describe(table) -> {chain: [text]} the classified runs of every chain, for status output

Shapes (decided per rule by rule_shape(); a run ends at the first rule of another shape):
  lpm src / lpm dst   only a source (or only a destination) prefix: `-s 10.1.2.0/24 -j DROP`.
                      BPF_MAP_TYPE_LPM_TRIE keyed {prefixlen, addr}. Each rule's prefix is a key
                      whose value is the FIRST rule of the run (smallest position) among all rules
                      whose prefix contains that key. The longest key matching a packet has as its
                      ancestors exactly the run's rules matching the packet (every matching prefix
                      is a key no longer than it), so its value is the first match.
  lpm6 src / lpm6 dst the same in an IPv6 table (key {prefixlen, 16-byte addr}); a rule with
                      any flag (IP6T_F_PROTO: -p, even -p all), interface, match or jump stays
                      linear.
  hash6               an IPv6 table's port rules: `-p tcp|udp` with one tcp/udp match (ports
                      or ranges), no address, interface or other match: `-p tcp --dport 22 -j
                      ACCEPT`. BPF_MAP_TYPE_HASH keyed {u8 proto; u8 0; u16 sport; u16 dport;
                      u16 0} (the second word of the IPv4 hash key), filled as hash runs are.
                      A failed extension-header walk hotdrops (ip6_packet_match: the run's
                      first rule walks); then the tcp/udp checks as below. IPv6 tables get no
                      address hash runs nor multi runs.
  hash                same masks for every rule of the run: source/destination with fixed netmasks,
                      protocol, tcp/udp source and destination port (single port, range, or any;
                      ranges are expanded into keys); `-d 10.0.0.7 -p tcp --dport 443 -j ACCEPT`.
                      BPF_MAP_TYPE_HASH keyed by the packet's masked tuple; a packet matches a rule
                      exactly when its key is among the rule's keys, and keys are filled in rule
                      order keeping the first, so the value is the first match.
  multi               a stretch of rules of several of those shapes interleaved (source prefix,
                      destination prefix, protocol, tcp/udp ports, any combination; verdict
                      targets). Split form (up to SPLIT_MAX_SHAPES shapes): one lookup per shape,
                      each giving that shape's first match, behind a prefilter that skips most
                      lookups that would miss; the smallest position wins. Bitmap form: per-field
                      lookups return rule bitmaps, their AND's lowest set bit is the first match
                      (see "multi-field runs" below). Chosen when cheaper than the plain runs and
                      linear rules it replaces (cost model below).
Targets in a run: ACCEPT, DROP, RETURN, gotos, and jumps (hash runs; extensions stay linear).
Map value: struct { u32 position; u32 action; } (action 0 DROP, 1 ACCEPT, 2 RETURN, 3 + k the
k-th jump rule of the run): the counter increment uses the run's first entry index + the position
from the map, so counters stay per rule, and the map's contents do not depend on where the run
sits in the table (an unchanged run keeps its map across SET_REPLACE: map_spec, engine
create_maps). A jump's target chain is inlined once per jump rule behind a binary decision tree
on k (kube-proxy / docker fan-out: one lookup picks the service chain; past GLOBAL_ABOVE
instructions the cases become BPF global functions, see _global_cases; a function whose cases
did not change is kept for the next compile with its counter keys moved, see _FN_CACHE; target
chains holding the same rules share one function told their entries by a case map, see
_shared_cases). When
the target chain RETURNs, ipt_do_table continues with the rule after the jump; within the run the
next rule that can match is static: a jump rule has exactly one key (single ports, no ranges), the packet's key is
that key, so the next match is the next rule of the run holding the same key (Run.next_same),
whose counter and target are emitted as straight code; none left means the run is over. Gotos
push nothing (IPT_F_GOTO): their chain returns to the caller of this chain, so LPM runs may hold
gotos too.

tcp/udp semantics kept (net/netfilter/xt_tcpudp.c tcp_mt/udp_mt): a rule `-p tcp -m tcp` tests
the fragment offset and the header before its ports, so the first rule of the run whose protocol
equals the packet's decides: a non-first fragment matches no rule of the run (and tcp at offset
8 bytes is hotdropped), a truncated header is hotdropped. That is independent of which rule comes
first, so the check runs once before the lookup; a hotdrop counts nothing, like ipt_do_table.

Cost model (ns per packet, measured with BPF_PROG_TEST_RUN on this machine, see bench/results.md):
linear code ≈ LINEAR_NS per rule, a lookup ≈ LOOKUP_NS[kind], a bitmap multi run ≈
MULTI_NS_BASE + MULTI_NS_PER_WORD per 64 rules, a split multi run ≈ SPLIT_NS[kind] per shape
(LOOKUP_NS[kind] against plain runs); a run is classified when its linear cost is above its
lookup cost, a multi run replaces plain runs + linear rules when it is cheaper than them.
Environment (tests, benchmarks): BPFILTER_CLASSIFY_MIN_RUN=N (0 = classifier off),
BPFILTER_CLASSIFY_MULTI=0 (no multi runs), BPFILTER_FN_CACHE=0 (every global function
compiled afresh). A long chain's per-rule answers are lists kept between compiles (vectors()),
asked once per template: rules whose entries differ only in addresses, ports and comments, in
ways no answer tells apart, share the first one's answers (_classes), and map contents read
those fields from the entries' bytes.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import struct
import sys
import weakref
import zlib
from array import array
from dataclasses import dataclass, field
from itertools import accumulate, compress, repeat
from operator import (add, and_, attrgetter, eq, ge, getitem, gt, is_, itemgetter, le, ne, or_,
                      sub, truth)
from typing import Any, Optional

from . import ebpf as E
from . import model as _model
from .ebpf import FP, R0, R1, R2, Label
from .errors import BpfilterError
from .model import (NF_ACCEPT, NF_DROP, XT_RETURN, Jump, Rule, Verdict, moved_from, placed_by,
                    placed_range,
                    policy_indexes)

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1          # LPM tries must be created with it (kernel/bpf/lpm_trie.c)
IPPROTO_TCP, IPPROTO_UDP = 6, 17

LINEAR_NS = 1.2                # per rule of linear code (design.md §5, compile.py's author)
LOOKUP_NS = {"lpm": 60.0, "lpm6": 60.0, "hash": 40.0, "hash6": 40.0}
MAX_KEYS = 1 << 20             # expanded port ranges of one run; beyond that the run stays linear

ACT_DROP, ACT_ACCEPT, ACT_RETURN = 0, 1, 2
ACT_CASE = 3                   # 3 + k: the k-th jump rule of the run (classify.Run.cases)
IPT_F_GOTO = 0x02
ACT_NAMES = {ACT_DROP: "DROP", ACT_ACCEPT: "ACCEPT", ACT_RETURN: "RETURN"}

# Stack slots. IPv4 tables' runs reuse family.py's IPv6-only slots
# (S_SADDR6/S_DADDR6, -352..-320) rather than deepen the main frame: the frames of a call chain
# share 512 bytes (check_max_stack_depth), and compile.py calls user chains as subprograms.
S_CLS_KEY = -336               # 16-byte lookup key
S_CLS_ACT = -344               # the action read from the map value
# the split form's smallest position so far (u32), in S_CLS_ACT's upper half until the action
# goes there: a 4-byte slot off the 8-byte grid, which the verifier keeps as bytes of no known
# value (check_stack_write_fixed_off: STACK_MISC, not a spilled register), so the paths after
# each shape's lookup, hit or miss, meet in one state. Kept in r9, its known -1 and the values
# each hit gave it made every shape's paths distinct states (as we read mark_chain_precision:
# a compare decided by r9's known value makes r9 precise): the verifier walked the mixed
# shape's program of 5 shapes in 4 643 instructions (now 2 352), 16 shapes in 9 519 (13 ms;
# now 1 230, 2 ms)
S_CLS_BEST = S_CLS_ACT + 4
# An IPv6 table's runs (lpm6) cannot use those: S_SADDR6/S_DADDR6 hold the packet's addresses for
# every later rule. Their key {u32 prefixlen; 16 bytes} and action go in compile.py's S_OPT
# (-248..-200), which holds TCP options only while one rule tests --tcp-option (zeroed and
# filled there each time), so it is free between rules: the action at -248, the key's address
# 8-aligned at -232 (the verifier wants aligned stack access) behind its prefixlen at -236.
S_CLS_ACT6 = -248
S_CLS_KEY6 = -236


@dataclass
class MapSpec:
    """A map compile.py output needs besides the counters; the engine creates and fills it before
    load (engine.create_maps)."""
    name: str                  # the symbolic name ld_map_fd refers to
    map_type: int
    key_size: int
    value_size: int
    entries: list              # [(key bytes, value bytes)]
    flags: int = 0
    kname: str = "bpfilter_cls"  # the name the kernel shows (BPF_OBJ_NAME_LEN - 1 chars)

    @property
    def max_entries(self) -> int:
        return max(1, len(self.entries))


@dataclass
class Run:
    kind: str                  # "lpm", "hash", "lpm6", "hash6" or "multi"
    start: int                 # index in chain.rules of the first rule of the run
    rules: list                # the rules, in order
    sig: tuple                 # the shape all rules share
    protos: tuple = ()         # protocols whose tcp/udp match the run tests (hash runs)
    chain: str = ""            # set by emit_run: names the run's map
    cases: dict = field(default_factory=dict)       # position in run -> k (jump rules)
    next_same: dict = field(default_factory=dict)   # position of a jump -> next position or None
    # the rules' entries in the table compiled are at index + d_index, offset + d_offset (the
    # source's rules of a chain moved whole, read so by compile: model.chain_source)
    d_index: int = 0
    d_offset: int = 0
    placement: object = None   # that chain's model.placement (not made), else None

    @property
    def end(self) -> int:
        return self.start + len(self.rules)

    def text(self, chain: str = "") -> str:
        if self.kind == "multi":
            return _multi_text(self, chain)
        what = "saddr prefix" if self.sig[1:] == ("src",) else \
            "daddr prefix" if self.sig[1:] == ("dst",) else _hash_text(self.sig)
        jumps = f", {len(self.cases)} of them jumps" if self.cases else ""
        return (f"rules {self.start + 1}..{self.end} of {chain or 'chain'} ({len(self.rules)} "
                f"rules{jumps}): one {'hash' if self.kind in _HASHES else 'LPM trie'} lookup on "
                f"{what}")


def _hash_text(sig) -> str:
    _, smsk, dmsk, proto, l4, sp, dp = sig
    parts = []
    if smsk:
        parts.append(f"saddr/{ipaddress.IPv4Address(smsk.to_bytes(4, 'little'))}")
    if dmsk:
        parts.append(f"daddr/{ipaddress.IPv4Address(dmsk.to_bytes(4, 'little'))}")
    if proto:
        parts.append("protocol")
    if sp != "any":
        parts.append("sport")
    if dp != "any":
        parts.append("dport")
    return "(" + ", ".join(parts or ["nothing"]) + ")"


# ------------------------------------------------------------------------------------ shapes

def _le32(addr) -> int:
    return int.from_bytes(addr.packed, "little")


_PLEN = {((1 << 32) - 1) ^ ((1 << (32 - n)) - 1): n for n in range(33)}


def _plen(mask) -> int:
    """The prefix length of a netmask, or -1 when it is not contiguous."""
    return _PLEN.get(int(mask), -1)


def _action(t) -> int:
    if isinstance(t, Jump):
        return ACT_CASE
    if isinstance(t, Verdict):
        if t.verdict == -NF_ACCEPT - 1:
            return ACT_ACCEPT
        if t.verdict == -NF_DROP - 1:
            return ACT_DROP
        if t.verdict == XT_RETURN:
            return ACT_RETURN
    return -1


def _ports_kind(lo: int, hi: int) -> str:
    if lo == 0 and hi >= 0xffff:
        return "any"
    return "exact" if lo == hi else "range"


def _matches(rule: Rule) -> list:
    """The rule's matches that test something: `-m comment` always matches (xt_comment has no
    match function worth the name; kube-proxy and docker put one on nearly every rule)."""
    return [m for m in rule.matches if not (m.name == "comment" and m.revision == 0)]


def _l4(rule: Rule):
    """(name, payload) of the rule's one tcp/udp match when the classifier can serve it: asked
    by the shape, the multi-run test, the key count and the keys of every rule (memoized: the
    payload's fields are read from a construct Container, ~7 us a rule)."""
    return _memo("l4", rule, _l4_of)


def _l4_of(rule: Rule):
    from .compile import _payload
    ms = _matches(rule)
    if len(ms) != 1:
        return None
    m = ms[0]
    if m.revision != 0 or m.name not in ("tcp", "udp"):
        return None
    want = IPPROTO_TCP if m.name == "tcp" else IPPROTO_UDP
    if rule.ip.proto != want:
        return None
    d = _payload(m)
    if d["invflags"]:
        return None
    if m.name == "tcp" and (d["flg_mask"] or d["flg_cmp"] or d["option"]):
        return None
    return m.name, d


# Per-rule answers memoized on the entry's bytes (model.py sets Rule.cache_key on decoded rules:
# the bytes without comefrom and counters), so a table that changed in one rule does not
# re-derive the other 9 999 (issue #7). Bounded: cleared when full.
_MEMO: dict = {}
MEMO_MAX = 1 << 19


def _memo(kind: str, rule: Rule, fn):
    key = getattr(rule, "cache_key", None)
    if key is None:
        return fn(rule)
    k = (kind, key)
    try:
        return _MEMO[k]
    except KeyError:
        if len(_MEMO) >= MEMO_MAX:
            _MEMO.clear()
        v = _MEMO[k] = fn(rule)
        return v


def rule_shape(rule: Rule):
    """The shape key of a rule the classifier can serve, or None (the rule stays linear)."""
    return _memo("class", rule, _rule_class)[0]


def multi_ok(rule: Rule) -> bool:
    """Can the rule be part of a multi run (see "multi-field runs" below)?"""
    return _memo("class", rule, _rule_class)[1]


_NO_CLASS = (None, False, 0)


def _rule_class(rule: Rule) -> tuple:
    """(rule_shape, multi_ok, hash keys of its tcp/udp ports when its shape has them, else 0)
    of a rule: the checks these share (interfaces, addresses, the tcp/udp match) made once,
    ~10 us a rule at 10 000 rules."""
    ip = rule.ip
    if isinstance(ip.src, ipaddress.IPv6Address):
        return _rule_class6(rule)
    if ip.invflags or any(ip.iniface_mask) or any(ip.outiface_mask) or getattr(ip, "tos", 0) \
            or not isinstance(ip.src, ipaddress.IPv4Address):
        return _NO_CLASS
    s, sm, d, dm = int(ip.src), int(ip.smsk), int(ip.dst), int(ip.dmsk)
    if s & ~sm or d & ~dm:            # (addr & msk) != src for every packet: never matches
        return _NO_CLASS
    ms = _matches(rule)
    l4 = _l4(rule) if ms else None
    t = rule.target
    a = _action(t)
    shape = _shape(ip, t, a, sm, dm, ms, l4)
    nkeys = len(_port_values(l4[1], "spts")) * len(_port_values(l4[1], "dpts")) \
        if shape is not None and shape[0] == "hash" and shape[4] else 0
    return shape, _multi(ip, a, sm, dm, ms, l4), nkeys


_ALL6 = (1 << 128) - 1


def _plen6(mask) -> int:
    """The prefix length of an IPv6 netmask, or -1 when it is not contiguous."""
    host = ~int(mask) & _ALL6
    return -1 if host & (host + 1) else 128 - host.bit_length()


def _rule_class6(rule: Rule) -> tuple:
    """An ip6t_ip6 rule's class: a source or a destination prefix and nothing else (lpm6: no
    interface, no flags: IP6T_F_PROTO makes even `-p all` walk the extension headers and
    hotdrop a failed walk; no match but comments), or `-p tcp|udp` and its ports and nothing
    else (hash6); ACCEPT, DROP or RETURN. IPv6 tables get no address hash runs nor multi runs:
    a 5-tuple key of two 16-byte addresses is another layout than the IPv4 one these read
    from the entries' bytes (not done, issue #7's note)."""
    ip = rule.ip
    if ip.invflags or any(ip.iniface_mask) or any(ip.outiface_mask) \
            or _action(rule.target) not in (ACT_DROP, ACT_ACCEPT, ACT_RETURN):
        return _NO_CLASS
    if ip.flags:
        return _rule_class6_ports(rule)
    if _matches(rule):
        return _NO_CLASS
    sp, dp = _plen6(ip.smsk), _plen6(ip.dmsk)
    if dp == 0 and sp >= 0:
        return ("lpm6", "src"), False, 0
    if sp == 0 and dp >= 0:
        return ("lpm6", "dst"), False, 0
    return _NO_CLASS


def _rule_class6_ports(rule: Rule) -> tuple:
    """hash6: IP6T_F_PROTO alone, protocol tcp or udp, no address (a zero mask: the address
    bits are masked away, ipv6_masked_addr_cmp), its one tcp/udp match (_l4). The shape reads
    as an IPv4 hash shape's without addresses, so the port rules of both families share the
    key counting and the run text."""
    from .family import IP6T_F_PROTO
    ip = rule.ip
    if ip.flags != IP6T_F_PROTO or int(ip.smsk) or int(ip.dmsk):
        return _NO_CLASS
    l4 = _l4(rule)
    if l4 is None:
        return _NO_CLASS
    sp, dp = _ports_kind(*l4[1]["spts"]), _ports_kind(*l4[1]["dpts"])
    shape = ("hash6", 0, 0, True, True, "any" if sp == "any" else "port",
             "any" if dp == "any" else "port")
    return shape, False, len(_port_values(l4[1], "spts")) * len(_port_values(l4[1], "dpts"))


def _shape(ip, t, a: int, sm: int, dm: int, ms: list, l4):
    if a < 0 or ip.flags & ~IPT_F_GOTO:
        return None
    goto = bool(ip.flags & IPT_F_GOTO) or bool(getattr(t, "goto", False))
    if goto and not isinstance(t, Jump):
        return None
    returns = isinstance(t, Jump) and not goto      # its chain may RETURN into the run
    if not ip.proto and not ms and not returns:
        if dm == 0 and _PLEN.get(sm, -1) >= 0:
            return ("lpm", "src")
        if sm == 0 and _PLEN.get(dm, -1) >= 0:
            return ("lpm", "dst")
    if ms and l4 is None:
        return None
    sp = _ports_kind(*l4[1]["spts"]) if l4 else "any"
    dp = _ports_kind(*l4[1]["dpts"]) if l4 else "any"
    if returns and "range" in (sp, dp):
        return None                                  # its continuation would depend on the port
    return ("hash", _le32(ip.smsk), _le32(ip.dmsk), bool(ip.proto), bool(l4),
            "any" if sp == "any" else "port", "any" if dp == "any" else "port")


def _multi(ip, a: int, sm: int, dm: int, ms: list, l4) -> bool:
    if a not in (ACT_DROP, ACT_ACCEPT, ACT_RETURN) or ip.flags:
        return False
    if _PLEN.get(sm, -1) < 0 or _PLEN.get(dm, -1) < 0:
        return False
    if not ms:
        return True
    if l4 is None:
        return False
    d = l4[1]
    return all(len(_port_values(d, f)) <= MAX_PORTS_PER_RULE or
               tuple(d[f]) == (0, 0xffff) or (d[f][0] == 0 and d[f][1] >= 0xffff)
               for f in ("spts", "dpts"))


def min_run() -> int:
    env = os.environ.get("BPFILTER_CLASSIFY_MIN_RUN")
    if env is not None:
        n = int(env)
        return n if n > 0 else 1 << 62
    return int(min(LOOKUP_NS.values()) / LINEAR_NS) + 1


# ---- a new chain's tries made ahead of its compile (issue #7: a cold blocklist restore) --------
# A new LPM run's trie is filled by the engine's worker from the moment its MapSpec is made
# (SPEC_MADE), and that fill (~10-17 ms of trie_update_elem for 10 000 prefixes) was the
# install's last wait. The compile makes the spec when it emits the run, after the walk that keys
# the program (compile._program_key: the rest of the walk and the chain's facts, ~2 ms) and the
# compile's start; a chain whose vectors were made cold (no older chain like it: its program
# cannot be a kept one, the walk's keys being new) has its runs found and its tries' specs made
# as soon as its vectors are (early_lpm_maps), and the compile takes those very runs
# (chain_runs), so the same MapSpec (_RUN_SPECS), and finds them once. A built-in chain's own
# rules only: the compile finds them first anyway (its body comes before the user chains'), so
# the runs found for other chains (_keep_seen_runs' _SEEN_RUNS) are the same ones in the same
# order, and so is the compiled output. Only while an engine install compiles (_EARLY_RUNS set
# by compile_table when SPEC_MADE is): a compile without a fill to start does nothing earlier.
# {id(rules): (rules, runs)}.
_EARLY_RUNS = None
EARLY_LPM_MIN = 256         # rules of a run from which its trie is made early (the engine's
                            # early fill: Engine.EARLY_FILL_MIN entries)


def early_lpm_maps(rules: list, chain: str, vec) -> None:
    """The runs of a chain's rules found now, and the MapSpec of each long LPM run made (the
    engine starts its fill), when an install compiles, the chain's vectors `vec` were made
    cold and it has rules enough for a run; the compile of the chain takes them (chain_runs)."""
    early = _EARLY_RUNS
    if early is None or vec is None or not vec.cold or len(rules) < max(min_run(),
                                                                        EARLY_LPM_MIN):
        return
    if id(rules) in early:
        return
    runs = find_runs(rules)
    early[id(rules)] = (rules, runs)
    for run in runs:
        if run.kind in ("lpm", "lpm6") and len(run.rules) >= EARLY_LPM_MIN:
            map_spec(run, f"cls_{chain}_{run.start}")       # emit_run's name for its map


def chain_runs(rules: list) -> list:
    """find_runs(rules): the runs early_lpm_maps found for this very list in this compile
    (once: a chain compiled twice gets its own runs the second time), else found now."""
    early = _EARLY_RUNS
    if early:
        hit = early.pop(id(rules), None)
        if hit is not None and hit[0] is rules:
            return hit[1]
    return find_runs(rules)


def find_runs(rules: list, minimum: int = None) -> list:
    """The runs to serve with lookups, in order: maximal runs of consecutive rules of one shape
    (at least `minimum` long), or multi runs where rules of several shapes mix."""
    minimum = min_run() if minimum is None else minimum
    vec = vectors(rules)
    plain = _plain_runs(rules, minimum, vec)
    if os.environ.get("BPFILTER_CLASSIFY_MULTI", "1") == "0":
        return _keep_seen_runs(plain, minimum, vec)
    return _keep_seen_runs(_with_multi(rules, plain, minimum, vec), minimum, vec)


# ---- per-rule facts of a long chain as lists, kept between compiles (issue #7) -----------------
# find_runs and the compiler walk a 10 000-rule chain several times per compile, asking each rule
# its shape, whether a multi run may hold it, its action...: ~1 us per rule and question even
# memoized on the rule's bytes (_memo). A chain that changed in a few rules shares a prefix and
# a suffix of its rules' cache_keys with a chain seen before, so its facts are that chain's
# lists with the middle computed anew, and the walks become list operations (slices, set(),
# list.index) on them. Same answers as asking each rule (every fact is a function of the rule's
# bytes: model.py's cache_key includes whether a standard target jumps, not where to).
VEC_MIN = 256                  # shorter chains ask their rules directly
VECS_MAX = 8
_VECS: list = []               # recent _Vecs, newest last
_VEC_SCOPE = None              # {id(rules): (rules, _Vecs)} during one compile_table
_SHAPE_IDS: dict = {}          # shape -> small int (None -> -1), so a set of shapes is cheap
_SHAPES: list = []


class _Vecs:
    __slots__ = ("keys", "sid", "multi", "jump", "act", "l4keys", "cls", "more", "cold")

    def __init__(self, keys):
        self.keys = keys
        self.cls = None         # [_Class or None] of the rules (rules of one template)
        self.more = {}          # kind -> list, or (the older chain's _Vecs, prefix, suffix)
        self.cold = False       # made without an older chain's lists (early_lpm_maps)


def _shape_id(shape) -> int:
    if shape is None:
        return -1
    i = _SHAPE_IDS.get(shape)
    if i is None:               # a handful of distinct shapes (masks x fields): never cleared,
        i = _SHAPE_IDS[shape] = len(_SHAPES)        # the kept lists hold these numbers
        _SHAPES.append(shape)
    return i


def _rule_facts(r):
    """(shape id, multi_ok, jumps, action, tcp/udp keys when its shape has them, else 0)."""
    shape, multi, nkeys = _memo("class", r, _rule_class)
    return (_shape_id(shape), multi, isinstance(r.target, Jump), _action(r.target), nkeys)


# ---- rules of one template (issue #7: a cold compile of 10 000 rules) -------------------------
# Asking each rule of a restored 10 000-rule chain its facts (_rule_class reads decoded fields:
# 15-30 us a rule) was most of a cold compile. The rules of a large chain differ mostly in their
# key fields: addresses, ports, a comment's text. Every answer is a function of the rule's entry
# bytes (cache_key), and the answers read those key fields only through a few predicates, so
# rules whose bytes are equal outside the key fields (their template) and whose key fields give
# the same predicates (their value class) have the same answers: the first rule of a (template,
# class) is asked, the others take its answers after one dict lookup (~2 us a rule).
# The key fields, and all that is read of them:
#   ipt_ip.src, .dst         (src & ~smsk) == 0 and (dst & ~dmsk) == 0 (_rule_class: bits
#                            outside the mask never match), src != 0, dst != 0 (compile._reads)
#   xt_tcp/xt_udp rev 0      spts, dpts: "any" (lo 0, hi 65535 or more), else the number of
#                            ports hi - lo + 1 (1 is an exact port, 0 an empty range): what
#                            _ports_kind, _port_values and MAX_PORTS_PER_RULE make of them
#   xt_comment rev 0         nothing: _matches and compile.py skip it by name and revision
# Masks, interfaces, protocol, flags, other matches and the target's bytes are in the template.
# The column() (and column_set()) kinds answered so (the functions' reads of the key fields are
# the ones above): TEMPLATE_KINDS. A key that is not an IPv4 entry's (model._entry_key) has no
# template; the first rule of a class is checked against its key, a mismatch sends its class the
# slow way. A chain's value classes are read a byte column of all its keys of one length at a
# time, as keys of the layout of the first of them (_layout_codes: a small int per rule,
# _vc_code), and each rule is then one dict lookup (_classes_coded; the first rule of a class is
# checked to be of that layout, the keys of another layout are read as keys of theirs); rules
# whose class needs its port ranges' sizes, or bits outside a mask, are read one by one.
_KEY_TOFF, _KEY_NOFF = 88, 90  # ipt_entry.target_offset, next_offset (u16) in the key
_KEY_ELEMS = 92                # the key is the entry without comefrom (4) and counters (16):
_KEY_CUT = 20                  # its elems[] (entry offset 112) start here
_XT_HDR = 32                   # struct xt_entry_match / xt_entry_target: u16 size, name[29], u8 rev
_PORT_MATCHES = {b"tcp".ljust(29, b"\0"), b"udp".ljust(29, b"\0")}   # 48 bytes, spts/dpts first
_COMMENT = b"comment".ljust(29, b"\0")
_ADDRS = struct.Struct("<4I").unpack_from          # src, dst, smsk, dmsk as LE u32 (as _le32)
_BE_ADDRS = struct.Struct(">4I").unpack_from       # the same as ints (int(IPv4Address))
_KEY_PROTO = 80                                    # ipt_ip.proto (u16)
_PROTO = struct.Struct("=H").unpack_from
_PORTS = struct.Struct("=4H").unpack_from          # spts[2], dpts[2], native endian (xt_tcpudp.h)
TEMPLATE_KINDS = {"scan": "_reads", "kept": "_rule_kept_ok"}   # kind -> compile.py's function
_LAYOUTS: dict = {}            # key[88:124] -> _Layout, or _WALK: more than one match
_LAYOUT_OF: dict = {}          # (n, kept byte ranges, port offsets) -> its one _Layout
_CLASSES: dict = {}            # (layout, template pieces, value class) -> _Class
TPL_MAX = 1 << 16
_WALK = object()


class _Layout:
    """Where the key fields of a key of n bytes are: `cut(key)` gives the template's pieces
    (the bytes around them), `ports` are the offsets of the masked tcp/udp matches' spts."""
    __slots__ = ("n", "cut", "ports", "out")

    def __init__(self, n, cut, ports):
        self.n, self.cut, self.ports = n, itemgetter(*cut), ports
        out, at = [], 0             # (start, end) of the bytes the template leaves out
        for piece in cut:
            if piece.start > at:
                out.append((at, piece.start))
            at = piece.stop
        if at < n:
            out.append((at, n))
        self.out = tuple(out)


class _Class:
    """The rules of one template and value class: the first one (rep), its answers, the
    template's layout (where map contents read each rule's key fields from its key)."""
    __slots__ = ("rep", "facts", "more", "lay")

    def __init__(self, rep, facts, lay):
        self.rep, self.facts, self.more, self.lay = rep, facts, {}, lay


def _walk_layout(key: bytes):
    """(_Layout of an IPv4 entry's key or None, how many matches it has)."""
    n = len(key)
    if n < _KEY_ELEMS + _XT_HDR or (key[_KEY_NOFF] | key[_KEY_NOFF + 1] << 8) != n + _KEY_CUT:
        return None, 0
    end = (key[_KEY_TOFF] | key[_KEY_TOFF + 1] << 8) - _KEY_CUT     # the target's offset
    if end < _KEY_ELEMS or end + _XT_HDR > n:
        return None, 0
    masked, ports, off, count = [(0, 8)], [], _KEY_ELEMS, 0
    while off < end:
        size = key[off] | key[off + 1] << 8
        if size < _XT_HDR or off + size > end:
            return None, 0
        name, rev = key[off + 2:off + 31], key[off + 31]
        if rev == 0 and size == _XT_HDR + 16 and name in _PORT_MATCHES:
            masked.append((off + _XT_HDR, off + _XT_HDR + 8))
            ports.append(off + _XT_HDR)
        elif rev == 0 and name == _COMMENT:
            masked.append((off + _XT_HDR, off + size))
        off += size
        count += 1
    keep = tuple((b, a) for (_, b), (a, _) in zip(masked, masked[1:] + [(n, n)]) if b < a)
    k = (n, keep, tuple(ports))
    lay = _LAYOUT_OF.get(k)
    if lay is None:                 # one object per layout: it is part of the template
        if len(_LAYOUT_OF) >= TPL_MAX:
            _LAYOUT_OF.clear()
        lay = _LAYOUT_OF[k] = _Layout(n, tuple(slice(b, a) for b, a in keep), tuple(ports))
    return lay, count


def _layout(key: bytes):
    # an entry with at most one match: its layout is known from target_offset, next_offset and
    # the first element's header (one dict lookup); with more, the matches are walked each time
    head = key[_KEY_TOFF:_KEY_ELEMS + _XT_HDR]
    lay = _LAYOUTS.get(head)
    if lay is None:
        lay, count = _walk_layout(key)
        if lay is not None:
            if len(_LAYOUTS) >= TPL_MAX:
                _LAYOUTS.clear()
            _LAYOUTS[head] = lay if count <= 1 else _WALK
        return lay
    if lay is _WALK:
        return _walk_layout(key)[0]
    return lay if len(key) == lay.n else None


def _port_class(lo: int, hi: int) -> int:
    return -1 if lo == 0 and hi >= 0xffff else max(0, hi - lo + 1)


def _class_of(r, key: bytes):
    """The _Class of rule r (key: its cache_key), or None when it has none (its facts are
    asked of it)."""
    lay = _layout(key)
    if lay is None:
        return None
    s, d, sm, dm = _ADDRS(key)
    vc = (not (s & ~sm or d & ~dm), s != 0, d != 0)
    for p in lay.ports:
        a, b, c, e = _PORTS(key, p)
        vc += (_port_class(a, b), _port_class(c, e))
    k = (lay, lay.cut(key), _vc_code(vc))
    got = _CLASSES.get(k)
    if got is None:
        if len(_CLASSES) >= TPL_MAX:
            _CLASSES.clear()
        got = _CLASSES[k] = _Class(r, _rule_facts(r), lay) if _key_is_rule(r, key, lay) \
            else _Class(None, None, None)
    return got if got.rep is not None else None


# An IPv6 entry's key (model._entry_key: ip6t_entry without comefrom and counters): ip6t_ip6's
# src 0..16, dst 16..32, then masks, interfaces, proto, flags (the template) up to 136,
# nfcache, target_offset at 140, next_offset at 142, the 4 bytes after comefrom, elems from
# 148. Its classes are made rule by rule (no byte columns): the template is the key without
# the addresses and the tcp/udp ports and comment text, the value class whether src and dst
# are zero (compile._reads) and the ports' _port_class. _rule_class6 reads no address bit:
# the IPv6 masked compare (ipv6_masked_addr_cmp) has no never-matching address.
_KEY6_TOFF, _KEY6_NOFF, _KEY6_ELEMS = 140, 142, 148
_Z16 = bytes(16)


def _walk6(key: bytes):
    """(offsets of the tcp/udp matches' spts in the key, (start, end) of each rev-0 comment's
    text) of an IPv6 rule's key, or None when its offsets do not read as an entry's."""
    n = len(key)
    if n < _KEY6_ELEMS + _XT_HDR or (key[_KEY6_NOFF] | key[_KEY6_NOFF + 1] << 8) != n + _KEY_CUT:
        return None
    end = (key[_KEY6_TOFF] | key[_KEY6_TOFF + 1] << 8) - _KEY_CUT     # the target's offset
    if end < _KEY6_ELEMS or end + _XT_HDR > n:
        return None
    ports, comments, off = [], [], _KEY6_ELEMS
    while off < end:
        size = key[off] | key[off + 1] << 8
        if size < _XT_HDR or off + size > end:
            return None
        name, rev = key[off + 2:off + 31], key[off + 31]
        if rev == 0 and size == _XT_HDR + 16 and name in _PORT_MATCHES:
            ports.append(off + _XT_HDR)
        elif rev == 0 and name == _COMMENT:
            comments.append((off + _XT_HDR, off + size))
        off += size
    return ports, comments


def _class6_of(r, key: bytes):
    """The _Class of IPv6 rule r (key: its cache_key), or None (asked of the rule itself)."""
    walk = _walk6(key)
    if walk is None:
        return None
    ports, comments = walk
    vc = [key[:16] != _Z16, key[16:32] != _Z16]
    cuts = [(p, p + 8) for p in ports]
    for p in ports:
        a, b, c, e = _PORTS(key, p)
        vc += (_port_class(a, b), _port_class(c, e))
    pieces, at = [], 32
    for lo, hi in sorted(cuts + comments):
        pieces.append(key[at:lo])
        at = hi
    pieces.append(key[at:])
    k = ("ip6", tuple(pieces), tuple(vc))
    got = _CLASSES.get(k)
    if got is None:
        if len(_CLASSES) >= TPL_MAX:
            _CLASSES.clear()
        got = _CLASSES[k] = _Class(r, _rule_facts(r), None) \
            if _key_is_rule6(r, key, ports) else _Class(None, None, None)
    return got if got.rep is not None else None


def _classes6(rules: list, keys: list) -> list:
    """[_class6_of(rule, key)] of an IPv6 chain's rules. Rules whose keys are equal past the
    addresses, and whose src and dst are zero alike, have one class (_class6_of cuts the
    addresses out and reads nothing else of them): that class is asked of the first rule of
    each such group only, the groups found by C loops over the keys. A 10 000-prefix
    blocklist: a dozen groups, where each rule's _walk6 and class key took ~3 ms."""
    n = len(keys)
    sample = keys[::max(1, n // 64)]
    if n < CLASSES6_GROUPED_MIN or \
            4 * len(set(map(getitem, sample, repeat(_FROM_32)))) > len(sample):
        # (most of 64 keys spread over the chain differ past the addresses: ports6's rules)
        return list(map(_class6_of, rules, keys))
    groups = list(zip(map(getitem, keys, repeat(_FROM_32)),
                      map(ne, map(getitem, keys, repeat(_SRC6)), repeat(_Z16)),
                      map(ne, map(getitem, keys, repeat(_DST6)), repeat(_Z16))))
    # each group's first rule: a dict made from the end keeps the first index of each
    first = dict(zip(reversed(groups), range(n - 1, -1, -1)))
    if 4 * len(first) > n:          # most rules a group of their own (ports6): one by one
        return list(map(_class6_of, rules, keys))
    # (in the rules' order, as _class6_of one by one makes each class of its first rule)
    cls = {g: _class6_of(rules[i], keys[i]) for g, i in sorted(first.items(), key=_ITEM1)}
    return list(map(cls.__getitem__, groups))


CLASSES6_GROUPED_MIN = 64
_FROM_32, _SRC6, _DST6 = slice(32, None), slice(0, 16), slice(16, 32)


def _key_is_rule6(r, key: bytes, ports: list) -> bool:
    """Does the key read as IPv6 rule r's entry where its key fields are (ports: _walk6's)?"""
    ip = r.ip
    if ip.src.packed != key[:16] or ip.dst.packed != key[16:32]:
        return False
    from .compile import _payload
    got = [tuple(d["spts"]) + tuple(d["dpts"]) for d in
           (_payload(m) for m in r.matches if m.revision == 0 and m.name in ("tcp", "udp"))]
    return got == [_PORTS(key, p) for p in ports]


def _key_is_rule(r, key: bytes, lay: _Layout) -> bool:
    """Does the key read as rule r's entry (an IPv4 one) where its key fields are?"""
    ip = r.ip
    if not isinstance(ip.src, ipaddress.IPv4Address):
        return False
    if (int(ip.src), int(ip.dst), int(ip.smsk), int(ip.dmsk)) != _BE_ADDRS(key):
        return False
    ports = [_PORTS(key, p) for p in lay.ports]
    got = []
    for m in r.matches:
        if m.revision == 0 and m.name in ("tcp", "udp") and not isinstance(m.data, (bytes,
                                                                                    bytearray)):
            d = m.data
            got.append(tuple(d["spts"]) + tuple(d["dpts"]))
    return len(got) == len(ports) and got == [tuple(p) for p in ports]


def _vc_code(vc: tuple):
    """The value class in _CLASSES' keys: the small int _layout_codes reads from the bytes when
    there is one (valid addresses, at most two tcp/udp matches, every range one port or any:
    bit 0 set, bit 1 src != 0, bit 2 dst != 0, bit 3 + k: the k-th range is any), else the
    tuple (ranges of several ports keep their size; such a rule's code has SLOW_CODE)."""
    if not vc[0] or len(vc) > 7:
        return vc
    code = 1 | vc[1] << 1 | vc[2] << 2
    for k, pc in enumerate(vc[3:]):
        if pc == -1:
            code |= 8 << k
        elif pc != 1:
            return vc
    return code


SLOW_CODE = 0x80               # _layout_codes: the rule's class is its tuple (_class_of)
_NONZERO = bytes([0]) + bytes([1]) * 255            # bytes.translate: 1 where a byte is not 0
CLASS_GROUPS_MAX = 8           # key lengths in one chain (and layouts of one length) read by
                               # _layout_codes, past that each rule


def _layout_codes(lay: _Layout, keys: list):
    """[_vc_code] of keys of layout lay as bytes (SLOW_CODE where it is a tuple), or None
    (keys of another length than lay's, more than two tcp/udp matches). The keys are all of
    one length (_classes_of_length's). Read a byte column at a time:
    byte j of every key is one strided slice of the keys joined, as a big int its bits 8i..8i+7
    are key i's byte, so an AND, OR or XOR of columns is the byte operation on every key at
    once and bytes.translate makes each byte a 0/1 flag (~1 ms for 10 000 keys where reading
    each key's fields takes ~5)."""
    m, n = len(keys), lay.n
    # (keys of one length: the first one's length is every one's, not asked of each key again,
    # ~0.4 ms of a cold blocklist's 10 000; the joined length checks it once more)
    if len(lay.ports) > 2 or not keys or len(keys[0]) != n:
        return None
    joined = b"".join(keys)
    if len(joined) != m * n:
        return None
    scope = _VEC_SCOPE
    if scope is not None:           # for the LPM runs of these keys (_joined_keys)
        scope[_JOINED] = (keys, n, joined)
    ones = (1 << 8 * m) - 1

    def col(j):
        return int.from_bytes(joined[j::n], "little")

    def flags(x):
        return int.from_bytes(x.to_bytes(m, "little").translate(_NONZERO), "little")

    s, d, sm, dm = ([col(j) for j in range(at, at + 4)] for at in (0, 4, 8, 12))
    outside = 0                     # address bits outside the mask: the rule never matches
    for a, mk in zip(s + d, sm + dm):
        outside |= a & (mk ^ ones)
    code = flags(ones) | flags(s[0] | s[1] | s[2] | s[3]) << 1 | \
        flags(d[0] | d[1] | d[2] | d[3]) << 2 | flags(outside) << 7
    bit = 3
    for p in lay.ports:
        for at in (p, p + 4):       # spts, dpts: u16 lo, hi (native order: only compared)
            lo0, lo1, hi0, hi1 = (col(at + j) for j in range(4))
            many = flags((lo0 ^ hi0) | (lo1 ^ hi1))          # not one port
            some = flags(lo0 | lo1 | (hi0 ^ ones) | (hi1 ^ ones))   # not 0..65535
            code |= many << bit | (many & some) << 7
            bit += 1
    return code.to_bytes(m, "little")


def _classes(rules: list, keys: list) -> list:
    """[_class_of(rule, key)] of rules (keys: their cache_keys): the keys of each length read
    a column at a time (_layout_codes) as keys of the layout of the first of them, one dict
    lookup a rule (_classes_coded: a class's first rule checked to be of that layout); a chain
    of many lengths (or keys _layout_codes refuses) rule by rule."""
    n = len(keys)
    groups = set(map(len, keys))
    if len(groups) > CLASS_GROUPS_MAX:
        return _classes_each(rules, keys)
    if len(groups) == 1:            # (the lengths not listed: ~0.4 ms of a cold 10 000)
        return _classes_of_length(rules, range(n), keys, CLASS_GROUPS_MAX)
    lens = list(map(len, keys))
    out = [None] * n
    for size in groups:
        pos = list(compress(range(n), map(eq, lens, repeat(size))))
        ks = list(map(keys.__getitem__, pos))
        got = _classes_of_length(rules, pos, ks, CLASS_GROUPS_MAX)
        list(map(out.__setitem__, pos, got))
    return out


def _classes_of_length(rules: list, pos, keys: list, tries: int) -> list:
    """The classes of keys (of the rules at `pos`, all of one length) read as keys of the
    layout of the first of them (_classes_coded), the keys of other layouts so in turn, up to
    `tries` layouts; the rest (or keys _layout_codes refuses) rule by rule."""
    lay = _layout(keys[0])
    codes = _layout_codes(lay, keys) if lay is not None and tries > 0 else None
    if codes is None:
        return _classes_each(list(map(rules.__getitem__, pos)), keys)
    return _classes_coded(lay, keys, codes, rules, pos, tries)


def _classes_coded(lay: _Layout, keys: list, codes: bytes, rules: list, pos,
                   tries: int = 1) -> list:
    """The classes of keys (of rules at `pos`, all as long as lay's keys) from their codes
    read as keys of layout lay: one lookup each, the first rule of a class not seen yet made
    its rep (as _class_of would) when its key is of layout lay. Every layout keeps the bytes
    that tell it (the entry's offsets and the match headers: _walk_layout reads no byte a
    layout leaves out), so the keys of a class, equal where lay keeps bytes, are all of its
    rep's layout; keys of another layout (their class's rep is not of lay) are read as keys
    of theirs (_classes_of_length, tries - 1 layouts more), and the keys whose code has
    SLOW_CODE one by one (_classes_each)."""
    classes = _CLASSES
    if len(classes) >= TPL_MAX - len(keys):
        classes.clear()
    got = _classes_by_pair(lay, keys, codes, rules, pos)
    if got is not None:
        return got
    got = []
    append, get, cut = got.append, classes.get, lay.cut
    # A key's class found or made (so in _CLASSES) is the class of every later key of its
    # template and code: the key before's (a fan-out hub's 3 333 jumps are all one template:
    # a bytes compare each), else this chain's last one of the template (`seen`, {template:
    # (code, class)}: a hash of the template alone, where a lookup makes and hashes a tuple)
    last_t = last_c = last = None
    seen = {}
    seen_get = seen.get
    for p, key, code in zip(pos, keys, codes):
        t = cut(key)
        if code == last_c and t == last_t:
            append(last)
            continue
        c = seen_get(t)
        if c is not None and c[0] == code:
            c = c[1]
        else:
            c = get((lay, t, code))
            if c is None:
                if _layout(key) is not lay:
                    c = _ELSEWHERE
                elif not code & SLOW_CODE:      # a class not seen: this rule is its rep
                    r = rules[p]
                    c = classes[(lay, t, code)] = _Class(r, _rule_facts(r), lay) \
                        if _key_is_rule(r, key, lay) else _Class(None, None, None)
            if c is None or c is _ELSEWHERE:
                last_t = None                   # (not in _CLASSES: asked again, as before)
                append(c)
                continue
            seen[t] = (code, c)
        last_t, last_c, last = t, code, c
        append(c)
    # (the classes told apart by identity: a set of them, not a list compared 10 000 times;
    # the keys answered below were None or _ELSEWHERE and get no class without a rep, so it
    # still tells whether got holds one)
    distinct = set(got)
    # the keys of lay whose code has SLOW_CODE: their classes are their tuples'
    slow = list(compress(range(len(got)), map(is_, got, repeat(None)))) \
        if None in distinct else ()
    if _ELSEWHERE in distinct:      # (never the first key: it is of layout lay)
        other = list(compress(range(len(got)), map(is_, got, repeat(_ELSEWHERE))))
        for i, c in zip(other, _classes_of_length(rules, [pos[i] for i in other],
                                                  [keys[i] for i in other], tries - 1)):
            got[i] = c
    if slow:
        for i, c in zip(slow, _classes_each([rules[pos[i]] for i in slow],
                                            [keys[i] for i in slow])):
            got[i] = c
    if any(c is not None and c.rep is None for c in distinct):
        got = [c if c is not None and c.rep is not None else None for c in got]
    return got


_ELSEWHERE = _Class(None, None, None)   # _classes_coded: a key of another layout than lay's


def _classes_by_pair(lay: _Layout, keys: list, codes: bytes, rules: list, pos):
    """_classes_coded's answer as C loops over the keys, or None (then its loop answers; the
    classes made here are the ones it makes: for the same keys, from the same first rules).
    Every key of one (template, code) pair gets the class of the pair's first key once that
    one's class is in _CLASSES (the loop's `last`, `seen` and lookup all answer it), so each
    distinct pair's first key is asked as the loop asks it, in the keys' order, and every key
    is answered by one lookup. A pair whose first key gets no class kept in _CLASSES (a key of
    another layout, SLOW_CODE) is the loop's, whose keys are asked one by one.
    Measured (callgrind, cold compile_table of 10 000 rules): a blocklist's keys are ~15
    templates (the source mask is in the template) changing from a key to the next three
    times in four, so the loop cuts, hashes and compares most keys' templates one at a time:
    one dict of the pairs is ~3.5M instructions less. A fan-out hub's 3 333 keys are one
    pair: there that dict (a hash and a compare of every template, each its own object) cost
    ~4.5M more than the loop, one count of the templates equal to the first ~3M less.
    Both are now _pair_numbers' (a byte a key told from the key bytes' columns, no template
    cut, hashed or compared key by key) where it answers: _classes_by_number."""
    m = len(keys)
    ids = _pair_numbers(lay, keys, codes)
    if ids is not None:
        return _classes_by_number(lay, keys, codes, rules, pos, ids)
    ts = list(map(lay.cut, keys))
    one_code = codes.count(codes[0]) == m
    if one_code and ts[0] == ts[-1] and ts.count(ts[0]) == m:
        tk, first = None, {ts[0]: 0}            # one pair: the first key's class is every key's
    else:
        # (one code for every key, a blocklist's: the template alone tells the pair)
        tk = ts if one_code else list(zip(ts, codes))
        first = dict(zip(reversed(tk), range(m - 1, -1, -1)))     # pair -> its first index
    made = []
    for i in sorted(first.values()):
        c = _pair_class(lay, ts[i], codes[i], keys[i], rules, pos[i])
        if c is None:
            return None
        made.append(c)
        if tk is not None:
            first[tk[i]] = c
    if tk is None:
        c = made[0]
        return [c if c.rep is not None else None] * m
    got = list(map(first.__getitem__, tk))
    if any(c.rep is None for c in made):
        got = [c if c.rep is not None else None for c in got]
    return got


def _pair_class(lay: _Layout, t, code: int, key: bytes, rules: list, p: int):
    """The class of the pair (template t of `lay`, code), made from rules[p] (`key`: its key)
    when first asked; None where _classes_by_pair declines (a slow code, a key of another
    layout). Asked once per distinct pair of a chain, not per key."""
    c = _CLASSES.get((lay, t, code))
    if c is None:
        if code & SLOW_CODE or _layout(key) is not lay:
            return None
        r = rules[p]
        c = _CLASSES[(lay, t, code)] = _Class(r, _rule_facts(r), lay) \
            if _key_is_rule(r, key, lay) else _Class(None, None, None)
    return c


def _classes_by_number(lay: _Layout, keys: list, codes: bytes, rules: list, pos,
                       ids: bytes):
    """_classes_by_pair's answer from the keys' pair numbers (_pair_numbers): each number's
    first key asked in the keys' order (bytes.index), every key then one item of a 256-list
    (itemgetter over the numbers), or None where _classes_by_pair declines."""
    got_of = [None] * 256
    firsts = sorted(map(ids.index, _byte_values(ids)))
    for i in firsts:
        c = _pair_class(lay, lay.cut(keys[i]), codes[i], keys[i], rules, pos[i])
        if c is None:
            return None
        got_of[ids[i]] = c if c.rep is not None else None
    if len(firsts) == 1:
        return [got_of[ids[0]]] * len(keys)
    return list(itemgetter(*ids)(got_of))


# _pair_numbers (issue #7: a cold compile of 10 000 rules): the keys' (template, code) pairs
# told apart without a template a key. All the keys are lay.n bytes long and joined in one
# buffer (_layout_codes joined them); with the bytes the template leaves out set to 0, two keys
# are of one template exactly when they are equal, and a byte column in which some key differs
# from the next is found by comparing the buffer with itself n bytes on (memcmp: bytes.startswith
# of a memoryview slice, halving the range to the first difference), then set to its first
# byte, until no key differs from the next. A chain's keys differ in a few such columns (a
# blocklist: 3, the source mask's bytes and the verdict; a fan-out hub's: none), and each
# column's distinct bytes are few: the pair's number is the codes' and those columns' ranks in
# mixed radix (big-int arithmetic, one digit a byte: no carry while the product of the radixes
# stays below 256). Measured (callgrind, cold compile_table of 10 000 rules): the blocklist's
# _classes_by_pair 22.7 -> 7.0 M instructions (cutting, hashing and looking up 10 000
# templates of ~124 bytes was ~22M, these column operations ~4M), a fan-out hub's 6.3 -> 1.3M.
PAIR_OUT_MAX = 32              # more bytes left out of the template (a comment's text): cut
PAIR_RADIX_MAX = 256           # more pairs than a byte numbers: cut
_ALL_BYTES = bytes(range(256))


def _byte_values(col) -> bytes:
    """The distinct bytes of col, ascending (the bytes that deleting col's from all 256 leaves
    out: two C loops)."""
    return _ALL_BYTES.translate(None, _ALL_BYTES.translate(None, col))


def _ranks(col, vals: bytes) -> int:
    """col with each byte replaced by its rank in vals (col's distinct bytes, ascending), as a
    little-endian int: byte i is key i's."""
    return int.from_bytes(col.translate(bytes.maketrans(vals, _ALL_BYTES[:len(vals)])), "little")


def _pair_numbers(lay: _Layout, keys: list, codes: bytes):
    """A byte a key (keys: at least two, all lay.n bytes long; codes: their _layout_codes),
    equal exactly where the keys' (template, code) pairs are equal, or None (see the
    _PAIR_* limits)."""
    m, n = len(keys), lay.n
    if m < 2 or sum(b - a for a, b in lay.out) > PAIR_OUT_MAX:
        return None
    scope = _VEC_SCOPE
    hit = scope.get(_JOINED) if scope is not None else None
    buf = bytearray(hit[2] if hit is not None and hit[0] is keys else b"".join(keys))
    zeros = bytes(m)
    for a, b in lay.out:
        for j in range(a, b):
            buf[j::n] = zeros
    vals = _byte_values(codes)
    radix = len(vals)                   # every number is below radix
    ids = _ranks(codes, vals) if radix > 1 else 0
    size = len(buf) - n
    with memoryview(buf) as view:
        lo = 0                          # buf[:lo] == buf[n:lo + n]
        while not buf.startswith(view[lo:size], lo + n):
            hi = size                   # the first difference is in lo..hi - 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if buf.startswith(view[lo:mid], lo + n):
                    lo = mid
                else:
                    hi = mid
            j = lo % n
            col = bytes(buf[j::n])
            buf[j::n] = col[:1] * m
            vals = _byte_values(col)
            if radix * len(vals) > PAIR_RADIX_MAX:
                got = ids.to_bytes(m, "little")         # the ranks of the numbers so far
                old = _byte_values(got)
                if len(old) * len(vals) > PAIR_RADIX_MAX:
                    return None
                ids, radix = _ranks(got, old), len(old)
            ids = ids * len(vals) + _ranks(col, vals)
            radix *= len(vals)
    return ids.to_bytes(m, "little")


def _classes_each(rules: list, keys: list) -> list:
    """[_class_of(rule, key)] of rules (keys: their cache_keys), in one loop."""
    out = []
    append, layouts, classes, addrs, ports = out.append, _LAYOUTS, _CLASSES, _ADDRS, _PORTS
    head = slice(_KEY_TOFF, _KEY_ELEMS + _XT_HDR)
    for r, key in zip(rules, keys):
        lay = layouts.get(key[head])
        if lay is None or lay is _WALK or len(key) != lay.n:
            append(_class_of(r, key))
            continue
        s, d, sm, dm = addrs(key)
        vc = (not (s & ~sm or d & ~dm), s != 0, d != 0)
        for p in lay.ports:             # _port_class of spts and dpts
            a, b, c, e = ports(key, p)
            vc += (-1 if a == 0 and b >= 0xffff else b - a + 1 if b >= a else 0,
                   -1 if c == 0 and e >= 0xffff else e - c + 1 if e >= c else 0)
        got = classes.get((lay, lay.cut(key), _vc_code(vc)))
        if got is None:
            append(_class_of(r, key))
        else:
            append(got if got.rep is not None else None)
    return out


def _facts_of(rules: list, cls: list) -> list:
    """[_rule_facts(r)] from the rules' classes where they have one."""
    return [c.facts if c is not None else _rule_facts(r) for r, c in zip(rules, cls)]


def _common_prefix(a: list, b: list) -> int:
    m = min(len(a), len(b))
    if a[:m] == b[:m]:
        return m
    lo, hi = 0, m - 1                    # a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def vectors(rules: list):
    """The _Vecs of `rules` (a chain's rules, every one with a cache_key, at least VEC_MIN of
    them), or None."""
    if len(rules) < VEC_MIN:
        return None
    scope = _VEC_SCOPE
    if scope is not None:
        hit = scope.get(id(rules))
        if hit is not None and hit[0] is rules:
            return hit[1]
    try:
        keys = list(map(_CACHE_KEY, rules))      # (a C loop: a fan-out hub's 3 333 rules)
    except AttributeError:
        return None
    if None in keys:
        return None
    n = len(keys)
    best, bp, bs = None, 0, 0
    for old in reversed(_VECS):              # the newest first: most likely this chain's
        p = _common_prefix(old.keys, keys)
        room = min(len(old.keys), n) - p
        s = _common_prefix(old.keys[::-1][:room], keys[::-1][:room]) if room else 0
        if p + s > bp + bs and 2 * (p + s) >= min(len(old.keys), n):
            best, bp, bs = old, p, s
            if n - (p + s) <= TAIL_MAX:        # a few rules changed: good enough
                break
    v = _Vecs(keys)
    v.cold = best is None
    # the keys are read as IPv4 entries' or IPv6 ones' (a table, so a chain, has one family)
    midc = _classes(rules[bp:n - bs], keys[bp:n - bs]) \
        if isinstance(rules[0].ip.src, ipaddress.IPv4Address) else \
        _classes6(rules[bp:n - bs], keys[bp:n - bs])
    mid = _facts_of(rules[bp:n - bs], midc)
    v.cls = midc if best is None else \
        best.cls[:bp] + midc + (best.cls[len(best.cls) - bs:] if bs else [])
    names = ("sid", "multi", "jump", "act", "l4keys")
    cols = list(zip(*mid)) if mid else [()] * len(names)
    for k, name in enumerate(names):
        col = list(cols[k])
        if best is not None:
            old = getattr(best, name)
            col = old[:bp] + col + (old[len(old) - bs:] if bs else [])
        setattr(v, name, col)
    if best is not None:
        v.more = {kind: (best, bp, bs) for kind in best.more}   # completed on demand (column)
    _put_newest(_VECS, v, best, VECS_MAX)
    if scope is not None:
        scope[id(rules)] = (rules, v)
    return v


def _put_newest(seen: list, item, replaces, cap: int) -> None:
    """`item` put last in `seen` (the newest last, at most `cap`): `replaces` (the entry it
    stands for, or None) taken out first, else the oldest when full."""
    try:
        if replaces is not None:
            seen.remove(replaces)
        elif len(seen) >= cap:
            seen.pop(0)
    except (ValueError, IndexError):     # another thread's compile took it first
        pass
    seen.append(item)


def column(rules: list, vec: "_Vecs", kind: str, fn) -> list:
    """[fn(rule) for rule in rules] (a function of the rule's bytes, memoized per rule as
    _memo(kind)), from the older chain's column where the rules are the same."""
    got = vec.more.get(kind)
    if isinstance(got, list):
        return got
    n = len(rules)
    old = None
    if got is not None:
        older, bp, bs = got
        old = older.more.get(kind)
    if isinstance(old, list):
        out = old[:bp] + _answers(kind, fn, rules[bp:n - bs], vec.cls[bp:n - bs]) + \
            (old[len(old) - bs:] if bs else [])
    else:
        out = _answers(kind, fn, rules, vec.cls)
    vec.more[kind] = out
    return out


def column_set(rules: list, vec: "_Vecs", kind: str, fn) -> set:
    """set(column(rules, vec, kind, fn)): from the rules' distinct classes when every rule has
    one and kind is one of TEMPLATE_KINDS (each class's answer is its rules' answer), without
    a list of one answer a rule (a 10 000-rule chain's column is ~0.8 ms, the set of its
    classes' answers ~0.2)."""
    got = vec.more.get(kind)
    if isinstance(got, list):
        return set(got)
    cls = vec.cls
    if TEMPLATE_KINDS.get(kind) == getattr(fn, "__name__", None) and cls is not None and \
            len(cls) == len(rules):
        distinct = set(cls)
        if None not in distinct:
            for c in distinct:
                if kind not in c.more:
                    c.more[kind] = fn(c.rep)
            return {c.more[kind] for c in distinct}
    return set(column(rules, vec, kind, fn))


def _answers(kind: str, fn, rules: list, cls: list) -> list:
    """[fn(rule)]: asked of each class's first rule for the TEMPLATE_KINDS, else of each rule
    (memoized on its bytes)."""
    if TEMPLATE_KINDS.get(kind) != getattr(fn, "__name__", None):
        return [_memo(kind, r, fn) for r in rules]
    distinct = set(cls)
    for c in distinct:
        if c is not None and kind not in c.more:
            c.more[kind] = fn(c.rep)
    if None not in distinct:        # every rule has a class: no test of each for None
        return [c.more[kind] for c in cls]
    return [c.more[kind] if c is not None else _memo(kind, r, fn) for r, c in zip(rules, cls)]


# ---- appends to a classified run (issue #7: one `iptables -A` on a 10 000-rule table) ----------
# A rule appended where a run ends makes the run one rule longer, and a longer run is a new map
# (an LPM trie has no batch update: 10 000 BPF_MAP_UPDATE_ELEMs). A run that is a run compiled
# before plus at most TAIL_MAX rules after it is served as that run (its MapSpec, so its map, is
# reused: map_spec/_RUN_SPECS) followed by the new rules as linear code. Same verdicts and
# counters: a run is first-match over its rules, so "the first match among A + T" is "the first
# match among A, else the first among T", which is what the run A followed by T's linear code
# does (each part keeps ipt_do_table's per-rule semantics on its own, the tcp/udp hotdrop
# included). Past TAIL_MAX such rules the whole run is built again (and becomes the one seen).
# A multi run served so also keeps what its code needs besides its maps (its form: the split
# shapes with their positions; the tcp/udp protocols), stored beside its MapSpecs
# (_cached_multi_specs, Run.kept), so the append asks none of the run's rules anything.
# _SEEN_RUNS: {(kind, signature, first rule's cache key, length): the rules' cache keys}.
TAIL_MAX = 32
_SEEN_RUNS: dict = {}


def _keep_seen_runs(runs: list, minimum: int, vec=None) -> list:
    out = []
    for run in runs:
        # (the chain's keys from vectors, which takes none with a None among them: `None in`
        # a list of bytes compares each with None, ~150 instructions a key; this scan, _run_key's
        # and _program_key's skipped: a 10 000-rule blocklist append 44.6 -> 39.9 M)
        keys = vec.keys[run.start:run.end] if vec is not None else \
            [getattr(r, "cache_key", None) for r in run.rules]
        if vec is None and None in keys:
            out.append(run)
            continue
        n = len(keys)
        for t in range(1, min(TAIL_MAX, n - minimum) + 1):
            seen = _SEEN_RUNS.get((run.kind, run.sig, keys[0], n - t))
            if seen is not None and seen == tuple(keys[:n - t]):
                run, keys = _run_prefix(run, n - t, vec), keys[:n - t]
                break
        if len(_SEEN_RUNS) >= RUN_SPECS_MAX:
            _SEEN_RUNS.clear()
        _SEEN_RUNS[(run.kind, run.sig, keys[0], len(keys))] = tuple(keys)
        if vec is not None:
            run.keys = tuple(keys)
            run.acts = vec.act[run.start:run.end]
            run.cls = vec.cls[run.start:run.end]
            if run.kind == "multi":
                run._vec = vec              # _run_form from the lists
        out.append(run)
    return out


def _run_prefix(run: Run, m: int, vec=None) -> Run:
    """The run of the first m rules of `run`, as _plain_runs/_with_multi would have made it."""
    out = Run(run.kind, run.start, run.rules[:m], run.sig)
    if run.kind == "multi":
        return out
    if run.kind in _HASHES and run.sig[4]:
        out.protos = tuple(sorted(set(map(_IP_PROTO, out.rules))))
    out.cases = _cases(out.rules, vec, run.start)
    return out


def _same_until(sid: list, i: int) -> int:
    """The end of the stretch of equal values starting at i (blocks compared by list.count,
    doubling: a 10 000-rule run is a few dozen C calls, not 10 000 Python steps)."""
    me, n, j, step = sid[i], len(sid), i + 1, 16
    while j < n:
        k = min(n, j + step)
        block = sid[j:k]
        if block.count(me) == k - j:
            j, step = k, step * 2
            continue
        for x in block:
            if x != me:
                break
            j += 1
        break
    return j


def _cases(rules: list, vec, start: int) -> dict:
    """{position: k} of the jump rules among `rules` (rules start..: of the chain of vec)."""
    if vec is not None:
        where = compress(range(len(rules)), vec.jump[start:start + len(rules)])
    else:
        where = (p for p, r in enumerate(rules) if isinstance(r.target, Jump))
    # the k-th jump's position -> k (C loops: a fan-out hub's 3 333 jumps; zip stops at the
    # last jump)
    return dict(zip(where, range(len(rules))))


def _stretches(sid: list, i: int, minimum: int) -> list:
    """[(start, end)] of the stretches of equal values from i on (the one at i included) at
    least `minimum` long and of a shape (not -1), in C passes over the list: the stretch ends
    are where a value differs from the one before it."""
    n = len(sid)
    cuts = list(compress(range(i + 1, n), map(ne, sid[i + 1:], sid[i:n - 1])))
    return [(a, b) for a, b in zip([i] + cuts, cuts + [n])
            if b - a >= minimum and sid[a] >= 0]


STRETCH_STEPS = 64             # stretches walked one by one before _stretches takes the rest


def _plain_run(rules: list, i: int, j: int, sig, vec):
    """The run of rules[i:j] (all of shape sig), or None when its tcp/udp keys are too many."""
    run = Run(sig[0], i, rules[i:j], sig)
    if run.kind in _HASHES and sig[4]:
        run.protos = tuple(sorted(set(map(_IP_PROTO, run.rules))))
    run.cases = _cases(run.rules, vec, i)
    if run.kind not in _HASHES or (sum(vec.l4keys[i:j]) if vec is not None and sig[4]
                             else _key_count(run)) <= MAX_KEYS:
        return run
    return None


def _plain_runs(rules: list, minimum: int, vec=None) -> list:
    out, i, n = [], 0, len(rules)
    sid = vec.sid if vec is not None else None
    steps = 0
    while i < n:
        if sid is not None:
            steps += 1
            if steps > STRETCH_STEPS:       # many short stretches (mixed shapes): the rest in C
                for a, b in _stretches(sid, i, minimum):
                    run = _plain_run(rules, a, b, _SHAPES[sid[a]], vec)
                    if run is not None:
                        out.append(run)
                break
            sig = _SHAPES[sid[i]] if sid[i] >= 0 else None
        else:
            sig = rule_shape(rules[i])
        j = i + 1
        if sig is not None:
            if sid is None:
                while j < n and rule_shape(rules[j]) == sig:
                    j += 1
            else:
                j = _same_until(sid, i)
            if j - i >= minimum:
                run = _plain_run(rules, i, j, sig, vec)
                if run is not None:
                    out.append(run)
        i = j
    return out


def describe(table) -> dict:
    """{chain name: [run text]} for every chain with classified runs."""
    out = {}
    for c in table.chains:
        runs = find_runs(c.rules)
        if runs:
            out[c.name] = [r.text(c.name) for r in runs]
    return out


# ------------------------------------------------------------------------------- map contents

def _values(run: Run) -> list:
    """The map value of each rule of the run: {u32 position in the run; u32 action}. The
    program adds the run's first entry index (the run's rules are consecutive entries), so the
    map's contents do not change when entries before the run come or go, and an unchanged run
    keeps its map (_RUN_SPECS, engine reuse). The actions come from the chain's lists when the
    run has them (_keep_seen_runs)."""
    pack, cases = _VALUE.pack, run.cases
    return [pack(pos, a + cases[pos] if a == ACT_CASE else a)
            for pos, a in enumerate(_run_acts(run))]


def _run_acts(run: Run) -> list:
    """[_action(rule.target)] of the run's rules."""
    acts = getattr(run, "acts", None)
    if acts is None or len(acts) != len(run.rules):
        acts = [_action(r.target) for r in run.rules]
    return acts


def lpm_entries(run: Run) -> list:
    """[(key, value)]: key = {u32 prefixlen; be32 addr}, value = the first rule (in run order)
    whose prefix contains the key's prefix."""
    n, field = len(run.rules), run.sig[1]
    got = _lpm_seen_like(run, field)
    if got is None:
        codes = _run_prefix_codes(run, field)
        if codes is None:
            keys, bests = _lpm_columns(run.rules, range(n), field, run)
            return list(zip(keys, map(_values(run).__getitem__, bests)))
        keys, bests = _lpm_columns(None, range(n), field, codes=codes)
        got = _LpmSeen(field, getattr(run, "keys", None), codes, keys, bests)
    _put_newest(_LPM_SEEN, got, got if got in _LPM_SEEN else None, LPM_SEEN_MAX)
    keys, (vals, joined) = got.lpm_keys, _best_value_column(run, got.bests)
    out = Entries(zip(keys, vals))
    out.joined = (b"".join(keys), joined)
    return out


class Entries(list):
    """A map's [(key bytes, value bytes)] with its keys and its values each joined in one
    buffer (`joined`), as BPF_MAP_UPDATE_BATCH reads them (engine._fill_batch): made where the
    entries are made, from the same columns, in ~0.2 ms for a 10 000-prefix trie, where
    splitting the pairs again and checking each length cost the fill's start ~1.5 ms on the
    install's main thread (issue #7: a cold blocklist restore's last wait is that trie's fill).
    Every key (value) of one map has the map's key (value) size. A list otherwise: its repr, its
    equality and the MapSpec's are a list's."""
    __slots__ = ("joined",)


def _best_values(run: Run, bests: list):
    """The map values (_values) of the run's rules at `bests`: packed for those positions only
    (a trie of 10 000 prefixes answers a few thousand distinct first rules)."""
    acts = _run_acts(run)
    if ACT_CASE in acts:
        return map(_values(run).__getitem__, bests)
    return map(_VALUE.pack, bests, map(acts.__getitem__, bests))


_U32 = array("I")


def _best_value_column(run: Run, bests: list) -> tuple:
    """(_best_values as a list, those values joined): packed as one array of u32 pairs {the
    position, its action} and cut 8 bytes a value by one struct unpack (~0.3 ms less than
    packing each of a 10 000-prefix trie's ~8 700 values and joining them) where no action is a
    jump case's and the host's u32 is _VALUE's (little-endian, 4 bytes), else as _best_values."""
    acts = _run_acts(run)
    if len(bests) < 2 or ACT_CASE in acts or sys.byteorder != "little" or _U32.itemsize != 4:
        vals = list(_best_values(run, bests))
        return vals, b"".join(vals)
    m = len(bests)
    col = array("I", bytes(8 * m))
    col[0::2] = array("I", bests)
    col[1::2] = array("I", itemgetter(*bests)(acts))
    joined = col.tobytes()
    return list(struct.Struct("8s" * m).unpack(joined)), joined


# The trie keys and first positions of the LPM runs compiled last. _lpm_columns is a function
# of the rules' prefix codes (network << 8 | length, in run order) alone, and a rule's code is
# read from its cache key (_prefix_codes): a run of as many rules as a seen one whose cache keys
# differ at a few positions only (a restore turning one rule's verdict: kube-proxy's periodic
# full sync) and whose codes there are the seen ones has the seen keys and positions; only its
# values (_values) are read again. Its MapSpec is still a new one, so a new map: the old program
# keeps its own map until the swap. Newest last.
class _LpmSeen:
    __slots__ = ("field", "rules_keys", "codes", "lpm_keys", "bests")

    def __init__(self, field, rules_keys, codes, lpm_keys, bests):
        self.field, self.rules_keys, self.codes = field, rules_keys, codes
        self.lpm_keys, self.bests = lpm_keys, bests


_LPM_SEEN: list = []
LPM_SEEN_MAX = 8
LPM_DIFF_MAX = TAIL_MAX          # more rules changed than this: the columns are built again


def _lpm_seen_like(run: Run, field: str):
    """A seen _LpmSeen whose codes are the run's (a new one sharing its columns when some of
    the run's rules changed outside their prefixes), or None."""
    keys = getattr(run, "keys", None)
    n = len(run.rules)
    if keys is None or len(keys) != n:
        return None
    for seen in reversed(_LPM_SEEN):
        old = seen.rules_keys
        if seen.field != field or old is None or len(old) != n:
            continue
        if old is keys or old == keys:
            return seen
        changed = list(compress(range(n), map(ne, old, keys)))
        if len(changed) > LPM_DIFF_MAX:
            continue
        codes = _prefix_codes(changed, field, run)
        if codes is not None and codes == [seen.codes[p] for p in changed]:
            return _LpmSeen(field, keys, seen.codes, seen.lpm_keys, seen.bests)
    return None


def _prefixes(rules: list, positions, field: str, run: Run = None) -> list:
    """[(network int, prefix length)] of the rules at `positions` (of `run`, whose rules'
    classes give their keys: the address and mask read from the key, ipt_ip's first bytes)."""
    got = _run_classes(run) if run is not None else None
    at = 0 if field == "src" else 1
    if got is not None:
        cls, keys = got
        if None not in cls:             # every rule of the run has a class: one C loop
            v = map(_BE_ADDRS, keys if positions == range(len(keys)) else
                    [keys[pos] for pos in positions])
            plen = _PLEN.get
            return [(a[at], plen(a[at + 2], -1)) for a in v]
    out = []
    for pos in positions:
        if got is not None and got[0][pos] is not None:
            v = _BE_ADDRS(got[1][pos])
            out.append((v[at], _PLEN.get(v[at + 2], -1)))
            continue
        r = rules[pos]
        a, m = (r.ip.src, r.ip.smsk) if field == "src" else (r.ip.dst, r.ip.dmsk)
        out.append((int(a), _plen(m)))
    return out


def _lpm_columns(rules: list, positions, field: str, run: Run = None, codes=None) -> tuple:
    """([LPM key], [position]): each distinct prefix of the rules at `positions` with the
    smallest position among the rules whose prefix contains it (itself or a shorter one), so the
    trie's longest match answers the first rule that matches the address. `codes`: the
    _prefix_codes of those rules when the caller has them (then `rules` and `run` are unused)."""
    # a prefix as one int, network << 8 | length: ints sort as the (network, length) tuples.
    # Sorted as floats, 2**52 + code (_floats): a code has 40 bits, past one CPython int digit
    # (30), so ints are compared through the generic path; a float below 2**53 is the int
    # exactly and sorted() compares floats with its float-only fast path
    if codes is None:
        codes = _prefix_codes(positions, field, run)
    if codes is None:
        prefixes = _prefixes(rules, positions, field, run)
        if any(plen < 0 for _, plen in prefixes):
            got = _lpm_first_slow(prefixes, positions)
            return [k for k, _ in got], [p for _, p in got]
        codes = [net << 8 | plen for net, plen in prefixes]
    first = dict(zip(reversed(_floats(codes)), reversed(positions)))  # the first one stays
    order = sorted(first)
    # the codes' bytes (a double's, LE: the length, then the network's bytes lowest first):
    # the lengths are every 8th byte; a prefix ends where the code of its network +
    # 2**(32 - length), length 0, starts, so ends compare with the next codes as the networks
    # would (the sums below 2**53: exact)
    rec = _code_bytes(order)
    ends = list(map(add, order, map(_CODE_SPAN.__getitem__, rec[0::8])))
    bests = list(map(first.__getitem__, order))
    # Prefixes are nested or disjoint, and in this order a prefix containing others is followed
    # by one of them: when no prefix ends past the next one's start, none contains another and
    # each keeps its own position
    holds = list(map(gt, ends, order[1:]))
    if True in holds:
        holds.append(False)
        # one sweep keeping the prefixes still open (end, best so far): those open when a prefix
        # starts are exactly its ancestors, innermost on top (testing every shorter length is
        # O(n x lengths)); the innermost one in locals, the root (never closed) at the bottom.
        # Only a prefix holding the next one is opened (a blocklist's 10 000 prefixes: ~1 400)
        te, tb = _ABOVE_CODES, 1 << 48
        open_ends, open_bests = [], []
        push_e, push_b, pop_e, pop_b = open_ends.append, open_bests.append, open_ends.pop, \
            open_bests.pop
        for i, (code, end, own, h) in enumerate(zip(order, ends, bests, holds)):
            while code >= te:
                te, tb = pop_e(), pop_b()
            if tb < own:
                bests[i] = own = tb
            if h:
                push_e(te)
                push_b(tb)
                te, tb = end, own
    return _lpm_keys(rec), bests


# a code's span (_lpm_columns): (2**(32 - length) << 8) - length, the code of the network that
# follows the prefix (its length 0) minus the prefix's code
_CODE_SPAN = [(1 << (40 - p)) - p for p in range(33)]


_FLOAT_BASE = float(1 << 52)   # 2**52 + code: the double whose mantissa is the code
_ABOVE_CODES = float("inf")
_DOUBLE_TOP = bytes([0x30, 0x43])          # the top 2 bytes of 2**52 + x, 0 <= x < 2**48 (LE)


def _floats(codes):
    """2**52 + each code (network << 8 | length, below 2**40) as floats: their doubles' bytes
    are the codes' as u64 with the exponent's bytes set (~0.1 ms for 10 000 codes where adding
    each takes ~0.5)."""
    if sys.byteorder != "little":
        return [c + _FLOAT_BASE for c in codes]
    raw = bytearray(codes.tobytes() if isinstance(codes, array) else array("Q", codes).tobytes())
    n = len(raw) // 8
    raw[6::8] = _DOUBLE_TOP[:1] * n
    raw[7::8] = _DOUBLE_TOP[1:] * n
    out = array("d")
    out.frombytes(raw)
    return out


def _code_bytes(order: list) -> bytes:
    """The codes of `order` (_floats) as u64 LE, 8 bytes each (the doubles' top bytes are the
    exponent's, not read)."""
    if sys.byteorder != "little":
        a = array("Q", [int(c - _FLOAT_BASE) for c in order])
        a.byteswap()
        return a.tobytes()
    return array("d", order).tobytes()


def _lpm_keys(rec: bytes) -> list:
    """The LPM keys {u32 prefixlen (LE); be32 addr} of the codes whose bytes are rec
    (_code_bytes): the bytes moved column by column, then cut 8 a key by one struct unpack
    (slicing each costs ~5 times as much)."""
    key = bytearray(len(rec))
    key[0::8] = rec[0::8]                   # the length: prefixlen's low byte, the rest 0
    for k in range(4):                      # the network's bytes, highest first
        key[4 + k::8] = rec[4 - k::8]
    return list(struct.Struct("8s" * (len(key) // 8)).unpack(key))


def _prefix_codes(positions, field: str, run: Run = None):
    """[network << 8 | prefix length] of the run's rules at `positions` read from their keys,
    or None (a rule without a class, a mask that is not a prefix: _prefixes)."""
    keys = _keys_at(_run_classes(run), positions) if run is not None else None
    if keys is None:
        return None
    at = 0 if field == "src" else 1
    v = list(map(_BE_ADDRS, keys))
    if not set(map(itemgetter(at + 2), v)) <= _PLEN.keys():
        return None
    plen = _PLEN.__getitem__
    return [a[at] << 8 | plen(a[at + 2]) for a in v]


def _run_prefix_codes(run: Run, field: str):
    """_prefix_codes of all the run's rules (an array of u64), read a byte column of all their
    keys at a time when the keys are of one length (~1 ms for a cold compile's 10 000 keys,
    where unpacking each key takes ~4-6), else key by key (a list)."""
    keys = _keys_at(_run_classes(run), range(len(run.rules)))
    if not keys:
        return None
    n = len(keys[0])
    joined = _joined_keys(keys, n, run.start)
    if joined is None:
        if set(map(len, keys)) != {n}:
            return _prefix_codes(range(len(keys)), field, run)
        joined = b"".join(keys)
    addr = 0 if field == "src" else 4          # ipt_ip: src, dst, smsk, dmsk (be32)
    masks = [joined[addr + 8 + k::n] for k in range(4)]
    if not _prefix_masks(masks):
        return None
    rec = bytearray(8 * len(keys))
    # the prefix length: the sum of the mask bytes' bit counts (at most 32: no carry between
    # the bytes of the big ints)
    rec[0::8] = sum(int.from_bytes(m.translate(_BITS), "little")
                    for m in masks).to_bytes(len(keys), "little")
    for k in range(4):                          # the network's bytes, lowest first (LE u64)
        rec[4 - k::8] = joined[addr + k::n]
    codes = array("Q")
    codes.frombytes(rec)
    if sys.byteorder != "little":
        codes.byteswap()
    return codes


_JOINED = ("joined",)           # _VEC_SCOPE's key of the keys _layout_codes joined last


def _joined_keys(keys, n: int, start: int):
    """b"".join(keys) (keys: a run's, from its chain's position `start` on, the first one n
    bytes long) cut from the keys _layout_codes joined in this compile_table when they are its
    keys from `start` on, the same objects (so all n bytes long), else None: a cold
    blocklist's 10 000 keys were joined and their lengths asked twice (~0.8 ms)."""
    scope = _VEC_SCOPE
    hit = scope.get(_JOINED) if scope is not None else None
    if hit is None:
        return None
    seen, size, joined = hit
    m = len(keys)
    if size != n or len(seen) < start + m or \
            not all(map(is_, keys, seen[start:start + m] if start or m < len(seen) else seen)):
        return None
    return joined if start == 0 and m == len(seen) else joined[start * n:(start + m) * n]


_BITS = bytes(bin(b).count("1") for b in range(256))
_PREFIX_BYTE = bytes(0 if b in {(0xff00 >> k) & 0xff for k in range(9)} else 1
                     for b in range(256))     # 1 where a byte is no prefix mask's byte
_NOT_FF = bytes([1]) * 255 + bytes([0])


def _prefix_masks(masks: list) -> bool:
    """Are the masks, given as their 4 byte columns (highest first), all prefixes (a key of
    _PLEN)? Each byte is one of a prefix (0x00, 0x80 ... 0xff), and where a byte is not 0xff
    the next one is 0."""
    if any(1 in m.translate(_PREFIX_BYTE) for m in masks):
        return False
    for hi, lo in zip(masks, masks[1:]):
        if int.from_bytes(hi.translate(_NOT_FF), "little") & \
                int.from_bytes(lo.translate(_NONZERO), "little"):
            return False
    return True


def _lpm_first_slow(prefixes: list, positions, bits: int = 32) -> list:
    """_lpm_columns as [(LPM key, position)], over (network, length) tuples (a length may be
    -1: a mask that is not a prefix, which the shapes of lpm runs exclude; kept as it always
    was). bits: 128 for IPv6 prefixes (lpm6_entries). In network order, each prefix's
    position is the least of its own and those of the prefixes holding it."""
    first = dict(zip(reversed(prefixes), reversed(positions)))    # each prefix's first position
    keys = sorted(first)
    nets, lens = list(map(_ITEM0, keys)), list(map(_ITEM1, keys))
    bests = list(map(first.__getitem__, keys))
    plens = _PLEN_LE if bits == 32 else _PLEN_LE6
    if -1 in lens:
        clusters = [(0, len(keys))]
        ends = [net + (1 << (bits - plen)) for net, plen in keys]
    else:
        # a prefix outside every one before it (in network order: the running end of those
        # before is at or below its network) starts a cluster; only the prefixes of a cluster
        # of more than one can take another's position (a blocklist's cold prefixes are
        # clusters of one: C loops, not the stack below, for 10 000 IPv6 prefixes ~6 ms)
        ends = list(map(add, nets, map((_SPAN4 if bits == 32 else _SPAN6).__getitem__, lens)))
        starts = list(compress(range(1, len(keys)), map(le, accumulate(ends, max), nets[1:])))
        cuts = [0] + starts + [len(keys)]
        clusters = [(a, b) for a, b in zip(cuts, cuts[1:]) if b - a > 1]
    for lo, hi in clusters:
        stack = []
        for i in range(lo, hi):
            net, best = nets[i], bests[i]
            while stack and stack[-1][0] <= net:
                stack.pop()
            if stack and stack[-1][1] < best:
                best = bests[i] = stack[-1][1]
            stack.append((ends[i], best))
    nb = bits // 8
    return list(zip(map(add, map(plens.__getitem__, lens),
                        map(int.to_bytes, nets, repeat(nb), repeat("big"))), bests))


_PLEN_LE = [struct.pack("<I", n) for n in range(33)]     # an LPM key's u32 prefixlen
_PLEN_LE6 = [struct.pack("<I", n) for n in range(129)]
_SPAN4 = [1 << (32 - n) for n in range(33)]              # the addresses a prefix length spans
_SPAN6 = [1 << (128 - n) for n in range(129)]


def lpm6_entries(run: Run) -> list:
    """lpm_entries of an IPv6 run: key = {u32 prefixlen; 16 bytes of the network}, value = the
    first rule of the run whose prefix contains the key's. ip6_packet_match compares
    ipv6_masked_addr_cmp(), which ignores the rule's address bits outside its mask, so the
    network is address & mask (IPv4's rule with such bits never matches and is no run's)."""
    field = "src" if run.sig[1] == "src" else "dst"
    got = _run_classes(run)
    if got is not None and None not in got[0]:
        # the mask is its class's (the template's), the address its key's bytes 0..16 or 16..32
        at = 0 if field == "src" else 16
        masks = {}
        for c in set(got[0]):
            m = getattr(c.rep.ip, field[0] + "msk")
            masks[c] = (int(m), _plen6(m))
        frm = int.from_bytes
        prefixes = [(frm(k[at:at + 16], "big") & m, plen)
                    for k, (m, plen) in zip(got[1], map(masks.__getitem__, got[0]))]
    else:
        prefixes = [(int(a) & int(m), _plen6(m)) for a, m in
                    ((getattr(r.ip, field), getattr(r.ip, field[0] + "msk"))
                     for r in run.rules)]
    vals = _values(run)
    return [(k, vals[best]) for k, best in
            _lpm_first_slow(prefixes, range(len(prefixes)), 128)]


_HASH6_KEY = struct.Struct("<BBHHH")     # {proto, 0, sport, dport, 0}: _key's second word


def hash6_entries(run: Run) -> list:
    """A hash6 run's (key, value): each rule's keys (its port ranges expanded), the first rule
    holding a key keeps it, so the value is the first match."""
    _, _, _, _, _, sp, dp = run.sig
    vals, seen = _values(run), {}
    pack = _HASH6_KEY.pack
    got = _run_classes(run)
    cls, keys = got if got is not None else ((None,) * len(run.rules), None)
    for pos, r in enumerate(run.rules):
        c = cls[pos]
        if c is not None:           # the ports from the key, where the class's layout has them
            off = c.more.get("ports6")
            if off is None:             # the one tcp/udp match (the shape has it)
                off = c.more["ports6"] = _walk6(keys[pos])[0][0]
            a, b, e, f = _PORTS(keys[pos], off)
        else:
            d = _l4(r)[1]
            (a, b), (e, f) = d["spts"], d["dpts"]
        proto = r.ip.proto
        for s in (range(1) if sp == "any" or (a == 0 and b >= 0xffff) else range(a, b + 1)):
            for t in (range(1) if dp == "any" or (e == 0 and f >= 0xffff) else range(e, f + 1)):
                seen.setdefault(pack(proto, 0, s, t, 0), vals[pos])
    return list(seen.items())


def _port_values(d, name) -> range:
    lo, hi = d[name]
    return range(0, 1) if lo == 0 and hi >= 0xffff else range(lo, hi + 1)


def _key_count(run: Run) -> int:
    if not run.sig[4]:
        return len(run.rules)
    return sum(_rule_key_count(r) for r in run.rules)


def _rule_key_count(r: Rule) -> int:
    """Hash keys a rule of a tcp/udp hash shape expands to (its port ranges): _rule_class's,
    memoized (a run of 10 000 rules is counted on every compile)."""
    return _memo("class", r, _rule_class)[2]


_HASH_KEY = struct.Struct("<IIBBHHH")              # _hash_key's layout
_VALUE = struct.Struct("<II")                      # _values'
_SPLIT_VALUE = struct.Struct("<I")                 # _split_value's


def _hash_key(saddr: int, daddr: int, proto: int, sport: int, dport: int, ippart: int = 0) -> bytes:
    """struct { u32 saddr & smsk; u32 daddr & dmsk; u8 proto; u8 ippart; u16 sport; u16 dport;
    u16 pad; } with the addresses as the LE u32 a BPF_W load of network bytes gives. ippart = 1
    marks the keys that only say "some rule's ip part (addresses, protocol) matches"."""
    return struct.pack("<IIBBHHH", saddr, daddr, proto, ippart, sport, dport, 0)


def _needs_ippart(run: Run) -> bool:
    """A run whose rules test addresses before their tcp/udp match: whether a truncated header or
    a tcp fragment at offset 8 bytes is hotdropped depends on some rule's ip part matching."""
    return bool(run.sig[4] and (run.sig[1] or run.sig[2]))


def _rule_keys(run: Run, r: Rule) -> list:
    ip = r.ip
    s, d = _le32(ip.src), _le32(ip.dst)
    proto = ip.proto if run.sig[3] else 0
    l4 = _l4(r) if run.sig[4] else None
    sports = _port_values(l4[1], "spts") if l4 and run.sig[5] != "any" else range(1)
    dports = _port_values(l4[1], "dpts") if l4 and run.sig[6] != "any" else range(1)
    return [_hash_key(s, d, proto, sp, dp) for sp in sports for dp in dports]


def _run_classes(run: Run):
    """(the classes, the cache keys) of the run's rules when the run has them (_keep_seen_runs
    gives a long chain's runs theirs), else None."""
    cls, keys = getattr(run, "cls", None), getattr(run, "keys", None)
    if cls is None or keys is None or len(cls) != len(run.rules) or len(keys) != len(cls):
        return None
    return cls, keys


def _key_rule_keys(sig, key: bytes, lay: _Layout, pad: int = 0):
    """_rule_keys of a rule of hash shape sig from its key (lay: its layout), with `pad` in the
    key's last u16 (a split run's shape number), or None."""
    s, d, _, _ = _ADDRS(key)
    proto = _PROTO(key, _KEY_PROTO)[0] if sig[3] else 0
    pack = _HASH_KEY.pack
    if sig[4] and (sig[5] != "any" or sig[6] != "any"):
        if len(lay.ports) != 1:         # the shape's one tcp/udp match is the masked one
            return None
        a, b, c, e = _PORTS(key, lay.ports[0])
        sany = sig[5] == "any" or (a == 0 and b >= 0xffff)
        dany = sig[6] == "any" or (c == 0 and e >= 0xffff)
        if (sany or a == b) and (dany or c == e):           # one key (exact or any ports)
            return [pack(s, d, proto, 0, 0 if sany else a, 0 if dany else c, pad)]
        sports = range(1) if sany else range(a, b + 1)
        dports = range(1) if dany else range(c, e + 1)
        return [pack(s, d, proto, 0, sp, dp, pad) for sp in sports for dp in dports]
    return [pack(s, d, proto, 0, 0, 0, pad)]


def _ippart_keys(run: Run, positions=None, pad: int = 0) -> list:
    """The ip-part key (_hash_key(..., ippart=1)) of the run's rules at `positions` (all),
    `pad` in its last u16."""
    positions = range(len(run.rules)) if positions is None else positions
    got = _run_classes(run)
    pack = _HASH_KEY.pack
    keys = _keys_at(got, positions)
    if keys is not None:            # every rule has a class: its key holds what is packed
        fast = _strided_keys(keys, True, 1, None, None, pad)
        if fast is not None:
            return fast
        return [pack(s, d, p, 1, 0, 0, pad) for (s, d, _, _), (p,) in
                zip(map(_ADDRS, keys), map(_PROTO, keys, repeat(_KEY_PROTO)))]
    out = []
    for pos in positions:
        if got is not None and got[0][pos] is not None:
            key = got[1][pos]
            s, d, _, _ = _ADDRS(key)
            out.append(pack(s, d, _PROTO(key, _KEY_PROTO)[0], 1, 0, 0, pad))
        else:
            ip = run.rules[pos].ip
            out.append(_hash_key(_le32(ip.src), _le32(ip.dst), ip.proto, 0, 0, 1)[:14] +
                       struct.pack("<H", pad))
    return out


def _run_rule_keys(run: Run, sig=None, positions=None, pad: int = 0) -> list:
    """[_rule_keys] of the run's rules at `positions` (all) for shape sig (the run's), `pad` in
    the keys' last u16, from their keys where their classes give the layout."""
    sig = run.sig if sig is None else sig
    positions = range(len(run.rules)) if positions is None else positions
    got = _run_classes(run)
    shape = run if sig == run.sig else Run("hash", 0, [], sig)
    cls, keys = got if got is not None else ((None,) * len(run.rules), None)
    fast = _keys_rule_keys(sig, _keys_at(got, positions), cls, positions, pad)
    if fast is not None:
        return fast
    tag = struct.pack("<H", pad)
    out = []
    for pos in positions:
        c = cls[pos]
        ks = _key_rule_keys(sig, keys[pos], c.lay, pad) if c is not None else None
        if ks is None:
            ks = _rule_keys(shape, run.rules[pos])
            if pad:
                ks = [k[:14] + tag for k in ks]
        out.append(ks)
    return out


def _keys_at(got, positions):
    """The cache keys of the rules at `positions` when every one has a class (got:
    _run_classes), else None."""
    if got is None:
        return None
    cls, keys = got
    if positions == range(len(cls)):
        return None if None in cls else keys
    if None in [cls[p] for p in positions]:
        return None
    return [keys[p] for p in positions]


def _keys_rule_keys(sig, keys, cls, positions, pad: int):
    """[_key_rule_keys(sig, key, its layout, pad)] of keys (the rules at `positions`, whose
    classes are cls[position]) in one loop, or None when some rule would take _rule_keys."""
    if keys is None:
        return None
    fast = _one_key_each(sig, keys, cls, positions, pad)
    if fast is not None:
        return [[k] for k in fast]
    pack = _HASH_KEY.pack
    addrs = map(_ADDRS, keys)
    protos = map(_PROTO, keys, repeat(_KEY_PROTO)) if sig[3] else repeat((0,))
    if not (sig[4] and (sig[5] != "any" or sig[6] != "any")):
        return [[pack(s, d, p, 0, 0, 0, pad)] for (s, d, _, _), (p,) in zip(addrs, protos)]
    offs = []
    for pos in positions:
        ports = cls[pos].lay.ports
        if len(ports) != 1:             # as _key_rule_keys: only the one masked tcp/udp match
            return None
        offs.append(ports[0])
    s_any, d_any = sig[5] == "any", sig[6] == "any"
    out = []
    append = out.append
    for (s, d, _, _), (p,), (a, b, c, e) in zip(addrs, protos, map(_PORTS, keys, offs)):
        sany = s_any or (a == 0 and b >= 0xffff)
        dany = d_any or (c == 0 and e >= 0xffff)
        if (sany or a == b) and (dany or c == e):           # one key (exact or any ports)
            append([pack(s, d, p, 0, 0 if sany else a, 0 if dany else c, pad)])
        else:
            sports = range(1) if sany else range(a, b + 1)
            dports = range(1) if dany else range(c, e + 1)
            append([pack(s, d, p, 0, sp, dp, pad) for sp in sports for dp in dports])
    return out


def _one_key_each(sig, keys, cls, positions, pad: int):
    """[the one _HASH_KEY of each rule] (keys: of the rules at `positions`, classes in cls)
    when every rule has one key (exact ports, or the shape's "any") and the keys share one
    layout, else None (_keys_rule_keys' loop decides)."""
    sat = dat = None
    if sig[4] and (sig[5] != "any" or sig[6] != "any"):
        lays = set(map(_LAY, map(cls.__getitem__, positions)))
        if len(lays) != 1:
            return None
        ports = lays.pop().ports
        if len(ports) != 1:             # as _key_rule_keys: only the one masked tcp/udp match
            return None
        sat = ports[0] if sig[5] != "any" else None
        dat = ports[0] + 4 if sig[6] != "any" else None
    return _strided_keys(keys, sig[3], 0, sat, dat, pad)


def _strided_keys(keys: list, proto: bool, ippart: int, sat, dat, pad: int):
    """[_HASH_KEY.pack(saddr, daddr, proto or 0, ippart, sport, dport, pad)] of equally long
    cache keys, read from them by byte: the key's addresses are its first 8 bytes (the LE u32s
    packed back are those bytes), its protocol byte 80 (ipt_ip.proto, u16: a value above 255
    is left to the loop, whose pack refuses it), its ports the u16 at sat / dat (an xt_tcp /
    xt_udp range, native order: this is for little-endian hosts only) when that range is one
    port, else 0. Each key byte is one strided slice of all the keys joined, copied to its
    place in every 16-byte key at once (~0.2 ms for 2 000 rules, where packing each rule
    takes ~1). None when the keys differ in length or a range is more than one port."""
    m = len(keys)
    if m == 0 or _BIG_ENDIAN:
        return None
    n = len(keys[0])
    joined = b"".join(keys)
    if len(joined) != n * m or n < _KEY_PROTO + 2 or max(sat or 0, dat or 0) + 4 > n:
        return None
    out = bytearray(16 * m)
    for j in range(8):
        out[j::16] = joined[j::n]
    if proto:
        if any(joined[_KEY_PROTO + 1::n]):
            return None
        out[8::16] = joined[_KEY_PROTO::n]
    if ippart:
        out[9::16] = bytes([ippart]) * m
    for at, to in ((sat, 10), (dat, 12)):
        if at is not None:
            lo0, lo1 = joined[at::n], joined[at + 1::n]
            if lo0 != joined[at + 2::n] or lo1 != joined[at + 3::n]:
                return None             # some rule's range is not its first port alone
            out[to::16], out[to + 1::16] = lo0, lo1
    if pad:
        out[14::16] = bytes([pad & 0xff]) * m
        out[15::16] = bytes([pad >> 8]) * m
    return list(map(_FIRST, _KEY16.iter_unpack(out)))


_BIG_ENDIAN = struct.pack("=H", 1) != struct.pack("<H", 1)
_KEY16 = struct.Struct("16s")
_LAY = attrgetter("lay")


def _hash_run_keys(run: Run) -> list:
    """_run_rule_keys(run), made once per Run (hash_entries and _fill_next_same ask)."""
    got = run.__dict__.get("_rk")
    if got is None:
        got = run.__dict__["_rk"] = _run_rule_keys(run)
    return got


def hash_entries(run: Run) -> list:
    """[(key, value)] in rule order keeping the first."""
    seen = {}
    keys = _hash_run_keys(run)
    values = _values(run)
    put = seen.setdefault
    one = set(map(len, keys)) == {1}            # one key a rule (no port ranges): no inner loop
    if _needs_ippart(run):
        if one:
            # the puts as one C loop in the order of the loop below: a rule's key, its ip part's
            ks, vs = [None] * (2 * len(keys)), [None] * (2 * len(keys))
            ks[0::2], ks[1::2] = map(_FIRST, keys), _ippart_keys(run)
            vs[0::2] = vs[1::2] = values
            list(map(put, ks, vs))
        else:
            for ks, v, ipk in zip(keys, values, _ippart_keys(run)):
                for k in ks:
                    put(k, v)
                put(ipk, v)
    elif one:
        list(map(put, map(_FIRST, keys), values))
    else:
        for ks, v in zip(keys, values):
            for k in ks:
                put(k, v)
    return _hash_items(seen)


def _hash_items(seen: dict) -> list:
    """A hash map's {key: value} as its [(key, value)], an Entries whose keys and values come
    joined for the fill (engine._fill_batch) when every key has one size and every value one
    size (the map's, which the engine checks by their totals): made here from the dict in
    ~0.2 ms at 6 700 entries, where the install's main thread split and checked the pairs
    again (~0.65 ms) before the worker's fill could start."""
    items = Entries(seen.items())
    if len(set(map(len, seen))) == 1 and len(set(map(len, seen.values()))) == 1:
        items.joined = (b"".join(seen), b"".join(seen.values()))
    return items


_FIRST, _SECOND, _THIRD = itemgetter(0), itemgetter(1), itemgetter(2)


def _fill_next_same(run: Run):
    """For each jump rule (one key), the next rule of the run holding that key, or None."""
    later = {}
    every = _hash_run_keys(run)
    for pos in range(len(run.rules) - 1, -1, -1):
        keys = every[pos]
        if pos in run.cases:
            run.next_same[pos] = later.get(keys[0])
        for k in keys:
            later[k] = pos


# MapSpecs of the runs seen last, by (name, kind, signature, the rules' cache keys): an
# unchanged run gets the very same MapSpec object back, so the engine reuses the map it
# already created and filled for it (engine.create_maps) instead of a new one.
_RUN_SPECS: dict = {}
RUN_SPECS_MAX = 256


def _run_key(run: Run, name: str):
    keys = getattr(run, "keys", None)
    # run.keys: set by _keep_seen_runs from the chain's vectors (no None among them)
    if not keys:
        keys = [getattr(r, "cache_key", None) for r in run.rules]
        if None in keys:
            return None
    return (name, run.kind, run.sig, run.protos, hash(tuple(keys)), len(keys), keys[0], keys[-1])


def _keys_of(run: Run) -> tuple:
    keys = getattr(run, "keys", None)
    return keys if keys is not None else tuple(r.cache_key for r in run.rules)


# The engine's hook while it compiles for an install (engine.Engine._start_fill), else None:
# called with each MapSpec map_spec returns, so the kernel's side of making and filling its map
# (a 10 000-prefix trie: ~10 ms of inserts) starts while the compile goes on, not after it.
SPEC_MADE = None


def map_spec(run: Run, name: str) -> MapSpec:
    spec = _map_spec_of(run, name)
    if SPEC_MADE is not None:
        SPEC_MADE(spec)
    return spec


def _map_spec_of(run: Run, name: str) -> MapSpec:
    key = _run_key(run, name)
    if key is not None:
        spec = _RUN_SPECS.get(key)
        if spec is not None and spec.rules_keys == _keys_of(run):
            return spec
    spec = _map_spec(run, name)
    if key is not None:
        if len(_RUN_SPECS) >= RUN_SPECS_MAX:
            _RUN_SPECS.clear()
        spec.rules_keys = _keys_of(run)
        _RUN_SPECS[key] = spec
    return spec


def _cached_multi_specs(run: Run, name: str) -> list:
    """multi_specs, the same MapSpec objects for an unchanged run (see map_spec)."""
    key = _run_key(run, name)
    if key is None:
        return multi_specs(run, name)
    keys = _keys_of(run)
    key = ("multi", MULTI_FORM, MULTI_NS_BASE) + key      # the tests force one form or the other
    hit = _RUN_SPECS.get(key)
    if hit is not None and hit[0] == keys:
        run.kept = hit[2]
        return hit[1]
    specs = multi_specs(run, name)
    if len(_RUN_SPECS) >= RUN_SPECS_MAX:
        _RUN_SPECS.clear()
    # what the code needs besides the maps, kept for the same rules (a function of their bytes):
    # an append joining the run compiles it as this run + a linear tail (_keep_seen_runs)
    run.kept = {"form": _run_form(run)}
    _RUN_SPECS[key] = (keys, specs, run.kept)
    return specs


def _map_spec(run: Run, name: str) -> MapSpec:
    if run.kind == "lpm":
        return MapSpec(name, BPF_MAP_TYPE_LPM_TRIE, 8, 8, lpm_entries(run), BPF_F_NO_PREALLOC,
                       "bpfilter_lpm")
    if run.kind == "lpm6":
        return MapSpec(name, BPF_MAP_TYPE_LPM_TRIE, 20, 8, lpm6_entries(run), BPF_F_NO_PREALLOC,
                       "bpfilter_lpm6")
    if run.kind == "hash6":
        return MapSpec(name, BPF_MAP_TYPE_HASH, 8, 8, hash6_entries(run), 0, "bpfilter_hash6")
    return MapSpec(name, BPF_MAP_TYPE_HASH, 16, 8, hash_entries(run), 0, "bpfilter_hash")


# ------------------------------------------------------------------------------------- code

def _indexed(cc, insn):
    """insn, whose imm is an absolute entry index: recorded so that a program kept for a later
    table can move it (compile._PROG_CACHE)."""
    keep = getattr(cc, "index_insns", None)
    if keep is not None:
        keep.append(insn)
    return insn


def emit_run(cc, run: Run, chain: str, ret: str, where: str, path: list = ()):
    """The run as one lookup: build the key from the parsed header slots, look it up, and on a hit
    count the entry the value names and apply its action; a miss continues after the run."""
    from . import compile as C
    if run.kind == "multi":
        return emit_multi(cc, run, chain, ret, where)
    after = cc.label("run_after")
    hot = cc.label("run_hotdrop")
    run.chain = chain
    name = f"cls_{chain}_{run.start}"
    maps = cc.__dict__.setdefault("cls_maps", {})
    if name not in maps:                     # a user chain inlined twice shares its map
        maps[name] = map_spec(run, name)
    spec = maps[name]
    if run.cases and run.kind == "hash":
        # a function of the run's rules, as the spec is: kept with it for an unchanged run
        kept = getattr(spec, "next_same", None)
        if kept is None:
            _fill_next_same(run)
            spec.next_same = dict(run.next_same)
        else:
            run.next_same.update(kept)
    cc.rule_count += len(run.rules)
    head = cc.label("run")
    first, last = run.rules[0], run.rules[-1]
    cc.where[head] = (f"chain {chain} rules {run.start + 1}..{run.end} (entry offsets "
                      f"{first.offset + run.d_offset}..{last.offset + run.d_offset}, "
                      f"classified)")
    cc.emit(Label(head, f"{where}: {run.text(chain)}, map {name} ({len(spec.entries)} keys)"))
    # the exits first: conditional jumps reach 32767 instructions, and the inlined chains of
    # the jump cases may put the run's end much farther (an unconditional ja can be gotol)
    miss, key = cc.label("run_miss"), cc.label("run_key")
    exit0 = cc.label("group_exit")            # with jump cases, the end of the run is far away
    cc.emit(E.ja(key), Label(miss), E.ja(exit0 if run.cases else after), Label(hot),
            E.mov(R0, _rc(cc, ACT_DROP), comment="hotdrop"), E.exit_(), Label(key))
    key_slot, act_slot = _run_slots(run)
    if run.kind == "lpm":
        slot = C.S_SADDR if run.sig[1] == "src" else C.S_DADDR
        cc.emit(E.st(E.W, FP, S_CLS_KEY, 32, "LPM key: prefixlen 32"),
                E.ldx(E.DW, R1, FP, slot, f"{run.sig[1]} address"),
                E.stx(E.W, FP, S_CLS_KEY + 4, R1))
    elif run.kind == "hash6":
        _hash6_key_code(cc, run, miss, hot, C)
    elif run.kind == "lpm6":
        from .family import S_DADDR6, S_SADDR6
        slot = S_SADDR6 if run.sig[1] == "src" else S_DADDR6
        cc.emit(E.st(E.W, FP, key_slot, 128, "LPM key: prefixlen 128"),
                E.ldx(E.DW, R1, FP, slot, f"{run.sig[1]} address"),
                E.stx(E.DW, FP, key_slot + 4, R1),
                E.ldx(E.DW, R1, FP, slot + 8), E.stx(E.DW, FP, key_slot + 12, R1))
    else:
        _hash_key_code(cc, run, miss, hot, C)
    cc.emit(E.ld_map_fd(R1, name), E.mov(R2, FP), E.alu(E.ADD, R2, key_slot),
            E.call(E.BPF_FUNC_map_lookup_elem),
            E.jmp(E.JEQ, R0, 0, miss, comment="no rule of the run matches"),
            E.ldx(E.W, R1, R0, 0, "position of the first matching rule in the run"),
            _indexed(cc, E.alu(E.ADD, R1, first.index + run.d_index,
                               comment="+ the run's first entry: its entry index")),
            E.stx(E.W, FP, C.S_KEY, R1),
            E.ldx(E.W, R1, R0, 4, "its action"),
            E.stx(E.DW, FP, act_slot, R1))
    _count_dynamic(cc, C)
    _dispatch(cc, run, chain, ret, where, path, after, exit0)
    cc.emit(Label(after))


def _run_slots(run: Run) -> tuple:
    """(key slot, action slot) of a plain run's lookup: an IPv6 run's are its own (S_CLS_KEY6;
    hash6's 8-byte key at the 8-aligned S_CLS_KEY6 + 4)."""
    if run.kind == "lpm6":
        return S_CLS_KEY6, S_CLS_ACT6
    if run.kind == "hash6":
        return S_CLS_KEY6 + 4, S_CLS_ACT6
    return S_CLS_KEY, S_CLS_ACT


GROUP_SLOTS = 12000   # instructions of inlined jump cases between two hops (see _dispatch)

# ---- jump cases as BPF global functions (issue #7: the verifier must not see a giant program)
# Inlined, the chains of thousands of jump rules (kube-proxy fan-out) make one program the
# verifier needs superlinear time for (measured on 6.18: 12 000 insns 0.13 s, 36 000 insns 1.2 s,
# 120 000 insns 16 s). A global function is verified once, on its own (kernel/bpf/verifier.c
# do_check_subprogs), and a call site only checks its arguments (btf_check_subprog_call), so
# the cost becomes the sum of small independent walks. A program holds at most 256 subprograms
# (BPF_MAX_SUBPROGS), so the cases are cut into at most GLOBAL_GROUPS functions, each taking
# the case number as its second argument and choosing the case with its own decision tree.
# The function returns a verdict (the flavor's ACCEPT/DROP, hotdrops included), FN_RETURN (the
# run's chain returns: a goto's chain RETURNed, or a later rule of the run holding the same key
# RETURNs), FN_CONTINUE (no rule of the run left: go on after the run) or FN_CASE + k (the next
# rule of the run holding the same key is jump case k: the caller dispatches it, always to a
# later group, so the main program only jumps forward; a later case of the same group is taken
# inside the function, as the caller's hops never come back to a group).
# Only case bodies that read nothing but the packet-field slots (no ctx/skb, no kfunc, no other
# helper than map lookups, no static subprogram): the callee sees the slots through a pointer
# (PTR_TO_MEM), not the packet, so the nf, tc and xdp flavors are served alike (GLOBAL_FLAVORS;
# not xdp-offload: an offload engine runs no bpf-to-bpf calls, and offload.py refuses runs).
GLOBAL_ABOVE = 8192        # instructions of inlined cases from which they become functions
GLOBAL_GROUPS = 192        # functions per program (BPF_MAX_SUBPROGS 256, room for static ones)
GLOBAL_GROUP_SLOTS = 1024  # smallest function worth its call
FRAME_LO = 352             # the slots a function sees: [fp - FRAME_LO, fp - 16) of the main
                           # frame (S_DYNPTR at fp-16 is not memory a callee may touch)
FN_CONTINUE, FN_RETURN, FN_CASE = 0x7e7d, 0x7e7e, 0x10000
GLOBAL_FLAVORS = ("nf", "tc", "xdp")


def _uses_context(items) -> bool:
    """Does this code need more than the packet-field slots (ctx r6, skb r7, kfuncs, helpers
    other than map_lookup_elem, calls of static subprograms)?"""
    from . import compile as C
    call = E.BPF_JMP | E.CALL
    src_read = {E.BPF_LDX, E.BPF_STX}
    src_if_x = {E.BPF_ALU, E.BPF_ALU64, E.BPF_JMP, E.BPF_JMP32}
    for it in items:
        if it.__class__ is Label:
            continue
        code = it.code
        if code == call:
            if it.src == E.BPF_PSEUDO_CALL and it.target == C.COUNT_SUB:
                continue                    # counting reads r1 + S_KEY/S_LEN only
            if it.src != 0 or it.imm != E.BPF_FUNC_map_lookup_elem:
                return True
            continue
        if it.dst in (6, 7):
            return True
        if it.src in (6, 7) and (code & 0x07 in src_read or
                                 (code & 0x07 in src_if_x and code & E.BPF_X)):
            return True
    return False


# ---- reuse of global functions across installs (issue #7: one append on a fan-out table) -------
# Compiling the 3 333 case bodies of a kube-proxy table and rewriting ~100 functions for the main
# frame (compile._via_main_frame) took 1.4-2 s of every install. A function is a pure function of
# its cases' contents except for the counter keys (absolute entry indices, which an inserted rule
# shifts) and its label names, so each finished function is kept as a template:
#   - its labels are renamed once to names no _ChainCompiler.label can make (they end in '#'), so
#     a later program can hold it next to fresh code;
#   - every counter-key store (`*(u32 *)(frame + S_KEY) = index`, the only BPF_ST to S_KEY a case
#     body holds) is recorded as "entry rel of case i's target chain" (relative to that chain's
#     RETURN entry: a chain's entries are contiguous and keep their order) or "the run's rule
#     rel positions after case i" (a static next match), and is rewritten on reuse;
#   - case numbers inside a function are relative to the group's first case (the caller passes
#     k - lo and adds lo back to a "later jump case" answer), so cases added at the end of the run
#     or before it do not change the function.
# A case is cacheable when its bytes say everything about its code: the jump rule and every entry
# of the target chain from the landing rule on have a cache_key (model.py: the entry's bytes
# without comefrom, counters and jump offsets), the target chain jumps nowhere (no nested chain
# to describe) and is too short to hold a classified run (no map, no run index in the code).
# Groups are cut where a case's jump rule hashes to a boundary once a group is 3/4 full
# (content-defined, like rsync's chunking), so a case that grows or a service added only changes
# the groups around it; the cut sizes are powers of two of the total, stable under small changes.
# A reused function's listing comments (label texts, rule numbers) are the ones of the compile
# that made it; its counter keys and `where` offsets are the current ones.
_FN_CACHE: dict = {}       # group key -> _FnTemplate
_CASE_INFO: dict = {}      # (function context, case key) -> (slots, uses context)
FN_CACHE_MAX = 2048
CASE_INFO_MAX = 1 << 17
CUT_EVERY = 8              # a 3/4-full group ends before a case whose hash is 0 mod this
_FN_UID = [0]
FN_STATS = {"made": 0, "reused": 0}   # functions compiled / taken from _FN_CACHE
_ST_KEY = E.BPF_ST | E.BPF_MEM | E.W


def sweep_caches(live: set, specs: set, templates: set) -> None:
    """Keep in this module's caches only what the installed programs use (engine._sweep_caches,
    after an install's reply): `live` their entries' cache keys (model.live_keys), `specs` the
    ids of their MapSpecs (the engine's classifier maps), `templates` the ids of their global
    functions' templates. Each cache is a memo (what is dropped is made again when asked), and
    each was bounded by its count only: a kube-proxy-like resync of a 10 000-rule chain with one
    rule changed left one more 10 000-entry MapSpec in _RUN_SPECS every time (+2 MiB a resync,
    up to 256 of them), and the compile slowed with the heap (7 -> 25 ms by the fortieth)."""
    if _MEMO:
        kept = {k: v for k, v in _MEMO.items() if k[1] in live}
        if len(kept) < len(_MEMO):
            _MEMO.clear()
            _MEMO.update(kept)
    sup = live.issuperset
    for d, alive in ((_SEEN_RUNS, sup),
                     (_RUN_SPECS, lambda s: id(s) in specs),
                     (_FN_CACHE, lambda t: id(t) in templates)):
        for k in [k for k, v in d.items() if not alive(v)]:
            del d[k]
    for seen, keys_of in ((_LPM_SEEN, _RULES_KEYS), (_VECS, _VEC_KEYS)):
        seen[:] = [s for s in seen if keys_of(s) is None or sup(keys_of(s))]


_RULES_KEYS, _VEC_KEYS = attrgetter("rules_keys"), attrgetter("keys")


class _FnTemplate:
    __slots__ = ("head", "items", "relocs", "where", "_code", "case_slots")

    def __init__(self, head, items, relocs, where):
        self.head, self.items, self.relocs, self.where = head, items, relocs, where
        self._code = None

    def code(self):
        """(bytecode, slots of the calls of the counting subprogram, slot of each relocs entry)
        for CompiledProgram.assemble to place and patch, or None when the function names a map
        or a kfunc (the whole program is assembled from its items then). Assembled once: a
        function kept for the next table is not encoded again (issue #7)."""
        if self._code is None:
            from . import compile as C
            slot_of, calls, n = [], [], 0
            for it in self.items:
                slot_of.append(n)
                if isinstance(it, Label):
                    continue
                if it.map is not None or it.kfunc is not None:
                    self._code = False
                    return None
                if it.is_local_call and it.target == C.COUNT_SUB:
                    calls.append(n)
                n += it.slots
            code = E.assemble(self.items + [Label(C.COUNT_SUB), E.exit_()])[:-8]
            self._code = (code, calls, [slot_of[r[0]] for r in self.relocs or ()])
        return self._code or None


def _fn_context(cc, chain: str, where: str, path: list) -> tuple:
    """What a function's code depends on besides its cases."""
    fl = cc.fl
    return (chain, where, tuple(path), cc.shared_count, fl.name, fl.ACCEPT, fl.DROP,
            cc.needs_ifnames, cc.needs_l4, cc.needs_ip, cc.table.family)


def _case_key(cc, run: Run, pos: int, chain: str, small: int, known_chains: dict = None):
    """(key or None, the target chain's RETURN entry) of jump case `pos` (known_chains:
    compile.chain_info)."""
    r = run.rules[pos]
    t = r.target
    target, start = cc._landing(t, chain, run.start + pos + 1, r)
    pe = target.policy_entry
    rk = getattr(r, "cache_key", None)
    if rk is None or pe is None or len(target.rules) - start >= small or \
            getattr(pe, "cache_key", None) is None:
        return None, pe
    known = known_chains.get(id(target)) if known_chains is not None else None
    if known is not None:               # compile._program_key read the chain already
        if known[2] and known[2][-1] >= start:
            return None, pe
        keys = known[0][start:]
    else:
        keys = []
        for x in target.rules[start:]:
            k = getattr(x, "cache_key", None)
            if k is None or isinstance(x.target, Jump):
                return None, pe
            keys.append(k)
    goto = bool(r.ip.flags & IPT_F_GOTO) or bool(t.goto)
    nxt = None if goto else run.next_same.get(pos)
    nx = None
    if nxt is not None:
        nk = getattr(run.rules[nxt], "cache_key", None)
        if nk is None:
            return None, pe
        nx = (nxt - pos, nk, _action(run.rules[nxt].target))
    return (rk, t.chain, start, goto, tuple(keys), pe.cache_key, nx,
            t.chain in cc.subprogs), pe


def _case_core(cc, run: Run, pos: int, chain: str, where: str, path: list) -> tuple:
    """(items, statics, return label) of jump case `pos` as a global function's case: its chain
    inlined, RETURN and "nothing left" as FN_RETURN / FN_CONTINUE."""
    fret, fafter = cc.label("fn_return"), cc.label("fn_continue")
    statics = {}
    body = _capture(cc, lambda: _case_body(cc, run, pos, chain, fret, where, path, fafter,
                                           statics))
    body += [Label(fret), E.mov(R0, FN_RETURN), E.exit_("RETURN"),
             Label(fafter), E.mov(R0, FN_CONTINUE), E.exit_("continue after the run")]
    return body, statics, fret


def _static_tail(cc, run: Run, chain: str, statics: dict, fret: str, lo: int,
                 inside: dict = None) -> list:
    """The next rules of the run with the case's key (counted here; a jump case among them is
    taken at its label when this function holds it (`inside`: position -> label; a later case,
    so a forward jump), else answered as FN_CASE + its k - lo, the caller adds lo back and
    dispatches it to a later group)."""
    tail = []
    for nxt, lbl in statics.items():
        r = run.rules[nxt]
        tail.append(Label(lbl, f"the next rule of the run with this key: {chain} rule "
                               f"{run.start + nxt + 1}"))
        tail += _capture(cc, lambda: cc._count(r.index + run.d_index))
        a = _action(r.target)
        if a == ACT_CASE and inside and nxt in inside:
            tail.append(E.ja(inside[nxt], "a later jump case of this function"))
        elif a == ACT_CASE:
            tail += [E.mov(R0, FN_CASE + run.cases[nxt] - lo), E.exit_("a later jump case")]
        else:
            tail += _verdict_code(cc, a, fret)
    return tail


def _cut_hash(run: Run, pos: int) -> int:
    r = run.rules[pos]
    return zlib.crc32((getattr(r, "cache_key", None) or b"") + r.target.chain.encode())


def _pack(hashes: list, sizes: list, budget: int):
    """Groups (lists of indices) of at most `budget`: cut before a case once the group holds 3/4
    of `per` slots and the case's hash says so, or when it would pass `per`; None: no packing.
    (Fewer, fuller functions load faster: each has its own head and call site.)"""
    total = sum(sizes)
    per = GLOBAL_GROUP_SLOTS
    while 3 * per * (budget - 1) < 4 * total:
        per *= 2
    groups = _greedy(sizes, per, hashes)
    if len(groups) <= budget:
        return groups
    per = max(GLOBAL_GROUP_SLOTS, -(-total // budget))
    for _ in range(64):                 # greedy packing may overshoot the budget: widen
        groups = _greedy(sizes, per)
        if len(groups) <= budget:
            return groups
        per += max(sizes)
    return None


def _greedy(sizes: list, per: int, hashes: list = None) -> list:
    """Consecutive indices in groups of at most `per` slots (a case bigger than that alone);
    with hashes, also cut before a case whose hash says so once the group is 3/4 full."""
    groups, size = [], 0
    for i, n in enumerate(sizes):
        if not groups or size + n > per or \
                (hashes is not None and 4 * size >= 3 * per and hashes[i] % CUT_EVERY == 0):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def _prune_function(items: list) -> list:
    """Drop what the function's first instruction does not reach, as ebpf.prune does (the
    verifier refuses unreachable code); the counting subprogram it calls lives elsewhere in the
    program. The walk reads opcodes directly: a first compile prunes ~130 functions."""
    insns, where, labels_at = [], {}, {}
    for it in items:
        if it.__class__ is Label:
            where[it.name] = len(insns)
            labels_at.setdefault(len(insns), []).append(it)
        else:
            insns.append(it)
    n = len(insns)
    reach = bytearray(n)
    todo = [0] if n else []
    jmp, jmp32 = E.BPF_JMP, E.BPF_JMP32
    while todo:
        i = todo.pop()
        while i < n and not reach[i]:
            reach[i] = 1
            ins = insns[i]
            code = ins.code
            cls, op = code & 0x07, code & 0xf0
            if cls == jmp and op == E.EXIT:
                break
            if (cls == jmp or cls == jmp32) and op != E.CALL and op != E.EXIT:
                j = where.get(ins.target)
                if j is None:                       # let ebpf.prune name the missing label
                    return E.prune(items)
                todo.append(j)
                if op == E.JA:
                    break
            elif ins.src == E.BPF_PSEUDO_CALL and cls == jmp and ins.target in where:
                todo.append(where[ins.target])      # a local callee inside the function
            i += 1
    out = []
    for i, ins in enumerate(insns):
        if reach[i]:
            if i in labels_at:
                out += labels_at[i]
            out.append(ins)
    return out


_OFFSET_TEXT = re.compile(r"^(.*\(entry offset )(\d+)\)$", re.S)


def _make_function(cc, run: Run, chain: str, where: str, path: list, members: list, lo: int,
                   built: dict, anchors: dict, cacheable: bool) -> _FnTemplate:
    """Compile one group's function (head, decision tree over k - lo, the cases), rewrite it
    for the main frame, prune it and give its labels names of its own."""
    from . import compile as C
    drop = cc.fl.DROP
    fn = cc.label(f"fn_{chain}_{run.start}")
    ok, case_lbl = cc.label("fn_frame"), [cc.label("fn_case") for _ in members]
    items = []
    saved, cc.items = cc.items, items
    try:
        cc.emit(E.mov(R1, R2))
        _tree(cc, 0, len(members) - 1, case_lbl, shown=0)
        inside = dict(zip(members, case_lbl))
        for lbl, pos in zip(case_lbl, members):
            core, statics, fret = built.pop(pos, None) or _case_core(cc, run, pos, chain, where,
                                                                     path)
            cc.emit(Label(lbl), *core, *_static_tail(cc, run, chain, statics, fret, lo, inside))
    finally:
        cc.items = saved
    k0, k1 = run.cases[members[0]], run.cases[members[-1]]
    head = [Label(fn, f"global function: {chain} jump cases {k0}..{k1} (argument: k - {k0})"),
            E.jmp(E.JNE, R1, 0, ok), E.mov(R0, drop), E.exit_(), Label(ok),
            E.alu(E.ADD, R1, FRAME_LO, comment="r1 = the caller's frame pointer"),
            E.stx(E.DW, FP, C.S_SUB_MAIN, R1, "keep it"),
            # r8/r9 must be readable: rewritten stores save one of them
            E.mov(E.R8, 0), E.mov(E.R9, 0)]
    out = head + C._via_main_frame(_prune_function(items))
    # counter keys: which case's chain (or which later rule of the run) each one counts
    relocs = []
    if cacheable:
        owner = {}
        for i, pos in enumerate(members):
            pe = anchors[pos]
            r = run.rules[pos]
            target, start = cc._landing(r.target, chain, run.start + pos + 1, r)
            for x in target.rules[start:] + [pe]:
                owner[x.index] = (i, x.index - pe.index, False)
            nxt = run.next_same.get(pos)
            if nxt is not None:
                owner[run.rules[nxt].index + run.d_index] = (i, nxt - pos, True)
        for p, it in enumerate(out):
            if isinstance(it, E.Insn) and it.code == _ST_KEY and it.off == C.S_KEY:
                o = owner.get(it.imm)
                if o is None:
                    relocs = None
                    break
                relocs.append((p,) + o)
    renamed, names, sfx = _own_labels(out)
    # `where` texts (entry offsets for verifier errors) relative to the case's RETURN entry: the
    # target chain moves as a whole
    case_of = {}                    # entry offset -> (case, offset of the case's RETURN entry)
    if relocs is not None and cacheable:
        for i, pos in enumerate(members):
            r = run.rules[pos]
            target, start = cc._landing(r.target, chain, run.start + pos + 1, r)
            pe = anchors[pos]
            for x in target.rules[start:] + [pe]:
                case_of[x.offset] = (i, pe.offset)
    wh = {}
    for name in names:
        text = cc.where.pop(name, None)
        if text is None:
            continue
        m = _OFFSET_TEXT.match(text) if case_of else None
        hit = case_of.get(int(m.group(2))) if m else None
        wh[name + sfx] = (text, None, 0) if hit is None else \
            (m.group(1), hit[0], int(m.group(2)) - hit[1])
    tpl = _FnTemplate(fn + sfx, renamed, relocs, wh)
    _install_where(cc, tpl, members, anchors)
    return tpl


def _own_labels(out: list) -> tuple:
    """(items, their label names, suffix): the labels renamed to names no later compile's
    cc.label can make (they end in '#'), so a kept function can sit beside fresh code."""
    _FN_UID[0] += 1
    sfx = f"#{_FN_UID[0]}#"
    names = {it.name for it in out if isinstance(it, Label)}
    renamed = []
    Insn = E.Insn
    for it in out:
        if it.__class__ is Label:
            renamed.append(Label(it.name + sfx, it.comment))
        elif it.target is not None and it.target in names:
            renamed.append(Insn(it.code, it.dst, it.src, it.off, it.imm, it.target + sfx, it.map,
                                it.kfunc, it.comment))
        else:
            renamed.append(it)
    return renamed, names, sfx


def _install_where(cc, tpl: _FnTemplate, members: list, anchors: dict):
    for name, (text, i, off) in tpl.where.items():
        cc.where[name] = text if i is None else f"{text}{anchors[members[i]].offset + off})"


def _reuse_function(cc, tpl: _FnTemplate, run: Run, members: list, anchors: dict) -> list:
    """The template's items with the counter keys of this table."""
    items = list(tpl.items)
    values = []
    for p, i, rel, static in tpl.relocs:
        v = run.rules[members[i] + rel].index + run.d_index if static else \
            anchors[members[i]].index + rel
        values.append(v)
        old = items[p]
        if old.imm != v:
            items[p] = E.Insn(old.code, old.dst, old.src, old.off, v, comment=f"count entry {v}")
    _install_where(cc, tpl, members, anchors)
    return items, values


def _global_cases(cc, run: Run, chain: str, ret: str, where: str, path: list, after: str,
                  exit0: str, verdicts: list, by_k: list) -> bool:
    """Emit the jump cases of `run` as global functions when they are big enough and can be;
    False: nothing emitted (the caller inlines them). Functions whose cases did not change since
    an earlier compile are that compile's, counter keys moved (_FN_CACHE)."""
    fl = getattr(cc, "fl", None)
    if not by_k or getattr(fl, "name", "nf") not in GLOBAL_FLAVORS or cc.in_sub or \
            getattr(cc, "in_global", False) or os.environ.get("BPFILTER_GLOBAL_FUNCS") == "0":
        return False
    labels = cc.__dict__.setdefault("global_labels", [])
    budget = GLOBAL_GROUPS - len(labels)
    if budget < 2:
        return False
    caching = os.environ.get("BPFILTER_FN_CACHE", "1") != "0"
    from .compile import chain_info
    ctx = _fn_context(cc, chain, where, path)
    small, known = min_run(), chain_info(cc.table)
    count = cc.rule_count
    cc.in_global = True
    built, keys, sizes, anchors = {}, [], [], {}
    made = []
    try:
        for pos in by_k:
            ck, anchors[pos] = _case_key(cc, run, pos, chain, small, known)
            if not caching:
                ck = None
            ik = (ctx, ck)                  # its size depends on how counting is done, ...
            info = _CASE_INFO.get(ik) if ck is not None else None
            if info is None:
                core, statics, fret = _case_core(cc, run, pos, chain, where, path)
                tail = _static_tail(cc, run, chain, statics, fret, 0)
                info = (_slots(core) + _slots(tail), _uses_context(core) or _uses_context(tail))
                if ck is not None:
                    if len(_CASE_INFO) >= CASE_INFO_MAX:
                        _CASE_INFO.clear()
                    _CASE_INFO[ik] = info
                built[pos] = (core, statics, fret)
            if info[1]:
                return False
            keys.append(ck)
            sizes.append(info[0])
        if sum(sizes) <= GLOBAL_ABOVE:
            return False
        groups = _pack([_cut_hash(run, pos) for pos in by_k], sizes, budget)
        if groups is None:
            return False
        used = cc.__dict__.setdefault("fn_templates_used", set())
        for grp in groups:
            members = [by_k[i] for i in grp]
            lo = run.cases[members[0]]
            gkey = None
            if all(keys[i] is not None for i in grp):
                gkey = (ctx, tuple((keys[i], run.cases.get(run.next_same.get(by_k[i]), lo) - lo)
                                   for i in grp))
            tpl = _FN_CACHE.get(gkey) if gkey is not None else None
            if tpl is not None and id(tpl) not in used:
                items, values = _reuse_function(cc, tpl, run, members, anchors)
                FN_STATS["reused"] += 1
            else:
                FN_STATS["made"] += 1
                tpl = _make_function(cc, run, chain, where, path, members, lo, built, anchors,
                                     gkey is not None)
                items = tpl.items
                values = [items[r[0]].imm for r in tpl.relocs or ()]
                if gkey is not None and tpl.relocs is not None:
                    if len(_FN_CACHE) >= FN_CACHE_MAX:
                        _FN_CACHE.clear()
                    _FN_CACHE[gkey] = tpl
            used.add(id(tpl))
            made.append((members, tpl.head, items, (tpl, values)))
    finally:
        cc.in_global = False
        cc.rule_count = count
    _global_calls(cc, run, ret, after, exit0, verdicts, by_k, made)
    return True


def _global_calls(cc, run: Run, ret: str, after: str, exit0: str, verdicts: list, by_k: list,
                  made: list):
    """The main program's side: verdicts, then a decision tree over the groups, each group's call
    site turning the function's answer into the run's next step."""
    fl = cc.fl
    G, ncases = len(made), len(by_k)
    lo = [run.cases[m[0]] for m, _, _, _ in made]
    hi = [run.cases[m[-1]] for m, _, _, _ in made]
    site = [cc.label("fn_call") for _ in range(G)]
    again = [cc.label("fn_dispatch") for _ in range(G + 1)]
    v_lbl = {a: cc.label(f"run_{ACT_NAMES[a].lower()}") for a in verdicts}
    cc.emit(E.ldx(E.DW, R1, FP, S_CLS_ACT))
    for a in verdicts:
        cc.emit(E.jmp(E.JEQ, R1, a, v_lbl[a]))
    _tree_ranges(cc, [ACT_CASE + k for k in lo], [ACT_CASE + k for k in hi], site)
    for a in verdicts:
        cc.emit(Label(v_lbl[a]), *_verdict_code(cc, a, ret))
    acc, drop = fl.ACCEPT, fl.DROP
    for g, (_, head, _, _) in enumerate(made):
        nc, nr, case, vd = (cc.label(x) for x in ("fn_nc", "fn_nr", "fn_case", "fn_drop"))
        cc.emit(Label(again[g], f"jump cases {lo[g]}..{hi[g]}"),
                E.jmp(E.JGT, R1, ACT_CASE + hi[g], again[g + 1]),
                Label(site[g]),
                E.mov(R2, R1), E.alu(E.SUB, R2, ACT_CASE + lo[g], comment="arg: the case - lo"),
                E.mov(R1, FP), E.alu(E.ADD, R1, -FRAME_LO, comment="arg: the packet-field slots"),
                E.call_local(head, f"global function: jump cases {lo[g]}..{hi[g]}"),
                E.jmp(E.JNE, R0, FN_CONTINUE, nc), E.ja(after, "no rule of the run left"),
                Label(nc), E.jmp(E.JNE, R0, FN_RETURN, nr), E.ja(ret, "RETURN"),
                Label(nr), E.mov(R1, R0), E.alu(E.SUB, R1, FN_CASE),
                E.jmp(E.JLT, R1, ncases - lo[g], case),
                E.jmp(E.JNE, R0, acc, vd), E.mov(R0, acc, comment="ACCEPT"), E.exit_(),
                Label(vd), E.mov(R0, drop, comment="DROP"), E.exit_(),
                Label(case), E.alu(E.ADD, R1, ACT_CASE + lo[g], comment="a later jump case"),
                E.ja(again[g + 1]))
    cc.emit(Label(again[G]), E.ja(after), Label(exit0))
    # the functions, emitted after the main program by compile.py
    funcs = cc.__dict__.setdefault("global_funcs", [])
    labels = cc.__dict__.setdefault("global_labels", [])
    parts = cc.__dict__.setdefault("global_parts", [])     # (template, counter keys) each
    for _, head, items, part in made:
        funcs.append(items)
        labels.append(head)
        parts.append(part)


def _tree_ranges(cc, lo: list, hi: list, labels: list):
    """Jump to labels[g] for lo[g] <= R1 <= hi[g] (contiguous ranges, by halving)."""
    _halving(cc, 0, len(labels) - 1, hi.__getitem__, lambda a: E.ja(labels[a]), "fn_gt")


def _halving(cc, a: int, b: int, bound, leaf, gt: str):
    """Cases a..b told apart on R1 by halving: the left half when R1 <= bound(mid), leaf(k)
    emitted for case k. A recursion at module level, not a closure that calls itself: such a
    closure is a reference cycle (its cell holds it) keeping cc and cc's table alive until a GC
    pass, and the helper runs one only once its process has grown (engine._collect_and_freeze;
    measured: every append's replaced table was kept, 11 MB a command on a 10 000-rule
    fan-out)."""
    if a == b:
        cc.emit(leaf(a))
        return
    mid, right = (a + b) // 2, cc.label(gt)
    cc.emit(E.jmp(E.JGT, R1, bound(mid), right))
    _halving(cc, a, mid, bound, leaf, gt)
    cc.emit(Label(right))
    _halving(cc, mid + 1, b, bound, leaf, gt)


# ---- jump cases sharing one body (issue #7: the verifier must not see a giant program) ---------
# kube-proxy and docker write one small chain per service or container, and the chains of one
# kind are alike: the same rules, in the same order. Their code then differs only in the counter
# keys (each chain's entries have their own indices), so one global function can serve them all:
# it takes the case's RETURN entry index as its argument and counts entry `argument + rel`
# (a chain's entries are contiguous and keep their order). An array map indexed by the jump case k
# gives the case's body and its RETURN entry relative to the run's first entry, so the map's
# contents do not move when rules before the run come or go, and the program does not grow with
# the number of cases: a 10 000-rule fan-out is verified as its main program and one function
# (measured: 392 instructions instead of 63 277, loaded in 1.5-2 ms instead of 209 ms),
# and adding a service only changes the maps. When the chain RETURNs, the next rule of the run
# holding the same key (Run.next_same) is the case map's too: its position and action, counted
# and applied by the main program; a jump case there is dispatched by the next copy of the
# dispatch (one copy per jump case such a sequence can hold: the program only jumps forward).
# Taken when every jump case of the run can be (cacheable: the target chain jumps nowhere and
# holds no classified run; the body reads only the packet-field slots), such sequences hold at
# most SHARED_DEPTH jump cases, the run has at least SHARED_PER_BODY cases per distinct body and
# its cases inlined would pass GLOBAL_ABOVE instructions; otherwise _global_cases / inlining.
SHARED_PER_BODY = 16
SHARED_DEPTH = 4
S_CASE_BASE = S_CLS_ACT        # the action slot, free once the dispatch has read it: the callee
                               # keeps its argument there for the counter keys of its body


_SETS_R1 = (E.BPF_LD | E.DW | E.BPF_IMM, E.BPF_ALU64 | E.MOV | E.BPF_X,
            E.BPF_ALU64 | E.MOV | E.BPF_K)


def _shared_ok(cc) -> bool:
    fl = getattr(cc, "fl", None)
    return (getattr(fl, "name", "nf") in GLOBAL_FLAVORS and not cc.in_sub and
            not getattr(cc, "in_global", False) and
            os.environ.get("BPFILTER_GLOBAL_FUNCS") != "0" and
            os.environ.get("BPFILTER_SHARED_BODIES") != "0")


def _shared_bodies(cc, run: Run, chain: str, by_k: list):
    """{body key: [positions]}, {position: the case chain's RETURN entry index}, _case_depth and
    {position: the next rule of the run with its key, None after a goto} or None (then
    _case_map asks the rules), or None when some case cannot share a body or the bodies are too
    many for their cases."""
    from .compile import chain_info
    small = min_run()
    kept = _moved_bodies(cc, run, chain, by_k, small)
    if kept is None:
        kept = _leaf_bodies(cc, run, chain, by_k, small)
    if kept is not None:
        bodies, anchors, depth, nexts = kept[:4]
    else:
        known = chain_info(cc.table)
        got = _walked_bodies(cc, run, by_k, small, known)
        if got is _NOT_WALKED:
            got = _each_body(cc, run, chain, by_k, small, known)
        if got is None:
            return None
        bodies, anchors, nexts = got
        depth = None
    budget = GLOBAL_GROUPS - len(cc.__dict__.get("global_labels", ()))
    if len(bodies) > budget or len(by_k) < SHARED_PER_BODY * len(bodies):
        return None
    if depth is None:
        depth = _case_depth(run, by_k)
    if depth > SHARED_DEPTH:
        return None
    return bodies, anchors, depth, nexts


# ---- a moved run's shared bodies, kept for the next table (issue #7) ---------------------------
# An append to INPUT in front of a fan-out hub (--to-input's layout) moves the hub and its 3 333
# case chains whole (model._MovedChain): the hub's run is read from the same source rules
# (compile._chain_body: model.chain_source), each case lands on the chain moved from the one it
# landed on before, and every entry behind the change moved by the same amount. _shared_bodies'
# answer is then the previous table's but for the RETURN entries, each moved as the run's first
# entry moved, and the case map (RETURN entries relative to that first entry) is the same.
# Kept per (chain, run start) with the table it was made or taken for (kept_for), and taken
# for a table that is that one with entries changed in one place (model.moved_from) when the
# run's chain and every case chain are placed by one decode (model.placement, placed_by: not
# made, moved together; chains kept from the previous table are its own objects, at its
# positions), the run holds the same rule objects (so the same cases landing on the same chain
# positions, and the same next rules: _fill_next_same reads the rules) and the subprograms and
# min_run are the same. ~0.5 ms instead of ~6 ms a compile.
_KEPT_FOR: dict = {}            # id(table) -> (weakref to the table, {key: what was kept})


def kept_for(table) -> dict:
    """What compiles of `table` kept for the next table, by key (made on first use). It goes
    with the table: the engine frees a replaced table after its reply, and with it the rules
    and lists kept here, which would otherwise be freed in a later compile."""
    got = _KEPT_FOR.get(id(table))
    if got is not None and got[0]() is table:
        return got[1]
    key = id(table)

    def gone(_ref, key=key):
        hit = _KEPT_FOR.get(key)
        if hit is not None and hit[0]() is None:
            del _KEPT_FOR[key]
    out: dict = {}
    _KEPT_FOR[key] = (weakref.ref(table, gone), out)
    return out


def kept_of(table) -> dict:
    """What compiles of `table` kept (kept_for), without making an entry: {} if nothing."""
    got = _KEPT_FOR.get(id(table))
    return got[1] if got is not None and got[0]() is table else {}


@dataclass
class _KeptBodies:
    rules: list                # the run's rules (the objects)
    by_k: list
    subs: frozenset
    small: int
    cps: Optional[list]        # each case's chain_pos (read when first asked: not on a restore)
    first: int                 # the run's first entry index when anchors were read
    anchors: dict              # each case's RETURN entry index then (_shared_bodies' own)
    bodies: dict
    depth: int
    nexts: Optional[dict]
    spec: Any = None           # the case map (_case_map), once made
    # the range of cps (lo, hi) where it is as long as cps (_cover_of), False where not, None
    # until found (cover)
    span: Any = None

    def cover(self) -> None:
        """span found, once (the restore's kept bodies: after its reply, model._defer)."""
        if self.span is None:
            self.span = _cover_of(self.cps)


class _MovedAnchors:
    """{position: RETURN entry index} of kept bodies, each moved by d (read at a few positions:
    _shared_function's first case of a body)."""
    __slots__ = ("_anchors", "_d")

    def __init__(self, kept: _KeptBodies, d: int):
        self._anchors, self._d = kept.anchors, d

    def __getitem__(self, pos: int) -> int:
        return self._anchors[pos] + self._d


def _moved_bodies(cc, run: Run, chain: str, by_k: list, small: int):
    """(bodies, anchors, depth, nexts, kept) of the previous table's run when it can be taken
    (see above), else None."""
    pos = run.placement
    if pos is not None and by_k and not _first_case_placed(cc, run, by_k, pos):
        return None
    mv = moved_from(cc.table) if pos is not None else None
    kept = kept_of(mv[0]).get(("bodies", chain, run.start)) if mv is not None else None
    if kept is None or len(run.rules) != len(kept.rules) or kept.by_k != by_k or \
            kept.small != small or kept.subs != cc.subprogs or \
            not all(map(is_, run.rules, kept.rules)):
        return None
    if kept.cps is None:
        rules = kept.rules
        try:
            kept.cps = list(map(_CHAIN_POS, map(_TARGET, map(rules.__getitem__, by_k))))
        except AttributeError:
            kept.cps = []
    cps, chains = kept.cps, cc.table.chains
    kept.cover()
    span = kept.span
    if span:
        # the case chains are one slice of the table's chains: no None test, min, max and
        # lookup per case on every append (~2.4M instructions of a fan-out's 3 333)
        lo, hi = span
        if hi > len(chains) or not placed_range(cc.table, lo, hi, pos):
            return None
    elif not cps or None in cps or min(cps) < 0 or max(cps) >= len(chains) or \
            not placed_by(list(map(chains.__getitem__, cps)), pos):
        return None
    d = run.rules[0].index + run.d_index - kept.first
    kept_for(cc.table)[("bodies", chain, run.start)] = kept
    run.kept_bodies = kept
    return kept.bodies, _MovedAnchors(kept, d), kept.depth, kept.nexts, kept


def _cover_of(cps: list):
    """(lo, hi): min(cps), max(cps) + 1 when that range is as long as cps and lo >= 0, else
    False. Every position of cps lies in range(lo, hi), so placed_by of chains[lo:hi] answers
    True only where placed_by of the chains at cps would; the same chains (in another order,
    which all() does not mind) where cps has no repeats, which a range as long as cps then
    means, and a fan-out's case chains have none: they follow one another in the table (sorted
    by name, so not in the hub's order). One slice, not 3 333 lookups, None tests, min and
    max on every append. (A set to rule repeats out: 1.4M instructions more, once.)"""
    if not cps:
        return False
    try:
        lo, hi = min(cps), max(cps) + 1
    except TypeError:                   # a None among them
        return False
    if type(lo) is not int or lo < 0 or hi - lo != len(cps):
        return False
    return lo, hi


def _first_case_placed(cc, run: Run, by_k: list, pos) -> bool:
    """Whether the chain the run's first jump case lands in is placed by `pos` (the run's
    chain's placement), as _moved_bodies then asks of every case chain: a hub left unmade
    ahead of a change in one of its case chains (iptables -A SVC-3000: model._placed_whole)
    has a placement no case chain has, and is turned down here, before 3 333 are read."""
    t = getattr(run.rules[by_k[0]], "target", None)
    cp = getattr(t, "chain_pos", None)
    chains = cc.table.chains
    return cp is not None and 0 <= cp < len(chains) and placed_by([chains[cp]], pos)


def carry_bodies(table, recs: tuple) -> None:
    """Give `table` the shared bodies (and the runs, compile._moved_runs) the previous table
    kept (model.moved_from) for the runs of a program compile took whole
    (compile._kept_program) for it: recs, its walk's records,
    name every chain the program reaches, each moved from the previous table by the same
    amount (else the program is not taken), so what those bodies say of the previous table
    holds of this one, moved with the run's first entry (_moved_bodies, _leaf_bodies). Else a
    service chain's change after an append to INPUT finds nothing kept."""
    mv = moved_from(table)
    src = kept_of(mv[0]) if mv is not None else {}
    names = None
    for key, kept in src.items():
        # the runs of a moved chain's rules (compile._moved_runs) go with them: its last item
        # names the chain
        chain = key[1] if key[0] == "bodies" else kept[-1] if key[0] == "runs" else None
        if chain is None:
            continue
        if names is None:
            names = {rec[0] for rec in recs}
            dst = kept_for(table)
        if chain in names and key not in dst:
            dst[key] = kept


def _leaf_bodies(cc, run: Run, chain: str, by_k: list, small: int):
    """(bodies, anchors, depth, nexts) of the previous table's run when one case chain changed
    (iptables -A SVC-3000): the compile's walk found the table to be the previous one with plain
    rules changed in one leaf chain alone (compile._changed_leaf, its place in chain_info), the
    run is ahead of the change and holds the same rules (objects, or of the same bytes: so the
    same cases, landings, next rules and depth), and the subprograms and min_run are the same
    (kept: the previous table's, its own or carried, carry_bodies). Then every other case
    chain has the entries it had, moved or not (model.moved_from), so the same body key, and
    its RETURN entry is where it was or, behind the change, moved by the shift; the changed
    chain's cases are read again (_each_body) and put with the body of their new key, the
    bodies in the order of their first case as _walked_bodies has them. ~1 ms instead of ~6.
    None otherwise."""
    from .compile import CHANGED_LEAF, chain_info
    mv = moved_from(cc.table)
    kept = kept_of(mv[0]).get(("bodies", chain, run.start)) if mv is not None else None
    if kept is None or len(run.rules) != len(kept.rules) or kept.by_k != by_k or \
            kept.small != small or kept.subs != cc.subprogs:
        return None
    _prev, nhead, _p_first, shift, _delta = mv
    known = chain_info(cc.table)
    leaf = known.get(CHANGED_LEAF, ())
    first = run.rules[0].index + run.d_index
    if len(leaf) != 1 or run.rules[-1].index + run.d_index >= nhead or by_k != sorted(by_k):
        return None                     # (a run behind the change: its anchors moved too)
    # the run is ahead of the change, so its entries are the previous table's (the same bytes,
    # landing where they did: model.moved_from), its chain made anew or not: the same rule
    # objects or rules of the same bytes (its cases' landings are not in them, and are the
    # previous table's)
    same = all(map(is_, run.rules, kept.rules))
    if not same:
        try:
            keys = list(map(_CACHE_KEY, run.rules))
            if None in keys or keys != list(map(_CACHE_KEY, kept.rules)):
                return None
        except AttributeError:
            return None
    (leaf_id, at), = leaf
    chains = cc.table.chains
    if id(chains[at]) != leaf_id:
        return None
    if kept.cps is None:
        try:
            kept.cps = list(map(_CHAIN_POS, map(_TARGET, map(kept.rules.__getitem__, by_k))))
        except AttributeError:
            kept.cps = []
    if len(kept.cps) != len(by_k):
        return None
    mine = [pos for pos, cp in zip(by_k, kept.cps) if cp == at]
    got = _each_body(cc, run, chain, mine, small, known) if mine else ({}, {}, None)
    if got is None:
        return None
    # the run is ahead of the change: its first entry and so the previous table's RETURN
    # entries (kept.anchors + d) are where they were; those behind the change moved
    d = first - kept.first
    olds = list(map(kept.anchors.__getitem__, by_k))
    if d:
        olds = [a + d for a in olds]
    news = [a if a < nhead else a - shift for a in olds]
    anchors = dict(zip(by_k, news))
    anchors.update(got[1])
    # the cases whose case map value may change (_leaf_case_map): the changed chain's, and
    # those whose RETURN entry moved against the run's first entry (behind the change)
    run.leaf_cases = (kept, set(mine).union(compress(by_k, map(ne, olds, news))),
                      kept.cps if same else None)
    taken = set(mine)
    bodies = {}
    for key, members in kept.bodies.items():
        if not taken.isdisjoint(members):
            members = [m for m in members if m not in taken]
        if members:
            bodies[key] = members
    for key, members in got[0].items():
        bodies[key] = sorted(bodies.get(key, []) + members)
    bodies = dict(sorted(bodies.items(), key=lambda kv: kv[1][0]))
    return bodies, anchors, kept.depth, kept.nexts


def _keep_bodies(cc, run: Run, chain: str, by_k: list, found: tuple, spec) -> None:
    """Remember the shared bodies of `run` (found: _shared_bodies' answer) and its case map for
    the next table (_moved_bodies)."""
    kept = run.__dict__.get("kept_bodies")
    if kept is not None:
        kept.spec = spec
        return
    # (the answer's own objects, not copies: they would be freed after this compile otherwise)
    bodies, anchors, depth, nexts = found
    rules = run.rules
    # the cases' chain positions, when _leaf_bodies or _walked_bodies read them of these same
    # rules (else read when _moved_bodies first asks: ~3.1M instructions, ~1 ms, of the first
    # append to INPUT after a fan-out's restore, for one list the restore's compile had made)
    leaf = run.__dict__.get("leaf_cases")
    kept = kept_for(cc.table)[("bodies", chain, run.start)] = _KeptBodies(
        rules, by_k, cc.subprogs, min_run(),
        leaf[2] if leaf is not None else run.__dict__.get("walked_cps"),
        rules[0].index + run.d_index, anchors, bodies, depth, nexts, spec)
    if kept.cps is not None:
        # their range, which the next append's _moved_bodies reads, found after the reply
        # (a helper's: the min and max of a fan-out's 3 333, ~1M instructions)
        _model._defer(kept.cover)


_NOT_WALKED = object()


def _landed_columns(rs: list, landed: dict):
    """(targets, chain_pos, entries, landing chains, their ids, their names) of the jump rules
    rs (a run's cases, in order) as compile._plain_lands read them for _program_key's walk in
    this compile_table (landed: compile.lands_walked), when rs are the first jumps it read of
    their chain (the same rule objects, so the same targets in the same table), else None.
    Reading them again was ~1.3 ms of a cold fan-out compile's 3 333 cases."""
    got = landed.get(id(rs[0])) if landed else None
    if got is None:
        return None
    walked = got[0]
    m = len(rs)
    if m > len(walked) or not all(map(is_, rs, walked)):
        return None
    if m == len(walked):
        return got[1:]
    return tuple(col[:m] for col in got[1:])



def _walked_policy_indexes(table, ids: list, targets: list) -> list:
    """policy_indexes(targets) (ids: their ids) as compile._walk_leaves read them in this
    compile_table (compile.policy_indexes_walked), else read from the chains (a chain the walk
    did not read so: a spliced walk's, one of a chain with jumps)."""
    from .compile import policy_indexes_walked
    at = policy_indexes_walked(table)
    if at:
        got = list(map(at.get, ids))
        if None not in got:
            return got
    return policy_indexes(targets)


_TARGET, _CHAIN_POS, _ENTRY, _NAME, _CHAIN, _HOOK, _CACHE_KEY, _IP_FLAGS, _GOTO, _IP_PROTO = map(
    attrgetter, ("target", "chain_pos", "entry", "name", "chain", "hook", "cache_key",
                 "ip.flags", "goto", "ip.proto"))


def _walked_bodies(cc, run: Run, by_k: list, small: int, known: dict):
    """_each_body's answer column by column (C loops: map, attrgetter) when every case lands as
    iptables writes a jump (chain_pos, entry 0..len of a user chain) in a chain
    compile._program_key walked (known: chain_info), else _NOT_WALKED. A fan-out's thousands of
    cases: ~3 us a case one at a time, most of an append's compile. The case chains' rule
    counts and policy entries' cache keys are read from `known` (the keys tuple has one key a
    rule; _each_body reads its body key there too), not from the chains' rules and entries: an
    append moves every case chain, whose objects are new, so each one read is a cache miss."""
    if not by_k:
        return _NOT_WALKED
    chains, rules = cc.table.chains, run.rules
    rs = [rules[pos] for pos in by_k]
    from .compile import lands_walked
    landed = _landed_columns(rs, lands_walked(cc.table))
    if landed is not None:
        # the walk read these very jumps (compile._plain_lands): their targets, landing chains
        # (placed in table.chains, named as their jumps name them) and entries, as read below
        ts, cps, starts, targets, ids, names = landed
        if None in starts or min(starts) < 0:
            return _NOT_WALKED
    else:
        try:
            ts = list(map(_TARGET, rs))
            cps = list(map(_CHAIN_POS, ts))
            starts = list(map(_ENTRY, ts))
        except AttributeError:
            return _NOT_WALKED
        if None in cps or None in starts or min(cps) < 0 or max(cps) >= len(chains) or \
                min(starts) < 0:
            return _NOT_WALKED
        targets = list(map(chains.__getitem__, cps))
        ids = list(map(id, targets))
        names = list(map(_CHAIN, ts))
        if list(map(_NAME, targets)) != names:
            return _NOT_WALKED
    kns = list(map(known.get, ids))
    if None in kns:
        return _NOT_WALKED
    k0s = list(map(_FIRST, kns))
    lens = list(map(len, k0s))
    if list(map(_HOOK, targets)).count(None) != len(targets) or any(map(gt, starts, lens)):
        return _NOT_WALKED
    # from here on, what _each_body (so _case_key) answers for these cases
    # each case chain's RETURN entry index, read without making a moved chain's entries (an
    # append to the chain that jumps to them moves them all: model._MovedChain)
    pes = _walked_policy_indexes(cc.table, ids, targets)
    pks = list(map(_SECOND, kns))           # each pe's cache_key (_program_key's pk)
    try:
        if None in pes or None in map(_CACHE_KEY, rs) or None in pks or \
                any(map(ge, map(sub, lens, starts), repeat(small))):
            return None
    except AttributeError:                  # a rule without cache_key: _each_body's None
        return None
    # a jump in the case chain at or after the landing: the jump positions are memoized per
    # chain contents (compile._chain_facts), so chains of one content share the tuple
    if any(map(_THIRD, kns)) and \
            any(kn[2] and kn[2][-1] >= start for kn, start in zip(kns, starts)):
        return None
    if any(map(and_, map(_IP_FLAGS, rs), repeat(IPT_F_GOTO))) or any(map(_GOTO, ts)):
        gotos = list(map(truth, map(or_, map(and_, map(_IP_FLAGS, rs), repeat(IPT_F_GOTO)),
                                    map(truth, map(_GOTO, ts)))))
    else:
        gotos = [False] * len(rs)
    nexts = list(map(run.next_same.get, by_k))
    if True in gotos:
        nexts = [None if goto else nxt for goto, nxt in zip(gotos, nexts)]
    later = set(nexts)
    later.discard(None)
    if None in map(getattr, map(rules.__getitem__, later), repeat("cache_key"), repeat(None)):
        return None
    subs = cc.subprogs
    tails = k0s if not any(starts) else \
        [tuple(k0[start:]) for k0, start in zip(k0s, starts)]
    keys = list(zip(starts, gotos, tails, pks,
                    list(map(subs.__contains__, names)) if subs else repeat(False)))
    # each case's body key as the first equal one, in the order of their first case: the
    # bodies are then told apart by identity (equal keys compare their bytes)
    first = {}
    tags = list(map(first.setdefault, keys, keys))
    if len(first) <= 8:                     # a few bodies (their point): C loops per body
        bodies = {key: list(compress(by_k, map(is_, tags, repeat(key)))) for key in first}
    else:
        bodies = {}
        for key, pos in zip(tags, by_k):
            bodies.setdefault(key, []).append(pos)
    # (each case's chain_pos, as _moved_bodies would read it of the same rules: _keep_bodies)
    run.__dict__["walked_cps"] = cps
    return bodies, dict(zip(by_k, pes)), dict(zip(by_k, nexts))


def _each_body(cc, run: Run, chain: str, by_k: list, small: int, known: dict):
    """({body key: [positions]}, {position: the case chain's RETURN entry index}, None) of the jump
    cases one at a time, or None when some case cannot share a body."""
    bodies, anchors = {}, {}
    chains, rules, next_same, subs = cc.table.chains, run.rules, run.next_same, cc.subprogs
    nch = len(chains)
    for pos in by_k:
        # _case_key's body key (its fields 2..5 and 7) read directly where the jump lands as
        # iptables writes it (chain_pos, entry 0..len) in a chain compile._program_key walked
        # (a fan-out's thousands of cases; _case_key and _landing cost 3 us a case)
        r = rules[pos]
        t = r.target
        cp, start = getattr(t, "chain_pos", -1), getattr(t, "entry", 0)
        target = chains[cp] if cp is not None and 0 <= cp < nch else None
        kn = known.get(id(target)) if target is not None and target.name == t.chain and \
            target.hook is None and start is not None and 0 <= start <= len(target.rules) \
            else None
        if kn is None:
            ck, pe = _case_key(cc, run, pos, chain, small, known)
            if ck is None:
                return None
            bodies.setdefault(ck[2:6] + ck[7:], []).append(pos)
            anchors[pos] = pe.index
            continue
        pe = target.policy_entry
        if getattr(r, "cache_key", None) is None or pe is None or \
                len(target.rules) - start >= small or getattr(pe, "cache_key", None) is None or \
                (kn[2] and kn[2][-1] >= start):
            return None
        goto = bool(r.ip.flags & IPT_F_GOTO) or bool(t.goto)
        if not goto:
            nxt = next_same.get(pos)
            if nxt is not None and getattr(rules[nxt], "cache_key", None) is None:
                return None
        bodies.setdefault((start, goto, tuple(kn[0][start:]), pe.cache_key, t.chain in subs),
                          []).append(pos)
        anchors[pos] = pe.index
    return bodies, anchors, None


def _case_depth(run: Run, by_k: list) -> int:
    """The most jump cases one packet can run through in this run: a chain that RETURNs hands
    over to the next rule of the run with the same key, which may be a jump case again."""
    depth = {}
    for pos in reversed(by_k):
        nxt = run.next_same.get(pos)
        depth[pos] = 1 + (depth.get(nxt, 0) if nxt is not None else 0)
    return max(depth.values(), default=0)


def _shared_function(cc, run: Run, chain: str, where: str, path: list, pos: int, pe_index: int):
    """The global function of the body of case `pos`, its counter keys relative to its argument
    (the RETURN entry index of the chain it runs), or None when the body cannot be shared."""
    from . import compile as C
    # built as if no later rule held the key: the body answers FN_CONTINUE when the chain
    # RETURNs, and the caller goes on with the case map's next rule
    nxt = run.next_same.pop(pos, None)
    try:
        core, statics, _ = _case_core(cc, run, pos, chain, where, path)
    finally:
        if nxt is not None:
            run.next_same[pos] = nxt
    if statics or _uses_context(core):
        return None
    body, n = [], len(core)
    for i, it in enumerate(core):
        if it.__class__ is not Label and it.code == _ST_KEY and it.dst == FP and \
                it.off == C.S_KEY:
            # compile._count: the key store is followed by an instruction that sets r1 without
            # reading it (r1 = the frame, or the counters map): r1 is free here
            nx = core[i + 1] if i + 1 < n else None
            if nx is None or nx.__class__ is Label or nx.dst != R1 or \
                    nx.code not in _SETS_R1 or (nx.code == _SETS_R1[1] and nx.src == R1):
                return None
            rel = it.imm - pe_index
            body += [E.ldx(E.W, R1, FP, S_CASE_BASE, "the chain's RETURN entry (argument)"),
                     E.alu(E.ADD, R1, rel, bits=32, comment=f"{rel:+d}: count that entry"),
                     E.stx(E.W, FP, C.S_KEY, R1)]
        else:
            body.append(it)
    fn, ok = cc.label(f"fn_{chain}_{run.start}_body"), cc.label("fn_frame")
    r = run.rules[pos]
    head = [Label(fn, f"global function: a body shared by jump cases of {chain} (compiled as "
                      f"chain {r.target.chain}; argument: the case chain's RETURN entry)"),
            E.jmp(E.JNE, R1, 0, ok), E.mov(R0, cc.fl.DROP), E.exit_(), Label(ok),
            E.alu(E.ADD, R1, FRAME_LO, comment="r1 = the caller's frame pointer"),
            E.stx(E.DW, FP, C.S_SUB_MAIN, R1, "keep it"),
            E.stx(E.W, R1, S_CASE_BASE, R2, "the argument, for the body's counter keys"),
            # r8/r9 must be readable: rewritten stores save one of them
            E.mov(E.R8, 0), E.mov(E.R9, 0)]
    out = head + C._via_main_frame(_prune_function(body))
    renamed, names, sfx = _own_labels(out)
    for name in names:
        cc.where.pop(name, None)
    tpl = _FnTemplate(fn + sfx, renamed, [], {})
    tpl.case_slots = _slots(core)       # one case inlined (the measure _global_cases uses)
    return tpl


_CASE_VALUE = struct.Struct("<IIII")
_U32_KEY = struct.Struct("<I").pack
_ITEM0, _ITEM1 = itemgetter(0), itemgetter(1)


def _case_map(run: Run, name: str, bodies: dict, anchors: dict, nexts: dict = None) -> MapSpec:
    """k -> struct { u32 body; u32 RETURN entry - the run's first entry; u32 next; u32 action },
    next: 1 + the position of the next rule of the run with the case's key (0: none), action:
    that rule's (ACT_*); the same MapSpec for the same contents (its map is then kept:
    engine.create_maps)."""
    # column by column (a fan-out's thousands of cases)
    order = [pos for members in bodies.values() for pos in members]
    body = [b for b, members in enumerate(bodies.values()) for _ in members]
    value = [b""] * len(run.cases)
    for k, v in zip(*_case_values(run, order, body, anchors, nexts)):
        value[k] = v
    return _case_spec(name, value)


def _case_values(run: Run, order: list, body: list, anchors: dict, nexts: dict = None):
    """(the case numbers k, their case map values) of the jump cases at positions `order`,
    each of body number body[i] (_case_map)."""
    first = run.rules[0].index + run.d_index
    rules, cases, next_same = run.rules, run.cases, run.next_same
    if nexts is not None:           # _walked_bodies read them
        nxts = list(map(nexts.__getitem__, order))
    else:
        rs = [rules[pos] for pos in order]
        nxts = [None if f & IPT_F_GOTO or g else next_same.get(pos)
                for f, g, pos in zip(map(_IP_FLAGS, rs), map(_GOTO, map(_TARGET, rs)), order)]
    acts = [0] * len(order)
    for i in [i for i, nxt in enumerate(nxts) if nxt is not None]:
        act = _action(rules[nxts[i]].target)
        acts[i] = act + cases[nxts[i]] if act == ACT_CASE else act
    rel = [(index - first) & 0xffffffff for index in map(anchors.__getitem__, order)]
    return list(map(cases.__getitem__, order)), \
        list(map(_CASE_VALUE.pack, body, rel, [0 if n is None else n + 1 for n in nxts], acts))


def _leaf_case_map(run: Run, name: str, bodies: dict, anchors: dict, nexts: dict = None):
    """_case_map's answer made from the previous table's case map when _leaf_bodies took its
    bodies (iptables -A SVC-3000): the values of the cases _leaf_bodies named (the changed
    chain's, those whose RETURN entry moved against the run) and of those whose body number
    changed made anew, the others' taken as they were (the same rules, so the same next rule
    and action; the same body, RETURN entry and run start). None when there is no such map."""
    got = run.__dict__.get("leaf_cases")
    if got is None:
        return None
    kept, changed, _cps = got
    old = kept.spec
    if old is None or old.name != name or len(old.entries) != len(run.cases) or \
            2 * len(changed) > len(old.entries):
        return None                 # (most cases changed: _case_map makes them all for less)
    # a body numbered anew (one before it gone or new): every case of it changes
    was = {key: b for b, key in enumerate(kept.bodies)}
    which = {}
    for b, (key, members) in enumerate(bodies.items()):
        if was.get(key) != b:
            changed = changed.union(members)
        for pos in changed.intersection(members):
            which[pos] = b
    order = sorted(which)
    value = list(map(_ITEM1, old.entries))
    for k, v in zip(*_case_values(run, order, list(map(which.__getitem__, order)), anchors,
                                  nexts)):
        value[k] = v
    return _case_spec(name, value)


_CASE_KEYS: dict = {}            # n -> the keys 0..n-1 of a case map, packed


def _case_keys(n: int) -> tuple:
    """The packed keys of a case map of n cases (made once per n: each change of a fan-out's
    service chain makes a case map of the same 3 333 keys)."""
    keys = _CASE_KEYS.get(n)
    if keys is None:
        if len(_CASE_KEYS) >= 64:
            _CASE_KEYS.clear()
        keys = _CASE_KEYS[n] = tuple(map(_U32_KEY, range(n)))
    return keys


def _case_spec(name: str, value: list) -> MapSpec:
    """The case map of the values `value` (by k): the same MapSpec for the same contents."""
    blob = b"".join(value)
    key = ("cases", name, blob)
    spec = _RUN_SPECS.get(key)
    if spec is None:
        spec = MapSpec(name, BPF_MAP_TYPE_ARRAY, 4, 16, list(zip(_case_keys(len(value)), value)),
                       0, "bpfilter_case")
        if len(_RUN_SPECS) >= RUN_SPECS_MAX:
            _RUN_SPECS.clear()
        _RUN_SPECS[key] = spec
    return spec


def _shared_cases(cc, run: Run, chain: str, ret: str, after: str, exit0: str, verdicts: list,
                  by_k: list, where: str = "", path: list = ()) -> bool:
    """Emit the jump cases of `run` as shared bodies (see above); False: nothing emitted."""
    if not by_k or not _shared_ok(cc):
        return False
    found = _shared_bodies(cc, run, chain, by_k)
    if found is None:
        return False
    bodies, anchors, depth, nexts = found
    ctx = _fn_context(cc, chain, where, path)
    used = cc.__dict__.setdefault("fn_templates_used", set())
    count = cc.rule_count
    cc.in_global = True
    made = []
    try:
        for bkey, members in bodies.items():
            fkey = (ctx, "shared", bkey)
            tpl = _FN_CACHE.get(fkey)
            if tpl is not None and id(tpl) not in used:
                FN_STATS["reused"] += 1
            else:
                tpl = _shared_function(cc, run, chain, where, path, members[0],
                                       anchors[members[0]])
                if tpl is None:
                    return False
                FN_STATS["made"] += 1
                if len(_FN_CACHE) >= FN_CACHE_MAX:
                    _FN_CACHE.clear()
                _FN_CACHE[fkey] = tpl
            used.add(id(tpl))
            made.append(tpl)
    finally:
        cc.in_global = False
        cc.rule_count = count
    # as for grouped functions: small runs stay inlined (no call, no case map on their packets)
    if sum(len(m) * t.case_slots for m, t in zip(bodies.values(), made)) <= GLOBAL_ABOVE:
        return False
    name = f"case_{chain}_{run.start}"
    kept = run.__dict__.get("kept_bodies")
    spec = kept.spec if kept is not None and kept.spec is not None and kept.spec.name == name \
        else _leaf_case_map(run, name, bodies, anchors, nexts) or \
        _case_map(run, name, bodies, anchors, nexts)
    cc.__dict__.setdefault("cls_maps", {})[name] = spec
    _keep_bodies(cc, run, chain, by_k, found, spec)
    for tpl, members in zip(made, bodies.values()):
        cc.where[tpl.head] = (f"chain {chain} rules {run.start + 1}..{run.end} (classified): "
                              f"the body of {len(members)} jump cases")
    _shared_calls(cc, run, name, ret, after, exit0, verdicts, made, depth)
    return True


def _shared_calls(cc, run: Run, name: str, ret: str, after: str, exit0: str, verdicts: list,
                  made: list, depth: int):
    """The main program's side, once per jump case a packet can run through (`depth`): the
    action (verdicts first), the case's body and RETURN entry from the case map, a decision tree
    over the bodies, and each call site turning the answer into the run's next step: FN_RETURN
    the run's chain returns, a verdict ends, FN_CONTINUE goes on with the case map's next rule
    (counted here; a jump case is the next copy's) or after the run."""
    from . import compile as C
    fl, first = cc.fl, run.rules[0].index + run.d_index
    v_lbl = {a: cc.label(f"run_{ACT_NAMES[a].lower()}") for a in verdicts}
    copies = [cc.label("cases") for _ in range(depth + 1)]
    for d in range(depth):
        site = [cc.label("fn_call") for _ in made]
        cont = cc.label("fn_continue")
        cc.emit(Label(copies[d], "jump cases" + (f": the next rule of the run with the same key "
                                                 f"({d + 1})" if d else "")),
                E.ldx(E.DW, R1, FP, S_CLS_ACT))
        for a in verdicts:
            cc.emit(E.jmp(E.JEQ, R1, a, v_lbl[a]))
        cc.emit(E.alu(E.SUB, R1, ACT_CASE), E.stx(E.W, FP, S_CLS_KEY, R1, "key: the jump case k"),
                E.ld_map_fd(R1, name), E.mov(R2, FP), E.alu(E.ADD, R2, S_CLS_KEY),
                E.call(E.BPF_FUNC_map_lookup_elem),
                E.jmp(E.JEQ, R0, 0, after, comment="(k < max_entries: always found)"),
                E.ldx(E.W, R2, R0, 4, "the case chain's RETURN entry - the run's first entry"),
                _indexed(cc, E.alu(E.ADD, R2, first, bits=32,
                                   comment="+ the run's first entry: its entry index")),
                E.ldx(E.W, R1, R0, 0, "its body"))
        _tree(cc, 0, len(made) - 1, site, shown=0)
        for b, tpl in enumerate(made):
            nc, nr, vd = cc.label("fn_nc"), cc.label("fn_nr"), cc.label("fn_drop")
            cc.emit(Label(site[b]),
                    E.mov(R1, FP),
                    E.alu(E.ADD, R1, -FRAME_LO, comment="arg: the packet-field slots"),
                    E.call_local(tpl.head, f"global function: body {b}"),
                    E.jmp(E.JNE, R0, FN_CONTINUE, nc), E.ja(cont, "the chain RETURNed"),
                    Label(nc), E.jmp(E.JNE, R0, FN_RETURN, nr), E.ja(ret, "RETURN"),
                    Label(nr), E.jmp(E.JNE, R0, fl.ACCEPT, vd),
                    E.mov(R0, fl.ACCEPT, comment="ACCEPT"), E.exit_(),
                    Label(vd), E.mov(R0, fl.DROP, comment="DROP"), E.exit_())
        cc.emit(Label(cont), E.ld_map_fd(R1, name), E.mov(R2, FP), E.alu(E.ADD, R2, S_CLS_KEY),
                E.call(E.BPF_FUNC_map_lookup_elem), E.jmp(E.JEQ, R0, 0, after),
                E.ldx(E.W, R1, R0, 8, "1 + the next rule of the run with this key"),
                E.jmp(E.JEQ, R1, 0, after, comment="none: on after the run"),
                E.ldx(E.W, R2, R0, 12, "its action"), E.stx(E.DW, FP, S_CLS_ACT, R2),
                _indexed(cc, E.alu(E.ADD, R1, first - 1, bits=32,
                                   comment="+ the run's first entry - 1: its entry index")),
                E.stx(E.W, FP, C.S_KEY, R1))
        _count_dynamic(cc, C)
        cc.emit(E.ja(copies[d + 1]))
    # the last copy's next rule is no jump case (depth): a verdict, if any
    cc.emit(Label(copies[depth]), E.ldx(E.DW, R1, FP, S_CLS_ACT))
    for a in verdicts:
        cc.emit(E.jmp(E.JEQ, R1, a, v_lbl[a]))
    cc.emit(E.ja(after))
    for a in verdicts:
        cc.emit(Label(v_lbl[a]), *_verdict_code(cc, a, ret))
    cc.emit(Label(exit0))
    funcs = cc.__dict__.setdefault("global_funcs", [])
    labels = cc.__dict__.setdefault("global_labels", [])
    parts = cc.__dict__.setdefault("global_parts", [])
    for tpl in made:
        funcs.append(tpl.items)
        labels.append(tpl.head)
        parts.append((tpl, []))


def _slots(items) -> int:
    lddw = E.BPF_LD | E.DW | E.BPF_IMM          # the one instruction of two slots
    n = 0
    for it in items:
        if it.__class__ is not Label:
            n += 2 if it.code == lddw else 1
    return n


def _capture(cc, fn) -> list:
    """The items fn() emits, kept out of the program (to measure them)."""
    saved, count = cc.items, cc.rule_count
    cc.items = []
    try:
        fn()
        return cc.items
    finally:
        cc.items, cc.rule_count = saved, count


def _dispatch(cc, run: Run, chain: str, ret: str, where: str, path: list, after: str,
              exit0: str):
    """The action in S_CLS_ACT: verdicts, then the jump cases. The inlined chains of thousands of
    jump rules (kube-proxy) make a long program, and a 16-bit jump offset that fits when we
    assemble may not after the kernel patches instructions in (do_misc_fixups inlines map lookups
    and fails with "cannot be patched due to 16-bit range"). So the cases are cut in groups of at
    most GROUP_SLOTS instructions, each with its own decision tree, and every jump leaving a group
    (end of run, RETURN of the run's chain, the next group) hops group by group: no jump spans
    more than one group."""
    acts = getattr(run, "acts", None)        # the chain's list (find_runs), or ask the rules
    verdicts = sorted(set(acts if acts is not None else
                          map(_action, (r.target for r in run.rules))) - {ACT_CASE})
    by_k = sorted(run.cases, key=run.cases.get)           # positions of the jump rules, by k
    if _shared_cases(cc, run, chain, ret, after, exit0, verdicts, by_k, where, path):
        return
    if _global_cases(cc, run, chain, ret, where, path, after, exit0, verdicts, by_k):
        return
    case_lbl = {pos: cc.label("case") for pos in by_k}
    v_lbl = {a: cc.label(f"run_{ACT_NAMES[a].lower()}") for a in verdicts}
    groups, size = [], 0
    for pos in by_k:
        n = _slots(_capture(cc, lambda: _case_body(cc, run, pos, chain, "x", where, path, "x",
                                                   {})))
        if not groups or size + n > GROUP_SLOTS:
            groups.append([])
            size = 0
        groups[-1].append(pos)
        size += n + 16
    G = len(groups)
    check = [cc.label("group") for _ in range(G)]
    exits = [exit0] + [cc.label("group_exit") for _ in range(G - 1)]
    rets = [cc.label("group_ret") for _ in range(G)]
    vret = rets[0] if G else ret
    fall = None if G else verdicts[-1]
    if len(verdicts) + len(by_k) > 1:
        cc.emit(E.ldx(E.DW, R1, FP, _run_slots(run)[1]))
    for a in verdicts:
        if a != fall:
            cc.emit(E.jmp(E.JEQ, R1, a, v_lbl[a]))
    if G:
        cc.emit(E.ja(check[0]))
    for a in ([fall] if fall is not None else []) + [a for a in verdicts if a != fall]:
        if a != fall:
            cc.emit(Label(v_lbl[a]))
        cc.emit(*_verdict_code(cc, a, vret))
    for g, members in enumerate(groups):
        ks = [run.cases[p] + ACT_CASE for p in members]
        cc.emit(Label(check[g], f"jump cases {ks[0] - ACT_CASE}..{ks[-1] - ACT_CASE}"))
        if g < G - 1:
            cc.emit(E.jmp(E.JGT, R1, ks[-1], check[g + 1]))
        _tree(cc, ks[0], ks[-1], [case_lbl[p] for p in members])
        statics = {}                                        # position -> label of a static hit
        for pos in members:
            cc.emit(Label(case_lbl[pos]))
            _case_body(cc, run, pos, chain, rets[g], where, path, exits[g], statics)
        for pos, lbl in statics.items():
            r = run.rules[pos]
            cc.emit(Label(lbl, f"the next rule of the run with this key: {chain} rule "
                               f"{run.start + pos + 1}"))
            cc._count(r.index + run.d_index)
            a = _action(r.target)
            if a == ACT_CASE:           # a later case: through this group's check, forward
                cc.emit(E.mov(R1, ACT_CASE + run.cases[pos]), E.ja(check[g]))
            else:
                cc.emit(*_verdict_code(cc, a, rets[g]))
        cc.emit(Label(exits[g]), E.ja(exits[g + 1] if g < G - 1 else after),
                Label(rets[g]), E.ja(rets[g + 1] if g < G - 1 else ret))


def _rc(cc, a: int) -> int:
    """The flavor's return code for ACCEPT / DROP (nf: NF_ACCEPT/NF_DROP; tc, xdp: theirs)."""
    fl = getattr(cc, "fl", None)
    if fl is None:
        return NF_ACCEPT if a == ACT_ACCEPT else NF_DROP
    return fl.ACCEPT if a == ACT_ACCEPT else fl.DROP


def _verdict_code(cc, a: int, ret: str) -> list:
    if a == ACT_RETURN:
        return [E.ja(ret, "RETURN")]
    return [E.mov(R0, _rc(cc, a), comment=ACT_NAMES[a]), E.exit_()]


def _tree(cc, lo: int, hi: int, labels: list, shown: int = ACT_CASE):
    """Jump to labels[v - lo] for R1 == v (lo <= v <= hi), by halving (depth log2 of the
    number of cases); the listing names case v - shown."""
    _halving(cc, lo, hi, int, lambda a: E.ja(labels[a - lo], f"case {a - shown}"), "case_gt")


def _case_body(cc, run: Run, pos: int, chain: str, ret: str, where: str, path: list, after: str,
               statics: dict):
    """The jump rule's chain inlined (as compile.py's _entry does); on RETURN, the next rule of
    the run holding the same key, or the end of the run."""
    r = run.rules[pos]
    t = r.target
    goto = bool(r.ip.flags & IPT_F_GOTO) or bool(t.goto)
    target, start = cc._landing(t, chain, run.start + pos + 1, r)
    if target.name in path or len(path) >= cc.MAX_DEPTH:
        raise BpfilterError(errno.ELOOP, f"chain {chain} rule {run.start + pos + 1} (entry offset "
                                         f"{r.offset + run.d_offset}): loop through chain "
                                         f"{t.chain}")
    cont = cc.label("cont")
    inner_ret = ret if goto else cont
    inner_where = f"{where} > {t.chain}"
    cc.emit(Label(cc.label("body"), f"{'goto' if goto else 'jump'} {t.chain} "
                                    f"({chain} rule {run.start + pos + 1})"))
    cc._chain_body(target, inner_ret, path + [target.name], inner_where, start)
    cc._chain_return(target, inner_ret, path + [target.name], inner_where)
    if not goto:
        nxt = run.next_same.get(pos)
        cc.emit(Label(cont))
        if nxt is None:
            cc.emit(E.ja(after, "no later rule of the run matches"))
        else:
            if nxt not in statics:
                statics[nxt] = cc.label("static")
            cc.emit(E.ja(statics[nxt]))


def _hash6_key_code(cc, run: Run, after: str, hot: str, C):
    """hash6: every rule of the run has IP6T_F_PROTO and nothing before it, so the run's first
    rule walks the extension headers and hotdrops a failed walk (ip6_packet_match: protohdr <
    0 with no fragment offset); then the tcp/udp checks of the first rule whose protocol is
    the packet's (_l4_checks), then the key {proto, sport, dport} stored as one u64."""
    from .family import S_WALKERR
    cc.emit(E.ldx(E.DW, R1, FP, S_WALKERR, "ipv6_find_hdr() failed: the first rule hotdrops"),
            E.jmp(E.JNE, R1, 0, hot))
    _l4_checks(cc, run, after, hot, C)
    _, _, _, _, _, sp, dp = run.sig
    _fields_in(cc, R2, [(C.S_PROTO, None, 0, "protocol")] +
               [(C.S_SPORT, None, 16, "sport")] * (sp != "any") +
               [(C.S_DPORT, None, 32, "dport")] * (dp != "any"), "hash key")
    cc.emit(E.stx(E.DW, FP, _run_slots(run)[0], R2))


def _hash_key_code(cc, run: Run, after: str, hot: str, C):
    if run.sig[4]:
        _l4_checks(cc, run, after, hot, C)
    _key(cc, run, C)


def _l4_checks(cc, run: Run, after: str, hot: str, C):
    """tcp_mt/udp_mt run only for a rule whose ip part matched (ip_packet_match first): a
    non-first fragment matches no rule of the run, and a tcp fragment at offset 8 bytes or a
    truncated header is hotdropped by the first rule whose ip part matches, if any."""
    chk, abn = cc.label("run_l4"), cc.label("run_abnormal")
    cc.emit(E.ldx(E.DW, R2, FP, C.S_PROTO, f"protocols of the run: {run.protos}"))
    for p in run.protos:
        cc.emit(E.jmp(E.JEQ, R2, p, f"{chk}_{p}"))
    cc.emit(E.ja(after))
    ok = cc.label("run_l4ok")
    for p in run.protos:
        need = 20 if p == IPPROTO_TCP else 8
        cc.emit(Label(f"{chk}_{p}"),
                E.ldx(E.DW, R1, FP, C.S_FRAGOFF))
        if p == IPPROTO_TCP:
            cc.emit(E.jmp(E.JEQ, R1, 1, abn, comment="tcp fragment at offset 8 bytes"))
        cc.emit(E.jmp(E.JNE, R1, 0, after, comment="fragments never match"),
                E.ldx(E.DW, R1, FP, C.S_L4LEN),
                E.jmp(E.JLT, R1, need, abn, comment="truncated header"),
                E.ja(ok))
    cc.emit(Label(abn))
    if _needs_ippart(run):
        _key(cc, run, C, ippart=True)
        cc.emit(E.ld_map_fd(R1, f"cls_{run.chain}_{run.start}"), E.mov(R2, FP),
                E.alu(E.ADD, R2, S_CLS_KEY), E.call(E.BPF_FUNC_map_lookup_elem),
                E.jmp(E.JEQ, R0, 0, after, comment="no rule's ip part matches"))
    cc.emit(E.ja(hot), Label(ok))


def _key(cc, run: Run, C, ippart: bool = False, gid: int = 0):
    """The run's 16-byte hash key {saddr, daddr, proto, ip-part flag, sport, dport, shape
    number} made in R1 (bytes 0-7) and R2 (bytes 8-15), then stored at S_CLS_KEY as two u64s
    (the split form's Bloom hash takes the words from R1 and R2). Made in registers, not stored
    a field at a time: a load of bytes that several narrower stores wrote is not forwarded from
    the store buffer on x86 and waits for them to reach the cache, and both the Bloom hash
    (u64 loads) and htab's jhash (u32 loads) read the key so. Measured side by side
    (BPF_PROG_TEST_RUN, mixed 10 000-rule split run, no match): 56 -> 30 ns a packet, its
    10-rule chain 26 ns. The slots hold zero-extended values (compile._parse_ip: u32
    addresses, the u8 protocol, ports swapped by be16, which clears the upper bits)."""
    _, smsk, dmsk, has_proto, l4, sp, dp = run.sig
    what = "hash key" + (" of the ip part" if ippart else "")
    _fields_in(cc, R1, [(C.S_SADDR, smsk, 0, "saddr")] * bool(smsk) +
               [(C.S_DADDR, dmsk, 32, "daddr")] * bool(dmsk), what)
    _fields_in(cc, R2, [(C.S_PROTO, None, 0, "protocol")] * bool(has_proto) + ([] if ippart else
               [(C.S_SPORT, None, 16, "sport")] * (sp != "any") +
               [(C.S_DPORT, None, 32, "dport")] * (dp != "any")))
    if ippart:
        cc.emit(E.alu(E.OR, R2, 1 << 8, comment="the ip part's flag"))
    if gid:
        cc.emit(E.mov(E.R3, gid, comment="the shape's number"), E.alu(E.LSH, E.R3, 48),
                E.alu(E.OR, R2, E.R3))
    cc.emit(E.stx(E.DW, FP, S_CLS_KEY, R1), E.stx(E.DW, FP, S_CLS_KEY + 8, R2))


def _fields_in(cc, reg, fields: list, what: str = "") -> None:
    """reg = the OR of the stack slots `fields` [(slot, 32-bit mask or None, shift, name)], each
    masked and shifted to its place in the key word (R3 holds the second and later); 0 for
    none."""
    if not fields:
        cc.emit(E.mov(reg, 0, comment=what))
    for k, (slot, mask, shift, name) in enumerate(fields):
        r = reg if k == 0 else E.R3
        cc.emit(E.ldx(E.DW, r, FP, slot, f"{what}: {name}" if what and k == 0 else name))
        if mask not in (None, 0xffffffff):
            cc.emit(E.alu(E.AND, r, E._s32(mask), bits=32))
        if shift:
            cc.emit(E.alu(E.LSH, r, shift))
        if k:
            cc.emit(E.alu(E.OR, reg, r))


def _count_dynamic(cc, C):
    """ADD_COUNTER(+1, skb->len) on the entry whose index is in the S_KEY slot."""
    skip = cc.label("nocount")
    cc.emit(E.ld_map_fd(R1, C.COUNTERS_MAP), E.mov(R2, FP), E.alu(E.ADD, R2, C.S_KEY),
            E.call(E.BPF_FUNC_map_lookup_elem),
            E.jmp(E.JEQ, R0, 0, skip),
            E.ldx(E.DW, R1, R0, 0), E.alu(E.ADD, R1, 1), E.stx(E.DW, R0, 0, R1),
            E.ldx(E.DW, R1, R0, 8), E.ldx(E.DW, R2, FP, C.S_LEN), E.alu(E.ADD, R1, R2),
            E.stx(E.DW, R0, 8, R1),
            Label(skip))



# --------------------------------------------------------------- multi-field runs (rule bitmaps)
#
# A stretch of rules of DIFFERENT shapes (hand-grown firewalls: source prefixes, destination
# prefixes, ports, 5-tuples interleaved) is one "multi" run: one lookup per field gives the bitmap
# of the run's rules whose condition on that field holds (bit i = i-th rule of the run), the AND
# of the four bitmaps holds exactly the rules matching the packet, and its lowest set bit is the
# first match. Fields: source prefix and destination prefix (LPM tries; every key's bitmap holds
# the rules whose prefix contains the key, so the longest match carries all of them, and a /0
# key holds the rules without that field), protocol + destination port and protocol + source
# port (hashes; keys for the ports the rules name, a per-protocol default for the others, and a
# protocol-0 default for protocols no rule names).
# tcp/udp semantics (xt_tcpudp.c): a non-first fragment matches no rule with a tcp/udp match
# (key kind NONL4: the protocol's rules without one); a tcp fragment at offset 8 bytes or a
# truncated header is hotdropped by the first rule whose ip part matches if that rule has a
# tcp/udp match (key kind IPPART: ports ignored; the rule table says whether the first one has).

K_PORT, K_DEFAULT, K_NONL4, K_IPPART = 0, 1, 2, 3
MULTI_NS_BASE, MULTI_NS_PER_WORD = 200.0, 3.0     # 4-5 lookups + the AND loop per 64 rules
MAX_PORTS_PER_RULE = 1024
_IP_PROTO = attrgetter("ip.proto")
_HASHES = ("hash", "hash6")
# compile.py's S_OPT (-248..-200) holds TCP options only while one rule tests --tcp-option;
# between rules (where a run is) it is free
S_M = (-248, -240, -232, -224)                      # the four bitmap pointers
S_CLS_HOT = -352                                    # 1: a hotdrop candidate packet


def _multi_text(run: Run, chain: str) -> str:
    head = f"rules {run.start + 1}..{run.end} of {chain or 'chain'} ({len(run.rules)} rules"
    form, shapes, _ = _run_form(run)
    if form == "split":
        return f"{head} of {len(shapes)} shapes): one prefiltered lookup per shape, first wins"
    return f"{head} of mixed shapes): per-field lookups ANDed as rule bitmaps"


def _run_form(run: Run) -> tuple:
    """_multi_form of the run's rules, computed once per Run (10 000 rules: ~10 ms asking each
    rule, ~1 ms from the chain's lists when _keep_seen_runs left them on the run)."""
    form = getattr(run, "_form", None)
    if form is None:
        form = getattr(run, "kept", {}).get("form")
        if form is None:
            form = _multi_form(run.rules, (), run.__dict__.pop("_vec", None), run.start)
        run._form = form
    return form


def _bitmap_cost(n: int) -> float:
    return MULTI_NS_BASE + MULTI_NS_PER_WORD * ((n + 63) // 64)


def _with_multi(rules: list, plain: list, minimum: int, vec=None) -> list:
    """Plain runs, or multi runs over stretches of multi_ok rules where those are cheaper than the
    plain runs and linear rules they replace."""
    out, i, n = [], 0, len(rules)
    by_start = {r.start: r for r in plain}
    multi = vec.multi if vec is not None else None
    while i < n:
        if not (multi[i] if multi is not None else multi_ok(rules[i])):
            if i in by_start:
                out.append(by_start[i])
                i = by_start[i].end
            else:
                i += 1
            continue
        j = i
        if multi is not None:
            try:
                j = multi.index(False, i)
            except ValueError:
                j = n
        while j < n and multi_ok(rules[j]):
            j += 1
        inside = [r for r in plain if i <= r.start < j]
        if inside and inside[-1].end > j:         # a plain run reaching past the stretch
            j = inside[-1].start
            inside = inside[:-1]
            if j == i:
                out.append(by_start[i])
                i = by_start[i].end
                continue
        covered = sum(len(r.rules) for r in inside)
        plain_cost = min(LOOKUP_NS.values()) * len(inside) + LINEAR_NS * (j - i - covered)
        sigs = {r.sig for r in inside}
        if j - i < minimum:
            form = None
        elif vec is not None:       # the cost from the lists, the form when emitted (_run_form)
            form = (None, None, _multi_cost(vec, i, j, sigs))
        else:
            form = _multi_form(rules[i:j], sigs)
        if form and form[2] < plain_cost:
            out.append(Run("multi", i, rules[i:j], ("multi",)))
            if form[0] is not None:
                out[-1]._form = form
            else:
                out[-1]._vec = vec
        else:
            out.extend(inside)
        i = j
    return out


# ---- split form: one plain lookup per shape, the smallest position wins
# A multi run usually mixes few shapes (rule_shape: which fields a rule tests, with which masks):
# hand-grown firewalls have source prefixes, destination prefixes, ports, 5-tuples. The rules of
# one shape are a plain LPM/hash "sub-run" whose lookup gives the first of ITS rules matching
# the packet (lpm_entries/hash_entries' first-match values); the first rule of the whole run
# matching is the smallest of those positions. So a packet costs one lookup per shape whatever
# the number of rules, where the bitmaps cost an AND per 64 rules. Values: u32 (position in the
# run << 8 | action); a key of a shape with a tcp/udp match that says only "this rule's ip part
# matches" (ippart = 1, looked up for truncated headers and tcp fragments at offset 8 bytes)
# carries SPLIT_HOT, the hotdrop of xt_tcpudp.c: the first rule whose ip part matches decides,
# it hotdrops when it has a tcp/udp match and matches when it has none (its own shape's key).
MULTI_FORM = None            # "split" or "bitmap" forces a form (tests); None: the cheaper one
SPLIT_MAX_SHAPES = 16        # past that, bitmaps (a lookup per shape would cost more)
SPLIT_HOT = 3                # value action: hotdrop (actions 0..2 are ACT_DROP/ACCEPT/RETURN)
# What a shape costs a packet on average: the prefilter (~3 ns) and the lookup (hash ~18 ns, LPM
# 9-55 ns; BPF_PROG_TEST_RUN on 6.18) for the packets it lets through; bench/ruleset_bench.py's
# mixed shape, 5 shapes: ~90 ns per packet for 1000 or 10 000 rules, ~75 ns for 10 linear
# rules, where the bitmaps took 190 and 250-300 ns. A shape holding a plain run's rules counts
# as a full lookup (LOOKUP_NS), as if every packet passed the prefilter, so a plain run stays a
# plain run (its map is reused across appends, _keep_seen_runs) and a few rules of other shapes
# next to it stay linear.
SPLIT_NS = {"lpm": 15.0, "hash": 10.0}


def _split_shapes(rules: list):
    """[(shape, [positions])] in order of first position, or None when the split form cannot
    serve these rules (too many shapes, too many expanded port keys)."""
    if len(rules) >= 1 << 23:          # position << 8 | action must stay a positive s32
        return None
    groups = {}
    for i, r in enumerate(rules):
        s = rule_shape(r)
        if s is None:
            return None
        groups.setdefault(s, []).append(i)
    if len(groups) > SPLIT_MAX_SHAPES:
        return None
    keys = sum(_rule_key_count(rules[i])
               for s, ps in groups.items() if s[0] == "hash" and s[4] for i in ps)
    return list(groups.items()) if keys <= MAX_KEYS else None


def _split_shapes_vec(vec: "_Vecs", i: int, j: int):
    """_split_shapes(rules[i:j]) from the chain's shape-id column (~0.6 ms for 10 000 rules)
    rather than a rule_shape per rule."""
    if j - i >= 1 << 23:
        return None
    sid = vec.sid[i:j]
    ids = set(sid)
    if -1 in ids or len(ids) > SPLIT_MAX_SHAPES or sum(vec.l4keys[i:j]) > MAX_KEYS:
        return None
    groups = {}                                 # in order of first position, as _split_shapes
    for pos, k in enumerate(sid):
        groups.setdefault(k, []).append(pos)
    return [(_SHAPES[k], ps) for k, ps in groups.items()]


def _multi_cost(vec: "_Vecs", i: int, j: int, plain_sigs) -> float:
    """_multi_form(rules[i:j], plain_sigs)[2] from the chain's lists (_split_shapes' refusals:
    a rule of no shape, too many shapes, too many tcp/udp keys, too many rules)."""
    bitmap = _bitmap_cost(j - i)
    if MULTI_FORM == "bitmap" or j - i >= 1 << 23:
        return bitmap
    ids = set(vec.sid[i:j])
    if -1 in ids or len(ids) > SPLIT_MAX_SHAPES or sum(vec.l4keys[i:j]) > MAX_KEYS:
        return bitmap
    shapes = [_SHAPES[k] for k in ids]
    return min(bitmap, sum((LOOKUP_NS if s in plain_sigs else SPLIT_NS)[s[0]] for s in shapes))


def _multi_form(rules: list, plain_sigs=(), vec: "_Vecs" = None, at: int = 0) -> tuple:
    """(form, shapes, cost): "split" with its shapes when that form serves the rules and costs
    less than the bitmaps (SPLIT_NS), else "bitmap" and None (MULTI_FORM forces a form); cost:
    the run's cost against plain runs and linear rules (the cheaper of the bitmaps and the split
    form, whose shapes in plain_sigs, the shapes of the plain runs it would replace, count at
    LOOKUP_NS). vec: the lists of the chain whose rules at..at + len(rules) these are."""
    if MULTI_FORM == "bitmap":
        shapes = None
    elif vec is not None:
        shapes = _split_shapes_vec(vec, at, at + len(rules))
    else:
        shapes = _split_shapes(rules)
    bitmap = _bitmap_cost(len(rules))
    if shapes is None:
        return "bitmap", None, bitmap
    split = sum(SPLIT_NS[s[0]] for s, _ in shapes)
    cost = min(bitmap, sum((LOOKUP_NS if s in plain_sigs else SPLIT_NS)[s[0]] for s, _ in shapes))
    if MULTI_FORM == "split" or split < bitmap:
        return "split", shapes, cost
    return "bitmap", None, cost


def _split_value(rules: list, pos: int, act: int = None) -> bytes:
    return struct.pack("<I", pos << 8 | (_action(rules[pos].target) if act is None else act))


def _split_lpm_entries(rules: list, positions: list, field: str, run: Run = None) -> list:
    """[(key, value)] of one prefix shape: each prefix's value is the first rule (smallest
    position) whose prefix contains it, so the longest match gives the first matching rule."""
    acts = _run_acts(run) if run is not None else None
    keys, bests = _lpm_columns(rules, positions, field, run)
    if not acts:
        return [(key, _split_value(rules, best)) for key, best in zip(keys, bests)]
    return list(zip(keys, map(_SPLIT_VALUE.pack, [best << 8 | acts[best] for best in bests])))


def _split_hash_entries(rules: list, shapes: list, run: Run = None) -> list:
    """[(key, value)] of every hash shape in one map: _hash_key's keys with the shape's number
    in the pad (the last u16), filled in rule order keeping the first."""
    if run is None:
        run = Run("multi", 0, rules, ("multi",))
    seen = {}
    put = seen.setdefault
    acts = _run_acts(run)
    pack = _SPLIT_VALUE.pack
    got = _run_classes(run)
    for gid, (sig, positions) in _hash_shapes(shapes):
        keys = _keys_at(got, positions)
        flat = _one_key_each(sig, keys, got[0], positions, gid) if keys is not None else None
        if flat is not None:
            # one key a rule (_one_key_each): the puts as one C loop, in the loop's order below
            # (a rule's key, then its ip-part key), so the same entries in the same order
            values = [pos << 8 | acts[pos] for pos in positions]
            if sig[4]:
                ks, vs = [None] * (2 * len(flat)), [None] * (2 * len(flat))
                ks[0::2], ks[1::2] = flat, _ippart_keys(run, positions, gid)
                vs[0::2], vs[1::2] = values, [pos << 8 | SPLIT_HOT for pos in positions]
                flat, values = ks, vs
            list(map(put, flat, map(pack, values)))
            continue
        keys = _run_rule_keys(run, sig, positions, gid)
        values = map(pack, [pos << 8 | acts[pos] for pos in positions])
        if sig[4]:
            hot = _ippart_keys(run, positions, gid)
            for ks, v, hk, hv in zip(keys, values, hot,
                                     map(pack, [pos << 8 | SPLIT_HOT for pos in positions])):
                for k in ks:
                    put(k, v)
                put(hk, hv)
        else:
            for ks, v in zip(keys, values):
                for k in ks:
                    put(k, v)
    return _hash_items(seen)


def _hash_shapes(shapes: list) -> list:
    return list(enumerate((s, ps) for s, ps in shapes if s[0] == "hash"))


# Prefilter (issue #7: a hash lookup costs ~18 ns, a miss as much as a hit; an LPM lookup for an
# address among the run's prefixes up to ~55 ns; an ARRAY lookup is inlined, ~1 ns): one ARRAY
# map of u64 words holds, for each prefix shape, a bit per /16 (set when a prefix of the shape
# overlaps it), and for the hash shapes a one-function Bloom filter over the exact hash keys (the
# 16 key bytes, shape number included, mixed by two multiplications). A clear bit proves the
# lookup would miss, so most packets that match no rule of a shape skip its lookup.
BLOOM_K1, BLOOM_K2 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F
BLOOM_BITS_PER_KEY = 16       # one hash function: ~6% of misses still look up
BLOOM_MAX_BITS = 1 << 22      # 512 KiB
WORDS16 = (1 << 16) // 64     # one bit per /16


@dataclass
class _ArraySpec(MapSpec):
    """An ARRAY map listing only its non-zero words (the kernel zero-fills the others)."""
    size: int = 1
    bloom_bits: int = 6        # log2 of the Bloom filter's bits (the code's shift)

    @property
    def max_entries(self) -> int:
        return self.size


def _bloom_bits(nkeys: int) -> int:
    """log2 of the Bloom filter's size in bits."""
    b = 6
    while (1 << b) < min(BLOOM_BITS_PER_KEY * nkeys, BLOOM_MAX_BITS):
        b += 1
    return b


def _idx16(top16: int) -> int:
    """A /16 (its first two address bytes, a << 8 | b) as the packet side computes it: the low
    16 bits of the LE u32 the address slot holds, b << 8 | a."""
    return (top16 >> 8) | (top16 & 0xff) << 8


def _split_layout(shapes: list) -> tuple:
    """({prefix shape: first word of its /16 region}, first word of the Bloom filter)."""
    out, w = {}, 0
    for s, _ in shapes:
        if s[0] == "lpm":
            out[s] = w
            w += WORDS16
    return out, w


def _bloom_words(rules: list, shapes: list, hash_keys: list, run: Run = None,
                 lpm_keys: dict = None) -> tuple:
    """({word: u64} of the prefilter's non-zero words, bits of the hash part, total words).
    The bits are set in a bytearray of all the words as LE u64s (bit g of the map is bit g & 7
    of byte g >> 3), read back as words at the end. lpm_keys: {prefix shape: its LPM map's keys}
    when the caller has them (its distinct prefixes set the same bits as its rules' prefixes)."""
    base, w = _split_layout(shapes)
    b = _bloom_bits(len(hash_keys))
    bits = bytearray(w * 8 + (1 << b) // 8)
    for s, ps in shapes:
        if s[0] != "lpm":
            continue
        at = base[s] * 64
        keys = lpm_keys.get(s) if lpm_keys is not None else None
        if keys is not None:
            for plen, i16 in map(_LPM_SLOT, keys):
                if plen >= 16:              # one /16: the address's first two bytes as LE u16
                    g = at + i16
                    bits[g >> 3] |= 1 << (g & 7)
                else:
                    _set_span16(bits, at, (i16 >> 8 | (i16 & 0xff) << 8) << 16, plen)
            continue
        for a, plen in _prefixes(rules, ps, s[1], run):
            _set_span16(bits, at, a, plen)
    at = w * 64
    for g in _bloom_slots(hash_keys, b):
        g += at
        bits[g >> 3] |= 1 << (g & 7)
    words = {k: v for k, (v,) in enumerate(_U64.iter_unpack(bits)) if v}
    return words, b, w + (1 << b) // 64


def _set_span16(bits: bytearray, at: int, a: int, plen: int) -> None:
    """Set the bits of the /16s the prefix a/plen (a: the network as an int) overlaps."""
    span = 1 << max(0, 16 - plen)
    lo = (a >> 16) & ~(span - 1)
    for t in range(lo, lo + span):
        g = at + _idx16(t)
        bits[g >> 3] |= 1 << (g & 7)


def _bloom_slots(keys: list, b: int) -> list:
    """The Bloom bit of each 16-byte hash key as the program computes it: its two LE u64 w0,
    w1 -> ((w1 * K1 mod 2^64) ^ w0) * K2 mod 2^64 >> (64 - b). Computed for all keys at once on
    one big int (~0.2 ms for 8 000 keys where a Python loop takes ~5): key i is its 128-bit lane
    i, a product of two u64 fits a lane (no carry into the next one), and masking every lane's
    high half makes the mod 2^64; the final shift moves each lane's top b bits to its bottom
    and only zeroed high-half bits of the next lane into its high half."""
    n = len(keys)
    joined = b"".join(keys)
    if n == 0 or len(joined) != 16 * n:
        m, shift = (1 << 64) - 1, 64 - b
        return [((((w1 * BLOOM_K1) & m) ^ w0) * BLOOM_K2 & m) >> shift
                for w0, w1 in map(_QQ, keys)]
    big = int.from_bytes(joined, "little")
    low = int.from_bytes(_LANE_LOW * n, "little")          # each lane's low u64 set
    x = (((big >> 64) & low) * BLOOM_K1 & low ^ big & low) * BLOOM_K2 & low
    x >>= 64 - b
    return [v for (v,) in _LANE_U64.iter_unpack(x.to_bytes(16 * n, "little"))]


_LANE_LOW = b"\xff" * 8 + bytes(8)
_LANE_U64 = struct.Struct("<Q8x")
_LPM_SLOT = struct.Struct("<IH2x").unpack          # an LPM key: prefixlen, first 2 bytes LE


_U64 = struct.Struct("<Q")
_QQ = struct.Struct("<QQ").unpack


def _split_specs(run: Run, name: str, shapes: list) -> list:
    lpm = {s: _split_lpm_entries(run.rules, ps, s[1], run) for s, ps in shapes if s[0] == "lpm"}
    out = [MapSpec(f"{name}_{s[1]}", BPF_MAP_TYPE_LPM_TRIE, 8, 4, entries, BPF_F_NO_PREALLOC,
                   "bpfilter_mslpm")
           for s, entries in lpm.items()]
    hashed = _split_hash_entries(run.rules, shapes, run) if _hash_shapes(shapes) else []
    if hashed:
        out.append(MapSpec(f"{name}_hash", BPF_MAP_TYPE_HASH, 16, 4, hashed, 0,
                           "bpfilter_mshash"))
    words, bits, size = _bloom_words(run.rules, shapes, list(map(_FIRST, hashed)), run,
                                     {s: list(map(_FIRST, e)) for s, e in lpm.items()})
    at = sorted(words)
    out.append(_ArraySpec(f"{name}_bloom", BPF_MAP_TYPE_ARRAY, 4, 8,
                          list(zip(map(_U32_KEY, at), map(_U64.pack, map(words.__getitem__, at)))),
                          0, "bpfilter_msblm", size=size, bloom_bits=bits))
    return out


def _split_lookup(cc, name: str, sig, gid: int, first: int, base: int, bits: int,
                  ippart: bool = False):
    """Look the packet up in one shape's map, unless the prefilter says it misses; a hit at a
    smaller position than r9 becomes r9. A shape whose first rule comes after r9's is skipped:
    it cannot hold the first match."""
    from . import compile as C
    R3, R8 = E.R3, E.R8
    skip = cc.label("s_next")
    # (r9 kept to the compare below: the key, the prefilter and the helper call leave it be)
    cc.emit(E.ldx(E.W, E.R9, FP, S_CLS_BEST, "the smallest position so far"))
    if first:
        cc.emit(E.jmp(E.JLT, E.R9, first << 8, skip, comment="an earlier rule already matched"))
    if sig[0] == "lpm":
        slot = C.S_SADDR if sig[1] == "src" else C.S_DADDR
        cc.emit(E.ldx(E.DW, R2, FP, slot, f"prefilter: the {sig[1]} address's /16"),
                E.alu(E.AND, R2, 0xffff))
    else:
        _key(cc, Run("hash", 0, [], sig), C, ippart, gid)
        # (the key's two words are still in R1 and R2)
        cc.emit(E.ld_imm64(R3, BLOOM_K1, "prefilter: Bloom index of the key"),
                E.alu(E.MUL, R2, R3), E.alu(E.XOR, R2, R1), E.ld_imm64(R3, BLOOM_K2),
                E.alu(E.MUL, R2, R3), E.alu(E.RSH, R2, 64 - bits))
    cc.emit(E.mov(R8, R2), E.alu(E.AND, R8, 63), E.alu(E.RSH, R2, 6))
    if base:
        cc.emit(E.alu(E.ADD, R2, base))
    cc.emit(E.stx(E.W, FP, S_CLS_HOT, R2), E.ld_map_fd(R1, f"{name}_bloom"), E.mov(R2, FP),
            E.alu(E.ADD, R2, S_CLS_HOT), E.call(E.BPF_FUNC_map_lookup_elem),
            E.jmp(E.JEQ, R0, 0, skip), E.ldx(E.DW, R1, R0, 0), E.alu(E.RSH, R1, R8),
            E.alu(E.AND, R1, 1), E.jmp(E.JEQ, R1, 0, skip, comment="no key of the shape there"))
    if sig[0] == "lpm":
        slot = C.S_SADDR if sig[1] == "src" else C.S_DADDR
        cc.emit(E.st(E.W, FP, S_CLS_KEY, 32, f"LPM key: {sig[1]} address"),
                E.ldx(E.DW, R1, FP, slot), E.stx(E.W, FP, S_CLS_KEY + 4, R1),
                E.ld_map_fd(R1, f"{name}_{sig[1]}"))
    else:
        cc.emit(E.ld_map_fd(R1, f"{name}_hash"))
    cc.emit(E.mov(R2, FP), E.alu(E.ADD, R2, S_CLS_KEY), E.call(E.BPF_FUNC_map_lookup_elem),
            E.jmp(E.JEQ, R0, 0, skip), E.ldx(E.W, R1, R0, 0, "position << 8 | action"),
            E.jmp(E.JGE, R1, E.R9, skip), E.stx(E.W, FP, S_CLS_BEST, R1), Label(skip))


def _l4_protos(run: Run, l4: list) -> list:
    """The protocols of the rules of the tcp/udp shapes l4, sorted (kept with the run's maps)."""
    kept = getattr(run, "kept", None)
    protos = kept.get("l4protos") if kept is not None else None
    if protos is None:
        # from the rules' classes where every rule has one: the protocol (ipt_ip.proto) is in
        # the template, so a class's rep has its rules' protocol
        cls = getattr(run, "cls", None)
        got = set().union(*(map(cls.__getitem__, ps) for _, ps in l4)) \
            if cls is not None and len(cls) == len(run.rules) else {None}
        if None not in got:
            protos = sorted({c.rep.ip.proto for c in got})
        else:
            at = run.rules.__getitem__
            protos = sorted(set().union(*(map(_IP_PROTO, map(at, ps)) for _, ps in l4)))
        if kept is not None:
            kept["l4protos"] = protos
    return protos


def _emit_split(cc, run: Run, chain: str, ret: str, where: str, name: str, shapes: list):
    from . import compile as C
    after, hot = cc.label("run_after"), cc.label("run_hotdrop")
    miss, key, done = cc.label("run_miss"), cc.label("run_key"), cc.label("s_done")
    head = cc.label("run")
    first, last = run.rules[0], run.rules[-1]
    cc.where[head] = (f"chain {chain} rules {run.start + 1}..{run.end} (entry offsets "
                      f"{first.offset + run.d_offset}..{last.offset + run.d_offset}, "
                      f"classified)")
    cc.emit(Label(head, f"{where}: rules {run.start + 1}..{run.end} of {chain} "
                        f"({len(run.rules)} rules of {len(shapes)} shapes): one lookup per "
                        f"shape, the first match is the smallest position"),
            E.ja(key), Label(miss), E.ja(after), Label(hot),
            E.mov(R0, _rc(cc, ACT_DROP), comment="hotdrop"), E.exit_(), Label(key),
            E.st(E.W, FP, S_CLS_BEST, -1, "no rule matched yet (S_CLS_BEST)"))
    gids = {s: g for g, (s, _) in _hash_shapes(shapes)}
    base, hbase = _split_layout(shapes)
    base["hash"] = hbase
    bits = cc.cls_maps[f"{name}_bloom"].bloom_bits

    def lookup(s, ps, ippart=False):
        _split_lookup(cc, name, s, gids.get(s, 0), ps[0], base[s if s[0] == "lpm" else "hash"],
                      bits, ippart)
    plain = [(s, ps) for s, ps in shapes if not (s[0] == "hash" and s[4])]
    l4 = [(s, ps) for s, ps in shapes if s[0] == "hash" and s[4]]
    for s, ps in plain:
        lookup(s, ps)
    if l4:
        # tcp_mt/udp_mt (xt_tcpudp.c): a non-first fragment matches no rule with a tcp/udp
        # match; a truncated header or a tcp fragment at offset 8 bytes: the ip-part keys
        protos = _l4_protos(run, l4)
        normal, hotc = cc.label("s_normal"), cc.label("s_hotcand")
        _l4_split(cc, head, protos, normal, hotc, done, done)
        cc.emit(Label(hotc))
        for s, ps in l4:
            lookup(s, ps, True)
        cc.emit(E.ja(done), Label(normal))
        for s, ps in l4:
            lookup(s, ps)
    cc.emit(Label(done), E.ldx(E.W, E.R9, FP, S_CLS_BEST),
            E.jmp(E.JEQ, E.R9, -1, miss, bits=32, comment="no rule of the run matches"),
            E.mov(R1, E.R9), E.alu(E.AND, R1, 0xff),
            E.jmp(E.JEQ, R1, SPLIT_HOT, hot, comment="its tcp/udp match hotdrops"),
            E.stx(E.DW, FP, S_CLS_ACT, R1, "its action"),
            E.alu(E.RSH, E.R9, 8, comment="its position"),
            _indexed(cc, E.alu(E.ADD, E.R9, first.index + run.d_index,
                               comment="+ the run's first entry: its index")),
            E.stx(E.W, FP, C.S_KEY, E.R9))
    _count_dynamic(cc, C)
    _dispatch(cc, run, chain, ret, where, (), after, after)
    cc.emit(Label(after))


def _prefix_bitmaps(run: Run, field: str) -> list:
    """[(LPM key, bitmap int)] for the source or destination field."""
    groups = {}
    for i, r in enumerate(run.rules):
        a, m = (r.ip.src, r.ip.smsk) if field == "src" else (r.ip.dst, r.ip.dmsk)
        k = (_plen(m), int(a))
        groups[k] = groups.get(k, 0) | (1 << i)
    groups.setdefault((0, 0), 0)
    out = []
    plens = sorted({p for p, _ in groups})
    for (plen, net) in groups:
        bm = 0
        for p in plens:
            if p > plen:
                break
            bm |= groups.get((p, net & (((1 << 32) - 1) ^ ((1 << (32 - p)) - 1))), 0)
        out.append((struct.pack("<I", plen) + net.to_bytes(4, "big"), bm))
    return out


def _pkey(proto: int, kind: int, port: int = 0) -> bytes:
    """struct { u8 proto; u8 kind; u16 port; }"""
    return struct.pack("<BBH", proto, kind, port)


def _port_bitmaps(run: Run) -> tuple:
    """([(key, bitmap)] for protocol + dport, the same for protocol + sport)."""
    n = len(run.rules)
    every = (1 << n) - 1
    anyproto = 0
    plain = {}                       # proto -> rules of that protocol without a tcp/udp match
    l4 = {}                          # proto -> [(i, dports, sports)] (None = any)
    for i, r in enumerate(run.rules):
        p = r.ip.proto
        if not p:
            anyproto |= 1 << i
            continue
        m = _l4(r) if _matches(r) else None
        if m is None:
            plain[p] = plain.get(p, 0) | (1 << i)
        else:
            d = m[1]
            rng = [None if (lo == 0 and hi >= 0xffff) else range(lo, hi + 1)
                   for lo, hi in (d["dpts"], d["spts"])]
            l4.setdefault(p, []).append((i, rng[0], rng[1]))
    dmap, smap = [(_pkey(0, K_DEFAULT), anyproto)], [(_pkey(0, K_DEFAULT), every)]
    for p in set(plain) | set(l4):
        base = anyproto | plain.get(p, 0)
        rules = l4.get(p, [])
        allbits = 0
        for i, _, _ in rules:
            allbits |= 1 << i
        dflt = base
        sdflt = every
        per_d, per_s = {}, {}
        for i, dp, sp in rules:
            if dp is None:
                dflt |= 1 << i
            else:
                for x in dp:
                    per_d[x] = per_d.get(x, 0) | (1 << i)
            if sp is not None:
                sdflt &= ~(1 << i)
                for x in sp:
                    per_s[x] = per_s.get(x, 0) | (1 << i)
        dmap += [(_pkey(p, K_DEFAULT), dflt), (_pkey(p, K_NONL4), base),
                 (_pkey(p, K_IPPART), base | allbits)]
        dmap += [(_pkey(p, K_PORT, x), dflt | bm) for x, bm in per_d.items()]
        if rules:
            smap.append((_pkey(p, K_DEFAULT), sdflt))
            smap += [(_pkey(p, K_PORT, x), sdflt | bm) for x, bm in per_s.items()]
    return dmap, smap


def multi_specs(run: Run, name: str) -> list:
    form, shapes, _ = _run_form(run)
    if form == "split":
        return _split_specs(run, name, shapes)
    words = (len(run.rules) + 63) // 64
    vs = words * 8

    def bm(entries):
        return [(k, b.to_bytes(vs, "little")) for k, b in entries]
    dmap, smap = _port_bitmaps(run)
    table = [(struct.pack("<I", i), struct.pack("<IIII", i, _action(r.target),
                                                 1 if _matches(r) else 0, 0))
             for i, r in enumerate(run.rules)]
    return [MapSpec(name + "_src", BPF_MAP_TYPE_LPM_TRIE, 8, vs, bm(_prefix_bitmaps(run, "src")),
                    BPF_F_NO_PREALLOC, "bpfilter_msrc"),
            MapSpec(name + "_dst", BPF_MAP_TYPE_LPM_TRIE, 8, vs, bm(_prefix_bitmaps(run, "dst")),
                    BPF_F_NO_PREALLOC, "bpfilter_mdst"),
            MapSpec(name + "_dport", BPF_MAP_TYPE_HASH, 4, vs, bm(dmap), 0, "bpfilter_mdpt"),
            MapSpec(name + "_sport", BPF_MAP_TYPE_HASH, 4, vs, bm(smap), 0, "bpfilter_mspt"),
            MapSpec(name + "_rules", BPF_MAP_TYPE_HASH, 4, 16, table, 0, "bpfilter_mrul")]


def _pkey_code(cc, proto_slot_or_zero, kind: int, port_slot=None) -> list:
    """Store the port-map key {proto, kind, port} at S_CLS_KEY."""
    from . import compile as C
    out = [E.mov(R1, 0) if proto_slot_or_zero is None else E.ldx(E.DW, R1, FP, C.S_PROTO)]
    if port_slot is not None:
        out += [E.ldx(E.DW, R2, FP, port_slot), E.alu(E.LSH, R2, 16), E.alu(E.OR, R1, R2)]
    if kind:
        out.append(E.alu(E.OR, R1, kind << 8))
    out.append(E.stx(E.W, FP, S_CLS_KEY, R1))
    return out


def _lookup_chain(cc, mapname: str, keys: list, slot: int, miss: str):
    """Try the keys in order (each a list of insns storing the key); the first hit's value
    pointer goes to `slot`; none: `miss`."""
    got = cc.label("m_got")
    for n, key in enumerate(keys):
        cc.emit(*key, E.ld_map_fd(R1, mapname), E.mov(R2, FP), E.alu(E.ADD, R2, S_CLS_KEY),
                E.call(E.BPF_FUNC_map_lookup_elem))
        if n < len(keys) - 1:
            cc.emit(E.jmp(E.JNE, R0, 0, got))
        else:
            cc.emit(E.jmp(E.JEQ, R0, 0, miss))
    cc.emit(Label(got), E.stx(E.DW, FP, slot, R0))


def _l4_split(cc, head: str, protos: list, normal: str, hotc: str, other: str, fragment: str):
    """Where a packet goes for the rules with a tcp/udp match (xt_tcpudp.c tcp_mt/udp_mt): a
    protocol none of them names -> other; a non-first fragment matches none of them ->
    fragment; a header cut short, or a tcp fragment at offset 8 bytes, is hotdropped by a rule
    that would otherwise match -> hotc; the rest -> normal (the port lookups)."""
    from . import compile as C
    cc.emit(E.ldx(E.DW, R1, FP, C.S_PROTO))
    for p in protos:
        cc.emit(E.jmp(E.JEQ, R1, p, f"{head}_l4_{p}"))
    cc.emit(E.ja(other, "no rule with a tcp/udp match has this protocol"))
    for p in protos:
        need = 20 if p == IPPROTO_TCP else 8
        frag = cc.label("l4_frag")
        cc.emit(Label(f"{head}_l4_{p}"), E.ldx(E.DW, R2, FP, C.S_FRAGOFF),
                E.jmp(E.JNE, R2, 0, frag), E.ldx(E.DW, R2, FP, C.S_L4LEN),
                E.jmp(E.JLT, R2, need, hotc, comment="truncated header"), E.ja(normal),
                Label(frag))
        if p == IPPROTO_TCP:
            cc.emit(E.jmp(E.JEQ, R2, 1, hotc, comment="tcp fragment at offset 8 bytes"))
        cc.emit(E.ja(fragment, "a non-first fragment"))


def emit_multi(cc, run: Run, chain: str, ret: str, where: str):
    from . import compile as C
    run.chain = chain
    name = f"cls_{chain}_{run.start}"
    maps = cc.__dict__.setdefault("cls_maps", {})
    for spec in _cached_multi_specs(run, name):      # a user chain inlined twice shares them
        maps.setdefault(spec.name, spec)
    cc.rule_count += len(run.rules)
    form, shapes, _ = _run_form(run)
    if form == "split":
        return _emit_split(cc, run, chain, ret, where, name, shapes)
    after, hot = cc.label("run_after"), cc.label("run_hotdrop")
    miss, key = cc.label("run_miss"), cc.label("run_key")
    head = cc.label("run")
    first, last = run.rules[0], run.rules[-1]
    cc.where[head] = (f"chain {chain} rules {run.start + 1}..{run.end} (entry offsets "
                      f"{first.offset + run.d_offset}..{last.offset + run.d_offset}, "
                      f"classified)")
    words = (len(run.rules) + 63) // 64
    cc.emit(Label(head, f"{where}: rules {run.start + 1}..{run.end} of {chain} "
                        f"({len(run.rules)} rules of mixed shapes): per-field lookups "
                        f"(saddr, daddr, proto+dport, proto+sport) ANDed over {words} words"),
            E.ja(key), Label(miss), E.ja(after), Label(hot),
            E.mov(R0, _rc(cc, ACT_DROP), comment="hotdrop"), E.exit_(), Label(key))
    for slot, what, mslot in ((C.S_SADDR, "src", S_M[0]), (C.S_DADDR, "dst", S_M[1])):
        _lookup_chain(cc, f"{name}_{what}", [[
            E.st(E.W, FP, S_CLS_KEY, 32, f"LPM key: {what} address"),
            E.ldx(E.DW, R1, FP, slot), E.stx(E.W, FP, S_CLS_KEY + 4, R1)]], mslot, miss)
    cc.emit(E.st(E.DW, FP, S_CLS_HOT, 0))
    dmap, smap = f"{name}_dport", f"{name}_sport"
    l4protos = sorted({r.ip.proto for r in run.rules if _matches(r)})
    normal, other, hotc, nonl4, sall, loop = (cc.label(x) for x in (
        "m_normal", "m_other", "m_hotcand", "m_nonl4", "m_sport_any", "m_loop"))
    _l4_split(cc, head, l4protos, normal, hotc, other, nonl4)
    cc.emit(Label(hotc), E.st(E.DW, FP, S_CLS_HOT, 1))
    _lookup_chain(cc, dmap, [_pkey_code(cc, 1, K_IPPART), _pkey_code(cc, None, K_DEFAULT)],
                  S_M[2], miss)
    cc.emit(E.ja(sall), Label(nonl4))
    _lookup_chain(cc, dmap, [_pkey_code(cc, 1, K_NONL4), _pkey_code(cc, None, K_DEFAULT)],
                  S_M[2], miss)
    cc.emit(E.ja(sall), Label(other))
    _lookup_chain(cc, dmap, [_pkey_code(cc, 1, K_DEFAULT), _pkey_code(cc, None, K_DEFAULT)],
                  S_M[2], miss)
    cc.emit(Label(sall))
    _lookup_chain(cc, smap, [_pkey_code(cc, None, K_DEFAULT)], S_M[3], miss)
    cc.emit(E.ja(loop), Label(normal))
    _lookup_chain(cc, dmap, [_pkey_code(cc, 1, K_PORT, C.S_DPORT), _pkey_code(cc, 1, K_DEFAULT),
                             _pkey_code(cc, None, K_DEFAULT)], S_M[2], miss)
    _lookup_chain(cc, smap, [_pkey_code(cc, 1, K_PORT, C.S_SPORT), _pkey_code(cc, 1, K_DEFAULT),
                             _pkey_code(cc, None, K_DEFAULT)], S_M[3], miss)
    # the AND of the four bitmaps, word by word; the first non-zero word holds the first match
    found = cc.label("m_found")
    R3, R4, R8, R9 = E.R3, E.R4, E.R8, E.R9
    cc.emit(Label(loop), *(E.ldx(E.DW, r, FP, s) for r, s in zip((R1, R2, R3, R4), S_M)),
            E.mov(R9, 0, comment="word index"))
    for w in range(words):
        o = 8 * w
        cc.emit(E.ldx(E.DW, R0, R1, o), E.ldx(E.DW, R8, R2, o), E.alu(E.AND, R0, R8),
                E.ldx(E.DW, R8, R3, o), E.alu(E.AND, R0, R8),
                E.ldx(E.DW, R8, R4, o), E.alu(E.AND, R0, R8),
                E.jmp(E.JNE, R0, 0, found))
        if w < words - 1:
            cc.emit(E.alu(E.ADD, R9, 1))
    cc.emit(E.ja(miss, "no rule of the run matches"), Label(found))
    # lowest set bit of r0, without branches: halve the window six times
    cc.emit(E.mov(E.R5, 0))
    for s in (32, 16, 8, 4, 2, 1):
        cc.emit(E.mov(R2, R0))
        if s == 32:
            cc.emit(E.alu(E.LSH, R2, 32))
        else:
            cc.emit(E.alu(E.AND, R2, (1 << s) - 1))
        cc.emit(E.mov(R3, R2), E.neg(R3), E.alu(E.OR, R2, R3), E.alu(E.RSH, R2, 63),
                E.alu(E.XOR, R2, 1, comment=f"1 when the low {s} bits are all zero"),
                E.alu(E.MUL, R2, s), E.alu(E.ADD, E.R5, R2), E.alu(E.RSH, R0, R2))
    cc.emit(E.alu(E.LSH, R9, 6), E.alu(E.ADD, R9, E.R5),
            E.stx(E.W, FP, S_CLS_KEY, R9, "position of the first matching rule in the run"),
            E.ld_map_fd(R1, f"{name}_rules"), E.mov(R2, FP), E.alu(E.ADD, R2, S_CLS_KEY),
            E.call(E.BPF_FUNC_map_lookup_elem), E.jmp(E.JEQ, R0, 0, miss),
            E.ldx(E.W, R1, R0, 0, "its position"),
            _indexed(cc, E.alu(E.ADD, R1, run.rules[0].index + run.d_index,
                               comment="+ the run's first entry: its index")),
            E.stx(E.W, FP, C.S_KEY, R1),
            E.ldx(E.W, R1, R0, 4, "its action"), E.stx(E.DW, FP, S_CLS_ACT, R1),
            E.ldx(E.W, R1, R0, 8, "has a tcp/udp match?"))
    ok = cc.label("m_nohot")
    cc.emit(E.jmp(E.JEQ, R1, 0, ok), E.ldx(E.DW, R1, FP, S_CLS_HOT),
            E.jmp(E.JNE, R1, 0, hot, comment="its tcp/udp match would hotdrop"), Label(ok))
    _count_dynamic(cc, C)
    _dispatch(cc, run, chain, ret, where, (), after, after)
    cc.emit(Label(after))
