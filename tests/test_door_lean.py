"""The door's per-command cost (issue #8): `bpfilter exec` runs once per iptables command, so the
process that runs it imports the standard library only (none of the helper's engine, compiler,
model or codec, no construct/cffi/pyroute2), works without site-packages (`python3 -S`, from the
repo checkout), and consecutive commands reuse the namespace's running helper."""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable

# what a door must never import: the helper's side and everything only it needs
HELPER_ONLY = {"construct", "cffi", "pyroute2", "dataclasses", "argparse", "json", "subprocess",
               "bpfilter_umh.engine", "bpfilter_umh.model", "bpfilter_umh.compile",
               "bpfilter_umh.classify", "bpfilter_umh.kernel", "bpfilter_umh.config",
               "bpfilter_umh.flavors", "bpfilter_umh.extensions", "bpfilter_umh.passthrough"}


def _imports(argv, env=None):
    """Modules the door process imports, from its own -X importtime report."""
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=env if env is not None else dict(os.environ))
    assert p.returncode == 0, p.stderr
    mods = set()
    for ln in p.stderr.splitlines():
        if ln.startswith("import time:") and "|" in ln and "imported package" not in ln:
            mods.add(ln.rsplit("|", 1)[1].strip())
    assert "bpfilter_umh.door" in mods, p.stderr
    return mods


def _env_without_pythonpath():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_plain_exec_imports_stdlib_only():
    # `true` makes no socket option call: the door runs, no helper is involved
    for argv in ([PY, "-S", "-X", "importtime", "-m", "bpfilter_umh", "exec", "--", "true"],
                 [PY, "-S", "-X", "importtime", "-m", "bpfilter_umh.cli", "exec", "--", "true"],
                 [PY, "-S", "-X", "importtime", "-m", "bpfilter_umh.cli", "exec", "true"]):
        mods = _imports(argv, _env_without_pythonpath())   # -S, the checkout only: no site
        assert not mods & HELPER_ONLY, (argv, mods & HELPER_ONLY)
        foreign = {m for m in mods if m.split(".")[0] not in sys.stdlib_module_names
                   and m.split(".")[0] != "bpfilter_umh"}
        assert not foreign, (argv, foreign)


def test_exec_with_site_imports_nothing_of_the_helper():
    # what site itself imports (.pth files of this machine) is not the door's doing
    p = subprocess.run([PY, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                       timeout=60)
    site = {ln.rsplit("|", 1)[1].strip() for ln in p.stderr.splitlines() if "|" in ln}
    mods = _imports([PY, "-X", "importtime", "-m", "bpfilter_umh.cli", "exec", "--", "true"])
    assert not (mods - site) & HELPER_ONLY, (mods - site) & HELPER_ONLY


def test_flags_still_checked():
    """`exec` with flags goes through argparse and config.py as before; a bad value changes
    nothing and says why."""
    for mod in ("bpfilter_umh", "bpfilter_umh.cli"):
        p = subprocess.run([PY, "-S", "-m", mod, "exec", "--flavor", "bogus", "--", "true"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env=_env_without_pythonpath())
        assert p.returncode == 2, (mod, p.returncode, p.stderr)
        assert "flavor" in p.stderr, p.stderr
    p = subprocess.run([PY, "-S", "-m", "bpfilter_umh", "exec"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=_env_without_pythonpath())
    assert p.returncode == 2 and "missing command" in p.stderr, p.stderr


def test_exec_output_and_status_survive_the_fast_exit():
    """The door leaves with os._exit (no interpreter teardown): CMD's output, its exit status
    and the door's own messages must all still arrive."""
    for mod in ("bpfilter_umh", "bpfilter_umh.cli"):
        p = subprocess.run([PY, "-S", "-m", mod, "exec", "--", "sh", "-c",
                            "echo out; echo err >&2; exit 5"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env=_env_without_pythonpath())
        assert (p.returncode, p.stdout, p.stderr) == (5, "out\n", "err\n"), mod
        p = subprocess.run([PY, "-S", "-m", mod, "exec", "--", "/nonexistent/cmd"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env=_env_without_pythonpath())
        assert p.returncode == 127 and "command not found" in p.stderr, (mod, p.stderr)


def _helper_pids(ns):
    return sorted(ns.pids())


def test_lean_door_serves_and_reuses_the_helper(netns):
    """Through `python3 -S -m bpfilter_umh exec` (no site-packages in the door), rules land
    in bpfilter's table and read back as the kernel's xtables (same namespace, no door) shows
    the same commands; the second command is served by the helper the first one started."""
    env = dict(netns.env, PYTHONPATH=ROOT, BPFILTER_IDLE_EXIT="30")
    door = [PY, "-S", "-m", "bpfilter_umh", "exec", "--"]
    rules = [["-A", "INPUT", "-s", "192.0.2.7/32", "-p", "udp", "--dport", "53", "-j", "DROP"],
             ["-A", "INPUT", "-s", "198.51.100.0/24", "-j", "ACCEPT"]]
    try:
        netns.run(door + ["iptables-legacy"] + rules[0], env=env)
        first = _helper_pids(netns)
        assert len(first) == 1, first          # the helper, started on demand, still running
        netns.run(door + ["iptables-legacy"] + rules[1], env=env)
        assert _helper_pids(netns) == first    # reused, not a second helper
        ours = netns.run(door + ["iptables-legacy", "-S"], env=env).stdout
        assert _helper_pids(netns) == first
        for r in rules:
            netns.run(["iptables-legacy"] + r)
        kernel = netns.run(["iptables-legacy", "-S"]).stdout
        assert ours == kernel
        assert "192.0.2.7/32" in ours
    finally:
        netns.run([PY, "-m", "bpfilter_umh.cli", "flush"], check=False, env=env)
        for pid in _helper_pids(netns):     # the helper our door started: by its pid
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 10
        while netns.pids() and time.monotonic() < end:
            time.sleep(0.1)
