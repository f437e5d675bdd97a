"""classify._walked_bodies (the jump cases of a fan-out run, column by column) answers as
classify._each_body (one case at a time) on the tables a fan-out restore and appends give: the
case chains' rule counts and policy entries' cache keys are read from compile.chain_info, whose
facts an append takes from the previous table's walk (compile._splice_behind), so a fact that
does not match the chain would change the answer. Every call during the compiles below is
checked against _each_body on the same arguments; a deliberate break (the policy keys read from
the wrong field of chain_info) must fail that check."""
import os
import sys
from operator import itemgetter

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_append_moved import EXTRA  # noqa: E402
from test_append_moved import \
    test_changed_top_takes_the_walk_behind_it as appends_to_fanout_input  # noqa: E402
from test_compile_kept import _clear, _programs  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402
from test_shared_bodies import _text  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh.compile import KernelFacts  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: iptables-legacy")


def _checked(monkeypatch) -> list:
    """Wrap _walked_bodies: each walked answer must be _each_body's (bodies in the same order,
    the same positions, the same RETURN entries) with the next rules _case_map would read.
    Returns the list of (walked, None or the mismatch) per call."""
    walked, calls = classify._walked_bodies, []

    def check(cc, run, by_k, small, known):
        got = walked(cc, run, by_k, small, known)
        if got is classify._NOT_WALKED:
            calls.append((False, None))
            return got
        want = classify._each_body(cc, run, "", by_k, small, known)
        bad = None
        if (got is None) != (want is None):
            bad = ("answered", got is None, want is None)
        elif got is not None:
            bodies, anchors, nexts = got
            if list(bodies.items()) != list(want[0].items()):
                bad = ("bodies", list(bodies)[:2], list(want[0])[:2])
            elif anchors.keys() != want[1].keys() or \
                    any(anchors[p] != want[1][p] for p in anchors):
                bad = ("anchors",)
            else:
                for pos in by_k:
                    r = run.rules[pos]
                    goto = bool(r.ip.flags & classify.IPT_F_GOTO) or bool(r.target.goto)
                    if nexts[pos] != (None if goto else run.next_same.get(pos)):
                        bad = ("next", pos)
                        break
        calls.append((True, bad))
        return got
    monkeypatch.setattr(classify, "_walked_bodies", check)
    return calls


def _assert_same(calls, least: int):
    assert sum(w for w, _ in calls) >= least, calls
    assert [bad for _, bad in calls if bad is not None] == []


def test_fanout_appends_walk_as_each_case(monkeypatch):
    """test_append_moved's restore and three appends to INPUT (the spliced walk's facts) with
    shared bodies, each append's programs equal to a cold compile's, with every
    _walked_bodies answer checked."""
    calls = _checked(monkeypatch)
    appends_to_fanout_input(monkeypatch, 0)
    _assert_same(calls, 4)


@pytest.mark.parametrize("extra", ["", EXTRA.format(k=99)])
def test_gotos_and_later_keys_walk_as_each_case(monkeypatch, extra):
    """test_shared_bodies' table: gotos, chains that RETURN to a later rule with the key."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    calls = _checked(monkeypatch)
    _clear()
    _programs(decoded(_text(extra)), KernelFacts.fake())
    _assert_same(calls, 1)


def test_a_broken_walk_is_caught(monkeypatch):
    """The policy entries' keys read from the rules' keys field of chain_info: the check fails."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    monkeypatch.setattr(classify, "_SECOND", itemgetter(0))
    calls = _checked(monkeypatch)
    _clear()
    _programs(decoded(_text()), KernelFacts.fake())
    _clear()
    assert sum(w for w, _ in calls) >= 1
    assert [bad[0] for _, bad in calls if bad is not None] == ["bodies"]
    with pytest.raises(AssertionError):
        _assert_same(calls, 1)
