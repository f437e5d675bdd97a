"""A helper's heap reserve (issue #7): memory its first big commands would fault in, faulted in
while it is idle instead.

A page of anonymous memory is faulted in (allocated, zeroed, mapped) on its first touch: ~4.8 us
a page on this machine, 3.6 us even by MADV_POPULATE_WRITE. A fresh helper's first restore of
10 000 rules grows its heap by ~20-45 MiB, and its next two or three appends (two tables alive,
the replaced one freed after the reply) by 3-5 MiB each, until the heap reaches the size its
commands keep reusing. Measured through the helper (the faults of its SET_REPLACE: the debug
log line), with no warm-up: the fan-out restore 7 450 faults (~35 ms), its first two appends
~1 900 and ~1 750; the blocklist restore 3 370. With the reserve: 17, 69, 66 (or 940); 13.

Both allocators a command's memory comes from keep what is faulted in here:
  - CPython's small-object allocator (Objects/obmalloc.c): 1 MiB arenas, mmap()ed when it
    needs one and unmapped when the last object in it is freed. The reserve fills arenas with
    small objects and frees them all but one per quarter arena: an arena with an object left
    stays mapped, and its free pools serve any size class (an arena spans at least three whole
    quarters, so each keeps one).
  - glibc's malloc (objects over 512 bytes: the request's blob, lists' arrays, long bytes):
    the main arena's top is given back by sbrk() once it exceeds the trim threshold
    (malloc/malloc.c systrim), 128 KiB unless an mmapped chunk's free raised it. The reserve
    fixes the thresholds (mallopt, which also ends glibc's dynamic adjustment) so that blocks
    touched and freed here stay in the heap for later mallocs.

The cost is resident memory: up to RESERVE MiB more than a helper needs until it has a big table
(10 rules: ~45 -> ~76 MiB, ~49 once released). A big table's commands reach about that size
anyway: the fan-out's helper ~86 MiB after a few appends without the reserve, ~83-88 with it
(the blocklist's: 58 and 79). A helper whose tables stay small gives the reserve back once it
has been idle for RELEASE_IDLE seconds (release_if_small), but for the KEEP_OBJECTS of arenas a
helper kept before it had a reserve. BPFILTER_HEAP_RESERVE=MiB sizes it, 0 turns it off (no
reserve, glibc's own thresholds).
"""
import os

from . import libc

_MIB = 1 << 20
RESERVE = 48 * _MIB
try:
    RESERVE = max(0, int(float(os.environ.get("BPFILTER_HEAP_RESERVE", RESERVE >> 20)) * _MIB))
except ValueError:
    pass
# the share of the small-object allocator: a fan-out restore of 10 000 rules takes ~28 MiB of
# arenas, its heap and first appends ~16 MiB of malloc's
OBJECT_SHARE = 2 / 3

# how long a helper with small tables holds its reserve without a request (serve_listen exits
# after BPFILTER_IDLE_EXIT, 5 s, anyway); a table of fewer entries than SMALL_TABLE is small
RELEASE_IDLE = 2.0
SMALL_TABLE = 1000

# mallopt parameters (malloc/malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# blocks up to this come from the heap (glibc's own dynamic maximum, DEFAULT_MMAP_THRESHOLD_MAX
# on 64-bit: a 10 000-rule blob is ~2.4 MB); a top kept while the reserve is held, and after
TRIM_HELD, TRIM_RELEASED = 64 * _MIB, 16 * _MIB
MMAP_THRESHOLD = 32 * _MIB

# what a released reserve keeps: the object arenas a helper kept before the reserve (its first
# restore's decode at 10 000 rules), and a heap top as big as a helper without one prefaults
# (engine._prefault_heap)
KEEP_OBJECTS, TRIM_PAD = 12 * _MIB, 8 * _MIB

# the heap the reserve faults in first: a SET_REPLACE's buffer and the kept copy of its blob
# (~2.4-2.8 MB each at 10 000 rules), what engine._prefault_heap faults in at the start of a
# helper without a reserve
REQUEST_BUFFER = 8 * _MIB

# the small-object allocator's arena size on 64-bit builds (ARENA_BITS 20); arenas are not
# aligned to it
_ARENA = 1 << 20
_pins = []
_state = {"warmed": 0, "held": False, "kept_pins": 0, "topup": 0, "topped": 0}


def configure():
    """At the helper's start, before its threads: malloc's thresholds fixed (see the module's
    doc). Nothing when the reserve is off."""
    if not RESERVE:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_HELD)


def reserve_steps(size: int = None):
    """Fault in the reserve, ~1 MiB a step (~1.2 ms): first REQUEST_BUFFER of malloc heap (a
    SET_REPLACE's first need is the buffer its blob is read into: sockopt.do_replace), then
    the small-object part (the decode's), then the rest of the heap. A helper runs a step only
    while no request waits (__main__.queue_start_work). Done once per process."""
    size = RESERVE if size is None else size
    if not size or _state["warmed"]:
        return
    _state["warmed"] = size     # from here on in the peak (reserve_kib)
    objects = int(size * OBJECT_SHARE) // _ARENA
    heap_mib = size // _MIB - objects
    # freed at once, so that a request meanwhile finds it; the last steps take it again (no
    # faults: ~0.1 ms a MiB) and grow the heap past it
    yield from _heap_steps(min(heap_mib, REQUEST_BUFFER // _MIB))
    yield from _object_steps(objects)
    yield from _heap_steps(heap_mib)
    _state["held"] = True
    from .sockopt import log
    log.debug("heap reserve warmed: %d MiB (%d MiB of object arenas)", size >> 20, objects)


def _heap_steps(mib: int):
    """The heap grown to hold mib MiB more than it has in use, faulted in, one MiB a step, then
    freed: into the heap's top or bins, kept there (TRIM_HELD)."""
    blocks = []
    for _ in range(mib):
        blocks.append(bytearray(_MIB))       # malloc'ed and written (bytes() would calloc)
        yield


def _object_steps(arenas: int):
    per_arena = _ARENA // 480
    chunks = []
    for _ in range(arenas):
        chunks.append([bytes(440) for _ in range(per_arena)])     # 473 bytes: the 480 class
        yield
    seen = set()
    for k in range(arenas):
        for o in chunks[k]:             # freed here but for its pins: one arena a step
            quarter = id(o) // (_ARENA // 4)
            if quarter not in seen:
                seen.add(quarter)
                _pins.append(o)
        chunks[k] = None
        if k < KEEP_OBJECTS // _ARENA:
            _state["kept_pins"] = len(_pins)
        yield


def held() -> bool:
    return _state["held"]


def reserve_kib() -> int:
    """KiB the reserve adds to the process's peak resident size, at most (ru_maxrss never goes
    down; counted from the warm's start, so that an install before its end sees it too):
    engine._peak_rss leaves it out, so that the GC pass's growth rule compares what the tables
    made the process grow to (FULL_PASS_GROWTH), erring towards an earlier pass."""
    return _state["warmed"] >> 10


def release():
    """Give the reserve back but for KEEP_OBJECTS of arenas: the pinned arenas that hold
    nothing else are unmapped as their pins go, and the heap's free pages are returned
    (malloc_trim: the top above TRIM_PAD, and the free chunks' whole pages by MADV_DONTNEED)."""
    if not _state["held"]:
        return
    del _pins[_state["kept_pins"]:]
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_RELEASED)
    libc.malloc_trim(TRIM_PAD)
    _state["held"] = False
    _state["topped"] = 0        # (its top given back: a big table's next class tops up again)
    from .sockopt import log
    log.debug("heap reserve released")


def installed_entries(dispatcher) -> int:
    """Entries in the tables the dispatcher's engines have installed: the count the decode
    kept (engine._entry_count), not the chains' rules counted, since that reads every chain
    and makes the entries of those an append moved whole and left unmade (model._MovedChain:
    ~40 ms and several MiB for a fan-out's 3 300 service chains, measured by engineer M2)."""
    from .engine import _entry_count
    n = 0
    for backend in list(dispatcher.backends.values()):
        table = getattr(getattr(backend, "engine", None), "table", None)
        if table is not None:
            n += _entry_count(table)
    return n


def release_if_small(dispatcher) -> bool:
    """At an idle moment of RELEASE_IDLE: the reserve given back unless the helper holds a big
    table, whose next commands need about that much again (a replace holds the old table and
    the new). True when released."""
    if not _state["held"] or installed_entries(dispatcher) >= SMALL_TABLE:
        return False
    release()
    return True


# ---- a table's blobs in size classes ---------------------------------------------------------
# A table's entries arrive as one bytes object (the SET_REPLACE's buffer: caller.read_bytes) and
# the decode keeps a second one (model._kept_blob: what GET_ENTRIES shows); at 10 000 rules each
# is ~2.7 MB, a malloc block from the heap (under MMAP_THRESHOLD), alive as long as the table.
# An append makes both 200-odd bytes longer than the replaced table's, whose blocks are the
# holes the next append finds: glibc's malloc takes the smallest free chunk that holds a request
# (malloc/malloc.c _int_malloc, best fit from the large bins), and a hole a few hundred bytes
# short holds nothing of that size, so each of the first appends after a restore grew the heap's
# top by one or two blobs (~680 fresh pages each, ~3.3 ms: 1 354, 678, 1 355 faults, until
# freed neighbours happened to coalesce). Allocated in size classes, the blocks of a table and
# of the next few hundred appends' are the same size: each append's blob fits the hole of the
# table two installs back exactly, pages faulted in long ago.

# blobs from this size up get a class (below it a block is a few pages at most)
CLASS_MIN = 256 << 10
# classes per power of two: a block at most 1/16 bigger than its bytes; a 2.7 MB blob's class
# is 2.75 MiB, room for ~550 appends of a 200-byte rule before the next class
CLASS_STEPS_LOG2 = 4

_layout = {}
# (class size, a new bytes object of that size): the block new_bytes(spare=True) set aside,
# which the next new_bytes of that class hands out
_spare = []


def class_size(n: int) -> int:
    """n rounded up to its size class (n itself below CLASS_MIN)."""
    if n < CLASS_MIN:
        return n
    step = 1 << (n.bit_length() - 1 - CLASS_STEPS_LOG2)
    return -(-n // step) * step


def _bytes_layout():
    """(PyBytes_FromStringAndSize, PyMemoryView_FromMemory, offset of ob_size, offset of
    ob_sval) checked on a probe object, or None where the layout is not CPython's
    PyBytesObject (then new_bytes allocates exactly)."""
    if "api" in _layout:
        return _layout["api"]
    api = None
    try:
        import ctypes
        import sys
        if sys.implementation.name == "cpython":
            new = ctypes.pythonapi.PyBytes_FromStringAndSize
            new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
            view = ctypes.pythonapi.PyMemoryView_FromMemory
            view.restype = ctypes.py_object
            view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
            # PyVarObject: ob_refcnt, ob_type, ob_size; PyBytesObject's ob_sval last, its
            # terminating NUL counted in tp_basicsize
            size_at = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)
            data_at = bytes.__basicsize__ - 1
            probe = new(None, 4099)
            at = libc.data_address(probe)[0]
            if ctypes.c_ssize_t.from_address(id(probe) + size_at).value == 4099 and \
                    at == id(probe) + data_at:
                api = (new, view, size_at, data_at, ctypes)
    except (AttributeError, OSError, ValueError):
        api = None
    _layout["api"] = api
    return api


def new_bytes(n: int, spare: bool = False) -> bytes:
    """A new bytes object of n > 0 bytes, its contents to be filled before anyone else sees it,
    whose malloc block is class_size(n) bytes: made at the class's size, then its ob_size set
    to n and the NUL every bytes object ends with written after the n-th byte. free() gives
    back the block by its own chunk header (the object's size is not asked), so the whole block
    is a hole again when the object goes. spare: a second block of that class made at once
    and kept, which the next new_bytes of the class hands out (see _spare). Below CLASS_MIN,
    or where the layout is not CPython's, bytes(n)."""
    api = _bytes_layout() if n >= CLASS_MIN else None
    if api is None:
        return bytes(n)
    new, _view, size_at, data_at, ctypes = api
    cap = class_size(n)
    if _spare and _spare[0] == cap:
        out = _spare.pop()      # (new, unshared: only _spare held it)
        _spare.clear()
    else:
        out = new(None, cap)
    if spare:
        # the block of the decode's copy (model._kept_blob) taken now, beside this one: made
        # after the decode's own allocations, it found the hole it would fit cut into by them
        _spare[:] = (cap, new(None, cap))
    if cap != n:
        ctypes.c_ssize_t.from_address(id(out) + size_at).value = n
        ctypes.c_char.from_address(id(out) + data_at + n).value = b"\0"
    return out


def drop_spare():
    """The block new_bytes(spare=True) set aside, freed if no copy took it (a decode that kept
    the caller's bytes, or refused them), or if one did not fit in it."""
    _spare.clear()


def can_write() -> bool:
    """Whether writable_view works here (CPython's bytes layout, checked)."""
    return _bytes_layout() is not None


def writable_view(out: bytes) -> memoryview:
    """A writable memoryview (format B) of new_bytes' object, to fill it: only while nobody
    else holds the object (a bytes object is immutable once shared: hashed, compared, kept).
    The view does not keep `out` alive; release it when done."""
    api = _bytes_layout()
    if api is None:
        raise ValueError("no writable view of a bytes object here")
    _new, view, _size_at, data_at, _ctypes = api
    return view(id(out) + data_at, len(out), 0x200)     # PyBUF_WRITE


# ---- the heap a big table's first appends take, faulted in while idle ------------------------
# A replaced table is freed only after the next command (engine.AFTER_REPLY), so the first two
# appends after a restore find no table's blocks to reuse: four blobs' blocks (each append's
# request buffer and kept copy), ~11 MiB at 10 000 rules, come from the heap's top, ~2 800 fresh
# pages in their SET_REPLACEs (~13 ms). From the third append on, each takes the holes of the
# table replaced two installs back (new_bytes' classes). So once a SET_REPLACE has installed a
# blob of a class bigger than any before, the helper's idle moments fault in the top such
# blocks would take: the blocks malloc()ed (not touched: nothing faulted), freed back into the
# top (TRIM_HELD keeps it), and that range populated a step at a time by
# madvise(MADV_POPULATE_WRITE) (mm/madvise.c, Linux 5.14: the pages faulted in as by a write,
# their contents left alone, so a range a request has taken meanwhile is unharmed). A helper
# with a big table grows to that size with its first appends anyway (measured at 10 000 rules,
# six appends: 87 MiB resident with or without it).
# Five blocks, not four: with four, one append in two or three runs of ten still took a block
# from the top (~700 faults), where an after-reply's free came after the next request or the
# holes were cut into; with five, none in the runs measured.
TOPUP_BLOCKS = 5
# classes from this size up are topped up (a 256 KiB blob's block is ~64 pages)
TOPUP_MIN = 1 << 20
# and up to this size (~30 000 rules): the blocks freed must stay in the heap's top (under
# TRIM_HELD, and each under MMAP_THRESHOLD)
TOPUP_MAX = 8 * _MIB
# and this much more: what else is allocated meanwhile (the log line, the next command's
# requests) takes the top's start, and the blocks come after it
TOPUP_PAD = _MIB
MADV_POPULATE_WRITE = 23
_PAGE = 4096
# populated a step (~0.25 ms where none is present yet): what a request arriving meanwhile
# waits at most
TOPUP_STEP = 256 << 10


def installed(size: int):
    """A SET_REPLACE installed a blob of `size` bytes: topup_due from here on if its class is
    bigger than any the heap was topped up for (a refused one tops up nothing: a caller's
    bad request costs the helper no memory past the request's own)."""
    cap = class_size(size)
    if TOPUP_MIN <= cap <= TOPUP_MAX and cap > _state["topped"]:
        _state["topup"] = max(cap, _state["topup"])


def topup_due() -> bool:
    """Whether a SET_REPLACE read a blob of a class bigger than the heap was topped up for."""
    return bool(RESERVE) and _state["topup"] > _state["topped"]


def _malloc_api():
    """(sbrk, madvise, mallinfo2) of this process's libc, or None: the first two are libc.py's;
    mallinfo2 returns a struct by value, which only ctypes declares."""
    if "malloc" in _layout:
        return _layout["malloc"]
    api = None
    try:
        import ctypes
        info = ctypes.CDLL(None).mallinfo2

        class Mallinfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        info.restype = Mallinfo2
        api = (libc.sbrk, libc.madvise, info)
    except (AttributeError, OSError):
        api = None
    _layout["malloc"] = api
    return api


def topup_steps():
    """The steps that fault in the heap top TOPUP_BLOCKS blocks of the class topup_due saw
    would take, TOPUP_STEP a step; a helper runs a step only while no request waits
    (__main__). topup_due is False from here on (until a bigger class)."""
    cap = _state["topup"]
    _state["topped"] = max(cap, _state["topped"])
    return _topup(cap)


def _topup(cap: int):
    bapi, mapi = _bytes_layout(), _malloc_api()
    if bapi is None or mapi is None or not RESERVE:
        return
    new, sbrk, madvise, info = bapi[0], *mapi
    # where the top chunk starts (mallinfo2's keepcost: its size) before the blocks take it
    lo = (sbrk(0) - info().keepcost) & ~(_PAGE - 1)
    blocks = [new(None, cap) for _ in range(TOPUP_BLOCKS)] + [new(None, TOPUP_PAD)]
    hi = sbrk(0)
    del blocks
    from .sockopt import log
    log.debug("heap top-up: %d KiB for blocks of %d KiB", (hi - lo) >> 10, cap >> 10)
    while lo < hi:
        yield
        # (a trimmed top is not there to populate: madvise stops at the break)
        end = min(lo + TOPUP_STEP, hi, sbrk(0))
        if end <= lo or madvise(lo, end - lo, MADV_POPULATE_WRITE) != 0:
            return          # EINVAL before Linux 5.14
        lo = end
