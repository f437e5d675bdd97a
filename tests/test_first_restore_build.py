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
    one unrelated key in the cache, and no size of a table walked anew taken as one of other
    rules, LATER_MID_MIN), its facts and the cache values' (matches, target)."""
    _clear()
    model._ENTRY_CACHE[b"unrelated"] = None
    shared, model._SHARED_CACHED = model._SHARED_CACHED, True
    least, model.LATER_MID_MIN = model.LATER_MID_MIN, 1 << 30
    try:
        t = decode_replace(buf, family)[1]
    finally:
        model._SHARED_CACHED = shared
        model.LATER_MID_MIN = least
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


def _sharing(table, raws):
    """Which objects the decode shared: per entry, for its Rule's matches list, each match,
    target and IpHeader, its raw's mdata, tdata and built_norm (and their parts), the index
    of the first entry (in blob order) holding that object, and the values compared."""
    first = {}

    def at(k, obj):
        return first.setdefault(id(obj), (k, obj))[0]
    out = []
    for k, (rule, r) in enumerate(zip(table.entries(), raws)):
        b = r.built_norm
        out.append((at(k, rule.matches), [at(k, m) for m in rule.matches], at(k, rule.target),
                    at(k, rule.ip), at(k, r.mdata), at(k, r.tdata),
                    None if b is None else (at(k, b), [at(k, m) for m in b[0]], at(k, b[1])),
                    rule.index, rule.offset, rule.comefrom, rule.cache_key))
    return out


def _entry_by_entry(monkeypatch):
    """The decode's paths per template of a run (_made_strided, _checked_periods) turned
    off: every entry made and checked one by one."""
    monkeypatch.setattr(model, "_made_strided", lambda raws, rules, cf, strided, *a: sorted(
        i for lo, hi, per in strided for i in range(lo + per, hi)))
    monkeypatch.setattr(model, "_checked_periods", lambda raws, runs, plain: [raws])


@FAMILIES
def test_a_runs_later_periods_are_made_per_template_as_entry_by_entry(family, monkeypatch):
    """A first restore makes the Rules of the later periods of the walk's runs per template
    (_made_strided) and gives their raws the template's checked payloads per template
    (_checked_periods): the table, the kept blob, every object shared or not as entry by
    entry, the cache values' objects after the reply."""
    t = fanout_table(family)
    buf = _sent(t, family)
    made = []
    strided = model._made_strided
    monkeypatch.setattr(model, "_made_strided", lambda *a: made.append(a[3]) or
                        made.append(strided(*a)) or made[-1])
    table = decode_replace(buf, family)[1]
    raws = model._LAST_WALK[family][1]
    facts, shared = _facts(table), _sharing(table, raws)
    # the runs: the blocklist, the plain jumps, the hub and the service chains, and the
    # LOG rules, made per template but for the jumps without ports (a Jump of their own,
    # _TemplateRules.same: neither plain nor owned, left to the entries' path)
    runs, rest = made[0], made[1]
    assert len(made) == 2
    assert all(raws[i].std and raws[i].verdict > 0 and not raws[i].matches for i in rest)
    later = sum(hi - lo - per for lo, hi, per in runs)
    assert later - len(rest) > 5 * 40
    assert any(per == 4 for _lo, _hi, per in runs)
    _clear()
    monkeypatch.undo()
    _entry_by_entry(monkeypatch)
    ref = decode_replace(buf, family)[1]
    ref_raws = model._LAST_WALK[family][1]
    assert _facts(ref) == facts
    assert _sharing(ref, ref_raws) == shared


@FAMILIES
def test_a_runs_entry_with_payloads_of_its_own_is_made_by_the_entrys_path(family):
    """_made_strided leaves to the per-entry path an entry whose checked payloads are not its
    template's shared ones (here: parsed by _find_check as an entry before the template's
    first passed), and that path makes it as it would have."""
    t = fanout_table(family)
    buf = _sent(t, family)
    ref = decode_replace(buf, family)[1]
    _clear()
    calls = []
    check = model._find_check

    def own_payloads(raws, fam, runs=()):
        lay = check(raws, fam, runs)
        # a hub entry of a later period: its payloads parsed as its own
        hub = [r for r in raws if r.tpl is not None and type(r.mdata) is model._OwnPorts]
        r = hub[len(hub) // 2]
        r.mdata = model._mdata(r)
        calls.append(r.off)
        return lay
    model._find_check, saved = own_payloads, model._find_check
    try:
        got = decode_replace(buf, family)[1]
    finally:
        model._find_check = saved
    assert len(calls) == 1
    assert _facts(got) == _facts(ref)
    (rule,) = [r for r in got.entries() if r.offset == calls[0]]
    assert type(rule.matches[0]) is model.Match and rule.matches[0] == \
        [r for r in ref.entries() if r.offset == calls[0]][0].matches[0]


def _spans_one_by_one(raws, hook_start, bounds):
    """_spans as a loop over the chain starts (the reference of the C-level one)."""
    n = len(raws)
    spans, tail = [], None
    if n and (not bounds or bounds[0] > 0):
        spans.append((0, 0, bounds[0] if bounds else n, -1, ""))
    names = model._CHAIN_NAMES
    for b, end in zip(bounds, list(bounds[1:]) + [n]):
        h = hook_start.get(b)
        if h is not None:
            spans.append((b, b, end, h, model.HOOK_NAMES[h]))
        elif b == n - 1:
            tail = b
            break
        else:
            p = raws[b].tpayload
            cname = names.get(p)
            if cname is None:
                k = p.find(0)
                cname = names[p] = (p[:k] if k >= 0 else p).decode("latin-1")
            spans.append((b, b + 1, end, None, cname))
    return spans, tail


class _P:
    def __init__(self, tpayload):
        self.tpayload = tpayload


@pytest.mark.parametrize("case", ["hooks between", "no tail", "lead", "hook last", "none"])
def test_the_chains_spans_as_a_loop_of_the_starts_gives_them(case):
    """_spans' user chains made per slice of starts between the hook starts (map, zip): the
    spans, the tail and the name objects a loop over the starts gives; a name cached before
    (or met twice) is the one object; a payload without a NUL is a name of 32 bytes."""
    def payload(k):
        return (b"c%d\0" % k + bytes([k % 7]) * 5).ljust(32, b"\0") if k % 5 else \
            bytes([65 + k % 26]) * 32
    raws = [_P(payload(k)) for k in range(60)]
    raws[12] = _P(payload(9))                   # two chains of one name
    hook_start = {0: 0, 20: 1, 33: 3}
    bounds = [0, 3, 5, 9, 12, 20, 21, 25, 33, 40, 47, 59]
    if case == "no tail":
        bounds = bounds[:-1]
    elif case == "lead":
        hook_start = {20: 1}
        bounds = [4, 9, 20, 30, 59]
    elif case == "hook last":
        hook_start = {59: 4, 0: 0}
        bounds = [0, 9, 30, 59]
    elif case == "none":
        hook_start, bounds = {}, []
    model._CHAIN_NAMES.clear()
    model._CHAIN_NAMES[raws[21].tpayload] = cached = "".join(["c2", "1"])
    want = _spans_one_by_one(raws, hook_start, bounds)
    want_names = dict(model._CHAIN_NAMES)
    model._CHAIN_NAMES.clear()
    model._CHAIN_NAMES[raws[21].tpayload] = cached
    got = model._spans(raws, hook_start, bounds)
    assert got == want
    assert model._CHAIN_NAMES == want_names
    names = {s[0]: s[4] for s in got[0]}
    if 21 in names:
        assert names[21] is cached
    if 9 in names and 12 in names:
        assert names[9] is names[12]
    # a second decode's spans: the names cached by the first, the same objects
    again = model._spans(raws, hook_start, bounds)
    assert again == got and all(x[4] is y[4] for x, y in zip(again[0], got[0]))


@FAMILIES
def test_a_restore_of_other_rules_over_a_table(family, queue):
    """A restore whose rules are all others than the installed table's (only the policies
    reused: the walk's tail, their comefrom sent 0 where the kept blob has the hooks'): every
    entry was sent with comefrom and the counters zero, so the kept blob writes each one's
    comefrom as a first restore does (_kept_zeroed, the headers set after the reply), and
    the decode notes the blob as sent zeroed (the next restore of the same table compares
    with it). The kept blob is what the kernel keeps, the headers say its comefrom, and a
    restore of the same text again decodes alike."""
    def blocklist(first):
        t = copy.deepcopy(Table.empty("filter", family))
        t.chain("INPUT").rules = [Rule(_hdr(family, src=_addr(family, first + k)),
                                       target=Verdict(DROP)) for k in range(600)]
        t.layout()
        return t
    buf1, buf2 = _sent(blocklist(0), family), _sent(blocklist(5000), family)
    decode_replace(buf1, family)
    _run(queue)
    second = decode_replace(buf2, family)[1]
    walk = model._LAST_WALK[family]
    assert walk[4].zeroed is not None, "the blob sent zeroed was not taken as such"
    assert second.kept_blob == second.encode()
    _run(queue)
    assert _kept_comefrom_of_headers(second, walk[1], family)
    third = decode_replace(buf2, family)[1]
    _run(queue)
    assert _facts(third) == _facts(second) and third.kept_blob == second.kept_blob
