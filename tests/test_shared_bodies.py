"""Jump cases sharing one body (classify._shared_cases, issue #7: the verifier must not see a giant
program): a run's jump rules whose chains hold the same rules are served by one global function
per distinct body, told the chain's RETURN entry by a case map. The program then gives the same
verdicts and counters as the grouped global functions and as the inlined build (BPF_PROG_TEST_RUN,
real kernel), with gotos, chains that RETURN, and keys repeated by later rules of the run (the
next rule with the key: a verdict, RETURN, or another jump case, up to three deep)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_cplane_scale import _frame, _run_each, decoded  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh.compile import KernelFacts, compile_table  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

SERVICES = 100


def _vip(k: int) -> str:
    return f"10.96.0.{k + 1}"


def _text(extra_input: str = "", services: int = SERVICES) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":SVC - [0:0]"] + [f":S{k} - [0:0]" for k in range(services)]
    lines += ["-A INPUT -j SVC", "-A INPUT -s 192.0.2.32/28 -j DROP"]
    if extra_input:
        lines.append(extra_input)
    svc = "-A SVC -d {}/32 -p tcp -m tcp --dport 80 -{} {}"
    for k in range(services):
        lines.append(svc.format(_vip(k), "g" if k % 10 == 3 else "j", f"S{k}"))
    # later rules with the key of an earlier one: after a RETURN, the next one decides
    lines += [svc.format(_vip(0), "j", "S50"), svc.format(_vip(0), "j", "ACCEPT"),
              svc.format(_vip(1), "j", "RETURN"),
              svc.format(_vip(2), "j", "S60"), svc.format(_vip(2), "j", "S70"),
              svc.format(_vip(2), "j", "DROP")]
    for k in range(services):
        lines += [f"-A S{k} -s 192.0.2.0/27 -j ACCEPT", f"-A S{k} -s 192.0.2.32/27 -j RETURN",
                  f"-A S{k} -j DROP"]
    return "\n".join(lines + ["COMMIT", ""])


def _input(table, flavor="nf"):
    return next(p for p in compile_table(table, KernelFacts.from_btf(), flavor).programs
                if p.chain == "INPUT")


def _builds(monkeypatch, table, flavor="nf") -> dict:
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    out = {"shared": _input(table, flavor)}
    monkeypatch.setenv("BPFILTER_SHARED_BODIES", "0")
    out["grouped"] = _input(table, flavor)
    monkeypatch.setenv("BPFILTER_GLOBAL_FUNCS", "0")
    out["inlined"] = _input(table, flavor)
    monkeypatch.delenv("BPFILTER_SHARED_BODIES")
    monkeypatch.delenv("BPFILTER_GLOBAL_FUNCS")
    return out


def _packets() -> list:
    out = []
    for k in (0, 1, 2, 3, 13, 50, SERVICES - 1):
        for src in ("192.0.2.5", "192.0.2.40", "192.0.2.50", "192.0.2.100"):
            out.append(_frame(src, _vip(k), 1024, 80))
        out.append(_frame("192.0.2.5", _vip(k), 1024, 81))        # no service: on in INPUT
    return out


@pytest.mark.parametrize("flavor", ["nf", "tc", "xdp"])
def test_shared_bodies_match_grouped_and_inlined(monkeypatch, flavor):
    table = decoded(_text())
    b = _builds(monkeypatch, table, flavor)
    shared, grouped, inlined = b["shared"], b["grouped"], b["inlined"]
    assert len(shared.global_labels) == 2, "one body for the jumps, one for the gotos"
    assert any(m.name.startswith("case_SVC") for m in shared.maps)
    assert len(grouped.global_labels) >= 1 and not any(m.name.startswith("case_")
                                                       for m in grouped.maps)
    assert not inlined.global_labels
    n_shared = sum(1 for it in shared.items if not isinstance(it, classify.Label))
    n_inl = sum(1 for it in inlined.items if not isinstance(it, classify.Label))
    assert n_shared * 4 < n_inl, (n_shared, n_inl)
    packets = _packets()
    results = _run_each((shared, grouped, inlined), packets, table.num_entries, "sb")
    assert results[0] == results[2] and results[1] == results[2]
    verdicts, counts = results[0]
    assert len(set(verdicts)) == 2, "both verdicts taken"
    svc = table.chain("SVC").rules
    # 192.0.2.40 to service 0: S0 RETURNs, S50 RETURNs, the ACCEPT with the same key decides
    assert counts[svc[SERVICES + 1].index][0] >= 1
    # service 2: S2, S60, S70 RETURN, then its DROP: three jump cases deep
    assert counts[svc[SERVICES + 4].index][0] >= 1 and counts[svc[SERVICES + 5].index][0] >= 1


def test_sequences_deeper_than_the_copies_are_grouped(monkeypatch):
    """A run whose repeated keys chain more jump cases than SHARED_DEPTH copies of the dispatch
    falls back to the grouped functions (same verdicts as inlined)."""
    table = decoded(_text())
    monkeypatch.setattr(classify, "SHARED_DEPTH", 2)
    b = _builds(monkeypatch, table)
    assert not any(m.name.startswith("case_") for m in b["shared"].maps)
    results = _run_each((b["shared"], b["inlined"]), _packets(), table.num_entries, "sd")
    assert results[0] == results[1]


def test_kept_body_and_case_map_after_an_append(monkeypatch):
    """A rule appended to INPUT moves every service chain by one entry: the next compile takes the
    body from the cache and the very same case map spec (so the engine keeps the map: its
    contents are relative to the run), only the run's first entry index in the code moves; the
    counters still land on the right entries."""
    base = decoded(_text())
    moved = decoded(_text("-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"))
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    first = _input(base)
    reused = classify.FN_STATS["reused"]
    second = _input(moved)
    assert classify.FN_STATS["reused"] > reused or second.fn_parts == first.fn_parts
    cmap = [m for m in first.maps if m.name.startswith("case_")]
    assert cmap and cmap[0] in second.maps and \
        any(m is cmap[0] for m in second.maps), "the case map was not kept"
    monkeypatch.setenv("BPFILTER_GLOBAL_FUNCS", "0")
    inl = _input(moved)
    results = _run_each((second, inl), _packets(), moved.num_entries, "sk")
    assert results[0] == results[1]


def test_small_runs_stay_inlined():
    """Below GLOBAL_ABOVE instructions of inlined cases, the run's cases stay inlined: no call
    and no case map on the packets of a small table."""
    cp = _input(decoded(_text(services=80)))
    assert not cp.global_labels and not any(m.name.startswith("case_") for m in cp.maps)
