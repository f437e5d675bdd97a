"""The helper's command-line flags (issue #5) and the policy setting (docs/policy.md):

  - `python3 -m bpfilter_umh exec --flavor tc -- iptables-legacy -A ...` really attaches tc (a
    clsact bpf filter on the veth, UDP to the dropped port never reaches the socket layer), the
    flag winning over the config file, for that command only;
  - bad flags are refused before anything runs;
  - `policy = xtables` / `ipv6 policy = reject` / --policy parse and are checked;
  - the kernel shim's transport (helper on stdin/stdout, no --door) never hands a table to the
    kernel's xtables, whatever the flag says: the untranslatable SET_REPLACE is refused and the
    namespace's kernel table is never created.
"""
import ctypes
import errno
import json
import os
import struct
import subprocess
import sys
import threading

import pytest

from bpfilter_umh import config as C
from bpfilter_umh.errors import BpfilterError
from nsutil import Netns, veth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _env(ns, **kw):
    env = dict(ns.env, PYTHONPATH=ROOT, BPFILTER_IDLE_EXIT="1")
    env.update(kw)
    return env


def _udp_noports(ns) -> int:
    lines = [ln.split() for ln in ns.run("cat /proc/net/snmp").stdout.splitlines()
             if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("NoPorts")])


SEND = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for p in sys.argv[2:]:\n    s.sendto(b'x',(sys.argv[1],int(p)))\n")


def test_exec_flavor_flag_attaches_tc(tmp_path):
    conf = tmp_path / "nf.conf"
    conf.write_text("ipv4 = nf\n")                 # the flag must win over this
    with Netns("c") as client, Netns("s") as server:
        veth(client, "eth0", server, "eth0", "192.0.2.1/24", "192.0.2.2/24")
        env = _env(server, BPFILTER_CONFIG=str(conf))
        try:
            server.run([PY, "-m", "bpfilter_umh", "exec", "--flavor", "tc", "--",
                        "iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j",
                        "DROP"], env=env)
            st = json.loads(server.run([PY, "-m", "bpfilter_umh", "status", "--json"],
                                       env=env).stdout)["ipv4"]
            assert st["flavor"] == "tc"
            inp = next(c for c in st["chains"] if c["name"] == "INPUT")
            assert inp["prog_id"] and inp["rule_count"] == 1
            assert set(inp["link"]["interfaces"]["eth0"]) == {"ingress", "egress"}
            # the kernel's view: the pinned links of this netns are tcx links (enum
            # bpf_link_type BPF_LINK_TYPE_TCX = 11), and no netfilter attachment exists
            from bpfilter_umh.sockopt import netns_cookie
            with server.inside():
                pins = f"/sys/fs/bpf/bpfilter/{netns_cookie()}"
            types = set()
            for dirpath, _dirs, files in os.walk(pins):
                for f in files:
                    p = subprocess.run(["bpftool", "-j", "link", "show", "pinned",
                                        os.path.join(dirpath, f)], capture_output=True, text=True)
                    if p.returncode == 0:
                        types.add(json.loads(p.stdout)["type"])
            assert types and types <= {11, "tcx"}, types
            assert not os.path.exists(os.path.join(pins, "ipv4"))
            # real packets: port 9 is dropped at tc ingress, port 10 reaches UDP (no listener)
            before = _udp_noports(server)
            client.run([PY, "-c", SEND, "192.0.2.2", "9", "10", "9", "10", "9"])
            assert _udp_noports(server) - before == 2
            # the flag held for that command only: without it the file's nf is asked for, and
            # the installed tc table moves to nf at this install (no flush needed: docs/flavors.md
            # "Per-chain flavors")
            server.run([PY, "-m", "bpfilter_umh", "exec", "--", "iptables-legacy", "-A",
                        "INPUT", "-j", "ACCEPT"], env=env)
            p = server.run([PY, "-m", "bpfilter_umh", "exec", "--flavor", "tc", "--",
                            "iptables-legacy", "-S", "INPUT"], env=env)
            assert p.stdout == ("-P INPUT ACCEPT\n-A INPUT -p udp -m udp --dport 9 -j DROP\n"
                                "-A INPUT -j ACCEPT\n")
            st = json.loads(server.run([PY, "-m", "bpfilter_umh", "status", "--json"],
                                       env=env).stdout)["ipv4"]
            assert st["flavor"] == "nf"
        finally:
            server.run([PY, "-m", "bpfilter_umh", "flush"], check=False, env=env)


@pytest.mark.parametrize("flags,cmd,msg", [
    (["--flavor", "ebpf", "--"], True, "unknown flavor 'ebpf'"),
    (["--policy", "maybe"], True, "unknown policy 'maybe'"),
    (["--offload", "eth0"], True, "--offload needs --flavor xdp"),
    (["--policy"], False, "--policy needs a value"),
    (["--policy", "xtables", "--"], False, "missing command"),
])
def test_bad_exec_flags_refused_before_running(flags, cmd, msg, tmp_path):
    marker = tmp_path / "ran"
    argv = [PY, "-m", "bpfilter_umh", "exec", *flags] + (["touch", str(marker)] if cmd else [])
    p = subprocess.run(argv, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert not marker.exists()


def test_helper_flags_refused():
    p = subprocess.run([PY, "-m", "bpfilter_umh", "--listen", "--policy", "sometimes"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 2 and "unknown policy 'sometimes'" in p.stderr


def test_policy_settings_parse():
    cfg = C.parse("policy = xtables\nipv6 policy = reject\nipv4 = tc\n")
    assert cfg.policy("ipv4") == "xtables" and cfg.policy(10) == "reject"
    assert cfg.flavor("ipv4") == "tc"
    assert C.parse("").policy(2) == "reject"                       # the default
    cfg, rest = C.apply_flags(C.parse("policy = xtables"), ["--policy", "reject", "x"])
    assert cfg.policy(2) == cfg.policy(10) == "reject" and rest == ["x"]
    assert C.split_flags(["--policy", "xtables", "--", "iptables", "--policy"]) == \
        (["--policy", "xtables"], ["iptables", "--policy"])
    assert C.split_flags(["iptables-legacy", "--flavor", "tc"]) == \
        ([], ["iptables-legacy", "--flavor", "tc"])
    for text, msg in [("policy = accept", "unknown policy 'accept'"),
                      ("ipv5 policy = xtables", r"expected '\[FAMILY\] policy"),
                      ("policy = xtables reject", r"expected '\[FAMILY\] policy")]:
        with pytest.raises(BpfilterError, match=msg) as ei:
            C.parse(text)
        assert ei.value.errno == errno.EINVAL


def test_process_flags_apply_over_the_file(tmp_path, monkeypatch):
    conf = tmp_path / "f.conf"
    conf.write_text("policy = reject\nipv4 = nf\n")
    monkeypatch.setattr(C, "_process_flags", [])
    assert C.set_flags(["--door", "--policy", "xtables", "--flavor", "tc"]) == ["--door"]
    cfg = C.load(str(conf))
    assert cfg.policy("ipv4") == "xtables" and cfg.flavor("ipv4") == "tc"
    assert "policy xtables" in C.status_text(dict(family="ipv4", table="filter", flavor="tc",
                                                  policy="xtables", delegated=True, chains=[]))


def test_kernel_shim_helper_never_delegates(netns):
    """The helper on stdin/stdout without --door is the kernel shim's: bpfilter.ko owns the
    socket-option range there, so policy xtables must not apply even when asked for."""
    from bpfilter_umh import frames
    from bpfilter_umh.passthrough import GETINFO, KernelXt, REPLACE_HDR
    from bpfilter_umh.sockopt import netns_cookie
    rule = ["-m", "quota", "--quota", "1000"]
    # an untranslatable table, as the kernel holds it, from a scratch namespace's kernel xtables
    with Netns("k") as k:
        k.run(["iptables-legacy", "-A", "INPUT", *rule])
        with k.inside():
            kx = KernelXt(2)
            info = GETINFO.unpack(kx.getinfo())
            entries = kx.getsockopt(65, struct.pack("=32sI4x", b"filter", info[13]),
                                    40 + info[13])[40:]
    blob = REPLACE_HDR.pack(b"filter", info[1], info[12], info[13], *info[2:12], 4, 0) + entries
    buf = ctypes.create_string_buffer(blob, len(blob))
    old = ctypes.create_string_buffer(4 * 16)
    struct.pack_into("=Q", buf, REPLACE_HDR.size - 8, ctypes.addressof(old))
    helper = subprocess.Popen([PY, "-m", "bpfilter_umh", "--policy", "xtables"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=_env(netns), cwd=ROOT)
    try:
        with netns.inside():
            req = frames.Request(64, 1, 2, threading.get_native_id(), len(buf),
                                 ctypes.addressof(buf), netns_cookie())
            helper.stdin.write(req.pack())
            helper.stdin.flush()
            rep = frames.Reply.unpack(helper.stdout.read(frames.REPLY.size))
            # GET_REVISION of a match the compiler lacks: not asked of the kernel either
            rev = ctypes.create_string_buffer(struct.pack("=29sB", b"quota", 0), 30)
            helper.stdin.write(frames.Request(66, 0, 2, threading.get_native_id(), 30,
                                              ctypes.addressof(rev), netns_cookie()).pack())
            helper.stdin.flush()
            rev_rep = frames.Reply.unpack(helper.stdout.read(frames.REPLY.size))
        assert rep.status == -errno.EOPNOTSUPP
        assert rev_rep.status == -errno.ENOENT
        assert netns.run("cat /proc/net/ip_tables_names").stdout == ""
    finally:
        helper.stdin.close()
        helper.wait(timeout=10)
        netns.run([PY, "-m", "bpfilter_umh", "flush"], check=False, env=_env(netns))
