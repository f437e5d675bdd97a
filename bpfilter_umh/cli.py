"""`bpfilter`: the control plane's command line.

  bpfilter exec -- CMD [ARGS]   run CMD with its iptables/ip6tables socket options served by
                                bpfilter (see door.py); exit status and output are CMD's own
  bpfilter status [--json]      per chain: flavor, hook, program id, JIT size, rules, counters;
                                the offload device and program id
  bpfilter flush                remove this network namespace's bpfilter state
  bpfilter helper [--listen]    the helper itself (same as python3 -m bpfilter_umh)
  bpfilter gc [--dry-run] [--json]  remove pins and state left by network namespaces that are gone
  exec and helper take --flavor nf|tc|xdp, --flavor-dev IFNAMES, --xdp-mode, --offload IFNAME,
  --policy reject|xtables

From a checkout, bin/bpfilter is this command: its `exec` goes straight to the door without
site-packages, runpy or argparse (the per-iptables-command path), the other subcommands run here.
"""
import sys

from .errors import BpfilterError

FAMILIES = {"ipv4": 2, "ipv6": 10}


def _engines():
    """Each family's engine, opened with the flavor its table is installed with (so status and
    flush see what really filters), else the configured one."""
    from . import config
    from .engine import Engine
    from .sockopt import use_host_bpffs
    use_host_bpffs()
    cfg = config.load()
    for fam_name, fam in FAMILIES.items():
        yield fam_name, Engine.open(fam, Engine.installed_flavor(fam) or cfg.flavor(fam))


def cmd_status(args) -> int:
    out = {}
    for fam_name, eng in _engines():
        out[fam_name] = eng.status()
    if args.json:
        import json
        json.dump(out, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    for fam_name, st in out.items():
        print(format_status(fam_name, st))
    return 0


def format_status(fam_name: str, st) -> str:
    """Human-readable status: one block per chain, one line per rule with its counters."""
    if not isinstance(st, dict) or "chains" not in st:
        return f"{fam_name}: {st}"
    lines = [f"{fam_name} table {st.get('table', 'filter')} (flavor {st.get('flavor')}, "
             f"generation {st.get('generation', '-')}, policy {st.get('policy', 'reject')})"]
    off = st.get("offload")
    if off:
        lines.append(f"  offloaded INPUT on {off.get('device')}: "
                     + (f"error: {off['error']}" if off.get("error") else
                        f"prog id {off.get('prog_id')}, counters map id {off.get('map_id')}"))
    if st.get("delegated"):
        lines.append(f"  served by the kernel's xtables (policy xtables): "
                     f"{st.get('delegated_reason')}")
    for ch in st["chains"]:
        on = ch.get("flavor") or "-"
        if ch.get("devices"):
            on = f"{on} (dev {','.join(ch['devices'])}) + {ch.get('fallback', 'nf')}"
        where = (f"hook {ch['hook']} on {on}, prog id {ch.get('prog_id') or '-'}, JIT "
                 f"{ch.get('jited_size') or '-'} bytes" if ch.get("hook") else "user chain")
        if ch.get("hook") and not ch.get("prog_id"):
            where = f"hook {ch['hook']}, not attached (nothing to enforce)"
        lines.append(f"  {ch.get('name')}: {where}, {ch.get('rule_count', 0)} rules"
                     + (f", policy {ch['policy']}" if ch.get("policy") else ""))
        if ch.get("error"):
            lines.append(f"    error: {ch['error']}")
        for run in ch.get("classified") or ():
            lines.append(f"    classified: {run}")
        rows = [(str(i), r.get("pcnt", 0), r.get("bcnt", 0), r.get("text", ""))
                for i, r in enumerate(ch.get("rules", []), 1)]
        pc = ch.get("policy_counters")
        if pc and ch.get("policy"):
            rows.append(("policy", pc["pcnt"], pc["bcnt"], ch["policy"]))
        for num, p, b, text in rows:
            lines.append(f"    {num:>6} {p:>10} pkts {b:>12} bytes  {text}")
    return "\n".join(lines)


def cmd_flush(args) -> int:
    from .sockopt import netns_cookie, state_lock
    engines = list(_engines())
    with state_lock(netns_cookie()):        # not in the middle of a helper's replace
        for _fam, eng in engines:
            eng.flush()
    return 0


def cmd_exec(args) -> int:
    argv = args.command
    if argv and argv[0] == "--":
        argv = argv[1:]
    from .door import exec_main         # checks the flags, then runs CMD under the door
    return exec_main(_flags(args) + ["--"] + argv)


def cmd_helper(args) -> int:
    from .__main__ import main as helper_main
    return helper_main((["--listen"] if args.listen else []) + _flags(args))


def cmd_gc(args) -> int:
    from . import gc
    return gc.main((["--dry-run"] if args.dry_run else []) + (["--json"] if args.json else []))


def _add_flags(p):
    """config.py's flags: they win over /etc/bpfilter/flavors.conf (docs/policy.md)."""
    p.add_argument("--flavor", help="nf | tc | xdp")
    p.add_argument("--flavor-dev", metavar="IFNAMES",
                   help="INPUT/FORWARD on the tc/xdp flavor only for these devices (eth0,ens+),"
                        " nf for the others and OUTPUT")
    p.add_argument("--xdp-mode", help="auto | native | generic")
    p.add_argument("--offload", metavar="IFNAME", help="XDP hardware offload device")
    p.add_argument("--policy", help="reject | xtables: tables the compiler cannot translate")


def _flags(args) -> list:
    out = []
    for name in ("flavor", "flavor_dev", "xdp_mode", "offload", "policy"):
        if getattr(args, name, None) is not None:
            out += ["--" + name.replace("_", "-"), getattr(args, name)]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exec"] and argv[1:2] and (argv[1] == "--" or not argv[1].startswith("-")):
        # `exec [--] CMD`, the per-iptables-command path, without argparse (and json): with
        # no flag there is nothing for argparse to parse, and the door imports only what it uses
        from .door import exec_main
        try:
            return exec_main(argv[1:])
        except BpfilterError as e:
            print(f"bpfilter: {e}", file=sys.stderr)
            return 1
    import argparse
    ap = argparse.ArgumentParser(prog="bpfilter", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("exec", help="run a command with iptables served by bpfilter")
    _add_flags(p)
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_exec)
    p = sub.add_parser("status", help="show programs, chains and counters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("flush", help="remove this netns's bpfilter state")
    p.set_defaults(fn=cmd_flush)
    p = sub.add_parser("helper", help="run the helper")
    p.add_argument("--listen", action="store_true")
    _add_flags(p)
    p.set_defaults(fn=cmd_helper)
    p = sub.add_parser("gc", help="remove the pins and state of network namespaces that are gone")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_gc)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except BpfilterError as e:
        print(f"bpfilter: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["exec"]:
        from .door import leave
        leave(code)
    sys.exit(code)
