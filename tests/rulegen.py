"""Seeded, reproducible generator of filter rulesets and of the probes that exercise them.

`generate(seed)` gives a Case: the iptables-restore text of a filter table (built-in chains with
random policies, 1-4 user chains (5-8 with big=True) reached by jumps and gotos, RETURNs, no loops: a user chain only
jumps to chains defined after it) restricted to what the differential suites cover (ipt_ip with
every inversion, tcp, udp, icmp), and probes aimed at the rules: for each rule, a probe built to
satisfy all of its fields and one that misses it by exactly one field, plus a few random probes.
The probes are built from the rule's fields, not checked against them; the kernel decides.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Optional

from lab import EGRESS_POOLS, HOST_ADDRS, PEER_ADDRS, SENDERS, egress_of, number
from probes import (ALL_FRAGS, COMPLETE_FRAGS, FRAG_BOTH, FRAG_FIRST, FRAG_LATER, FRAG_OFF1,
                    FRAG_WHOLE, IPPROTO_ICMP, IPPROTO_OTHER, IPPROTO_TCP, IPPROTO_UDP,
                    TCP_OPTIONS, Probe)

BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
IFACE_PATTERNS = ["eth0", "eth1", "veth-a", "srv0", "dmz0", "eth+", "veth+", "e+", "s+", "+",
                  "eth0+", "v+", "srv", "lo", "longifname12345", "longifname1234+",
                  "longifname1234", "l+"]
PROTOS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "icmp": IPPROTO_ICMP, "253": IPPROTO_OTHER}
TCP_FLAG_NAMES = ["FIN", "SYN", "RST", "PSH", "ACK", "URG"]
PORTS = [0, 1, 22, 53, 80, 443, 1023, 1024, 8080, 32768, 65534, 65535]
# ICMP (type, code) pairs safe to send into the lab: no redirects (5) and no "fragmentation
# needed" (3/4), which raw_err() would turn into a PMTU/route change that outlives the ruleset.
ICMP_PROBES = [(0, 0), (3, 0), (3, 1), (3, 3), (3, 13), (8, 0), (8, 1), (11, 0), (11, 1), (12, 0),
               (13, 0), (14, 0), (17, 0)]
# --icmp-type spellings: (text, type, code_min, code_max); type 0xFF = any (xt_tcpudp.c icmp_mt)
ICMP_RULES = [("any", 0xFF, 0, 0xFF), ("echo-request", 8, 0, 0xFF), ("echo-reply", 0, 0, 0xFF),
              ("destination-unreachable", 3, 0, 0xFF), ("port-unreachable", 3, 3, 3),
              ("host-unreachable", 3, 1, 1), ("time-exceeded", 11, 0, 0xFF),
              ("ttl-zero-during-transit", 11, 0, 0), ("timestamp-request", 13, 0, 0xFF),
              ("8", 8, 0, 0xFF), ("8/1", 8, 1, 1), ("3/13", 3, 13, 13), ("12", 12, 0, 0xFF),
              ("17/0", 17, 0, 0)]
CHAIN_BASES = ["u", "web-in", "LOGDROP_", "chain_with_a_long_name_"]


def _doc_addresses():
    out = []
    for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"):
        for a in ipaddress.IPv4Network(net):
            if a.packed[3] not in (0, 255) and str(a) not in HOST_ADDRS + PEER_ADDRS:
                out.append(str(a))
    return out


DOC_ADDRS = _doc_addresses()               # spoofable sources and forward/output destinations
ANCHORS = HOST_ADDRS + PEER_ADDRS + [a for pool in EGRESS_POOLS.values() for a in pool]


def iface_match(name: str, pattern: str) -> bool:
    """ip_packet_match() compares the name under the mask iptables built: 'eth+' = prefix."""
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


@dataclass
class Rule:
    chain: str
    src: Optional[tuple] = None        # (address, mask text, inverted)
    dst: Optional[tuple] = None
    iniface: Optional[tuple] = None    # (pattern, inverted)
    outiface: Optional[tuple] = None
    proto: Optional[tuple] = None      # (name, inverted)
    frag: Optional[bool] = None        # True: -f, False: ! -f
    sport: Optional[tuple] = None      # (lo, hi, inverted)
    dport: Optional[tuple] = None
    tcp_flags: Optional[tuple] = None  # (mask, comp, inverted, spelled as --syn)
    tcp_option: Optional[tuple] = None  # (kind, inverted)
    icmp: Optional[tuple] = None       # (ICMP_RULES entry, inverted)
    target: str = ""                   # ACCEPT/DROP/RETURN/"" or "-j NAME"/"-g NAME"

    def render(self) -> str:
        a = [f"-A {self.chain}"]
        neg = lambda inv: "! " if inv else ""  # noqa: E731
        if self.src:
            a.append(f"{neg(self.src[2])}-s {self.src[0]}/{self.src[1]}")
        if self.dst:
            a.append(f"{neg(self.dst[2])}-d {self.dst[0]}/{self.dst[1]}")
        if self.iniface:
            a.append(f"{neg(self.iniface[1])}-i {self.iniface[0]}")
        if self.outiface:
            a.append(f"{neg(self.outiface[1])}-o {self.outiface[0]}")
        if self.proto:
            a.append(f"{neg(self.proto[1])}-p {self.proto[0]}")
        if self.frag is not None:
            a.append("-f" if self.frag else "! -f")
        l4 = self.proto[0] if self.proto and not self.proto[1] else None
        if l4 in ("tcp", "udp") and (self.sport or self.dport or self.tcp_flags or self.tcp_option):
            a.append(f"-m {l4}")
            for opt, v in (("--sport", self.sport), ("--dport", self.dport)):
                if v:
                    rng = str(v[0]) if v[0] == v[1] else f"{v[0]}:{v[1]}"
                    a.append(f"{neg(v[2])}{opt} {rng}")
            if self.tcp_flags:
                mask, comp, inv, syn = self.tcp_flags
                if syn:
                    a.append(f"{neg(inv)}--syn")
                else:
                    a.append(f"{neg(inv)}--tcp-flags {_flags(mask)} {_flags(comp)}")
            if self.tcp_option:
                a.append(f"{neg(self.tcp_option[1])}--tcp-option {self.tcp_option[0]}")
        if l4 == "icmp" and self.icmp:
            a.append(f"-m icmp {neg(self.icmp[1])}--icmp-type {self.icmp[0][0]}")
        if self.target.startswith("-"):
            a.append(self.target)
        elif self.target:
            a.append(f"-j {self.target}")
        return " ".join(a)


def _flags(bits: int) -> str:
    if bits == 0:
        return "NONE"
    if bits == 0x3F:
        return "ALL"
    return ",".join(n for i, n in enumerate(TCP_FLAG_NAMES) if bits >> i & 1)


@dataclass
class Case:
    seed: int
    policies: dict
    user_chains: list
    rules: list                       # list[Rule] in chain order
    probes: list = field(default_factory=list)

    def text(self) -> str:
        lines = ["*filter"] + [f":{c} {self.policies[c]} [0:0]" for c in BUILTINS]
        lines += [f":{c} - [0:0]" for c in self.user_chains]
        for c in list(BUILTINS) + self.user_chains:
            lines += [r.render() for r in self.rules if r.chain == c]
        return "\n".join(lines + ["COMMIT", ""])

    def hooks_reaching(self) -> dict:
        """chain -> set of built-in chains from which it can be reached."""
        reach = {c: {c} for c in BUILTINS}
        for c in self.user_chains:
            reach[c] = set()
        for c in list(BUILTINS) + self.user_chains:     # user chains only jump forward
            for r in self.rules:
                if r.chain == c and r.target[:2] in ("-j", "-g"):
                    reach[r.target[3:]] |= reach[c]
        return reach


# ------------------------------------------------------------------------------------ rules

def _addr(rng):
    anchor = rng.choice(ANCHORS + DOC_ADDRS[::37])
    mask = rng.choice(["32", "32", "31", "30", "26", "25", "24", "24", "16", "8", "1", "0",
                       "255.255.0.255", "255.255.255.192"])
    return (anchor, mask, rng.random() < 0.25)


def _port_range(rng):
    lo = rng.choice(PORTS)
    hi = lo if rng.random() < 0.4 else rng.choice([p for p in PORTS if p >= lo])
    return (lo, hi, rng.random() < 0.25)


def random_rule(rng, chain: str, targets: list) -> Rule:
    r = Rule(chain)
    if rng.random() < 0.35:
        r.src = _addr(rng)
    if rng.random() < 0.35:
        r.dst = _addr(rng)
    # iptables refuses -i on OUTPUT and -o on INPUT (they can never match there); user chains
    # may have both and then see an empty name for the missing device.
    if chain != "OUTPUT" and rng.random() < 0.3:
        r.iniface = (rng.choice(IFACE_PATTERNS), rng.random() < 0.3)
    if chain != "INPUT" and rng.random() < 0.3:
        r.outiface = (rng.choice(IFACE_PATTERNS), rng.random() < 0.3)
    if rng.random() < 0.7:
        name = rng.choice(["tcp", "tcp", "udp", "udp", "icmp", "icmp", "253", "all"])
        r.proto = (name, name != "all" and rng.random() < 0.15)   # iptables: "! -p all" never matches
    if rng.random() < 0.15:
        r.frag = rng.random() < 0.6
    if r.proto and not r.proto[1] and r.proto[0] in ("tcp", "udp"):
        if rng.random() < 0.5:
            r.sport = _port_range(rng)
        if rng.random() < 0.6:
            r.dport = _port_range(rng)
        if r.proto[0] == "tcp" and rng.random() < 0.4:
            if rng.random() < 0.3:
                r.tcp_flags = (0x17, 0x02, rng.random() < 0.3, True)
            else:
                mask = rng.randrange(1, 64)
                comp = mask & rng.randrange(64) if rng.random() < 0.9 else rng.randrange(64)
                r.tcp_flags = (mask, comp, rng.random() < 0.3, False)
        if r.proto[0] == "tcp" and rng.random() < 0.25:
            r.tcp_option = (rng.choice(list(TCP_OPTIONS) + [5]), rng.random() < 0.3)
    if r.proto and not r.proto[1] and r.proto[0] == "icmp" and rng.random() < 0.7:
        r.icmp = (rng.choice(ICMP_RULES), rng.random() < 0.25)
    r.target = rng.choice(targets)
    return r


def generate(seed: int, n_random_probes: int = 8, big: bool = False) -> Case:
    """The case of `seed`; `big` gives larger, deeper tables (5-8 user chains, up to 12 rules
    per chain) from the same seeds."""
    rng = random.Random(seed)
    policies = {c: rng.choice(["ACCEPT", "ACCEPT", "DROP"]) for c in BUILTINS}
    n_user = rng.randint(5, 8) if big else rng.randint(1, 4)
    most = 12 if big else 5
    users = [f"{CHAIN_BASES[(seed + i) % len(CHAIN_BASES)]}{i}" for i in range(n_user)]
    rules = []
    for c in BUILTINS:
        targets = ["ACCEPT", "DROP", "", "RETURN"] + [f"-j {u}" for u in users] * 2 + \
                  [f"-g {u}" for u in users]
        rules += [random_rule(rng, c, targets) for _ in range(rng.randint(0, most))]
    for i, c in enumerate(users):
        later = users[i + 1:]
        targets = ["ACCEPT", "DROP", "RETURN", "RETURN", ""] + [f"-j {u}" for u in later] * 2 + \
                  [f"-g {u}" for u in later]
        rules += [random_rule(rng, c, targets) for _ in range(rng.randint(0, most))]
    # every case has a jump from a built-in chain, a goto and a RETURN somewhere
    if not any(r.target.startswith("-j") and r.chain in BUILTINS for r in rules):
        rules.insert(0, random_rule(rng, rng.choice(BUILTINS), [f"-j {users[0]}"]))
    if not any(r.target.startswith("-g") for r in rules):
        c = rng.choice(BUILTINS + tuple(users[:-1]))
        tgt = users[-1] if c in BUILTINS else users[users.index(c) + 1]
        rules.append(random_rule(rng, c, [f"-g {tgt}"]))
    if not any(r.target == "RETURN" for r in rules):
        rules.append(random_rule(rng, rng.choice(users), ["RETURN"]))
    case = Case(seed, policies, users, rules)
    case.probes = number(make_probes(case, rng, n_random_probes))
    return case


# ----------------------------------------------------------------------------------- probes

def _ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


_POOL_ADDRS = sorted(set(DOC_ADDRS[::5]) | {a for a in ANCHORS if a in DOC_ADDRS}, key=_ip)


def _endpoints(hook: str):
    """(sender, in-iface name, dst, out-iface name, dst as int) choices for a hook."""
    if hook == "INPUT":
        return [(s, SENDERS[s], d, "", _ip(d)) for s in SENDERS for d in HOST_ADDRS]
    if hook == "OUTPUT":
        return [("host", "", d, egress_of(d), _ip(d)) for d in _POOL_ADDRS]
    return [(s, SENDERS[s], d, egress_of(d), _ip(d)) for s in SENDERS for d in _POOL_ADDRS
            if egress_of(d) != SENDERS[s]]


_ENDPOINTS = {h: _endpoints(h) for h in BUILTINS}
_SRCS = [(a, _ip(a)) for a in _POOL_ADDRS]
_MASKS = {}


def _in_prefix(a: int, spec) -> bool:
    addr, mask, inv = spec
    key = (addr, mask)
    if key not in _MASKS:
        # iptables also takes dotted masks, non-contiguous ones included
        m = _ip(mask) if "." in mask else (0xFFFFFFFF << (32 - int(mask))) & 0xFFFFFFFF
        _MASKS[key] = (m, _ip(addr) & m)
    m, net = _MASKS[key]
    return ((a & m) == net) != inv


def probe_for(rule: Rule, hook: str, rng, flip: Optional[str] = None) -> Probe:
    """A probe for `hook` that satisfies every field of `rule`, except `flip` which it misses."""
    def ok(name, cond):
        return cond if name != flip else not cond

    endpoints = _ENDPOINTS[hook]
    if rule.dst and rule.dst[0] in DOC_ADDRS and hook != "INPUT":
        d = rule.dst[0]        # also try the rule's own address (exact /32 rules)
        endpoints = endpoints + [e[:2] + (d, egress_of(d), _ip(d)) for e in endpoints[:: 50]
                                 if e[1] != egress_of(d)]
    eps = [e for e in endpoints
           if (rule.iniface is None or ok("iniface", iface_match(e[1], rule.iniface[0]) != rule.iniface[1]))
           and (rule.outiface is None or ok("outiface", iface_match(e[3], rule.outiface[0]) != rule.outiface[1]))
           and (rule.dst is None or ok("dst", _in_prefix(e[4], rule.dst)))]
    sender, _, dst, _, _ = rng.choice(eps or _ENDPOINTS[hook])
    cands = _SRCS + ([(rule.src[0], _ip(rule.src[0]))] if rule.src and rule.src[0] in DOC_ADDRS else [])
    srcs = [a for a, ai in cands if rule.src is None or ok("src", _in_prefix(ai, rule.src))]
    src = rng.choice(srcs or DOC_ADDRS)
    p = Probe(hook, sender, src, dst)

    protos = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_OTHER]
    if rule.proto and rule.proto[0] != "all":
        want = PROTOS[rule.proto[0]]
        if ok("proto", not rule.proto[1]):
            p.proto = want
        else:
            p.proto = rng.choice([x for x in protos if x != want])
    else:
        p.proto = rng.choice(protos)

    frags = COMPLETE_FRAGS if hook == "INPUT" else ALL_FRAGS
    if rule.frag is not None:
        later = ok("frag", rule.frag)        # want a non-first fragment
        choices = [f for f in frags if (f in (FRAG_LATER, FRAG_OFF1)) == later]
        p.frag = rng.choice(choices or frags)
    elif rule.sport or rule.dport or rule.tcp_flags or rule.tcp_option or rule.icmp:
        # a later fragment never matches tcp/udp/icmp and a tiny one is hotdropped
        p.frag = rng.choice([f for f in frags if f in (FRAG_WHOLE, FRAG_BOTH, FRAG_FIRST)]) \
            if rng.random() < 0.25 else FRAG_WHOLE
    else:
        p.frag = rng.choice(frags) if rng.random() < 0.25 else FRAG_WHOLE

    def port(spec, name):
        if spec is None:
            return rng.choice(PORTS + [rng.randrange(65536)])
        lo, hi, inv = spec
        inside = ok(name, not inv)
        if inside:
            return rng.choice([lo, hi, rng.randint(lo, hi)])
        outside = [x for x in (lo - 1, hi + 1, 0, 65535) if 0 <= x <= 65535 and not lo <= x <= hi]
        return rng.choice(outside) if outside else lo
    p.sport, p.dport = port(rule.sport, "sport"), port(rule.dport, "dport")

    if rule.tcp_flags:
        mask, comp, inv, _ = rule.tcp_flags
        flags = rng.randrange(256) & ~mask | comp
        if not ok("tcp_flags", not inv):
            flags ^= 1 << rng.choice([i for i in range(6) if mask >> i & 1])
        p.tcp_flags = flags
    else:
        p.tcp_flags = rng.choice([0x02, 0x10, 0x12, 0x11, 0x04, 0x18, rng.randrange(256)])
    opts = set(rng.sample(sorted(TCP_OPTIONS), rng.randint(0, 3)))
    if rule.tcp_option:
        kind, inv = rule.tcp_option
        if ok("tcp_option", not inv):
            if kind in TCP_OPTIONS:
                opts.add(kind)
        else:
            opts.discard(kind)
    p.tcp_opts = tuple(sorted(opts))

    if rule.icmp:
        (_, t, cmin, cmax), inv = rule.icmp
        good = [tc for tc in ICMP_PROBES if (t == 0xFF or (tc[0] == t and cmin <= tc[1] <= cmax))]
        bad = [tc for tc in ICMP_PROBES if tc not in good]
        pool = good if ok("icmp", not inv) else bad
        p.icmp_type, p.icmp_code = rng.choice(pool or ICMP_PROBES)
    else:
        p.icmp_type, p.icmp_code = rng.choice(ICMP_PROBES)
    if p.proto == IPPROTO_TCP and rng.random() < 0.05:
        p.tcp_doff = rng.choice([2, 4, 15])      # bad data offsets: hotdrop with --tcp-option
    p.ip_opts = rng.random() < 0.1
    p.payload_len = rng.choice([8, 24, 24, 100])
    p.note = f"{'hit' if flip is None else 'miss ' + flip} {rule.render()}"
    return p


def _fields(rule: Rule):
    return [f for f in ("src", "dst", "iniface", "outiface", "proto", "frag", "sport", "dport",
                        "tcp_flags", "tcp_option", "icmp") if getattr(rule, f) is not None]


def _along_path(case: Case, rule: Rule, rng, depth: int = 0):
    """(built-in chain, rule, rules before it on the way) where the rule also carries the fields
    of one chain of jump rules leading to it from that built-in chain (the rule's own fields
    win), so that a probe built for it passes the jumps first."""
    before = [r for r in case.rules[:case.rules.index(rule)] if r.chain == rule.chain]
    if rule.chain in BUILTINS or depth > 8:
        return rule.chain, rule, before
    callers = [r for r in case.rules if r.target in (f"-j {rule.chain}", f"-g {rule.chain}")]
    if not callers:
        return None, rule, before
    hook, up, up_before = _along_path(case, rng.choice(callers), rng, depth + 1)
    merged = Rule(rule.chain, target=rule.target)
    for f in _fields(up) + _fields(rule):
        setattr(merged, f, getattr(rule, f) if getattr(rule, f) is not None else getattr(up, f))
    if merged.proto != rule.proto and rule.proto is not None:
        for f in ("sport", "dport", "tcp_flags", "tcp_option", "icmp"):   # keep L4 consistent
            setattr(merged, f, getattr(rule, f))
    return hook, merged, up_before + before


def roughly_matches(rule: Rule, p: Probe) -> bool:
    """Whether `rule` matches probe `p`, roughly as ip_packet_match() + tcp_mt/udp_mt/icmp_match
    would (no hotdrop, no truncation): only used to steer probes past earlier rules."""
    in_if = SENDERS.get(p.sender, "")
    out_if = "" if p.hook == "INPUT" else egress_of(p.dst)
    if rule.src and not _in_prefix(_ip(p.src), rule.src):
        return False
    if rule.dst and not _in_prefix(_ip(p.dst), rule.dst):
        return False
    if rule.iniface and iface_match(in_if, rule.iniface[0]) == rule.iniface[1]:
        return False
    if rule.outiface and iface_match(out_if, rule.outiface[0]) == rule.outiface[1]:
        return False
    if rule.proto and rule.proto[0] != "all" and (PROTOS[rule.proto[0]] == p.proto) == rule.proto[1]:
        return False
    later = p.hook != "INPUT" and p.frag in (FRAG_LATER, FRAG_OFF1)
    if rule.frag is not None and rule.frag != later:
        return False
    l4 = rule.proto[0] if rule.proto and not rule.proto[1] else None
    if l4 in ("tcp", "udp") and (rule.sport or rule.dport or rule.tcp_flags or rule.tcp_option):
        if later:
            return False
        for spec, v in ((rule.sport, p.sport), (rule.dport, p.dport)):
            if spec and (spec[0] <= v <= spec[1]) == spec[2]:
                return False
        if rule.tcp_flags and ((p.tcp_flags & rule.tcp_flags[0]) == rule.tcp_flags[1]) == rule.tcp_flags[2]:
            return False
        if rule.tcp_option and (rule.tcp_option[0] in p.tcp_opts) == rule.tcp_option[1]:
            return False
    if l4 == "icmp" and rule.icmp:
        if later:
            return False
        (_, t, cmin, cmax), inv = rule.icmp
        if (t == 0xFF or (p.icmp_type == t and cmin <= p.icmp_code <= cmax)) == inv:
            return False
    return True


def make_probes(case: Case, rng, n_random: int, tries: int = 6):
    reach = case.hooks_reaching()
    probes = []
    for r in case.rules:
        if not reach[r.chain]:
            continue
        hook, aimed, before = _along_path(case, r, rng)
        if hook is None:
            continue
        # prefer a probe that earlier rules with a target let through to this one
        blockers = [b for b in before if b.target]
        for _ in range(tries):
            p = probe_for(aimed, hook, rng)
            if not any(roughly_matches(b, p) for b in blockers):
                break
        p.note = f"hit {r.render()}"
        probes.append(p)
        fs = _fields(r)
        if fs:
            flip = rng.choice(fs)
            probes.append(probe_for(aimed, hook, rng, flip=flip))
            probes[-1].note = f"miss {flip} {r.render()}"
    for _ in range(n_random):
        probes.append(probe_for(Rule("INPUT"), rng.choice(BUILTINS), rng))
        probes[-1].note = "random"
    return probes


def describe_case(case: Case) -> str:
    """How a failing case is printed: its seed, then its ruleset."""
    return f"seed {case.seed}:\n{case.text()}"
