"""`make bench-linear`: large chains no classified run takes (rules with an interface match), as
linear code cut into global functions (bpfilter_umh/stretch.py), against the kernel and against
the same chain without the cut (one program, BPFILTER_STRETCH_MIN=0). A benchmark, not a test.

For each N (bench/rulesets.py iface_chain: `-i IFACE -s PREFIX -j DROP|ACCEPT`):
  load       compile + BPF_PROG_LOAD of INPUT's program, in pieces and whole (whole only up to
             --whole-max rules: 10 000 take ~20 s), the verifier's processed instructions
  test-run   BPF_PROG_TEST_RUN ns/packet of both programs for a packet no rule matches (every
             rule tested), in turn, --rounds rounds in one process: the ratio within a round
  control    wall time through the launcher (the namespace's helper started first, as
             ruleset_bench.py does) of iptables-legacy-restore, then `-A` (appended), `-I INPUT 1`
             (inserted at the top), `-D INPUT N/2` (deleted in the middle), each against the
             kernel's own iptables-legacy doing the same, and with the pieces off (N <= whole-max)

    python3 bench/linear_bench.py [--n 1000,3000,10000] [--whole-max 3000] [--rounds 5]
Needs root. Runs only in namespaces it creates and removes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

import rulesets  # noqa: E402
import ruleset_bench as RB  # noqa: E402
from nsutil import Netns  # noqa: E402

OFF = {"BPFILTER_STRETCH_MIN": "0"}


def edits(n: int) -> list:
    """(name, iptables-legacy arguments) of the commands after the restore."""
    return [("append", "-A INPUT -i eth0 -s 203.0.113.9/32 -j DROP"),
            ("insert", "-I INPUT 1 -i eth0 -s 203.0.113.10/32 -j DROP"),
            ("delete", f"-D INPUT {n // 2}")]


def control(text: str, n: int, env_extra: dict = None, kernel: bool = False) -> dict:
    """Wall seconds of the restore and each edit, kernel or bpfilter (launcher, helper first)."""
    RB.ensure_launcher()
    out = {}
    with Netns("lin") as ns:
        env = dict(ns.env, PYTHONPATH=ROOT, **(env_extra or {}))
        pre, helper = [], None
        if not kernel:
            helper, _log = RB.start_helper(ns, env, idle_exit="60")
            pre = [RB.LAUNCHER, "--"]
        try:
            cmds = [("restore", ["iptables-legacy-restore"], text)] + \
                [(k, ["iptables-legacy"] + a.split(), None) for k, a in edits(n)]
            for what, cmd, inp in cmds:
                t0 = time.monotonic()
                p = ns.run(pre + cmd, input=inp, check=False, env=env, timeout=1800)
                out[what] = time.monotonic() - t0
                if p.returncode:
                    raise RuntimeError(f"{what}: {(p.stdout + p.stderr)[-300:]}")
        finally:
            if helper is not None:
                ns.run(RB.CLI + ["flush"], check=False, env=env)
                helper.terminate()
                helper.wait()
    return out


def programs(table, whole: bool, rounds: int) -> dict:
    """Load INPUT's program in pieces (and whole), then test-run them in turn."""
    progs = {}
    for name, env in [("pieces", {})] + ([("whole", OFF)] if whole else []):
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            prog, cnt, cp, secs = RB.load_chain(table, "INPUT")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        progs[name] = dict(prog=prog, cnt=cnt, load_s=secs, fns=len(cp.global_labels),
                           verified=prog.info()["verified_insns"], ns=[])
    frame = RB.flood_frame()
    for _ in range(rounds):
        for p in progs.values():
            p["ns"].append(RB.test_run_ns(p["prog"], "nf", frame))
    for p in progs.values():
        p["prog"].close()
        p["cnt"].close()
        del p["prog"], p["cnt"]
    if whole:
        progs["ratio"] = statistics.median(a / b for a, b in zip(progs["pieces"]["ns"],
                                                                  progs["whole"]["ns"]))
    return progs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="1000,3000,10000")
    ap.add_argument("--whole-max", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("linear_bench: needs root (namespaces, BPF)")
    print(f"machine: {RB.machine()}", flush=True)
    for n in [int(x) for x in args.n.split(",")]:
        text = rulesets.iface_chain(n).text
        table = RB.table_of(text)
        whole = n <= args.whole_max
        pr = programs(table, whole, args.rounds)
        for name in ("pieces", "whole") if whole else ("pieces",):
            p = pr[name]
            print(f"iface N={n:<6} {name:6}: load {p['load_s']:.2f} s, verified "
                  f"{p['verified']} insns, {p['fns']} functions, test-run "
                  f"{statistics.median(p['ns']):.0f} ns", flush=True)
        if whole:
            print(f"iface N={n:<6} test-run pieces / whole, side by side: {pr['ratio']:.2f}",
                  flush=True)
        k = control(text, n, kernel=True)
        b = control(text, n)
        w = control(text, n, OFF) if whole else None
        for what in k:
            s = (f"iface N={n:<6} {what:7}: kernel {k[what] * 1e3:7.0f} ms | bpfilter "
                 f"{b[what] * 1e3:7.0f} ms ({b[what] / k[what]:.0f}x)")
            if w:
                s += f" | without pieces {w[what] * 1e3:7.0f} ms ({w[what] / b[what]:.1f}x " \
                     f"the pieces')"
            print(s, flush=True)


if __name__ == "__main__":
    main()
