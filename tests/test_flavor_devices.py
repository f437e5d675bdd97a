"""Per-interface flavors (issue #5 item 4, docs/flavors.md "Per-interface flavors"): INPUT and
FORWARD on xdp or tc for some devices only, nf for the others. Differential against kernel
iptables-legacy with real packets through the lab, whose host receives on five devices (eth0,
eth1, veth-a, longifname12345, srv0): the served ones are filtered by the L2 flavor, the others
by nf, and every entry's counters equal the kernel's (each packet counted once); the same for
ip6tables. A device created or renamed later joins the L2 flavor when its name matches, stays on
nf otherwise. Moving between device sets, flavors and nf without a flush; the XDP root shared
with the other family; installs killed half way; the door; refusals; status."""
import errno
import os
import time

import pytest

import test_differential_handwritten as H
from lab import Lab, differential, number
from test_flavor_differential import FlavorLab, installer_for
from bpfilter_umh import attach
from bpfilter_umh import config as C
from bpfilter_umh.engine import Engine
from bpfilter_umh.errors import BpfilterError
from bpfilter_umh.model import AF_INET

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")

XDP_DEV = "INPUT=xdp:eth0:veth+,FORWARD=xdp:eth0:veth+,OUTPUT=nf"
TC_DEV = "INPUT=tc:eth1,FORWARD=nf,OUTPUT=nf"
# interface matches (-i on served and unserved devices, from user chains too), policies, ports
CASES = ["interfaces_seen_from_user_chains", "input_interfaces_wildcards_and_inversion",
         "nested_jumps_and_returns", "policy_drop_fallthrough",
         "output_interfaces_wildcards_and_inversion", "udp_ports_ranges_and_inversion"]


@pytest.fixture(scope="module", params=[XDP_DEV, TC_DEV])
def dev_labs(request):
    with Lab(tag="r") as ref, FlavorLab(installer=installer_for(request.param), tag="d") as cand:
        yield request.param, ref, cand


def _served(ns, flavor: str) -> dict:
    """{ifname: served by `flavor`} of the host's devices (its served map)."""
    with ns.inside():
        names = attach.interfaces()
        with attach.L2Attachment.open(flavor, "ipv4", create=False) as att:
            got = {int.from_bytes(k, "little") for k in att.served.keys()}
    return {n: i in got for i, n in names.items()}


@pytest.mark.parametrize("name", CASES)
def test_per_device_flavors_match_the_kernel(name, dev_labs):
    spec, ref, cand = dev_labs
    text, probes = H.CASES[name]()
    diffs = differential(ref, cand, text, number(probes))
    assert not diffs, f"flavors {spec} case {name}\n{text}\n" + "\n".join(diffs)
    fl = "xdp" if "xdp" in spec else "tc"
    served = _served(cand.host, fl)
    want = {"eth0", "veth-a"} if fl == "xdp" else {"eth1"}
    assert {n for n, s in served.items() if s} == want, served
    with cand.host.inside():
        st = cand.installer.engine.status()
    assert st["flavor"] == spec, st
    inp = {c["name"]: c for c in st["chains"]}["INPUT"]
    assert inp["flavor"] == fl and inp["fallback"] == "nf", inp
    assert inp["devices"] == list(C.parse_devices(spec)["INPUT"]), inp


# ---- devices added or renamed later ---------------------------------------------------------
def test_new_and_renamed_devices_follow_the_pattern():
    """INPUT on xdp for up+ only. The lab's vb (the receiving device) does not match: its
    datagrams are filtered and counted by nf. A device created later as up1 gets xdp (its
    link, served), one created as lan1 stays on nf, and renaming lan1 to up2 moves it to xdp;
    up1 renamed to lan2 goes back to nf (its link removed). Every datagram counted once."""
    from nsutil import Netns, veth
    from test_reliability_util import (P_BOTH_ACCEPT, P_BOTH_DROP, UdpProbe, two_rulesets)
    spec = "INPUT=xdp:up+,FORWARD=nf,OUTPUT=nf"
    ta, _tb = two_rulesets()
    with Netns("a") as a, Netns("b") as b, Netns("c") as c:
        veth(a, "va", b, "vb", "192.0.2.1/24", "192.0.2.2/24")
        with b.inside():
            eng = Engine.open(AF_INET, spec)
        probe = UdpProbe(a, b)
        try:
            with b.inside():
                eng.install(ta)
            assert not probe.passes(P_BOTH_DROP) and probe.passes(P_BOTH_ACCEPT)
            assert _served(b, "xdp") == {"lo": False, "vb": False}
            with b.inside():
                cnt = eng.counters()
            drop_rule = ta.chains[0].rules[0].index
            assert cnt[drop_rule][0] == 1, cnt
            # a device created later whose name matches: the watcher attaches xdp and serves it
            b.run("ip link add up1 type veth peer name lan1 && ip link set up1 up && "
                  "ip link set lan1 up")
            assert _wait(lambda: _served(b, "xdp").get("up1") and
                         os.path.exists(_link_pin(b, "up1"))), _served(b, "xdp")
            assert not _served(b, "xdp")["lan1"] and not os.path.exists(_link_pin(b, "lan1"))
            # renamed to match: served; renamed away: nf again, the link goes
            b.run("ip link set lan1 down && ip link set lan1 name up2 && ip link set up2 up")
            assert _wait(lambda: _served(b, "xdp").get("up2")), _served(b, "xdp")
            b.run("ip link set up1 down && ip link set up1 name lan2 && ip link set lan2 up")
            assert _wait(lambda: _served(b, "xdp").get("lan2") is False and
                         not os.path.exists(_link_pin(b, "lan2"))), _served(b, "xdp")
            # real traffic through a device renamed to match: c sends into b's up9 (xdp), a
            # into vb (nf)
            b.run("ip link del up2")            # and its peer lan2
            veth(c, "vc", b, "tmpb", "198.51.100.1/24", "198.51.100.2/24")
            b.run("ip link set tmpb down && ip link set tmpb name up9 && ip link set up9 up")
            assert _wait(lambda: _served(b, "xdp").get("up9")), _served(b, "xdp")
            # dropped and accepted datagrams (an accepted one filtered twice would be counted
            # twice: xdp passes it on to nf)
            before = _counts(b, eng, ta)
            sent = [_send_udp(c, "198.51.100.2", port, 3)
                    + _send_udp(a, "192.0.2.2", port, 2)
                    for port in (P_BOTH_DROP, P_BOTH_ACCEPT)]

            def delta():
                now = _counts(b, eng, ta)
                return [now[0] - before[0], now[1] - before[1]]
            assert _wait(lambda: delta() == sent), (delta(), sent)
            time.sleep(0.2)
            assert delta() == sent, "each datagram counted once"
            assert _xdp_on(b, "up9") and not _xdp_on(b, "vb")
        finally:
            probe.close()
            with b.inside():
                eng.flush()
                eng.close()
        with b.inside():
            assert not os.path.exists(os.path.join(attach.WATCH_ROOT, str(b.cookie),
                                                   "ipv4-xdp.devices"))


def _wait(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


def _link_pin(ns, ifname: str) -> str:
    with ns.inside():
        idx = {n: i for i, n in attach.interfaces().items()}.get(ifname, 0)
        d = os.path.join(os.path.dirname(attach.L2Attachment.directory("xdp", "ipv4")),
                         attach.XDP_ROOT_DIR)
    return os.path.join(d, f"link_{idx}_xdp")


def _xdp_on(ns, ifname: str) -> bool:
    return "prog/xdp" in ns.run(f"ip -d link show {ifname}").stdout


def _counts(b, eng, table) -> tuple:
    """Packet counts of INPUT's rule 1 (DROP 7001) and rule 3 (ACCEPT 7003)."""
    with b.inside():
        c = eng.counters()
    return tuple(c[table.chains[0].rules[k].index][0] for k in (0, 2))


def _send_udp(src, addr: str, port: int, n: int) -> int:
    """n datagrams from namespace src to addr:port; returns n."""
    import socket
    with src.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        for _ in range(n):
            s.sendto(b"x", (addr, port))
    return n


# ---- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,msg", [
    ("INPUT=nf:eth0", "dev= needs flavor tc or xdp"),
    ("INPUT=tc,OUTPUT=tc:eth0", "OUTPUT cannot be served per device"),
    ("INPUT=xdp:eth0,FORWARD=xdp,OUTPUT=nf", "every chain on xdp must name the same devices"),
    ("INPUT=xdp:eth0:bad/name,OUTPUT=nf", "bad interface name"),
    ("INPUT=xdp:e+0,OUTPUT=nf", "bad interface name"),
])
def test_impossible_device_specs_are_refused(spec, msg):
    with pytest.raises(BpfilterError, match=msg) as ei:
        Engine.open(AF_INET, spec)
    assert ei.value.errno == errno.EINVAL


def test_offload_with_devices_is_refused():
    with pytest.raises(BpfilterError, match="--offload with a chain served per device") as ei:
        Engine.open(AF_INET, "INPUT=xdp:eth0,FORWARD=nf,OUTPUT=nf", offload="eth0")
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("text,msg", [
    ("ipv4 = xdp dev=eth0\n", "dev= goes on a chain's line"),
    ("ipv4 INPUT = nf dev=eth0\n", "dev= needs flavor tc or xdp"),
    ("ipv4 OUTPUT = tc dev=eth0\n", "OUTPUT cannot be served per device"),
    ("ipv4 INPUT = xdp dev=eth0 offload=eth0\n", "offload with dev= is not supported"),
])
def test_impossible_device_config_is_refused(text, msg):
    with pytest.raises(BpfilterError, match=msg) as ei:
        C.parse(text)
    assert ei.value.errno == errno.EINVAL


def test_device_config_and_flags():
    cfg = C.parse("ipv4 INPUT = xdp dev=eth0,ens+\nipv4 FORWARD = xdp dev=eth0,ens+\n")
    assert cfg.flavor("ipv4") == "INPUT=xdp:eth0:ens+,FORWARD=xdp:eth0:ens+,OUTPUT=nf"
    assert C.parse_spec(cfg.flavor("ipv4")) == {"INPUT": "xdp", "FORWARD": "xdp",
                                                "OUTPUT": "nf"}
    cfg, rest = C.apply_flags(C.Config(), ["--flavor", "tc", "--flavor-dev", "up+", "x"])
    assert cfg.flavor("ipv4") == "INPUT=tc:up+,FORWARD=tc:up+,OUTPUT=nf" and rest == ["x"]
    with pytest.raises(BpfilterError, match="--flavor-dev needs INPUT or FORWARD"):
        C.apply_flags(C.Config(), ["--flavor-dev", "eth0"])
    assert C.device_matches("ens3", ("eth0", "ens+")) and not C.device_matches("eth01", ("eth0",))
    # the flag reaches `bpfilter exec` through split_flags
    flags, cmd = C.split_flags(["--flavor", "xdp", "--flavor-dev", "eth0", "--", "iptables"])
    assert flags == ["--flavor", "xdp", "--flavor-dev", "eth0"] and cmd == ["iptables"]


# ---- moving between per-device, whole-namespace and nf without a flush ------------------------
def _links(ns, flavor: str) -> set:
    """Names of the devices with a pinned link of `flavor` (ipv4; xdp: the shared root)."""
    with ns.inside():
        names = attach.interfaces()
        d = attach.L2Attachment.directory(flavor, "ipv4")
        if flavor == "xdp":
            d = os.path.join(os.path.dirname(d), attach.XDP_ROOT_DIR)
        if not os.path.isdir(d):
            return set()
        return {names.get(int(f.split("_")[1])) for f in os.listdir(d) if f.startswith("link_")}


def test_switching_between_device_sets_flavors_and_nf():
    """One table, installed again with each spec in turn (no flush); datagrams from a (into vb)
    and from c (into vc) after each install: every one counted exactly once, L2 links only on
    the devices the spec names, nothing left of a flavor no chain uses."""
    from nsutil import Netns, veth
    from test_reliability_util import (A_VERDICTS, P_BOTH_ACCEPT, P_BOTH_DROP, UdpProbe,
                                       two_rulesets)
    ta, _tb = two_rulesets()
    steps = [("nf", set(), set()),
             ("INPUT=xdp:vb,FORWARD=nf,OUTPUT=nf", {"vb"}, set()),
             ("INPUT=xdp,FORWARD=xdp,OUTPUT=nf", {"lo", "vb", "vc"}, set()),
             ("INPUT=xdp:v+,FORWARD=xdp:v+,OUTPUT=nf", {"vb", "vc"}, set()),
             ("INPUT=tc:vc,FORWARD=nf,OUTPUT=nf", set(), {"vc"}),
             ("INPUT=xdp:vb,FORWARD=nf,OUTPUT=nf", {"vb"}, set()),
             ("nf", set(), set())]
    # a dropped datagram ends at its first filter; an accepted one would go on to the next, so
    # the ACCEPT rule is the one that shows a packet filtered twice
    drop_rule, accept_rule = (ta.chains[0].rules[k].index for k in (0, 2))
    with Netns("a") as a, Netns("b") as b, Netns("c") as c:
        veth(a, "va", b, "vb", "192.0.2.1/24", "192.0.2.2/24")
        veth(c, "vc", b, "vc", "198.51.100.1/24", "198.51.100.2/24")
        probe = UdpProbe(a, b)
        try:
            for spec, xdp_on, tc_on in steps:
                with b.inside():
                    eng = Engine.open(AF_INET, spec)
                    eng.install(ta)
                    assert eng.counters()[drop_rule] == (0, 0)
                assert probe.verdicts() == A_VERDICTS, spec      # one datagram per port from a
                sent = [1 + _send_udp(c, "198.51.100.2", port, 3)
                        + _send_udp(a, "192.0.2.2", port, 2)
                        for port in (P_BOTH_DROP, P_BOTH_ACCEPT)]
                with b.inside():
                    def got():
                        c = eng.counters()
                        return [c[drop_rule][0], c[accept_rule][0]]
                    assert _wait(lambda: got()[0] >= sent[0] and got()[1] >= sent[1]), spec
                    time.sleep(0.2)
                    counted = got()
                    st = eng.status()
                    eng.close()
                assert counted == sent, (spec, counted, sent)
                assert st["flavor"] == spec, st
                from bpfilter_umh.cli import format_status
                text = format_status("ipv4", st)
                devs = C.parse_devices(spec).get("INPUT")
                fl = C.parse_spec(spec)["INPUT"]
                want = f"hook INPUT on {fl} (dev {','.join(devs)}) + nf" if devs else \
                    f"hook INPUT on {fl},"
                assert want in text, text
                assert _links(b, "xdp") == xdp_on and _links(b, "tc") == tc_on, spec
                for dev in ("vb", "vc"):
                    assert ("prog/xdp" in b.run(f"ip -d link show {dev}").stdout) == \
                        (dev in xdp_on), (spec, dev)
        finally:
            probe.close()
            with b.inside():
                eng = Engine.open(AF_INET)
                eng.flush()
                eng.close()


def test_xdp_root_shared_with_a_whole_namespace_family():
    """ip6tables on xdp everywhere puts the shared XDP root on every device; the ipv4 table on
    xdp for vb only still filters vc's IPv4 packets on nf alone (its dispatcher passes devices
    it does not serve): each datagram counted once."""
    from nsutil import Netns, veth
    from test_compile_ipv6_util import ACCEPT, table6
    from test_reliability_util import P_BOTH_ACCEPT, two_rulesets
    from bpfilter_umh.model import AF_INET6
    ta, _tb = two_rulesets()
    accept_rule = ta.chains[0].rules[2].index        # an accepted packet would reach nf too
    with Netns("a") as a, Netns("b") as b, Netns("c") as c:
        veth(a, "va", b, "vb", "192.0.2.1/24", "192.0.2.2/24")
        veth(c, "vc", b, "vc", "198.51.100.1/24", "198.51.100.2/24")
        with b.inside():
            e6 = Engine.open(AF_INET6, "xdp")
            e4 = Engine.open(AF_INET, "INPUT=xdp:vb,FORWARD=nf,OUTPUT=nf")
        try:
            with b.inside():
                e6.install(table6({"INPUT": (ACCEPT, [])}))
                e4.install(ta)
            assert _links(b, "xdp") == {"lo", "vb", "vc"}
            assert _served(b, "xdp") == {"lo": False, "vb": True, "vc": False}
            sent = _send_udp(c, "198.51.100.2", P_BOTH_ACCEPT, 3) \
                + _send_udp(a, "192.0.2.2", P_BOTH_ACCEPT, 2)
            with b.inside():
                assert _wait(lambda: e4.counters()[accept_rule][0] >= sent)
                time.sleep(0.2)
                assert e4.counters()[accept_rule][0] == sent
        finally:
            with b.inside():
                for e in (e4, e6):
                    e.flush()
                    e.close()


# ---- through the door: the config file's dev=, the --flavor-dev flag, `bpfilter status` -------
def test_door_serves_per_device_from_file_and_flag(netns, tmp_path):
    import json
    from test_door_flavor import BPFILTER, ROOT, _stop_helpers
    conf = tmp_path / "dev.conf"
    conf.write_text("ipv4 INPUT = tc dev=lo\n")
    env = dict(netns.env, BPFILTER_CONFIG=str(conf), PYTHONPATH=ROOT, BPFILTER_IDLE_EXIT="1")
    try:
        netns.run(f"{BPFILTER} exec -- iptables-legacy -A INPUT -p udp --dport 9 -j DROP",
                  env=env)
        st = json.loads(netns.run(f"{BPFILTER} status --json", env=env).stdout)["ipv4"]
        assert st["flavor"] == "INPUT=tc:lo,FORWARD=nf,OUTPUT=nf", st
        inp = {c["name"]: c for c in st["chains"]}["INPUT"]
        assert inp["flavor"] == "tc" and inp["devices"] == ["lo"] and inp["fallback"] == "nf"
        assert "hook INPUT on tc (dev lo) + nf" in netns.run(f"{BPFILTER} status", env=env).stdout
        _stop_helpers(netns)
        # the flag wins over the file; the table moves without a flush
        netns.run(f"{BPFILTER} exec --flavor xdp --flavor-dev lo -- "
                  "iptables-legacy -A INPUT -j ACCEPT", env=env)
        st = json.loads(netns.run(f"{BPFILTER} status --json", env=env).stdout)["ipv4"]
        assert st["flavor"] == "INPUT=xdp:lo,FORWARD=xdp:lo,OUTPUT=nf", st
        assert {c["name"]: c["rule_count"] for c in st["chains"]}["INPUT"] == 2
        # --flavor-dev alone restricts the file's tc/xdp chains; with none it is refused
        netns.run(f"{BPFILTER} exec --flavor-dev lo -- true", env=env)
        conf.write_text("ipv4 = nf\n")
        p = netns.run(f"{BPFILTER} exec --flavor-dev lo -- true", env=env, check=False)
        assert p.returncode == 2 and "--flavor-dev needs INPUT or FORWARD on tc or xdp" \
            in p.stderr, (p.returncode, p.stderr)
    finally:
        _stop_helpers(netns)
        netns.run(f"{BPFILTER} flush", env=env, check=False)


# ---- ip6tables -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["INPUT=xdp:h0,FORWARD=xdp:h0,OUTPUT=nf",
                                  "INPUT=tc:h1,FORWARD=tc:h1,OUTPUT=nf"])
def test_ipv6_per_device_flavors_match_the_kernel(spec):
    """The IPv6 lab's probes enter the host on h0: served by xdp in the first spec, by nf (tc
    serves h1 only) in the second. Against ip6tables-legacy: what passed each hook and every
    entry's counters."""
    import test_differential_ipv6 as D6
    from test_differential_ipv6_lab import KernelFilter
    from test_flavor_ipv6 import compare, flavor_filter, run
    want = run(KernelFilter, D6.RULESET, D6.PROBES)
    got = run(flavor_filter(spec), D6.RULESET, D6.PROBES)
    diffs = compare(D6.RULESET, want, got, 3)
    assert not diffs, f"flavors {spec}\n" + "\n".join(diffs)


# ---- an install killed half way ---------------------------------------------------------------
@pytest.mark.parametrize("fault", [
    "swap=kill@1",      # only the nf side of INPUT (its first swap) swapped
    "swap=kill@3",      # every nf program swapped, xdp INPUT not
    "stale=kill",       # every slot swapped, nothing emptied
])
def test_install_killed_with_a_per_device_chain_settles(fault):
    """An nf table, then an install of table B with INPUT on xdp for vb (nf elsewhere) killed
    at `fault`: the next Engine.open settles to B on every hook and both INPUT programs, and
    each datagram is counted once."""
    import sys
    from test_flavor_perchain import HELPER, ROOT
    from test_reliability_util import (A_VERDICTS, B_VERDICTS, P_BOTH_ACCEPT, udp_lab,
                                       two_rulesets)
    spec = "INPUT=xdp:vb,FORWARD=nf,OUTPUT=nf"
    ta, tb = two_rulesets()

    def teardown(b):
        with b.inside():
            eng = Engine.open(AF_INET)
            eng.flush()
            eng.close()
    with udp_lab(teardown) as (a, b, probe):
        with b.inside():
            Engine.open(AF_INET, "nf").install(ta)
        assert probe.verdicts() == A_VERDICTS
        code = HELPER.format(tests=os.path.join(ROOT, "tests"), root=ROOT, spec=spec)
        p = b.run([sys.executable, "-c", code], check=False,
                  env=dict(b.env, BPFILTER_FAULTS=fault))
        assert p.returncode in (-9, 137) and "installed" not in p.stdout, (p.returncode, p.stderr)
        with b.inside():
            eng = Engine.open(AF_INET, spec)        # settles
            assert not os.path.exists(eng._pending_path)
            assert eng.table.chain("INPUT").rules[1].target.verdict == -2       # B
            where = {}
            for f, progs in eng._programs_by_flavor().items():
                for h, prog in progs.items():
                    where.setdefault(h, set()).add(f)
                    prog.close()
        assert where == {1: {"nf", "xdp"}, 2: {"nf"}, 3: {"nf"}}, where
        assert probe.verdicts() == B_VERDICTS
        accept_rule = tb.chains[0].rules[2].index
        with b.inside():
            before = eng.counters()[accept_rule][0]
        sent = _send_udp(a, "192.0.2.2", P_BOTH_ACCEPT, 3)
        with b.inside():
            assert _wait(lambda: eng.counters()[accept_rule][0] - before >= sent)
            time.sleep(0.2)
            assert eng.counters()[accept_rule][0] - before == sent
            assert _served(b, "xdp")["vb"]
            eng.close()
