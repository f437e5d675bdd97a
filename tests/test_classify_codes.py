"""classify._classes reads a chain's value classes a byte column at a time (issue #7, session 8:
a cold compile of 10 000 rules): _layout_codes makes each key's class code from strided byte
slices of the keys joined, _classes_coded looks each rule up once. Every rule must get the very
class object that asking it alone gives (_classes_each: _class_of's key, one rule at a time),
whichever of the two runs first, and so the same facts as the rule itself; over rules whose key
fields sit at the predicates' edges (test_classify_fast._edge_rules: ports any / exact / ranges
/ empty, zero addresses, bits outside the mask, comments, two tcp matches) and over the ruleset
shapes as iptables-legacy-restore encodes them. A deliberately broken code reader is caught.
"""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_classify_fast import _decode, _edge_rules, _kernel_tables, _slow_facts, root  # noqa
from test_compile_util import ACCEPT, RETURN, rule, table, tcp, udp  # noqa: E402

import rulesets  # noqa: E402
from bpfilter_umh import classify  # noqa: E402


def _fresh():
    classify._CLASSES.clear()
    classify._LAYOUTS.clear()
    classify._LAYOUT_OF.clear()
    classify._MEMO.clear()


def _both_orders(rules) -> list:
    keys = [r.cache_key for r in rules]
    _fresh()
    each = classify._classes_each(rules, keys)
    fast = classify._classes(rules, keys)
    assert all(a is b for a, b in zip(each, fast)) and len(each) == len(fast)
    _fresh()
    fast = classify._classes(rules, keys)
    each = classify._classes_each(rules, keys)
    assert all(a is b for a, b in zip(each, fast))
    assert classify._facts_of(rules, fast) == [_slow_facts(r) for r in rules]
    return fast


def _edge_chain(seed: int = 3) -> list:
    rules = _edge_rules(random.Random(seed))
    rules += [rule(ACCEPT, udp(dport=(53, 53)), proto=17, src="0.0.0.0/8"),    # src 0, masked
              rule(ACCEPT, tcp(sport=(0, 65535), dport=(0, 65535)), proto=6)]
    return _decode(table({"FORWARD": (ACCEPT, rules)}, {"u": [rule(RETURN)]})) \
        .chain("FORWARD").rules


@pytest.mark.parametrize("groups", [classify.CLASS_GROUPS_MAX, 0])
def test_edge_classes_are_each_rules(monkeypatch, groups):
    """(CLASS_GROUPS_MAX 0: every chain rule by rule, the path of a chain of many layouts)"""
    monkeypatch.setattr(classify, "CLASS_GROUPS_MAX", groups)
    rules = _edge_chain()
    fast = _both_orders(rules)
    assert sum(c is not None for c in fast) >= 0.5 * len(rules)
    # the column path met keys of one match (codes, slow codes among them) and of several
    keys = [r.cache_key for r in rules]
    lays = [classify._LAYOUTS.get(k[classify._KEY_TOFF:classify._KEY_ELEMS + classify._XT_HDR])
            for k in keys]
    assert classify._WALK in lays
    codes = b"".join(classify._layout_codes(lay, [k for k, x in zip(keys, lays) if x is lay])
                     for lay in set(lays) if lay is not None and lay is not classify._WALK)
    assert max(codes) >= classify.SLOW_CODE and min(codes) < classify.SLOW_CODE


@root
def test_ruleset_shape_classes_are_each_rules():
    texts = [rulesets.make(s, 1500, seed=7).text for s in rulesets.SHAPES]
    for shape, t in zip(rulesets.SHAPES, _kernel_tables(texts)):
        rules = max(t.chains, key=lambda c: len(c.rules)).rules
        fast = _both_orders(rules)
        assert None not in fast, shape


def test_broken_codes_are_caught(monkeypatch):
    """Every byte read as zero by the flags (a source or destination address never seen as
    set): classes the rules do not have."""
    rules = _edge_chain()
    keys = [r.cache_key for r in rules]
    _fresh()
    each = classify._classes_each(rules, keys)
    monkeypatch.setattr(classify, "_NONZERO", bytes(256))
    try:
        fast = classify._classes(rules, keys)
    finally:
        _fresh()        # the wrong classes made here must not answer a later test's rules
    assert not all(a is b for a, b in zip(each, fast))
