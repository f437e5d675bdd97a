"""The typed model of one xtables table: Table ⇄ Chain ⇄ Rule, with decode (blob → model, with the
kernel's checks) and encode (model → blob, byte-identical to what the kernel returns).

Shared contract (other stages rely on these names):
  - Table.decode(blob, family, hook_entry, underflow, valid_hooks, name="filter") -> Table
  - Table.encode() -> bytes                      the entries blob (ipt_get_entries.entrytable)
  - Table.entries() -> list[Entry]               every entry in blob order; entry index == counter
                                                 index used by the compiler and by GET_ENTRIES
  - Table.chains: built-in chains in hook order, then user chains in blob order
  - Chain.rules (without the policy entry / the chain's RETURN entry), Chain.policy_entry
  - Rule.ip (IpHeader), Rule.matches (list[Match]), Rule.target (Verdict | Jump | ExtTarget),
    Rule.counters (pcnt, bcnt), Rule.index (entry index in the blob)
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Optional, Union

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


@dataclass
class Match:
    """xt_entry_match: name, revision and payload.

    `data` is the payload decoded by the extension registry (a construct Container) or the raw
    bytes when no codec is registered; `raw` is always the payload exactly as it was in the blob
    (after the header, padding included) so encode can be byte-exact."""
    name: str
    revision: int
    data: Any
    raw: bytes = b""


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
    a user chain. `chain` is the target chain's name; `offset` the byte offset in the blob."""
    chain: str
    goto: bool = False
    offset: int = 0


@dataclass
class ExtTarget:
    """Any non-standard target (ERROR, REJECT, LOG, ...): like Match."""
    name: str
    revision: int
    data: Any
    raw: bytes = b""


Target = Union[Verdict, Jump, ExtTarget]


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


@dataclass
class Chain:
    name: str
    hook: Optional[int] = None        # NF_INET_* for a built-in chain, None for a user chain
    policy: Optional[int] = None      # verdict of a built-in chain's policy entry
    rules: list = field(default_factory=list)     # list[Rule], policy/RETURN entry excluded
    policy_entry: Optional[Rule] = None           # the underflow (built-in) or RETURN (user) entry
    head_entry: Optional[Rule] = None             # the ERROR entry naming a user chain

    @property
    def builtin(self) -> bool:
        return self.hook is not None


@dataclass
class Table:
    name: str
    family: int
    valid_hooks: int
    chains: list = field(default_factory=list)    # list[Chain]
    tail_entry: Optional[Rule] = None             # the final ERROR entry

    def chain(self, name: str) -> Chain:
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(name)
