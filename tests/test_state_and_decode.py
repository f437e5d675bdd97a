"""Issue #7/#9: the state file as a JSON header line + the raw blob, the warm decode that reuses
the previous walk when entries differ only in comefrom or counters, and the work a helper leaves
for after its reply.

  - state file: an install (SET_REPLACE through the Dispatcher) writes the new format, whose blob
    is the kernel's own GET_ENTRIES blob of the same ruleset; an engine opened afterwards adopts
    it byte for byte (GET_ENTRIES, counters); a file in the older hex-in-JSON format is adopted
    the same; a torn file (blob shorter than blob_size) is refused as unreadable state while the
    installed programs go on filtering; a torn .pending is discarded, never renamed over a good
    state;
  - warm decode == cold decode for bench/rulesets.py shapes at 2000 rules, with live counters
    and comefrom values written into random entries, after an append, an insert at the top and
    a delete in the middle; and the warm decodes do reuse the previous walk;
  - engine.AFTER_REPLY: an install leaves its GC pass and the replaced table to
    run_after_reply(), after which the old table is freed; the helper's stdio loop runs the
    queue once it holds more than AFTER_REPLY_MAX items, and on an idle gap.
"""
import ctypes
import gc
import json
import os
import random
import struct
import subprocess
import sys
import time
import weakref

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import kernel_xt as kx  # noqa: E402
import lab  # noqa: E402
import rulesets  # noqa: E402
from nsutil import Netns  # noqa: E402
from test_reliability_util import flush_engine, udp_lab  # noqa: E402

from bpfilter_umh import engine, model  # noqa: E402
from bpfilter_umh import sockopt as S  # noqa: E402
from bpfilter_umh.engine import Engine  # noqa: E402
from bpfilter_umh.frames import Request  # noqa: E402
from bpfilter_umh.model import AF_INET, decode_replace  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

NAME = b"filter".ljust(32, b"\0")
# ipt_entry: target_offset u16 at 88, next_offset u16 at 90, comefrom u32 at 92, counters at 96
NEXT_OFFSET, COMEFROM, COUNTERS = 90, 92, 96
# the probe's ports (test_reliability_util.UdpProbe): decided by the first INPUT rules
TOP = ["-A INPUT -p udp -m udp --dport 7001 -j DROP",
       "-A INPUT -p udp -m udp --dport 7002 -j ACCEPT",
       "-A INPUT -p udp -m udp --dport 7003 -j ACCEPT"]
VERDICTS = {7001: False, 7002: True, 7003: True}


def lab_text(n: int = 300) -> str:
    """A mixed ruleset of n rules on INPUT, behind the three rules the probe's ports meet."""
    lines = rulesets.make("mixed", n, seed=11).text.replace("-A FORWARD ", "-A INPUT ")
    lines = lines.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("-A "))
    return "\n".join(lines[:first] + TOP + lines[first:]) + "\n"


def kernel_blob(text: str):
    """(getinfo, entries blob) the kernel holds after iptables-legacy-restore of `text`."""
    with Netns("sk") as ns:
        lab.restore(ns, text)
        with ns.inside():
            return kx.snapshot(AF_INET)


def entry_offsets(blob: bytes) -> list:
    out, off = [], 0
    while off < len(blob):
        out.append(off)
        off += struct.unpack_from("<H", blob, off + NEXT_OFFSET)[0]
    return out


# ---- requests through the Dispatcher, this process as the caller ------------------------------

def _serve(d, cmd, is_set, data: bytes, size: int = None):
    buf = ctypes.create_string_buffer(bytes(data), size or max(1, len(data)))
    rep = d.serve(Request(cmd, is_set, AF_INET, os.getpid(), size or len(data),
                          ctypes.addressof(buf), 0))
    assert rep.status == 0, (cmd, is_set, rep.status)
    return buf


def get_entries(d) -> bytes:
    """GET_INFO then GET_ENTRIES: the entries blob (live counters in it)."""
    info = _serve(d, S.SO_GET_INFO, 0, NAME, S.GETINFO.size).raw[:S.GETINFO.size]
    size = S.GETINFO.unpack(info)[13]
    raw = _serve(d, S.SO_GET_ENTRIES, 0, S.GET_ENTRIES_HDR.pack(NAME, size),
                 S.GET_ENTRIES_HDR.size + size).raw
    return raw[S.GET_ENTRIES_HDR.size:S.GET_ENTRIES_HDR.size + size]


def set_replace(d, info, blob: bytes):
    old_n = d.backend(d.home_cookie, AF_INET).num_entries()
    counters = ctypes.create_string_buffer(16 * old_n)
    hdr = S.REPLACE_HDR.pack(NAME, info.valid_hooks, info.num_entries, len(blob),
                             *info.hook_entry, *info.underflow, old_n,
                             ctypes.addressof(counters))
    _serve(d, S.SO_SET_REPLACE, 1, hdr + blob)


def zero_counters(blob: bytes) -> bytes:
    out = bytearray(blob)
    for off in entry_offsets(blob):
        struct.pack_into("<QQ", out, off + COUNTERS, 0, 0)
    return bytes(out)


def read_state(path: str):
    with open(path, "rb") as f:
        data = f.read()
    head, _, blob = data.partition(b"\n")
    return json.loads(head), blob, data


def write_file(path: str, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def old_format(st: dict, blob: bytes) -> bytes:
    """The state file as engine.py wrote it before (git HEAD _save_state): one JSON object,
    the blob in hex under "blob", written by json.dump (no newline)."""
    old = {k: v for k, v in st.items() if k != "blob_size"}
    old["blob"] = blob.hex()
    return json.dumps(old).encode()


@pytest.fixture(scope="module")
def installed_text():
    text = lab_text()
    return text, kernel_blob(text)


@pytest.fixture
def udp():
    with udp_lab(flush_engine) as lab_:
        yield lab_


def _install(b, info, blob):
    with b.inside():
        d = S.Dispatcher()
        set_replace(d, info, kx.restored(blob, AF_INET))
        return d


# ---- state file -----------------------------------------------------------------------------

def test_state_file_new_format_adopted_byte_identically(udp, installed_text):
    a, b, probe = udp
    _text, (info, kblob) = installed_text
    d = _install(b, info, kblob)
    eng = d.backend(d.home_cookie, AF_INET).engine
    st, blob, _ = read_state(eng.state_path)
    # the new format: a header line without the blob, then exactly blob_size raw bytes, which
    # are what the kernel's GET_ENTRIES shows for the same restore (comefrom set, counters 0)
    assert "blob" not in st and st["blob_size"] == len(blob) == info.size
    assert blob == kblob
    with b.inside():
        assert get_entries(d) == kblob
    assert probe.verdicts() == VERDICTS
    for _ in range(3):
        probe.passes(7001)
        probe.passes(7002)
    with b.inside():
        # SET_ADD_COUNTERS as libiptc sends it after a replace: the base kept beside the table
        # (<fam>.counters) must be adopted too
        n = eng.table.num_entries
        added = [(0, 0)] * n
        added[2] = (5, 500)
        _serve(d, S.SO_SET_ADD_COUNTERS, 1, S.COUNTERS_INFO_HDR.pack(NAME, n)
               + b"".join(S.XT_COUNTERS.pack(p, b) for p, b in added))
        before = get_entries(d)
        old_counts = eng.counters()
        assert old_counts[2][0] >= 5 and old_counts[2][1] >= 500
        d2 = S.Dispatcher()                 # a new helper: Engine.open adopts the state
        eng2 = d2.backend(d2.home_cookie, AF_INET).engine
        assert eng2.state_error is None
        assert eng2.generation == eng.generation
        after = get_entries(d2)
        assert eng2.counters() == old_counts
    assert after == before, "the adopted table's GET_ENTRIES differs"
    assert zero_counters(after) == kblob
    # the counted rules show their packets: INPUT's first two entries
    c = eng2.counters()
    assert c[0][0] >= 4 and c[1][0] >= 4
    assert probe.verdicts() == VERDICTS


def test_old_format_state_is_adopted(udp, installed_text):
    a, b, probe = udp
    _text, (info, kblob) = installed_text
    d = _install(b, info, kblob)
    eng = d.backend(d.home_cookie, AF_INET).engine
    st, blob, _ = read_state(eng.state_path)
    write_file(eng.state_path, old_format(st, blob))
    with b.inside():
        assert Engine.installed_flavor() == "nf"
        d2 = S.Dispatcher()
        eng2 = d2.backend(d2.home_cookie, AF_INET).engine
        assert eng2.state_error is None
        assert eng2.generation == st["generation"]
        assert zero_counters(get_entries(d2)) == kblob
    assert probe.verdicts() == VERDICTS
    # an old-format file cut short is unreadable, as it was before
    write_file(eng.state_path, old_format(st, blob)[:-64])
    with b.inside():
        eng3 = Engine.open()
        assert eng3.state_error.startswith(f"unreadable state {eng.state_path}")
        assert eng3.table.num_entries == model.Table.empty("filter", AF_INET).num_entries
    assert probe.verdicts() == VERDICTS


def _last_entry_cut(blob: bytes) -> int:
    return len(blob) - entry_offsets(blob)[-1]


@pytest.mark.parametrize("cut", ["last_entry", "mid_entry", "one_byte"])
def test_torn_state_is_refused_and_filtering_goes_on(udp, installed_text, cut):
    """A blob shorter than blob_size: unreadable state (the model starts from the empty table,
    status says why), the installed programs keep filtering; cutting off exactly the final ERROR
    entry leaves a blob that decodes, so only the size check can tell."""
    a, b, probe = udp
    _text, (info, kblob) = installed_text
    d = _install(b, info, kblob)
    eng = d.backend(d.home_cookie, AF_INET).engine
    with b.inside():
        slots = eng._slot_ids()
    st, blob, data = read_state(eng.state_path)
    k = {"last_entry": _last_entry_cut(blob), "mid_entry": 100, "one_byte": 1}[cut]
    write_file(eng.state_path, data[:-k])
    with b.inside():
        eng2 = Engine.open()
        assert eng2.state_error is not None
        assert eng2.state_error.startswith(f"unreadable state {eng.state_path}")
        assert f"header says {len(blob)}" in eng2.state_error
        assert eng2.table.num_entries == model.Table.empty("filter", AF_INET).num_entries
        assert eng2.status()["error"] == eng2.state_error
        assert eng2._slot_ids() == slots
    assert probe.verdicts() == VERDICTS, "the installed programs must keep filtering"
    # the good file back: adopted again, nothing else was changed by the refusal
    write_file(eng.state_path, data)
    with b.inside():
        eng3 = Engine.open()
        assert eng3.state_error is None and eng3.table.num_entries == info.num_entries


def _dead_writer():
    p = subprocess.Popen(["true"])
    p.wait()
    return [p.pid, 1]           # exited; and start time 1 matches no live process (_alive)


def test_torn_pending_is_discarded(udp, installed_text):
    """A .pending whose blob is torn is unreadable: removed, the committed state stands (also
    when its program ids are the live ones: never renamed over the good state)."""
    a, b, probe = udp
    _text, (info, kblob) = installed_text
    d = _install(b, info, kblob)
    eng = d.backend(d.home_cookie, AF_INET).engine
    with b.inside():
        slots = eng._slot_ids()
    st, blob, data = read_state(eng.state_path)
    pending = dict(st, generation=st["generation"] + 1, writer=_dead_writer(),
                   prog_ids={str(h): i for h, i in slots.items()})
    good = json.dumps(pending).encode() + b"\n" + blob
    write_file(eng._pending_path, good[:-_last_entry_cut(blob)])
    with b.inside():
        eng2 = Engine.open()
        assert not os.path.exists(eng._pending_path)
        assert eng2.state_error is None
        assert eng2.generation == st["generation"]
        assert eng2.table.num_entries == info.num_entries
        assert eng2._slot_ids() == slots
    assert read_state(eng.state_path)[2] == data, "the committed state must stand"
    assert probe.verdicts() == VERDICTS
    # the same pending whole: it is readable, names the live programs, so it is the state now
    write_file(eng._pending_path, good)
    with b.inside():
        eng3 = Engine.open()
        assert not os.path.exists(eng._pending_path)
        assert eng3.generation == st["generation"] + 1
        assert eng3.table.num_entries == info.num_entries


# ---- warm decode == cold decode ----------------------------------------------------------------

MODEL_CACHES = ("_ENTRY_CACHE", "_LAST_WALK", "_ADDRESSES", "_ADDR_INTS", "_PAYLOADS", "_COMPILED")


def clear_caches():
    for name in MODEL_CACHES:
        c = getattr(model, name, None)
        if c is not None:
            c.clear()


def edited_blobs(shape: str, n: int):
    """[(getinfo, blob)] after a restore of the shape, then after an append, an insert at the
    top and a delete in the middle (cumulative), from the kernel."""
    rs = rulesets.make(shape, n, seed=3)
    # the middle of the chain holding most rules (fanout: SVC, the others: their one chain)
    counts = {}
    for ln in rs.text.splitlines():
        if ln.startswith("-A "):
            counts[ln.split()[1]] = counts.get(ln.split()[1], 0) + 1
    big = max(counts, key=counts.get)
    cmds = [f"-A {rs.chain} -s 203.0.113.9/32 -j DROP",
            f"-I {rs.chain} 1 -p udp -j ACCEPT",
            f"-D {big} {counts[big] // 2}"]
    out = []
    with Netns("cw") as ns:
        lab.restore(ns, rs.text)
        with ns.inside():
            out.append(kx.snapshot(AF_INET))
        for c in cmds:
            ns.run(["iptables-legacy"] + c.split())
            with ns.inside():
                out.append(kx.snapshot(AF_INET))
    return out


def noisy(blob: bytes, p: float, rnd) -> bytes:
    """Live counters and arbitrary comefrom values in a fraction p of the entries (libiptc sends
    back what GET_ENTRIES showed; the kernel recomputes comefrom)."""
    out = bytearray(blob)
    for off in entry_offsets(blob):
        if rnd.random() < p:
            struct.pack_into("<IQQ", out, off + COMEFROM, rnd.getrandbits(5),
                             rnd.getrandbits(40), rnd.getrandbits(50))
    return bytes(out)


def replace_buf(info, blob: bytes) -> bytes:
    return kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                             list(info.hook_entry), list(info.underflow), 4, 0, blob)


def _raw(info, blob):
    return model.Table.decode(blob, AF_INET, list(info.hook_entry), list(info.underflow),
                              info.valid_hooks, num_entries=info.num_entries)


def _entries(t):
    return [(r.comefrom, r.counters, r.offset, r.index) for r in t.entries()]


def _jumps(t):
    return [(r.target.chain, r.target.entry, r.target.chain_pos) for c in t.chains
            for r in c.rules if isinstance(r.target, model.Jump)]


@pytest.mark.parametrize("shape", ["mixed", "fanout", "ports"])
def test_warm_decode_equals_cold_with_live_counters(shape, monkeypatch):
    snaps = edited_blobs(shape, 2000)
    rnd = random.Random(shape)
    # (edit number, getinfo, blob): each edit as the kernel shows it, then with live counters
    # and comefrom values in 30% and in all entries; the restore as iptables-restore sends it
    seq = [(0, snaps[0][0], kx.restored(snaps[0][1], AF_INET))]
    for k, (info, blob) in enumerate(snaps[1:], 1):
        seq += [(k, info, blob), (k, info, noisy(blob, 0.3, rnd)), (k, info, noisy(blob, 1.0, rnd))]
    # and back through the edits, counters in a few entries (entries moving the other way)
    seq += [(k, info, noisy(blob, 0.05, rnd)) for k, (info, blob) in reversed(list(
        enumerate(snaps)))]
    cold, kept_cold = [], []
    for _k, info, blob in seq:
        clear_caches()
        cold.append((decode_replace(replace_buf(info, blob), AF_INET)[1], _raw(info, blob)))
        clear_caches()
        kept_cold.append(_raw(info, cold[-1][0].kept_blob))
    # entries the warm decodes walk (not reused from the previous walk), and of those the ones
    # parsed in full (not even in the entry cache)
    walked, parsed = [], []
    real_walk, real_hdr = model._walk_range, model._Hdr

    def counting_walk(*a):
        out = real_walk(*a)
        walked[-1] += len(out)
        return out

    class CountingHdr(real_hdr):
        __slots__ = ()

        def __init__(self, *a):
            parsed[-1] += 1
            super().__init__(*a)
    monkeypatch.setattr(model, "_walk_range", counting_walk)
    monkeypatch.setattr(model, "_Hdr", CountingHdr)
    clear_caches()
    prev_k = None
    for i, ((k, info, blob), (want, want_raw)) in enumerate(zip(seq, cold)):
        walked.append(0)
        parsed.append(0)
        got = decode_replace(replace_buf(info, blob), AF_INET)[1]
        assert got == want, (shape, i)
        assert got.kept_blob == want.kept_blob == want.encode(), (shape, i)
        assert _entries(got) == _entries(want), (shape, i)
        assert _jumps(got) == _jumps(want), (shape, i)
        if k == prev_k:
            # only comefrom and counters differ from the previous decode: all of it reused
            assert walked[-1] == 0, (shape, i, walked[-1])
        if i:
            assert parsed[-1] <= 3, (shape, i, parsed[-1])
        prev_k = k
        # the kept blob decoded raw, as an engine adopting the state file does (_read_state):
        # comefrom as computed and zero counters, not the values the caller sent
        walked.append(0)
        parsed.append(0)
        kept_raw = _raw(info, got.kept_blob)
        assert _entries(kept_raw) == [(r.comefrom, (0, 0), r.offset, r.index)
                                      for r in want.entries()], (shape, i)
        assert kept_raw == kept_cold[i], (shape, i)
        # the same blob decoded raw (counters and comefrom as sent), warm after the normalized
        # decode: the values of this blob, not those of the kept blob before
        walked.append(0)
        parsed.append(0)
        got_raw = _raw(info, blob)
        assert got_raw == want_raw and _entries(got_raw) == _entries(want_raw), (shape, i)
        assert walked[-1] == 0, (shape, i, "raw", walked[-1])
    # the first decode was cold: every entry walked, none from a previous walk or the entry
    # cache (an entry with the same bytes as one before it in the blob takes that one's parse)
    assert walked[0] >= seq[0][1].num_entries - 5 and parsed[0] > 0


# ---- work after the reply ---------------------------------------------------------------------

def _decoded(text: str):
    info, blob = kernel_blob(text)
    return decode_replace(replace_buf(info, kx.restored(blob, AF_INET)), AF_INET)[1]


def test_after_reply_defers_gc_and_frees_the_replaced_table(udp, monkeypatch):
    a, b, probe = udp
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    monkeypatch.setattr(engine, "FULL_PASS_EVERY", 1000)    # no pass at once, even if due
    text = lab_text(200)
    ta = _decoded(text)
    tb = _decoded(text.replace(TOP[1], TOP[1].replace("ACCEPT", "DROP")))
    with b.inside():
        eng = Engine.open()
        eng.install(ta)
    engine.run_after_reply()
    assert probe.verdicts() == VERDICTS
    old = weakref.ref(ta)
    del ta
    calls = []
    real_collect, real_freeze = gc.collect, gc.freeze
    monkeypatch.setattr(gc, "collect", lambda *x: calls.append("collect") or real_collect(*x))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze") or real_freeze())
    with b.inside():
        eng.install(tb)
    assert calls == [], "no GC pass inside the install: it is left for after the reply"
    assert len(engine.AFTER_REPLY) == 2
    assert old() is not None, "the replaced table is kept until after the reply"
    # the new ruleset filters before the deferred work has run
    assert probe.verdicts() == {**VERDICTS, 7002: False}
    assert engine.run_after_reply() == 2
    assert engine.AFTER_REPLY == []
    assert calls == ["freeze"], "the survivors frozen without a GC pass"
    assert old() is None, "the replaced table must be freed by the work after the reply"
    assert probe.verdicts() == {**VERDICTS, 7002: False}


def _garbage_cycles(n: int) -> list:
    """n garbage reference cycles; weak references to them."""
    class Cycle:
        pass
    refs = []
    for _ in range(n):
        c = Cycle()
        c.me = c
        refs.append(weakref.ref(c))
    return refs


@pytest.fixture
def gc_held(monkeypatch):
    """The automatic GC off (no pass may free a cycle before the helper's), the engine's
    full-pass bookkeeping fresh, the process's peak size told by the test (peak[0], KiB);
    everything unfrozen after."""
    peak = [100000]
    monkeypatch.setattr(engine, "_peak_at_pass", None)
    monkeypatch.setattr(engine, "_due_installs", 0)
    monkeypatch.setattr(engine, "_peak_rss", lambda: peak[0])
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield peak
    finally:
        gc.unfreeze()
        if was:
            gc.enable()


def test_helper_runs_no_gc_pass_while_the_process_stays_put(gc_held, monkeypatch):
    """A helper freezes an install's survivors without a GC pass, and while the process does
    not grow past FULL_PASS_GROWTH times its size at the first install, no install runs one: a
    garbage cycle frozen by one install stays (a pass every few installs found nothing, at
    10-250 ms)."""
    peak = gc_held
    passes = []
    real = engine.full_pass
    monkeypatch.setattr(engine, "full_pass", lambda: passes.append(1) or real())
    refs = _garbage_cycles(1)
    for k in range(3 * engine.FULL_PASS_EVERY):
        peak[0] = 100000 + k * 1000             # grows, by less than twice
        engine._collect_and_freeze()
    assert passes == [] and not engine.full_pass_due()
    assert refs[0]() is not None, "no pass may have run"
    assert engine.full_pass_if_due() is None


def test_helper_collects_the_whole_heap_once_it_has_grown(gc_held):
    """Past FULL_PASS_GROWTH times its size at the last pass the process's full pass is due:
    it runs at the helper's idle moment (full_pass_if_due) and frees the cycles frozen by
    earlier installs; without an idle moment, FULL_PASS_EVERY installs later at once."""
    peak = gc_held
    engine._collect_and_freeze()                    # the first install: the size to grow from
    refs = _garbage_cycles(100)
    peak[0] = int(100000 * engine.FULL_PASS_GROWTH) + 1
    engine._collect_and_freeze()
    assert engine.full_pass_due() and all(r() is not None for r in refs)
    assert engine.full_pass_if_due() >= len(refs)
    assert all(r() is None for r in refs), "the full pass must free cycles frozen earlier"
    assert not engine.full_pass_due() and engine._peak_at_pass == peak[0]
    # no idle moment: the install FULL_PASS_EVERY after the pass became due runs it
    refs = _garbage_cycles(100)
    peak[0] = int(peak[0] * engine.FULL_PASS_GROWTH) + 1
    for k in range(engine.FULL_PASS_EVERY):
        assert all(r() is not None for r in refs), f"a pass ran {k} installs after due"
        engine._collect_and_freeze()
    assert all(r() is None for r in refs) and not engine.full_pass_due()


def test_an_install_leaves_no_garbage_cycle(udp, monkeypatch):
    """What a helper's install and its work after the reply leave is freed by reference
    counting alone: a full GC pass after them finds nothing (it once found the ctypes.CDLL
    _wait_for_readers made per install, 8 objects a command, frozen until a pass)."""
    a, b, probe = udp
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    text = lab_text(20)
    tables = [_decoded(text), _decoded(text.replace(TOP[1], TOP[1].replace("ACCEPT", "DROP"))),
              _decoded(text)]
    with b.inside():
        eng = Engine.open()
        eng.install(tables[0])
        engine.run_after_reply()
        was = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            found = []
            for t in tables[1:]:
                gc.collect()
                eng.install(t)
                with monkeypatch.context() as m:
                    m.setattr(engine, "_collect_and_freeze", lambda: None)
                    engine.run_after_reply()
                eng._late_after_reply()     # the RCU wait's end, if after_reply requeued it
                time.sleep(0.05)
                engine.run_after_reply()
                gc.set_debug(gc.DEBUG_SAVEALL)
                try:
                    gc.collect()
                finally:
                    gc.set_debug(0)
                found.append(sorted({type(o).__name__ for o in gc.garbage}))
                gc.garbage.clear()
        finally:
            if was:
                gc.enable()
    assert probe.verdicts() == VERDICTS
    assert found == [[], []], f"garbage cycles left by an install: {found}"


def test_without_queue_the_install_collects_itself(udp, monkeypatch):
    """engine.AFTER_REPLY None (not a helper): the GC pass runs inside the install and the
    replaced table is gone when it returns."""
    a, b, probe = udp
    monkeypatch.setattr(engine, "AFTER_REPLY", None)
    text = lab_text(50)
    ta, tb = _decoded(text), _decoded(text.replace(TOP[1], TOP[1].replace("ACCEPT", "DROP")))
    with b.inside():
        eng = Engine.open()
        eng.install(ta)
    old = weakref.ref(ta)
    del ta
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *x: calls.append("collect") or real_collect(*x))
    with b.inside():
        eng.install(tb)
    assert calls and old() is None
    assert probe.verdicts() == {**VERDICTS, 7002: False}


def test_helper_keeps_gc_off_until_the_work_after_the_reply(udp, installed_text, monkeypatch):
    """In a helper, a SET_REPLACE leaves the automatic GC off when it replies (a pass due to its
    objects would otherwise run while the helper reads the SET_ADD_COUNTERS libiptc sends next);
    the queued work turns it back on. A request that queues nothing turns it on at once."""
    a, b, probe = udp
    _text, (info, kblob) = installed_text
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    monkeypatch.setattr(engine, "GC_HELD", False)
    assert gc.isenabled()
    try:
        with b.inside():
            d = S.Dispatcher()
            get_entries(d)
            assert gc.isenabled() and not engine.AFTER_REPLY, "nothing queued: GC on at once"
            set_replace(d, info, kx.restored(kblob, AF_INET))
            assert engine.AFTER_REPLY and not gc.isenabled() and engine.GC_HELD
            get_entries(d)          # the next request leaves it off too
            assert not gc.isenabled()
        engine.run_after_reply()
        assert gc.isenabled() and not engine.GC_HELD
        assert probe.verdicts() == VERDICTS
    finally:
        gc.enable()


STDIO = """
import sys
sys.path[:0] = [{root!r}]
from bpfilter_umh import __main__ as m, engine
from bpfilter_umh.frames import Reply
engine.AFTER_REPLY = []
log = []
real = engine.run_after_reply

def run():
    n = real()
    log.append(("run", n))
    return n
engine.run_after_reply = run


class Dispatcher:
    # stands in for an install: two items after each reply, as Engine.install queues
    def serve(self, req):
        log.append(("serve", len(engine.AFTER_REPLY)))
        engine.after_reply((object(), ))
        engine.after_reply(lambda: None)
        return Reply(0, 0)
rc = m.serve_stdio(Dispatcher())
sys.stderr.write(repr((rc, m.AFTER_REPLY_MAX, log)))
"""


def _stdio_log(frames_then_pause):
    """Run serve_stdio in a child on a pipe; frames_then_pause: [(frames, pause after)], each
    pause counted from the last of those frames' replies (not from writing them: a child slow
    to start on a loaded machine would otherwise find two steps' frames waiting together)."""
    from bpfilter_umh.frames import REPLY, Request as R
    frame = R(1, 0, AF_INET, os.getpid(), 0, 0).pack()
    p = subprocess.Popen([sys.executable, "-c", STDIO.format(root=ROOT)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, BPFILTER_AFTER_REPLY_IDLE="0.03"))
    try:
        for n, pause in frames_then_pause:
            p.stdin.write(frame * n)
            p.stdin.flush()
            got = b""
            while len(got) < n * REPLY.size:
                part = p.stdout.read1(n * REPLY.size - len(got))
                assert part, "the child closed its stdout"
                got += part
            time.sleep(pause)
        p.stdin.close()
        err = p.stderr.read().decode()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()                    # our own child, by its object
            p.wait()
    return eval(err.strip().splitlines()[-1])      # noqa: S307 - our own child's repr


def test_stdio_runs_the_queue_past_its_bound_and_when_idle():
    # a burst with no idle gap: the queue never waits past AFTER_REPLY_MAX items
    rc, bound, log = _stdio_log([(12, 0.0)])
    assert rc == 0
    seen = [n for what, n in log if what == "serve"]
    assert len(seen) == 12
    assert max(seen) <= bound, log
    assert ("run", bound + 2) in log, log
    # with a pause after each request: the work runs in the gap, before the next request
    rc, bound, log = _stdio_log([(1, 0.3), (1, 0.3), (1, 0.0)])
    assert [x for x in log] == [("serve", 0), ("run", 2), ("serve", 0), ("run", 2),
                                ("serve", 0)], log


STDIO_PASS = STDIO.replace('''        engine.after_reply(lambda: None)
        return Reply(0, 0)''', '''        engine.after_reply(lambda: None)
        engine._due_installs = 1         # each install makes the whole-heap pass due
        return Reply(0, 0)
engine.full_pass = lambda: log.append(("pass", 0)) or engine.__dict__.update(_due_installs=0)''')


def test_stdio_runs_a_due_gc_pass_only_when_idle(monkeypatch):
    """The kernel shim's transport: a whole-heap GC pass made due by an install
    (engine._collect_and_freeze) waits until no request has come for IDLE_PASS_AFTER, not
    run between the requests of a burst (nor right after the queued work)."""
    monkeypatch.setattr(sys.modules[__name__], "STDIO", STDIO_PASS)
    rc, _bound, log = _stdio_log([(1, 0.1), (1, 0.1), (1, 0.1), (1, 1.0), (1, 0.0)])
    assert rc == 0
    assert [w for w, _n in log if w != "run"] == ["serve"] * 4 + ["pass", "serve"], log


def _tracked() -> int:
    """Objects the cyclic GC tracks, frozen or not, without a pass (which would free what a
    helper keeps)."""
    return gc.get_freeze_count() + len(gc.get_objects())


def test_helper_heap_stays_flat_over_many_installs(udp, monkeypatch):
    """A helper's installs, each with its work after the reply and no GC pass at all (the
    pass is not due: the process does not grow): two tables installed in turn 40 times, the
    objects alive after the 10th and the 40th install are as many (a cycle per install, such
    as the ctypes.CDLL _wait_for_readers once made, adds 8 objects a command)."""
    a, b, probe = udp
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    monkeypatch.setattr(engine, "_peak_at_pass", None)
    monkeypatch.setattr(engine, "_due_installs", 0)
    passes = []
    real = engine.full_pass
    monkeypatch.setattr(engine, "full_pass", lambda: passes.append(1) or real())
    text = lab_text(20)
    tables = [_decoded(text), _decoded(text.replace(TOP[1], TOP[1].replace("ACCEPT", "DROP")))]
    counts = []
    was = gc.isenabled()
    gc.collect()
    try:
        with b.inside():
            eng = Engine.open()
            for k in range(40):
                gc.disable()            # as the helper's requests (sockopt.Dispatcher.serve)
                eng.install(tables[k % 2])
                engine.run_after_reply()
                eng._late_after_reply()
                engine.run_after_reply()
                gc.enable()
                if k in (9, 39):
                    time.sleep(0.05)    # the late counts' thread done
                    eng._late_after_reply()
                    engine.run_after_reply()
                    counts.append(_tracked())
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
    assert passes == [], "no pass is due while the process does not grow"
    assert probe.verdicts() == {**VERDICTS, 7002: False}
    assert counts[1] - counts[0] < 100, counts
