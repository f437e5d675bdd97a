"""Starting a helper for the door (door.py): the shared helper of a network namespace, on
demand, or a door's private one when it is given flags.  A module of its own because the door
imports it only when it must start a helper, not on every iptables command's path (os and
subprocess behind it cost a door several ms).
"""
import _socket
import os
import subprocess
import sys


def helper_argv():
    return [sys.executable, "-m", "bpfilter_umh", "--listen"]


def _log_path() -> str:
    d = "/run/bpfilter"
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)          # the helper's state and log are root-only (issue #9)
    return os.path.join(d, "helper.log")


def spawn_helper():
    """Start a detached helper in this netns; it binds the abstract socket or exits if another
    helper already did (two doors racing both spawn, one wins)."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(os.open(_log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        os.fchmod(log.fileno(), 0o600)      # also a log an older version created 0644
        subprocess.Popen(helper_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=log, env=env, start_new_session=True, close_fds=True)


def spawn_private_helper(flags) -> tuple:
    """A helper serving only this door, with `flags` over the config file: its stdin and
    stdout are one end of a socketpair. Returns (our end, the process)."""
    # close-on-exec both (_socket creates sockets non-inheritable): Popen dup2()s `theirs` onto
    # the helper's stdin and stdout, which clears the flag there only
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        with open(os.open(_log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                  "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "bpfilter_umh", "--door", *flags],
                                    stdin=theirs, stdout=theirs, stderr=log, env=env,
                                    start_new_session=True, close_fds=True)
    finally:
        theirs.close()
    return ours, proc
