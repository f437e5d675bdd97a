"""The demo (`make demo`, `python3 -m bpfilter_umh.demo`): a lab of three network namespaces,

    client 192.0.2.2 ──── 192.0.2.1 host 198.51.100.1 ──── 198.51.100.2 server
                                  (routes, filters)

a sample firewall loaded into the host with the unmodified `iptables-legacy-restore` through the
door (`bpfilter exec`), traffic that shows what passes and what is dropped, and `iptables -L -v -n`
whose counters come from the BPF maps, then `bpfilter status`.  Everything it creates is removed
at the end, also on failure.  `--kernel` runs the same demo against the kernel's xtables, for
comparison.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

FIREWALL = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:services - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p icmp --icmp-type echo-request -j ACCEPT
-A INPUT -p tcp -j services
-A services -p tcp --dport 22 -s 192.0.2.0/24 -j ACCEPT
-A services -p tcp --dport 23 -j DROP
-A FORWARD -p tcp --sport 80 -j ACCEPT
-A FORWARD -p tcp -d 198.51.100.2 --dport 80 -j ACCEPT
-A FORWARD -p udp -d 198.51.100.2 --dport 53 -j ACCEPT
-A FORWARD -p udp --sport 53 -j ACCEPT
-A FORWARD -p icmp -j DROP
COMMIT
"""

# (what, from namespace, shell command, expected to pass)
TRAFFIC = [
    ("ping client -> host", "client", "ping -c 2 -W 1 -i 0.2 192.0.2.1", True),
    ("tcp client -> host:22 (ssh allowed from 192.0.2.0/24)", "client", "connect 192.0.2.1 22", True),
    ("tcp client -> host:23 (telnet dropped)", "client", "connect 192.0.2.1 23", False),
    ("tcp client -> server:80 (forwarded web)", "client", "connect 198.51.100.2 80", True),
    ("tcp client -> server:8080 (not allowed: FORWARD policy DROP)", "client",
     "connect 198.51.100.2 8080", False),
    ("udp client -> server:53 (forwarded dns)", "client", "udp 198.51.100.2 53", True),
    ("ping client -> server (forwarded icmp dropped)", "client",
     "ping -c 1 -W 1 198.51.100.2", False),
]

# one-shot clients: connect() with a timeout, or a UDP request that expects an echo
CONNECT = ("import socket,sys; s=socket.create_connection((sys.argv[1],int(sys.argv[2])),"
           "timeout=1); s.close()")
UDP = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1);"
       "s.sendto(b'q',(sys.argv[1],int(sys.argv[2]))); s.recv(9)")
# servers in the host and the server namespace: accept TCP on every port used, echo UDP
SERVER = """
import selectors, socket, sys, time
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port)); t.listen(8); sel.register(t, selectors.EVENT_READ, "tcp")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    sel.register(u, selectors.EVENT_READ, "udp")
end = time.monotonic() + 120
while time.monotonic() < end:
    for key, _ in sel.select(1):
        if key.data == "tcp":
            c, _ = key.fileobj.accept(); c.close()
        else:
            data, peer = key.fileobj.recvfrom(64); key.fileobj.sendto(data, peer)
"""


class Demo:
    def __init__(self, kernel: bool):
        self.kernel = kernel
        self.tag = f"bpfdemo{os.getpid()}"
        self.ns = {n: f"{self.tag}-{n}" for n in ("client", "host", "server")}
        self.procs = []
        self.lockdir = tempfile.mkdtemp(prefix="bpfdemo-")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env = dict(os.environ, XTABLES_LOCKFILE=os.path.join(self.lockdir, "xtables.lock"),
                        PYTHONPATH=root + (":" + os.environ["PYTHONPATH"]
                                           if os.environ.get("PYTHONPATH") else ""))

    def sh(self, ns, cmd, check=True, show=False, input=None):
        argv = ["ip", "netns", "exec", self.ns[ns], "sh", "-c", cmd]
        p = subprocess.run(argv, capture_output=True, text=True, env=self.env, input=input,
                           timeout=60)
        if show:
            sys.stdout.write(p.stdout + p.stderr)
        if check and p.returncode:
            raise RuntimeError(f"{ns}: {cmd}: exit {p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def iptables(self, args: str, **kw):
        """An unmodified iptables-legacy command in the host, through the door unless --kernel."""
        # the door as README shows it: the checkout's launcher (bin/bpfilter)
        launcher = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bin", "bpfilter")
        door = "" if self.kernel else f"{sys.executable} -S {launcher} exec -- "
        return self.sh("host", door + args, **kw)

    def build(self):
        for n in self.ns.values():
            subprocess.run(["ip", "netns", "add", n], check=True)
        for n in self.ns:
            self.sh(n, "ip link set lo up")
        links = [("client", "c0", "192.0.2.2/24", "host", "h0", "192.0.2.1/24"),
                 ("host", "h1", "198.51.100.1/24", "server", "s0", "198.51.100.2/24")]
        for i, (a, ia, aa, b, ib, ba) in enumerate(links):
            tmp = f"bd{os.getpid() % 100000}{i}"
            subprocess.run(["ip", "link", "add", tmp + "a", "netns", self.ns[a], "type", "veth",
                            "peer", "name", tmp + "b", "netns", self.ns[b]], check=True)
            self.sh(a, f"ip link set {tmp}a name {ia} && ip addr add {aa} dev {ia} && "
                       f"ip link set {ia} up")
            self.sh(b, f"ip link set {tmp}b name {ib} && ip addr add {ba} dev {ib} && "
                       f"ip link set {ib} up")
        self.sh("client", "ip route add default via 192.0.2.1")
        self.sh("server", "ip route add default via 198.51.100.1")
        self.sh("host", "sysctl -qw net.ipv4.ip_forward=1")
        for ns, ports in (("host", "22 23"), ("server", "53 80 8080")):
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", self.ns[ns], sys.executable, "-c", SERVER, *ports.split()],
                env=self.env))
        time.sleep(0.5)

    def traffic(self):
        print("\n== traffic (client and server namespaces; the host filters) ==")
        ok = True
        for what, ns, cmd, expect in TRAFFIC:
            kind, *args = cmd.split()
            if kind == "connect":
                cmd = f"{sys.executable} -c \"{CONNECT}\" {' '.join(args)}"
            elif kind == "udp":
                cmd = f"{sys.executable} -c \"{UDP}\" {' '.join(args)}"
            passed = self.sh(ns, cmd + " >/dev/null 2>&1", check=False).returncode == 0
            verdict = "passes " if passed else "DROPPED"
            mark = "" if passed == expect else "   <-- UNEXPECTED"
            ok &= passed == expect
            print(f"  {verdict}  {what}{mark}")
        return ok

    def run(self) -> int:
        try:
            self.build()
            mode = "the kernel's xtables" if self.kernel else "bpfilter (eBPF) through the door"
            print(f"== lab: client {self.ns['client']}, host {self.ns['host']}, "
                  f"server {self.ns['server']}; filter served by {mode} ==")
            print("\n== host: iptables-legacy-restore < sample firewall ==")
            sys.stdout.write(FIREWALL)
            self.iptables("iptables-legacy-restore", input=FIREWALL, show=True)
            ok = self.traffic()
            print("\n== host: iptables-legacy -L -v -n (counters"
                  f"{' from the kernel' if self.kernel else ' read from the BPF maps'}) ==")
            self.iptables("iptables-legacy -L -v -n", show=True)
            if not self.kernel:
                print("\n== host: bpfilter status ==")
                self.sh("host", f"{sys.executable} -m bpfilter_umh.cli status", show=True,
                        check=False)
            print("\n== all traffic as expected ==" if ok else "\n== SOME TRAFFIC UNEXPECTED ==")
            return 0 if ok else 1
        finally:
            self.close()

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        if not self.kernel:
            for _ in range(1):
                subprocess.run(["ip", "netns", "exec", self.ns["host"], sys.executable, "-m",
                                "bpfilter_umh.cli", "flush"], env=self.env,
                               capture_output=True)
        for n in self.ns.values():
            pids = subprocess.run(["ip", "netns", "pids", n], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        for f in os.listdir(self.lockdir):
            os.unlink(os.path.join(self.lockdir, f))
        os.rmdir(self.lockdir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="store_true", help="use the kernel's xtables instead")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo creates network namespaces: run it as root", file=sys.stderr)
        return 1
    return Demo(args.kernel).run()


if __name__ == "__main__":
    sys.exit(main())
