"""An append ahead of most of the table (issue #7: `-A INPUT` when FORWARD's fan-out and its
3 333 service chains come after INPUT in the blob): decode_replace tells the compiler which
entries changed (model.moved_from), and the compiler takes the previous table's walk of each
built-in chain that reached none of them, moved (compile._moved_program_key), instead of
walking its chains again; of a built-in chain that holds the change itself (the fan-out
reached from INPUT, as bench/ruleset_bench.py loads it) it walks that chain only and takes the
rest of the previous walk (compile._walk_behind). The programs must be the very ones a cold
compile makes, and neither shortcut may be taken where a chain behind the top one changed, a
chain or a jump was added, the change follows a user chain's RETURN, or the table was copied
to be edited.
"""
import copy
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_compile_kept import _clear, _programs, _texts  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import classify, model  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import KernelFacts  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402
from bpfilter_umh.model import decode_replace  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

EXTRA = "-A INPUT -s 203.0.113.{k}/32 -p udp -m udp --dport 4 -j DROP"


def _variants():
    base, variants = _texts()
    return base, dict(variants)


def _same_entries_moved(t, prev, mv):
    """Entries outside the change are the previous table's: same bytes (cache_key) and, after
    it, index - shift and offset + delta."""
    _prev, nhead, p_first, shift, delta = mv
    new, old = t.entries(), prev.entries()
    assert len(new) == len(old) - shift
    for i in range(nhead):
        assert new[i].cache_key == old[i].cache_key and new[i].offset == old[i].offset
    for j in range(p_first, len(old)):
        a, b = new[j - shift], old[j]
        assert a.cache_key == b.cache_key, j
        assert (a.index, a.offset) == (b.index - shift, b.offset + delta), j


def test_moved_from_an_append_and_not_otherwise():
    base, v = _variants()
    base_t = decoded(base)
    t = decoded(v["append to INPUT"])
    mv = model.moved_from(t)
    assert mv is not None and mv[0] is base_t
    assert mv[3] == -1 and mv[4] > 0          # one entry more, every entry after it moved
    _same_entries_moved(t, base_t, mv)
    assert model.moved_from(copy.deepcopy(t)) is None     # an edited copy is on its own
    # a new chain (an ERROR entry among the changed ones): the chains are not the same
    decoded(base)
    assert model.moved_from(decoded(v["a chain between the service chains"])) is None
    # a policy change: the changed entry is a return
    decoded(base)
    assert model.moved_from(decoded(v["INPUT policy"])) is None
    # deleted rules: moved the other way
    b2 = decoded(base)
    t2 = decoded(v["delete from INPUT"])
    mv2 = model.moved_from(t2)
    assert mv2 is not None and mv2[0] is b2 and mv2[3] == 1 and mv2[4] < 0
    _same_entries_moved(t2, b2, mv2)


def test_moved_walks_give_a_cold_compiles_programs(monkeypatch):
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)     # FORWARD's cases as global functions
    facts = KernelFacts.fake()
    base, v = _variants()
    _clear()
    prev = decoded(base)
    _programs(prev, facts)
    # appends one after another, no cold compile between them: the second and third take the
    # walks the one before took without walking (moved twice, three times)
    text, tables = base, [prev]
    for k in range(3):
        text = text.replace("COMMIT", EXTRA.format(k=90 + k) + "\nCOMMIT")
        t = decoded(text)
        tables.append(t)              # installed: alive while the next one is decoded
        moved, reused = C.PROG_STATS["walks_moved"], C.PROG_STATS["reused"]
        warm = _programs(t, facts)
        assert C.PROG_STATS["walks_moved"] - moved == 2, "FORWARD and OUTPUT not walked"
        assert C.PROG_STATS["reused"] - reused >= 2
        for chain in ("FORWARD", "OUTPUT"):
            assert warm[chain][3], chain                  # the kept program, moved
    moved = dict(C._WALK_RECORDS[id(t)][1])
    _clear()
    cold = _programs(t, facts)
    for chain in cold:
        assert warm[chain][:3] == cold[chain][:3], chain
    # the records moved three times are those of a walk of this table (the cold compile's)
    walked = C._WALK_RECORDS[id(t)][1]
    for chain in ("FORWARD", "OUTPUT"):
        a, b = moved[chain], walked[chain]
        assert a[:4] == b[:4] and a[4][0] == b[4][0] and a[4][2:] == b[4][2:], chain
        assert [f[:2] + (tuple(f[2]),) for f in a[4][1]] == \
            [f[:2] + (tuple(f[2]),) for f in b[4][1]], chain


def test_a_walk_reaching_the_change_is_walked(monkeypatch):
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    base, v = _variants()
    _clear()
    base_t = decoded(base)
    _programs(base_t, facts)
    t = decoded(v["append to a service chain"])
    assert model.moved_from(t) is not None
    moved = C.PROG_STATS["walks_moved"]
    warm = _programs(t, facts)
    # INPUT (before the change) and OUTPUT (after it) only: FORWARD reaches SVC-7
    assert C.PROG_STATS["walks_moved"] - moved == 2
    assert not warm["FORWARD"][3]
    _clear()
    cold = _programs(t, facts)
    for chain in cold:
        assert warm[chain][:2] == cold[chain][:2], chain
    del base_t


def _same_programs(warm, cold, what):
    """Bytecode and maps equal; `where` texts equal for a kept program, a subset otherwise
    (functions reused from classify._FN_CACHE describe only what their labels name, as
    test_compile_kept says)."""
    assert warm.keys() == cold.keys()
    for chain in cold:
        assert warm[chain][:2] == cold[chain][:2], (what, chain)
        if warm[chain][3]:
            assert warm[chain][2] == cold[chain][2], (what, chain)
        else:
            assert set(warm[chain][2]) <= set(cold[chain][2]), (what, chain)


def _fanout_on_input(n=1200, seed=5):
    """The fan-out reached from INPUT (as bench/ruleset_bench.py loads it): an append to INPUT
    changes the chain whose program reaches every service chain."""
    return rulesets.make("fanout", n, seed=seed).text.replace("-A FORWARD ", "-A INPUT ")


@pytest.mark.parametrize("global_above", [0, None])
def test_changed_top_takes_the_walk_behind_it(monkeypatch, global_above):
    if global_above is not None:
        monkeypatch.setattr(classify, "GLOBAL_ABOVE", global_above)
    facts = KernelFacts.fake()
    text = _fanout_on_input()
    _clear()
    tables = [decoded(text)]
    _programs(tables[0], facts)
    for k in range(3):
        text = text.replace("COMMIT", EXTRA.format(k=90 + k) + "\nCOMMIT")
        t = decoded(text)
        tables.append(t)
        spliced = C.PROG_STATS["walks_spliced"]
        warm = _programs(t, facts)
        assert C.PROG_STATS["walks_spliced"] - spliced == 1, "INPUT's walk stops after INPUT"
        assert not warm["INPUT"][3]           # INPUT changed: compiled
        _clear()
        cold = _programs(t, facts)
        _same_programs(warm, cold, k)
        _clear()
        _programs(t, facts)          # the next append finds this table's programs kept


def test_a_jump_added_to_top_walks_on():
    facts = KernelFacts.fake()
    text = _fanout_on_input(600)
    _clear()
    t0 = decoded(text)
    _programs(t0, facts)
    # a jump into a service chain appended to INPUT: a jump among the changed entries
    t = decoded(text.replace("COMMIT", "-A INPUT -p tcp -j SVC-3\nCOMMIT"))
    assert model.moved_from(t) is None
    spliced = C.PROG_STATS["walks_spliced"]
    warm = _programs(t, facts)
    assert C.PROG_STATS["walks_spliced"] == spliced
    _clear()
    _same_programs(warm, _programs(t, facts), "jump")
    del t0


def test_spliced_walk_compiles_as_the_whole_walk(monkeypatch):
    """The compile after a spliced walk is the compile after a whole walk, `where` texts too."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    text = _fanout_on_input()
    t0 = decoded(text)
    t1 = decoded(text.replace("COMMIT", EXTRA.format(k=90) + "\nCOMMIT"))
    out, records = [], []
    for behind in (True, False):
        if not behind:
            monkeypatch.setattr(C, "_walk_behind", lambda table, top: None)
        _clear()
        _programs(t0, facts)
        spliced = C.PROG_STATS["walks_spliced"]
        out.append(_programs(t1, facts))
        assert C.PROG_STATS["walks_spliced"] - spliced == (1 if behind else 0)
        # what the next table's walks start from: records, bases, spans, chain facts
        rec = C._WALK_RECORDS[id(t1)][1]["INPUT"]
        records.append((rec[0], rec[1], rec[2], rec[3], rec[4][0], rec[4][2], rec[4][3],
                        [f[:2] + (tuple(f[2]),) for f in rec[4][1]]))
    assert out[0] == out[1]
    assert records[0] == records[1]


def _entries(blob: bytes) -> list:
    """(offset, bytes) of each ipt_entry (next_offset at 90, target_offset at 88)."""
    out, off = [], 0
    while off < len(blob):
        nxt = int.from_bytes(blob[off + 90:off + 92], "little")
        out.append((off, blob[off:off + nxt]))
        off += nxt
    return out


def _insert_entry(info, blob: bytes, at: int, entry: bytes):
    """The table with `entry` inserted at offset `at`: jumps, hook entries and underflows
    behind it moved (what libiptc would send, had it put the entry there)."""
    size = len(entry)
    out = bytearray()
    for off, e in _entries(blob):
        if off == at:
            out += entry
        e = bytearray(e)
        toff = int.from_bytes(e[88:90], "little")
        if len(e) == toff + 40 and e[toff:toff + 2] == b"\x28\x00" and not any(e[toff + 2:toff + 32]):
            v = int.from_bytes(e[toff + 32:toff + 36], "little", signed=True)
            if v >= at:
                e[toff + 32:toff + 36] = (v + size).to_bytes(4, "little", signed=True)
        out += e
    info = copy.copy(info)
    info.hook_entry = [h + size if at <= h < len(blob) else h for h in info.hook_entry]
    info.underflow = [u + size if at <= u < len(blob) else u for u in info.underflow]
    info.num_entries += 1
    return info, bytes(out)


def test_entries_after_a_user_chains_return_are_not_moved(monkeypatch):
    """A rule put after a user chain's RETURN (the kernel takes it; iptables never writes it)
    makes that chain end in it: its walk is not the previous one's."""
    from test_cplane_scale import kernel_blob, replace_buf
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    base, _v = _variants()
    info, blob = kernel_blob(base)
    ents = _entries(blob)
    # SVC-7's entries: its ERROR head (errorname SVC-7), rules, RETURN; then SVC-8's head
    head = next(k for k, (off, e) in enumerate(ents) if b"ERROR" in e[112 + 2:112 + 32]
                and e[112 + 32:112 + 38] == b"SVC-7\0")
    nxt = next(k for k in range(head + 1, len(ents)) if b"ERROR" in ents[k][1][114:144])
    rule = ents[head + 1][1]                       # SVC-7's first rule, a plain one
    b0 = decode_replace(replace_buf(info, blob), 2)[1]
    _clear()
    _programs(b0, facts)
    i2, blob2 = _insert_entry(info, blob, ents[nxt][0], rule)
    t = decode_replace(replace_buf(i2, blob2), 2)[1]
    assert model.moved_from(t) is None
    # SVC-7 has no RETURN entry last: the compiler refuses the table, kept programs or not
    with pytest.raises(BpfilterError) as e:
        _programs(t, facts)
    assert "SVC-7" in str(e.value)
    # the same entry put before the RETURN (an append to SVC-7): moved
    b1 = decode_replace(replace_buf(info, blob), 2)[1]
    i3, blob3 = _insert_entry(info, blob, ents[nxt - 1][0], rule)
    t3 = decode_replace(replace_buf(i3, blob3), 2)[1]
    assert model.moved_from(t3) is not None and model.moved_from(t3)[0] is b1
    del b0, b1
