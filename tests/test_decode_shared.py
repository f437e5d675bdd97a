"""What a cold decode shares between the entries of a template (issue #7: the first restore of
10 000 rules into a freshly started helper):

  - a run's entries with the same bytes up to comefrom as the entry before them (a fan-out's
    ACCEPT, DROP and RETURN entries, one of each per service chain) share its key object and
    IpHeader (model._run_raws), also where the template's first entry has other addresses;
  - a run's entries sent with comefrom and the counters zero share one header
    (model._shared_hdr), which the kept blob's comefrom replaces rather than writes into;
  - _find_check gives an entry of a template without payloads of its own its first entry's
    parsed payloads at once (`plain`), and _make_rules makes the Rule of one in a read-only
    table from the template (`plain`, _plain_parts): the same objects the general path gives.

Each must decode exactly what the full walk decodes (test_decode_template.same: every rule's
fields, payloads, cache_key, the kept blob), cold and again from _ENTRY_CACHE.
"""
import copy

import pytest

from bpfilter_umh import model
from bpfilter_umh.model import (AF_INET, AF_INET6, XT_RETURN, Chain, ExtTarget, IpHeader,
                                Rule, Table, Verdict, decode_replace, error_target)

from test_decode_run import _addr, _hdr                                   # noqa: E402
from test_decode_template import CACHES, _facts, _table_buf, _tcp, same  # noqa: E402

ACCEPT, DROP = -2, -1
N = 60                  # user chains


def fanout_table(family: int, n: int = N, rep: int = 3) -> Table:
    """INPUT: a LOG rule, then n source prefixes dropped (a blocklist, each prefix `rep` times
    in a row: a chunk of a run may begin with two entries alike and go on with others); FORWARD: n jumps, then
    n jumps with tcp ports to user chains u0.. (the hub), each an ERROR head, "-s <one prefix> -j ACCEPT",
    "-j DROP" and RETURN: a cycle of four templates, the ACCEPT one first met as INPUT's policy
    (no addresses); OUTPUT: n LOG rules (a plain template with an extension target)."""
    t = copy.deepcopy(Table.empty("filter", family))
    users = [f"u{k}" for k in range(n)]
    log = ExtTarget("LOG", 0, model.ext.lookup(model.ext.TARGET, family, "LOG", 0)
                    .codec.parse(bytes(model.ext.lookup(model.ext.TARGET, family, "LOG", 0)
                                       .size)))
    t.chain("INPUT").rules = [Rule(IpHeader.any(family), target=copy.deepcopy(log))] + \
        [Rule(_hdr(family, src=_addr(family, k // rep)), target=Verdict(DROP))
         for k in range(n)]
    t.chain("FORWARD").rules = [
        Rule(IpHeader.any(family), target=model.Jump(users[k])) for k in range(n)] + [
        Rule(_hdr(family, dst=_addr(family, k % 7), proto=6), [_tcp(0, 80 + k)],
             model.Jump(users[k])) for k in range(n)]
    t.chain("OUTPUT").rules = [Rule(IpHeader.any(family), target=copy.deepcopy(log))
                               for _k in range(n)]
    return service_chains(t, users, family)


def service_chains(t: Table, users: list, family: int) -> Table:
    """t with user chains `users` appended, each an ERROR head, "-s <one prefix> -j ACCEPT",
    "-j DROP" and RETURN (a kube-proxy service chain), laid out."""
    for u in users:
        t.chains.append(Chain(u, head_entry=Rule(IpHeader.any(family), target=error_target(u)),
                              rules=[Rule(_hdr(family, src=_addr(family, 3)),
                                          target=Verdict(ACCEPT)),
                                     Rule(IpHeader.any(family), target=Verdict(DROP))],
                              policy_entry=Rule(IpHeader.any(family),
                                                target=Verdict(XT_RETURN))))
    t.layout()
    return t


def _cold(buf: bytes, family: int):
    """(table, raws) of a cold decode_replace."""
    for name in CACHES:
        getattr(model, name).clear()
    t = decode_replace(buf, family)[1]
    return t, model._LAST_WALK[family][1]


@pytest.fixture(autouse=True)
def _clean():
    yield
    for name in CACHES:
        getattr(model, name).clear()


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_a_fanout_and_blocklist_decode_as_walked_in_full(family):
    t = fanout_table(family)
    buf = _table_buf(t, t.encode())
    assert same(buf, family) >= t.num_entries - 30
    # again with smaller runs (several chunks of the cycle)
    old = model.RUN_FIRST, model.RUN_MOST
    model.RUN_FIRST, model.RUN_MOST = 2, 8
    try:
        same(buf, family)
    finally:
        model.RUN_FIRST, model.RUN_MOST = old


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_equal_entries_of_a_run_share_key_and_ipheader(family, monkeypatch):
    t = fanout_table(family)
    by_run = set()
    walk_run = model._walk_run

    def counted(*a):
        got = walk_run(*a)
        if got is not None:
            by_run.update(r.off for r in got[0])
        return got

    monkeypatch.setattr(model, "_walk_run", counted)
    _table, raws = _cold(_table_buf(t, t.encode()), family)
    any_ip = IpHeader.any(family)
    # the user chains' ACCEPT, DROP and RETURN entries: each kind one key object, one
    # IpHeader (read by runs but for the first few of the walk's per-entry path)
    for verdict, src in ((ACCEPT, _addr(family, 3)), (DROP, None), (XT_RETURN, None)):
        rs = [r for r in raws[-4 * N:] if r.std and r.verdict == verdict]
        assert len(rs) == N
        assert all(r.ip.src == (src or IpHeader.any(family).src) for r in rs)
        run = [r for r in rs if r.off in by_run]
        assert len(run) >= N - 8, verdict
        # (one key and IpHeader made per chunk of the run: here one)
        keys = {id(r.key) for r in run}
        ips = {id(r.ip) for r in run}
        assert len(keys) == 1 and len(ips) == 1, (verdict, len(keys), len(ips))
        # and one header (model._shared_hdr: sent with comefrom and the counters zero; given
        # the kept blob's comefrom, the same for all of them, one shared header again), whose
        # ip is None: each raw's own is r.ip
        hdrs = {id(r.hdr) for r in run}
        assert len(hdrs) == 1 and run[0].hdr.ip is None, (verdict, len(hdrs))
    # the blocklist's entries: an IpHeader of their own address each (by value: same())
    drops = [r for r in raws if r.std and r.verdict == DROP and r.ip.smsk != any_ip.smsk]
    assert len(drops) == N
    assert len({id(r.ip) for r in drops}) >= len({r.ip.src for r in drops}) == N // 3


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("rep", [1, 3])
def test_plain_template_rules_share_the_template_objects(family, rep):
    t = fanout_table(family, rep=rep)
    table, raws = _cold(_table_buf(t, t.encode()), family)
    rules = table.entries()
    # one Verdict per verdict (a read-only table), every rule a matches list of its own
    for verdict in (ACCEPT, DROP, XT_RETURN):
        rs = [r for r in rules if type(r.target) is Verdict and r.target.verdict == verdict]
        assert len({id(r.target) for r in rs}) == 1, verdict
        assert len({id(r.matches) for r in rs}) == len(rs)
    # the LOG rules: one ExtTarget (the template's), the entries' own positions and keys
    logs = [r for r in rules if type(r.target) is ExtTarget and r.target.name == "LOG"]
    assert len(logs) == N + 1 and len({id(r.target) for r in logs[1:]}) == 1
    for r in logs:
        assert r.cache_key == raws[r.index].key and r.offset == raws[r.index].off
    # every entry's _ENTRY_CACHE value has the objects its Rule was made of (built_norm), for
    # the next decode
    for r in raws:
        assert model._ENTRY_CACHE[r.key].built_norm is not None, r.off
    # the raws' parsed payloads: their first entry's
    for r in raws:
        if r.tpl is not None and not r.tpl.mvar and r.tpl.tvar != model._ERRNAME:
            assert r.mdata is r.tpl.first.mdata and r.tdata is r.tpl.first.tdata


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_the_cache_hits_after_a_cold_decode_decode_alike(family, monkeypatch):
    """The raws a cold decode put in _ENTRY_CACHE (their mdata, tdata and built_norm set by
    the template paths) give the next decode (the previous walk dropped: entries found in the
    cache, which start templates as entries walked in full do, the rest read by those) what
    the full walk gives, made of the first decode's objects."""
    t = fanout_table(family)
    buf = _table_buf(t, t.encode())
    same(buf, family)
    first, _raws = _cold(buf, family)
    model._LAST_WALK.clear()
    again = decode_replace(buf, family)[1]
    # a cache hit per template, the other entries read by the templates they started
    walked = model._LAST_WALK[family][1]
    assert sum(r.tpl is None for r in walked) * 20 < len(walked)
    assert _facts(again) == _facts(first)
    # the cache values kept the first decode's objects (built_norm): the LOG rules' one
    # target, each rule's matches
    a, b = first.entries(), again.entries()
    logs = [k for k, r in enumerate(a) if type(r.target) is ExtTarget and r.target.name == "LOG"]
    assert len(logs) == N + 1
    assert all(b[k].target is a[k].target for k in logs)
    assert all(not b[k].matches or b[k].matches[0] is a[k].matches[0] for k in range(len(a)))
    # and the full walk, cold, says the same
    monkeypatch.setattr(model, "TEMPLATES", False)
    assert _facts(_cold(buf, family)[0]) == _facts(again)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_shared_headers_describe_the_kept_blob(family):
    """A run's entries sent with comefrom and the counters zero share one header
    (model._shared_hdr, its ip None); what writes the kept blob's comefrom into the walk's
    headers gives an entry a header of its own instead of writing into the shared one."""
    t = fanout_table(family)
    _table, raws = _cold(_table_buf(t, t.encode()), family)
    model._run_deferred()           # (the headers set after the reply, where deferred)
    _headers_as_kept(family)
    shared = [r for r in raws if r.hdr.ip is None]
    assert len(shared) >= 3 * N
    # the same table restored again with a rule more at INPUT's start (every entry after it
    # moved: the previous walk's raws reused, their headers copied or written, _kept_spliced)
    t2 = copy.deepcopy(t)
    t2.chain("INPUT").rules.insert(0, Rule(_hdr(family, src=_addr(family, 99)),
                                           target=Verdict(DROP)))
    t2.layout()
    decode_replace(_table_buf(t2, t2.encode()), family)
    model._run_deferred()
    assert _headers_as_kept(family) == t2.num_entries
    # two raws of one shared header given other comefroms: each its own value, the header
    # they shared (and the raws still sharing it) unchanged
    h = shared[0].hdr
    alike = [r for r in shared if r.hdr is h]
    assert len(alike) >= 4
    was = (h.comefrom, h.nfcache, h.target_offset, h.next_offset, h.pad)
    model._kept_hdr(alike[0], 7)
    model._kept_headers(alike[1:4], [9, 9, 11])
    assert [r.hdr.comefrom for r in alike[:5]] == [7, 9, 9, 11, was[0]]
    assert (h.comefrom, h.nfcache, h.target_offset, h.next_offset, h.pad) == was
    assert all(r.hdr is h for r in alike[4:])
    # those given one comefrom share one header again, shared (ip None), the fields kept
    assert alike[1].hdr is alike[2].hdr is not alike[3].hdr
    for r in alike[:4]:
        n = r.hdr
        assert n is not h and n.ip is None and (n.pcnt, n.bcnt) == (0, 0)
        assert (n.nfcache, n.target_offset, n.next_offset, n.pad) == was[1:]


def _headers_as_kept(family: int) -> int:
    """Check that every raw of the last walk has a header as the kept blob has its entry
    (comefrom, counters zero) whose ip is None (shared) or the raw's own; returns how many."""
    kept, raws = model._LAST_WALK[family][0], model._LAST_WALK[family][1]
    cf, cnt, _ = model._VOLATILE[family]
    for r in raws:
        h = r.hdr
        assert h.ip is None or h.ip is r.ip
        assert (h.comefrom, h.pcnt, h.bcnt) == (
            int.from_bytes(kept[r.off + cf:r.off + cf + 4], "little"),
            int.from_bytes(kept[r.off + cnt:r.off + cnt + 8], "little"),
            int.from_bytes(kept[r.off + cnt + 8:r.off + cnt + 16], "little")), r.off
    return len(raws)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("writer", ["comefrom", "cand", "few", "zeroed", "between",
                                    "spliced"])
def test_kept_writers_leave_shared_headers_alone(family, writer):
    """Each way of writing the kept blob's comefrom into the walk's headers, given raws that
    share headers (a cold restore's runs) and a comefrom of their own each (one of three in
    turn, so that raws sharing a header get others): every raw's header as the returned blob
    has its entry."""
    t = fanout_table(family)
    buf = _table_buf(t, t.encode())
    _table, raws = _cold(buf, family)
    model._run_deferred()
    blob = model._LAST_WALK[family][0]
    cf, cnt, _ = model._VOLATILE[family]
    # the entries as sent (comefrom zero), their raws' headers to match (those that shared
    # one sharing one again)
    sent, memo = bytearray(blob), {}
    for r in raws:
        sent[r.off + cf:r.off + cf + 4] = bytes(4)
        model._kept_hdr(r, 0, memo)
    sent = bytes(sent)
    n = len(raws)
    assert sum(r.hdr.ip is None for r in raws) >= 3 * N
    assert len({id(r.hdr) for r in raws}) < n // 4
    comefrom = [k % 3 + 1 for k in range(n)]
    if writer == "comefrom":
        out = model._kept_comefrom(sent, raws, comefrom, cf)
    elif writer == "cand":
        out = model._kept_blob(sent, raws, comefrom, family, cand=set(range(n)))
    elif writer == "few":           # (_kept_joined)
        few = set(range(0, n, n // 40))
        out = model._kept_blob(sent, raws, comefrom, family, cand=few)
        comefrom = [c if k in few else 0 for k, c in enumerate(comefrom)]
    elif writer == "zeroed":        # (_kept_zeroed, _kept_headers)
        out = model._kept_blob(sent, raws, comefrom, family, zeroed=range(n))
    else:
        # _kept_spliced with nothing spliced: every entry between the runs (or walked anew,
        # zeroed)
        splice = {"kept": sent, "head": (0, 0), "tail": (n, len(sent), len(sent)),
                  "between": [range(n)] if writer == "between" else ()}
        cand = set() if writer == "between" else set(range(n))
        out = model._kept_spliced(sent, raws, comefrom, family, cand, splice,
                                  None if writer == "between" else range(n))
    for r, c in zip(raws, comefrom):
        h = r.hdr
        assert h.ip is None or h.ip is r.ip
        assert int.from_bytes(out[r.off + cf:r.off + cf + 4], "little") == c == h.comefrom, r.off
        assert not any(out[r.off + cnt:r.off + cnt + 16]) and h.pcnt == h.bcnt == 0
