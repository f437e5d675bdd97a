"""The payloads of a first restore's entries that a template reads with payloads of their own
(issue #7: a restore of 10 000 rules into a freshly started helper) are parsed when read, not
by the decode:

  - a hub's tcp/udp rules whose ports differ (_Template.mvar): _find_check gives their raws
    one model._OwnPorts (the template's), _make_rules gives their Rules a model._PortsMatch;
  - user chains' ERROR heads (_Template.tvar _ERRNAME): one model._OwnName, a
    model._NamedError each;
  - in a read-only table, _make_rules makes such entries' Rules from the template's objects
    without the general path's tests (`owned`, model._owned_parts), each with a matches list
    of its own.

A first restore's compile reads the ports from the entries' bytes and `data` of a class's
first rule alone, so most of them are never parsed. What is read must be what the full walk
(model.TEMPLATES = False) parses: test_decode_template.same compares every payload of
these tables, cold, and here the lazy objects themselves (equality, repr, copies), the raws
kept in _ENTRY_CACHE read again by a decode that makes its own objects (not normalized), and
a compile.
"""
import copy
import pickle

import pytest
from construct import Container

from bpfilter_umh import compile as C
from bpfilter_umh import engine, model
from bpfilter_umh.model import (AF_INET, AF_INET6, ExtTarget, Jump, Match, Rule, Table,
                                decode_replace, error_target)

from test_decode_run import _addr, _hdr                                # noqa: E402
from test_decode_shared import N, _cold, fanout_table, service_chains    # noqa: E402
from test_decode_template import (CACHES, _facts, _table_buf, _target_facts,  # noqa: E402
                                  _tcp, same)


@pytest.fixture(autouse=True)
def _clean():
    yield
    for name in CACHES:
        getattr(model, name).clear()


def _hub(table: Table) -> list:
    """FORWARD's rules with tcp ports (the hub's second half)."""
    return [r for r in table.chain("FORWARD").rules if r.matches]


def _heads(table: Table) -> list:
    return [c.head_entry for c in table.chains if c.head_entry is not None]


def _parsed(obj) -> bool:
    return "data" in obj.__dict__


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_own_payloads_are_parsed_when_read(family):
    t = fanout_table(family)
    buf = _table_buf(t, t.encode())
    assert same(buf, family) >= t.num_entries - 30
    table, raws = _cold(buf, family)
    hub = _hub(table)
    assert len(hub) == N
    # the template's first entry parsed in full; the others: one _OwnPorts, a _PortsMatch
    # each, not parsed by the decode (but the first one _make_rules meets of the template:
    # its objects are made in full, for the others to copy)
    lazy = [r.matches[0] for r in hub[2:]]
    assert all(type(m) is model._PortsMatch for m in lazy)
    assert not any(map(_parsed, lazy))
    assert len({id(r.matches) for r in hub}) == N
    assert len({id(r.target) for r in hub}) == N        # Jumps, each resolved in place
    owns = {id(raws[r.index].mdata) for r in hub[1:]}
    assert len(owns) == 1 and type(raws[hub[1].index].mdata) is model._OwnPorts
    heads = _heads(table)
    assert len(heads) == N
    assert all(type(h.target) is model._NamedError for h in heads[2:])
    assert not any(_parsed(h.target) for h in heads[2:])
    assert type(raws[heads[1].index].tdata) is model._OwnName
    # read: what the codec parses of the entry's own payload, the rule's own ports
    for k, (r, want) in enumerate(zip(hub, t.chain("FORWARD").rules[N:])):
        m = r.matches[0]
        assert m.data == want.matches[0].data == _tcp(0, 80 + k).data
        assert m.data["dpts"] == [80 + k, 83 + k] and m.data["spts"] == [0, 0]
        assert m == want.matches[0] and want.matches[0] == m and not m != want.matches[0]
    assert all(map(_parsed, lazy))
    for k, h in enumerate(heads):
        assert h.target == error_target(f"u{k}") and error_target(f"u{k}") == h.target
        assert h.target.data["errorname"] == f"u{k}".encode().ljust(30, b"\0")
    # a different payload compares unequal, either way round
    assert hub[1].matches[0] != hub[2].matches[0]
    assert hub[2].matches[0] != t.chain("FORWARD").rules[N + 1].matches[0]
    assert heads[1].target != heads[2].target and error_target("u1") != heads[2].target


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_lazy_payloads_read_and_copy_as_plain_objects(family):
    t = fanout_table(family)
    table, _raws = _cold(_table_buf(t, t.encode()), family)
    m = _hub(table)[5].matches[0]
    h = _heads(table)[5].target
    assert not _parsed(m) and not _parsed(h)
    # repr as the dataclass's (and parsed by it)
    assert repr(m) == repr(Match(m.name, m.revision, m.data, m.raw))
    assert repr(h).startswith("ExtTarget(name='ERROR'") and "u5" in repr(h)
    # copies and pickles: the plain dataclass, the payload parsed
    for mm, cls in ((m, Match), (h, ExtTarget)):
        for c in (copy.copy(mm), copy.deepcopy(mm), pickle.loads(pickle.dumps(mm))):
            assert type(c) is cls and c == mm and type(c.data) is Container
            assert c.raw == mm.raw
    # a deep copy of the table (Table.with_counters' way of editing it) is plain throughout
    t2 = copy.deepcopy(table)
    assert type(_hub(t2)[5].matches[0]) is Match and type(_heads(t2)[5].target) is ExtTarget
    assert t2 == table
    # and encodes to the bytes the decode kept (what the kernel keeps)
    assert table.encode() == t2.encode() == table.kept_blob


def _entry_facts(t: Table) -> list:
    """Every entry's fields, target and matches by value (raw payloads too)."""
    return [(model._RULE_FIELDS(r), _target_facts(r.target),
             [(m.name, m.revision, m.data, m.raw) for m in r.matches], r.cache_key)
            for r in t.entries()]


def _not_normalized(t: Table, blob: bytes, family: int) -> Table:
    return Table.decode(blob, family, t.hook_entry, t.underflow, t.valid_hooks,
                        num_entries=t.num_entries)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_cached_raws_with_own_payloads_decode_again(family):
    """The raws _ENTRY_CACHE keeps hold the _OwnPorts / _OwnName: a decode that makes its own
    Rules from them (not normalized: no built_raw yet; the cache hit that starts a template
    through _made_extensions, the template's other entries as a cold decode's) parses them,
    and gets what a cold decode gets."""
    t = fanout_table(family)
    blob = t.encode()
    buf = _table_buf(t, blob)
    _cold(buf, family)
    model._LAST_WALK.clear()
    again = _not_normalized(t, blob, family)
    kept = [c for c in model._ENTRY_CACHE.values() if type(c.mdata) is model._OwnPorts]
    assert len(kept) >= N - 8
    for name in CACHES:
        getattr(model, name).clear()
    cold = _not_normalized(t, blob, family)
    assert _entry_facts(again) == _entry_facts(cold)
    assert again == cold
    assert [m.data for r in _hub(again) for m in r.matches] == \
        [m.data for r in _hub(cold) for m in r.matches]
    # and a shared decode of it again from the cache: the first decode's lazy objects
    model._LAST_WALK.clear()
    first, _raws = _cold(buf, family)
    model._LAST_WALK.clear()
    hit = decode_replace(buf, family)[1]
    assert all(a.matches[0] is b.matches[0] for a, b in zip(_hub(first), _hub(hit)))
    assert _facts(hit) == _facts(first)


def _services(n: int) -> Table:
    """bench/rulesets.py's fan-out (kube-proxy's shape): FORWARD jumps by destination and tcp
    port (exact ports: the hub is classified by the entries' keys) to n chains of
    "-s PREFIX -j ACCEPT", "-j DROP"."""
    t = copy.deepcopy(Table.empty("filter", AF_INET))
    t.chain("FORWARD").rules = [
        Rule(_hdr(AF_INET, dst=_addr(AF_INET, k), proto=6),
             [Match("tcp", 0, Container(spts=[0, 65535], dpts=[1000 + k, 1000 + k], option=0,
                                        flg_mask=0, flg_cmp=0, invflags=0))],
             Jump(f"svc{k}")) for k in range(n)]
    return service_chains(t, [f"svc{k}" for k in range(n)], AF_INET)


def test_a_compile_parses_few_of_them():
    """The compile of a cold fan-out (its hub classified by the entries' keys) parses the
    ports of a class's first rules only, no ERROR head; its programs are the ones of the same
    table with every payload parsed before."""
    n = 400
    t = _services(n)
    assert same(_table_buf(t, t.encode()), AF_INET) >= t.num_entries - 16
    table, _raws = _cold(_table_buf(t, t.encode()), AF_INET)
    hub = table.chain("FORWARD").rules
    assert sum(type(r.matches[0]) is model._PortsMatch for r in hub) >= n - 2
    kf = engine.kernel_facts()
    got = C.compile_table(table, kf, "nf")
    read = sum(1 for r in hub[2:] if _parsed(r.matches[0]))
    assert read <= 8, read
    assert not any(_parsed(h.target) for h in _heads(table)[2:])
    # the same table, every payload parsed (plain objects): the same programs
    plain = copy.deepcopy(table)
    for name in CACHES:
        getattr(model, name).clear()
    want = C.compile_table(plain, kf, "nf")
    assert [p.listing() for p in got.programs] == [p.listing() for p in want.programs]


def test_owned_parts_only_for_payloads_parsed_when_read():
    """_make_rules' `owned` path makes a template's entries from _find_check's _OwnPorts /
    _OwnName; an entry whose payloads were parsed (a list, a Container) goes the general
    path, which reads them (model._owned_parts: None)."""
    t = fanout_table(AF_INET)
    _table, raws = _cold(_table_buf(t, t.encode()), AF_INET)
    hub = [r for r in raws if r.tpl is not None and r.tpl.mvar]
    heads = [r for r in raws if r.tpl is not None and r.tpl.tvar == model._ERRNAME]
    for r in (hub[-1], heads[-1]):
        tr = r.tpl.built
        assert tr is not None and model._owned_parts(tr, r) is not None
        parsed = copy.copy(r)
        parsed.mdata, parsed.tdata = model._mdata(r), model._tdata(r)
        assert model._owned_parts(tr, parsed) is None
    ports, named = model._owned_parts(hub[-1].tpl.built, hub[-1])[3:]
    assert ports == ((0, 0),) and named is None
    ports, named = model._owned_parts(heads[-1].tpl.built, heads[-1])[3:]
    assert ports == () and named.name == "ERROR"
