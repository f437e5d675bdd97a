"""Policy for tables the compiler cannot translate (docs/policy.md), on the real kernel with the
real iptables-legacy binaries under `python3 -m bpfilter_umh exec`, and real packets through a
veth pair:

  reject (default)  the refused SET_REPLACE fails with EOPNOTSUPP and a message naming the rule;
                    the previous ruleset keeps filtering; the kernel's table is never created
  xtables           the table goes to the kernel's own xtables of the namespace (kernel counters
                    move, iptables-legacy without the door sees it), comes back to bpfilter when
                    it translates again (the kernel's table left empty), counters continuous;
                    the whole command sequence is compared with plain kernel iptables-legacy
                    (same `-L -v -x -n` after every step, same packets delivered); the delegated
                    state survives a helper restart (the shared helper, killed by pid)
"""
import contextlib
import json
import os
import re
import signal
import sys
import time

import pytest

from nsutil import Netns, veth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# rules that only count (no target), using a match bpfilter does not translate and the kernel has
# (/proc/net/ip_tables_matches); the first one the compiler refuses is used
CANDIDATES = ["-m time --timestart 00:00:00 --timestop 23:59:59",
              "-m string --algo bm --string bpft"]

SEND_UDP = ("import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "for p in sys.argv[2:]:\n"
            "    s.sendto(b'x'*32,(sys.argv[1],int(p)))\n")


def _env(ns, **kw):
    env = dict(ns.env, PYTHONPATH=ROOT, BPFILTER_IDLE_EXIT="1")
    env.update(kw)
    return env


class Side:
    """A server namespace whose filter table is driven either by plain iptables-legacy (the
    kernel: the oracle) or through the door; the client sends to it over a veth."""

    def __init__(self, client: Netns, subnet: str, door_flags=None, env=None):
        self.ns = Netns("s")
        self.addr = f"{subnet}.2"
        try:
            veth(client, f"c{subnet.split('.')[0]}", self.ns, "eth0", f"{subnet}.1/24",
                 f"{self.addr}/24")
            # ICMP errors (port unreachable for the UDP probes) unlimited, so the count of
            # packets the server sends does not depend on timing (net/ipv4/icmp.c
            # icmpv4_xrlim_allow)
            self.ns.run("sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv4.icmp_msgs_per_sec=100000")
        except BaseException:
            self.ns.close()
            raise
        self.client = client
        self.door = door_flags
        self.env = env or _env(self.ns)

    def ipt(self, args: str, check=True, binary="iptables-legacy"):
        argv = [binary, *args.split()] if isinstance(args, str) else [binary, *args]
        if self.door is not None:
            argv = [PY, "-m", "bpfilter_umh", "exec", *self.door, "--", *argv]
        return self.ns.run(argv, check=check, env=self.env)

    def kernel_direct(self, args: str):
        """The kernel's own table, without the door (only once it exists: reading it creates
        the per-netns table, which would then hold netfilter priority 0 before bpfilter)."""
        return self.ns.run(["iptables-legacy", *args.split()], env=self.env).stdout

    def listing(self) -> str:
        return self.ipt("-L -v -x -n").stdout

    def traffic(self):
        """3 pings and UDP datagrams to ports 9 and 10 (no listener); returns the echo replies
        received and how many datagrams reached the server's UDP layer (Udp NoPorts)."""
        before = self._noports()
        p = self.client.run(f"ping -c 3 -i 0.05 -W 0.3 {self.addr}", check=False)
        self.client.run([PY, "-c", SEND_UDP, self.addr, "9", "10", "9"])
        m = re.search(r"(\d+) received", p.stdout)
        return (int(m.group(1)) if m else -1), self._noports() - before

    def _noports(self) -> int:
        rows = [ln.split() for ln in self.ns.run("cat /proc/net/snmp").stdout.splitlines()
                if ln.startswith("Udp:")]
        return int(rows[1][rows[0].index("NoPorts")])

    def close(self):
        if self.door is not None:
            self.ns.run([PY, "-m", "bpfilter_umh", "flush"], check=False, env=self.env)
            _forget_delegation(self.ns)
        self.ns.close()


def _forget_delegation(ns):
    """The delegated flags of a namespace about to go (a failed test may leave a table
    delegated; `bpfilter flush` keeps the flag, since the kernel's table still filters)."""
    from bpfilter_umh.sockopt import netns_cookie
    with ns.inside():
        d = f"/run/bpfilter/{netns_cookie()}"
    for f in ("ipv4.delegated", "ipv6.delegated"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(d, f))
    with contextlib.suppress(OSError):
        os.rmdir(d)


@pytest.fixture
def client():
    with Netns("c") as c:
        yield c


@pytest.fixture(scope="module")
def rule():
    """A count-only rule the compiler refuses today (probed through the door, default policy,
    in a scratch namespace); the tests skip if every candidate has become translatable."""
    with Netns("p") as ns:
        env = _env(ns)
        try:
            for cand in CANDIDATES:
                p = ns.run([PY, "-m", "bpfilter_umh", "exec", "--", "iptables-legacy", "-A",
                            "INPUT", *cand.split()], check=False, env=env)
                if p.returncode != 0 and "Operation not supported" in p.stderr:
                    return cand
        finally:
            ns.run([PY, "-m", "bpfilter_umh", "flush"], check=False, env=env)
    pytest.skip("every candidate match is translated by the compiler now: no untranslatable "
                "rule left to test the policy with")


def _tables_names(ns) -> str:
    return ns.run("cat /proc/net/ip_tables_names").stdout


def test_default_reject_keeps_the_old_ruleset(client, rule):
    with contextlib.closing(Side(client, "192.0.2", door_flags=[])) as b:
        b.ipt("-A INPUT -p icmp -j DROP")
        assert b.traffic() == (0, 3)
        log_size = os.path.getsize("/run/bpfilter/helper.log")
        p = b.ipt(f"-A INPUT {rule}", check=False)
        assert p.returncode == 1 and "iptables: Operation not supported." in p.stderr, p.stderr
        with open("/run/bpfilter/helper.log") as f:
            f.seek(log_size)
            log = f.read()
        assert re.search(r"SET_REPLACE: \[(EOPNOTSUPP|ENOTSUP)\] chain INPUT rule 2 .*is not "
                         r"supported by the compiler.*\(policy reject: nothing changed", log), log
        assert rule.split()[1] in log                       # the match is named
        # nothing changed: the old ruleset is listed and keeps filtering, the kernel's table
        # was never created (its names file lists none)
        assert b.ipt("-S INPUT").stdout == "-P INPUT ACCEPT\n-A INPUT -p icmp -j DROP\n"
        assert b.traffic() == (0, 3)
        assert _tables_names(b.ns) == ""
        st = json.loads(b.ns.run([PY, "-m", "bpfilter_umh", "status", "--json"],
                                 env=b.env).stdout)["ipv4"]
        assert st["policy"] == "reject" and st["delegated"] is False


# (command, who serves the table after it: "kernel" (delegated) or "bpfilter")
def _steps(rule):
    return [("-A INPUT -p icmp -j DROP", "bpfilter"),
            (f"-I INPUT {rule}", "kernel"),
            ("-A INPUT -p udp --dport 9 -j DROP", "kernel"),
            ("-Z INPUT", "kernel"),
            ("-D INPUT 1", "bpfilter"),
            (f"-A OUTPUT {rule}", "kernel"),
            ("-F OUTPUT", "bpfilter")]


def test_xtables_policy_matches_plain_iptables(client, rule):
    seen = set()
    xtables = ["--policy", "xtables"]
    with contextlib.closing(Side(client, "192.0.2")) as k, \
            contextlib.closing(Side(client, "198.51.100", door_flags=xtables)) as b:
        for i, (cmd, who) in enumerate(_steps(rule)):
            k.ipt(cmd)
            b.ipt(cmd)
            got_k, got_b = k.traffic(), b.traffic()
            seen.add(got_k[1])
            assert got_b == got_k, f"step {i} {cmd!r}: (replies, udp delivered) {got_b}, " \
                                   f"kernel {got_k}"
            lk, lb = k.listing(), b.listing()
            assert lb == lk, f"step {i} {cmd!r}:\n--- bpfilter\n{lb}--- kernel\n{lk}"
            # iptables-legacy-save -c too (it reads the table names file the door fakes)
            assert _save(b) == _save(k), f"step {i} {cmd!r}"
            st = json.loads(b.ns.run([PY, "-m", "bpfilter_umh", "status", "--json"],
                                     env=b.env).stdout)["ipv4"]
            if who == "kernel":
                assert st["delegated"] is True, (i, cmd, st)
                # the kernel's own table holds the ruleset (iptables-legacy without the door)
                assert b.kernel_direct("-S") == k.ipt("-S").stdout
                # a door without the flag (policy reject) still shows the kernel's rules in full:
                # GET_REVISION asks the kernel while it holds the table
                plain = b.ns.run([PY, "-m", "bpfilter_umh", "exec", "--", "iptables-legacy",
                                  "-S"], env=b.env)
                assert plain.stdout == k.ipt("-S").stdout and "unsupported" not in plain.stderr
                assert all(c["rule_count"] == 0 for c in st["chains"])   # bpfilter: accept-all
            else:
                assert st["delegated"] is False, (i, cmd, st)
                if "filter" in _tables_names(b.ns):
                    # taken back: the kernel's table is empty, every policy ACCEPT
                    assert b.kernel_direct("-S") == ("-P INPUT ACCEPT\n-P FORWARD ACCEPT\n"
                                                     "-P OUTPUT ACCEPT\n")
                assert sum(c["rule_count"] for c in st["chains"]) == \
                    len(k.ipt("-S").stdout.splitlines()) - 3
        assert seen == {3, 1}       # the UDP DROP rule, added while delegated, took effect


def _save(side) -> str:
    return re.sub(r"^#.*\n", "", side.ipt("-c", binary="iptables-legacy-save").stdout,
                  flags=re.M)


def test_xtables_policy_ipv6(rule):
    """The same switch for ip6tables: hand-over, kernel enforcing, take-back, counters as plain
    ip6tables-legacy shows them (pings over lo, dropped at INPUT)."""
    steps = ["-A INPUT -p ipv6-icmp --icmpv6-type echo-request -j DROP", f"-I INPUT {rule}",
             "-D INPUT 1"]
    with Netns("k6") as k, Netns("b6") as b:
        env = _env(b)
        door = [PY, "-m", "bpfilter_umh", "exec", "--policy", "xtables", "--"]
        try:
            for i, cmd in enumerate(steps):
                k.run(["ip6tables-legacy", *cmd.split()], env=_env(k))
                b.run([*door, "ip6tables-legacy", *cmd.split()], env=env)
                for ns in (k, b):
                    ns.run("ping -6 -c 2 -i 0.05 -W 0.3 ::1", check=False)
                lk = k.run("ip6tables-legacy -L -v -x -n", env=_env(k)).stdout
                lb = b.run([*door, "ip6tables-legacy", "-L", "-v", "-x", "-n"], env=env).stdout
                assert lb == lk, f"step {i} {cmd!r}:\n--- bpfilter\n{lb}--- kernel\n{lk}"
                st = json.loads(b.run([PY, "-m", "bpfilter_umh", "status", "--json"],
                                      env=env).stdout)["ipv6"]
                assert st["delegated"] is (i == 1), (i, st)
                direct = b.run("ip6tables-legacy -S INPUT", env=env).stdout
                assert (rule.split()[1] in direct) is (i == 1), direct
                assert ("DROP" in direct) is (i == 1), direct
        finally:
            b.run([PY, "-m", "bpfilter_umh", "flush"], check=False, env=env)
            _forget_delegation(b)


def _helpers(ns):
    """This namespace's helper processes (the pid namespace is shared: only ours, by pid)."""
    out = []
    for pid in ns.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"bpfilter_umh\0--listen" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def test_delegated_table_survives_helper_restart(client, tmp_path, rule):
    conf = tmp_path / "bpfilter.conf"
    conf.write_text("ipv4 policy = xtables\n")
    side = Side(client, "203.0.113", door_flags=[])
    side.env = _env(side.ns, BPFILTER_CONFIG=str(conf), BPFILTER_IDLE_EXIT="30")
    try:
        side.ipt(f"-A INPUT {rule}")
        side.ipt("-A INPUT -p icmp -j DROP")
        assert side.traffic()[0] == 0
        before = side.listing()
        assert rule.split()[1].upper() in before.upper()
        # the shared helper (--listen) is running; kill it hard, as a crash would
        pids = _helpers(side.ns)
        assert pids, "no shared helper found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert side.traffic()[0] == 0                              # the kernel still drops
        after = side.listing()                                     # a new helper answers
        assert _packets(after, "DROP") == _packets(before, "DROP") + 3
        st = json.loads(side.ns.run([PY, "-m", "bpfilter_umh", "status", "--json"],
                                    env=side.env).stdout)["ipv4"]
        assert st["policy"] == "xtables" and st["delegated"] is True
        assert "is not supported by the compiler" in st["delegated_reason"]
        text = side.ns.run([PY, "-m", "bpfilter_umh", "status"], env=side.env).stdout
        assert "ipv4 table filter" in text
        # and it comes back: deleting the untranslatable rule
        side.ipt(f"-D INPUT {rule}")
        assert side.traffic()[0] == 0
        assert side.kernel_direct("-S INPUT") == "-P INPUT ACCEPT\n"
        assert _packets(side.listing(), "DROP") == _packets(before, "DROP") + 6
    finally:
        for pid in _helpers(side.ns):
            os.kill(pid, signal.SIGTERM)
        side.close()


def _packets(listing: str, target: str) -> int:
    for line in listing.splitlines():
        f = line.split()
        if len(f) > 2 and f[2] == target:
            return int(f[0])
    raise AssertionError(f"no {target} rule in\n{listing}")


def test_kernel_table_created_first_stays_with_the_kernel(rule):
    """iptables-legacy ran without the door first, so the kernel's filter table holds netfilter
    priority 0 and bpfilter cannot attach (EBUSY): under policy xtables the untranslatable table
    is still enforced by the kernel, and taking it back fails with EBUSY, saying the table stays
    with the kernel, and changes nothing."""
    with Netns("e") as ns:
        env = _env(ns)
        door = [PY, "-m", "bpfilter_umh", "exec", "--policy", "xtables", "--", "iptables-legacy"]
        try:
            ns.run("iptables-legacy -L", env=env)                 # the kernel's table exists
            ns.run([*door, "-A", "INPUT", *rule.split()], env=env)
            ns.run([*door, "-A", "INPUT", "-p", "icmp", "-j", "DROP"], env=env)
            assert "0 received" in ns.run("ping -c 2 -i 0.05 -W 0.3 127.0.0.1", check=False).stdout
            before = ns.run("iptables-legacy -S", env=env).stdout
            assert "-A INPUT -p icmp -j DROP" in before
            log_size = os.path.getsize("/run/bpfilter/helper.log")
            p = ns.run([*door, "-D", "INPUT", "1"], check=False, env=env)
            assert p.returncode == 1 and "Device or resource busy" in p.stderr, p.stderr
            with open("/run/bpfilter/helper.log") as f:
                f.seek(log_size)
                assert "the table stays with the kernel's xtables" in f.read()
            assert ns.run("iptables-legacy -S", env=env).stdout == before
            assert ns.run([*door, "-S"], env=env).stdout == before
        finally:
            ns.run([PY, "-m", "bpfilter_umh", "flush"], check=False, env=env)
            _forget_delegation(ns)
