"""A first restore's build side (issue #7: the SET_REPLACE of 10 000 rules into a new helper):

  - a decode into an empty _ENTRY_CACHE makes its Rules without cache lookups (each entry its
    own cache value, its built_norm set as the Rule is made; a template's entries take the
    objects of its first entry) and leaves what only the next decode reads for after the
    reply (model._defer, engine.after_reply in a helper): the cache filled (_remember) and
    the walk's headers set to the comefrom of the kept blob (_kept_headers). The table, the
    kept blob and the Rules' objects are what the decode with lookups gives, before that
    work runs; the next decode runs it first if it has not run;
  - the kept blob of a restore (comefrom 0 sent) writes the comefrom of a run's entries of
    one template as one strided slice where they all have one comefrom, one by one where
    they do not (service chains reached from different hooks, or from none);
  - a user chain's name is its errorname up to the first NUL.
"""
import copy

import pytest

from bpfilter_umh import model
from bpfilter_umh.model import (AF_INET, AF_INET6, XT_RETURN, Chain, ExtTarget, IpHeader,
                                Jump, Rule, Table, Verdict, decode_replace, error_target)

from test_decode_run import _addr, _hdr                                   # noqa: E402
from test_decode_shared import fanout_table, service_chains               # noqa: E402
from test_decode_template import CACHES, _facts, _table_buf, _zeroed      # noqa: E402

DROP = -1
FAMILIES = pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])


def _clear():
    model._run_deferred()
    for name in CACHES:
        getattr(model, name).clear()
    model._SHARED_CACHED = False


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    _clear()
    yield
    _clear()


@pytest.fixture
def queue(monkeypatch):
    """A helper's queue of the work after the reply (model.LATER), run by the test."""
    q = []
    monkeypatch.setattr(model, "LATER", q.append)
    return q


def _run(q):
    while q:
        q.pop(0)()


def _sent(t: Table, family: int) -> bytes:
    """The SET_REPLACE buffer iptables-restore sends for t (comefrom and counters 0), the
    caches cleared after t was made (Table.empty decodes)."""
    buf = _table_buf(t, _zeroed(t.encode(), family))
    _clear()
    return buf


def _with_lookups(buf: bytes, family: int, q=None):
    """The decode with _ENTRY_CACHE lookups (the path of a helper that has cached entries:
    one unrelated key in the cache), its facts and the cache values' (matches, target)."""
    _clear()
    model._ENTRY_CACHE[b"unrelated"] = None
    shared, model._SHARED_CACHED = model._SHARED_CACHED, True
    try:
        t = decode_replace(buf, family)[1]
    finally:
        model._SHARED_CACHED = shared
    raws = model._LAST_WALK[family][1]
    built = [model._ENTRY_CACHE[r.key].built_norm for r in raws]
    facts = _facts(t)
    _clear()
    if q is not None:
        q.clear()               # (its run of the work: done)
    return t, facts, built


def _kept_comefrom_of_headers(table, raws, family):
    cf = model._VOLATILE[family][0]
    kept = table.kept_blob
    return [r.hdr.comefrom for r in raws] == \
        [int.from_bytes(kept[r.off + cf:r.off + cf + 4], "little") for r in raws]


@FAMILIES
def test_a_first_restore_leaves_the_cache_and_headers_for_after_the_reply(family, queue):
    t = fanout_table(family)
    buf = _sent(t, family)
    _ref, ref_facts, ref_built = _with_lookups(buf, family, queue)
    table = decode_replace(buf, family)[1]
    raws = model._LAST_WALK[family][1]
    # answered before the work: the same table, rules and kept blob (every fact by value)
    assert _facts(table) == ref_facts
    assert table.kept_blob == table.encode()
    # one item queued (the cache and the headers), nothing cached yet, the headers as sent
    assert len(queue) == 1 and len(model._DEFERRED) == 2
    assert not model._ENTRY_CACHE
    assert not any(r.hdr.comefrom for r in raws)
    _run(queue)
    assert not model._DEFERRED
    # after it: every entry cached, its value's objects those its Rule was made of, equal
    # to the lookups' path; the headers say the kept blob's comefrom
    assert _kept_comefrom_of_headers(table, raws, family)
    got = [model._ENTRY_CACHE[r.key].built_norm for r in raws]
    assert got == ref_built
    for r, rule in zip(raws, table.entries()):
        b = model._ENTRY_CACHE[r.key].built_norm
        if model._ENTRY_CACHE[r.key] is r:
            assert all(x is y for x, y in zip(b[0], rule.matches))
            assert b[1] is (None if r.std else rule.target)


@FAMILIES
def test_the_next_decode_runs_the_work_left_first(family, queue):
    """A second SET_REPLACE before the first one's work ran (iptables-restore of two tables
    in one command, or a command at once after): that work runs first, so the second decode
    reads the walk and the cache as the first left them; here the second table reaches a
    user chain the first did not (its entries' comefrom changes)."""
    t = fanout_table(family)
    t.chains.append(Chain("lonely", head_entry=Rule(IpHeader.any(family),
                                                  target=error_target("lonely")),
                          rules=[Rule(_hdr(family, src=_addr(family, 3)),
                                      target=Verdict(DROP))],
                          policy_entry=Rule(IpHeader.any(family), target=Verdict(XT_RETURN))))
    t.layout()
    buf1 = _sent(t, family)
    t2 = copy.deepcopy(t)
    t2.chain("OUTPUT").rules.append(Rule(IpHeader.any(family), target=Jump("lonely")))
    t2.layout()
    buf2 = _sent(t2, family)
    decode_replace(buf1, family)
    assert len(queue) == 1
    second = decode_replace(buf2, family)[1]
    # the first decode's work ran at the second one's start (the second, over a filled
    # cache and the first's walk, leaves none)
    assert not model._DEFERRED and model._ENTRY_CACHE
    _run(queue)
    raws = model._LAST_WALK[family][1]
    assert second.kept_blob == second.encode()
    assert _kept_comefrom_of_headers(second, raws, family)
    lonely = second.chain("lonely")
    assert lonely.rules[0].comefrom != 0
    # and the third decode (the second table again, over that walk) says the same
    third = decode_replace(buf2, family)[1]
    _run(queue)
    assert _facts(third) == _facts(second)


@FAMILIES
def test_a_templates_entries_share_its_first_entrys_objects(family):
    """Without cache lookups a template's entries take the objects of its first entry (the
    LOG rules: one target), as the lookups gave them where the entries repeat its bytes."""
    t = fanout_table(family)
    buf = _sent(t, family)
    ref, _facts_ref, _b = _with_lookups(buf, family)
    table = decode_replace(buf, family)[1]

    def logs(tb):
        return [r for r in tb.entries()
                if type(r.target) is ExtTarget and r.target.name == "LOG"]
    assert len(logs(table)) == len(logs(ref)) > 2
    assert len({id(r.target) for r in logs(ref)}) == 1
    assert len({id(r.target) for r in logs(table)}) == 1


def _split_table(family: int, n: int = 40) -> Table:
    """User chains u0.. of three rules each (a cycle of templates: a run), jumped to from
    INPUT (k % 3 == 0), FORWARD (k % 3 == 1) or from nowhere (k % 3 == 2): their entries'
    comefrom differs along the run."""
    t = copy.deepcopy(Table.empty("filter", family))
    users = [f"u{k}" for k in range(n)]
    t.chain("INPUT").rules = [Rule(IpHeader.any(family), target=Jump(users[k]))
                              for k in range(0, n, 3)]
    t.chain("FORWARD").rules = [Rule(IpHeader.any(family), target=Jump(users[k]))
                                for k in range(1, n, 3)]
    return service_chains(t, users, family)


def _kept_writes(monkeypatch):
    """{"strided": templates of a run written as one slice, "each": one by one}."""
    seen = {"strided": 0, "each": 0}
    each = model._zeroed_each

    def counted(*a):
        seen["each"] += 1
        return each(*a)
    monkeypatch.setattr(model, "_zeroed_each", counted)
    arr = model.array.array

    class Arrays:
        @staticmethod
        def array(*a):
            seen["strided"] += 1
            return arr(*a)
    monkeypatch.setattr(model, "array", Arrays)
    return seen


@FAMILIES
@pytest.mark.parametrize("shape", ["one hook", "split"])
def test_the_kept_blob_of_a_restore_writes_runs_strided(family, shape, monkeypatch):
    t = fanout_table(family) if shape == "one hook" else _split_table(family)
    sent = _zeroed(t.encode(), family)
    buf = _sent(t, family)
    seen = _kept_writes(monkeypatch)
    table = decode_replace(buf, family)[1]
    raws = model._LAST_WALK[family][1]
    # the kernel's bytes: comefrom as mark_source_chains() sets it, the rest as sent
    assert table.kept_blob == table.encode() and len(table.kept_blob) == len(sent)
    assert _kept_comefrom_of_headers(table, raws, family)
    if shape == "one hook":
        # every service chain reached from FORWARD: each template of the cycle one slice
        assert seen["strided"] >= 3 and seen["each"] == 0
    else:
        # INPUT's, FORWARD's and no hook's in turn: one by one
        assert seen["each"] >= 1
        assert {r.comefrom for r in table.entries()} >= {0, 1 << 1, 1 << 2}


@FAMILIES
def test_a_user_chains_name_ends_at_the_first_nul(family):
    t = copy.deepcopy(Table.empty("filter", family))
    t.chain("INPUT").rules = [Rule(IpHeader.any(family), target=Jump("svc"))]
    head = error_target("svc")
    head.data.errorname = b"svc\0junk" + bytes(22)
    t.chains.append(Chain("svc", head_entry=Rule(IpHeader.any(family), target=head),
                          rules=[Rule(IpHeader.any(family), target=Verdict(DROP))],
                          policy_entry=Rule(IpHeader.any(family), target=Verdict(XT_RETURN))))
    t.layout()
    table = decode_replace(_sent(t, family), family)[1]
    assert [c.name for c in table.chains] == ["INPUT", "FORWARD", "OUTPUT", "svc"]
    assert table.chains[0].rules[0].target.chain == "svc"


def test_the_engine_queues_the_decodes_work_after_the_reply(monkeypatch):
    """In a helper (engine.AFTER_REPLY a list) the decode's work is one item of it."""
    from bpfilter_umh import engine
    assert model.LATER is engine.after_reply
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    t = fanout_table(AF_INET)
    buf = _sent(t, AF_INET)
    decode_replace(buf, AF_INET)
    assert len(engine.AFTER_REPLY) == 1 and not model._ENTRY_CACHE
    engine.run_after_reply()
    assert len(model._ENTRY_CACHE) > 100 and not model._DEFERRED
    # outside a helper it runs at once
    monkeypatch.setattr(engine, "AFTER_REPLY", None)
    _clear()
    decode_replace(buf, AF_INET)
    assert len(model._ENTRY_CACHE) > 100 and not model._DEFERRED


@FAMILIES
def test_entries_an_editable_decode_cached_leave_the_first_restore_without_lookups(
        family, queue):
    """A helper's empty tables (Table.empty: editable decodes) cache a few entries before its
    first restore: that decode still takes no cache values (its cache filled after the
    reply). Once a read-only table's entries are cached (model._SHARED_CACHED), the next
    decode looks its entries up in the request (and shares their objects)."""
    t = fanout_table(family)
    buf = _sent(t, family)
    Table.empty("filter", family)
    few = len(model._ENTRY_CACHE)
    assert 0 < few < 10 and not model._SHARED_CACHED
    first = decode_replace(buf, family)[1]
    assert len(model._ENTRY_CACHE) == few and len(queue) == 1
    _run(queue)
    assert len(model._ENTRY_CACHE) > few + 100 and model._SHARED_CACHED
    # the same table again after its walk is dropped: every entry looked up in the request
    model._LAST_WALK.clear()
    again = decode_replace(buf, family)[1]
    assert [w.func for w in model._DEFERRED] == [model._kept_headers]
    assert _facts(again) == _facts(first)
    logs = [k for k, r in enumerate(first.entries())
            if type(r.target) is ExtTarget and r.target.name == "LOG"]
    assert logs and all(again.entries()[k].target is first.entries()[k].target for k in logs)
