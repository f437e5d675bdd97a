"""User chains compiled as BPF subprograms (bpf-to-bpf calls) instead of being inlined at every
call site: test-run verdicts and every entry's counters against the reference walk of
ipt_do_table in test_compile_model.py, a golden listing of a forced-subprogram table, the
verifier's limits (call depth, stack, a dynptr living in the main frame) and the big generated
rulesets through the traffic lab.

    pytest tests/test_compile_subprog.py                 (~1 min; one big lab seed included)
    pytest -m slow tests/test_compile_subprog.py         the 20 big lab seeds
    BPFILTER_UPDATE_GOLDEN=1 pytest tests/test_compile_subprog.py -k golden
"""
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsutil import Netns
from test_compile_model import a_packet, a_table, do_table
from test_compile_util import (ACCEPT, DROP, RETURN, Runner, goto, ipv4, jump, rule, table, tcp,
                               tcp_hdr, udp, udp_hdr)
from bpfilter_umh import ebpf as E
from bpfilter_umh.compile import (SUB_RETURN, XT_TCP_INV_OPTION, KernelFacts, compile_table)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root: loads BPF programs")


def user_chains(t):
    return {c.name for c in t.chains if not c.builtin}


def SubRunner(tbl, cls=Runner, **opts):
    """A Runner (test_compile_util) whose table is compiled with the given subprogram options."""
    import bpfilter_umh.compile as C
    real = C.compile_table
    C.compile_table = lambda t, f: real(t, f, **opts)
    try:
        return cls(tbl)
    finally:
        C.compile_table = real


def calls(prog) -> int:
    return sum(1 for it in prog.items if isinstance(it, E.Insn) and it.is_local_call)


def check(t, chain, packets, **opts):
    """Test-run `packets` through `chain`; verdicts and counters must equal the reference."""
    want = {}
    with SubRunner(t, **opts) as run:
        for pkt in packets:
            expect = do_table(t, chain, pkt, want)
            assert run.run(chain, pkt) == expect, (pkt.hex(), expect)
        got = {i: c for i, c in enumerate(run.counters()) if c != (0, 0)}
        progs = {p.chain: p for p in run.compiled.programs}
    assert got == want
    return progs


@pytest.fixture(scope="module")
def ns():
    if not ROOT:
        pytest.skip("needs root: loads BPF programs")
    with Netns("subp") as n:
        yield n


UDP53 = ipv4(src="192.0.2.1", dst="198.51.100.7", proto=17, payload=udp_hdr(1000, 53))
UDP80 = ipv4(src="192.0.2.1", dst="198.51.100.7", proto=17, payload=udp_hdr(1000, 80))
UDP99 = ipv4(src="203.0.113.9", dst="198.51.100.7", proto=17, payload=udp_hdr(1000, 99))
TCP22 = ipv4(src="192.0.2.1", dst="198.51.100.7", proto=6, payload=tcp_hdr(1000, 22))
TCP80MSS = ipv4(src="192.0.2.1", dst="198.51.100.7", proto=6,
                payload=tcp_hdr(1000, 80, options=b"\x02\x04\x05\xb4"))
PACKETS = [UDP53, UDP80, UDP99, TCP22, TCP80MSS]

# Each case: table, the chain to run. All of its user chains are forced to be subprograms.
CASES = {
    # jump: ACCEPT/DROP inside end the walk; RETURN (explicit or falling off) continues after it
    "jump": lambda: table({"OUTPUT": (DROP, [rule(jump("a")), rule(ACCEPT, proto=17)])},
                          {"a": [rule(DROP, udp(dport=(99, 99)), proto=17),
                                 rule(RETURN, udp(dport=(80, 80)), proto=17),
                                 rule(ACCEPT, proto=6)]}),
    # goto from the built-in chain: RETURN lands on the policy (underflow) entry
    "goto_underflow": lambda: table({"OUTPUT": (ACCEPT, [rule(goto("a")), rule(DROP)])},
                                    {"a": [rule(RETURN, udp(dport=(53, 53)), proto=17),
                                           rule(DROP, proto=6)]}),
    # goto inside a jumped-to chain: RETURN from b resumes after the *jump* to a
    "goto_in_jump": lambda: table({"OUTPUT": (ACCEPT, [rule(jump("a")), rule(DROP, proto=17)])},
                                  {"a": [rule(goto("b"), proto=17), rule(DROP)],
                                   "b": [rule(RETURN, udp(dport=(53, 53))),
                                         rule(ACCEPT, udp(dport=(80, 80)))]}),
    # nested jumps three deep, RETURN at each level, counters on the RETURN entries
    "nested": lambda: table({"OUTPUT": (DROP, [rule(jump("a")), rule(ACCEPT)])},
                            {"a": [rule(jump("b")), rule(DROP, udp(dport=(80, 80)), proto=17)],
                             "b": [rule(jump("c")), rule(RETURN, proto=6)],
                             "c": [rule(ACCEPT, udp(dport=(99, 99)), proto=17)]}),
    # one chain shared by many sites at different depths, jumps and gotos mixed
    "shared": lambda: table({"OUTPUT": (ACCEPT, [rule(jump("s"), proto=17),
                                                  rule(jump("a")),
                                                  rule(goto("s"), proto=6),
                                                  rule(DROP)])},
                            {"s": [rule(DROP, udp(dport=(99, 99)), proto=17),
                                   rule(ACCEPT, tcp(dport=(22, 22)), proto=6)],
                             "a": [rule(jump("s")), rule(goto("s"), src="203.0.113.0/24"),
                                   rule(DROP, udp(dport=(80, 80)), proto=17)]}),
    # the tcp option walk reads the options into the main frame through the dynptr there
    "tcp_option": lambda: table({"OUTPUT": (ACCEPT, [rule(jump("o"), proto=6), rule(DROP)])},
                                {"o": [rule(RETURN, tcp(option=2), proto=6),
                                       rule(ACCEPT, tcp(option=8, inv=XT_TCP_INV_OPTION),
                                            proto=6)]}),
}


@needs_root
@pytest.mark.parametrize("name", sorted(CASES))
def test_forced_subprograms_match_reference(ns, name):
    t = CASES[name]()
    with ns.inside():
        progs = check(t, "OUTPUT", PACKETS, subprogs=user_chains(t))
    assert calls(progs["OUTPUT"]) > 0


@needs_root
def test_shared_chain_emitted_once(ns):
    t = CASES["shared"]()
    with ns.inside():
        progs = check(t, "OUTPUT", PACKETS, subprog_above=0)
    text = progs["OUTPUT"].listing()
    assert text.count("subprogram: chain s") == 1
    assert calls(progs["OUTPUT"]) == 4       # every site of s calls it; a (one site) is inlined
    assert "subprogram: chain a" not in text


@needs_root
def test_call_depth_beyond_the_verifier_is_inlined(ns):
    """Ten chains each jumping to the next: MAX_CALL_FRAMES (8) frames allow 7 nested
    subprograms; the deeper chains are inlined into the deepest subprogram, still exact."""
    names = [f"c{i}" for i in range(10)]
    user = {n: [rule(jump(names[i + 1]))] if i + 1 < len(names) else
            [rule(DROP, udp(dport=(99, 99)), proto=17)] for i, n in enumerate(names)}
    user["c4"].append(rule(ACCEPT, proto=6))
    t = table({"OUTPUT": (ACCEPT, [rule(jump("c0")), rule(DROP, udp(dport=(80, 80)),
                                                           proto=17)])}, user)
    with ns.inside():
        progs = check(t, "OUTPUT", PACKETS, subprogs=set(names))
    text = progs["OUTPUT"].listing()
    assert sum(f"; subprogram: chain c{i}\n" in text for i in range(10)) == 7


@needs_root
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(t=a_table(), packets=st.lists(a_packet(), min_size=1, max_size=8))
def test_random_tables_all_subprograms(ns, t, packets):
    """The reference model's random tables with every user chain a subprogram."""
    with ns.inside():
        check(t, "OUTPUT", packets, subprogs=user_chains(t))


def test_default_path_unchanged_for_small_tables():
    """Tables that fit stay inlined: no call instruction, same listing as before."""
    for make in CASES.values():
        t = make()
        a = compile_table(t, KernelFacts.fake()).listing()
        b = compile_table(t, KernelFacts.fake(), subprog_above=10 ** 9).listing()
        assert a == b and "call sub_" not in a


def test_subprogram_returns_codes_distinct_from_verdicts():
    from bpfilter_umh import flavors
    for name in ("nf", "tc", "xdp"):
        fl = flavors.get(name)
        assert SUB_RETURN not in (fl.ACCEPT, fl.DROP)


GOLDEN_TABLE = lambda: table(  # noqa: E731
    {"INPUT": (DROP, [rule(jump("web"), proto=6), rule(goto("web"), proto=17),
                      rule(jump("log"), src="203.0.113.0/24")])},
    {"web": [rule(ACCEPT, tcp(dport=(80, 80)), proto=6), rule(jump("log")),
             rule(RETURN, src="198.51.100.0/24")],
     "log": [rule(DROP, udp(dport=(99, 99)), proto=17)]})


def test_golden_listing_forced_subprograms():
    text = compile_table(GOLDEN_TABLE(), KernelFacts.fake(), subprog_above=0).listing()
    path = os.path.join(GOLDEN, "user_chains_subprog.txt")
    if os.environ.get("BPFILTER_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read()
    assert "sub_web:  ; subprogram: chain web" in text
    assert "sub_log:  ; subprogram: chain log" in text


def test_assembler_resolves_local_calls():
    items = [E.mov(E.R1, 1), E.call_local("f"), E.exit_(),
             E.Label("f"), E.mov(E.R0, E.R1), E.exit_()]
    code = E.assemble(E.prune(items))
    ins = E.decode(code)
    assert ins[1].is_local_call and ins[1].imm == 1 and ins[1].off == 0
    assert "call L3" in E.listing(E.decode_items(code))
    assert len(E.prune(items)) == len(items)      # the callee is reachable through the call


# ---- the big generated rulesets through the lab (issue #3 reproduction) -------------------------

def _big(seed, labs):
    import signal

    import rulegen
    from lab import differential
    ref, cand = labs
    case = rulegen.generate(seed, big=True)

    def too_slow(*_):
        raise TimeoutError("case took more than 60 s")
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        diffs = differential(ref, cand, case.text(), case.probes)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not diffs, "\n".join([f"seed {seed}", case.text()] + diffs)


@pytest.fixture(scope="module")
def labs():
    if not ROOT:
        pytest.skip("needs root: network namespaces, BPF")
    from labfixtures import _candidate
    from lab import Lab
    installer = _candidate()
    with Lab(tag="r") as ref, Lab(installer=installer, tag="c") as cand:
        yield ref, cand


def test_big_seed_8(labs):
    """The lab's reproduction: FORWARD is 111 439 instructions inlined (ENOMEM "insn 104760
    cannot be patched due to 16-bit range" before gotol was used for long gotos); with
    subprograms 2 755 instructions and 32 calls."""
    _big(8, labs)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_big_seeds(seed, labs):
    _big(seed, labs)


@needs_root
def test_kfunc_on_dynptr_in_the_main_frame(ns):
    """bpf_dynptr_slice (a kfunc) called in a subprogram on the dynptr the main program built
    in its own frame, reached through the frame pointer argument: the verifier follows the
    PTR_TO_STACK into the caller's frame (the shape every rewritten slice/read takes)."""
    from bpfilter_umh import kernel as K
    from bpfilter_umh.compile import BPF_NETFILTER, BPF_PROG_TYPE_NETFILTER, S_BUF, S_DYNPTR
    from test_compile_util import ether, nf_ctx
    f = KernelFacts.from_btf()
    items = [
        E.mov(E.R6, E.R1), E.ldx(E.DW, E.R1, E.R6, f.nf_ctx_skb), E.mov(E.R2, 0),
        E.mov(E.R3, E.FP), E.alu(E.ADD, E.R3, S_DYNPTR), E.kfunc("bpf_dynptr_from_skb"),
        E.jmp(E.JNE, E.R0, 0, "drop"),
        E.mov(E.R1, E.FP), E.call_local("sub"), E.jmp(E.JNE, E.R0, 1, "drop"), E.exit_(),
        E.Label("drop"), E.mov(E.R0, 0), E.exit_(),
        E.Label("sub"), E.mov(E.R9, E.R1),
        E.mov(E.R1, E.R9), E.alu(E.ADD, E.R1, S_DYNPTR), E.mov(E.R2, 0),
        E.mov(E.R3, E.R9), E.alu(E.ADD, E.R3, S_BUF), E.mov(E.R4, 20),
        E.kfunc("bpf_dynptr_slice"), E.jmp(E.JEQ, E.R0, 0, "no"),
        E.ldx(E.B, E.R1, E.R0, 9), E.jmp(E.JNE, E.R1, 17, "no"), E.mov(E.R0, 1), E.exit_(),
        E.Label("no"), E.mov(E.R0, 0), E.exit_()]
    code = E.assemble(items, {}, f.kfunc_ids)
    with ns.inside():
        prog = K.Prog.load(BPF_PROG_TYPE_NETFILTER, code, license="GPL", name="subp_dynptr",
                           expected_attach_type=BPF_NETFILTER)
        try:
            assert prog.test_run(ether(UDP53), nf_ctx(1))[0] == 1
            assert prog.test_run(ether(TCP22), nf_ctx(1))[0] == 0
        finally:
            prog.close()


@needs_root
@pytest.mark.parametrize("flavor", ["tc", "xdp"])
def test_l2_flavors_load_with_subprograms(ns, flavor):
    """tc/xdp keep only ctx (r6) across rules: subprograms get it, and the verifier accepts
    them (these programs are tail-called by the flavor's dispatcher; no frame passes 256 bytes)."""
    from bpfilter_umh import kernel as K
    from bpfilter_umh.compile import COUNTERS_MAP
    from bpfilter_umh.flavors import IFNAMES_MAP
    t = table({"INPUT": (ACCEPT, [rule(jump("s"), proto=17), rule(jump("a")),
                                  rule(goto("s"), proto=6), rule(DROP)])},
              {"s": [rule(DROP, udp(dport=(99, 99)), proto=17),
                     rule(ACCEPT, tcp(dport=(22, 22)), proto=6)],
               "a": [rule(jump("s")), rule(goto("s"), src="203.0.113.0/24")]})
    ct = compile_table(t, KernelFacts.from_btf(), flavor=flavor, subprog_above=0)
    assert any(calls(p) for p in ct.programs)
    with ns.inside():
        cm = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, ct.counters_entries, name="counters")
        im = K.Map.create(K.BPF_MAP_TYPE_HASH, 4, 16, 16, name="ifnames")
        try:
            for p in ct.programs:
                K.Prog.load(p.prog_type, p.assemble({COUNTERS_MAP: cm.fd, IFNAMES_MAP: im.fd}),
                            license=p.license, name=p.name,
                            expected_attach_type=p.expected_attach_type).close()
        finally:
            cm.close()
            im.close()


@needs_root
def test_ipv6_subprograms_agree_with_inlining(ns):
    """AF_INET6 (ip6t_do_table, same chain logic; the main frame is deeper: the extension
    header walk's slots): the subprogram build gives the inlined build's verdicts and counters."""
    from test_compile_ipv6_util import Runner6, icmp6, icmp6_hdr, ipv6, rule6, table6, udp6

    t = table6({"OUTPUT": (ACCEPT, [rule6(jump("s"), proto=17), rule6(jump("a")),
                                    rule6(goto("s"), proto=58), rule6(DROP, src="2001:db8::9/128")])},
               {"s": [rule6(DROP, udp(dport=(99, 99)), proto=17),
                      rule6(ACCEPT, icmp6(128), proto=58), rule6(RETURN)],
                "a": [rule6(jump("s")), rule6(goto("s"), dst="2001:db8::7/128"),
                      rule6(DROP, udp(dport=(80, 80)), proto=17)]})
    pkts = [ipv6(payload=udp6(1000, 53)), ipv6(payload=udp6(1000, 99)),
            ipv6(payload=udp6(1000, 80)), ipv6(src="2001:db8::9", payload=udp6(1000, 53)),
            ipv6(nh=58, payload=icmp6_hdr(128)), ipv6(nh=58, payload=icmp6_hdr(129)),
            ipv6(dst="2001:db8::7", payload=udp6(1000, 80))]
    results = []
    with ns.inside():
        for opts in ({}, {"subprogs": user_chains(t)}):
            with SubRunner(t, Runner6, **opts) as run:
                results.append(([run.run("OUTPUT", p) for p in pkts], run.counters()))
                results[-1] += (calls({p.chain: p for p in run.compiled.programs}["OUTPUT"]),)
    assert results[0][:2] == results[1][:2]
    assert results[0][2] == 0 and results[1][2] > 0
    assert set(results[0][0]) == {0, 1}
