"""The classifier's column-at-a-time paths (issue #7, session 7: a cold compile of 10 000 rules)
answer exactly what their one-rule-at-a-time forms answer:

  - classify._lpm_columns (prefixes as ints, a sweep only when some prefix holds another) against
    _lpm_first_slow and against the definition (the smallest position among the rules whose
    prefix contains the key);
  - classify._keys_rule_keys / _ippart_keys (the hash keys read from every key in one loop)
    against _key_rule_keys and _rule_keys of each rule;
  - classify._shared_bodies reading the walked chains (compile.chain_info) against the walk of
    _case_key: the same programs and maps (the case map included);
  - compile._plain_lands (a chain's jump landings read column by column) against
    _program_key's loop: the same program keys, walk records and chain_info.

Each comparison is also run once against a deliberately broken fast path, which it must catch.
"""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_classify_fast import _compiled, _decode  # noqa: E402
from test_compile_util import ACCEPT, DROP, RETURN, goto, jump, rule, table, tcp, udp  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import KernelFacts  # noqa: E402


def _chain_rules(rules: list) -> list:
    t = _decode(table({"FORWARD": (ACCEPT, rules)}, {"u": [rule(RETURN)]}))
    return t.chain("FORWARD").rules


# ---- LPM keys ----------------------------------------------------------------------------------

def _random_prefixes(rnd, n: int) -> list:
    """Nested and disjoint prefixes (a few /8 and /16 above many /24 and /32), repeats too."""
    out = []
    for _ in range(n):
        plen = rnd.choice([8, 16, 16, 24, 24, 24, 28, 32, 32])
        net = rnd.choice([10, 11]) << 24 | rnd.randrange(4) << 16 | rnd.randrange(8) << 8 | \
            rnd.randrange(256)
        net &= ((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1)
        out.append((net, plen))
    return out


def _lpm_by_definition(prefixes: list, positions) -> list:
    first = {}
    for pos, k in zip(positions, prefixes):
        first.setdefault(k, pos)
    out = []
    for (net, plen), _ in sorted(first.items()):
        best = min(p for (n2, l2), p in first.items()
                   if l2 <= plen and (net ^ n2) >> (32 - l2) == 0)
        out.append((classify._PLEN_LE[plen] + net.to_bytes(4, "big"), best))
    return out


def _lpm_first(positions) -> list:
    """classify._lpm_columns of the source prefixes as [(LPM key, position)]."""
    return list(zip(*classify._lpm_columns([], positions, "src")))


@pytest.mark.parametrize("seed", range(6))
def test_lpm_first_is_the_definition(monkeypatch, seed):
    rnd = random.Random(seed)
    prefixes = _random_prefixes(rnd, 400)
    positions = sorted(rnd.sample(range(5000), len(prefixes))) if seed % 2 else \
        range(len(prefixes))
    monkeypatch.setattr(classify, "_prefixes", lambda rules, positions, field, run=None: prefixes)
    want = _lpm_by_definition(prefixes, positions)
    assert _lpm_first(positions) == want
    assert classify._lpm_first_slow(prefixes, positions) == want
    disjoint = sorted(set((net, 32) for net, _ in prefixes))        # no prefix holds another
    monkeypatch.setattr(classify, "_prefixes", lambda rules, positions, field, run=None: disjoint)
    assert _lpm_first(range(len(disjoint))) == \
        _lpm_by_definition(disjoint, range(len(disjoint)))


def test_lpm_first_top_of_the_address_space(monkeypatch):
    """_lpm_columns sorts its codes (network << 8 | length, up to 40 bits) as the floats
    2**52 + code: exact below 2**53, so neighbours at the very top (255.255.255.x, codes 256
    apart near 2**40) and a /31 holding a /32 keep their order."""
    prefixes = [(0xffffff00 | b, 32) for b in range(255, -1, -3)] + \
        [(0xfffffffe, 31), (0xffffff00, 24), (0xfffffff0, 28), (0xffffffff, 32)]
    monkeypatch.setattr(classify, "_prefixes", lambda rules, positions, field, run=None: prefixes)
    assert _lpm_first(range(len(prefixes))) == \
        _lpm_by_definition(prefixes, range(len(prefixes)))


def test_broken_lpm_first_is_caught(monkeypatch):
    """Nesting never seen (the sweep skipped): a prefix keeps its own position."""
    prefixes = _random_prefixes(random.Random(0), 400)
    monkeypatch.setattr(classify, "_prefixes", lambda rules, positions, field, run=None: prefixes)
    monkeypatch.setattr(classify, "gt", lambda a, b: False)
    assert _lpm_first(range(len(prefixes))) != \
        _lpm_by_definition(prefixes, range(len(prefixes)))


# ---- hash keys ---------------------------------------------------------------------------------

def _hash_rules(rnd, n: int) -> list:
    """tcp and udp rules of one tcp/udp shape: exact ports and small ranges."""
    out = []
    for _ in range(n):
        m = rnd.choice([tcp, udp])
        lo = rnd.randrange(1, 60000)
        dport = rnd.choice([(lo, lo), (lo, lo), (lo, lo + rnd.randrange(4))])
        out.append(rule(rnd.choice([ACCEPT, DROP]), m(dport=dport),
                        proto=6 if m is tcp else 17, dst=f"198.51.100.{rnd.randrange(256)}/32"))
    return out


def _run_of(rules: list):
    classify._CLASSES.clear()
    classify._VECS.clear()
    runs = classify.find_runs(rules)
    assert runs and runs[0].kind == "hash"
    run = max(runs, key=lambda r: len(r.rules))
    assert classify._run_classes(run) is not None
    return run


def _keys_each(run, sig=None, positions=None, pad=0):
    """_run_rule_keys one rule at a time (the loop the fast path replaces)."""
    sig = run.sig if sig is None else sig
    positions = range(len(run.rules)) if positions is None else positions
    shape = run if sig == run.sig else classify.Run("hash", 0, [], sig)
    out = []
    for pos in positions:
        c = run.cls[pos]
        ks = classify._key_rule_keys(sig, run.keys[pos], c.lay, pad)
        if ks is None:
            ks = [k[:14] + pad.to_bytes(2, "little")
                  for k in classify._rule_keys(shape, run.rules[pos])]
        out.append(ks)
    return out


def test_hash_keys_are_each_rules():
    run = _run_of(_chain_rules(_hash_rules(random.Random(2), 700)))
    assert classify._run_rule_keys(run) == _keys_each(run)
    some = list(range(0, len(run.rules), 3))
    assert classify._run_rule_keys(run, positions=some, pad=5) == \
        _keys_each(run, positions=some, pad=5)
    assert classify._ippart_keys(run, some, 5) == [
        classify._hash_key(classify._le32(r.ip.src), classify._le32(r.ip.dst), r.ip.proto, 0,
                           0, 1)[:14] + b"\x05\x00"
        for r in (run.rules[p] for p in some)]


def test_broken_hash_keys_are_caught(monkeypatch):
    """Port ranges read as their first port only."""
    run = _run_of(_chain_rules(_hash_rules(random.Random(2), 700)))
    want = _keys_each(run)
    assert any(len(ks) > 1 for ks in want)
    monkeypatch.setattr(classify, "range", lambda a, b=None: range(a) if b is None else
                        range(a, a + 1), raising=False)
    assert classify._run_rule_keys(run) != want


# ---- shared jump-case bodies -------------------------------------------------------------------

def _fanout(services: int = 300):
    rules = [rule(jump(f"S{k}"), tcp(dport=(80, 80)), proto=6, dst=f"10.96.{k // 250}.{k % 250}/32")
             for k in range(services)]
    user = {f"S{k}": [rule(ACCEPT, src="192.0.2.0/27"), rule(RETURN, src="192.0.2.32/27"),
                      rule(DROP)] for k in range(services)}
    return _decode(table({"INPUT": (ACCEPT, rules)}, user))


def _fresh():
    C._PROG_CACHE.clear()
    classify._FN_CACHE.clear()
    classify._RUN_SPECS.clear()
    classify._SEEN_RUNS.clear()


def _bodies_both(monkeypatch, t):
    facts = KernelFacts.fake()
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    _fresh()
    made = classify.FN_STATS["made"]
    fast = _compiled(t, facts)
    assert classify.FN_STATS["made"] > made          # shared bodies were built
    _fresh()
    with monkeypatch.context() as m:                 # every case through _case_key's walk
        m.setattr(C, "chain_info", lambda table: {})
        slow = _compiled(t, facts)
    _fresh()
    return fast, slow


def test_shared_bodies_read_as_walked(monkeypatch):
    fast, slow = _bodies_both(monkeypatch, _fanout())
    assert fast == slow
    assert any(name.startswith("case_") for name, _ in fast["INPUT"][1])


def test_broken_shared_bodies_are_caught(monkeypatch):
    """The walked facts of every other case chain read with a changed last rule: its body is
    no longer the others', and the programs must differ."""
    t = _fanout()
    odd = {id(c) for c in t.chains if c.name.startswith("S") and int(c.name[1:]) % 2}
    real = C.chain_info

    def skewed(table):
        hit = C._WALKS.get(id(table))
        if hit is None or hit[0] is not table:
            return real(table)
        if not isinstance(hit[4], _Skewed):
            hit[4] = _Skewed(hit[4], odd)
        return hit[4]

    fast, slow = _bodies_both(monkeypatch, t)
    assert fast == slow
    monkeypatch.setattr(C, "chain_info", skewed)
    _fresh()
    broken = _compiled(t, KernelFacts.fake())
    _fresh()
    assert broken != slow


class _Skewed(dict):
    """compile.chain_info whose get() gives the chains in `odd` another last rule key."""

    def __init__(self, info, odd):
        super().__init__(info)
        self.odd = odd

    def get(self, k, default=None):
        got = super().get(k, default)
        if got is not None and k in self.odd:
            got = (got[0][:-1] + (b"skewed",), got[1], got[2])
        return got


# ---- the walk's landing records (compile._plain_lands) -----------------------------------------

def _walk(t, plain_from: int, monkeypatch, leaves_from: int = 1 << 30) -> tuple:
    """Each built-in chain's _program_key (key, bases), chain_info and remembered walk."""
    monkeypatch.setattr(C, "PLAIN_LANDS_FROM", plain_from)
    monkeypatch.setattr(C, "LEAVES_FROM", leaves_from)
    facts, fl = KernelFacts.fake(), C.flavors.get("nf")
    C._WALKS[id(t)] = [t, None, None, None, {}, None]
    C._WALK_RECORDS.clear()
    try:
        keys = [C._program_key(t, c, facts, fl, C.SUBPROG_ABOVE, None, C._knobs())
                for c in t.chains if c.builtin]
        info = {k if isinstance(k, tuple) else next(c.name for c in t.chains if id(c) == k): v
                for k, v in C.chain_info(t).items() if not isinstance(k, tuple)}
        return keys, info, C._WALK_RECORDS[id(t)][1]
    finally:
        C._WALKS.pop(id(t), None)
        C._WALK_RECORDS.clear()


def _fanout_gotos(services: int = 120):
    """Jumps and gotos to service chains, two jumps to one chain, a rule without -j between."""
    rules = []
    for k in range(services):
        tgt = jump(f"S{k}") if k % 7 else goto(f"S{k}")
        rules.append(rule(tgt, tcp(dport=(80, 80)), proto=6, dst=f"10.96.0.{k}/32"))
    rules.insert(5, rule(jump("S3"), src="192.0.2.0/24"))
    user = {f"S{k}": [rule(ACCEPT, src="192.0.2.0/27"), rule(RETURN)] for k in range(services)}
    return _decode(table({"INPUT": (ACCEPT, rules)}, user))


def test_plain_lands_are_the_loops(monkeypatch):
    t = _fanout_gotos()
    want = _walk(t, 1 << 30, monkeypatch)
    assert want[0][0][0] is not None
    assert _walk(t, 1, monkeypatch) == want


def test_broken_plain_lands_are_caught(monkeypatch):
    """The landing entry read as the goto flag."""
    t = _fanout_gotos()
    want = _walk(t, 1 << 30, monkeypatch)
    monkeypatch.setattr(C, "_ENTRY", C._GOTO)
    assert _walk(t, 1, monkeypatch) != want


def _nested(services: int = 60):
    """Service chains jumping on to endpoint chains (so the walk meets jumps after the top
    chain), one with a chain of 300 rules, one with a rule without -j."""
    rules = [rule(jump(f"S{k}"), tcp(dport=(80, 80)), proto=6, dst=f"10.96.0.{k}/32")
             for k in range(services)]
    user = {}
    for k in range(services):
        user[f"S{k}"] = [rule(jump(f"E{k}"), src="192.0.2.0/27"), rule(DROP)] if k % 3 else \
            [rule(ACCEPT, src="192.0.2.0/27"), rule(RETURN)]
        user[f"E{k}"] = [rule(ACCEPT, src=f"198.51.100.{j % 250}/32") for j in range(300)] \
            if k == 4 else [rule(ACCEPT)]
    return _decode(table({"INPUT": (ACCEPT, rules)}, user))


@pytest.mark.parametrize("make", [_fanout_gotos, _nested])
def test_walked_leaves_are_the_loops(monkeypatch, make):
    t = make()
    want = _walk(t, 1 << 30, monkeypatch)
    assert want[0][0][0] is not None
    assert _walk(t, 1 << 30, monkeypatch, leaves_from=1) == want
    assert _walk(t, 1, monkeypatch, leaves_from=1) == want


def test_broken_walked_leaves_are_caught(monkeypatch):
    """A chain's span read from its first rule instead of its head (_walk_leaves reads the
    head's index from model.chain_outline)."""
    t = _fanout_gotos()
    want = _walk(t, 1 << 30, monkeypatch)
    real = C.chain_outline
    monkeypatch.setattr(C, "chain_outline", lambda c: real(c)[:2] + (None,) + real(c)[3:])
    assert _walk(t, 1 << 30, monkeypatch, leaves_from=1) != want
