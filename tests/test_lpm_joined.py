"""An LPM run's entries handed to the trie's fill already joined (issue #7: a cold blocklist
restore's last wait is its trie's fill, which starts once the main thread has the batch's
buffers): classify.lpm_entries returns a classify.Entries whose `joined` buffers are its keys
and values as BPF_MAP_UPDATE_BATCH reads them, and engine._fill_batch takes them instead of
splitting the pairs again. What must hold:

  - the joined buffers are exactly the entries' keys and values, in order, and the entries
    still read, compare and print as the plain list they were (the compiled output's digests);
  - a fill of Entries puts the joined buffers in the map (the path is taken), and one whose
    buffers do not have the entries' total sizes is filled from the pairs;
  - a blocklist installed through the engine has, in its trie, exactly its MapSpec's entries.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded, netns_engine  # noqa: E402

from bpfilter_umh import classify, engine  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF, namespaces")


def _blocklist(n: int, seed: int):
    return decoded(rulesets.make("blocklist", n, seed=seed).text.replace("-A FORWARD ",
                                                                           "-A INPUT "))


def _lpm_runs(table) -> list:
    runs = []
    for c in table.chains:
        runs += [r for r in classify.find_runs(c.rules) if r.kind == "lpm"]
    return runs


def test_entries_come_joined():
    classify._LPM_SEEN.clear()
    runs = _lpm_runs(_blocklist(2000, 31))
    assert runs, "the blocklist has no LPM run"
    for run in runs:
        for _ in range(2):                      # cold, then from _LPM_SEEN
            got = classify.lpm_entries(run)
            assert isinstance(got, classify.Entries)
            keys, vals = got.joined
            assert keys == b"".join(k for k, _ in got)
            assert vals == b"".join(v for _, v in got)
            plain = list(got)
            assert got == plain and repr(got) == repr(plain)


def _trie(n: int):
    return K.Map.create(classify.BPF_MAP_TYPE_LPM_TRIE, 8, 8, n, name="t_joined",
                        flags=classify.BPF_F_NO_PREALLOC)


def _pairs(n: int, act: int) -> list:
    return [((24).to_bytes(4, "little") + bytes([10, i >> 8, i & 0xff, 0]),
             classify._VALUE.pack(i, act)) for i in range(n)]


def _content(m) -> dict:
    return {k: m.lookup(k) for k in m.keys()}


def _filled(ents) -> dict:
    """The contents of a new trie after engine._fill(trie, ents)."""
    m = _trie(len(ents))
    try:
        engine._fill(m, ents)
        return _content(m)
    finally:
        m.close()


@needs_root
def test_fill_takes_the_joined_buffers():
    pairs, other = _pairs(300, 1), _pairs(300, 2)
    ents = classify.Entries(pairs)
    # (joined buffers that differ from the pairs: only a test makes such; they show which
    # of the two the fill read)
    ents.joined = (b"".join(k for k, _ in other), b"".join(v for _, v in other))
    assert _filled(ents) == dict(other)


@needs_root
def test_fill_of_joined_buffers_of_other_sizes_reads_the_pairs():
    pairs, other = _pairs(300, 1), _pairs(301, 2)
    ents = classify.Entries(pairs)
    # one value too many: whichever the fill read, it was not these buffers if the trie holds
    # the pairs' values
    ents.joined = (b"".join(k for k, _ in pairs), b"".join(v for _, v in other))
    assert _filled(ents) == dict(pairs)


@needs_root
def test_installed_trie_holds_the_spec_entries():
    classify._RUN_SPECS.clear()
    classify._LPM_SEEN.clear()
    C._PROG_CACHE.clear()
    with netns_engine("ilj") as eng:
        eng.install(_blocklist(2000, 32))
        got = [(s, m) for s, m in eng._cls_maps.values() if s.kname == "bpfilter_lpm"]
        assert len(got) == 1
        spec, m = got[0]
        assert isinstance(spec.entries, classify.Entries)
        assert _content(m) == dict(spec.entries)
        assert len(spec.entries) == len(dict(spec.entries))
