"""A table's blobs in size classes, and the heap top a big table's first appends take faulted in
while idle (heap.py: new_bytes, the spare block, installed/topup_steps). What must hold:

  - new_bytes(n) is a bytes object of n bytes like any other (equal, hashed, NUL-terminated
    for C readers) whose malloc block is its class's size, so the hole a freed blob leaves
    holds the next one a rule longer (an exact-sized one it does not);
  - read_bytes(spare=True) sets a block of the class aside, and the decode's copy
    (model._writable_copy) is that block; a decode that refuses the blob drops it and tops up
    nothing;
  - _kept_joined's copy in a class block has the bytes its bytes.join has;
  - the top-up faults in the heap the blocks of the next appends take (a fresh process:
    allocating them afterwards faults next to nothing in);
  - through a real helper, the launcher and iptables-legacy: the first appends after a
    10 000-rule restore fault in a few dozen pages each, not a blob's ~680 or two.
"""
from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bpfilter_umh import heap  # noqa: E402
from bpfilter_umh.caller import CallerMemory  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402

_libc = ctypes.CDLL(None)
_libc.malloc_usable_size.restype = ctypes.c_size_t
_libc.malloc_usable_size.argtypes = (ctypes.c_void_p,)

# a fan-out's 10 000-rule blob, and sizes around the classes' ends
SIZES = [heap.CLASS_MIN, heap.CLASS_MIN + 1, 2774168, 3 << 20, (3 << 20) + 1, 5000001]


def _pattern(n: int) -> bytes:
    # no NUL inside: a C reader of the object's bytes stops at the NUL after them
    return (bytes(range(1, 256)) * (n // 255 + 1))[:n]


def _filled(n: int) -> bytes:
    b = heap.new_bytes(n)
    v = heap.writable_view(b)
    v[:] = _pattern(n)
    v.release()
    return b


@pytest.mark.parametrize("n", SIZES)
def test_new_bytes_is_bytes_in_a_block_of_its_class(n):
    b = _filled(n)
    want = _pattern(n)
    assert type(b) is bytes and len(b) == n and b == want and hash(b) == hash(want)
    assert b[-1:] == want[-1:] and bytes(memoryview(b)[n - 3:]) == want[n - 3:]
    assert ctypes.c_char_p(b).value == want          # the NUL right after the n bytes
    # the block is the class's (the object's header, the bytes, its NUL)
    cap = heap.class_size(n)
    assert n <= cap <= n + n // 16
    assert _libc.malloc_usable_size(id(b)) >= cap + bytes.__basicsize__, (n, cap)


# run in a fresh process, malloc's thresholds as the helper's start sets them (heap.configure):
# this test process's heap holds whatever earlier tests left, and a freed block next to free
# space coalesces with it, so that an exact-sized blob fits there too (seen once in a full run)
_HOLE = """
import sys
sys.path.insert(0, {root!r})
from bpfilter_umh import heap
heap.libc.mallopt(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD)
heap.libc.mallopt(heap.M_TRIM_THRESHOLD, heap.TRIM_HELD)
make = heap.new_bytes if sys.argv[1] == "class" else bytes
n = 2774168
before = make(heap.CLASS_MIN)       # live neighbours: the freed blob's block stays a hole
a = make(n)
after = make(heap.CLASS_MIN)
at = id(a)
del a
print(id(make(n + 200)) == at)
"""


@pytest.mark.parametrize("make, same", [("class", True), ("exact", False)])
def test_a_blob_a_rule_longer_fits_the_hole_of_the_last(make, same):
    """The fan-out's append: 200 bytes more than the blob whose block was freed. Of its class,
    it takes that very block; exact-sized (as bytes() makes it), it does not fit there."""
    assert heap.class_size(2774168 + 200) == heap.class_size(2774168)
    out = subprocess.run([sys.executable, "-c", _HOLE.format(root=ROOT), make],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(same), make


def _caller_buffer(data: bytes):
    buf = ctypes.create_string_buffer(data, len(data))
    return ctypes.addressof(buf), buf


def test_the_decodes_copy_is_the_spare_block():
    from bpfilter_umh import model
    n = 2774168
    data = _pattern(n)
    addr, keep = _caller_buffer(data)
    blob = CallerMemory(os.getpid()).read_bytes(addr, n, spare=True)
    assert blob == data and heap._spare and heap._spare[0] == heap.class_size(n)
    spare = id(heap._spare[1])
    out, view = model._writable_copy(blob)
    view[5:9] = b"\0\0\0\0"
    kept = model._bytes_written(out, view)
    assert id(kept) == spare and not heap._spare
    assert type(kept) is bytes and kept == data[:5] + bytes(4) + data[9:] and blob == data
    # no spare: a block of its own; drop_spare frees one no copy took
    CallerMemory(os.getpid()).read_bytes(addr, n, spare=True)
    heap.drop_spare()
    assert not heap._spare
    del keep


class _Hdr:
    """A raw's header of its own: its ip set (model._shared_hdr's, which several raws share,
    has ip None and is replaced rather than written: test_decode_shared)."""
    def __init__(self, comefrom, pcnt, bcnt):
        self.comefrom, self.pcnt, self.bcnt = comefrom, pcnt, bcnt
        self.ip = "own"


class _Raw:
    def __init__(self, off, hdr):
        self.off, self.hdr = off, hdr


@pytest.mark.parametrize("family", [2, 10])
def test_kept_joined_has_the_joins_bytes(family, monkeypatch):
    """The copy patched in a class block against bytes.join of the runs (heap.can_write
    False): the same bytes, the raws' headers set alike, the caller's blob untouched."""
    from bpfilter_umh import model
    cf, cnt, _ = model._VOLATILE[family]
    n = 2774168
    blob = _pattern(n)
    offs = [0, 4096, 1000000, n - 4096]

    def todo():
        return [(_Raw(o, _Hdr(0, k % 2, 7 * (k % 2))), 0x1000 + k) for k, o in enumerate(offs)]
    a, b = todo(), todo()
    got = model._kept_joined(blob, a, cf, cnt)
    monkeypatch.setattr(heap, "can_write", lambda: False)
    want = model._kept_joined(blob, b, cf, cnt)
    assert type(got) is bytes and got == want and got != blob and blob == _pattern(n)
    assert [vars(r.hdr) for r, _c in a] == [vars(r.hdr) for r, _c in b]


def test_refused_blob_tops_up_nothing_and_keeps_no_spare():
    """A SET_REPLACE whose entries translate_table refuses: its errno, no spare block kept, no
    top-up due (a caller's bad request costs the helper no memory past its own)."""
    from bpfilter_umh import sockopt as S
    from bpfilter_umh.frames import Request
    saved = dict(heap._state)
    heap._state.update(topup=0, topped=0)
    try:
        size = 2 << 20
        hdr = S.REPLACE_HDR.pack(b"filter".ljust(32, b"\0"), 0x0E, 4, size,
                                 *([0] * 5), *([0] * 5), 4, 0)
        req_buf = hdr + b"\xff" * size       # no entry fits: the walk refuses it
        addr, keep = _caller_buffer(req_buf)
        req = Request(S.SO_SET_REPLACE, 1, 2, os.getpid(), len(req_buf), addr, 0)
        with pytest.raises(BpfilterError) as e:
            S.do_replace(None, CallerMemory(os.getpid()), req)
        assert e.value.errno == errno.EINVAL
        assert not heap._spare and not heap.topup_due()
        # what a successful install of that size makes due (not past TOPUP_MAX)
        heap.installed(size)
        assert heap.topup_due() == bool(heap.RESERVE)
        heap.topup_steps()
        assert not heap.topup_due()
        heap.installed(heap.TOPUP_MAX + 1)
        assert not heap.topup_due()
        del keep
    finally:
        heap._state.clear()
        heap._state.update(saved)


_TOPUP = """
import ctypes, resource, sys
from bpfilter_umh import heap, sockopt   # (imported in a helper: its log)
heap.configure()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 2774168
heap.installed(n)
if sys.argv[1] == "1":
    for _ in heap.topup_steps():
        pass
f0 = faults()
blocks = [heap.new_bytes(n) for _ in range(heap.TOPUP_BLOCKS)]
for b in blocks:
    # written (a read of a bytes(n), calloc()ed untouched from the top, faults in its pages)
    ctypes.memset(id(b) + bytes.__basicsize__ - 1, 0xA5, n)
print(faults() - f0)
"""


def _block_faults(topup: bool) -> int:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("BPFILTER_HEAP_RESERVE", None)
    out = subprocess.run([sys.executable, "-c", _TOPUP, "1" if topup else "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout)


def test_topup_faults_in_the_blocks_heap():
    """TOPUP_BLOCKS blocks of a fan-out blob's class, written, in a fresh process: ~3 400
    pages faulted in without the top-up, next to none after it."""
    without, topped = _block_faults(False), _block_faults(True)
    pages = heap.TOPUP_BLOCKS * heap.class_size(2774168) // 4096
    assert without > pages * 3 // 4, (without, pages)
    assert topped < pages // 20, (topped, without)


pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF")


@pytestmark_root
def test_first_appends_after_a_big_restore_fault_little():
    """The fan-out at 10 000 rules through a real helper: each of the first four appends'
    SET_REPLACE faults in a few dozen pages (~65-70; without the classes and the top-up
    1 400, 700, ... as the blobs' blocks went to the heap's top), the helper logs its top-up,
    and a helper without a reserve does none."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import rulesets
    from test_helper_heap_reserve import _serve
    text = rulesets.make("fanout", 10000).text
    faults, _ready, _after, log = _serve(text, None, appends=4)
    assert max(faults[1:]) < 300, faults
    assert "heap top-up" in log, log[-3000:]
    _f0, _r0, _a0, log0 = _serve(text, 0, appends=1)
    assert "heap top-up" not in log0
