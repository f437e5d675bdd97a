"""The chains an append moves whole, made on first access (issue #7: model._MovedChain).

An append ahead of a fan-out's service chains moves every entry behind it; the decode gives
each user chain behind the change a _MovedChain (the previous chain, its entries made only
when read), so a table must read exactly as a cold decode of the same blob whenever, and in
whatever order, it is read: right after its decode, after later decodes made from it (a
_MovedChain of a _MovedChain), by another thread, copied or pickled. Without the kernel.
"""
from __future__ import annotations

import copy
import os
import pickle
import random
import sys
import threading

import pytest

from bpfilter_umh import model
from bpfilter_umh.model import AF_INET, AF_INET6, Chain, Rule, Verdict, decode_replace
from test_model_incremental import (_blob, _buf, _edit, _facts, _noisy, _outcome, _rule,
                                    _table, clear_caches)
from test_model_moved import _appended, _fanout, _ip, _positions

DROP = -1


def _unmade(table) -> int:
    """How many of the table's chains are _MovedChains whose entries are not made yet."""
    return sum(type(c) is model._MovedChain and c._src is not None for c in table.chains)


def _cold(buf, family):
    clear_caches()
    return decode_replace(buf, family)[1]


def _decoded_in_turn(bufs, family, each=None):
    """The bufs decoded one after the other from empty caches (each table from the one before),
    with how many chains each left unmade, counted right after its decode (the next decode
    makes those it reads of it); each(k, table): a check run at that moment too."""
    clear_caches()
    got, unmade = [], []
    for k, b in enumerate(bufs):
        got.append(decode_replace(b, family)[1])
        unmade.append(_unmade(got[-1]))
        if each is not None:
            each(k, got[-1])
    return got, unmade


def _same(got, want):
    assert _positions(got) == _positions(want)
    assert got == want and want == got
    assert _facts(got) == _facts(want)
    assert got.kept_blob == want.kept_blob


def _fanout_fwd(family, services=40):
    """test_model_moved's fan-out with the jump to SVC in FORWARD (as bench/cplane_bench.py
    loads it): INPUT holds a rule and no jump, so an append to it reaches no user chain and
    leaves the chains behind it unmade (model._build)."""
    t = _fanout(family, services)
    t.chain("FORWARD").rules = t.chain("INPUT").rules[:1]
    t.chain("INPUT").rules = t.chain("INPUT").rules[1:]
    return t


def _appends(family, n, services=40):
    """The fan-out table and n tables after it, each one more rule appended to INPUT."""
    ts = [_fanout_fwd(family, services)]
    for k in range(n):
        ts.append(_appended(ts[-1], Rule(_ip(family, 90 + k), target=Verdict(DROP))))
    return [_buf(*_blob(t)) for t in ts]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
@pytest.mark.parametrize("read", ["now", "late"])
def test_fanout_appends_read_as_cold(family, read):
    """Each append's table leaves the chains behind INPUT (SVC with its jumps, the service
    chains) unmade, and reads as the cold decode, read right away or after the later
    appends were decoded from it."""
    bufs = _appends(family, 4)
    want = [_cold(b, family) for b in bufs]
    clear_caches()
    got = []
    for k, b in enumerate(bufs):
        t = decode_replace(b, family)[1]
        got.append(t)
        if k:
            assert _unmade(t) == len(t.chains) - 3, k
        if read == "now":
            _same(t, want[k])
    for t, w in reversed(list(zip(got, want))):
        _same(t, w)
        assert _unmade(t) == 0
    # SVC's jumps name the offsets of their service chains in each table
    for t in got:
        for r in t.chain("SVC").rules:
            assert r.target.offset == t.chain(r.target.chain).rules[0].offset


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_edits_after_lazy_tables_read_as_cold(family):
    """After appends that left chains unmade: an append into the last service chain (the
    chain holding the change unmade before), a delete in INPUT, a new chain, the first table
    again: each reads as its cold decode."""
    bufs = _appends(family, 3)
    t = _fanout_fwd(family, 40)
    for k in range(3):
        t = _appended(t, Rule(_ip(family, 90 + k), target=Verdict(DROP)))
    last = copy.deepcopy(t)
    last.chains[-1].rules.append(Rule(_ip(family, 5), target=Verdict(DROP)))
    fewer = copy.deepcopy(last)
    del fewer.chain("INPUT").rules[2]
    more = copy.deepcopy(fewer)
    more.chains.insert(5, Chain("NEW", head_entry=copy.deepcopy(more.chains[5].head_entry),
                                rules=[Rule(_ip(family, 3), target=Verdict(DROP))],
                                policy_entry=copy.deepcopy(more.chains[5].policy_entry)))
    more.chains[5].head_entry.target = model.error_target("NEW")
    bufs += [_buf(*_blob(x)) for x in (last, fewer, more)] + bufs[:1]
    want = [_cold(b, family) for b in bufs]
    got, unmade = _decoded_in_turn(bufs, family)
    # the append to SVC-39 shares the chains before it unmade (SVC's jumps land where they
    # did, on the chains' first entries); the new chain (an ERROR entry among the changed
    # ones: the chains behind it are placed anew) shares SVC-0 unmade (model._left_unmade;
    # SVC is made: its jumps to the chains behind the change moved)
    assert unmade[1:4] == [len(got[3].chains) - 3] * 3
    assert unmade[4] == len(got[4].chains) - 4, unmade
    assert unmade[6] == 1 and got[6].chains[4] is got[5].chains[4]
    for t, w in zip(got, want):
        _same(t, w)


@pytest.mark.parametrize("family,seed", [(AF_INET, 11), (AF_INET, 12), (AF_INET6, 13)])
def test_random_edits_read_late_as_cold(family, seed):
    """Random edits (appends, inserts, deletes, replaced rules, new and removed chains, jumps
    and gotos landing anywhere in a chain), biased to appends in the built-in chains (where
    the user chains behind move whole): the whole run decoded first, every table kept, then
    each read (some already read in between) as its cold decode."""
    rng = random.Random(seed)
    good = _table(rng, family, nuser=6, nrules=6)
    for c in good.chains:
        for r in c.rules:
            if isinstance(r.target, model.Jump):
                r.target.entry = 0          # landing on a chain's first rule, as iptables
    # INPUT without jumps: appends there leave the user chains unmade
    good.chain("INPUT").rules = [r for r in good.chain("INPUT").rules
                                 if not isinstance(r.target, model.Jump)]
    bufs = []
    for _ in range(120):
        if rng.random() < 0.5:
            t = copy.deepcopy(good)
            c = t.chain("INPUT") if rng.random() < 0.8 else \
                rng.choice([c for c in t.chains if c.builtin])
            r = _rule(rng, family, [], jumps=False)
            r.ip.src, r.ip.smsk = _ip(family, rng.randrange(256)).src, _ip(family, 0).smsk
            c.rules.append(r)
        else:
            t = _edit(rng, good)
        blob, he, uf, vh, n = _blob(t)
        bufs.append(_buf(_noisy(rng, blob, family), he, uf, vh, n))
        clear_caches()
        if _outcome(lambda: decode_replace(bufs[-1], family))[0] == "ok":
            good = t
    cold = []
    for b in bufs:
        clear_caches()
        cold.append(_outcome(lambda: decode_replace(b, family)[1]))
    clear_caches()
    got, lazy = [], 0
    for b, want in zip(bufs, cold):
        g = _outcome(lambda: decode_replace(b, family)[1])
        if want[0] == "error":
            assert g == want
            continue
        lazy += _unmade(g[1])
        got.append((g[1], want[1]))
        if rng.random() < 0.2:
            _same(g[1], want[1])
    assert lazy > 20, "the edits moved chains whole"
    for g, w in reversed(got):
        _same(g, w)


def test_copies_of_a_lazy_table_are_plain():
    """copy.deepcopy, copy.copy of a chain and pickle give plain Chains equal to the cold
    decode's; repr reads as the cold table's."""
    family = AF_INET
    bufs = _appends(family, 3, services=10)
    want = _cold(bufs[-1], family)
    clear_caches()
    got = [decode_replace(b, family)[1] for b in bufs][-1]
    assert _unmade(got) > 0
    d = copy.deepcopy(got)
    assert all(type(c) is Chain for c in d.chains)
    assert d == want and _positions(d) == _positions(want)
    svc = got.chains[-1]
    assert type(copy.copy(svc)) is Chain and copy.copy(svc) == svc
    p = pickle.loads(pickle.dumps(got.chains))
    assert all(type(c) is Chain for c in p) and p == want.chains
    assert repr(got.chains) == repr(want.chains)


def test_threads_make_a_chain_once():
    """Two threads reading an unmade chain get the same entry objects."""
    family = AF_INET
    bufs = _appends(family, 3, services=200)
    clear_caches()
    got = [decode_replace(b, family)[1] for b in bufs][-1]
    lazy = [c for c in got.chains if type(c) is model._MovedChain and c._src is not None]
    assert len(lazy) > 100
    seen = [[], []]
    go = threading.Barrier(2)

    def read(out):
        go.wait()
        for c in lazy:
            out.append((c.rules, c.policy_entry, c.head_entry))

    ths = [threading.Thread(target=read, args=(s,)) for s in seen]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    for a, b in zip(*seen):
        assert a[0] is b[0] and a[1] is b[1] and a[2] is b[2]


def _user(family, name, rules):
    return Chain(name, head_entry=Rule(model.IpHeader.any(family),
                                       target=model.error_target(name)),
                 rules=rules, policy_entry=Rule(model.IpHeader.any(family),
                                                target=Verdict(model.XT_RETURN)))


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_jump_landing_behind_the_change_in_its_chain(family):
    """A chain behind the change jumping to the changed chain's policy entry (INPUT's: a
    blob iptables does not write, the kernel takes), which the change (a rule added before
    it) moves to position 4 of INPUT's body: the jump's entry is 4 now, not the 3 of the
    previous table (so that chain is not the previous one moved whole)."""
    t0 = copy.deepcopy(model.Table.empty("filter", family))
    # (an unconditional ACCEPT before the landing: the kernel's walk from INPUT's start turns
    # back there, so the landing starts a walk of its own, as a chain's first rule does)
    t0.chain("INPUT").rules = [Rule(_ip(family, 1), target=Verdict(DROP)),
                               Rule(model.IpHeader.any(family), target=Verdict(-2)),
                               Rule(_ip(family, 5), target=Verdict(DROP))]
    t0.chain("FORWARD").rules = [Rule(_ip(family, 1), target=model.Jump("V"))]
    t0.chains += [_user(family, "V", [Rule(_ip(family, 2),
                                           target=model.Jump("INPUT", entry=3))])]
    t0.chains += [_user(family, f"W{k}", [Rule(_ip(family, 3), target=Verdict(DROP))])
                  for k in range(3)]
    t1 = copy.deepcopy(t0)
    t1.chain("INPUT").rules.append(Rule(_ip(family, 4), target=Verdict(DROP)))
    t1.chain("V").rules[0].target.entry = 4         # still INPUT's policy entry
    bufs = [_buf(*_blob(t)) for t in (t0, t1)]
    want = [_cold(b, family) for b in bufs]
    assert want[1].chain("V").rules[0].target.entry == 4
    clear_caches()
    got = [decode_replace(b, family)[1] for b in bufs]
    for g, w in reversed(list(zip(got, want))):
        _same(g, w)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_an_append_to_a_jumping_chain_moves_the_chains_behind(family):
    """An append to a built-in chain with a jump (INPUT -j SVC, bench/ruleset_bench.py's
    layout): every user chain behind it (SVC and its 30 leaves) is moved whole, made on first
    read (compile reads the leaves through chain_outline, classify their RETURN entries
    through policy_indexes); a change in a user chain (SVC-3) moves the chains behind it
    whole too and shares the service chains before it unmade; SVC, whose jumps land behind
    the change, is left unmade too, placed where it is (model._placed_whole). Each table
    reads as a cold decode's."""
    t0 = _fanout(family, 30)
    t1 = _appended(t0, Rule(_ip(family, 90), target=Verdict(DROP)))
    t2 = _appended(t1, Rule(_ip(family, 91), target=Verdict(DROP)))
    t3 = copy.deepcopy(t2)
    t3.chain("SVC-3").rules.append(Rule(_ip(family, 92), target=Verdict(DROP)))
    bufs = [_buf(*_blob(t)) for t in (t0, t1, t2, t3)]
    want = [_cold(b, family) for b in bufs]
    got, unmade = _decoded_in_turn(bufs, family)
    assert unmade == [0, 31, 31, 30]
    assert [c.name for c in got[3].chains if model._unmade(c)] == \
        ["SVC"] + [f"SVC-{k}" for k in range(30) if k != 3]
    for g, w in zip(got, want):
        _same(g, w)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_changes_around_input_jump_move_the_chains_behind(family):
    """INPUT -j SVC with rules inserted before the jump (the jump itself moves: its entry
    placed anew, landing where it did), after it, and deleted again: each table leaves SVC
    and its leaves unmade and reads as a cold decode's, read right away and after the later
    tables were decoded from it."""
    ts = [_fanout(family, 30)]
    for edit in ("insert", "append", "insert", "delete", "delete-last"):
        t = copy.deepcopy(ts[-1])
        rules = t.chain("INPUT").rules
        if edit == "insert":
            rules.insert(0, Rule(_ip(family, 80 + len(ts)), target=Verdict(DROP)))
        elif edit == "append":
            rules.append(Rule(_ip(family, 80 + len(ts)), target=Verdict(DROP)))
        elif edit == "delete":
            del rules[0]
        else:
            del rules[-1]
        ts.append(t)
    bufs = [_buf(*_blob(t)) for t in ts]
    want = [_cold(b, family) for b in bufs]
    got, unmade = _decoded_in_turn(bufs, family, lambda k, t: _same(t, want[k]))
    assert unmade == [0] + [31] * (len(ts) - 1)
    clear_caches()
    got = [decode_replace(b, family)[1] for b in bufs]
    for g, w in reversed(list(zip(got, want))):
        _same(g, w)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_append_to_an_empty_input(family):
    """INPUT empty, the fan-out behind it (FORWARD -j SVC, as bench/cplane_bench.py loads
    it): the first append starts INPUT's walk at the new rule (model._mark_again: the
    comefrom values stay, the new rule takes INPUT's hook bit) and moves every chain behind
    INPUT whole; deleting it again too. Each reads as cold; and moved_from names each one's
    previous table, the rules put at INPUT's hook entry (nhead == p_first == 0: compile takes
    the chain starting there to hold them, compile._starting_at) or taken from there."""
    t0 = _fanout_fwd(family, 30)
    t0.chain("INPUT").rules = []
    t1 = _appended(t0, Rule(_ip(family, 90), target=Verdict(DROP)))
    t2 = _appended(t1, Rule(_ip(family, 91), target=Verdict(DROP)))
    bufs = [_buf(*_blob(t)) for t in (t0, t1, t2, t0, t1)]
    want = [_cold(b, family) for b in bufs]
    clear_caches()
    got = []
    for k, b in enumerate(bufs):
        got.append(decode_replace(b, family)[1])
        if k:
            assert _unmade(got[-1]) == len(got[-1].chains) - 3, k
    # (nhead, p_first, shift): t1 from t0, t2 from t1, t0 from t2, t1 from t0
    for k, want_mv in enumerate([(0, 0, -1), (1, 1, -1), (0, 2, 2), (0, 0, -1)], 1):
        mv = model.moved_from(got[k])
        assert mv is not None and mv[0] is got[k - 1] and mv[1:4] == want_mv, k
    for g, w in reversed(list(zip(got, want))):
        _same(g, w)


def test_append_to_an_empty_input_compiles_as_cold(monkeypatch):
    """The compiler's programs for the table of that first append are a cold compile's."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "bench"))
    import rulesets
    from test_compile_kept import _clear, _programs
    from test_cplane_scale import decoded
    from bpfilter_umh import classify
    from bpfilter_umh.compile import KernelFacts
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    base = rulesets.make("fanout", 1200, seed=5).text
    extra = "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"
    _clear()
    prev = decoded(base)
    _programs(prev, facts)
    t = decoded(base.replace("COMMIT", extra + "\nCOMMIT"))
    assert _unmade(t) > 300
    warm = _programs(t, facts)
    _clear()
    cold = _programs(t, facts)
    for chain in cold:
        assert warm[chain][:2] == cold[chain][:2], chain
    del prev


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_same_size_changes_keep_unmade_chains(family):
    """After appends that left chains unmade, tables with as many entries at the same
    offsets (the same table restored again, as kube-proxy's sync does; a rule of INPUT
    replaced by one of its size; a rule of an unmade service chain replaced; the counters
    of some entries live) share those chains, unmade where nothing in them changed, and
    read as cold."""
    ts = [_fanout_fwd(family, 40)]
    for k in range(3):
        ts.append(_appended(ts[-1], Rule(_ip(family, 90 + k), target=Verdict(DROP))))
    r_input = copy.deepcopy(ts[-1])
    r_input.chain("INPUT").rules[-1].ip.src = _ip(family, 77).src
    r_svc = copy.deepcopy(r_input)
    r_svc.chain("SVC-30").rules[0].ip.src = _ip(family, 78).src
    bufs = [_buf(*_blob(t)) for t in ts + [ts[-1], ts[-1], r_input, r_svc, r_svc]]
    rng = random.Random(5)
    bufs[-1] = bufs[-1][:len(bufs[-1]) - len(_blob(r_svc)[0])] + _noisy(
        rng, _blob(r_svc)[0], family)
    want = [_cold(b, family) for b in bufs]
    clear_caches()
    got = [decode_replace(b, family)[1] for b in bufs]
    assert [_unmade(t) > 0 for t in got] == [False] + [True] * (len(got) - 1)
    # the same table again: its chains are the previous table's objects
    assert all(a is b for a, b in zip(got[4].chains, got[3].chains))
    for t, w in reversed(list(zip(got, want))):
        _same(t, w)


def _svc_appended(t, name, k):
    """t with a rule appended to chain `name` (iptables -A SVC-k)."""
    t2 = copy.deepcopy(t)
    t2.chain(name).rules.append(Rule(_ip(t.family, 95 + k), target=Verdict(DROP)))
    return t2


@pytest.mark.parametrize("read_each", [True, False])
@pytest.mark.parametrize("layout", ["forward", "input"])
@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_hub_ahead_of_service_chain_appends_stays_unmade(family, layout, read_each):
    """Appends into service chains (SVC-20 twice, SVC-0, SVC-30), each after the one before,
    then one to INPUT and one to SVC-20 again, then tables of the same size (the same table,
    same-size rules of SVC-10, INPUT, the hub): the hub, ahead of each service chain's change
    with jumps landing behind it, is left unmade, placed where it is (model._placed_whole),
    and the next decode takes it from there (moved whole, made, or placed where it is
    again). Each table reads as a cold decode's, read right away (before the next decode,
    which then finds the hub made: read_each) or only after all of them, the last first."""
    t = _fanout_fwd(family, 40) if layout == "forward" else _fanout(family, 40)
    ts = [t, _appended(t, Rule(_ip(family, 90), target=Verdict(DROP)))]
    for k, name in enumerate(["SVC-20", "SVC-20", "SVC-0", "SVC-30"]):
        ts.append(_svc_appended(ts[-1], name, k))
    ts.append(_appended(ts[-1], Rule(_ip(family, 91), target=Verdict(DROP))))
    ts.append(_svc_appended(ts[-1], "SVC-20", 9))
    # then tables of the same size: the same again (kube-proxy's sync), a rule of a service
    # chain ahead of SVC-20 replaced, one of INPUT, one of the hub
    ts.append(ts[-1])
    for name, k in (("SVC-10", 0), ("INPUT", -1), ("SVC", 3)):
        ts.append(copy.deepcopy(ts[-1]))
        ts[-1].chain(name).rules[k].ip.src = _ip(family, 79).src
    bufs = [_buf(*_blob(x)) for x in ts]
    want = [_cold(b, family) for b in bufs]
    hub = []

    def each(k, table):
        hub.append(model._unmade(table.chain("SVC")) is not None)
        if read_each:
            _same(table, want[k])
    got, _unmade_counts = _decoded_in_turn(bufs, family, each)
    # (unmade when decoded, after every service chain append)
    assert hub[2:6] == [True] * 4 and hub[7] is True
    for g, w in reversed(list(zip(got, want))):
        _same(g, w)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_append_into_a_service_chain_leaves_the_previous_table_lazy(family):
    """After appends that left chains unmade, an append into a service chain in the middle:
    the decode moves the chains behind the change whole (each a _MovedChain of the unmade
    chain's source) and shares those before it, so the previous table's chains stay unmade,
    and both tables read as cold, the previous one read last."""
    ts = [_fanout_fwd(family, 40)]
    for k in range(3):
        ts.append(_appended(ts[-1], Rule(_ip(family, 90 + k), target=Verdict(DROP))))
    mid = copy.deepcopy(ts[-1])
    mid.chain("SVC-20").rules.append(Rule(_ip(family, 93), target=Verdict(DROP)))
    bufs = [_buf(*_blob(t)) for t in ts + [mid]]
    want = [_cold(b, family) for b in bufs]
    clear_caches()
    got = [decode_replace(b, family)[1] for b in bufs]
    # the previous table's service chains: not made by the decode of `mid`; SVC-0 ..
    # SVC-19 shared unmade by `mid`, the 19 behind SVC-20 moved whole, SVC (whose jumps
    # land behind the change) placed where it is, unmade too (model._placed_whole)
    assert _unmade(got[-2]) >= 18 and _unmade(got[-1]) == 40
    assert model._unmade(got[-1].chain("SVC")) is not None
    assert all(got[-1].chains[k] is got[-2].chains[k] for k in range(4, 24))
    for t, w in reversed(list(zip(got, want))):
        _same(t, w)


def test_the_heap_reserves_size_check_leaves_moved_chains_unmade():
    """heap.release_if_small asks, at a helper's idle moments, how big its installed tables are:
    the count must come from what the decode kept, not from reading the chains, which would make
    every chain an append moved whole (a fan-out's thousands) in an idle helper."""
    import types
    from bpfilter_umh import heap
    (_, t), unmade = _decoded_in_turn(_appends(AF_INET, 1), AF_INET)
    assert unmade[1] > 0
    # the dispatcher's shape as heap reads it: backends whose engine holds the installed table
    dispatcher = types.SimpleNamespace(backends={
        1: types.SimpleNamespace(engine=types.SimpleNamespace(table=t))})
    got = heap.installed_entries(dispatcher)
    assert _unmade(t) == unmade[1]
    assert got == t.num_entries         # (this count makes them)
