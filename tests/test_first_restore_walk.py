"""The first restore's walk and what the decode reads of it afterwards (issue #7: a restore of
10 000 rules into an empty table within 2x the kernel's time). The walk notes the runs it read
(model._WalkRun: whole periods of a cycle of templates, whether every entry came with
comefrom and the counters zero), and the steps after it read those per template, not per
entry:

  - _Memo._scan: each entry's offset, whether it is a jump, an ERROR head or an
    unconditional standard verdict, its target and match names: the same lists and counts
    as entry by entry, for runs of one template and cycles of several, cycles of an
    unconditional verdict's template (model._TERM) and a conditional one's (model._VERDICT);
  - _volatile_zero: the same answer as each header read, with comefrom or a counter set in
    any one entry (in a run, or read by a run's column past its last period);
  - _mark_fast looks up the jumps' landings by bisection (_indexes_in), not a dict of every
    entry's offset: the same comefrom and landings, None for an offset that is no entry;
    those that land on an entry after an ERROR head (a user chain's first) in a dict of
    those entries' offsets (_landings), the same indexes.
"""
import bisect
import copy

import pytest

from bpfilter_umh import model, uapi
from bpfilter_umh.model import AF_INET, AF_INET6, IpHeader, Rule, Verdict, decode_replace

from test_decode_run import _addr, _hdr, run_table  # noqa: E402
from test_decode_shared import fanout_table  # noqa: E402
from test_decode_template import CACHES, _facts, _table_buf, _zeroed  # noqa: E402

FAMILIES = pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
DROP = -1


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    """Runs tried after 4 hits, in chunks of 2 periods doubling to 8 (a run of 40 goes
    through several chunks); the caches empty before and after."""
    monkeypatch.setattr(model, "RUN_AFTER", 4)
    monkeypatch.setattr(model, "RUN_FIRST", 2)
    monkeypatch.setattr(model, "RUN_MOST", 8)
    for name in CACHES:
        getattr(model, name).clear()
    yield
    for name in CACHES:
        getattr(model, name).clear()


def mixed_table(family: int, n: int = 40):
    """INPUT: DROPs whose addresses are zero in every other entry: a cycle of two templates,
    the unconditional DROPs' (model._TERM: their addresses all zero) and the others'
    (model._VERDICT: not unconditional)."""
    t = copy.deepcopy(model.Table.empty("filter", family))
    t.chain("INPUT").rules = [
        Rule(IpHeader.any(family) if k % 2 else _hdr(family, src=_addr(family, k)),
             target=Verdict(DROP)) for k in range(n)]
    t.layout()
    return t


TABLES = {"runs": run_table, "fanout": fanout_table, "mixed": mixed_table}


def _walked(blob: bytes, t, family: int):
    # cold: an entry found in the entry cache starts a template where a walked one would not
    # have, which moves where the runs start (their phase in a cycle)
    model._ENTRY_CACHE.clear()
    runs = []
    raws = model._walk_range(blob, uapi.layout(family), t.underflow, t.valid_hooks, 0, None,
                             runs)
    return raws, runs


def _memo_facts(m):
    return (list(m.offs), tuple(list(k) for k in m.kinds), m.tnames, m.mnames)


@FAMILIES
@pytest.mark.parametrize("shape", list(TABLES))
def test_memo_of_runs_equals_entry_by_entry(family, shape):
    t = TABLES[shape](family)
    blob = _zeroed(t.encode(), family)     # as iptables-restore sends it
    raws, runs = _walked(blob, t, family)
    # the runs cover most entries, in whole periods of their cycle
    assert sum(r.hi - r.lo for r in runs) >= 0.7 * len(raws)
    for r in runs:
        assert (r.hi - r.lo) % len(r.cyc) == 0
        assert raws[r.lo].off == r.base
    by_run = model._Memo(raws, 0, 0, len(blob), None, None, runs)
    one_by_one = model._Memo(raws, 0, 0, len(blob), None, None)
    assert _memo_facts(by_run) == _memo_facts(one_by_one)
    # what each shape exercises: cycles of templates (jumps, ERROR heads, two unconditional
    # verdicts a period), a cycle of an unconditional and a conditional verdict
    jumps, errs, terms = one_by_one.kinds
    if shape != "mixed":
        assert any(len(r.cyc) > 1 for r in runs)
        assert errs and jumps
    if shape == "mixed":
        uncond = {i for r in runs for i in range(r.lo, r.hi) if raws[i].uncond}
        assert uncond and len(uncond) < sum(r.hi - r.lo for r in runs)
        assert uncond <= set(terms)


@FAMILIES
@pytest.mark.parametrize("shape", list(TABLES))
def test_memo_of_runs_after_entries_walked_before(family, shape):
    """The runs' indexes count from raws[nhead] (an append's reused head), as _Memo reads
    them; with no previous memo to splice them into, it reads every entry itself."""
    t = TABLES[shape](family)
    blob = _zeroed(t.encode(), family)     # as iptables-restore sends it
    raws, runs = _walked(blob, t, family)
    shifted = [model._WalkRun(r.lo - 3, r.hi - 3, r.cyc, r.base, r.zero) for r in runs
               if r.lo >= 3]
    assert shifted
    a = model._Memo(raws, 3, 0, len(blob), None, None, shifted)
    b = model._Memo(raws, 0, 0, len(blob), None, None)
    assert _memo_facts(a) == _memo_facts(b)


def _set_volatile(blob: bytes, off: int, family: int, what: str) -> bytes:
    cf, cnt, _end = model._VOLATILE[family]
    out = bytearray(blob)
    if what == "comefrom":
        out[off + cf:off + cf + 4] = (1 << 1).to_bytes(4, "little")
    elif what == "pcnt":
        out[off + cnt:off + cnt + 8] = (7).to_bytes(8, "little")
    else:
        out[off + cnt + 8:off + cnt + 16] = (1500).to_bytes(8, "little")
    return bytes(out)


@FAMILIES
@pytest.mark.parametrize("shape", list(TABLES))
def test_volatile_zero_of_runs_equals_each_header(family, shape):
    t = TABLES[shape](family)
    blob = _zeroed(t.encode(), family)     # as iptables-restore sends it
    raws, runs = _walked(blob, t, family)
    assert all(r.zero for r in runs) and model._volatile_zero(raws, runs)
    offs = [r.off for r in raws]
    in_runs = {raws[i].off for r in runs for i in range(r.lo, r.hi)}
    tried = 0
    for k, off in enumerate(offs):
        what = ("comefrom", "pcnt", "bcnt")[k % 3]
        b = _set_volatile(blob, off, family, what)
        raws2, runs2 = _walked(b, t, family)
        each = model._volatile_zero_of(raws2)
        assert not each
        assert model._volatile_zero(raws2, runs2) is False, (k, what)
        # each run's own entries: zero exactly where every one of them is (an entry read by a
        # run's column past its last period is not the run's)
        for r in runs2:
            assert r.zero == model._volatile_zero_of(raws2[r.lo:r.hi]), (k, what)
        # also from an index on (an append's reused head: the runs count from there)
        at = 2
        runs_at = [model._WalkRun(r.lo - at, r.hi - at, r.cyc, r.base, r.zero) for r in runs2
                   if r.lo >= at]
        assert model._volatile_zero(raws2, runs_at, at) is False, (k, what)
        tried += off in in_runs
    assert tried >= 0.7 * len(offs)


@FAMILIES
def test_a_restore_blob_decodes_as_sent_zeroed(family):
    """A restore's blob (comefrom and counters zero) is remembered as such (memo.zeroed: the
    next restore compares with it), the runs read per template; one with a counter set in
    the middle of a run is not, and both decode as with no runs."""
    t = fanout_table(family)
    blob = _zeroed(t.encode(), family)     # as iptables-restore sends it
    buf = _table_buf(t, blob)
    tb = decode_replace(buf, family)[1]
    memo = model._LAST_WALK[family][4]
    assert memo.zeroed == blob
    with_runs = _facts(tb)
    for name in CACHES:
        getattr(model, name).clear()
    model.RUN_AFTER = 1 << 30           # (restored by the fixture's monkeypatch)
    assert _facts(decode_replace(buf, family)[1]) == with_runs
    model.RUN_AFTER = 4
    for name in CACHES:
        getattr(model, name).clear()
    raws, runs = _walked(blob, t, family)
    mid = max(runs, key=lambda r: r.hi - r.lo)
    off = raws[(mid.lo + mid.hi) // 2].off
    b = _set_volatile(blob, off, family, "pcnt")
    for name in CACHES:
        getattr(model, name).clear()
    tb = decode_replace(_table_buf(t, b), family)[1]
    assert model._LAST_WALK[family][4].zeroed is None
    got = _facts(tb)
    for name in CACHES:
        getattr(model, name).clear()
    model.RUN_AFTER = 1 << 30
    assert _facts(decode_replace(_table_buf(t, b), family)[1]) == got


def test_indexes_in_finds_what_a_dict_does():
    offs = list(range(0, 8000, 152)) + list(range(8000, 20000, 112))
    values = [o + d for o in offs[::7] for d in (-8, 0, 8)] + [-1, 0, 19888, 19999, 10 ** 9]
    d = dict(zip(offs, range(len(offs))))
    assert model._indexes_in(offs, values) == [d.get(v) for v in values]
    # a decode's offsets moved by an append (_ShiftedInts)
    sh = model._ShiftedInts(offs, 40, 256)
    moved = sh.ints()
    d = dict(zip(moved, range(len(moved))))
    values = [o + x for o in moved[::5] for x in (-256, 0, 8)]
    assert model._indexes_in(sh, values) == [d.get(v) for v in values]
    assert bisect.bisect_left(moved, moved[41]) == 41


def test_landings_find_what_indexes_in_does(monkeypatch):
    """_landings: the entries after the ERROR entries looked up in a dict, any other value
    bisected: the same index as _indexes_in for values on those entries, on other entries,
    between entries and outside the table, an ERROR entry last, and offsets moved by an
    append (_ShiftedInts); the values on entries after an ERROR entry bisected none."""
    offs = list(range(0, 8000, 152)) + list(range(8000, 20000, 112))
    n = len(offs)
    errs = list(range(3, n, 4)) + [n - 1]           # the last: no entry after it
    after = [offs[e + 1] for e in errs[:-1]]
    values = after[::-1] + [o + d for o in offs[::7] for d in (-8, 0, 8)] + \
        [-1, 0, 19888, 19999, 10 ** 9] + after
    assert any(v not in after and v in offs for v in values)
    got = model._landings(offs, values, errs)
    assert got == model._indexes_in(offs, values)
    assert got[:len(after)] == [e + 1 for e in errs[:-1]][::-1]
    sh = model._ShiftedInts(offs, 40, 256)
    moved = sh.ints()
    values = [moved[e + 1] for e in errs[:-1]] + [o + x for o in moved[::5] for x in (-256, 0, 8)]
    assert model._landings(sh, values, errs) == model._indexes_in(moved, values)
    # a table of one ERROR entry or none: bisected alone
    assert model._landings(offs, after, errs[:1]) == model._indexes_in(offs, after)
    assert model._landings(offs, after, []) == model._indexes_in(offs, after)
    bisected = []

    def counted(*a):
        bisected.append(a[1])
        return bisect.bisect_left(*a)
    monkeypatch.setattr(model, "bisect", type(bisect)("bisect"))
    model.bisect.bisect_left = counted
    assert model._landings(offs, after + [1, 152], errs) == \
        [e + 1 for e in errs[:-1]] + [None, 1]
    assert bisected == [1, 152]


@FAMILIES
@pytest.mark.parametrize("shape", ["runs", "fanout"])
def test_mark_fast_by_bisection_equals_by_dict(family, shape):
    t = TABLES[shape](family)
    blob = _zeroed(t.encode(), family)     # as iptables-restore sends it
    raws, runs = _walked(blob, t, family)
    he, vh = t.hook_entry, t.valid_hooks
    m1 = model._Memo(raws, 0, 0, len(blob), None, None, runs)
    m2 = model._Memo(raws, 0, 0, len(blob), None, None, runs)
    by_at = model._mark_fast(raws, he, vh, m1.at, m1)
    by_dict = model._mark_fast(raws, he, vh, m2.at.dict(), m2)
    assert by_at is not None and by_at == by_dict
    assert m1.lands == m2.lands and None not in m1.lands
    assert by_at == model._mark_source_chains(raws, len(blob), he, vh)
    # a jump onto no entry (8 bytes into one): no landing, the entry walk answers
    j = m1.kinds[0][len(m1.kinds[0]) // 2]
    raws[j].verdict += 8
    m3 = model._Memo(raws, 0, 0, len(blob), None, None, runs)
    assert model._mark_fast(raws, he, vh, m3.at, m3) is None
    assert model._mark_fast(raws, he, vh, m3.at.dict(), m3) is None


def alternating_table(family: int, n: int = 40):
    """FORWARD: "-s <prefix k> -j ACCEPT" and "-j u<k>" in turn (a cycle of two templates, the
    second's own field a jump's verdict); user chains u0.. with a RETURN each."""
    t = copy.deepcopy(model.Table.empty("filter", family))
    users = [f"u{k}" for k in range(n)]
    rules = []
    for k in range(n):
        rules.append(Rule(_hdr(family, src=_addr(family, k)), target=Verdict(-2)))
        rules.append(Rule(IpHeader.any(family), target=model.Jump(users[k])))
    t.chain("FORWARD").rules = rules
    for u in users:
        t.chains.append(model.Chain(u, head_entry=Rule(IpHeader.any(family),
                                                       target=model.error_target(u)),
                                    rules=[], policy_entry=Rule(IpHeader.any(family),
                                                                target=Verdict(-5))))
    t.layout()
    return t


@FAMILIES
def test_a_counter_read_past_a_runs_last_period_is_not_the_runs(family):
    """A run of a cycle ends at the period where one template's own field fails (here a jump
    turned into a DROP: the cycle is the jump, then the ACCEPT after it); the other
    templates' columns read that period's entries too (_read_periods: the ACCEPT after the
    DROP), which are not the run's: their counters leave the run zero."""
    t = alternating_table(family)
    blob = _zeroed(t.encode(), family)
    raws, runs = _walked(blob, t, family)
    assert any(len(r.cyc) == 2 for r in runs)
    offs = [r.off for r in raws]
    fwd = [i for i, r in enumerate(raws) if r.std and r.verdict > 0]
    tried = 0
    for j in fwd[10:-4]:
        # the period of the run holding j (where the walk's guesses began the run decides
        # whether the jump or the ACCEPT comes first in it), and its other entry
        r0 = next((r for r in runs if r.lo <= j < r.hi and len(r.cyc) == 2), None)
        if r0 is None:
            continue
        start = j - (j - r0.lo) % 2
        other = start + 1 if start == j else start
        b = bytearray(blob)
        jo = raws[j].off
        p = jo + raws[j].hdr.target_offset + 32            # xt_standard_target.verdict
        b[p:p + 4] = (-1 & 0xFFFFFFFF).to_bytes(4, "little")
        b = _set_volatile(bytes(b), offs[other], family, "pcnt")
        raws2, runs2 = _walked(b, t, family)
        for r in runs2:
            assert r.zero == model._volatile_zero_of(raws2[r.lo:r.hi]), j
        assert model._volatile_zero(raws2, runs2) is False
        # the run before ended with the period before the changed one, the period's other
        # entry (read by the run's other column) walked one by one
        tried += any(r.hi == start and len(r.cyc) == 2 for r in runs2) and \
            not any(r.lo <= other < r.hi for r in runs2)
    assert tried >= len(fwd[10:-4]) // 2, tried


def _cold_and_after(t, t2, family: int, fn: str):
    """(t2 decoded cold, t2 decoded after t, what model.`fn` returned in that second decode:
    a list, a call each)."""
    buf1 = _table_buf(t, _zeroed(t.encode(), family))
    buf2 = _table_buf(t2, _zeroed(t2.encode(), family))
    cold = decode_replace(buf2, family)[1]
    for name in CACHES:
        getattr(model, name).clear()
    decode_replace(buf1, family)
    got = []
    real = getattr(model, fn)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(model, fn, lambda *a, **k: got.append(real(*a, **k)) or got[-1])
        warm = decode_replace(buf2, family)[1]
    return cold, warm, got


@FAMILIES
@pytest.mark.parametrize("n", [40, 400], ids=["small", "big"])
def test_a_restore_over_the_table_keeps_what_a_cold_decode_keeps(family, n):
    """A restore over the previous table (_kept_spliced: the previous kept bytes for the runs
    of entries alike at both ends, blob's between) keeps the bytes a cold decode keeps: each
    entry's comefrom as marked, counters zero. Copied once where the kept blob is handed out
    (big: a block of the heap's size class; small: a BytesIO's buffer)."""
    t = fanout_table(family, n)
    t2 = copy.deepcopy(t)
    # another source prefix in the middle of INPUT: the same entries at both ends
    rules = t2.chain("INPUT").rules
    rules.insert(len(rules) // 2, Rule(_hdr(family, src=_addr(family, 9999)),
                                       target=Verdict(DROP)))
    t2.layout()
    assert (len(_table_buf(t2, _zeroed(t2.encode(), family))) > (256 << 10)) == (n == 400)
    cold, warm, spliced = _cold_and_after(t, t2, family, "_kept_spliced")
    assert spliced
    assert type(warm.kept_blob) is bytes
    assert warm.kept_blob == cold.kept_blob
    assert _facts(warm) == _facts(cold)


@FAMILIES
@pytest.mark.parametrize("kind", ["plain", "return", "jump", "drop-in-chain", "gone-return"])
def test_mark_again_refuses_a_changed_jump_or_return(family, kind):
    """_mark_again reuses the previous comefrom values only where no changed entry (new, or
    the previous one it replaced) is a jump or a return: found in the memos' lists of both
    kinds, not entry by entry. The decode equals a cold one either way."""
    t = fanout_table(family, 40)
    t2 = copy.deepcopy(t)
    rules = t2.chain("INPUT").rules
    mid = len(rules) // 2
    if kind == "plain":
        rules.insert(mid, Rule(_hdr(family, src=_addr(family, 777)), target=Verdict(DROP)))
    elif kind == "return":
        rules.insert(mid, Rule(IpHeader.any(family), target=Verdict(DROP)))
    elif kind == "jump":
        rules.insert(mid, Rule(IpHeader.any(family), target=model.Jump("u3")))
    elif kind == "drop-in-chain":
        u = t2.chain("u5")
        u.rules.insert(0, Rule(IpHeader.any(family), target=Verdict(-2)))
    else:
        # the previous table's unconditional DROP replaced by a rule with an address
        u, u1 = t.chain("u5"), t2.chain("u5")
        assert u.rules[1].target.verdict == DROP and u.rules[1].ip.src == IpHeader.any(family).src
        u1.rules[1] = Rule(_hdr(family, src=_addr(family, 778)), target=Verdict(DROP))
    t2.layout()
    cold, warm, got = _cold_and_after(t, t2, family, "_mark_again")
    assert len(got) == 1
    assert (got[0] is not None) == (kind == "plain"), kind
    assert _facts(warm) == _facts(cold)


@FAMILIES
def test_a_jump_with_ports_reads_its_own_padding_in_a_run(family, monkeypatch):
    """A jump with key fields in a run (a fan-out hub's `-p tcp --dport P -j SVC`: _OWN_TAIL)
    has its verdict and the 4 bytes after it read apart from the rest (_run_plan): those
    bytes (xt_standard_target's padding, which the kernel does not check) are the entry's
    own, in its key, as the per-entry walk reads them, here not zero in every hub entry."""
    from test_decode_run import _ents, walks_agree
    t = run_table(family)
    blob = bytearray(_zeroed(t.encode(), family))
    hub = [(o, s) for (o, s), r in zip(_ents(t), t.entries())
           if r.matches and isinstance(r.target, model.Jump)]
    assert len(hub) == 40
    for o, s in hub:
        blob[o + s - 4:o + s] = b"\x01\x02\x03\x04"
    (ok, facts), by_run = walks_agree(bytes(blob), family, monkeypatch, t.underflow,
                                      t.valid_hooks)
    assert ok == "ok"
    assert len(set(o for o, _s in hub) & set(by_run)) >= 30
    raws, _runs = _walked(bytes(blob), t, family)
    at = {r.off: r for r in raws}
    for o, s in hub:
        assert at[o].key.endswith(b"\xff\xff\xff\x7f\x01\x02\x03\x04")
