"""What a cold decode does after the walk (issue #7: a restore of 10 000 rules), beside
test_decode_template.py (the template decode says what the full walk says) and
test_decode_cold.py:

  - Table._build's Rules (model._make_rules) of entries read by a template take the Rule
    fields the template fixes (nfcache, tail: bytes after the target, ip6t_entry's pad) from
    the template's first entry built, and their objects as documented: the matches and the
    extension target of an entry decoded before with the same bytes are that entry's objects
    (_ENTRY_CACHE), those of a template's entries the template's but for each entry's own
    payloads (tcp/udp ports, an ERROR target's name); a Jump, the matches list and the Rule
    are each entry's own, a Verdict one per verdict in a read-only table (decode_replace's),
    each entry's own in a table callers may edit (Table.decode without share);
  - a restore sends comefrom 0: the kept blob writes the comefrom of the entries a hook
    reaches, the others' stay 0 (model._kept_zeroed), and the raw entries describe it.
"""
import copy
import os
import sys
import tracemalloc

import pytest
from construct import Container

from bpfilter_umh import model
from bpfilter_umh.model import (AF_INET, AF_INET6, ExtTarget, IpHeader, Rule, Table, Verdict,
                                decode_replace)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

import kernel_xt as kx  # noqa: E402
from test_decode_template import CACHES, _ip, _table_buf, same, template_table  # noqa: E402

DROP = -1
PAD6 = b"\x01\x02\x03\x04"


def _clear():
    for name in CACHES:
        getattr(model, name).clear()


def _slack_table(family: int, n: int = 12):
    """template_table's, with INPUT rules of two more templates: n DROP rules with nfcache 5
    (and, IPv6, ip6t_entry's padding after comefrom not zero), n rules of an opaque target
    (no extension here checks it) with 8 bytes after the target (tail), n MARK rules (a
    target payload parsed by its codec), a copy of one rule of each."""
    t = template_table(family, 4)
    extra = []
    for k in range(n):
        extra.append(Rule(_ip(family, 40 + k), target=Verdict(DROP), nfcache=5,
                          pad=PAD6 if family == AF_INET6 else b""))
        extra.append(Rule(_ip(family, 80 + k, dst=True), tail=8,
                          target=ExtTarget("NOTHERE", 0, b"\x07" * 8)))
        extra.append(Rule(_ip(family, 120 + k), target=ExtTarget("MARK", 2,
                                                                 Container(mark=7, mask=255))))
    # and entries with the bytes of one before them (their matches and target that one's,
    # _ENTRY_CACHE; the Rule fields their template's)
    extra += [copy.deepcopy(r) for r in extra[3:6]]
    t.chain("INPUT").rules += extra
    t.layout()
    return t


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_template_entries_take_the_fields_their_template_fixes(family):
    """The rules read by a template have the nfcache, tail and pad of their bytes (the
    template's), as the full walk gives them (test_decode_template.same)."""
    t = _slack_table(family)
    buf = _table_buf(t, t.encode())
    assert same(buf, family) >= t.num_entries - 20
    _clear()
    table = decode_replace(buf, family)[1]
    raws = model._LAST_WALK[family][1]
    got = {(r.nfcache, r.tail, r.pad) for r in table.entries() if r.nfcache or r.tail}
    assert got == {(5, 0, PAD6 if family == AF_INET6 else b""), (0, 8, b"")}
    # most of them were read by a template (whose Rule fields _make_rules took from it)
    slack = [raws[r.index] for r in table.entries() if r.nfcache or r.tail]
    assert sum(r.tpl is not None for r in slack) >= len(slack) - 4
    _clear()


def _objects(table):
    """Every entry's (rule, matches list, match objects, target) in blob order."""
    return [(r, r.matches, list(r.matches), r.target) for r in table.entries()]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_rules_share_objects_as_documented(family):
    t = _slack_table(family)
    buf = _table_buf(t, t.encode())
    _clear()
    first = decode_replace(buf, family)[1]
    raws = model._LAST_WALK[family][1]
    objs = _objects(first)
    # each entry's own Rule, matches list and Jump (_build resolves it in place); one
    # Verdict per verdict (the table is read-only: nobody edits a target)
    for k in (0, 1):
        assert len({id(o[k]) for o in objs}) == len(objs)
    jumps = [o[3] for o in objs if isinstance(o[3], model.Jump)]
    assert len({id(x) for x in jumps}) == len(jumps) > 10
    verdicts = [o[3] for o in objs if isinstance(o[3], model.Verdict)]
    assert len({id(x) for x in verdicts}) == len({x.verdict for x in verdicts}) >= 2
    assert len(verdicts) > 30
    # an entry with the bytes of one before it: that one's match objects and extension
    # target; any other read by a template: the template's match objects but for the
    # payloads it brings (mvar: its own Match), an ERROR target of its own, another
    # extension target the template's
    by_tpl, first_of = {}, {}
    dups = 0
    for (_rule, _l, ms, tgt), r in zip(objs, raws):
        f_ms, f_tgt = first_of.setdefault(r.key, (ms, tgt))
        if f_ms is not ms:
            assert len(ms) == len(f_ms) and all(a is b for a, b in zip(ms, f_ms))
            assert (tgt is f_tgt) == isinstance(tgt, (ExtTarget, model.Verdict))
            dups += 1
        elif r.tpl is not None:
            by_tpl.setdefault(r.tpl, []).append((r, ms, tgt))
    assert len(by_tpl) >= 8 and dups >= 3
    checked = 0
    for tpl, ents in by_tpl.items():
        own = {k for k, _lo, _hi in tpl.mvar}
        for (_r0, ms0, t0), (_r1, ms1, t1) in zip(ents, ents[1:]):
            for k, (a, b) in enumerate(zip(ms0, ms1)):
                assert (a is b) == (k not in own), (tpl, k)
            if isinstance(t0, ExtTarget):
                assert (t0 is t1) == (tpl.tvar != model._ERRNAME)
            checked += 1
    assert checked > 30
    # a second decode of the same bytes (the walk not reused: _LAST_WALK dropped, the
    # entries in _ENTRY_CACHE): every match and extension target is the first decode's,
    # every standard target (one Verdict per verdict of this decode), matches list and Rule
    # new
    model._LAST_WALK.clear()
    again = _objects(decode_replace(buf, family)[1])
    assert len(again) == len(objs)
    for (r0, l0, ms0, t0), (r1, l1, ms1, t1) in zip(objs, again):
        assert r0 == r1 and r0 is not r1 and l0 is not l1
        assert all(a is b for a, b in zip(ms0, ms1))
        assert (t0 is t1) == isinstance(t0, ExtTarget)
    _clear()


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_an_editable_table_has_a_verdict_per_entry(family, normalize):
    """Table.decode without share gives a table its caller may edit: each entry's own
    Verdict (one rule's verdict changed changes no other), though the same bytes decoded by
    decode_replace share one per verdict."""
    t = _slack_table(family)
    blob = t.encode()
    _clear()
    table = Table.decode(blob, family, t.hook_entry, t.underflow, t.valid_hooks,
                         normalize=normalize)
    verdicts = [r.target for r in table.entries() if type(r.target) is Verdict]
    assert len(verdicts) > 30 and len({x.verdict for x in verdicts}) >= 2
    assert len({id(x) for x in verdicts}) == len(verdicts)
    verdicts[0].verdict = -3
    assert sum(x.verdict == -3 for x in verdicts) == 1
    _clear()


def _peak_of(monkeypatch, name: str, peaks: list):
    """model.<name> wrapped: each call's peak of memory allocated (tracemalloc) appended to
    peaks."""
    real = getattr(model, name)

    def traced(*a, **kw):
        tracemalloc.start()
        try:
            out = real(*a, **kw)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        return out
    monkeypatch.setattr(model, name, traced)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("sent", ["restore", "comefrom", "counted"])
def test_the_kept_blob_costs_one_copy(family, sent, monkeypatch):
    """The kept blob (comefrom as mark_source_chains() sets it, the counters zeroed) is one
    copy of the blob sent, patched in place (model._writable_copy): a bytearray patched, then
    bytes() of it, held two copies at once (a 10 000-rule table: ~2.7 MB each, ~680 fresh
    pages in a freshly started helper). For a restore (comefrom 0: _kept_zeroed), entries
    with another comefrom and no counts (_kept_comefrom), entries with counters (_kept_blob's
    own patches); and the previous kept blob with comefrom zeroed (_zeroed, what a restore
    over it is compared with). Each gives the bytes the kernel keeps."""
    t = copy.deepcopy(template_table(family, 40))
    for r in t.entries():
        r.comefrom = 0
    t.layout()
    restored = t.encode()
    _clear()
    want = decode_replace(_table_buf(t, restored), family)[1].kept_blob
    assert want != restored
    for k, r in enumerate(t.entries()):
        r.comefrom = 0x1F if sent != "restore" else 0
        if sent == "counted" and k % 2:
            r.counters = (k, 100 * k)
    blob = t.encode()
    peaks = []
    _peak_of(monkeypatch, "_kept_blob", peaks)
    _clear()
    table = decode_replace(_table_buf(t, blob), family)[1]
    assert table.kept_blob == want
    # (a second copy: 2x the blob at least)
    assert len(peaks) == 1 and peaks[0] < 1.75 * len(blob), (peaks, len(blob))
    prev = model._LAST_WALK[family]
    assert prev[0] == want
    prev[4].zeroed = None
    peaks.clear()
    _peak_of(monkeypatch, "_zeroed", peaks)
    assert model._zeroed(prev, family) == restored
    assert len(peaks) == 1 and peaks[0] < 1.75 * len(restored), (peaks, len(restored))
    _clear()


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_restore_kept_blob_writes_only_the_reached_entries(family):
    """A table sent with comefrom 0 (iptables-restore) whose entries are not all reached
    from a hook (a user chain no rule jumps to): the kept blob has each entry's comefrom as
    mark_source_chains() found it (0 for the chain no hook reaches, the ERROR entries) and
    is the sent blob
    elsewhere; each raw entry's header says the kept comefrom."""
    t = copy.deepcopy(template_table(family, 4))
    t.chains.append(model.Chain("lonely", head_entry=Rule(IpHeader.any(family),
                                                        target=model.error_target("lonely")),
                                rules=[Rule(_ip(family, 3), target=Verdict(DROP))],
                                policy_entry=Rule(IpHeader.any(family),
                                                  target=Verdict(model.XT_RETURN))))
    for r in t.entries():
        r.comefrom = 0
    t.layout()
    sent = t.encode()
    _clear()
    table = decode_replace(_table_buf(t, sent), family)[1]
    raws = model._LAST_WALK[family][1]
    kept = table.kept_blob
    cf = model._VOLATILE[family][0]
    lonely = table.chain("lonely")
    # (no walk goes through an ERROR entry: jumps land on a chain's first rule)
    unreached = {r.offset for r in lonely.entries()} | \
        {c.head_entry.offset for c in table.chains if c.head_entry is not None}
    assert len(kept) == len(sent)
    pos = 0
    for rule, raw in zip(table.entries(), raws):
        off = rule.offset
        assert kept[pos:off + cf] == sent[pos:off + cf]
        got = int.from_bytes(kept[off + cf:off + cf + 4], "little")
        assert got == rule.comefrom == raw.hdr.comefrom
        assert (got == 0) == (off in unreached or off == table.entries()[-1].offset)
        pos = off + cf + 4
    assert kept[pos:] == sent[pos:]
    # nothing reached (no valid hook's chain has an entry): the blob sent, kept as it is
    assert model._kept_zeroed(sent, raws, [0] * len(raws), cf) is sent
    _clear()


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_jump_chains_found_alike_by_dict_and_bisection(family, monkeypatch):
    """Table._build finds the chain of each of a cold decode's many jumps through a dict of
    the chains' first entries and first body entries (model._CHAIN_AT_MIN), a bisection of
    the first entries for any other landing: both give the same table, for jumps onto a
    chain's first rule, onto its RETURN entry (not its first), onto the ERROR head of a chain
    with no entry of its own and of the chain after it (whose head is also where the empty
    chain's body would start)."""
    t = copy.deepcopy(template_table(family, 40))
    empty = [model.Chain(name, head_entry=Rule(IpHeader.any(family),
                                               target=model.error_target(name)))
             for name in ("e1", "e2")]
    t.chains[3:3] = empty
    t.chain("INPUT").rules += [Rule(_ip(family, 1), target=model.Jump("e1", entry=-1)),
                               Rule(_ip(family, 2), target=model.Jump("e2", entry=-1)),
                               Rule(_ip(family, 3), target=model.Jump("u5", entry=1))]
    t.layout()
    buf = _table_buf(t, t.encode())
    _clear()
    table = decode_replace(buf, family)[1]
    assert len(model._LAST_WALK[family][4].kinds[0]) > model._CHAIN_AT_MIN
    got = {(j.chain, j.entry, j.chain_pos) for j in
           (r.target for r in table.chain("INPUT").rules[-3:])}
    names = [c.name for c in table.chains]
    assert got == {("e1", -1, names.index("e1")), ("e2", -1, names.index("e2")),
                   ("u5", 1, names.index("u5"))}
    from test_decode_template import _facts
    fast = _facts(table)
    _clear()
    monkeypatch.setattr(model, "_CHAIN_AT_MIN", 1 << 30)
    slow = _facts(decode_replace(buf, family)[1])
    assert fast == slow
    _clear()


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_table_without_the_final_error_entry(family):
    """translate_table() does not ask for iptables' final ERROR entry: without it, the last
    chain runs to the table's end (model._spans) and the table encodes as it was sent."""
    t = template_table(family, 3)
    blob = t.encode()
    last = t.entries()[-1]
    assert last.target.name == "ERROR"
    cut = blob[:last.offset]
    buf = kx.replace_buffer("filter", t.valid_hooks, t.num_entries - 1, len(cut), t.hook_entry,
                            t.underflow, 4, 0, cut)
    _clear()
    table = decode_replace(buf, family)[1]
    assert table.tail_entry is None
    assert table.chains[-1].name == "u2" and table.chains[-1].policy_entry is not None
    assert table.encode() == table.kept_blob and len(table.kept_blob) == len(cut)
    _clear()


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_editable_decode_over_the_previous_walk_shares_cached_objects(family, monkeypatch):
    """A decode that hands out rules to edit (Table.decode without share) over the previous
    walk makes a Rule of every entry, the reused ones too (their lookups in _ENTRY_CACHE made
    by _make_rules, the new ones' by _remember): each entry decoded before has that decode's
    match objects and extension target, a copy of its IpHeader."""
    t = _slack_table(family)
    _clear()
    first = Table.decode(t.encode(), family, t.hook_entry, t.underflow, t.valid_hooks,
                         normalize=True)
    t2 = copy.deepcopy(t)
    t2.chain("INPUT").rules.insert(5, Rule(_ip(family, 199), target=Verdict(DROP)))
    t2.layout()
    calls = []
    make = model._make_rules
    monkeypatch.setattr(model, "_make_rules",
                        lambda raws, todo, *a: calls.append((todo, a[-1])) or make(raws, todo, *a))
    second = Table.decode(t2.encode(), family, t2.hook_entry, t2.underflow, t2.valid_hooks,
                          normalize=True)
    # every entry made, the walk's middle alone looked up by _remember
    (todo, (c_lo, cached)), = calls
    assert todo == range(len(second.entries())) and 0 < c_lo < c_lo + len(cached) < todo.stop
    before = {r.cache_key: r for r in first.entries()}
    shared = 0
    for r in second.entries():
        p = before.get(r.cache_key)
        if p is None:
            continue
        assert len(r.matches) == len(p.matches)
        assert all(a is b for a, b in zip(r.matches, p.matches))
        assert (r.target is p.target) == isinstance(p.target, ExtTarget)
        assert r.ip == p.ip and r.ip is not p.ip
        shared += 1
    assert shared == len(second.entries()) - 1
    _clear()
