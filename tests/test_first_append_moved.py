"""Rules put before a built-in chain's first entry are a moved table too (issue #7, session 9).

The first `iptables -A INPUT` after a restore of a fan-out on FORWARD appends to an empty INPUT:
the new rule goes where INPUT's hook entry is, before INPUT's policy, with no head entry before
it. model._note_moved used to refuse such a table (compile's walk records, spans of walked
chains, did not see a change at a chain's first entry), so the compile walked FORWARD's 3 336
chains again (~19 ms of compile against ~3 for the later appends). moved_from now names it,
and compile takes a walked chain whose span starts at the first changed entry to hold the
change (compile._starting_at): INPUT is walked, FORWARD's and OUTPUT's walks are the restore's,
moved. Checked here, against a cold decode and compile of the same blob (programs' bytes, map
entries and `where` texts, and the walk records the next append starts from): that first
append; `-I INPUT 1` / `-I FORWARD 1` on non-empty chains (the chain holding the new rule must
be walked, not taken moved: without _starting_at it is, and its program is the old one);
INPUT's first rule deleted or replaced; and, both families, without the kernel, appends to an
empty INPUT and deleting them, each table compiled from the one before.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

import rulesets  # noqa: E402
from test_compile_kept import _clear, _programs  # noqa: E402
from test_cplane_scale import kernel_blob, replace_buf  # noqa: E402
from test_model_incremental import clear_caches  # noqa: E402
from test_model_lazy import _unmade  # noqa: E402

from bpfilter_umh import classify, model  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import KernelFacts  # noqa: E402
from bpfilter_umh.model import AF_INET, AF_INET6, decode_replace  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

RULE = "-s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"


def _fanout(to_input: bool) -> str:
    text = rulesets.make("fanout", 1200, seed=5).text
    return text.replace("-A FORWARD ", "-A INPUT ") if to_input else text


def _bufs(texts) -> list:
    return [replace_buf(*kernel_blob(text)) for text in texts]


def _records(t) -> dict:
    """The walk records compile_table left for the next table (_WALK_RECORDS), comparable."""
    out = {}
    for name, (recs, bases, los, his, rest) in C._WALK_RECORDS[id(t)][1].items():
        out[name] = (recs, list(bases), list(los), list(his), list(rest[0]),
                     [f[:2] + (tuple(f[2]),) for f in rest[1]], rest[2], rest[3])
    return out


def _warm_and_cold(bufs, facts):
    """(programs, records, PROG_STATS change, chains unmade before, after) of bufs[1]
    compiled after bufs[0] (decoded and compiled first, as the engine does a restore), and
    (programs, records) of bufs[1] decoded and compiled cold."""
    clear_caches()
    _clear()
    C._WALK_RECORDS.clear()
    prev = decode_replace(bufs[0], AF_INET)[1]
    C.compile_table(prev, facts)
    t = decode_replace(bufs[1], AF_INET)[1]
    assert model.moved_from(t) is not None and model.moved_from(t)[0] is prev
    before = _unmade(t)
    stats = dict(C.PROG_STATS)
    warm = _programs(t, facts)
    stats = {k: C.PROG_STATS[k] - v for k, v in stats.items()}
    warm_rec = _records(t)
    unmade = (before, _unmade(t))
    clear_caches()
    _clear()
    C._WALK_RECORDS.clear()
    cold_t = decode_replace(bufs[1], AF_INET)[1]
    assert model.moved_from(cold_t) is None and _unmade(cold_t) == 0
    cold = _programs(cold_t, facts)
    del prev
    return (warm, warm_rec, stats, unmade), (cold, _records(cold_t))


def test_first_append_after_a_restore_takes_the_moved_walks(monkeypatch):
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)     # FORWARD's cases as global functions
    base = _fanout(False)
    bufs = _bufs([base, base.replace("COMMIT", f"-A INPUT {RULE}\nCOMMIT")])
    (warm, warm_rec, stats, unmade), (cold, cold_rec) = _warm_and_cold(bufs, KernelFacts.fake())
    # FORWARD and OUTPUT not walked, INPUT walked alone; no chain made (SVC's 400 jumps and
    # the service chains stay the restore's, moved)
    assert stats["walks_moved"] == 2 and stats["walks_spliced"] == 1
    assert warm["FORWARD"][3] and warm["OUTPUT"][3]
    assert unmade[0] > 300 and unmade[1] == unmade[0]
    assert {k: v[:3] for k, v in warm.items()} == {k: v[:3] for k, v in cold.items()}
    assert warm_rec == cold_rec


@pytest.mark.parametrize("chain,to_input", [("INPUT", True), ("FORWARD", False)])
@pytest.mark.parametrize("broken", [False, True])
def test_rules_put_first_in_a_chain_are_walked(monkeypatch, chain, to_input, broken):
    """`-I CHAIN 1` on a chain with rules (INPUT jumping to the fan-out, or FORWARD): the
    chain is walked, the chains behind it taken from the previous walk. Broken (no
    _starting_at): its walk is taken moved and its kept program is the one without the rule."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    if broken:
        monkeypatch.setattr(C, "_starting_at", lambda los, nhead: None)
    base = _fanout(to_input)
    bufs = _bufs([base, base.replace("COMMIT", f"-I {chain} 1 {RULE}\nCOMMIT")])
    (warm, warm_rec, stats, _), (cold, cold_rec) = _warm_and_cold(bufs, KernelFacts.fake())
    if broken:
        assert warm[chain][0] != cold[chain][0]
        return
    assert stats["walks_spliced"] == 1
    assert not warm[chain][3]
    assert {k: v[:2] for k, v in warm.items()} == {k: v[:2] for k, v in cold.items()}
    assert warm_rec == cold_rec


@pytest.mark.parametrize("edit", ["-D INPUT 1", "-R INPUT 1", "-I INPUT 2"])
def test_first_rule_of_input_changed(monkeypatch, edit):
    """INPUT's first rule deleted or replaced, or one put after it, FORWARD's fan-out behind
    INPUT (moved_from names these tables now too): INPUT walked, FORWARD and OUTPUT not."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    first = "-A INPUT -s 198.51.100.7/32 -p tcp -m tcp --dport 22 -j ACCEPT"
    second = f"-A INPUT {RULE}"
    base = _fanout(False).replace("COMMIT", f"{first}\n{second}\nCOMMIT")
    other = "-A INPUT -s 198.51.100.8/32 -p tcp -m tcp --dport 22 -j ACCEPT"
    new = {"-D INPUT 1": base.replace(first + "\n", ""),
           "-R INPUT 1": base.replace(first, other),
           "-I INPUT 2": base.replace(second, other + "\n" + second)}[edit]
    (warm, warm_rec, stats, unmade), (cold, cold_rec) = _warm_and_cold(_bufs([base, new]),
                                                                       KernelFacts.fake())
    assert stats["walks_moved"] == 2 and not warm["INPUT"][3]
    # (a rule replaced by one of its size moves nothing: the chains are the previous ones)
    assert unmade[1] == unmade[0] and (unmade[0] > 300 or edit == "-R INPUT 1")
    assert {k: v[:3] for k, v in warm.items()} == {k: v[:3] for k, v in cold.items()}
    assert warm_rec == cold_rec


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_empty_input_edits_compile_in_turn_as_cold(monkeypatch, family):
    """test_model_lazy's fan-out behind an empty INPUT (no kernel: the tables are made here),
    each table decoded and compiled from the one before: a rule appended to the empty INPUT,
    another, both deleted, one appended again. Each is moved (moved_from) and compiles, INPUT
    walked and the rest moved, as a cold decode and compile."""
    from test_model_incremental import _blob, _buf
    from test_model_lazy import _appended, _fanout_fwd, _ip
    from bpfilter_umh.model import Rule, Verdict
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    t0 = _fanout_fwd(family, 30)
    t0.chain("INPUT").rules = []
    t1 = _appended(t0, Rule(_ip(family, 90), target=Verdict(-1)))
    t2 = _appended(t1, Rule(_ip(family, 91), target=Verdict(-1)))
    bufs = [_buf(*_blob(t)) for t in (t0, t1, t2, t0, t1)]
    clear_caches()
    _clear()
    C._WALK_RECORDS.clear()
    got, warm = [], []
    for k, b in enumerate(bufs):
        got.append(decode_replace(b, family)[1])
        moved = C.PROG_STATS["walks_moved"]
        warm.append((_programs(got[-1], facts), _records(got[-1])))
        warm[-1] = ({c: v[:3] for c, v in warm[-1][0].items()}, warm[-1][1])
        if k:
            assert model.moved_from(got[-1])[0] is got[-2], k
            assert C.PROG_STATS["walks_moved"] - moved == 2, k       # FORWARD and OUTPUT
    for k, b in enumerate(bufs):
        clear_caches()
        _clear()
        C._WALK_RECORDS.clear()
        t = decode_replace(b, family)[1]
        cold = {c: v[:3] for c, v in _programs(t, facts).items()}   # (not kept: made anew)
        assert (cold, _records(t)) == warm[k], k
