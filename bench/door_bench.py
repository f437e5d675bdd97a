#!/usr/bin/env python3
"""Benchmark (not a test): what the door costs.

Times `iptables-legacy -A INPUT ...` (followed by the matching -D, untimed, so the table keeps
its size) on an empty filter table and on a 1000-rule table, against the kernel's xtables and
through bpfilter, each in its own fresh network namespace, and prints the ratios.  Through
bpfilter it measures two ways:
  exec/cmd : `bpfilter exec -- iptables-legacy -A ...` per command (door start included)
  launcher : `build/bpfilter-exec -- iptables-legacy -A ...` per command (the door handed to
             the running helper: no Python start)
  in-door  : the commands run by one shell under one `bpfilter exec` (the door already running,
             as for a script or the kernel shim's door): the per-request cost of the door,
             the helper and the compile/install of the new ruleset.
Usage: python3 bench/door_bench.py [-n REPEAT] [--rules 1000]

`--scenarios` times instead the commands of issue #8, each a whole `bpfilter exec -- CMD` against
the same CMD on the kernel's xtables, the helper already running (it stays between commands):
  -L -n on an empty table, -A on a 10-rule and on a 10 000-rule blocklist (bench/rulesets.py),
  iptables-legacy-restore of the 10 000-rule blocklist (replacing itself each time),
  and, once, the first command of a namespace (helper started by the door: "cold").
`--door "python3 -S -m bpfilter_umh exec --"` measures another way of starting the door.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG_ROOT = ROOT           # where the door and the helper come from (--pkg)
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
                        PYTHONPATH=PKG_ROOT + (":" + os.environ["PYTHONPATH"]
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


BEXEC = [sys.executable, "-S", os.path.join(ROOT, "bin", "bpfilter"), "exec", "--"]   # README's door
# the door without Python (`make launcher`): hands its listener to the running helper
LAUNCHER = [os.path.join(ROOT, "build", "bpfilter-exec"), "--"]

# one timed command per round, then an untimed one that restores the table (or nothing)
TIMED = r"""
import resource, subprocess, sys, time
n, door, timed, undo, stdin = int(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), \
    sys.argv[4].split(), sys.argv[5]
data = open(stdin, "rb").read() if stdin else None
def cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
out = []
for _ in range(n):
    c, t = cpu(), time.perf_counter()
    subprocess.run(door + timed, input=data, check=True, stdout=subprocess.DEVNULL)
    out.append(f"{time.perf_counter() - t}:{cpu() - c}")
    if undo:
        subprocess.run(door + undo, check=True, stdout=subprocess.DEVNULL)
print(" ".join(out))
"""


def scenario(door: list, rules: int, timed: str, undo: str, restore: bool, n: int,
             cold: bool = False) -> tuple:
    """(median wall, min wall, median CPU) of `door + timed` in a fresh namespace holding a
    `rules`-rule blocklist (loaded through the same door); the helper runs already unless
    `cold`. CPU is user+system of the command and the door (not the helper's): on a loaded
    machine it moves less than the wall time."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from rulesets import make
    ns = Ns("s")
    text = make("blocklist", rules).text if rules else ruleset(0)
    path = os.path.join(ns.lockdir, "rules")
    with open(path, "w") as f:
        f.write(text)
    try:
        if rules:
            ns.run(door + ["iptables-legacy-restore"], input=text)
        elif not cold:
            ns.run(door + ["iptables-legacy", "-L", "-n"])      # starts the helper
        times = ns.run([sys.executable, "-c", TIMED, str(n), " ".join(door), timed, undo,
                        path if restore else ""]).stdout.split()
        wall = [float(t.split(":")[0]) for t in times]
        return (statistics.median(wall), min(wall),
                statistics.median(float(t.split(":")[1]) for t in times))
    finally:
        if door:
            p = ns.run([sys.executable, "-m", "bpfilter_umh.cli", "flush"], check=False)
            if p.returncode:
                print(f"bpfilter flush failed in {ns.name}: {p.stderr}", file=sys.stderr)
        ns.close()


def scenarios(door: list, n: int, big: int):
    a = "iptables-legacy -A " + RULE
    d = "iptables-legacy -D " + RULE
    rows = [("-L -n, empty", 0, "iptables-legacy -L -n", "", False),
            ("-A, 10 rules", 10, a, d, False),
            (f"-A, {big} rules", big, a, d, False),
            (f"restore {big}", big, "iptables-legacy-restore", "", True)]
    print(f"wall median (min) of {n}, and CPU of command + door; door = {' '.join(door)}")
    print(f"{'command':>18} {'kernel':>17} {'bpfilter':>17} {'ratio':>12} "
          f"{'CPU kernel':>10} {'CPU bpfilter':>12}")
    ms = lambda t: f"{t[0] * 1e3:6.1f} ({t[1] * 1e3:5.1f})ms"  # noqa: E731
    for name, rules, timed, undo, restore in rows:
        k = scenario([], rules, timed, undo, restore, n)
        b = scenario(door, rules, timed, undo, restore, n)
        print(f"{name:>18} {ms(k):>17} {ms(b):>17} {b[0] / k[0]:5.1f}x ({b[1] / k[1]:4.1f}x) "
              f"{k[2] * 1e3:8.1f}ms {b[2] * 1e3:10.1f}ms", flush=True)
    c = scenario(door, 0, "iptables-legacy -L -n", "", False, 1, cold=True)
    print(f"{'-L -n, cold helper':>18} {'':>17} {ms(c):>17}", flush=True)


def measure(mode: str, rules: int, n: int) -> float:
    ns = Ns(mode[0] + str(rules))
    try:
        outer = BEXEC if mode == "in-door" else []
        door = {"exec/cmd": BEXEC, "launcher": LAUNCHER}.get(mode, [])
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
    ap.add_argument("--scenarios", action="store_true", help="issue #8's commands (see above)")
    ap.add_argument("--big", type=int, default=10000, help="rules of the large table")
    ap.add_argument("--door", help="the door's command line (default: python -m bpfilter_umh.cli "
                                   "exec --)")
    ap.add_argument("--pkg", help="directory holding the bpfilter_umh to measure (another "
                                   "checkout, to compare before/after); default this one")
    args = ap.parse_args()
    if args.pkg:
        global PKG_ROOT
        PKG_ROOT = os.path.abspath(args.pkg)
    if args.scenarios:
        scenarios(args.door.split() if args.door else BEXEC, args.n, args.big)
        return
    print(f"median of {args.n} x `iptables-legacy -A {RULE}`")
    if not os.access(LAUNCHER[0], os.X_OK):
        subprocess.run(["make", "-s", "-C", ROOT, "launcher", f"PYTHON={sys.executable}"],
                       check=True)
    print(f"{'table':>12} {'kernel':>10} {'in-door':>10} {'exec/cmd':>10} {'launcher':>10} "
          f"{'ratio in-door':>14} {'ratio exec/cmd':>15} {'ratio launcher':>15}")
    for rules in (0, args.rules):
        k = measure("kernel", rules, args.n)
        d = measure("in-door", rules, args.n)
        e = measure("exec/cmd", rules, args.n)
        la = measure("launcher", rules, args.n)
        print(f"{str(rules) + ' rules':>12} {k * 1e3:8.1f}ms {d * 1e3:8.1f}ms {e * 1e3:8.1f}ms "
              f"{la * 1e3:8.1f}ms {d / k:13.1f}x {e / k:14.1f}x {la / k:14.1f}x", flush=True)


if __name__ == "__main__":
    main()
