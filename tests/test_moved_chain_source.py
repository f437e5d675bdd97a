"""A _MovedChain's source is a chain whose entries are made (session 13, issue #7).

Table._build makes the user chains behind an append _MovedChains of the previous table's (3 333
of a fan-out's on every append to INPUT), each made from the previous chain or, when that one
is itself a _MovedChain not made, from its source: so a chain left unmade by many appends in a
row is one step from entries that exist, not a chain of sources as long as the appends
(_place reads the source's entries, which would make each one behind it). Checked on appends
decoded in turn without reading them, then with the previous table's chains made (read) in
between: every unmade chain's source is made, and every table reads as its cold decode.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_model_incremental import clear_caches  # noqa: E402
from test_model_lazy import _appends, _cold, _same  # noqa: E402

from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.model import AF_INET, AF_INET6, decode_replace  # noqa: E402


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
@pytest.mark.parametrize("read_between", [False, True])
def test_sources_of_unmade_chains_are_made(family, read_between):
    bufs = _appends(family, 4)
    clear_caches()
    got = []
    for k, b in enumerate(bufs):
        t = decode_replace(b, family)[1]
        got.append(t)
        unmade = [c for c in t.chains if model._unmade(c) is not None]
        if k:
            assert unmade, k
        for c in unmade:
            assert model._unmade(c._src) is None, (k, c.name)
        if read_between and k % 2:
            for c in t.chains:
                c.rules                         # made: the next table's sources are these
    for t, b in zip(got, bufs):
        _same(t, _cold(b, family))
