"""An append ahead of a kube-proxy-style hub, decoded warm, against the cold decode (no kernel):

- the hub's jumps, moved by the append, take their new verdicts from one strided read of the
  blob when they are consecutive entries of one size and one target_offset
  (model._uniform_jumps, _copy_strided_verdicts), and one read per jump otherwise (a hub of
  jumps of two sizes, one entry whose target_offset differs);
- the kept blob of an append (a few entries to patch: the new rule, what libiptc built anew,
  entries that counted) is joined from the caller's bytes (model._kept_joined), counters
  zeroed and comefrom set as the cold decode's.
"""
from __future__ import annotations

import copy
import ipaddress
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from construct import Container  # noqa: E402

from bpfilter_umh import model, uapi  # noqa: E402
from bpfilter_umh.model import (  # noqa: E402
    AF_INET, AF_INET6, XT_RETURN, Chain, IpHeader, Jump, Match, Rule, Table, Verdict,
    decode_replace, error_target)
from test_model_incremental import _blob, _buf, _facts, _full, clear_caches  # noqa: E402

ACCEPT, DROP = -2, -1
HUB = 100           # jumps in SVC: runs of _reusable reach model._UNIFORM_MIN of them


def _addr(k, family, net):
    if family == AF_INET:
        return ipaddress.IPv4Address(net + k)
    return ipaddress.IPv6Address((0x20010DB8 << 96) + (net << 16) + k)


def _tcp(family, port):
    return Match("tcp", 0, Container(spts=[0, 65535], dpts=[port, port], option=0,
                                     flg_mask=0, flg_cmp=0, invflags=0))


def _service(family, k, tcp=True):
    """SVC's rule for service k: -d VIP [-p tcp --dport P] -j SVC-k."""
    ip = IpHeader.any(family)
    ip.dst, ip.dmsk = _addr(k, family, 0x0A600000), _full(family)
    ms = []
    if tcp:
        ip.proto = 6
        if family == AF_INET6:
            ip.flags |= uapi.IP6T_F_PROTO
        ms.append(_tcp(family, 1000 + k))
    return Rule(ip, ms, Jump(f"SVC-{k}"))


def _drop_src(k, family):
    ip = IpHeader.any(family)
    ip.src, ip.smsk = _addr(k, family, 0xCB007100), _full(family)
    return Rule(ip, target=Verdict(DROP))


def _fanout(family, tcp_of=lambda k: True):
    """FORWARD -j SVC; SVC holds HUB service jumps; each SVC-k an ACCEPT and a DROP."""
    t = copy.deepcopy(Table.empty("filter", family))
    names = ["SVC"] + [f"SVC-{k}" for k in range(HUB)]
    for name in names:
        t.chains.append(Chain(name, head_entry=Rule(IpHeader.any(family),
                                                    target=error_target(name)),
                              policy_entry=Rule(IpHeader.any(family),
                                                target=Verdict(XT_RETURN))))
    t.chain("INPUT").rules = [_drop_src(k, family) for k in range(3)]
    t.chain("FORWARD").rules = [Rule(IpHeader.any(family), target=Jump("SVC"))]
    t.chain("SVC").rules = [_service(family, k, tcp_of(k)) for k in range(HUB)]
    for k in range(HUB):
        acc = IpHeader.any(family)
        acc.src, acc.smsk = _addr(0, family, 0xC0000200), _full(family)
        t.chain(f"SVC-{k}").rules = [Rule(acc, target=Verdict(ACCEPT)),
                                     Rule(IpHeader.any(family), target=Verdict(DROP))]
    return t


def _appended(t, family, k):
    t = copy.deepcopy(t)
    t.chain("INPUT").rules.append(_drop_src(100 + k, family))
    return t


def _entry_offsets(blob, family):
    cf = model._VOLATILE[family][0]
    out, off = [], 0
    while off < len(blob):
        out.append(off)
        off += int.from_bytes(blob[off + cf - 2:off + cf], "little")
    return out


def _as_libiptc(buf_blob, family, counted=()):
    """What libiptc sends for a table GET_ENTRIES showed: every entry with the comefrom the
    kernel keeps (the cold decode's kept blob), and live counters in the entries `counted`
    (their indexes)."""
    blob, he, uf, vh, n = buf_blob
    clear_caches()
    kept = bytearray(decode_replace(_buf(blob, he, uf, vh, n), family)[1].kept_blob)
    cnt = model._VOLATILE[family][1]
    offs = _entry_offsets(kept, family)
    for i in counted:
        kept[offs[i] + cnt:offs[i] + cnt + 16] = (7 + i).to_bytes(8, "little") + \
            (1500 * (7 + i)).to_bytes(8, "little")
    return _buf(bytes(kept), he, uf, vh, n)


def _spy(monkeypatch, name):
    """Calls of model.<name> that did something: a non-None answer (or any call of a
    function that answers None)."""
    hits = []
    raw = getattr(model, name)

    def spy(*a, **kw):
        got = raw(*a, **kw)
        hits.append(got)
        return got
    monkeypatch.setattr(model, name, spy)
    return hits


def _hub_indexes(table):
    return [r.index for r in table.chain("SVC").rules]


def _headers_describe_kept(family):
    """The last decode's raw entries: each header's comefrom and counters are the kept
    blob's bytes there (the next decode compares with those bytes through the headers)."""
    kept, raws = model._LAST_WALK[family][:2]
    cf, cnt, _ = model._VOLATILE[family]
    for r in raws:
        assert (r.hdr.comefrom, r.hdr.pcnt, r.hdr.bcnt) == (
            int.from_bytes(kept[r.off + cf:r.off + cf + 4], "little"),
            int.from_bytes(kept[r.off + cnt:r.off + cnt + 8], "little"),
            int.from_bytes(kept[r.off + cnt + 8:r.off + cnt + 16], "little")), r.off


def _warm_equals_cold(bufs, family, monkeypatch):
    """Decode bufs in order (each warm after the one before) and each cold: the same tables,
    entries, jumps and kept blobs, and raw headers that describe the kept bytes; each append
    after the first buffer walks its new rule alone (the rest reused: model._reusable).
    Returns the warm tables."""
    cold = []
    for b in bufs:
        clear_caches()
        t = decode_replace(b, family)[1]
        cold.append((t, _facts(t)))
    clear_caches()
    walked = []
    raw = model._walk_range

    def walk_range(*a, **kw):
        got = raw(*a, **kw)
        walked.append(len(got))
        return got
    monkeypatch.setattr(model, "_walk_range", walk_range)
    warm = []
    for i, (b, (want, facts)) in enumerate(zip(bufs, cold)):
        walked.clear()
        got = decode_replace(b, family)[1]
        assert got == want, i
        assert _facts(got) == facts, i
        _headers_describe_kept(family)
        if i:
            assert sum(walked) == 1, (i, walked)
        warm.append(got)
    monkeypatch.setattr(model, "_walk_range", raw)
    return warm


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_hub_jumps_moved_by_an_append_read_as_one_stride(family, monkeypatch):
    """A restore, then appends to INPUT (libiptc's blobs: comefrom as kept, the hub's first
    jumps and an SVC-k's rule with live counters): warm equals cold, and the hub's jumps were
    read through the strided path."""
    t0 = _fanout(family)
    t1 = _appended(t0, family, 1)
    t2 = _appended(t1, family, 2)
    restore = _buf(*_blob(t0))
    hub = _hub_indexes(_settle_copy(t1))
    bufs = [restore, _as_libiptc(_blob(t1), family),
            _as_libiptc(_blob(t2), family, counted=hub[:3] + [hub[-1] + 2])]
    uni = _spy(monkeypatch, "_uniform_jumps")
    read = _spy(monkeypatch, "_copy_strided_verdicts")
    warm = _warm_equals_cold(bufs, family, monkeypatch)
    took = [u for u in uni if u is not None]
    # each append: the hub's jumps but those of _reusable's first run back (16 entries), the
    # run that also holds FORWARD's jump into SVC included
    assert sum(u[2] for u in took) >= 2 * (HUB - 16), took
    # and each strided read gave the verdicts the jumps name now: the service chains' first
    # rules in the appended tables (not the offsets before the move)
    starts = {c.rules[0].offset for t in warm[1:] for c in t.chains
              if c.name.startswith("SVC-")}
    assert len(read) == len(took) and all(vs is not None for vs in read)
    assert all(set(vs) <= starts for vs in read)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_hub_of_two_jump_sizes_is_read_per_jump(family, monkeypatch):
    """Every third service jump without its tcp match (a smaller entry): no run of the hub is
    uniform, so no strided read; warm still equals cold."""
    t0 = _fanout(family, tcp_of=lambda k: k % 3 != 0)
    t1 = _appended(t0, family, 1)
    t2 = _appended(t1, family, 2)
    bufs = [_buf(*_blob(t0)), _as_libiptc(_blob(t1), family), _as_libiptc(_blob(t2), family)]
    uni = _spy(monkeypatch, "_uniform_jumps")
    _warm_equals_cold(bufs, family, monkeypatch)
    assert uni and all(u is None for u in uni)


def _settle_copy(t):
    t = copy.deepcopy(t)
    _blob(t)
    return t


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_uniform_jumps_checks_every_entry_header(family):
    """_uniform_jumps on the hub of a laid-out fan-out: its stride and count; None once one
    jump's next_offset or target_offset (either byte) differs in the old bytes."""
    t = _settle_copy(_fanout(family))
    blob = t.encode()
    clear_caches()
    decode_replace(_buf(blob, t.hook_entry, t.underflow, t.valid_hooks, t.num_entries), family)
    _kept, raws, _ends, _, memo = model._LAST_WALK[family]
    hub = _hub_indexes(t)
    js = [j for j in memo.kinds[0] if hub[0] <= j <= hub[-1]]
    assert js == hub
    a = raws[hub[0]].off
    got = model._uniform_jumps(blob, raws, js, a, 0, model._VOLATILE[family][0])
    size = raws[hub[0]].hdr.next_offset
    assert got == (a + raws[hub[0]].hdr.target_offset + 32, size, HUB)
    cf = model._VOLATILE[family][0]
    for k in (1, HUB // 2, HUB - 1):
        for field in (cf - 2, cf - 4, cf - 1, cf - 3):
            bad = bytearray(blob)
            bad[raws[hub[k]].off + field] ^= 0x08
            assert model._uniform_jumps(bytes(bad), raws, js, a, 0, cf) is None, (k, field)
    # a run too short, or with a gap, is read per jump
    assert model._uniform_jumps(blob, raws, js[:model._UNIFORM_MIN - 1], a, 0, cf) is None
    assert model._uniform_jumps(blob, raws, js[:5] + js[6:], a, 0, cf) is None


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_append_kept_blob_is_joined_with_counters_zeroed(family, monkeypatch):
    """The kept blob of an append with live counters in some entries: joined (few patches),
    each patched entry's comefrom as the kernel's walk sets it and counters zero, equal to the
    cold decode's; with joining turned off (_PATCH_JOIN_MAX = 0) the same bytes."""
    t0 = _fanout(family)
    t1 = _appended(t0, family, 1)
    t2 = _appended(t1, family, 2)
    hub = _hub_indexes(_settle_copy(t2))
    bufs = [_buf(*_blob(t0)), _as_libiptc(_blob(t1), family, counted=[0, 1]),
            _as_libiptc(_blob(t2), family, counted=[0, 2, hub[5], hub[-1] + 1])]
    joined = _spy(monkeypatch, "_kept_joined")
    warm = _warm_equals_cold(bufs, family, monkeypatch)
    assert len(joined) >= 2, "the appends' kept blobs were not joined"
    cnt = model._VOLATILE[family][1]
    for t in warm:
        kb = t.kept_blob
        assert all(not any(kb[o + cnt:o + cnt + 16]) for o in _entry_offsets(kb, family))
    monkeypatch.setattr(model, "_PATCH_JOIN_MAX", 0)
    n = len(joined)
    again = _warm_equals_cold(bufs, family, monkeypatch)
    assert len(joined) == n
    assert [t.kept_blob for t in again] == [t.kept_blob for t in warm]
