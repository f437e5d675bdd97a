"""Counter reads of the engine against one-entry-at-a-time lookups: the batch read that finds the
entries that counted a block at a time (engine._percpu_nonzero: few of a large table's rules
match), the one that sums every entry (most did), and u64 wrap-around of a sum over CPUs as the
kernel's get_counters has it."""
import os
import struct

import pytest

from nsutil import Netns
from bpfilter_umh import engine
from bpfilter_umh import kernel as K

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF maps")

M = 2**64 - 1


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
            as_list = [(0, 0)] * n
            for i, c in (got.items() if isinstance(got, dict) else enumerate(got)):
                as_list[i] = c
            assert as_list == slow
            assert engine._percpu_sums(m, n) == slow
            base = [(1, 2)] * n
            assert engine.Engine._read(m, n, base) == [((p + 1) & M, (b + 2) & M)
                                                       for p, b in slow]
        finally:
            m.close()
