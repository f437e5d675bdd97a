"""Attach flavor `nf`: netfilter BPF links at the filter table's priority, with atomic swap.

Per (family, hook) served there is one tiny *dispatcher* program, attached once through a netfilter
BPF link at NF_IP_PRI_FILTER / NF_IP6_PRI_FILTER (0, where iptables' filter table sits):

    r2 = &prog_array; r3 = hooknum; bpf_tail_call(ctx, r2, r3); return NF_ACCEPT

The ruleset program lives in slot `hooknum` of a per-family BPF_MAP_TYPE_PROG_ARRAY. Replacing the
ruleset is one BPF_MAP_UPDATE_ELEM of that slot: the kernel swaps the pointer with xchg()
(kernel/bpf/arraymap.c bpf_fd_array_map_update_elem) and frees the old program after an RCU grace
period, so every packet runs either the old or the new ruleset, never none. Netfilter links cannot
be updated in place (net/netfilter/nf_bpf_link.c bpf_nf_link_update returns EOPNOTSUPP) and a
second BPF link at the same priority is refused with EBUSY, which is why the indirection exists.
`install` fills the slot *before* creating the link, so the dispatcher's fall-through ACCEPT is
only reached if the slot is emptied (detach, or the prog array losing its last user reference).

State lives in bpffs so it outlives the helper process:
    <root>/<netns_cookie>/<ipv4|ipv6>/prog_array        the per-family slots (pinned: a prog array
                                                        is cleared when its last *user* reference
                                                        goes, kernel/bpf/arraymap.c
                                                        prog_array_map_clear; a pin is one)
    <root>/<netns_cookie>/<ipv4|ipv6>/link_<HOOK>       the dispatcher's netfilter link
    <root>/<netns_cookie>/<ipv4|ipv6>/prog_<HOOK>       the ruleset program in the slot (for status)
Netns cookies are never reused within a boot, unlike namespace inode numbers.

API:
  NfAttachment.open(family, hooks=ALL, root=PIN_ROOT, priority=0) -> NfAttachment
      family: "ipv4"/"ipv6", AF_INET/AF_INET6 or NFPROTO_IPV4/6; adopts existing pins.
      Serves the network namespace of the thread calling open(); later calls may come from
      any thread (links are created inside that namespace via setns).
  .swap(hook, prog)          install or atomically replace the program of `hook`
  .program(hook) -> Prog|None  .attached() -> {hook: link info}
  .detach(hook)  .detach_all()   (removes links, slots and pins)   .close() (fds only)
  gc(root=PIN_ROOT) -> [dirs]     removes the pins of namespaces that no longer exist
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import socket
import threading

from . import kernel as K
from .errors import BpfilterError

PIN_ROOT = "/sys/fs/bpf/bpfilter"
NF_IP_PRI_FILTER = 0        # include/uapi/linux/netfilter_ipv4.h (NF_IP6_PRI_FILTER is 0 too)
NF_INET_NUMHOOKS = 5
HOOK_NAMES = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
FAMILY_DIRS = {K.NFPROTO_IPV4: "ipv4", K.NFPROTO_IPV6: "ipv6"}


def nfproto(family) -> int:
    """ipv4/ipv6 names, AF_INET/AF_INET6 or NFPROTO_IPV4/IPV6 -> NFPROTO_*."""
    table = {"ipv4": K.NFPROTO_IPV4, "ipv6": K.NFPROTO_IPV6, socket.AF_INET: K.NFPROTO_IPV4,
             socket.AF_INET6: K.NFPROTO_IPV6, K.NFPROTO_IPV4: K.NFPROTO_IPV4,
             K.NFPROTO_IPV6: K.NFPROTO_IPV6}
    try:
        return table[family]
    except (KeyError, TypeError):
        raise BpfilterError(errno.EAFNOSUPPORT, f"nf flavor serves ipv4 and ipv6, not {family!r}")


def dispatcher_insns(prog_array_fd: int, hooknum: int) -> bytes:
    """tail-call slot `hooknum`; NF_ACCEPT only if the slot is empty."""
    return (K.ld_imm64(2, prog_array_fd, K.BPF_PSEUDO_MAP_FD)
            + K.mov64_imm(3, hooknum)
            + K.call(K.BPF_FUNC_tail_call)        # r1 still holds ctx (struct bpf_nf_ctx *)
            + K.mov64_imm(0, K.NF_ACCEPT)
            + K.exit_())


class NfAttachment:
    def __init__(self, pf: int, directory: str, prog_array: K.Map, hooks, priority: int,
                 netns_fd: int = -1, cookie: int = 0):
        self.pf, self.dir, self.prog_array = pf, directory, prog_array
        self.hooks, self.priority = tuple(hooks), priority
        self.links = {}             # hook -> Link (adopted or created)
        # links attach to the network namespace of the *calling thread* (nf_bpf_link.c uses
        # current->nsproxy->net_ns), so remember ours and enter it whenever a link is made
        self.netns_fd, self.cookie = netns_fd, cookie

    # -- paths --------------------------------------------------------------------------------
    def _link_pin(self, hook):
        return os.path.join(self.dir, f"link_{HOOK_NAMES[hook]}")

    def _prog_pin(self, hook):
        return os.path.join(self.dir, f"prog_{HOOK_NAMES[hook]}")

    @staticmethod
    def directory(pf: int, root: str = PIN_ROOT, cookie: int = None) -> str:
        cookie = K.netns_cookie() if cookie is None else cookie
        return os.path.join(root, str(cookie), FAMILY_DIRS[pf])

    @classmethod
    def open(cls, family, hooks=range(NF_INET_NUMHOOKS), root: str = PIN_ROOT,
             priority: int = NF_IP_PRI_FILTER) -> "NfAttachment":
        pf = nfproto(family)
        hooks = tuple(hooks)
        for h in hooks:
            if h not in range(NF_INET_NUMHOOKS):
                raise BpfilterError(errno.EINVAL, f"no netfilter hook {h}")
        K.features.require("netfilter_link")
        K.features.require("tail_call_netfilter")
        if root.startswith("/sys/fs/bpf"):
            K.ensure_bpffs("/sys/fs/bpf")
        cookie = K.netns_cookie()
        d = cls.directory(pf, root, cookie)
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise BpfilterError(e.errno, f"cannot create pin directory {d}: {e.strerror}")
        pa_pin = os.path.join(d, "prog_array")
        if os.path.exists(pa_pin):
            pa = K.Map.from_pin(pa_pin)
            if pa.map_type != K.BPF_MAP_TYPE_PROG_ARRAY or pa.max_entries < NF_INET_NUMHOOKS:
                pa.close()
                raise BpfilterError(errno.EINVAL, f"{pa_pin} is not a bpfilter prog array")
        else:
            pa = K.Map.create(K.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, NF_INET_NUMHOOKS,
                              f"bpfilter_{FAMILY_DIRS[pf]}")
            try:
                pa.pin(pa_pin)
            except BaseException:
                pa.close()
                raise
        self = cls(pf, d, pa, hooks, priority, -1, cookie)
        try:
            self.netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            for h in hooks:
                if os.path.exists(self._link_pin(h)):
                    self.links[h] = K.Link.from_pin(self._link_pin(h))
        except BaseException:
            self.close()
            raise
        return self

    # -- operations ---------------------------------------------------------------------------
    def _check_hook(self, hook: int):
        if hook not in self.hooks:
            raise BpfilterError(errno.EINVAL, f"hook {hook} is not served by this attachment "
                                f"(serves {[HOOK_NAMES[h] for h in self.hooks]})")

    def swap(self, hook: int, prog: K.Prog):
        """Make `prog` the program of `hook`: atomically replaces the previous one; on the first
        call for a hook, attaches the dispatcher after the slot is filled."""
        self._check_hook(hook)
        if prog.prog_type and prog.prog_type != K.BPF_PROG_TYPE_NETFILTER:
            raise BpfilterError(errno.EINVAL, f"program {prog.name!r} has type {prog.prog_type}, "
                                "the nf flavor needs BPF_PROG_TYPE_NETFILTER")
        first = hook not in self.links
        self.prog_array.update(hook, prog)          # the atomic step
        try:
            self._repin(self._prog_pin(hook), prog)
            if first:
                self._attach_dispatcher(hook)
        except BaseException:
            if first:       # nothing was attached: leave no half-installed hook behind
                self.detach(hook)
            raise

    def _repin(self, path: str, obj):
        """Replace a status pin: pin under a temporary name, then rename over the old one
        (bpffs supports rename: kernel/bpf/inode.c bpf_dir_iops uses simple_rename)."""
        tmp = path + "_new"     # no dots: kernel/bpf/inode.c bpf_lookup refuses them (EPERM)
        K.unpin(tmp)
        obj.pin(tmp)
        try:
            os.replace(tmp, path)
        except OSError as e:
            K.unpin(tmp)
            raise BpfilterError(e.errno, f"cannot rename pin {tmp} to {path}: {e.strerror}")

    def _attach_dispatcher(self, hook: int):
        name = f"bpfilter_{HOOK_NAMES[hook][:6].lower()}"
        with K.Prog.load(K.BPF_PROG_TYPE_NETFILTER, dispatcher_insns(self.prog_array.fd, hook),
                         name=name, expected_attach_type=K.BPF_NETFILTER) as disp:
            try:
                with self._in_netns():
                    link = K.link_create_netfilter(disp, self.pf, hook, self.priority)
            except BpfilterError as e:
                if e.errno == errno.EBUSY:
                    raise BpfilterError(errno.EBUSY, f"{FAMILY_DIRS[self.pf]} {HOOK_NAMES[hook]}: "
                                        f"priority {self.priority} is taken by another "
                                        "netfilter hook in this namespace (the kernel's own "
                                        "iptables filter table, an nft chain or another BPF "
                                        f"link): {e.message}")
                raise
        try:
            link.pin(self._link_pin(hook))
        except BaseException:
            link.detach()
            link.close()
            raise
        self.links[hook] = link

    @contextlib.contextmanager
    def _in_netns(self):
        """Run the block in this attachment's network namespace, whatever thread calls."""
        if K.netns_cookie() == self.cookie:
            yield
            return
        if self.netns_fd < 0:
            raise BpfilterError(errno.EBADF, "attachment is closed")
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            K.setns(self.netns_fd, K.CLONE_NEWNET)
            try:
                if K.netns_cookie() != self.cookie:     # the namespace was replaced under us
                    raise BpfilterError(errno.ESTALE, "network namespace of the attachment changed")
                yield
            finally:
                K.setns(home, K.CLONE_NEWNET)
        finally:
            os.close(home)

    def program(self, hook: int):
        """The ruleset program currently in the slot of `hook`, or None."""
        path = self._prog_pin(hook)
        return K.Prog.from_pin(path) if os.path.exists(path) else None

    def attached(self) -> dict:
        return {h: link.info() for h, link in self.links.items()}

    def detach(self, hook: int):
        """Detach the link first (no packet reaches the dispatcher afterwards), then empty the slot
        and remove the pins."""
        link = self.links.pop(hook, None)
        if link is not None:
            try:
                link.detach()
            finally:
                link.close()
        K.unpin(self._link_pin(hook))
        try:
            self.prog_array.delete(hook)
        except BpfilterError as e:
            if e.errno != errno.ENOENT:
                raise
        K.unpin(self._prog_pin(hook))
        K.unpin(self._prog_pin(hook) + "_new")

    def detach_all(self):
        """Remove every link, slot and pin of this family in this namespace, adopted or not."""
        for h in range(NF_INET_NUMHOOKS):
            if h not in self.links and os.path.exists(self._link_pin(h)):
                self.links[h] = K.Link.from_pin(self._link_pin(h))
            if h in self.links or os.path.exists(self._prog_pin(h)):
                self.detach(h)
        K.unpin(os.path.join(self.dir, "prog_array"))
        self.close()
        for d in (self.dir, os.path.dirname(self.dir)):
            try:
                os.rmdir(d)
            except OSError:
                pass            # not empty: the other family is still installed

    def close(self):
        """Close our fds; the kernel state stays (pinned)."""
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.prog_array.close()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def live_netns_cookies() -> set:
    """Cookies of every network namespace reachable through a task (/proc/*/task/*/ns/net) or a
    bind mount under /run/netns. A namespace kept alive only by an open fd or a socket elsewhere
    is not seen: gc() would treat it as dead."""
    paths = glob.glob("/proc/[0-9]*/task/[0-9]*/ns/net") + glob.glob("/run/netns/*")
    seen, fds = set(), []
    try:
        for p in paths:
            try:
                st = os.stat(p)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                fds.append(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
                seen.add((st.st_dev, st.st_ino))
            except OSError:
                continue        # the task exited meanwhile
        cookies, failed = set(), []

        def visit():            # a throwaway thread: setns changes only this thread
            for fd in fds:
                try:
                    K.setns(fd, K.CLONE_NEWNET)
                    cookies.add(K.netns_cookie())
                except BpfilterError as e:
                    failed.append(e)

        t = threading.Thread(target=visit, name="bpfilter-netns-scan")
        t.start()
        t.join()
        if failed:
            # an unknown cookie might be one of ours: better keep stale pins than cut a live
            # namespace's filtering
            raise BpfilterError(failed[0].errno, f"cannot read the cookie of {len(failed)} "
                                f"network namespace(s): {failed[0].message}")
        return cookies
    finally:
        for fd in fds:
            os.close(fd)


def gc(root: str = PIN_ROOT) -> list:
    """Remove the pinned state (detaching its links) of network namespaces that no longer exist,
    e.g. deleted without `bpfilter flush`. Returns the directories removed."""
    try:
        entries = [e for e in os.listdir(root) if e.isdigit()]
    except FileNotFoundError:
        return []
    live = live_netns_cookies()
    removed = []
    for e in entries:
        if int(e) in live:
            continue
        d = os.path.join(root, e)
        for dirpath, _dirs, files in os.walk(d):
            for f in files:
                if f.startswith("link_"):
                    try:
                        with K.Link.from_pin(os.path.join(dirpath, f)) as link:
                            link.detach()
                    except BpfilterError:
                        pass    # already defunct
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
