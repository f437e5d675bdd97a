"""The engine: installs a decoded table into the calling thread's network namespace and reads its
counters back. The door and the tests use exactly these names:

  Engine.open(family=AF_INET, flavor="nf") -> Engine
        adopts what is installed for this netns (state file + bpffs pins), or starts from the
        table a fresh namespace has (Table.empty: every policy ACCEPT, nothing attached)
  .table                      the installed Table (entry i == counter index i)
  .install(table) -> list[(pcnt, bcnt)]
        compile every built-in chain (errors name the rule), load (verifier errors name the rule),
        create a fresh counters map, then attach the new programs and detach the old ones; on ANY
        failure the previously installed programs keep filtering and a BpfilterError is raised.
        Returns the counters the replaced table had at the moment of the swap (what SET_REPLACE
        must write to ipt_replace.counters).
  .counters() -> list[(pcnt, bcnt)]   per entry: sum over CPUs of the map + the add_counters base
  .add_counters(list[(pcnt, bcnt)])   IPT_SO_SET_ADD_COUNTERS (xt_add_counters adds)
  .status() -> dict           {"table", "family", "flavor", "chains": [{name, hook, flavor, prog_id,
                               jited_size, rule_count, policy, policy_counters, rules:[{pcnt, bcnt,
                               text}]}]}
  .flush()                    remove everything of this family in this netns: links, pins, files

State of one (netns, family):
  /sys/fs/bpf/bpfilter/<netns cookie>/<family>/g<generation>/{counters, link_<HOOK>}   bpffs pins
  /run/bpfilter/<netns cookie>/<family>.table   JSON: the table blob + GET_INFO numbers, counter
                                                base, generation and hook priorities
The netns cookie (SO_NETNS_COOKIE) is never reused within a boot, unlike inode numbers.

Atomic swap (nf flavor): a netfilter BPF link cannot change its program, so each generation's
links sit at one of two priorities (NF_PRI_A/NF_PRI_B, just after iptables' filter at
NF_IP_PRI_FILTER = 0). The new links are created while the old ones still run, then the old ones
are detached: a packet crossing the hook during the swap sees the old program, the new one or
both in sequence, never neither. Replacing within the same priority would give EBUSY
(nf_bpf_link.c: nf_register_net_hook refuses a second BPF hook at one priority).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct

from . import kernel as K
from .compile import COUNTERS_MAP, CompiledProgram, KernelFacts, compile_table
from .errors import BpfilterError
from .model import AF_INET, HOOK_NAMES, NF_ACCEPT, Table, Verdict

BPFFS = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPFFS, "bpfilter")
STATE_ROOT = "/run/bpfilter"
NF_PRI_A, NF_PRI_B = 1, 2
FAMILY_NAMES = {2: "ipv4", 10: "ipv6"}
NFPROTO = {2: 2, 10: 10}        # NFPROTO_IPV4 / NFPROTO_IPV6 have the AF_ values

_facts = None


def kernel_facts() -> KernelFacts:
    global _facts
    if _facts is None:
        _facts = KernelFacts.from_btf()
    return _facts


def _accept_all(table: Table) -> bool:
    """Nothing to enforce: no rules anywhere and every policy ACCEPT (a fresh table)."""
    return all(not c.rules and (not c.builtin or c.policy == -NF_ACCEPT - 1) for c in table.chains)


def _verifier_slot(message: str):
    """The instruction the verifier stopped at: the last "N: (xx) ..." line of its log."""
    found = None
    for m in re.finditer(r"^(\d+): \(", message, re.M):
        found = int(m.group(1))
    return found


class Engine:
    def __init__(self, family: int, flavor: str, cookie: int):
        self.family, self.flavor, self.cookie = family, flavor, cookie
        fam = FAMILY_NAMES.get(family)
        if fam is None:
            raise BpfilterError(errno.EAFNOSUPPORT, f"family {family}")
        self.pin_dir = os.path.join(PIN_ROOT, str(cookie), fam)
        self.state_path = os.path.join(STATE_ROOT, str(cookie), f"{fam}.table")
        self.table = Table.empty("filter", family)
        self.base = [(0, 0)] * self.table.num_entries
        self.generation = 0
        self.priority = None          # priority of the installed links (None: nothing attached)
        self.hooks = {}               # chain name -> hook number of the attached programs
        self._map = None
        self.state_error = None

    # ---- open / persist ----
    @classmethod
    def open(cls, family: int = AF_INET, flavor: str = "nf") -> "Engine":
        if flavor != "nf":
            raise BpfilterError(errno.EOPNOTSUPP, f"flavor {flavor!r} is not supported by the engine")
        eng = cls(family, flavor, K.netns_cookie())
        eng._load_state()
        return eng

    def _load_state(self):
        try:
            with open(self.state_path) as f:
                st = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise BpfilterError(errno.EIO, f"cannot read {self.state_path}: {e}")
        try:
            self.generation = st["generation"]
            self.priority = st["priority"]
            self.hooks = st["hooks"]
            table = Table.decode(bytes.fromhex(st["blob"]), st["family"], st["hook_entry"],
                                 st["underflow"], st["valid_hooks"], st["name"])
            base = [tuple(x) for x in st["base"]]
        except (KeyError, TypeError, ValueError, BpfilterError) as e:
            # keep what locates the pins so flush() still works; the model starts fresh
            self.state_error = f"unreadable state {self.state_path}: {e}"
            return
        self.table, self.base = table, base + [(0, 0)] * (table.num_entries - len(base))

    def _save_state(self):
        st = dict(name=self.table.name, family=self.family, valid_hooks=self.table.valid_hooks,
                  hook_entry=self.table.hook_entry, underflow=self.table.underflow,
                  blob=self.table.encode().hex(), base=self.base, generation=self.generation,
                  priority=self.priority, hooks=self.hooks, flavor=self.flavor)
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(st, f)
        os.replace(tmp, self.state_path)

    def _gen_dir(self, gen: int) -> str:
        return os.path.join(self.pin_dir, f"g{gen}")

    def _counters_map(self):
        """The installed generation's counters map (None when nothing is installed)."""
        if self.priority is None:
            return None
        if self._map is None:
            self._map = K.Map.from_pin(os.path.join(self._gen_dir(self.generation), "counters"))
        return self._map

    # ---- install ----
    def install(self, table: Table) -> list:
        """See the module docstring. Returns the replaced table's counters."""
        if table.family != self.family:
            raise BpfilterError(errno.EINVAL, f"table of family {table.family} given to the "
                                              f"family {self.family} engine")
        if self.family != AF_INET and _accept_all(table):
            # nothing to enforce and no compiler for this family yet: keep the model only
            old = self._detach_current()
            self.table, self.base = table, [(0, 0)] * table.num_entries
            self._save_state()
            return old
        compiled = compile_table(table, kernel_facts(), self.flavor)
        K.ensure_bpffs(BPFFS)
        new_map = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, compiled.counters_entries,
                               name="bpfilter_cnt")
        progs, links = [], []
        try:
            for cp in compiled.programs:
                progs.append(self._load(cp, new_map))
            prio = NF_PRI_B if self.priority == NF_PRI_A else NF_PRI_A
            for cp, prog in zip(compiled.programs, progs):
                links.append(K.link_create_netfilter(prog, NFPROTO[self.family], cp.hook, prio))
            gen = self.generation + 1
            gdir = self._gen_dir(gen)
            shutil.rmtree(gdir, ignore_errors=True)
            new_map.pin(os.path.join(gdir, "counters"))
            for cp, link in zip(compiled.programs, links):
                link.pin(os.path.join(gdir, f"link_{cp.chain}"))
        except BaseException:
            for link in links:
                _quietly(link.detach)
                link.close()
            for p in progs:
                p.close()
            new_map.close()
            if 'gdir' in locals():
                shutil.rmtree(gdir, ignore_errors=True)
            raise
        # the new programs filter now; retire the old ones
        old = self._detach_current()
        for p in progs:
            p.close()
        for link in links:
            link.close()
        self.table = table
        self.base = [(0, 0)] * table.num_entries
        self.generation, self.priority = gen, prio
        self.hooks = {cp.chain: cp.hook for cp in compiled.programs}
        self._map = new_map
        self._save_state()
        return old

    def _load(self, cp: CompiledProgram, counters_map) -> "K.Prog":
        code = cp.assemble({COUNTERS_MAP: counters_map.fd})
        try:
            return K.Prog.load(cp.prog_type, code, license=cp.license, name=cp.name,
                               expected_attach_type=cp.expected_attach_type)
        except BpfilterError as e:
            slot = _verifier_slot(e.message)
            where = cp.locate(slot) if slot is not None else f"chain {cp.chain}"
            raise BpfilterError(e.errno, f"{where}: the kernel refused the compiled program "
                                         f"({e.message})") from None

    def _detach_current(self) -> list:
        """Detach and unpin the installed generation; returns its final counters."""
        old = self.counters()
        if self.priority is not None:
            gdir = self._gen_dir(self.generation)
            for chain in self.hooks:
                path = os.path.join(gdir, f"link_{chain}")
                try:
                    link = K.Link.from_pin(path)
                except BpfilterError:
                    continue
                _quietly(link.detach)
                link.close()
            old = self.counters()          # after detach: nothing counts any more
            if self._map is not None:
                self._map.close()
                self._map = None
            shutil.rmtree(gdir, ignore_errors=True)
            self.priority = None
            self.hooks = {}
        return old

    # ---- counters ----
    def counters(self) -> list:
        n = self.table.num_entries
        out = list(self.base) + [(0, 0)] * (n - len(self.base))
        m = self._counters_map()
        if m is None:
            return out[:n]
        for i in range(min(n, m.max_entries)):
            vals = m.lookup_percpu(i) or []
            p = b = 0
            for v in vals:
                vp, vb = struct.unpack("<QQ", v)
                p, b = p + vp, b + vb
            out[i] = (out[i][0] + p, out[i][1] + b)
        return out[:n]

    def add_counters(self, counters):
        counters = list(counters)
        if len(counters) != self.table.num_entries:
            raise BpfilterError(errno.EINVAL, f"{len(counters)} counters for "
                                              f"{self.table.num_entries} entries")
        self.base = [((a + int(c[0])) & (2**64 - 1), (b + int(c[1])) & (2**64 - 1))
                     for (a, b), c in zip(self.base, counters)]
        self._save_state()

    # ---- status / flush ----
    def status(self) -> dict:
        counts = self.counters()
        chains = []
        for c in self.table.chains:
            ch = dict(name=c.name, hook=HOOK_NAMES.get(c.hook) if c.builtin else None,
                      flavor=self.flavor if c.name in self.hooks else None, prog_id=None,
                      jited_size=None, rule_count=len(c.rules),
                      policy=Verdict(c.policy).name if c.builtin and c.policy is not None else None,
                      rules=[dict(pcnt=counts[r.index][0], bcnt=counts[r.index][1],
                                  text=_describe(r)) for r in c.rules])
            if c.policy_entry is not None:
                ch["policy_counters"] = dict(pcnt=counts[c.policy_entry.index][0],
                                             bcnt=counts[c.policy_entry.index][1])
            if c.name in self.hooks:
                try:
                    link = K.Link.from_pin(os.path.join(self._gen_dir(self.generation),
                                                        f"link_{c.name}"))
                    li = link.info()
                    link.close()
                    prog = K.Prog.from_id(li["prog_id"])
                    pi = prog.info()
                    prog.close()
                    ch.update(prog_id=pi["id"], jited_size=pi["jited_prog_len"],
                              priority=li.get("priority"))
                except BpfilterError as e:
                    ch["error"] = str(e)
            chains.append(ch)
        return dict(table=self.table.name, family=FAMILY_NAMES[self.family], flavor=self.flavor,
                    generation=self.generation, chains=chains)

    def flush(self):
        """Remove everything of this family in this netns; the model returns to the fresh table."""
        self._detach_current()
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        for d in (os.path.dirname(self.pin_dir),):
            _quietly(os.rmdir, d)                 # only when no other family is left
        _quietly(os.unlink, self.state_path)
        _quietly(os.rmdir, os.path.dirname(self.state_path))
        self.table = Table.empty("filter", self.family)
        self.base = [(0, 0)] * self.table.num_entries
        self.generation = 0

    def close(self):
        if self._map is not None:
            self._map.close()
            self._map = None


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
