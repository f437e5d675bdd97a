"""A hash run's entries handed to its map's fill already joined, as an LPM run's are
(test_lpm_joined.py): classify.hash_entries and _split_hash_entries return a classify.Entries
whose `joined` buffers are its keys and values as BPF_MAP_UPDATE_BATCH reads them, so
engine._fill_batch does not split and check the pairs again on the install's main thread.
What must hold:

  - the compiled hash maps' entries (a run of one shape, bpfilter_hash; a multi run's shapes in
    one map, bpfilter_mshash) come joined, the buffers exactly their keys and values in order,
    and still read, compare and print as the plain list they were (the compiled output's
    digests);
  - entries whose keys (or values) are not all of one size get no joined buffers (the fill
    then checks each pair);
  - a table installed through the engine has, in each hash map, exactly its MapSpec's entries.
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

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF, namespaces")

HASH_MAPS = ("bpfilter_hash", "bpfilter_mshash")


def _table(shape: str, n: int = 2000, seed: int = 41):
    return decoded(rulesets.make(shape, n, seed=seed).text)


def _cold():
    classify._RUN_SPECS.clear()
    classify._LPM_SEEN.clear()
    C._PROG_CACHE.clear()


def _hash_specs(table) -> list:
    ct = C.compile_table(table, engine.kernel_facts(), "nf")
    return [s for cp in ct.programs for s in getattr(cp, "maps", ()) if s.kname in HASH_MAPS]


@pytest.mark.parametrize("shape,kname", [("ports", "bpfilter_hash"),
                                         ("fanout", "bpfilter_hash"),
                                         ("mixed", "bpfilter_mshash")])
def test_hash_entries_come_joined(shape, kname):
    _cold()
    specs = [s for s in _hash_specs(_table(shape)) if s.kname == kname]
    assert specs, f"{shape} compiles no {kname} map"
    for spec in specs:
        got = spec.entries
        assert isinstance(got, classify.Entries)
        keys, vals = got.joined
        assert keys == b"".join(k for k, _ in got)
        assert vals == b"".join(v for _, v in got)
        assert len(keys) == spec.key_size * len(got) and len(vals) == spec.value_size * len(got)
        plain = list(got)
        assert got == plain and repr(got) == repr(plain)


def test_entries_of_mixed_sizes_are_not_joined():
    for seen in ({b"k" * 16: b"v" * 8, b"k" * 15: b"w" * 8},
                 {b"k" * 16: b"v" * 8, b"j" * 16: b"w" * 7}):
        got = classify._hash_items(seen)
        assert got == list(seen.items())
        assert getattr(got, "joined", None) is None
    one = classify._hash_items({b"k" * 16: b"v" * 8, b"j" * 16: b"w" * 8})
    assert one.joined == (b"k" * 16 + b"j" * 16, b"v" * 8 + b"w" * 8)


@needs_root
@pytest.mark.parametrize("shape", ["ports", "mixed"])
def test_installed_hash_maps_hold_the_spec_entries(shape):
    _cold()
    with netns_engine("ihj") as eng:
        eng.install(_table(shape, seed=42))
        got = [(s, m) for s, m in eng._cls_maps.values() if s.kname in HASH_MAPS]
        assert got
        for spec, m in got:
            assert isinstance(spec.entries, classify.Entries)
            assert {k: m.lookup(k) for k in m.keys()} == dict(spec.entries)
            assert len(spec.entries) == len(dict(spec.entries))
