#!/usr/bin/env python3
"""Can an install verify only the main program and the global functions that changed? (issue #7)

A probe, not a test: on the running kernel, in throwaway network namespaces it creates and
removes, it measures what bpfilter_umh/extend.py's pieces cost:

  micro     BPF_PROG_TEST_RUN ns/packet of a netfilter program calling one global function that
            returns at once, the function plain vs replaced by an extension (freplace)
  fanout    the kube-proxy fan-out table (bench/rulesets.py fanout, --n rules, in INPUT as
            tests/test_cplane_scale.py does), compiled as the engine compiles it:
              whole     BPF_PROG_LOAD of today's program (main + ~100 global functions)
              stub      the main program with stub functions
              ext       each global function loaded as an extension of the stub program
              link      BPF_LINK_CREATE of each extension to the stub program
              relink    a second stub program (the next install), every extension linked to it
                        while still linked to the first one
              unlink    closing the first program's links (the old install going away)
            then verdicts and counters of the whole program and of stub + extensions for the
            same packets (must be equal), and ns/packet of both;
  append    the table plus one rule appended to INPUT (what `iptables -A` sends): how many of the
            functions' extension bytecode differs from the table before it, as compiled today
            (counter keys are absolute entry indices) and with the counter-key immediates set
            aside (what keys relative to a base passed by the caller would give).

    python3 tools/freplace_probe.py [--n 10000] [--repeat 3] [--packets 200000]
Needs root. Prints one line per measurement (ms unless said).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]
os.environ.setdefault("XTABLES_LOCKFILE", "/tmp/freplace_probe.xtables.lock")

import kernel_xt as kx  # noqa: E402
import lab  # noqa: E402
import rulesets  # noqa: E402
from nsutil import Netns  # noqa: E402

from bpfilter_umh import classify, engine  # noqa: E402
import extend  # noqa: E402  (beside this file)
from bpfilter_umh import ebpf as E  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, S_KEY, KernelFacts, compile_table  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402
from bpfilter_umh.model import AF_INET, decode_replace  # noqa: E402

NF_CTX = bytes([1, 2]) + bytes(6)        # hook NF_INET_LOCAL_IN, pf NFPROTO_IPV4
EXTRA = "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"


def ms(t):
    return f"{t * 1000:.2f}"


def _med(xs):
    return f"{ms(statistics.median(xs))} (min {ms(min(xs))}, max {ms(max(xs))}, n {len(xs)})"


def frame(src, dst, sport, dport):
    from test_compile_util import ether, ipv4, tcp_hdr
    return ether(ipv4(src, dst, 6, tcp_hdr(sport, dport)))


def table_of(text: str):
    with Netns("fp") as ns:
        lab.restore(ns, text)
        with ns.inside():
            info, blob = kx.snapshot(AF_INET)
    buf = kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                            list(info.hook_entry), list(info.underflow), 4, 0, blob)
    return decode_replace(buf, AF_INET)[1]


def load(cp, cnt):
    extra = engine.create_maps(cp)
    code = cp.assemble({COUNTERS_MAP: cnt.fd, **{k: m.fd for k, m in extra.items()}})
    t0 = time.perf_counter()
    prog = engine.load_with_func_info(cp, code, *cp.func_btf())
    took = time.perf_counter() - t0
    for m in extra.values():
        m.close()
    return prog, took


def ns_per_packet(prog, pkt, repeat):
    best = None
    for _ in range(3):
        ret, dur, _ = K.test_run(prog.fd, pkt, NF_CTX, repeat=repeat)
        best = dur if best is None else min(best, dur)
    return ret, best


# ---- micro -------------------------------------------------------------------------------------

def micro(repeat: int):
    frame_lo = classify.FRAME_LO
    main = [E.st(E.DW, E.FP, off, 0) for off in range(-frame_lo, -16, 8)]
    main += [E.mov(E.R1, E.FP), E.alu(E.ADD, E.R1, -frame_lo), E.mov(E.R2, 0),
             E.call_local("fn"), E.mov(E.R0, 1), E.exit_()]
    body = [E.Label("fn"), E.jmp(E.JEQ, E.R1, 0, "fn_out"), E.ldx(E.DW, E.R0, E.R1, 0),
            E.Label("fn_out"), E.mov(E.R0, 0), E.exit_()]
    items = main + body
    code = E.assemble(items)
    slot = E.subprogram_starts(items)[0][0]
    btf, info = E.func_btf(frame_lo - 16, [(0, "micro_main", False), (slot, "fn", True)])
    cp = types.SimpleNamespace(prog_type=K.BPF_PROG_TYPE_NETFILTER, license="GPL",
                               name="probe_micro", expected_attach_type=K.BPF_NETFILTER)
    pkt = frame("192.0.2.1", "198.51.100.1", 1024, 80)
    with Netns("fq") as ns, ns.inside():
        base = K.Prog.load(K.BPF_PROG_TYPE_NETFILTER, E.assemble([E.mov(E.R0, 1), E.exit_()]),
                           name="probe_accept", expected_attach_type=K.BPF_NETFILTER)
        print(f"micro: a program returning ACCEPT: {ns_per_packet(base, pkt, repeat)[1]} "
              f"ns/packet (the test run's own cost)")
        base.close()
        prog = engine.load_with_func_info(cp, code, btf, info)
        r_plain, plain = ns_per_packet(prog, pkt, repeat)
        ecode = E.assemble(body)
        ebtf, einfo = E.func_btf(frame_lo - 16, [(0, "fn", True)])
        try:
            t0 = time.perf_counter()
            ext = extend.load_extension(ecode, ebtf, einfo, prog, 6, "probe_ext")
            t1 = time.perf_counter()
            link = extend.link_extension(ext)
            t2 = time.perf_counter()
            r_ext, viaext = ns_per_packet(prog, pkt, repeat)
            print(f"micro: plain global function {plain} ns/packet (verdict {r_plain}); through an"
                  f" extension {viaext} ns/packet (verdict {r_ext}); extension load "
                  f"{ms(t1 - t0)} ms, link {ms(t2 - t1)} ms")
            link.close()
            ext.close()
        except BpfilterError as e:
            print(f"micro: plain global function {plain} ns/packet (verdict {r_plain}); "
                  f"extension refused: {e}")
        prog.close()
        tail_call_cost(pkt, repeat)


def tail_call_cost(pkt, repeat):
    """ns/packet of a netfilter program tail-calling one that returns ACCEPT, bare and with the
    frame slots moved through a per-CPU scratch value (what a tail-called group needs)."""
    frame_lo = classify.FRAME_LO
    nf = dict(expected_attach_type=K.BPF_NETFILTER)
    callee_bare = K.Prog.load(K.BPF_PROG_TYPE_NETFILTER, E.assemble([E.mov(E.R0, 1), E.exit_()]),
                              name="probe_callee", **nf)
    scratch = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, extend.SCRATCH_SIZE, 1,
                           name="probe_scratch")
    look = [E.st(E.W, E.FP, -4, 0), E.ld_map_fd(E.R1, "s"), E.mov(E.R2, E.FP),
            E.alu(E.ADD, E.R2, -4), E.call(E.BPF_FUNC_map_lookup_elem),
            E.jmp(E.JEQ, E.R0, 0, "out")]
    callee_scratch = K.Prog.load(K.BPF_PROG_TYPE_NETFILTER, E.assemble(
        look + [E.ldx(E.DW, E.R0, E.R0, 0), E.Label("out"), E.mov(E.R0, 1), E.exit_()],
        {"s": scratch.fd}), name="probe_callee_s", **nf)
    pa = K.Map.create(K.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 2, name="probe_pa")
    pa.update(0, callee_bare.fd)
    pa.update(1, callee_scratch.fd)
    out = []
    for slot, fill in ((0, False), (1, True)):
        items = [E.mov(E.R6, E.R1)]
        if fill:
            items += look + [E.mov(E.R1, 0)]
            items += [E.stx(E.DW, E.R0, off, E.R1) for off in range(0, frame_lo - 16, 8)]
            items += [E.Label("out")]
        items += [E.mov(E.R1, E.R6), E.ld_map_fd(E.R2, "pa"), E.mov(E.R3, slot),
                  E.call(12), E.mov(E.R0, 0), E.exit_()]
        caller = K.Prog.load(K.BPF_PROG_TYPE_NETFILTER,
                             E.assemble(items, {"pa": pa.fd, "s": scratch.fd}),
                             name="probe_tailer", **nf)
        r, d = ns_per_packet(caller, pkt, repeat)
        out.append(f"{d} ns/packet (verdict {r})")
        caller.close()
    print(f"micro: tail call {out[0]}; with the frame slots written to and read from a per-CPU "
          f"scratch value {out[1]}")
    for o in (callee_bare, callee_scratch, pa, scratch):
        o.close()


# ---- fanout ------------------------------------------------------------------------------------

def _ext_codes(cp, cnt_fd):
    return [extend.extension_code(cp, i, {COUNTERS_MAP: cnt_fd})
            for i in range(extend.function_count(cp))]


def _key_blind(code: bytes) -> bytes:
    """The bytecode with every `*(u32 *)(r + S_KEY) = imm` immediate zeroed."""
    out = bytearray(code)
    st_w = E.BPF_ST | E.BPF_MEM | E.W
    for p in range(0, len(out), 8):
        if out[p] == st_w and int.from_bytes(out[p + 2:p + 4], "little", signed=True) == S_KEY:
            out[p + 4:p + 8] = bytes(4)
    return bytes(out)


def fanout(n: int, repeat: int, packets: int):
    rs = rulesets.make("fanout", n, seed=1)
    text = rs.text.replace("-A FORWARD ", "-A INPUT ")
    lines = text.rstrip("\n").split("\n")
    at = max(i for i, ln in enumerate(lines) if ln.startswith("-A "))
    appended = "\n".join(lines[:at + 1] + [EXTRA] + lines[at + 1:]) + "\n"
    t0 = time.perf_counter()
    table, table2 = table_of(text), table_of(appended)
    print(f"fanout {n}: tables made by iptables-legacy-restore in {ms(time.perf_counter() - t0)}"
          f" ms ({table.num_entries} entries)")
    facts = KernelFacts.from_btf()
    t0 = time.perf_counter()
    cp = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    t1 = time.perf_counter()
    cp2 = next(p for p in compile_table(table2, facts).programs if p.chain == "INPUT")
    print(f"compile {ms(t1 - t0)} ms, the appended table {ms(time.perf_counter() - t1)} ms "
          f"(functions kept: {classify.FN_STATS})")
    nfun = extend.function_count(cp)
    stub = extend.stub_program(cp)
    main_items, funcs = extend._parts(cp)
    slots = lambda items: sum(x.slots for x in items if isinstance(x, E.Insn))  # noqa: E731
    fn_slots = [slots(it) for _, it in funcs]
    print(f"program: {slots(cp.items)} insns, main part {slots(main_items)}, {nfun} global "
          f"functions of {min(fn_slots)}..{max(fn_slots)} insns")
    svc = [ln.split() for ln in text.split("\n") if ln.startswith("-A SVC ")]
    pkts = []
    for k in (0, 1, 39, 40, len(svc) // 2, len(svc) - 1):
        vip, port = svc[k][3].split("/")[0], int(svc[k][9])
        pkts += [frame("192.0.2.5", vip, 1024, port), frame("192.0.2.200", vip, 1024, port),
                 frame("192.0.2.5", vip, 1024, port ^ 1)]
    with Netns("fr") as ns, ns.inside():
        mk = lambda: K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16,  # noqa: E731
                                  table.num_entries, name="bpfilter_cnt")
        for what, prog_of in (("whole program (today)", cp), ("stub main program", stub)):
            took = []
            for _ in range(repeat):
                cnt = mk()
                prog, t = load(prog_of, cnt)
                took.append(t)
                prog.close()
                cnt.close()
            print(f"{what} load: {_med(took)} ms")
        cnt = mk()
        try:
            standalone(cp, cnt, nfun)
            codes = _ext_codes(cp, cnt.fd)
            codes2 = _ext_codes(cp2, cnt.fd)
            same = sum(1 for a, b in zip(codes, codes2) if a == b)
            blind = sum(1 for a, b in zip(codes, codes2)
                        if _key_blind(a[0]) == _key_blind(b[0]) and a[1:] == b[1:])
            print(f"append one rule to INPUT: {len(codes2)} functions (before {len(codes)}), "
                  f"{same} byte-identical, {blind} identical but for counter-key immediates")
            main1, _ = load(stub, cnt)
            try:
                ids = extend.function_btf_ids(stub)
                code, btf, info = codes[0]
                extend.load_extension(code, btf, info, main1, ids[funcs[0][0]]).close()
            except BpfilterError as e:
                print(f"extensions (freplace) refused on this machine: {e}")
                return
            finally:
                main1.close()
            freplace(cp, cp2, stub, mk, cnt, pkts, table, packets)
        finally:
            cnt.close()


def standalone(cp, cnt, nfun):
    """Each global function loaded as a netfilter program of its own (a tail-call target): the
    load cost of only the functions an install changed."""
    scratch = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, extend.SCRATCH_SIZE, 1,
                           name="bpfilter_scr")
    fake = types.SimpleNamespace(prog_type=K.BPF_PROG_TYPE_NETFILTER, license="GPL",
                                 name="bpfilter_fn", expected_attach_type=K.BPF_NETFILTER)
    kf = cp.facts.kfunc_ids if cp.facts else {}
    took = []
    try:
        for i in range(nfun):
            items, fl = extend.standalone_items(cp, i)
            code = E.assemble(items, {COUNTERS_MAP: cnt.fd, extend.SCRATCH_MAP: scratch.fd}, kf)
            btf, info = E.func_btf(classify.FRAME_LO - 16, fl)
            t0 = time.perf_counter()
            engine.load_with_func_info(fake, code, btf, info).close()
            took.append(time.perf_counter() - t0)
    finally:
        scratch.close()
    print(f"each function as a program of its own: load each {_med(took)} ms, all {nfun} "
          f"{ms(sum(took))} ms")


def freplace(cp, cp2, stub, mk, cnt, pkts, table, packets):
    """Stub main program + every function as an extension: cost, equality with the whole
    program, a second main program linked to the same extensions."""
    _main_items, funcs = extend._parts(cp)
    heads = [h for h, _ in funcs]
    ids = extend.function_btf_ids(stub)
    nfun = len(heads)
    cnt_w = mk()
    whole, _ = load(cp, cnt_w)
    v_whole = [whole.test_run(p, NF_CTX)[0] for p in pkts]
    c_whole = engine.Engine._read(cnt_w, table.num_entries, [])
    main1, _ = load(stub, cnt)
    t0 = time.perf_counter()
    codes = _ext_codes(cp, cnt.fd)
    t_asm = time.perf_counter() - t0
    exts, ext_t = [], []
    for head, (code, btf, info) in zip(heads, codes):
        t0 = time.perf_counter()
        exts.append(extend.load_extension(code, btf, info, main1, ids[head]))
        ext_t.append(time.perf_counter() - t0)
    links1, link_t = [], []
    for ext in exts:
        t0 = time.perf_counter()
        links1.append(extend.link_extension(ext))
        link_t.append(time.perf_counter() - t0)
    print(f"extensions: assemble all {ms(t_asm)} ms; load each {_med(ext_t)} ms, all "
          f"{ms(sum(ext_t))} ms; link each {_med(link_t)} ms, all {ms(sum(link_t))} ms")
    v_ext = [main1.test_run(p, NF_CTX)[0] for p in pkts]
    c_ext = engine.Engine._read(cnt, table.num_entries, [])
    print(f"verdicts equal: {v_ext == v_whole} ({v_whole.count(1)} accept, "
          f"{v_whole.count(0)} drop of {len(pkts)}); counters equal: {c_ext == c_whole}")
    t0 = time.perf_counter()
    main2, took2 = load(stub, cnt)
    links2 = [extend.link_extension(ext, main2, ids[h]) for h, ext in zip(heads, exts)]
    print(f"next install, nothing changed: stub load {ms(took2)} ms, {nfun} links, "
          f"{ms(time.perf_counter() - t0)} ms wall")
    v1 = [main1.test_run(p, NF_CTX)[0] for p in pkts]
    v2 = [main2.test_run(p, NF_CTX)[0] for p in pkts]
    t0 = time.perf_counter()
    for ln in links1:
        ln.close()
    t_unlink = time.perf_counter() - t0
    main1.close()
    v2b = [main2.test_run(p, NF_CTX)[0] for p in pkts]
    print(f"both programs extended at once: {v1 == v2 == v_whole}; old links closed in "
          f"{ms(t_unlink)} ms, then: {v2b == v_whole}")
    for name, pk in (("service hit", pkts[12]), ("miss", pkts[5])):
        r1, d1 = ns_per_packet(whole, pk, packets)
        r2, d2 = ns_per_packet(main2, pk, packets)
        print(f"ns/packet {name}: whole {d1} (verdict {r1}), stub + extensions {d2} "
              f"(verdict {r2})")
    for ln in links2:
        ln.close()
    for p in exts + [main2, whole]:
        p.close()
    cnt_w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--packets", type=int, default=200000)
    ap.add_argument("--only", choices=("micro", "fanout"))
    a = ap.parse_args()
    print(f"kernel {os.uname().release}")
    if a.only in (None, "micro"):
        micro(a.packets)
    if a.only in (None, "fanout"):
        fanout(a.n, a.repeat, a.packets)


if __name__ == "__main__":
    main()
