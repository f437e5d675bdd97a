"""Issue #6 matches on flavors tc and xdp: the IPv4 extension cases of test_differential_ext.py
(kernel iptables-legacy vs bpfilter, real packets through the lab) with the candidate's engine
opened with Engine.open(AF_INET, flavor=...), as test_flavor_differential.py does for the
hand-written cases.

What a flavor cannot see is refused when the ruleset is loaded, with an error naming the rule,
the match and the reason (matchers._FLAVOR_LACKS, _flavor_check): conntrack/state on tc ingress
(before conntrack) and on xdp, the criteria POSTROUTING changes on tc egress, owner and mark and
pkttype on xdp; xdp has no OUTPUT hook at all. Everything else reads the packet through the
flavor's primitives (owner and conntrack on tc egress: the kernel's sk_buff) and must give the
kernel's verdicts and counters.

Left out of the comparison, as documented differences of the flavors (docs/flavors.md):
fragmented INPUT probes (the kernel's INPUT sees the reassembled datagram, tc/xdp ingress each
fragment) and an OUTPUT drop's errno (EPERM from nf_hook_slow vs a silent tc egress drop).

    BPFILTER_FLAVORS=tc pytest tests/test_differential_ext_flavors.py
"""
import os
import re
import shutil

import pytest

import test_differential_ext as X
from lab import Lab, LoadError, differential, number
from probes import FRAG_WHOLE
from test_flavor_differential import FLAVORS, FlavorLab, installer_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

# case -> {flavor: text the refusal must contain}
REFUSED = {
    "conntrack_states_on_probes": {"tc": r"chain INPUT rule 1 .*match conntrack is not "
                                         r"supported by flavor tc \(tc ingress runs before "
                                         r"conntrack",
                                   "xdp": "match conntrack is not supported by flavor xdp"},
    "mark_pkttype_comment": {"xdp": "match mark is not supported by flavor xdp"},
}


@pytest.fixture(scope="module", params=FLAVORS)
def flavor_labs(request):
    with Lab(tag="r") as ref, FlavorLab(installer=installer_for(request.param), tag="f") as cand:
        yield request.param, ref, cand


def _compare(flavor, ref, cand, text, probes):
    if flavor == "xdp":
        text = "".join(ln + "\n" for ln in text.splitlines() if not ln.startswith("-A OUTPUT"))
        probes = [p for p in probes if p.hook != "OUTPUT"]
    probes = [p for p in probes if p.hook != "INPUT" or p.frag == FRAG_WHOLE]
    diffs = differential(ref, cand, text, number(probes))
    diffs = [d for d in diffs if not (d.startswith("probe OUTPUT") and
                                      d.endswith("kernel: seen at send:EPERM  "
                                                 f"bpfilter-{flavor}: dropped"))]
    if flavor == "xdp":
        diffs = [d for d in diffs if "OUTPUT" not in d]
    return diffs


@pytest.mark.parametrize("name", sorted(X.CASES))
def test_ext_case_on_flavor(name, flavor_labs):
    flavor, ref, cand = flavor_labs
    text, probes = X.CASES[name]()
    why = REFUSED.get(name, {}).get(flavor)
    if why:
        with pytest.raises((LoadError, Exception), match=why):
            cand.load(text)
        return
    diffs = _compare(flavor, ref, cand, text, probes)
    assert not diffs, f"flavor {flavor} case {name}\n{text}\n" + "\n".join(diffs[:20])


def test_mac_source_on_flavor(flavor_labs):
    from lab import _mac
    flavor, ref, cand = flavor_labs
    c0, c1, s0 = _mac(0, 2), _mac(1, 2), _mac(4, 2)
    text = X.table(f"""
        -A INPUT -m mac --mac-source {c0} -p udp -j DROP
        -A INPUT -m mac ! --mac-source {c1} -p tcp -j DROP
        -A FORWARD -m mac --mac-source {s0} -j DROP
        -A FORWARD -m mac ! --mac-source {c0} -p icmp -j DROP""")
    ps = []
    for sender, fwd_dst in (("c0", "198.51.100.77"), ("c1", "198.51.100.77"),
                            ("c2", "198.51.100.77"), ("s0", "192.0.2.10")):
        src = {"c0": "192.0.2.2", "c1": "192.0.2.66", "c2": "192.0.2.130",
               "s0": "198.51.100.2"}[sender]
        for proto in (X.TCP, X.UDP, X.ICMP):
            ps.append(X.P("INPUT", sender=sender, src=src, dst="192.0.2.1", proto=proto))
            ps.append(X.P("FORWARD", sender=sender, src=src, dst=fwd_dst, proto=proto))
    diffs = _compare(flavor, ref, cand, text, ps)
    assert not diffs, "\n".join(diffs[:20])
    c = ref.counters()
    assert c[("INPUT", 0)][0] == 1 and c[("FORWARD", 0)][0] == 3     # not vacuous


@pytest.mark.parametrize("rule,tc_why", [
    ("-A INPUT -m conntrack --ctstate NEW -j DROP", "tc ingress runs before conntrack"),
    ("-A FORWARD -m state --state NEW -j DROP", "tc ingress runs before conntrack"),
    ("-A OUTPUT -m conntrack --ctstatus CONFIRMED", "--ctstatus: at tc egress"),
    ("-A OUTPUT -m conntrack --ctstate SNAT", "--ctstate SNAT: at tc egress"),
    ("-A OUTPUT -m conntrack --ctrepldst 192.0.2.1", "--ctrepldst: at tc egress"),
    ("-A INPUT -m mark --mark 1", None), ("-A OUTPUT -m owner --uid-owner 0", None)])
def test_refusals_name_rule_and_reason(rule, tc_why, flavor_labs):
    """What the flavor cannot see is refused, naming the rule, the match and the reason."""
    flavor, ref, cand = flavor_labs
    name = rule.split("-m ")[1].split()[0]
    name = "conntrack" if name == "state" else name      # iptables 1.8 sends state as conntrack
    if flavor == "xdp" and rule.startswith("-A OUTPUT"):
        want = "chain OUTPUT: flavor xdp cannot"
    elif flavor == "xdp":
        want = f"chain {rule.split()[1]} rule 1 .*match {name} is not supported by flavor xdp"
    elif tc_why:
        want = f"chain {rule.split()[1]} rule 1 .*match {name} is not supported by flavor tc " \
               f"\\({re.escape(tc_why)}"
    else:
        cand.load(X.table(rule))            # served on tc
        return
    with pytest.raises((LoadError, Exception), match=want):
        cand.load(X.table(rule))


# ---- tc egress (OUTPUT): owner and conntrack read the kernel's sk_buff (bpf_cast_to_kern_ctx).
# No rule drops here: a tc egress drop is silent where OUTPUT's gives the sender EPERM.
OWNER_COUNTING = X.OWNER.replace(" -j DROP", "")
CT_OUTPUT = X.table("""
    -A OUTPUT -m conntrack --ctstate NEW
    -A OUTPUT -m conntrack --ctstate ESTABLISHED
    -A OUTPUT -m conntrack --ctstate RELATED
    -A OUTPUT -m state --state INVALID,UNTRACKED
    -A OUTPUT -m state ! --state NEW
    -A OUTPUT -m conntrack --ctdir REPLY
    -A OUTPUT -m conntrack --ctdir ORIGINAL --ctstate NEW,ESTABLISHED
    -A OUTPUT -m conntrack --ctproto tcp --ctorigsrc 192.0.2.0/24
    -A OUTPUT -m conntrack --ctproto udp ! --ctorigdst 192.0.2.1
    -A OUTPUT -m conntrack --ctorigdstport 22 --ctreplsrc 192.0.2.1
    -A OUTPUT -m conntrack --ctproto icmp --ctreplsrcport 0:65535
    -A OUTPUT -m conntrack --ctstate DNAT
    -A OUTPUT -m conntrack ! --ctstate NEW --ctorigsrcport 1024:65535""")


def _tc_only(flavor):
    if flavor != "tc":
        pytest.skip("xdp has no OUTPUT hook (refusal checked above)")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_owner_on_tc_egress(flavor_labs):
    flavor, ref, cand = flavor_labs
    _tc_only(flavor)
    results = []
    for lab in (ref, cand):
        lab.load(OWNER_COUNTING)
        results.append((X.owner_traffic(lab), lab.counters()))
    assert results[0] == results[1]
    c = results[0][1]
    hit = [k for k, v in c.items() if v[0] and k[1] != "policy"]
    assert len(hit) >= 5, list(c.items())                         # not vacuous


def test_conntrack_on_tc_egress(flavor_labs):
    flavor, ref, cand = flavor_labs
    _tc_only(flavor)
    results = []
    for lab in (ref, cand):
        lab.load(CT_OUTPUT)
        results.append((X.stateful_traffic(lab), X.owner_traffic(lab), lab.counters()))
    assert results[0][:2] == results[1][:2]
    want, got = results[0][2], results[1][2]
    assert got == want, "\n".join(f"{k}: kernel {want[k]} bpfilter-tc {got.get(k)}"
                                   for k in want if want[k] != got.get(k))
    hit = [k for k, v in want.items() if v[0] and k[1] != "policy"]
    assert len(hit) >= 8, want                                    # not vacuous
