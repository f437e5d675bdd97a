"""The incremental decode (issue #7: one append on a 10 000-rule table decodes what changed)
against the cold decode, without the kernel (the kernel side of these checks is
test_codec_errors.py and the differential suites).

- mark_source_chains on whole chains (model._mark_fast) gives the comefrom values, or the ELOOP
  error, of the entry-by-entry walk (model._mark_source_chains) wherever it answers at all;
- a sequence of edits (appends, inserts, deletes, same-size rewrites, new and removed chains,
  jumps into the middle of chains, gotos, loops, a chain falling off its end, live counters)
  decoded warm (decode_replace after decode_replace: walk, rules and derived lists reused)
  equals each blob decoded cold: the Table, every entry's position data, the jumps' landing
  places, the kept blob, the extension names, the error of a refused blob;
- a rule is shared with the previous table only where its bytes and position data are the same.
"""
from __future__ import annotations

import copy
import ipaddress
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from construct import Container  # noqa: E402

from bpfilter_umh import model, uapi  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402
from bpfilter_umh.model import (  # noqa: E402
    AF_INET, AF_INET6, XT_RETURN, Chain, IpHeader, Jump, Match, Rule, Table, Verdict,
    decode_replace, error_target)

ACCEPT, DROP = -2, -1
CACHES = ("_ENTRY_CACHE", "_LAST_WALK")


def clear_caches():
    for name in CACHES:
        getattr(model, name).clear()


def _addr(rng, family):
    if family == AF_INET:
        return ipaddress.IPv4Address(rng.choice([0xC0000200, 0xC6336400, 0xCB007100])
                                     + rng.randrange(256))
    return ipaddress.IPv6Address((0x20010DB8 << 96) + rng.randrange(1 << 16))


def _full(family):
    return ipaddress.IPv4Address(0xFFFFFFFF) if family == AF_INET else \
        ipaddress.IPv6Address((1 << 128) - 1)


def _rule(rng, family, user, jumps=True):
    """A random rule: conditional or not, a verdict, a jump or goto into a user chain (any
    position of its body), sometimes a tcp/udp match."""
    ip = IpHeader.any(family)
    if rng.random() < 0.75:
        ip.src, ip.smsk = _addr(rng, family), _full(family)
    ms = []
    if rng.random() < 0.25:
        proto = rng.choice([6, 17])
        ip.proto = proto
        if family == AF_INET6:
            ip.flags |= uapi.IP6T_F_PROTO
        port = rng.randrange(1, 65536)
        if proto == 6:
            ms.append(Match("tcp", 0, Container(spts=[0, 65535], dpts=[port, port], option=0,
                                                flg_mask=0, flg_cmp=0, invflags=0)))
        else:
            ms.append(Match("udp", 0, Container(spts=[0, 65535], dpts=[port, port],
                                                invflags=0)))
    if jumps and user and rng.random() < 0.35:
        goto = rng.random() < 0.2
        if goto:
            ip.flags |= uapi.layout(family).f_goto
        entry = 0 if rng.random() < 0.8 else rng.randrange(-1, 4)
        return Rule(ip, ms, Jump(rng.choice(user), goto, 0, entry))
    return Rule(ip, ms, Verdict(rng.choice([ACCEPT, DROP, XT_RETURN, XT_RETURN])))


def _user_chain(rng, family, name, user, n):
    pe = Rule(IpHeader.any(family), target=Verdict(XT_RETURN)) if rng.random() < 0.9 else None
    return Chain(name, head_entry=Rule(IpHeader.any(family), target=error_target(name)),
                 rules=[_rule(rng, family, user) for _ in range(n)], policy_entry=pe)


def _table(rng, family, nuser=4, nrules=6):
    t = Table.empty("filter", family)
    t = copy.deepcopy(t)
    user = [f"u{k}" for k in range(nuser)]
    for c in t.chains:
        c.rules = [_rule(rng, family, user) for _ in range(rng.randrange(nrules))]
    t.chains += [_user_chain(rng, family, u, user, rng.randrange(nrules)) for u in user]
    return t


def _settle(t):
    """Jumps aimed inside their chain's body (edits may shorten a chain) and the layout."""
    names = {c.name: c for c in t.chains}
    for c in t.chains:
        for r in c.body():
            if isinstance(r.target, Jump):
                body = len(names[r.target.chain].body())
                r.target.chain_pos = -1
                if body == 0 or r.target.entry >= body:
                    r.target.entry = 0 if body else -1
    t.layout()
    return t


def _blob(t):
    t = _settle(t)
    return t.encode(), t.hook_entry, t.underflow, t.valid_hooks, t.num_entries


def _outcome(f):
    try:
        return ("ok", f())
    except BpfilterError as e:
        return ("error", e.errno, str(e))


# ---- mark_source_chains on whole chains == entry by entry ------------------------------------

@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_mark_fast_equals_the_entry_walk(family):
    rng = random.Random(family)
    fast_ok = fast_err = 0
    for _ in range(600):
        t = _table(rng, family, nuser=rng.randrange(1, 6), nrules=5)
        blob, he, uf, vh, _n = _blob(t)
        lay = uapi.layout(family)
        try:
            raws, _, _ = model._walk(blob, lay, he, uf, vh)
        except BpfilterError:
            continue
        memo = model._Memo(raws, 0, 0, len(blob), None)
        fast = _outcome(lambda: model._mark_fast(raws, he, vh, memo.at, memo))
        slow = _outcome(lambda: model._mark_source_chains(raws, len(blob), he, vh, memo.at))
        if fast == ("ok", None):
            continue                    # not a table of whole chains: the entry walk answers
        assert fast == slow
        fast_ok += fast[0] == "ok"
        fast_err += fast[0] == "error"
    # both answers of the fast walk were exercised
    assert fast_ok > 100 and fast_err > 20, (fast_ok, fast_err)


# ---- warm decode == cold decode along a sequence of edits --------------------------------------

def _edit(rng, t):
    """One random edit of table t (a copy)."""
    t = copy.deepcopy(t)
    family = t.family
    user = [c for c in t.chains if not c.builtin]
    names = [c.name for c in user]
    c = rng.choice(t.chains)
    op = rng.random()
    if user and rng.random() < 0.08:                    # a user chain jumping to itself
        u = rng.choice(user)
        u.rules.insert(rng.randrange(len(u.rules) + 1),
                       Rule(IpHeader.any(family), target=Jump(u.name)))
    elif user and rng.random() < 0.04:                  # no RETURN: falls into what follows
        rng.choice(user).policy_entry = None
    elif op < 0.35:                                     # append (iptables -A)
        c.rules.append(_rule(rng, family, names))
    elif op < 0.5:                                      # insert (iptables -I)
        c.rules.insert(rng.randrange(len(c.rules) + 1), _rule(rng, family, names))
    elif op < 0.65 and c.rules:                         # delete (iptables -D)
        c.rules.pop(rng.randrange(len(c.rules)))
    elif op < 0.8 and c.rules:                          # same size, other bytes (iptables -R)
        r = c.rules[rng.randrange(len(c.rules))]
        r.ip = copy.deepcopy(r.ip)
        r.ip.src, r.ip.smsk = _addr(rng, family), _full(family)
    elif op < 0.9:                                      # a new chain (iptables -N), jumped to
        name = f"n{rng.randrange(1000)}"
        if name not in names:
            new = _user_chain(rng, family, name, names, rng.randrange(3))
            t.chains.insert(rng.randrange(len(t.chains) - len(user), len(t.chains) + 1), new)
            rng.choice(t.chains).rules.append(Rule(IpHeader.any(family), target=Jump(name)))
    elif user:                                          # a chain removed (iptables -X)
        gone = rng.choice(user)
        used = any(isinstance(r.target, Jump) and r.target.chain == gone.name
                   for x in t.chains for r in x.body())
        if not used:
            t.chains.remove(gone)
    return t


def _noisy(rng, blob, family):
    """Live counters and stale comefrom in some entries, as libiptc sends them back."""
    if rng.random() < 0.5:
        return blob
    cf, cnt, _ = model._VOLATILE[family]
    out = bytearray(blob)
    off = 0
    while off < len(out):
        nxt = int.from_bytes(out[off + cf - 2:off + cf], "little")
        if rng.random() < 0.1:
            out[off + cf:off + cf + 4] = rng.getrandbits(5).to_bytes(4, "little")
            out[off + cnt:off + cnt + 16] = rng.getrandbits(100).to_bytes(16, "little")
        off += nxt
    return bytes(out)


def _buf(blob, he, uf, vh, n):
    return uapi.ipt_replace.build(dict(
        name=b"filter".ljust(32, b"\0"), valid_hooks=vh, num_entries=n, size=len(blob),
        hook_entry=list(he), underflow=list(uf), num_counters=n, counters=0)) + blob


def _facts(t):
    """Everything a decoded table says, read without laying it out again (Table.layout
    would write position data into the rules)."""
    ents = t.entries()
    jumps = [(r.index, r.target.chain, r.target.entry, r.target.chain_pos, r.target.offset,
              r.target.goto) for r in ents if isinstance(r.target, Jump)]
    return ([(r.index, r.offset, r.comefrom, r.counters, r.ip, tuple(r.matches))
             for r in ents], jumps, t.kept_blob, t.target_names, t.match_names,
            [c.name for c in t.chains])


@pytest.mark.parametrize("family,seed", [(AF_INET, 1), (AF_INET, 2), (AF_INET6, 3)])
def test_warm_decode_equals_cold_along_edits(family, seed):
    rng = random.Random(seed)
    good = _table(rng, family, nuser=4, nrules=8)
    bufs = []
    for _ in range(150):
        t = _edit(rng, good)
        blob, he, uf, vh, n = _blob(t)
        bufs.append(_buf(_noisy(rng, blob, family), he, uf, vh, n))
        # carry on from the edit unless the kernel would refuse it (a loop, a fall off the end)
        clear_caches()
        if _outcome(lambda: decode_replace(bufs[-1], family))[0] == "ok":
            good = t
    cold = []
    for b in bufs:
        clear_caches()
        got = _outcome(lambda: decode_replace(b, family)[1])
        cold.append(got if got[0] == "error" else ("ok", got[1], _facts(got[1])))
    assert sum(c[0] == "error" for c in cold) >= 2, "some edits are refused"
    clear_caches()
    prev = None
    shared = 0
    last = None         # the last table decoded and what it said then
    for i, (b, want) in enumerate(zip(bufs, cold)):
        got = _outcome(lambda: decode_replace(b, family)[1])
        # the table decoded before (the one installed while this one is checked and compiled)
        # is untouched by this decode
        if last is not None:
            assert _facts(last[0]) == last[1], i
        if want[0] == "error":
            assert got == want, i
            prev = None
            continue
        assert got[0] == "ok", (i, got)
        assert got[1] == want[1], i
        assert _facts(got[1]) == want[2], i
        last = (got[1], _facts(got[1]))
        # a rule shared with the previous table has the same bytes and position data there
        if prev is not None:
            old = {id(r): r for r in prev[0]}
            for r in got[1].entries():
                if id(r) in old:
                    shared += 1
                    assert prev[1][id(r)] == (r.index, r.offset, r.comefrom), i
        ents = got[1].entries()
        prev = (ents, {id(r): (r.index, r.offset, r.comefrom) for r in ents})
    assert shared > 200


def _plain(family, nuser):
    """Empty built-in chains and user chains u0.. with their RETURN."""
    t = copy.deepcopy(Table.empty("filter", family))
    for k in range(nuser):
        name = f"u{k}"
        t.chains.append(Chain(name, head_entry=Rule(IpHeader.any(family),
                                                    target=error_target(name)),
                              policy_entry=Rule(IpHeader.any(family),
                                                target=Verdict(XT_RETURN))))
    return t


def test_append_shares_the_rules_before_it_and_places_the_rest_anew():
    """An append to INPUT shares INPUT's earlier rules with the previous table; the entries
    behind it (user chains) are new objects one index and one entry size further, and the
    jumps into them name their new offsets."""
    family = AF_INET
    t = _plain(family, 3)
    user = [c.name for c in t.chains if not c.builtin]
    inp = t.chain("INPUT")
    inp.rules = [Rule(_ip_src(k), target=Verdict(DROP)) for k in range(50)]
    inp.rules += [Rule(IpHeader.any(family), target=Jump(u)) for u in user]
    for c in t.chains:
        if not c.builtin:
            c.rules = [Rule(_ip_src(200 + k), target=Verdict(ACCEPT)) for k in range(4)]
    t2 = copy.deepcopy(t)
    t2.chain("INPUT").rules.append(Rule(_ip_src(99), target=Verdict(DROP)))
    bufs = [_buf(*_blob(x)) for x in (t, t2)]
    clear_caches()
    want = decode_replace(bufs[1], family)[1]
    clear_caches()
    a = decode_replace(bufs[0], family)[1]
    b = decode_replace(bufs[1], family)[1]
    assert b == want and _facts(b) == _facts(want)
    ra, rb = a.chain("INPUT").rules, b.chain("INPUT").rules
    assert all(x is y for x, y in zip(ra[:50], rb[:50]))
    size = rb[-1].offset - rb[-2].offset    # the appended entry's size: what moved behind it
    for ca, cb in zip(a.chains[3:], b.chains[3:]):
        for x, y in zip(ca.entries(), cb.entries()):
            assert x is not y and (y.index, y.offset) == (x.index + 1, x.offset + size)
    for x, y in zip(ra[50:], rb[50:53]):
        assert y.target.offset == x.target.offset + size
        assert y.target.offset == b.chain(y.target.chain).rules[0].offset


def _ip_src(k, family=AF_INET):
    ip = IpHeader.any(family)
    ip.src, ip.smsk = ipaddress.IPv4Address(0xCB007100 + k % 256), _full(family)
    if k >= 256:
        ip.dst, ip.dmsk = ipaddress.IPv4Address(0xC6336400 + k // 256), _full(family)
    return ip


def test_loop_made_by_the_appended_rule_is_refused_as_cold():
    """u0 jumps to u1; appending "jump to u0" to u1 closes a loop: the warm decode (after the
    table without it) refuses it with the cold decode's errno and message, and the decode
    after that is right again."""
    family = AF_INET
    t = _plain(family, 2)
    t.chain("INPUT").rules = [Rule(_ip_src(k), target=Verdict(DROP)) for k in range(30)]
    t.chain("INPUT").rules.append(Rule(IpHeader.any(family), target=Jump("u0")))
    t.chain("u0").rules = [Rule(_ip_src(40), target=Jump("u1"))]
    t.chain("u1").rules = [Rule(_ip_src(41), target=Verdict(ACCEPT))]
    bad = copy.deepcopy(t)
    bad.chain("u1").rules.append(Rule(_ip_src(42), target=Jump("u0")))
    ok, loop = (_buf(*_blob(x)) for x in (t, bad))
    clear_caches()
    cold = _outcome(lambda: decode_replace(loop, family))
    assert cold[0] == "error" and cold[1] == 40        # ELOOP
    clear_caches()
    decode_replace(ok, family)
    assert _outcome(lambda: decode_replace(loop, family)) == cold
    clear_caches()
    want = decode_replace(ok, family)[1]
    clear_caches()
    decode_replace(ok, family)
    _outcome(lambda: decode_replace(loop, family))
    assert decode_replace(ok, family)[1] == want


def test_same_size_rewrite_is_not_shared():
    """A rule rewritten in place (other address, same size: nothing moves) is decoded anew;
    its neighbours are shared."""
    family = AF_INET
    t = _plain(family, 1)
    t.chain("INPUT").rules = [Rule(_ip_src(k), target=Verdict(DROP)) for k in range(40)]
    t2 = copy.deepcopy(t)
    t2.chain("INPUT").rules[20].ip.src = ipaddress.IPv4Address("198.51.100.20")
    b0, b1 = (_buf(*_blob(x)) for x in (t, t2))
    clear_caches()
    a = decode_replace(b0, family)[1]
    b = decode_replace(b1, family)[1]
    ra, rb = a.chain("INPUT").rules, b.chain("INPUT").rules
    assert rb[20] is not ra[20] and str(rb[20].ip.src) == "198.51.100.20"
    assert str(ra[20].ip.src) != "198.51.100.20"
    assert all(ra[k] is rb[k] for k in range(40) if k != 20)
    clear_caches()
    assert decode_replace(b1, family)[1] == b


def test_new_hook_reaching_an_earlier_chain_changes_its_comefrom():
    """u0 (reached from INPUT) lies before the change; a rule appended to u1 (reached from
    OUTPUT) jumps to u0: u0's entries, not moved, now carry the OUTPUT bit too (placed anew,
    not shared), as in the cold decode; the previous table keeps its values."""
    family = AF_INET
    t = _plain(family, 2)
    t.chain("INPUT").rules = [Rule(_ip_src(k), target=Verdict(DROP)) for k in range(5)]
    t.chain("INPUT").rules.append(Rule(IpHeader.any(family), target=Jump("u0")))
    t.chain("OUTPUT").rules = [Rule(IpHeader.any(family), target=Jump("u1"))]
    t.chain("u0").rules = [Rule(_ip_src(50 + k), target=Verdict(ACCEPT)) for k in range(3)]
    t.chain("u1").rules = [Rule(_ip_src(60), target=Verdict(ACCEPT))]
    t2 = copy.deepcopy(t)
    t2.chain("u1").rules.append(Rule(_ip_src(61), target=Jump("u0")))
    b0, b1 = (_buf(*_blob(x)) for x in (t, t2))
    clear_caches()
    want = decode_replace(b1, family)[1]
    clear_caches()
    a = decode_replace(b0, family)[1]
    before = _facts(a)
    b = decode_replace(b1, family)[1]
    assert _facts(a) == before
    assert b == want and _facts(b) == _facts(want)
    ua, ub = a.chain("u0").rules, b.chain("u0").rules
    assert all(x.comefrom == 1 << 1 and y.comefrom == (1 << 1 | 1 << 3) and x is not y
               for x, y in zip(ua, ub))


def test_renamed_chain_leaves_the_previous_tables_jumps_alone():
    """iptables -E u1 u9 (same place, same size): INPUT's jump to it keeps its bytes, and now
    names u9; the previous table's jump still names u1."""
    family = AF_INET
    t = _plain(family, 3)
    t.chain("INPUT").rules = [Rule(_ip_src(k), target=Verdict(DROP)) for k in range(5)]
    t.chain("INPUT").rules += [Rule(IpHeader.any(family), target=Jump(u)) for u in ("u0", "u1")]
    t2 = copy.deepcopy(t)
    t2.chain("u1").name = "u9"
    t2.chain("u9").head_entry = Rule(IpHeader.any(family), target=error_target("u9"))
    t2.chain("INPUT").rules[-1].target.chain = "u9"
    b0, b1 = (_buf(*_blob(x)) for x in (t, t2))
    clear_caches()
    a = decode_replace(b0, family)[1]
    before = _facts(a)
    b = decode_replace(b1, family)[1]
    assert _facts(a) == before
    assert [r.target.chain for r in a.chain("INPUT").rules[5:]] == ["u0", "u1"]
    assert [r.target.chain for r in b.chain("INPUT").rules[5:]] == ["u0", "u9"]
