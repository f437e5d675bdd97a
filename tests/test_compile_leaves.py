"""compile._walk_leaves asks each chain content once (session 8, round 2, issue #7: a fan-out's
3 333 service chains of a few contents): its jump facts and reads at the content's last chain,
then every chain's facts in one C loop. The walk must answer what _program_key's loop answers
(program keys, chain_info, the remembered walk) with the memos cold, warm, or too small to hold
a walk's contents; a deliberately broken content map (each content's reads asked of another
chain) is caught.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_classify_bulk import _walk  # noqa: E402
from test_classify_fast import _decode  # noqa: E402
from test_compile_util import ACCEPT, DROP, RETURN, jump, rule, table, udp  # noqa: E402

from bpfilter_umh import compile as C  # noqa: E402


def _leaves(services: int = 90):
    """Unconditional jumps (reading nothing) to service chains of three contents that read an
    interface name, a udp port, nothing, in turn: what the program parses is their reads."""
    rules = [rule(jump(f"S{k}")) for k in range(services)]
    bodies = [[rule(ACCEPT, iniface="veth-b"), rule(RETURN)],
              [rule(ACCEPT, udp(dport=(53, 53)), proto=17), rule(DROP)],
              [rule(DROP)]]
    user = {f"S{k}": bodies[k % 3] for k in range(services)}
    return _decode(table({"INPUT": (ACCEPT, rules)}, user))


def _memos_cleared():
    C._CHAIN_FACTS.clear()
    C._SCAN_FACTS.clear()


@pytest.mark.parametrize("memo_max", [None, 1])
def test_leaves_by_content_are_the_loops(monkeypatch, memo_max):
    """(memo_max 1: every memo insert clears the memo, the walk's answers dropped meanwhile)"""
    t = _leaves()
    _memos_cleared()
    want = _walk(t, 1 << 30, monkeypatch)
    assert want[0][0][0] is not None
    if memo_max is not None:
        monkeypatch.setattr(C, "CHAIN_FACTS_MAX", memo_max)
    _memos_cleared()
    for _ in range(2):                  # cold, then warm
        assert _walk(t, 1 << 30, monkeypatch, leaves_from=1) == want
        assert _walk(t, 1, monkeypatch, leaves_from=1) == want
    _memos_cleared()


def test_broken_content_map_is_caught(monkeypatch):
    """Every content's facts and reads asked of the last chain (of the content that reads
    nothing)."""
    t = _leaves()
    _memos_cleared()
    want = _walk(t, 1 << 30, monkeypatch)
    assert want[2]["INPUT"][-1][-1] == (True, True, True)     # the walk's reads
    real = C._each_content
    monkeypatch.setattr(C, "_each_content",
                        lambda fks: dict.fromkeys(real(fks), len(fks) - 1))
    _memos_cleared()
    assert _walk(t, 1 << 30, monkeypatch, leaves_from=1) != want
    _memos_cleared()
