#!/usr/bin/env python3
"""Coverage-guided fuzzing of the request handler (sockopt.Dispatcher.serve, what the kernel
shim's channel and the door's socket both call) with atheris/libFuzzer, on the real kernel, in a
network namespace of its own (unshare(CLONE_NEWNET): nothing else is touched).

    python3 tools/fuzz_request.py -runs=1000000

Each input is decoded (FuzzedDataProvider) into a request whose caller is this process: command,
direction, family, length, and a buffer that is raw bytes, a named header or a mutated replace
buffer of a real table. Checked per input, as tests/test_fuzz_request.py does in CI: the reply
is 0 or a known -errno and never EIO (an internal error), no byte outside [addr, addr + len) or
outside the counters array changed, a failed request changed no state. A successful replace is
undone (flush) so every input starts from the fresh table. Violations raise AssertionError,
which libFuzzer reports as a crash and saves the input.

Speed: the handler runs in this process (no socket, one Dispatcher and engine for the whole
run). What made the earlier run slow (~440 inputs/s) was the harness, not the handler: the
"failed request changed nothing" check encoded both families' tables before and after every
input (model.Table.encode, ~75% of the time). Here the state is compared by identity (same
table object, generation, counters base, state files) and the full encoding is compared
every FULL_CHECK_EVERY inputs and whenever the identity changed.
"""
import ctypes
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import atheris  # noqa: E402

with atheris.instrument_imports(include=["bpfilter_umh"]):
    from bpfilter_umh import sockopt  # noqa: E402
    from bpfilter_umh import model  # noqa: E402,F401  (instrumented: the decoder)
from bpfilter_umh.engine import Engine  # noqa: E402
import test_fuzz_request as H  # noqa: E402

KINDS = ["raw", "named", "replace", "counters", "entries", "unmapped"]
FULL_CHECK_EVERY = 64
_d = None
stats = {"inputs": 0}
_encoded = {}          # id(table) -> (table, its encoding): the table kept alive, ids not reused


def _encoding(t):
    hit = _encoded.get(id(t))
    if hit is None or hit[0] is not t:
        if len(_encoded) > 64:
            _encoded.clear()
        hit = _encoded[id(t)] = (t, t.encode())
    return hit[1]


def state_of(d, family: int):
    """What a failed request must not change: the backend's table (object and encoding), its
    generation, the add_counters base and the engine's state files (inode, mtime)."""
    be = d.backends.get((d.home_cookie, family))
    if be is None:
        return None
    eng = be.engine
    t = eng.table
    enc = _encoding(t)
    if stats["inputs"] % FULL_CHECK_EVERY == 0 and t.encode() != enc:
        # sampled: a change made in place since the encoding was cached (by any input since)
        raise AssertionError(f"family {family} table changed in place")
    return (enc, getattr(eng, "generation", None), list(eng.base), be._state_stamp())


H.state_of = state_of     # serve_one's "a failed request changed nothing" check, cheaper


def dispatcher():
    global _d
    if _d is None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) != 0:           # CLONE_NEWNET: a namespace of our own
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        _d = sockopt.Dispatcher()
    return _d


def request_of(data: bytes) -> dict:
    fdp = atheris.FuzzedDataProvider(data)
    pick = fdp.ConsumeIntInRange(0, 3)
    return dict(
        cmd=64 + fdp.ConsumeIntInRange(0, 5) if pick else fdp.ConsumeInt(4) & 0xFFFFFFFF,
        is_set=fdp.ConsumeIntInRange(0, 1) if pick else fdp.ConsumeInt(4) & 0xFFFFFFFF,
        family=(2, 10)[fdp.ConsumeIntInRange(0, 1)] if pick else fdp.ConsumeInt(4) & 0xFFFFFFFF,
        kind=KINDS[fdp.ConsumeIntInRange(0, len(KINDS) - 1)],
        extra_len=fdp.ConsumeIntInRange(-64, 4096) if pick else fdp.ConsumeInt(4),
        which=fdp.ConsumeIntInRange(0, 2),
        num_counters=fdp.ConsumeIntInRange(0, 8) if pick else fdp.ConsumeInt(4) & 0xFFFFFFFF,
        muts=[(fdp.ConsumeIntInRange(0, 10**6), fdp.ConsumeIntInRange(0, 255))
              for _ in range(fdp.ConsumeIntInRange(0, 4))],
        data=fdp.ConsumeBytes(512),
    )


def one_input(data: bytes):
    d = dispatcher()
    r = request_of(data)
    status, bad = H.serve_one(d, r)
    stats["inputs"] += 1
    if bad:
        raise AssertionError(f"{bad} for {r}")
    if status == 0 and r["is_set"]:
        # a replace or add_counters went through: back to the fresh table, so nothing is left
        # behind even if libFuzzer exits right after this input (it does not unwind Python)
        for fam in (2, 10):
            Engine.open(fam).flush()
        d.backends.clear()


def main():
    import logging
    logging.disable(logging.CRITICAL)     # refused requests log a warning each
    atheris.Setup(sys.argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        for fam in (2, 10):
            Engine.open(fam).flush()


if __name__ == "__main__":
    main()
