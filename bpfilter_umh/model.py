"""The typed model of one xtables table: Table ⇄ Chain ⇄ Rule, with decode (blob → model, with the
kernel's checks) and encode (model → blob, byte-identical to what the kernel returns).

Shared contract (other stages rely on these names):
  - Table.decode(blob, family, hook_entry, underflow, valid_hooks, name="filter") -> Table
  - decode_replace(buf, family) -> (hdr, Table)   an ipt_replace/ip6t_replace buffer, with every
                                                 check of do_replace()+translate_table() that does
                                                 not need the installed table; the Table is
                                                 normalized (what GET_ENTRIES would then return)
                                                 and read-only: its Rule and Chain objects are
                                                 shared with the decodes before and after it
                                                 (issue #7); copy.deepcopy it to edit it (its
                                                 rules share Match, extension target and
                                                 Verdict objects, and so do the copy's: replace
                                                 one rather than change it in place). A user
                                                 chain an append moved whole may make its
                                                 entries on first access (_MovedChain: reads,
                                                 compares and copies as a Chain)
  - Table.empty(name, family)                    the table the kernel creates in a fresh netns
  - Table.encode() -> bytes                      the entries blob (ipt_get_entries.entrytable)
  - Table.entries() -> list[Rule]                every entry in blob order; entry index == counter
                                                 index used by the compiler and by GET_ENTRIES
  - Table.hook_entry / underflow / size / num_entries / valid_hooks   what GET_INFO reports
  - Table.encode(counters=[(pcnt, bcnt), ...])  GET_ENTRIES with live counters, no copy
  - Table.with_counters([(pcnt, bcnt), ...]), Table.normalized(), Table.getinfo_bytes()
  - check_against_installed(hdr, installed)      __do_replace()'s ENOENT / EINVAL / EAGAIN
  - decode_add_counters(buf, num_entries)        IPT_SO_SET_ADD_COUNTERS → (name, counters)
  - moved_from(table)                            (previous table, nhead, p_first, shift, delta)
                                                 when a decode_replace table is the previous
                                                 one with plain rules changed in one place
                                                 (an append ahead of most chains), else None
  - Table.unchecked_extensions()                 extensions kept opaque (not checked here)
  - Table.chains: in blob order (for every table iptables writes: built-in chains in hook order,
    then user chains)
  - Chain.rules (without the policy entry / the chain's RETURN entry), Chain.policy_entry
  - Rule.ip (IpHeader), Rule.matches (list[Match]), Rule.target (Verdict | Jump | ExtTarget),
    Rule.counters (pcnt, bcnt), Rule.index (entry index in the blob)

Known gap: a kernel-accepted table whose underflow entry for a hook lies outside that hook's own
chain (never written by iptables) is refused with EOPNOTSUPP.
"""
from __future__ import annotations

import array
import bisect
import collections
import copy
import errno
import functools
import gc
import io
import ipaddress
import itertools
import operator
import struct
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from construct import Container as _CONTAINER
from construct import ListContainer as _LIST

from . import extensions as ext
from . import uapi
from .errors import BpfilterError

# netfilter hook numbers (include/uapi/linux/netfilter.h, enum nf_inet_hooks)
NF_INET_PRE_ROUTING, NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING = range(5)
NF_INET_NUMHOOKS = 5
HOOK_NAMES = {NF_INET_PRE_ROUTING: "PREROUTING", NF_INET_LOCAL_IN: "INPUT",
              NF_INET_FORWARD: "FORWARD", NF_INET_LOCAL_OUT: "OUTPUT",
              NF_INET_POST_ROUTING: "POSTROUTING"}

# standard verdicts as stored in xt_standard_target.verdict: -(NF_x) - 1, XT_RETURN = NF_REPEAT - 1
NF_DROP, NF_ACCEPT, NF_STOLEN, NF_QUEUE, NF_REPEAT = range(5)
XT_RETURN = -NF_REPEAT - 1
VERDICT_NAMES = {-NF_DROP - 1: "DROP", -NF_ACCEPT - 1: "ACCEPT", -NF_QUEUE - 1: "QUEUE",
                 XT_RETURN: "RETURN"}

AF_INET, AF_INET6 = 2, 10
NO_HOOK = 0xFFFFFFFF      # translate_table() initialises hook_entry/underflow to this

# valid hooks of the tables the kernel creates (iptable_*.c / ip6table_*.c)
_IN_FWD_OUT = (1 << NF_INET_LOCAL_IN) | (1 << NF_INET_FORWARD) | (1 << NF_INET_LOCAL_OUT)
TABLE_HOOKS = {
    "filter": _IN_FWD_OUT,
    "security": _IN_FWD_OUT,
    "mangle": (1 << NF_INET_NUMHOOKS) - 1,
    "raw": (1 << NF_INET_PRE_ROUTING) | (1 << NF_INET_LOCAL_OUT),
    "nat": (1 << NF_INET_PRE_ROUTING) | (1 << NF_INET_POST_ROUTING) | (1 << NF_INET_LOCAL_OUT)
    | (1 << NF_INET_LOCAL_IN),
}


def _err(code, off, what):
    raise BpfilterError(code, f"entry at offset {off}: {what}" if off is not None else what)


@dataclass
class IpHeader:
    """ipt_ip (family AF_INET) or ip6t_ip6 (AF_INET6); field names are the kernel's."""
    src: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
    dst: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
    smsk: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
    dmsk: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
    iniface: bytes = b"\0" * 16        # IFNAMSIZ bytes, exactly as in the blob
    outiface: bytes = b"\0" * 16
    iniface_mask: bytes = b"\0" * 16
    outiface_mask: bytes = b"\0" * 16
    proto: int = 0
    flags: int = 0                     # IPT_F_* / IP6T_F_*
    invflags: int = 0                  # IPT_INV_* / IP6T_INV_*
    tos: int = 0                       # ip6t_ip6 only
    pad: bytes = b""                   # ip6t_ip6 only: its 3 padding bytes, b"" when all zero

    def __post_init__(self):
        if self.pad and not any(self.pad):
            self.pad = b""

    @classmethod
    def any(cls, family: int) -> "IpHeader":
        z = ipaddress.IPv4Address(0) if family == AF_INET else ipaddress.IPv6Address(0)
        return cls(z, z, z, z)

    def unconditional(self, family: int) -> bool:
        """memcmp(&e->ip, &uncond, sizeof(uncond)) == 0 in unconditional()."""
        a = _ANY_IP.get(family)
        if a is None:
            a = _ANY_IP[family] = IpHeader.any(family)   # private: never handed out
        return self == a


_ANY_IP: dict = {}          # family -> IpHeader.any(family), for IpHeader.unconditional


@dataclass
class Match:
    """xt_entry_match: name, revision and payload.

    `data` is the payload decoded by the extension registry (a construct Container) or the raw
    bytes when no codec is registered; `raw` is the payload exactly as it was in the blob
    (after the header, padding included). encode() writes `data`."""
    name: str
    revision: int
    data: Any
    raw: bytes = field(default=b"", compare=False)   # informational: not compared


@dataclass
class Verdict:
    """Standard target with a negative verdict: ACCEPT, DROP, QUEUE or RETURN."""
    verdict: int

    @property
    def name(self) -> str:
        return VERDICT_NAMES.get(self.verdict, str(self.verdict))


@dataclass
class Jump:
    """Standard target with a positive verdict: a jump (or a goto when ip.flags has *_F_GOTO) to
    a user chain. `chain` is the target chain's name; `offset` the byte offset in the blob.
    `entry` is the position of the landing entry in that chain's body (rules + policy entry +
    trailer; 0 = first rule, what iptables always writes; -1 = the chain's ERROR head), None when
    the offset lands on no entry (only possible for an entry no hook reaches). `chain_pos` is the
    chain's index in Table.chains (tells apart user chains with the same name)."""
    chain: str
    goto: bool = False
    offset: int = 0
    entry: Optional[int] = 0
    chain_pos: int = -1


@dataclass
class ExtTarget:
    """Any non-standard target (ERROR, REJECT, LOG, ...): like Match."""
    name: str
    revision: int
    data: Any
    raw: bytes = field(default=b"", compare=False)   # informational: not compared


Target = Union[Verdict, Jump, ExtTarget]


class _ParsedOnRead:
    """`data` of a _PortsMatch / _NamedError: parsed from the object's own payload (`raw`)
    on first read, then kept in the instance dict (a non-data descriptor: the dict answers
    from then on). Two threads reading it at once parse it twice, equal values."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        d = obj.__dict__["data"] = obj._own.data_of(obj._j, obj.raw)
        return d


class _ReadsAsPlain:
    """What a _PortsMatch / _NamedError shares: `data` parsed when read (_ParsedOnRead), and
    compared, shown, copied and pickled as the plain dataclass it stands for (`_plain`)."""
    __slots__ = ()
    _plain = None
    data = _ParsedOnRead()

    def __eq__(self, other):
        if isinstance(other, self._plain):
            return (self.name, self.revision, self.data) == \
                (other.name, other.revision, other.data)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return self._plain.__name__ + \
            self._plain.__repr__(self)[len(type(self).__qualname__):]

    def __reduce_ex__(self, protocol):
        return self._plain, (self.name, self.revision, self.data, self.raw)


class _PortsMatch(_ReadsAsPlain, Match):
    """A tcp/udp Match of an entry read by a template whose entries differ in their ports
    (_Template.mvar), its payload not parsed until `data` is read: `_own` (an _OwnPorts)
    has the template's first entry's parsed payload, `_j` which of its mvar this is. A first
    restore's compile reads the ports from the entries' bytes (classify: the cache_keys) and
    `data` only of a class's first rule: a fan-out's 3 332 hub rules parsed 3 of them (issue
    #7). Compares, copies (a plain Match) and reads as a Match."""
    __slots__ = ("_own", "_j")
    _plain = Match


class _NamedError(_ReadsAsPlain, ExtTarget):
    """The ERROR target of a user chain's head entry read by a template (_Template.tvar
    _ERRNAME), its xt_error_target not parsed until `data` is read (`_own`: an _OwnName).
    Nothing in a first restore's compile reads it (the chain's name is _spans'), and a
    fan-out has 3 333 of them. Compares, copies (a plain ExtTarget) and reads as one."""
    __slots__ = ("_own",)
    _plain = ExtTarget
    _j = 0                      # (_ParsedOnRead: one payload, the target's)


@dataclass
class Rule:
    ip: IpHeader
    matches: list = field(default_factory=list)   # list[Match]
    target: Target = field(default_factory=lambda: Verdict(-NF_ACCEPT - 1))
    counters: tuple = (0, 0)                      # (pcnt, bcnt)
    index: int = -1                               # entry index in the blob
    offset: int = -1                              # byte offset in the blob
    nfcache: int = 0
    comefrom: int = 0
    tail: int = 0                                 # bytes between the target's end and next_offset
    pad: bytes = b""                              # ip6t_entry's 4 padding bytes after comefrom
                                                  # (b"" when all zero); the kernel keeps them

    def __post_init__(self):
        if self.pad and not any(self.pad):
            self.pad = b""


_RULE_FIELDS = operator.attrgetter("ip", "matches", "target", "counters", "index", "offset",
                                   "nfcache", "comefrom", "tail", "pad")


class _Moved(Rule):
    """A Rule of a decode_replace table whose entry is a previous table's Rule moved (issue
    #7: an append ahead of a fan-out's 3 333 chains moves 16 000 entries): that Rule's
    attribute dict itself (no copy; both tables are read-only), its own position data in
    slots, which Python finds before the dict (a slot is a data descriptor). Compares,
    copies (copy.deepcopy gives it a dict of its own) and reads as a Rule."""
    __slots__ = ("index", "offset", "comefrom")

    def __eq__(self, other):
        if isinstance(other, Rule):
            return _RULE_FIELDS(self) == _RULE_FIELDS(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return "Rule" + Rule.__repr__(self)[len(type(self).__qualname__):]


class _MovedJump(_Moved):
    """A moved jump: its Jump (offset, landing) is its own too."""
    __slots__ = ("target",)


@dataclass
class Chain:
    name: str
    hook: Optional[int] = None        # NF_INET_* for a built-in chain, None for a user chain
    policy: Optional[int] = None      # verdict of a built-in chain's policy entry
    rules: list = field(default_factory=list)     # list[Rule], policy/RETURN entry excluded
    policy_entry: Optional[Rule] = None           # the underflow (built-in) or RETURN (user) entry
    head_entry: Optional[Rule] = None             # the ERROR entry naming a user chain
    trailer: list = field(default_factory=list)   # entries after a built-in chain's underflow
                                                  # entry (never written by iptables)

    @property
    def builtin(self) -> bool:
        return self.hook is not None

    def body(self) -> list:
        """The entries a jump can land on: rules, policy entry, trailer."""
        return self.rules + ([self.policy_entry] if self.policy_entry is not None else []) \
            + self.trailer

    def entries(self) -> list:
        return ([self.head_entry] if self.head_entry is not None else []) + self.body()


class _Made:
    """A field of a _MovedChain read before its entries are made: makes them (a non-data
    descriptor: once made, the instance dict answers and this is not called)."""

    def __init__(self, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._make()[self.name]


_MAKE_LOCK = threading.RLock()
# how many _MovedChains have been made (_place: their _pos turns None), of any table: placed_range
_PLACES = 0


def _moved_entry(r: Rule, i: int, landing, offs, comefrom) -> Rule:
    """Rule r of a moved chain's source placed at entry index i (offset and comefrom from the
    decode's lists) as _MovedChain._place places each: a _Moved sharing r's attribute dict,
    or, for a jump landing on entry index `landing`, a _MovedJump with a Jump of its own
    naming that entry's offset."""
    new = object.__new__
    if landing is None:
        m = new(_Moved)
        m.__dict__ = r.__dict__
    else:
        m = new(_MovedJump)
        m.__dict__ = r.__dict__
        t = r.target
        nj = m.target = new(Jump)
        nj.chain, nj.goto, nj.offset, nj.entry, nj.chain_pos = \
            t.chain, t.goto, offs[landing], t.entry, t.chain_pos
    m.index, m.offset, m.comefrom = i, offs[i], comefrom[i]
    return m


class _MovedChain(Chain):
    """A user chain of a decode_replace table that is a previous table's chain moved whole
    (issue #7: an append ahead of a fan-out's 3 333 service chains moves every one of them,
    and after the decode nothing reads their entries until a later table is made from them).
    Its entries are made on first access of rules, policy_entry, head_entry or trailer
    (_Made), from `_src` (the chain moved, whose entries were made)
    placed at entry index `_at` on: each a _Moved of the source entry with this table's
    offset and comefrom (`_pos`: the decode's offsets, comefrom values, jump indexes and
    each jump's landing index, lists nothing changes), a jump with a Jump of its own naming
    its landing's offset (its chain, position and goto are the source's: the decode checked
    that every jump lands on the entry it landed on, moved, in the chain it landed in).
    Compares, copies (a plain Chain) and reads as a Chain."""

    __slots__ = ("_src", "_at", "_pos")     # _src None once made

    def _make(self) -> dict:
        """The instance dict, with the entries made (once: under a lock, the engine compiles
        in threads)."""
        with _MAKE_LOCK:
            if getattr(self, "_src", None) is not None:
                self._place()
        return self.__dict__

    def _place(self) -> None:
        src, at, pos = self._src, self._at, self._pos
        offs, comefrom, jumps, landed = pos
        ents = ([src.head_entry] if src.head_entry is not None else []) + src.rules
        if src.policy_entry is not None:
            ents.append(src.policy_entry)
        new = object.__new__
        out = []
        # the jumps' landings by entry index (a hub chain: every entry a jump, each made once
        # as a _MovedJump with a Jump of its own; _moved_entry does the same for one entry,
        # this loop inline: thousands of entries)
        lo, hi = bisect.bisect_left(jumps, at), bisect.bisect_left(jumps, at + len(ents))
        land = dict(zip(jumps[lo:hi], landed[lo:hi])) if hi > lo else {}
        for i, r in enumerate(ents, at):
            k = land.get(i) if land else None
            if k is None:
                m = new(_Moved)
                m.__dict__ = r.__dict__
            else:
                m = new(_MovedJump)
                m.__dict__ = r.__dict__
                t = r.target
                nj = m.target = new(Jump)
                nj.chain, nj.goto, nj.offset, nj.entry, nj.chain_pos = \
                    t.chain, t.goto, offs[k], t.entry, t.chain_pos
            m.index, m.offset, m.comefrom = i, offs[i], comefrom[i]
            out.append(m)
        head = src.head_entry is not None
        end = len(out) - (src.policy_entry is not None)
        d = self.__dict__
        d["head_entry"] = out[0] if head else None
        d["rules"] = out[head:end]
        d["policy_entry"] = out[end] if end < len(out) else None
        d["trailer"] = []
        self._src = self._pos = None
        global _PLACES
        _PLACES += 1

    rules = _Made("rules")
    policy_entry = _Made("policy_entry")
    head_entry = _Made("head_entry")
    trailer = _Made("trailer")

    def __eq__(self, other):
        if isinstance(other, Chain):
            return (self.name, self.hook, self.policy, self.rules, self.policy_entry,
                    self.head_entry, self.trailer) == \
                (other.name, other.hook, other.policy, other.rules, other.policy_entry,
                 other.head_entry, other.trailer)
        return NotImplemented

    __hash__ = None

    def __reduce_ex__(self, protocol):
        # copy, deepcopy and pickle see a plain Chain, its entries made
        return Chain, (self.name, self.hook, self.policy, self.rules, self.policy_entry,
                       self.head_entry, self.trailer)

    def __repr__(self):
        return "Chain" + Chain.__repr__(self)[len(type(self).__qualname__):]


_CACHE_KEY = operator.attrgetter("cache_key")


def _unmade(c: Chain):
    """(source chain, placement) of a _MovedChain whose entries are not made, else None.
    _place clears _src before _pos, so a placement read after a source is either whole or
    None (made meanwhile by another thread: then the chain's own fields answer)."""
    if type(c) is not _MovedChain:
        return None
    src = c._src
    if src is None:
        return None
    pos = c._pos
    return None if pos is None else (src, pos)


def chain_body(c: Chain) -> tuple:
    """(rules, policy entry) with the bytes of chain `c`'s: a _MovedChain not made answers
    its source's (the same entries at other positions), so that reading its content does
    not make it."""
    un = _unmade(c)
    if un is not None:
        c = un[0]
    return c.rules, c.policy_entry


def chain_source(c: Chain) -> tuple:
    """(rules, policy entry, d_index, d_offset) of chain `c` without making a _MovedChain's
    entries: its source's entries, each of which is, in `c`, at entry index + d_index and byte
    offset + d_offset (a chain moved whole keeps its entries' order and sizes); a chain's own
    entries and (0, 0) otherwise. compile reads a fan-out hub this way: an append to INPUT in
    front of it moves its 3 333 jumps, which _place would make one by one."""
    un = _unmade(c)
    if un is None:
        return c.rules, c.policy_entry, 0, 0
    src, (offs, _comefrom, _jumps, _landed) = un
    rules, pe = src.rules, src.policy_entry
    first = src.head_entry or (rules[0] if rules else pe)
    if first is None:
        return rules, pe, 0, 0
    return rules, pe, c._at - first.index, offs[c._at] - first.offset


def chain_entry(c: Chain, k: int):
    """Entry k of chain `c`'s body (its rules, then its policy entry: None past them) as the
    chain's own, without making a _MovedChain's entries: the one entry placed as _place
    places it (compile reads a moved hub's RETURN entry and the few rules no run holds)."""
    un = _unmade(c)
    if un is None:
        rules = c.rules
        return rules[k] if k < len(rules) else (c.policy_entry if k == len(rules) else None)
    src, (offs, comefrom, jumps, landed) = un
    rules = src.rules
    r = rules[k] if k < len(rules) else (src.policy_entry if k == len(rules) else None)
    if r is None:
        return None
    i = c._at + (src.head_entry is not None) + k
    j = bisect.bisect_left(jumps, i)
    landing = landed[j] if j < len(jumps) and jumps[j] == i else None
    return _moved_entry(r, i, landing, offs, comefrom)


_SRC, _AT, _RULES, _POLICY_ENTRY, _HEAD_ENTRY, _POS = map(operator.attrgetter, (
    "_src", "_at", "rules", "policy_entry", "head_entry", "_pos"))


def placement(c: Chain):
    """The placement (the decode's entry positions) of a _MovedChain not made, else None: one
    object for every chain one decode_replace moved whole, each entry behind its change moved
    by the same amount, so that such chains keep their distances to one another."""
    un = _unmade(c)
    return None if un is None else un[1]


def placed_by(chains, pos) -> bool:
    """Whether every chain of `chains` is a _MovedChain not made whose placement is `pos`
    (column by column: a fan-out's 3 333 case chains). A chain made meanwhile by another
    thread answers False. One pass: only a _MovedChain has a _pos (a plain Chain raises
    AttributeError), and a made one's is None; `pos` is never None."""
    try:
        return all(map(operator.is_, map(_POS, chains), itertools.repeat(pos)))
    except AttributeError:
        return False


def placed_range(table, lo: int, hi: int, pos) -> bool:
    """placed_by(table.chains[lo:hi], pos), without a look at each chain where they lie in the
    last run of user chains that _build made _MovedChains placed by `pos` (Table._moved_whole:
    the chains list, _PLACES then, the run's bounds, pos) and no _MovedChain has been made
    since (_PLACES unchanged): then each is one, not made, placed by pos. classify's
    _moved_bodies asks it of a fan-out hub's 3 333 case chains on every append (~1.6M
    instructions as placed_by)."""
    chains = table.chains
    got = table.__dict__.get("_moved_whole")
    if got is not None and got[0] is chains and got[1] == _PLACES and got[2] <= lo and \
            hi <= got[3] and got[4] is pos:
        return True
    return placed_by(chains[lo:hi], pos)


def policy_indexes(chains) -> list:
    """The index of each chain's policy (RETURN) entry, None where it has none, without making
    a _MovedChain's entries (_place puts the head entry at _at, then the source's rules, then
    its policy entry): classify reads the RETURN entry of each of a fan-out's 3 333 case
    chains, which an append to the chain that jumps to them moves."""
    if chains and all(map(operator.is_, map(type, chains), itertools.repeat(_MovedChain))):
        # a fan-out's case chains, all moved: column by column (C loops), each chain's
        # source read once (its _src may turn None meanwhile: made by another thread; _at
        # and the source's entries do not change, so a source read is still the answer)
        # (`is not None` column by column: `None in` would call Chain's and Rule's __eq__)
        none = itertools.repeat(None)
        srcs = list(map(_SRC, chains))
        if all(map(operator.is_not, srcs, none)) and \
                all(map(operator.is_not, map(_POLICY_ENTRY, srcs), none)):
            plus = operator.add
            return list(map(plus, map(plus, map(_AT, chains), map(len, map(_RULES, srcs))),
                            map(operator.is_not, map(_HEAD_ENTRY, srcs), none)))
    out = []
    add = out.append
    mc = _MovedChain
    for c in chains:
        # (_unmade inline: a chain made meanwhile by another thread answers the same index)
        if type(c) is mc and (src := c._src) is not None and c._pos is not None:
            add(None if src.policy_entry is None else
                c._at + (src.head_entry is not None) + len(src.rules))
        else:
            pe = c.policy_entry
            add(None if pe is None else pe.index)
    return out


def chain_outline(c: Chain) -> tuple:
    """(the rules' cache_keys, the policy entry's cache_key, the head entry's index or None,
    the first body entry's index and offset (its first rule, else its policy entry), the
    policy entry's index) of chain `c`, as read from its entries, but without making a
    _MovedChain's: an append ahead of a fan-out moves its 3 333 leaf chains, which compile
    walks when it cannot take the previous walk. A moved entry's cache_key is its source's
    (the same attribute dict); its index and offset are placed as _place places them. The
    policy fields are None when the chain has no policy entry, the first entry's when it has
    no entry at all. AttributeError for an entry without cache_key (not decoded from a blob)."""
    un = _unmade(c) if type(c) is _MovedChain else None     # (a call less for the others)
    if un is None:
        rules, pe, he = c.rules, c.policy_entry, c.head_entry
        first = rules[0] if rules else pe
        return (tuple(map(_CACHE_KEY, rules)),
                None if pe is None else pe.cache_key,
                None if he is None else he.index,
                None if first is None else first.index,
                None if first is None else first.offset,
                None if pe is None else pe.index)
    src, (offs, _comefrom, _jumps, _landed) = un
    rules, pe = src.rules, src.policy_entry
    at = c._at
    head = src.head_entry is not None
    f = at + head                       # _place: the head entry at `at`, then the body
    p = f + len(rules)
    some = bool(rules) or pe is not None
    return (tuple(map(_CACHE_KEY, rules)),
            None if pe is None else pe.cache_key,
            at if head else None,
            f if some else None,
            offs[f] if some else None,
            None if pe is None else p)



# --- raw entry walk (one record per entry, with what the checks need) -----------------------
class _Hdr:
    """An ipt_entry/ip6t_entry header as unpacked by uapi.IPT_ENTRY_FAST/IP6T_ENTRY_FAST."""
    __slots__ = ("ip", "nfcache", "target_offset", "next_offset", "comefrom", "pad", "pcnt",
                 "bcnt")

    def __init__(self, blob, off, family):
        if family == AF_INET:
            (s, d, sm, dm, i, o, im, om, proto, flags, inv, self.nfcache, self.target_offset,
             self.next_offset, self.comefrom, self.pcnt, self.bcnt) = \
                uapi.IPT_ENTRY_FAST.unpack_from(blob, off)
            tos, ippad, self.pad = 0, b"", b""
        else:
            (s, d, sm, dm, i, o, im, om, proto, tos, flags, inv, ippad, self.nfcache,
             self.target_offset, self.next_offset, self.comefrom, self.pad, self.pcnt,
             self.bcnt) = uapi.IP6T_ENTRY_FAST.unpack_from(blob, off)
        # the addresses from _ADDRESSES (one dict lookup each where seen before). IpHeader's
        # __init__ makes a key-sharing dict (~280 bytes, not ~460 as a dict set directly):
        # the copies _build makes of it share keys too, and the walk's later passes read less
        get = _ADDRESSES.get
        self.ip = IpHeader(get(s) or _address(s), get(d) or _address(d),
                           get(sm) or _address(sm), get(dm) or _address(dm), i, o, im, om,
                           proto, flags, inv, tos, ippad)


# ipaddress objects are immutable: one per distinct packed address, shared by every header
# (a cold decode of 10 000 entries made 40 000 of them, ~15% of its time; masks and 0 repeat)
_ADDRESSES: dict = {}


def _address(packed: bytes):
    a = _ADDRESSES.get(packed)
    if a is None:
        if len(_ADDRESSES) >= ENTRY_CACHE_MAX:
            _ADDRESSES.clear()
        # what IPv4Address(packed) / IPv6Address(packed) set (their __init__ for 4 or 16
        # bytes), without the argument checks: a blocklist of 10 000 prefixes makes 10 000
        if len(packed) == 4:
            a = _new(_IPV4)
        else:
            a = _new(_IPV6)
            a._scope_id = None
        a._ip = int.from_bytes(packed, "big")
        _ADDRESSES[packed] = a
    return a


_new, _IPV4, _IPV6 = object.__new__, ipaddress.IPv4Address, ipaddress.IPv6Address
_FROM_BYTES = int.from_bytes


def _addr4(packed: bytes):
    """_address of 4 bytes not in _ADDRESSES, without its checks (_walk_range bounds the
    dict once per walk): a restore of the mixed shape makes 11 000, ~1.5 ms less."""
    a = _ADDRESSES[packed] = _new(_IPV4)
    a._ip = _FROM_BYTES(packed, "big")
    return a


# IPv4 addresses by their value (a run reads the addresses as big-endian ints: no bytes
# object and hash of each, ~0.2 us an entry of a blocklist); bounded with _ADDRESSES
_ADDR_INTS: dict = {}


def _addr4i(value: int):
    """_addr4 of an address read as its value."""
    a = _ADDR_INTS[value] = _new(_IPV4)
    a._ip = value
    return a


def _addr6(packed: bytes):
    """_addr4 of 16 bytes."""
    a = _ADDRESSES[packed] = _new(_IPV6)
    a._scope_id = None
    a._ip = _FROM_BYTES(packed, "big")
    return a


@dataclass
class _Raw:
    off: int
    hdr: Any                 # _Hdr
    ip: IpHeader
    matches: list            # [(name_bytes, revision, payload, match_off)]
    tname: bytes
    trev: int
    tsize: int
    tpayload: bytes
    uncond: bool
    std: bool
    verdict: int
    mdata: list = None       # decoded match payloads (by _find_check), None = not decoded
    tdata: Any = None
    key: bytes = None        # the entry's bytes without comefrom and counters (_ENTRY_CACHE)
    dup: Any = None          # an earlier raw of this walk with the same key (its checks count)
    tpl: Any = None          # the _Template this entry was read by (its checks count)
    # set by _build (see _remember); class attributes, not fields: _build reads them before
    # any is set
    built_norm = built_raw = None

    # read as an _ENTRY_CACHE value (_remember keeps the raw itself: nothing changes these
    # after the walk; _moved changes only a jump's offset and verdict, read again on a hit)
    @property
    def hdr_fields(self) -> tuple:
        h = self.hdr
        return h.nfcache, h.target_offset, h.next_offset, h.pad

    @property
    def ip_fields(self) -> dict:
        return self.ip.__dict__


# ---- decode cache (issue #7: an append on a 10 000-rule table decodes one entry) -------------
# iptables sends the whole table on every change. An entry whose bytes, comefrom and counters
# aside, were decoded and checked before needs neither again: every check of one entry is a
# function of those bytes, except the ones on its offset (alignment, room in the blob, hook and
# underflow positions), which run for every entry. Key: the entry without comefrom (set by
# mark_source_chains) and the counters (zeroed by the kernel); value: everything _walk and
# _find_check derived from it. Match/target payloads are shared between tables; IpHeader, the
# one part callers edit, is rebuilt each time. Bounded: cleared when full.
_ENTRY_CACHE: dict = {}
ENTRY_CACHE_MAX = 1 << 18
# whether a read-only table's decode (decode_replace, an adopted state) has put entries in
# _ENTRY_CACHE since it was last emptied here (Table._decode: where none has, a decode takes
# none of its values; the empty tables a helper makes first are editable decodes)
_SHARED_CACHED = False
# (comefrom offset, counters offset, entry size) of ipt_entry / ip6t_entry
_VOLATILE = {AF_INET: (92, 96, 112), AF_INET6: (144, 152, 168)}


def _entry_key(e: bytes, family: int) -> bytes:
    """The entry without comefrom and counters, and without the offset a jump names (a rule
    inserted earlier in the table moves every chain behind it: its jumps stay the same rules);
    _walk reads that offset from the blob again on every hit (_jump_verdict)."""
    cf, cnt, end = _VOLATILE[family]
    v = _jump_verdict(e, family)
    if v is not None:
        return e[:cf] + e[cf + 4:cnt] + e[end:-8] + b"\xff\xff\xff\x7f" + e[-4:]
    return e[:cf] + e[cf + 4:cnt] + e[end:]


def _jump_verdict(e: bytes, family: int):
    """The verdict of a standard target that is a jump (an offset > 0), else None."""
    cf = _VOLATILE[family][0]
    toff = int.from_bytes(e[cf - 4:cf - 2], "little")
    if len(e) != toff + 40 or e[toff + 2] != 0 or e[toff:toff + 2] != b"\x28\x00":
        return None
    v = int.from_bytes(e[toff + 32:toff + 36], "little", signed=True)
    return v if v > 0 else None


class _CachedHdr:
    """_Hdr's fields, set by the maker (_cached_hdr, the walk, _with_volatile). Made by
    calling the class (no __init__): ~0.1 us less than object.__new__(cls), whose call packs
    its argument into a new tuple; the walk makes one per entry (but for the entries of a run
    that share one: _shared_hdr). One class for all of them:
    the readers' attribute loads stay specialized to one type (3.11's LOAD_ATTR_SLOT)."""
    __slots__ = _Hdr.__slots__


def _shared_hdr(nfcache: int, toff: int, nxt: int, pad: bytes, comefrom: int):
    """A header that several raw entries of a run share (_run_raws: those of one template
    with the counters zero and one comefrom), counters zero. Its `ip` is None, which marks it
    shared: the raws' own IpHeaders are their r.ip (a header's ip is its raw's or None), and
    nothing writes into it; what sets a raw's comefrom or counters gives the raw a header of
    its own first (_kept_hdr)."""
    h = _CachedHdr()
    h.ip = None
    h.nfcache, h.target_offset, h.next_offset, h.pad = nfcache, toff, nxt, pad
    h.comefrom, h.pcnt, h.bcnt = comefrom, 0, 0
    return h


def _kept_hdr(r, c: int, memo: dict = None) -> None:
    """Raw entry r's header set to comefrom c and the counters zero (the kept bytes): written
    in place where it is r's own, replaced where it is shared (_shared_hdr) by another shared
    one. `memo` ({(shared header, comefrom): its replacement}, or None): the raws that shared
    a header and are given one comefrom share one again (a restore sets the comefrom of
    10 000 entries after the reply: a header made for each would cost what sharing saved)."""
    h = r.hdr
    if h.ip is not None:
        h.comefrom, h.pcnt, h.bcnt = c, 0, 0
        return
    n = memo.get((h, c)) if memo is not None else None
    if n is None:
        n = _shared_hdr(h.nfcache, h.target_offset, h.next_offset, h.pad, c)
        if memo is not None:
            memo[(h, c)] = n
    r.hdr = n


def _cached_hdr(c, blob, off, family):
    """The header of the entry at `off` whose bytes are those of _ENTRY_CACHE value c."""
    h = _CachedHdr()
    h.nfcache, h.target_offset, h.next_offset, h.pad = c.hdr_fields
    ip = h.ip = object.__new__(IpHeader)        # IpHeader's fields, without its __init__
    ip.__dict__ = c.ip_fields.copy()
    cf, cnt, _ = _VOLATILE[family]
    h.comefrom = int.from_bytes(blob[off + cf:off + cf + 4], "little")
    h.pcnt = int.from_bytes(blob[off + cnt:off + cnt + 8], "little")
    h.bcnt = int.from_bytes(blob[off + cnt + 8:off + cnt + 16], "little")
    return h


# Work a decode leaves for later, whose result only a later decode reads (_ENTRY_CACHE's
# values, the raws' headers as the kept blob has them: _defer). LATER: what queues it, set by
# the engine to engine.after_reply (a helper: run once the caller has its answer, before the
# next command's requests); None: run at once. Whatever is still pending runs before the next
# decode reads the cache or the last walk (_run_deferred, at Table._decode's start), so a
# second SET_REPLACE in one command (iptables-restore of two tables) decodes as it did.
LATER = None
_DEFERRED: list = []


def _defer(work) -> None:
    """Run `work` (a callable) after the reply (LATER), in order with what is deferred."""
    _DEFERRED.append(work)
    if LATER is None:
        _run_deferred()
    elif len(_DEFERRED) == 1:
        LATER(_run_deferred)


def _run_deferred() -> None:
    """The deferred work, oldest first (what it defers meanwhile too)."""
    while _DEFERRED:
        _DEFERRED.pop(0)()


def _remember(raws, family, shared: bool = False):
    """Put the entries decoded and checked just now into _ENTRY_CACHE. The value is the raw
    entry itself (a _Raw or _TRaw: what _walk_range reads of it is hdr_fields, ip_fields
    (copied for each use), matches, tname, trev, tsize, tpayload, uncond, std, verdict (a
    jump's is read from the blob again), mdata, tdata, and built_norm / built_raw, which _build
    sets: (matches, ExtTarget or None) as it makes them); a restore of 10 000 entries made
    10 000 copies of those (~20 ms). An entry cached before keeps its value. Returns each
    entry's _ENTRY_CACHE value after this (None for an entry without a key), which _build reads
    (_make_rules: the lookups made once, here). `shared`: the entries are a read-only
    table's (_SHARED_CACHED)."""
    global _SHARED_CACHED
    if len(_ENTRY_CACHE) + len(raws) > ENTRY_CACHE_MAX:
        _ENTRY_CACHE.clear()
        _SHARED_CACHED = False
    put = _ENTRY_CACHE.setdefault
    got = [put(k, r) if (k := r.key) is not None else None for r in raws]
    if shared:
        _SHARED_CACHED = True
    return got


def live_keys(tables) -> set:
    """The _ENTRY_CACHE keys (Rule.cache_key) of every entry of `tables`. A moved chain whose
    entries are not made yet (_MovedChain) is read through its source, whose entries are its
    own: the walk makes none."""
    out = set()
    for t in tables:
        ents = [t.tail_entry]
        for c in t.chains:
            while getattr(c, "_src", None) is not None:
                c = c._src
            ents.append(c.head_entry)
            ents += c.rules
            ents.append(c.policy_entry)
            ents += c.trailer
        out.update(getattr(e, "cache_key", None) for e in ents)
    out.discard(None)
    return out


# what _ENTRY_CACHE and _ADDR_INTS / _ADDRESSES may hold beyond the installed tables' entries
# before sweep_entries drops the rest (an append leaves one or two entries behind; a restore of
# other rules, all of the old table's)
SWEEP_SLACK = 4096


def sweep_entries(live: set) -> int:
    """Keep in _ENTRY_CACHE only the entries of the installed tables (`live`: live_keys), once
    it holds SWEEP_SLACK more; the interned addresses are emptied at the same point (a decode
    makes them again where it needs them: no identity of theirs is relied on, the caches were
    already emptied when full). The cache is there for the next decode, which starts from an
    installed table (an append sends it back, a resync of kube-proxy mostly repeats it); the
    entries only a replaced table had stayed until ENTRY_CACHE_MAX (2^18), and a helper
    restoring other 10 000-rule rulesets in turn grew by megabytes each time and served
    slower (bench/cplane_bench.py --series 8: 52 -> 70 ms a restore by the eighth, 113 -> 174
    MiB). Returns how many entries were dropped."""
    global _SHARED_CACHED
    n = len(_ENTRY_CACHE)
    if n <= len(live) + SWEEP_SLACK:
        return 0
    kept = {k: v for k, v in _ENTRY_CACHE.items() if k in live}
    _ENTRY_CACHE.clear()            # (not a new dict: functions bind its methods)
    _ENTRY_CACHE.update(kept)
    if not kept:
        _SHARED_CACHED = False
    if len(_ADDR_INTS) + len(_ADDRESSES) > 2 * len(live) + SWEEP_SLACK:
        _ADDR_INTS.clear()
        _ADDRESSES.clear()
    return n - len(kept)


def _placed(rule, i: int, off: int, comefrom: int):
    """A previous decode's Rule at entry index i, offset off, with `comefrom` (_Moved; its
    target the same object: _build gives a jump whose landing changed a Jump of its own)."""
    jump = type(rule.target) is Jump
    n = object.__new__(_MovedJump if jump else _Moved)
    n.__dict__ = rule.__dict__
    n.index, n.offset, n.comefrom = i, off, comefrom
    if jump:
        n.target = rule.target
    return n


def _moved_rules(old_rules, offs, first: int, comefrom, jumps) -> list:
    """old_rules placed at entries first, first + 1, ... (_Moved: index, offset from `offs`,
    comefrom), those at the entry indexes `jumps` (sorted) as _MovedJump with the old Jump
    (_build gives each jump whose offset or landing changed a Jump of its own). ~0.3 us an
    entry: a fan-out append moves 16 000 of them, so the loop does nothing else."""
    new = object.__new__
    n = len(old_rules)
    kind = [_Moved] * n
    mine = jumps[bisect.bisect_left(jumps, first):bisect.bisect_left(jumps, first + n)]
    for j in mine:
        kind[j - first] = _MovedJump
    out = [None] * n
    k = 0
    for rule, o, c in zip(old_rules, offs[first:first + n], comefrom[first:first + n]):
        m = new(kind[k])
        m.__dict__ = rule.__dict__
        m.index = first + k
        m.offset = o
        m.comefrom = c
        out[k] = m
        k += 1
    for j in mine:
        out[j - first].target = old_rules[j - first].target
    return out


def _chain_range(chains, rules, firsts, ends, k) -> None:
    """rules[firsts[k]:ends[k]]: chain k's entries (a _MovedChain's made now, where the
    table's flat list has None: see _build)."""
    b = firsts[k]
    if rules[b] is None:
        c = chains[k]
        rules[b:ends[k]] = ([c.head_entry] if c.head_entry is not None else []) + c.body()


def _fill_range(rules, chains, firsts, ends, lo: int, hi: int) -> None:
    """rules[lo:hi] Rules: the chains holding them made where None (see _chain_range)."""
    if lo >= hi:
        return
    for k in range(max(0, bisect.bisect_right(firsts, lo) - 1),
                   bisect.bisect_right(firsts, hi - 1)):
        if rules[firsts[k]] is None:
            _chain_range(chains, rules, firsts, ends, k)


def _left_unmade(rules, chains, firsts, ends, nhead: int, jumps, lands, fix) -> set:
    """The indexes of the chains that end before entry nhead (the first changed one), whose
    entries are not made (None in rules: a _MovedChain) and that a table changed from nhead on
    can share as they are: nothing of their entries changes there (the same indexes and
    offsets before nhead) if none of them is in `fix` (sorted: the entries with a new
    comefrom) and none is a jump landing at nhead or behind (its offset may move). A
    fan-out's service chains before a change its hub's jumps do not reach (issue #7: making
    2 000 of them took ~20 ms)."""
    out = set()
    ja = 0
    for k in range(bisect.bisect_right(firsts, nhead - 1)):
        b, e = firsts[k], ends[k]
        if e > nhead:
            break
        if rules[b] is not None or type(chains[k]) is not _MovedChain or \
                getattr(chains[k], "_src", None) is None:
            continue
        ja = bisect.bisect_left(jumps, b, ja)
        jb = bisect.bisect_left(jumps, e, ja)
        if any(x is None or x >= nhead for x in lands[ja:jb]):
            continue
        if fix and bisect.bisect_left(fix, b) != bisect.bisect_left(fix, e):
            continue
        out.add(k)
    return out


def _sources(rules, chains, firsts, ends, lo: int) -> list:
    """rules[lo:] with each unmade _MovedChain's entries (None) replaced by its source's,
    which have the same attribute dicts (and a jump's, a Jump of another table): what
    _moved_rules needs to place them anew, without making the chain first (half the work)."""
    out = rules[lo:]
    for k in range(max(0, bisect.bisect_left(firsts, lo)), len(chains)):
        b = firsts[k]
        if rules[b] is None:
            c = chains[k]
            s = (getattr(c, "_src", None) if type(c) is _MovedChain else None) or c
            out[b - lo:ends[k] - lo] = ([s.head_entry] if s.head_entry is not None else []) \
                + s.rules + ([s.policy_entry] if s.policy_entry is not None else [])
    return out


def _made_all(rules, chains, firsts, ends) -> None:
    """Every entry of rules a Rule: the unmade _MovedChains' entries made (under one lock,
    without a descriptor call per chain: ~2x cheaper than reading each)."""
    with _MAKE_LOCK:
        for c in chains:
            if type(c) is _MovedChain and getattr(c, "_src", None) is not None:
                c._place()
    for k in range(len(chains)):
        if rules[firsts[k]] is None:
            _chain_range(chains, rules, firsts, ends, k)


def _ahead_unmade(held: set, hooks) -> set:
    """Of the chains `held` (ahead of a change, each with a jump landing behind it, whose
    offset moved), the user chains: they are left unmade (_placed_whole), as the chains behind
    the change are. A fan-out hub ahead of iptables -A SVC-k: up to 3 332 jumps, which
    making the hub placed one by one (the decode's _build of the first iptables -A SVC-3000
    after an append to INPUT, the hub unmade in the previous table too: ~11 ms, ~2 now), and
    nothing reads them before the next table is made from them (compile reads the hub through
    chain_source). A built-in chain is made: the table's hooks and policies read it."""
    return {k for k in held if hooks[k] is None}


# (a spans' hooks list, the indexes of its chains with a hook): the last one asked for
# (_hooked_after); the spans' lists never change once made, and a table moved by an append
# keeps the previous one's hooks list. One tuple, read and replaced whole
_HOOKED = (None, [])


def _hooked_after(hooks: list, js: int) -> list:
    """The indexes k > js of the chains whose hook (spans' column) is not None: the
    built-in chains (and hooks < 0) behind chain js, found once per hooks list instead of a
    test of each of a fan-out's 3 334 chains each append."""
    global _HOOKED
    got = _HOOKED
    if got[0] is not hooks:
        got = _HOOKED = (hooks, _hooked_of(hooks))
    hooked = got[1]
    return hooked[bisect.bisect_right(hooked, js):]


def _hooked_of(hooks: list) -> list:
    """The indexes of hooks' items that are not None. iptables puts the built-in chains first:
    where the leading ones are all of them (hooks.count(None), a C loop, says so), their range,
    not a comprehension over a fan-out's 3 337 chains (2.4M instructions, ~0.25 ms, of the
    first append after a restore: an int made for each index past 256)."""
    lead = 0
    for h in hooks:
        if h is None:
            break
        lead += 1
    if lead + hooks.count(None) == len(hooks):
        return list(range(lead))
    return [k for k, h in enumerate(hooks) if h is not None]


def _placed_whole(pc: Chain, at: int, pos) -> "_MovedChain":
    """User chain pc of the previous table as a _MovedChain of this one, its head entry at
    entry index `at` (where it was: ahead of the change), its entries placed by this decode's
    `pos` when read: each jump then names its landing's offset here (_place), which the
    change moved for those landing behind it. Made from pc, or from pc's own source if pc
    is a _MovedChain not made."""
    c = object.__new__(_MovedChain)
    c.name = pc.name
    c._src = (getattr(pc, "_src", None) if type(pc) is _MovedChain else None) or pc
    c._at = at
    c._pos = pos
    return c


def _moved_spans(p_spans, nhead: int, first: int, shift: int, errs, lands, hook_at: bool):
    """The chains' spans of a table that is the previous one (spans p_spans) with the
    entries between its nhead and first + shift replaced by those between nhead and first
    here, no chain start among either (then every span behind the change is the previous
    one moved by shift, and the one holding the change ends shift earlier) but, `hook_at`,
    a built-in chain's at nhead in both (its first entries changed), and no jump landing in
    that chain behind the change (its position in the chain would change): (spans as
    _build returns them, index of the chain holding the change), else None."""
    _sp, p_tail, p_bounds, p_firsts, p_bodies, p_ends, p_names, p_hooks = p_spans
    p_first = first + shift
    lo = bisect.bisect_left(p_bounds, nhead)
    if hook_at:
        # the chain starting at nhead holds the change; its start stays
        js = bisect.bisect_left(p_firsts, nhead)
        if js == len(p_firsts) or p_firsts[js] != nhead or p_hooks[js] is None or \
                lo == len(p_bounds) or p_bounds[lo] != nhead:
            return None
        lo += 1
        if lo < bisect.bisect_left(p_bounds, p_first) or \
                bisect.bisect_left(errs, nhead) != bisect.bisect_left(errs, first):
            return None
    else:
        if lo != bisect.bisect_left(p_bounds, p_first) or \
                bisect.bisect_left(errs, nhead) != bisect.bisect_left(errs, first):
            return None
        js = bisect.bisect_right(p_firsts, nhead - 1) - 1
    if js < 0 or p_tail is not None and p_tail < p_first:
        return None
    end = p_ends[js] - shift
    if not set(range(first, end)).isdisjoint(lands) if end - first < 64 else \
            any(first <= e < end for e in lands):
        return None
    k = js + 1
    bounds = p_bounds[:lo] + [x - shift for x in p_bounds[lo:]]
    firsts, ends = _firsts_ends_of_bounds(p_bounds, p_firsts, p_ends, lo, k, bounds)
    if firsts is None:
        firsts = p_firsts[:k] + [x - shift for x in p_firsts[k:]]
        ends = p_ends[:js] + [x - shift for x in p_ends[js:]]
    bodies = p_bodies[:k] + [x - shift for x in p_bodies[k:]]
    tail = p_tail - shift if p_tail is not None else None
    return (None, tail, bounds, firsts, bodies, ends, p_names, p_hooks), js


def _firsts_ends_of_bounds(p_bounds, p_firsts, p_ends, lo: int, k: int, bounds):
    """(firsts, ends) of _moved_spans as slices of the moved `bounds`, else (None, None).

    _spans makes a chain of each chain start up to the next one, the last start being the
    final ERROR entry: where no entry lies before the first start (a table as iptables makes
    it) the previous firsts are p_bounds[:-1] and its ends p_bounds[1:]. The moved spans move
    firsts from k, ends from k - 1 and bounds from lo by the same shift, so with lo == k the
    moved firsts and ends are bounds[:-1] and bounds[1:]: two slices in C, not two lists of a
    fan-out's 3 334 ints made one by one. Checked, not assumed (list compares in C); any
    other layout takes the lists moved as they are."""
    if lo != k or p_firsts != p_bounds[:-1] or p_ends != p_bounds[1:]:
        return None, None
    return bounds[:-1], bounds[1:]


def _underflow_check(r, off, valid_hooks, underflow):
    for h in range(NF_INET_NUMHOOKS):
        if valid_hooks & (1 << h) and off == underflow[h] and \
                not (r.uncond and r.std and -r.verdict - 1 in (NF_DROP, NF_ACCEPT)):
            # check_underflow()
            _err(errno.EINVAL, off, f"underflow of hook {HOOK_NAMES[h]} is not an "
                 "unconditional ACCEPT/DROP standard rule")


# ---- the previous table's walk (issue #7: one append walks the entries that changed) ---------
# iptables sends the whole table on every change; what changed is a few entries in one place.
# {family: (blob, raws, ends, shared, memo)} of the last table decoded without error (shared:
# (rules, comefrom, table, spans, chains, lazy) of a decode_replace table, whose Rule and Chain
# objects the next one may share: every entry's Rule in blob order, None where a _MovedChain
# has not made its entries (lazy: there may be such), a weak reference to the table, its
# chains' spans as columns (Table._build) and its chains; memo: its _Memo). An entry of the
# new blob whose bytes equal an entry of the old one at the same offset (before the change) or
# at the same distance from the end (after it), a jump's verdict aside (it names an offset the
# change moved: the target's landing is checked by mark_source_chains for the whole table),
# passed every check of its own bytes then (a positive verdict is always verdict_ok()); of
# the offset-dependent checks of check_entry_size_and_hooks, alignment and room in the blob
# hold where the distance to the blob's start (prefix) or end (suffix, moved by a multiple of
# 8) is the same, and the underflow check is run again on every hook's underflow entry.
# "Equal" leaves out comefrom and the counters (libiptc sends back the live counters
# GET_ENTRIES showed); after a normalized decode
# the blob kept is the one the kernel would keep (Table.kept_blob), so an append after a
# restore (which sent comefrom 0) still matches byte for byte where no rule counted a packet.
# A restore over the loaded table (kube-proxy's periodic full sync: the same table, or one rule
# changed) sends comefrom 0 in every entry, so it is compared with the kept blob with comefrom
# zeroed instead (_zeroed; the restore's own blob when the previous command was one): the
# unchanged entries are then a few big slice compares, and the kept blob is the previous one's
# bytes spliced around the change (_kept_spliced), not a patch of every entry. When nothing the
# kernel's walk depends on changed, the comefrom values (_mark_again, _mark_same_kinds), the
# chains' spans and the Chain objects outside the change are the previous table's (_build);
# when the entries behind the change only moved, its user chains there are the previous ones
# moved whole, their entries made when read (_MovedChain: a fan-out append moves 3 333 chains
# that nothing reads before the next decode, which moves them again).
# The decode takes the entry out (pop) and owns its raws: moved ones are changed in place.
_LAST_WALK: dict = {}
# a user chain's name by its ERROR entry's payload (3 333 chains in a fan-out table)
_CHAIN_NAMES: dict = {}


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of a and b (_common_prefix_from)."""
    return _common_prefix_from(a, b, 0)


def _common_suffix(a: bytes, b: bytes) -> int:
    """Length of the longest common suffix of a and b (_common_suffix_to)."""
    return _common_suffix_to(a, len(a), b, len(b))


def _moved(r, off: int, verdict: int):
    """The old raw entry r at its new offset (and verdict), changed in place: the previous walk
    was taken out of _LAST_WALK for this decode, so nothing else holds its raws (a Table's rules
    copy what they need), and a copy of each of 10 000 moved entries cost ~10 ms."""
    r.off, r.verdict = off, verdict
    return r


def _same_but_volatile(a: bytes, b: bytes, family: int) -> bool:
    """Entries a and b are the same bytes but for comefrom and the counters."""
    cf, cnt, _ = _VOLATILE[family]
    return len(a) == len(b) and a[:cf] == b[:cf] and a[cf + 4:cnt] == b[cf + 4:cnt] \
        and a[cnt + 16:] == b[cnt + 16:]


def _with_volatile(hdr, e: bytes, family: int, ip=None):
    """A copy of an entry header with comefrom and the counters read from entry bytes e; its
    ip `ip` where given (the raw's: a shared header has None, _shared_hdr, and the copy is the
    raw's own, written in place by _kept_hdr), else hdr's."""
    n = _CachedHdr()
    n.ip, n.nfcache, n.target_offset, n.next_offset, n.pad = \
        hdr.ip if ip is None else ip, hdr.nfcache, hdr.target_offset, hdr.next_offset, hdr.pad
    cf, cnt, _ = _VOLATILE[family]
    n.comefrom = int.from_bytes(e[cf:cf + 4], "little")
    n.pcnt = int.from_bytes(e[cnt:cnt + 8], "little")
    n.bcnt = int.from_bytes(e[cnt + 8:cnt + 16], "little")
    return n


def _zeroed(prev, family: int):
    """The previous kept blob with every entry's comefrom zeroed (its counters are zero
    already): what iptables-restore sends for the same table (libiptc builds every entry anew,
    comefrom 0, counters 0). Made once per kept blob (the memo keeps it), or the restore's own
    blob when it was that (_decode)."""
    memo = prev[4]
    z = memo.zeroed
    if z is None:
        bio, out = _writable_copy(prev[0])
        cf = _VOLATILE[family][0]
        if sys.byteorder == "little":
            words = out[:len(out) & ~3].cast("I")
            for o in memo.offs:
                words[(o + cf) >> 2] = 0
            words.release()
        else:
            for o in memo.offs:
                out[o + cf:o + cf + 4] = bytes(4)
        z = memo.zeroed = _bytes_written(bio, out)
    return z


# how many entries that differ from the kept blob only in comefrom and the counters, and are no
# evidence either way, _restored_over reads past at each end of the change
_RESTORE_LOOK = 8


def _restored_over(prev, blob: bytes, pre: int, family: int, suffix: list = None) -> bool:
    """Whether `blob` looks like a restore over the previous kept table: near the start of
    the change (the first byte that differs, `pre`, on) or its end (the last one back, the
    entries moved by the size change) a rule entry kept with a nonzero comefrom (one that
    mark_source_chains reached) is sent the same but for comefrom 0 (and the counters).
    iptables-restore builds every entry anew, comefrom 0. libiptc's append sends each rule as
    GET_ENTRIES showed it (comefrom kept, live counters) and builds only the entries it
    derives from the chains with comefrom 0: each policy, chain head, RETURN and ERROR entry
    (the first append to an empty INPUT after a restore of a fan-out on FORWARD differs from
    the kept blob, but for the new rule, in the policies and SVC's RETURN entry alone: the
    service chains' RETURN entries, behind a DROP, were never reached). Those, and the
    unconditional verdicts among the rules, are read past, at most _RESTORE_LOOK at each end.
    A guess: _reusable compares every entry either way, it only picks the bytes (kept, or with
    comefrom zeroed) it compares with first.
    A kept table without a rule (only policies, chain heads, RETURN, ERROR and unconditional
    verdict entries: the table the helper starts with, a flushed one) gives no evidence
    either way: there a restore is guessed as before, from the first or last byte that
    differs lying in an entry's comefrom or counters sent as zero (so the restore's decode
    notes its blob as sent zeroed, and the next restore of it compares at once).
    `suffix`: a list the length of the common suffix of the kept blob and `blob` is put in
    when it is found here (_reusable needs it too: a memcmp of up to the whole blob, ~0.2 ms
    of a 10 000-rule append, made once)."""
    old, memo = prev[0], prev[4]
    delta = len(blob) - len(old)
    if len(memo.kinds[1]) + len(memo.kinds[2]) == len(memo.offs):
        if _zero_volatile_at(memo.offs, old, blob, pre, 0, family):
            return True
        last = len(old) - _suffix_of(old, blob, suffix) - 1
        return last >= 0 and _zero_volatile_at(memo.offs, old, blob, last, delta, family)
    if _restore_evidence(prev, blob, pre, 0, False, family):
        return True
    last = len(old) - _suffix_of(old, blob, suffix) - 1
    return last >= 0 and _restore_evidence(prev, blob, last, delta, True, family)


def _suffix_of(old: bytes, blob: bytes, cell) -> int:
    """_common_suffix(old, blob), taken from `cell` (a list) when found before, put there
    when found now."""
    if cell:
        return cell[0]
    n = _common_suffix(old, blob)
    if cell is not None:
        cell.append(n)
    return n


def _zero_volatile_at(offs, old: bytes, blob: bytes, pos: int, delta: int, family: int) -> bool:
    """Whether byte pos of old lies in the comefrom or counters of its entry (offs: the old
    entries' offsets), and that entry, moved by delta, has all of them zero in blob."""
    k = bisect.bisect_right(offs, pos) - 1
    if k < 0:
        return False
    cf, cnt, _ = _VOLATILE[family]
    o = offs[k]
    n = o + delta
    return cf <= pos - o < cnt + 16 and n >= 0 and len(blob) >= n + cnt + 16 \
        and not any(blob[n + cf:n + cf + 4]) and not any(blob[n + cnt:n + cnt + 16])


def _restore_evidence(prev, blob: bytes, pos: int, delta: int, back: bool, family: int) -> bool:
    """_restored_over from byte pos of the kept blob, the first (back: the last) that differs
    from blob (its entries there moved by delta), on to the next differences (back: before
    it): True at a rule entry kept with comefrom set, sent with 0; False at an entry that
    differs in more than comefrom and the counters, or after _RESTORE_LOOK others."""
    old, ends, memo = prev[0], prev[2], prev[4]
    offs, (_, errs, terms) = memo.offs, memo.kinds
    cf = _VOLATILE[family][0]
    for _ in range(_RESTORE_LOOK):
        k = bisect.bisect_right(offs, pos) - 1
        if k < 0:
            return False
        o, e = offs[k], ends[k]
        n = o + delta
        if n < 0 or n + e - o > len(blob):
            return False
        a, b = old[o:e], blob[n:n + e - o]
        if not _same_but_volatile(a, b, family):
            return False
        if any(a[cf:cf + 4]) and not any(b[cf:cf + 4]) \
                and not _sorted_has(errs, k) and not _sorted_has(terms, k):
            return True
        if back:
            pos = o - 1 - _common_suffix_to(old, o, blob, n)
            if pos < 0:
                return False
        else:
            pos = e + _common_prefix_from(old, blob, e)
            if pos >= min(len(old), len(blob)):
                return False
    return False


def _sorted_has(lst: list, x: int) -> bool:
    i = bisect.bisect_left(lst, x)
    return i < len(lst) and lst[i] == x


def _common_prefix_from(a: bytes, b: bytes, i: int) -> int:
    """Length of the longest common prefix of a[i:] and b[i:]: steps doubling from 256 bytes
    up to the first difference, then bisection (the next difference is usually an entry or a
    chain away, not the rest of a 2 MB blob). Each step is one memcmp of a and a view of b:
    bytes.startswith copies neither, a slice compare copied both (~1 ms of a fan-out append's
    2 MB)."""
    v, top = memoryview(b), min(len(a), len(b)) - i
    lo, step = 0, 256
    while lo < top:
        m = min(top, lo + step)
        if not a.startswith(v[i + lo:i + m], i + lo):
            top = m - 1
            break
        lo, step = m, step * 2
    while lo < top:
        mid = (lo + top + 1) // 2
        if a.startswith(v[i + lo:i + mid], i + lo):
            lo = mid
        else:
            top = mid - 1
    return lo


def _common_suffix_to(a: bytes, na: int, b: bytes, nb: int) -> int:
    """Length of the longest common suffix of a[:na] and b[:nb] (as _common_prefix_from)."""
    v, top = memoryview(b), min(na, nb)
    lo, step = 0, 256
    while lo < top:
        m = min(top, lo + step)
        if not a.startswith(v[nb - m:nb - lo], na - m):
            top = m - 1
            break
        lo, step = m, step * 2
    while lo < top:
        mid = (lo + top + 1) // 2
        if a.startswith(v[nb - mid:nb - lo], na - mid):
            lo = mid
        else:
            top = mid - 1
    return lo


def _reusable(prev, blob: bytes, family: int, touched: list, splice=None):
    """(head, tail): the old entries at the start of `blob` (same offsets) and at its end
    (offsets moved by the size change; a jump entry whose only difference is its verdict
    carries the new one), with nothing in between reused twice. The entries given other
    comefrom or counters (a new header) are added to `touched`.

    `splice` (a dict; only for a normalized decode after a normalized decode): where `blob`
    is a restore over the previous table (comefrom and the counters zero in every entry, the
    previous kept blob has the comefrom mark_source_chains set), the entries are compared
    with the previous kept blob with comefrom zeroed (_zeroed: whole runs in one memcmp, not
    a header per entry), and splice tells _kept_blob where: "kept" the previous kept blob,
    "head" (entries, end offset) at the start of both equal byte for byte to it but for
    comefrom, "tail" (entries, old offset, new offset) at the end. Those entries' headers keep
    describing the previous kept bytes (comefrom as marked then, counters 0), not `blob`'s;
    the reused entries between head and tail carry blob's comefrom (0) and counters (0) but
    keep their old headers: _kept_blob writes every one of them."""
    old, raws, ends = prev[:3]
    delta = len(blob) - len(old)
    if delta % 8:
        return [], []
    pre = _common_prefix(old, blob)
    # the common suffix of `old` and blob, once found (by _restored_over, or below)
    suf = []
    if splice is not None and pre < len(blob) and \
            _restored_over(prev, blob, pre, family, suf):
        z = _zeroed(prev, family)
        pz = _common_prefix(z, blob)
        if pz >= pre:
            splice["kept"] = old
            old, pre = z, pz
            suf.clear()         # (of the kept blob, not of `old` now)
    nhead = bisect.bisect_right(ends, pre)
    if splice:
        splice["head"] = (nhead, ends[nhead - 1] if nhead else 0)
    head = raws[:nhead]
    cf, cnt, _ = _VOLATILE[family]
    # on from there, entries equal but for comefrom and the counters (libiptc sends the live
    # counters GET_ENTRIES showed: with traffic, the byte prefix ends at the first counted rule)
    pj = prev[4].kinds[0]               # the old jumps' entry indexes
    # many such entries in a row (the jumps of a chain moved by the change, rules that
    # counted packets): compared in runs of growing length, entry by entry after a run that
    # is not equal, up to the first entry that differs in more
    i, run = nhead, 16
    while i < len(raws):
        if run:
            e = min(len(raws), i + run)
            if _equal_but_moved(old, blob, raws, ends, pj, i, e, 0, family, touched):
                i, run = e, run * 2
                continue
            run = 0
        r = raws[i]
        nxt = r.hdr.next_offset
        e_old, e_new = old[r.off:r.off + nxt], blob[r.off:r.off + nxt]
        if e_old != e_new:
            # a jump into a chain behind the change names its new offset (the jump rules of
            # a kube-proxy service chain, on a rule added to it)
            v = _moved_jump(r, e_old, e_new, family)
            if v is not None:
                r.verdict = v
            elif not _same_but_volatile(e_old, e_new, family):
                break
            if e_old[cf:cnt + 16] != e_new[cf:cnt + 16]:
                r.hdr = _with_volatile(r.hdr, e_new, family, r.ip)
                touched.append(r)
        i += 1
    head = raws[:i]
    nhead = i
    floor = head[-1].off + head[-1].hdr.next_offset if head else 0  # the first offset after it
    # old entries from this offset on lie in the common suffix: byte-equal where they moved to
    same_from = len(old) - _suffix_of(old, blob, suf)
    # those wholly in it (and after the head), at once: moved by delta, nothing else changes
    js = max(nhead, _first_at_or_after(raws, max(same_from, floor - delta)))
    suffix = raws[js:]
    if splice:
        o = raws[js].off if suffix else len(old)
        splice["tail"] = (len(suffix), o, o + delta)
    if delta:
        for r in suffix:
            r.off += delta      # _moved, verdict kept (the bytes are the same)
    # the tail is raws[low:]: every entry taken below is the raw itself, moved in place
    # (_moved), and they are taken from js back, so one slice at the end instead of a list
    # built entry by entry, reversed and joined to the suffix (a fan-out's 16 000)
    low = js
    k0 = max(nhead, _first_at_or_after(raws, floor - delta))   # the first that may move
    j, run = js - 1, 16
    # all of raws[k0:js] in one run first, when the first of them is the same moved (an append
    # ahead of a fan-out's hub: one comparison of its 3 333 jumps, not eight of growing runs);
    # else, or when that run is not equal, runs of growing length as below
    whole = js - k0 > _WHOLE_RUN_MIN and _moved_alike(raws[k0], old, blob, delta, family)
    while j >= nhead:
        if run and j >= k0:
            # runs as in the head, backwards: raws[b:j + 1]
            b = k0 if whole else max(k0, j + 1 - run)
            if _equal_but_moved(old, blob, raws, ends, pj, b, j + 1, delta, family, touched):
                if delta:
                    for x in raws[b:j + 1]:
                        x.off += delta
                low, j, run = b, b - 1, run * 2
                continue
            if whole:
                whole = False
                continue
            run = 0
        r = raws[j]
        j -= 1
        nxt, noff = r.hdr.next_offset, r.off + delta
        if noff < floor:
            break
        e_old, e_new = old[r.off:r.off + nxt], blob[noff:noff + nxt]
        if e_old == e_new:
            _moved(r, noff, r.verdict)
            low = j + 1
            continue
        v = _moved_jump(r, e_old, e_new, family)
        if v is not None:
            # a jump whose only differences are the offset it names (its chain moved) and
            # perhaps comefrom and the counters
            if e_old[cf:cnt + 16] != e_new[cf:cnt + 16]:
                r.hdr = _with_volatile(r.hdr, e_new, family, r.ip)
                touched.append(r)
            _moved(r, noff, v)
            low = j + 1
            continue
        if _same_but_volatile(e_old, e_new, family):
            r.hdr = _with_volatile(r.hdr, e_new, family, r.ip)
            touched.append(r)
            _moved(r, noff, r.verdict)
            low = j + 1
            continue
        # the same entry but for comefrom, the counters or the offset a jump names (_entry_key:
        # iptables-restore sends comefrom 0, libiptc what GET_ENTRIES showed)
        if r.key is None or len(e_new) != nxt or _entry_key(e_new, family) != r.key:
            break
        v = _jump_verdict(e_new, family) if r.std and r.verdict > 0 else r.verdict
        if v is None:
            break
        if e_new[cf:cnt + 16] != e_old[cf:cnt + 16]:
            r.hdr = _with_volatile(r.hdr, e_new, family, r.ip)
            touched.append(r)
        _moved(r, noff, v)
        low = j + 1
    return head, raws[low:]


# raws between the head and the common suffix from which _reusable tries them all in one run
_WHOLE_RUN_MIN = 64


def _moved_alike(r, old: bytes, blob: bytes, delta: int, family: int) -> bool:
    """Whether old raw entry r is in blob moved by delta, the same but for comefrom, the
    counters and (a jump) the offset it names: what _equal_but_moved takes of each entry.
    Nothing changes."""
    o, n = r.off, r.hdr.next_offset
    if o + delta < 0:
        return False
    e_old, e_new = old[o:o + n], blob[o + delta:o + delta + n]
    return _same_but_volatile(e_old, e_new, family) or \
        _moved_jump(r, e_old, e_new, family) is not None


def _moved_jump(r, e_old: bytes, e_new: bytes, family: int):
    """The verdict in e_new when raw entry r (bytes e_old) is a jump and e_new differs from
    e_old only in that verdict (a positive one: still a jump), comefrom and the counters;
    else None."""
    if not (r.std and r.verdict > 0) or len(e_new) != len(e_old):
        return None
    cf, cnt, _ = _VOLATILE[family]
    p = r.hdr.target_offset + 32            # xt_standard_target.verdict
    if e_old[:cf] != e_new[:cf] or e_old[cf + 4:cnt] != e_new[cf + 4:cnt] \
            or e_old[cnt + 16:p] != e_new[cnt + 16:p] or e_old[p + 4:] != e_new[p + 4:]:
        return None
    v = int.from_bytes(e_new[p:p + 4], "little", signed=True)
    return v if v > 0 else None


def _equal_but_moved(old: bytes, blob: bytes, raws, ends, jumps, lo: int, hi: int,
                     delta: int, family: int, touched: list) -> bool:
    """Whether the old entries raws[lo:hi] are in blob, moved by delta, but for their jumps'
    verdicts (still jumps), comefrom and the counters: one comparison of the old bytes with
    those values copied in from blob. If so, each jump takes its new verdict and each entry
    with other comefrom/counters a new header (and goes to `touched`); offsets are left to
    the caller. Nothing changes otherwise."""
    cf, cnt, _ = _VOLATILE[family]
    a, b = raws[lo].off, ends[hi - 1]
    if a + delta < 0 or b + delta > len(blob):
        return False
    # one copy of the old bytes (bytearray of a bytes slice copied them twice), and blob's
    # compared through a view, not copied (a run over a fan-out's hub: ~400 KB)
    exp = bytearray(memoryview(old)[a:b])
    ja, jb = _bisect_left(jumps, lo), _bisect_left(jumps, hi)
    # the jumps' verdicts (xt_standard_target.verdict) read from blob and written into exp:
    # those of a block of consecutive jumps at the end (a hub, behind the jumps of the chains
    # before it) as one strided slice where they are uniform, the others one by one. The
    # block is found by bisecting `jumps` in place and taken as a range: the jumps of a
    # moved table are a _ShiftedInts, whose slice makes a list of new ints (a hub's 3 333)
    k = _consecutive_in(jumps, ja, jb)
    block = range(jumps[k], jumps[jb - 1] + 1) if k < jb else range(0)
    uni = _uniform_jumps(old, raws, block, a, delta, cf)
    one_by_one = jumps[ja:k] if uni is not None else jumps[ja:jb]
    ps = [raws[j].off + raws[j].hdr.target_offset + 32 for j in one_by_one]
    vs = _verdicts_at(blob, ps, delta)
    if vs is None:
        return False
    _put_verdicts(exp, ps, vs, a)
    if uni is not None:
        us = _copy_strided_verdicts(exp, blob, a, delta, *uni)
        if us is None:
            return False
    new = memoryview(blob)[a + delta:b + delta]
    vol = []
    if exp != new:
        # comefrom and the counters: libiptc sends back the live ones (rules that counted
        # packets) and builds policies, chain heads and RETURN entries with comefrom 0,
        # iptables-restore sends zeros; ip6t_entry's padding between them is compared
        vol = _volatile_changes(exp, new, raws, ends, lo, hi, a, cf, cnt)
        if not vol or exp != new:
            return False
    for j, v in zip(one_by_one, vs):
        raws[j].verdict = v
    if uni is not None:
        for r, v in zip(raws[block.start:block.stop], us):
            r.verdict = v
    for r in vol:
        n = r.off + delta
        r.hdr = _with_volatile(r.hdr, blob[n:n + r.hdr.next_offset], family, r.ip)
        touched.append(r)
    return True


def _volatile_changes(exp: bytearray, new, raws, ends, lo: int, hi: int, a: int, cf: int,
                      cnt: int):
    """_equal_but_moved's entries raws[lo:hi] whose comefrom or counters (or ip6t_entry's
    padding between them) differ in `new` from `exp` (the old bytes from offset a on), each
    difference's comefrom and counters copied into exp; None at a difference elsewhere in an
    entry. The differences are found by comparing the bytes up to the next one
    (_common_prefix_from), not entry by entry: a run of 1 000 entries holds a few (the
    policies, chain heads and RETURN entries libiptc builds anew, with comefrom 0)."""
    vol, pos, n = [], 0, len(exp)
    while True:
        pos += _common_prefix_from(exp, new, pos)
        if pos >= n:
            return vol
        i = bisect.bisect_right(ends, a + pos, lo, hi)     # the entry holding that byte
        r = raws[i]
        o = r.off - a
        if not cf <= pos - o < cnt + 16:
            return None
        nv = new[o + cf:o + cnt + 16]
        exp[o + cf:o + cf + 4] = nv[:4]
        exp[o + cnt:o + cnt + 16] = nv[cnt - cf:]
        vol.append(r)
        pos = o + cnt + 16


# consecutive jumps of one size from which _equal_but_moved reads the verdicts as one strided
# slice (a kube-proxy hub: 3 333 jumps of one template) instead of one offset per jump
_UNIFORM_MIN = 32


def _consecutive_in(seq, lo: int, hi: int) -> int:
    """The least k in [lo, hi] for which seq[k:hi] (sorted ints, a list or a _ShiftedInts)
    are consecutive, by bisection: seq[k:hi] is consecutive exactly when
    seq[hi - 1] - seq[k] == hi - 1 - k, and then so is every shorter tail. Read in place (a
    _ShiftedInts an int at a time: a bisection reads a dozen, a slice would make them all)."""
    if hi <= lo:
        return hi
    end = hi - 1
    last = seq[end]
    while lo < hi:
        mid = (lo + hi) // 2
        if last - seq[mid] == end - mid:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _uniform_jumps(old: bytes, raws, js: list, a: int, delta: int, cf: int):
    """(first verdict's offset in old, entry size, count) when the jumps js are consecutive
    entries of one size with one target_offset, so their verdicts lie at one stride, else
    None. Checked on old's bytes in four strided slices: entry k's next_offset and
    target_offset sit at cf - 2 and cf - 4 (ipt_entry and ip6t_entry alike), and when the
    first k entries have the size s, entry k starts k * s in, so each of those fields read at
    the stride is the real one of the entry there. Only on a little-endian machine with every
    offset 4-aligned, where the verdicts are read and written as native int32 words."""
    n = len(js)
    if n < _UNIFORM_MIN or js[-1] - js[0] != n - 1 or sys.byteorder != "little":
        return None
    h = raws[js[0]].hdr
    size, tgt = h.next_offset, h.target_offset
    start = raws[js[0]].off
    if a & 3 or delta & 3 or not _strided_entries(old, start, size, tgt, n, cf):
        return None
    return start + tgt + 32, size, n


def _strided_entries(buf: bytes, start: int, size: int, tgt: int, n: int, cf: int) -> bool:
    """Whether n entries of buf from offset `start` on all have next_offset `size` and
    target_offset `tgt` (so they lie at that stride, and their verdicts too), every offset
    4-aligned and the last inside buf: checked in four strided slices (see _uniform_jumps)."""
    end = start + n * size
    if start < 0 or (start + tgt) & 3 or size & 3 or size <= 0 or end > len(buf):
        return False
    for field, want in ((cf - 2, size), (cf - 4, tgt)):
        for lane in (0, 1):             # u16, little-endian
            if buf[start + field + lane:end:size] != bytes((want >> 8 * lane & 0xFF,)) * n:
                return False
    return True


def _copy_strided_verdicts(exp: bytearray, blob: bytes, a: int, delta: int, p0: int,
                           size: int, n: int):
    """_uniform_jumps' verdicts: read from blob (moved by delta) and written into exp (the old
    bytes from offset a on) as strided int32 slices; their values, or None if one is not > 0
    (not a jump)."""
    step = size >> 2
    q = (p0 + delta) >> 2
    words = memoryview(blob)[:len(blob) & ~3].cast("i")
    got = words[q:q + (n - 1) * step + 1:step]
    vs = got.tolist()
    if min(vs) <= 0:
        return None
    ew = memoryview(exp)[:len(exp) & ~3].cast("i")
    e = (p0 - a) >> 2
    ew[e:e + (n - 1) * step + 1:step] = got
    ew.release()
    return vs


def _verdicts_at(blob: bytes, ps: list, delta: int):
    """The int32 verdicts at offsets p + delta of blob for p in ps, None if one is not > 0
    (not a jump) or lies outside blob. Read as one native int array where all are 4-aligned
    (a fan-out chain has 3 333 jumps): the blob is the kernel's native struct."""
    if not ps:
        return []
    if sys.byteorder == "little" and not any(p & 3 for p in ps) and not delta & 3:
        words = memoryview(blob)[:len(blob) & ~3].cast("i")
        d = delta >> 2
        try:
            vs = [words[(p >> 2) + d] for p in ps]
        except IndexError:
            return None
        if ps[0] + delta < 0:
            return None
    else:
        vs = []
        for p in ps:
            raw = blob[p + delta:p + delta + 4]
            if len(raw) != 4 or p + delta < 0:
                return None
            vs.append(int.from_bytes(raw, "little", signed=True))
    return vs if min(vs) > 0 else None


def _put_verdicts(exp: bytearray, ps: list, vs: list, base: int) -> None:
    """Write int32 verdicts vs at offsets p - base of exp."""
    if sys.byteorder == "little" and not base & 3 and not any(p & 3 for p in ps):
        words = memoryview(exp)[:len(exp) & ~3].cast("i")
        for p, v in zip(ps, vs):
            words[(p - base) >> 2] = v
        words.release()
    else:
        for p, v in zip(ps, vs):
            exp[p - base:p - base + 4] = v.to_bytes(4, "little", signed=True)


def _first_at_or_after(raws, off: int) -> int:
    """Index of the first raw entry at offset >= off (raws in blob order)."""
    lo, hi = 0, len(raws)
    while lo < hi:
        mid = (lo + hi) // 2
        if raws[mid].off < off:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _walk(blob: bytes, lay, hook_entry, underflow, valid_hooks, prev=None, touched=None,
          splice=None, runs=None):
    """translate_table()'s first loop: check_entry_size_and_hooks() on every entry, on the
    entries the previous table (`prev`, from _LAST_WALK) did not have. Returns (raws, nhead,
    ntail): raws[:nhead] are the previous walk's first nhead entries (same offsets), raws[-ntail:]
    (ntail > 0) its last ntail (moved by the size change); reused entries with other comefrom
    or counters go to `touched`. `splice`: see _reusable. `runs` (a list): the runs of the
    entries walked anew are put there (_WalkRun, indexes from raws[nhead])."""
    if prev is None:
        return _walk_range(blob, lay, underflow, valid_hooks, 0, None, runs), 0, 0
    head, tail = _reusable(prev, blob, lay.family, [] if touched is None else touched, splice)
    start = head[-1].off + head[-1].hdr.next_offset if head else 0
    stop = tail[0].off if tail else None
    mid = _walk_range(blob, lay, underflow, valid_hooks, start, stop, runs)
    end = mid[-1].off + mid[-1].hdr.next_offset if mid else start
    ntail = len(tail)
    if stop is not None and end != stop:
        # the new entries did not end where the reused ones begin: walk on from there (its
        # runs not noted: the readers of `runs` read the entries outside them one by one)
        tail, ntail = _walk_range(blob, lay, underflow, valid_hooks, end, None), 0
        if splice:
            splice["tail"] = (0, len(splice["kept"]), len(blob))
    raws = head + mid + tail
    if head or tail:
        for h in range(NF_INET_NUMHOOKS):
            r = _raw_at(raws, underflow[h]) if valid_hooks & (1 << h) else None
            if r is not None:
                _underflow_check(r, r.off, valid_hooks, underflow)
    return raws, len(head), ntail


def _raw_at(raws, off: int):
    """The raw entry at offset `off` (raws in blob order), None if no entry starts there."""
    lo = _first_at_or_after(raws, off)
    return raws[lo] if lo < len(raws) and raws[lo].off == off else None


# ---- templates (issue #7: a restore of 10 000 rules into an empty table) -------------------
# The rules of a big table differ in a few fields only: addresses and masks (a blocklist), a
# tcp/udp match's ports, a jump's offset, a user chain's name (its ERROR entry). Entries whose
# bytes are equal outside those fields, comefrom and the counters are one template: the first
# one is walked and checked in full, the others only read their own fields. Every check of
# check_entry_size_and_hooks() and find_check_entry() but these is a function of the
# template's bytes or of the entry's offset (which is checked per entry):
#   - the addresses and masks: ip_checkentry() reads only flags and invflags; unconditional()
#     compares them with zero (per entry)
#   - tcp/udp ports: tcp_mt_check()/udp_mt_check() read only invflags; xt_check_match() the
#     protocol (ipt_ip, in the template) and the payload size
#   - a jump's verdict: verdict_ok() for any verdict > 0 (an entry with another is no hit)
#   - a standard verdict (ACCEPT, DROP, QUEUE, RETURN) of a conditional entry without
#     tcp/udp ports (_VERDICT): verdict_ok() per entry, a verdict < 0, and the entry not
#     unconditional() (its addresses not all zero where nothing else makes it conditional),
#     so every entry of the template goes on to the next one in mark_source_chains(),
#     whatever its verdict. A blocklist's DROP and ACCEPT entries are one template, so one run
#     (_walk_run), not a run of DROPs broken at each ACCEPT (its 83 ACCEPTs: a cold decode of
#     10 000 entries 5 ms longer than with none). An unconditional one (a policy, a `-j DROP`)
#     has its verdict in its template, which takes unconditional entries only (_TERM): a
#     fan-out's service chains stay a cycle of four templates (ERROR head, rule, DROP,
#     RETURN), and every entry has one template it can be read by, whichever path reads it
#   - an ERROR entry's errorname: error_tg_ok() wants a NUL in it (per entry; no hit without)
# {(kind, name, revision): (start, end)} of the payload bytes a template leaves to its entries:
# xt_tcp's and xt_udp's spts[2], dpts[2] (u16, host order), which _find_check reads per entry
_KEY_FIELDS = {(ext.MATCH, b"tcp", 0): (0, 8), (ext.MATCH, b"udp", 0): (0, 8)}
_JUMP, _ERRNAME, _VERDICT = 1, 2, 3      # _Template.tvar: the target's own field,
_TERM = 4                       # or none but the entries' addresses all zero (see above)
TEMPLATES = True                # False: every entry walked in full (tests compare the two)


class _Template:
    """Entries equal but for their key fields (see above). `first`: the raw entry walked in
    full; `mvar`: (match index, start, end) of each match payload the entry brings, `mext`
    their extensions; `tvar`: 0, _JUMP, _ERRNAME, _VERDICT or _TERM; `uncond`: the first
    entry's ipt_ip is zero outside the addresses and it has no matches (unconditional() then
    depends on the addresses alone); `ip`, `hdr`: the first entry's IpHeader fields after the
    addresses and its header fields (nfcache, target_offset, next_offset, pad)."""
    __slots__ = ("first", "mvar", "mext", "tvar", "uncond", "ip", "hdr", "built", "mbase",
                 "tbase", "addrs", "zaddrs", "segs", "after")

    def __init__(self, first, mvar, mext, tvar, uncond, addrs, segs):
        self.first, self.mvar, self.mext, self.tvar, self.uncond = \
            first, mvar, mext, tvar, uncond
        self.addrs = addrs      # the first entry's address and mask bytes (see _walk_range)
        self.zaddrs = bytes(len(addrs))     # (an unconditional entry's: _own_fields)
        self.segs = segs        # ((fixed bytes, their offset in the entry), ...)
        # the template of the entry after this one's last entry, during the walk (dropped
        # after it: _unlink_templates)
        self.after = None
        i = first.ip
        self.ip = (i.iniface, i.outiface, i.iniface_mask, i.outiface_mask, i.proto, i.flags,
                   i.invflags, i.tos, i.pad)
        h = first.hdr
        self.hdr = (h.nfcache, h.target_offset, h.next_offset, h.pad)
        self.built = None       # (token, matches, target) of an entry, set by _build
        self.mbase = None       # the first entry's parsed payloads of mvar (_find_check)
        self.tbase = None       # its parsed ERROR payload (_find_check)


# (address bytes, comefrom/counters struct) of ipt_entry / ip6t_entry
_ADDR_SPLIT = {AF_INET: struct.Struct("=4s4s4s4s"), AF_INET6: struct.Struct("=16s16s16s16s")}
_VOL_READ = {AF_INET: struct.Struct("=IQQ"), AF_INET6: struct.Struct("=I4xQQ")}


class _TRaw:
    """A raw entry read by a template (_walk_range): _Raw's fields in slots (~2x cheaper to
    make than a _Raw: a restore makes 10 000), read as a _Raw."""
    __slots__ = ("off", "hdr", "ip", "matches", "tname", "trev", "tsize", "tpayload", "uncond",
                 "std", "verdict", "mdata", "tdata", "key", "dup", "tpl", "built_norm",
                 "built_raw")

    hdr_fields, ip_fields = _Raw.hdr_fields, _Raw.ip_fields


def _add_template(heads: dict, r, e: bytes, family: int, ipsz: int):
    """Make raw entry r (walked in full, bytes e) the first of a template in `heads`
    ({bytes after the addresses up to comefrom: [(fixed, {fixed bytes: _Template}, (cuts,
    tvar))]}; `fixed` an itemgetter of the bytes a template holds after those, one per way of
    cutting and kind of target field). Returns the template of e's fixed bytes (r's, or one
    made before with those)."""
    cf, cnt, end = _VOLATILE[family]
    a = _ADDR_SPLIT[family].size
    cuts = []                   # (start, end) of the bytes left to each entry, in order
    mvar, mext = [], []
    for k, (nm, rev, payload, pos) in enumerate(r.matches):
        span = _KEY_FIELDS.get((ext.MATCH, nm.split(b"\0", 1)[0], rev))
        if span is None:
            continue
        x = ext.lookup(ext.MATCH, family, uapi.cstr(nm), rev)
        # the payload as the kernel sizes it, shown back as sent (xt_data_to_user: nothing
        # after size): otherwise the template holds the whole payload
        if x is None or x.size < 0 or len(payload) != uapi.XT_ALIGN(x.size) \
                or any(payload[x.usersize or x.size:]):
            continue
        lo, hi = pos + 32 + span[0], pos + 32 + span[1]
        cuts.append((lo, hi))
        mvar.append((k, pos + 32, pos + 32 + len(payload)))
        mext.append(x)
    toff = r.hdr.target_offset
    tvar = 0
    if r.std and r.verdict > 0 and _jump_verdict(e, family) is not None:
        # (as _entry_key masks it: an xt_standard_target of its own size)
        tvar = _JUMP
        cuts.append((toff + 32, toff + 36))
    elif r.tname.split(b"\0", 1)[0] == b"ERROR" and r.trev == 0 \
            and r.tsize == uapi.SIZEOF_XT_ERROR_TARGET \
            and not any(r.tpayload[uapi.XT_FUNCTION_MAXNAMELEN:]):
        tvar = _ERRNAME
        cuts.append((toff + 32, toff + 32 + uapi.XT_FUNCTION_MAXNAMELEN))
    elif r.std and r.verdict < 0 and not mvar:
        if r.uncond:
            tvar = _TERM
        else:
            tvar = _VERDICT
            cuts.append((toff + 32, toff + 36))
    # the fixed bytes: after the addresses, comefrom and the counters skipped, key fields cut
    parts, at = [slice(a, cf)], end
    if cnt > cf + 4:
        parts.append(slice(cf + 4, cnt))     # ip6t_entry's padding
    for lo, hi in cuts:
        parts.append(slice(at, lo))
        at = hi
    parts.append(slice(at, len(e)))
    uncond = toff == uapi.layout(family).entry_size and not any(e[a:ipsz])
    segs = tuple((e[p], p.start) for p in parts if p.stop > p.start)
    t = _Template(r, tuple(mvar), tuple(mext), tvar, uncond, e[:a], segs)
    lays = heads.setdefault(e[a:cf], [])
    # (a jump's and a standard verdict's templates cut the same bytes: the kind tells their
    # templates apart, which would otherwise share one dict, the first one made answering
    # for the entries of both)
    cuts = (tuple(cuts), tvar)
    for fixed, ts, c in lays:
        if c == cuts:
            return ts.setdefault(fixed(e), t)
    # (the bytes after the addresses up to comefrom are the key of `heads`, the same for every
    # template of `lays`: left out, a lookup hashes ~76 bytes less, and a template that cuts
    # nothing is looked up by one bytes object, not a tuple)
    fixed = operator.itemgetter(*parts[1:])
    # a lookup tries the layouts in order and takes the first template whose entries e can
    # be (one at most): a conditional verdict's first, whose templates most entries are
    # (a blocklist's exceptions looked up first in the policy's _TERM layout, which has the
    # ACCEPT template too, cost the mixed shape's cold decode ~1 400 refused lookups)
    if tvar == _VERDICT:
        lays.insert(0, (fixed, {fixed(e): t}, cuts))
    else:
        lays.append((fixed, {fixed(e): t}, cuts))
    return t


def _template_after(heads: dict, prev_t, r, e: bytes, family: int, ipsz: int):
    """The template of raw entry r (bytes e: _add_template), linked as the one that came
    after prev_t (the template of the entry before, or None)."""
    t = _add_template(heads, r, e, family, ipsz)
    if prev_t is not None:
        prev_t.after = t
    return t


def _walk_range(blob: bytes, lay, underflow, valid_hooks, off: int, stop, runs=None) -> list:
    """The walk from offset `off` up to `stop` (None: the blob's end); the runs it read put
    in `runs` (a list, or None)."""
    heads = {}                              # templates of this walk (_add_template)
    try:
        return _walk_entries(blob, lay, underflow, valid_hooks, off, stop, heads, runs)
    finally:
        _unlink_templates(heads)


def _unlink_templates(heads: dict) -> None:
    """Drop the links between the walk's templates (_Template.after): they form cycles (a
    blocklist's template follows itself), which refcounting never frees, and a helper
    freezes what an install leaves without a GC pass first (engine._collect_and_freeze), so
    the templates and their first entries would stay until its next full pass."""
    for lays in heads.values():
        for _fixed, ts, _cuts in lays:
            for t in ts.values():
                t.after = None


def _own_fields(t, e: bytes):
    """(verdict, target payload) of entry bytes e, read by template t (its fixed bytes
    matched), or None where e's own fields fail a check t's first entry passed: a jump's
    verdict must be > 0 (<= 0 is another template's, or fails verdict_ok()), a standard
    verdict < 0 and verdict_ok() on a conditional entry, an unconditional entry's addresses
    all zero, an ERROR target's name NUL-terminated (error_tg_ok(); the full walk then says
    where)."""
    f = t.first
    tv = t.tvar
    # (the kinds in the order the per-entry path meets them most: a shape in no order has
    # mostly port rules (0) and conditional verdicts, a fan-out's jumps and heads go by runs)
    if tv == 0:
        return f.verdict, f.tpayload
    if tv == _VERDICT:
        v = _NEG_VERDICTS.get(e[-8:-4])
        # (the addresses compared as a prefix: a slice and any() per entry cost the mixed
        # shape's 4 000 `-s/-d X -j V` entries more)
        if v is None or t.uncond and e.startswith(t.zaddrs):
            return None             # (unconditional: a _TERM template's)
        return v, f.tpayload
    if tv == _JUMP:
        v = int.from_bytes(e[-8:-4], "little", signed=True)
        return (v, f.tpayload) if v > 0 else None
    if tv == _ERRNAME:
        tp = e[t.hdr[1] + 32:t.hdr[1] + f.tsize]
        return (f.verdict, tp) if b"\0" in tp[:uapi.XT_FUNCTION_MAXNAMELEN] else None
    # _TERM: its addresses all zero
    if not e.startswith(t.addrs):
        return None                 # (conditional: a _VERDICT template's)
    return f.verdict, f.tpayload


# ---- runs (issue #7: a restore's 10 000 entries are long runs of one template) ------------
# A blocklist's entries are one run of one template (its DROPs and ACCEPTs: _VERDICT), a
# fan-out's service chains a cycle of four (ERROR head, rule, DROP, RETURN) and its hub a run
# of jumps. Every entry of such a run is a guess hit (_walk_entries): the templates it goes
# through are fixed by the links (t.after) the walk made, so the entries sit at a fixed
# stride (the cycle's summed next_offset) and the guesses can be checked for many at once:
# the fixed bytes of a chunk of periods compared with one memcmp against the period's fixed
# bytes repeated (the entries' own bytes copied in first by strided slices, C speed), the own
# fields (a jump's verdict > 0, an errorname's NUL) per column, the raws made in one tight
# loop per template. A run takes only whole periods that pass everything the per-entry path
# checks of a guess hit; the entry where it stops is walked by the per-entry path, which
# raises what the kernel would there, at the same offset.
RUN_AFTER = 4       # guess hits in a row before a run is tried (the mixed shape has few)
RUN_FIRST = 64      # periods of a run's first chunk, doubled per chunk up to RUN_MOST (a
                    # blocklist's runs of ~60 in one chunk: ~8 us a chunk)
RUN_MOST = 1024
_RUN_CYCLE = 8      # templates of a cycle at most
_WORDS = {8: "Q", 4: "I", 2: "H", 1: "B"}
_FIXED_TAIL, _JUMP_TAIL, _OWN_TAIL = 0, 1, 2    # _RunPlan.reads: what a row's 5th value is
_VERDICT_TAIL = 3                               # (a standard verdict's 4 bytes)


def _run_cycle(t):
    """The templates the guesses from t go through (t, t.after, ...) if they come back to t
    within _RUN_CYCLE, else None (also where t is None: the template of the guess hits has
    not been followed by one, its next entry read from _ENTRY_CACHE)."""
    if t is None:
        return None
    cyc, a = [t], t.after
    while a is not t:
        if a is None or len(cyc) >= _RUN_CYCLE:
            return None
        cyc.append(a)
        a = a.after
    return cyc


def _same_cycle(t, cyc) -> bool:
    """Whether the templates the guesses from t go through are `cyc` (t first) again: the
    links (t.after) change wherever another template comes between."""
    for c in cyc:
        if t is not c:
            return False
        t = t.after
    return t is cyc[0]


def _relink(cyc) -> list:
    """Link the templates of cycle `cyc` (t.after) as a run read them: each to the next, the
    last to the first (_same_cycle(cyc[0], cyc) after it). Returns the links before, to set
    back (_links_back) where no run is read with these."""
    was = [(a, a.after) for a in cyc]
    for a, b in zip(cyc, cyc[1:]):
        a.after = b
    cyc[-1].after = cyc[0]
    return was


def _links_back(was: list) -> None:
    """The links _relink returned set back: each template's `after` is again the template
    of the entry after its last entry (what the guesses try first)."""
    for a, b in was:
        a.after = b


class _RunPlan:
    """How a run of a cycle of templates is read: `period` (bytes), `fixed` (the period's
    fixed bytes, zero where its entries have their own), `cols` ((width, index) of each word
    of the entries' own bytes, in a view of that width), `reads` ((template, offset in the
    period, struct of one period, kind, addresses struct) per template: the struct reads
    (entry bytes up to comefrom, comefrom, pcnt, bcnt, x, verdict, pad): x is b""
    (_FIXED_TAIL, _JUMP_TAIL, _VERDICT_TAIL) or the bytes after the counters (_OWN_TAIL: key
    fields there) up to a jump's verdict, which is read apart with the 4 bytes after it
    (_JUMP_TAIL, a jump with key fields), b"" where there is none; a _VERDICT template's
    verdict is read as its 4 bytes (_VERDICT_TAIL); the addresses struct reads the entry's
    four addresses (src, dst, smsk, dmsk) as _run_addresses keys them: big-endian ints
    (IPv4), 16 bytes each (IPv6)."""
    __slots__ = ("period", "fixed", "cols", "reads")


def _run_plan(cyc, family: int):
    """The _RunPlan of cycle `cyc`, None where an entry's size is not a multiple of 8 (the
    entry after it is not aligned: the per-entry path refuses it)."""
    cf, cnt, end = _VOLATILE[family]
    gap = f"{cnt - cf - 4}x" if cnt > cf + 4 else ""
    asz = _ADDR_SPLIT[family].size
    order, addrs = _RUN_ADDRS[family]
    if any(t.hdr[2] % 8 for t in cyc):
        return None
    size = sum(t.hdr[2] for t in cyc)
    fixed, own = bytearray(size), bytearray(b"\1") * size
    reads, p = [], 0
    for t in cyc:
        n = t.hdr[2]
        for seg, lo in t.segs:
            fixed[p + lo:p + lo + len(seg)] = seg
            own[p + lo:p + lo + len(seg)] = bytes(len(seg))
        # (x, verdict, pad): a jump's verdict (xt_standard_target's, the entry's last 8 bytes
        # but 4) and the 4 bytes after it read apart from the bytes before them; b"" where
        # not read
        if t.mvar and t.tvar == _JUMP:
            tail, kind = f"{n - end - 8}si4s", _OWN_TAIL
        elif t.mvar or t.tvar == _ERRNAME:
            tail, kind = f"{n - end}s0s0s", _OWN_TAIL
        elif t.tvar == _JUMP:
            tail, kind = f"{n - end - 8}x0si4x0s", _JUMP_TAIL
        elif t.tvar == _VERDICT:
            tail, kind = f"{n - end - 8}x0s4s4x0s", _VERDICT_TAIL
        else:
            tail, kind = f"{n - end}x0s0s0s", _FIXED_TAIL
        reads.append((t, p, struct.Struct(f"={p}x{cf}sI{gap}QQ{tail}{size - p - n}x"), kind,
                      struct.Struct(f"{order}{p}x{addrs}{size - p - asz}x")))
        p += n
    # the own bytes as words as wide as their alignment allows (two 8-byte copies for an
    # ipt_entry's addresses, not sixteen of one byte)
    cols, x = [], 0
    while x < size:
        if not own[x]:
            x += 1
            continue
        for w in _WORDS:
            if x % w == 0 and own.startswith(b"\1" * w, x):
                break
        cols.append((w, x // w))
        x += w
    plan = _RunPlan()
    plan.period, plan.fixed, plan.cols, plan.reads = size, bytes(fixed), tuple(cols), reads
    return plan


def _good_periods(blob: bytes, plan, base: int, k: int) -> int:
    """How many of the k periods at `base` have every template's fixed bytes (the guesses'
    segment compares, for all of them at once)."""
    size = plan.period
    exp = bytearray(plan.fixed) * k
    ev, bv = memoryview(exp), memoryview(blob)[base:base + k * size]
    views = {}
    for w, i in plan.cols:
        v = views.get(w)
        if v is None:
            v = views[w] = (ev.cast(_WORDS[w]), bv.cast(_WORDS[w]), size // w)
        v[0][i::v[2]] = v[1][i::v[2]]
    if blob.startswith(exp, base):
        return k
    lo, hi = 0, k - 1            # lo periods equal, hi at most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blob.startswith(ev[:mid * size], base):
            lo = mid
        else:
            hi = mid - 1
    return lo


# (byte order, format) of an entry's four addresses as a run reads them (_run_plan), as
# _run_addresses looks them up: IPv4 as big-endian ints (_ADDR_INTS), IPv6 as 16 bytes each
_RUN_ADDRS = {AF_INET: (">", "4I"), AF_INET6: ("=", "16s16s16s16s")}
_ADDR_INTS4 = struct.Struct(">4I").unpack_from
_MASKED_VERDICT = b"\xff\xff\xff\x7f"     # a jump's verdict in its _entry_key


def _run_addresses(family: int):
    """(read the four addresses of an entry as _RUN_ADDRS does, look one up, make one) of a
    run's loop."""
    if family == AF_INET:
        return _ADDR_INTS4, _ADDR_INTS.get, _addr4i
    return _ADDR_SPLIT[family].unpack_from, _ADDRESSES.get, _addr6


def _run_raws(t, rows, addrs, off: int, step: int, kind: int, family: int, rep: bool,
              counted: list):
    """The raw entries of template t read from `rows` (_RunPlan.reads' struct, one per
    period) and `addrs` (its addresses struct over the same periods, or None: each entry's
    addresses read from its row where needed); the first at offset `off`, then every `step`
    bytes, as the per-entry path makes a guess hit's; stops before the first whose own fields
    fail (_own_fields). `kind`: what a row's x, verdict, pad are: nothing (_FIXED_TAIL), a
    jump's verdict (_JUMP_TAIL), a standard verdict's bytes (_VERDICT_TAIL), or the bytes
    after the counters, which hold key fields (_OWN_TAIL: a match's ports, an errorname), up
    to a jump's verdict and the 4 bytes after it where it has one. `rep`: the first two rows
    have the same bytes up to comefrom (below: an entry like the one before shares its key
    and IpHeader; not tried otherwise, a blocklist's entries never are). `counted` (a list):
    the offset of each entry read with comefrom or a counter not zero is appended
    (_WalkRun.zero)."""
    cf, cnt, end = _VOLATILE[family]
    f = t.first
    fip, taddrs, tip = f.ip, t.addrs, t.ip
    nfc, toff, nxt, hpad = t.hdr
    ms0, tname, trev, tsize, tp0, std, v0 = \
        f.matches, f.tname, f.trev, f.tsize, f.tpayload, f.std, f.verdict
    ctail = f.key[cf:]          # the key after the entry's first cf bytes: the template's
    gapb = f.key[cf:cf + cnt - cf - 4]      # ip6t_entry's padding after comefrom
    uncond_t, own = t.uncond, kind == _OWN_TAIL
    jump = kind == _JUMP_TAIL or own and t.tvar == _JUMP
    errname = own and t.tvar == _ERRNAME
    # a _VERDICT template's key after the entry's first cf bytes, by verdict: the template's
    # with the verdict's bytes in place (one lookup and one concatenation an entry, as the
    # template's own tail is)
    # (its target payload stays the first entry's, as a jump's does: a standard target is
    # made of the verdict)
    verd = kind == _VERDICT_TAIL
    if verd:
        at = cnt - cf - 4 + nxt - end - 8       # the verdict in the key's tail (ctail below)
        tails = {b: f.key[cf:cf + at] + b + f.key[cf + at + 4:] for b in _NEG_VERDICTS}
        negv = _NEG_VERDICTS.get
    term = t.tvar == _TERM
    mvar = [(k, lo - end, hi - end) for k, lo, hi in t.mvar] if own else ()
    tlo, thi, nlen = toff + 32 - end, toff + tsize - end, uapi.XT_FUNCTION_MAXNAMELEN
    new, (split, addr, mk) = object.__new__, _run_addresses(family)
    # a jump's verdict read by the rows' struct, its key joined from the bytes around it as
    # read: ~0.5 us an entry less than int.from_bytes and four concatenations, ~0.3 us less
    # than the verdict and the bytes around it sliced from x (a fan-out hub's 3 332 jumps
    # with a tcp match: _OWN_TAIL)
    join = b"".join
    # the addresses compared as read (bytes.startswith parses its arguments: ~2x the time),
    # read by a struct over the whole chunk (`addrs`: no unpack call per entry)
    taddrs, zero_a = split(taddrs), split(bytes(len(taddrs)))
    # the previous entry's addresses as read and their objects: a blocklist's entries differ
    # in the source alone (its mask often), a fan-out hub's in the destination; one compare
    # instead of a lookup (a call) for each address like the one before
    ls = ld = lsm = ldm = os_ = od = osm = odm = None
    # (a source or destination not seen before made here, not by a call of mk: the one
    # address of a blocklist's entries, or a fan-out hub's, that is new in each)
    v4, ints, V4 = family == AF_INET, _ADDR_INTS, _IPV4
    # the entry before's bytes up to comefrom, and its key, IpHeader and uncond: an entry
    # with the same bytes there (a fan-out's 3 333 DROP, ACCEPT and RETURN entries each) has
    # the same key object (no copy of ~160 bytes, nor its hash: bytes keep theirs, and an
    # _ENTRY_CACHE lookup of the same object compares no bytes) and shares the IpHeader (as
    # one with the first entry's addresses does: nothing edits a walk's headers). Only where
    # `rep` (never for own key fields but a standard verdict, compared too): a blocklist's
    # run pays no compare
    lhead = lkey = lip = lun = lvx = None
    v, tp, ms = v0, tp0, ms0
    out = []
    put = out.append
    # the header of the entries read with the counters zero: one _shared_hdr for each stretch
    # of them with one comefrom (a restore's: all of them, comefrom 0). A header of each
    # entry's own was made and given seven fields, and the GC passes walk one object less an
    # entry: a cold decode's instructions, blocklist 257.6 -> 239.9 M, fan-out 457.4 -> 428.6 M
    zh, zc = None, -1
    # (one statement per field: a tuple assignment of more than three builds the tuple)
    for (head, c, pc, bc, x, vx, tl), a4 in zip(rows, addrs or itertools.repeat(None)):
        if c or pc or bc:
            counted.append(off)
        if own:
            if jump:
                if vx <= 0:
                    break
                v = vx
                key = join((head, gapb, x, _MASKED_VERDICT, tl))
            else:
                key = head + gapb + x if gapb else head + x
                if errname:
                    tp = x[tlo:thi]
                    if tp.find(0, 0, nlen) < 0:        # no NUL in the errorname
                        break
            if mvar:
                ms = [*ms0]
                for k, lo, hi in mvar:
                    m = ms[k]
                    ms[k] = (m[0], m[1], x[lo:hi], m[3])
        elif verd:
            v = negv(vx)
            if v is None:
                break               # (_own_fields: no hit)
            if rep and head == lhead and vx == lvx:
                key = lkey          # (a user chain's `-s X -j ACCEPT` in each of 3 333)
            else:
                key = head + tails[vx]
                lvx = vx
        else:
            if jump:
                if vx <= 0:
                    break
                v = vx
            if rep and head == lhead:
                key = lkey
            else:
                key = head + ctail
        r = _TRaw()
        if key is lkey:
            r.ip = ip = lip
            r.uncond = lun
        else:
            if a4 is None:
                a4 = split(head)
            if a4 == taddrs:
                r.ip = ip = fip
            elif term:
                break               # (a conditional entry: a _VERDICT template's)
            else:
                ip = r.ip = new(IpHeader)
                s_, d_, sm, dm = a4
                if s_ != ls:
                    ls = s_
                    os_ = addr(s_)
                    if os_ is None:
                        if v4:
                            os_ = ints[s_] = new(V4)
                            os_._ip = s_
                        else:
                            os_ = mk(s_)
                ip.src = os_
                if d_ != ld:
                    ld = d_
                    od = addr(d_)
                    if od is None:
                        if v4:
                            od = ints[d_] = new(V4)
                            od._ip = d_
                        else:
                            od = mk(d_)
                ip.dst = od
                if sm != lsm:
                    lsm = sm
                    osm = addr(sm) or mk(sm)
                ip.smsk = osm
                if dm != ldm:
                    ldm = dm
                    odm = addr(dm) or mk(dm)
                ip.dmsk = odm
                (ip.iniface, ip.outiface, ip.iniface_mask, ip.outiface_mask, ip.proto,
                 ip.flags, ip.invflags, ip.tos, ip.pad) = tip
            r.uncond = un = uncond_t and a4 == zero_a
            if un and verd:
                break               # (unconditional: a _TERM template's)
            if rep:
                lhead = head
                lkey = key
                lip = ip
                lun = un
        if pc or bc:
            h = r.hdr = _CachedHdr()
            h.ip = ip
            h.nfcache = nfc
            h.target_offset = toff
            h.next_offset = nxt
            h.pad = hpad
            h.comefrom = c
            h.pcnt = pc
            h.bcnt = bc
        else:
            if c != zc:
                zc = c
                zh = _shared_hdr(nfc, toff, nxt, hpad, c)
            r.hdr = zh
        r.off = off
        r.matches = ms
        r.tname = tname
        r.trev = trev
        r.tsize = tsize
        r.tpayload = tp
        r.std = std
        r.verdict = v
        r.key = key
        r.tpl = t
        r.mdata = r.tdata = r.dup = r.built_norm = r.built_raw = None
        put(r)
        off += step
    return out


def _read_periods(blob: bytes, plan, base: int, k: int, family: int, counted: list) -> list:
    """The raw entries of the first k periods at `base` (their fixed bytes checked), in blob
    order, up to the first period with an entry whose own fields fail. The offsets of the
    entries read with comefrom or counters not zero appended to `counted` (some may be
    after the last period returned)."""
    size = plan.period
    chunk = memoryview(blob)[base:base + k * size]
    cols = []
    cf = _VOLATILE[family][0]
    for t, p, st, kind, ast in plan.reads:
        # (whether the template's first two entries here are alike up to comefrom: own key
        # fields after the counters never share, _run_raws)
        rep = k > 1 and kind != _OWN_TAIL and \
            blob[base + p:base + p + cf] == blob[base + p + size:base + p + size + cf]
        # (the addresses read by a struct where each entry's are read: where the first two
        # are alike up to comefrom, most entries share the one before's; _run_raws)
        col = _run_raws(t, st.iter_unpack(chunk), None if rep else ast.iter_unpack(chunk),
                        base + p, size, kind, family, rep, counted)
        k = min(k, len(col))
        cols.append(col)
    if len(cols) == 1:
        return cols[0][:k]
    return list(itertools.chain.from_iterable(zip(*[c[:k] for c in cols])))


def _walk_run(blob: bytes, t, off: int, limit: int, plans: dict, family: int):
    """The run of guess hits from offset `off` (template t guessed there) up to `limit`:
    (raws, the cycle's templates), or None where there is no cycle from t or no period of
    it at `off`."""
    cyc = _run_cycle(t)
    if cyc is None or off % 8:
        return None
    key = tuple(cyc)
    plan = plans.get(key, False)
    if plan is False:
        plan = plans[key] = _run_plan(cyc, family)
    if plan is None:
        return None
    size, k, out, counted = plan.period, RUN_FIRST, [], []
    while True:
        kk = min(k, (limit - off) // size)
        if kk <= 0:
            break
        g = _good_periods(blob, plan, off, kk)
        got = _read_periods(blob, plan, off, g, family, counted) if g else []
        out += got
        off += len(got) // len(cyc) * size
        if len(got) < kk * len(cyc):
            break
        k = min(2 * k, RUN_MOST)
    # (entries read past the run's last period are not its own)
    return (out, cyc, not any(o < off for o in counted)) if out else None


class _WalkRun:
    """A run the walk read (_walk_run): its entries are raws[lo:hi] of the walk's list, whole
    periods of the cycle of templates `cyc` (entry lo + j * len(cyc) + q read by cyc[q]), the
    first at offset `base`; `zero`: every entry has comefrom and the counters zero. What the
    decode derives from each entry of a template is the template's first entry's but for the
    entry's own fields (addresses, key fields, comefrom and the counters), so _Memo._scan and
    _volatile_zero read a run per template, not per entry (a blocklist's 10 000 entries are
    some 80 runs, a fan-out's 16 000 two)."""
    __slots__ = ("lo", "hi", "cyc", "base", "zero")

    def __init__(self, lo: int, hi: int, cyc, base: int, zero: bool):
        self.lo, self.hi, self.cyc, self.base, self.zero = lo, hi, cyc, base, zero


def _run_underflows(got, uflows, valid_hooks, underflow) -> None:
    """check_underflow() on the entries of a run (in blob order) that are underflows, in
    offset order: the first that fails is where the per-entry walk would have failed."""
    lo, hi = got[0].off, got[-1].off
    for u in sorted(uflows):
        if lo <= u <= hi:
            r = got[_first_at_or_after(got, u)]
            if r.off == u:
                _underflow_check(r, u, valid_hooks, underflow)


def _walk_entries(blob: bytes, lay, underflow, valid_hooks, off: int, stop, heads,
                  runs=None) -> list:
    """_walk_range's walk, the templates it makes put in `heads`, the runs it reads in
    `runs` (a list: _WalkRun, indexes into the list returned; or None)."""
    size, hsz, out = len(blob), lay.entry_size, []
    cache, family = _ENTRY_CACHE, lay.family
    # the offsets check_underflow() looks at (the valid hooks' underflows)
    uflows = {underflow[h] for h in range(NF_INET_NUMHOOKS) if valid_hooks & (1 << h)}
    nf = _VOLATILE[family][0] - 2           # next_offset sits right before comefrom
    ipsz = nf - 6                           # ipt_ip / ip6t_ip6: before nfcache, offsets
    uncond_ip = bytes(ipsz)
    seen = {}                               # key -> the first raw entry with it, this walk
    # templates made and entries read by one: made no longer when few entries repeat one
    # (a table of distinct rules would pay for each template and use none)
    made = hits = 0
    cf, cnt, end = _VOLATILE[family]
    asz = _ADDR_SPLIT[family].size
    split, vol = _ADDR_SPLIT[family].unpack_from, _VOL_READ[family].unpack_from
    zero_a, gap = bytes(asz), cnt > cf + 4
    new, addr = object.__new__, _ADDRESSES.get
    mk = _addr4 if family == AF_INET else _addr6
    if len(_ADDRESSES) >= ENTRY_CACHE_MAX:
        _ADDRESSES.clear()
    if len(_ADDR_INTS) >= ENTRY_CACHE_MAX:
        _ADDR_INTS.clear()
    u16 = _U16.unpack_from
    last = None                             # the template of the entry before, if any
    guess = True                            # whether to try last.after first
    # guess hits in a row, and how many a run is tried after (doubled after a try that
    # read nothing: a shape whose guesses hit in short streaks tries few)
    streak, need = 0, RUN_AFTER
    plans = {}                              # _RunPlan by cycle of templates, this walk
    # {template a run was read from: its cycle then}, where the last run tried from it read
    # something: an entry whose next template is one of them, with the same cycle again, tries
    # the run at once. An entry of another template breaks a run (a udp ACCEPT among a
    # blocklist's DROPs), and the DROPs after it took 7 entries of the per-entry path each
    # time (relinking, then RUN_AFTER guess hits)
    ran = {}
    limit = size if stop is None else min(size, stop)
    while off < size and (stop is None or off < stop):
        # check_entry_size_and_hooks(): alignment, header inside, next_offset inside
        if off % 8:
            _err(errno.EINVAL, off, "entry not aligned to __alignof__(struct ipt_entry)")
        if off + hsz >= size:
            _err(errno.EINVAL, off, "entry header reaches the end of the table")
        nxt = u16(blob, off + nf)[0]
        if off + nxt <= size:
            e = blob[off:off + nxt]
            # the template that followed the previous entry's last time (a blocklist's
            # entries are one or two templates, a fan-out's service chains a cycle of four):
            # its fixed bytes compared in place, without the slices and hashes of the lookup
            # in `heads` (0.5-0.8 us an entry). The entry's length is the template's:
            # next_offset is in the first fixed bytes. Not tried after a wrong guess until
            # the lookup finds what it would have guessed: the mixed shape's templates come in
            # no order, and a guess tried for each of its entries cost 3 ms
            t = last.after if guess and last is not None else None
            vt = None
            if t is not None:
                for seg, lo in t.segs:
                    if not e.startswith(seg, lo):
                        break
                else:
                    vt = _own_fields(t, e)
                if vt is None:
                    t, guess = None, False
                else:
                    streak += 1
            if t is None:
                streak = 0
            lays = heads.get(e[asz:cf]) if t is None else None
            if lays is not None:
                for fixed, ts, _c in lays:
                    t = ts.get(fixed(e))
                    if t is not None:
                        vt = _own_fields(t, e)
                        if vt is not None:
                            break
                        t = None
                if last is not None and t is not None:
                    if last.after is t:
                        guess = True            # the guess would have been right
                    else:
                        last.after = t
            if t is not None:
                # the template's entry with its own key fields: every other check passed on
                # its first entry (or, offset-dependent, runs here)
                hits += 1
                f, tv = t.first, t.tvar
                v, tp = vt
                r = _TRaw()
                h = r.hdr = _CachedHdr()
                h.nfcache, h.target_offset, h.next_offset, h.pad = t.hdr
                h.comefrom, h.pcnt, h.bcnt = vol(e, cf)
                a_ = e[:asz]
                if a_ == t.addrs:
                    # the first entry's ipt_ip, bytes for bytes: its IpHeader, shared (as a
                    # dup's is: nothing edits a walk's headers; a decode that hands out
                    # rules to edit copies them). A fan-out's 6 666 RETURN and DROP entries
                    # and 3 333 ERROR heads have all-zero addresses
                    r.ip = h.ip = f.ip
                else:
                    # IpHeader's fields set one by one, in its field order (a key-sharing
                    # dict, as its __init__ makes, ~3x faster than either)
                    ip = r.ip = h.ip = new(IpHeader)
                    s_, d_, sm, dm = split(a_)
                    ip.src = addr(s_) or mk(s_)
                    ip.dst = addr(d_) or mk(d_)
                    ip.smsk = addr(sm) or mk(sm)
                    ip.dmsk = addr(dm) or mk(dm)
                    (ip.iniface, ip.outiface, ip.iniface_mask, ip.outiface_mask, ip.proto,
                     ip.flags, ip.invflags, ip.tos, ip.pad) = t.ip
                ms = f.matches
                if t.mvar:
                    ms = list(ms)
                    for k, lo, hi in t.mvar:
                        m = ms[k]
                        ms[k] = (m[0], m[1], e[lo:hi], m[3])
                if tv == _JUMP:
                    key = e[:cf] + (e[cf + 4:cnt] if gap else b"") + e[end:-8] + \
                        b"\xff\xff\xff\x7f" + e[-4:]
                else:
                    key = e[:cf] + e[cf + 4:cnt] + e[end:] if gap else e[:cf] + e[end:]
                r.off, r.matches, r.tname, r.trev, r.tsize, r.tpayload = \
                    off, ms, f.tname, f.trev, f.tsize, tp
                r.uncond, r.std, r.verdict, r.key, r.tpl = \
                    t.uncond and a_ == zero_a, f.std, v, key, t
                r.mdata = r.tdata = r.dup = r.built_norm = r.built_raw = None
                if off in uflows:
                    _underflow_check(r, off, valid_hooks, underflow)
                out.append(r)
                off += nxt
                last = t
                nt = t.after
                back = ran.get(nt) if nt is not None else None
                was = None
                if back is not None and not _same_cycle(nt, back):
                    # the guesses go on into a run read before whose links the entry that
                    # broke it changed (a udp ACCEPT among DROPs relinked DROP.after to
                    # itself): the links as that run read them, and the run at once (the
                    # links set back where it reads nothing). The DROPs after each ACCEPT
                    # took the per-entry path until a wrong guess relinked them
                    was = _relink(back)
                if streak >= need or back is not None:
                    # the guesses have hit a few times in a row, or go on into a run read
                    # before: the run they are in, at once (the run reads only what the
                    # guesses would, so where it starts changes nothing but the time)
                    early, streak = streak < need, 0
                    run = _walk_run(blob, nt, off, limit, plans, family)
                    if run is not None:
                        need = RUN_AFTER
                        if len(run[0]) > len(run[1]):
                            ran[nt] = run[1]
                        else:
                            # one period: the template ends no run here; remembered, every
                            # entry going into it would try that run again at once (a
                            # blocklist's DROP and ACCEPT template is also each user chain's
                            # `-s X -j ACCEPT`, in a cycle of its own there)
                            ran.pop(nt, None)
                    else:
                        ran.pop(nt, None)
                        if was is not None:
                            _links_back(was)
                        if not early:
                            need *= 2
                    if run is not None:
                        got, cyc, zero = run
                        _run_underflows(got, uflows, valid_hooks, underflow)
                        if runs is not None:
                            runs.append(_WalkRun(len(out), len(out) + len(got), cyc,
                                                 got[0].off, zero))
                        out += got
                        hits += len(got)
                        off, last = got[-1].off + got[-1].hdr.next_offset, cyc[-1]
                continue
            key = _entry_key(e, family)
            c = cache.get(key)
        else:
            e = key = c = None
        # (an entry read from the cache or a dup: the next one is looked up in `heads`; one
        # walked in full links to its template below)
        prev_t, last = last, None
        if c is not None:
            # every check of the entry's own bytes passed when it was cached
            v = c.verdict if c.verdict <= 0 else _jump_verdict(e, family)
            h = _cached_hdr(c, blob, off, family)
            r = _Raw(off, h, h.ip, c.matches, c.tname, c.trev, c.tsize, c.tpayload, c.uncond,
                     c.std, v, c.mdata, c.tdata, key)
            if TEMPLATES and (made < 64 or hits * 4 >= made):
                # a cached entry starts a template as one walked in full does: without one,
                # each later entry like it is looked up in the cache too, never guessed nor
                # read in a run (the same rules restored in a second namespace, or again
                # after a flush: the walk and _make_rules took 2-5x a first restore's)
                last = _template_after(heads, prev_t, r, e, family, ipsz)
                made += 1
            if off in uflows:
                _underflow_check(r, off, valid_hooks, underflow)
            out.append(r)
            off += nxt
            continue
        d = seen.get(key) if key is not None else None
        if d is not None:
            # the same bytes as an entry before it in this blob (a fan-out table's 3 333
            # RETURN entries): every check of its own bytes is that entry's, which passed
            # the walk's and runs _find_check's first (r.dup), in entry order as the kernel
            v = d.verdict if d.verdict <= 0 else _jump_verdict(e, family)
            h = _with_volatile(d.hdr, e, family)
            r = _Raw(off, h, h.ip, d.matches, d.tname, d.trev, d.tsize, d.tpayload, d.uncond,
                     d.std, v, None, None, key, d)
            if off in uflows:
                _underflow_check(r, off, valid_hooks, underflow)
            out.append(r)
            off += nxt
            continue
        hdr = _Hdr(blob, off, lay.family)
        nxt, toff = hdr.next_offset, hdr.target_offset
        if off + nxt > size:
            _err(errno.EINVAL, off, f"next_offset {nxt} runs past the table end ({size})")
        if nxt < hsz + 32:
            _err(errno.EINVAL, off, f"next_offset {nxt} < entry + xt_entry_target")
        ipc = hdr.ip
        if ipc.flags & ~lay.f_mask:       # ip_checkentry()/ip6_checkentry()
            _err(errno.EINVAL, off, f"ip flags 0x{ipc.flags:x} outside the flag mask")
        if ipc.invflags & ~lay.inv_mask:
            _err(errno.EINVAL, off, f"ip invflags 0x{ipc.invflags:x} outside the inverse mask")
        # xt_check_entry_offsets()
        if toff < hsz:
            _err(errno.EINVAL, off, f"target_offset {toff} inside the entry header")
        if toff + 32 > nxt:
            _err(errno.EINVAL, off, f"target_offset {toff} + xt_entry_target > next_offset {nxt}")
        tsize, tname_raw, trev = uapi.XT_EXT_HDR_FAST.unpack_from(e, toff)
        if tsize < 32:
            _err(errno.EINVAL, off, f"target_size {tsize} < sizeof(xt_entry_target)")
        if toff + tsize > nxt:
            _err(errno.EINVAL, off, f"target_size {tsize} runs past next_offset {nxt}")
        tname = tname_raw.split(b"\0", 1)[0]
        verdict = 0
        if tname == b"":
            if uapi.XT_ALIGN(toff + 36) != nxt:
                _err(errno.EINVAL, off, f"standard target: next_offset {nxt} != "
                     f"XT_ALIGN(target_offset + sizeof(xt_standard_target))")
            verdict = int.from_bytes(e[toff + 32:toff + 36], "little", signed=True)
            if not _verdict_ok(verdict):
                _err(errno.EINVAL, off, f"standard target: bad verdict {verdict}")
        elif tname == b"ERROR":
            en = e[toff + 32:toff + 62]
            if tsize != uapi.SIZEOF_XT_ERROR_TARGET or b"\0" not in en:
                # error_tg_ok(): usersize == sizeof(struct xt_error_target), name terminated
                _err(errno.EINVAL, off, "ERROR target: bad size or unterminated errorname")
        # xt_check_entry_match(): matches tile [hdr, target_offset) exactly, 8-aligned
        matches, pos, length = [], hsz, toff - hsz
        while length > 0:
            if pos % 8:
                _err(errno.EINVAL, off, f"match at +{pos} not aligned")
            if length < 32:
                _err(errno.EINVAL, off, f"match at +{pos}: {length} bytes left < xt_entry_match")
            msize, mname, mrev = uapi.XT_EXT_HDR_FAST.unpack_from(e, pos)
            if msize < 32:
                _err(errno.EINVAL, off, f"match at +{pos}: match_size {msize} < 32")
            if msize > length:
                _err(errno.EINVAL, off, f"match at +{pos}: match_size {msize} past target")
            matches.append((mname, mrev, e[pos + 32:pos + msize], pos))
            length -= msize
            pos += msize
        # unconditional(): memcmp of the entry's ipt_ip with an all-zero one
        uncond = toff == hsz and e[:ipsz] == uncond_ip
        # (_Raw's __init__: a key-sharing dict, read again by every later pass and decode)
        r = _Raw(off, hdr, ipc, matches, tname_raw, trev, tsize, e[toff + 32:toff + tsize],
                 uncond, tname == b"", verdict, None, None, key)
        seen[key] = r
        if TEMPLATES and (made < 64 or hits * 4 >= made):
            last = _template_after(heads, prev_t, r, e, family, ipsz)
            made += 1
        # hooks and underflows on this entry
        if off in uflows:
            _underflow_check(r, off, valid_hooks, underflow)
        out.append(r)
        off += nxt
    return out


def _volatile_zero(raws, runs=(), at: int = 0) -> bool:
    """Whether every raw entry's header has comefrom and the counters zero (what
    iptables-restore sends). `runs`: the walk's runs (_WalkRun, indexes from raws[at]; their
    headers not changed since the walk read them), whose entries the walk read these of
    (_run_raws); the entries outside them one by one."""
    lo = 0
    for run in runs:
        if not run.zero or not _volatile_zero_of(raws[lo:at + run.lo]):
            return False
        lo = at + run.hi
    return _volatile_zero_of(raws[lo:] if lo else raws)


def _volatile_zero_of(raws) -> bool:
    """_volatile_zero of each entry's header. (A loop, not any() of a generator: ~2x
    faster.)"""
    for r in raws:
        h = r.hdr
        if h.comefrom or h.pcnt or h.bcnt:
            return False
    return True


def _kept_blob(blob: bytes, raws, comefrom: list, family: int, cand=None,
               splice=None, zeroed=None, runs=(), at: int = 0, later=None) -> bytes:
    """The entries as the kernel keeps them after SET_REPLACE (what GET_ENTRIES shows, counters
    zero): the caller's bytes with comefrom set by mark_source_chains and the counters zeroed
    (ip_tables.c translate_table copies the rest as given). Only the entries whose comefrom or
    counters differ are patched: libiptc sends back what GET_ENTRIES showed, so after the first
    change that is the few new entries (and those with traffic), not all 10 000. `cand`: the
    indexes of the only entries that may differ (the caller knows the others match).
    `splice` (_reusable, a restore over the previous table): the runs of entries at the start
    and end equal to the previous kept ones but for comefrom are copied from those (where
    their comefrom is the same: the others are in cand), and every entry in cand is written.
    `zeroed`: the indexes (a range) of the entries sent with comefrom and the counters zero
    (_volatile_zero: a restore), or None. `runs`, `at`: the walk's runs (_WalkRun, indexes
    from raws[at]); `later`: where given, what the raws' headers are set to match is handed
    to it (a callable, _defer) where nothing else reads them first (_kept_zeroed)."""
    if splice is not None:
        return _kept_spliced(blob, raws, comefrom, family, cand, splice, zeroed)
    cf, cnt, _ = _VOLATILE[family]
    if zeroed is not None and len(zeroed) == len(raws):
        # every entry sent with comefrom and the counters zero (a restore of other rules over
        # the table: its policies, the only entries reused, were sent so too): each entry's
        # comefrom is written, whichever might differ (~3 ms of a 10 000-entry restore less)
        cand = None
    if cand is None:
        if sys.byteorder == "little" and zeroed is not None and len(zeroed) == len(raws):
            return _kept_zeroed(blob, raws, comefrom, cf, runs, at, later)
        if sys.byteorder == "little" and _no_counts(raws):
            return _kept_comefrom(blob, raws, comefrom, cf)
        todo = [(r, c) for r, c in zip(raws, comefrom)
                if (h := r.hdr).comefrom != c or h.pcnt or h.bcnt]
    else:
        todo = [(raws[i], comefrom[i]) for i in sorted(cand)
                if raws[i].hdr.comefrom != comefrom[i] or raws[i].hdr.pcnt or raws[i].hdr.bcnt]
    if not todo:
        return blob
    if len(todo) <= _PATCH_JOIN_MAX:
        return _kept_joined(blob, todo, cf, cnt)
    bio, out = _writable_copy(blob)
    # ip6t_entry has 4 padding bytes between comefrom and the counters: kept as given
    u64x2 = _U64X2.pack_into
    # comefrom written as one native u32 array where the entries are 8-aligned (the walk
    # checked) and the machine is little-endian: a restore patches every entry
    words = out[:len(out) & ~3].cast("I") if sys.byteorder == "little" else None
    u32 = _U32.pack_into
    memo = {}
    for r, c in todo:
        if words is not None:
            words[(r.off + cf) >> 2] = c
        else:
            u32(out, r.off + cf, c)
        h = r.hdr
        if h.pcnt or h.bcnt:
            u64x2(out, r.off + cnt, 0, 0)
        # the raw describes the patched bytes now (in place where the header is its own)
        _kept_hdr(r, c, memo)
    if words is not None:
        words.release()
    return _bytes_written(bio, out)


def _writable_copy(data: bytes):
    """(the holder of a copy of `data`, a writable memoryview of that copy): bytes to patch in
    place, which _bytes_written then hands out as the bytes object itself, copied once (a
    bytearray patched and then bytes() of it copied the blob twice: ~2.7 MB for 10 000 rules,
    ~680 fresh pages each where the heap has no room). The copy is a bytes object of
    heap.new_bytes, its block of a size class (the next table's copy, a few entries longer,
    fits the hole this one leaves), written through a view while nobody else holds it. Where
    that is not possible (heap.can_write) or the blob is small: an io.BytesIO of `data`, which
    shares it until written; getbuffer() copies it once, and once no view is left getvalue()
    returns that buffer uncopied (CPython's copy-on-write BytesIO; elsewhere a copy)."""
    from . import heap
    if len(data) >= heap.CLASS_MIN and heap.can_write():
        out = heap.new_bytes(len(data))
        view = heap.writable_view(out)
        view[:] = data
        return out, view
    bio = io.BytesIO(data)
    return bio, bio.getbuffer()


def _bytes_written(holder, view) -> bytes:
    """The bytes of _writable_copy's (holder, view), every view cast from `view` released."""
    view.release()
    return holder if type(holder) is bytes else holder.getvalue()


_U32, _U64X2, _U16 = struct.Struct("<I"), struct.Struct("<QQ"), struct.Struct("<H")

# up to this many entries to patch, _kept_blob joins the kept bytes from the caller's (one
# allocation) instead of patching a bytearray copy of them and copying that into bytes (two)
_PATCH_JOIN_MAX = 64
_NO_COUNTS = bytes(16)


def _kept_joined(blob: bytes, todo: list, cf: int, cnt: int) -> bytes:
    """_kept_blob's few patches (an append: the new rule, the entries libiptc built anew,
    those that counted) in one copy of blob: the kept blob of a 10 000-rule table is ~2.7 MB,
    and each copy of it that the heap has no free room for is ~680 fresh pages faulted in
    (~2 ms measured). A big blob is copied into a block of its size class (_writable_copy: the
    next append's copy fits the hole this one leaves, where an exact-sized block two hundred
    bytes short of it fit nothing) and patched there; a small one, or where no such copy can
    be made, is one bytes.join of blob's runs between the patches. `todo`: (raw, comefrom) in
    blob order; each raw's header is set to describe the kept bytes (comefrom as given,
    counters zero)."""
    from . import heap
    if len(blob) >= heap.CLASS_MIN and heap.can_write():
        out, view = _writable_copy(blob)
        u32, u64x2 = _U32.pack_into, _U64X2.pack_into     # as _kept_blob's own writes
        for r, c in todo:
            h = r.hdr
            u32(view, r.off + cf, c)
            if h.pcnt or h.bcnt:
                # ip6t_entry's padding between comefrom and the counters kept as given
                u64x2(view, r.off + cnt, 0, 0)
            _kept_hdr(r, c)
        return _bytes_written(out, view)
    view = memoryview(blob)
    parts, pos = [], 0
    pack = _U32.pack            # as _kept_blob's own writes
    for r, c in todo:
        h = r.hdr
        parts += (view[pos:r.off + cf], pack(c))
        pos = r.off + cf + 4
        if h.pcnt or h.bcnt:
            # ip6t_entry's padding between comefrom and the counters kept as given
            parts += (view[pos:r.off + cnt], _NO_COUNTS)
            pos = r.off + cnt + 16
        _kept_hdr(r, c)
    parts.append(view[pos:])
    return b"".join(parts)


def _no_counts(raws) -> bool:
    """Whether no raw entry's header counted a packet (pcnt and bcnt zero)."""
    for r in raws:
        h = r.hdr
        if h.pcnt or h.bcnt:
            return False
    return True


def _kept_zeroed(blob: bytes, raws, comefrom: list, cf: int, runs=(), at: int = 0,
                 later=None) -> bytes:
    """_kept_comefrom where every entry was sent with comefrom 0 (a restore): only the
    entries a hook reaches (comefrom not 0) are written, and their headers set to match.
    `runs` (_WalkRun, indexes from raws[at]): the entries of a run that are one template's
    of the cycle (every len(cyc)-th, a period's bytes apart) and have one comefrom (a
    blocklist's 10 000 DROPs, a fan-out's service chains' rules) are written as one strided
    slice. `later` (a callable): the headers are set by the work handed to it (only the next
    decode reads them: _LAST_WALK), not here."""
    if not any(comefrom):
        return blob
    bio, out = _writable_copy(blob)
    words = out[:len(out) & ~3].cast("I")
    lo = 0
    for run in runs:
        a, b = at + run.lo, at + run.hi
        _zeroed_words(words, raws, comefrom, cf, lo, a)
        _zeroed_run_words(words, raws, comefrom, cf, run, a, b)
        lo = b
    _zeroed_words(words, raws, comefrom, cf, lo, len(raws))
    words.release()
    if later is not None:
        later(functools.partial(_kept_headers, raws, comefrom))
    else:
        _kept_headers(raws, comefrom)
    return _bytes_written(bio, out)


def _zeroed_words(words, raws, comefrom: list, cf: int, lo: int, hi: int) -> None:
    """_kept_zeroed's comefrom words of raws[lo:hi], one by one (those not 0)."""
    if hi <= lo:
        return
    cs = comefrom[lo:hi]
    # (those entries and their values picked in C: compress, filter)
    for r, c in zip(itertools.compress(raws[lo:hi], cs), filter(None, cs)):
        words[(r.off + cf) >> 2] = c


def _zeroed_run_words(words, raws, comefrom: list, cf: int, run, a: int, b: int) -> None:
    """_kept_zeroed's comefrom words of the run raws[a:b] (whole periods of run.cyc, the
    first at run.base): per template of the cycle, one strided slice where its entries have
    one comefrom (their offsets a period apart: checked at both ends), else one by one."""
    p = len(run.cyc)
    k = (b - a) // p
    if k < 2 or k * p != b - a:
        _zeroed_words(words, raws, comefrom, cf, a, b)
        return
    period = 0
    for t in run.cyc:
        period += t.hdr[2]              # next_offset
    off = run.base
    for q, t in enumerate(run.cyc):
        cs = comefrom[a + q:b:p]
        c = cs[0]
        if raws[a + q].off != off or raws[b - p + q].off != off + (k - 1) * period or \
                period % 4 or cs.count(c) != k:
            _zeroed_each(words, raws, comefrom, cf, a + q, b, p)
        elif c:
            w = (off + cf) >> 2
            words[w:w + k * (period >> 2):period >> 2] = array.array("I", (c,)) * k
        off += t.hdr[2]


def _zeroed_each(words, raws, comefrom: list, cf: int, lo: int, hi: int, step: int) -> None:
    """_kept_zeroed's comefrom words of raws[lo:hi:step] one by one (those not 0)."""
    for j in range(lo, hi, step):
        if comefrom[j]:
            words[(raws[j].off + cf) >> 2] = comefrom[j]


def _kept_headers(raws, comefrom: list) -> None:
    """Each raw's header set to the comefrom the kept blob has (sent 0: those not 0; the
    counters are zero). A shared header (_shared_hdr) is replaced, by one header for each
    that comefrom, shared again: the last one made is tried first (a blocklist's run of one
    template), then `memo` (a fan-out's cycle of four)."""
    memo = {}
    lh = lc = ln = None
    for r, c in zip(itertools.compress(raws, comefrom), filter(None, comefrom)):
        h = r.hdr
        if h.ip is not None:
            h.comefrom = c
        elif h is lh and c == lc:
            r.hdr = ln
        else:
            _kept_hdr(r, c, memo)
            lh, lc, ln = h, c, r.hdr


def _kept_comefrom(blob: bytes, raws, comefrom: list, cf: int) -> bytes:
    """_kept_blob where no entry counted a packet (a restore: every comefrom differs): one
    pass, comefrom written as native u32 words (the entries are 8-aligned), each raw's header
    set to match."""
    bio = out = words = None
    memo = {}
    for r, c in zip(raws, comefrom):
        h = r.hdr
        if h.comefrom != c:
            if words is None:
                bio, out = _writable_copy(blob)
                words = out[:len(out) & ~3].cast("I")
            words[(r.off + cf) >> 2] = c
            _kept_hdr(r, c, memo)
    if words is None:
        return blob
    words.release()
    return _bytes_written(bio, out)


def _kept_spliced(blob: bytes, raws, comefrom: list, family: int, cand, splice,
                  zeroed=None) -> bytes:
    """_kept_blob of a restore over the previous table: its kept bytes for the runs at the
    start (up to splice["head"]'s offset) and the end (from splice["tail"]'s), blob's in
    between, then comefrom and zero counters written into every entry of cand (their headers
    set to match; the spliced entries' headers describe the kept bytes already). `zeroed`:
    the indexes (a range) of the entries walked anew (blob's bytes, between the spliced runs;
    each of them in cand) when sent with comefrom and the counters zero: there only a comefrom
    other than 0 is written."""
    kept = splice["kept"]
    _nh, h_end = splice["head"]
    _nt, t_old, t_new = splice["tail"]
    between = splice.get("between", ())
    if not cand and not any(between) and h_end == len(blob) == len(kept):
        return kept                     # the same table again
    cf, cnt, _ = _VOLATILE[family]
    t_new = max(t_new, h_end)
    t_old = t_new - len(blob) + len(kept)
    # blob's bytes copied once, where they are handed out (_writable_copy), the spliced runs'
    # kept bytes over them: a bytearray of the parts, then bytes() of it, copied the blob
    # twice or three times (a first restore over the helper's small table: ~2.7 MB each for
    # a fan-out of 16 000 entries). The kept blob is as long as blob: the runs are the same
    # entries, moved by nothing but their comefrom
    holder, out = _writable_copy(blob)
    out[:h_end] = memoryview(kept)[:h_end]
    out[t_new:] = memoryview(kept)[t_old:]
    u64x2, u32 = _U64X2.pack_into, _U32.pack_into
    memo = {}                   # (_kept_hdr)
    # the entries between the spliced runs (not in cand: as in the previous kept blob but for
    # comefrom and a jump's offset): comefrom only, their counters zero already; one native
    # u32 array where the machine is little-endian (the entries are 8-aligned)
    words = out[:len(out) & ~3].cast("I") if sys.byteorder == "little" else None
    for rng in between:
        for i in rng:
            if i in cand:
                continue
            r, c = raws[i], comefrom[i]
            if words is not None:
                words[(r.off + cf) >> 2] = c
            else:
                u32(out, r.off + cf, c)
            h = r.hdr
            if h.ip is not None:        # (_kept_hdr's own header, without the call)
                h.comefrom = c
            else:
                _kept_hdr(r, c, memo)
    todo = cand
    if zeroed is not None and words is not None:
        # (a restore over the previous table: most of cand; each entry its own bytes; their
        # counters and comefrom are 0 in out already). Read in entry order, the raws and
        # comefrom as slices: looked up one by one in the set's order, the raws were read
        # all over the heap (a fan-out restore's 16 000 entries: 8 ms, now 3)
        lo, hi = zeroed.start, zeroed.stop
        for r, c in zip(raws[lo:hi], comefrom[lo:hi]):
            if c:
                words[(r.off + cf) >> 2] = c
                h = r.hdr
                if h.ip is not None:    # (_kept_hdr's own header, without the call)
                    h.comefrom = c
                else:
                    _kept_hdr(r, c, memo)
        # the rest of cand (every entry of zeroed is in cand: walked anew); none when cand
        # is zeroed itself
        todo = [i for i in cand if not lo <= i < hi] if len(cand) > len(zeroed) else ()
    if words is not None:
        words.release()
    for i in sorted(todo):
        r, c = raws[i], comefrom[i]
        u32(out, r.off + cf, c)
        u64x2(out, r.off + cnt, 0, 0)
        _kept_hdr(r, c, memo)
    return _bytes_written(holder, out)


def _verdict_ok(v: int) -> bool:
    """x_tables.c verdict_ok()."""
    if v > 0:
        return True
    if v < 0:
        return v == XT_RETURN or -v - 1 in (NF_ACCEPT, NF_DROP, NF_QUEUE)
    return False


# {a standard verdict's bytes: the verdict} of the verdicts < 0 verdict_ok() takes (DROP,
# ACCEPT, QUEUE, RETURN): what a _VERDICT template's entry may have (one lookup reads and
# checks it)
_NEG_VERDICTS = {v.to_bytes(4, "little", signed=True): v for v in VERDICT_NAMES}


def _payload_data(e, payload: bytes, decoded, to_user: bool):
    """(data, raw) of one extension payload; `decoded` is what _find_check() already parsed.
    With to_user, the payload as xt_data_to_user() shows it (zeros after usersize)."""
    if e is None:
        return payload, payload
    if to_user and e.size >= 0 and len(payload) == uapi.XT_ALIGN(e.size) and \
            any(payload[e.usersize or e.size:]):
        # xt_data_to_user() zeroes what follows usersize (or size): only nonzero bytes there
        # change what is shown (e.to_user)
        shown = e.to_user(payload)
        if shown != payload:
            return e.decode(shown), shown
    return (decoded if decoded is not None else e.decode(payload)), payload


def _check_table_hooks(raws, hook_entry, underflow, valid_hooks, offs=None):
    """xt_check_table_hooks() on what check_entry_size_and_hooks() found; `offs` holds every
    entry's offset (a dict {offset: index} does)."""
    if offs is None:
        offs = {r.off for r in raws}
    max_e = max_u = 0
    first = True
    for h in range(NF_INET_NUMHOOKS):
        if not valid_hooks & (1 << h):
            continue
        if hook_entry[h] not in offs:
            _err(errno.EINVAL, None, f"hook {HOOK_NAMES[h]} entry {hook_entry[h]} is on no entry")
        if underflow[h] not in offs:
            _err(errno.EINVAL, None, f"hook {HOOK_NAMES[h]} underflow {underflow[h]} is on no entry")
        if not first:
            if max_u >= underflow[h]:
                _err(errno.EINVAL, None, f"unsorted or duplicate underflow at hook {h}")
            if max_e >= hook_entry[h]:
                _err(errno.EINVAL, None, f"unsorted or duplicate entry at hook {h}")
        max_e, max_u, first = hook_entry[h], underflow[h], False


def _mark_source_chains(raws, size, hook_entry, valid_hooks, idx=None) -> list:
    """ip_tables.c mark_source_chains(), step for step: returns each entry's comefrom (hook
    bitmask) or raises ELOOP for a loop, a jump onto no entry or a fall off the table end.
    `idx`: {offset: entry index}, made here when not given."""
    if idx is None:
        idx = {r.off: i for i, r in enumerate(raws)}
    n = len(raws)
    comefrom, pcnt = [0] * n, [0] * n
    LOOPBIT = 1 << NF_INET_NUMHOOKS
    budget = 1000 * (n + 10)   # the kernel terminates; this only bounds a bug of ours

    def eloop(off, why):
        _err(errno.ELOOP, off, why)

    for hook in range(NF_INET_NUMHOOKS):
        if not valid_hooks & (1 << hook):
            continue
        pos = hook_entry[hook]
        i = idx[pos]
        pcnt[i] = pos
        while True:
            budget -= 1
            if budget < 0:
                eloop(pos, "chain walk does not terminate")
            r = raws[i]
            visited = comefrom[i] & (1 << hook)
            if comefrom[i] & LOOPBIT:
                eloop(pos, f"loop reached from hook {HOOK_NAMES[hook]}")
            comefrom[i] |= (1 << hook) | LOOPBIT
            if (r.uncond and r.std and r.verdict < 0) or visited:
                while True:        # return: backtrack through the last big jump
                    comefrom[i] ^= LOOPBIT
                    oldpos = pos
                    pos = pcnt[i]
                    pcnt[i] = 0
                    if pos == oldpos:
                        break
                    i = idx[pos]
                    if oldpos != pos + raws[i].hdr.next_offset:
                        break
                if pos == oldpos:
                    break          # back at the hook's first entry: next hook
                step = raws[i].hdr.next_offset
                if pos + step >= size:
                    eloop(pos, "falls off the end of the table")
                i = idx[pos + step]
                pcnt[i] = pos
                pos += step
            else:
                if r.std and r.verdict >= 0:
                    newpos = r.verdict
                    if newpos not in idx:     # xt_find_jump_offset()
                        eloop(pos, f"jump to {newpos}, which is not an entry")
                else:
                    newpos = pos + r.hdr.next_offset
                    if newpos >= size:
                        eloop(pos, "falls off the end of the table")
                i = idx[newpos]
                pcnt[i] = pos
                pos = newpos
    return comefrom


class _At:
    """{offset: entry index} of a walk's entries, read from their offsets (sorted): a lookup
    bisects them. The dict itself (dict()) is made only for the walks that look up every
    jump's landing (_mark_fast, _mark_source_chains): an append that moves 16 000 entries
    looks up a few (hooks, underflows) and checks the jumps' landings by their offsets."""
    __slots__ = ("offs", "_d")

    def __init__(self, offs):
        self.offs, self._d = offs, None

    def get(self, off, default=None):
        offs = self.offs
        i = _bisect_left(offs, off)
        return i if i < len(offs) and offs[i] == off else default

    def __getitem__(self, off):
        i = self.get(off)
        if i is None:
            raise KeyError(off)
        return i

    def __contains__(self, off) -> bool:
        return self.get(off) is not None

    def dict(self) -> dict:
        if self._d is None:
            self._d = dict(zip(self.offs, range(len(self.offs))))
        return self._d


class _ShiftedInts:
    """A list of ints as the list `src` (never changed once made) with each from place t on
    moved by d: what a decode derives of the entries an append moves whole (a fan-out's
    16 000 entries behind INPUT: their offsets, the indexes of the jumps, chain heads and
    returns among them, model._Memo), and a walk's span starts and ends behind the change
    (compile._moved_program_key, _walk_behind), kept as that move instead of as new ints
    each table (the next move adds to d, the next table's src is the lists joined in C).
    Reads as a list of the ints (made once, when iterated); an int or a slice read alone
    (bisect, the few entries a decode places) is not made into the list."""
    __slots__ = ("src", "t", "d", "_all")

    def __init__(self, src: list, t: int, d: int):
        self.src, self.t, self.d, self._all = src, t, d, None

    def ints(self) -> list:
        if self._all is None:
            t, d = self.t, self.d
            self._all = self.src[:t] + [x + d for x in self.src[t:]]
        return self._all

    def __len__(self) -> int:
        return len(self.src)

    def __iter__(self):
        return iter(self.ints())

    def __getitem__(self, k):
        if isinstance(k, slice):
            if self._all is not None or k.step not in (None, 1):
                return self.ints()[k]
            a, b, _ = k.indices(len(self.src))
            src, t, d = self.src, self.t, self.d
            if b <= t:
                return src[a:b]
            return src[a:t] + [x + d for x in src[max(a, t):b]] if a < t else \
                [x + d for x in src[a:b]]
        if k < 0:
            k += len(self.src)
        return self.src[k] + self.d if k >= self.t else self.src[k]

    def __eq__(self, other):
        try:
            return self.ints() == list(other)
        except TypeError:
            return NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"_ShiftedInts({self.ints()!r})"


def _bisect_left(seq, x) -> int:
    """bisect.bisect_left(seq, x) of a sorted list or _ShiftedInts: a sorted one's src is
    sorted on each side of t (its ints from t on are src's moved by d), so two bisections of
    src in C instead of one calling __getitem__ per step."""
    if type(seq) is _ShiftedInts:
        src, t = seq.src, seq.t
        i = bisect.bisect_left(src, x, 0, t)
        return i if i < t else bisect.bisect_left(src, x - seq.d, t)
    return bisect.bisect_left(seq, x)


# lists of at least this many ints a decode or a walk keeps moved (_ShiftedInts)
SHIFTED_FROM = 64


def _spliced_ints(p, head: int, mid: list, tail: int, d: int):
    """p[:head] + mid + [x + d for x in p[tail:]], p a list or a _ShiftedInts: a _ShiftedInts
    made of p's src in C where p's moved part starts between head and tail (or p is a list)
    and the tail is long, else a list."""
    if type(p) is _ShiftedInts and head <= p.t <= tail and len(p.src) - tail >= SHIFTED_FROM:
        src = p.src
        return _ShiftedInts(src[:head] + mid + src[tail:], head + len(mid), p.d + d)
    # (slices of a _ShiftedInts make only their ints)
    if len(p) - tail >= SHIFTED_FROM and d:
        return _ShiftedInts(p[:head] + mid + p[tail:], head + len(mid), d)
    out = p[:head] + mid
    out += p[tail:] if d == 0 else [x + d for x in p[tail:]]
    return out


def _values_at(seq, ks) -> list:
    """[seq[k] for k in ks], seq a list or a _ShiftedInts (one list comprehension either way)."""
    if type(seq) is _ShiftedInts:
        src, t, d = seq.src, seq.t, seq.d
        return [src[k] + d if k >= t else src[k] for k in ks]
    return [seq[k] for k in ks]


def _verdicts_of(raws, jumps) -> list:
    """[raws[j].verdict for j in jumps], jumps a list or a _ShiftedInts."""
    if type(jumps) is _ShiftedInts:
        src, t, d = jumps.src, jumps.t, jumps.d
        return [raws[j].verdict for j in src[:t]] + [raws[j + d].verdict for j in src[t:]]
    return [raws[j].verdict for j in jumps]


def _ends_of(offs, size: int):
    """Each entry's end (the next one's offset, the blob's size for the last) from offs."""
    if type(offs) is _ShiftedInts and offs.t >= 1:
        return _ShiftedInts(offs.src[1:] + [size - offs.d], offs.t - 1, offs.d)
    return offs[1:] + [size]


class _Memo:
    """What a decode derives from its whole list of raw entries, made from the previous
    decode's (`prev`, its _Memo) for the entries reused from it (raws[:nhead], raws[-ntail:]):
    offs (each entry's offset), at ({offset: index}), kinds (sorted indexes of the jumps, of
    the ERROR entries and of the unconditional standard verdicts), tnames/mnames (how many
    entries name each target / match), comefrom (set by a normalized decode). `runs`: the
    walk's runs of the new entries (_WalkRun, indexes from raws[nhead]), read per template."""

    def __init__(self, raws, nhead, ntail, size, prev, p_raws=None, runs=()):
        n = len(raws)
        first = n - ntail
        self.size, self.comefrom = size, None
        # the kept blob with comefrom zeroed, once made (_zeroed)
        self.zeroed = None
        # set by the decode: every entry's comefrom as mark_source_chains() found it, each
        # jump's landing (entry index, in the order of kinds[0]) and each hook's first entry
        # (-1: not a valid hook), for _mark_again
        self.marks = self.lands = self.hooks = None
        # each jump's landing (as lands) however the comefrom values were found
        self.landed = None
        if prev is None or p_raws is None or not (nhead or ntail):
            if nhead:
                runs = ()           # (their indexes are from raws[nhead])
            nhead = ntail = 0
            first = n
            prev = None
        shift = (len(p_raws) - n) if prev is not None else 0
        mid = raws[nhead:first]
        # names: the previous counts, less the entries that went, plus the new ones (_scan)
        if prev is not None:
            tn, mn = dict(prev.tnames), dict(prev.mnames)
            self._count(tn, mn, p_raws[nhead:len(p_raws) - ntail], -1)
        else:
            tn, mn = {}, {}
        kinds = ([], [], [])
        offs = self._scan(mid, nhead, kinds, tn, mn, runs)
        if prev is not None:
            # the entries before the change as they were, the new ones, those behind it
            # moved: as _ShiftedInts where many moved (an append ahead of a fan-out moves
            # 16 000 offsets and 10 000 kinds' indexes: one C join of the lists, no new ints)
            offs = _spliced_ints(prev.offs, nhead, offs, first + shift if ntail else
                                 len(prev.offs), size - prev.size if ntail else 0)
            kinds = tuple(
                _spliced_ints(p, _bisect_left(p, nhead), lst,
                              _bisect_left(p, first + shift) if ntail else len(p), -shift)
                for lst, p in zip(kinds, prev.kinds))
        self.offs = offs
        self.at = _At(offs)
        self.kinds = kinds
        self.tnames, self.mnames = tn, mn

    @staticmethod
    def _scan(mid, first: int, kinds, tn: dict, mn: dict, runs=()) -> list:
        """The offsets of the raw entries `mid` (indexes from `first` on), their indexes
        appended to kinds (jumps, ERROR entries, unconditional standard verdicts) and their
        target and match names counted into tn, mn: one pass over the entries, not three (a
        restore's 10 000-16 000); the entries of the walk's `runs` (indexes into mid) per
        template (_scan_run), the others one by one (_scan_entries)."""
        offs, is_error, at = [], {}, 0
        for run in runs:
            if run.lo > at:
                _Memo._scan_entries(mid[at:run.lo], first + at, offs, kinds, tn, mn, is_error)
            _Memo._scan_run(mid, run, first, offs, kinds, tn, mn)
            at = run.hi
        _Memo._scan_entries(mid[at:] if at else mid, first + at, offs, kinds, tn, mn,
                            is_error)
        return offs

    @staticmethod
    def _scan_run(mid, run, first: int, offs: list, kinds, tn: dict, mn: dict) -> None:
        """_scan_entries of the entries of a run (mid[run.lo:run.hi]): each entry's target
        name, match names, std and the sign of its verdict are its template's first entry's
        (_run_raws: a jump's own verdict is > 0, as the first's, a _VERDICT entry's < 0), and
        so is whether it is an unconditional standard verdict: a _TERM template's entries
        all are, no other template's entry is (_add_template, _own_fields). Work per
        template, the lists made in C."""
        lo, hi, cyc = run.lo, run.hi, run.cyc
        n = len(cyc)
        k = (hi - lo) // n
        # template q's entries sit every period from its offset in the first period
        size = sum(t.hdr[2] for t in cyc)
        p, firsts = run.base, []
        for t in cyc:
            firsts.append(p)
            p += t.hdr[2]
        offs += _interleaved([range(o, o + k * size, size) for o in firsts])
        jq, eq, tq = [], [], []        # the templates (index in cyc) of each kind
        for q, t in enumerate(cyc):
            f = t.first
            tname = f.tname
            tn[tname] = tn.get(tname, 0) + k
            for m in f.matches:
                mn[m[0]] = mn.get(m[0], 0) + k
            if f.std:
                if f.verdict >= 0:
                    jq.append(q)
                elif t.tvar == _TERM:
                    tq.append(q)
            elif tname.split(b"\0", 1)[0] == b"ERROR":
                eq.append(q)
        jumps, errs, terms = kinds
        # template q's entries: every n-th from lo + q (a range: no index made one by one)
        at = first + lo
        jumps += _interleaved([range(at + q, first + hi, n) for q in jq])
        errs += _interleaved([range(at + q, first + hi, n) for q in eq])
        terms += _interleaved([range(at + q, first + hi, n) for q in tq])

    @staticmethod
    def _scan_entries(mid, first: int, offs: list, kinds, tn: dict, mn: dict,
                      is_error: dict) -> None:
        """_scan of entries `mid` (indexes from `first` on) one by one, whether a target
        name is ERROR found once per name (`is_error`)."""
        jumps, errs, terms = kinds
        put, jump, err, term = offs.append, jumps.append, errs.append, terms.append
        tget, mget = tn.get, mn.get
        for i, r in enumerate(mid, first):
            put(r.off)
            tname = r.tname
            tn[tname] = tget(tname, 0) + 1
            ms = r.matches
            if ms:
                for m in ms:
                    mn[m[0]] = mget(m[0], 0) + 1
            if r.std:
                if r.verdict >= 0:
                    jump(i)
                elif r.uncond:
                    term(i)
            else:
                e = is_error.get(tname)
                if e is None:
                    e = is_error[tname] = tname.split(b"\0", 1)[0] == b"ERROR"
                if e:
                    err(i)

    @staticmethod
    def _count(tn, mn, raws, d):
        for name, k in collections.Counter(map(_TNAME, raws)).items():
            tn[name] = tn.get(name, 0) + d * k
        for ms in map(_MATCHES, raws):
            for m in ms:
                mn[m[0]] = mn.get(m[0], 0) + d


_TNAME, _MATCHES = operator.attrgetter("tname"), operator.attrgetter("matches")


def _interleaved(ranges: list):
    """The ints of equally long ranges with the same step, whose starts lie within one step
    and ascend, in ascending order (a run's entries of some of its templates)."""
    if len(ranges) == 1:
        return ranges[0]
    return itertools.chain.from_iterable(zip(*ranges))


# {id(table): (weakref to it, weakref to the table it moved from, nhead, p_first, shift, delta)}
# of the last few decode_replace tables that are the previous one's entries with plain rules
# changed in one place (moved_from). Kept here, not on the Table: a copy.deepcopy of the table,
# edited, must not carry it.
_MOVED: dict = {}


def _note_moved(table, p_table, raws, nhead: int, ntail: int, size: int, memo, p_memo,
                p_raws) -> None:
    """Remember that `table` is p_table with the entries between its first nhead and last
    ntail replaced, when _mark_again found the walk unchanged (no jump or return among the
    changed entries, every hook entry and jump landing where it did, moved) and, checked
    here, no ERROR entry among them (the same chains, with the same names) and every
    underflow on the entry it was on, moved: then every chain that holds no changed entry is
    the previous table's chain, its entries moved together by (-shift, delta)."""
    if p_table is None or p_memo is None or getattr(p_memo, "uflows", None) is None:
        return
    # (a hook starting at the changed entries, as the first append to an empty built-in chain
    # makes it: the changed chain has no head entry before them; see moved_from)
    n, m = len(raws), len(p_raws)
    first, p_first = n - ntail, m - ntail
    shift = m - n
    errs, p_errs = memo.kinds[1], p_memo.kinds[1]
    before = raws[nhead - 1]
    if _is_return(before) and before.verdict == XT_RETURN and \
            bisect.bisect_left(errs, first) < len(errs) and \
            errs[bisect.bisect_left(errs, first)] == first:
        # entries changed between a user chain's last entry, its RETURN, and the next chain's
        # head (never where iptables adds a rule): that chain would end in them (Table._build
        # takes a user chain's last entry as its RETURN only if it is one)
        return
    if bisect.bisect_left(errs, nhead) != bisect.bisect_left(errs, first) or \
            bisect.bisect_left(p_errs, nhead) != bisect.bisect_left(p_errs, p_first):
        return
    moved = tuple(-1 if k == -1 else k if k < nhead else k - shift for k in p_memo.uflows)
    if moved != memo.uflows or any(nhead <= k < p_first for k in p_memo.uflows):
        return
    for k in [k for k, v in _MOVED.items() if v[0]() is None]:
        del _MOVED[k]
    _MOVED[id(table)] = (weakref.ref(table), weakref.ref(p_table), nhead, p_first, shift,
                         size - p_memo.size)


def moved_from(table):
    """(previous table, nhead, p_first, shift, delta) when decode_replace found `table` to be
    the previous decode_replace table with only plain rules (no jumps, returns or chain heads)
    changed between its entries nhead and p_first (new entries from there on are the previous
    table's from p_first on, index - shift, offset + delta), every jump, hook entry and
    underflow landing where it did; else None. Only while both tables are alive.
    The changed entries are in the chains whose entries [nhead, p_first) meets in the previous
    table or, when entries were only inserted (nhead == p_first), maybe in the chain starting
    at nhead: a built-in chain's rules put before its first entry (its hook entry stays at
    nhead; an append to an empty built-in chain, the first after a restore of a fan-out on
    FORWARD) have no head entry before them."""
    got = _MOVED.get(id(table))
    if got is None or got[0]() is not table:
        return None
    prev = got[1]()
    return None if prev is None else (prev,) + got[2:]


def _free_with_table(prev) -> None:
    """Let what is left of the previous walk (`prev`, as _LAST_WALK held it: its raws list,
    its memo's lists, its rules list; the entries reused went into this walk) go when the
    table that walk made does, instead of here: ~1 ms of deallocation of a fan-out append
    inside the request, after it for a helper (engine.after_reply frees the replaced table
    once the caller has its answer). Kept by a finalizer, not on the table itself: a
    copy.deepcopy of the table (with_counters) must not copy it. Without that table (not a
    shared decode, or gone already) it goes now."""
    if prev is None or prev[3] is None:
        return
    p_table = prev[3][2]()
    if p_table is not None:
        weakref.finalize(p_table, _nothing, prev)


def _nothing(*_) -> None:
    """A finalizer's callback: what it keeps goes with it."""


def _is_return(r) -> bool:
    """An unconditional standard verdict (RETURN, a policy, an unconditional ACCEPT/DROP):
    where mark_source_chains()'s walk turns back."""
    return r.std and r.verdict < 0 and r.uncond


def _mark_again(raws, nhead: int, ntail: int, hook_entry, valid_hooks, memo, p_memo, p_raws,
                blob: bytes = None, old: bytes = None, family: int = None):
    """mark_source_chains() of a table that differs from the previous one (p_memo, p_raws,
    whose walk gave p_memo.marks) only in entries its walk passes straight through: the
    comefrom values of the previous table moved with their entries, or None when that does
    not hold (then _mark_fast walks the whole table).

    It holds when the entries that changed (the previous table's raws between its first nhead
    and last ntail, and this table's) are neither jumps nor returns (_is_return) nor where a
    walk starts (a hook entry, a jump's landing), and every hook entry and every jump lands on
    the entry it landed on before, moved. Then the kernel's walk (ip_tables.c
    mark_source_chains) takes the same steps over the entries that stayed (its choices depend
    on an entry's kind and landing only), so they keep their comefrom, its errors are the
    previous table's (none), and the entries put in the place of the changed ones are reached
    exactly when the entry before them is and is not a return: they take its comefrom (a walk
    reaching that entry goes on to the next, after the jump's walk for a jump), else 0.
    Work: per jump (a list comparison), not per entry; `blob`, `old` (the previous walk's
    bytes) and `family`, where given, let a hub's jumps be compared as one block
    (_hub_lands_moved)."""
    if p_memo is None or p_memo.marks is None or p_memo.lands is None:
        return None
    n, m = len(raws), len(p_raws)
    if not (ntail or nhead == n == m):      # (nhead == n == m: the same table again)
        return None
    first, p_first = n - ntail, m - ntail
    shift = m - n
    # a jump or a return among the changed entries: the memos list both kinds (the jumps:
    # standard verdicts >= 0; the returns: unconditional standard verdicts < 0), so a
    # bisection each, not a look at every new entry (a restore's 10 000)
    if _any_between(memo.kinds[0], nhead, first) or _any_between(memo.kinds[2], nhead, first):
        return None
    if _any_between(p_memo.kinds[0], nhead, p_first) or \
            _any_between(p_memo.kinds[2], nhead, p_first):
        return None
    at, jumps = memo.at, memo.kinds[0]
    p_lands = p_memo.lands
    if len(jumps) != len(p_lands):
        return None
    hooks = tuple(at.get(hook_entry[h]) if valid_hooks & (1 << h) else -1
                  for h in range(NF_INET_NUMHOOKS))
    # a hook may start at the changed entries when it did before (an append to an empty
    # built-in chain: its walk starts at the new rule and goes on to its policy entry)
    fill = 0
    for h, k, pk in zip(range(NF_INET_NUMHOOKS), hooks, p_memo.hooks):
        if k is None:
            return None
        if k == pk == nhead:
            fill |= 1 << h
        elif k != (pk if pk < nhead else pk - shift) or nhead <= k < first:
            return None
    if not set(range(nhead, p_first)).isdisjoint(p_lands) if p_first - nhead < 64 else \
            any(nhead <= k < p_first for k in p_lands):
        return None                  # a jump landed on an entry that changed
    # each jump names the offset of the entry it landed on, moved (offsets are unique): the
    # jumps of a hub behind the change compared as one block, the others one by one
    lands = [k if k < nhead else k - shift for k in p_lands]
    k = _hub_lands_moved(raws, jumps, p_memo, p_lands, memo.offs, nhead, first, p_first,
                         blob, old, family)
    if k == len(jumps):
        if _values_at(memo.offs, lands) != _verdicts_of(raws, jumps):
            return None
    elif _values_at(memo.offs, lands[:k]) != [raws[j].verdict for j in jumps[:k]]:
        return None
    memo.lands, memo.hooks = lands, hooks
    p_cf = p_memo.marks
    if nhead and not _is_return(raws[nhead - 1]):
        fill |= p_cf[nhead - 1]
    return p_cf[:nhead] + [fill] * (first - nhead) + p_cf[p_first:]


def _any_between(seq, lo: int, hi: int) -> bool:
    """Whether the sorted ints `seq` (a list or _ShiftedInts) hold one in [lo, hi)."""
    i = _bisect_left(seq, lo)
    return i < len(seq) and seq[i] < hi


# the words' sign bits and ones of a block of int32 verdicts read as one little-endian int
# (_verdicts_moved), by block length
_SIGNS: dict = {}


def _verdicts_moved(old: bytes, po: int, blob: bytes, pn: int, size: int, n: int, d: int) -> bool:
    """Whether the n int32 verdicts at stride `size` from offset pn of blob are those from po
    of old plus d, all of them jump offsets (>= 0). Each side's words are copied out by one
    strided slice and read as one little-endian int, so the check is a few big-int operations
    in C, not n: with every word below 2**31 (no sign bit) and |d| < 2**31, adding d to each
    word carries into no other, so the sums are equal exactly when every word is."""
    step = size >> 2
    wo = memoryview(old)[:len(old) & ~3].cast("i")
    wn = memoryview(blob)[:len(blob) & ~3].cast("i")
    qo, qn = po >> 2, pn >> 2
    xo = int.from_bytes(wo[qo:qo + (n - 1) * step + 1:step].tobytes(), "little")
    xn = int.from_bytes(wn[qn:qn + (n - 1) * step + 1:step].tobytes(), "little")
    wo.release()
    wn.release()
    got = _SIGNS.get(n)
    if got is None:
        if len(_SIGNS) > 64:
            _SIGNS.clear()
        got = _SIGNS[n] = (int.from_bytes(b"\0\0\0\x80" * n, "little"),
                           int.from_bytes(b"\1\0\0\0" * n, "little"))
    signs, ones = got
    if (xo | xn) & signs or not -(1 << 31) < d < 1 << 31:
        return False
    return xn == xo + d * ones if d >= 0 else xo == xn - d * ones


def _hub_lands_moved(raws, jumps, p_memo, p_lands, offs, nhead: int, first: int,
                     p_first: int, blob: bytes, old: bytes, family: int) -> int:
    """_mark_again's check that each jump names the offset of the entry it lands on
    (offs[lands[i]]), for a block at the end of the jumps: consecutive entries of one size
    and target_offset in both tables (a kube-proxy hub: 3 333 jumps), all landing before the
    change (where offsets stayed) or all behind it (moved by the size change d). Jump i of
    the previous table named the offset of its landing (p_lands[i]: each decode checked it,
    or found the landing by that offset), so jump i names its landing now exactly when its
    verdict is the previous one plus 0 or d: one block compare of the two blobs' verdict
    words (_verdicts_moved; a raw entry's verdict is its entry's word). Returns k: jumps[k:]
    checked here; len(jumps) when no block was (they are then compared one by one)."""
    n = len(jumps)
    if blob is None or old is None or family is None or sys.byteorder != "little":
        return n
    k = _consecutive_in(jumps, 0, n)
    cnt = n - k
    p_jumps = p_memo.kinds[0]
    if cnt < _UNIFORM_MIN or len(p_jumps) != n or p_jumps[n - 1] - p_jumps[k] != cnt - 1:
        return n
    pl = p_lands[k:]
    try:
        if min(pl) >= p_first:
            d = len(blob) - len(old)
        elif max(pl) < nhead:
            d = 0
        else:
            return n
    except TypeError:           # (None: a landing onto no entry; min compares it, in C)
        return n
    j0, pj0 = jumps[k], p_jumps[k]
    h = raws[j0].hdr
    size, tgt = h.next_offset, h.target_offset
    cf = _VOLATILE[family][0]
    o0, n0 = p_memo.offs[pj0], offs[j0]
    if not (_strided_entries(old, o0, size, tgt, cnt, cf) and
            _strided_entries(blob, n0, size, tgt, cnt, cf)):
        return n
    return k if _verdicts_moved(old, o0 + tgt + 32, blob, n0 + tgt + 32, size, cnt, d) else n


def _walk_kind(r) -> int:
    """What mark_source_chains() does at an entry: 1 turn back (_is_return), 2 jump (a
    standard verdict >= 0), 0 go on to the next entry."""
    if r.std:
        if r.verdict >= 0:
            return 2
        if r.uncond:
            return 1
    return 0


def _mark_same_kinds(raws, nhead: int, ntail: int, hook_entry, valid_hooks, memo, p_memo,
                     p_raws):
    """mark_source_chains() of a table with as many entries as the previous one (p_memo,
    p_raws), each changed entry (between nhead and the last ntail) of the kind the previous
    one there was (_walk_kind), every hook entry and every jump landing on the entry of the
    index it landed on before: the previous comefrom values, else None. The kernel's walk
    chooses its step at an entry by its kind and landing only (entry sizes move offsets, not
    indexes), so it takes the same steps, and finds no error (the previous walk found none).
    A restore with one verdict changed (a chain's final DROP made ACCEPT: a return either
    way) is such a table; _mark_again refuses it (a return changed)."""
    if p_memo is None or p_memo.marks is None or p_memo.landed is None:
        return None
    n = len(raws)
    first = n - ntail
    if len(p_raws) != n or first < nhead:
        return None
    for r, p in zip(raws[nhead:first], p_raws[nhead:first]):
        if _walk_kind(r) != _walk_kind(p):
            return None
    at, jumps = memo.at, memo.kinds[0]
    hooks = tuple(at.get(hook_entry[h]) if valid_hooks & (1 << h) else -1
                  for h in range(NF_INET_NUMHOOKS))
    if hooks != p_memo.hooks:
        return None
    lands = p_memo.landed
    if len(lands) != len(jumps):
        return None
    if None in lands:
        get = at.dict().get
        if list(map(get, _verdicts_of(raws, jumps))) != lands:
            return None
    else:
        if _values_at(memo.offs, lands) != _verdicts_of(raws, jumps):
            return None
    lands = list(lands)
    # (lands only where _mark_fast's table shape held before: what _mark_again relies on)
    memo.lands = lands if p_memo.lands is not None else None
    memo.landed, memo.hooks = lands, hooks
    return list(p_memo.marks)


def _mark_fast(raws, hook_entry, valid_hooks, at, memo):
    """mark_source_chains() on whole chains, for the tables iptables writes; None where the
    table is not such a table (then _mark_source_chains walks it entry by entry).

    The kernel's walk (ip_tables.c mark_source_chains) from an entry falls through every entry
    that is neither a jump nor an unconditional standard verdict (a "return": RETURN, a policy,
    an unconditional DROP/ACCEPT/QUEUE), follows a jump and comes back after it once the
    walk there returns. Call the entries where a walk starts (hook entries, jump landings)
    starts; from start s the walk covers s up to the first return at or after it, t(s). When
    every jump lands on an entry and no [s, t(s)] holds another start (iptables: each chain
    ends with a return, jumps land on chains' first rules), these ranges are disjoint, so:
    an entry is reached from hook h exactly when its range is, the range's entries are marked
    on the way (a range is walked at most once per hook: its start is then "visited", a later
    jump there returns at once), and the entries carrying the kernel's loop bit (1 <<
    NF_INET_NUMHOOKS) are those from the start of each range on the walk's stack to its
    current jump, so a jump finds the loop bit set exactly when it lands on the start of a
    range on the stack: ELOOP there, at the same entry and in the same order (jumps in entry
    order, hooks in hook order) as the kernel. Work: per range and per jump, not per entry.
    `at`: the entries' _At (or an {offset: index} dict)."""
    # (as lists: _start_ranges reads them an index at a time)
    jumps, errs, terms = (x.ints() if type(x) is _ShiftedInts else x for x in memo.kinds)
    hooks = [h for h in range(NF_INET_NUMHOOKS) if valid_hooks & (1 << h)]
    if type(at) is _At:
        lands = _landings(at.offs, [raws[j].verdict for j in jumps], errs)
    else:
        get = at.get
        lands = [get(raws[j].verdict) for j in jumps]
    if None in lands:
        return None                  # onto no entry: the entry walk says where it fails
    memo.lands = lands
    target = dict(zip(jumps, lands))
    starts = sorted({at[hook_entry[h]] for h in hooks} | set(target.values()))
    end, span = _start_ranges(starts, terms, jumps)
    if end is None:
        return None
    mask = dict.fromkeys(starts, 0)
    for h in hooks:
        bit = 1 << h
        s0 = at[hook_entry[h]]
        mask[s0] |= bit
        on = {s0}
        lo, hi = span[s0]
        stack = [(s0, iter(jumps[lo:hi]))]
        while stack:
            st, it = stack[-1]
            # the jumps of the range on top, up to one into a range with jumps of its own
            # (pushed: walked before the rest of this one's, as the kernel walks)
            for j in it:
                k = target[j]
                if k in on:
                    _err(errno.ELOOP, raws[k].off, f"loop reached from hook {HOOK_NAMES[h]}")
                if mask[k] & bit:
                    continue         # visited from this hook: returns at once
                mask[k] |= bit
                lo, hi = span[k]
                if lo == hi:
                    continue         # no jump in its range: walked, back at once (a leaf)
                on.add(k)
                stack.append((k, iter(jumps[lo:hi])))
                break
            else:
                stack.pop()
                on.discard(st)
    comefrom = [0] * len(raws)
    for st in starts:
        m = mask[st]
        if m:
            t = end[st] + 1
            comefrom[st:t] = [m] * (t - st)
    return comefrom


def _indexes_in(offs, values: list) -> list:
    """The index of each of `values` in the sorted offsets `offs` (a list or _ShiftedInts),
    None where it is none of them: a bisection in C each. _mark_fast looks up the landing of
    every jump (a fan-out's 3 334): at.dict() of all the entries (16 672) took longer than
    these lookups, and no other step of a decode that _mark_fast marks reads it."""
    if type(offs) is _ShiftedInts:
        offs = offs.ints()
    bl, n = bisect.bisect_left, len(offs)
    return [i if (i := bl(offs, v)) < n and offs[i] == v else None for v in values]


def _landings(offs, values: list, errs: list) -> list:
    """_indexes_in(offs, values) for the verdicts of jumps, `errs` the indexes of the ERROR
    entries (ascending): a jump iptables writes lands on a user chain's first entry, the one
    after the chain's ERROR head, so those entries' offsets are looked up in a dict of them
    (one per chain: a fan-out's 3 333, ~2x faster than a bisection per jump), any other
    value bisected."""
    if type(offs) is _ShiftedInts:
        offs = offs.ints()
    n = len(offs)
    idx = [e + 1 for e in errs]
    if idx and idx[-1] >= n:
        idx.pop()               # (an ERROR entry last: the table's end, no entry after it)
    if len(idx) < 2:
        return _indexes_in(offs, values)
    get = dict(zip(operator.itemgetter(*idx)(offs), idx)).get
    got = [get(v) for v in values]
    if None in got:
        bl = bisect.bisect_left
        for k, v in enumerate(got):
            if v is None:
                i = bl(offs, values[k])
                got[k] = i if i < n and offs[i] == values[k] else None
    return got


def _start_ranges(starts: list, terms: list, jumps: list):
    """For _mark_fast: ({start: its first return at or after it}, {start: (lo, hi)}: the
    indexes into `jumps` of the jumps in [start, return)), or (None, None) where a start has
    no return before the end or before the next start. All three lists ascend and the ranges
    they give are disjoint, so one merge of them (each pointer only moves on) finds every
    range: ~3x faster than three bisections per start (a fan-out's 3 334 starts)."""
    end, span = {}, {}
    nt, nj = len(terms), len(jumps)
    p = q = 0
    last = -1                        # the range before's return
    for st in starts:
        if last >= st:
            return None, None        # no return before this start (the kernel's walk differs)
        while p < nt and terms[p] < st:
            p += 1
        if p == nt:
            return None, None        # no return before the end
        last = end[st] = terms[p]
        while q < nj and jumps[q] < st:
            q += 1
        lo = q
        while q < nj and jumps[q] < last:
            q += 1
        span[st] = (lo, q)
    return end, span


# extension payloads parsed by their construct codec (~50 us each): a table's targets have a
# handful of distinct payloads (ACCEPT, DROP, ...), matches repeat less. Keyed by the extension
# and the bytes, so equal payloads share one parsed value, as equal entries do (_ENTRY_CACHE).
_PAYLOADS: dict = {}


def _decoded_payload(e, payload: bytes):
    key = (id(e), payload)
    got = _PAYLOADS.get(key)
    if got is None or got[0] is not e:
        if len(_PAYLOADS) >= ENTRY_CACHE_MAX:
            _PAYLOADS.clear()
        got = _PAYLOADS[key] = (e, _parse_payload(e, payload))
    return got[1]


# faster parsers for the codecs (_FlatParser, else construct's compiled parser: Struct.compile(),
# generated Python, ~3x faster than the interpreted parse); a codec's fast parser is trusted
# only after it gave what the interpreted one gives for its first VERIFY payloads, and never
# after a difference
_COMPILED: dict = {}        # id(extension) -> [extension, parser or None, payloads left to verify]
VERIFY = 16


class _FlatParser:
    """The parse of a construct Struct made only of fixed-size fields (integers, arrays of
    integers, byte strings, padding: every codec of extensions.py and xt_ext.py): one
    struct.unpack and the Container construct would give (its "_io" entry aside, which
    Container equality skips). ~10x faster than construct's compiled parser, which wraps
    every parse in a stream: a restore of 10 000 tcp/udp rules parsed 10 000 payloads."""

    def __init__(self, codec):
        from construct import Array, Bytes, Container, Default, FormatField, ListContainer, \
            Padded, Pass, Renamed, Struct
        if type(codec) is not Struct:
            raise TypeError("not a Struct")
        fmt, fields, order = [], [], None
        for sc in codec.subcons:
            if type(sc) is Padded and sc.subcon is Pass and isinstance(sc.length, int):
                fmt.append(f"{sc.length}x")
                continue
            if type(sc) is not Renamed or not sc.name:
                raise TypeError(f"field {sc!r}")
            inner = sc.subcon
            if type(inner) is Default:
                inner = inner.subcon            # parses as its subcon
            if type(inner) is FormatField:
                code, count = inner.fmtstr, None
            elif type(inner) is Array and type(inner.subcon) is FormatField \
                    and isinstance(inner.count, int):
                code, count = inner.subcon.fmtstr, inner.count
            elif type(inner) is Bytes and isinstance(inner.length, int):
                fmt.append(f"{inner.length}s")
                fields.append((sc.name, None))
                continue
            else:
                raise TypeError(f"field {sc.name}: {inner!r}")
            if order not in (None, code[0]) or code[0] not in "<>=" or len(code) != 2:
                raise TypeError(f"field {sc.name}: format {code}")
            order = code[0]
            fmt.append(code[1] * (count or 1))
            fields.append((sc.name, count))
        self.st = struct.Struct((order or "<") + "".join(fmt))
        self.fields, self.Container, self.ListContainer = fields, Container, ListContainer
        self.size = codec.sizeof()
        if self.st.size != self.size:
            raise TypeError("size")

    def parse(self, data: bytes):
        vals = self.st.unpack(data)
        out, k = self.Container(), 0
        lc = self.ListContainer
        for name, count in self.fields:
            if count is None:
                out[name] = vals[k]
                k += 1
            else:
                out[name] = lc(vals[k:k + count])
                k += count
        return out


def _parse_payload(e, payload: bytes):
    """extensions.Extension.decode(payload), through a faster parser where it is trusted."""
    if e.codec is None or len(payload) != uapi.XT_ALIGN(e.size):
        return e.decode(payload)
    st = _COMPILED.get(id(e))
    if st is None or st[0] is not e:
        try:
            fast = _FlatParser(e.codec)
        except TypeError:
            fast = None
        if fast is None:
            try:
                fast = e.codec.compile()
            except Exception:       # noqa: BLE001 - construct cannot compile every codec
                fast = None
        st = _COMPILED[id(e)] = [e, fast, VERIFY]
    if st[1] is None:
        return e.decode(payload)
    if st[2] <= 0:
        return st[1].parse(payload[:e.size])
    slow = e.decode(payload)
    try:
        same = st[1].parse(payload[:e.size]) == slow
    except Exception:           # noqa: BLE001
        same = False
    st[1:] = [st[1] if same else None, st[2] - 1]
    return slow


def _find_check(raws, family, runs=()):
    """find_check_entry() for each entry in order: extension lookup, xt_check_match()/
    xt_check_target() size and protocol checks, and the extension's checkentry. `runs`:
    the walk's runs (_WalkRun, indexes into raws), whose later periods take their
    templates' values per template (_checked_periods)."""
    lay = uapi.layout(family)
    found = {}              # (kind, name bytes, revision) -> (name, extension), this call
    # {template: what its entries' mdata and tdata are} once the template's first entry
    # passed (below): an entry read by one (a walk's own _TRaw: mdata and dup None) takes
    # them at once (a blocklist's 10 000 entries, a fan-out's 16 600)
    plain = {}
    plain_get = plain.get
    for r in (itertools.chain.from_iterable(_checked_periods(raws, runs, plain)) if runs
              else raws):
        p = plain_get(r.tpl)
        if p is not None:
            r.mdata, r.tdata = p
            continue
        if r.mdata is not None:
            continue                # from _ENTRY_CACHE: checked when it was cached
        if r.dup is not None:
            # the same bytes as an entry before it, checked just now
            r.mdata, r.tdata = r.dup.mdata, r.dup.tdata
            continue
        t = r.tpl
        f = t.first if t is not None else None
        if f is not None and f.mdata is not None:
            # the template's first entry passed every check (it comes first, as the kernel
            # checks); the entry's payloads are the first entry's but for its own (its
            # tcp/udp ports, its chain's name), which are parsed when read (_OwnPorts,
            # _OwnName: one for all the template's entries)
            md, td = f.mdata, f.tdata
            if t.mvar:
                md = t.mbase
                if md is None:
                    md = t.mbase = _OwnPorts(t.mvar, _mdata(f))
            if t.tvar == _ERRNAME:
                td = t.tbase
                if td is None:
                    td = t.tbase = _OwnName(_tdata(f))
            r.mdata, r.tdata = plain[t] = md, td
            continue
        ip, crule = r.ip, None
        decoded = []
        items = r.matches
        last = len(items)
        for k in range(last + 1):
            if k < last:
                kind, (nm, rev, payload, _) = ext.MATCH, items[k]
            else:
                kind, nm, rev, payload = ext.TARGET, r.tname, r.trev, r.tpayload
            decoded.append(None)
            got = found.get((kind, nm, rev))
            if got is None:
                if b"\0" not in nm:     # xt_find_match()/xt_find_target(): strnlen == MAXNAMELEN
                    _err(errno.EINVAL, r.off, f"{kind} name not NUL-terminated")
                name = uapi.cstr(nm)
                e = ext.lookup(kind, family, name, rev)
                got = found[(kind, nm, rev)] = (name, e, e and uapi.XT_ALIGN(e.size))
            name, e, psize = got
            if e is None:
                if ext.owned(kind, family, name):
                    _err(errno.ENOENT, r.off, f"{kind} {name!r} revision {rev} does not exist")
                continue            # opaque: the door decides about extensions we cannot check
            if len(payload) != psize:
                _err(errno.EINVAL, r.off, f"{kind} {name!r}: payload {len(payload)} bytes, kernel "
                     f"size {psize}")
            if e.proto and (ip.proto != e.proto or ip.invflags & uapi.XT_INV_PROTO):
                _err(errno.EINVAL, r.off, f"{kind} {name!r} only valid for protocol {e.proto}")
            data = decoded[-1] = _decoded_payload(e, payload)
            if e.check:
                if crule is None:
                    crule = Rule(ip, offset=r.off)
                e.check(crule, family, data)
        r.mdata, r.tdata = decoded[:-1], decoded[-1]
    return lay


def _checked_periods(raws, runs, plain: dict):
    """The entries of raws for _find_check's loop, in order, but for the later periods of
    each of the walk's runs whose every template is in `plain` (what the loop gives the
    entries of a template once its first entry passed) after the run's first period: those
    take it here, per template (one strided slice each), not in the loop (their first test,
    and all it does for them). A generator: the loop has checked the first period (and
    filled `plain`) when the test for the rest is made. Measured (callgrind, cold decode):
    _find_check of a fan-out's 16 666 entries 10.7 M instructions before, 4.9 M so; of a
    blocklist's 10 000, 6.2 M and 3.6 M."""
    pos = 0
    for w in runs:
        lo, hi, per = w.lo, w.hi, len(w.cyc)
        if lo < pos or hi - lo <= per or hi > len(raws):
            continue                    # (none: the walk's runs ascend, each a period or more)
        yield raws[pos:lo + per]
        pos = lo + per
        ps = []
        for s in range(pos, pos + per):
            t = raws[s].tpl
            p = plain.get(t) if t is not None and raws[hi - per + s - pos].tpl is t else None
            if p is None:
                break
            ps.append(p)
        else:
            for s, (md, td) in zip(range(pos, pos + per), ps):
                for r in raws[s:hi:per]:
                    r.mdata = md
                    r.tdata = td
            pos = hi
    yield raws[pos:] if pos else raws


# xt_tcp / xt_udp begin with spts[2], dpts[2] (native u16, as the codec reads them): spts read
# whole as one u32 (its ports unpacked from that u32's bytes), dpts as its two ports
_PORT_RANGES = struct.Struct("=I2H").unpack_from
_PORT_PAIR, _PORTS = struct.Struct("=I"), struct.Struct("=2H")


def _port_range(ranges: dict, pair: int):
    """The ListContainer of the port range whose bytes are u32 `pair`, kept in `ranges`."""
    got = ranges[pair] = _LIST(_PORTS.unpack(_PORT_PAIR.pack(pair)))
    return got


def _without_io(c):
    """A copy of parsed payload c without construct's "_io" entry (a parse by construct
    itself has one; equality skips it)."""
    b = c.copy()
    b.pop("_io", None)
    return b


class _OwnPorts:
    """The parsed payloads (raw entry's mdata) of the entries of a template whose entries
    differ in their tcp/udp ports (mvar: (match index, start, end) of each such payload),
    for all of them: the template's first entry's, each mvar payload parsed with the
    entry's own ports when asked (data_of; _mdata: the whole list). What the codec gives,
    the other fields being the template's. A first restore reads few of them (_PortsMatch)."""
    __slots__ = ("mvar", "first", "bases", "ranges")

    def __init__(self, mvar, first: list):
        self.mvar, self.first = mvar, first
        self.bases = [_without_io(first[k]) for k, _lo, _hi in mvar]
        # a source range's 4 bytes (a u32) -> its ListContainer, shared (read-only, as the
        # Match objects shared between entries): rules rarely name source ports (a
        # fan-out's 3 332 jumps: one range, any), their destination ports mostly differ
        self.ranges = {}

    def data_of(self, j: int, payload: bytes):
        """mvar[j]'s payload parsed: xt_tcp / xt_udp with these ports."""
        sp, c, d = _PORT_RANGES(payload)
        n = _CONTAINER(self.bases[j])
        n["spts"] = self.ranges.get(sp) or _port_range(self.ranges, sp)
        n["dpts"] = _LIST((c, d))
        return n

    def of(self, matches) -> list:
        """The parsed payloads of the entry whose matches are `matches`."""
        md = list(self.first)
        for j, (k, _lo, _hi) in enumerate(self.mvar):
            md[k] = self.data_of(j, matches[k][2])
        return md


class _OwnName:
    """The parsed ERROR payload (raw entry's tdata) of the entries of a template of user
    chain heads (tvar _ERRNAME), for all of them: the first entry's xt_error_target
    (errorname alone) with the entry's own name when asked (data_of; _tdata)."""
    __slots__ = ("base",)

    def __init__(self, first):
        self.base = _without_io(first)

    def data_of(self, _j, payload: bytes):
        n = _CONTAINER(self.base)
        n["errorname"] = payload[:uapi.XT_FUNCTION_MAXNAMELEN]
        return n


def _mdata(r) -> list:
    """Raw entry r's parsed match payloads (r.mdata, the ones of its own parsed now)."""
    md = r.mdata
    return md.of(r.matches) if type(md) is _OwnPorts else md


def _tdata(r):
    """Raw entry r's parsed target payload (r.tdata, parsed now if it is its own)."""
    td = r.tdata
    return td.data_of(0, r.tpayload) if type(td) is _OwnName else td


def _spans(raws, hook_start: dict, bounds: list):
    """The chains' spans (first entry, first body entry, end, hook or None, name) from the
    chain starts (`bounds`: hook entries and ERROR entries, sorted), and the index of the
    final ERROR entry (None if there is none).

    The user chains between two hook starts are one slice of `bounds`, their spans made by
    map and zip in C (_user_spans): a fan-out's 3 333 took 16.2 M instructions in a loop
    over the starts (~4 800 a chain), 11.2 M so (what is left: the payloads' partition and
    decode, the dict of names, the span tuples)."""
    n = len(raws)
    spans, tail = [], None
    if n and (not bounds or bounds[0] > 0):
        # entries before any chain start: no hook reaches them
        spans.append((0, 0, bounds[0] if bounds else n, -1, ""))     # hook -1: no head
    names = _CHAIN_NAMES
    if len(names) > ENTRY_CACHE_MAX:
        names.clear()
    if not bounds:
        return spans, tail
    if type(bounds) is not list:
        bounds = list(bounds)
    # each start's end: the next start, or the end
    ends = bounds[1:]
    ends.append(n)
    m = len(bounds)
    if bounds[-1] == n - 1 and bounds[-1] not in hook_start:
        # the final ERROR entry (the last start; the loop of the starts stopped there)
        tail = n - 1
        m -= 1
    # the hook starts' places among the starts (a few), the user chains' starts between
    at = 0
    for k in sorted(bisect.bisect_left(bounds, b) for b in hook_start) + [m]:
        if k > at:
            _user_spans(spans, raws, bounds[at:k], ends[at:k], names)
        if k < m:
            b = bounds[k]
            h = hook_start[b]
            spans.append((b, b, ends[k], h, HOOK_NAMES[h]))
            at = k + 1
    return spans, tail


def _chain_name(p) -> str:
    """A user chain's name from its ERROR entry's payload: errorname, up to its NUL
    (error_tg_ok() saw one in its 30 bytes; ERROR has no usersize, so the payload shown is
    the one sent)."""
    k = p.find(0)
    return (p[:k] if k >= 0 else p).decode("latin-1")


def _user_spans(spans: list, raws, starts: list, ends: list, names: dict) -> None:
    """_spans' spans of user chains starting at `starts` (ERROR entries), ending at `ends`,
    appended to `spans`; their names looked up in (and new ones put in) `names`, the
    payload -> name cache (the same str for the same payload, decode after decode)."""
    ps = [raws[b].tpayload for b in starts]
    # (no lookups where nothing is cached: a new helper's first restore)
    cn = list(map(names.get, ps)) if names else [None]
    if None in cn:
        # (a payload up to its first NUL: partition's first part, what _chain_name gives;
        # setdefault: a name cached before, or met earlier in `ps`, stays the one object)
        try:
            made = map(bytes.decode, map(_FIRST, map(bytes.partition, ps,
                                                     itertools.repeat(b"\0"))),
                       itertools.repeat("latin-1"))
            cn = list(map(names.setdefault, ps, made))
        except TypeError:       # a payload not bytes
            cn = [names.get(p) or names.setdefault(p, _chain_name(p)) for p in ps]
    spans += zip(starts, map(operator.add, starts, itertools.repeat(1)), ends,
                 itertools.repeat(None), cn)


_FIRST = operator.itemgetter(0)


_ZERO_COUNTS = (0, 0)          # a normalized Rule's counters (one tuple: it is immutable)
# Table._build resolves its jumps' chains through a dict of the chains' first entries where
# it resolves more jumps than this (fewer: a bisection each costs less than the dict)
_CHAIN_AT_MIN = 64


def _unplaced_jump(offset: int, goto: int) -> Jump:
    """The Jump of a standard target with verdict `offset` (> 0), its chain and entry set
    once every chain is known (_build); made without the dataclass's __init__."""
    tgt = object.__new__(Jump)
    tgt.chain = ""
    tgt.goto = bool(goto)
    tgt.offset = offset
    tgt.entry = None
    tgt.chain_pos = -1
    return tgt


# _make_rules' `cached` where no read-only table's entry is cached (Table._decode:
# _SHARED_CACHED), so that nothing is looked up
_OWN_VALUES = ("own values",)
# a read-only decode that walks at least this many entries anew, more than half of its table,
# most of them not cached (_uncached), takes _OWN_VALUES (Table._decode's `later`)
LATER_MID_MIN = 256


def _uncached(raws, samples: int = 32) -> bool:
    """Whether fewer than half of `samples` entries spread over `raws` are in _ENTRY_CACHE:
    a table of other rules than those decoded before, but for some (bench/rulesets.py's
    blocklists of two seeds: 7-9 of 33 samples, their hot prefixes). A table cached before,
    but not the previous one, shares its objects: the lookups are worth their cost there."""
    some = [r.key for r in raws[::max(1, len(raws) // samples)] if r.key is not None]
    return 2 * sum(k in _ENTRY_CACHE for k in some) < len(some)


def _make_rules(raws, todo: range, rules: list, comefrom, lay, share: bool,
                cached=None, runs=()) -> None:
    """Table._build's Rules of the entries raws[todo] (into rules[i]); `comefrom` as _build's
    (None: the raw entries' own comefrom and counters). An entry's matches and extension target
    are, in this order: those of an entry with the same key decoded before (_ENTRY_CACHE's raw,
    built_norm / built_raw: the same objects), those of its template's entry built earlier in
    this call (the same objects but for the entry's own payloads: tcp/udp ports, errorname),
    else made here from the raw entry. A standard target is made anew (jumps are resolved in
    place by _build), but for a read-only table's verdicts: one Verdict per verdict. An entry
    read by a template has its template's header fields (nfcache, offsets, pad:
    _walk_entries), so what the Rule takes of them is found once per template
    (_TemplateRules) instead of once per entry (a blocklist's 10 000 entries: one or two
    templates).
    `cached`: (index, values) of _remember for a run of entries (its lookups not made again
    where that run lies in todo); _OWN_VALUES: nothing is cached (no lookups): each entry is
    its own cache value (a dup: the entry it repeats), and a template's entries take the
    objects of its first entry (as the lookups gave them where they repeat its bytes)."""
    to_user = comefrom is not None
    found = {}              # (kind, name bytes, revision) -> (name, extension), this call
    family = lay.family
    f_goto = lay.f_goto
    six = family == AF_INET6
    new = object.__new__
    zero = _ZERO_COUNTS
    verdicts = {}           # verdict -> its Verdict, where `share`
    lo, hi = todo.start, todo.stop
    run = raws[lo:hi]
    own = cached is _OWN_VALUES
    if own:
        c_lo, cs = lo, run
    else:
        c_lo, cs = cached if cached is not None else (lo, None)
        if cs is None or not lo <= c_lo <= c_lo + len(cs) <= hi:
            c_lo, cs = lo, []
    if not own and len(cs) < hi - lo:
        # the entries around that run (a decode that makes every entry's Rule after one
        # that walked only the middle anew) looked up here; nothing below changes
        # _ENTRY_CACHE, so before the loop as in it
        get = _ENTRY_CACHE.get
        c_hi = c_lo + len(cs)
        cs = [get(r.key) if r.key is not None else None for r in raws[lo:c_lo]] + cs + \
            [get(r.key) if r.key is not None else None for r in raws[c_hi:hi]]
    # {template: ((matches, target) of _TemplateRules.same or None, its Verdict or None,
    # nfcache, tail, pad)} of the templates whose entries take every Rule field but their
    # position, key and IpHeader from the template (_plain_template), in a read-only table
    # (`share`): a blocklist's 10 000 DROP, a fan-out's 10 000 ACCEPT, DROP and RETURN
    # entries made in a few statements, with the objects the path below would give them
    plain = {}
    plain_get = plain.get
    # {template: _owned_parts} of the templates whose entries have payloads of their own
    # parsed when read (_find_check's _OwnPorts / _OwnName), in a read-only table: a
    # fan-out's 3 332 hub jumps and 3 333 chain heads made as the path below makes them
    # from the template's objects (the first entry's, t.built), without its tests
    owned = {}
    owned_get = owned.get
    # the walk's runs (own values of a read-only table: each entry its fresh raw): their
    # first period one by one (the part below), which makes each template's `plain` or
    # `owned` entry, then the later periods per template of the cycle (_made_strided), in
    # loops with what the template fixes read once, not once per entry; the entries those
    # cannot make (the part below again, in index order: each Rule is a function of its
    # raw and its template's objects, made at its first entry, so not of the order)
    strided = sorted(w for w in runs if lo <= w[0] and w[1] <= hi and w[1] - w[0] > w[2]) \
        if own and share and to_user else ()
    items = None
    if strided:
        keep, pos = [], lo
        for a, b, per in strided:
            keep.append((pos, a + per))
            pos = b
        keep.append((pos, hi))
        chain = itertools.chain.from_iterable
        # (cs is run: each entry is its own cache value)
        items = zip(chain(range(x, y) for x, y in keep), chain(raws[x:y] for x, y in keep),
                    chain(raws[x:y] for x, y in keep), chain(comefrom[x:y] for x, y in keep))
    else:
        # (zip of slices, not indexing: ~0.1 us an entry less)
        items = zip(todo, run, cs, comefrom[lo:hi] if to_user else itertools.repeat(None))
    while items is not None:
        for i, r, c, cf in items:
            p = plain_get(r.tpl)
            if p is not None:
                # built: the cache value's, else the template's (set on the cache value)
                same, fv, nfcache, tail, pad = p
                b = c.built_norm if c is not None else None
                if b is None:
                    b = same
                    if b is not None and c is not None:
                        c.built_norm = b
                if b is not None:
                    tgt = fv if fv is not None else b[1]
                    if tgt is _EACH:
                        tgt = verdicts.get(r.verdict) or _shared_verdict(verdicts, r.verdict)
                    rule = new(Rule)
                    rule.ip = r.ip
                    rule.matches = [*b[0]]
                    rule.target = tgt
                    rule.counters = zero
                    rule.index = i
                    rule.offset = r.off
                    rule.nfcache = nfcache
                    rule.comefrom = cf
                    rule.tail = tail
                    rule.pad = pad
                    rule.cache_key = r.key
                    rules[i] = rule
                    continue
            elif owned:
                o = owned_get(r.tpl)
                if o is not None and r.mdata is o[0] and r.tdata is o[1] and \
                        (c is None or c.built_norm is None):
                    md, _td, tr, ports, named = o
                    ms = [*tr.ms]
                    for j, k in ports:
                        m0 = ms[k]
                        m = ms[k] = new(_PortsMatch)
                        # (one statement a field: a tuple assignment of more than three builds
                        # the tuple; 3 332 hub jumps, 3 333 chain heads)
                        m.name = m0.name
                        m.revision = m0.revision
                        m.raw = r.matches[k][2]
                        m._own = md
                        m._j = j
                    tgt = tr.tgt
                    if named is not None:
                        tgt = new(_NamedError)
                        tgt.name = named.name
                        tgt.revision = named.revision
                        tgt.raw = r.tpayload
                        tgt._own = r.tdata
                    if c is not None:
                        c.built_norm = (tuple(ms), tgt)
                    if r.std:
                        # (the standard target as below)
                        v = r.verdict
                        if v < 0:
                            tgt = verdicts.get(v) or _shared_verdict(verdicts, v)
                        else:
                            tgt = _unplaced_jump(v, r.ip.flags & f_goto)
                    rule = new(Rule)
                    rule.ip = r.ip
                    rule.matches = ms
                    rule.target = tgt
                    rule.counters = zero
                    rule.index = i
                    rule.offset = r.off
                    rule.nfcache = tr.nfcache
                    rule.comefrom = cf
                    rule.tail = tr.tail
                    rule.pad = tr.pad
                    rule.cache_key = r.key
                    rules[i] = rule
                    continue
            key = r.key
            t = r.tpl
            if own and t is None and r.dup is not None:
                c = r.dup                   # (what _remember would have given it)
            built = (c.built_norm if to_user else c.built_raw) if c is not None else None
            tr = t.built if t is not None else None
            if tr is not None and tr.token is not found:
                tr = None                   # built by an earlier call
            if own and tr is None and t is not None and built is None:
                tr = _seeded(t, r, found, to_user, six)
            if built is None and tr is not None:
                # an entry of a template built before in this call: its objects but for the
                # entry's own payloads
                tgt = tr.tgt
                ms = [*tr.ms]               # (a list of its own; [*x] ~25 ns less than list(x))
                if tr.same is not None:
                    if c is not None:
                        if to_user:
                            c.built_norm = tr.same
                        else:
                            c.built_raw = tr.same
                else:
                    md = r.mdata
                    if tr.mvar and type(md) is _OwnPorts and md.mvar is tr.mvar:
                        # (_find_check's: parsed when read)
                        for j, (k, _lo, _hi) in enumerate(tr.mvar):
                            m0 = ms[k]
                            m = ms[k] = new(_PortsMatch)
                            m.name, m.revision, m.raw, m._own, m._j = \
                                m0.name, m0.revision, r.matches[k][2], md, j
                    elif tr.mvar:
                        md = _mdata(r)
                        for k, _lo, _hi in tr.mvar:
                            m0 = ms[k]
                            m = ms[k] = new(Match)
                            m.name, m.revision, m.data, m.raw = \
                                m0.name, m0.revision, md[k], r.matches[k][2]
                    if tr.errname:
                        td = r.tdata
                        if type(td) is _OwnName:
                            tgt = new(_NamedError)
                            tgt.name, tgt.revision, tgt.raw, tgt._own = \
                                tr.tgt.name, tr.tgt.revision, r.tpayload, td
                        else:
                            tgt = new(ExtTarget)
                            tgt.name, tgt.revision, tgt.data, tgt.raw = \
                                tr.tgt.name, tr.tgt.revision, td, r.tpayload
                    if c is not None:
                        if to_user:
                            c.built_norm = (tuple(ms), tgt)
                        else:
                            c.built_raw = (tuple(ms), tgt)
                    if share and to_user and t not in owned:
                        owned[t] = _owned_parts(tr, r)
                nfcache, tail, pad = tr.nfcache, tr.tail, tr.pad
            else:
                if built is not None:
                    ms, tgt = [*built[0]], built[1]
                else:
                    ms, tgt = _made_extensions(r, found, family, to_user)
                    if c is not None:
                        if to_user:
                            c.built_norm = (tuple(ms), tgt)
                        else:
                            c.built_raw = (tuple(ms), tgt)
                if tr is not None:
                    # (an entry with the bytes of one before it, read by a template built in
                    # this call: the template's header fields)
                    nfcache, tail, pad = tr.nfcache, tr.tail, tr.pad
                else:
                    h = r.hdr
                    nfcache, tail = h.nfcache, h.next_offset - h.target_offset - r.tsize
                    pad = h.pad if six and any(h.pad) else b""      # Rule.__post_init__
                    if built is None and t is not None:
                        t.built = _TemplateRules(found, ms, tgt, t, nfcache, tail, pad)
            if share and to_user and t is not None and t not in plain:
                plain[t] = _plain_parts(t, r, found, verdicts, nfcache, tail, pad)
            if r.std:
                v = r.verdict
                if v < 0:
                    # a read-only table (`share`) has one Verdict per verdict: nobody edits its
                    # targets, and a restore's 10 000 ACCEPT / DROP / RETURN entries made 10 000
                    # objects (80 bytes each: ~200 fresh pages in a new helper)
                    tgt = verdicts.get(v) if share else None
                    if tgt is None:
                        tgt = new(Verdict)
                        tgt.verdict = v
                        if share:
                            verdicts[v] = tgt
                else:
                    tgt = _unplaced_jump(v, r.ip.flags & f_goto)
            # a copy: callers may edit a rule's IpHeader, and the raw is kept for the next
            # decode (_LAST_WALK, _ENTRY_CACHE); not for a read-only table (`share`: nobody
            # edits its rules, and a cache hit copies the raw's IpHeader)
            if share:
                ip = r.ip
            else:
                ip = new(IpHeader)
                ip.__dict__ = r.ip.__dict__.copy()
            # Rule's fields set directly (its __init__ costs ~10 ms per 10 000 entries), one
            # statement each, in field order (a key-sharing dict, as its __init__ makes; faster
            # than a tuple assignment), plus the entry's bytes without comefrom and counters:
            # classify.py memoizes per rule on it (cache_key, not a field: it does not take part
            # in comparisons)
            rule = new(Rule)
            rule.ip = ip
            rule.matches = ms
            rule.target = tgt
            if to_user:
                rule.counters = zero
            else:
                h = r.hdr
                rule.counters = (h.pcnt, h.bcnt)
            rule.index = i
            rule.offset = r.off
            rule.nfcache = nfcache
            rule.comefrom = cf if to_user else r.hdr.comefrom
            rule.tail = tail
            rule.pad = pad
            rule.cache_key = key
            rules[i] = rule
        if not strided:
            break
        rest = _made_strided(raws, rules, comefrom, strided, plain, owned, verdicts, f_goto)
        strided = ()
        items = zip(rest, [raws[i] for i in rest], [raws[i] for i in rest],
                    [comefrom[i] for i in rest]) if rest else None


def _made_strided(raws, rules: list, comefrom: list, strided, plain: dict, owned: dict,
                  verdicts: dict, f_goto: int) -> list:
    """_make_rules' Rules of the later periods of the walk's runs (`strided`: (lo, hi,
    period), each a whole number of periods; entry lo + j * period + q read by the cycle's
    q-th template) of a read-only table's first restore (own values: each raw fresh from
    the walk, built_norm None), whose first period _make_rules made: per template, from
    its `plain` or `owned` entry, what the template fixes read once, as the per-entry paths
    make them (the same objects, the same fields, in the same statements). Returns the
    indexes (ascending) of the entries left to the per-entry path (a template with
    neither, an entry whose payloads are not the template's shared ones).

    Measured (callgrind, cold decode): _make_rules of a fan-out's 16 666 entries (two runs,
    a period of one template and one of four) 87.8 M instructions entry by entry, 63.4 M
    so; of a blocklist's 10 000 (some 80 runs) 35.0 M and 27.6 M."""
    new = object.__new__
    zero = _ZERO_COUNTS
    rest = []
    for a, b, per in strided:
        for s in range(a + per, a + 2 * per):
            t = raws[s].tpl
            idx = range(s, b, per)
            if t is None or raws[idx[-1]].tpl is not t:
                rest += idx             # (not one template's: the walk's runs are)
                continue
            p = plain.get(t)
            if p is not None:
                if p[0] is None:
                    rest += idx
                    continue
                same, fv, nfcache, tail, pad = p
                ms0 = same[0]
                tgt = fv if fv is not None else same[1]
                each = tgt is _EACH
                vget = verdicts.get
                for i, r, cf in zip(idx, raws[s:b:per], comefrom[s:b:per]):
                    r.built_norm = same
                    if each:
                        tgt = vget(r.verdict) or _shared_verdict(verdicts, r.verdict)
                    rule = new(Rule)
                    rule.ip = r.ip
                    rule.matches = [*ms0]
                    rule.target = tgt
                    rule.counters = zero
                    rule.index = i
                    rule.offset = r.off
                    rule.nfcache = nfcache
                    rule.comefrom = cf
                    rule.tail = tail
                    rule.pad = pad
                    rule.cache_key = r.key
                    rules[i] = rule
                continue
            o = owned.get(t)
            if o is None:
                rest += idx
                continue
            md, td, tr, ports, named = o
            trms, trtgt = tr.ms, tr.tgt
            nfcache, tail, pad = tr.nfcache, tr.tail, tr.pad
            # (one payload of its own, a hub's jumps' tcp match: its fields read once)
            one = ports[0] if len(ports) == 1 else None
            if one is not None:
                j1, k1 = one
                name1, rev1 = trms[k1].name, trms[k1].revision
            if named is not None:
                ename, erev = named.name, named.revision
            # (the template's ipt_ip flags: every entry's, as the addresses aside)
            goto = bool(raws[s].ip.flags & f_goto)
            for i, r, cf in zip(idx, raws[s:b:per], comefrom[s:b:per]):
                if r.mdata is not md or r.tdata is not td:
                    rest.append(i)
                    continue
                ms = [*trms]
                if one is not None:
                    m = ms[k1] = new(_PortsMatch)
                    m.name = name1
                    m.revision = rev1
                    m.raw = r.matches[k1][2]
                    m._own = md
                    m._j = j1
                elif ports:
                    for j, k in ports:
                        m0 = ms[k]
                        m = ms[k] = new(_PortsMatch)
                        m.name = m0.name
                        m.revision = m0.revision
                        m.raw = r.matches[k][2]
                        m._own = md
                        m._j = j
                tgt = trtgt
                if named is not None:
                    tgt = new(_NamedError)
                    tgt.name = ename
                    tgt.revision = erev
                    tgt.raw = r.tpayload
                    tgt._own = td
                r.built_norm = (tuple(ms), tgt)
                if r.std:
                    v = r.verdict
                    if v < 0:
                        tgt = verdicts.get(v) or _shared_verdict(verdicts, v)
                    else:
                        # (_unplaced_jump's, without its call)
                        tgt = new(Jump)
                        tgt.chain = ""
                        tgt.goto = goto
                        tgt.offset = v
                        tgt.entry = None
                        tgt.chain_pos = -1
                rule = new(Rule)
                rule.ip = r.ip
                rule.matches = ms
                rule.target = tgt
                rule.counters = zero
                rule.index = i
                rule.offset = r.off
                rule.nfcache = nfcache
                rule.comefrom = cf
                rule.tail = tail
                rule.pad = pad
                rule.cache_key = r.key
                rules[i] = rule
    rest.sort()
    return rest


def _seeded(t, r, token, to_user: bool, six: bool):
    """_make_rules' (own values) t.built made from the objects of template t's first entry
    (its built_norm / built_raw, set where it was made), at t's entry r; None where there
    are none. An entry of t with the first entry's bytes took those from their cache value
    (the first entry), the others from t.built: with these, both."""
    fb = t.first.built_norm if to_user else t.first.built_raw
    if fb is None:
        return None
    h = r.hdr
    t.built = _TemplateRules(token, fb[0], fb[1], t, h.nfcache,
                             h.next_offset - h.target_offset - r.tsize,
                             h.pad if six and any(h.pad) else b"")
    return t.built


def _plain_template(t) -> bool:
    """Whether every entry of template t has the template's target but for a standard
    verdict of its own (_VERDICT): no jump offset or errorname of its own (tvar), and its
    first entry's standard target a verdict (a jump fixed in the template's bytes gets a
    Jump of its own per entry, resolved in place)."""
    f = t.first
    return t.tvar in (0, _VERDICT, _TERM) and not t.mvar and (not f.std or f.verdict < 0)


# _plain_parts' target of a _VERDICT template: each entry's own verdict's Verdict
_EACH = object()


def _shared_verdict(verdicts: dict, v: int):
    """The Verdict of verdict v in `verdicts` (a read-only table's: one per verdict), made
    there if missing."""
    tgt = verdicts.get(v)
    if tgt is None:
        tgt = verdicts[v] = object.__new__(Verdict)
        tgt.verdict = v
    return tgt


def _plain_parts(t, r, token, verdicts: dict, nfcache: int, tail: int, pad: bytes):
    """_make_rules' entry of `plain` for template t (None where it is not _plain_template),
    made at its entry r: the target (a Verdict, shared in `verdicts`) is the template's
    (_EACH: the entry's own verdict's), and the header fields (nfcache, tail, pad) are those
    of every entry of t."""
    if not _plain_template(t):
        return None
    fv = None
    if t.tvar == _VERDICT:
        fv = _EACH
    elif r.std:
        fv = _shared_verdict(verdicts, r.verdict)
    tb = t.built
    return (tb.same if tb is not None and tb.token is token else None, fv, nfcache, tail, pad)


def _owned_parts(tr, r):
    """_make_rules' entry of `owned` for the template of raw entry r (tr: its t.built), made
    at r, or None: (r's mdata and tdata, which the template's later entries share where
    _find_check gave them their own payloads parsed when read, tr, (mvar index, match index)
    of each such payload, the ERROR target to name or None). Not for a template whose own
    payloads _find_check parsed (a dup's, a cached entry's): the path with its tests."""
    md, td = r.mdata, r.tdata
    if tr.mvar and not (type(md) is _OwnPorts and md.mvar is tr.mvar):
        return None
    if tr.errname and type(td) is not _OwnName:
        return None
    return (md, td, tr, tuple((j, k) for j, (k, _lo, _hi) in enumerate(tr.mvar)),
            tr.tgt if tr.errname else None)


def _made_extensions(r, found: dict, family: int, to_user: bool):
    """(matches, ExtTarget or None) of raw entry r made from its payloads (_payload_data: as
    _find_check parsed them); `found` caches the extension lookups of one _build."""
    new = object.__new__
    ms, tgt = [], None
    md = _mdata(r) if r.matches else None
    for k, (nm, rev, payload, _) in enumerate(r.matches):
        got = found.get((ext.MATCH, nm, rev))
        if got is None:
            mname = uapi.cstr(nm)
            got = found[(ext.MATCH, nm, rev)] = \
                (mname, ext.lookup(ext.MATCH, family, mname, rev))
        m = new(Match)
        data, raw = _payload_data(got[1], payload, md[k], to_user)
        m.__dict__ = {"name": got[0], "revision": rev, "data": data, "raw": raw}
        ms.append(m)
    if not r.std:
        tname = uapi.cstr(r.tname)
        e = ext.lookup(ext.TARGET, family, tname, r.trev)
        tgt = ExtTarget(tname, r.trev, *_payload_data(e, r.tpayload, _tdata(r), to_user))
    return ms, tgt


class _TemplateRules:
    """What _make_rules made from the payloads of the first of a template's entries it met
    in one call (`token`: that call's), for the template's later entries: the matches (a
    tuple) and extension target, their own payloads (the template's mvar, an ERROR target's
    name) aside; `same`: (matches, target) when the entries have no payload of their own
    (their built_norm / built_raw); the Rule fields the template's header fixes (nfcache,
    tail, pad)."""
    __slots__ = ("token", "ms", "tgt", "mvar", "errname", "same", "nfcache", "tail", "pad")

    def __init__(self, token, ms, tgt, t, nfcache, tail, pad):
        self.token, self.ms, self.tgt = token, tuple(ms), tgt
        self.mvar, self.errname = t.mvar, t.tvar == _ERRNAME
        self.same = (self.ms, tgt) if not self.mvar and not self.errname else None
        self.nfcache, self.tail, self.pad = nfcache, tail, pad


class Table:
    """One xtables table (see the module docstring for the contract)."""

    def __init__(self, name: str, family: int, valid_hooks: int, chains=None, tail_entry=None):
        self.name = name
        self.family = family
        self.valid_hooks = valid_hooks
        self.chains = chains if chains is not None else []
        self.tail_entry = tail_entry

    def __eq__(self, other):
        return isinstance(other, Table) and (self.name, self.family, self.valid_hooks,
                                             self.chains, self.tail_entry) == \
            (other.name, other.family, other.valid_hooks, other.chains, other.tail_entry)

    def __repr__(self):
        return f"Table({self.name!r}, family={self.family}, chains={[c.name for c in self.chains]})"

    def chain(self, name: str) -> Chain:
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(name)

    # --- decode -------------------------------------------------------------------------------
    @classmethod
    def decode(cls, blob: bytes, family: int, hook_entry, underflow, valid_hooks: int,
               name: str = "filter", *, num_entries: Optional[int] = None,
               normalize: bool = False, share: bool = False) -> "Table":
        """Entries blob → Table, with translate_table()'s checks. `normalize` gives what the
        kernel keeps after SET_REPLACE: counters zeroed, comefrom from mark_source_chains(),
        extension payloads as xt_data_to_user() shows them. `share` (with normalize): the
        Table is read-only; its Rule objects (and their IpHeader, matches, targets) may be the
        previous shared decode's and the next one's, wherever entry bytes and position data
        are the same (decode_replace: the table the engine installs and never edits)."""
        try:
            uapi.layout(family)
        except ValueError:
            raise BpfilterError(errno.EAFNOSUPPORT, f"family {family}") from None
        # tens of thousands of objects per decode set off the cyclic GC, whose full passes walk
        # every live object (the installed table, _ENTRY_CACHE): 100-400 ms of a 10 000-entry
        # decode. Nothing made here forms a cycle, so collect later, not in the middle.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return cls._decode(blob, family, hook_entry, underflow, valid_hooks, name,
                               num_entries, normalize, normalize and share)
        finally:
            if enabled:
                gc.enable()

    @classmethod
    def _decode(cls, blob, family, hook_entry, underflow, valid_hooks, name, num_entries,
                normalize, share):
        lay = uapi.layout(family)
        blob = bytes(blob)
        hook_entry, underflow = list(hook_entry), list(underflow)
        if len(hook_entry) != NF_INET_NUMHOOKS or len(underflow) != NF_INET_NUMHOOKS:
            raise BpfilterError(errno.EINVAL, "hook_entry/underflow need 5 values")
        valid_hooks &= 0xFFFFFFFF
        if _DEFERRED:
            _run_deferred()     # the previous decode's work for the next one (_defer)
        # kept only for a table that passed every check; taken out, so this decode owns its
        # raws (_moved changes them in place)
        prev = _LAST_WALK.pop(family, None)
        touched = []
        # a restore over the previous table is compared with its kept blob with comefrom
        # zeroed, and the kept blob made from that one's bytes (_reusable): only where the
        # previous decode kept what the kernel keeps (normalized: its raws describe those bytes)
        splice = {} if normalize and prev is not None and prev[4].comefrom is not None \
            else None
        runs = []                           # the runs of the entries walked anew (_WalkRun)
        raws, nhead, ntail = _walk(blob, lay, hook_entry, underflow, valid_hooks, prev, touched,
                                   splice, runs)
        n = len(raws)
        if num_entries is not None and n != num_entries:
            _err(errno.EINVAL, None, f"num_entries {num_entries} but the blob has {n}")
        first = n - ntail
        mid = raws[nhead:first]
        # what the previous decode derived from its entries, for the ones reused from it: the
        # offsets, the indexes of jumps, ERROR and unconditional verdict entries, the names
        memo = _Memo(raws, nhead, ntail, len(blob), prev[4] if prev is not None else None,
                     prev[1] if prev is not None else None, runs)
        offs, at = memo.offs, memo.at
        _check_table_hooks(raws, hook_entry, underflow, valid_hooks, at)
        comefrom = _mark_again(raws, nhead, ntail, hook_entry, valid_hooks, memo,
                               prev[4] if prev is not None else None,
                               prev[1] if prev is not None else None, blob,
                               prev[0] if prev is not None else None, family)
        marked_again = comefrom is not None
        if comefrom is None and prev is not None:
            comefrom = _mark_same_kinds(raws, nhead, ntail, hook_entry, valid_hooks, memo,
                                        prev[4], prev[1])
        # each jump landing on the entry (index) it landed on in the previous table
        same_lands = comefrom is not None
        if comefrom is None:
            memo.hooks = tuple(at.get(hook_entry[h], -1) if valid_hooks & (1 << h) else -1
                               for h in range(NF_INET_NUMHOOKS))
            comefrom = _mark_fast(raws, hook_entry, valid_hooks, at, memo)
        if comefrom is None:
            memo.lands = None
            comefrom = _mark_source_chains(raws, len(blob), hook_entry, valid_hooks,
                                           at.dict())
        memo.marks = comefrom
        if memo.landed is None:
            memo.landed = memo.lands if memo.lands is not None else \
                _indexes_in(at.offs, [raws[j].verdict for j in memo.kinds[0]])
        memo.uflows = tuple(at.get(underflow[h], -1) if valid_hooks & (1 << h) else -1
                            for h in range(NF_INET_NUMHOOKS))
        # the reused entries were checked and remembered by an earlier decode
        _find_check(mid, family, runs)
        later = share and (not (_ENTRY_CACHE and _SHARED_CACHED) or
                           len(mid) >= LATER_MID_MIN and 2 * len(mid) > n and _uncached(mid))
        if later:
            # no entry of a read-only table cached (a new helper's first restore; its empty
            # tables' few entries at most), or most of the table walked anew and not cached (a
            # restore of other rules: looking each entry up took ~3 ms of a 10 000-entry
            # restore more than a first restore's decode): each entry's cache value is taken
            # to be a raw of this walk (_make_rules: _OWN_VALUES, each raw its own; an entry
            # cached before shares its values, not its objects), and only a later decode
            # reads the values: the cache is filled after the reply (~1.5 ms of a 10 000-entry
            # restore)
            cached = None
        else:
            cached = _remember(mid, family, share)
        ends = _ends_of(offs, len(blob))    # the entries tile the blob (_walk checked)
        _LAST_WALK[family] = (blob, raws, ends, None, memo)
        # the previous shared decode's rules, for the entries reused from its walk
        reuse = (prev[3], nhead, ntail) if share and prev is not None and prev[3] else None
        table, rules, spans, lazy = cls._build(
            raws, family, hook_entry, underflow, valid_hooks, name,
            comefrom if normalize else None, at, memo.kinds, reuse, offs, memo.landed,
            same_lands, share, len(blob) - prev[4].size if marked_again else None,
            _OWN_VALUES if later else (nhead, cached),
            [(nhead + w.lo, nhead + w.hi, len(w.cyc)) for w in runs] if later else ())
        if later:
            _defer(functools.partial(_remember, mid, family, True))
        if normalize:
            # the entries whose comefrom or counters may differ from what the kernel keeps:
            # all of them, or (after a normalized decode, whose raws describe the bytes kept)
            # the new ones, the reused ones sent with other values, those with a new comefrom
            cand = None
            p_memo = prev[4] if prev is not None else None
            # every entry of the blob sent has comefrom 0 and zero counters (a restore: the
            # next restore of the same table compares with this blob, _zeroed)
            # (spliced: the head's and tail's headers describe the previous kept bytes, so
            # those sent with other values are the touched ones; else every raw's header
            # describes the bytes sent, a touched one's made anew from them: _reusable)
            sent_zeroed = (not touched and _volatile_zero(raws[nhead:first], runs)) if splice \
                else _volatile_zero(raws, runs, nhead)
            if p_memo is not None and p_memo.comefrom is not None:
                shift = len(p_memo.comefrom) - n
                # the new entries, and the reused ones touched or with a new comefrom (a
                # range where there are none: a set of a restore's 16 000 new ones took
                # ~0.6 ms; _kept_blob reads it by `in`, len(), iteration, sorted())
                more = set()
                # (many touched: entries that counted packets; a dict then, not bisections)
                idx = at.dict() if len(touched) > 64 else at
                more.update(idx[r.off] for r in touched)
                p_cf = p_memo.comefrom
                # (comefrom made by _mark_again from p_cf, the marks it read: p_cf's head and
                # tail as they are, nothing to compare there: two slices of a fan-out's 16 000)
                if not (marked_again and p_cf is p_memo.marks):
                    if comefrom[:nhead] != p_cf[:nhead]:
                        more.update(i for i in range(nhead) if comefrom[i] != p_cf[i])
                    if comefrom[first:] != p_cf[first + shift:]:
                        more.update(i for i in range(first, n)
                                    if comefrom[i] != p_cf[i + shift])
                cand = range(nhead, first)
                if more:
                    cand = set(cand)
                    cand.update(more)
                if splice:
                    # the reused entries outside the spliced runs: blob's bytes, comefrom 0
                    # and zero counters (where not in cand: comefrom written alone)
                    splice["between"] = (range(splice["head"][0], nhead),
                                         range(first, n - splice["tail"][0]))
            table.kept_blob = _kept_blob(blob, raws, comefrom, family, cand,
                                         splice if splice else None,
                                         (range(nhead, first) if splice else range(n))
                                         if sent_zeroed else None, runs, nhead,
                                         _defer if share else None)
            memo.comefrom = comefrom
            if sent_zeroed:
                memo.zeroed = blob
            # the next decode compares with the bytes as kept: libiptc sends back what
            # GET_ENTRIES showed (these, with the live counters), iptables-restore comefrom 0;
            # _kept_blob set the raws' headers to match
            _LAST_WALK[family] = (table.kept_blob, raws, ends,
                                  (rules, comefrom, weakref.ref(table), spans, table.chains,
                                   lazy) if share else None, memo)
            if reuse is not None and marked_again:
                _note_moved(table, reuse[0][2](), raws, nhead, ntail, len(blob), memo,
                            prev[4], prev[1])
        # the extension names the table uses (a set of a few names): the engine asks "any
        # REJECT/LOG, addrtype, conntrack?" of every install (engine._uses)
        table.target_names = frozenset(uapi.cstr(k) for k, c in memo.tnames.items() if c)
        table.match_names = frozenset(uapi.cstr(k) for k, c in memo.mnames.items() if c)
        _free_with_table(prev)
        return table

    @classmethod
    def _build(cls, raws, family, hook_entry, underflow, valid_hooks, name, comefrom, at,
               kinds, reuse=None, offs=None, lands=None, same_lands=False, share=False,
               moved=None, cached=None, runs=()):
        """The Table of checked raw entries; `kinds` = _Memo.kinds; `offs` = _Memo.offs;
        `lands` = _Memo.lands (each jump's landing index, None: onto no entry);
        `reuse` = ((rules, comefrom, table, spans, chains) of the previous shared decode,
        nhead, ntail) as _walk found them; `same_lands`: every jump lands on the entry index
        it landed on in that table (_mark_again, _mark_same_kinds checked); `moved`: the
        offset the entries behind the change moved by, when _mark_again found the walk
        unchanged (else None); `cached`: (index of the first, their _ENTRY_CACHE values) of
        a run of entries, as _remember returned them; `runs`: (lo, hi, period) of the walk's
        runs (_WalkRun) in raws, for _make_rules. Returns (table, rules, spans, lazy):
        every entry's Rule in blob order (None in a _MovedChain not made yet), the chains'
        spans, whether the table has _MovedChains (lazy: their entries are made on first
        access)."""
        lay = uapi.layout(family)
        n = len(raws)
        rules = [None] * n
        todo = range(n)
        jumps, errs, _terms = kinds
        # the entries whose Rule is the previous table's (never changed here: a change gets a
        # _Moved of its own) are those before own_lo and, unless moved, from own_hi on, where
        # not placed
        own_lo, own_hi, placed = 0, n, ()
        p_table = None
        fast = None             # the spans moved (_moved_spans) and the changed chain's index
        lazy = keep = False
        shared = ()             # chains shared unmade with the previous table (_left_unmade)
        whole = None            # the last run of chains moved whole (placed_range)
        if reuse is not None:
            (p_rules, p_cf, p_ref, p_spans, p_chains, p_lazy), nhead, ntail = reuse
            shift, first = len(p_rules) - n, n - ntail
            if offs is None:
                offs = [r.off for r in raws]
            if moved is not None and ntail and (shift or moved) and \
                    lands is not None and len(p_chains) == len(p_spans[3]):
                hook_at = any(valid_hooks & (1 << h) and at.get(hook_entry[h]) == nhead
                              for h in range(NF_INET_NUMHOOKS))
                fast = _moved_spans(p_spans, nhead, first, shift, errs, lands, hook_at)
            if fast is not None:
                # the compile reads few of the chains behind: with a change in a built-in
                # chain its program alone is compiled again (compile takes the others'
                # walks moved); with jumps in it (bench/ruleset_bench.py's INPUT -j SVC),
                # or a change in a user chain one of them reaches (iptables -A SVC-3000
                # of a fan-out), the compile reads the hub (through chain_source: left
                # unmade ahead of the change, _ahead_unmade) and the leaves without making
                # them (compile._walk_leaves: chain_outline, chain_body;
                # classify._walked_bodies: policy_indexes): measured, the compile of an
                # append into a service chain makes one chain, the changed one (issue #7:
                # the decode 20-50 ms before, 6-20 in session 9)
                sp, js = fast
                h = sp[7][js]
                if h is not None and h < 0:
                    fast = None
        if fast is not None:
            # the previous table with entries changed inside one chain (js), every entry
            # behind the change moved by (-shift, `moved`), each jump landing on the entry it
            # landed on before (_mark_again): the chains before js are the previous table's
            # (but for a jump landing behind the change, its offset moved: a user chain with
            # one is placed where it is, unmade, _ahead_unmade; a built-in chain made anew);
            # js is made here;
            # the user chains behind it are _MovedChains of the previous ones, whose entries
            # no one reads before the next table is made from them (issue #7: 3 333 of a
            # fan-out's, ~16 000 entries); the built-in chains and the final ERROR entry
            # behind js are placed anew (_Moved)
            spans, js = fast
            _sp, tail, bounds, firsts, bodies, ends, cnames, hooks = spans
            p_firsts, p_ends = p_spans[3], p_spans[5]
            ns = len(firsts)
            n_head = bisect.bisect_left(jumps, nhead)
            # head jumps landing behind the change: their offset moved
            again = [(i, e) for i, e in zip(jumps[:n_head], lands[:n_head]) if e >= first] \
                if moved else []
            # (each jump's chain + 1, found once: a fan-out hub's up to 3 332 jumps)
            where = list(map(functools.partial(bisect.bisect_right, firsts),
                             map(operator.itemgetter(0), again)))
            held = {k - 1 for k in where}
            # the user chains among them stay unmade, placed where they are (_ahead_unmade)
            ahead = _ahead_unmade(held - {js}, hooks)
            if ahead:
                again = [ie for ie, k in zip(again, where) if k - 1 not in ahead]
            remake = sorted(held - ahead | {js})
            eager = _hooked_after(hooks, js)
            for k in remake:
                _chain_range(p_chains, p_rules, p_firsts, p_ends, k)
            rules[:nhead] = p_rules[:nhead]
            for k in ahead:
                # (None: a _MovedChain's entries not made, as the next decode reads `rules`)
                rules[firsts[k]:ends[k]] = [None] * (ends[k] - firsts[k])
            # behind the change: js's own entries, the built-in chains, the final ERROR entry
            ranges = [(first, ends[js])] + [(firsts[k], ends[k]) for k in eager]
            if tail is not None:
                ranges.append((tail, tail + 1))
            for lo, hi in ranges:
                if hi > lo:
                    rules[lo:hi] = _moved_rules(p_rules[lo + shift:hi + shift], offs, lo,
                                                comefrom, jumps)
            own_lo, own_hi, placed = nhead, n, set()
            todo = range(nhead, first)
            sel = again
            for lo, hi in [(firsts[js], ends[js])] + ranges[1:]:
                a, b = _bisect_left(jumps, lo), _bisect_left(jumps, hi)
                sel += zip(jumps[a:b], lands[a:b])
            chains = p_chains[:js + 1]
            if ahead:
                # a placement of their own (the same lists): they did not move with the chains
                # behind the change, which placed_by must not take them to have (classify's
                # _moved_bodies: a hub's case map kept, each RETURN entry moved as the hub)
                here = (offs, comefrom, jumps, lands)
                for k in ahead:
                    chains[k] = _placed_whole(p_chains[k], firsts[k], here)
            add = chains.append
            new, mc = object.__new__, _MovedChain
            pos = (offs, comefrom, jumps, lands)
            # (~0.2 us a chain: 3 333 of them; hook and policy: the class's None); the user
            # chains between two built-in ones (eager) a run at a time, no hook to test
            run = js + 1
            # the last run, for placed_range (none of its chains is made before this count)
            whole = (_PLACES, eager[-1] + 1 if eager else run, ns, pos)
            for b in eager + [ns]:
                for pc, at_ in zip(p_chains[run:b], firsts[run:b]):
                    c = new(mc)
                    c.name = pc.name
                    # made from pc, or from pc's own source if pc is one not made (every
                    # _MovedChain has _src set where it is made: read without getattr's
                    # default, ~0.2 ms of a fan-out append's 3 333)
                    c._src = (pc._src or pc) if type(pc) is mc else pc
                    c._at = at_
                    c._pos = pos
                    add(c)
                if b < ns:
                    add(p_chains[b])    # a built-in chain: made below
                run = b + 1
            lazy = ns > js + 1 + len(eager) or p_lazy or bool(ahead)
        elif reuse is not None:
            # a Rule carries position data (index, offset, comefrom; a jump its offset and
            # landing place): the previous table's is shared where all of it is the same (an
            # entry before the change, or after it when nothing moved), else placed anew (a
            # _Moved: the same attribute dict, the position its own). A jump whose landing
            # changed gets a Jump of its own (resolved below).
            # the previous table's _MovedChains not made yet (None in p_rules) stay so where
            # nothing moved (`keep`: the same entry count, the tail at its offset; a restore
            # of the same table), shared with the rest of that table below, made where read
            # here; else those before the change are made, those behind it read from the
            # unmade chains' sources (_sources)
            pf, pe = p_spans[3], p_spans[5]
            keep = p_lazy and shift == 0
            if keep:
                _fill_range(p_rules, p_chains, pf, pe, nhead, min(first + 1, n))
                keep = not ntail or raws[first].off == p_rules[first].offset
            src = None
            fix = set()
            if comefrom[:nhead] != p_cf[:nhead]:
                fix.update(i for i in range(nhead) if comefrom[i] != p_cf[i])
            if p_lazy and not keep:
                # the entries behind the change moved: placed anew below from the unmade
                # chains' sources (_sources: nothing made for the previous table there); the
                # entries read as the previous table's (before the change, the first after
                # it) made, but for the unmade chains before the change that this table
                # shares as they are (_left_unmade: None in rules, the same _MovedChain)
                shared = _left_unmade(p_rules, p_chains, pf, pe, nhead, jumps, lands,
                                      sorted(fix)) if lands is not None else set()
                hi = min(max(first, first + shift) + 1, len(p_rules))
                for k in range(bisect.bisect_right(pf, hi - 1)):
                    if k not in shared and p_rules[pf[k]] is None:
                        _chain_range(p_chains, p_rules, pf, pe, k)
                src = _sources(p_rules, p_chains, pf, pe, first + shift)
                lazy = bool(shared)
            own_lo, own_hi = nhead, first
            same_tail = ntail and shift == 0 and raws[first].off == p_rules[first].offset
            if same_tail and comefrom[first:] != p_cf[first:]:
                fix.update(i for i in range(first, n) if comefrom[i] != p_cf[i])
            if keep:
                for i in fix:
                    _fill_range(p_rules, p_chains, pf, pe, i, i + 1)
            rules[:nhead] = p_rules[:nhead]
            if ntail:
                if same_tail:
                    rules[first:] = p_rules[first:]
                else:
                    # every entry behind the change moved: each placed anew (_Moved)
                    rules[first:] = _moved_rules(
                        p_rules[first + shift:] if src is None else src, offs, first,
                        comefrom, jumps)
                    own_hi = n
            for i in fix:
                rules[i] = _placed(rules[i], i, offs[i], comefrom[i])
            placed = fix
            todo = range(nhead, first)
            # every entry at the index and offset it had in the previous table, and every
            # jump landing where it did (so naming the same offset): the jumps and chains
            # outside the changed entries are the previous table's (see below)
            p_table = p_ref() if same_lands and shift == 0 and lands is not None else None
            if p_table is not None and (
                    None in lands or ntail and raws[first].off != p_rules[first].offset
                    or any(p_rules[i].offset != offs[i] for i in todo)):
                p_table = None
        new = object.__new__
        fresh_lo, fresh_hi = todo.start, todo.stop      # their Jumps are made here
        if runs:
            _make_rules(raws, todo, rules, comefrom, lay, share, cached, runs)
        else:
            _make_rules(raws, todo, rules, comefrom, lay, share, cached)

        # split into chains: a chain starts at a hook entry or at an ERROR entry. Found on the
        # raw entries (a few boundaries), then each chain's rules are one slice of `rules`.
        # First the spans (first entry, first body entry, end, hook or None, name) and where
        # the jumps land, then the chains (a jump whose landing changed gets a Rule of its own)
        hook_start = {at[hook_entry[h]]: h for h in range(NF_INET_NUMHOOKS)
                      if valid_hooks & (1 << h) and hook_entry[h] in at}
        if fast is not None:
            pass                        # the spans moved, the jumps to resolve chosen above
        elif p_table is not None and \
                (bounds := sorted(hook_start.keys() | set(errs)) if hook_start else errs) \
                == p_spans[2] and \
                bisect.bisect_left(errs, fresh_lo) == bisect.bisect_left(errs, fresh_hi):
            # the same chain starts, the same hooks (same_lands: _mark_again and
            # _mark_same_kinds compared them) and no new ERROR entry: the previous spans
            spans = p_spans
            _sp, tail, bounds, firsts, bodies, ends, cnames, hooks = p_spans
        else:
            bounds = sorted(hook_start.keys() | set(errs)) if hook_start else errs
            sp, tail = _spans(raws, hook_start, bounds)
            # resolve jumps to (chain, position): a chain's body (rules, policy entry,
            # trailer) is its entries after the head, in blob order, so the position is the
            # distance from there
            # (the columns of sp, transposed in C: zip)
            firsts, bodies, ends, hooks, cnames = map(list, zip(*sp)) if sp else \
                ([], [], [], [], [])
            spans = (sp, tail, bounds, firsts, bodies, ends, cnames, hooks)
            if p_table is not None and (sp, tail) != p_spans[:2] and \
                    (tail, firsts, bodies, ends, cnames, hooks) != \
                    (p_spans[1], p_spans[3], p_spans[4], p_spans[5], p_spans[6], p_spans[7]):
                p_table = None
        if keep and p_table is None:
            # every chain is made from `rules` below: the unmade ones' entries made (at the
            # indexes they had: nothing moved)
            _made_all(rules, p_chains, pf, pe)
            keep = False
        bisect_right = bisect.bisect_right
        lands = lands if lands is not None else [at.get(raws[i].verdict) for i in jumps]
        sel = zip(jumps, lands) if fast is None else sel
        if p_table is not None:
            # the same chains, offsets and landings: a jump outside the changed entries names
            # what it named, landing where it did (its Jump is the previous one); the new
            # entries' Jumps are resolved here
            lo, hi = bisect.bisect_left(jumps, fresh_lo), bisect.bisect_left(jumps, fresh_hi)
            sel = zip(jumps[lo:hi], lands[lo:hi])
        # each jump's chain: the last whose first entry is at or before its landing. Where
        # every jump is resolved (a cold decode: a fan-out's 3 334), found by one dict lookup
        # for a landing on a chain's first entry or first body entry (iptables lands on the
        # first rule), a bisection of the chains' firsts for any other
        chain_at = None
        if fast is None and p_table is None and len(jumps) > _CHAIN_AT_MIN:
            chain_at = dict(zip(bodies, range(len(firsts))))
            # (a chain with no body entry: its body index is the next chain's first)
            chain_at.update(zip(firsts, range(len(firsts))))
        for i, e in sel:
            j = chain_at.get(e) if chain_at is not None else None
            if j is None:
                j = bisect_right(firsts, e) - 1 if e is not None else -1
            if j < 0 or e >= ends[j]:
                cname, entry, cp = "", None, -1     # onto no entry, or the final ERROR entry
            else:
                body = bodies[j]
                cname, entry, cp = cnames[j], (e - body if e >= body else -1), j
            rule = rules[i]
            if rule is None:
                continue                # in a chain shared unmade: landing where it did
            t = rule.target
            if fresh_lo <= i < fresh_hi:
                t.chain, t.entry, t.chain_pos = cname, entry, cp    # made above
                continue
            v = raws[i].verdict
            if t.offset == v and t.chain_pos == cp and t.entry == entry and t.chain == cname:
                continue                # the previous table's Jump, landing where it did
            if not (own_lo <= i < own_hi or i in placed):
                rule = rules[i] = _placed(rule, i, offs[i], comefrom[i])
            nj = new(Jump)
            nj.__dict__ = {"chain": cname, "goto": t.goto, "offset": v, "entry": entry,
                           "chain_pos": cp}
            rule.target = nj
        # the chains
        if fast is not None:
            # js, the chains before it with a jump landing behind the change, the built-in
            # chains behind it (the rest: the previous table's, _MovedChains)
            todo_chains = sorted(set(remake) | set(eager))
        else:
            ns = len(firsts)
            todo_chains = range(ns)
            chains = [None] * ns
        if fast is None and p_table is not None and len(p_table.chains) == ns:
            # the previous table's Chain objects (read-only, as its Rules) where all of their
            # entries are the previous table's Rules: outside the changed entries and fix,
            # a built-in chain's policy on the entry it was on
            p_chains = p_table.chains
            dirty = set(range(bisect_right(firsts, fresh_lo) - 1,
                              bisect_right(firsts, fresh_hi - 1))) if fresh_hi > fresh_lo \
                else set()
            dirty.update(bisect_right(firsts, i) - 1 for i in placed)
            for b, h in hook_start.items():
                j = bisect_right(firsts, b) - 1
                if p_chains[j].policy_entry is not rules[at.get(underflow[h], -1)]:
                    dirty.add(j)
            dirty.discard(-1)
            chains[:] = p_chains
            todo_chains = sorted(dirty)
        # (the spans read by one zip where every chain is made: a fan-out's 3 334)
        todo_spans = zip(todo_chains, firsts, bodies, ends, hooks, cnames) \
            if todo_chains == range(len(firsts)) else \
            ((j, firsts[j], bodies[j], ends[j], hooks[j], cnames[j]) for j in todo_chains)
        for j, b, body, end, h, cname in todo_spans:
            if j in shared:
                chains[j] = p_chains[j]     # the previous table's, unmade
                continue
            if keep and rules[b] is None:
                _chain_range(p_chains, rules, firsts, ends, j)      # the previous spans
            if h is not None and h >= 0:
                # built-in chain: the underflow entry is the policy, what follows it the trailer
                k = at.get(underflow[h], -1)
                if not b <= k < end:
                    raise BpfilterError(errno.EOPNOTSUPP, f"underflow {underflow[h]} of "
                                        f"{cname} lies outside the chain (not supported)")
                pe = rules[k]
                chains[j] = Chain(cname, hook=h, policy=pe.target.verdict, rules=rules[b:k],
                                  policy_entry=pe, trailer=rules[k + 1:end])
                continue
            # Chain's fields set directly (its __init__ is ~1 us: 3 333 chains of fan-out), one
            # statement each, in field order (as _make_rules sets a Rule's)
            c = new(Chain)
            c.name = cname
            c.hook = None
            c.policy = None
            if h is None:
                # a user chain's last entry an unconditional RETURN (no matches, ipt_ip of any):
                # its policy entry, what the raw entry found (_Raw.uncond)
                last = raws[end - 1]
                if end > body and last.uncond and last.std and last.verdict == XT_RETURN:
                    c.rules = rules[body:end - 1]
                    c.policy_entry = rules[end - 1]
                else:
                    c.rules = rules[body:end]
                    c.policy_entry = None
                c.head_entry = rules[b]
            else:
                c.rules = rules[body:end]
                c.policy_entry = None
                c.head_entry = None
            c.trailer = []
            chains[j] = c
        table = cls(name, family, valid_hooks, chains, rules[tail] if tail is not None else None)
        if whole is not None:
            table._moved_whole = (chains,) + whole
        return table, rules, spans, lazy or keep

    # --- layout and encode --------------------------------------------------------------------
    def entries(self) -> list:
        out = [e for c in self.chains for e in c.entries()]
        if self.tail_entry is not None:
            out.append(self.tail_entry)
        return out

    def _entry_size(self, rule: Rule) -> int:
        lay = uapi.layout(self.family)
        n = lay.entry_size + sum(32 + len(self._payload(ext.MATCH, m)) for m in rule.matches)
        return n + 32 + len(self._target_payload(rule)) + rule.tail

    def _payload(self, kind, obj) -> bytes:
        if isinstance(obj.data, (bytes, bytearray)):
            return bytes(obj.data)
        e = ext.lookup(kind, self.family, obj.name, obj.revision)
        if e is None or e.codec is None:
            raise BpfilterError(errno.EINVAL, f"{kind} {obj.name!r} rev {obj.revision}: no codec")
        return e.encode(obj.data)

    def _target_payload(self, rule: Rule) -> bytes:
        t = rule.target
        if isinstance(t, (Verdict, Jump)):
            return b"\0" * 8
        return self._payload(ext.TARGET, t)

    def layout(self) -> None:
        """Assign Rule.index/offset and Jump.offset/chain_pos for the current chains."""
        off = 0
        for i, r in enumerate(self.entries()):
            r.index, r.offset = i, off
            off += self._entry_size(r)
        self._size = off
        for r in self.entries():
            t = r.target
            if isinstance(t, Jump) and t.entry is not None:
                ci = t.chain_pos
                if not (0 <= ci < len(self.chains) and self.chains[ci].name == t.chain):
                    ci = next((k for k, c in enumerate(self.chains) if c.name == t.chain), None)
                    if ci is None:
                        raise BpfilterError(errno.ENOENT, f"jump to unknown chain {t.chain!r}")
                c = self.chains[ci]
                target = c.head_entry if t.entry == -1 else c.body()[t.entry]
                t.offset, t.chain_pos = target.offset, ci

    def encode(self, counters=None) -> bytes:
        """The entries blob, as GET_ENTRIES returns it (also lays the table out). `counters`,
        if given, replaces each entry's counters: counters[i] = (pcnt, bcnt) of entry i."""
        self.layout()
        lay = uapi.layout(self.family)
        out = bytearray()
        ents = self.entries()
        if counters is not None and len(counters) != len(ents):
            raise BpfilterError(errno.EINVAL, f"{len(counters)} counters for {len(ents)} entries")
        for i, r in enumerate(ents):
            pcnt, bcnt = r.counters if counters is None else counters[i]
            body = bytearray()
            for m in r.matches:
                p = self._payload(ext.MATCH, m)
                body += uapi.XT_EXT_HDR_FAST.pack(32 + len(p), _name29(m.name), m.revision)
                body += p
            toff = lay.entry_size + len(body)
            t = r.target
            if isinstance(t, (Verdict, Jump)):
                v = t.verdict if isinstance(t, Verdict) else t.offset
                body += _STD_HDR + (v & 0xFFFFFFFF).to_bytes(4, "little") + b"\0" * 4
            else:
                p = self._payload(ext.TARGET, t)
                body += uapi.XT_EXT_HDR_FAST.pack(32 + len(p), _name29(t.name), t.revision) + p
            body += b"\0" * r.tail
            hdr = _pack_hdr(self.family, r, toff, lay.entry_size + len(body), pcnt, bcnt)
            out += hdr + body
        return bytes(out)

    # --- GET_INFO -----------------------------------------------------------------------------
    def _hooks(self):
        self.layout()
        he, uf = [NO_HOOK] * NF_INET_NUMHOOKS, [NO_HOOK] * NF_INET_NUMHOOKS
        for c in self.chains:
            if c.builtin and self.valid_hooks & (1 << c.hook):
                first = c.entries()[0]
                he[c.hook] = first.offset
                if c.policy_entry is not None:
                    uf[c.hook] = c.policy_entry.offset
        return he, uf

    @property
    def hook_entry(self) -> list:
        return self._hooks()[0]

    @property
    def underflow(self) -> list:
        return self._hooks()[1]

    @property
    def size(self) -> int:
        self.layout()
        return self._size

    @property
    def num_entries(self) -> int:
        # len(self.entries()) without building the list of every entry (per chain, not rule)
        return sum((c.head_entry is not None) + len(c.rules) + (c.policy_entry is not None)
                   + len(c.trailer) for c in self.chains) + (self.tail_entry is not None)

    def getinfo_bytes(self) -> bytes:
        """struct ipt_getinfo / ip6t_getinfo for this table."""
        he, uf = self._hooks()
        return uapi.ipt_getinfo.build(dict(
            name=self.name.encode().ljust(uapi.XT_TABLE_MAXNAMELEN, b"\0")[:32],
            valid_hooks=self.valid_hooks, hook_entry=he, underflow=uf,
            num_entries=self.num_entries, size=self._size))

    # --- derived tables -----------------------------------------------------------------------
    def normalized(self) -> "Table":
        """What the kernel would hold (and GET_ENTRIES return) after SET_REPLACE of this table."""
        blob = self.encode()
        he, uf = self._hooks()
        return Table.decode(blob, self.family, he, uf, self.valid_hooks, self.name,
                            normalize=True)

    def with_counters(self, counters) -> "Table":
        """A copy with entry i's counters set to counters[i] = (pcnt, bcnt)."""
        t = copy.deepcopy(self)
        ents = t.entries()
        if len(counters) != len(ents):
            raise BpfilterError(errno.EINVAL, f"{len(counters)} counters for {len(ents)} entries")
        for e, c in zip(ents, counters):
            e.counters = (int(c[0]), int(c[1]))
        return t

    def unchecked_extensions(self) -> list:
        """(kind, name, revision) of every extension whose payload is opaque to the codec."""
        out = []
        for r in self.entries():
            for m in r.matches:
                e = ext.lookup(ext.MATCH, self.family, m.name, m.revision)
                if e is None or e.codec is None:
                    out.append((ext.MATCH, m.name, m.revision))
            if isinstance(r.target, ExtTarget):
                e = ext.lookup(ext.TARGET, self.family, r.target.name, r.target.revision)
                if e is None or e.codec is None:
                    out.append((ext.TARGET, r.target.name, r.target.revision))
        return out

    @classmethod
    def empty(cls, name: str, family: int) -> "Table":
        """The table as the kernel creates it in a fresh namespace (xt_alloc_initial_table():
        one ACCEPT policy entry per valid hook, then the final ERROR entry)."""
        if name not in TABLE_HOOKS:
            raise BpfilterError(errno.ENOENT, f"no built-in table {name!r}")
        hooks = TABLE_HOOKS[name]
        chains = []
        for h in range(NF_INET_NUMHOOKS):
            if hooks & (1 << h):
                pe = Rule(IpHeader.any(family), target=Verdict(-NF_ACCEPT - 1))
                chains.append(Chain(HOOK_NAMES[h], hook=h, policy=pe.target.verdict,
                                    policy_entry=pe))
        tail = Rule(IpHeader.any(family),
                    target=ExtTarget("ERROR", 0, ext.xt_error_payload.parse(_errname("ERROR"))))
        # decoded beside the last walk, not after it: a helper opens an empty table for each
        # namespace it serves first, whose decode would compare its 4 entries with the last
        # table's walk (~20-30 ms after a 10 000-rule table) and drop that walk, which the next
        # decode reuses
        prev = _LAST_WALK.pop(family, None)
        try:
            return cls(name, family, hooks, chains, tail).normalized()
        finally:
            _LAST_WALK.pop(family, None)
            if prev is not None:
                _LAST_WALK[family] = prev


_STD_HDR = uapi.XT_EXT_HDR_FAST.pack(uapi.SIZEOF_XT_STANDARD_TARGET, b"", 0)


def _pack_hdr(family, r: Rule, toff: int, nxt: int, pcnt: int, bcnt: int) -> bytes:
    ip = r.ip
    if family == AF_INET:
        A = ipaddress.IPv4Address
        return uapi.IPT_ENTRY_FAST.pack(
            A(ip.src).packed, A(ip.dst).packed, A(ip.smsk).packed, A(ip.dmsk).packed,
            ip.iniface, ip.outiface, ip.iniface_mask, ip.outiface_mask, ip.proto, ip.flags,
            ip.invflags, r.nfcache, toff, nxt, r.comefrom, pcnt, bcnt)
    A = ipaddress.IPv6Address
    return uapi.IP6T_ENTRY_FAST.pack(
        A(ip.src).packed, A(ip.dst).packed, A(ip.smsk).packed, A(ip.dmsk).packed,
        ip.iniface, ip.outiface, ip.iniface_mask, ip.outiface_mask, ip.proto, ip.tos, ip.flags,
        ip.invflags, ip.pad, r.nfcache, toff, nxt, r.comefrom, r.pad, pcnt, bcnt)


def _name29(name: str) -> bytes:
    b = name.encode("latin-1")
    return (b + b"\0" * 29)[:29]


def _errname(name: str) -> bytes:
    return (name.encode("latin-1") + b"\0" * 30)[:30]


def error_target(chain_name: str) -> ExtTarget:
    """The ERROR target iptables puts at the head of a user chain (errorname = chain name)."""
    return ExtTarget("ERROR", 0, ext.xt_error_payload.parse(_errname(chain_name)))


def decode_replace(buf: bytes, family: int, entries: Optional[bytes] = None):
    """Parse an ipt_replace/ip6t_replace buffer with do_replace()+translate_table()'s checks.
    Returns (hdr, table): hdr a construct Container (name as str, counters = user address),
    table normalized as the kernel would keep it. The caller checks num_counters against the
    installed table (xt_replace_table(): EAGAIN) and that the table exists (ENOENT).
    `entries`: the entries apart from the struct in `buf` (sockopt.do_replace reads them into
    a bytes object of their own), kept as they are instead of copied out of buf."""
    buf = memoryview(buf).cast("B")       # no copy: `size` may be large (XT_MAX_TABLE_SIZE)
    if len(buf) < uapi.ipt_replace.sizeof():
        raise BpfilterError(errno.EINVAL, f"replace buffer of {len(buf)} bytes < sizeof(ipt_replace)")
    hdr = uapi.ipt_replace.parse(bytes(buf[:uapi.ipt_replace.sizeof()]))
    if hdr.num_counters >= uapi.INT_MAX // 16:
        raise BpfilterError(errno.ENOMEM, f"num_counters {hdr.num_counters} too large")
    if hdr.num_counters == 0:
        raise BpfilterError(errno.EINVAL, "num_counters is 0")
    have = len(buf) - uapi.ipt_replace.sizeof() if entries is None else len(entries)
    if have < hdr.size:
        raise BpfilterError(errno.EINVAL, f"size {hdr.size} but only {have} bytes of entries")
    name = uapi.cstr(hdr.name[:uapi.XT_TABLE_MAXNAMELEN - 1])
    hdr.name = name
    if uapi.SIZEOF_XT_TABLE_INFO + hdr.size >= uapi.XT_MAX_TABLE_SIZE:
        raise BpfilterError(errno.ENOMEM, f"table size {hdr.size} >= XT_MAX_TABLE_SIZE")
    if hdr.num_entries > uapi.XT_MAX_TABLE_SIZE // 4:     # xt_alloc_entry_offsets()
        raise BpfilterError(errno.ENOMEM, f"num_entries {hdr.num_entries} too large")
    if entries is not None:
        blob = bytes(entries[:hdr.size])    # the same object when it is bytes of that size
    else:
        blob = bytes(buf[uapi.ipt_replace.sizeof():uapi.ipt_replace.sizeof() + hdr.size])
    table = Table.decode(blob, family, hdr.hook_entry, hdr.underflow, hdr.valid_hooks, name,
                         num_entries=hdr.num_entries, normalize=True, share=True)
    # the entries as the caller sent them, and as the kernel keeps them (table.kept_blob:
    # comefrom and the counters patched): the state file and GET_ENTRIES use these instead of
    # encoding the table again (engine._state_blob, sockopt Backend.replace); whoever edits this
    # table afterwards must drop source_blob (which disowns both)
    table.source_blob = blob
    # its entry count (Table.num_entries walks every chain: ~2 ms with kube-proxy's 3 000),
    # which the decode checked against num_entries; kept with source_blob (engine._entry_count)
    table._entry_count = hdr.num_entries
    return hdr, table


def check_against_installed(hdr, installed: Optional[Table]) -> None:
    """The rest of do_replace() after translate_table(), in __do_replace()'s order: the table
    must exist (ENOENT), valid_hooks must equal the installed table's ("You lied!": EINVAL) and
    num_counters must equal its number of entries (xt_replace_table(): EAGAIN)."""
    if installed is None:
        raise BpfilterError(errno.ENOENT, f"table {hdr.name!r} does not exist")
    if hdr.valid_hooks != installed.valid_hooks:
        raise BpfilterError(errno.EINVAL, f"valid_hooks 0x{hdr.valid_hooks:x} but table "
                            f"{installed.name!r} has 0x{installed.valid_hooks:x}")
    if hdr.num_counters != installed.num_entries:
        raise BpfilterError(errno.EAGAIN, f"num_counters {hdr.num_counters} but table "
                            f"{installed.name!r} has {installed.num_entries} entries")


def decode_add_counters(buf: bytes, num_entries: Optional[int] = None):
    """An IPT_SO_SET_ADD_COUNTERS buffer (xt_counters_info + counters) → (table name,
    [(pcnt, bcnt), ...]), with xt_copy_counters()'s length check (EINVAL) and, given the
    installed table's entry count, do_add_counters()'s count check (EINVAL). The table lookup
    (ENOENT) comes between the two in the kernel: callers check it before passing num_entries."""
    buf = bytes(buf)
    hsz = uapi.xt_counters_info.sizeof()
    if len(buf) < hsz:
        raise BpfilterError(errno.EINVAL, f"add-counters buffer of {len(buf)} bytes")
    hdr = uapi.xt_counters_info.parse(buf[:hsz])
    if 16 * hdr.num_counters != len(buf) - hsz:
        raise BpfilterError(errno.EINVAL, f"{hdr.num_counters} counters but "
                            f"{len(buf) - hsz} bytes of them")
    name = uapi.cstr(hdr.name[:uapi.XT_TABLE_MAXNAMELEN - 1])
    if num_entries is not None and hdr.num_counters != num_entries:
        raise BpfilterError(errno.EINVAL, f"{hdr.num_counters} counters for {num_entries} entries")
    cnt = [(int.from_bytes(buf[i:i + 8], "little"), int.from_bytes(buf[i + 8:i + 16], "little"))
           for i in range(hsz, len(buf), 16)]
    return name, cnt
