"""Session 8, round 2 (issue #7: a cold compile of 10 000 rules), two column paths of
classify.py against their rule-at-a-time definitions, each also run against a deliberately broken
form that the comparison must catch:

  - classify._classes groups a chain's keys by length and reads each group as keys of the layout
    of its first key; a class's first rule must be of that layout (else its rules are read as
    keys of their own layout, or one by one past CLASS_GROUPS_MAX layouts): keys of one length
    and two layouts ([comment, tcp] and [tcp, comment]) get the very classes _classes_each gives
    them;
  - classify.column_set (what compile._chain_reads and _chain_facts ask of a long chain) is the set
    of the rules' own answers.
"""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_classify_codes import _both_orders, _edge_chain, _fresh  # noqa: E402
from test_classify_fast import _decode  # noqa: E402
from test_compile_util import ACCEPT, DROP, RETURN, rule, table, tcp  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.model import Match  # noqa: E402


def _comment(text: bytes) -> Match:
    return Match("comment", 0, {"comment": text.ljust(256, b"\0")})


def _two_layouts(seed: int, tcp_first_at_head: bool) -> list:
    """Rules of one key length in two layouts: a comment then a tcp match, or the other way
    round (their ports and comment text sit at other offsets); the chain's first rule of the
    layout asked for."""
    rnd = random.Random(seed)
    out = []
    for k in range(400):
        port = rnd.choice([(80, 80), (0, 65535), (443, 443)])   # no SLOW_CODE ranges
        text = rnd.choice([b"", b"svc", b"KUBE-SVC-" + str(k % 7).encode()])
        ms = [_comment(text), tcp(dport=port)]
        if (k % 3 == 0) == tcp_first_at_head:
            ms.reverse()
        out.append(rule(rnd.choice([ACCEPT, DROP]), *ms, proto=6,
                        dst=f"198.51.100.{rnd.randrange(256)}/32"))
    t = _decode(table({"FORWARD": (ACCEPT, out)}, {"u": [rule(RETURN)]}))
    return t.chain("FORWARD").rules


def _layouts_of(rules) -> set:
    return {classify._layout(r.cache_key) for r in rules}


@pytest.mark.parametrize("tries", [None, 1])
def test_one_length_two_layouts_are_each_rules(monkeypatch, tries):
    """Cold, the keys of the layout that is not the first key's are read as keys of theirs
    (a second _classes_coded), or one by one once CLASS_GROUPS_MAX layouts were tried."""
    if tries is not None:
        monkeypatch.setattr(classify, "CLASS_GROUPS_MAX", tries)
    for tcp_first in (True, False):
        rules = _two_layouts(1, tcp_first)
        keys = [r.cache_key for r in rules]
        assert len(set(map(len, keys))) == 1 and len(_layouts_of(rules)) == 2
        assert None not in _both_orders(rules)
        _fresh()
        coded, each = [], []
        real_coded, real_each = classify._classes_coded, classify._classes_each

        def spy_coded(lay, ks, *a):
            coded.append((lay, ks))
            return real_coded(lay, ks, *a)

        def spy_each(rs, ks):
            each.extend(ks)
            return real_each(rs, ks)
        monkeypatch.setattr(classify, "_classes_coded", spy_coded)
        monkeypatch.setattr(classify, "_classes_each", spy_each)
        got = classify._classes(rules, keys)
        monkeypatch.setattr(classify, "_classes_coded", real_coded)
        monkeypatch.setattr(classify, "_classes_each", real_each)
        first = classify._layout(keys[0])
        other = [k for k in keys if classify._layout(k) is not first]
        if tries is None:
            assert [lay for lay, _ in coded] == [first, classify._layout(other[0])]
            assert coded[1][1] == other and each == []
        else:
            assert [lay for lay, _ in coded] == [first] and each == other
        assert all(a is b for a, b in zip(got, classify._classes_each(rules, keys)))


def test_edge_chain_by_length_is_each_rules():
    _both_orders(_edge_chain(5))


def test_broken_layout_check_is_caught(monkeypatch):
    """Every key taken to be of the first key's layout (the check of a class's first rule
    skipped): classes the other layout's rules do not have."""
    rules = _two_layouts(1, True)
    keys = [r.cache_key for r in rules]
    _fresh()
    each = classify._classes_each(rules, keys)
    _fresh()
    first = classify._layout(keys[0])
    monkeypatch.setattr(classify, "_layout", lambda key: first)
    try:
        fast = classify._classes(rules, keys)
    finally:
        _fresh()        # the wrong classes made here must not answer a later test's rules
    assert not all(a is b for a, b in zip(each, fast))


def _column_cases():
    for rules in (_edge_chain(3), _two_layouts(2, False)):
        _fresh()
        classify._VECS.clear()
        vec = classify.vectors(rules)
        assert vec is not None and vec.cls is not None
        yield rules, vec


def test_column_set_is_the_rules_answers():
    for rules, vec in _column_cases():
        for kind, fn in (("scan", C._reads), ("kept", C._rule_kept_ok)):
            assert classify.column_set(rules, vec, kind, fn) == {fn(r) for r in rules}
            assert classify.column_set(rules, vec, kind, fn) == \
                set(classify.column(rules, vec, kind, fn))


def test_broken_column_set_is_caught():
    """A class's kept answer that is not its rules' (one class answering for another)."""
    rules, vec = next(_column_cases())
    want = {C._reads(r) for r in rules}
    assert len(want) > 1
    classes = {c for c in vec.cls if c is not None}
    try:
        for c in classes:
            c.more["scan"] = C._reads(next(iter(classes)).rep)
        assert classify.column_set(rules, vec, "scan", C._reads) != want
    finally:
        # the classes given wrong answers must not answer a later test's rules
        _fresh()
        classify._VECS.clear()
