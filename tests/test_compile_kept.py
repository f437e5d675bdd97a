"""Programs kept across compiles (compile._PROG_CACHE, issue #7: one append on a 10 000-rule
table compiles what changed): a table compiled after another, taking the programs of built-in
chains whose entries did not change (counter keys and `where` offsets moved), gives the very
bytes, `where` texts and map contents a compile with empty caches gives, across edits: a rule
appended to INPUT, one inserted at its top, one deleted, a rule changed inside INPUT's run, a
policy change, a rule appended to a service chain FORWARD reaches, and a new chain between the
service chains (every entry FORWARD names moves, not all by the same amount: compiled afresh).
"""
import dataclasses
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh import ebpf as E  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def _clear():
    C._PROG_CACHE.clear()
    C._CHAIN_FACTS.clear()
    classify._FN_CACHE.clear()
    classify._CASE_INFO.clear()
    classify._KEPT_FOR.clear()


def _programs(table, facts):
    """{chain: (bytecode, func_btf, sorted where texts, listing)} of every program, the bytecode
    checked against encoding every item."""
    out = {}
    for cp in compile_table(table, facts).programs:
        fds = {COUNTERS_MAP: 3, **{m.name: 4 + k for k, m in enumerate(cp.maps)}}
        code = cp.assemble(fds)
        assert code == E.assemble(cp.items, fds, facts.kfunc_ids), cp.chain
        if cp.global_labels:
            funcs = [(0, cp.name, False)] + [(slot, label, label in cp.global_labels)
                                              for slot, label in E.subprogram_starts(cp.items)]
            assert cp.func_btf() == E.func_btf(classify.FRAME_LO - 16, funcs), cp.chain
        # (function names in the BTF are label names: a function's are its template's own)
        out[cp.chain] = (code, [m.entries for m in cp.maps], sorted(cp.where.values()),
                         isinstance(cp, C._KeptProgram))
        cp.listing()
    return out


def _texts():
    block = rulesets.make("blocklist", 400, seed=3).text
    fan = rulesets.make("fanout", 1200, seed=5).text
    # one table: INPUT's blocklist, FORWARD's fan-out (the chains of both, one COMMIT)
    b_lines = [ln for ln in block.splitlines() if ln.startswith("-A ")]
    f_head = [ln for ln in fan.splitlines() if ln.startswith(":")]
    f_lines = [ln for ln in fan.splitlines() if ln.startswith("-A ")]
    base = "\n".join(["*filter"] + [h for h in f_head] + b_lines + f_lines + ["COMMIT", ""])
    svc = [ln for ln in f_lines if ln.startswith("-A SVC-7 ")]
    extra = "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"
    return base, [
        ("append to INPUT", base.replace("COMMIT", extra + "\nCOMMIT")),
        ("insert at INPUT's top", base.replace(b_lines[0], extra + "\n" + b_lines[0])),
        ("delete from INPUT", base.replace(b_lines[len(b_lines) // 2] + "\n", "")),
        ("change inside INPUT's run", base.replace(
            b_lines[7], b_lines[7].rsplit(" -j ", 1)[0] + " -j " +
            ("ACCEPT" if b_lines[7].endswith("DROP") else "DROP"))),
        ("INPUT policy", base.replace(":INPUT ACCEPT", ":INPUT DROP")),
        ("append to a service chain", base.replace(svc[-1], svc[-1] + "\n" + extra.replace(
            "-A INPUT", "-A SVC-7"))),
        ("a chain between the service chains", base.replace(
            ":SVC-1 ", ":SVC-0A - [0:0]\n:SVC-1 ").replace(
            "COMMIT", "-A SVC-0A -j DROP\nCOMMIT")),
    ]


def test_kept_programs_equal_a_cold_compile(monkeypatch):
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)     # FORWARD's cases as global functions
    facts = KernelFacts.fake()
    base, variants = _texts()
    base_t = decoded(base)
    _clear()
    _programs(base_t, facts)
    for what, text in variants:
        t = decoded(text)
        before = C.PROG_STATS["reused"]
        warm = _programs(t, facts)
        reused = C.PROG_STATS["reused"] - before
        _clear()
        cold = _programs(t, facts)
        for chain in cold:
            assert warm[chain][:2] == cold[chain][:2], f"{what}: {chain}"
            if warm[chain][3]:
                assert warm[chain][2] == cold[chain][2], f"{what}: {chain}"
            else:       # functions reused from _FN_CACHE describe only what their labels name
                assert set(warm[chain][2]) <= set(cold[chain][2]), f"{what}: {chain}"
        if what.endswith("INPUT") or "INPUT's" in what or what == "INPUT policy":
            assert reused >= 2, f"{what}: FORWARD and OUTPUT are kept, {reused} reused"
        _clear()
        _programs(base_t, facts)             # the next variant starts from the base again


def test_kept_program_is_not_the_callers(monkeypatch):
    """The kept copy does not change when the caller edits the program it was given (offload.py
    rewrites items); a kept program copied with dataclasses.replace assembles the same."""
    facts = KernelFacts.fake()
    base, variants = _texts()
    _clear()
    t = decoded(base)
    first = {cp.chain: cp for cp in compile_table(t, facts).programs}
    want = first["FORWARD"].assemble({COUNTERS_MAP: 3, **{m.name: 4 for m in
                                                          first["FORWARD"].maps}})
    first["FORWARD"].items[:] = []
    t2 = decoded(variants[0][1])
    again = {cp.chain: cp for cp in compile_table(t2, facts).programs}["FORWARD"]
    got = again.assemble({COUNTERS_MAP: 3, **{m.name: 4 for m in again.maps}})
    assert isinstance(again, C._KeptProgram)
    copy = dataclasses.replace(again)            # as extend.stub_program copies programs
    assert copy.assemble({COUNTERS_MAP: 3, **{m.name: 4 for m in copy.maps}}) == got
    assert copy.listing() and again.listing().startswith("; program FORWARD")
    _clear()
    cold = {cp.chain: cp for cp in compile_table(t2, facts).programs}["FORWARD"]
    assert got == cold.assemble({COUNTERS_MAP: 3, **{m.name: 4 for m in cold.maps}})
    assert len(want) == len(got)


def _mixed_texts():
    """A 1200-rule mixed table on FORWARD (one split multi run) and its edits."""
    base = rulesets.make("mixed", 1200, seed=13).text
    lines = [ln for ln in base.splitlines() if ln.startswith("-A FORWARD ")]
    mid = lines[len(lines) // 2]
    flip = mid.rsplit(" -j ", 1)[0] + " -j " + ("ACCEPT" if mid.endswith("DROP") else "DROP")
    same = "-A FORWARD -d 198.51.100.0/24 -j DROP"           # a shape the run has
    new = "-A FORWARD -s 203.0.113.9/32 -p udp -m udp --dport 4 -j DROP"   # one it has not
    return base, [
        ("append of a rule of a shape of the run", base.replace("COMMIT", same + "\nCOMMIT")),
        ("append of a rule of a new shape", base.replace("COMMIT", new + "\nCOMMIT")),
        ("two appends", base.replace("COMMIT", same + "\n" + new + "\nCOMMIT")),
        ("insert at the top", base.replace(lines[0], new + "\n" + lines[0])),
        ("delete in the run", base.replace(mid + "\n", "")),
        ("change inside the run", base.replace(mid, flip)),
    ]


def _clear_all():
    _clear()
    classify._RUN_SPECS.clear()
    classify._VECS.clear()


def test_kept_split_run_equals_a_cold_compile(monkeypatch):
    """An edit of a table whose chain is one split multi run (bench/rulesets.py mixed): the
    warm compile (the run's form and l4 protocols kept with its maps, _cached_multi_specs; its
    shapes from the chain's lists, _split_shapes_vec) gives the bytes and map contents of a
    compile with every cache empty but _SEEN_RUNS (which decides where the run ends), and of
    one asking every rule (vectors off); an append asks no rule its shape."""
    facts = KernelFacts.fake()
    base, variants = _mixed_texts()
    base_t = decoded(base)
    calls = []
    for fn in ("_split_shapes", "_split_shapes_vec"):
        real = getattr(classify, fn)
        monkeypatch.setattr(classify, fn, lambda *a, _real=real, _fn=fn: (
            calls.append(_fn), _real(*a))[1])
    _clear_all()
    classify._SEEN_RUNS.clear()
    _programs(base_t, facts)
    for what, text in variants:
        t = decoded(text)
        seen = dict(classify._SEEN_RUNS)
        del calls[:]
        warm = _programs(t, facts)
        if what.startswith("append") or what == "two appends":
            assert calls == [], f"{what}: the run's shapes were computed again ({calls})"
        runs = classify.find_runs(t.chain("FORWARD").rules)
        assert runs and runs[0].kind == "multi" and classify._run_form(runs[0])[0] == "split"
        _clear_all()
        classify._SEEN_RUNS.clear()
        classify._SEEN_RUNS.update(seen)
        cold = _programs(t, facts)
        _clear_all()
        classify._SEEN_RUNS.clear()
        classify._SEEN_RUNS.update(seen)
        with monkeypatch.context() as m:
            m.setattr(classify, "VEC_MIN", 1 << 30)
            slow = _programs(t, facts)
        for chain in cold:
            assert warm[chain][:2] == cold[chain][:2], f"{what}: {chain}"
            assert slow[chain][:2] == cold[chain][:2], f"{what}: {chain}"
        _clear_all()
        classify._SEEN_RUNS.clear()
        _programs(base_t, facts)             # the next variant starts from the base again


def test_changed_long_chain_memos_and_run_keys(monkeypatch):
    """An append to a long chain (INPUT, >= classify.VEC_MIN rules): _program_key's lookups of
    its facts and reads miss and it computes them without looking again (missed=True); what it
    memoizes is what a lookup-first call computes from empty memos. Its runs carry the keys
    _keep_seen_runs took from the chain's vectors, and _run_key reads the same key from them
    as from the run's rules."""
    facts = KernelFacts.fake()
    base, variants = _texts()
    _clear()
    compile_table(decoded(base), facts)
    t = decoded(dict(variants)["append to INPUT"])
    compile_table(t, facts)
    chain = t.chain("INPUT")
    rules, pe = chain.rules, chain.policy_entry
    assert len(rules) >= classify.VEC_MIN
    keys = tuple(r.cache_key for r in rules)
    fk = (keys, pe.cache_key)
    assert fk in C._CHAIN_FACTS and fk in C._SCAN_FACTS, "the append's memos not kept"
    got_facts, got_reads = C._CHAIN_FACTS[fk], C._SCAN_FACTS[fk]
    C._CHAIN_FACTS.clear()
    C._SCAN_FACTS.clear()
    assert C._chain_facts(rules, pe, keys) == got_facts
    assert C._chain_reads(rules, pe, fk) == got_reads
    runs = [r for r in classify.find_runs(rules) if getattr(r, "keys", None)]
    assert runs
    for run in runs:
        assert run.keys == tuple(r.cache_key for r in run.rules)
        from_vec = classify._run_key(run, "INPUT")
        del run.keys
        assert from_vec is not None and from_vec == classify._run_key(run, "INPUT")
