"""A program kept from an earlier compile and moved (compile._KeptProgram: an append moved the
chain's entries) assembles from the kept program's bytecode, encoded once, with the moved
counter keys and the install's map fds written in (issue #7: an append reloads the programs of
the chains it did not change). The bytes must be those of encoding every item: checked for
appends that move FORWARD's and OUTPUT's entries by one, then by more, with classified runs
(their maps' fds written in) and with global functions (the main part so placed), across
map fds of every width, and a moved program whose items were replaced (offload.py rewrites
counter keys) is encoded from its own items."""
import dataclasses
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402 - the Table restore sends

from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh import ebpf as E  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

EXTRA = "-A INPUT -s 203.0.113.{k}/32 -p udp -m udp --dport 4 -j DROP"


def _texts(shape: str, n: int, appends: int) -> list:
    base = rulesets.make(shape, n, seed=11).text
    out, extra = [base], ""
    for k in range(appends):
        extra += EXTRA.format(k=k + 1) + "\n"
        out.append(base.replace("COMMIT", extra + "COMMIT"))
    return out


@pytest.mark.parametrize("shape,n", [("blocklist", 10), ("mixed", 400), ("ports", 300),
                                     ("fanout", 1500)])
def test_moved_programs_assemble_as_their_items(shape, n, monkeypatch):
    """(the fan-out's FORWARD has global functions: its main part is placed from the kept
    bytecode, the functions from their templates')"""
    from bpfilter_umh import classify
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    C._PROG_CACHE.clear()
    moved = 0
    for text in _texts(shape, n, 3):
        for cp in compile_table(decoded(text), facts).programs:
            names = sorted({m.name for m in cp.maps} | {COUNTERS_MAP})
            for fds in ({nm: 3 + k for k, nm in enumerate(names)},
                        {nm: 0x7fffffff - k for k, nm in enumerate(names)}):
                assert cp.assemble(fds) == E.assemble(cp.items, fds, facts.kfunc_ids)
            if isinstance(cp, C._KeptProgram) and cp.__dict__["_kept"][2]:
                moved += 1
                assert "_code" in cp.__dict__["_kept"][0].__dict__, "not the kept bytecode"
    assert moved >= 3      # FORWARD (and OUTPUT) moved by each append


def test_replaced_items_are_encoded_from_themselves():
    facts = KernelFacts.fake()
    C._PROG_CACHE.clear()
    texts = _texts("blocklist", 10, 1)
    compile_table(decoded(texts[0]), facts)
    cp = next(p for p in compile_table(decoded(texts[1]), facts).programs
              if isinstance(p, C._KeptProgram) and p.__dict__["_kept"][2])
    fds = {COUNTERS_MAP: 5, **{m.name: 6 for m in cp.maps}}
    # counter keys rewritten as offload.py does (_dense_counter_keys)
    cp.items = [dataclasses.replace(it, imm=7) if isinstance(it, E.Insn) and
                it.comment.startswith("count entry") else it for it in cp.items]
    assert cp.items != cp.__dict__["_main"]
    assert cp.assemble(fds) == E.assemble(cp.items, fds, facts.kfunc_ids)


def test_kept_bytecode_encoded_after_the_install(monkeypatch):
    """compile.encode_kept, which a helper runs once an install's reply is out (engine
    _after_install): the programs kept from a restore have their bytecode, so the first
    append's moved programs (the fan-out's FORWARD, with global functions) only patch it; and
    the bytes are still those of encoding every item."""
    from bpfilter_umh import classify, engine
    from nsutil import Netns
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    C._PROG_CACHE.clear()
    texts = _texts("fanout", 1500, 1)
    tables = [decoded(t) for t in texts]
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    with Netns("kce") as ns, ns.inside():
        eng = engine.Engine.open()
        try:
            eng.install(tables[0])
            kept = [cp.__dict__["_kept_copy"] for ct in eng._compiled_tables
                    for cp in ct.programs]
            assert kept and not any("_code" in k.__dict__ for k in kept)
            engine.run_after_reply()
            memos = [k.__dict__.get("_code") for k in kept]
            assert all(m is not None for m in memos)
            assert any(k.fn_parts for k in kept)
            eng.install(tables[1])
            moved = [cp for ct in eng._compiled_tables for cp in ct.programs
                     if isinstance(cp, C._KeptProgram) and cp.__dict__["_kept"][2]]
            assert moved
            for cp in moved:        # patched from the memo made after the restore, not anew
                assert any(cp.__dict__["_kept"][0].__dict__["_code"] is m for m in memos)
            engine.run_after_reply()
        finally:
            eng.flush()
            eng.close()
    facts = eng._compiled_tables[0].programs[0].facts
    for cp in moved:
        fds = {COUNTERS_MAP: 3, **{m.name: 4 for m in cp.maps}}
        assert cp.assemble(fds) == E.assemble(cp.items, fds, facts.kfunc_ids if facts else {})
