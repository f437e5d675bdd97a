"""`make bench`: what large rulesets cost, kernel iptables-legacy against bpfilter, side by side.

For every shape of bench/rulesets.py and N in 10, 100, 1000, 10 000:
  test-run     BPF_PROG_TEST_RUN ns/packet of the compiled chain (flavor nf, classifier on) for
               the flood packet (it matches no rule: the worst case, every rule is consulted),
               the same with the classifier off (linear code, only N <= 1000: larger ones take
               minutes in the verifier), and flavors tc/xdp where they compile
  side by side per shape, the empty program (INPUT's policy alone), the smallest N and the
               largest N (nf) test-run in turn, round after round: the goal's ratios (largest
               N / smallest N, and the added cost over the empty program) taken within a round
  flood        a UDP flood through a veth pair into a namespace whose INPUT holds the ruleset
               (the shape's rules moved to INPUT): ns/packet with no rules, with kernel
               iptables-legacy, with bpfilter (Engine.install, nf links); "added" = minus no rules
  control      wall time of iptables-legacy-restore of the ruleset (kernel) and of the same through
               bpfilter (build/bpfilter-exec, the door handed to the running helper), of one
               `iptables-legacy -A` on the loaded table (also through the Python door,
               bin/bpfilter exec), and of restores over the loaded table (the same text again,
               then one rule changed)
Printed as a table with the issue's ratios; --md writes bench/results.md, --plot the PNG.

    python bench/ruleset_bench.py [--n 10,100,1000,10000] [--shapes blocklist,ports]
                                  [--md bench/results.md] [--plot bench/cost_vs_n.png]
Needs root. Runs only in namespaces it creates and removes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

import rulesets  # noqa: E402
from nsutil import Netns, veth  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table  # noqa: E402
from bpfilter_umh.model import AF_INET, Table  # noqa: E402

SRC, DST, SPORT, DPORT = rulesets.FLOOD
FLOOD_PACKETS = int(os.environ.get("BENCH_FLOOD_PACKETS", "50000"))
TEST_RUN_REPEAT = 20000
CLI = [sys.executable, "-m", "bpfilter_umh.cli"]
# the doors as README shows them: the C launcher handing the door to the running helper
# (`make launcher`, bin/bpfilter-exec.c), and the Python door (bin/bpfilter: no site-packages)
PY_DOOR = [sys.executable, "-S", os.path.join(ROOT, "bin", "bpfilter"), "exec", "--"]
LAUNCHER = os.path.join(ROOT, "build", "bpfilter-exec")


def to_input(text: str) -> str:
    """The ruleset with its built-in chain's rules on INPUT (what the flood traverses)."""
    return text.replace("-A FORWARD ", "-A INPUT ")


def table_of(text: str) -> Table:
    """The blob iptables-legacy-restore builds for `text`, decoded (the kernel as the parser)."""
    import lab
    with Netns("bx") as ns:
        lab.restore(ns, text)
        return lab.kernel_snapshot(ns)


# ---- BPF_PROG_TEST_RUN -------------------------------------------------------------------------

def flood_frame() -> bytes:
    from test_compile_util import ether, ipv4, udp_hdr
    return ether(ipv4(SRC, DST, 17, udp_hdr(SPORT, DPORT, b"x" * 18)))


def load_chain(table: Table, chain: str, flavor: str = "nf"):
    """(prog, counters map, compiled program, load seconds) of one built-in chain."""
    from bpfilter_umh.engine import create_maps, load_with_func_info
    t0 = time.monotonic()
    ct = compile_table(table, KernelFacts.from_btf(), flavor)
    cp = next(p for p in ct.programs if p.chain == chain)
    cnt = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, ct.counters_entries, name="bpfilter_cnt")
    extra = create_maps(cp)
    fds = {COUNTERS_MAP: cnt.fd, **{k: m.fd for k, m in extra.items()}}
    other = []
    for it in cp.items:                      # flavor maps kept by attach.py (ifnames): empty here
        name = getattr(it, "map", None)
        if name and name not in fds:
            m = K.Map.create(K.BPF_MAP_TYPE_HASH, 4, 16, 64, name="bench_aux")
            other.append(m)
            fds[name] = m.fd
    try:
        code = cp.assemble(fds)
        btf = cp.func_btf()
        # as the engine loads it: with BTF func_info the global functions (fan-out's jump cases)
        # are verified once each; without it the kernel verifies them as static calls
        prog = load_with_func_info(cp, code, *btf) if btf is not None else \
            K.Prog.load(cp.prog_type, code, license=cp.license, name=cp.name,
                        expected_attach_type=cp.expected_attach_type)
    finally:
        for m in list(extra.values()) + other:
            m.close()
    return prog, cnt, cp, time.monotonic() - t0


NF_CTX = bytes([1, 2]) + bytes(6)     # struct nf_hook_state: hook LOCAL_IN, pf NFPROTO_IPV4


def test_run_ns(prog, flavor: str, frame: bytes = None, nf_ctx: bytes = NF_CTX) -> float:
    frame = frame or flood_frame()
    ctx = nf_ctx if flavor == "nf" else None
    best = None
    for _ in range(3):
        ret, dur, _ = prog.test_run(frame, ctx, repeat=TEST_RUN_REPEAT)
        best = dur if best is None else min(best, dur)
    return float(best)


# no rule at all: what a test run of INPUT's policy alone costs (the floor the rules add to)
EMPTY_TEXT = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
SIDE_ROUNDS = 9


def side_by_side(tables: dict, rounds: int = SIDE_ROUNDS, empty: Table = None,
                 frame: bytes = None, nf_ctx: bytes = NF_CTX) -> dict:
    """The empty program and each table's INPUT (nf, classifier on; {N: Table}) test-run in
    turn, `rounds` times: medians of each, and per round the largest N's ns over the smallest
    N's and each N's ns minus the empty program's, as medians with their ranges. The rows'
    test-run columns are measured minutes apart, and this machine's speed moves by up to 2x
    within minutes: on 2026-12-01 the mixed shape's rows at 10:26 gave N=10 000 / N=10 = 2.24
    (56 / 25 ns), the same two programs in turn 2.0-2.15 at 10:33 and 1.1-1.2 in a faster
    spell, so a ratio of two rows says as much about the machine as about the programs.
    `empty`, `frame`, `nf_ctx`: another family's empty table, packet and hook context."""
    progs = {"empty": load_chain(empty or table_of(EMPTY_TEXT), "INPUT")}
    try:
        for n, t in sorted(tables.items()):
            progs[n] = load_chain(t, "INPUT")
        got = {k: [] for k in progs}
        for _ in range(rounds):
            for k, (prog, *_rest) in progs.items():
                got[k].append(test_run_ns(prog, "nf", frame, nf_ctx))
    finally:
        for prog, cnt, *_rest in progs.values():
            prog.close()
            cnt.close()
    ns_ = sorted(tables)
    lo, hi = ns_[0], ns_[-1]

    def spread(vals):
        vals = sorted(vals)
        return dict(median=statistics.median(vals), min=vals[0], max=vals[-1])
    out = dict(rounds=rounds, lo=lo, hi=hi, empty_ns=statistics.median(got["empty"]),
               ns={n: statistics.median(got[n]) for n in ns_},
               ratio=spread([b / a for a, b in zip(got[lo], got[hi])]),
               added={n: spread([x - e for x, e in zip(got[n], got["empty"])]) for n in ns_})
    return out


def side_line(shape: str, side: dict) -> str:
    r, a = side["ratio"], side["added"][side["hi"]]
    return (f"{shape:9} side by side, {side['rounds']} rounds: empty program "
            f"{fmt(side['empty_ns'], ' ns')}, N={side['lo']} {fmt(side['ns'][side['lo']], ' ns')}, "
            f"N={side['hi']} {fmt(side['ns'][side['hi']], ' ns')} | N={side['hi']} / "
            f"N={side['lo']} {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}] | N={side['hi']} "
            f"over the empty program +{a['median']:.0f} ns [{a['min']:.0f}-{a['max']:.0f}]")


def bench_test_run(table: Table, env_min_run=None, flavor="nf", frame: bytes = None,
                   nf_ctx: bytes = NF_CTX) -> dict:
    old = os.environ.get("BPFILTER_CLASSIFY_MIN_RUN")
    if env_min_run is not None:
        os.environ["BPFILTER_CLASSIFY_MIN_RUN"] = str(env_min_run)
    try:
        prog, cnt, cp, secs = load_chain(table, "INPUT", flavor)
    except Exception as e:                              # noqa: BLE001 (reported, not hidden)
        return dict(error=f"{type(e).__name__}: {str(e)[:160]}")
    finally:
        if env_min_run is not None:
            if old is None:
                os.environ.pop("BPFILTER_CLASSIFY_MIN_RUN", None)
            else:
                os.environ["BPFILTER_CLASSIFY_MIN_RUN"] = old
    try:
        ns = test_run_ns(prog, flavor, frame, nf_ctx)
        info = prog.info()
        return dict(ns=ns, load_s=secs, insns=info["xlated_prog_len"] // 8,
                    jited=info["jited_prog_len"], maps=len(cp.maps),
                    runs=[m.name for m in cp.maps])
    finally:
        prog.close()
        cnt.close()


# ---- veth flood ---------------------------------------------------------------------------------

def flood_ns_per_packet(install) -> float:
    """ns per packet of a UDP flood from namespace a into b, after install(b) put a filter in b.
    The receive path runs in the sender's context (veth_xmit -> backlog -> softirq on return), so
    the sender's loop time is the per-packet cost; best of three rounds."""
    with Netns("fa") as a, Netns("fb") as b:
        veth(a, "fa0", b, "fb0", f"{SRC}/24", f"{DST}/24")
        # a permanent neighbour: no ARP during the flood
        mac = b.run("cat /sys/class/net/fb0/address").stdout.strip()
        a.run(f"ip neigh replace {DST} lladdr {mac} dev fa0 nud permanent")
        install(b)
        with b.inside():
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.bind((DST, DPORT))          # no ICMP port unreachable; overflow drops are fine
        with a.inside():
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.bind((SRC, SPORT))
            tx.connect((DST, DPORT))
        try:
            best = None
            for _ in range(5):
                t0 = time.perf_counter_ns()
                sent = _sendmmsg_flood(tx.fileno(), FLOOD_PACKETS)
                dt = (time.perf_counter_ns() - t0) / max(1, sent)
                best = dt if best is None else min(best, dt)
                while True:
                    try:
                        rx.recv(64, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
            return best
        finally:
            tx.close()
            rx.close()
            if install is not _nothing:
                _flush_bpfilter(b)


_mm = None


def _sendmmsg_flood(fd: int, count: int) -> int:
    """Send `count` 18-byte datagrams on connected socket fd with sendmmsg(2), 64 per call (no
    Python per packet: the loop measures the kernel's path, not the interpreter)."""
    global _mm
    if _mm is None:
        import cffi
        ffi = cffi.FFI()
        ffi.cdef("""struct iovec { void *iov_base; size_t iov_len; };
                    struct msghdr { void *msg_name; unsigned int msg_namelen; struct iovec *msg_iov;
                                    size_t msg_iovlen; void *msg_control; size_t msg_controllen;
                                    int msg_flags; };
                    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
                    int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);""")
        lib = ffi.dlopen(None)
        buf = ffi.new("char[]", b"x" * 18)
        iov = ffi.new("struct iovec *", {"iov_base": buf, "iov_len": 18})
        vec = ffi.new("struct mmsghdr[64]")
        for i in range(64):
            vec[i].msg_hdr.msg_iov = iov
            vec[i].msg_hdr.msg_iovlen = 1
        _mm = (lib, vec, buf, iov)
    lib, vec = _mm[0], _mm[1]
    sent = 0
    while sent < count:
        r = lib.sendmmsg(fd, vec, min(64, count - sent), 0)
        if r <= 0:
            break
        sent += r
    return sent


def _nothing(ns):
    pass


def _kernel(text):
    def install(ns):
        import lab
        lab.restore(ns, text)
    return install


def _bpfilter(table):
    def install(ns):
        from bpfilter_umh.engine import Engine
        with ns.inside():
            Engine.open(AF_INET).install(table)
    return install


def _flush_bpfilter(ns):
    from bpfilter_umh.engine import Engine
    try:
        with ns.inside():
            Engine.open(AF_INET).flush()
    except Exception:                                   # noqa: BLE001
        pass


# ---- control plane ------------------------------------------------------------------------------

APPEND = "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"


def control_plane(text: str, appends: int = 3, order=("kernel", "bpfilter"),
                  restore: str = "iptables-legacy-restore", binary: str = "iptables-legacy",
                  append: str = APPEND) -> dict:
    """Wall time of iptables-legacy-restore of `text` and of one `iptables-legacy -A` on the
    loaded table (the best of `appends`, each adding one more rule), kernel and through
    the launcher (build/bpfilter-exec), and the appends again through the Python door. For
    bpfilter the helper of the namespace is started first (as a running system has it: the
    kernel shim starts it once, the door's stays while used), with its per-request log, so the
    helper's own time from request to reply is reported beside the wall time (which adds the
    door's start-up and the iptables binary). `restore`, `binary`, `append`: the ip6tables
    commands for an IPv6 ruleset."""
    out = {}
    ensure_launcher()
    # the modules compiled once, as an installed package has them: with PYTHONDONTWRITEBYTECODE
    # every command would compile the door's modules again (~7 ms)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "bpfilter_umh")],
                   check=False, stdout=subprocess.DEVNULL)
    env_root = dict(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for who in order:
        with Netns("cp") as ns:
            env = dict(ns.env, **env_root)
            pre = [] if who == "kernel" else [LAUNCHER, "--"]
            helper = log = None
            if who == "bpfilter":
                helper, log = start_helper(ns, env)
            try:
                t0 = time.monotonic()
                p = ns.run(pre + [restore], input=text, check=False, env=env, timeout=900)
                out[f"{who}_restore_s"] = time.monotonic() - t0
                if p.returncode:
                    out[f"{who}_error"] = (p.stdout + p.stderr)[-300:]
                    continue
                doors = [(who, pre)] + ([("pydoor", PY_DOOR)] if who == "bpfilter" else [])
                for k, (what, door) in enumerate(d for d in doors for _ in range(appends)):
                    cmd = append.replace("99", f"{99 - k}", 1)   # one more rule each time
                    t0 = time.monotonic()
                    p = ns.run(door + [binary] + cmd.split(), check=False, env=env, timeout=900)
                    out.setdefault(f"{what}_appends_s", []).append(time.monotonic() - t0)
                    if p.returncode:
                        out[f"{who}_error"] = (p.stdout + p.stderr)[-300:]
                        break
                for what, _door in doors:
                    out[f"{what}_append_s"] = min(out[f"{what}_appends_s"])
                # a restore over the loaded table, as a periodic full sync does (kube-proxy): the
                # same text twice (the second replaces a table with itself), then one rule changed
                for step, t in (("reload", text), ("again", text), ("changed", one_changed(text))):
                    t0 = time.monotonic()
                    p = ns.run(pre + [restore], input=t, check=False, env=env, timeout=900)
                    out[f"{who}_{step}_s"] = time.monotonic() - t0
                    if p.returncode:
                        out[f"{who}_error"] = (p.stdout + p.stderr)[-300:]
                        break
            finally:
                if who == "bpfilter":
                    ns.run(CLI + ["flush"], check=False, env=env)
                    if helper is not None:
                        helper.wait(timeout=60)
                        out.update(_helper_times(log, 2 * appends))
    return out


def control_plane_repeated(text: str, repeat: int, **kw) -> dict:
    """control_plane `repeat` times, kernel first and bpfilter first in turn (whichever runs
    second finds the page cache and the CPUs' frequency as the first left them), each value
    the median of the runs (lists element-wise: the first append stays the first; the helper's
    parts key by key). The restores' walls and their ratio per run are kept as samples: on a
    shared 2-CPU machine one run's restore swings by tens of percent, so a single ratio can
    neither show nor refute a change of that size."""
    if repeat <= 1:
        return control_plane(text, **kw)
    runs = [control_plane(text, order=("kernel", "bpfilter") if i % 2 == 0 else
                          ("bpfilter", "kernel"), **kw) for i in range(repeat)]
    out = {}
    for key in {k for r in runs for k in r}:
        vals = [r[key] for r in runs if key in r]
        v0 = vals[0]
        if isinstance(v0, float):
            out[key] = statistics.median(vals)
        elif isinstance(v0, list) and all(len(v) == len(v0) for v in vals):
            out[key] = [statistics.median(x) for x in zip(*vals)]
        elif isinstance(v0, dict):
            out[key] = {k: statistics.median(v[k] for v in vals if k in v) for k in v0}
        else:
            out[key] = v0               # an error text: the first run's
    pairs = [(r["kernel_restore_s"], r["bpfilter_restore_s"]) for r in runs
             if r.get("kernel_restore_s") and r.get("bpfilter_restore_s")]
    out["restore_samples"] = pairs
    out["repeats"] = repeat
    return out


def one_changed(text: str) -> str:
    """`text` with the verdict of its last DROP or ACCEPT rule turned round."""
    lines = text.splitlines()
    k = max(i for i, ln in enumerate(lines) if ln.startswith("-A ") and
            (ln.endswith("-j DROP") or ln.endswith("-j ACCEPT")))
    lines[k] = lines[k][:-4] + "ACCEPT" if lines[k].endswith("DROP") else \
        lines[k][:-6] + "DROP"
    return "\n".join(lines) + "\n"


# the debug line a helper logs once its start-up idle work is over (__main__.queue_start_work:
# the heap reserve faulted in, ~60 ms of CPU in steps); none when BPFILTER_HEAP_RESERVE=0
_WARMED = "heap reserve warmed"


def ensure_launcher():
    """build/bpfilter-exec, made when missing."""
    if not os.access(LAUNCHER, os.X_OK):
        subprocess.run(["make", "-s", "-C", ROOT, "launcher", f"PYTHON={sys.executable}"],
                       check=True)


def start_helper(ns, env: dict, idle_exit: str = "3") -> tuple:
    """(process, log path) of the namespace's helper, started before the commands with its
    per-request log, and waited for until it serves (_wait_for_helper)."""
    log = os.path.join(ns._lockdir, "helper.log")
    henv = dict(env, BPFILTER_LOG="DEBUG", BPFILTER_IDLE_EXIT=idle_exit)
    helper = ns.popen([sys.executable, "-m", "bpfilter_umh", "--listen"], env=henv,
                      stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    _wait_for_helper(log)
    return helper, log


def _wait_for_helper(log: str, timeout: float = 30.0):
    """Until the helper serves and has done its start-up idle work, as a running system's
    helper has (started at boot, or by an earlier command): on 2 cores that work, run while
    the first command's iptables-restore parses its input, slowed the parse and the request
    (session 12: the first restore's wall +8-16 ms); a helper without a reserve is waited
    for only until it serves."""
    t0 = time.monotonic()
    want = "serving netns"
    while time.monotonic() - t0 < timeout:
        with open(log) as f:
            seen = f.read()
        if want in seen:
            if want == _WARMED or os.environ.get("BPFILTER_HEAP_RESERVE", "") == "0":
                return
            want, t0, timeout = _WARMED, time.monotonic(), 2.0   # older trees: no such line
            continue
        time.sleep(0.05)


def _helper_times(log: str, appends: int) -> dict:
    """From the helper's log ("pid P CMD: X ms" per request): the helper's total time serving
    the restore (the first caller pid), the best of the `appends` appends (the next ones), and
    the restores again (reload, again, changed: the next three), in seconds."""
    import re
    by_pid = {}
    with open(log) as f:
        for m in re.finditer(r"pid (\d+) (\S+): ([0-9.]+) ms", f.read()):
            pid = int(m.group(1))
            by_pid.setdefault(pid, {}).setdefault(m.group(2), 0.0)
            by_pid[pid][m.group(2)] += float(m.group(3)) / 1e3
    if not by_pid:
        return {}
    pids = list(by_pid)                 # dicts keep the order the log shows them in
    total = {p: sum(v.values()) for p, v in by_pid.items()}
    out = dict(helper_restore_s=total[pids[0]],
               helper_restore_parts=by_pid[pids[0]])
    if len(pids) > 1:
        best = min(pids[1:1 + appends], key=total.get)
        out.update(helper_append_s=total[best], helper_append_parts=by_pid[best])
    for step, pid in zip(("reload", "again", "changed"), pids[1 + appends:]):
        out[f"helper_{step}_s"] = total[pid]
    return out


# ---- report -------------------------------------------------------------------------------------

def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.0f}{unit}" if v >= 100 else f"{v:.1f}{unit}" if v >= 1 else f"{v:.3f}{unit}"
    return f"{v}{unit}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="10,100,1000,10000")
    ap.add_argument("--shapes", default=",".join(rulesets.SHAPES))
    ap.add_argument("--flavors", default="nf,tc,xdp")
    ap.add_argument("--no-flood", action="store_true")
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="control-plane runs per row, kernel and bpfilter first in turn; "
                         "medians are reported, the restores' ratios of every run beside them")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--replot", action="store_true", help="only redraw --md/--plot from --json")
    args = ap.parse_args()
    if args.replot:
        with open(args.json) as f:
            results = json.load(f)
        if args.md:
            write_md(results, args.md)
        if args.plot:
            plot(results, args.plot)
        return
    if os.geteuid() != 0:
        sys.exit("ruleset_bench: needs root (namespaces, BPF)")
    ns_list = [int(x) for x in args.n.split(",")]
    shapes = args.shapes.split(",")
    flavors = args.flavors.split(",")
    results = dict(machine=machine(), rows=[])
    base_flood = None if args.no_flood else flood_ns_per_packet(_nothing)
    results["flood_no_rules_ns"] = base_flood
    print(f"flood, no rules: {fmt(base_flood, ' ns')}/packet", flush=True)
    for shape in shapes:
        ends = {}                       # the smallest and largest N's tables (side_by_side)
        for n in ns_list:
            rs = rulesets.make(shape, n, seed=1)
            text = to_input(rs.text)
            table = table_of(text)
            if n in (min(ns_list), max(ns_list)):
                ends[n] = table
            row = dict(shape=shape, n=n, runs=[t for ts in classify.describe(table).values()
                                               for t in ts])
            for fl in flavors:
                row[f"tr_{fl}"] = bench_test_run(table, flavor=fl)
            if n <= 1000:
                row["tr_linear"] = bench_test_run(table, env_min_run=0)
            if not args.no_flood:
                # the machine is shared and its load drifts: each row has its own no-rules
                # baseline, measured right before and after (noise only adds time: the smaller)
                b0 = flood_ns_per_packet(_nothing)
                row["flood_kernel"] = flood_ns_per_packet(_kernel(text))
                try:
                    row["flood_bpfilter"] = flood_ns_per_packet(_bpfilter(table))
                except Exception as e:                  # noqa: BLE001
                    row["flood_bpfilter_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                row["flood_base"] = min(b0, flood_ns_per_packet(_nothing))
                base_flood = min(base_flood, row["flood_base"])
                results["flood_no_rules_ns"] = base_flood
            if not args.no_control:
                row.update(control_plane_repeated(text, args.repeat))
            results["rows"].append(row)
            print(line(row, row.get("flood_base", base_flood)), flush=True)
        if len(ends) > 1:
            side = side_by_side(ends)
            results.setdefault("side", {})[shape] = side
            print(side_line(shape, side), flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    if args.md:
        write_md(results, args.md)
    if args.plot:
        plot(results, args.plot)


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    return dict(kernel=platform.release(), cpu=cpu, cpus=os.cpu_count(),
                python=platform.python_version(),
                iptables=subprocess.run(["iptables-legacy", "--version"], capture_output=True,
                                        text=True).stdout.strip(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def _ns(row, key):
    v = row.get(key)
    return v.get("ns") if isinstance(v, dict) else None


def _side(results, shape: str):
    """results' side_by_side of `shape` with its N keys as ints (JSON made them strings), or
    None (a run with one N, or an older results file)."""
    side = results.get("side", {}).get(shape)
    if side is None:
        return None
    return dict(side, ns={int(k): v for k, v in side["ns"].items()},
                added={int(k): v for k, v in side["added"].items()})


def line(row, base) -> str:
    s = f"{row['shape']:9} N={row['n']:<6} test-run nf {fmt(_ns(row, 'tr_nf'), ' ns')}"
    for fl in ("tc", "xdp", "linear"):
        if f"tr_{fl}" in row:
            v = row[f"tr_{fl}"]
            s += f" | {fl} {fmt(v.get('ns'), ' ns') if 'ns' in v else 'n/a'}"
    if "flood_kernel" in row:
        k, b = row["flood_kernel"], row.get("flood_bpfilter")
        s += f" | flood kernel +{fmt(k - base, ' ns')} bpfilter " + \
             (f"+{fmt(b - base, ' ns')}" if b is not None else "n/a")
    if "kernel_restore_s" in row:
        s += (f" | restore kernel {fmt(row['kernel_restore_s'], ' s')} bpfilter "
              f"{fmt(row.get('bpfilter_restore_s'), ' s')} (helper "
              f"{fmt(row.get('helper_restore_s'), ' s')}) | append kernel "
              f"{fmt(row.get('kernel_append_s'), ' s')} bpfilter {fmt(row.get('bpfilter_append_s'), ' s')}"
              f" (helper {fmt(row.get('helper_append_s'), ' s')}, Python door "
              f"{fmt(row.get('pydoor_append_s'), ' s')})")
    if len(row.get("restore_samples", ())) > 1:
        ratios = sorted(b / k for k, b in row["restore_samples"])
        s += (f" | restore ratio median {statistics.median(ratios):.1f}x of {len(ratios)} "
              f"[{ratios[0]:.1f}-{ratios[-1]:.1f}]")
    if "kernel_again_s" in row:
        s += "".join(f" | {step} kernel {fmt(row.get(f'kernel_{step}_s'), ' s')} bpfilter "
                     f"{fmt(row.get(f'bpfilter_{step}_s'), ' s')}" for step in ("again", "changed"))
    nf = row.get("tr_nf", {})
    if "error" in nf:
        s += f" | nf: {nf['error']}"
    if row.get("bpfilter_error"):
        s += f" | door: {row['bpfilter_error'][-120:]!r}"
    return s


NOTES_MARK = "<!-- hand-written notes below: write_md keeps them -->"


def write_md(results, path):
    rows = results["rows"]
    m = results["machine"]
    base = results.get("flood_no_rules_ns")
    out = ["# Large rulesets: kernel iptables-legacy vs bpfilter (issue #7)", "",
           f"Measured {m['date']} by `make bench` (bench/ruleset_bench.py) on: kernel {m['kernel']}, "
           f"{m['cpu']} ({m['cpus']} CPUs, shared with other work), Python {m['python']}, "
           f"{m['iptables']}. Rulesets: bench/rulesets.py (seed 1); the flood packet matches no "
           f"rule, so every rule is consulted (worst case).", "",
           f"Flood with no rules at all: {fmt(base, ' ns')}/packet at best; each row's added cost "
           f"is against its own no-rules baseline measured around it (the machine is shared, "
           f"its load drifts by microseconds: bpfilter's added cost is below the flood's "
           f"resolution, the test-run column is its precise per-packet cost).", "",
           "| shape | N | test-run nf ns | tc ns | xdp ns | linear ns | nf load s | flood kernel +ns | "
           "flood bpfilter +ns | restore kernel s | restore bpfilter s | restore helper s | "
           "append kernel s | append bpfilter s | append helper s | append Python door s |",
           "|" + "---|" * 16]
    for r in rows:
        def tr(k):
            v = r.get(k)
            if v is None:
                return "-"
            return fmt(v.get("ns")) if "ns" in v else "fails"
        fk = r.get("flood_kernel")
        fb = r.get("flood_bpfilter")
        base = r.get("flood_base", results.get("flood_no_rules_ns"))
        out.append(f"| {r['shape']} | {r['n']} | {tr('tr_nf')} | {tr('tr_tc')} | {tr('tr_xdp')} | "
                   f"{tr('tr_linear')} | {fmt(r.get('tr_nf', {}).get('load_s'))} | "
                   f"{fmt(fk - base) if fk is not None and base else '-'} | "
                   f"{fmt(fb - base) if fb is not None and base else 'fails' if r.get('flood_bpfilter_error') else '-'} | "
                   f"{fmt(r.get('kernel_restore_s'))} | {fmt(r.get('bpfilter_restore_s'))} | "
                   f"{fmt(r.get('helper_restore_s'))} | "
                   f"{fmt(r.get('kernel_append_s'))} | {fmt(r.get('bpfilter_append_s'))} | "
                   f"{fmt(r.get('helper_append_s'))} | {fmt(r.get('pydoor_append_s'))} |")
    resync = [r for r in rows if "kernel_again_s" in r]
    if resync:
        out += ["", "Restores over the loaded table (a periodic full sync, as kube-proxy does): "
                "the same text again (replacing the table with itself), and with one rule's "
                "verdict turned round; wall s, helper-side s in brackets.", "",
                "| shape | N | again kernel | again bpfilter | changed kernel | changed bpfilter |",
                "|---|---|---|---|---|---|"]
        for r in resync:
            out.append(f"| {r['shape']} | {r['n']} | " + " | ".join(
                f"{fmt(r.get(f'kernel_{st}_s'))} | {fmt(r.get(f'bpfilter_{st}_s'))} "
                f"({fmt(r.get(f'helper_{st}_s'))})" for st in ("again", "changed")) + " |")
    out += ["", "## Ratios against the issue's goals", ""]
    for shape in sorted({r["shape"] for r in rows}, key=rulesets.SHAPES.index):
        by_n = {r["n"]: r for r in rows if r["shape"] == shape}
        lo, hi = by_n.get(min(by_n)), by_n.get(max(by_n))
        a, b = _ns(lo, "tr_nf"), _ns(hi, "tr_nf")
        side = _side(results, shape)
        parts = []
        if side is not None:
            r = side["ratio"]
            rows_ratio = f"; the rows' = {b / a:.2f}" if a and b else ""
            parts.append(f"test-run N={side['hi']} / N={side['lo']} side by side = "
                         f"{r['median']:.2f} (median of {side['rounds']} rounds, "
                         f"{r['min']:.2f}-{r['max']:.2f}{rows_ratio}) (goal <= 2)")
        elif a and b:
            parts.append(f"test-run N={hi['n']} / N={lo['n']} = {b / a:.2f} (goal <= 2)")
        fk, fb = hi.get("flood_kernel"), hi.get("flood_bpfilter")
        base = hi.get("flood_base", results.get("flood_no_rules_ns"))
        if fk is not None and fb is not None and base:
            ak, ab = fk - base, fb - base
            parts.append(f"flood added cost kernel/bpfilter at N={hi['n']} = "
                         f"{ak:.0f}/{ab:.0f} ns" + (f" = {ak / ab:.0f}x" if ab > 0 else
                                                    " (bpfilter within noise of no rules)")
                         + " (goal >= 100x)")
            if side is not None and side["hi"] == hi["n"]:
                added = side["added"][side["hi"]]["median"]
                parts.append(f"kernel added (flood) / bpfilter added (test-run minus the empty "
                             f"program's {side['empty_ns']:.0f} ns, side by side: "
                             f"{added:.0f} ns) = {ak / max(1.0, added):.0f}x")
            elif b:
                parts.append(f"kernel added / (test-run nf - floor 30 ns) = "
                             f"{ak / max(1.0, b - 30):.0f}x")
        kr, br = hi.get("kernel_restore_s"), hi.get("bpfilter_restore_s")
        if kr and br:
            ratios = sorted(b / k for k, b in hi.get("restore_samples", ()))
            parts.append(f"restore bpfilter/kernel = {br / kr:.1f}x wall"
                         + (f", {hi['helper_restore_s'] / kr:.1f}x helper-side"
                            if hi.get("helper_restore_s") else "")
                         + (f" (medians of {len(ratios)} runs; each run's ratio "
                            f"{ratios[0]:.1f}-{ratios[-1]:.1f})" if len(ratios) > 1 else "")
                         + " (goal <= 2)")
        for st in ("again", "changed"):
            k, b = hi.get(f"kernel_{st}_s"), hi.get(f"bpfilter_{st}_s")
            if k and b:
                parts.append(f"restore {st} bpfilter/kernel = {b / k:.1f}x wall")
        if hi.get("bpfilter_append_s") is not None:
            # the best of the appends, and beside it the first one after the restore and the
            # worst: a user's one `iptables -A` is any of them
            each = hi.get("bpfilter_appends_s") or []
            parts.append(f"append through bpfilter = {hi['bpfilter_append_s'] * 1000:.0f} ms wall"
                         + (f", {hi['helper_append_s'] * 1000:.0f} ms helper-side"
                            if hi.get("helper_append_s") else "")
                         + (f" (first {each[0] * 1000:.0f}, worst {max(each) * 1000:.0f} of "
                            f"{len(each)})" if len(each) > 1 else "") + " (goal < 50 ms)")
        out.append(f"- **{shape}**: " + "; ".join(parts))
    out += ["", "## Classified runs at the largest N", ""]
    for r in rows:
        if r["n"] == max(x["n"] for x in rows):
            out.append(f"- {r['shape']}: " + ("; ".join(r["runs"][:4]) or "none (linear code)")
                       + (f" (+{len(r['runs']) - 4} more)" if len(r["runs"]) > 4 else ""))
    # what people wrote about earlier runs stays: everything from NOTES_MARK on is kept
    try:
        with open(path) as f:
            old = f.read()
        kept = old[old.index(NOTES_MARK):] if NOTES_MARK in old else ""
    except FileNotFoundError:
        kept = ""
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n" + ("\n" + kept if kept else ""))


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    base = results.get("flood_no_rules_ns") or 0
    shapes = [s for s in rulesets.SHAPES if any(r["shape"] == s for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for s in shapes:
        rr = sorted((r for r in rows if r["shape"] == s), key=lambda r: r["n"])
        xs = [r["n"] for r in rr]
        ys = [_ns(r, "tr_nf") for r in rr]
        axes[0].plot([x for x, y in zip(xs, ys) if y], [y for y in ys if y], "o-",
                     label=f"{s} bpfilter nf")
        lin = [(r["n"], _ns(r, "tr_linear")) for r in rr if _ns(r, "tr_linear")]
        if lin:
            axes[0].plot(*zip(*lin), "x--", label=f"{s} linear code")
        k = [(r["n"], max(1.0, r["flood_kernel"] - r.get("flood_base", base)))
             for r in rr if r.get("flood_kernel")]
        b = [(r["n"], max(1.0, r["flood_bpfilter"] - r.get("flood_base", base)))
             for r in rr if r.get("flood_bpfilter")]
        side = _side(results, s)
        floor = side["empty_ns"] if side is not None else 30
        t = [(r["n"], max(1.0, _ns(r, "tr_nf") - floor)) for r in rr if _ns(r, "tr_nf")]
        if k:
            axes[1].plot(*zip(*k), "s-", label=f"{s} kernel iptables (flood)")
        if b:
            axes[1].plot(*zip(*b), "o:", alpha=0.4, label=f"{s} bpfilter (flood, noise)")
        if t:
            axes[1].plot(*zip(*t), "o-", label=f"{s} bpfilter (test-run - empty program, "
                                               f"{floor:.0f} ns)")
    axes[0].set(xscale="log", yscale="log", xlabel="rules (N)", ylabel="ns/packet",
                title="BPF_PROG_TEST_RUN, packet matching no rule")
    axes[1].set(xscale="log", yscale="log", xlabel="rules (N)",
                ylabel="added ns/packet over no rules",
                title="added cost: kernel (veth UDP flood) vs bpfilter")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
