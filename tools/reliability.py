#!/usr/bin/env python3
"""`make reliability`: issue #9's evidence in one run, on the real kernel, in throwaway namespaces.
Prints what was tried and what survived — kills, replacements, faults injected, faults the kernel
itself produced (a memory cgroup refusing the maps, a full tcx list refusing an attach), fuzz
inputs, invocations — and exits non-zero if any verdict was wrong or any object leaked. Leaked
objects include the pins and /run/bpfilter state directories of namespaces the run created and
deleted (bpfilter_umh.gc finds them; they are then removed).

    python3 tools/reliability.py            short form (CI, ~2 min)
    python3 tools/reliability.py --long     long form: 1000 swaps, 10 000 iptables invocations,
                                            1 000 000 decoder and 1 000 000 request fuzz inputs
    --only NAME[,NAME]                      run some steps: faults kernel-faults kills swaps
                                            restore-flood concurrent invocations security
                                            fuzz-decode fuzz-request
The same checks run as pytest tests (tests/test_reliability_*.py, test_security.py,
test_fuzz_request.py); this driver counts them.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from nsutil import Netns, veth  # noqa: E402
from test_reliability_util import A_IP, B_IP, UdpProbe, two_rulesets  # noqa: E402

SHORT = dict(swaps=200, kill_rounds=10, invocations=200, restores=10, fuzz_decode=20000,
             fuzz_request=2000)
LONG = dict(swaps=1000, kill_rounds=60, invocations=10000, restores=50, fuzz_decode=1000000,
            fuzz_request=1000000)


class Lab:
    """Namespaces a and b with a veth pair, a UDP probe, and a flush of b's state at the end."""

    def __enter__(self):
        self.a, self.b = Netns("a"), Netns("b")
        veth(self.a, "va", self.b, "vb", A_IP + "/24", B_IP + "/24")
        self.probe = UdpProbe(self.a, self.b)
        return self

    def __exit__(self, *exc):
        import test_reliability_door as D
        self.probe.close()
        self.b.run([sys.executable, "-m", "bpfilter_umh.cli", "flush"], check=False,
                   env=D.env_of(self.b))
        self.b.close()
        self.a.close()


def step_faults(n):
    """Every fault point, in process (error/on) and as a crash of an install process (kill)."""
    import errno
    import test_reliability_faults as F
    from bpfilter_umh import faults
    from bpfilter_umh.engine import Engine
    from bpfilter_umh.errors import BpfilterError
    cases = [("verifier", "on", errno.EINVAL), ("map_create", "error:ENOMEM", errno.ENOMEM),
             ("compile", "error:EOPNOTSUPP", errno.EOPNOTSUPP),
             ("after_load", "error:EIO", errno.EIO), ("swap", "error:EBUSY@1", errno.EBUSY)]
    r = dict(injected=0, survived=0, verdicts_checked=0, verdicts_wrong=0, leaked=0)
    ta, tb = two_rulesets()
    for point, action, want in cases:
        with Lab() as L:
            with L.b.inside():
                eng = Engine.open()
                eng.install(ta)
                before = eng._slot_ids()
            name, _, skip = action.partition("@")
            faults.arm(point, name, int(skip or 0))
            ok = False
            with L.b.inside():
                try:
                    eng.install(tb)
                except BpfilterError as e:
                    ok = e.errno == want
                after = Engine.open()._slot_ids()
            faults.disarm()
            v = L.probe.verdicts()
            wrong = sum(v[p] != F.A_VERDICTS[p] for p in v)
            r["injected"] += 1
            r["verdicts_checked"] += len(v)
            r["verdicts_wrong"] += wrong
            r["leaked"] += before != after
            r["survived"] += ok and not wrong and before == after
    for fault, adopted in (("after_load=kill", "A"), ("swap=kill@1", "B"),
                           ("after_swap=kill", "B")):
        with Lab() as L:
            with L.b.inside():
                Engine.open().install(ta)
            F._killed_install(L.b, fault)
            with L.b.inside():
                eng = Engine.open()
                pending = os.path.exists(eng._pending_path)
            v = L.probe.verdicts()
            want = F.A_VERDICTS if adopted == "A" else F.B_VERDICTS
            wrong = sum(v[p] != want[p] for p in v)
            r["injected"] += 1
            r["verdicts_checked"] += len(v)
            r["verdicts_wrong"] += wrong
            r["survived"] += not wrong and not pending
    return r


def step_kernel_faults(n):
    """Faults the kernel itself produces (nothing injected): the maps refused by a memory cgroup
    limit, a tcx attach refused half way (a device's tcx list full). The previous ruleset must
    keep filtering and nothing may leak."""
    import errno
    import test_reliability_kernel_faults as KF
    r = dict(kernel_faults=0, survived=0, verdicts_checked=0, verdicts_wrong=0, leaked=0,
             errnos=[])
    for name, fn, want in (("memcg", KF.memcg_refused_install, errno.ENOMEM),
                           ("tcx_full", KF.tcx_full_install, errno.ERANGE)):
        with Lab() as L:
            try:
                x = fn(L.b, L.probe)
            except BaseException as e:  # noqa: BLE001 - e.g. pytest.skip: no cgroup v1 memory
                r.setdefault("skipped", []).append(f"{name}: {e}")
                continue
            finally:
                with L.b.inside():
                    from bpfilter_umh.engine import Engine
                    Engine.open(flavor=Engine.installed_flavor() or "nf").flush()
        err = x["err"]
        wrong = sum(x["verdicts"][p] != KF.A_VERDICTS[p] for p in x["verdicts"])
        leaked = x["fds_leaked"] + x.get("maps_leaked", 0) + (not x["slots_same"]) \
            + (not x["pins_same"]) + x["pending"]
        r["kernel_faults"] += 1
        r["errnos"].append(errno.errorcode.get(getattr(err, "errno", 0), repr(err)))
        r["verdicts_checked"] += len(x["verdicts"])
        r["verdicts_wrong"] += wrong
        r["leaked"] += leaked
        r["survived"] += getattr(err, "errno", None) == want and not wrong and not leaked
    r["failed"] = r["kernel_faults"] - r["survived"]
    return r


def step_kills(n):
    import test_reliability_door as D
    with Lab() as L:
        D.bexec(L.b, "iptables-legacy-restore", input=D.RULES_A)
        D.bexec(L.b, "iptables-legacy -A INPUT -p tcp -c 11 1111 -j ACCEPT")
        L.probe.send(7001, 5)
        L.probe.drain()
        before = D.bexec(L.b, "iptables-legacy -L -v -n -x").stdout
        kills = D.kill_helpers(L.b)
        after = D.bexec(L.b, "iptables-legacy -L -v -n -x").stdout
        v = L.probe.verdicts()
        wrong = sum(v[p] != D.A_VERDICTS[p] for p in v)
        listing_same = before == after
        L.b.run([sys.executable, "-m", "bpfilter_umh.cli", "flush"], env=D.env_of(L.b))
    with Lab() as L:
        rk = D.random_kills(L.b, L.probe, rounds=n["kill_rounds"], seconds=30 + n["kill_rounds"])
    return dict(kills=kills + rk["kills"], restores=rk["restores"],
                verdicts_checked=len(v) + rk["verdicts_checked"],
                verdicts_wrong=wrong + rk["verdicts_wrong"],
                listing_same_after_sigkill=listing_same, consistent_after_kills=rk["consistent"],
                survived=int(listing_same and not wrong) + int(rk["consistent"]
                                                              and not rk["verdicts_wrong"]))


def step_swaps(n):
    import test_reliability_swap as S
    with Lab() as L:
        L.probe.close()
        r = S.replace_under_flood(L.a, L.b, n["swaps"])
        L.probe = UdpProbe(L.a, L.b)
    bad = S.check(r)
    return dict(replacements=r["swaps"], datagrams=sum(r["sent"].values()),
                verdicts_wrong=r["got"][7001],
                rcvbuf_drops=r["rcvbuf_drops"],
                counters_lost_or_double=int(not r["got"][7003] <= r["counted"][2]
                                            <= r["got"][7003] + r["rcvbuf_drops"]),
                leaked=max(0, r["leaked_fds"]) + int(r["pins_changed"]), problems=bad)


def step_restore_flood(n):
    import test_reliability_door as D
    from test_reliability_util import Flood
    with Lab() as L:
        D.bexec(L.b, "iptables-legacy-restore", input=D.RULES_A)
        path = f"/tmp/bpft-rel-{os.getpid()}"
        with open(path + "a", "w") as fa, open(path + "b", "w") as fb:
            fa.write(D.RULES_A)
            fb.write(D.RULES_B)
        try:
            with Flood(L.probe, pace=0.0005):
                D.bexec(L.b, f"for i in $(seq {n['restores']}); do iptables-legacy-restore < "
                             f"{path}b && iptables-legacy-restore < {path}a; done")
        finally:
            os.unlink(path + "a")
            os.unlink(path + "b")
        p = L.probe
        return dict(replacements=2 * n["restores"], datagrams=sum(p.sent.values()),
                    verdicts_wrong=p.got[7001] + (p.sent[7003] - p.got[7003]))


def step_concurrent(n):
    import test_reliability_door as D
    with Lab() as L:
        try:
            D.test_concurrent_restore_clients_lose_no_update((L.a, L.b, L.probe))
            ok = True
        except AssertionError as e:
            ok = False
            print("concurrent:", e, file=sys.stderr)
    return dict(clients=8, updates=40, lost_updates=0 if ok else "some", survived=int(ok))


def step_invocations(n):
    import test_reliability_door as D
    with Lab() as L:
        r = D.sequential_invocations(L.b, n["invocations"])
    r["leaks"] = D.leaks(r)
    r["leaked"] = len(r["leaks"])
    return r


def step_security(n):
    """Callers without CAP_NET_ADMIN: same output as the kernel gives them, nothing installed."""
    import test_security as T
    tried = wrong = 0
    with Netns("s") as ns:
        for cmd in ("iptables-legacy -L -n", "iptables-legacy -A INPUT -j DROP",
                    "ip6tables-legacy -L -n", "iptables-legacy-save"):
            tried += 1
            try:
                T.test_without_net_admin_like_kernel(ns, cmd)
            except AssertionError as e:
                wrong += 1
                print("security:", cmd, e, file=sys.stderr)
        ns.run([sys.executable, "-m", "bpfilter_umh.cli", "flush"], check=False,
               env=T.env_of(ns))
    return dict(unprivileged_calls=tried, not_refused_like_kernel=wrong)


def _vm_hwm_mb(pid: int):
    """The peak resident set of a running process (VmHWM of its own address space), in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def _fuzz(tool, runs):
    import importlib.util
    import tempfile
    if importlib.util.find_spec("atheris") is None:
        return {"error": "atheris is not installed (pip install atheris)"}
    t0 = time.monotonic()
    peak = None
    with tempfile.TemporaryFile("w+") as err:
        # crash inputs go to /tmp, never into the work tree
        p = subprocess.Popen([sys.executable, os.path.join(HERE, tool), f"-runs={runs}",
                              "-timeout=30", "-print_final_stats=1",
                              "-artifact_prefix=/tmp/bpfilter-fuzz-"],
                             stdout=subprocess.DEVNULL, stderr=err, text=True)
        # libFuzzer's stat::peak_rss_mb is getrusage's ru_maxrss, which execve keeps from the
        # parent (this driver, after the traffic steps): the child's own VmHWM is sampled instead
        while p.poll() is None:
            peak = _vm_hwm_mb(p.pid) or peak
            time.sleep(0.2)
        err.seek(0)
        stderr = err.read()
    m = re.search(r"Done (\d+) runs", stderr)
    if p.returncode:
        print(stderr[-3000:], file=sys.stderr)
    return dict(inputs=int(m.group(1)) if m else 0, crashes=0 if p.returncode == 0 else 1,
                seconds=round(time.monotonic() - t0), rc=p.returncode, peak_rss_mb=peak,
                tail=None if p.returncode == 0 else stderr[-2000:])


def step_fuzz_decode(n):
    return _fuzz("fuzz_decode.py", n["fuzz_decode"])


def step_fuzz_request(n):
    return _fuzz("fuzz_request.py", n["fuzz_request"])


STEPS = {"faults": step_faults, "kernel-faults": step_kernel_faults, "kills": step_kills,
         "swaps": step_swaps, "restore-flood": step_restore_flood, "concurrent": step_concurrent,
         "invocations": step_invocations, "security": step_security,
         "fuzz-decode": step_fuzz_decode, "fuzz-request": step_fuzz_request}


def failed(r: dict) -> bool:
    return any(r.get(k) for k in ("verdicts_wrong", "leaked", "crashes", "lost_updates", "failed",
                                  "counters_lost_or_double", "not_refused_like_kernel",
                                  "problems")) or r.get("consistent_after_kills") is False \
        or r.get("listing_same_after_sigkill") is False or "error" in r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n = LONG if args.long else SHORT
    names = [s for s in args.only.split(",") if s] or list(STEPS)
    results = {}
    t_all = time.monotonic()
    from bpfilter_umh import gc
    import nsutil
    for name in names:
        t0 = time.monotonic()
        try:
            r = STEPS[name](n)
        except Exception as e:  # noqa: BLE001 - a step that breaks is reported, not hidden
            r = {"error": f"{type(e).__name__}: {e}"}
        r["seconds"] = round(time.monotonic() - t0, 1)
        results[name] = r
        status = "FAIL" if failed(r) else "ok"
        shown = {k: v for k, v in r.items() if k not in ("tail", "save")}
        print(f"{name:14} {status:4} {json.dumps(shown)}", flush=True)
    # leftovers: pins or state directories of namespaces this run created and that are gone
    # (a step that deleted a namespace without flushing it); counted as leaked, then collected.
    # Only this run's namespaces count: on a shared machine another run's test may be between
    # deleting a namespace and collecting it (tests/test_reliability_gc.py does that on purpose)
    left = [d for d in gc.collect(dry_run=True) if int(os.path.basename(d)) in nsutil.COOKIES]
    # what each one still held, for the report: the step that left it is found by its files
    held = {d: sorted(os.listdir(d)) if os.path.isdir(d) else [] for d in left}
    if left:
        gc.collect(only={int(os.path.basename(d)) for d in left})
    results["leftovers"] = dict(leaked=len(left), dirs=held)
    print(f"{'leftovers':14} {'FAIL' if left else 'ok':4} {json.dumps(results['leftovers'])}",
          flush=True)
    tot = dict(
        # SIGKILLs of the helper, plus the 3 install processes the faults step kills
        kills=results.get("kills", {}).get("kills", 0) + (3 if "faults" in results else 0),
        replacements=sum(results.get(k, {}).get("replacements", 0)
                         for k in ("swaps", "restore-flood")),
        faults_injected=results.get("faults", {}).get("injected", 0),
        kernel_faults=results.get("kernel-faults", {}).get("kernel_faults", 0),
        fuzz_inputs=sum(results.get(k, {}).get("inputs", 0)
                        for k in ("fuzz-decode", "fuzz-request")),
        # sequential iptables invocations plus the concurrent iptables-restore clients
        invocations=results.get("invocations", {}).get("invocations", 0)
        + results.get("concurrent", {}).get("clients", 0),
        verdicts_wrong=sum(results[k].get("verdicts_wrong", 0) for k in results),
        objects_leaked=sum(results[k].get("leaked", 0) for k in results),
    )
    bad = [k for k, r in results.items() if failed(r)]
    print(f"TOTAL ({'long' if args.long else 'short'} form, {time.monotonic() - t_all:.0f} s): "
          + ", ".join(f"{k} {v}" for k, v in tot.items())
          + (f"; FAILED: {', '.join(bad)}" if bad else "; all survived"))
    if args.json:
        json.dump(results, sys.stdout, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
