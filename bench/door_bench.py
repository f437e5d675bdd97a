#!/usr/bin/env python3
"""Benchmark (not a test): what the door costs.

Times `iptables-legacy -A INPUT ...` (followed by the matching -D, untimed, so the table keeps
its size) on an empty filter table and on a 1000-rule table, against the kernel's xtables and
through bpfilter, each in its own fresh network namespace, and prints the ratios.  Through
bpfilter it measures two ways:
  exec/cmd : `bpfilter exec -- iptables-legacy -A ...` per command (door start included)
  in-door  : the commands run by one shell under one `bpfilter exec` (the door already running,
             as for a script or the kernel shim's door): the per-request cost of the door,
             the helper and the compile/install of the new ruleset.
Usage: python3 bench/door_bench.py [-n REPEAT] [--rules 1000]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE = "INPUT -s 192.0.2.250 -p tcp --dport 9999 -j DROP"


def ruleset(n: int) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for i in range(n):
        lines.append(f"-A INPUT -s 198.51.{100 + i // 250}.{i % 250 + 1} -p udp "
                     f"--dport {1000 + i} -j DROP")
    return "\n".join(lines + ["COMMIT", ""])


INNER = r"""
import subprocess, sys, time
rule, n, door = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
out = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(door + ["iptables-legacy", "-A"] + rule.split(), check=True)
    out.append(time.perf_counter() - t)
    subprocess.run(door + ["iptables-legacy", "-D"] + rule.split(), check=True)
print(" ".join(map(str, out)))
"""


class Ns:
    def __init__(self, tag):
        self.name = f"bpfbench{os.getpid()}{tag}"
        self.lockdir = tempfile.mkdtemp(prefix="bpfbench-")
        self.env = dict(os.environ, XTABLES_LOCKFILE=os.path.join(self.lockdir, "lock"),
                        BPFILTER_IDLE_EXIT="30",
                        PYTHONPATH=ROOT + (":" + os.environ["PYTHONPATH"]
                                           if os.environ.get("PYTHONPATH") else ""))
        subprocess.run(["ip", "netns", "add", self.name], check=True)

    def run(self, argv, check=True, **kw):
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], env=self.env,
                              check=check, capture_output=True, text=True, timeout=900, **kw)

    def close(self):
        for pid in subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                                  text=True).stdout.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name])
        for f in os.listdir(self.lockdir):
            os.unlink(os.path.join(self.lockdir, f))
        os.rmdir(self.lockdir)


BEXEC = [sys.executable, "-m", "bpfilter_umh.cli", "exec", "--"]


def measure(mode: str, rules: int, n: int) -> float:
    ns = Ns(mode[0] + str(rules))
    try:
        outer = BEXEC if mode == "in-door" else []
        door = BEXEC if mode == "exec/cmd" else []
        load = outer + door + ["iptables-legacy-restore"]
        ns.run(load, input=ruleset(rules))
        times = ns.run(outer + [sys.executable, "-c", INNER, RULE, str(n), *door]).stdout.split()
        return statistics.median(float(t) for t in times)
    finally:
        if mode != "kernel":     # remove pins and state before the namespace goes
            p = ns.run([sys.executable, "-m", "bpfilter_umh.cli", "flush"], check=False)
            if p.returncode:
                print(f"bpfilter flush failed in {ns.name}: {p.stderr}", file=sys.stderr)
        ns.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--rules", type=int, default=1000)
    args = ap.parse_args()
    print(f"median of {args.n} x `iptables-legacy -A {RULE}`")
    print(f"{'table':>12} {'kernel':>10} {'in-door':>10} {'exec/cmd':>10} "
          f"{'ratio in-door':>14} {'ratio exec/cmd':>15}")
    for rules in (0, args.rules):
        k = measure("kernel", rules, args.n)
        d = measure("in-door", rules, args.n)
        e = measure("exec/cmd", rules, args.n)
        print(f"{str(rules) + ' rules':>12} {k * 1e3:8.1f}ms {d * 1e3:8.1f}ms {e * 1e3:8.1f}ms "
              f"{d / k:13.1f}x {e / k:14.1f}x", flush=True)


if __name__ == "__main__":
    main()
