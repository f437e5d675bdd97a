"""extend.py on the real kernel (issue #7: an install verifying only the main program and the
global functions that changed): the fan-out program split into a main program with stub
functions and one program per function.

  - the stub main program loads and holds the same functions (as stubs) as the whole program;
  - every global function loads alone, verified as inside the whole program (a netfilter program
    passing a per-CPU map value as the frame: extend.standalone_items);
  - where the kernel and its security policy allow extension programs (extend.
    extensions_supported), stub + extensions give the whole program's verdicts and counters, and
    a second main program linked to the same extensions does too, also once the first one's
    links are gone; elsewhere the test says why it cannot run.
"""
import os
import sys
import time

import pytest

from test_cplane_scale import _frame, decoded, to_input  # noqa: E402
import rulesets  # noqa: E402
from nsutil import Netns  # noqa: E402

from bpfilter_umh import classify, ebpf as E, engine  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table  # noqa: E402

# the prototype lives beside its probe: the engine does not use it (extensions are refused here)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import extend  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

NF_CTX = bytes([1, 2]) + bytes(6)


@pytest.fixture(scope="module")
def fanout():
    rs = rulesets.make("fanout", 3000, seed=3)
    table = decoded(to_input(rs.text))
    saved = classify.GLOBAL_ABOVE
    classify.GLOBAL_ABOVE = 0
    try:
        cp = next(p for p in compile_table(table, KernelFacts.from_btf()).programs
                  if p.chain == "INPUT")
    finally:
        classify.GLOBAL_ABOVE = saved
    assert cp.global_labels
    svc = [ln.split() for ln in rs.lines if ln.startswith("-A SVC ")]
    packets = []
    for k in (0, 1, 39, 40, 500, len(svc) - 1):
        vip, port = svc[k][3].split("/")[0], int(svc[k][9])
        packets += [_frame("192.0.2.5", vip, 1024, port), _frame("192.0.2.200", vip, 1024, port),
                    _frame("192.0.2.5", vip, 1024, port ^ 1)]
    return table, cp, packets


def _load(cp, cnt):
    extra = engine.create_maps(cp)
    try:
        code = cp.assemble({COUNTERS_MAP: cnt.fd, **{k: m.fd for k, m in extra.items()}})
        t0 = time.perf_counter()
        prog = engine.load_with_func_info(cp, code, *cp.func_btf())
        return prog, time.perf_counter() - t0
    finally:
        for m in extra.values():
            m.close()


def _counters_map(table):
    return K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, table.num_entries, name="bpfilter_cnt")


def test_stub_program_loads(fanout):
    table, cp, _ = fanout
    stub = extend.stub_program(cp)
    main, funcs = extend._parts(cp)
    smain, sfuncs = extend._parts(stub)
    assert smain == main and [h for h, _ in sfuncs] == [h for h, _ in funcs]
    assert all(len([x for x in it if isinstance(x, E.Insn)]) == 2 for _, it in sfuncs)
    ids = extend.function_btf_ids(stub)
    assert sorted(ids.values()) == sorted(set(ids.values())) and len(ids) == len(funcs)
    with Netns("xs") as ns, ns.inside():
        cnt = _counters_map(table)
        try:
            whole, t_whole = _load(cp, cnt)
            prog, t_stub = _load(stub, cnt)
            whole.close()
            prog.close()
        finally:
            cnt.close()
    print(f"{len(funcs)} functions: whole load {t_whole * 1000:.1f} ms, stub main program "
          f"{t_stub * 1000:.1f} ms")


def test_each_function_loads_alone(fanout):
    table, cp, _ = fanout
    kf = cp.facts.kfunc_ids if cp.facts else {}

    class Cp:
        prog_type, license, name = K.BPF_PROG_TYPE_NETFILTER, "GPL", "bpfilter_fn"
        expected_attach_type = K.BPF_NETFILTER
    with Netns("xa") as ns, ns.inside():
        cnt = _counters_map(table)
        scratch = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, extend.SCRATCH_SIZE, 1,
                               name="bpfilter_scr")
        try:
            for i in range(extend.function_count(cp)):
                items, fl = extend.standalone_items(cp, i)
                code = E.assemble(items, {COUNTERS_MAP: cnt.fd, extend.SCRATCH_MAP: scratch.fd},
                                  kf)
                btf, info = E.func_btf(classify.FRAME_LO - 16, fl)
                engine.load_with_func_info(Cp, code, btf, info).close()
        finally:
            scratch.close()
            cnt.close()


def test_extensions_give_the_whole_programs_verdicts(fanout):
    table, cp, packets = fanout
    with Netns("xe") as ns, ns.inside():
        ok, why = extend.extensions_supported()
        if not ok:
            assert "refused" in why or "Operation not permitted" in why, why
            pytest.skip(f"extension programs are not available here: {why}")
        stub = extend.stub_program(cp)
        ids = extend.function_btf_ids(stub)
        heads = [h for h, _ in extend._parts(cp)[1]]
        cnt_w, cnt = _counters_map(table), _counters_map(table)
        objs = []
        try:
            whole, _ = _load(cp, cnt_w)
            objs.append(whole)
            want = [whole.test_run(p, NF_CTX)[0] for p in packets]
            want_c = engine.Engine._read(cnt_w, table.num_entries, [])
            main1, _ = _load(stub, cnt)
            main2, _ = _load(stub, cnt)
            objs += [main1, main2]
            links1 = []
            for i, h in enumerate(heads):
                code, btf, info = extend.extension_code(cp, i, {COUNTERS_MAP: cnt.fd})
                ext = extend.load_extension(code, btf, info, main1, ids[h])
                objs.append(ext)
                links1.append(extend.link_extension(ext))
                objs.append(extend.link_extension(ext, main2, ids[h]))
            assert [main1.test_run(p, NF_CTX)[0] for p in packets] == want
            assert engine.Engine._read(cnt, table.num_entries, []) == want_c
            for ln in links1:
                ln.close()
            assert [main2.test_run(p, NF_CTX)[0] for p in packets] == want
        finally:
            for o in reversed(objs):
                o.close()
            cnt_w.close()
            cnt.close()
