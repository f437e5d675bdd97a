"""Issue #6, addrtype on flavors tc and xdp: the same trie lookup as on nf (the mirror of the
local table is a map any program type can read), so the IPv4 differential ruleset of
test_ext_addrtype.py without its interface limits gives the kernel's verdicts and counters;
--limit-iface-in/out (the hook's device, which only a netfilter hook has) is refused naming
the rule and the reason. One flavor difference shows here and is left out: on tc an OUTPUT
drop of a broadcast datagram does not stop the copy ip_mc_output() loops back to the host.

    BPFILTER_FLAVORS=tc pytest tests/test_ext_addrtype_flavors.py
"""
import os

import pytest

import test_ext_addrtype as A
from lab import Lab
from test_differential_ext_flavors import _compare
from test_flavor_differential import FLAVORS, FlavorLab, installer_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


@pytest.fixture(scope="module", params=FLAVORS)
def flavor_labs(request):
    with Lab(tag="r") as ref, FlavorLab(installer=installer_for(request.param), tag="f") as cand:
        for lab in (ref, cand):
            A._prepare(lab)
        yield request.param, ref, cand


def test_addrtype_on_flavor(flavor_labs):
    flavor, ref, cand = flavor_labs
    text = "".join(ln + "\n" for ln in A.RULES.splitlines() if "--limit-iface" not in ln)
    diffs = _compare(flavor, ref, cand, text, A._probes())
    if flavor == "tc":
        # not addrtype's: ip_mc_output() (net/ipv4/ip_output.c) loops a copy of a broadcast
        # datagram back to the host before the device's egress, where tc drops the one that
        # leaves; the kernel's OUTPUT drop comes before both (the counters still agree)
        diffs = [d for d in diffs if not (d.startswith("probe OUTPUT") and "-> 192.0.2.63 " in d
                                          and d.endswith(f"bpfilter-{flavor}: seen at host"))]
    assert not diffs, f"flavor {flavor}\n" + "\n".join(diffs)


def test_interface_limits_refused_on_flavor(flavor_labs):
    flavor, ref, cand = flavor_labs
    with pytest.raises(Exception, match=r"chain INPUT rule 1 .*addrtype --limit-iface-in is not "
                                        rf"supported by flavor {flavor} .*use flavor nf"):
        cand.load(A._table("-A INPUT -m addrtype --dst-type LOCAL --limit-iface-in"))
