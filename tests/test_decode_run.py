"""Runs of the cold walk (model._walk_run, issue #7: a restore of 10 000 rules into an empty
table): where the guesses of the template walk hit a few times in a row, the run they are in
(one template, or a cycle of them: a user chain's ERROR head, rule and RETURN) is checked a
chunk of periods at a time and its raw entries made in one loop. A run must read exactly what
the per-entry template walk reads (every field of every raw entry, the template it was read
by), and refuse exactly what the full walk refuses (errno and message), for

  - long runs of each kind (source prefixes, tcp/udp ports, jumps, a jump with ports, a
    cycle of three templates), IPv4 and IPv6, broken in the middle by another template;
  - every byte of an entry deep in each run replaced, and its key fields at their edges;
  - a run that reaches the walk's stop (an append's reused tail) or the blob's end;
  - an underflow inside a run (check_underflow()).
"""
import copy
import errno
import ipaddress
import random

import pytest

from bpfilter_umh import model, uapi
from bpfilter_umh.errors import BpfilterError
from bpfilter_umh.model import (AF_INET, AF_INET6, XT_RETURN, Chain, IpHeader, Jump, Rule,
                                Table, Verdict, error_target)

from test_decode_template import CACHES, _table_buf, _tcp, _udp, same  # noqa: E402

ACCEPT, DROP = -2, -1
N = 40                  # entries (or cycles) per run


def _addr(family, k):
    if family == AF_INET:
        return ipaddress.IPv4Address(0x0A000000 + 256 * k)
    return ipaddress.IPv6Address((0x20010DB8 << 96) + (k << 16))


def _mask(family, bits):
    top = 32 if family == AF_INET else 128
    m = ((1 << bits) - 1) << (top - bits)
    return ipaddress.IPv4Address(m) if family == AF_INET else ipaddress.IPv6Address(m)


def _hdr(family, src=None, dst=None, proto=0):
    ip = IpHeader.any(family)
    if src is not None:
        ip.src, ip.smsk = src, _mask(family, 24 if family == AF_INET else 112)
    if dst is not None:
        ip.dst, ip.dmsk = dst, _mask(family, 32 if family == AF_INET else 128)
    if proto:
        ip.proto = proto
        if family == AF_INET6:
            ip.flags |= uapi.IP6T_F_PROTO
    return ip


def _add_user_chains(t: Table, family: int, users: list) -> None:
    """User chains `users` appended to t, each an ERROR head, `-s X -j ACCEPT` and RETURN (a
    cycle of three templates)."""
    for u in users:
        t.chains.append(Chain(u, head_entry=Rule(IpHeader.any(family), target=error_target(u)),
                              rules=[Rule(_hdr(family, src=_addr(family, 3)),
                                          target=Verdict(ACCEPT))],
                              policy_entry=Rule(IpHeader.any(family),
                                                target=Verdict(XT_RETURN))))


def run_table(family: int, n: int = N) -> Table:
    """INPUT: n source prefixes dropped (one in 17 accepted: the same template, the verdict
    its own), then n unconditional DROPs (another template: addresses all zero); FORWARD: n
    jumps to user
    chains, then n jumps with tcp ports (a fan-out's hub); OUTPUT: n udp ports; user chains
    u0.. (ERROR head, a rule, RETURN: a cycle of three templates)."""
    t = copy.deepcopy(Table.empty("filter", family))
    users = [f"u{k}" for k in range(n)]
    t.chain("INPUT").rules = \
        [Rule(_hdr(family, src=_addr(family, k)),
              target=Verdict(ACCEPT if k % 17 == 9 else DROP)) for k in range(n)] + \
        [Rule(IpHeader.any(family), target=Verdict(DROP)) for _k in range(n)]
    t.chain("FORWARD").rules = \
        [Rule(IpHeader.any(family), target=Jump(users[k])) for k in range(n)] + \
        [Rule(_hdr(family, dst=_addr(family, k % 7), proto=6), [_tcp(0, 80 + k)],
              Jump(users[k])) for k in range(n)]
    t.chain("OUTPUT").rules = [Rule(_hdr(family, proto=17), [_udp(53, 1000 + k)],
                                    Verdict(ACCEPT)) for k in range(n)]
    _add_user_chains(t, family, users)
    t.layout()
    return t


@pytest.fixture
def small_chunks(monkeypatch):
    """Runs tried after 4 hits, in chunks of 2 periods doubling to 8: a run of 40 goes
    through several chunks (the decode of a 10 000-rule table through bigger ones)."""
    monkeypatch.setattr(model, "RUN_AFTER", 4)
    monkeypatch.setattr(model, "RUN_FIRST", 2)
    monkeypatch.setattr(model, "RUN_MOST", 8)


def _facts(r, templates: bool):
    """Every field of raw entry r (its header and IpHeader by value; the template it was read
    by, and a dup, by their first entry's offset). A header's ip is the raw's own, or None
    where runs share it (model._shared_hdr): either passes."""
    h = r.hdr
    own = tuple((f, getattr(r, f, None)) for f in model._TRaw.__slots__
                if f not in ("hdr", "ip", "tpl", "dup"))
    out = (own, (h.nfcache, h.target_offset, h.next_offset, h.pad, h.comefrom, h.pcnt,
                 h.bcnt), vars(r.ip), h.ip is None or r.ip is h.ip)
    if templates:
        out += (None if r.tpl is None else r.tpl.first.off,
                None if r.dup is None else r.dup.off)
    return out


def _walk(blob, family, underflow, valid_hooks, stop, mode: str, monkeypatch):
    """(outcome, entries read by runs) of model._walk_range over blob: mode "full" (every
    entry walked in full), "entry" (templates, no runs) or "run"."""
    for name in CACHES:
        getattr(model, name).clear()
    by_run = []
    walk_run = model._walk_run

    def counted(*a):
        got = walk_run(*a)
        if got is not None:
            by_run.extend(r.off for r in got[0])
        return got

    with monkeypatch.context() as m:
        m.setattr(model, "TEMPLATES", mode != "full")
        m.setattr(model, "_walk_run", counted)
        if mode != "run":
            m.setattr(model, "RUN_AFTER", 1 << 30)
        try:
            raws = model._walk_range(blob, uapi.layout(family), underflow, valid_hooks, 0,
                                     stop)
        except BpfilterError as e:
            return ("error", e.errno, str(e)), by_run
        finally:
            for name in CACHES:
                getattr(model, name).clear()
    return ("ok", [_facts(r, mode != "full") for r in raws]), by_run


def walks_agree(blob, family, monkeypatch, underflow=None, valid_hooks=0, stop=None,
                where="") -> tuple:
    """The run walk reads what the per-entry template walk reads, and accepts or refuses
    (same errno and message) what the full walk does. Returns (outcome, the offsets of the
    entries runs read)."""
    underflow = underflow or [0] * 5
    full, _n = _walk(blob, family, underflow, valid_hooks, stop, "full", monkeypatch)
    entry, n_entry = _walk(blob, family, underflow, valid_hooks, stop, "entry", monkeypatch)
    run, n_run = _walk(blob, family, underflow, valid_hooks, stop, "run", monkeypatch)
    assert not n_entry
    if run != entry and run[0] == entry[0] == "ok":
        for k, (a, b) in enumerate(zip(run[1], entry[1])):
            assert a == b, f"{where}: entry {k}"
    assert run == entry, where
    # (a templated jump's raw keeps its first entry's target payload, as the per-entry walk
    # does: compared with the full walk's by the decodes, test_decode_template.same)
    if run[0] == "ok":
        assert full[0] == "ok", where
        assert len(run[1]) == len(full[1]), where
    else:
        assert full == run, where
    return run, n_run


def _ents(t):
    """[(offset, size)] of t's entries."""
    ents, size = t.entries(), len(t.encode())
    return [(r.offset, (ents[i + 1].offset if i + 1 < len(ents) else size) - r.offset)
            for i, r in enumerate(ents)]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_runs_read_what_the_entries_read(family, monkeypatch, small_chunks):
    t = run_table(family)
    blob = t.encode()
    out, by_run = walks_agree(blob, family, monkeypatch, t.underflow, t.valid_hooks)
    assert out[0] == "ok"
    # nearly every entry of every run (each run's first few are the per-entry walk's)
    assert len(by_run) >= 0.75 * t.num_entries, (len(by_run), t.num_entries)
    # and the decode (with the default chunks, and these) says what the full walk says
    buf = _table_buf(t, blob)
    assert same(buf, family) >= t.num_entries - 20
    monkeypatch.setattr(model, "RUN_AFTER", 1 << 30)
    same(buf, family)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_every_byte_of_an_entry_in_a_run_replaced(family, monkeypatch, small_chunks):
    """An entry deep in each run (the per-entry walk reads it by template too): each byte
    set to two other values; the run walk, the per-entry walk and the full walk agree."""
    n = 12
    t = run_table(family, n)
    blob = t.encode()
    ents = dict(_ents(t))
    u = t.chains[-3]
    picks = [t.chain("INPUT").rules[n - 5], t.chain("INPUT").rules[2 * n - 3],
             t.chain("FORWARD").rules[n - 3], t.chain("FORWARD").rules[2 * n - 3],
             t.chain("OUTPUT").rules[n - 3], u.head_entry, u.rules[0], u.policy_entry]
    _out, by_run = walks_agree(blob, family, monkeypatch, t.underflow, t.valid_hooks)
    assert {r.offset for r in picks} <= set(by_run)        # each read by a run as it is
    outcomes = set()
    for r in picks:
        for pos in range(ents[r.offset]):
            at = r.offset + pos
            for v in (blob[at] ^ 0x01, blob[at] ^ 0x80):
                b = bytearray(blob)
                b[at] = v
                out, _n = walks_agree(bytes(b), family, monkeypatch, t.underflow,
                                      t.valid_hooks, where=f"entry {r.offset} byte {pos} = {v}")
                outcomes.add(out[0] if out[0] == "ok" else out[2])
    assert "ok" in outcomes and len(outcomes) >= 5, outcomes


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_key_fields_in_a_run_at_their_edges(family, monkeypatch, small_chunks):
    """Deep in a run: a jump's verdict that is no jump (here and with ports), an errorname
    without NUL, addresses all zero (unconditional), ports at their edges."""
    t = run_table(family)
    blob = t.encode()
    cf = model._VOLATILE[family][0]
    asz = 16 if family == AF_INET else 64
    fwd, inp, out = t.chain("FORWARD").rules, t.chain("INPUT").rules, t.chain("OUTPUT").rules

    def toff(r):
        return int.from_bytes(blob[r.offset + cf - 4:r.offset + cf - 2], "little")

    cases = []
    for j in (fwd[N - 5], fwd[2 * N - 5]):
        for v in (DROP, XT_RETURN, 0, 8, len(blob), 1 << 30):
            cases.append((f"jump {j.offset} verdict {v}",
                          [(j.offset + toff(j) + 32, v.to_bytes(4, "little", signed=True))]))
    h = t.chains[-5].head_entry
    cases.append(("errorname", [(h.offset + toff(h) + 32, b"x" * 30)]))
    cases.append(("errorname29", [(h.offset + toff(h) + 32, b"y" * 29 + b"\0")]))
    cases.append(("uncond", [(inp[N - 5].offset, bytes(asz))]))
    cases.append(("cond", [(inp[2 * N - 5].offset, b"\x01")]))
    mpos = out[N - 5].offset + uapi.layout(family).entry_size + 32
    for ports in (bytes(8), b"\xff" * 8, b"\x00\x00\xff\xff\xff\xff\x00\x00"):
        cases.append((f"ports {ports.hex()}", [(mpos, ports)]))
    seen = set()
    for what, edits in cases:
        b = bytearray(blob)
        for at, data in edits:
            b[at:at + len(data)] = data
        got, _n = walks_agree(bytes(b), family, monkeypatch, t.underflow, t.valid_hooks,
                              where=what)
        seen.add(got[0])
        same(_table_buf(t, bytes(b)), family, what)
    assert seen == {"ok", "error"}


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_a_run_stops_at_the_stop_and_at_the_blob_end(family, monkeypatch, small_chunks):
    """The walk up to `stop` (an append walks up to the reused tail) at every entry of the
    runs and between them, and a blob that is only runs (its end inside a cycle too)."""
    t = run_table(family, 16)
    blob = t.encode()
    ents = _ents(t)
    for off, size in ents:
        for stop in (off, off + 8, off + size - 8):
            walks_agree(blob, family, monkeypatch, stop=stop, where=f"stop {stop}")
    # the blob's end: the FORWARD chain's runs alone, then the user chains cut anywhere
    fwd = t.chain("FORWARD").rules
    lo = fwd[0].offset
    hi = t.chains[-1].policy_entry.offset
    walks_agree(blob[lo:t.chain("FORWARD").policy_entry.offset], family, monkeypatch,
                where="forward runs")
    for off, size in ents:
        if lo < off <= hi:
            walks_agree(blob[lo:off], family, monkeypatch, where=f"end {off}")


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_an_underflow_inside_a_run(family, monkeypatch, small_chunks):
    """check_underflow() on an entry a run reads: refused in a run of source prefixes (not
    unconditional), accepted in a run of unconditional DROPs; the hook's other underflows
    as the table has them."""
    t = run_table(family)
    blob = t.encode()
    inp = t.chain("INPUT").rules
    hook = 1                                  # NF_INET_LOCAL_IN
    outcomes = []
    # (in the middle of runs, and the last entry of one: the next, k = 26, an ACCEPT)
    for r in (inp[N - 6], inp[N - 5], inp[25], inp[2 * N - 6], inp[2 * N - 1]):
        uf = list(t.underflow)
        uf[hook] = r.offset
        out, by_run = walks_agree(blob, family, monkeypatch, uf, t.valid_hooks,
                                  where=f"underflow {r.offset}")
        outcomes.append(out[0])
        assert r.offset in by_run
    assert outcomes == ["error", "error", "error", "ok", "ok"]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_runs_are_tried_less_where_they_read_nothing(family, monkeypatch):
    """A try that reads nothing doubles the hits the next one waits for: a table whose
    guesses always hit, in a cycle of ten templates (longer than a run takes), tries a few
    times, not once every few entries."""
    t = copy.deepcopy(Table.empty("filter", family))
    t.chain("INPUT").rules = [Rule(_hdr(family, src=_addr(family, k), proto=1 + k % 10),
                                   target=Verdict(DROP)) for k in range(400)]
    t.layout()
    tries = []
    walk_run = model._walk_run

    def counted(*a):
        got = walk_run(*a)
        tries.append(got is not None)
        return got

    monkeypatch.setattr(model, "_walk_run", counted)
    assert same(_table_buf(t, t.encode()), family) >= 380     # every guess hits
    assert 0 < len(tries) <= 8 and not any(tries), tries


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_random_edits_of_runs(family, monkeypatch, small_chunks):
    """Random edits of the table (bytes, words set to verdicts and sizes, other entries'
    bytes copied in), walked to its end or to a stop: the three walks agree."""
    rng = random.Random(family)
    t = run_table(family, 16)
    blob = t.encode()
    outcomes = set()
    for it in range(150):
        b = bytearray(blob)
        for _k in range(rng.choice([1, 2, 3, 8])):
            at, what = rng.randrange(len(b)), rng.random()
            if what < 0.4:
                b[at] = rng.randrange(256)
            elif what < 0.7:
                src, n = rng.randrange(len(b) - 64), rng.choice([4, 8, 16, 40])
                b[at:at + n] = blob[src:src + n]
            else:
                v = rng.choice([0, 1, -1, -2, 8, 152, 1 << 30])
                b[at:at + 4] = v.to_bytes(4, "little", signed=True)
        stop = rng.choice([None, None, rng.randrange(0, len(blob), 8)])
        out, _n = walks_agree(bytes(b[:len(blob)]), family, monkeypatch, t.underflow,
                              t.valid_hooks, stop=stop, where=f"edit {it}")
        outcomes.add(out[0])
    assert outcomes == {"ok", "error"}


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_no_run_from_a_template_nothing_followed(family, monkeypatch, small_chunks):
    """Guess hits ending on a template no entry has followed yet (the entry after its first
    one was read from _ENTRY_CACHE, which links no template): no run is tried from there,
    and the walk reads what the per-entry walk reads."""
    seen = Rule(IpHeader.any(family), target=Verdict(ACCEPT))
    chain = [Rule(_hdr(family, src=_addr(family, 0), proto=p), target=Verdict(DROP))
             for p in range(1, 6)]
    t = copy.deepcopy(Table.empty("filter", family))
    t.chain("INPUT").rules = [seen]
    t.layout()
    first = t.encode()
    t = copy.deepcopy(Table.empty("filter", family))
    t.chain("INPUT").rules = copy.deepcopy(chain) + [copy.deepcopy(seen)] + [
        Rule(_hdr(family, src=_addr(family, k), proto=r.ip.proto), target=Verdict(DROP))
        for k in range(1, 4) for r in chain]
    t.layout()
    blob = t.encode()
    lay = uapi.layout(family)
    got = {}
    for mode in ("entry", "run"):
        for name in CACHES:
            getattr(model, name).clear()
        with monkeypatch.context() as m:
            if mode == "entry":
                m.setattr(model, "RUN_AFTER", 1 << 30)
            model._remember(model._walk_range(first, lay, [0] * 5, 0, 0, None), family)
            raws = model._walk_range(blob, lay, t.underflow, t.valid_hooks, 0, None)
        got[mode] = [_facts(r, True) for r in raws]
        # the entry after the chain's first five came from the cache
        assert raws[5].tpl is None and raws[5].dup is None and raws[4].tpl is None
    for name in CACHES:
        getattr(model, name).clear()
    assert got["run"] == got["entry"]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_a_run_broken_by_another_template_goes_on_at_once(family, monkeypatch, small_chunks):
    """A blocklist's DROPs with a udp ACCEPT (another template: an ACCEPT of the DROPs' shape
    is theirs, test_verdicts_of_one_shape_are_one_run) every 17 entries: after each ACCEPT
    the run of DROPs (its cycle read before, and the same again) is tried as soon as the
    links lead back into it, not after RUN_AFTER guess hits. After the first ACCEPT, the
    ACCEPT and the two DROPs after it (looked up, their links set anew) take the per-entry
    path; after each later one, the ACCEPT alone: it leads to the DROPs (ACCEPT.after), whose
    run's links (DROP.after, which the ACCEPT's lookup set to the ACCEPT) are set back as the
    run read them (model._relink) and the run read from the next entry on. The walks still
    read the same (walks_agree)."""
    t = copy.deepcopy(Table.empty("filter", family))
    n = 17 * 20
    t.chain("INPUT").rules = [
        Rule(_hdr(family, src=_addr(family, k), proto=17), target=Verdict(ACCEPT))
        if k % 17 == 9 else Rule(_hdr(family, src=_addr(family, k)), target=Verdict(DROP))
        for k in range(n)]
    t.layout()
    blob = t.encode()
    _out, by_run = walks_agree(blob, family, monkeypatch, t.underflow, t.valid_hooks)
    ents = _ents(t)
    by_run = set(by_run)
    outside = [k for k, (o, _s) in enumerate(ents) if o not in by_run]
    accepts = [k for k in range(n) if k % 17 == 9]
    # before the first run: the first entry (walked in full), one looked up (its link set),
    # RUN_AFTER guess hits; then the first ACCEPT and the two DROPs after it, then each
    # ACCEPT alone
    first = [k for k in outside if k < accepts[0]]
    rest = [k for k in outside if accepts[0] <= k < n]
    assert len(first) <= 2 + model.RUN_AFTER, outside
    assert rest == [accepts[0] + d for d in range(3)] + accepts[1:], outside


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_verdicts_of_one_shape_are_one_run(family, monkeypatch, small_chunks):
    """Conditional entries that differ in their addresses and their standard verdict
    (ACCEPT, DROP, RETURN, QUEUE in no order: a blocklist with exceptions) are one template
    (model._VERDICT): one run from the first few entries on, each entry with its own verdict,
    as the full walk reads it (walks_agree). The unconditional entries among them (a bare
    `-j DROP`, the policy) are templates of their own verdict (model._TERM), so the cycle a
    user chain is (ERROR head, `-s X -j ACCEPT`, RETURN) stays one; a verdict verdict_ok()
    refuses stops the run where the full walk says why."""
    rng = random.Random(7)
    verdicts = [ACCEPT, DROP, XT_RETURN, -4]            # -4: NF_QUEUE
    n = 300
    t = copy.deepcopy(Table.empty("filter", family))
    users = [f"u{k}" for k in range(40)]
    t.chain("INPUT").rules = [Rule(_hdr(family, src=_addr(family, k)),
                                   target=Verdict(rng.choice(verdicts))) for k in range(n)]
    t.chain("FORWARD").rules = [Rule(IpHeader.any(family), target=Jump(u)) for u in users]
    _add_user_chains(t, family, users)
    t.layout()
    blob = t.encode()
    out, by_run = walks_agree(blob, family, monkeypatch, t.underflow, t.valid_hooks)
    assert out[0] == "ok"
    by_run = set(by_run)
    ents = _ents(t)
    outside = [k for k, (o, _s) in enumerate(ents[:n]) if o not in by_run]
    assert outside and max(outside) < 2 + model.RUN_AFTER + 2, outside
    # the user chains' rules and RETURNs are read by runs too (a cycle of three templates)
    chains_at = ents[n + 2 + len(users) + 2][0]
    assert sum(1 for o in by_run if o >= chains_at) >= 3 * len(users) * 3 // 4
    buf = _table_buf(t, blob)
    assert same(buf, family) >= t.num_entries - 12
    # a verdict verdict_ok() refuses (-3, NF_STOLEN) in the middle of the run: the walks
    # refuse the table alike, at that entry
    bad = bytearray(blob)
    o, size = ents[n // 2]
    bad[o + size - 8:o + size - 4] = (-3).to_bytes(4, "little", signed=True)
    out, _by_run = walks_agree(bytes(bad), family, monkeypatch, t.underflow, t.valid_hooks)
    assert out[:2] == ("error", errno.EINVAL) and "bad verdict -3" in out[2], out
    assert f"offset {o}:" in out[2], out
