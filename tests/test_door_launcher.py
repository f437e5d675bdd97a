"""bin/bpfilter-exec (the C launcher): hands its seccomp listener to the running helper
(BPFILTER_CMD_HOLD, BPFILTER_CMD_ADOPT) and becomes the command; the Python door otherwise.

Real helpers in namespaces of ours, the real iptables-legacy binaries, packets through a veth.
Which door served a command is told by its pid: under the launcher the command is the process
we started (exec in place), under the Python door it is the door's child."""
import errno
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from bpfilter_umh import frames
from nsutil import Netns, veth
from test_door import dns, env_of, wait_no_pids  # noqa: F401 - dns: the fixture

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
LAUNCHER = os.path.join(ROOT, "build", "bpfilter-exec")


@pytest.fixture(scope="module")
def launcher():
    subprocess.run(["make", "-s", "-C", ROOT, "launcher", f"PYTHON={PY}"], check=True,
                   capture_output=True)
    return LAUNCHER


def start_helper(ns, idle="5"):
    """The namespace's shared helper, running before the launcher comes (as after any first
    `bpfilter exec`); waits until it listens."""
    proc = ns.popen([PY, "-m", "bpfilter_umh", "--listen"],
                    env=env_of(ns, BPFILTER_IDLE_EXIT=idle), stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        with ns.inside(), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(frames.HELPER_SOCKET)
                return proc
            except OSError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("helper did not start: " + proc.stderr.read().decode())


def launch(ns, argv, env=None, input=None):
    """Run argv under the launcher in ns; returns (CompletedProcess, pid of what we started)."""
    p = ns.popen([LAUNCHER, "--", *argv], env=env or env_of(ns, BPFILTER_IDLE_EXIT="5"),
                 stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(input, timeout=60)
    return subprocess.CompletedProcess(argv, p.returncode, out, err), p.pid


def test_adopted_door_serves_iptables(launcher, dns):
    helper = start_helper(dns)
    # the command is the process we started: no door process in between
    p, pid = launch(dns, ["sh", "-c", "echo $$"])
    assert (p.returncode, p.stdout) == (0, f"{pid}\n")
    for i in (1, 2):
        p, _ = launch(dns, ["iptables-legacy", "-A", "INPUT", "-s", f"192.0.2.{i}", "-j", "DROP"])
        assert p.returncode == 0, p.stderr
    p, _ = launch(dns, ["iptables-legacy", "-S", "INPUT"])
    assert p.stdout.splitlines() == ["-P INPUT ACCEPT", "-A INPUT -s 192.0.2.1/32 -j DROP",
                                     "-A INPUT -s 192.0.2.2/32 -j DROP"]
    # the kernel's own filter table saw none of it; nat stays the kernel's
    assert "192.0.2" not in dns.run("iptables-legacy -S").stdout
    p, _ = launch(dns, ["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT"])
    assert p.returncode == 0, p.stderr
    assert "-A POSTROUTING -j ACCEPT" in dns.run("iptables-legacy -t nat -S").stdout
    # iptables-save reads the table names through the door, then restores through it
    p, _ = launch(dns, ["iptables-legacy-save"])
    assert "*filter" in p.stdout and "*nat" in p.stdout
    saved = p.stdout.replace("192.0.2.2/32", "192.0.2.3/32")
    p, _ = launch(dns, ["iptables-legacy-restore"], input=saved)
    assert p.returncode == 0, p.stderr
    p, _ = launch(dns, ["iptables-legacy", "-S", "INPUT"])
    assert p.stdout.splitlines()[-1] == "-A INPUT -s 192.0.2.3/32 -j DROP"
    helper.kill()
    helper.wait()


def test_exit_status_errors_and_signals(launcher, dns):
    start_helper(dns)
    assert launch(dns, ["sh", "-c", "exit 7"])[0].returncode == 7
    assert launch(dns, ["sh", "-c", "kill -TERM $$"])[0].returncode == -15
    p, _ = launch(dns, ["/nonexistent/cmd"])
    assert p.returncode == 127 and "command not found" in p.stderr
    # an error of the helper reaches iptables as the kernel's errno would (ENOENT: no chain)
    p, _ = launch(dns, ["iptables-legacy", "-A", "NOSUCH", "-j", "DROP"])
    assert p.returncode != 0 and "No chain/target/match by that name" in p.stderr


def test_packets_follow_rules_set_through_launcher(launcher, dns):
    with Netns("peer") as peer:
        veth(dns, "l0", peer, "p0", "192.0.2.1/24", "192.0.2.2/24")
        start_helper(dns)
        assert peer.run("ping -c1 -W1 192.0.2.1", check=False).returncode == 0
        p, _ = launch(dns, ["iptables-legacy", "-A", "INPUT", "-p", "icmp", "-j", "DROP"])
        assert p.returncode == 0, p.stderr
        assert peer.run("ping -c1 -W1 192.0.2.1", check=False).returncode != 0
        p, _ = launch(dns, ["iptables-legacy", "-L", "INPUT", "-v", "-x", "-n"])
        drop = [ln for ln in p.stdout.splitlines() if "DROP" in ln]
        assert drop and int(drop[0].split()[0]) >= 1    # the dropped ping was counted
        p, _ = launch(dns, ["iptables-legacy", "-D", "INPUT", "1"])
        assert p.returncode == 0, p.stderr
        assert peer.run("ping -c1 -W1 192.0.2.1", check=False).returncode == 0


def test_falls_back_to_python_door(launcher, dns):
    # no helper yet: the Python door runs the command (its child) and starts the helper
    p, pid = launch(dns, ["sh", "-c", "echo $$; iptables-legacy -A INPUT -j ACCEPT"],
                    env=env_of(dns, BPFILTER_IDLE_EXIT="5"))
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) != pid
    # now it is running: adopted
    p, pid = launch(dns, ["sh", "-c", "echo $$; iptables-legacy -S INPUT"])
    assert p.stdout.splitlines() == [str(pid), "-P INPUT ACCEPT", "-A INPUT -j ACCEPT"]
    # flags and a door trace are the Python door's
    p = dns.run([LAUNCHER, "--policy", "reject", "--", "sh", "-c", "echo $$"], check=False,
                env=env_of(dns))
    assert p.returncode == 0, p.stderr
    trace = os.path.join(dns._lockdir, "trace")
    p = dns.run([LAUNCHER, "--", "iptables-legacy", "-S", "INPUT"], check=False,
                env=env_of(dns, BPFILTER_DOOR_TRACE=trace))
    assert p.returncode == 0 and "getsockopt" in open(trace).read()


def test_falls_back_to_the_python_it_was_built_with(launcher, dns, tmp_path):
    # the fallback door runs the interpreter `make launcher` ran, by its path (the Makefile's
    # LAUNCHER_PYTHON), not the first python3 in PATH: here that one is a stand-in that fails
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho not this python >&2\nexit 3\n")
    fake.chmod(0o755)
    path = f"{tmp_path}:/usr/sbin:/usr/bin:/sbin:/bin"
    p, pid = launch(dns, ["sh", "-c", "echo $$; iptables-legacy -A INPUT -j DROP"],
                    env=env_of(dns, BPFILTER_IDLE_EXIT="5", PATH=path))
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) != pid                 # the Python door ran it
    p, _ = launch(dns, ["iptables-legacy", "-S", "INPUT"], env=env_of(dns, PATH=path))
    assert p.stdout.splitlines() == ["-P INPUT ACCEPT", "-A INPUT -j DROP"], p.stderr


def test_adopted_doors_served_side_by_side(launcher, dns):
    # several commands at once, each with its own listener in the helper's loop; iptables
    # serializes the changes on the xtables lock (-w), the helper the requests
    start_helper(dns)
    env = env_of(dns, BPFILTER_IDLE_EXIT="5")
    procs = [dns.popen([LAUNCHER, "--", "iptables-legacy", "-w", "-A", "INPUT", "-s",
                        f"198.51.100.{i}", "-j", "DROP"], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE) for i in range(1, 7)]
    for p in procs:
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    p, _ = launch(dns, ["iptables-legacy", "-S", "INPUT"])
    assert sorted(p.stdout.splitlines()[1:]) == [f"-A INPUT -s 198.51.100.{i}/32 -j DROP"
                                                 for i in range(1, 7)]


def test_helper_stays_while_an_adopted_command_runs(launcher, dns):
    helper = start_helper(dns, idle="0.5")
    p, _ = launch(dns, ["sh", "-c", "sleep 2; iptables-legacy -A INPUT -j ACCEPT; "
                                    "iptables-legacy -S INPUT"])
    assert p.returncode == 0 and "-A INPUT -j ACCEPT" in p.stdout, p.stderr
    # and leaves once the command is gone and it was idle
    helper.wait(timeout=10)
    assert wait_no_pids(dns)


def test_adopt_refuses_what_is_not_a_listener(launcher, dns):
    start_helper(dns)
    hold = frames.Request(cmd=frames.BPFILTER_CMD_HOLD, is_set=0, family=0, pid=0, len=0, addr=0)
    adopt = frames.Request(cmd=frames.BPFILTER_CMD_ADOPT, is_set=0, family=0, pid=0, len=0,
                           addr=0)
    r, w = os.pipe()
    try:
        with dns.inside(), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(frames.HELPER_SOCKET)
            s.sendall(hold.pack())
            assert frames.Reply.unpack(s.recv(frames.REPLY.size)).status == 0
            socket.send_fds(s, [adopt.pack()], [r])
            assert frames.Reply.unpack(s.recv(frames.REPLY.size)).status == -errno.EBADF
            s.sendall(adopt.pack())         # no descriptor at all
            assert frames.Reply.unpack(s.recv(frames.REPLY.size)).status == -errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    # the helper serves on
    p, _ = launch(dns, ["iptables-legacy", "-S", "INPUT"])
    assert p.stdout == "-P INPUT ACCEPT\n"


def test_filter_is_the_python_doors(launcher):
    from bpfilter_umh.door import filter_c_initializer
    with open(os.path.join(ROOT, "build", "door_filter.h")) as f:
        assert f.read() == filter_c_initializer()
    assert struct.calcsize("=HBBI") == 8


def _has_static_libc() -> bool:
    cc = os.environ.get("CC", "cc")
    p = subprocess.run([cc, "-static", "-x", "c", "-", "-o", os.devnull],
                       input="int main(void){return 0;}\n", text=True, capture_output=True)
    return p.returncode == 0


def test_launcher_static_where_it_can(launcher):
    """The Makefile links the launcher statically when the toolchain has a static libc (no
    ld.so at each command's start): no PT_INTERP program header then."""
    if not _has_static_libc():
        pytest.skip("no static libc: the launcher is linked dynamically")
    with open(launcher, "rb") as f:
        elf = f.read(1 << 16)
    # ELF64 little endian: e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types, "the launcher asks for a dynamic loader (PT_INTERP)"   # PT_INTERP
