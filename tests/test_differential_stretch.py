"""Long linear stretches cut into global functions (bpfilter_umh/stretch.py, issue #7): the
kernel's iptables-legacy against bpfilter on chains no classified run takes, with pieces of the
default size and with pieces of a few rules everywhere (generated rulesets, IPv4 and IPv6), then
the same chain edited the ways iptables edits it (a rule inserted at the top, one deleted in the
middle, one appended): same verdicts and counters, and the pieces the edit did not touch are the
functions compiled before (counter keys moved)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulegen  # noqa: E402
import rulesets  # noqa: E402
from lab import differential, number  # noqa: E402
from labfixtures import labs  # noqa: E402,F401  (fixture)
from test_differential_large import _iface_chain  # noqa: E402

from bpfilter_umh import classify, stretch  # noqa: E402
from bpfilter_umh.compile import KernelFacts, compile_table  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

SMALL = {"BPFILTER_STRETCH_MIN": "2", "BPFILTER_STRETCH_PIECE": "3"}


def _small_pieces(monkeypatch):
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("seed", range(40))
def test_generated_ruleset_in_pieces(seed, labs, monkeypatch):
    """Every stretch of two or more plain rules a global function of about 3 rules: RETURN,
    gotos around them, hotdrops inside them, rules after an unconditional one (a piece never
    called), user chains inlined between pieces."""
    _small_pieces(monkeypatch)
    ref, cand = labs
    case = rulegen.generate(seed)
    diffs = differential(ref, cand, case.text(), case.probes)
    if diffs:
        pytest.fail("\n".join([f"seed {seed}, pieces of 3 rules", case.text()] + diffs[:20]),
                    pytrace=False)


def test_generated_ipv6_in_pieces(monkeypatch):
    """The IPv6 exthdr chains (ipv6_find_hdr's walk, its failure slot S_WALKERR read by -p
    rules) in pieces of about 3 rules: the kernel's verdicts and counters."""
    import test_differential_ipv6_generated as gen6
    _small_pieces(monkeypatch)
    gen6.test_generated_exthdr_chains_against_kernel(False, monkeypatch)


def _edited(text: str, n: int) -> list:
    """(what, text) of the chain as iptables edits it: as is, a rule inserted at the top
    (`-I INPUT 1`), rule n/2 deleted (`-D INPUT n/2`), a rule appended (`-A`); each new rule
    decides one probe of its own."""
    head, body = text.split("-A INPUT ", 1)
    lines = ("-A INPUT " + body).split("\n")
    rules = [x for x in lines if x.startswith("-A INPUT ")]
    tail = [x for x in lines if not x.startswith("-A INPUT ")]
    top = "-A INPUT -i eth0 -s 203.0.113.201/32 -j DROP"
    end = "-A INPUT -i eth0 -s 203.0.113.202/32 -j DROP"
    return [("as is", text),
            ("inserted at the top", head + "\n".join([top] + rules + tail)),
            ("deleted in the middle", head + "\n".join(rules[:n // 2] + rules[n // 2 + 1:]
                                                       + tail)),
            ("appended", head + "\n".join(rules + [end] + tail))]


def test_edited_linear_chain(labs):
    """3 000 rules `-i IFACE -s PREFIX` (linear: no run takes an interface) in pieces, then
    edited: the kernel's verdicts and counters each time; after an edit, the pieces it did not
    touch are kept, not compiled again (the cuts follow the entries' contents: stretch._cut)."""
    from probes import IPPROTO_UDP, Probe
    ref, cand = labs
    n = 3000
    text, probes = _iface_chain(n)
    extra = [Probe("INPUT", "c0", f"203.0.113.{h}", rulesets.INPUT_DST, IPPROTO_UDP, 1024, 53)
             for h in (201, 202)]
    probes = number(list(probes) + extra)
    # pieces of other tests' chains would be found again (test_differential_large's 10 000
    # rules begin with these 3 000): "as is" compiles every piece
    classify._FN_CACHE.clear()
    for what, t in _edited(text, n):
        made, reused = classify.FN_STATS["made"], classify.FN_STATS["reused"]
        diffs = differential(ref, cand, t, probes)
        assert not diffs, f"{what}:\n" + "\n".join(diffs[:40])
        made, reused = classify.FN_STATS["made"] - made, classify.FN_STATS["reused"] - reused
        print(f"{what}: identical; pieces compiled {made}, kept {reused}")
        if getattr(cand.installer, "table", None) is None:
            continue                # not bpfilter's engine in this process (kernel vs kernel)
        if what == "as is":
            assert made >= n // (2 * stretch.PIECE_RULES), f"{made} pieces for {n} rules"
        else:
            assert made <= 3 and reused >= n // (4 * stretch.PIECE_RULES), \
                f"{what}: {made} pieces compiled, {reused} kept"


def _pieces(cp) -> list:
    """(first rule, last rule) of each piece of the program, from its functions' heads."""
    import re
    out = []
    for lbl in cp.global_labels:
        assert lbl.startswith(stretch.PIECE_STEM), lbl
    for it in cp.items:
        m = re.match(r"global function: \S+ rules (\d+)\.\.(\d+) \(linear\)",
                     getattr(it, "comment", "") or "")
        if m and it.__class__.__name__ == "Label":
            out.append((int(m.group(1)), int(m.group(2))))
    return out


def test_pieces_of_a_chain():
    """A 2 000-rule linear chain with a jump into a user chain at rule 1 000: pieces of at least
    half and at most twice PIECE_RULES rules, in order, covering every rule but the jump (emitted
    inline between them, its chain too); no pieces when BPFILTER_STRETCH_MIN=0."""
    from test_compile_util import ACCEPT, DROP, jump, rule, table
    rules = [rule(DROP if i % 3 else ACCEPT, src=f"10.{i // 256}.{i % 256}.0/24",
                  iniface="eth0") for i in range(2000)]
    rules[999] = rule(jump("u"), iniface="eth1")
    t = table({"INPUT": (ACCEPT, rules)}, {"u": [rule(DROP, iniface="eth2")]})
    cp = next(p for p in compile_table(t, KernelFacts.fake()).programs if p.chain == "INPUT")
    got = _pieces(cp)
    assert got and len(got) == len(cp.global_labels)
    per = stretch.PIECE_RULES
    covered = []
    for a, b in got:
        assert per // 2 <= b - a + 1 <= 2 * per or b in (999, 2000), (a, b)
        covered += range(a, b + 1)
    assert covered == sorted(covered) and len(set(covered)) == len(covered)
    assert 1000 not in covered and len(covered) >= 2000 - 1 - 2 * (per // 4)
    os.environ["BPFILTER_STRETCH_MIN"] = "0"
    try:
        cp0 = next(p for p in compile_table(t, KernelFacts.fake()).programs
                   if p.chain == "INPUT")
    finally:
        del os.environ["BPFILTER_STRETCH_MIN"]
    assert not cp0.global_labels


def test_pieces_leave_counting_to_their_caller():
    """A piece's rules store their entry's key and answer; the counting subprogram is called
    only by the main program after the answer (stretch._call). A static subprogram is verified
    again at each call site, so counting in the pieces made the verifier process ~40
    instructions a rule of `-i IFACE -s PREFIX` (6.18); now ~15, and the chain's counters are
    still the kernel's (test_edited_linear_chain)."""
    import ruleset_bench as RB
    from bpfilter_umh.compile import COUNT_SUB
    n = 2000
    table = RB.table_of(rulesets.iface_chain(n).text)
    prog, cnt, cp, _secs = RB.load_chain(table, "INPUT")
    try:
        verified = prog.info()["verified_insns"]
    finally:
        prog.close()
        cnt.close()
    heads = set(cp.global_labels)
    assert heads, "no pieces"
    inside, calls = None, []
    for it in cp.items:
        if it.__class__.__name__ == "Label":
            inside = it.name if it.name in heads else inside
        elif inside and getattr(it, "target", None) == COUNT_SUB:
            calls.append(inside)
    assert not calls, f"pieces calling {COUNT_SUB}: {sorted(set(calls))[:3]}"
    assert verified < 20 * n, f"{verified} instructions verified for {n} rules"


def test_pieces_kept_when_the_prologue_grows():
    """The table's first rule that reads ports, appended to a long interface chain, makes the
    prologue parse the L4 header: the pieces, which read only their own rules' slots, are
    kept (their key holds no program-wide flag: stretch._piece_key)."""
    import ruleset_bench as RB
    text = rulesets.iface_chain(1200).text
    before = RB.table_of(text)
    after = RB.table_of(text.replace("COMMIT", "-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT"))
    facts = KernelFacts.fake()
    classify._FN_CACHE.clear()
    compile_table(before, facts)
    made, reused = classify.FN_STATS["made"], classify.FN_STATS["reused"]
    cp = next(p for p in compile_table(after, facts).programs if p.chain == "INPUT")
    made, reused = classify.FN_STATS["made"] - made, classify.FN_STATS["reused"] - reused
    assert cp.global_labels and made <= 1 and reused >= len(cp.global_labels) - 1, \
        f"pieces compiled {made}, kept {reused}"
