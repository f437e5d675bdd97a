"""The decode of an append that moves thousands of entries (issue #7, a kube-proxy style fan-out:
FORWARD -j SVC, SVC jumping into many two-rule chains, a rule appended ahead of them), and the
cold decode's shortcuts, without the kernel:

- the moved entries are the previous table's Rules placed anew (model._Moved: the same
  attribute dict, position data of their own), equal to what a cold decode gives, and the
  previous table keeps its positions; a deep copy of the new table is independent of both;
- mark_source_chains is not walked again when only pass-through entries changed
  (model._mark_again), and is when the change adds a jump or a return;
- the flat payload parser gives what construct gives for every registered codec;
- an entry repeated in one blob takes the first one's checks, errors in entry order.
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

from bpfilter_umh import extensions as ext, model  # noqa: E402
from bpfilter_umh import xt_ext  # noqa: E402,F401 - registers its codecs
from bpfilter_umh.errors import BpfilterError  # noqa: E402
from bpfilter_umh.model import (  # noqa: E402
    AF_INET, AF_INET6, XT_RETURN, Chain, ExtTarget, IpHeader, Jump, Rule, Table, Verdict,
    decode_replace, error_target)
from test_model_incremental import _blob, _buf, _facts, clear_caches  # noqa: E402

ACCEPT, DROP = -2, -1


def _ip(family, k):
    ip = IpHeader.any(family)
    if family == AF_INET:
        ip.src = ipaddress.IPv4Address(0xCB007100 + k % 256)
        ip.dst = ipaddress.IPv4Address(0xC6336400 + k // 256 % 256)
        ip.smsk = ip.dmsk = ipaddress.IPv4Address(0xFFFFFFFF)
    else:
        ip.src = ipaddress.IPv6Address((0x20010DB8 << 96) + k)
        ip.smsk = ipaddress.IPv6Address((1 << 128) - 1)
    return ip


def _fanout(family, services=60):
    """INPUT -j SVC (+ a rule), SVC: one jump per service chain, each service chain two rules
    (the same two in every chain: repeated entries) and its RETURN entry."""
    t = copy.deepcopy(Table.empty("filter", family))
    names = [f"SVC-{k}" for k in range(services)]
    t.chain("INPUT").rules = [Rule(IpHeader.any(family), target=Jump("SVC")),
                              Rule(_ip(family, 1), target=Verdict(DROP))]
    svc = Chain("SVC", head_entry=Rule(IpHeader.any(family), target=error_target("SVC")),
                rules=[Rule(_ip(family, 1000 + k), target=Jump(n, goto=False))
                       for k, n in enumerate(names)],
                policy_entry=Rule(IpHeader.any(family), target=Verdict(XT_RETURN)))
    t.chains.append(svc)
    for n in names:
        t.chains.append(Chain(
            n, head_entry=Rule(IpHeader.any(family), target=error_target(n)),
            rules=[Rule(_ip(family, 7), target=Verdict(ACCEPT)),
                   Rule(_ip(family, 8), target=Verdict(DROP))],
            policy_entry=Rule(IpHeader.any(family), target=Verdict(XT_RETURN))))
    return t


def _appended(t, rule):
    t2 = copy.deepcopy(t)
    t2.chain("INPUT").rules.append(rule)
    return t2


def _kind(target) -> str:
    """The dataclass a target is (a model._NamedError, an ERROR target whose payload is
    parsed when read, is the ExtTarget it subclasses)."""
    return next(k.__name__ for k in (Verdict, Jump, ExtTarget) if isinstance(target, k))


def _positions(table):
    return [(r.index, r.offset, r.comefrom, _kind(r.target),
             getattr(r.target, "offset", None), getattr(r.target, "chain_pos", None),
             getattr(r.target, "entry", None)) for r in table.entries()]


def _cold(buf, family):
    clear_caches()
    return decode_replace(buf, family)[1]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_fanout_append_moves_shared_rules_and_equals_cold(family, monkeypatch):
    t0 = _fanout(family)
    t1 = _appended(t0, Rule(_ip(family, 99), target=Verdict(DROP)))
    t2 = _appended(t1, Rule(_ip(family, 98), target=Verdict(DROP)))
    bufs = [_buf(*_blob(x)) for x in (t0, t1, t2)]
    want = [_cold(b, family) for b in bufs]
    clear_caches()
    a = decode_replace(bufs[0], family)[1]
    before = _positions(a)
    walks = []
    real = model._mark_fast
    monkeypatch.setattr(model, "_mark_fast", lambda *x: walks.append(1) or real(*x))
    b = decode_replace(bufs[1], family)[1]
    c = decode_replace(bufs[2], family)[1]
    assert walks == []                          # comefrom moved with the entries
    for got, exp in ((b, want[1]), (c, want[2])):
        assert got == exp and exp == got and _facts(got) == _facts(exp)
        assert _positions(got) == _positions(exp)
        assert got.kept_blob == exp.kept_blob
    assert _positions(a) == before              # the previous table is untouched
    # behind the append: the previous table's Rules, their dict shared, their place their own
    moved = [(x, y) for x, y in zip(a.entries()[3:], b.entries()[4:])]
    assert moved and all(type(y) in (model._Moved, model._MovedJump) for _x, y in moved)
    assert all(x.__dict__ is y.__dict__ and y.index == x.index + 1 for x, y in moved)
    # twice moved: still the first table's dict, the place of the third table
    assert all(x.__dict__ is z.__dict__ for x, z in zip(a.entries()[3:], c.entries()[5:]))
    # a jump landing elsewhere has a Jump of its own; the old one is left as it was
    svc_b, svc_a = b.chain("SVC").rules, a.chain("SVC").rules
    for x, y in zip(svc_a, svc_b):
        assert y.target is not x.target
        assert y.target.offset == b.chain(y.target.chain).rules[0].offset
        assert x.target.offset == a.chain(x.target.chain).rules[0].offset
    assert repr(svc_b[0]).startswith("Rule(") and repr(svc_b[0]) == repr(want[1].chain(
        "SVC").rules[0])
    # a deep copy is a table of plain, independent objects
    d = copy.deepcopy(b)
    assert d == b
    r = d.chain("SVC").rules[0]
    assert r.__dict__ is not svc_b[0].__dict__
    r.ip.src = ipaddress.ip_address("192.0.2.77" if family == AF_INET else "2001:db8::77")
    r.index = 12345
    assert _positions(b) == _positions(want[1]) and b == want[1]


@pytest.mark.parametrize("new_rule", ["jump", "return"])
def test_append_of_a_jump_or_return_walks_the_chains_again(new_rule, monkeypatch):
    """A jump or an unconditional verdict (where the walk turns back) appended: the walk
    runs again, and the result is the cold decode's."""
    family = AF_INET
    t0 = _fanout(family, 20)
    if new_rule == "jump":
        rule = Rule(_ip(family, 5), target=Jump("SVC-3"))
    else:
        rule = Rule(IpHeader.any(family), target=Verdict(ACCEPT))
    t1 = _appended(t0, rule)
    bufs = [_buf(*_blob(x)) for x in (t0, t1)]
    want = _cold(bufs[1], family)
    clear_caches()
    decode_replace(bufs[0], family)
    walks = []
    real = model._mark_fast
    monkeypatch.setattr(model, "_mark_fast", lambda *x: walks.append(1) or real(*x))
    got = decode_replace(bufs[1], family)[1]
    assert walks == [1]
    assert got == want and _positions(got) == _positions(want)
    assert got.kept_blob == want.kept_blob


def test_moved_rules_after_a_delete_and_a_new_chain_equal_cold():
    """Deleting a rule ahead of the fan-out and then adding a user chain in the middle (chain
    positions of everything behind it change) decode warm as cold."""
    family = AF_INET
    t0 = _fanout(family, 30)
    t1 = copy.deepcopy(t0)
    del t1.chain("INPUT").rules[1]
    t2 = copy.deepcopy(t1)
    k = next(i for i, c in enumerate(t2.chains) if c.name == "SVC-10")
    t2.chains.insert(k, Chain("NEW", head_entry=Rule(IpHeader.any(family),
                                                     target=error_target("NEW")),
                              rules=[Rule(_ip(family, 3), target=Verdict(DROP))],
                              policy_entry=Rule(IpHeader.any(family),
                                                target=Verdict(XT_RETURN))))
    t2.chain("SVC").rules.append(Rule(_ip(family, 4), target=Jump("NEW")))
    bufs = [_buf(*_blob(x)) for x in (t0, t1, t2, t0)]
    want = [_cold(b, family) for b in bufs]
    clear_caches()
    for b, w in zip(bufs, want):
        got = decode_replace(b, family)[1]
        assert got == w and _positions(got) == _positions(w) and _facts(got) == _facts(w)
        assert got.kept_blob == w.kept_blob


def test_flat_parser_equals_construct_for_every_codec():
    rng = random.Random(7)
    flat = 0
    for key, e in sorted(ext._registry.items(), key=str):
        if e.codec is None:
            continue
        try:
            fast = model._FlatParser(e.codec)
        except TypeError:
            continue                    # construct's compiled parser serves it
        flat += 1
        for _ in range(50):
            p = bytes(rng.randrange(256) for _ in range(e.size))
            want, got = e.codec.parse(p), fast.parse(p)
            assert got == want and want == got, key
            assert {k for k in want if not k.startswith("_")} == set(got), key
            assert e.codec.build(got) == e.codec.build(want), key
    assert flat >= 20


def test_repeated_entry_takes_the_first_ones_checks():
    """Entries with the same bytes in one blob: the repeats are not parsed again; an error is
    reported at the first bad entry, as the kernel walks them."""
    family = AF_INET
    t = _fanout(family, 10)
    buf = _buf(*_blob(t))
    got = _cold(buf, family)
    assert got == _cold(buf, family)
    parsed = []
    real = model._Hdr

    class Counting(real):
        __slots__ = ()

        def __init__(self, *a):
            parsed.append(1)
            super().__init__(*a)
    clear_caches()
    model_hdr = model._Hdr
    model._Hdr = Counting
    try:
        decode_replace(buf, family)
    finally:
        model._Hdr = model_hdr
    assert len(parsed) < got.num_entries - 20     # RETURN and the chains' two rules repeat
    # a bad match revision on every service chain's first rule: the first one is named
    t2 = copy.deepcopy(t)
    for c in t2.chains:
        if c.name.startswith("SVC-"):
            c.rules[0].ip.proto = 6
            c.rules[0].matches = [model.Match("tcp", 0, dict(spts=[0, 65535], dpts=[1, 1],
                                                              option=0, flg_mask=0, flg_cmp=0,
                                                              invflags=0x40))]
    buf2 = _buf(*_blob(t2))
    first = t2.chain("SVC-0").rules[0].offset
    for _ in range(2):
        clear_caches()
        with pytest.raises(BpfilterError) as e:
            decode_replace(buf2, family)
        assert f"offset {first}:" in str(e.value) and "invflags" in str(e.value)


def test_verdicts_read_where_unaligned_or_outside():
    blob = bytes(8) + (7).to_bytes(4, "little", signed=True) + (-1).to_bytes(4, "little",
                                                                         signed=True) + bytes(3)
    assert model._verdicts_at(blob, [8], 0) == [7]
    assert model._verdicts_at(blob, [0], 8) == [7]
    assert model._verdicts_at(blob, [12], 0) is None            # not a jump
    assert model._verdicts_at(blob, [16], 0) is None            # past the end
    assert model._verdicts_at(blob[1:], [7], 0) == [7]          # unaligned: bytes read
    exp = bytearray(12)
    model._put_verdicts(exp, [4], [9], 0)
    model._put_verdicts(exp, [9], [5], 1)
    assert exp[4:8] == (9).to_bytes(4, "little") and exp[8:12] == (5).to_bytes(4, "little")
