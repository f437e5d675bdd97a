"""The door's per-command cost (issue #8): `bpfilter exec` runs once per iptables command, so the
process that runs it imports the standard library only (none of the helper's engine, compiler,
model or codec, no construct/cffi/pyroute2), works without site-packages (`python3 -S`, from the
repo checkout), and consecutive commands reuse the namespace's running helper.  Started by the
launcher (bin/bpfilter, the README's way) it imports no more than the few C modules and the door
modules it uses: not os, socket, signal, ctypes (their Python layers cost a door more than the
rest of its work, door.py "Cost")."""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
LAUNCHER = os.path.join(ROOT, "bin", "bpfilter")

# everything a door started by the launcher may import beyond the interpreter's own start-up
LAUNCHER_DOOR = {"bpfilter_umh", "bpfilter_umh.door", "bpfilter_umh.doorserve",
                 "bpfilter_umh.caller", "bpfilter_umh.errors", "bpfilter_umh.frames",
                 "bpfilter_umh.libc", "bpfilter_umh.xtopts", "_ctypes", "_socket", "_struct",
                 "struct", "errno", "fcntl", "select"}

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
                 [PY, "-S", "-X", "importtime", "-m", "bpfilter_umh.cli", "exec", "true"],
                 [PY, "-S", "-X", "importtime", LAUNCHER, "exec", "--", "true"]):
        mods = _imports(argv, _env_without_pythonpath())   # -S, the checkout only: no site
        assert not mods & HELPER_ONLY, (argv, mods & HELPER_ONLY)
        foreign = {m for m in mods if m.split(".")[0] not in sys.stdlib_module_names
                   and m.split(".")[0] != "bpfilter_umh"}
        assert not foreign, (argv, foreign)


def _startup_modules():
    p = subprocess.run([PY, "-S", "-X", "importtime", "-c", "pass"], capture_output=True,
                       text=True, timeout=60)
    return {ln.rsplit("|", 1)[1].strip() for ln in p.stderr.splitlines() if "|" in ln}


def test_launcher_door_imports_only_what_it_uses():
    """bin/bpfilter exec: the door's modules and a few C extension modules, nothing else (a
    new import here is a cost every iptables command pays: measure it, then widen the set)."""
    for cmd in (["true"], ["sh", "-c", "exit 0"]):
        mods = _imports([PY, "-S", "-X", "importtime", LAUNCHER, "exec", "--", *cmd],
                        _env_without_pythonpath())
        extra = mods - _startup_modules()
        assert extra <= LAUNCHER_DOOR, extra - LAUNCHER_DOOR
        assert not extra & {"os", "socket", "signal", "ctypes", "enum", "warnings"}, extra


def test_launcher_runs_from_anywhere_and_hands_other_commands_to_the_cli(tmp_path):
    """From another directory, through a symlink (a copy in PATH's bin/), without PYTHONPATH:
    exec keeps CMD's output and status; another subcommand runs as `bpfilter` (cli.py) with
    site-packages; exec flags are still checked."""
    link = tmp_path / "bpfilter"
    link.symlink_to(LAUNCHER)
    env = _env_without_pythonpath()
    p = subprocess.run([PY, "-S", str(link), "exec", "--", "sh", "-c", "echo out; exit 3"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert (p.returncode, p.stdout) == (3, "out\n"), p.stderr
    p = subprocess.run([PY, "-S", str(link), "status", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0 and "--json" in p.stdout, p.stderr
    p = subprocess.run([PY, "-S", str(link), "exec", "--flavor", "bogus", "--", "true"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "flavor" in p.stderr, p.stderr


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
    for door in (["-m", "bpfilter_umh"], ["-m", "bpfilter_umh.cli"], [LAUNCHER]):
        p = subprocess.run([PY, "-S", *door, "exec", "--", "sh", "-c",
                            "echo out; echo err >&2; exit 5"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env=_env_without_pythonpath())
        assert (p.returncode, p.stdout, p.stderr) == (5, "out\n", "err\n"), door
        p = subprocess.run([PY, "-S", *door, "exec", "--", "/nonexistent/cmd"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env=_env_without_pythonpath())
        assert p.returncode == 127 and "command not found" in p.stderr, (door, p.stderr)
        # found through PATH as os.execvp would; a file that is not executable is 126
        p = subprocess.run([PY, "-S", *door, "exec", "--", "sh", "-c", "exit 4"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env=dict(_env_without_pythonpath(), PATH="/nonexistent:/usr/bin:/bin"))
        assert p.returncode == 4, (door, p.stderr)
        p = subprocess.run([PY, "-S", *door, "exec", "--", "/etc/passwd"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env=_env_without_pythonpath())
        assert p.returncode == 126 and "Permission denied" in p.stderr, (door, p.stderr)


def _helper_pids(ns):
    return sorted(ns.pids())


def test_lean_door_serves_and_reuses_the_helper(netns, tmp_path):
    """Through `python3 -S -m bpfilter_umh exec` and the launcher `python3 -S bin/bpfilter exec`
    (no site-packages in the door), rules land in bpfilter's table and read back as the
    kernel's xtables (same namespace, no door) shows the same commands; the later commands are
    served by the helper the first one started. BPFILTER_DOOR_TRACE lists the trapped calls."""
    env = dict(netns.env, PYTHONPATH=ROOT, BPFILTER_IDLE_EXIT="30")
    door = [PY, "-S", "-m", "bpfilter_umh", "exec", "--"]
    launcher = [PY, "-S", LAUNCHER, "exec", "--"]
    rules = [["-A", "INPUT", "-s", "192.0.2.7/32", "-p", "udp", "--dport", "53", "-j", "DROP"],
             ["-A", "INPUT", "-s", "198.51.100.0/24", "-j", "ACCEPT"]]
    trace = tmp_path / "trace"
    try:
        netns.run(door + ["iptables-legacy"] + rules[0], env=env)
        first = _helper_pids(netns)
        assert len(first) == 1, first          # the helper, started on demand, still running
        netns.run(launcher + ["iptables-legacy"] + rules[1], env=env)
        assert _helper_pids(netns) == first    # reused, not a second helper
        ours = netns.run(launcher + ["iptables-legacy", "-S"],
                         env=dict(env, BPFILTER_DOOR_TRACE=str(trace))).stdout
        assert _helper_pids(netns) == first
        calls = [ln.split(":")[0].split(" ", 2)[2] for ln in trace.read_text().splitlines()]
        assert calls.count("getsockopt 64") == 1 and calls.count("getsockopt 65") == 1, calls
        assert "openat" in calls and not [c for c in calls if c.startswith("setsockopt")]
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
