"""Which flavor serves which family/chain, and what happens to a table the compiler cannot
translate: a config file, CLI flags, and the text `bpfilter status` prints. The default keeps
iptables-exact behaviour: nf everywhere, untranslatable tables refused (policy reject).

File /etc/bpfilter/flavors.conf (override with BPFILTER_CONFIG), one setting per line, '#' starts
a comment:
    ipv4 = tc                       every built-in chain of the ipv4 filter table on tc
    ipv4 = xdp mode=generic         xdp; mode native (default: native, generic fallback) | generic
    ipv6 = nf
    ipv4 INPUT = xdp                per chain: chains not named take the family's flavor
    ipv4 OUTPUT = nf                (each flavor in use gets its own attachment; one counters
                                    map serves them all; see docs/flavors.md "Per-chain flavors")
    ipv4 INPUT = xdp dev=eth0,ens+  per interface: INPUT on xdp for packets received on eth0 and
                                    ens*, on nf for every other device (docs/flavors.md
                                    "Per-interface flavors"; INPUT/FORWARD on tc or xdp only)
    policy = xtables                a table the compiler cannot translate is handed to the
                                    kernel's own xtables (door only; default: reject)
    ipv6 policy = reject            the same per family (see docs/policy.md)
CLI flags: --flavor nf|tc|xdp [--flavor-dev IFNAMES] [--xdp-mode auto|native|generic]
[--offload IFNAME] [--policy reject|xtables]; a flag wins over the file. --flavor-dev eth0,ens+
puts INPUT and FORWARD on tc/xdp for those devices only, nf for the others and for OUTPUT. The
helper takes them on its command line (`python3 -m bpfilter_umh [--listen] FLAGS`,
`bpfilter exec FLAGS -- CMD`) and set_flags() makes every load() in that process apply them.

A family's flavors travel as one "flavor spec" string (Config.flavor, Engine.open, the state
file): a flavor name when every chain agrees ("nf"), else every chain named:
"INPUT=xdp,FORWARD=xdp,OUTPUT=nf" (parse_spec/spec_text). A chain served on some devices only
names them after its flavor, ':' apart (':' is never in an interface name, net/core/dev.c
dev_valid_name): "INPUT=xdp:eth0:ens+,FORWARD=nf,OUTPUT=nf" (parse_devices).

API: load(path=None) -> Config; Config.flavor(family) -> spec str; Config.chain_flavors(family)
     -> {chain: flavor}; Config.chain_devices(family) -> {chain: (pattern, ...)};
     Config.xdp_mode(family); parse_devices(spec) -> {chain: (pattern, ...)};
     device_matches(name, patterns) -> bool;
     Config.policy(family) -> "reject" | "xtables";
     apply_flags(config, argv) -> (config, rest); set_flags(argv); status_text(status_dict) -> str
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from .errors import BpfilterError
from .flavors import FLAVORS

CONFIG_PATH = "/etc/bpfilter/flavors.conf"
FAMILIES = ("ipv4", "ipv6")
CHAINS = ("INPUT", "FORWARD", "OUTPUT")
XDP_MODES = ("auto", "native", "generic")
POLICIES = ("reject", "xtables")
FLAGS = ("--flavor", "--flavor-dev", "--xdp-mode", "--offload", "--policy")   # each takes a value
L2 = ("tc", "xdp")          # flavors attached per device: the ones dev= can restrict

_process_flags = []         # set_flags(): applied by every load() of this process


@dataclass
class Config:
    flavors: dict = field(default_factory=lambda: {f: "nf" for f in FAMILIES})
    xdp_modes: dict = field(default_factory=lambda: {f: "auto" for f in FAMILIES})
    offload: dict = field(default_factory=dict)         # family -> interface name
    chains: dict = field(default_factory=dict)          # family -> {chain: flavor} overrides
    devices: dict = field(default_factory=dict)         # family -> {chain: (pattern, ...)}
    policies: dict = field(default_factory=lambda: {f: "reject" for f in FAMILIES})
    source: str = "default"

    def policy(self, family) -> str:
        """What a SET_REPLACE the compiler cannot translate does: "reject" (EOPNOTSUPP, nothing
        changes) or "xtables" (the door hands the table to the kernel's own xtables)."""
        return self.policies[_family(family)]

    def flavor(self, family: str) -> str:
        """The family's flavor spec: a flavor name, or every chain named when they differ."""
        return spec_text(self.chain_flavors(family), self.chain_devices(family))

    def chain_flavors(self, family: str) -> dict:
        fam = _family(family)
        return {c: self.chains.get(fam, {}).get(c, self.flavors[fam]) for c in CHAINS}

    def chain_devices(self, family: str) -> dict:
        """{chain: (pattern, ...)} of the chains served by their L2 flavor on some devices only."""
        return dict(self.devices.get(_family(family), {}))

    def xdp_mode(self, family: str) -> str:
        return self.xdp_modes[_family(family)]


def _family(f) -> str:
    names = {2: "ipv4", 10: "ipv6", "ipv4": "ipv4", "ipv6": "ipv6"}
    if f not in names:
        raise BpfilterError(errno.EINVAL, f"unknown family {f!r} (ipv4 or ipv6)")
    return names[f]


def _flavor(name: str, where: str) -> str:
    if name not in FLAVORS:
        raise BpfilterError(errno.EINVAL, f"{where}: unknown flavor {name!r} "
                                          f"(one of {', '.join(FLAVORS)})")
    return name


def _chain_flavor(chain: str, fl: str, where: str) -> str:
    """Refuse a chain its flavor has no hook for: XDP runs at the driver's receive path only
    (net/core/dev.c do_xdp_generic / the driver's NAPI poll), so it never sees OUTPUT."""
    from .model import HOOK_NAMES
    hook = {v: k for k, v in HOOK_NAMES.items()}[chain]
    if hook not in FLAVORS[fl].hooks:
        raise BpfilterError(errno.EINVAL, f"{where}: flavor {fl} cannot serve {chain} (it has "
                                          f"no {chain} hook; use nf or tc for it)")
    return fl


def _parse(spec: str):
    """({chain: flavor}, {chain: (pattern, ...)}) of a flavor spec, checked."""
    if not isinstance(spec, str) or not spec:
        raise BpfilterError(errno.EINVAL, f"flavor spec {spec!r}: expected a flavor name or "
                                          "CHAIN=FLAVOR[:IFNAME...],...")
    default, named, devices = "nf", {}, {}
    for word in spec.split(","):
        chain, eq, fl = word.strip().partition("=")
        if not eq:
            default = _flavor(chain, "flavor spec")
            continue
        if chain not in CHAINS:
            raise BpfilterError(errno.EINVAL, f"flavor spec {spec!r}: unknown chain {chain!r}")
        fl, *devs = fl.split(":")
        named[chain] = _chain_flavor(chain, _flavor(fl, "flavor spec"), "flavor spec")
        if devs:
            devices[chain] = tuple(_ifname(d, "flavor spec") for d in devs)
    chains = {c: named.get(c, default) for c in CHAINS}
    _check_devices(chains, devices, f"flavor spec {spec!r}")
    return chains, devices


def parse_spec(spec: str) -> dict:
    """{chain: flavor} of a flavor spec: "xdp", or "[DEFAULT,]CHAIN=FLAVOR[:IFNAME...],..."
    (chains not named take DEFAULT, else nf). A chain restricted to devices gives its L2
    flavor here; parse_devices says where (nf serves it on the other devices)."""
    return _parse(spec)[0]


def parse_devices(spec: str) -> dict:
    """{chain: (pattern, ...)} of the chains a spec serves on some devices only."""
    return _parse(spec)[1]


def spec_text(chains: dict, devices: dict = None) -> str:
    """The canonical spec of {chain: flavor} (and {chain: patterns}): one name when all agree
    and no chain is restricted to devices."""
    devices = devices or {}
    used = {chains[c] for c in CHAINS}
    if len(used) == 1 and not devices:
        return used.pop()
    return ",".join(f"{c}={chains[c]}" + "".join(":" + d for d in devices.get(c, ()))
                    for c in CHAINS)


def _ifname(name: str, where: str) -> str:
    """An interface name or iptables-style prefix pattern ("ens+"): what dev_valid_name
    (net/core/dev.c) accepts, shorter than IFNAMSIZ, '+' only at the end."""
    if not name or len(name) >= 16 or name in (".", "..") or "+" in name[:-1] \
            or any(ch in name for ch in "/:,=") or any(ch.isspace() for ch in name):
        raise BpfilterError(errno.EINVAL, f"{where}: bad interface name {name!r} (1-15 "
                                          "characters, no '/', ':', ',', '=' or space; a "
                                          "trailing '+' matches every name it starts)")
    return name


def device_matches(name: str, patterns) -> bool:
    """iptables' -i semantics: the exact name, or a prefix ending in '+'."""
    return any(name == p or (p.endswith("+") and name.startswith(p[:-1])) for p in patterns)


def _check_devices(chains: dict, devices: dict, where: str):
    """Refuse what per-interface flavors cannot do (EINVAL):
    - dev= on nf: nf runs in the stack for every device, nothing to restrict;
    - dev= on OUTPUT: it is the sender's hook, before any output device is final (xdp has no
      OUTPUT at all; tc's egress would see packets nf OUTPUT already judged);
    - two chains on one L2 flavor with different devices: the links are per device and run the
      dispatcher of every chain of the flavor (attach.py), so they share one device set;
    - the other devices' flavor is nf: each restricted chain's nf program passes what the L2
      flavor serves (its served-ifindex map), which only the nf program does."""
    for c, devs in devices.items():
        if chains[c] not in L2:
            raise BpfilterError(errno.EINVAL, f"{where}: {c}: dev= needs flavor tc or xdp "
                                              f"({chains[c]} serves every device)")
        if c == "OUTPUT":
            raise BpfilterError(errno.EINVAL, f"{where}: OUTPUT cannot be served per device "
                                              "(only INPUT and FORWARD, by their input device); "
                                              "put OUTPUT on nf")
    for fl in L2:
        sets = {devices.get(c) for c in CHAINS if chains[c] == fl}
        if len(sets) > 1:
            raise BpfilterError(errno.EINVAL, f"{where}: every chain on {fl} must name the same "
                                              f"devices (its per-device links serve them all); "
                                              f"put the others on nf")


def _policy(name: str, where: str) -> str:
    if name not in POLICIES:
        raise BpfilterError(errno.EINVAL, f"{where}: unknown policy {name!r} "
                                          f"(one of {', '.join(POLICIES)})")
    return name


def parse(text: str, source: str = "<text>") -> Config:
    cfg = Config(source=source)
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{n}"
        if "=" not in line:
            raise BpfilterError(errno.EINVAL, f"{where}: expected 'FAMILY [CHAIN] = FLAVOR'")
        left, right = (x.split() for x in line.split("=", 1))
        if left and left[-1] == "policy":
            # "policy = P" (every family) or "FAMILY policy = P"
            if len(left) > 2 or len(right) != 1 or (len(left) == 2 and left[0] not in FAMILIES):
                raise BpfilterError(errno.EINVAL, f"{where}: expected '[FAMILY] policy = "
                                                  f"{'|'.join(POLICIES)}'")
            for fam in left[:-1] or FAMILIES:
                cfg.policies[fam] = _policy(right[0], where)
            continue
        if not left or len(left) > 2 or not right:
            raise BpfilterError(errno.EINVAL, f"{where}: expected 'FAMILY [CHAIN] = FLAVOR'")
        fam = left[0]
        if fam not in FAMILIES:
            raise BpfilterError(errno.EINVAL, f"{where}: unknown family {fam!r}")
        fl = _flavor(right[0], where)
        if len(left) == 2:
            cfg.devices.get(fam, {}).pop(left[1], None)     # a later line for the chain wins
        for opt in right[1:]:
            k, _, v = opt.partition("=")
            if k == "mode" and v in XDP_MODES and fl == "xdp":
                cfg.xdp_modes[fam] = v
            elif k == "offload" and v and fl == "xdp":
                cfg.offload[fam] = v
            elif k == "dev" and len(left) == 2:
                if fl not in L2:
                    raise BpfilterError(errno.EINVAL, f"{where}: dev= needs flavor tc or xdp "
                                                      f"({fl} serves every device)")
                cfg.devices.setdefault(fam, {})[left[1]] = \
                    tuple(_ifname(d, where) for d in v.split(","))
            elif k == "dev":
                raise BpfilterError(errno.EINVAL, f"{where}: dev= goes on a chain's line "
                                                  f"('{fam} INPUT = {fl} dev={v}')")
            else:
                raise BpfilterError(errno.EINVAL, f"{where}: unknown option {opt!r} for {fl}")
        if any(k.startswith("offload=") for k in right[1:]) and len(left) == 2 \
                and left[1] != "INPUT":
            raise BpfilterError(errno.EINVAL, f"{where}: offload runs the INPUT chain only")
        if fam in cfg.offload and fam != "ipv4":
            # offload.py runs INPUT of ipv4 only (no IPv6 header walk without helpers)
            raise BpfilterError(errno.EOPNOTSUPP, f"{where}: offload serves ipv4 only")
        if len(left) == 2:
            if left[1] not in CHAINS:
                raise BpfilterError(errno.EINVAL, f"{where}: unknown chain {left[1]!r}")
            cfg.chains.setdefault(fam, {})[left[1]] = _chain_flavor(left[1], fl, where)
        else:
            cfg.flavors[fam] = fl
    _check_offload(cfg, source)
    for fam in cfg.devices:
        _check_devices(cfg.chain_flavors(fam), cfg.devices[fam], source)
    return cfg


def _file_config(path: str = None) -> Config:
    """The configuration file alone (no flags): the default when there is none."""
    path = path or os.environ.get("BPFILTER_CONFIG", CONFIG_PATH)
    try:
        with open(path) as f:
            return parse(f.read(), path)
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise BpfilterError(e.errno, f"cannot read {path}: {e.strerror}")


def load(path: str = None) -> Config:
    cfg = _file_config(path)
    if _process_flags:
        cfg, _rest = apply_flags(cfg, _process_flags)
    return cfg


def set_flags(argv: list) -> list:
    """Remember this process's command-line flags (checked now: a bad flag is an error before
    anything is served); every later load() applies them over the file. Returns the argv
    without them."""
    global _process_flags
    # checked over the file: --flavor-dev alone restricts the file's tc/xdp chain lines
    _cfg, rest = apply_flags(_file_config(), list(argv))
    _process_flags = [a for i, a in enumerate(argv)
                      if a in FLAGS or (i > 0 and argv[i - 1] in FLAGS)]
    return rest


def split_flags(argv: list):
    """(flags, rest) for a command line `[FLAGS] [--] CMD ARGS`: the flags stop at the first
    word that is not one (or at "--"), so CMD's own options are never taken."""
    flags, i = [], 0
    while i < len(argv) and argv[i] in FLAGS:
        if i + 1 >= len(argv):
            raise BpfilterError(errno.EINVAL, f"{argv[i]} needs a value")
        flags += argv[i:i + 2]
        i += 2
    if i < len(argv) and argv[i] == "--":
        i += 1
    apply_flags(_file_config(), flags)      # checked before anything runs (over the file:
                                            # --flavor-dev alone restricts its tc/xdp chains)
    return flags, argv[i:]


def apply_flags(cfg: Config, argv: list, family: str = "ipv4"):
    """Consume --flavor/--xdp-mode/--offload/--policy from argv; returns (cfg, remaining argv).
    --policy sets every family; the flavor flags set `family` (other flavors than nf serve
    ipv4 only)."""
    rest, i, flavor_dev = [], 0, None
    while i < len(argv):
        a = argv[i]
        if a in FLAGS:
            if i + 1 >= len(argv):
                raise BpfilterError(errno.EINVAL, f"{a} needs a value")
            v = argv[i + 1]
            if a == "--flavor":
                cfg.flavors[family] = _flavor(v, a)
                cfg.chains.pop(family, None)        # a flag wins over the file's chain lines
                cfg.devices.pop(family, None)
            elif a == "--flavor-dev":
                flavor_dev = tuple(_ifname(d, a) for d in v.split(","))
            elif a == "--xdp-mode":
                if v not in XDP_MODES:
                    raise BpfilterError(errno.EINVAL, f"--xdp-mode: one of {', '.join(XDP_MODES)}")
                cfg.xdp_modes[family] = v
            elif a == "--policy":
                for fam in FAMILIES:
                    cfg.policies[fam] = _policy(v, a)
            else:
                cfg.offload[family] = v
            cfg.source = "command line"
            i += 2
            continue
        rest.append(a)
        i += 1
    if flavor_dev:
        # INPUT and FORWARD on their tc/xdp flavor for these devices, nf elsewhere; OUTPUT on nf
        # (it cannot be served per device)
        chains = cfg.chain_flavors(family)
        served = [c for c in ("INPUT", "FORWARD") if chains[c] in L2]
        if not served:
            raise BpfilterError(errno.EINVAL, "--flavor-dev needs INPUT or FORWARD on tc or xdp "
                                              "(--flavor tc|xdp)")
        cfg.chains[family] = dict(chains, OUTPUT="nf")
        cfg.devices[family] = {c: flavor_dev for c in served}
        _check_devices(cfg.chains[family], cfg.devices[family], "--flavor-dev")
    if cfg.offload.get(family) and cfg.chain_flavors(family)["INPUT"] != "xdp":
        raise BpfilterError(errno.EINVAL, "--offload needs --flavor xdp")
    if cfg.offload.get(family) and cfg.devices.get(family):
        raise BpfilterError(errno.EINVAL, "--offload with --flavor-dev or dev= is not supported")
    return cfg, rest


def _check_offload(cfg: Config, source: str):
    """Offload runs the INPUT chain on the device (offload.py): only with INPUT on xdp."""
    for fam in cfg.offload:
        if cfg.chain_flavors(fam)["INPUT"] != "xdp":
            raise BpfilterError(errno.EINVAL, f"{source}: {fam} offload needs INPUT on xdp")
        if cfg.devices.get(fam):
            # offload.py's counters merge assumes the host's xdp INPUT sees every device
            raise BpfilterError(errno.EINVAL, f"{source}: {fam} offload with dev= is not "
                                              "supported")


def status_text(st: dict) -> str:
    """The flavor part of `bpfilter status` for one Engine.status() dict."""
    out = [f"{st['family']} {st['table']}: flavor {st['flavor']}"
           + (f", policy {st['policy']}" if st.get("policy") else "")
           + (", served by the kernel's xtables (delegated)" if st.get("delegated") else "")]
    for ch in st["chains"]:
        if ch.get("hook") is None:
            continue
        link = ch.get("link") or {}
        ifs = link.get("interfaces") if isinstance(link, dict) else None
        where = " on " + ", ".join(f"{i}({'/'.join(d)})" for i, d in sorted(ifs.items())) \
            if ifs else ""
        fl = ch.get('flavor') or '-'
        if ch.get("devices"):
            fl = f"{fl} (dev {','.join(ch['devices'])}) + nf"
        out.append(f"  {ch['name']:8} {fl:4} prog {ch.get('prog_id') or '-'}"
                   f" jited {ch.get('jited_size') or '-'} rules {ch['rule_count']}{where}")
    return "\n".join(out)
