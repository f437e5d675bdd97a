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
  hash                same masks for every rule of the run: source/destination with fixed netmasks,
                      protocol, tcp/udp source and destination port (single port, range, or any;
                      ranges are expanded into keys); `-d 10.0.0.7 -p tcp --dport 443 -j ACCEPT`.
                      BPF_MAP_TYPE_HASH keyed by the packet's masked tuple; a packet matches a rule
                      exactly when its key is among the rule's keys, and keys are filled in rule
                      order keeping the first, so the value is the first match.
Targets in a run: ACCEPT, DROP, RETURN, gotos, and jumps (hash runs; extensions stay linear).
Map value: struct { u32 entry_index; u32 action; } (action 0 DROP, 1 ACCEPT, 2 RETURN, 3 + k the
k-th jump rule of the run): the counter increment uses the entry index from the map, so counters
stay per rule. A jump's target chain is inlined once per jump rule behind a binary decision tree
on k (kube-proxy / docker fan-out: one lookup picks the service chain). When the target chain
RETURNs, ipt_do_table continues with the rule after the jump; within the run the next rule that
can match is static: a jump rule has exactly one key (single ports, no ranges), the packet's key is
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
linear code ≈ LINEAR_NS per rule, a lookup ≈ LOOKUP_NS[kind]; a run is classified when its
linear cost is above its lookup cost.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import struct
from dataclasses import dataclass, field

from . import ebpf as E
from .ebpf import FP, R0, R1, R2, Label
from .errors import BpfilterError
from .model import NF_ACCEPT, NF_DROP, XT_RETURN, Jump, Rule, Verdict

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1          # LPM tries must be created with it (kernel/bpf/lpm_trie.c)
IPPROTO_TCP, IPPROTO_UDP = 6, 17

LINEAR_NS = 1.2                # per rule of linear code (design.md §5, compile.py's author)
LOOKUP_NS = {"lpm": 60.0, "hash": 40.0}
MAX_KEYS = 1 << 20             # expanded port ranges of one run; beyond that the run stays linear

ACT_DROP, ACT_ACCEPT, ACT_RETURN = 0, 1, 2
ACT_CASE = 3                   # 3 + k: the k-th jump rule of the run (classify.Run.cases)
IPT_F_GOTO = 0x02
ACT_NAMES = {ACT_DROP: "DROP", ACT_ACCEPT: "ACCEPT", ACT_RETURN: "RETURN"}

# stack slots below compile.py's (-8..-248), flavors.py's (S_FIB -312..-248) and family.py's
# (down to S_WALKERR = -360)
S_CLS_KEY = -384               # 16-byte lookup key
S_CLS_ACT = -392               # the action read from the map value


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
    kind: str                  # "lpm" or "hash"
    start: int                 # index in chain.rules of the first rule of the run
    rules: list                # the rules, in order
    sig: tuple                 # the shape all rules share
    protos: tuple = ()         # protocols whose tcp/udp match the run tests (hash runs)
    chain: str = ""            # set by emit_run: names the run's map
    cases: dict = field(default_factory=dict)       # position in run -> k (jump rules)
    next_same: dict = field(default_factory=dict)   # position of a jump -> next position or None

    @property
    def end(self) -> int:
        return self.start + len(self.rules)

    def text(self, chain: str = "") -> str:
        what = f"saddr prefix" if self.sig == ("lpm", "src") else \
            "daddr prefix" if self.sig[0] == "lpm" else _hash_text(self.sig)
        return (f"rules {self.start + 1}..{self.end} of {chain or 'chain'} ({len(self.rules)} "
                f"rules): one {'LPM trie' if self.kind == 'lpm' else 'hash'} lookup on {what}")


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


def _plen(mask) -> int:
    """The prefix length of a netmask, or -1 when it is not contiguous."""
    m = int(mask)
    n = bin(m).count("1")
    return n if m == ((1 << 32) - 1) ^ ((1 << (32 - n)) - 1) else -1


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


def _l4(rule: Rule):
    """(name, payload) of the rule's one tcp/udp match when the classifier can serve it."""
    from .compile import _payload
    if len(rule.matches) != 1:
        return None
    m = rule.matches[0]
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


def rule_shape(rule: Rule):
    """The shape key of a rule the classifier can serve, or None (the rule stays linear)."""
    ip = rule.ip
    t = rule.target
    if _action(t) < 0 or ip.flags & ~IPT_F_GOTO or ip.invflags or any(ip.iniface_mask) \
            or any(ip.outiface_mask) or getattr(ip, "tos", 0):
        return None
    goto = bool(ip.flags & IPT_F_GOTO) or bool(getattr(t, "goto", False))
    if goto and not isinstance(t, Jump):
        return None
    returns = isinstance(t, Jump) and not goto      # its chain may RETURN into the run
    if not isinstance(ip.src, ipaddress.IPv4Address):
        return None
    s, sm, d, dm = int(ip.src), int(ip.smsk), int(ip.dst), int(ip.dmsk)
    if s & ~sm or d & ~dm:            # (addr & msk) != src for every packet: never matches
        return None
    if not ip.proto and not rule.matches and not returns:
        if dm == 0 and _plen(ip.smsk) >= 0:
            return ("lpm", "src")
        if sm == 0 and _plen(ip.dmsk) >= 0:
            return ("lpm", "dst")
    l4 = None
    if rule.matches:
        l4 = _l4(rule)
        if l4 is None:
            return None
    sp = _ports_kind(*l4[1]["spts"]) if l4 else "any"
    dp = _ports_kind(*l4[1]["dpts"]) if l4 else "any"
    if returns and "range" in (sp, dp):
        return None                                  # its continuation would depend on the port
    return ("hash", _le32(ip.smsk), _le32(ip.dmsk), bool(ip.proto), bool(l4),
            "any" if sp == "any" else "port", "any" if dp == "any" else "port")


def min_run() -> int:
    env = os.environ.get("BPFILTER_CLASSIFY_MIN_RUN")
    if env is not None:
        n = int(env)
        return n if n > 0 else 1 << 62
    return int(min(LOOKUP_NS.values()) / LINEAR_NS) + 1


def find_runs(rules: list, minimum: int = None) -> list:
    """Maximal runs of consecutive rules of one shape, at least `minimum` long, in order."""
    minimum = min_run() if minimum is None else minimum
    out, i = [], 0
    while i < len(rules):
        sig = rule_shape(rules[i])
        j = i + 1
        if sig is not None:
            while j < len(rules) and rule_shape(rules[j]) == sig:
                j += 1
            if j - i >= minimum:
                run = Run(sig[0], i, rules[i:j], sig)
                if run.kind == "hash" and sig[4]:
                    run.protos = tuple(sorted({r.ip.proto for r in run.rules}))
                run.cases = {p: k for k, p in enumerate(
                    p for p, r in enumerate(run.rules) if isinstance(r.target, Jump))}
                if run.kind == "lpm" or _key_count(run) <= MAX_KEYS:
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

def _value(run: Run, pos: int) -> bytes:
    a = _action(run.rules[pos].target)
    return struct.pack("<II", run.rules[pos].index, a + run.cases[pos] if a == ACT_CASE else a)


def lpm_entries(run: Run) -> list:
    """[(key, value)]: key = {u32 prefixlen; be32 addr}, value = the first rule (in run order)
    whose prefix contains the key's prefix."""
    first = {}                              # (plen, network int) -> position in run
    for pos, r in enumerate(run.rules):
        addr, msk = (r.ip.src, r.ip.smsk) if run.sig[1] == "src" else (r.ip.dst, r.ip.dmsk)
        first.setdefault((_plen(msk), int(addr)), pos)
    out = []
    for (plen, net), pos in first.items():
        best = pos
        for p in range(plen):               # every shorter prefix containing this one
            q = first.get((p, net & (((1 << 32) - 1) ^ ((1 << (32 - p)) - 1))))
            if q is not None and q < best:
                best = q
        out.append((struct.pack("<I", plen) + net.to_bytes(4, "big"), _value(run, best)))
    return out


def _port_values(d, name) -> range:
    lo, hi = d[name]
    return range(0, 1) if lo == 0 and hi >= 0xffff else range(lo, hi + 1)


def _key_count(run: Run) -> int:
    n = 0
    for r in run.rules:
        l4 = _l4(r) if run.sig[4] else None
        n += len(_port_values(l4[1], "spts")) * len(_port_values(l4[1], "dpts")) if l4 else 1
    return n


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


def hash_entries(run: Run) -> list:
    """[(key, value)] in rule order keeping the first; also fills run.next_same."""
    seen = {}
    ippart = _needs_ippart(run)
    keys = [_rule_keys(run, r) for r in run.rules]
    for pos, r in enumerate(run.rules):
        v = _value(run, pos)
        for k in keys[pos]:
            seen.setdefault(k, v)
        if ippart:
            ip = r.ip
            seen.setdefault(_hash_key(_le32(ip.src), _le32(ip.dst), ip.proto, 0, 0, 1), v)
    later = {}
    for pos in range(len(run.rules) - 1, -1, -1):
        if pos in run.cases:
            run.next_same[pos] = later.get(keys[pos][0])
        for k in keys[pos]:
            later[k] = pos
    return list(seen.items())


def map_spec(run: Run, name: str) -> MapSpec:
    if run.kind == "lpm":
        return MapSpec(name, BPF_MAP_TYPE_LPM_TRIE, 8, 8, lpm_entries(run), BPF_F_NO_PREALLOC,
                       "bpfilter_lpm")
    return MapSpec(name, BPF_MAP_TYPE_HASH, 16, 8, hash_entries(run), 0, "bpfilter_hash")


# ------------------------------------------------------------------------------------- code

def emit_run(cc, run: Run, chain: str, ret: str, where: str):
    """The run as one lookup: build the key from the parsed header slots, look it up, and on a hit
    count the entry the value names and apply its action; a miss continues after the run."""
    from . import compile as C
    after = cc.label("run_after")
    hot = cc.label("run_hotdrop")
    run.chain = chain
    name = f"cls_{chain}_{run.start}"
    maps = cc.__dict__.setdefault("cls_maps", {})
    if name not in maps:                     # a user chain inlined twice shares its map
        maps[name] = map_spec(run, name)
    spec = maps[name]
    cc.rule_count += len(run.rules)
    head = cc.label("run")
    first, last = run.rules[0], run.rules[-1]
    cc.where[head] = (f"chain {chain} rules {run.start + 1}..{run.end} (entry offsets "
                      f"{first.offset}..{last.offset}, classified)")
    cc.emit(Label(head, f"{where}: {run.text(chain)}, map {name} ({len(spec.entries)} keys)"))
    if run.kind == "lpm":
        slot = C.S_SADDR if run.sig[1] == "src" else C.S_DADDR
        cc.emit(E.st(E.W, FP, S_CLS_KEY, 32, "LPM key: prefixlen 32"),
                E.ldx(E.DW, R1, FP, slot, f"{run.sig[1]} address"),
                E.stx(E.W, FP, S_CLS_KEY + 4, R1))
    else:
        _hash_key_code(cc, run, after, hot, C)
    cc.emit(E.ld_map_fd(R1, name), E.mov(R2, FP), E.alu(E.ADD, R2, S_CLS_KEY),
            E.call(E.BPF_FUNC_map_lookup_elem),
            E.jmp(E.JEQ, R0, 0, after, comment="no rule of the run matches"),
            E.ldx(E.W, R1, R0, 0, "entry index of the first matching rule"),
            E.stx(E.W, FP, C.S_KEY, R1),
            E.ldx(E.W, R1, R0, 4, "its action"),
            E.stx(E.DW, FP, S_CLS_ACT, R1))
    _count_dynamic(cc, C)
    acts = sorted({_action(r.target) for r in run.rules})
    if len(acts) > 1:
        cc.emit(E.ldx(E.DW, R1, FP, S_CLS_ACT))
    labels = {a: cc.label(f"run_{ACT_NAMES[a].lower()}") for a in acts}
    for a in acts[:-1]:
        cc.emit(E.jmp(E.JEQ, R1, a, labels[a]))
    for a in acts[-1:] + acts[:-1]:           # the last action is the fall-through
        if a != acts[-1]:
            cc.emit(Label(labels[a]))
        if a == ACT_RETURN:
            cc.emit(E.ja(ret, "RETURN"))
        else:
            cc.emit(E.mov(R0, NF_ACCEPT if a == ACT_ACCEPT else NF_DROP, comment=ACT_NAMES[a]),
                    E.exit_())
    cc.emit(Label(hot), E.mov(R0, NF_DROP, comment="hotdrop"), E.exit_(), Label(after))


def _hash_key_code(cc, run: Run, after: str, hot: str, C):
    _, smsk, dmsk, has_proto, l4, sp, dp = run.sig
    if l4:
        # tcp_mt/udp_mt run only for a rule whose ip part matched (ip_packet_match first): a
        # non-first fragment matches no rule of the run, and a tcp fragment at offset 8 bytes or
        # a truncated header is hotdropped by the first rule whose ip part matches, if any
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
                    E.jmp(E.JLT, R1, need, abn, comment=f"truncated header"),
                    E.ja(ok))
        cc.emit(Label(abn))
        if _needs_ippart(run):
            _key(cc, run, C, ippart=True)
            cc.emit(E.ld_map_fd(R1, f"cls_{run.chain}_{run.start}"), E.mov(R2, FP),
                    E.alu(E.ADD, R2, S_CLS_KEY), E.call(E.BPF_FUNC_map_lookup_elem),
                    E.jmp(E.JEQ, R0, 0, after, comment="no rule's ip part matches"))
        cc.emit(E.ja(hot), Label(ok))
    _key(cc, run, C)


def _key(cc, run: Run, C, ippart: bool = False):
    _, smsk, dmsk, has_proto, l4, sp, dp = run.sig
    cc.emit(E.st(E.DW, FP, S_CLS_KEY, 0, "hash key" + (" of the ip part" if ippart else "")),
            E.st(E.DW, FP, S_CLS_KEY + 8, 0))
    for m, slot, off, what in ((smsk, C.S_SADDR, 0, "saddr"), (dmsk, C.S_DADDR, 4, "daddr")):
        if m:
            cc.emit(E.ldx(E.DW, R1, FP, slot, what))
            if m != 0xffffffff:
                cc.emit(E.alu(E.AND, R1, E._s32(m), bits=32))
            cc.emit(E.stx(E.W, FP, S_CLS_KEY + off, R1))
    if has_proto:
        cc.emit(E.ldx(E.DW, R1, FP, C.S_PROTO, "protocol"), E.stx(E.B, FP, S_CLS_KEY + 8, R1))
    if ippart:
        cc.emit(E.st(E.B, FP, S_CLS_KEY + 9, 1))
        return
    for kind, slot, off, what in ((sp, C.S_SPORT, 10, "sport"), (dp, C.S_DPORT, 12, "dport")):
        if kind != "any":
            cc.emit(E.ldx(E.DW, R1, FP, slot, what), E.stx(E.H, FP, S_CLS_KEY + off, R1))


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

