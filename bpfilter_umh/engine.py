"""The engine: installs a decoded table into the calling thread's network namespace and reads its
counters back. The door and the tests use exactly these names:

  Engine.open(family=AF_INET, flavor="nf") -> Engine
        flavor is a flavor spec (config.parse_spec): "nf", or per chain
        "INPUT=xdp,FORWARD=xdp,OUTPUT=nf"; each flavor in use has its own attachment, all
        programs share one counters map (docs/flavors.md "Per-chain flavors"); a chain on tc/xdp
        for some devices only, nf for the others: "INPUT=xdp:eth0:ens+,..." (docs/flavors.md
        "Per-interface flavors")
        adopts what is installed for this netns (state file + bpffs pins), or starts from the
        table a fresh namespace has (Table.empty: every policy ACCEPT, nothing attached)
  .table                      the installed Table (entry i == counter index i)
  .install(table) -> list[(pcnt, bcnt)]
        compile every built-in chain (errors name the rule), load (verifier errors name the rule),
        create a fresh counters map, then attach the new programs and detach the old ones; on ANY
        failure the previously installed programs keep filtering and a BpfilterError is raised.
        Returns the counters the replaced table had at the moment of the swap (what SET_REPLACE
        must write to ipt_replace.counters). In a helper (AFTER_REPLY) they are read right
        after the swap, without waiting for the RCU grace period; packets still inside the old
        programs are added later to the entries libiptc carries them to (_LateCounts)
  .counters() -> list[(pcnt, bcnt)]   per entry: sum over CPUs of the map + the add_counters base
        (a map of READER_MIN entries or more is summed in the kernel by a small program run
        with BPF_PROG_TEST_RUN, _SumsReader; smaller ones with BPF_MAP_LOOKUP_BATCH)
  .counters_nonzero() -> {index: (pcnt, bcnt)}   the same, only the entries that are not zero
  .add_counters(list[(pcnt, bcnt)])   IPT_SO_SET_ADD_COUNTERS (xt_add_counters adds)
  .status() -> dict           {"table", "family", "flavor", "chains": [{name, hook, flavor, prog_id,
                               jited_size, rule_count, policy, policy_counters, rules:[{pcnt, bcnt,
                               text}]}]}
  .flush()                    remove everything of this family in this netns: links, pins, files

State of one (netns, family):
  attach.py's pins under /sys/fs/bpf/bpfilter/<netns cookie>/<family>/ (prog array, dispatcher
  links, the ruleset programs); the counters map is found again through the installed programs'
  map ids (each program references exactly one map, the counters)
  /run/bpfilter/<netns cookie>/<family>.table   a JSON line (GET_INFO numbers, the generation
                                                and its programs' ids, blob_size; a large
                                                table's padded with spaces to HEAD_ROOM bytes),
                                                then the table blob as raw bytes (root-only)
  /run/bpfilter/<netns cookie>/<family>.counters the add_counters base of one generation (binary,
                                                written alone: no table re-encode per -c/-Z)
  /run/bpfilter/<netns cookie>/<family>.table.pending  written before the first swap, renamed
                                                over .table after the last: a process killed in
                                                between is settled by the next Engine.open (the
                                                programs in the slots say which table is live;
                                                a half-swapped table is installed again)
The netns cookie (SO_NETNS_COOKIE) is never reused within a boot, unlike inode numbers.

Atomic swap: attach.NfAttachment (a dispatcher per hook tail-calls its slot of a prog array;
replacing a ruleset is one map update per hook). The hooks are swapped one after the other, so
for an instant INPUT may run the new ruleset while OUTPUT still runs the old one (the kernel swaps
the whole table at once); no packet ever passes unfiltered. If a swap fails, the hooks already
swapped get their old programs back.
With per-chain flavors the hooks of every attachment are swapped the same way, then the slots a
flavor switch left behind are emptied (the new slot filters first: for an instant both, never
neither).

Kernel work beside the Python work (issue #7): one worker thread (_worker) makes a large
table's counters map and writes the pending state's blob while the table compiles, fills each
large classifier map from the moment the compile has made its entries (Engine._start_fill), the
others while the programs load (a program may be verified before its maps are filled, never
attached before), and makes a helper's spare counters map after its reply; the syscalls run
without the GIL, on another CPU, and during an install the worker gets the GIL back within
WORKER_SWITCH (_worker_served).
A helper grows its file table and parses its C types at start (warm_up); the heap its request
buffers come from is faulted in by its first idle steps (heap.reserve_steps), or at start when
it has no heap reserve.
"""
from __future__ import annotations

import errno
import fcntl
import json
import operator
import os
import re
import struct
import sys
import threading
import weakref

from . import attach
from . import daemons
from . import faults
from . import flavors
from . import addrtype, responder, targets
from . import kernel as K
from .compile import COUNTERS_MAP, CompiledProgram, KernelFacts, compile_table, encode_kept
from .errors import BpfilterError
from . import model as _model
from .model import (AF_INET, HOOK_NAMES, NF_ACCEPT, Jump, Table, Verdict, _unmade,
                    chain_outline)

STATE_ROOT = "/run/bpfilter"
FAMILY_NAMES = {2: "ipv4", 10: "ipv6"}

_facts = None


FACTS_CACHE = os.path.join(STATE_ROOT, "kernel_facts.json")


def kernel_facts() -> KernelFacts:
    """The running kernel's BTF offsets and kfunc ids. Parsing vmlinux BTF costs a new helper
    0.2-0.6 s on its first install, so the result is kept in /run/bpfilter (tmpfs: gone at
    reboot) under this boot's id; another boot, or an unreadable file, parses again."""
    global _facts
    if _facts is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            boot = None
        try:
            with open(FACTS_CACHE) as f:
                st = json.load(f)
            if boot and st.pop("boot_id") == boot:
                st["kfuncs"] = tuple(tuple(k) for k in st["kfuncs"])
                if tuple(k for k, _ in st["kfuncs"]) == tuple(KernelFacts.KFUNCS):
                    _facts = KernelFacts(**st)      # else: the compiler wants other kfuncs
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if _facts is None:
            _facts = KernelFacts.from_btf()
            if boot:
                try:
                    _private_dirs(STATE_ROOT)
                    tmp = f"{FACTS_CACHE}.{os.getpid()}.tmp"
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with open(fd, "w") as f:
                        json.dump(dict(_facts.__dict__, boot_id=boot), f)
                    os.replace(tmp, FACTS_CACHE)
                except OSError:
                    pass
    return _facts


def warm_up():
    """What a helper's first install would otherwise do on its first use, done at the helper's
    start (__main__.preload), before any request: cffi parsing the C type strings the request
    path names (~4 ms), the kernel feature probes NfAttachment.open requires (a program load
    and a link in a throwaway netns: ~2 ms), the kernel facts (a JSON file; the vmlinux BTF
    parse, 0.2-0.6 s, once per boot), and the worker thread (_worker), after the file table
    is grown (_grow_fd_table), the heap a SET_REPLACE's buffer comes from (_prefault_heap;
    only without a heap reserve, which faults that heap in first while idle instead of
    before the helper serves: 7.5-9 ms of every on-demand start), the model's first empty
    tables (Engine.__init__: 0.3 ms more the first time) and the helper's start time that
    state files name (_me: a read of /proc/PID/stat, 0.2-5 ms in the first install, where the
    worker's trie fill runs beside it). Best effort: a failure here is the first request's to
    report."""
    _me()
    _grow_fd_table()
    from . import heap
    if not heap.RESERVE:
        _prefault_heap()        # else the reserve's first idle steps (heap.REQUEST_BUFFER)
    for family in FAMILY_NAMES:
        Table.empty("filter", family)
    K.warm_types()
    for name in ("netfilter_link", "tail_call_netfilter"):
        K.features.has(name)
    try:
        kernel_facts()
    except BpfilterError:
        pass
    _worker(int).result()


FD_TABLE = 1024

# a SET_REPLACE's buffer (sockopt.do_replace: the caller's blob, ~2.4 MB at 10 000 rules) is a
# malloc of more than glibc's initial mmap threshold (128 KiB): a fresh mapping, each page
# faulted in and zeroed as the buffer is cleared, ~1.3 ms at a helper's first restore
PREFAULT_THRESHOLD, PREFAULT_HEAP = 8 << 20, 6 << 20


def _prefault_heap():
    """glibc's malloc raises its mmap threshold to the size of an mmapped chunk freed (up to
    32 MiB; malloc/malloc.c free: "dynamic mmap threshold"), and its trim threshold to twice
    that: after one PREFAULT_THRESHOLD buffer is freed, allocations under it come from the
    heap, and the PREFAULT_HEAP bytes touched here stay mapped for them (measured: the first
    2.4 MB request buffer 1.3-1.7 ms -> 0.4-0.5 ms). Other allocators just free the memory."""
    buf = bytearray(PREFAULT_THRESHOLD)
    del buf
    buf = bytearray(PREFAULT_HEAP)
    del buf


def _grow_fd_table():
    """A process's file table grows by reallocation, and while more than one thread shares it
    the kernel waits for an RCU grace period first (fs/file.c expand_fdtable: synchronize_rcu
    when files->count > 1): measured 7.5 ms in the request that opens the 256th or the 512th
    descriptor. A helper runs threads (_worker, _rcu_waiter, the probes'), so its table is
    grown to FD_TABLE slots at its start, before they exist: F_DUPFD at the top makes the
    kernel size the table (8 KiB of pointers), and a table never shrinks."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    top = FD_TABLE if soft == resource.RLIM_INFINITY else min(FD_TABLE, soft)
    try:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top - 1))
    except OSError:
        pass
    finally:
        os.close(fd)


def _merged(counts: list, extra: dict) -> list:
    """counts with extra {entry index: (pcnt, bcnt)} added (the offloaded program's drops)."""
    M = 2**64 - 1
    out = list(counts)
    for i, (p, b) in extra.items():
        if i < len(out):
            out[i] = ((out[i][0] + p) & M, (out[i][1] + b) & M)
    return out


def _accept_all(table: Table) -> bool:
    """Nothing to enforce: no rules anywhere and every policy ACCEPT (a fresh table)."""
    return all(not c.rules and (not c.builtin or c.policy == -NF_ACCEPT - 1) for c in table.chains)


def _verifier_slot(message: str):
    """The instruction the verifier stopped at: the last "N: (xx) ..." line of its log."""
    found = None
    for m in re.finditer(r"^(\d+): \(", message, re.M):
        found = int(m.group(1))
    return found


HOOK_OF_CHAIN = {"INPUT": 1, "FORWARD": 2, "OUTPUT": 3}     # NF_INET_LOCAL_IN, _FORWARD, _LOCAL_OUT


def hook_flavors(spec: str) -> dict:
    """{hook: flavor} of a flavor spec (config.parse_spec: "tc", "INPUT=xdp,...,OUTPUT=nf")."""
    from .config import parse_spec
    return {HOOK_OF_CHAIN[c]: f for c, f in parse_spec(spec).items()}


def hook_devices(spec: str) -> dict:
    """{hook: (pattern, ...)} of the chains a spec serves on some devices only (their L2 flavor
    there, nf on the other devices: docs/flavors.md "Per-interface flavors")."""
    from .config import parse_devices
    return {HOOK_OF_CHAIN[c]: d for c, d in parse_devices(spec).items()}


def _restricted(fl, hooks, skip_served=()):
    """`fl` compiling only the chains at `hooks`: the other built-in chains belong to another
    flavor's attachment, so this one neither checks nor serves them. `skip_served` (nf): hooks
    whose programs pass what a tc/xdp flavor serves (flavors.NfFlavor._skip_served)."""
    import copy
    out = copy.copy(fl)
    check, serves = fl.check_chain, fl.serves
    out.check_chain = lambda chain: check(chain) if chain.hook in hooks else None
    out.serves = lambda chain: chain.hook in hooks and serves(chain)
    if skip_served:
        out.skip_served = frozenset(skip_served)
    return out


def _flavors_in_use(hook_fl: dict, devices: dict) -> tuple:
    """Every flavor some hook runs on: a hook restricted to devices also runs on nf."""
    used = set(hook_fl.values()) | ({"nf"} if devices else set())
    return tuple(f for f in flavors.FLAVORS if f in used)


class Engine:
    def __init__(self, family: int, flavor: str, cookie: int):
        from .config import parse_devices, parse_spec, spec_text
        self.family, self.cookie = family, cookie
        fam = FAMILY_NAMES.get(family)
        if fam is None:
            raise BpfilterError(errno.EAFNOSUPPORT, f"family {family}")
        # per-chain flavors (docs/flavors.md): `flavor` is a spec; self.flavor its canonical text
        self.flavor = spec_text(parse_spec(flavor), parse_devices(flavor))
        self.hook_flavors = hook_flavors(self.flavor)            # configured: the next install
        self.devices = hook_devices(self.flavor)                 # hooks restricted to devices
        self.installed_hooks = dict(self.hook_flavors)            # what the slots run now
        self.flavors_used = _flavors_in_use(self.hook_flavors, self.devices)
        self.pin_dirs = {f: attach.attachment_directory(f, family, cookie=cookie)
                         for f in flavors.FLAVORS}
        # the INPUT flavor's directory: the only one of a single-flavor engine; with --offload
        # (INPUT on xdp) the offload pins live under it
        self.pin_dir = self.pin_dirs[self.hook_flavors[HOOK_OF_CHAIN["INPUT"]]]
        self.state_path = os.path.join(STATE_ROOT, str(cookie), f"{fam}.table")
        self.table = Table.empty("filter", family)
        self.base = [(0, 0)] * self.table.num_entries
        self.state_error = None
        self._map = None
        self.generation = 0
        self.xdp_mode = "auto"          # flavor xdp: native, generic, or native with fallback
        self.offload = None             # flavor xdp: the device whose offload engine runs INPUT
        self.offloaded = None           # what is offloaded now: <fam>.offload (offload.py)
        # classifier maps of the installed programs, kept open for reuse by the next install:
        # {id(MapSpec): (MapSpec, Map)}; _cls_next collects the ones an install in progress uses
        self._cls_maps, self._cls_next = {}, {}
        self._early_fills = {}          # maps made and being filled while compiling (_start_fill)
        self._spare_map = self._spare_job = None
        self._spare = None              # a zeroed counters map made after a reply (see below)
        self._maps_again = _MapsAgain()  # replaced counters maps, zeroed (_LateCounts)
        self._late = None               # _LateCounts of the last install (a helper's)
        self._base_nz = None            # (base, its nonzero entries): counters_nonzero
        self._fresh_before = frozenset()    # _after_install: chains the last install compiled
        _ENGINES.add(self)

    # ---- open / persist ----
    @classmethod
    def open(cls, family: int = AF_INET, flavor: str = "nf", xdp_mode: str = "auto",
             offload: str = None) -> "Engine":
        if offload and hook_flavors(flavor)[HOOK_OF_CHAIN["INPUT"]] != "xdp":  # EINVAL: bad spec
            raise BpfilterError(errno.EINVAL, "--offload needs --flavor xdp (INPUT on xdp)")
        if offload and hook_devices(flavor):
            raise BpfilterError(errno.EINVAL, "--offload with a chain served per device (dev=) "
                                              "is not supported")
        eng = cls(family, flavor, K.netns_cookie())
        eng.xdp_mode = xdp_mode
        eng.offload = offload or None
        eng._load_offload_state()
        eng._load_state()
        return eng

    @staticmethod
    def installed_flavor(family: int = AF_INET):
        """The flavor spec this netns's table of `family` is installed with, None when none
        is."""
        path = os.path.join(STATE_ROOT, str(K.netns_cookie()),
                            f"{FAMILY_NAMES[family]}.table")
        try:
            with open(path, "rb") as f:
                return json.loads(f.readline()).get("flavor", "nf")     # the header line
        except (OSError, ValueError):
            return None

    @staticmethod
    def _read_state(path: str):
        with open(path, "rb") as f:
            st, blob = _parse_state(f.read())
        if not st.get("kept"):
            table = Table.decode(blob, st["family"], st["hook_entry"], st["underflow"],
                                 st["valid_hooks"], st["name"])
            return st, table
        # decoded as decode_replace decodes a SET_REPLACE's entries (normalized, read-only):
        # the state's blob is what the kernel keeps (comefrom set, counters zero: _save_state),
        # so the table carries it as its kept blob, from which a new helper answers GET_INFO
        # and GET_ENTRIES (sockopt Backend._snapshot) instead of encoding the table (~190 ms at
        # 10 000 rules, in a new helper's first command), and the next SET_REPLACE's decode
        # reuses this walk (model._LAST_WALK) as it would after an install of this process
        table = Table.decode(blob, st["family"], st["hook_entry"], st["underflow"],
                             st["valid_hooks"], st["name"], normalize=True, share=True)
        table.source_blob = blob
        # GET_INFO's hook offsets as the install that wrote the state had them (Table's own
        # hook_entry/underflow lay the whole table out to find them)
        table.kept_hooks = (list(st["hook_entry"]), list(st["underflow"]))
        return st, table

    def _load_state(self):
        # reliability (issue #9): a helper killed between swapping the programs and committing
        # the state file left <fam>.table.pending behind; settle it first
        self._settle_pending()
        try:
            st, table = self._read_state(self.state_path)
            base = [tuple(x) for x in st.get("base", [])]
            installed = hook_flavors(st.get("flavor", "nf"))
        except FileNotFoundError:
            return
        except (OSError, KeyError, TypeError, ValueError, BpfilterError) as e:
            # flush() still works (the pins are found by path); the model starts fresh
            self.state_error = f"unreadable state {self.state_path}: {e}"
            return
        # installed with other flavors than configured: adopted all the same (the programs are
        # found in the attachments the state names); the next install moves each hook to its
        # configured flavor (install: the new slot is filled before the old one is emptied)
        dirs = sorted({self.pin_dirs[f] for f in installed.values()})
        if not any(os.path.isdir(d) for d in dirs):
            # the pins went (bpffs unmounted, reboot with a persistent /run, rm -r): nothing of
            # this table is enforced any more, so showing its rules would lie; start fresh and
            # say so (flush and install both work from here)
            self.state_error = (f"state {self.state_path} names a table whose pins under "
                                f"{', '.join(dirs)} are gone: starting from the empty table")
            return
        self.installed_hooks = installed
        self.generation = int(st.get("generation", 0))
        stored = self._read_counters_file(self.generation, table.num_entries)
        if stored is not None:
            base = stored
        self.table, self.base = table, base + [(0, 0)] * (table.num_entries - len(base))

    # ---- the two-step commit of install (reliability, issue #9) ----
    @property
    def _pending_path(self) -> str:
        return self.state_path + ".pending"

    @property
    def _counters_path(self) -> str:
        return self.state_path[:-len(".table")] + ".counters"

    def _slot_ids(self) -> dict:
        progs = self._installed_programs()
        try:
            return {h: p.info()["id"] for h, p in progs.items()}
        finally:
            for p in progs.values():
                p.close()

    def _all_slot_ids(self) -> dict:
        """{hook: {prog id}} over every flavor's attachment (a hook is in two while a flavor
        switch is under way)."""
        out = {}
        for progs in self._programs_by_flavor().values():
            for h, p in progs.items():
                out.setdefault(h, set()).add(p.info()["id"])
                p.close()
        return out

    def _settle_pending(self):
        """install() writes the new table to <fam>.table.pending (with the ids of its programs)
        before the first swap and renames it over <fam>.table after the last: if the pending file
        is still there, a process died in between. If any slot runs one of its programs, the
        new ruleset is (partly) live: it becomes the state, and a partly swapped table is
        installed again so every hook runs the same generation. Otherwise the old state stands.

        Every process opening the engine at that moment (two helpers, `bpfilter status`) sees the
        dead writer's file: they settle one at a time, holding flock on the pending file, and a
        process that waited finds it renamed or removed and reads the settled state (without
        this, all but the first failed in os.replace with ENOENT)."""
        if not os.path.exists(self._pending_path):
            return
        # the roll-forward is an install: serialize it with SET_REPLACEs like any other. The
        # namespace's state lock comes first, then the pending file's flock (one order for all)
        from .sockopt import state_lock
        with state_lock(self.cookie):
            try:
                fd = os.open(self._pending_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return          # settled by the process we waited for
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.stat(self._pending_path).st_ino != os.fstat(fd).st_ino:
                        return  # settled by the process we waited for; a newer install's file
                except FileNotFoundError:
                    return      # settled by the process we waited for
                self._settle_locked()
            finally:
                os.close(fd)    # releases the flock

    def _settle_locked(self):
        try:
            st, table = self._read_state(self._pending_path)
            # a hook served per device has two programs (tc/xdp and nf): a list of both ids
            want = {int(h): i if isinstance(i, list) else [i]
                    for h, i in st.get("prog_ids", {}).items()}
        except FileNotFoundError:
            return
        except (OSError, KeyError, TypeError, ValueError, BpfilterError):
            _quietly(os.unlink, self._pending_path)
            return
        if _alive(st.get("writer")):
            return          # an install in progress (another process): not ours to settle
        import logging
        logging.getLogger("bpfilter").warning(
            "settling %s left by dead writer %s", self._pending_path, st.get("writer"))
        have = self._all_slot_ids()
        live = {h for h, ids in want.items() if any(i in have.get(h, ()) for i in ids)}
        swapped = all(i in have.get(h, ()) for h, ids in want.items() for i in ids)
        if not live:
            _quietly(os.unlink, self._pending_path)
            return
        os.replace(self._pending_path, self.state_path)
        # the writer's flavors are the table's now (they may differ from this engine's config)
        configured = self.flavor
        self._set_flavor(st.get("flavor", "nf"))
        self.installed_hooks = dict(self.hook_flavors)
        try:
            if not swapped:
                self.table, self.generation = table, int(st.get("generation", 0))
                self.base = [(0, 0)] * table.num_entries
                self.install(table)     # roll forward: every hook the same ruleset again
            else:
                # every hook swapped; the writer may have died before emptying the slots its
                # flavor switch left behind (install's last step): they run the old ruleset
                self._empty_stale(set(want))
        finally:
            self._set_flavor(configured)

    def _set_flavor(self, spec: str):
        from .config import parse_devices, parse_spec, spec_text
        self.flavor = spec_text(parse_spec(spec), parse_devices(spec))
        self.hook_flavors = hook_flavors(self.flavor)
        self.devices = hook_devices(self.flavor)
        self.flavors_used = _flavors_in_use(self.hook_flavors, self.devices)

    def _read_counters_file(self, generation: int, n: int):
        """add_counters' base, kept apart from the table so adding counters does not re-encode
        the table; it belongs to one generation (a replaced table starts from zero)."""
        try:
            with open(self._counters_path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if len(data) < 8 or struct.unpack_from("<Q", data)[0] != generation:
            return None
        k = min(n, (len(data) - 8) // 16)
        flat = struct.unpack_from(f"<{2 * k}Q", data, 8)
        return list(zip(flat[0::2], flat[1::2]))

    def _write_counters_file(self, packed: bytes = None):
        """`packed`: the base as little-endian xt_counters already (add_counters)."""
        tmp = self._counters_path + ".tmp"
        with open(tmp, "wb") as f:
            if packed is not None:
                f.write(struct.pack("<Q", self.generation))
                f.write(packed)
            else:
                flat = [v for pair in self.base for v in pair]
                f.write(struct.pack(f"<{1 + len(flat)}Q", self.generation, *flat))
        os.replace(tmp, self._counters_path)

    # the room kept for a state file's header line when its blob is written first
    # (_prewrite_state): the JSON, padded with spaces (json.loads ignores them), then "\n"
    HEAD_ROOM = 4096

    def _prewrite_state(self, table: Table, path: str):
        """The worker thread's job (_worker) writing the blob of `table`'s state file to
        path + ".pre.tmp", HEAD_ROOM bytes in, while the install compiles and loads: the header
        (the programs' ids) is known only after the loads, and _save_state then writes only
        it. None when there is nothing to gain (a small table)."""
        if getattr(table, "kept_blob", None) is None or \
                getattr(table, "source_blob", None) is None:
            return None         # its blob is encoded (_state_blob): once, by _save_state
        blob = _state_blob(table)
        if len(blob) < self.PREWRITE_MIN:
            return None
        try:
            _private_dirs(os.path.dirname(path))
        except OSError:
            return None         # _save_state reports it
        # the worker's own name: a worker given up on may still be creating or removing its
        # file while the install writes path + ".tmp" (_Claim.collect)
        claim = _Claim()
        job = _worker(_write_blob_at, path + ".pre.tmp", blob, self.HEAD_ROOM, claim)
        job.tmp, job.pre, job.claim = path + ".tmp", path + ".pre.tmp", claim
        return job

    PREWRITE_MIN = 256 << 10    # bytes of blob (~2 000 entries)

    def _save_state(self, table: Table = None, path: str = None, generation: int = None,
                    prog_ids: dict = None, prewritten: "_Job" = None):
        """prewritten: _prewrite_state's job for this path; its file gets the header."""
        table = self.table if table is None else table
        he, uf = _hooks_of(table)
        blob = _state_blob(table)
        # kept: the blob is the one the kernel would keep (a decode_replace table's kept blob,
        # comefrom as mark_source_chains sets it), which a new helper answers from as it is
        # (_read_state); a table made otherwise (Engine.install of a built Table) is encoded
        # with its rules' own comefrom, and is adopted as written
        st = dict(name=table.name, family=self.family, valid_hooks=table.valid_hooks,
                  hook_entry=he, underflow=uf, blob_size=len(blob), kept=_kept_form(table),
                  flavor=self.flavor,
                  generation=self.generation if generation is None else generation,
                  prog_ids=prog_ids or {}, writer=_me())
        path = path or self.state_path
        _private_dirs(os.path.dirname(path))
        tmp = path + ".tmp"
        head = json.dumps(st).encode()
        fd = _take_prewritten(prewritten)
        if fd is not None:
            try:
                if len(head) < self.HEAD_ROOM:
                    _pwrite_all(fd, head.ljust(self.HEAD_ROOM - 1) + b"\n", 0)
                    os.close(fd)
                    fd = None
                    os.replace(prewritten.pre, path)
                    return
            finally:
                if fd is not None:
                    os.close(fd)        # a header past HEAD_ROOM: written whole below
                    _quietly(os.unlink, prewritten.pre)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # root-only
        with open(fd, "wb") as f:
            # one file, renamed into place whole: a JSON header line, then the blob as it is
            # (hex inside the JSON cost ~15 ms at 10 000 rules, and twice the bytes)
            f.write(head + b"\n")
            f.write(blob)
        os.replace(tmp, path)

    def _attachment(self, create: bool = False, flavor: str = None):
        """attach.py's state of `flavor` (default: INPUT's) for this netns/family; None when
        nothing is installed (opening it creates pins, so status/counters never do that)."""
        flavor = flavor or self.hook_flavors[HOOK_OF_CHAIN["INPUT"]]
        if not create and not os.path.isdir(self.pin_dirs[flavor]):
            return None
        if K.netns_cookie() != self.cookie:
            # attach.py serves the calling thread's namespace: never touch another one's
            # (e.g. the host's) hooks and pins with this namespace's engine
            raise BpfilterError(errno.EXDEV, f"engine of netns {self.cookie} used from netns "
                                             f"{K.netns_cookie()}")
        if flavor == "xdp":
            return attach.open_attachment(flavor, self.family, xdp_mode=self.xdp_mode)
        return attach.open_attachment(flavor, self.family)

    def _programs_by_flavor(self) -> dict:
        """{flavor: {hook: Prog}} of every attachment of this family in this netns."""
        out = {}
        for f in flavors.FLAVORS:
            att = self._attachment(flavor=f)
            if att is None:
                continue
            try:
                for h in range(5):
                    p = att.program(h)
                    if p is not None:
                        out.setdefault(f, {})[h] = p
            finally:
                att.close()
        return out

    def _installed_programs(self) -> dict:
        """{hook: Prog} of the ruleset programs in the slots; a hook found in two attachments (a
        flavor switch cut short) gives the one of the flavor the state names."""
        out = {}
        for f, progs in self._programs_by_flavor().items():
            for h, p in progs.items():
                if h not in out:
                    out[h] = p
                elif self.installed_hooks.get(h) == f:
                    out[h].close()
                    out[h] = p
                else:
                    p.close()
        return out

    def _installed_flavor_of(self) -> dict:
        """{hook: flavor} of the attachment each hook's program is in now (status)."""
        out = {}
        for f, progs in self._programs_by_flavor().items():
            for h, p in progs.items():
                if h not in out or self.installed_hooks.get(h) == f:
                    out[h] = f
                p.close()
        return out

    def _served_devices(self, flavor_of: dict) -> dict:
        """{hook: (pattern, ...)} of the installed chains a tc/xdp flavor serves on some devices
        only: its attachment is restricted (L2Attachment.devices) and nf runs the hook too."""
        out = {}
        progs = self._programs_by_flavor()
        on_nf = set(progs.get("nf", ()))
        for f, ps in progs.items():
            for p in ps.values():
                p.close()
        for f in sorted(set(flavor_of.values()) - {"nf"}):
            att = self._attachment(flavor=f)
            if att is None:
                continue
            try:
                patterns = att.devices()
            finally:
                att.close()
            if patterns:
                out.update({h: patterns for h, hf in flavor_of.items() if hf == f and h in on_nf})
        return out

    def _empty_stale(self, served: set, opened: dict = None):
        """Empty every slot whose hook is not served by its configured flavor's attachment any
        more (not in `served`, or moved to another flavor), and remove whole attachments of
        flavors no hook uses. Runs after every swap: the new slots filter first, so no packet
        passes unfiltered in between (for an instant both filter). `opened`: {flavor:
        attachment} the swap has open already (the caller closes them; opening one again costs
        ~0.3 ms)."""
        opened = opened or {}
        for f in flavors.FLAVORS:
            att = opened.get(f) or self._attachment(flavor=f)
            if att is None:
                continue
            try:
                if f not in self.flavors_used:
                    if f != "nf":
                        attach.stop_watcher(f, self.family, self.cookie)
                    att.detach_all()            # its links, dispatchers and pins; closes att
                    att = None
                    continue
                for h in range(5):
                    if h in served and self._runs_on(h, f):
                        continue        # holds the program just swapped in: nothing to look up
                    p = att.program(h)
                    if p is None:
                        continue
                    p.close()
                    _quietly(att.detach, h)
            finally:
                if att is not None and att is not opened.get(f):
                    att.close()

    def _runs_on(self, hook: int, flavor: str) -> bool:
        """Does the configuration put `hook` on `flavor` (its own, or nf beside a tc/xdp flavor
        restricted to devices)?"""
        return self.hook_flavors.get(hook) == flavor or (flavor == "nf" and hook in self.devices)

    # a PERCPU_ARRAY of 10 000 entries takes ~5 ms to create (one per-CPU allocation per entry,
    # kernel/bpf/arraymap.c bpf_array_alloc_percpu): a helper makes the next install's map after
    # its reply (engine.AFTER_REPLY), sized for the installed table plus SPARE_SLACK entries;
    # not for tables under SPARE_MIN entries, whose maps are made in well under a millisecond
    SPARE_SLACK, SPARE_MIN = 256, 2000

    def _fresh_counters_map(self, entries: int, early: "_Job" = None):
        """A counters map nobody has used (all zero) with room for `entries`: one a replaced
        table's counts were cleared from (_MapsAgain), or the spare one, when big enough (and not
        far bigger), or a new helper's first spare (make_first_spare), or the one
        _early_counters_map had made, else a new one."""
        made = _early_result(early)
        again = self._maps_again.take(entries, entries + 2 * self.SPARE_SLACK)
        if again is not None:
            if made is not None:
                made.close()
            return again
        spare, self._spare = self._spare, None
        if spare is not None:
            if entries <= spare.max_entries <= entries + 2 * self.SPARE_SLACK:
                if made is not None:
                    made.close()
                return spare
            spare.close()
        first = _take_first_spare(entries, self.SPARE_MIN, self.SPARE_SLACK)
        if first is not None:
            if made is not None:
                made.close()
            return first
        if made is not None:
            if entries <= made.max_entries <= entries + 2 * self.SPARE_SLACK:
                return made
            made.close()
        return K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, entries, name=COUNTERS_MAP_NAME)

    def _early_counters_map(self, table: Table):
        """The job (_worker) making the counters map of `table` while it compiles, when
        _fresh_counters_map will find no spare or replaced map to serve: a helper's first
        install, or a table that grew or shrank by more than SPARE_SLACK. The map has the
        compiled tables' counters_entries (one per entry of the blob: compile_table), plus
        SPARE_SLACK for the appends after it (their installs then recycle it, _MapsAgain);
        None for tables under SPARE_MIN entries (their maps take well under a millisecond), and
        where the first spare will serve (made while the helper was idle: make_first_spare)."""
        n = max(1, _entry_count(table))
        most = n + 2 * self.SPARE_SLACK
        if n < self.SPARE_MIN or self._maps_again.has(n, most) or \
                (self._spare is not None and n <= self._spare.max_entries <= most) or \
                _first_spare_fits(n, self.SPARE_MIN):
            return None
        return _worker(K.Map.create, K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, n + self.SPARE_SLACK,
                       COUNTERS_MAP_NAME)

    @property
    def _spare(self):
        """The spare counters map (_make_spare), once the worker thread has made it."""
        job = self._spare_job
        if job is not None:
            self._spare_job = None
            self._spare_map = _early_result(job)
        return self._spare_map

    @_spare.setter
    def _spare(self, m):
        self._spare_job, self._spare_map = None, m

    def _make_spare(self):
        """After the reply: the next install's counters map (see _fresh_counters_map), unless
        the replaced table's map will serve (_LateCounts clears it once its wait is over). Made
        by the worker thread (_worker): the helper serves the next request meanwhile, instead
        of spending the map's 5-10 ms of kernel allocations first."""
        n = _entry_count(self.table)
        late = self._late
        if late is not None and late.recycles and \
                n + 1 <= late.map_entries <= n + 2 * self.SPARE_SLACK:
            return
        # (not while a new helper's second spare is there to serve: make_first_spare)
        if self._spare is None and n >= self.SPARE_MIN and \
                not _first_spare_fits(n + 1, self.SPARE_MIN):
            self._spare_job = _worker(K.Map.create, K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16,
                                      n + self.SPARE_SLACK, COUNTERS_MAP_NAME)

    def _drop_spare(self):
        if self._spare is not None:
            self._spare.close()
            self._spare = None
        self._maps_again.close()

    def _counters_map(self):
        """The installed ruleset's counters map, found through the programs' map ids."""
        if self._map is None:
            progs = self._installed_programs()
            try:
                for p in progs.values():
                    self._map = _find_counters(p.info()["map_ids"])
                    if self._map is not None:
                        break
            finally:
                for p in progs.values():
                    p.close()
        return self._map

    # ---- install ----
    # ---- XDP hardware offload (--offload IFNAME, offload.py) ----
    @property
    def _offload_path(self) -> str:
        return self.state_path[:-len(".table")] + ".offload"

    @property
    def _offload_pins(self) -> str:
        from . import offload
        return offload.pin_directory(self.pin_dirs["xdp"])     # offload needs INPUT on xdp

    def _load_offload_state(self):
        """What is offloaded, whatever this engine is configured with: status shows it, flush
        removes it, an install without --offload takes it away."""
        try:
            with open(self._offload_path) as f:
                st = json.load(f)
            st["drop_keys"] = {int(k): v for k, v in st["drop_keys"].items()}
            self.offloaded = st
        except (OSError, ValueError, KeyError, AttributeError):
            self.offloaded = None

    def _offload_counts(self) -> dict:
        """{entry index: (pcnt, bcnt)} the device dropped (offload.py: what runs where)."""
        from . import offload
        if not self.offloaded:
            return {}
        try:
            got = offload.attached(self._offload_pins)
        except BpfilterError:
            return {}
        if got is None:
            return {}
        try:
            return offload.read_counters(got[2], self.offloaded["drop_keys"]) \
                if got[2] is not None else {}
        finally:
            for o in got:
                if o is not None:
                    o.close()

    def install(self, table: Table) -> list:
        """See the module docstring; with --offload, the INPUT chain also runs on the device's
        offload engine (offload.py): compiled, checked and loaded for the device first (a
        refusal changes nothing), then the host ruleset is swapped as always, then the device's
        program is replaced in one step. Returns the replaced table's counters."""
        with _worker_served():
            try:
                old = self._install(table)
            except BaseException:
                self._drop_early_fills(wait=True)
                raise
            self._drop_early_fills(wait=False)
            return old

    def _install(self, table: Table) -> list:
        if not self.offload and not self.offloaded:
            # offload.py is imported only when a device offloads (its import: ~2 ms, which a
            # helper's first install, the restore, spent)
            return self._install_host(table)
        from . import offload
        if not self.offload:
            old = self._install_host(table)
            if self.offloaded:          # --offload no longer asked for: the host alone filters
                old = _merged(old, self._offload_counts())
                offload.remove(self._offload_pins)
                _quietly(os.unlink, self._offload_path)
                self.offloaded = None
            return old
        if table.family != AF_INET:
            raise BpfilterError(errno.EOPNOTSUPP, "--offload: only ipv4 tables can be offloaded")
        pre = offload.prepare(table, self.offload)
        try:
            old = self._install_host(table)
            old_keys = self.offloaded["drop_keys"] if self.offloaded else {}
            try:
                dropped = offload.commit(pre, self._offload_pins, old_keys)
            except BpfilterError as e:
                # the new ruleset filters on the host, which runs it for every packet: the
                # device's old program (the old ruleset) must not keep dropping
                import logging
                logging.getLogger("bpfilter").error(
                    "offload to %s failed after the host ruleset was installed; the host "
                    "alone filters: %s", self.offload, e.message)
                dropped = self._offload_counts()
                offload.remove(self._offload_pins)
                _quietly(os.unlink, self._offload_path)
                self.offloaded = None
                return _merged(old, dropped)
        finally:
            pre.close()
        self.offloaded = dict(ifname=pre.ifname, ifindex=pre.ifindex,
                              drop_keys=offload.drop_keys(table, pre.keys),
                              generation=self.generation)
        tmp = self._offload_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(self.offloaded, f)
        os.replace(tmp, self._offload_path)
        return _merged(old, dropped)

    def _install_host(self, table: Table) -> list:
        """The host's programs (every flavor): see the module docstring."""
        if table.family != self.family:
            raise BpfilterError(errno.EINVAL, f"table of family {table.family} given to the "
                                              f"family {self.family} engine")
        # the last install's late counts belong to the table being replaced: settled first
        self._settle_late(final=True)
        # both families compile (IPv6: family.py); even an accept-all table gets programs, since
        # the kernel counts the policy entries' packets
        faults.point("compile")
        # the counters map is made beside the compilation (a PERCPU_ARRAY of 10 000 entries:
        # 5-12 ms of kernel allocations, a cold restore's largest cost outside decode/compile)
        early = self._early_counters_map(table)
        # and the pending state's blob written beside the compilation (_save_state: ~1 ms at
        # 16 700 entries; the header, with the programs' ids, once they are loaded)
        blob_job = self._prewrite_state(table, self._pending_path)
        try:
            plan = self._compile(table)         # [(flavor, CompiledProgram)]
            uses_events, uses_at = _uses(table, "events"), _uses(table, "addrtype")
            self._cls_next = {}
            _conntrack_for(table, self.table, self.family)
            faults.point("map_create")
        except BaseException:
            _discard_early(early)
            _drop_prewritten(blob_job)
            raise
        # ONE counters map for every flavor's programs: each packet passes one hook, so each
        # rule counts it once whichever attachment runs its chain
        try:
            new_map = self._fresh_counters_map(
                max(1, *(cp_.counters_entries for cp_ in self._compiled_tables)), early)
        except BaseException:
            _drop_prewritten(blob_job)
            raise
        progs = {}                      # (flavor, hook) -> Prog
        pres = {}
        events = at_map = None
        fills = []                      # _load's classifier maps being filled (_fill_later)
        try:
            for f in self.flavors_used:
                if f != "nf":
                    pres[f] = self._attachment(create=True, flavor=f)
            shared = {}
            if uses_events:
                # REJECT/LOG rules record events in the netns's ring (targets.py, responder.py)
                events = responder.open_events(FAMILY_NAMES[self.family])
                shared[targets.EVENTS_MAP] = events.fd
            if uses_at:
                # addrtype rules look addresses up in the mirror of the local routing table
                at_map = addrtype.open_map()
                shared[addrtype.ADDRTYPE_MAP] = at_map.fd
            # the programs with the most classifier map entries first: their maps' fills
            # (the worker's) start before the other programs load, not after
            for f, cp in sorted(plan, key=_fill_size, reverse=True):
                # tc/xdp programs read interface names from their attachment's ifnames map
                mine = dict(shared, **{flavors.IFNAMES_MAP: pres[f].ifnames.fd}) \
                    if f in pres else shared
                if f == "nf" and cp.hook in self.devices:
                    # the nf side of a chain restricted to devices passes what they serve
                    l2 = pres[self.hook_flavors[cp.hook]]
                    mine = dict(mine, **{flavors.SERVED_MAP: l2.served.fd})
                progs[(f, cp.hook)] = self._load(cp, new_map, mine, fills)
            # in the plan's order again, which the swaps below follow
            progs = {(f, cp.hook): progs[(f, cp.hook)] for f, cp in plan}
        except BaseException:
            _wait_all(fills)
            _drop_prewritten(blob_job)
            for p in progs.values():
                p.close()
            new_map.close()
            self._drop_next_maps()
            raise
        finally:
            for pre in pres.values():
                pre.close()
            if events is not None:
                events.close()          # the programs and the pin hold it
            if at_map is not None:
                at_map.close()          # the programs and the pin hold it
        try:
            faults.point("after_load")
            # step 1 of the commit: the new table and its program ids, before any swap
            self._save_state(table, self._pending_path, self.generation + 1,
                             _pending_ids(progs), blob_job)
        except BaseException:
            _drop_prewritten(blob_job)
            for p in progs.values():
                p.close()
            new_map.close()
            self._drop_next_maps()
            _wait_all(fills)
            _quietly(os.unlink, self._pending_path)
            raise
        old_map = self._counters_map()
        # without a map (nothing installed yet) the counters are the add_counters base; with
        # one they are read after the swap, once no packet can enter the old programs
        old_counters = self._read(None, _entry_count(self.table), self.base)
        atts = {}
        old_progs = {}
        old_devices = {}
        swapped = []
        try:
            for f in self.flavors_used:
                atts[f] = self._attachment(create=True, flavor=f)
            for k in progs:
                old_progs[k] = atts[k[0]].program(k[1])
            for f, att in atts.items():
                if f != "nf":
                    # the devices each tc/xdp flavor serves from its next sync() (its swap)
                    old_devices[f] = att.devices()
                    att.set_devices(next((d for h, d in self.devices.items()
                                          if self.hook_flavors[h] == f), None))
            # the swaps' own preparations (a first install's dispatchers) while the worker
            # fills; then every classifier map filled (_fill_later) before any program is
            # attached: a packet must never see one half filled; a fill's error is the install's
            for f, hook in progs:
                prepare = getattr(atts[f], "prepare", None)
                if prepare is not None:
                    prepare(hook)
            while fills:
                fills.pop().result()
            # the nf side of a restricted chain first: it passes what `served` names, which
            # changes only in the tc/xdp swap's sync(), so no packet is filtered twice or never
            for k in sorted(progs, key=lambda k: k[0] == self.hook_flavors[k[1]]):
                faults.point("swap")
                # counted before the call: a swap can fail after its atomic step (L2Attachment
                # updates the slot, then attaches new devices, which a full tcx list refuses
                # with ERANGE), and that hook must get its old program back too
                swapped.append(k)
                atts[k[0]].swap(k[1], progs[k])     # atomic per hook
        except BaseException:
            _wait_all(fills)
            _quietly(os.unlink, self._pending_path)
            for f, d in old_devices.items():
                _quietly(atts[f].set_devices, d)
            for k in swapped:               # put the old programs back
                if old_progs.get(k) is not None:
                    _quietly(atts[k[0]].swap, k[1], old_progs[k])
                else:
                    _quietly(atts[k[0]].detach, k[1])
            for p in list(progs.values()) + [p for p in old_progs.values() if p is not None]:
                p.close()
            new_map.close()
            self._drop_next_maps()
            for att in atts.values():
                att.close()
            raise
        # hooks the new table does not serve any more, and hooks moved to another flavor: their
        # old slots are emptied only now that the new ones filter (never neither)
        try:
            faults.point("stale")
            self._empty_stale({h for _f, h in progs}, atts)
        finally:
            for att in atts.values():
                att.close()
        self.installed_hooks = dict(self.hook_flavors)
        for p in list(progs.values()) + [p for p in old_progs.values() if p is not None]:
            p.close()
        # the old programs are out of every slot: once every packet that entered one of them has
        # left (an RCU grace period), their counts are final
        import gc
        later = AFTER_REPLY is not None     # a helper: the GC pass after the reply
        collected = False
        if old_map is not None and later:
            # a helper replies without the wait: the counts read now, the packets still inside
            # the old programs settled after the reply (_LateCounts)
            late = _LateCounts(old_map, self.table, self.base, self._maps_again)
            old_counters, old_map = late.returned, None
            self._late = late           # settled after the reply (_after_install)
        elif old_map is not None:
            # the wait sleeps in the kernel without the GIL: the GC pass below (see gc.freeze)
            # runs meanwhile instead of after it (~12 ms of a 10 000-rule install)
            waiter = threading.Thread(target=_wait_for_readers, name="bpfilter-rcu-wait")
            waiter.start()
            gc.collect()
            collected = True
            waiter.join()
        if old_map is not None:
            old_counters = self._read(old_map, _entry_count(self.table), self.base)
            _close_counters(old_map)
        self._map = new_map
        # the new programs' classifier maps are the ones to reuse next time; the old ones
        # no program uses any more go (their programs hold their own references)
        for _spec, m in self._cls_maps.values():     # _cls_next holds its own fds (dups)
            m.close()
        self._cls_maps, self._cls_next = self._cls_next, {}
        faults.point("after_swap")
        # step 2 of the commit: the pending state becomes the state (one rename). Renaming over
        # the old file frees its megabytes in the rename (tmpfs: 1-3 ms at 10 000 rules); a
        # second name keeps them until after a helper's reply (_after_install)
        replaced = self.state_path + ".replaced"
        _quietly(os.unlink, replaced)           # left by a process killed here
        if later:
            _quietly(os.link, self.state_path, replaced)
        try:
            os.replace(self._pending_path, self.state_path)
        except FileNotFoundError:
            # removed under us (an external clean-up): the new programs are live, so the new
            # table is the state; write it directly rather than report a failure
            self._save_state(table, self.state_path, self.generation + 1)
        after_reply((self.table, ))     # freed after the reply (a helper), not before it
        self.table = table
        self.generation += 1
        self.base = [(0, 0)] * _entry_count(table)
        # the installed table and the decode/classify caches live until the next install: keep
        # the cyclic GC from walking them again on every collection (gc.freeze). Outside a
        # helper, collect first, so no garbage cycle is frozen; frozen objects are not walked,
        # so this pass costs what was made since the last install, not the whole heap (a
        # helper: _collect_and_freeze).
        if later:
            after_reply(self._after_install)
        else:
            _sweep_caches()
            if not collected:
                gc.collect()
            gc.freeze()
        for f in self.flavors_used:
            if f != "nf":
                # devices created or renamed later are attached by the watcher (attach.py)
                attach.start_watcher(f, self.family)
        if uses_events:
            responder.start(FAMILY_NAMES[self.family])
        else:
            responder.stop(FAMILY_NAMES[self.family], self.cookie)
        if uses_at:
            addrtype.start()            # keeps the mirror current (addrtype.py)
        elif self.family == AF_INET:
            addrtype.stop(self.cookie)
        return old_counters

    def _compile(self, table: Table) -> list:
        """[(flavor, CompiledProgram)]: the table compiled once per flavor in use, each
        compilation giving the programs of the hooks that flavor serves (user chains are inlined
        or subprograms in each, so every hook's program stands alone). The classifier maps it
        makes anew are created and their fills started as they are made (_start_fill)."""
        from . import classify
        classify.SPEC_MADE = self._start_fill
        try:
            return self._compile_plan(table)
        finally:
            classify.SPEC_MADE = None

    # classifier maps of fewer entries are made when their program loads (create_maps): their
    # fills take microseconds, and a compile may make specs it then does not use
    EARLY_FILL_MIN = 256

    def _start_fill(self, spec):
        """classify.map_spec's hook during _compile: the map of a new MapSpec created now and
        filled by the worker thread (_fill_later) while the compile goes on (a blocklist's trie
        is made near the end of INPUT's compile, and its ~10 ms of inserts were the install's
        last wait). create_maps takes it (_early_fills); one nothing took is closed at the
        install's end (_drop_early_fills). A map the kernel refuses is left to create_maps,
        which makes it again and reports the kernel's error where it always did."""
        if len(spec.entries) < self.EARLY_FILL_MIN or id(spec) in self._early_fills or \
                id(spec) in self._cls_maps:         # installed: shared, never filled again
            return
        try:
            m = _spec_map(spec)
        except BpfilterError:
            return
        try:
            job = _fill_later(m, spec.entries)
        except BaseException:
            m.close()
            raise
        self._early_fills[id(spec)] = (spec, m, job)

    def _drop_early_fills(self, wait: bool):
        """The maps _start_fill made that no program took (an install that failed, or a spec
        the compile did not use) closed. `wait` (a failed install): once their fills are over,
        so no descriptor of them is left in the worker's hands when the install's error is
        raised; an install that succeeded does not wait (the job closes its own dup)."""
        early, self._early_fills = self._early_fills, {}
        for _spec, m, job in early.values():
            if wait:
                job.done.wait()
            m.close()

    def _compile_plan(self, table: Table) -> list:
        if len(self.flavors_used) == 1:
            ct = compile_table(table, kernel_facts(), self.flavors_used[0])
            self._compiled_tables = [ct]
            return [(self.flavors_used[0], cp) for cp in ct.programs]
        out, self._compiled_tables = [], []
        for f in self.flavors_used:
            mine = {h for h in self.hook_flavors if self._runs_on(h, f)}
            skip = set(self.devices) if f == "nf" else ()
            ct = compile_table(table, kernel_facts(), _restricted(flavors.get(f), mine, skip))
            self._compiled_tables.append(ct)
            out += [(f, cp) for cp in ct.programs]
        return out

    def _drop_next_maps(self):
        """A failed install: close its fds (dups; the installed ones stay in _cls_maps)."""
        for _spec, m in self._cls_next.values():
            m.close()
        self._cls_next = {}

    def _retire(self):
        """Detach every hook of this family and drop the pins (attach.detach_all)."""
        for f in flavors.FLAVORS:
            if f != "nf" and (f in self.flavors_used or os.path.isdir(self.pin_dirs[f])):
                attach.stop_watcher(f, self.family, self.cookie)
        responder.stop(FAMILY_NAMES[self.family], self.cookie)    # before the pin directory goes
        if self.family == AF_INET:
            addrtype.stop(self.cookie)
        for f in flavors.FLAVORS:           # every flavor's attachment, configured or not
            att = self._attachment(flavor=f)
            if att is not None:
                att.detach_all()
        if self._map is not None:
            _close_counters(self._map)
            self._map = None
        self._close_cls_maps()
        self._drop_spare()
        self._drop_late()

    def _close_cls_maps(self):
        for _spec, m in list(self._cls_maps.values()) + list(self._cls_next.values()):
            m.close()
        self._cls_maps, self._cls_next = {}, {}

    def _load(self, cp: CompiledProgram, counters_map, shared: dict = None,
              fills: list = None) -> "K.Prog":
        """cp loaded with its maps (create_maps; with `fills`, filled by the worker thread,
        their jobs appended there)."""
        extra = create_maps(cp, self._cls_maps, self._cls_next, fills, self._early_fills)
        try:
            code = cp.assemble({COUNTERS_MAP: counters_map.fd, **(shared or {}),
                                **{name: m.fd for name, m in extra.items()}})
            if faults.point("verifier"):
                code = code + _UNREACHABLE_EXIT     # the verifier refuses unreachable insns
            btf = cp.func_btf() if hasattr(cp, "func_btf") else None
            if btf is not None:
                return load_with_func_info(cp, code, *btf)
            return K.Prog.load(cp.prog_type, code, license=cp.license, name=cp.name,
                               expected_attach_type=cp.expected_attach_type)
        except BpfilterError as e:
            slot = _verifier_slot(e.message)
            where = cp.locate(slot) if slot is not None else f"chain {cp.chain}"
            raise BpfilterError(e.errno, f"{where}: the kernel refused the compiled program "
                                         f"({e.message})") from None
        finally:
            for m in extra.values():        # the loaded program holds its own references;
                m.close()                   # the engine keeps its own (create_maps, reuse)

    # ---- counters ----
    @staticmethod
    def _read(m, n: int, base: list) -> list:
        """Entries 0..n-1: the add_counters base plus what map m counted (None: the base)."""
        out = list(base[:n]) + [(0, 0)] * (n - len(base))
        if m is None:
            return out
        got = _map_counts(m, min(n, _counted(m)))
        if isinstance(got, list) and len(got) == n and base.count((0, 0)) == len(base):
            return got      # nothing to add to (a fresh base): the sums are the counters
        return _plus(out, got)

    def counters_nonzero(self) -> dict:
        """counters() as {entry index: (pcnt, bcnt)} of the entries that are not zero: what
        GET_ENTRIES patches into a blob holding zeros (most rules of a large table never
        match, and a list of every entry costs ~2 ms more to make and walk)."""
        n = _entry_count(self.table)
        m = self._counters_map()
        # the installed map is read before the replaced programs' late counts are settled:
        # settling waits for the last install's RCU grace period (_LateCounts.finish, up to
        # ~15 ms for a command right after an append), and this read, of counts the settling
        # does not touch (it adds to the base), need not wait behind it
        got = _map_counts(m, min(n, _counted(m))) if m is not None else None
        self._settle_late()
        base = self.base
        if self._base_nz is None or self._base_nz[0] is not base:
            nz = {} if base.count((0, 0)) == len(base) else \
                {i: c for i, c in enumerate(base[:n]) if c != (0, 0)}
            self._base_nz = (base, nz)
        out = dict(self._base_nz[1])
        if got is not None:
            M = 2**64 - 1
            for i, (p, b) in (got.items() if isinstance(got, dict) else enumerate(got)):
                if p or b:
                    c = out.get(i, (0, 0))
                    out[i] = ((c[0] + p) & M, (c[1] + b) & M)
        if self.offloaded:
            M = 2**64 - 1
            for i, (p, b) in self._offload_counts().items():
                if i < n:
                    c = out.get(i, (0, 0))
                    out[i] = ((c[0] + p) & M, (c[1] + b) & M)
        return out

    def counters(self) -> list:
        self._settle_late()
        out = self._read(self._counters_map(), _entry_count(self.table), self.base)
        return _merged(out, self._offload_counts()) if self.offloaded else out

    def add_counters(self, counters, packed: bytes = None):
        """xt_add_counters: `counters` added to each entry's base. `packed`, when the caller has
        it, is the same array as struct xt_counters (what SET_ADD_COUNTERS sent): the counters
        file is then written from it as it is."""
        counters = list(counters)
        if len(counters) != _entry_count(self.table):
            raise BpfilterError(errno.EINVAL, f"{len(counters)} counters for "
                                              f"{_entry_count(self.table)} entries")
        M = 2**64 - 1
        unchanged = False
        if self.base.count((0, 0)) == len(self.base):
            # the usual case: libiptc adds the old counters right after a replace, onto a base
            # of zeros (xt_add_counters adds; u64 arithmetic wraps). Unpacked xt_counters are
            # u64 already
            self.base = counters if packed is not None else \
                [(int(p) & M, int(b) & M) for p, b in counters]
            # zeros added to zeros (a table that counted nothing yet): the counters file, if it
            # is this generation's, holds zeros already, and none reads as zeros too
            unchanged = packed is not None and packed == bytes(len(packed))
        else:
            self.base = [((a + int(c[0])) & M, (b + int(c[1])) & M)
                         for (a, b), c in zip(self.base, counters)]
            packed = None
        if self._late is not None and self._late.added is None:
            # libiptc's carry (TC_COMMIT's counter maps): settled after the reply, or by the
            # next request that reads counters (_settle_late)
            self._late.added = counters
        if unchanged:
            return
        if packed is not None and sys.byteorder == "little":
            self._write_counters_file(packed)
            return
        self._write_counters_file()     # not the table: no re-encode per add_counters

    def _settle_late(self, final: bool = False):
        """Add the packets the replaced programs counted after the reply's read (_LateCounts) to
        the entries that carry those counts on, once libiptc's SET_ADD_COUNTERS has said which
        do. Without final, returns at once while that is unknown: until SET_ADD_COUNTERS the
        new entries count from zero, as the kernel's do. final (the table is being replaced, or
        dropped): whatever is known is settled and the rest dropped."""
        late = self._late
        if late is None or (late.added is None and not final):
            return
        self._late = None
        # the replaced table it holds is freed after the reply, not in this request: at 16 700
        # entries its objects take 1-3 ms to deallocate, which the next command's GET_ENTRIES
        # (where this usually runs) spent before its answer
        after_reply((late, late.table))
        late.finish()
        if late.delta:
            # packets still inside the replaced programs after the early read: rare (measured:
            # none in 75 appends under a veth flood), so a log line says when it happens
            import logging
            logging.getLogger("bpfilter").debug("late counts in %d replaced entries",
                                                len(late.delta))
        if late.added is not None and late.delta and \
                late.carry(self.table, self.base, self.family):
            self._base_nz = None        # base changed in place
            self._write_counters_file()

    def _after_install(self):
        """A helper's work after an install's reply (one item of AFTER_REPLY): the late counts,
        the freeze (see install; a GC pass only when the process has grown), the next
        install's counters map."""
        self._late_after_reply()
        _quietly(os.unlink, self.state_path + ".replaced")    # the replaced state file
        # the bytecode the next append's moved programs are patched from (compile.encode_kept);
        # not that of a chain this install and the one before both compiled anew: the chain an
        # append workload changes every time (a fan-out's INPUT: 0.6-1.4 ms of encoding after
        # each reply, which no later install used, beside the next command's start). A later
        # install that keeps it after all encodes it then (compile._kept_code: the same bytes)
        fresh = [cp for ct in getattr(self, "_compiled_tables", ()) for cp in ct.programs
                 if "_kept_copy" in cp.__dict__]
        encode_kept(cp for cp in fresh if _chain_key(cp) not in self._fresh_before)
        self._fresh_before = frozenset(map(_chain_key, fresh))
        _sweep_caches()
        _collect_and_freeze()
        self._make_spare()
        if self._map is not None:
            # the next request's counters read (GET_ENTRIES) finds the new map's reader made
            _reader_of(self._map, _entry_count(self.table))

    def _late_after_reply(self):
        """After the reply: the final read and the carry if it is known, when the wait is over
        (the thread has read); else the next request that reads counters settles it (its
        finish() waits), or the next idle moment (queued again: a wait must not hold up the
        requests the helper serves meanwhile)."""
        if self._late is None:
            return
        if not self._late.done.is_set():
            if self._late_after_reply not in AFTER_REPLY:
                after_reply(self._late_after_reply)
            return
        self._late.finish()
        self._settle_late()

    def _drop_late(self):
        late, self._late = self._late, None
        if late is not None:
            late.finish()

    # ---- status / flush ----
    def status(self) -> dict:
        counts = self.counters()
        progs = self._installed_programs()
        flavor_of = self._installed_flavor_of()
        links, served = {}, self._served_devices(flavor_of)
        for f in sorted(set(flavor_of.values())):
            att = self._attachment(flavor=f)
            if att is not None:
                links.update({h: v for h, v in att.attached().items() if flavor_of.get(h) == f})
                att.close()
        chains = []
        try:
            for c in self.table.chains:
                ch = dict(name=c.name, hook=HOOK_NAMES.get(c.hook) if c.builtin else None,
                          flavor=None, prog_id=None, jited_size=None, rule_count=len(c.rules),
                          policy=Verdict(c.policy).name if c.builtin and c.policy is not None
                          else None,
                          rules=[dict(pcnt=counts[r.index][0], bcnt=counts[r.index][1],
                                      text=_describe(r)) for r in c.rules])
                if c.policy_entry is not None:
                    ch["policy_counters"] = dict(pcnt=counts[c.policy_entry.index][0],
                                                 bcnt=counts[c.policy_entry.index][1])
                if c.builtin and c.hook in progs:
                    pi = progs[c.hook].info()
                    ch.update(flavor=flavor_of.get(c.hook), prog_id=pi["id"],
                              jited_size=pi["jited_prog_len"],
                              link=links.get(c.hook))
                    if c.hook in served:
                        # on its tc/xdp flavor for these devices, nf for the others
                        ch.update(devices=list(served[c.hook]), fallback="nf")
                chains.append(ch)
        finally:
            for p in progs.values():
                p.close()
        from .config import spec_text
        inv = {h: c for c, h in HOOK_OF_CHAIN.items()}
        installed = spec_text({inv[h]: f for h, f in self.installed_hooks.items() if h in inv},
                              {inv[h]: d for h, d in served.items() if h in inv})
        out = dict(table=self.table.name, family=FAMILY_NAMES[self.family], flavor=installed,
                   configured_flavor=self.flavor,
                   generation=self.generation, chains=chains)
        _add_classified(self.table, chains)
        if self.state_error:
            out["error"] = self.state_error
        # policy for untranslatable tables, and whether the kernel's xtables serve this one
        from .passthrough import status_fields
        out.update(status_fields(self.cookie, self.family))
        if self.offloaded:
            out["offload"] = self._offload_status()
        return out

    def _offload_status(self) -> dict:
        from . import offload
        st = dict(device=self.offloaded["ifname"], prog_id=None, map_id=None)
        try:
            got = offload.attached(self._offload_pins)
        except BpfilterError as e:
            return dict(st, error=e.message)
        if got is None:
            return dict(st, error="not attached (the device went, or its pin did)")
        try:
            st.update(prog_id=got[1].info()["id"],
                      map_id=got[2].info()["id"] if got[2] is not None else None)
        finally:
            for o in got:
                if o is not None:
                    o.close()
        return st

    def flush(self):
        """Remove everything of this family in this netns; the model returns to the fresh table."""
        from . import offload
        offload.remove(self._offload_pins)      # first: the device stops dropping
        _quietly(os.unlink, self._offload_path)
        self.offloaded = None
        self._retire()
        _conntrack_for(None, self.table, self.family)
        for path in (self._pending_path, self._counters_path, self.state_path,
                     self.state_path + ".replaced"):
            _quietly(os.unlink, path)
        _quietly(os.rmdir, os.path.dirname(self.state_path))
        self.table = Table.empty("filter", self.family)
        self.base = [(0, 0)] * self.table.num_entries
        self.state_error = None
        self.generation = 0

    def close(self):
        self._drop_late()
        if self._map is not None:
            _close_counters(self._map)
            self._map = None
        self._close_cls_maps()
        self._drop_spare()


# ---- control plane at 10 000 rules (issue #7) ----

class _Claim:
    """Who does a job's work: the worker thread, if it starts it before the install needs the
    result (take), else the install itself (the job then does nothing): on a busy machine the
    worker may not have run yet, and waiting for it would cost more than the work. A worker
    that started but has not finished when the install needs its file is given up on too
    (collect): on a loaded machine its last steps wait for the GIL and a CPU, each handover up
    to a switch interval (5 ms), measured 21-28 ms for ~0.8 ms of its own work, while the
    install writes the same file in ~1 ms; the worker then throws its file away (hand_over)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.owner = None
        self.fd = None          # the worker's file, written whole, until the install collects it

    def take(self, owner: str) -> bool:
        with self.lock:
            if self.owner is None:
                self.owner = owner
            return self.owner == owner

    def hand_over(self, fd: int) -> bool:
        """The worker's file written: False when the install gave up on it meanwhile (the
        worker then closes and removes it)."""
        with self.lock:
            if self.owner != "worker":
                return False
            self.fd = fd
            return True

    def collect(self):
        """The install's side: the fd of the worker's finished file (now the caller's), else
        None, and the work is the install's from now on (a worker still writing throws its
        file away, one not started never writes it)."""
        with self.lock:
            fd, self.fd = self.fd, None
            if fd is None:
                self.owner = "install"
            return fd


def _write_blob_at(tmp: str, blob: bytes, at: int, claim: _Claim = None):
    """Engine._prewrite_state's job: `blob` written at offset `at` of a new file `tmp`; returns
    the open fd (closed by Engine._save_state or _drop_prewritten), None when the install
    claimed the work first or gave up waiting for it (the file is then removed: the install
    wrote its own, under another name)."""
    if claim is not None and not claim.take("worker"):
        return None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # root-only
    try:
        _pwrite_all(fd, blob, at)
    except BaseException:
        os.close(fd)
        _quietly(os.unlink, tmp)
        raise
    if claim is not None and not claim.hand_over(fd):
        os.close(fd)
        _quietly(os.unlink, tmp)
        return None
    return fd


def _pwrite_all(fd: int, data, at: int):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"short write at offset {at}")
        view, at = view[n:], at + n


def _take_prewritten(job):
    """The fd of Engine._prewrite_state's file (job.pre), now the caller's to close; None when
    there is no job, or the worker has not finished it (not started: it will not; still
    writing: it removes its file), or it failed, or it was taken already: the caller then
    writes the file whole, under its own name (job.tmp), never waiting for the worker."""
    if job is None:
        return None
    return job.claim.collect()


def _drop_prewritten(job):
    """A failed install: the file of Engine._prewrite_state's job closed and removed, and the
    install's own temporary (a whole write that failed)."""
    if job is None:
        return
    # a failure is no hurry: the worker's file is closed and removed before the error is
    # reported, whoever removes it
    job.done.wait()
    fd = _take_prewritten(job)
    if fd is not None:
        os.close(fd)
        _quietly(os.unlink, job.pre)
    _quietly(os.unlink, job.tmp)


def _chain_key(cp) -> tuple:
    """(flavor, chain) of a compiled program: which chain's program it is (_after_install)."""
    return cp.flavor, cp.chain


def _fill_size(plan_item) -> int:
    """Entries of the classifier maps a (flavor, CompiledProgram) has (Engine._install_host)."""
    return sum(len(spec.entries or ()) for spec in getattr(plan_item[1], "maps", ()))


def _pending_ids(progs: dict) -> dict:
    """The pending state's {hook: prog id} of an install's {(flavor, hook): Prog}; a hook served
    per device (two programs) gets the list of both ids (_settle_locked)."""
    ids = {}
    for (_f, h), p in progs.items():
        ids.setdefault(h, []).append(p.info()["id"])
    return {h: v[0] if len(v) == 1 else v for h, v in ids.items()}


def _kept_form(table: Table) -> bool:
    """Whether _state_blob(table) is the blob the kernel would keep (decode_replace's)."""
    return getattr(table, "kept_blob", None) is not None and \
        getattr(table, "source_blob", None) is not None


def _state_blob(table: Table) -> bytes:
    """The table as GET_ENTRIES shows it, counters zero. A table decode_replace made carries
    the caller's blob (source_blob): the kernel keeps those entries as given except comefrom
    (mark_source_chains) and the counters (ip_tables.c translate_table), so patching those two
    gives the same bytes as encode() at a fraction of the cost (~0.5 s at 10 000 rules).
    decode_replace patches them already (Table.kept_blob, only the entries that differ)."""
    from .model import _VOLATILE
    if _kept_form(table):
        return table.kept_blob
    src = getattr(table, "source_blob", None)
    if src is None:
        return table.encode()
    cf, cnt, _end = _VOLATILE[table.family]
    out = bytearray(src)
    zero = bytes(16)
    pack = struct.Struct("=I").pack_into
    for r in table.entries():
        pack(out, r.offset + cf, r.comefrom)
        out[r.offset + cnt:r.offset + cnt + 16] = zero
    return bytes(out)


def _parse_state(data: bytes):
    """(header dict, blob) of a state file: a JSON line, then blob_size bytes of entries. A
    file of the older format (one JSON object, the blob in hex under "blob") reads too. A torn
    or short file is a ValueError (the caller's "unreadable state")."""
    head, _, blob = data.partition(b"\n")
    st = json.loads(head)
    if "blob" in st:
        return st, bytes.fromhex(st["blob"])
    if len(blob) != st["blob_size"]:
        raise ValueError(f"state blob of {len(blob)} bytes, header says {st['blob_size']}")
    return st, blob


def _hooks_of(table: Table):
    """(hook_entry, underflow): from the offsets decode gave a decode_replace table (no second
    layout pass over 10 000 entries), else Table's own (which lays the table out)."""
    if getattr(table, "source_blob", None) is None:
        return table.hook_entry, table.underflow
    he, uf = [0xFFFFFFFF] * 5, [0xFFFFFFFF] * 5
    # a table has one built-in chain per valid hook (translate_table: every valid hook has an
    # entry point): the walk stops at the last one found (iptables puts them first, before its
    # 3 000 user chains in a kube-proxy table, whose check cost ~0.5 ms an install)
    left = bin(table.valid_hooks & 0x1F).count("1")
    for c in table.chains:
        if not left:
            break
        if c.builtin and table.valid_hooks & (1 << c.hook):
            # the chain's first entry (Chain.entries()[0], without listing its 10 000 rules)
            first = c.head_entry or (c.rules[0] if c.rules else c.policy_entry) or c.trailer[0]
            he[c.hook] = first.offset
            if c.policy_entry is not None:
                uf[c.hook] = c.policy_entry.offset
            left -= 1
    return he, uf


BPF_MAP_LOOKUP_BATCH = 24


# entries compared at once with zeros by _nonzero_sums: one slice compare (memcmp) per block
_ZERO_BLOCK = 64


def _percpu_nonzero(m, n: int):
    """What entries 0..n-1 of a per-CPU counters map counted, summed over CPUs (u64 arithmetic,
    as the kernel's get_counters), with BPF_MAP_LOOKUP_BATCH (kernel/bpf/syscall.c
    generic_map_lookup_batch: one syscall instead of one per entry, ~150 ms at 10 000 entries);
    _nonzero_sums' dict or list, or None when the kernel refuses the batch."""
    if n <= 0:
        return {}
    ffi = K._ffi
    ncpu = K.possible_cpus()
    keys = ffi.new("char[]", 4 * n)
    vals = ffi.new("char[]", 16 * ncpu * n)
    out_batch = ffi.new("uint32_t *")
    attr = ffi.new("char[]", 56)
    struct.pack_into("<QQQQIIQQ", ffi.buffer(attr), 0, 0, int(ffi.cast("uintptr_t", out_batch)),
                     int(ffi.cast("uintptr_t", keys)), int(ffi.cast("uintptr_t", vals)), n,
                     m.fd, 0, 0)
    ret = K._bpf(BPF_MAP_LOOKUP_BATCH, attr, 56)
    count = struct.unpack_from("<I", ffi.buffer(attr), 32)[0]
    if (ret < 0 and ret != -errno.ENOENT) or count != n:
        return None
    got = [struct.unpack_from("<I", ffi.buffer(keys), 4 * i)[0] for i in range(0, n, max(1, n - 1))]
    if got[0] != 0 or got[-1] != n - 1:          # an array batch returns keys in order
        return None
    return _nonzero_sums(ffi.buffer(vals)[:], n, ncpu)


def _nonzero_sums(raw: bytes, n: int, ncpu: int):
    """raw: n values of ncpu (pcnt, bcnt) u64 pairs each -> {entry index: (pcnt, bcnt)} of the
    entries that counted something, or the list of every entry's sums where most did.
    Most rules of a large table never match a packet: finding them a block of entries at a time
    (a bytes compare with zeros) costs ~0.1 ms at 10 000 entries, against ~4 ms for summing
    every entry's column of CPUs in Python."""
    stride = 16 * ncpu
    blk = _ZERO_BLOCK * stride
    zero = bytes(blk)
    busy = [a for a in range(0, len(raw), blk) if raw[a:a + blk] != zero[:len(raw) - a]]
    if len(busy) * 4 > n // _ZERO_BLOCK + 1:
        return _percpu_columns(raw, n, ncpu)
    M = 2**64 - 1
    out = {}
    per = struct.Struct(f"<{2 * ncpu}Q").unpack_from
    for a in busy:
        for off in range(a, min(a + blk, len(raw)), stride):
            v = per(raw, off)
            if any(v):
                out[off // stride] = (sum(v[0::2]) & M, sum(v[1::2]) & M) if ncpu > 1 else v
    return out


# helper ids (include/uapi/linux/bpf.h) and flags of the counters reader (_SumsReader)
BPF_FUNC_loop, BPF_FUNC_map_lookup_percpu_elem = 181, 195
BPF_PROG_TYPE_XDP, BPF_PSEUDO_FUNC, BPF_F_MMAPABLE = 6, 4, 1 << 10
BPF_PROG_TEST_RUN = 10
# counters maps read with the batch lookup below this many entries: it costs ~0.3 us an entry,
# loading a reader ~0.4 ms
READER_MIN = 1000
_reader_lock = threading.Lock()


class _SumsReader:
    """Sums a per-CPU counters map over CPUs inside the kernel, for reads of large tables.

    BPF_MAP_LOOKUP_BATCH copies a per-CPU array out one entry at a time (generic_map_lookup_batch
    and bpf_percpu_array_copy per key): 2.8 ms at 10 000 entries on this 2-CPU machine, and an
    append reads the map twice (GET_ENTRIES' live counters, the old counters at the swap). This
    XDP program, run with BPF_PROG_TEST_RUN and attached nowhere, walks every entry with bpf_loop,
    adds its CPUs' values (bpf_map_lookup_percpu_elem, the same per-CPU slots the batch copies)
    and stores the sums in an mmapable ARRAY this process reads in place: 0.22 ms at 10 000.
    The datapath is unchanged (same map, same programs). The program holds a reference on the
    counters map: _close_counters closes it with the map."""

    def __init__(self, m):
        import mmap
        ncpu = _contiguous_cpus()
        if ncpu is None or ncpu > 256 or m.map_type != K.BPF_MAP_TYPE_PERCPU_ARRAY or \
                m.value_size != 16:
            raise BpfilterError(errno.EOPNOTSUPP, "no in-kernel sums for this map")
        self.entries = _counted(m)
        self.lock = threading.Lock()
        self.prog = self.clear_prog = self.mem = None
        self.out = K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 16, self.entries, name="bpfilter_sums",
                                flags=BPF_F_MMAPABLE)
        self._load = lambda clear: self._program(m, ncpu, clear)
        try:
            self.prog = self._load(False)
            size = (16 * self.entries + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            self.mem = mmap.mmap(self.out.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            self.close()
            raise
        ffi = K._ffi
        # union bpf_attr's test: prog_fd, retval, data_size_in, data_size_out, data_in,
        # data_out, repeat; the frame is only there because XDP's test run wants ETH_HLEN bytes
        self.frame = ffi.new("char[]", 14)
        self.attr = ffi.new("char[]", 80)

    def _program(self, m, ncpu: int, clear: bool):
        """The reader's program over counters map m: sums, or sums and zeroes (clear)."""
        from . import ebpf as X
        from types import SimpleNamespace
        code = X.assemble(_sums_main(self.entries), {}) + X.assemble(
            _sums_callback(ncpu, clear), {"cnt": m.fd, "out": self.out.fd})
        btf, info = X.func_btf(8, [(0, "bpfilter_sums", False),
                                   (_SUMS_MAIN_SLOTS, "bpfilter_sum_entry", False)])
        return load_with_func_info(
            SimpleNamespace(prog_type=BPF_PROG_TYPE_XDP, name="bpfilter_sums", license="GPL",
                            expected_attach_type=0), code, btf, info)

    def read(self, n: int, clear: bool = False):
        """_nonzero_sums of entries 0..n-1, or None when the run fails. clear: every entry's
        CPUs zeroed as they are summed (the program made on first use), for a map no program
        counts in any more: _LateCounts' final read, after which the map serves again."""
        ffi = K._ffi
        with self.lock:
            if self.prog is None:
                return None
            prog = self.prog
            if clear:
                if self.clear_prog is None:
                    try:
                        self.clear_prog = self._load(True)
                    except (BpfilterError, OSError):
                        return None
                prog = self.clear_prog
            buf = ffi.buffer(self.attr)
            buf[:] = bytes(80)
            struct.pack_into("<IIIIQQI", buf, 0, prog.fd, 0, 14, 0,
                             int(ffi.cast("uintptr_t", self.frame)), 0, 1)
            ret = K._bpf(BPF_PROG_TEST_RUN, self.attr, 80)
            # retval: bpf_loop's, the number of entries walked (negative: it refused)
            if ret != 0 or struct.unpack_from("<I", buf, 4)[0] != self.entries:
                return None
            raw = self.mem[:16 * min(n, self.entries)]
        return _nonzero_sums(raw, min(n, self.entries), 1)

    def close(self):
        with self.lock:
            for o in (self.mem, self.prog, self.clear_prog, self.out):
                if o is not None:
                    o.close()
            self.mem = self.prog = self.clear_prog = self.out = None


# the reader's main program: bpf_loop(entries, callback, NULL, 0), which returns how many it ran
_SUMS_MAIN_SLOTS = 7


def _sums_main(entries: int) -> list:
    from . import ebpf as X
    # lddw src=BPF_PSEUDO_FUNC: imm = the callback's slot relative to the slot after this one
    callback = X.Insn(X.BPF_LD | X.DW | X.BPF_IMM, X.R2, BPF_PSEUDO_FUNC, 0,
                      _SUMS_MAIN_SLOTS - 2, comment="&bpfilter_sum_entry")
    return [X.mov(X.R1, entries), callback, X.mov(X.R3, 0), X.mov(X.R4, 0),
            X.call(BPF_FUNC_loop), X.exit_()]


def _sums_callback(ncpu: int, clear: bool = False) -> list:
    """long bpfilter_sum_entry(u64 index, void *ctx): out[index] = the sum over CPUs of
    cnt[index] (u64 arithmetic wraps as get_counters' does); 1 (stop) if out has no such entry.
    clear: each CPU's value zeroed once read."""
    from . import ebpf as X
    R0, R1, R2, R3, R6, R7, FP = X.R0, X.R1, X.R2, X.R3, X.R6, X.R7, X.R10
    out = [X.stx(X.W, FP, -4, R1, comment="key = index"), X.mov(R6, 0), X.mov(R7, 0)]
    zero = [X.st(X.DW, R0, 0, 0), X.st(X.DW, R0, 8, 0)] if clear else []
    for c in range(ncpu):
        out += [X.ld_map_fd(R1, "cnt"), X.mov(R2, FP), X.alu(X.ADD, R2, -4), X.mov(R3, c),
                X.call(BPF_FUNC_map_lookup_percpu_elem), X.jmp(X.JEQ, R0, 0, f"cpu{c + 1}"),
                X.ldx(X.DW, R1, R0, 0), X.alu(X.ADD, R6, R1),
                X.ldx(X.DW, R1, R0, 8), X.alu(X.ADD, R7, R1), *zero, X.Label(f"cpu{c + 1}")]
    return out + [X.ld_map_fd(R1, "out"), X.mov(R2, FP), X.alu(X.ADD, R2, -4),
                  X.call(X.BPF_FUNC_map_lookup_elem), X.jmp(X.JEQ, R0, 0, "stop"),
                  X.stx(X.DW, R0, 0, R6), X.stx(X.DW, R0, 8, R7), X.mov(R0, 0), X.exit_(),
                  X.Label("stop"), X.mov(R0, 1), X.exit_()]


def _contiguous_cpus():
    """The number of possible CPUs when they are 0..N-1 (bpf_map_lookup_percpu_elem takes a CPU
    number, the batch copy walks the possible ones), else None."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return None
    first, _, last = text.partition("-")
    if first != "0" or "," in text:
        return None
    return int(last or 0) + 1


def _reader_of(m, n: int):
    """m's _SumsReader, made on first use for a large map; None where the batch lookup reads it
    (a small map, or a kernel that refused the reader: not tried again for that map)."""
    r = m.__dict__.get("_sums_reader")
    if r is None and n >= READER_MIN:
        with _reader_lock:
            r = m.__dict__.get("_sums_reader")
            if r is None:
                try:
                    r = _SumsReader(m)
                except (BpfilterError, OSError, ValueError):     # mmap raises the last two
                    r = False
                m._sums_reader = r
    return r or None


def _close_counters(m):
    """Close a counters map and its reader (the reader's program holds the map)."""
    r = m.__dict__.pop("_sums_reader", None)
    if r:
        r.close()
    m.close()


def _counted(m) -> int:
    """How many entries of counters map m programs may count in and its reads walk: its
    max_entries, or fewer for a first spare taken by a smaller table (_take_first_spare)."""
    return m.__dict__.get("counted", m.max_entries)


# ---- the first install's counters map, made while a new helper waits for its first command ----
# A helper's first install of a large table has no spare (_make_spare makes one only after an
# install) and made its counters map beside the compile (_early_counters_map): 7-9 ms of the
# kernel's per-CPU allocations at 10 000 entries alone (bpf_array_alloc_percpu: one pcpu_alloc
# per entry), 15-35 ms beside the compile on a 2-CPU machine, whose Python ran ~5 ms slower
# meanwhile. Nothing tells the first table's size before its blob comes, so the map a new helper
# makes while idle (make_first_spare: __main__.queue_start_work, before the first request or
# while iptables-restore parses its input) has a fixed size: FIRST_SPARE_BYTES of per-CPU memory
# (16 bytes an entry on every possible CPU: 1 MiB is 32 768 entries on 2 CPUs, 2 048 on 32), at
# most FIRST_SPARE_MAX entries (a 10 000-rule restore takes 10 004-16 928 entries). The first
# install of SPARE_MIN..that many entries takes it: a map larger than its table costs memory
# only (the programs index their own entries, and the reads walk only those: _counted). The
# first install it does not fit closes it, so a helper holds it only until its first install
# (and exits when idle: BPFILTER_IDLE_EXIT).
# A second map of that size serves the install after the first. Without it, that install's
# spare (_make_spare) was made right after the first one's reply: ~22 ms of per-CPU allocations
# at 16 700 entries (superlinear: 11 ms at 10 000, 50 ms at 32 768), just as the next command
# started; an append right after a 10 000-rule restore took 10-13 ms longer than the ones after
# it. A thread of its own makes it once the first is made, so the worker's queue stays free for
# an install's jobs (a restore may come while it is made: a helper started by its GET_INFO). The
# install that takes the first spare leaves the second in its place; one the first does not fit
# gives up both.
FIRST_SPARE_BYTES = 1 << 20
FIRST_SPARE_MAX = 32768
_first_spare = None         # the worker's _Job making it, until an install takes or closes it;
                            # then the second spare's, for the install after the first
_second_spare = None        # the _Job making the second, until the first is taken or given up
_second_thread = None       # the thread that makes it (an exit waits for it: _worker_drained)
_spare_lock = threading.Lock()      # a second spare given up is closed once, by one thread


def first_spare_entries() -> int:
    """The entries of the map make_first_spare makes (0: none on this machine)."""
    n = min(FIRST_SPARE_MAX, FIRST_SPARE_BYTES // (16 * K.possible_cpus()))
    return n if n >= Engine.SPARE_MIN else 0


def make_first_spare():
    """Queue the first spare's creation to the worker thread (_worker), once per process: the
    kernel's allocations run there while the helper is idle, without the GIL. The second
    spare's thread is started by the worker after it (_start_second_spare)."""
    global _first_spare, _second_spare
    n = first_spare_entries()
    if _first_spare is not None or not n:
        return
    job = _worker(K.Map.create, K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, n, COUNTERS_MAP_NAME)
    job.entries = n
    _first_spare = job
    second = _Job(K.Map.create, K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, n, COUNTERS_MAP_NAME)
    second.entries, second.unwanted, second.closed = n, False, False
    _second_spare = second
    _worker(_start_second_spare, second)


def _start_second_spare(job: "_Job"):
    """(The worker's job after the first spare's.) The second spare made by a thread of its
    own; not made at all when it was given up meanwhile (the job then ends empty)."""
    global _second_thread
    with _spare_lock:
        if job.unwanted:
            job.fn = job.args = None
            job.done.set()
            return
        _second_thread = threading.Thread(target=_make_second_spare, args=(job,),
                                          name="bpfilter-spare", daemon=True)
        _second_thread.start()


def _make_second_spare(job: "_Job"):
    job.run()
    _close_unwanted(job)


def _give_up_second(job: "_Job"):
    """Nobody will take the second spare: closed now if made, else once made, or never made."""
    job.unwanted = True
    _close_unwanted(job)


def _close_unwanted(job: "_Job"):
    with _spare_lock:
        if job.unwanted and job.done.is_set() and not job.closed:
            job.closed = True
            _discard_early(job)


def _first_spare_fits(entries: int, least: int) -> bool:
    """Would _take_first_spare give a map for `entries` (without waiting for the worker)?"""
    job = _first_spare
    return job is not None and least <= entries <= job.entries and \
        (not job.done.is_set() or job.error is None)


def _take_first_spare(entries: int, least: int, slack: int):
    """The first spare for an install of `entries` counters (waiting for the worker if it is
    still making it), marked to count and read entries + slack of them (_counted: what a map
    _early_counters_map makes has); None when there is none, it failed, or it does not fit.
    One that does not fit is closed by the worker once it has made it (jobs run in order): a
    small table's install, which makes its own map in microseconds, does not wait for it.
    Taken, it leaves the second spare in its place, for the next install; not taken, the
    second is given up too."""
    global _first_spare, _second_spare
    job, _first_spare = _first_spare, None
    second, _second_spare = _second_spare, None
    if job is None:
        return None
    if not least <= entries <= job.entries:
        if hasattr(job, "unwanted"):    # a second spare in the first one's place
            _give_up_second(job)
        else:
            _worker(_discard_early, job)
        if second is not None:
            _give_up_second(second)
        return None
    m = _early_result(job)
    if m is None:               # refused by the kernel: the second is not waited for either
        if second is not None:
            _give_up_second(second)
        return None
    m.counted = min(m.max_entries, entries + slack)
    _first_spare = second       # the next install's, taken here again (None: it had none)
    return m


def drop_first_spare():
    """Close the first spare (its creation waited for) and give up the second, if any. A
    second spare in the first one's place (its install took the first) is closed the same."""
    global _first_spare, _second_spare
    job, _first_spare = _first_spare, None
    second, _second_spare = _second_spare, None
    if second is not None:
        _give_up_second(second)
    if job is not None and hasattr(job, "unwanted"):
        _give_up_second(job)
        return
    m = _early_result(job)
    if m is not None:
        m.close()


def _map_counts(m, n: int):
    """What counters map m counted in entries 0..n-1, summed over CPUs: _nonzero_sums' dict or
    list. Read by the map's _SumsReader when it has one, else with the batch lookup, else one
    entry at a time where the kernel has neither."""
    if n <= 0:
        return {}
    r = _reader_of(m, n)
    got = r.read(n) if r is not None else None
    if got is not None:
        return got
    got = _percpu_nonzero(m, n)
    if got is not None:
        return got
    got = {}
    for i in range(n):
        p = b = 0
        for v in m.lookup_percpu(i) or []:
            vp, vb = struct.unpack("<QQ", v)
            p, b = p + vp, b + vb
        if p or b:
            got[i] = (p & 2**64 - 1, b & 2**64 - 1)
    return got


def _plus(out: list, counts) -> list:
    """out (a list of (pcnt, bcnt)) with counts (_map_counts) added in place, u64 arithmetic."""
    M = 2**64 - 1
    for i, (p, b) in (counts.items() if isinstance(counts, dict) else enumerate(counts)):
        if p or b:
            c = out[i]
            out[i] = ((c[0] + p) & M, (c[1] + b) & M)
    return out


class _LateCounts:
    """The replaced programs' counts, taken off the reply's path (issue #7: one append).

    The kernel answers SET_REPLACE with the old table's final counters: xt_replace_table waits
    until no CPU is inside the old table (xt_recseq) before get_counters. Here that wait is an
    RCU grace period (_wait_for_readers, 8-20 ms), which a helper no longer spends before its
    reply: it returns the counts read right after the swap (`returned`), and a thread waits
    meanwhile. A packet that was inside an old program then has counted in the old map after
    that read: `delta`, the final read minus the early one, old entry index -> (pcnt, bcnt),
    almost always empty.

    libiptc carries the returned counts on (TC_COMMIT: SET_ADD_COUNTERS adds, to each new entry,
    the returned count of the old entry it continues: COUNTER_MAP_NORMAL_MAP, or that minus the
    count GET_ENTRIES showed: COUNTER_MAP_ZEROED; new rules get 0 or -c's values). `added` is
    that SET_ADD_COUNTERS; carry() adds each old entry's delta to the new entry that continues
    it (the same rule at the same rank in the same chain, or the same chain's policy) where
    `added` shows libiptc carried that entry's count: the counters end as the kernel's would."""

    def __init__(self, old_map, old_table: Table, base: list, again: "_MapsAgain"):
        self.table, self.n = old_table, _entry_count(old_table)
        self.added = None           # the first add_counters after the install
        self.delta = None           # known after finish()
        self.final = self.early = None
        # the grace period starts before the early read (any that starts after the swap will
        # do: a packet counting after the read entered an old program before the swap, so it
        # is out by the period's end); the final read, in the waiter thread once the period is
        # over, waits for the early read (early_read), so it never precedes it. The old map's
        # fd goes with it, a grace period after the swap (not when the helper is idle)
        self.done = threading.Event()
        self.early_read = threading.Event()
        # the old map comes back zeroed (to `again`) when its reader can clear it
        self.map_entries = _counted(old_map)
        self.recycles = bool(old_map.__dict__.get("_sums_reader"))
        self.again = again
        # the waiter thread needs the GIL to start the wait, and this thread, going on with
        # the install and its reply, would hand it over only at the next switch interval
        # (5 ms): measured 0-6.5 ms between the put and the membarrier call, by which the
        # next command's GET_ENTRIES waited longer. Waiting here until the thread has
        # started costs ~0.1 ms (the waiter is idle: the last install's wait was settled);
        # the early read (~0.5 ms at 16 700 entries, a syscall without the GIL) then runs
        # while the grace period does, instead of before it
        self.started = threading.Event()
        _rcu_waiter().put((self._wait_and_read, old_map))
        self.started.wait(self.START_WAIT)
        try:
            self.early = _map_counts(old_map, min(self.n, _counted(old_map)))
        finally:
            self.early_read.set()
        self.returned = _plus(list(base[:self.n]) + [(0, 0)] * (self.n - len(base)),
                              self.early)

    START_WAIT = 0.002     # a waiter not running by then (a busy machine) starts later

    def _wait_and_read(self, old_map):
        cleared = None
        try:
            self.started.set()
            _wait_for_readers()
            self.early_read.wait()
            if self.early is None:
                raise BpfilterError(errno.EIO, "the early read failed")
            n = min(self.n, _counted(old_map))
            r = old_map.__dict__.get("_sums_reader")
            if r:
                # no program counts in it any more: summed and zeroed in one pass (every entry,
                # or none if the run fails: then nothing late is carried), so it serves again
                self.final = cleared = r.read(n, clear=True)
            else:
                self.final = _map_counts(old_map, n)
        except Exception:           # noqa: BLE001 - no final read: nothing late is carried
            self.final = cleared = None
        finally:
            if cleared is None or not self.again.put(old_map):
                _close_counters(old_map)
            self.done.set()

    def finish(self):
        """Wait for the thread: the old programs' last packets counted, their map read again."""
        if self.delta is not None:
            return
        self.done.wait()
        final = self.final if self.final is not None else self.early
        M = 2**64 - 1
        early = self.early if isinstance(self.early, dict) else dict(enumerate(self.early))
        final = final if isinstance(final, dict) else dict(enumerate(final))
        self.delta = {}
        for i, (p, b) in final.items():
            e = early.get(i, (0, 0))
            if (p, b) != e:
                self.delta[i] = ((p - e[0]) & M, (b - e[1]) & M)
        self.early = None
        if not self.delta:
            self.table = None           # nothing to carry: the old table may go

    def carry(self, new: Table, base: list, family: int) -> bool:
        """Add the delta into `base` (the new table's) where libiptc carried the count on;
        True when base changed. Reads only the chains holding a late entry, in both tables,
        without making a moved chain's entries (_continuations): the 3 333 chains an append
        ahead of a fan-out moves stay unmade."""
        from .model import _VOLATILE
        M = 2**64 - 1
        src = getattr(new, "source_blob", None)
        cf, cnt, _ = _VOLATILE[family]
        plan = []
        for j, (i, off, is_rule) in _continuations(self.table, new, set(self.delta)).items():
            e, a = self.returned[j], tuple(self.added[i])
            sent, came = (0, 0), 1
            if src is not None:
                sent = struct.unpack_from("=QQ", src, off + cnt)
                came = struct.unpack_from("=I", src, off + cf)[0]
            zeroed = ((e[0] - sent[0]) & M, (e[1] - sent[1]) & M)
            if a == e and (e != (0, 0) or not is_rule or came):
                # NORMAL_MAP. A zero count carried is told apart from a new rule (0 too) by the
                # entry sent: libiptc copies a rule it read with its comefrom, iptables builds
                # a new one with comefrom 0 (a chain's policy entry is always built anew)
                plan.append((i, self.delta[j]))
            elif sent != (0, 0) and a == zeroed:
                plan.append((i, self.delta[j]))     # ZEROED (iptables -Z)
        for i, (p, b) in plan:
            c = base[i]
            base[i] = ((c[0] + p) & M, (c[1] + b) & M)
        return bool(plan)


_waiter = None      # (thread, queue) of _rcu_waiter


class _MapsAgain:
    """An engine's counters maps that a replaced table's programs no longer count in, zeroed
    by their final read (_LateCounts, in the waiter thread), for its next install
    (Engine._fresh_counters_map): creating a PERCPU_ARRAY of 10 000 entries takes 5-9 ms (one
    per-CPU allocation per entry), and such a map keeps its reader (_reader_of)."""
    MAX = 2

    def __init__(self):
        self.lock = threading.Lock()
        self.maps = []

    def put(self, m) -> bool:
        with self.lock:
            if len(self.maps) >= self.MAX:
                return False
            self.maps.append(m)
            return True

    def has(self, least: int, most: int) -> bool:
        """Would take(least, most) find a map?"""
        with self.lock:
            return any(least <= _counted(m) <= most for m in self.maps)

    def take(self, least: int, most: int):
        """A map of least..most entries, or None; the others close."""
        with self.lock:
            maps, self.maps = self.maps, []
        found = None
        for m in maps:
            if found is None and least <= _counted(m) <= most:
                found = m
            else:
                _close_counters(m)
        return found

    def close(self):
        with self.lock:
            maps, self.maps = self.maps, []
        for m in maps:
            _close_counters(m)


def _rcu_waiter():
    """The queue of the thread that runs _LateCounts' waits and final reads, one after the other.
    One thread for the helper's life: starting one per install cost the reply 0.25-0.3 ms
    (Thread.start waits until the new thread runs), a queue put ~15 us. Started again in a
    process that no longer has it (a fork keeps only the forking thread)."""
    global _waiter
    if _waiter is None or not _waiter[0].is_alive():
        import queue
        q = queue.SimpleQueue()

        def serve():
            while True:
                fn, arg = q.get()
                fn(arg)         # _wait_and_read: catches what it raises
                del fn, arg     # the old map and table go now, not at the next job
        t = threading.Thread(target=serve, name="bpfilter-rcu-wait", daemon=True)
        t.start()
        _waiter = (t, q)
    return _waiter[1]


class _Job:
    """A call run by the install's worker thread (_worker): result() waits for it and returns
    what it returned or raises what it raised."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.value = self.error = None

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:      # noqa: BLE001 - handed to whoever waits for the job
            self.error = e
        finally:
            self.fn = self.args = None
            self.done.set()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


_install_worker = None      # (thread, queue) of _worker


def _wait_all(jobs):
    """A failed install: its jobs over (their results unwanted), so no fd of it is left in
    the worker's hands when the install's error is raised."""
    for job in jobs or ():
        job.done.wait()


def _early_result(job):
    """What a job made, or None when there is no job or it failed (the caller then does the
    work itself and reports the kernel's error as its own)."""
    if job is None:
        return None
    try:
        return job.result()
    except BpfilterError:
        return None


def _discard_early(job):
    """A job's map that will not be used (the install failed before it took it)."""
    m = _early_result(job)
    if m is not None:
        m.close()


# The worker's wait for the GIL during an install (_worker_served), seconds. CPython hands the GIL
# to a waiting thread only after the running one held it for sys.getswitchinterval() (5 ms by
# default): a job queued while this thread compiles or loads in Python started up to 5 ms late,
# and each job waits again to return from its syscall (a restore's trie fill began ~3.5 ms after
# it was queued, and its end was the install's longest wait). The worker holds the GIL only
# between its syscalls (microseconds), so a short interval costs the Python work next to nothing.
WORKER_SWITCH = 0.0002


class _worker_served:
    """Within: the worker thread gets the GIL within WORKER_SWITCH of asking for it. Nested
    installs (offload's) and other threads' settings are kept: the previous interval comes back
    on exit."""

    def __enter__(self):
        self.before = sys.getswitchinterval()
        if self.before > WORKER_SWITCH:
            sys.setswitchinterval(WORKER_SWITCH)
        return self

    def __exit__(self, *exc):
        sys.setswitchinterval(self.before)
        return False


def _worker(fn, *args) -> _Job:
    """Run fn(*args) in the install's worker thread: the kernel's side of making a map (a
    PERCPU_ARRAY's per-entry allocations, a trie's inserts) runs there without the GIL while
    this thread compiles or loads programs, on another CPU. One thread for the process's life
    (Thread.start costs 0.25-0.3 ms), jobs one after the other; started again after a fork."""
    global _install_worker
    if _install_worker is None or not _install_worker[0].is_alive():
        import queue
        q = queue.SimpleQueue()

        def serve():
            while True:
                job = q.get()
                job.run()
                del job
        t = threading.Thread(target=serve, name="bpfilter-maps", daemon=True)
        t.start()
        if _install_worker is None:
            import atexit
            atexit.register(_worker_drained)
        _install_worker = (t, q)
    job = _Job(fn, *args)
    _install_worker[1].put(job)
    return job


def _worker_drained(timeout: float = 5.0):
    """At exit (atexit, before the interpreter finalizes): the worker's queued jobs over. A
    daemon thread still inside a C call (libbpf's bpf_map_create, through cffi) while the
    process exits can crash it: SIGSEGV in 5 of 25 runs of a process that exited ~20 ms after
    queueing the first spare (make_first_spare: ~25 ms of the kernel's allocations), none of 25
    with this wait, which costs an exit at most what is left of the worker's jobs."""
    w = _install_worker
    if w is not None and w[0].is_alive() and threading.current_thread() is not w[0]:
        job = _Job(lambda: None)
        w[1].put(job)
        job.done.wait(timeout)
    t = _second_thread          # (started by the worker's jobs waited for above)
    if t is not None and t.is_alive() and threading.current_thread() is not t:
        t.join(timeout)


def _rule_key(r) -> str:
    """A rule without what a change elsewhere in the table moves (index, offset, the offset a
    jump names) or what the kernel sets (comefrom, counters)."""
    t = r.target
    if isinstance(t, Jump):
        t = ("jump", t.chain, t.goto, t.entry)
    return repr((r.ip, r.matches, t, r.nfcache, r.tail, r.pad))


class _Outline:
    """Where a chain's entries are, read without making a moved chain's (model._MovedChain: an
    append ahead of a fan-out moves its 3 333 service chains, each made on first read, ~11 us).
    `start`: the index of its first entry (head or body), `first`: of its first body entry,
    `policy`: of its policy (RETURN) entry or None; `rules`: model.chain_body's (an unmade
    chain's source's: the same entries, at the source's positions), `policy_entry` and
    `head_entry` likewise;
    `offs`: an unmade chain's entry offsets by entry index (its placement's), else None (its
    entries carry their own)."""
    __slots__ = ("start", "first", "policy", "rules", "policy_entry", "head_entry", "offs")

    def __init__(self, c):
        un = _unmade(c)
        if un is not None:
            _keys, _pkey, head, first, _off, self.policy = chain_outline(c)
            self.rules, self.policy_entry = un[0].rules, un[0].policy_entry
            self.head_entry, self.offs = un[0].head_entry, un[1][0]
        else:
            rules, pe, head = c.rules, c.policy_entry, c.head_entry
            self.head_entry = head
            head = None if head is None else head.index
            body = rules[0] if rules else pe if pe is not None else \
                c.trailer[0] if c.trailer else None
            first = None if body is None else body.index
            self.rules, self.policy_entry, self.offs = rules, pe, None
            self.policy = None if pe is None else pe.index
        self.first = first
        self.start = head if head is not None else first

    def offset(self, i: int, entry) -> int:
        """The offset of this chain's entry index i (`entry`: chain_body's object for it)."""
        return entry.offset if self.offs is None else self.offs[i]


def _holding(chains: list, i: int, memo: dict):
    """(chain, its _Outline) of the chain of `chains` (a table's, in entry order) that holds
    entry index i, found by bisecting the chains' first indexes (a dozen outlines for 3 337
    chains; `memo` keeps them, by chain position, for the next index); None before every
    chain's start. A chain without any entry (never decoded from a blob) has no start: then
    every chain is looked at."""
    def outline(k):
        o = memo.get(k)
        if o is None:
            o = memo[k] = _Outline(chains[k])
        return o
    lo, hi = 0, len(chains)         # the last chain starting at or before i is in [lo - 1, hi)
    try:
        while lo < hi:
            mid = (lo + hi) // 2
            s = outline(mid).start
            if s is None:
                raise LookupError
            if s <= i:
                lo = mid + 1
            else:
                hi = mid
    except LookupError:
        for k in range(len(chains) - 1, -1, -1):
            s = outline(k).start
            if s is not None and s <= i:
                return chains[k], outline(k)
        return None
    return (chains[lo - 1], outline(lo - 1)) if lo else None


class _Continued:
    """Where the rules of one chain of the old table continue in the chain of the same name of
    the new table: the rule continuing old rule p is the k-th rule equal to it (_rule_key)
    where it was the k-th. Rules read from the same decoded entry (the same object, or a
    model._Moved sharing its attribute dict) are equal without their keys: an unchanged
    prefix, as every chain but the one appended to has, answers p without a key (a key is a
    repr, ~10 us: a fan-out's hub has 3 333 rules); past it, the keys of both chains are
    ranked once for all the chain's late entries."""

    def __init__(self, old_rules: list, new_rules: list):
        self.old, self.new = old_rules, new_rules
        self.same = 0           # old[:same] and new[:same] are known equal pairwise
        self.differ = min(len(old_rules), len(new_rules))   # the first pair known unequal
        self.at = None          # {(key, rank): new position}, ranked when first needed

    def position(self, p: int):
        """The new position continuing old position p, or None (no rule continues it)."""
        old, new = self.old, self.new
        while self.same <= p < self.differ:
            a, b = old[self.same], new[self.same]
            if a is b or a.__dict__ is b.__dict__ or _rule_key(a) == _rule_key(b):
                self.same += 1
            else:
                self.differ = self.same
        if p < self.same:
            return p
        if self.at is None:
            self.at = {k: q for q, k in enumerate(_ranked(new))}
            self.old_keys = _ranked(old)
        return self.at.get(self.old_keys[p])


def _ranked(rules: list) -> list:
    """(_rule_key, how many rules before it in `rules` have that key) of each rule."""
    seen, out = {}, []
    for r in rules:
        k = _rule_key(r)
        seen[k] = rank = seen.get(k, -1) + 1
        out.append((k, rank))
    return out


def _continuations(old: Table, new: Table, wanted: set) -> dict:
    """{old entry index: (new entry index, its offset, is a rule)} for the old entries in
    `wanted` that the new table continues: the k-th rule equal to it in the chain of the same
    name (a rule inserted or deleted elsewhere moves it), or that chain's policy/RETURN entry.
    Only the chains holding a wanted entry are read, in either table, and none is made
    (_Outline): after an append ahead of a fan-out, walking every chain's entries made all
    of them in both tables (~130 ms at 10 000 rules), which the next command waited for."""
    by_name = None
    out, pairs, outlines = {}, {}, {}
    for j in sorted(wanted):
        held = _holding(old.chains, j, outlines)
        if held is None:
            continue
        c, o = held
        if o.first is None:
            continue
        p = j - o.first
        if o.offs is None and 0 <= p < len(o.rules) and o.rules[p].index != j:
            # a made chain whose indexes are not consecutive (not laid out): its rules say
            p = next((q for q, r in enumerate(o.rules) if r.index == j), -1)
        is_rule = 0 <= p < len(o.rules)
        if not is_rule and j != o.policy:
            continue            # a head, trailer or the table's tail entry: none continues it
        if by_name is None:
            by_name = {}
            for nc in new.chains:
                by_name.setdefault(nc.name, nc)     # the first of a name, as chain() finds
        nc = by_name.get(c.name)
        if nc is None:
            continue
        pair = pairs.get(id(c))
        if pair is None:
            n = _Outline(nc)
            pair = pairs[id(c)] = (n, _Continued(o.rules, n.rules), c)    # (c: keeps the id)
        n = pair[0]
        if is_rule:
            q = pair[1].position(p)
            if q is None:
                continue
            r = n.rules[q]
            i = n.first + q if n.offs is not None else r.index
            out[j] = (i, n.offset(i, r), True)
        elif n.policy is not None:
            out[j] = (n.policy, n.offset(n.policy, n.policy_entry), False)
    return out


def entry_offsets(table: Table, wanted) -> dict:
    """{entry index: its offset} of the indexes in `wanted`: GET_ENTRIES patches the live
    counters of the entries that counted into the installed blob. Read chain by chain without
    making a moved chain's entries (_holding, _Outline): under traffic after an append ahead
    of a fan-out, every GET_ENTRIES has counts to patch, and listing the entries made all
    3 333 moved chains (30-70 ms of the next command's GET_ENTRIES). An index outside every
    chain's head, rules and policy entries and the table's tail entry (a built-in chain's
    trailer entry, a table whose indexes are not its layout's) is looked up in the list of
    every entry."""
    out, outlines, rest = {}, {}, []
    tail = table.tail_entry
    for i in sorted(wanted):
        if tail is not None and tail.index == i:
            out[i] = tail.offset
            continue
        held = _holding(table.chains, i, outlines)
        o = held[1] if held is not None else None
        if o is not None and o.start is not None:
            p = i - o.first if o.first is not None else -1
            e = o.rules[p] if 0 <= p < len(o.rules) else \
                o.policy_entry if i == o.policy else \
                o.head_entry if i == o.start and o.head_entry is not None else None
            # a made chain's entry says its index: a table whose indexes are not its layout's
            # (never laid out) falls back
            if e is not None and (o.offs is not None or e.index == i):
                out[i] = o.offset(i, e)
                continue
        rest.append(i)
    if rest:
        entries = table.entries()
        out.update((i, entries[i].offset) for i in rest)
    return out


def _percpu_columns(raw: bytes, n: int, ncpu: int) -> list:
    """Every entry's sums: value i is ncpu (pcnt, bcnt) pairs, so column k of the flat u64
    array is one CPU's pcnt (k even) or bcnt (k odd); summing columns runs in C, not per entry
    (~4 ms at 10 000)."""
    stride = 2 * ncpu
    flat = memoryview(raw).cast("Q") if sys.byteorder == "little" else \
        struct.unpack(f"<{stride * n}Q", raw)

    def total(first):
        # one column per CPU, added pairwise by map(operator.add): C loops, no tuple per entry
        cols = [flat[k::stride] for k in range(first, stride, 2)]
        acc = cols[0].tolist() if isinstance(cols[0], memoryview) else list(cols[0])
        for col in cols[1:]:
            acc = list(map(operator.add, acc, col))
        return acc
    sums = list(zip(total(0), total(1)))
    M = 2**64 - 1
    # a sum over CPUs wraps like the kernel's u64 (get_counters) only past 2**64 (max() in C)
    if ncpu > 1 and sums and max(map(max, sums)) > M:
        sums = [(p & M, b & M) for p, b in sums]
    return sums


def _entry_count(table: Table) -> int:
    """table.num_entries, kept on a table decode_replace made (source_blob: never edited
    afterwards): the count walks every chain (~2 ms with kube-proxy's 3 000 chains), and an
    append asked it about ten times."""
    if getattr(table, "source_blob", None) is None:
        return table.num_entries
    n = table.__dict__.get("_entry_count")
    if n is None:
        n = table.__dict__["_entry_count"] = table.num_entries
    return n


def _uses(table: Table, what: str) -> bool:
    """targets.uses_events, addrtype.uses_addrtype, matchers.uses_conntrack of `table`. Each is
    a walk over every rule (~2-4 ms at 10 000), and an install asked five of them; a table
    decode_replace made (source_blob: not edited afterwards) answers from the extension names
    its decode collected, and keeps the answers (asked again when it is the old table)."""
    from . import matchers
    if getattr(table, "source_blob", None) is None or not hasattr(table, "match_names"):
        # edited (source_blob dropped), or not from decode_replace: walk the rules
        return {"events": targets.uses_events, "addrtype": addrtype.uses_addrtype,
                "conntrack": matchers.uses_conntrack}[what](table)
    got = getattr(table, "_uses", None)
    if got is None:
        # the same questions as those functions ask, over the names decode collected from every
        # entry (model: target_names, match_names). uses_events looks at the rules' targets
        # only; a REJECT/LOG entry outside any chain's rules (a trailer no iptables writes)
        # makes this answer yes where it says no: the events map opened for nothing, never
        # missing
        tnames, mnames = table.target_names, table.match_names
        got = table._uses = dict(
            events=bool(tnames & set(targets.TARGETS)),
            addrtype=table.family == AF_INET and "addrtype" in mnames,
            conntrack=bool(mnames & matchers.CONNTRACK))
    return got[what]


# ---- conntrack for state/conntrack matches (issue #6, matchers.py) ----

def _conntrack_for(new: Table, old: Table, family: int):
    """Ask the kernel to track connections while the installed table has a state/conntrack
    match, as xt_conntrack's checkentry does (nf_ct_netns_get); drop the request when the new
    table has none. Done before the swap, so the new programs never see untracked packets."""
    from . import matchers
    want = new is not None and _uses(new, "conntrack")
    had = old is not None and _uses(old, "conntrack")
    if want or had:
        matchers.conntrack_ref(want, "ip" if family == AF_INET else "ip6")


# ---- maps declared by compiled programs (classify.py's lookup maps, issue #7) ----

COUNTERS_MAP_NAME = "bpfilter_cnt"


def _spec_map(spec) -> "K.Map":
    """A new, empty map of classifier MapSpec `spec`."""
    return K.Map.create(spec.map_type, spec.key_size, spec.value_size, spec.max_entries,
                        name=spec.kname, flags=spec.flags)


def create_maps(cp: CompiledProgram, live: dict = None, keep: dict = None,
                fills: list = None, early: dict = None) -> dict:
    """{symbolic name: Map} for every MapSpec of `cp`, created and filled (closed on error).
    Filled before load and never written again: a new ruleset gets new maps, except that a
    MapSpec found in `live` ({id(spec): (spec, Map)}, the installed programs' maps) is the same
    object classify.py returned for an unchanged run (classify._RUN_SPECS), so its map, whose
    contents are exactly the spec's and never change, is shared with the new program instead
    (a packet sees the same contents through either program). Every map used is recorded in
    `keep` with its own fd (a dup), so the engine can offer it to the next install. With
    `fills` (a list), a new map is filled by the worker thread (_fill_later), its job appended
    there: the caller waits for every job before a program using the maps is attached. `early`
    ({id(spec): (spec, Map, job)}, with `fills`): maps made and being filled already
    (Engine._start_fill); one is taken (out of `early`) and its job appended to `fills`."""
    out = {}
    try:
        for spec in getattr(cp, "maps", ()):
            if live is not None and id(spec) in live and live[id(spec)][0] is spec:
                m = out[spec.name] = live[id(spec)][1].dup()
            elif early and id(spec) in early and early[id(spec)][0] is spec:
                _spec, m, job = early.pop(id(spec))
                out[spec.name] = m
                fills.append(job)
            else:
                m = out[spec.name] = _spec_map(spec)
                if fills is not None and spec.entries:
                    fills.append(_fill_later(m, spec.entries))
                else:
                    _fill(m, spec.entries)
            if keep is not None and id(spec) not in keep:
                keep[id(spec)] = (spec, m.dup())
    except BaseException:
        for m in out.values():
            m.close()
        raise
    return out


BPF_MAP_UPDATE_BATCH = 26


def _fill(m, entries: list):
    """All (key, value) pairs into a new map: one BPF_MAP_UPDATE_BATCH (kernel/bpf/syscall.c
    generic_map_update_batch: hash maps, arrays and, on 6.18, LPM tries, whose 10 000 prefixes
    then take ~10 ms instead of ~40 ms of one syscall each), or one update per key where the
    kernel refuses the batch. Not per-CPU maps: a batch takes every CPU's value, update()
    repeats the one given."""
    _fill_prepared(m, entries, _fill_batch(m, entries))


def _fill_batch(m, entries: list):
    """_fill's BPF_MAP_UPDATE_BATCH attr (with the buffers it points to), built here so the
    syscall can be made in another thread (_fill_later); None: no batch for this map."""
    if not entries:
        return None
    if m.percpu:
        return None
    keys, vals = _joined(m, entries)
    if keys is None:
        return None
    ffi = K._ffi
    keys = ffi.from_buffer(keys)
    vals = ffi.from_buffer(vals)
    attr = ffi.new("char[]", 56)
    struct.pack_into("<QQQQIIQQ", ffi.buffer(attr), 0, 0, 0, int(ffi.cast("uintptr_t", keys)),
                     int(ffi.cast("uintptr_t", vals)), len(entries), m.fd, 0, 0)
    return attr, keys, vals


def _joined(m, entries: list) -> tuple:
    """(keys, values) of `entries`, each joined in one buffer for a batch into m, or
    (None, None) when an entry's key or value is not of m's sizes. Entries that come joined
    (classify.Entries: a trie's, ~1.5 ms of this thread's work at 10 000 prefixes before
    the fill could start) are taken as they are when their totals are m's."""
    joined = getattr(entries, "joined", None)
    if joined is not None and len(joined[0]) == m.key_size * len(entries) and \
            len(joined[1]) == m.value_size * len(entries):
        return joined
    # the lengths checked and the arrays joined by C loops (map, set, join): a generator per
    # entry cost ~1.5 ms at 10 000 entries
    keys = list(map(operator.itemgetter(0), entries))
    vals = list(map(operator.itemgetter(1), entries))
    if set(map(len, keys)) != {m.key_size} or set(map(len, vals)) != {m.value_size}:
        return None, None
    return b"".join(keys), b"".join(vals)


def _fill_prepared(m, entries: list, batch):
    """The batch of _fill_batch (its attr names m's fd), else one update per entry."""
    if not entries:
        return
    if batch is not None:
        ffi = K._ffi
        if K._bpf(BPF_MAP_UPDATE_BATCH, batch[0], 56) == 0 and \
                struct.unpack_from("<I", ffi.buffer(batch[0]), 32)[0] == len(entries):
            return
    for k, v in entries:
        m.update(k, v)


def _fill_later(m, entries: list) -> "_Job":
    """_fill in the worker thread (_worker): the kernel's inserts (an LPM trie of 10 000
    prefixes: 8-17 ms in trie_update_elem) run while this thread compiles or loads programs; a
    program may be loaded before its map is filled (the verifier checks the map's types, not
    its contents), but must not be attached before the job is done (Engine._install_host waits
    for it before the swap). The job fills and closes a dup of m, so m may close first."""
    own = m.dup()
    try:
        batch = _fill_batch(own, entries)
    except BaseException:
        own.close()
        raise
    return _worker(_fill_and_close, own, entries, batch)


def _fill_and_close(m, entries: list, batch):
    try:
        _fill_prepared(m, entries, batch)
    finally:
        m.close()


def _add_classified(table, chains: list):
    """status: each chain's runs served by map lookups (classify.py), as text."""
    from . import classify
    if table.family != AF_INET:
        return
    runs = classify.describe(table)
    for ch in chains:
        ch["classified"] = runs.get(ch["name"], [])


def _find_counters(map_ids):
    """The counters map among a program's maps (the one named bpfilter_cnt)."""
    for i in map_ids:
        m = K.Map.from_id(i)
        if m.name == COUNTERS_MAP_NAME:
            return m
        m.close()
    return None


# ---- programs with global functions (compile.py / classify.py, issue #7) ----

BPF_PROG_LOAD, BPF_BTF_LOAD = 5, 18


def btf_load(blob: bytes) -> int:
    """BPF_BTF_LOAD: the fd of the program's own BTF (union bpf_attr: btf, btf_log_buf,
    btf_size, btf_log_size, btf_log_level). A refusal quotes the kernel's BTF log."""
    ffi = K._ffi
    data = ffi.from_buffer(blob)
    log = ffi.new("char[]", 1 << 16)
    attr = ffi.new("char[]", 32)
    struct.pack_into("<QQIII", ffi.buffer(attr), 0, int(ffi.cast("uintptr_t", data)),
                     int(ffi.cast("uintptr_t", log)), len(blob), 1 << 16, 1)
    fd = K._bpf(BPF_BTF_LOAD, attr, 32)
    if fd < 0:
        raise BpfilterError(-fd, f"BPF_BTF_LOAD: {os.strerror(-fd)}: "
                                 f"{ffi.string(log).decode(errors='replace')[-400:]}")
    return fd


def load_with_func_info(cp, code: bytes, btf: bytes, func_info: bytes,
                        attach_prog_fd: int = 0, attach_btf_id: int = 0) -> "K.Prog":
    """BPF_PROG_LOAD with prog_btf_fd and func_info, so the functions BTF calls global are
    verified once each (kernel.Prog.load has no BTF arguments). A refusal is retried once with
    a level-1 log so the error quotes the verifier, like Prog.load. `cp` gives prog_type, name,
    license, expected_attach_type; attach_prog_fd/attach_btf_id name the function an extension
    program replaces (tools/extend.py)."""
    ffi = K._ffi
    btf_fd = btf_load(btf)
    try:
        attr = ffi.new("struct bpf_attr_prog_load *")
        ins, lic, fi = ffi.from_buffer(code), ffi.new("char[]", cp.license.encode()), \
            ffi.from_buffer(func_info)
        attr.prog_type, attr.insn_cnt = cp.prog_type, len(code) // 8
        attr.insns, attr.license = int(ffi.cast("uintptr_t", ins)), int(ffi.cast("uintptr_t", lic))
        attr.prog_name = K._cstr(cp.name)
        attr.expected_attach_type = cp.expected_attach_type
        attr.prog_btf_fd, attr.func_info_rec_size = btf_fd, 8
        attr.func_info, attr.func_info_cnt = int(ffi.cast("uintptr_t", fi)), len(func_info) // 8
        attr.attach_prog_fd, attr.attach_btf_id = attach_prog_fd, attach_btf_id
        size = ffi.sizeof("struct bpf_attr_prog_load")
        log, e = "", 0
        for level, log_size in ((0, 0), (1, 1 << 24), (1, 1 << 27)):
            buf = ffi.new("char[]", log_size) if log_size else ffi.NULL
            attr.log_level, attr.log_size = level, log_size
            attr.log_buf = int(ffi.cast("uintptr_t", buf)) if log_size else 0
            fd = K._bpf(BPF_PROG_LOAD, attr, size)
            if log_size:
                log = ffi.string(buf, log_size).decode(errors="replace")
            if fd >= 0:
                return K.Prog(fd, cp.prog_type, cp.name, log)
            e = -fd
            if e in (errno.EPERM, errno.EFAULT) or (level and e != errno.ENOSPC):
                break
        raise BpfilterError(e, K._load_message(cp.name, e, log))
    finally:
        K._close(btf_fd)


# BPF_JMP | BPF_EXIT: appended after the program's last exit it can never be reached
_UNREACHABLE_EXIT = struct.pack("<BBhi", 0x95, 0, 0, 0)


_ME = None      # (pid, start time) of this process, once read (_me)


def _me():
    """[pid, start time]: who writes a state file (_alive tells a crashed writer from a live
    one). The start time is read from /proc once per process: every install's state file
    names the writer, and it never changes (a forked child has a pid of its own)."""
    global _ME
    pid = os.getpid()
    if _ME is None or _ME[0] != pid or _ME[1] is None:
        _ME = (pid, daemons.start_time(pid))
    return list(_ME)


def _alive(writer) -> bool:
    """Is the process that wrote a pending state still running (and not us)?"""
    try:
        pid, start = int(writer[0]), writer[1]
    except (TypeError, ValueError, IndexError):
        return False
    return pid != os.getpid() and start is not None and daemons.start_time(pid) == start


# ---- work done after the reply (issue #7: what the caller need not wait for) ----
# None, or (in the helper, __main__) the list of what to do once the caller has its answer and
# no request is waiting: an install's gc.freeze (and, once the process has grown, a GC pass
# over the whole heap, 70-250 ms at 10 000 rules: _collect_and_freeze), and freeing the
# replaced table (~5-10 ms of deallocation).
AFTER_REPLY = None
# True while a helper's request left the automatic GC off for its queued work to turn back on
# (sockopt.Dispatcher.serve): run_after_reply does, once that work is done
GC_HELD = False


def after_reply(work):
    """Queue `work` for after the reply: a callable is called, anything else (a tuple of
    objects) is only kept alive until then. Without a helper's queue: a callable runs now."""
    if AFTER_REPLY is not None:
        AFTER_REPLY.append(work)
    elif callable(work):
        work()


# the decode's work that only the next decode reads (model._defer: _ENTRY_CACHE filled, the
# last walk's headers set as its kept blob has them), queued here with the rest: ~2 ms of a
# first 10 000-entry restore's SET_REPLACE done after its reply
_model.LATER = after_reply


def run_after_reply() -> int:
    """Do the queued work, oldest first; returns how many items there were. What it queues
    meanwhile waits for the next call."""
    global GC_HELD
    n = 0
    for _ in range(len(AFTER_REPLY)):
        work = AFTER_REPLY.pop(0)
        if callable(work):
            work()
        del work            # a kept table is freed here
        n += 1
    if GC_HELD:
        import gc
        GC_HELD = False
        gc.enable()
    return n


# a helper's full GC pass (unfreeze, collect, freeze the survivors again). Installs leave no
# garbage cycles (measured, 30 appends to a 10-rule table, a pass after each: 0-16 unreachable
# objects, all the ctypes.CDLL each _wait_for_readers made, which it no longer makes; 10 appends
# to the 10 000-rule fan-out: 0), so a pass every few installs cost 10-17 ms (at 10 rules;
# 50-250 ms at 10 000) for nothing, and delayed the command that came meanwhile. It is due only
# once the process's peak resident size has grown past FULL_PASS_GROWTH times what it was at the
# last pass (or the first install): garbage that is never collected makes the process grow, and
# one that does not grow has none worth a pass. The helper runs it at its next idle moment
# (full_pass_if_due: no request for the select's idle timeout, no door connected), or at once
# after FULL_PASS_EVERY installs without one, so the heap stays bounded under a steady stream
# too. The peak (getrusage: ~1.5 us), not the frozen count: gc.get_freeze_count() walks the
# frozen list, 12 ms at 10 000 rules.
FULL_PASS_GROWTH = 2.0
try:
    FULL_PASS_GROWTH = float(os.environ.get("BPFILTER_FULL_PASS_GROWTH", FULL_PASS_GROWTH))
except ValueError:
    pass
FULL_PASS_EVERY = 16
_peak_at_pass = None    # the peak resident size at the last pass (None: none yet), KiB
_due_installs = 0       # installs since the pass became due (0: not due)


def _peak_rss() -> int:
    """The process's peak resident size in KiB (ru_maxrss: it never goes down), but for what
    a helper's heap reserve added to it (heap.reserve_kib: faulted in at its start, before
    any table)."""
    import resource
    from . import heap
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - heap.reserve_kib()


# every Engine of this process (a helper's backends: one per namespace and family), whose
# installed tables and programs the compile caches keep (_sweep_caches)
_ENGINES = weakref.WeakSet()


def _sweep_caches():
    """After an install: the decode and compile caches keep what the installed tables and
    programs of every engine use, and drop what only replaced ones did (model.sweep_entries,
    classify.sweep_caches, compile.sweep_caches: each a memo, so dropping costs a later
    compile time, never a verdict). Their bounds were counts of items, some of which hold a
    whole chain: a helper given other rulesets in turn, or kube-proxy's resyncs, grew by
    megabytes each time and slowed with its heap. ~1-3 ms at 10 000 rules, after the reply."""
    from . import classify
    from . import compile as C
    engines = list(_ENGINES)
    live = _model.live_keys([e.table for e in engines])
    specs, templates, programs = set(), set(), set()
    for e in engines:
        specs.update(id(spec) for spec, _m in e._cls_maps.values())
        for ct in getattr(e, "_compiled_tables", ()):
            for cp in ct.programs:
                templates.update(id(tpl) for tpl, _v in cp.fn_parts)
                programs.add(id(C.kept_copy(cp)))
    _model.sweep_entries(live)
    C.sweep_caches(live, programs)
    classify.sweep_caches(live, specs, templates)


def _collect_and_freeze():
    """See install: the survivors of an install (the installed table, the caches) frozen,
    without a GC pass first: they live until the next install, and a pass over what an install
    made (~100 000 objects at 10 000 rules) found nothing but delayed the next request. The full
    pass is due once the process has grown (FULL_PASS_GROWTH)."""
    global _peak_at_pass, _due_installs
    import gc
    gc.freeze()
    peak = _peak_rss()
    if _peak_at_pass is None:
        _peak_at_pass = peak
    if peak <= _peak_at_pass * FULL_PASS_GROWTH:
        return
    _due_installs += 1
    if _due_installs >= FULL_PASS_EVERY:
        full_pass()


def full_pass_due() -> bool:
    return _due_installs > 0


def full_pass() -> int:
    """The whole heap collected, frozen objects included, then frozen again; returns what
    gc.collect() found unreachable."""
    global _peak_at_pass, _due_installs
    import gc
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    _peak_at_pass, _due_installs = _peak_rss(), 0
    return found


def full_pass_if_due():
    """A helper's idle moment: the full pass if the process has grown (_collect_and_freeze).
    None when it was not due, else what it found unreachable."""
    if not _due_installs:
        return None
    return full_pass()


def _wait_for_readers():
    """synchronize_rcu() from user space: membarrier(MEMBARRIER_CMD_GLOBAL) waits for an RCU
    grace period (kernel/sched/membarrier.c), and netfilter runs every hook, so every BPF
    program, inside rcu_read_lock (include/linux/netfilter.h nf_hook). Without it a packet that
    entered the old program just before the swap could count after the old counters were read:
    lost, as xt_replace_table's wait on xt_recseq prevents in the kernel. ~13 ms here."""
    # libc.py's syscall, not a ctypes.CDLL per call: a CDLL's function pointer class is a
    # reference cycle (a type), left for the GC after every install
    from . import libc
    libc.syscall(324, 1, 0, 0)      # SYS_membarrier, MEMBARRIER_CMD_GLOBAL; errors: best effort


def _private_dirs(path: str):
    """Create the state directories root-only (issue #9: the helper's files are root-only)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    for d in (path, os.path.dirname(path)):
        if d.startswith(STATE_ROOT):
            _quietly(os.chmod, d, 0o700)


def _quietly(fn, *a):
    try:
        fn(*a)
    except (OSError, BpfilterError):
        pass


def _describe(r) -> str:
    """A short iptables-like text for status output."""
    ip = r.ip
    parts = []
    if ip.proto:
        parts.append(f"-p {ip.proto}")
    if int(ip.smsk):
        parts.append(f"-s {ip.src}/{ip.smsk}")
    if int(ip.dmsk):
        parts.append(f"-d {ip.dst}/{ip.dmsk}")
    for m in r.matches:
        parts.append(f"-m {m.name}")
    t = r.target
    parts.append(f"-j {getattr(t, 'chain', None) or t.name}")
    return " ".join(parts)
