"""`--offload IFNAME` through the door, on a device without a BPF offload engine (veth: no NFP
on this machine; the success path runs on netdevsim in the qemu guest, tests/kmod/
guest-offload.sh): the unmodified iptables-legacy fails with the kernel-style errno, the helper's
log names the reason, and the ruleset installed before keeps filtering real packets."""
import json
import os
import sys

import pytest

from nsutil import Netns, veth
from test_door_flavor import _stop_helpers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPFILTER = f"{sys.executable} -m bpfilter_umh.cli"
LOG = "/run/bpfilter/helper.log"


def _env(ns):
    return dict(ns.env, PYTHONPATH=ROOT, BPFILTER_IDLE_EXIT="1", BPFILTER_CONFIG="/dev/null")


def _udp_arrives(a, b, port: int) -> bool:
    """One datagram from b to a's 192.0.2.1:port: received?"""
    srv = a.popen(f"timeout 3 socat -u UDP4-RECV:{port},bind=192.0.2.1 STDOUT",
                  stdout=__import__("subprocess").PIPE, text=True)
    try:
        import time
        time.sleep(0.3)
        b.run(f"echo hi | socat -u STDIN UDP4-SENDTO:192.0.2.1:{port}")
        out, _ = srv.communicate(timeout=5)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    return "hi" in out


def test_offload_on_veth_is_refused_and_changes_nothing():
    dev = f"vo{os.getpid() % 100000}"          # names this test's lines in the shared log
    with Netns("o") as a, Netns("p") as b:
        veth(a, dev, b, "vp", "192.0.2.1/24", "192.0.2.2/24")
        env = _env(a)
        try:
            a.run(f"{BPFILTER} exec --flavor xdp -- iptables-legacy -A INPUT -p udp --dport 9 "
                  f"-j DROP", env=env)
            assert not _udp_arrives(a, b, 9) and _udp_arrives(a, b, 10)
            _stop_helpers(a)
            start = os.path.getsize(LOG) if os.path.exists(LOG) else 0
            p = a.run(f"{BPFILTER} exec --flavor xdp --offload {dev} -- iptables-legacy "
                      f"-A INPUT -p udp --dport 10 -j DROP", env=env, check=False)
            assert p.returncode != 0, p.stdout + p.stderr
            assert "iptables" in p.stderr, p.stderr          # iptables' own message
            with open(LOG) as f:
                f.seek(start)
                log = f.read()
            assert f"--offload: device {dev} has no BPF offload engine" in log, log[-2000:]
            _stop_helpers(a)
            # nothing changed: the one rule, no offload state, and it still filters
            st = json.loads(a.run(f"{BPFILTER} status --json", env=env).stdout)["ipv4"]
            assert st["flavor"] == "xdp" and "offload" not in st
            inp = [c for c in st["chains"] if c["name"] == "INPUT"][0]
            assert inp["rule_count"] == 1 and inp["prog_id"]
            assert not _udp_arrives(a, b, 9) and _udp_arrives(a, b, 10)
            assert not os.path.exists(f"/sys/fs/bpf/bpfilter/{_cookie(a)}/ipv4-xdp-offload")
        finally:
            _stop_helpers(a)
            a.run(f"{BPFILTER} flush", env=env, check=False)


def _cookie(ns) -> int:
    from bpfilter_umh import kernel as K
    with ns.inside():
        return K.netns_cookie()


def test_engine_refusal_keeps_the_previous_ruleset():
    """Engine.install with offload on veth: BpfilterError EOPNOTSUPP before anything is
    swapped (same generation, same programs)."""
    import errno
    from bpfilter_umh.engine import Engine
    from bpfilter_umh.errors import BpfilterError
    from bpfilter_umh.model import AF_INET
    from test_compile_util import ACCEPT, DROP, rule, table, udp
    with Netns("o") as a, Netns("p") as b:
        veth(a, "vo", b, "vp", "192.0.2.1/24", "192.0.2.2/24")
        with a.inside():
            eng = Engine.open(AF_INET, "xdp")
            try:
                eng.install(table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(9, 9)), proto=17)])}))
                before = (eng.generation, eng.status()["chains"][0]["prog_id"])
                off = Engine.open(AF_INET, "xdp", offload="vo")
                with pytest.raises(BpfilterError, match="device vo has no BPF offload engine") \
                        as ei:
                    off.install(table({"INPUT": (ACCEPT, [rule(DROP, proto=17)])}))
                assert ei.value.errno == errno.EOPNOTSUPP
                again = Engine.open(AF_INET, "xdp")
                assert (again.generation, again.status()["chains"][0]["prog_id"]) == before
                assert again.offloaded is None
                with pytest.raises(BpfilterError, match="--offload needs --flavor xdp"):
                    Engine.open(AF_INET, "tc", offload="vo")
            finally:
                Engine.open(AF_INET, "xdp").flush()
