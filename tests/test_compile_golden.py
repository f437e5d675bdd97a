"""Golden disassembly listings of small rulesets (tests/golden/*.txt) so that codegen changes are
visible in review, plus the compiler's precise errors. Pure: KernelFacts.fake() stands in for
the kernel's BTF, nothing is loaded.

Regenerate after an intended codegen change:  BPFILTER_UPDATE_GOLDEN=1 pytest tests/test_compile_golden.py
"""
import errno
import os

import pytest

from test_compile_util import (ACCEPT, DROP, QUEUE, RETURN, goto, icmp, jump, rule, table, tcp,
                               udp)
from bpfilter_umh.compile import (IPT_INV_SRCIP, XT_TCP_INV_OPTION, KernelFacts, compile_table)
from bpfilter_umh.errors import BpfilterError
from bpfilter_umh.model import ExtTarget, Match

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")

RULESETS = {
    "empty": lambda: table({}),
    "matchers": lambda: table({
        "INPUT": (DROP, [rule(ACCEPT, src="192.0.2.0/24", inv=IPT_INV_SRCIP, iniface="eth+"),
                         rule(ACCEPT, tcp(dport=(22, 22), flags=(0x17, 0x02)), proto=6),
                         rule(DROP, udp(sport=(1, 1023)), proto=17, dst="198.51.100.7/32"),
                         rule(ACCEPT, icmp(8, (0, 255)), proto=1),
                         rule(DROP, frag=True)]),
        "OUTPUT": (ACCEPT, [rule(DROP, outiface="veth0")])}),
    "tcp_option": lambda: table({
        "INPUT": (ACCEPT, [rule(DROP, tcp(option=8, inv=XT_TCP_INV_OPTION), proto=6)])}),
    "user_chains": lambda: table({
        "INPUT": (DROP, [rule(jump("web"), proto=6), rule(goto("other"), proto=17)])},
        {"web": [rule(ACCEPT, tcp(dport=(80, 80))), rule(RETURN, src="203.0.113.0/24")],
         "other": [rule(ACCEPT, udp(dport=(53, 53)))]}),
}


@pytest.mark.parametrize("name", sorted(RULESETS))
def test_golden_listing(name):
    text = compile_table(RULESETS[name](), KernelFacts.fake()).listing()
    path = os.path.join(GOLDEN, f"{name}.txt")
    if os.environ.get("BPFILTER_UPDATE_GOLDEN"):
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        want = f.read()
    assert text == want, f"codegen changed for {name}: rerun with BPFILTER_UPDATE_GOLDEN=1 and review"


def test_compile_is_deterministic():
    a = compile_table(RULESETS["user_chains"](), KernelFacts.fake())
    b = compile_table(RULESETS["user_chains"](), KernelFacts.fake())
    assert a.listing() == b.listing()
    assert [p.assemble({"counters": 3}) for p in a.programs] == \
        [p.assemble({"counters": 3}) for p in b.programs]
    assert a.counters_entries == len(RULESETS["user_chains"]().entries())


def _error(t) -> BpfilterError:
    with pytest.raises(BpfilterError) as ei:
        compile_table(t, KernelFacts.fake())
    return ei.value


def test_unsupported_target_names_the_rule():
    e = _error(table({"FORWARD": (ACCEPT, [rule(ACCEPT), rule(ACCEPT),
                                           rule(ExtTarget("REJECT", 0, b""))])}))
    assert e.errno == errno.EOPNOTSUPP
    # entries: INPUT policy 0, FORWARD rules 1..3 -> the REJECT rule is entry 3 at offset 300
    assert e.message == ("chain FORWARD rule 3 (entry offset 300): target REJECT is not "
                         "supported by the compiler")


def test_unsupported_match_and_verdict_name_the_rule():
    e = _error(table({"INPUT": (ACCEPT, [rule(ACCEPT, Match("conntrack", 3, b""))])}))
    assert (e.errno, e.message) == (errno.EOPNOTSUPP, "chain INPUT rule 1 (entry offset 0): match "
                                    "conntrack (revision 3) is not supported by the compiler")
    e = _error(table({}, {"sub": [rule(QUEUE)]}) if False else
               table({"INPUT": (ACCEPT, [rule(jump("sub"))])}, {"sub": [rule(ACCEPT), rule(QUEUE)]}))
    assert e.errno == errno.EOPNOTSUPP and e.message.startswith("chain sub rule 2 (entry offset")
    assert "verdict QUEUE is not supported" in e.message


def test_unreached_user_chain_is_not_compiled():
    # the kernel accepts (and never runs) a user chain no hook reaches; so does the compiler
    t = table({"INPUT": (ACCEPT, [])}, {"unused": [rule(ExtTarget("LOG", 0, b""))]})
    assert len(compile_table(t, KernelFacts.fake()).programs) == 3


def test_loop_is_refused():
    e = _error(table({"INPUT": (ACCEPT, [rule(jump("a"))])},
                     {"a": [rule(jump("b"))], "b": [rule(goto("a"))]}))
    assert e.errno == errno.ELOOP and "loop through chain a" in e.message


def test_ipv6_and_other_flavors_are_refused():
    t = table({})
    t.family = 7    # neither AF_INET nor AF_INET6
    assert _error(t).errno == errno.EOPNOTSUPP
    with pytest.raises(BpfilterError, match="unknown flavor 'ebpf'"):
        compile_table(table({}), KernelFacts.fake(), flavor="ebpf")
