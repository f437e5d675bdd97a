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
_state = {"warmed": 0, "held": False, "kept_pins": 0}


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
