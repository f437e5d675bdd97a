"""Issue #9 through the real binaries and the door (`bpfilter exec`):

  - SIGKILL of the helper changes no verdict, and the next `iptables -L -v` shows the same rules
    and counters (the state is pinned; a new helper adopts it);
  - the helper killed at random moments while iptables-legacy-restore replaces the ruleset in a
    loop: afterwards the table is exactly one of the two rulesets and the traffic follows it;
  - replacements through `bpfilter exec -- iptables-legacy-restore` during a flood;
  - 8 concurrent iptables-legacy-restore clients (serialized by the xtables lock, like the
    kernel's): no lost update;
  - many sequential iptables invocations: every replaced program and map is freed (checked by
    id), the helper's fd count is flat.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from test_reliability_util import (A_VERDICTS, B_VERDICTS, P_BOTH_ACCEPT, P_BOTH_DROP, P_FLIP, Flood,
                                   udp_lab)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, BPF links")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
INVOCATIONS = int(os.environ.get("BPFILTER_INVOCATIONS", "200"))


def restore_text(flip: str) -> str:
    return ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            f"-A INPUT -p udp -m udp --dport {P_BOTH_DROP} -j DROP\n"
            f"-A INPUT -p udp -m udp --dport {P_FLIP} -j {flip}\n"
            f"-A INPUT -p udp -m udp --dport {P_BOTH_ACCEPT} -j ACCEPT\n"
            "COMMIT\n")


RULES_A, RULES_B = restore_text("DROP"), restore_text("ACCEPT")


def env_of(ns, **kw):
    path = ROOT + (":" + ns.env["PYTHONPATH"] if ns.env.get("PYTHONPATH") else "")
    return dict(ns.env, **{"PYTHONPATH": path, "BPFILTER_IDLE_EXIT": "2", **kw})


def bexec(ns, cmd, check=True, **kw):
    return ns.run([PY, "-m", "bpfilter_umh.cli", "exec", "--", "sh", "-c", cmd], check=check,
                  env=env_of(ns), **kw)


def helper_pids(ns):
    out = []
    for pid in ns.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"bpfilter_umh" in argv and b"--listen" in argv:
            out.append(pid)
    return out


def kill_helpers(ns) -> int:
    n = 0
    for pid in helper_pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
            n += 1
        except ProcessLookupError:
            pass
    return n


@pytest.fixture
def lab():
    with udp_lab(lambda b: b.run([PY, "-m", "bpfilter_umh.cli", "flush"], check=False,
                                 env=env_of(b))) as lab:
        yield lab


def test_sigkill_helper_keeps_verdicts_rules_and_counters(lab):
    a, b, probe = lab
    bexec(b, "iptables-legacy-restore", input=RULES_A)
    probe.send(P_BOTH_DROP, 5)
    probe.send(P_BOTH_ACCEPT, 7)
    probe.drain()
    # counters added by SET_ADD_COUNTERS (-c on -A) live beside the BPF maps
    bexec(b, "iptables-legacy -A INPUT -p tcp -c 11 1111 -j ACCEPT")
    before = bexec(b, "iptables-legacy -L -v -n -x").stdout
    assert " 1111 " in before and "      5      145 DROP" in before, before
    assert helper_pids(b), "the helper should still be running (idle exit after 2 s)"
    assert kill_helpers(b) >= 1
    time.sleep(0.1)
    assert not helper_pids(b)
    # no packet between the two listings: the counters must be identical
    after = bexec(b, "iptables-legacy -L -v -n -x").stdout
    assert after == before, f"before:\n{before}\nafter:\n{after}"
    assert kill_helpers(b) >= 1
    assert probe.verdicts() == A_VERDICTS, "SIGKILL of the helper must not change a verdict"


def random_kills(b, probe, rounds: int = 40, seconds: float = 60, seed: int = 9) -> dict:
    """iptables-legacy-restore alternating B and A `rounds` times under one door while the
    helper is SIGKILLed at random moments. Afterwards the table must be exactly A or B and
    the traffic must follow it. Returns the tally."""
    bexec(b, "iptables-legacy-restore", input=RULES_A)
    path = f"/tmp/bpft-rules-{os.getpid()}-k"
    with open(path + "a", "w") as fa, open(path + "b", "w") as fb:
        fa.write(RULES_A)
        fb.write(RULES_B)
    kills = 0
    try:
        loop = (f"for i in $(seq {rounds}); do iptables-legacy-restore -w < {path}b; "
                f"iptables-legacy-restore -w < {path}a; done; true")
        p = b.popen([PY, "-m", "bpfilter_umh.cli", "exec", "--", "sh", "-c", loop],
                    env=env_of(b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.4))
            kills += kill_helpers(b)
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        # a helper may still be finishing the replace of the door just killed (like the kernel
        # completing a setsockopt whose caller died): stop it, so that what is read below and the
        # traffic checked after it see one settled state (the next open settles a pending install)
        deadline = time.monotonic() + 10
        while helper_pids(b) and time.monotonic() < deadline:
            kills += kill_helpers(b)
            time.sleep(0.05)
    finally:
        os.unlink(path + "a")
        os.unlink(path + "b")
    save = bexec(b, "iptables-legacy-save").stdout
    rules = [ln for ln in save.splitlines() if ln.startswith("-A")]
    flip = [ln for ln in rules if f"--dport {P_FLIP}" in ln]
    consistent = len(rules) == 3 and len(flip) == 1
    want = B_VERDICTS if consistent and flip[0].endswith("ACCEPT") else A_VERDICTS
    got = probe.verdicts(wait=1.0)
    wrong = sum(1 for p_ in want if got[p_] != want[p_]) if consistent else len(want)
    return dict(kills=kills, restores=2 * rounds, consistent=consistent, verdicts_checked=len(want),
                verdicts_wrong=wrong, want=want, got=got, save=save)


def test_helper_killed_at_random_during_restores(lab):
    a, b, probe = lab
    r = random_kills(b, probe, rounds=15, seconds=40)
    assert r["kills"] >= 3, "the helper should have been killed several times"
    assert r["consistent"], r["save"]
    assert r["verdicts_wrong"] == 0, r


def test_restore_under_flood(lab):
    a, b, probe = lab
    bexec(b, "iptables-legacy-restore", input=RULES_A)
    path = f"/tmp/bpft-rules-{os.getpid()}"
    with open(path + "a", "w") as fa, open(path + "b", "w") as fb:
        fa.write(RULES_A)
        fb.write(RULES_B)
    try:
        with Flood(probe, pace=0.0005):
            bexec(b, f"for i in $(seq 25); do iptables-legacy-restore < {path}b && "
                     f"iptables-legacy-restore < {path}a; done")
    finally:
        os.unlink(path + "a")
        os.unlink(path + "b")
    assert probe.got[P_BOTH_DROP] == 0
    assert probe.got[P_BOTH_ACCEPT] == probe.sent[P_BOTH_ACCEPT] > 0


def test_concurrent_restore_clients_lose_no_update(lab):
    a, b, probe = lab
    bexec(b, "iptables-legacy-restore", input=RULES_A)
    procs = []
    for i in range(8):
        rules = "*filter\n" + "".join(f"-A INPUT -s 203.0.113.{i * 10 + k} -j ACCEPT\n"
                                      for k in range(5)) + "COMMIT\n"
        procs.append(b.popen([PY, "-m", "bpfilter_umh.cli", "exec", "--",
                              "iptables-legacy-restore", "-w", "--noflush"],
                             env=env_of(b), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True))
        procs[-1].stdin.write(rules)
        procs[-1].stdin.close()
    errs = []
    for p in procs:
        p.wait(timeout=120)
        if p.returncode:
            errs.append(p.stderr.read())
    assert not errs, errs
    save = bexec(b, "iptables-legacy-save").stdout
    got = {ln.split()[3] for ln in save.splitlines() if "203.0.113." in ln}
    assert got == {f"203.0.113.{i * 10 + k}/32" for i in range(8) for k in range(5)}, save
    assert probe.verdicts() == A_VERDICTS


def _ids(kind: str) -> set:
    import json
    p = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True)
    return {it["id"] for it in json.loads(p.stdout or "[]")}


def _owned(b) -> dict:
    """What this namespace's bpfilter state holds in the kernel: pin files, slot programs and
    the maps they use. A BPF object lives only while an fd, a pin, a link or a prog-array slot
    refers to it (kernel/bpf/syscall.c bpf_prog_put / bpf_map_put): with the helper's fd count
    flat, the pins and the slots are everything there is to count."""
    code = ("import json, os, sys; sys.path[:0] = [%r]\n"
            "from bpfilter_umh.sockopt import use_host_bpffs; use_host_bpffs()\n"
            "from bpfilter_umh.engine import Engine\n"
            "e = Engine.open(); progs = e._installed_programs()\n"
            "pins = sorted(os.path.join(r, f) for r, _d, fs in os.walk(e.pin_dir) for f in fs)\n"
            "maps = sorted({m for p in progs.values() for m in p.info()['map_ids']})\n"
            "print(json.dumps(dict(pins=pins, progs=sorted(p.info()['id'] for p in "
            "progs.values()), maps=maps)))") % ROOT
    import json
    return json.loads(b.run([PY, "-c", code], env=env_of(b)).stdout)


def _fd_count(pid: int, pause: float = 0.0) -> int:
    time.sleep(pause)
    return len(os.listdir(f"/proc/{pid}/fd"))


def sequential_invocations(b, n: int) -> dict:
    """n iptables-legacy invocations (alternating -A and -D) under one door. Afterwards: the
    helper holds as many fds as before, the namespace's pins are the same files, its slots hold
    one program per hook and one counters map; after a flush those objects are gone (by id)."""
    bexec(b, "iptables-legacy -A INPUT -p udp --dport 7009 -j DROP")
    helper = helper_pids(b)[0]
    # the fewest fds over half a second (it exits after 2 s idle): the -A's own door connection
    # may still be open for a moment (as below); counted here, it would hide a leak of one fd
    # (and CI once read 7 here, 6 after the loop, and called that a leak)
    fds0 = min(_fd_count(helper, pause=0.1) for _ in range(5))
    own0 = _owned(b)
    t0 = time.monotonic()
    loop = (f"i=0; while [ $i -lt {n // 2} ]; do "
            "iptables-legacy -A INPUT -p udp --dport 7010 -j DROP || exit 1; "
            "iptables-legacy -D INPUT -p udp --dport 7010 -j DROP || exit 1; "
            "i=$((i+1)); done")
    bexec(b, loop, timeout=3600)
    elapsed = time.monotonic() - t0
    helpers = helper_pids(b)
    fds1 = None
    # what the last command leaves in flight goes within moments: its door's connection (the
    # helper reads its end) and the replaced counters map (closed a grace period after the swap,
    # engine._LateCounts); a leak stays
    for _ in range(20) if helpers == [helper] else ():
        fds1 = _fd_count(helper)
        if fds1 <= fds0:
            break
        time.sleep(0.1)
    own1 = _owned(b)
    b.run([PY, "-m", "bpfilter_umh.cli", "flush"], env=env_of(b))
    gone = False
    for _ in range(50):          # programs and maps are freed after an RCU grace period
        if not (set(own1["progs"]) & _ids("prog")) and not (set(own1["maps"]) & _ids("map")):
            gone = True
            break
        time.sleep(0.1)
    return dict(invocations=n // 2 * 2, seconds=round(elapsed, 1), helper_fds=(fds0, fds1),
                pins_same=own0["pins"] == own1["pins"], slot_progs=len(own1["progs"]),
                maps=len(own1["maps"]), freed_after_flush=gone)


def leaks(r: dict) -> list:
    bad = []
    fds0, fds1 = r["helper_fds"]
    if fds1 is None or fds1 > fds0:
        bad.append(f"helper fds {r['helper_fds']}")
    if not r["pins_same"]:
        bad.append("pin files changed")
    if r["slot_progs"] != 3 or r["maps"] != 1:
        bad.append(f"{r['slot_progs']} slot programs, {r['maps']} maps (want 3, 1)")
    if not r["freed_after_flush"]:
        bad.append("programs or maps still alive after flush")
    return bad


def test_sequential_invocations_leak_nothing(lab):
    a, b, probe = lab
    r = sequential_invocations(b, INVOCATIONS)
    assert not leaks(r), (leaks(r), r)
    assert probe.verdicts() == {P_BOTH_DROP: True, P_FLIP: True, P_BOTH_ACCEPT: True}


def test_untranslatable_rule_policy_reject(lab):
    """Policy `reject` (the default; `xtables` is tests/test_policy_xtables.py): a rule the compiler cannot
    translate makes the whole replace fail atomically, with iptables' own message for
    EOPNOTSUPP; the previous ruleset stays listed and filtering."""
    a, b, probe = lab
    bexec(b, "iptables-legacy-restore", input=RULES_A)
    before = bexec(b, "iptables-legacy-save").stdout
    for cmd in ("iptables-legacy -A INPUT -m statistic --mode random --probability 0.5 -j DROP",
                "iptables-legacy -A INPUT -m string --string x --algo bm -j DROP"):
        p = bexec(b, cmd, check=False)
        assert p.returncode == 1 and "iptables: Operation not supported." in p.stderr, p.stderr
    after = bexec(b, "iptables-legacy-save").stdout
    strip = lambda s: [ln for ln in s.splitlines() if not ln.startswith("#")]  # noqa: E731
    assert strip(after) == strip(before)
    assert probe.verdicts() == A_VERDICTS
