"""The door (`bpfilter exec`) and the helper, on the real kernel with the real binaries.

Each test runs in fresh namespaces; helpers started on demand exit after BPFILTER_IDLE_EXIT
seconds, and the netns fixture kills whatever is left."""
import ctypes
import errno
import json
import os
import struct
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


def env_of(ns, **kw):
    path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
    return dict(ns.env, **{"PYTHONPATH": path, "BPFILTER_IDLE_EXIT": "1", **kw})


def bexec(ns, cmd, check=False, env=None, **kw):
    """Run a shell command under `bpfilter exec` in ns."""
    return ns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", "sh", "-c", cmd],
                  check=check, env=env or env_of(ns), **kw)


def flush(ns):
    """Remove the namespace's bpfilter state (pins, links, state files) before it goes."""
    ns.run([PY, "-m", "bpfilter_umh.cli", "flush"], check=False, env=env_of(ns))


@pytest.fixture
def dns(netns):
    """The netns fixture, whose bpfilter state is flushed at the end whatever happens."""
    try:
        yield netns
    finally:
        flush(netns)


def wait_no_pids(ns, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not ns.pids():
            return True
        time.sleep(0.1)
    return False


def test_exit_status_and_signals(dns):
    assert bexec(dns, "exit 7").returncode == 7
    p = bexec(dns, "echo out; echo err >&2; exit 0")
    assert (p.returncode, p.stdout, p.stderr) == (0, "out\n", "err\n")
    p = bexec(dns, "kill -TERM $$")
    assert p.returncode in (-15, 143)
    p = dns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", "/nonexistent/cmd"],
                  check=False, env=env_of(dns))
    assert p.returncode == 127


def test_table_names_file(dns):
    # iptables-save reads the tables to dump from /proc/net/ip_tables_names
    assert bexec(dns, "cat /proc/net/ip_tables_names").stdout == "filter\n"
    assert bexec(dns, "cat /proc/net/ip6_tables_names").stdout == "filter\n"
    # a table the kernel serves (nat) is instantiated by the kernel and listed before filter
    assert bexec(dns, "iptables-legacy -t nat -L -n >/dev/null").returncode == 0
    assert bexec(dns, "cat /proc/net/ip_tables_names").stdout == "nat\nfilter\n"
    assert dns.run("cat /proc/net/ip_tables_names").stdout == "nat\n"
    # other files open normally
    assert bexec(dns, "head -c 4 /proc/self/status").stdout == "Name"


def test_list_empty_table_like_kernel(dns):
    from nsutil import Netns
    for cmd in ("iptables-legacy -L -n", "ip6tables-legacy -L -n -v --line-numbers",
                "iptables-legacy -S", "iptables-legacy-save -t filter | grep -v '^#'"):
        with Netns("k") as k:
            want = k.run(cmd, check=False)
        got = bexec(dns, cmd)
        assert (got.returncode, got.stdout, got.stderr) == \
               (want.returncode, want.stdout, want.stderr), cmd


def test_helper_goes_away(dns):
    assert bexec(dns, "iptables-legacy -L -n >/dev/null").returncode == 0
    assert wait_no_pids(dns), f"left running: {dns.pids()}"


def test_untranslatable_rule_refused_and_ruleset_untouched(dns):
    """GET_REVISION_TARGET for a target the compiler lacks is ENOENT (iptables warns, as for a
    target the kernel lacks); the SET_REPLACE that follows fails as a whole with the engine's
    errno, the helper logs the rule and why, and the running ruleset stays as it was."""
    assert bexec(dns, "iptables-legacy -A INPUT -s 192.0.2.1 -j DROP").returncode == 0
    before = bexec(dns, "iptables-legacy -S").stdout
    p = bexec(dns, "iptables-legacy -A INPUT -p tcp --tcp-flags SYN,RST SYN -j TCPMSS "
                   "--set-mss 1000")
    assert p.returncode == 1
    assert "TCPMSS revision 0 not supported" in p.stderr
    assert p.stderr.rstrip().endswith("iptables: Operation not supported.")
    assert bexec(dns, "iptables-legacy -S").stdout == before
    with open("/run/bpfilter/helper.log") as f:
        log = f.read()
    assert "SET_REPLACE: [ENOTSUP] chain INPUT rule 2" in log and "TCPMSS" in log


ERRNO_PROBE = os.path.join(HERE, "test_door_errno.py")


def test_errno_like_kernel(dns):
    """Malformed requests (wrong lengths, bad sizes, bad counters) get the kernel's errno."""
    from nsutil import Netns
    with Netns("k") as k:
        want = json.loads(k.run([PY, ERRNO_PROBE], env=env_of(k)).stdout)
    got = json.loads(dns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", PY, ERRNO_PROBE],
                               env=env_of(dns)).stdout)
    assert got == want


def test_stdio_helper_serves_the_callers_netns(dns):
    """`python3 -m bpfilter_umh` on stdin/stdout (the kernel shim's transport): the helper runs
    outside the caller's namespace and serves each request in the dns named by its cookie,
    reading and writing the caller's buffer in the caller's memory."""
    import threading
    from bpfilter_umh import frames
    from bpfilter_umh.sockopt import netns_cookie
    helper = subprocess.Popen([PY, "-m", "bpfilter_umh"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env_of(dns), cwd=ROOT)
    try:
        from nsutil import Netns
        with Netns("k") as k:
            want = json.loads(k.run([PY, ERRNO_PROBE], env=env_of(k)).stdout)

        def call(cmd, is_set, family, buf, length=None):
            req = frames.Request(cmd, is_set, family, tid, len(buf) if length is None else length,
                                 ctypes.addressof(buf), cookie)
            helper.stdin.write(req.pack())
            helper.stdin.flush()
            return frames.Reply.unpack(helper.stdout.read(frames.REPLY.size))

        with dns.inside():
            cookie, tid = netns_cookie(), threading.get_native_id()
            for family, fam in ((2, "ipv4"), (10, "ipv6")):
                info = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
                rep = call(64, 0, family, info)
                assert (rep.status, rep.len) == (0, 84)
                assert info.raw.hex() == want[fam]["info"][1]
                short = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
                assert call(64, 0, family, short, 83).status == -errno.EINVAL
                rev = ctypes.create_string_buffer(struct.pack("=29sB", b"tcp", 0), 30)
                rev_match = 68 if family == 10 else 66
                assert call(rev_match, 0, family, rev).status == 0
                struct.pack_into("=29sB", rev, 0, b"nosuchmatch", 0)
                assert call(rev_match, 0, family, rev).status == -errno.ENOENT
        # the caller left the namespace it named: refused, not served in the wrong one
        info = ctypes.create_string_buffer(b"filter".ljust(84, b"\0"), 84)
        assert call(64, 0, 2, info).status == -errno.ESRCH
        # a foreign frame ends the helper (the stream cannot be resynchronized)
        helper.stdin.write(b"\0" * frames.REQUEST.size)
        helper.stdin.close()
        assert helper.wait(timeout=10) == 1
    finally:
        helper.kill()
        helper.wait()


RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:pings - [0:0]
-A INPUT -i lo -p icmp --icmp-type echo-request -j pings
-A INPUT -p tcp --dport 22 -j DROP
-A pings -s 127.0.0.1 -j ACCEPT
COMMIT
"""


def test_status_counters_and_flush(dns):
    from bpfilter_umh.sockopt import netns_cookie
    slow = env_of(dns, BPFILTER_IDLE_EXIT="30")
    p = dns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", "iptables-legacy-restore"],
                input=RULES, env=slow, check=False)
    assert p.returncode == 0, p.stderr
    dns.run("ping -c 3 -i 0.2 -W 1 127.0.0.1 >/dev/null")
    st = json.loads(dns.run([PY, "-m", "bpfilter_umh.cli", "status", "--json"],
                            env=env_of(dns)).stdout)["ipv4"]
    chains = {c["name"]: c for c in st["chains"]}
    assert st["flavor"] == "nf" and set(chains) == {"INPUT", "FORWARD", "OUTPUT", "pings"}
    inp = chains["INPUT"]
    assert inp["hook"] == "INPUT" and inp["prog_id"] > 0 and inp["jited_size"] > 0
    assert inp["rule_count"] == 2 and chains["FORWARD"]["policy"] == "DROP"
    assert (inp["rules"][0]["pcnt"], inp["rules"][0]["bcnt"]) == (3, 3 * 84)
    assert chains["pings"]["rules"][0]["pcnt"] == 3
    # the same counters through the door: GET_ENTRIES reads the BPF maps
    out = bexec(dns, "iptables-legacy -L INPUT -v -x -n").stdout.splitlines()
    assert out[2].split()[:3] == ["3", "252", "pings"]
    text = dns.run([PY, "-m", "bpfilter_umh.cli", "status"], env=env_of(dns)).stdout
    assert "INPUT: hook INPUT on nf, prog id" in text and "252 bytes" in text
    # flush: pins and state gone, the namespace is back to the empty table
    with dns.inside():
        cookie = netns_cookie()
    assert os.path.isdir(f"/sys/fs/bpf/bpfilter/{cookie}")
    dns.run([PY, "-m", "bpfilter_umh.cli", "flush"], env=env_of(dns))
    assert not os.path.exists(f"/sys/fs/bpf/bpfilter/{cookie}")
    assert not os.path.exists(f"/run/bpfilter/{cookie}")
    # the helper still running notices the flush and re-adopts the (now empty) state
    assert bexec(dns, "iptables-legacy -S", env=slow).stdout == \
        "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n"
    assert dns.pids(), "the helper should have stayed up (BPFILTER_IDLE_EXIT=30)"


def test_namespaces_are_separate(dns):
    """One helper per network namespace: rules of one are invisible in another."""
    from nsutil import Netns
    with Netns("o") as other:
        try:
            assert bexec(dns, "iptables-legacy -A INPUT -s 192.0.2.1 -j DROP").returncode == 0
            assert bexec(other, "iptables-legacy -A OUTPUT -d 192.0.2.2 -j DROP").returncode == 0
            assert "-A INPUT -s 192.0.2.1/32 -j DROP" in bexec(dns, "iptables-legacy -S").stdout
            assert "-A OUTPUT" not in bexec(dns, "iptables-legacy -S").stdout
            assert "-A INPUT" not in bexec(other, "iptables-legacy -S").stdout
            # the kernel's own filter table of the namespace is untouched (never instantiated)
            assert dns.run("cat /proc/net/ip_tables_names").stdout == ""
        finally:
            flush(other)


def test_concurrent_doors_share_one_helper(dns):
    """Eight doors started at once in a namespace without a helper: each may spawn one, exactly
    one binds the abstract socket, and the xtables lock (-w) plus the helper's one-at-a-time
    serving leave all eight rules in place."""
    procs = [dns.popen([PY, "-m", "bpfilter_umh.cli", "exec", "--", "iptables-legacy", "-w",
                        "-A", "INPUT", "-s", f"192.0.2.{i}", "-j", "DROP"], env=env_of(dns),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(1, 9)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    rules = bexec(dns, "iptables-legacy -S INPUT").stdout.splitlines()[1:]
    assert sorted(rules) == sorted(f"-A INPUT -s 192.0.2.{i}/32 -j DROP" for i in range(1, 9))
    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""
    assert len([pid for pid in dns.pids() if b"--listen" in cmdline(pid)]) <= 1


DEMO_LIKE = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:services - [0:0]
:empty - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p icmp --icmp-type echo-request -j ACCEPT
-A INPUT -p tcp -j services
-A INPUT -s 192.0.2.0/24 ! -d 198.51.100.0/26 -p udp --sport 53 -j ACCEPT
-A services -p tcp --dport 22 -s 192.0.2.0/24 -j ACCEPT
-A services -p tcp --tcp-flags SYN,ACK SYN --dport 23 -j DROP
-A services -g empty
-A FORWARD -i eth+ ! -o veth0 -p tcp --sport 80 -j ACCEPT
-A FORWARD -f -j DROP
-A OUTPUT -p tcp --tcp-option 2 -j services
COMMIT
"""

SNAPSHOT = ("import sys; sys.path.insert(0, %r); import kernel_xt; info, blob = "
            "kernel_xt.snapshot(2); print(kernel_xt.uapi.ipt_getinfo.build(info).hex()); "
            "print(blob.hex())" % HERE)


def test_get_entries_byte_identical_to_kernel(dns):
    """After the same iptables-legacy-restore, GET_INFO and GET_ENTRIES through the door return
    exactly the kernel's bytes (comefrom, counters, padding included), before and after an
    `iptables -A` that goes through GET_ENTRIES/SET_REPLACE/ADD_COUNTERS again."""
    from nsutil import Netns
    steps = [("iptables-legacy-restore", DEMO_LIKE), ("iptables-legacy -A services -j RETURN", None)]
    with Netns("k") as k:
        want = []
        for cmd, inp in steps:
            k.run(cmd, input=inp)
            want.append(k.run([PY, "-c", SNAPSHOT], env=env_of(k)).stdout)
    got = []
    for cmd, inp in steps:
        assert bexec(dns, cmd, input=inp).returncode == 0
        got.append(dns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", PY, "-c", SNAPSHOT],
                           env=env_of(dns)).stdout)
    assert got == want


def test_caller_in_another_namespace(dns):
    """CMD that moves to another network namespace (`ip netns exec OTHER iptables ...` under
    one door) is served in the namespace it is in, not the door's."""
    from nsutil import Netns
    with Netns("m") as other:
        try:
            cmd = f"ip netns exec {other.name} iptables-legacy -A INPUT -s 192.0.2.7 -j DROP"
            assert bexec(dns, cmd).returncode == 0
            assert bexec(dns, f"ip netns exec {other.name} cat /proc/net/ip_tables_names"
                         ).stdout == "filter\n"
            assert "192.0.2.7" in bexec(other, "iptables-legacy -S").stdout
            assert "192.0.2.7" not in bexec(dns, "iptables-legacy -S").stdout
        finally:
            flush(other)


def test_demo_runs_and_cleans_up():
    """`make demo`: the sample firewall loaded through the door lets through and drops what it
    should, `iptables -L -v -n` and `bpfilter status` show it, and the demo's namespaces and
    processes are gone afterwards."""
    import re
    if os.geteuid() != 0:
        pytest.skip("needs root: the demo creates network namespaces")
    p = subprocess.run([PY, "-m", "bpfilter_umh.demo"], capture_output=True, text=True,
                       timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "== all traffic as expected ==" in p.stdout
    assert "DROPPED  tcp client -> host:23" in p.stdout
    assert "Chain services (1 references)" in p.stdout
    assert re.search(r"INPUT: hook INPUT on nf, prog id \d+, JIT \d+ bytes", p.stdout)
    names = re.search(r"client (\S+), host (\S+), server (\S+);", p.stdout).groups()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n.rstrip(",;") in listed for n in names)
