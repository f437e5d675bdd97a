"""The cold decode's shortcuts (model._walk_range, _Memo; issue #7: a restore of 10 000 rules
into an empty table), beside test_decode_template.py, which checks that the template decode
says what the full walk says:

  - an entry read by a template is first compared with the template that followed the
    previous entry's template last time (_Template.after): those links follow the table's
    cycle of templates, and are dropped when the walk is over (no reference cycle left);
  - an entry of a template with the first entry's addresses and masks shares that entry's
    IpHeader (as a dup shares its first's), one with addresses of its own has its own;
  - the extension names a table uses (target_names, match_names: _Memo's counts, made
    from the previous decode's in a warm one) follow the entries that come and go;
  - a restore over the previous table writes the kept comefrom of the entries walked anew
    in entry order and of the reused ones whose comefrom changed (model._kept_spliced).
"""
import collections
import copy
import gc
import os
import sys

import pytest

from bpfilter_umh import model
from bpfilter_umh.model import (AF_INET, AF_INET6, IpHeader, Jump, Rule, Verdict,
                                decode_replace)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

from test_decode_template import (CACHES, _buf, _ip, _kernel_blobs, _table_buf,  # noqa: E402
                                  _zeroed, root, template_table)
from test_model_incremental import _plain  # noqa: E402


def _cold_buf(buf, family):
    """(table, raw entries) of a decode_replace of buf with the decode caches empty."""
    for name in CACHES:
        getattr(model, name).clear()
    table = decode_replace(buf, family)[1]
    return table, model._LAST_WALK[family][1]


def _cold(t, family):
    return _cold_buf(_table_buf(t, t.encode()), family)


def _template_of(raws, i, firsts):
    """The template entry i was read by, or whose first entry it is (None: neither)."""
    r = raws[i]
    return r.tpl if r.tpl is not None else firsts.get(id(r))


def _links_of_walk(monkeypatch):
    """[{template: the template it linked to}] of each walk from now on, read just before the
    walk drops the links (model._unlink_templates)."""
    walks = []
    unlink = model._unlink_templates

    def record(heads):
        walks.append({t: t.after for lays in heads.values() for _f, ts, _c in lays
                      for t in ts.values()})
        unlink(heads)
    monkeypatch.setattr(model, "_unlink_templates", record)
    return walks


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_template_after_links_follow_the_entries(family, monkeypatch):
    """Each template's `after` is the template of the entry that followed its last entry
    (template_table: INPUT a cycle of rules of seven templates, user chains a cycle of
    three): the walk compared every entry with that link first, and the decode says what the
    full walk says (test_decode_template.py)."""
    t = template_table(family, 8)
    buf = _table_buf(t, t.encode())
    walks = _links_of_walk(monkeypatch)
    _table, raws = _cold_buf(buf, family)
    assert len(walks) == 1
    links = walks[0]
    firsts = {id(x.first): x for x in links}
    last = {}
    for i in range(len(raws) - 1):
        x = _template_of(raws, i, firsts)
        if x is not None:
            last[x] = i
    assert len(last) == len(links) >= 9
    for x, i in last.items():
        y = _template_of(raws, i + 1, firsts)
        assert y is not None and links[x] is y, i


def _count_lookups(monkeypatch) -> list:
    """[entries looked up in the walk's `heads`] from now on: each template's itemgetter of
    fixed bytes wrapped with a counter as _add_template puts it there."""
    calls = [0]
    add = model._add_template

    def counted(fixed):
        def get(e):
            calls[0] += 1
            return fixed(e)
        get.counted = True
        return get

    def adding(heads, r, e, family, ipsz):
        t = add(heads, r, e, family, ipsz)
        for lays in heads.values():
            lays[:] = [(f if getattr(f, "counted", False) else counted(f), ts, c)
                       for f, ts, c in lays]
        return t
    monkeypatch.setattr(model, "_add_template", adding)
    return calls


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_templates_in_a_cycle_are_guessed_not_looked_up(family, monkeypatch):
    """template_table(32): INPUT's 192 rules a cycle of seven templates, the user chains' 96
    entries one of three: nearly every entry read by a template is the one its previous
    entry's template links to (_Template.after), compared in place; the first turns of each
    cycle, and the entries where it changes (INPUT's first rule ACCEPT every fourth turn,
    DROP else), look templates up in `heads`."""
    t = template_table(family, 32)
    buf = _table_buf(t, t.encode())
    calls = _count_lookups(monkeypatch)
    _table, raws = _cold_buf(buf, family)
    read = sum(1 for r in raws if r.tpl is not None)
    assert read >= 250
    assert calls[0] * 4 <= read, (calls[0], read)     # (49 of 315 here)


@root
def test_a_decode_leaves_no_cycle():
    """The walk's templates keep no link to one another once it is over: a decode makes no
    reference cycle (a helper freezes what an install leaves without a GC pass first), so
    its templates, raw entries and rules go when the caches drop them, with the GC off
    (iptables-restore's blob of the blocklist and fan-out shapes at 600 rules)."""
    import rulesets
    bufs = [_buf(info, _zeroed(blob, AF_INET)) for info, blob in
            _kernel_blobs([rulesets.make(s, 600).text for s in ("blocklist", "fanout")])]
    for buf in bufs:
        _decode_leaves_no_cycle(buf)


def _decode_leaves_no_cycle(buf):
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        table, raws = _cold_buf(buf, AF_INET)
        assert any(r.tpl is not None for r in raws)
        assert all(r.tpl.after is None for r in raws if r.tpl is not None)
        del table, raws
        for name in CACHES:
            getattr(model, name).clear()
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, (model._Template, model._TRaw))]
        assert not left
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_template_entries_share_the_first_ipheader_only_with_its_addresses(family):
    """An entry read by a template whose ipt_ip is its first entry's (the same addresses and
    masks: the rest is the template's) has that entry's IpHeader object, any other one an
    IpHeader of its own; the table's rules are those headers (decode_replace: read-only)."""
    t = template_table(family, 8)
    table, raws = _cold(t, family)
    shared = own = 0
    for r in raws:
        if r.tpl is None:
            continue
        f = r.tpl.first
        if r.ip == f.ip:
            # (template_table's addresses repeat every 200 rules: equal means the same bytes)
            assert r.ip is f.ip
            shared += 1
        else:
            assert r.ip is not f.ip
            own += 1
    # the user chains' ERROR heads, rules (one address) and RETURN entries share (but for
    # each template's first), most INPUT rules have addresses of their own
    assert shared >= 20 and own >= 30
    by_off = {r.off: r for r in raws}
    for c in table.chains:
        for rule in c.entries():
            assert rule.ip is by_off[rule.offset].ip


def _counts(raws):
    """{name: entries} of the raw entries' target names and match names, counted one by one."""
    tn, mn = collections.Counter(), collections.Counter()
    for r in raws:
        tn[r.tname] += 1
        for m in r.matches:
            mn[m[0]] += 1
    return tn, mn


def _nonzero(d: dict) -> dict:
    return {k: v for k, v in d.items() if v}


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_extension_names_follow_warm_decodes(family):
    """_Memo's counts of target and match names are the entries' (one per entry using the
    name, several matches of one entry each counted) after a cold decode and after a warm
    decode (over the previous walk) that takes away every udp rule and all tcp rules but one:
    match_names drops "udp", keeps "tcp", and equals a cold decode's."""
    t = template_table(family, 8)
    cold, raws = _cold(t, family)
    memo = model._LAST_WALK[family][4]
    assert (_nonzero(memo.tnames), _nonzero(memo.mnames)) == _counts(raws)
    assert cold.match_names == {"tcp", "udp"} and cold.target_names == {"", "ERROR"}
    t2 = copy.deepcopy(t)
    inp = t2.chain("INPUT")
    tcp = [r for r in inp.rules if any(m.name == "tcp" for m in r.matches)]
    inp.rules = [r for r in inp.rules if not any(m.name == "udp" for m in r.matches)
                 and not any(r is x for x in tcp[1:])]
    t2.layout()
    warm = decode_replace(_table_buf(t2, t2.encode()), family)[1]   # over t's walk
    w_raws, memo = model._LAST_WALK[family][1], model._LAST_WALK[family][4]
    assert (_nonzero(memo.tnames), _nonzero(memo.mnames)) == _counts(w_raws)
    assert warm.match_names == {"tcp"} and warm.target_names == {"", "ERROR"}
    again, _raws = _cold(t2, family)
    assert (again.match_names, again.target_names) == (warm.match_names, warm.target_names)


def _restore_buf(t, family):
    """What iptables-restore sends for table t: every entry with comefrom and counters 0 (the
    rules are new objects: encode writes their zero comefrom and counters)."""
    t = copy.deepcopy(t)
    for r in t.entries():
        r.comefrom, r.counters = 0, (0, 0)
    t.layout()
    return _table_buf(t, t.encode())


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_restore_over_a_table_rewrites_the_kept_comefrom_of_reused_entries(family):
    """A restore over the previous table (the kept blob spliced from the previous one's,
    model._kept_spliced) whose entries walked anew all come with comefrom 0, and whose reused
    entries at the end (user chain u0, the same bytes) get another comefrom (the jump to u0
    moved from INPUT to FORWARD): the kept blob and every rule's comefrom are a cold
    decode's (the entries walked anew written in entry order, the reused ones from cand)."""
    t1 = _plain(family, 1)
    inp, fwd, u0 = t1.chain("INPUT"), t1.chain("FORWARD"), t1.chain("u0")
    inp.rules = [Rule(_ip(family, k), target=Verdict(-1)) for k in range(40)] + \
        [Rule(IpHeader.any(family), target=Jump("u0"))]
    fwd.rules = [Rule(_ip(family, 100 + k), target=Verdict(-1)) for k in range(40)]
    u0.rules = [Rule(_ip(family, 7, dst=True), target=Verdict(-2))]
    t2 = copy.deepcopy(t1)
    t2.chain("INPUT").rules.pop()
    t2.chain("FORWARD").rules.append(Rule(IpHeader.any(family), target=Jump("u0")))
    b1, b2 = _restore_buf(t1, family), _restore_buf(t2, family)
    for name in CACHES:
        getattr(model, name).clear()
    decode_replace(b1, family)
    warm = decode_replace(b2, family)[1]
    raws = model._LAST_WALK[family][1]
    cold, c_raws = _cold_buf(b2, family)
    assert warm.kept_blob == cold.kept_blob
    assert [r.comefrom for r in warm.entries()] == [r.comefrom for r in cold.entries()]
    assert [r.hdr.comefrom for r in raws] == [r.hdr.comefrom for r in c_raws]
    # u0 (after the entries walked anew: reused from the previous walk) is reached from
    # FORWARD now, not from INPUT
    assert warm.chain("u0").rules[0].comefrom != \
        decode_replace(b1, family)[1].chain("u0").rules[0].comefrom
