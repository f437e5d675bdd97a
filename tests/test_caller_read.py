"""CallerMemory.read_bytes: the caller's bytes read straight into a new bytes object (the
SET_REPLACE entries sockopt.do_replace hands to the decode, which keeps that object as the
table's source blob), checked against this process's own memory as the caller's."""
from __future__ import annotations

import ctypes
import errno
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bpfilter_umh.caller import CallerMemory  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402


def _caller_buffer(data: bytes):
    buf = ctypes.create_string_buffer(data, len(data))
    return ctypes.addressof(buf), buf


@pytest.mark.parametrize("n", [1, 2, 4095, 4096, 4097, 3 << 20])
def test_read_bytes_is_the_callers_bytes(n):
    """Every byte, the first and last ones included (nonzero there), of buffers around a page
    and of a table's size; a new bytes object each time, left as it was by the next read."""
    rng = random.Random(n)
    data = bytes([0xA5]) + rng.randbytes(n - 2) + bytes([0x5A]) if n > 1 else b"\x7f"
    addr, keep = _caller_buffer(data)
    mem = CallerMemory(os.getpid())
    got = mem.read_bytes(addr, n)
    assert type(got) is bytes and got == data
    other, keep2 = _caller_buffer(bytes(reversed(data)))
    again = mem.read_bytes(other, n)
    assert again is not got and got == data and again == bytes(reversed(data))
    assert hash(got) == hash(bytes(data))
    del keep, keep2


def test_read_bytes_of_nothing_and_of_a_bad_address():
    mem = CallerMemory(os.getpid())
    assert mem.read_bytes(0, 0) == b""
    with pytest.raises(BpfilterError) as e:
        mem.read_bytes(8, 64)           # the zero page: nothing mapped there
    assert e.value.errno == errno.EFAULT


@pytest.mark.parametrize("family", [2, 10])
def test_decode_replace_keeps_the_entries_given_apart(family):
    """decode_replace(struct, entries=blob), as do_replace calls it: the table of the single
    buffer, with that very bytes object as its source blob (no copy), and the single buffer's
    errno and message for entries shorter than the struct's size."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_model_incremental import _blob, _buf, _plain, _rule, clear_caches
    from bpfilter_umh import model, uapi
    rng = random.Random(family)
    t = _plain(family, 2)
    for c in t.chains:
        c.rules = [_rule(rng, family, [], jumps=False) for _ in range(5)]
    blob, he, uf, vh, n = _blob(t)
    whole = _buf(blob, he, uf, vh, n)
    head = whole[:uapi.ipt_replace.sizeof()]
    clear_caches()
    want = model.decode_replace(whole, family)[1]
    clear_caches()
    got = model.decode_replace(head, family, entries=blob)[1]
    assert got == want and got.kept_blob == want.kept_blob
    assert got.source_blob is blob
    outcomes = []
    for args, kw in (((whole[:-8], family), {}), ((head, family), {"entries": blob[:-8]})):
        clear_caches()
        with pytest.raises(BpfilterError) as e:
            model.decode_replace(*args, **kw)
        outcomes.append((e.value.errno, str(e.value)))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == errno.EINVAL
