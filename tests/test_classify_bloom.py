"""The split form's map contents built column-wise (issue #7, session 8: a cold compile of
10 000 rules) are what the one-key-at-a-time loops build:

  - classify._bloom_slots (every hash key's Bloom bit from one big int, a 128-bit lane a key)
    against the program's formula applied to each key;
  - classify._bloom_words given the LPM maps' keys (distinct prefixes) against _bloom_words
    reading every rule's prefix;
  - classify._strided_keys (hash and ip-part keys copied a byte column at a time) against
    packing each rule's key (test_classify_bulk._keys_each);
  - _split_hash_entries and hash_entries putting one key a rule in one C loop against the
    rule-by-rule loop: the same entries in the same order.

Each comparison is also run against a deliberately broken fast path, which it must catch.

And the programs' hash keys (classify._key): made in registers, stored as two whole u64 words.
"""
import os
import random
import struct
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rulesets  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import classify  # noqa: E402

M64 = (1 << 64) - 1


def _slot_each(key: bytes, b: int) -> int:
    w0, w1 = struct.unpack("<QQ", key)
    return ((((w1 * classify.BLOOM_K1) & M64) ^ w0) * classify.BLOOM_K2 & M64) >> (64 - b)


def _keys(seed: int, n: int) -> list:
    rnd = random.Random(seed)
    edge = [bytes(16), b"\xff" * 16, b"\xff" * 8 + bytes(8), bytes(8) + b"\xff" * 8]
    return edge + [rnd.randbytes(16) for _ in range(n)]


@pytest.mark.parametrize("b", [6, 13, 17, 22])
def test_bloom_slots_are_the_formula(b):
    keys = _keys(b, 3000)
    assert classify._bloom_slots(keys, b) == [_slot_each(k, b) for k in keys]
    assert classify._bloom_slots([], b) == []


def test_broken_bloom_slots_are_caught(monkeypatch):
    """Lanes not masked to their low u64: products carry into the next key's lane."""
    keys = _keys(1, 500)
    monkeypatch.setattr(classify, "_LANE_LOW", b"\xff" * 16)
    assert classify._bloom_slots(keys, 17) != [_slot_each(k, 17) for k in keys]


@pytest.fixture(scope="module")
def split_run():
    """The split multi run of a mixed ruleset (source and destination prefixes, some shorter
    than /16, and hash shapes), with its shapes."""
    rs = rulesets.make("mixed", 1500, seed=5)
    text = rs.text.replace("COMMIT", f"-A {rs.chain} -s 10.16.0.0/12 -j DROP\n"
                                     f"-A {rs.chain} -d 172.0.0.0/8 -j ACCEPT\nCOMMIT")
    rules = decoded(text).chain(rs.chain).rules
    classify._VECS.clear()
    classify._SEEN_RUNS.clear()
    runs = [r for r in classify.find_runs(rules) if r.kind == "multi"]
    assert runs
    run = max(runs, key=lambda r: len(r.rules))
    form, shapes, _ = classify._run_form(run)
    assert form == "split" and {s[0] for s, _ in shapes} == {"lpm", "hash"}
    return run, shapes


def _words_both(run, shapes):
    hashed = classify._split_hash_entries(run.rules, shapes, run)
    hk = [k for k, _ in hashed]
    lpm = {s: [k for k, _ in classify._split_lpm_entries(run.rules, ps, s[1], run)]
           for s, ps in shapes if s[0] == "lpm"}
    assert any(struct.unpack_from("<I", k)[0] < 16 for ks in lpm.values() for k in ks)
    return classify._bloom_words(run.rules, shapes, hk, run, lpm), \
        classify._bloom_words(run.rules, shapes, hk, run)


def test_bloom_words_from_lpm_keys_are_the_rules(split_run):
    fast, slow = _words_both(*split_run)
    assert fast == slow and fast[0]


def test_broken_bloom_words_from_lpm_keys_are_caught(split_run, monkeypatch):
    """The /16 read from the LPM key's address bytes in the wrong order."""
    monkeypatch.setattr(classify, "_LPM_SLOT",
                        lambda k: (struct.unpack_from("<I", k)[0], k[4] << 8 | k[5]))
    fast, slow = _words_both(*split_run)
    assert fast != slow


# ---- hash keys read by byte (classify._strided_keys) -------------------------------------------

def _exact_run():
    """A hash run of tcp and udp rules with one destination port each (one key a rule)."""
    from test_classify_bulk import _chain_rules, _run_of
    from test_compile_util import ACCEPT, DROP, rule, tcp, udp
    rnd = random.Random(4)
    rules = []
    for _ in range(700):
        m = rnd.choice([tcp, udp])
        p = rnd.randrange(1, 65535)
        rules.append(rule(rnd.choice([ACCEPT, DROP]), m(dport=(p, p)), proto=6 if m is tcp
                          else 17, dst=f"198.51.100.{rnd.randrange(256)}/32"))
    return _run_of(_chain_rules(rules))


def _keys_both(run, pad):
    from test_classify_bulk import _keys_each
    positions = list(range(0, len(run.rules), 2))
    fast = classify._run_rule_keys(run, positions=positions, pad=pad)
    hot = classify._ippart_keys(run, positions, pad)
    hot_each = [classify._hash_key(classify._le32(r.ip.src), classify._le32(r.ip.dst),
                                   r.ip.proto, 0, 0, 1)[:14] + pad.to_bytes(2, "little")
                for r in (run.rules[p] for p in positions)]
    return (fast, hot), (_keys_each(run, positions=positions, pad=pad), hot_each)


@pytest.mark.parametrize("pad", [0, 3, 0x1234])
def test_strided_keys_are_each_rules(pad):
    run = _exact_run()
    got = classify._run_classes(run)
    assert classify._one_key_each(run.sig, got[1], got[0], range(len(got[1])), 0) is not None
    fast, slow = _keys_both(run, pad)
    assert fast == slow


def test_broken_strided_keys_are_caught(monkeypatch):
    """The 16-byte keys cut from the byte columns in reverse."""
    run = _exact_run()
    monkeypatch.setattr(classify, "_KEY16", types.SimpleNamespace(
        iter_unpack=lambda b: ((bytes(b[i:i + 16])[::-1],) for i in range(0, len(b), 16))))
    fast, slow = _keys_both(run, 3)
    assert fast[0] != slow[0] and fast[1] != slow[1]


# ---- map entries put in one C loop (one key a rule) --------------------------------------------

def _split_entries_each(run, shapes) -> list:
    """_split_hash_entries rule by rule: a rule's keys, then its ip-part key."""
    seen = {}
    acts = classify._run_acts(run)
    for gid, (sig, positions) in classify._hash_shapes(shapes):
        keys = classify._run_rule_keys(run, sig, positions, gid)
        hot = classify._ippart_keys(run, positions, gid) if sig[4] else [None] * len(keys)
        for pos, ks, hk in zip(positions, keys, hot):
            for k in ks:
                seen.setdefault(k, struct.pack("<I", pos << 8 | acts[pos]))
            if hk is not None:
                seen.setdefault(hk, struct.pack("<I", pos << 8 | classify.SPLIT_HOT))
    return list(seen.items())


def _hash_entries_each(run) -> list:
    seen = {}
    values = classify._values(run)
    hot = classify._ippart_keys(run) if classify._needs_ippart(run) else [None] * len(values)
    for ks, v, hk in zip(classify._run_rule_keys(run), values, hot):
        for k in ks:
            seen.setdefault(k, v)
        if hk is not None:
            seen.setdefault(hk, v)
    return list(seen.items())


def test_entries_are_each_rules(split_run):
    run, shapes = split_run
    cls, _ = classify._run_classes(run)
    assert any(classify._one_key_each(sig, classify._keys_at((cls, run.keys), ps), cls, ps, gid)
               is not None for gid, (sig, ps) in classify._hash_shapes(shapes))  # the path runs
    assert classify._split_hash_entries(run.rules, shapes, run) == \
        _split_entries_each(run, shapes)
    plain = _exact_run()
    assert classify._needs_ippart(plain)
    assert classify.hash_entries(plain) == _hash_entries_each(plain)


def test_broken_entries_are_caught(split_run, monkeypatch):
    """The one-key path's keys handed over in reverse: values of other rules."""
    run, shapes = split_run
    want = _split_entries_each(run, shapes)
    real = classify._one_key_each
    monkeypatch.setattr(classify, "_one_key_each",
                        lambda *a: (lambda r: r[::-1] if r else r)(real(*a)))
    assert classify._split_hash_entries(run.rules, shapes, run) != want


def _key_area_accesses(text: str):
    """(class, size, off) of every stack load and store in the hash key's 16 bytes
    (classify.S_CLS_KEY) in the compiled programs of `text`'s chains."""
    from bpfilter_umh import ebpf as E
    from bpfilter_umh.compile import KernelFacts, compile_table
    out = []
    for cp in compile_table(decoded(text), KernelFacts.fake(), "nf").programs:
        for it in cp.items:
            cls = getattr(it, "code", 0) & 0x07
            if isinstance(it, E.Insn) and cls in (E.BPF_LDX, E.BPF_ST, E.BPF_STX) and \
                    E.R10 in (it.src if cls == E.BPF_LDX else it.dst,) and \
                    classify.S_CLS_KEY <= it.off < classify.S_CLS_KEY + 16:
                out.append((cls, it.code & 0x18, it.off - classify.S_CLS_KEY))
    return out


@pytest.mark.parametrize("shape", ["mixed", "tuple", "fanout"])
def test_hash_keys_are_stored_in_whole_words(shape):
    """A hash key is made in registers and stored as two u64s (classify._key): the program never
    loads it back (the Bloom hash takes the words from registers), and its second word, read by
    htab's jhash and the Bloom hash alike, is never written a field at a time (a load of bytes
    several narrower stores wrote is not forwarded on x86: a mixed 10 000-rule run's packet took
    56 ns with the key stored field by field, 30 ns with this)."""
    rs = rulesets.make(shape, 1500, seed=5)
    got = _key_area_accesses(rs.text)
    from bpfilter_umh import ebpf as E
    assert any(c == E.BPF_STX and s == E.DW and o == 8 for c, s, o in got), got
    assert not [a for a in got if a[0] == E.BPF_LDX], got
    assert not [a for a in got if a[2] >= 8 and a[1] != E.DW], got
