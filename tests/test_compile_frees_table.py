"""A compiled table is freed when its last reference goes, without a GC pass.

The helper freezes what an install leaves (engine._collect_and_freeze) and runs a GC pass only
once the process has grown (engine.FULL_PASS_GROWTH): a reference cycle holding the replaced
table keeps its blobs (~5.5 MB at 10 000 rules) and objects until then, so the helper's heap
grows by that much per append and each command faults its buffers in anew. Measured through
the helper (the fan-out of bench/rulesets.py on INPUT, 10 000 rules): the heap grew 6-11 MB per
`iptables -A INPUT` (30.6 -> 108.3 MB in eight appends) while classify._tree's recursive
closure (`node`, which names itself) held its _ChainCompiler, and with it the table, in a
cycle; 22.3 -> 29.9 MB without it.
"""
from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from test_compile_kept import _clear  # noqa: E402
from test_compile_lazy import _first_append  # noqa: E402
from test_model_incremental import clear_caches  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import KernelFacts  # noqa: E402
from bpfilter_umh.model import AF_INET, decode_replace  # noqa: E402


def _spy(monkeypatch, name: str) -> list:
    calls = []
    real = getattr(classify, name)

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(classify, name, spy)
    return calls


@pytest.mark.parametrize("to_input,shared", [(True, "1"), (False, "1"), (True, "0")])
def test_compiled_table_goes_with_its_last_reference(monkeypatch, to_input, shared):
    """The fan-out decoded and compiled as the engine does (its hub's jump cases dispatched by
    classify._tree; without shared bodies, the functions' case ranges by _tree_ranges), then
    every reference dropped and the caches emptied, with the cyclic GC off: the table is gone
    at once."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    monkeypatch.setenv("BPFILTER_SHARED_BODIES", shared)
    trees = _spy(monkeypatch, "_tree" if shared == "1" else "_tree_ranges")
    facts = KernelFacts.fake()
    bufs = _first_append(to_input)
    clear_caches()
    _clear()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        t = decode_replace(bufs[0], AF_INET)[1]
        ct = C.compile_table(t, facts)
        assert ct.programs and trees, "the hub's cases were not dispatched by the tree tested"
        gone = weakref.ref(t)
        del t, ct
        clear_caches()
        _clear()
        assert gone() is None, "a reference cycle holds the compiled table"
    finally:
        if enabled:
            gc.enable()



def test_table_with_subprograms_goes_with_its_last_reference(monkeypatch):
    """The same for a table whose shared user chain is a subprogram (subprog_above=0:
    compile._nesting walks the subprograms' nesting, a recursion that was once a closure naming
    itself)."""
    from test_compile_util import ACCEPT, DROP, jump, rule, table
    nest = []
    real = C._nesting
    monkeypatch.setattr(C, "_nesting", lambda *a: nest.append(1) or real(*a))
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        t = table({"OUTPUT": (ACCEPT, [rule(jump("s"), proto=6), rule(jump("s"), proto=17)])},
                  {"s": [rule(DROP, src="192.0.2.9/32")]})
        ct = C.compile_table(t, KernelFacts.fake(), subprog_above=0)
        assert "subprogram: chain s" in ct.listing() and nest, "no subprogram was walked"
        gone = weakref.ref(t)
        del t, ct
        assert gone() is None, "a reference cycle holds the compiled table"
    finally:
        if enabled:
            gc.enable()
