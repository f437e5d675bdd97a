"""Control plane at 10 000 rules (issue #7 item 2): what makes SET_REPLACE cheap must not change
what it installs.

  - jump cases as BPF global functions + counting through one subprogram: the kube-proxy fan-out
    loads in a fraction of the inlined program's time and gives the same verdicts and counters
    as the inlined program for the same packets (BPF_PROG_TEST_RUN, real kernel);
  - the decode cache: a table decoded with a warm cache equals the same table decoded cold, also
    when a rule inserted at the top moved every entry and every jump behind it;
  - the state file's blob patched from the caller's entries is byte-identical to encode();
  - counters read with BPF_MAP_LOOKUP_BATCH equal the per-entry read;
  - an unchanged classified run keeps its map across an install (same map id).
The kernel-vs-bpfilter differential of these paths at 10 000 rules is tests/test_differential_large.py
(its fan-out ruleset is compiled with global functions: checked here).
"""
import contextlib
import copy
import os
import struct
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import kernel_xt as kx  # noqa: E402
import lab  # noqa: E402
import rulesets  # noqa: E402
from nsutil import Netns  # noqa: E402

from bpfilter_umh import classify, engine, faults, model  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, COUNT_SUB, KernelFacts, compile_table  # noqa: E402
from bpfilter_umh.model import AF_INET, Table, decode_replace  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

EXTRA = "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"


def to_input(text: str) -> str:
    return text.replace("-A FORWARD ", "-A INPUT ")


def kernel_blob(text: str):
    """(getinfo, entries blob) iptables-legacy-restore makes of `text` (the kernel as parser)."""
    with Netns("cs") as ns:
        lab.restore(ns, text)
        with ns.inside():
            return kx.snapshot(AF_INET)


def replace_buf(info, blob) -> bytes:
    return kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                             list(info.hook_entry), list(info.underflow), 4, 0, blob)


def decoded(text: str) -> Table:
    info, blob = kernel_blob(text)
    return decode_replace(replace_buf(info, blob), AF_INET)[1]


@contextlib.contextmanager
def netns_engine(name: str):
    """An IPv4 Engine in a throwaway namespace; flushed, closed and its faults disarmed after."""
    with Netns(name) as ns, ns.inside():
        e = engine.Engine.open(AF_INET)
        try:
            yield e
        finally:
            faults.disarm()
            e.flush()
            e.close()


# ---- global functions ---------------------------------------------------------------------------

def _frame(src, dst, sport, dport):
    from test_compile_util import ether, ipv4, tcp_hdr
    return ether(ipv4(src, dst, 6, tcp_hdr(sport, dport)))


def _load(cp):
    cnt = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 1 << 14, name="bpfilter_cnt")
    extra = engine.create_maps(cp)
    code = cp.assemble({COUNTERS_MAP: cnt.fd, **{k: m.fd for k, m in extra.items()}})
    t0 = time.monotonic()
    btf = cp.func_btf()
    prog = engine.load_with_func_info(cp, code, *btf) if btf else \
        K.Prog.load(cp.prog_type, code, license=cp.license, name=cp.name,
                    expected_attach_type=cp.expected_attach_type)
    took = time.monotonic() - t0
    for m in extra.values():
        m.close()
    return prog, cnt, took


def _run_each(programs, packets, entries: int, tag: str) -> list:
    """[(verdicts, counters)] of each compiled program over the same packets, each loaded with
    its own counters map (BPF_PROG_TEST_RUN on the real kernel, in a throwaway namespace; nf
    programs at LOCAL_IN, tc and xdp ones on the frame alone)."""
    results = []
    with Netns(tag) as ns, ns.inside():
        for cp in programs:
            prog, cnt, took = _load(cp)
            ctx = bytes([1, 2]) + bytes(6) if cp.flavor == "nf" else None
            try:
                verdicts = [prog.test_run(f, ctx)[0] for f in packets]
                counts = engine.Engine._read(cnt, entries, [])
            finally:
                prog.close()
                cnt.close()
            results.append((verdicts, counts))
            print(f"program {len(results)}: load {took:.2f} s")
    return results


def test_fanout_global_functions_match_inlined(monkeypatch):
    """1000 services: the global-function build (forced by a low threshold) and the inlined
    build give the same verdict and the same counters for packets hitting services, missing
    them, and from outside the allowed client prefix."""
    rs = rulesets.make("fanout", 3000, seed=3)
    table = decoded(to_input(rs.text))
    facts = KernelFacts.from_btf()
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    shared = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    assert shared.global_labels, "the fan-out run's chains do not share a body"
    monkeypatch.setenv("BPFILTER_SHARED_BODIES", "0")
    glob = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    assert len(glob.global_labels) > 1, "the fan-out run was not cut into global functions"
    assert any(getattr(i, "target", None) == COUNT_SUB for i in glob.items)
    monkeypatch.setenv("BPFILTER_GLOBAL_FUNCS", "0")
    inl = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    assert not inl.global_labels
    svc = [ln.split() for ln in rs.lines if ln.startswith("-A SVC ")]
    packets = []
    for k in (0, 1, 39, 40, 500, len(svc) - 1):
        vip, port = svc[k][3].split("/")[0], int(svc[k][9])
        packets += [_frame("192.0.2.5", vip, 1024, port),       # allowed client: ACCEPT
                    _frame("192.0.2.200", vip, 1024, port),     # other client: DROP
                    _frame("192.0.2.5", vip, 1024, port ^ 1)]   # no service: policy
    results = _run_each((shared, glob, inl), packets, table.num_entries, "cg")
    assert results[0] == results[2] and results[1] == results[2]
    assert 0 in results[0][0] and 1 in results[0][0]
    assert sum(1 for p, _ in results[0][1] if p) >= 6


@pytest.mark.parametrize("shared", ["1", "0"])
def test_fanout_returning_service_matches_inlined(monkeypatch, shared):
    """A service chain that RETURNs, and a later service rule with the same key jumping to
    another chain: the global function answers "a later jump case" (relative to its group's
    first case) and the caller dispatches it (shared bodies: the case map names the next rule,
    the next copy of the dispatch takes it); verdicts and counters equal the inlined program's,
    also when the functions were kept from the compile of the table before it."""
    monkeypatch.setenv("BPFILTER_SHARED_BODIES", shared)
    rs = rulesets.make("fanout", 3000, seed=3)
    svc = [ln for ln in rs.lines if ln.startswith("-A SVC ")]
    text = to_input(rs.text)
    base = decoded(text)
    text = text.replace("-A SVC-5 -j DROP", "-A SVC-5 -s 192.0.2.128/25 -j DROP")
    text = text.replace(svc[-1], svc[-1] + "\n" + svc[5].replace("-j SVC-5", "-j SVC-900"))
    table = decoded(text)
    facts = KernelFacts.from_btf()
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    classify._FN_CACHE.clear()
    compile_table(base, facts)
    before = classify.FN_STATS["reused"]
    glob = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    assert glob.global_labels and classify.FN_STATS["reused"] > before
    monkeypatch.setenv("BPFILTER_GLOBAL_FUNCS", "0")
    inl = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    vip, port = svc[5].split()[3].split("/")[0], int(svc[5].split()[9])
    packets = [_frame("192.0.2.5", vip, 1024, port),        # SVC-5 ACCEPTs
               _frame("192.0.2.200", vip, 1024, port),      # SVC-5 DROPs
               _frame("192.0.2.40", vip, 1024, port),       # SVC-5 RETURNs, SVC-900 DROPs
               _frame("192.0.2.7", vip, 1024, port)]        # SVC-5 ACCEPTs
    results = _run_each((glob, inl), packets, table.num_entries, "cr")
    assert results[0] == results[1]
    assert results[0][0] == [1, 0, 0, 1]
    dup = table.chain("SVC").rules[-1]
    assert results[0][1][dup.index][0] == 1, "the second rule with the key was not counted"


def test_fanout_10000_uses_global_functions_and_loads_fast(monkeypatch):
    """The differential suite's fan-out ruleset (10 000 rules, 3 333 service chains, all alike)
    is compiled as one shared body (classify._shared_cases: a program of a few hundred
    instructions), or, with shared bodies off, as groups of jump cases in global functions; the
    kernel loads either in seconds (inlined: 16 s measured, most of it do_misc_fixups patching
    one inlined counter lookup per rule)."""
    table = decoded(to_input(rulesets.make("fanout", 10000, seed=1).text))
    facts = KernelFacts.from_btf()
    shared = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    assert len(shared.global_labels) == 1
    assert sum(1 for it in shared.items if not isinstance(it, classify.Label)) < 2000
    monkeypatch.setenv("BPFILTER_SHARED_BODIES", "0")
    grouped = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    assert 2 <= len(grouped.global_labels) <= classify.GLOBAL_GROUPS
    with Netns("cf") as ns, ns.inside():
        for cp in (shared, grouped):
            prog, cnt, took = _load(cp)
            prog.close()
            cnt.close()
            print(f"fanout 10000: {len(cp.global_labels)} global functions, load {took:.2f} s")
            assert took < 8.0


def test_case_bodies_needing_the_packet_stay_inlined(monkeypatch):
    """A service chain that reads the packet beyond the parsed slots (--tcp-option walks the
    options through the flavor) cannot be a global function: the run stays inlined."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":SVC - [0:0]"] + [f":S{k} - [0:0]" for k in range(60)] + ["-A INPUT -j SVC"]
    lines += [f"-A SVC -d 10.96.0.{k + 1}/32 -p tcp -m tcp --dport 80 -j S{k}" for k in range(60)]
    lines += [f"-A S{k} -p tcp -m tcp --tcp-option 2 -j DROP" for k in range(60)]
    table = decoded("\n".join(lines + ["COMMIT", ""]))
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    cp = next(p for p in compile_table(table, KernelFacts.fake()).programs if p.chain == "INPUT")
    assert not cp.global_labels


# ---- decode cache, state blob, counters, map reuse ---------------------------------------------

def test_decode_cache_equals_cold_decode():
    """Warm-cache decodes of a table, of the same with one rule inserted at the top of INPUT
    (every offset and jump behind it moves) and with one appended, equal cold decodes."""
    text = to_input(rulesets.make("fanout", 600, seed=2).text)
    first = text.replace("-A INPUT -j SVC", "-A INPUT -s 198.51.100.9/32 -j DROP\n-A INPUT -j SVC")
    last = text.replace("COMMIT", EXTRA + "\nCOMMIT")
    bufs = [replace_buf(*kernel_blob(t)) for t in (text, first, last)]
    model._ENTRY_CACHE.clear()
    model._LAST_WALK.clear()
    warm = [decode_replace(b, AF_INET)[1] for b in bufs]
    assert len(model._ENTRY_CACHE) > 200      # equal entries (the SVC-k bodies) share one
    for b, w in zip(bufs, warm):
        model._ENTRY_CACHE.clear()
        model._LAST_WALK.clear()
        cold = decode_replace(b, AF_INET)[1]
        assert w == cold
        assert w.encode() == cold.encode()
        jumps = [(r.target.chain, r.target.entry) for c in w.chains for r in c.rules
                 if isinstance(r.target, model.Jump)]
        assert jumps == [(r.target.chain, r.target.entry) for c in cold.chains for r in c.rules
                         if isinstance(r.target, model.Jump)]


def test_state_blob_is_the_encoding():
    """engine._state_blob (the caller's entries, comefrom and counters patched) == encode()."""
    for shape in ("mixed", "fanout"):
        t = decoded(to_input(rulesets.make(shape, 400, seed=4).text))
        assert t.source_blob is not None
        assert engine._state_blob(t) == t.encode()
        assert engine._hooks_of(t) == (t.hook_entry, t.underflow)


def test_batch_counters_equal_per_entry_reads():
    with Netns("cb") as ns, ns.inside():
        m = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 300, name="bpfilter_cnt")
        try:
            ncpu = K.possible_cpus()
            for i in range(0, 300, 7):
                m.update(i, b"".join(struct.pack("<QQ", i + c, 1000 * i + c) for c in range(ncpu)))
            got = engine._map_counts(m, 300)
            batch = [(0, 0)] * 300
            for i, c in (got.items() if isinstance(got, dict) else enumerate(got)):
                batch[i] = c
            slow = []
            for i in range(300):
                vals = [struct.unpack("<QQ", v) for v in m.lookup_percpu(i)]
                slow.append((sum(p for p, _ in vals), sum(b for _, b in vals)))
            assert batch == slow
        finally:
            m.close()


def test_unchanged_run_keeps_its_map():
    """An append after a 2000-rule blocklist: the run's LPM map is the one already installed
    (same map id in both programs); the new rule is counted and the old ones still are."""
    text = to_input(rulesets.make("blocklist", 2000, seed=5).text)
    a = decoded(text)
    b = decoded(text.replace("COMMIT", EXTRA + "\nCOMMIT"))
    with Netns("cm") as ns, ns.inside():
        eng = engine.Engine.open(AF_INET)
        try:
            ids = []
            for t in (a, b):
                eng.install(t)
                progs = eng._installed_programs()
                try:
                    ids.append(set(progs[1].info()["map_ids"]))
                finally:
                    for p in progs.values():
                        p.close()
            names = {i: K.Map.from_id(i) for i in ids[0] & ids[1]}
            try:
                assert any(m.name == "bpfilter_lpm" for m in names.values()), \
                    "the classified run's map was not reused"
            finally:
                for m in names.values():
                    m.close()
        finally:
            eng.flush()


def test_walk_reuse_equals_cold_decode():
    """Decoding a sequence of edits of one table, each walk reusing the previous table's entries
    (model._LAST_WALK: the unchanged head, and the tail moved by the change with its jumps
    re-read), gives what a cold decode gives: append, insert at the top, a jump deleted in the
    middle, a service chain's rule changed. A broken entry in the middle of an otherwise
    unchanged table is refused with the cold decode's errno, and the next good table still
    decodes right."""
    base = to_input(rulesets.make("fanout", 600, seed=6).text)
    svc = [ln for ln in base.splitlines() if ln.startswith("-A SVC ")]
    body = next(ln for ln in base.splitlines() if ln.startswith("-A SVC-") and "-j" in ln)
    texts = [base,
             base.replace("COMMIT", EXTRA + "\nCOMMIT"),
             base.replace("-A INPUT -j SVC", "-A INPUT -s 198.51.100.9/32 -j DROP\n-A INPUT -j SVC"),
             base.replace(svc[len(svc) // 2] + "\n", ""),
             base.replace(body, body.replace(" -j ", " -p udp -j ", 1))]
    bufs = [replace_buf(*kernel_blob(t)) for t in texts]

    def cold(b):
        model._ENTRY_CACHE.clear()
        model._LAST_WALK.clear()
        return decode_replace(b, AF_INET)[1]

    expect = [cold(b) for b in bufs]
    model._ENTRY_CACHE.clear()
    model._LAST_WALK.clear()
    for b, want in zip(bufs + bufs[::-1], expect + expect[::-1]):
        got = decode_replace(b, AF_INET)[1]
        assert got == want
        assert got.encode() == want.encode()
        assert [(r.comefrom, r.offset, r.index) for r in got.entries()] == \
            [(r.comefrom, r.offset, r.index) for r in want.entries()]
        assert [(r.target.chain, r.target.entry) for c in got.chains for r in c.rules
                if isinstance(r.target, model.Jump)] == \
            [(r.target.chain, r.target.entry) for c in want.chains for r in c.rules
             if isinstance(r.target, model.Jump)]
    # a jump in the middle of SVC aimed between two entries: ELOOP/EINVAL as cold
    hdr_len = len(replace_buf(*kernel_blob(base))) - len(kernel_blob(base)[1])
    t = expect[0]
    jump = next(r for r in t.chain("SVC").rules[len(svc) // 2:] if isinstance(r.target, model.Jump))
    bad = bytearray(bufs[0])
    at = hdr_len + jump.offset
    toff = struct.unpack_from("<H", bad, at + model._VOLATILE[AF_INET][0] - 4)[0]
    v = at + toff + 32
    struct.pack_into("<i", bad, v, struct.unpack_from("<i", bad, v)[0] + 8)
    errs = []
    for warm in (True, False):
        if warm:
            decode_replace(bufs[0], AF_INET)
        else:
            model._ENTRY_CACHE.clear()
            model._LAST_WALK.clear()
        with pytest.raises(model.BpfilterError) as e:
            decode_replace(bytes(bad), AF_INET)
        errs.append(e.value.errno)
    assert errs[0] == errs[1]
    assert decode_replace(bufs[1], AF_INET)[1] == expect[1]
    # the same entries with other comefrom and counters (iptables-restore sends comefrom 0,
    # libiptc what GET_ENTRIES showed): reused, carrying the new values (raw decode shows them)
    cf, cnt, _ = model._VOLATILE[AF_INET]
    other = bytearray(bufs[1])
    for k, r in enumerate(expect[1].entries()):
        struct.pack_into("<IQQ", other, hdr_len + r.offset + cf, 0, k, 7 * k)
    other = bytes(other)
    raw = lambda b: model.Table.decode(  # noqa: E731
        b[hdr_len:], AF_INET, t.hook_entry if b is bufs[0] else expect[1].hook_entry,
        expect[1].underflow if b is not bufs[0] else t.underflow, t.valid_hooks)
    warm = [decode_replace(b, AF_INET)[1] for b in (bufs[1], other)][1]
    warm_raw = [raw(b) for b in (bufs[1], other)][1]
    assert warm == cold(other)
    model._ENTRY_CACHE.clear()
    model._LAST_WALK.clear()
    cold_raw = raw(other)
    assert [(r.comefrom, r.counters) for r in warm_raw.entries()] == \
        [(r.comefrom, r.counters) for r in cold_raw.entries()] == \
        [(0, (k, 7 * k)) for k in range(len(cold_raw.entries()))]
    # decode_replace's table is read-only (its rules are shared with the next decode's): an
    # ip header edited in a copy does not leak into the next decode of the same entries
    got = copy.deepcopy(decode_replace(bufs[1], AF_INET)[1])
    got.chain("INPUT").rules[0].ip.proto = 99
    assert decode_replace(bufs[1], AF_INET)[1] == expect[1]


def test_walk_reuse_ipv6():
    """The same reuse on ip6t_entry (other comefrom/counters offsets, 4 padding bytes): a user
    chain behind the changed rule, jumps into it, an append and an insert, warm == cold."""
    from bpfilter_umh.model import AF_INET6
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":U - [0:0]"]
    lines += [f"-A INPUT -s 2001:db8:{k:x}::/48 -j U" for k in range(40)]
    lines += [f"-A U -p tcp -m tcp --dport {k} -j DROP" for k in range(1, 30)]
    base = "\n".join(lines + ["COMMIT", ""])
    texts = [base, base.replace("COMMIT", "-A INPUT -d 2001:db8::1/128 -j DROP\nCOMMIT"),
             base.replace("-A INPUT -s 2001:db8:0::/48 -j U",
                          "-A INPUT -p udp -j DROP\n-A INPUT -s 2001:db8:0::/48 -j U")]
    bufs = []
    for t in texts:
        with Netns("c6") as ns:
            ns.run(["ip6tables-legacy-restore"], input=t)
            with ns.inside():
                info, blob = kx.snapshot(AF_INET6)
        bufs.append(replace_buf(info, blob))

    def cold(b):
        model._ENTRY_CACHE.clear()
        model._LAST_WALK.clear()
        return decode_replace(b, AF_INET6)[1]

    expect = [cold(b) for b in bufs]
    model._LAST_WALK.clear()
    for b, want in zip(bufs + bufs[::-1], expect + expect[::-1]):
        got = decode_replace(b, AF_INET6)[1]
        assert got == want and got.encode() == want.encode()
        assert [(r.comefrom, r.offset) for r in got.entries()] == \
            [(r.comefrom, r.offset) for r in want.entries()]


# ---- global functions kept across compiles ------------------------------------------------------

def _code(table, facts):
    """INPUT's bytecode, placed from the functions' kept bytecode (CompiledProgram.assemble),
    checked against encoding every item, and the same for its BTF func_info."""
    from bpfilter_umh import ebpf as E
    cp = next(p for p in compile_table(table, facts).programs if p.chain == "INPUT")
    fds = {COUNTERS_MAP: 3, **{m.name: 4 for m in cp.maps}}
    code = cp.assemble(fds)
    assert code == E.assemble(cp.items, fds, facts.kfunc_ids)
    funcs = [(0, cp.name, False)] + [(slot, label, label in cp.global_labels)
                                      for slot, label in E.subprogram_starts(cp.items)]
    assert cp.func_btf() == E.func_btf(classify.FRAME_LO - 16, funcs)
    return code, cp


@pytest.mark.parametrize("shared", ["1", "0"])
def test_kept_global_functions_equal_a_cold_compile(monkeypatch, shared):
    """A table compiled after another, taking the functions whose cases did not change from the
    first compile (classify._FN_CACHE: counter keys moved, labels their own, bytecode placed and
    patched), assembles to the very bytes a compile with empty caches gives: for a rule appended
    to INPUT, one inserted at its top (every entry behind it moves), a rule appended to a service
    chain, a service added at the end and one deleted in the middle, and a second service rule
    with the same key as an earlier one (its case answers "a later jump case"). Most functions
    are reused. With shared bodies (the service chains are alike) as without."""
    monkeypatch.setenv("BPFILTER_SHARED_BODIES", shared)
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    base = to_input(rulesets.make("fanout", 3000, seed=7).text)
    svc = [ln for ln in base.splitlines() if ln.startswith("-A SVC ")]
    dup = svc[5].replace("-j SVC-5", "-j SVC-9")
    texts = [base,
             base.replace("COMMIT", EXTRA + "\nCOMMIT"),
             base.replace("-A INPUT -j SVC", "-A INPUT -s 198.51.100.9/32 -j DROP\n-A INPUT -j SVC"),
             base.replace("-A SVC-5 -j DROP", "-A SVC-5 -s 198.51.100.3/32 -j ACCEPT\n"
                                              "-A SVC-5 -j DROP"),
             base.replace(":SVC-0 - [0:0]", ":SVC-0 - [0:0]\n:SVC-NEW - [0:0]").replace(
                 "COMMIT", "-A SVC -d 10.200.0.1/32 -p tcp -m tcp --dport 81 -j SVC-NEW\n"
                           "-A SVC-NEW -j DROP\nCOMMIT"),
             base.replace(svc[len(svc) // 2] + "\n", ""),
             base.replace(svc[-1], svc[-1] + "\n" + dup)]
    tables = [decoded(t) for t in texts]
    classify._FN_CACHE.clear()
    classify._CASE_INFO.clear()
    _code(tables[0], facts)
    for k, t in enumerate(tables[1:], 1):
        before = dict(classify.FN_STATS)
        warm, cp = _code(t, facts)
        made = classify.FN_STATS["made"] - before["made"]
        reused = classify.FN_STATS["reused"] - before["reused"]
        # (a chain jumped to twice compiles INPUT twice)
        assert len(cp.global_labels) >= (1 if shared == "1" else 2)
        assert reused >= (made + reused) // 2, f"variant {k}: {made} made, {reused} reused"
        classify._FN_CACHE.clear()
        classify._CASE_INFO.clear()
        cold, _ = _code(t, facts)
        assert warm == cold, f"variant {k}"
        _code(tables[0], facts)            # the next variant starts from the base again


@pytest.mark.parametrize("shared", ["1", "0"])
def test_function_prune_is_ebpf_prune(monkeypatch, shared):
    """classify._prune_function (a walk over opcodes) keeps exactly what ebpf.prune keeps, for
    every function of a fan-out table (shared bodies or groups of cases)."""
    from bpfilter_umh import ebpf as E
    from bpfilter_umh.compile import COUNT_SUB
    monkeypatch.setenv("BPFILTER_SHARED_BODIES", shared)
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    fast, seen = classify._prune_function, []

    def both(items):
        got = fast(items)
        stub = [E.Label(COUNT_SUB), E.exit_()]
        want = E.prune(items + stub)
        assert got == (want[:-2] if want[-2:] == stub else want)
        seen.append(len(items) - len(got))
        return got
    monkeypatch.setattr(classify, "_prune_function", both)
    classify._FN_CACHE.clear()
    compile_table(decoded(to_input(rulesets.make("fanout", 1500, seed=8).text)),
                  KernelFacts.fake())
    # functions were pruned, and lost dead code
    assert len(seen) >= (1 if shared == "1" else 2) and sum(seen) > 0
