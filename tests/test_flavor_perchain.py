"""Per-chain flavors (issue #5 item 4, docs/flavors.md "Per-chain flavors"): INPUT/FORWARD on xdp
or tc while OUTPUT stays on nf, one counters map for all. Differential against kernel
iptables-legacy with real traffic through the lab; the crash of an install between the swaps of
two attachments; moving a chain to another flavor without a flush; status; refusals."""
import errno
import os
import sys

import pytest

import test_differential_handwritten as H
from lab import Lab, differential, number
from test_flavor_differential import FlavorLab, installer_for
from test_reliability_util import (A_VERDICTS, B_VERDICTS, flush_engine, two_rulesets, udp_lab)
from bpfilter_umh.engine import Engine
from bpfilter_umh.errors import BpfilterError
from bpfilter_umh.model import AF_INET

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

XDP_IN = "INPUT=xdp,FORWARD=xdp,OUTPUT=nf"
TC_IN = "INPUT=tc,FORWARD=nf,OUTPUT=nf"
# cases whose user chains are reached from several hooks (each hook's program inlines them, all
# count into the one map), OUTPUT rules (refused on xdp alone), policies and interfaces
CASES = ["interfaces_seen_from_user_chains", "nested_jumps_and_returns",
         "gotos_return_to_the_last_jump", "policy_drop_fallthrough",
         "output_interfaces_wildcards_and_inversion", "udp_ports_ranges_and_inversion"]


@pytest.fixture(scope="module", params=[XDP_IN, TC_IN])
def mixed_labs(request):
    with Lab(tag="r") as ref, FlavorLab(installer=installer_for(request.param), tag="m") as cand:
        yield request.param, ref, cand


@pytest.mark.parametrize("name", CASES)
def test_mixed_flavors_match_the_kernel(name, mixed_labs):
    spec, ref, cand = mixed_labs
    text, probes = H.CASES[name]()
    diffs = differential(ref, cand, text, number(probes))
    assert not diffs, f"flavors {spec} case {name}\n{text}\n" + "\n".join(diffs)
    with cand.host.inside():
        st = cand.installer.engine.status()
    want = dict(w.split("=") for w in spec.split(","))
    got = {c["name"]: c["flavor"] for c in st["chains"] if c["hook"] in want and c["prog_id"]}
    assert st["flavor"] == spec and got == {c: want[c] for c in got}, st




def _flush_all_flavors(b):
    flush_engine(b)
    with b.inside():
        assert not any(os.path.exists(d) for d in Engine.open().pin_dirs.values())


@pytest.fixture
def lab():
    with udp_lab(_flush_all_flavors) as lab:
        yield lab


def _where(b, spec=XDP_IN) -> dict:
    """{hook: (flavor, prog id)} of every filled slot of every attachment."""
    with b.inside():
        eng = Engine.open(AF_INET, spec)
        out = {}
        for f, progs in eng._programs_by_flavor().items():
            for h, p in progs.items():
                out.setdefault(h, []).append((f, p.info()["id"]))
                p.close()
        return out


def test_status_and_counters_of_a_mixed_install(lab):
    a, b, probe = lab
    ta, tb = two_rulesets()
    with b.inside():
        eng = Engine.open(AF_INET, XDP_IN)
        eng.install(ta)
    assert probe.verdicts() == A_VERDICTS
    w = _where(b)
    assert [f for f, _ in w[1]] == ["xdp"] and [f for f, _ in w[3]] == ["nf"], w
    with b.inside():
        st = Engine.open(AF_INET, XDP_IN).status()
        maps = set()
        for p in eng._installed_programs().values():
            maps.add(tuple(p.info()["map_ids"]))
            p.close()
        cli = __import__("bpfilter_umh.cli", fromlist=["format_status"])
        text = cli.format_status("ipv4", st)
    assert st["flavor"] == XDP_IN
    fl = {c["name"]: c["flavor"] for c in st["chains"]}
    assert fl["INPUT"] == "xdp" and fl["OUTPUT"] == "nf", st
    assert XDP_IN in text and "xdp" in text and "nf" in text, text
    # one counters map for both attachments; each datagram counted once (INPUT rule i)
    assert len(maps) == 1, maps
    inp = {c["name"]: c for c in st["chains"]}["INPUT"]
    assert [r["pcnt"] for r in inp["rules"]] == [1, 1, 1], inp


def test_switching_a_chain_flavor_without_flush(lab):
    a, b, probe = lab
    ta, tb = two_rulesets()
    with b.inside():
        Engine.open(AF_INET, "nf").install(ta)
    assert probe.verdicts() == A_VERDICTS
    with b.inside():
        eng = Engine.open(AF_INET, XDP_IN)      # adopts the nf table
        assert eng.table.chain("INPUT").rules[1].target.verdict == -1
        old = eng.install(tb)
    assert old[1][0] == 1 and old[0][0] == 1     # the replaced table's counters
    w = _where(b)
    assert {h: [f for f, _ in v] for h, v in w.items()} == {1: ["xdp"], 2: ["xdp"], 3: ["nf"]}
    assert probe.verdicts() == B_VERDICTS
    with b.inside():
        Engine.open(AF_INET, "nf").install(ta)  # back: the xdp attachment goes entirely
        eng = Engine.open(AF_INET, "nf")
        assert not os.path.exists(eng.pin_dirs["xdp"])
    assert probe.verdicts() == A_VERDICTS


HELPER = """
import os, sys
sys.path[:0] = [{tests!r}, {root!r}]
from bpfilter_umh.sockopt import use_host_bpffs
use_host_bpffs()
from test_reliability_util import two_rulesets
from bpfilter_umh.engine import Engine
Engine.open(2, {spec!r}).install(two_rulesets()[1])
print("installed")
"""


@pytest.mark.parametrize("first,fault", [
    (XDP_IN, "swap=kill@1"),        # nf OUTPUT swapped, xdp INPUT not: rolled forward
    ("nf", "stale=kill"),           # switch: xdp filled, the old nf INPUT slot not yet emptied
])
def test_install_killed_between_attachments_settles(lab, first, fault):
    a, b, probe = lab
    ta, tb = two_rulesets()
    with b.inside():
        Engine.open(AF_INET, first).install(ta)
    assert probe.verdicts() == A_VERDICTS
    code = HELPER.format(tests=os.path.join(ROOT, "tests"), root=ROOT, spec=XDP_IN)
    p = b.run([sys.executable, "-c", code], check=False, env=dict(b.env, BPFILTER_FAULTS=fault))
    assert p.returncode in (-9, 137) and "installed" not in p.stdout, (p.returncode, p.stderr)
    with b.inside():
        eng = Engine.open(AF_INET, XDP_IN)      # settles
        assert not os.path.exists(eng._pending_path)
        assert eng.table.chain("INPUT").rules[1].target.verdict == -2       # B
        st = eng.status()
    assert st["flavor"] == XDP_IN
    w = _where(b)
    # one generation: each hook in exactly one attachment, the one its flavor names
    assert {h: [f for f, _ in v] for h, v in w.items()} == {1: ["xdp"], 2: ["xdp"], 3: ["nf"]}, w
    assert probe.verdicts() == B_VERDICTS


@pytest.mark.parametrize("spec,offload,msg", [
    ("OUTPUT=xdp", None, "flavor xdp cannot serve OUTPUT"),
    ("INPUT=bogus", None, "unknown flavor"),
    ("INPUT=tc,OUTPUT=nf", "eth0", "--offload needs --flavor xdp"),
])
def test_impossible_combinations_are_refused(spec, offload, msg):
    with pytest.raises(BpfilterError, match=msg) as ei:
        Engine.open(AF_INET, spec, offload=offload)
    assert ei.value.errno == errno.EINVAL


# ---- IPv6: ip6tables with INPUT on xdp or tc and OUTPUT on nf, against ip6tables-legacy ------
@pytest.mark.parametrize("spec", ["INPUT=xdp,FORWARD=nf,OUTPUT=nf",
                                  "INPUT=tc,FORWARD=nf,OUTPUT=nf"])
def test_ipv6_mixed_flavors_match_the_kernel(spec):
    """The differential IPv6 ruleset (INPUT, FORWARD and OUTPUT rules, user chains) through the
    IPv6 lab: INPUT runs on xdp/tc, FORWARD and OUTPUT on nf; per probe what got past each hook
    (OUTPUT: the frames from the host reaching the client) and every entry's counters equal the
    kernel's ip6tables-legacy."""
    import test_differential_ipv6 as D6
    from test_differential_ipv6_lab import KernelFilter
    from test_flavor_ipv6 import compare, flavor_filter, run
    seen_status = []

    class Recording(flavor_filter(spec)):
        def counters(self):
            with self.host.inside():
                seen_status.append(self.eng.status())
            return super().counters()

    want = run(KernelFilter, D6.RULESET, D6.PROBES)
    got = run(Recording, D6.RULESET, D6.PROBES)
    st = seen_status[0]
    assert st["flavor"] == spec and {c["name"]: c["flavor"] for c in st["chains"] if c["hook"]} \
        == dict(w.split("=") for w in spec.split(",")), st
    diffs = compare(D6.RULESET, want, got, 3)
    assert not diffs, f"flavors {spec}\n" + "\n".join(diffs)
    for col in (0, 1, 2):           # meaningful: each hook passed some probes and dropped some
        seen = [want[0][n][col][0] for n, w, _ in D6.PROBES if w == ("in", "fwd", "out")[col]]
        assert any(seen) and not all(seen), (col, seen)
