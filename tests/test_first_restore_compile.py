"""The first restore's compile (issue #7: iptables-restore of 10 000 rules), work done once:
- compile._walk_leaves keeps each leaf chain's policy (RETURN) entry index for the compile
  (compile.policy_indexes_walked), and classify._walked_bodies takes the case chains' RETURN
  entries from there instead of reading the chains again (model.policy_indexes): the case map
  (RETURN entry - run start per case) is the one a compile without the walk makes, and the
  program gives the same verdicts and counters (BPF_PROG_TEST_RUN, real kernel);
- classify._classes_coded takes a key of the template and code of the key before (or of the
  last key of its template) without a lookup: against _classes_each."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_cplane_scale import _run_each, decoded  # noqa: E402
from test_shared_bodies import _packets, _text  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import KernelFacts, compile_table  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def _fresh(monkeypatch, tag: str) -> None:
    """A compile context no earlier compile had (a BPFILTER_* variable is part of a kept
    program's key): the program is compiled, not taken from compile._PROG_CACHE."""
    monkeypatch.setenv("BPFILTER_TEST_FIRST_RESTORE", f"{tag} {os.getpid()} {id(monkeypatch)}")


def _input(table):
    return next(p for p in compile_table(table, KernelFacts.from_btf(), "nf").programs
                if p.chain == "INPUT")


def _case_map(cp):
    got = [m for m in cp.maps if m.name.startswith("case_")]
    assert len(got) == 1, [m.name for m in cp.maps]
    return got[0]


def test_case_chains_policy_entries_from_the_walk(monkeypatch):
    """A fresh fan-out table's compile takes every case chain's RETURN entry from the walk (no
    policy_indexes call) and makes the case map a compile without the walk
    (BPFILTER_PROG_CACHE=0: classify reads each case chain itself) makes; same verdicts and
    counters on the kernel."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    _fresh(monkeypatch, "walked")
    asked = []
    real = classify.policy_indexes
    monkeypatch.setattr(classify, "policy_indexes", lambda cs: asked.append(len(cs)) or real(cs))
    seen = []
    walked = classify._walked_policy_indexes

    def spy(table, ids, targets):
        seen.append(dict(C.policy_indexes_walked(table) or {}))
        return walked(table, ids, targets)
    monkeypatch.setattr(classify, "_walked_policy_indexes", spy)

    table = decoded(_text())
    fast = _input(table)
    assert seen and len(seen[0]) >= 100, "the walk kept no policy entry indexes"
    assert not asked, "the case chains were read again"
    # what the walk kept is each chain's RETURN entry index
    svc = {id(table.chain(f"S{k}")): table.chain(f"S{k}").policy_entry.index for k in range(100)}
    assert all(seen[0][i] == idx for i, idx in svc.items())

    monkeypatch.setenv("BPFILTER_PROG_CACHE", "0")
    slow_table = decoded(_text())
    slow = _input(slow_table)
    assert _case_map(fast).entries == _case_map(slow).entries
    results = _run_each((fast, slow), _packets(), table.num_entries, "fr")
    assert results[0] == results[1]
    assert len(set(results[0][0])) == 2, "both verdicts taken"


def test_chains_not_walked_are_read(monkeypatch):
    """A case chain the walk kept no index for (here: none kept) is read from the chains, with
    the same case map."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    _fresh(monkeypatch, "fast")
    fast = _case_map(_input(decoded(_text())))
    real = C._walk_leaves

    def no_index(*a):
        ok = real(*a)
        a[-1].clear()                   # (the policy indexes it put in)
        return ok
    monkeypatch.setattr(C, "_walk_leaves", no_index)
    _fresh(monkeypatch, "read")
    asked = []
    pi = classify.policy_indexes
    monkeypatch.setattr(classify, "policy_indexes", lambda cs: asked.append(len(cs)) or pi(cs))
    slow = _case_map(_input(decoded(_text())))
    assert asked, "the chains were not read"
    assert slow.entries == fast.entries


# ---- classify._classes_coded: a key of the template and code of the key before -------------

def _runs_of_templates() -> list:
    """A chain whose neighbours share a template and code (a fan-out hub's jumps), share the
    template but not the code (a zero source: the class code's src bit), share the code but
    not the template (another mask), come back to a template after others, and keys whose
    code has SLOW_CODE (port ranges) or whose layout is not the first key's, twice in a row."""
    from test_classify_fast import _decode
    from test_compile_util import ACCEPT, DROP, RETURN, rule, table, tcp, udp
    rules = [rule(DROP, src="10.0.0.0/8"), rule(DROP, src="11.0.0.0/8"),
             rule(DROP, src="12.0.0.0/8"),
             rule(DROP, src="0.0.0.0/8"), rule(DROP, src="0.0.0.0/8"),
             rule(DROP, src="13.0.0.0/8"),
             rule(DROP, src="12.0.0.0/16"), rule(DROP, src="12.1.0.0/16"),
             rule(ACCEPT, src="12.2.0.0/16"), rule(ACCEPT, src="12.3.0.0/16"),
             rule(DROP, src="14.0.0.0/8"), rule(DROP, src="14.0.0.0/8", dst="10.0.0.1/32"),
             rule(DROP, src="15.0.0.0/8")]
    rules += [rule(ACCEPT, tcp(dport=(10, 20)), proto=6, dst=f"10.0.0.{k}/32") for k in range(3)]
    rules += [rule(ACCEPT, tcp(dport=(80, 80)), proto=6, dst=f"10.0.0.{k}/32") for k in range(3)]
    rules += [rule(ACCEPT, udp(dport=(53, 53)), proto=17, dst=f"10.0.0.{k}/32") for k in range(3)]
    rules += [rule(ACCEPT, tcp(dport=(443, 443)), proto=6, dst="10.0.0.9/32"),
              rule(DROP, src="16.0.0.0/8")]
    return _decode(table({"FORWARD": (ACCEPT, rules)}, {"u": [rule(RETURN)]})) \
        .chain("FORWARD").rules


class _CountingGets(dict):
    def __init__(self, *a):
        super().__init__(*a)
        self.gets = 0

    def get(self, *a):
        self.gets += 1
        return super().get(*a)


def test_classes_of_neighbours_are_each_rules(monkeypatch):
    """Every rule gets the class asking it alone gives (_classes_each), whichever runs first,
    and a key of the template and code of its neighbour, or of the last key of its template, is
    not looked up again."""
    from test_classify_codes import _both_orders
    rules = _runs_of_templates()
    counting = _CountingGets()
    monkeypatch.setattr(classify, "_CLASSES", counting)
    fast = _both_orders(rules)
    assert sum(c is not None for c in fast) >= len(rules) - 3     # (the port ranges: none)
    keys = [r.cache_key for r in rules]
    counting.clear()
    counting.gets = 0
    lay = classify._layout(keys[0])
    codes = classify._layout_codes(lay, keys[:13])
    got = classify._classes_coded(lay, keys[:13], codes, rules, range(13))
    gets = counting.gets
    assert all(a is b for a, b in zip(got, classify._classes_each(rules[:13], keys[:13])))
    # looked up: 10/8, 0/8 (the template of 10/8, another code), 13/8 (0/8's code was the
    # template's last), 12/16, 12.2/16 (ACCEPT), the /8 with a dst; not: the neighbours of
    # their template and code (11/8 and 12/8 after 10/8, the second 0/8, 12.1/16, 12.3/16),
    # nor 14/8 and 15/8 (the last of their template, 13/8, has their code)
    assert gets == 6, gets
