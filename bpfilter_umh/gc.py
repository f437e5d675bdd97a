"""Garbage collection of the per-namespace state of network namespaces that no longer exist.

A namespace deleted without `bpfilter flush` (`ip netns del`, a container gone) leaves behind,
under its netns cookie:
    /sys/fs/bpf/bpfilter/<cookie>/    attach.py's pins: prog arrays, ruleset programs, maps, links
                                      (pinned programs and maps stay in kernel memory
                                      until unpinned)
    /run/bpfilter/<cookie>/           engine.py's state (<fam>.table, .counters, .pending, .tmp),
                                      the pid files of the tc/xdp watcher and of the responder,
                                      passthrough's <fam>.delegated, sockopt.state_lock's dir
collect() removes both for every cookie that belongs to no live namespace and returns what it
removed. The pid files are only deleted, never acted on: their processes lived in the namespace,
and a namespace with a process in it is alive, so the pid now names someone else or nobody.

Dead or alive: a netns cookie is never reused within a boot (net/core/net_namespace.c gives
each namespace the next value of a 64-bit counter), so a cookie no live namespace has is dead
for good. A namespace is
live when something can still reach it: a task in it (/proc/*/task/*/ns/net), a bind mount of
it in any mount namespace (nsfs entries of /proc/*/mountinfo, /run/netns included), or an nsfs
fd a process holds (/proc/*/fd). Each is opened and its cookie read with setns in a throwaway
thread. A namespace referenced only by a socket cannot be entered from user space and is
treated as dead. If the cookie of a reachable namespace cannot be read, nothing is removed:
better stale state than a live namespace's filter cut.

The directories are listed BEFORE the live namespaces are scanned, so state created by a
namespace born during the scan is never in the candidate list.

    python3 -m bpfilter_umh.gc [--dry-run] [--json]
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
import threading

from . import kernel as K
from .errors import BpfilterError

PIN_ROOT = "/sys/fs/bpf/bpfilter"
STATE_ROOT = "/run/bpfilter"


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (fs/proc_namespace.c)."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 4 <= len(path) and path[i + 1:i + 4].isdigit():
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _netns_paths() -> list:
    """Paths through which a network namespace can be opened: tasks, nsfs bind mounts of every
    mount namespace, nsfs fds of every process."""
    paths = glob.glob("/proc/[0-9]*/task/[0-9]*/ns/net") + glob.glob("/run/netns/*")
    seen_mntns = set()
    for mi in glob.glob("/proc/[0-9]*/mountinfo"):
        pid = mi.split("/")[2]
        try:
            mntns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            if mntns in seen_mntns:
                continue
            with open(mi) as f:
                lines = f.read().splitlines()
            seen_mntns.add(mntns)
        except OSError:
            continue            # the process exited meanwhile
        for line in lines:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if right.split(" ", 1)[0] == "nsfs" and len(fields) > 4 \
                    and fields[3].startswith("net:"):
                paths.append(f"/proc/{pid}/root{_unescape(fields[4])}")
    # an fd's link text names the path it was opened by (/run/netns/X, even once unmounted),
    # so namespace fds are told by their file system: every namespace inode is on nsfs
    nsfs = os.stat("/proc/self/ns/net").st_dev
    for fd in glob.glob("/proc/[0-9]*/fd/[0-9]*"):
        try:
            if os.stat(fd).st_dev == nsfs:
                paths.append(fd)        # of any namespace type: live_netns_cookies checks
        except OSError:
            continue
    return paths


NS_GET_NSTYPE = 0xB703          # include/uapi/linux/nsfs.h _IO(NSIO, 0x3)


def _is_netns(fd: int) -> bool:
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == K.CLONE_NEWNET
    except OSError:
        return False


def live_netns_cookies() -> set:
    """The cookies of every network namespace something can still reach (see the docstring).
    Raises BpfilterError when a reachable namespace's cookie cannot be read."""
    seen, fds = set(), []
    try:
        for p in _netns_paths():
            try:
                st = os.stat(p)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                seen.add((st.st_dev, st.st_ino))
                if not _is_netns(fd):
                    os.close(fd)        # a mount, pid, user... namespace fd
                    continue
                fds.append(fd)
            except OSError:
                continue        # gone meanwhile, or not a namespace (a bind mount replaced)
        cookies, failed = set(), []

        def visit():            # a throwaway thread: setns changes only this thread
            for fd in fds:
                try:
                    K.setns(fd, K.CLONE_NEWNET)
                    cookies.add(K.netns_cookie())
                except BpfilterError as e:
                    failed.append(e)

        t = threading.Thread(target=visit, name="bpfilter-gc-scan")
        t.start()
        t.join()
        if failed:
            raise BpfilterError(failed[0].errno, f"cannot read the cookie of {len(failed)} "
                                f"network namespace(s), nothing removed: {failed[0].message}")
        return cookies
    finally:
        for fd in fds:
            os.close(fd)


def _cookie_dirs(root: str) -> dict:
    """{cookie: path} of the per-namespace directories under root."""
    try:
        return {int(e): os.path.join(root, e) for e in os.listdir(root) if e.isdigit()}
    except FileNotFoundError:
        return {}


def cookie_dirs(pin_root: str = PIN_ROOT, state_root: str = STATE_ROOT) -> set:
    """Every per-namespace directory (pins and state), live or dead."""
    return set(_cookie_dirs(pin_root).values()) | set(_cookie_dirs(state_root).values())


def _remove_pins(d: str):
    """Detach the links pinned under d first (a pinned link of a namespace that is gone may still
    hold its program), then drop every pin: the kernel frees what nothing else references."""
    for dirpath, _dirs, files in os.walk(d):
        for f in files:
            if f.startswith("link_"):
                try:
                    with K.Link.from_pin(os.path.join(dirpath, f)) as link:
                        link.detach()
                except BpfilterError:
                    pass        # defunct already
    shutil.rmtree(d, ignore_errors=True)


def collect(pin_root: str = PIN_ROOT, state_root: str = STATE_ROOT, dry_run: bool = False,
            only=None) -> list:
    """Remove the pins and state directories of namespaces that no longer exist; returns the
    directories removed (or that would be, with dry_run), pins first. `only`: consider just
    these cookies (tests on a shared machine leave other runs' leftovers to their owners)."""
    candidates = [(c, d, "pins") for c, d in _cookie_dirs(pin_root).items()] + \
                 [(c, d, "state") for c, d in _cookie_dirs(state_root).items()]
    if only is not None:
        candidates = [x for x in candidates if x[0] in set(only)]
    if not candidates:
        return []
    live = live_netns_cookies()
    here = K.netns_cookie()
    if here not in live:
        # the scan must at least see the caller's own namespace; if not, it saw nothing useful
        raise BpfilterError(errno.EIO, "the namespace scan missed this process's own network "
                                       "namespace: nothing removed")
    removed = []
    for cookie, d, kind in candidates:
        if cookie in live:
            continue
        if not dry_run:
            if kind == "pins":
                _remove_pins(d)
            else:
                shutil.rmtree(d, ignore_errors=True)
            if os.path.exists(d):
                continue        # could not remove: not reported as removed
        removed.append(d)
    return removed


def main(argv=None) -> int:
    import argparse
    import json
    import sys
    ap = argparse.ArgumentParser(prog="python3 -m bpfilter_umh.gc",
                                 description="remove the bpfilter pins and state of network "
                                             "namespaces that no longer exist")
    ap.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from .sockopt import use_host_bpffs
    use_host_bpffs()            # `ip netns exec` hides the host's /sys/fs/bpf
    try:
        removed = collect(dry_run=args.dry_run)
    except BpfilterError as e:
        print(f"bpfilter gc: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(removed))
    else:
        for d in removed:
            print(("would remove " if args.dry_run else "removed ") + d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
