"""Counter reads of the engine against one-entry-at-a-time lookups: the batch read that finds the
entries that counted a block at a time (engine._percpu_nonzero: few of a large table's rules
match), the one that sums every entry (most did), the in-kernel sums of a large map
(engine._SumsReader, what engine._map_counts uses from READER_MIN entries), and u64 wrap-around
of a sum over CPUs as the kernel's get_counters has it."""
import os
import struct

import pytest

from nsutil import Netns
from bpfilter_umh import engine
from bpfilter_umh import kernel as K

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF maps")

M = 2**64 - 1


def _as_list(got, n):
    out = [(0, 0)] * n
    for i, c in (got.items() if isinstance(got, dict) else enumerate(got)):
        out[i] = c
    return out


def _slow(m, n):
    out = []
    for i in range(n):
        vals = [struct.unpack("<QQ", v) for v in m.lookup_percpu(i)]
        out.append((sum(p for p, _ in vals) & M, sum(b for _, b in vals) & M))
    return out


@pytest.mark.parametrize("every", [997, 3, 1])
def test_batch_reads_equal_per_entry_reads(every):
    n = 5000
    with Netns("cr") as ns, ns.inside():
        m = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, n, name="bpfilter_cnt")
        try:
            ncpu = K.possible_cpus()
            for i in range(0, n, every):
                big = M - 5 if i % 2 else i      # wraps when summed over two CPUs or more
                m.update(i, b"".join(struct.pack("<QQ", big + c, 1000 * i + c)
                                     for c in range(ncpu)))
            slow = _slow(m, n)
            got = engine._percpu_nonzero(m, n)
            assert isinstance(got, dict if every > 100 else list)
            assert _as_list(got, n) == slow
            # the in-kernel sums: same answer, same shape
            assert engine._reader_of(m, n) is not None
            got = engine._map_counts(m, n)
            assert isinstance(got, dict if every > 100 else list)
            assert _as_list(got, n) == slow
            base = [(1, 2)] * n
            assert engine.Engine._read(m, n, base) == [((p + 1) & M, (b + 2) & M)
                                                       for p, b in slow]
        finally:
            engine._close_counters(m)


def test_sums_reader_reads_the_map_as_it_is_now():
    """Each read sums the map anew: an entry counted since, or set back to zero, reads as it is
    (the reader's output map holds the last read until the next overwrites every entry); entries
    past n are not returned; a small map is read with the batch lookup."""
    n = 2 * engine.READER_MIN
    with Netns("cr") as ns, ns.inside():
        m = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, n + 10, name="bpfilter_cnt")
        small = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 10, name="bpfilter_cnt")
        try:
            ncpu = K.possible_cpus()

            def put(i, p, b):
                m.update(i, b"".join(struct.pack("<QQ", p, b) for _ in range(ncpu)))
            put(3, 1, 60)
            put(n + 5, 7, 700)
            assert engine._map_counts(m, n) == {3: (ncpu, 60 * ncpu)}
            put(3, 0, 0)
            put(n - 1, 2, 80)
            assert engine._map_counts(m, n) == {n - 1: (2 * ncpu, 80 * ncpu)}
            assert engine._map_counts(m, n + 10) == {n - 1: (2 * ncpu, 80 * ncpu),
                                                     n + 5: (7 * ncpu, 700 * ncpu)}
            assert engine._reader_of(small, 10) is None
            small.update(2, b"".join(struct.pack("<QQ", 1, 2) for _ in range(ncpu)))
            assert _as_list(engine._map_counts(small, 10), 10)[2] == (ncpu, 2 * ncpu)
            reader = engine._reader_of(m, n)
            engine._close_counters(m)
            assert reader.prog is None and "_sums_reader" not in m.__dict__
        finally:
            engine._close_counters(m)
            engine._close_counters(small)


def test_a_refused_reader_falls_back_to_the_batch_read(monkeypatch):
    """A kernel that refuses the reader (no bpf_loop, no mmapable arrays, ...) leaves the batch
    lookup reading that map: the same counts, and no second attempt per read."""
    tries = []

    def refused(m):
        tries.append(m)
        raise OSError(12, "refused")
    monkeypatch.setattr(engine, "_SumsReader", refused)
    n = engine.READER_MIN
    with Netns("cr") as ns, ns.inside():
        m = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, n, name="bpfilter_cnt")
        try:
            m.update(5, b"".join(struct.pack("<QQ", 1, 9) for _ in range(K.possible_cpus())))
            for _ in range(2):
                assert _as_list(engine._map_counts(m, n), n)[5] == (K.possible_cpus(),
                                                                     9 * K.possible_cpus())
            assert len(tries) == 1
        finally:
            engine._close_counters(m)
