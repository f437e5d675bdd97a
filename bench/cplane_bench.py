"""Where the time of one SET_REPLACE goes at N rules (issue #7 item 2): a benchmark, not a test.

For each shape of bench/rulesets.py: the kernel's iptables-legacy-restore and iptables-legacy -A,
in a throwaway namespace, give the blobs iptables would send (the kernel as the parser). Then, in
a second throwaway namespace, this process serves them in-process as the helper does
(sockopt.Dispatcher.serve; the caller's memory is this process's own buffers): a restore into
the empty table, then --appends appends of one rule at the end of INPUT. Each command is the
request sequence libiptc makes: GET_INFO, GET_ENTRIES (live counters), SET_REPLACE (the blob
sent, num_counters = the running table's), SET_ADD_COUNTERS (the old counters returned, the new
rule's zero). A restore sends comefrom 0 (as iptables-restore does), an append what GET_ENTRIES
showed. The caller's own work (building buffers) is not counted, and no GC pass of this process
runs during a command (the caller is another process for a real helper). What a helper does
at its start, before its first request (__main__.preload: imports, engine.warm_up), and in its
first idle moments (__main__.queue_start_work: the heap reserve), is done before the first
command, where the measured tree has it.

Phases (ms per command; functions wrapped with a timer by this script, nothing in the package
changes; median over the appends, (min-max)):
  decode     model.decode_replace (translate_table's checks, the Table)
  compile    Engine._compile                     maps     engine.create_maps
  load       BPF_PROG_LOAD (kernel.Prog.load, engine.load_with_func_info)
  counters   every counters read of a request (Engine._read, engine._map_counts: GET_ENTRIES'
             and the old counters at the swap)
  state      the state file (Engine._save_state) and the add_counters base file
  swap       the slots' swaps and emptying stale slots
  rcu        the RCU grace-period wait after the swap where a request waits for it: the wait
             itself (beside gc.collect in a thread where the engine collects during the install),
             or, where the helper's install waits in a thread beside its reply
             (engine._LateCounts), a request joining that thread
  gc         gc.collect calls during the command (the one in install overlaps rcu)
  sockopt    do_replace + do_add_counters outside decode and Engine.install (blob patching, old
             counters written to the caller, ADD_COUNTERS parsing, freeing the old table)
  get        GET_INFO + GET_ENTRIES (counters included: also in `counters`)
  other      the rest: the engine's own walks and syscalls, the requests' framing
  total      the helper's time of the command's requests, end to end (wall)
  cpu        the CPU time of those requests (user + system, all threads): steadier than wall
             on a shared machine, and blind to the RCU wait (a sleep)
  after      the work the helper leaves for after its reply (engine.AFTER_REPLY, where the tree
             has it: the GC pass and gc.freeze, freeing the replaced table), not in total

--floors adds, per shape, what a cold restore's decode costs at the least, beside its phases (ms,
the best of 5; issue #7: the restore's 2x asks the helper to answer in about the binary's own
parse time, bench/results.md):
  objects    one _TRaw, IpHeader, IPv4Address and Rule an entry with every field set once, the
             entry's key and matches list: what model._run_raws and _made_strided make of a
             blocklist entry, nothing else done; the floor of any decode that makes them
  columns    where the largest chain is one run of equal-size entries that differ only in the
             source prefix (and verdict, comefrom, counters): every entry checked against the
             first and the sources and masks read as byte columns, the prefix codes made, and the
             trie's entries (classify._lpm_columns, the compiler's own): a decode that makes no
             object per entry, up to what the kernel needs
  fill       those entries into a new LPM trie (engine._fill: one BPF_MAP_UPDATE_BATCH)

    python3 bench/cplane_bench.py [--shapes blocklist,fanout] [--n 10000] [--appends 3]
                                  [--pkg DIR]     (import bpfilter_umh from DIR: compare trees)
                                  [--to-input]    (FORWARD rules on INPUT, as ruleset_bench.py)
                                  [--floors]
                                  [--series K]    (a helper through 2K restores, see series)
                                  [--ipv6]        (ipv6_bench.py's shapes through ip6tables)
Needs root. Touches only the namespaces it creates and removes (the engine is flushed first).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import os
import statistics
import struct
import sys
import threading
import time
from socket import AF_INET, AF_INET6

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _setup_path(pkg):
    sys.path[:0] = [pkg or ROOT, os.path.join(ROOT, "tests"), HERE]


APPEND = "-A INPUT -s 203.0.113.{k}/32 -p udp -m udp --dport 4 -j DROP"
APPEND6 = "-A INPUT -s 2001:db8:ffff::{k}/128 -p udp -m udp --dport 4 -j DROP"
FAMILY = AF_INET   # --ipv6: AF_INET6, the shapes of bench/ipv6_bench.py through ip6tables
PHASES = ("decode", "compile", "maps", "load", "counters", "state", "swap", "rcu", "gc",
          "sockopt", "get", "other", "total", "cpu", "after")
# phases that do not overlap (get holds a counters read; rcu and gc run side by side)
_DISJOINT = ("decode", "compile", "maps", "load", "counters", "state", "swap", "sockopt")
T = {}          # phase -> seconds of the request sequence being measured


class _Timer:
    """Wraps callables so their wall time adds to T[phase] (outermost call only)."""

    def __init__(self):
        self.depth = {}

    def wrap(self, owner, attr, phase, main_only=False):
        """main_only: count only calls on the main thread (the request's): a call in a thread
        of its own overlaps the request, and the request's waits for it are timed apart."""
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if raw is None:
            return              # a tree without it (--pkg)
        fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        depth = self.depth

        @functools.wraps(fn)
        def timed(*a, **kw):
            if depth.get(phase) or (main_only and
                                    threading.current_thread() is not threading.main_thread()):
                return fn(*a, **kw)
            depth[phase] = 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                T[phase] = T.get(phase, 0.0) + time.perf_counter() - t0
                depth[phase] = 0
        if isinstance(raw, staticmethod):
            timed = staticmethod(timed)
        elif isinstance(raw, classmethod):
            timed = classmethod(timed)
        setattr(owner, attr, timed)


def instrument():
    import gc
    from bpfilter_umh import attach, engine, model, sockopt
    from bpfilter_umh import kernel as K
    t = _Timer()
    t.wrap(model, "decode_replace", "decode")
    t.wrap(engine.Engine, "_compile", "compile")
    t.wrap(engine, "create_maps", "maps")
    t.wrap(K.Prog, "load", "load")
    t.wrap(engine, "load_with_func_info", "load")
    t.wrap(engine.Engine, "_read", "counters")
    t.wrap(engine, "_map_counts", "counters", main_only=True)
    t.wrap(engine.Engine, "_save_state", "state")
    t.wrap(engine.Engine, "_write_counters_file", "state")
    # the wait itself where the request makes it; a helper's install waits in a thread beside
    # its reply (engine._LateCounts), and only a request joining that thread waits for it
    t.wrap(engine, "_wait_for_readers", "rcu", main_only=True)
    if hasattr(engine, "_LateCounts"):
        t.wrap(engine._LateCounts, "finish", "rcu")
    t.wrap(engine.Engine, "_empty_stale", "swap")
    for cls in (attach.NfAttachment, attach.L2Attachment):
        t.wrap(cls, "swap", "swap")
    t.wrap(engine.Engine, "install", "install")
    t.wrap(engine.Engine, "add_counters", "engine_add")
    t.wrap(sockopt, "do_replace", "replace")
    t.wrap(sockopt, "do_add_counters", "add_counters")
    t.wrap(sockopt, "get_info", "get")
    t.wrap(sockopt, "get_entries", "get")
    collect = gc.collect

    def timed_collect(*a):
        t0 = time.perf_counter()
        try:
            return collect(*a)
        finally:
            T["gc"] = T.get("gc", 0.0) + time.perf_counter() - t0
    gc.collect = timed_collect


# ---- the blobs iptables sends --------------------------------------------------------------------

_KERNEL_BLOBS = {}      # text -> kernel_blobs' list, the longest made in this run


def kernel_blobs(text: str, appends: int):
    """[(getinfo, entries blob)]: the table after iptables-legacy-restore of `text`, then after
    each append, as the kernel holds them (comefrom set by mark_source_chains). Made once per
    text in a run (--floors reads the restore's again)."""
    kept = _KERNEL_BLOBS.get(text)
    if kept is not None and len(kept) > appends:
        return kept[:appends + 1]
    import kernel_xt as kx
    import lab
    from nsutil import Netns
    out = []
    v6 = FAMILY == AF_INET6
    with Netns("cb") as ns:
        if v6:
            ns.run(["ip6tables-legacy-restore"], input=text)
        else:
            lab.restore(ns, text)
        with ns.inside():
            out.append(kx.snapshot(FAMILY))
        for k in range(appends):
            ns.run(["ip6tables-legacy" if v6 else "iptables-legacy"] +
                   (APPEND6 if v6 else APPEND).format(k=99 - k).split())
            with ns.inside():
                out.append(kx.snapshot(FAMILY))
    _KERNEL_BLOBS[text] = out
    return out


def restore_blob(blob: bytes) -> bytes:
    """iptables-restore sends comefrom 0 and zero counters (libiptc builds the blob anew)."""
    import kernel_xt as kx
    return kx.restored(blob, FAMILY)


def appended_blob(info, blob: bytes) -> bytes:
    """What iptables-legacy -A INPUT sends, from the kernel's entries after it: libiptc builds
    the policies, the user chains' RETURN entries and the new rule (INPUT's last, before its
    policy) with comefrom 0, and sends the other rules as GET_ENTRIES showed them."""
    import kernel_xt as kx
    new = next(o for o, n, _, _ in kx.entries(blob, FAMILY) if o + n == info.underflow[1])
    return kx.libiptc_appended(info, blob, new, FAMILY)


# ---- libiptc's request sequence, served in-process -----------------------------------------------

class Caller:
    """This process as the caller: buffers whose addresses go into the requests."""

    def __init__(self):
        self.keep = []

    def buf(self, data: bytes, size: int = None):
        b = ctypes.create_string_buffer(bytes(data), size or max(1, len(data)))
        self.keep.append(b)
        return ctypes.addressof(b), b


def commit(d, be, info, blob: bytes, counters_for):
    """GET_INFO, GET_ENTRIES, SET_REPLACE, SET_ADD_COUNTERS of one iptables command, through
    Dispatcher.serve as the helper serves them: `info` and `blob` the table it sends;
    counters_for(old counters) -> the counters it adds back."""
    from bpfilter_umh import sockopt as S
    from bpfilter_umh.frames import Request
    pid, fam = os.getpid(), FAMILY
    c = Caller()

    def serve(cmd, is_set, data, size=None):
        addr, b = c.buf(data, size)
        req = Request(cmd, is_set, fam, pid, size or len(data), addr, 0)
        t0, c0 = time.perf_counter(), time.process_time()
        rep = d.serve(req)
        T["total"] = T.get("total", 0.0) + time.perf_counter() - t0    # the helper's time only
        T["cpu"] = T.get("cpu", 0.0) + time.process_time() - c0
        assert rep.status == 0, (cmd, is_set, rep.status)
        return b
    name = b"filter".ljust(32, b"\0")
    got = serve(S.SO_GET_INFO, 0, name, S.GETINFO.size)
    size = S.GETINFO.unpack(got.raw[:S.GETINFO.size])[13]
    before, rcu_before = T.get("counters", 0.0), T.get("rcu", 0.0)
    serve(S.SO_GET_ENTRIES, 0, S.GET_ENTRIES_HDR.pack(name, size), S.GET_ENTRIES_HDR.size + size)
    # GET_ENTRIES' own counters read and its wait for the last install's late counts: both
    # are in `get` too, and are taken out of it once when `other` is computed
    T["counters_get"] = T.get("counters", 0.0) - before
    T["rcu_get"] = T.get("rcu", 0.0) - rcu_before
    old_n = be().num_entries()
    cnt_addr, cnt_buf = c.buf(b"", 16 * old_n)
    hdr = S.REPLACE_HDR.pack(name, info.valid_hooks, info.num_entries, len(blob),
                             *info.hook_entry, *info.underflow, old_n, cnt_addr)
    serve(S.SO_SET_REPLACE, 1, hdr + blob)
    raw = cnt_buf.raw
    old = [S.XT_COUNTERS.unpack_from(raw, 16 * i) for i in range(old_n)]
    new = counters_for(old)
    serve(S.SO_SET_ADD_COUNTERS, 1, S.COUNTERS_INFO_HDR.pack(name, len(new)) + b"".join(
        S.XT_COUNTERS.pack(p, b) for p, b in new))


def _appended_at(be) -> int:
    """Entry index of INPUT's policy entry: an append puts its rule there."""
    return be.table.chain("INPUT").policy_entry.index


def run_shape(shape: str, n: int, appends: int, to_input: bool = False) -> dict:
    import gc
    import rulesets
    from nsutil import Netns
    from bpfilter_umh import engine
    from bpfilter_umh.sockopt import Dispatcher
    if FAMILY == AF_INET6:
        import ipv6_bench
        text = ipv6_bench.SHAPES[shape](n)
    else:
        text = rulesets.make(shape, n).text
    # --to-input: every rule on INPUT (as ruleset_bench.py floods it), so the appends land at the
    # end of the large chain instead of moving a FORWARD chain's entries
    blobs = kernel_blobs(text.replace("-A FORWARD ", "-A INPUT ") if to_input else text,
                         appends)
    rows = {"restore": [], "append": []}
    with Netns("cp") as ns:
        with ns.inside():
            d = Dispatcher()
            be = lambda: d.backend(d.home_cookie, FAMILY)  # noqa: E731
            try:
                for k, (info, blob) in enumerate(blobs):
                    if k == 0:
                        blob = restore_blob(blob)
                        counters_for = lambda old, m=info.num_entries: [(0, 0)] * m  # noqa
                    else:
                        blob = appended_blob(info, blob)
                        at = _appended_at(be())
                        # libiptc: the old rules keep their counters, the new one starts at 0
                        counters_for = lambda old, at=at: old[:at] + [(0, 0)] + old[at:]  # noqa
                    gc.collect()
                    T.clear()
                    # the caller's side (building buffers) is another process for a helper: no
                    # GC pass of this process may run there and take work off the helper's side
                    gc.disable()
                    try:
                        commit(d, be, info, blob, counters_for)
                    finally:
                        gc.enable()
                    # what the helper does once the caller has its answer (engine.AFTER_REPLY,
                    # trees that have it): not in total, its own column; the phases are those
                    # of the requests (a thread's wait ending later adds nothing)
                    seen = dict(T)
                    t1 = time.perf_counter()
                    if getattr(engine, "AFTER_REPLY", None) is not None:
                        engine.run_after_reply()
                    T.clear()
                    T.update(seen)
                    T["after"] = time.perf_counter() - t1
                    T["sockopt"] = (T.get("replace", 0) - T.get("decode", 0)
                                    - T.get("install", 0) + T.get("add_counters", 0)
                                    - T.get("engine_add", 0))
                    T["other"] = T["total"] - sum(T.get(p, 0) for p in _DISJOINT) \
                        - max(T.get("rcu", 0), T.get("gc", 0)) \
                        - max(0, T.get("get", 0) - T.get("counters_get", 0)
                              - T.get("rcu_get", 0))
                    rows["restore" if k == 0 else "append"].append(
                        {p: T.get(p, 0.0) * 1e3 for p in PHASES})
            finally:
                be().engine.flush()
                be().engine.close()
    return rows


# ---- --floors: what a cold restore's decode costs at the least -----------------------------------

FLOOR_RUNS = 5


def _best_ms(fn, runs: int = FLOOR_RUNS) -> float:
    """The best wall time of fn() in ms, with no GC pass (as the helper serves a request)."""
    import gc
    best = None
    for _ in range(runs):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            got = fn()
            t = (time.perf_counter() - t0) * 1e3
        finally:
            gc.enable()
        del got
        best = t if best is None else min(best, t)
    return best


def _objects_maker():
    """make(n, heads, tail) -> the objects of n entries as the decode makes a blocklist's: the
    loop written out from the classes' own fields (each a STORE_ATTR, as in model.py's loops)."""
    import dataclasses
    import ipaddress
    from bpfilter_umh import model
    ip_f = [f.name for f in dataclasses.fields(model.IpHeader)]
    rule_f = [f.name for f in dataclasses.fields(model.Rule)]
    raw_f = [f for f in model._TRaw.__slots__ if f not in ("ip", "key")]
    body = ["def make(n, heads, tail):", "    out = []", "    put = out.append",
            "    for i in range(n):", "        key = heads[i] + tail", "        a = new(V4)",
            "        a._ip = i", "        ip = new(Ip)"]
    body += [f"        ip.{f} = a" for f in ip_f]
    body += ["        r = Raw()", "        r.ip = ip", "        r.key = key"]
    body += [f"        r.{f} = None" for f in raw_f]
    body += ["        rule = new(Rule)"]
    body += [f"        rule.{f} = " + {"ip": "ip", "matches": "[]"}.get(f, "0") for f in rule_f]
    body += ["        rule.cache_key = key", "        put((r, rule))", "    return out"]
    scope = dict(new=object.__new__, V4=ipaddress.IPv4Address, Ip=model.IpHeader,
                 Raw=model._TRaw, Rule=model.Rule)
    exec("\n".join(body), scope)        # noqa: S102 - the bench's own text
    return scope["make"]


def objects_floor(n: int) -> float:
    make = _objects_maker()
    heads = [bytes(84) + i.to_bytes(8, "little") for i in range(n)]
    tail = bytes(60)
    return _best_ms(lambda: make(n, heads, tail))


def _prefix_run(info, blob: bytes):
    """(offset, entry size, count) of the largest built-in chain's rules where they hold most of
    the table's entries and are one run of equal-size IPv4 entries that differ from the first
    only in the source address and mask, the standard verdict, comefrom and the counters (read
    by columns_floor); else None."""
    from bpfilter_umh import model
    cf, _cnt, end = model._VOLATILE[AF_INET]
    spans = [(info.underflow[h] - info.hook_entry[h], info.hook_entry[h])
             for h in range(5) if info.valid_hooks >> h & 1]
    size, lo = max(spans)
    if size <= 0:
        return None
    es = int.from_bytes(blob[lo + cf - 2:lo + cf], "little")
    if es % 8 or size % es or es != end + 40 or 2 * (size // es) < info.num_entries:
        return None                                 # (es: ipt_entry + xt_standard_target)
    return lo, es, size // es


def columns_floor(info, blob: bytes):
    """(ms, trie entries) of the columnar read of _prefix_run's entries, or None."""
    from array import array
    from itertools import repeat
    from operator import lshift, or_
    from bpfilter_umh import classify, model
    run = _prefix_run(info, blob)
    if run is None:
        return None
    lo, es, n = run
    cf, _cnt, end = model._VOLATILE[AF_INET]
    verdict = end + 32                              # xt_standard_target's int after its header
    out = {}

    def read():
        b = bytearray(blob[lo:lo + n * es])
        w = memoryview(b).cast("I")
        per = es // 4
        src, msk, vd = (w[o // 4::per].tobytes() for o in (0, 8, verdict))
        zeros = array("I", bytes(4 * n))
        for o in (0, 8, verdict, *range(cf, end, 4)):
            w[o // 4::per] = zeros
        tpl = b[:es]
        if b != tpl * n:
            out["ok"] = False
            return
        s, m = array("I", src), array("I", msk)
        s.byteswap()
        m.byteswap()
        codes = array("Q", map(or_, map(lshift, s, repeat(8)), map(classify._PLEN.get, m)))
        keys, bests = classify._lpm_columns(None, range(n), "src", codes=codes)
        v = array("i", vd)
        col = array("I", bytes(8 * len(bests)))
        col[0::2] = array("I", bests)
        col[1::2] = array("I", [v[i] & 0xff for i in bests])
        out["ok"] = True
        out["entries"] = list(zip(keys, struct.Struct("8s" * len(bests)).unpack(col.tobytes())))
    ms = _best_ms(read)
    return (ms, out["entries"]) if out.get("ok") else None


def fill_floor(entries: list) -> float:
    """ms of engine._fill of `entries` into a new LPM trie (this thread's namespace)."""
    from bpfilter_umh import engine
    from bpfilter_umh import kernel as K
    best = None
    for _ in range(FLOOR_RUNS):
        m = K.Map.create(K.BPF_MAP_TYPE_LPM_TRIE, 8, 8, len(entries), name="bpfilter_floor",
                         flags=K.BPF_F_NO_PREALLOC)
        try:
            t0 = time.perf_counter()
            engine._fill(m, entries)
            t = (time.perf_counter() - t0) * 1e3
        finally:
            m.close()
        best = t if best is None else min(best, t)
    return best


def floors(shape: str, n: int) -> dict:
    """The --floors row of a shape (ms; None where it does not apply)."""
    import rulesets
    from nsutil import Netns
    info, blob = kernel_blobs(rulesets.make(shape, n).text, 0)[0]
    out = {"entries": info.num_entries, "objects": objects_floor(info.num_entries),
           "columns": None, "fill": None}
    got = columns_floor(info, restore_blob(blob))
    if got is not None:
        out["columns"] = got[0]
        with Netns("cf") as ns, ns.inside():
            out["fill"] = fill_floor(got[1])
    return out


# ---- --series: a helper that lives through many restores ---------------------------------------

def _one_changed(text: str, k: int) -> str:
    """`text` with the verdict of one rule turned round (the k-th choice, spread over the
    rules): one kube-proxy-like resync."""
    lines = text.splitlines()
    idx = [i for i, ln in enumerate(lines) if ln.startswith("-A ") and
           (ln.endswith(" DROP") or ln.endswith(" ACCEPT"))]
    i = idx[(k * 7919) % len(idx)]
    lines[i] = lines[i][:-4] + "ACCEPT" if lines[i].endswith("DROP") else lines[i][:-6] + "DROP"
    return "\n".join(lines) + "\n"


def series(shape: str, n: int, k: int) -> list:
    """One served namespace, 2k restores in a row, as a long-lived helper gets them: k of
    other rulesets of the shape (seeds 1..k: a host given other rules), then k of the last
    with one rule's verdict changed each time (kube-proxy's periodic resyncs). Per restore:
    (what, ms of the helper's total, decode, compile, the process's resident MiB after it)."""
    import gc
    import rulesets
    from nsutil import Netns
    from bpfilter_umh import engine
    from bpfilter_umh.sockopt import Dispatcher
    texts = [("other", rulesets.make(shape, n, seed).text) for seed in range(1, k + 1)]
    texts += [("resync", _one_changed(texts[-1][1], j)) for j in range(k)]
    blobs = [(what, kernel_blobs(t, 0)[0]) for what, t in texts]
    out = []
    with Netns("cs") as ns:
        with ns.inside():
            d = Dispatcher()
            be = lambda: d.backend(d.home_cookie, FAMILY)  # noqa: E731
            try:
                for what, (info, blob) in blobs:
                    gc.collect()
                    T.clear()
                    gc.disable()
                    try:
                        commit(d, be, info, restore_blob(blob),
                               lambda old, m=info.num_entries: [(0, 0)] * m)
                    finally:
                        gc.enable()
                    seen = dict(T)
                    if getattr(engine, "AFTER_REPLY", None) is not None:
                        engine.run_after_reply()
                    with open("/proc/self/statm") as f:
                        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
                    out.append((what, seen.get("total", 0) * 1e3, seen.get("decode", 0) * 1e3,
                                seen.get("compile", 0) * 1e3, rss))
            finally:
                be().engine.flush()
                be().engine.close()
    return out


def _cell(vals) -> str:
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    if hi - lo < 0.5 or len(vals) == 1:
        return f"{med:.0f}" if med >= 10 else f"{med:.1f}"
    return f"{med:.0f} ({lo:.0f}-{hi:.0f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="blocklist,ports,tuple,mixed,fanout")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--appends", type=int, default=3)
    ap.add_argument("--pkg", default=None, help="directory holding the bpfilter_umh to measure")
    ap.add_argument("--to-input", action="store_true",
                    help="the shape's FORWARD rules on INPUT, where the appends go")
    ap.add_argument("--floors", action="store_true",
                    help="what a cold restore's decode costs at the least, per shape")
    ap.add_argument("--ipv6", action="store_true",
                    help="bench/ipv6_bench.py's shapes (blocklist6, ports6) through ip6tables")
    ap.add_argument("--series", type=int, default=0, metavar="K",
                    help="per shape, K restores of other rulesets then K resyncs with one "
                         "rule changed, in one namespace: ms and resident MiB after each")
    a = ap.parse_args(argv)
    if a.ipv6:
        global FAMILY
        FAMILY = AF_INET6
        if a.floors:
            ap.error("--floors reads IPv4 entries only")
        if a.shapes == ap.get_default("shapes"):
            a.shapes = "blocklist6,ports6"
    _setup_path(a.pkg)
    import bpfilter_umh
    from bpfilter_umh import engine
    instrument()
    if hasattr(engine, "AFTER_REPLY"):
        engine.AFTER_REPLY = []         # as the helper (__main__) has it
    # and what a helper does at its start, before its first request (malloc's thresholds,
    # imports, engine.warm_up), then in its first idle moments (the heap reserve), where the
    # measured tree has them
    from bpfilter_umh import __main__ as helper_main
    if hasattr(helper_main, "heap"):
        helper_main.heap.configure()
    if hasattr(helper_main, "preload"):
        helper_main.preload()
    if hasattr(helper_main, "queue_start_work"):
        helper_main.queue_start_work()
        while helper_main._idle_step():
            pass
    print(f"# bpfilter_umh from {os.path.dirname(bpfilter_umh.__file__)}; N = {a.n}; "
          f"{a.appends} appends; ms, median (min-max); load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    print("| shape | step | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES), flush=True)
    for shape in a.shapes.split(","):
        rows = run_shape(shape, a.n, a.appends, a.to_input)
        for step in ("restore", "append"):
            if rows[step]:
                print(f"| {shape} | {step} | " + " | ".join(
                    _cell([r[p] for r in rows[step]]) for p in PHASES) + " |", flush=True)
    if a.series:
        print(f"\n# series: {a.series} restores of other rulesets (seeds 1..{a.series}), then "
              f"{a.series} resyncs of the last with one rule changed; ms, resident MiB after")
        print("| shape | restore | what | total | decode | compile | MiB |")
        print("|---|---|---|---|---|---|---|", flush=True)
        for shape in a.shapes.split(","):
            for i, (what, tot, dec, comp, rss) in enumerate(series(shape, a.n, a.series), 1):
                print(f"| {shape} | {i} | {what} | {tot:.1f} | {dec:.1f} | {comp:.1f} | {rss} |",
                      flush=True)
    if a.floors:
        print(f"\n# floors: ms, the best of {FLOOR_RUNS}; n/a: not one prefix run")
        print("| shape | entries | objects | columns | fill |")
        print("|---|---|---|---|---|", flush=True)
        for shape in a.shapes.split(","):
            f = floors(shape, a.n)
            print(f"| {shape} | {f['entries']} | " + " | ".join(
                "n/a" if f[k] is None else f"{f[k]:.1f}" for k in ("objects", "columns", "fill"))
                + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
