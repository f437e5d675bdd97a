"""Issue #6, addrtype's control plane: each command gives the same exit status, stdout and
stderr under `bpfilter exec` as against the kernel (fresh namespaces each side): rules are
accepted and listed back identically, and addrtype_mt_checkentry_v1()'s refusals (both
interface limits; --limit-iface-out in PREROUTING/INPUT, --limit-iface-in in OUTPUT/
POSTROUTING, also through a user chain; BROADCAST, BLACKHOLE, PROHIBIT and above for IPv6) come
with the kernel's errno. What bpfilter cannot translate exactly (IPv6 LOCAL, ANYCAST,
UNREACHABLE: a full IPv6 route lookup) is refused with EOPNOTSUPP naming the rule."""
import errno
import os
import sys

import pytest

from test_control_plane import run_both

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "test_control_plane.py")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

SCRIPT_V4 = """\
iptables-legacy -A INPUT -m addrtype --dst-type LOCAL -j ACCEPT
iptables-legacy -A INPUT -m addrtype --src-type LOCAL,BROADCAST ! --dst-type UNICAST
iptables-legacy -A INPUT -m addrtype ! --src-type MULTICAST --dst-type LOCAL --limit-iface-in
iptables-legacy -A FORWARD -m addrtype --dst-type BLACKHOLE,UNREACHABLE,PROHIBIT,THROW,NAT,XRESOLVE
iptables-legacy -A FORWARD -m addrtype --src-type ANYCAST --limit-iface-out -j DROP
iptables-legacy -A OUTPUT -m addrtype --src-type LOCAL --limit-iface-out -j DROP
iptables-legacy -A INPUT -m addrtype --dst-type LOCAL --limit-iface-out -j DROP
iptables-legacy -A OUTPUT -m addrtype --src-type LOCAL --limit-iface-in -j DROP
iptables-legacy -A FORWARD -m addrtype --dst-type LOCAL --limit-iface-in --limit-iface-out
iptables-legacy -N lim
iptables-legacy -A lim -m addrtype --dst-type LOCAL --limit-iface-out -j DROP
iptables-legacy -A FORWARD -j lim
iptables-legacy -A INPUT -j lim
iptables-legacy -S
iptables-legacy -L -n -v
iptables-legacy -D INPUT 1
iptables-legacy -S INPUT
"""

SCRIPT_V6 = """\
ip6tables-legacy -A INPUT -m addrtype --dst-type MULTICAST -j ACCEPT
ip6tables-legacy -A INPUT -m addrtype ! --src-type UNICAST -j DROP
ip6tables-legacy -A FORWARD -m addrtype --src-type UNSPEC --dst-type UNICAST,MULTICAST
ip6tables-legacy -A INPUT -m addrtype --dst-type BROADCAST -j DROP
ip6tables-legacy -A INPUT -m addrtype --dst-type BLACKHOLE -j DROP
ip6tables-legacy -A INPUT -m addrtype --src-type PROHIBIT -j DROP
ip6tables-legacy -A INPUT -m addrtype --src-type XRESOLVE -j DROP
ip6tables-legacy -A OUTPUT -m addrtype --src-type MULTICAST --limit-iface-in -j DROP
ip6tables-legacy -A INPUT -m addrtype --src-type MULTICAST --limit-iface-out -j DROP
ip6tables-legacy -S
"""


def _fidelity(netns, tmp_path, text, name):
    script = tmp_path / name
    script.write_text(text)
    kres, bres = run_both(netns, [sys.executable, RUNNER, str(script)])
    assert len(kres) == len(bres) == len(text.splitlines())
    bad = [f"$ {kr[0]}\n--- kernel rc={kr[1]}\n{kr[2]}{kr[3]}--- bpfilter rc={br[1]}\n"
           f"{br[2]}{br[3]}" for kr, br in zip(kres, bres) if kr != br]
    assert not bad, f"{len(bad)} of {len(kres)} commands differ:\n\n" + "\n\n".join(bad)
    return kres


def test_addrtype_commands_match_kernel(netns, tmp_path):
    kres = _fidelity(netns, tmp_path, SCRIPT_V4, "addrtype4.txt")
    assert sum(1 for r in kres if r[1] != 0) >= 4          # the refusals happened
    assert "--limit-iface-in" in kres[-4][2]                # and rev 1 was listed back


def test_addrtype6_commands_match_kernel(netns, tmp_path):
    kres = _fidelity(netns, tmp_path, SCRIPT_V6, "addrtype6.txt")
    assert sum(1 for r in kres if r[1] != 0) >= 5


def test_get_revision():
    from bpfilter_umh import sockopt
    from bpfilter_umh.uapi import NFPROTO_IPV4, NFPROTO_IPV6
    assert sockopt.supported_revisions(NFPROTO_IPV4, "addrtype", False) == {0, 1}
    # xt_addrtype registers revision 0 for NFPROTO_IPV4 only
    assert sockopt.supported_revisions(NFPROTO_IPV6, "addrtype", False) == {1}


@pytest.mark.parametrize("types", ["LOCAL", "ANYCAST", "UNREACHABLE", "UNICAST,LOCAL"])
def test_ipv6_routed_types_refused_naming_the_rule(netns, types):
    """The kernel accepts these (match_lookup_rt6 does a full route lookup); bpfilter refuses
    them with EOPNOTSUPP and says why, and the table stays as it was."""
    from test_control_plane import bpfilter_cmd
    env = dict(netns.env, PYTHONPATH=os.path.dirname(HERE), BPFILTER_IDLE_EXIT="1")
    try:
        netns.run(bpfilter_cmd("exec", "--", "ip6tables-legacy", "-A", "INPUT", "-j", "DROP"),
                  env=env)
        p = netns.run(bpfilter_cmd("exec", "--", "ip6tables-legacy", "-A", "INPUT", "-m",
                                   "addrtype", "--dst-type", types), env=env, check=False)
        assert p.returncode != 0
        assert os.strerror(errno.EOPNOTSUPP) in p.stderr or "not supported" in p.stderr, \
            p.stderr
        s = netns.run(bpfilter_cmd("exec", "--", "ip6tables-legacy", "-S", "INPUT"), env=env)
        assert s.stdout.splitlines() == ["-P INPUT ACCEPT", "-A INPUT -j DROP"]
    finally:
        netns.run(bpfilter_cmd("flush"), env=env, check=False)
