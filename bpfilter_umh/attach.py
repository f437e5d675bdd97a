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
  (gc.py removes the pins and state of namespaces that no longer exist)
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import struct

from . import daemons
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


def _empty_slot(prog_array, hook: int, prog_pin: str):
    """Empty `hook`'s prog-array slot (already empty is fine) and remove the pins of the program
    that was in it, including a half-made "_new" pin of an interrupted swap."""
    try:
        prog_array.delete(hook)
    except BpfilterError as e:
        if e.errno != errno.ENOENT:
            raise
    K.unpin(prog_pin)
    K.unpin(prog_pin + "_new")


class NfAttachment:
    def __init__(self, pf: int, directory: str, prog_array: K.Map, hooks, priority: int,
                 netns_fd: int = -1, cookie: int = 0):
        self.pf, self.dir, self.prog_array = pf, directory, prog_array
        self.hooks, self.priority = tuple(hooks), priority
        self.links = {}             # hook -> Link (adopted or created)
        self._dispatchers = {}      # hook -> the dispatcher Prog prepare() loaded, not attached
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
            os.makedirs(d, mode=0o700, exist_ok=True)   # pins are root-only
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

    def prepare(self, hook: int):
        """The part of swap() that needs no ruleset program, done ahead: a hook not attached
        yet gets its dispatcher loaded now (0.15-0.3 ms each, which a first install spends
        while the worker thread still fills its classifier maps), attached by swap()."""
        self._check_hook(hook)
        if hook not in self.links and hook not in self._dispatchers:
            self._dispatchers[hook] = self._load_dispatcher(hook)

    def _load_dispatcher(self, hook: int) -> K.Prog:
        name = f"bpfilter_{HOOK_NAMES[hook][:6].lower()}"
        return K.Prog.load(K.BPF_PROG_TYPE_NETFILTER, dispatcher_insns(self.prog_array.fd, hook),
                           name=name, expected_attach_type=K.BPF_NETFILTER)

    def _attach_dispatcher(self, hook: int):
        with self._dispatchers.pop(hook, None) or self._load_dispatcher(hook) as disp:
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
        _empty_slot(self.prog_array, hook, self._prog_pin(hook))

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
        for disp in self._dispatchers.values():     # prepared, never attached
            disp.close()
        self._dispatchers.clear()
        self.prog_array.close()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ================================================================================================
# Flavors `tc` and `xdp`: a fixed dispatcher per interface, the rulesets in a prog array.
#
# Per netns and family there is one directory <root>/<cookie>/<family>-<flavor>/ holding
#     prog_array        slots NF_INET_LOCAL_IN / FORWARD / LOCAL_OUT: the chain programs
#     ifnames           BPF_MAP_TYPE_HASH u32 ifindex -> char[16]: what -i/-o compare against
#                       (tc/xdp programs cannot read dev->name; attach keeps this map current)
#     served            BPF_MAP_TYPE_HASH u32 ifindex -> u32 1: the devices whose received
#                       packets this flavor filters (every device, or those matching the
#                       per-interface patterns in /run/bpfilter/<cookie>/<family>-<flavor>.devices);
#                       the restricted ingress dispatcher passes the others, and the nf program
#                       of a chain restricted to devices passes these (docs/flavors.md
#                       "Per-interface flavors")
#     disp_ingress      the ingress dispatcher (tc and xdp), disp_egress (tc only);
#     disp_ingress_dev  the ingress dispatcher of a flavor restricted to devices
#     link_<ifindex>_<ingress|egress>   tc: one BPF link per interface and direction
#     prog_<HOOK>       the chain program in the slot (for status)
# xdp's links are per netns, shared by both families (a device runs one XDP program):
# <root>/<cookie>/xdp/ families (prog array: slot 0 IPv4, 1 IPv6 ingress dispatcher), disp_xdp
# (tail-calls by EtherType), link_<ifindex>_xdp.
# The dispatcher never changes, so replacing a ruleset is again one prog-array update per hook
# (atomic: kernel/bpf/arraymap.c bpf_fd_array_map_update_elem xchg()); the per-interface links
# are created once (tcx: kernel/bpf/tcx.c tcx_link_attach, XDP: net/core/dev.c bpf_xdp_link_attach).
#
# Ingress dispatcher: (restricted to devices) input device not in `served` -> pass (nf serves it);
# not IPv4 -> pass; (tc) pkt_type OTHERHOST -> pass (ip_rcv_core drops it);
# multicast or limited broadcast destination -> INPUT; otherwise bpf_fib_lookup as an input lookup
# from this device (net/core/filter.c bpf_ipv4_fib_lookup): NOT_FWDED (local, broadcast) -> INPUT,
# SUCCESS/NO_NEIGH -> FORWARD, FWD_DISABLED (forwarding off: nothing is forwarded) -> INPUT,
# anything else (unreachable, blackhole...) -> pass: the kernel drops it before any filter hook.
# IPv6 (_dispatch_ingress6): the same with EtherType 0x86DD and an AF_INET6 lookup.
# Egress dispatcher (tc): not this family's EtherType -> pass; skb->skb_iif != 0 (received, i.e.
# forwarded) -> pass; else OUTPUT. An empty slot makes bpf_tail_call fall through to pass.
# ================================================================================================

from . import ebpf as E  # noqa: E402
from . import flavors as F  # noqa: E402

L2_FLAVORS = ("tc", "xdp")
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE, XDP_FLAGS_HW_MODE = 2, 4, 8
IFNAMSIZ = 16
IFNAMES_MAX = 4096
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
_D_BUF, _D_FIB = -50, -112       # dispatcher stack: 34-byte frame head (IP header 4-aligned: the
                                 # verifier demands aligned stack access), struct bpf_fib_lookup
_D_BUF6, _D_FIB6 = -70, -136     # IPv6: 54-byte frame head (IPv6 header at -56, 8-aligned for the
                                 # 8-byte address copies), struct bpf_fib_lookup


_D_IFINDEX = -8                  # dispatcher stack: the served-map key (both families)
SERVED_MAP = "served"


def _served_check(tc: bool) -> list:
    """Pass a packet received on a device this flavor does not serve (map "served" keyed by the
    input ifindex: the one _fib_then_tail_call uses); r6 holds ctx."""
    R0, R1, R2, R6, FP = E.R0, E.R1, E.R2, E.R6, E.FP
    return [E.ldx(E.W, R1, R6, F.SKB_IFINDEX if tc else F.XDP_INGRESS_IFINDEX, "in ifindex"),
            E.stx(E.W, FP, _D_IFINDEX, R1),
            E.ld_map_fd(R1, SERVED_MAP), E.mov(R2, FP), E.alu(E.ADD, R2, _D_IFINDEX),
            E.call(F.BPF_FUNC_map_lookup_elem),
            E.jmp(E.JEQ, R0, 0, "pass", comment="a device nf serves for this flavor's chains")]


def _dispatch_ingress(flavor: str, pf: int = K.NFPROTO_IPV4, restricted: bool = False) -> list:
    """The ingress dispatcher (see above) as ebpf items; the prog array is map "prog_array";
    `restricted`: only for the devices in map "served"."""
    if pf == K.NFPROTO_IPV6:
        return _dispatch_ingress6(flavor, restricted)
    tc = flavor == "tc"
    helper = F.BPF_FUNC_skb_load_bytes if tc else F.BPF_FUNC_xdp_load_bytes
    pas = F.TCX_NEXT if tc else F.XDP_PASS
    R0, R1, R2, R3, R4, R6, FP = E.R0, E.R1, E.R2, E.R3, E.R4, E.R6, E.FP
    items = [E.mov(R6, R1, comment="r6 = ctx")] + (_served_check(tc) if restricted else [])
    if tc:
        items += [E.ldx(E.W, R1, R6, F.SKB_PKT_TYPE, "skb->pkt_type"),
                  E.jmp(E.JEQ, R1, F.PACKET_OTHERHOST, "pass", comment="not for this host")]
    # Ethernet header + IPv4 header head (bytes 0..33)
    items += [E.mov(R1, R6), E.mov(R2, 0), E.mov(R3, FP), E.alu(E.ADD, R3, _D_BUF),
              E.mov(R4, 34), E.call(helper),
              E.jmp(E.JNE, R0, 0, "pass", comment="shorter than Ethernet + IPv4 header"),
              E.ldx(E.H, R1, FP, _D_BUF + 12, "h_proto"), E.be16(R1),
              E.jmp(E.JNE, R1, ETH_P_IP, "pass", comment="not IPv4: another family's business"),
              E.ldx(E.B, R1, FP, _D_BUF + 30, "daddr[0]"), E.alu(E.AND, R1, 0xf0),
              E.jmp(E.JEQ, R1, 0xe0, "input", comment="multicast: local delivery or nothing"),
              E.ldx(E.W, R1, FP, _D_BUF + 30, "daddr"),
              E.jmp(E.JEQ, R1, -1, "input", bits=32, comment="limited broadcast")]
    # A source address of this namespace arriving from outside is a martian: ip_route_input_slow
    # -> fib_validate_source (inet_lookup_ifaddr_rcu) drops it before any filter hook, so the
    # chains must not see (or count) it. Loopback (ifindex 1 in every netns) carries the host's
    # own packets, which keep their output route and are never validated.
    items += [E.ldx(E.W, R1, R6, F.SKB_IFINDEX if tc else F.XDP_INGRESS_IFINDEX, "in ifindex"),
              E.jmp(E.JEQ, R1, 1, "classify", comment="loopback: no source validation")]
    items += [E.st(E.DW, FP, _D_FIB + o, 0) for o in range(0, 64, 8)]
    items += [E.st(E.B, FP, _D_FIB, 2, "params.family = AF_INET"),
              E.stx(E.W, FP, _D_FIB + 8, R1),
              E.ldx(E.W, R1, FP, _D_BUF + 26), E.stx(E.W, FP, _D_FIB + 32, R1, "dst = saddr"),
              E.mov(R1, R6), E.mov(R2, FP), E.alu(E.ADD, R2, _D_FIB), E.mov(R3, 64),
              E.mov(R4, 0), E.call(F.BPF_FUNC_fib_lookup),
              E.jmp(E.JEQ, R0, F.BPF_FIB_LKUP_RET_NOT_FWDED, "pass",
                    comment="source is local (or broadcast): a martian, the kernel drops it"),
              E.Label("classify")]
    items += [E.st(E.DW, FP, _D_FIB + o, 0) for o in range(0, 64, 8)]
    items += [E.st(E.B, FP, _D_FIB, 2, "params.family = AF_INET"),
              E.ldx(E.B, R1, FP, _D_BUF + 23), E.stx(E.B, FP, _D_FIB + 1, R1, "l4_protocol"),
              E.ldx(E.B, R1, FP, _D_BUF + 15), E.stx(E.B, FP, _D_FIB + 12, R1, "tos"),
              E.ldx(E.W, R1, FP, _D_BUF + 26), E.stx(E.W, FP, _D_FIB + 16, R1, "ipv4_src"),
              E.ldx(E.W, R1, FP, _D_BUF + 30), E.stx(E.W, FP, _D_FIB + 32, R1, "ipv4_dst")]
    return items + _fib_then_tail_call(tc, _D_FIB, pas)


def _fib_then_tail_call(tc: bool, fib: int, pas: int) -> list:
    """The end of both ingress dispatchers: the input ifindex into the bpf_fib_lookup params at
    fib (the rest filled by the caller), the lookup, and the tail call into the INPUT or FORWARD
    slot its answer names. NOT_FWDED (local destination) and FWD_DISABLED (the device does not
    forward) are INPUT; SUCCESS/NO_NEIGH, and UNSUPP_LWT (a route with a lightweight-tunnel
    encap, which the kernel forwards), are FORWARD; anything else passes unfiltered, as the
    kernel drops it before any filter hook."""
    R0, R1, R2, R3, R4, R6, FP = E.R0, E.R1, E.R2, E.R3, E.R4, E.R6, E.FP
    items = [E.ldx(E.W, R1, R6, F.SKB_IFINDEX if tc else F.XDP_INGRESS_IFINDEX, "in ifindex"),
             E.stx(E.W, FP, fib + 8, R1),
             E.mov(R1, R6), E.mov(R2, FP), E.alu(E.ADD, R2, fib), E.mov(R3, 64),
             E.mov(R4, 0), E.call(F.BPF_FUNC_fib_lookup),
             E.jmp(E.JEQ, R0, F.BPF_FIB_LKUP_RET_NOT_FWDED, "input"),
             E.jmp(E.JEQ, R0, F.BPF_FIB_LKUP_RET_FWD_DISABLED, "input"),
             E.jmp(E.JEQ, R0, F.BPF_FIB_LKUP_RET_SUCCESS, "forward"),
             E.jmp(E.JEQ, R0, F.BPF_FIB_LKUP_RET_NO_NEIGH, "forward"),
             E.jmp(E.JEQ, R0, F.BPF_FIB_LKUP_RET_UNSUPP_LWT, "forward"),
             E.ja("pass")]
    for label, hook in (("input", F.NF_INET_LOCAL_IN), ("forward", F.NF_INET_FORWARD)):
        items += [E.Label(label), E.mov(R1, R6), E.ld_map_fd(R2, "prog_array"), E.mov(R3, hook),
                  E.call(F.BPF_FUNC_tail_call), E.ja("pass")]
    return items + [E.Label("pass"), E.mov(R0, pas), E.exit_()]


def _dispatch_ingress6(flavor: str, restricted: bool = False) -> list:
    """The IPv6 ingress dispatcher. ip6_rcv_core drops multicast sources before any hook;
    bpf_ipv6_fib_lookup (net/core/filter.c) answers NOT_FWDED for local destinations and for
    link-local/multicast addresses (rt6_need_strict: never forwarded), FWD_DISABLED when the
    input device does not forward, SUCCESS/NO_NEIGH for a forwarding route. IPv6 has no
    fib_validate_source, so a local source arriving from outside is not a martian here."""
    tc = flavor == "tc"
    helper = F.BPF_FUNC_skb_load_bytes if tc else F.BPF_FUNC_xdp_load_bytes
    pas = F.TCX_NEXT if tc else F.XDP_PASS
    R0, R1, R2, R3, R4, R6, FP = E.R0, E.R1, E.R2, E.R3, E.R4, E.R6, E.FP
    ip = _D_BUF6 + F.ETH_HLEN          # the IPv6 header in the stack, 8-aligned
    items = [E.mov(R6, R1, comment="r6 = ctx")] + (_served_check(tc) if restricted else [])
    if tc:
        items += [E.ldx(E.W, R1, R6, F.SKB_PKT_TYPE, "skb->pkt_type"),
                  E.jmp(E.JEQ, R1, F.PACKET_OTHERHOST, "pass", comment="not for this host")]
    items += [E.mov(R1, R6), E.mov(R2, 0), E.mov(R3, FP), E.alu(E.ADD, R3, _D_BUF6),
              E.mov(R4, F.ETH_HLEN + 40), E.call(helper),
              E.jmp(E.JNE, R0, 0, "pass", comment="shorter than Ethernet + IPv6 header"),
              E.ldx(E.H, R1, FP, _D_BUF6 + 12, "h_proto"), E.be16(R1),
              E.jmp(E.JNE, R1, ETH_P_IPV6, "pass", comment="not IPv6: another family's business"),
              E.ldx(E.B, R1, FP, ip + 8, "saddr[0]"),
              E.jmp(E.JEQ, R1, 0xff, "pass", comment="multicast source: ip6_rcv_core drops it"),
              E.ldx(E.B, R1, FP, ip + 24, "daddr[0]"),
              E.jmp(E.JEQ, R1, 0xff, "input", comment="multicast: local delivery or nothing")]
    items += [E.st(E.DW, FP, _D_FIB6 + o, 0) for o in range(0, 64, 8)]
    items += [E.st(E.B, FP, _D_FIB6, socket.AF_INET6, "params.family = AF_INET6"),
              E.ldx(E.B, R1, FP, ip + 6), E.stx(E.B, FP, _D_FIB6 + 1, R1, "l4_protocol (nexthdr)")]
    for src, dst in ((ip + 8, _D_FIB6 + 16), (ip + 24, _D_FIB6 + 32)):
        items += [E.ldx(E.DW, R1, FP, src), E.stx(E.DW, FP, dst, R1),
                  E.ldx(E.DW, R1, FP, src + 8), E.stx(E.DW, FP, dst + 8, R1)]
    return items + _fib_then_tail_call(tc, _D_FIB6, pas)


def _dispatch_egress(pf: int = K.NFPROTO_IPV4) -> list:
    R0, R1, R2, R3, R6 = E.R0, E.R1, E.R2, E.R3, E.R6
    proto = ETH_P_IPV6 if pf == K.NFPROTO_IPV6 else ETH_P_IP
    return [E.mov(R6, R1),
            E.ldx(E.W, R1, R6, F.SKB_PROTOCOL, "skb->protocol"), E.be16(R1),
            E.jmp(E.JNE, R1, proto, "pass", comment="another family's packet"),
            E.ldx(E.W, R1, R6, F.SKB_INGRESS_IFINDEX, "skb->skb_iif"),
            E.jmp(E.JNE, R1, 0, "pass", comment="received here: forwarded, not locally generated"),
            E.mov(R1, R6), E.ld_map_fd(R2, "prog_array"), E.mov(R3, F.NF_INET_LOCAL_OUT),
            E.call(F.BPF_FUNC_tail_call),
            E.Label("pass"), E.mov(R0, F.TCX_NEXT), E.exit_()]


XDP_ROOT_DIR = "xdp"                 # <root>/<cookie>/xdp: families, disp_xdp, link_<ifindex>_xdp
XDP_FAMILY_SLOT = {K.NFPROTO_IPV4: 0, K.NFPROTO_IPV6: 1}


def _xdp_root_insns() -> list:
    """The XDP program on every device: tail-call the family's ingress dispatcher by EtherType
    (map "families", slot 0 IPv4, 1 IPv6); an empty slot or another EtherType passes."""
    R0, R1, R2, R3, R4, R6, FP = E.R0, E.R1, E.R2, E.R3, E.R4, E.R6, E.FP
    items = [E.mov(R6, R1, comment="r6 = ctx"),
             E.mov(R1, R6), E.mov(R2, 12), E.mov(R3, FP), E.alu(E.ADD, R3, -8),
             E.mov(R4, 2), E.call(F.BPF_FUNC_xdp_load_bytes),
             E.jmp(E.JNE, R0, 0, "pass", comment="no EtherType"),
             E.ldx(E.H, R1, FP, -8, "h_proto"), E.be16(R1),
             E.mov(R3, XDP_FAMILY_SLOT[K.NFPROTO_IPV4]),
             E.jmp(E.JEQ, R1, ETH_P_IP, "family"),
             E.mov(R3, XDP_FAMILY_SLOT[K.NFPROTO_IPV6]),
             E.jmp(E.JEQ, R1, ETH_P_IPV6, "family"),
             E.ja("pass"),
             E.Label("family"), E.mov(R1, R6), E.ld_map_fd(R2, "families"),
             E.call(F.BPF_FUNC_tail_call),
             E.Label("pass"), E.mov(R0, F.XDP_PASS), E.exit_()]
    return items


BPF_LINK_UPDATE = 29


def _link_update(link, prog):
    """BPF_LINK_UPDATE: the link runs `prog` from now on (union bpf_attr link_update: link_fd,
    new_prog_fd, flags, old_prog_fd)."""
    attr = K._ffi.new("char[]", 16)
    struct.pack_into("<IIII", K._ffi.buffer(attr), 0, link.fd, prog.fd, 0, 0)
    ret = K._bpf(BPF_LINK_UPDATE, attr, 16)
    if ret < 0:
        raise BpfilterError(-ret, f"BPF_LINK_UPDATE of a dispatcher link: {os.strerror(-ret)}")


def _xdp_families(cookie_dir: str) -> K.Map:
    """The shared XDP root's prog array (created and pinned on first use)."""
    d = os.path.join(cookie_dir, XDP_ROOT_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    pin = os.path.join(d, "families")
    if os.path.exists(pin):
        return K.Map.from_pin(pin)
    m = K.Map.create(K.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, len(XDP_FAMILY_SLOT), "bpfilter_xdpfam")
    try:
        m.pin(pin)
    except BaseException:
        m.close()
        raise
    return m


def interfaces() -> dict:
    """{ifindex: name} of the calling thread's network namespace."""
    return {i: n for i, n in socket.if_nameindex()}


class L2Attachment:
    """tc or xdp attachment of one family in one netns. Same API as NfAttachment (swap, program,
    attached, detach, detach_all, close) plus sync() (attach to new interfaces, refresh names)."""

    def __init__(self, flavor: str, directory: str, prog_array, ifnames, cookie: int,
                 xdp_mode: str = "auto", pf: int = K.NFPROTO_IPV4, served=None):
        self.flavor, self.dir, self.prog_array, self.ifnames = flavor, directory, prog_array, ifnames
        self.served = served        # ifindex -> 1: the devices this flavor filters (sync())
        self.cookie, self.xdp_mode, self.pf = cookie, xdp_mode, pf
        self.families = None        # xdp: the shared root's prog array, one slot per family
        # tcx keeps a list of programs per device and direction, so each family attaches its own
        # dispatchers; a device runs one XDP program (net/core/dev.c dev_xdp_attach: EBUSY for a
        # second link), so the XDP links belong to the namespace's shared root (_xdp_root_insns)
        self.link_dir = directory if flavor == "tc" else \
            os.path.join(os.path.dirname(directory), XDP_ROOT_DIR)
        self.hooks = F.get(flavor).hooks

    @staticmethod
    def directory(flavor: str, family="ipv4", root: str = PIN_ROOT, cookie: int = None) -> str:
        cookie = K.netns_cookie() if cookie is None else cookie
        return os.path.join(root, str(cookie), f"{FAMILY_DIRS[nfproto(family)]}-{flavor}")

    @classmethod
    def open(cls, flavor: str, family="ipv4", root: str = PIN_ROOT,
             xdp_mode: str = "auto", create: bool = True) -> "L2Attachment":
        if flavor not in L2_FLAVORS:
            raise BpfilterError(errno.EINVAL, f"L2Attachment serves tc and xdp, not {flavor!r}")
        pf = nfproto(family)
        K.features.require("tcx" if flavor == "tc" else "xdp")
        if root.startswith("/sys/fs/bpf"):
            K.ensure_bpffs("/sys/fs/bpf")
        d = cls.directory(flavor, family, root)
        if not create and not os.path.isdir(d):
            # the watcher must never resurrect an attachment flush() just removed
            raise BpfilterError(errno.ENOENT, f"no {flavor} attachment in this namespace")
        os.makedirs(d, mode=0o700, exist_ok=True)   # pins are root-only
        pa = ifn = fam = srv = None
        try:
            if flavor == "xdp":
                fam = _xdp_families(os.path.dirname(d))
            srv_pin = os.path.join(d, SERVED_MAP)
            if os.path.exists(srv_pin):
                srv = K.Map.from_pin(srv_pin)
            else:
                srv = K.Map.create(K.BPF_MAP_TYPE_HASH, 4, 4, IFNAMES_MAX, "bpfilter_served")
                srv.pin(srv_pin)
            pa_pin, ifn_pin = os.path.join(d, "prog_array"), os.path.join(d, "ifnames")
            if os.path.exists(pa_pin):
                pa = K.Map.from_pin(pa_pin)
            else:
                pa = K.Map.create(K.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, NF_INET_NUMHOOKS,
                                  f"bpfilter_{flavor}")
                pa.pin(pa_pin)
            if os.path.exists(ifn_pin):
                ifn = K.Map.from_pin(ifn_pin)
            else:
                ifn = K.Map.create(K.BPF_MAP_TYPE_HASH, 4, IFNAMSIZ, IFNAMES_MAX, "bpfilter_ifn")
                ifn.pin(ifn_pin)
        except BaseException:
            for m in (pa, ifn, fam, srv):
                if m is not None:
                    m.close()
            raise
        self = cls(flavor, d, pa, ifn, K.netns_cookie(), xdp_mode, pf, srv)
        self.families = fam
        return self

    # -- dispatchers and links --------------------------------------------------------------
    def _dispatcher(self, direction: str) -> K.Prog:
        """disp_ingress / disp_egress of this family; disp_ingress_dev: the ingress dispatcher
        of a flavor restricted to devices (it looks the input device up in `served` first:
        ~25 ns per packet, so only then); "xdp": the namespace's shared XDP root."""
        where = self.link_dir if direction == "xdp" else self.dir
        pin = os.path.join(where, f"disp_{direction}")
        if os.path.exists(pin):
            return K.Prog.from_pin(pin)
        if direction == "xdp":
            code = E.assemble(E.prune(_xdp_root_insns()), {"families": self.families.fd})
        else:
            items = _dispatch_egress(self.pf) if direction == "egress" else \
                _dispatch_ingress(self.flavor, self.pf, direction == "ingress_dev")
            code = E.assemble(E.prune(items), {"prog_array": self.prog_array.fd,
                                               SERVED_MAP: self.served.fd})
        fl = F.get(self.flavor)
        p = K.Prog.load(fl.prog_type, code, name=f"bpfilter_{self.flavor}_{direction[:3]}",
                        expected_attach_type=fl.expected_attach_type)
        try:
            p.pin(pin)
        except BaseException:
            p.close()
            raise
        return p

    def _directions(self):
        return (("ingress", K.BPF_TCX_INGRESS), ("egress", K.BPF_TCX_EGRESS)) \
            if self.flavor == "tc" else (("xdp", K.BPF_XDP),)

    def _link_pin(self, ifindex: int, direction: str) -> str:
        return os.path.join(self.link_dir, f"link_{ifindex}_{direction}")

    def _attach_one(self, ifindex: int, direction: str, attach_type: int, disp) -> str:
        """Attach the dispatcher; for XDP native mode first, generic (skb) mode as fallback."""
        if self.flavor == "tc":
            modes = [("tcx", 0)]
        else:
            modes = {"auto": [("native", XDP_FLAGS_DRV_MODE), ("generic", XDP_FLAGS_SKB_MODE)],
                     "native": [("native", XDP_FLAGS_DRV_MODE)],
                     "generic": [("generic", XDP_FLAGS_SKB_MODE)]}[self.xdp_mode]
        err = None
        for mode, flags in modes:
            try:
                link = K.link_create_ifindex(disp, ifindex, attach_type, flags)
            except BpfilterError as e:
                if e.errno == errno.EBUSY and os.path.exists(self._link_pin(ifindex, direction)):
                    return "attached by the other family's watcher"      # the shared XDP root
                err = e
                continue
            try:
                link.pin(self._link_pin(ifindex, direction))
            except BaseException:
                link.detach()
                raise
            finally:
                link.close()
            return mode
        raise BpfilterError(err.errno, f"{self.flavor}: cannot attach to interface "
                                       f"{ifindex}: {err.message}")

    # -- per-interface flavors: which devices this flavor serves -------------------------------
    def _devices_path(self) -> str:
        return os.path.join(WATCH_ROOT, str(self.cookie),
                            f"{FAMILY_DIRS[self.pf]}-{self.flavor}.devices")

    def devices(self):
        """The interface patterns this flavor is restricted to, None for every device."""
        try:
            with open(self._devices_path()) as f:
                return tuple(f.read().split())
        except FileNotFoundError:
            return None

    def set_devices(self, patterns):
        """Restrict this flavor to interfaces matching `patterns` (iptables -i syntax), or
        serve every device (None). Takes effect at the next sync() (swap() runs one); the
        watcher reads it on every link message."""
        path = self._devices_path()
        if patterns is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(patterns) + "\n")
        os.replace(tmp, path)

    def _link_used_elsewhere(self, ifindex: int) -> bool:
        """xdp: does the other family serve this device through the shared root's link?"""
        other = [p for p in XDP_FAMILY_SLOT if p != self.pf][0]
        pin = os.path.join(os.path.dirname(self.dir), f"{FAMILY_DIRS[other]}-{self.flavor}",
                           SERVED_MAP)
        if not os.path.exists(pin):
            return False
        with K.Map.from_pin(pin) as m:
            return m.lookup(ifindex) is not None

    def sync(self) -> dict:
        """Make every interface this flavor serves (all, or those matching set_devices'
        patterns) filtered and every name known to -i/-o rules: new or newly matching
        interfaces get the dispatcher and enter `served`, renamed ones a new name, gone or no
        longer matching ones leave `served` and lose their links. Returns {ifindex: mode} for
        the interfaces attached by this call."""
        from .config import device_matches
        if K.netns_cookie() != self.cookie:
            raise BpfilterError(errno.ESTALE, "sync() must run in the attachment's namespace")
        now = interfaces()
        patterns = self.devices()
        want = {i for i, n in now.items() if patterns is None or device_matches(n, patterns)}
        for i, name in now.items():
            self.ifnames.update(i, name.encode()[:IFNAMSIZ - 1].ljust(IFNAMSIZ, b"\0"))
        for k in list(self.ifnames.keys()):
            i = int.from_bytes(k, "little") if isinstance(k, (bytes, bytearray)) else int(k)
            if i not in now:
                try:
                    self.ifnames.delete(i)
                except BpfilterError:
                    pass
        for d in {self.dir, self.link_dir}:
            for f in os.listdir(d):
                if f.startswith("link_") and int(f.split("_")[1]) not in now:
                    K.unpin(os.path.join(d, f))         # the device went: its link is defunct
        ingress = "ingress" if patterns is None else "ingress_dev"
        # New links, and the shared XDP root's slot of this family until `served` is complete,
        # run the restricted dispatcher: it passes a device `served` does not name yet (nf
        # serves it, or nothing did before this sync), whatever the mode. Set before the links.
        if self.families is not None:
            self._use_ingress("ingress_dev", want)
        done = {}
        for direction, atype in self._directions():
            kind = "ingress_dev" if direction == "ingress" else direction
            with self._dispatcher(kind) as disp:
                for i in sorted(want):
                    if not os.path.exists(self._link_pin(i, direction)):
                        done[(i, direction)] = self._attach_one(i, direction, atype, disp)
        # `served` changes only now that the links are there: entering it moves a device's
        # packets from nf to this flavor in one map update, leaving it moves them back (the
        # restricted dispatcher and the nf side both read this map), so each packet is filtered
        # once at every instant. The dispatcher kind changes while `served` holds both sets.
        for i in sorted(want):
            self.served.update(i, 1)
        self._use_ingress(ingress, want)
        for k in list(self.served.keys()):
            i = int.from_bytes(k, "little")
            if i not in want:
                with contextlib.suppress(BpfilterError):
                    self.served.delete(i)
        for i in sorted(set(now) - want):
            if self.flavor == "xdp" and self._link_used_elsewhere(i):
                continue
            for direction, _atype in self._directions():
                pin = self._link_pin(i, direction)
                if os.path.exists(pin):
                    with contextlib.suppress(BpfilterError):
                        with K.Link.from_pin(pin) as link:
                            link.detach()
                    K.unpin(pin)
        return done

    def _use_ingress(self, kind: str, want):
        """Make the ingress dispatcher of `kind` (disp_ingress or disp_ingress_dev) the one that
        runs: xdp, this family's slot of the shared root (one map update); tc, every ingress
        link of a served device (BPF_LINK_UPDATE: kernel/bpf/tcx.c tcx_link_update swaps the
        program in place). Idempotent."""
        with self._dispatcher(kind) as disp:
            if self.families is not None:
                self.families.update(XDP_FAMILY_SLOT[self.pf], disp)
                return
            want_id = disp.info()["id"]
            for i in sorted(want):
                pin = self._link_pin(i, "ingress")
                if not os.path.exists(pin):
                    continue
                with K.Link.from_pin(pin) as link:
                    if link.info()["prog_id"] != want_id:
                        _link_update(link, disp)

    # -- the NfAttachment API -----------------------------------------------------------------
    def _prog_pin(self, hook):
        return os.path.join(self.dir, f"prog_{HOOK_NAMES[hook]}")

    def swap(self, hook: int, prog: K.Prog):
        if hook not in self.hooks:
            raise BpfilterError(errno.EINVAL, f"flavor {self.flavor} has no {HOOK_NAMES[hook]}")
        self.prog_array.update(hook, prog)          # the atomic step
        NfAttachment._repin(self, self._prog_pin(hook), prog)
        self.sync()          # first install: attach everywhere; later: a no-op unless new devices

    def program(self, hook: int):
        path = self._prog_pin(hook)
        return K.Prog.from_pin(path) if os.path.exists(path) else None

    def attached(self) -> dict:
        """{hook: {"links": {ifname: [direction...]}, ...}} for status."""
        names = interfaces() if K.netns_cookie() == self.cookie else {}
        per_if = {}
        for f in sorted(os.listdir(self.link_dir)):
            if f.startswith("link_"):
                _, i, direction = f.split("_", 2)
                per_if.setdefault(names.get(int(i), i), []).append(direction)
        return {h: dict(flavor=self.flavor, interfaces=per_if)
                for h in self.hooks if os.path.exists(self._prog_pin(h))}

    def detach(self, hook: int):
        """Empty the slot: the dispatchers pass that hook's packets unfiltered afterwards."""
        _empty_slot(self.prog_array, hook, self._prog_pin(hook))

    def detach_all(self):
        """Detach every per-interface link first (no packet reaches a dispatcher afterwards), then
        remove slots, maps and pins. xdp: this family leaves the shared root (its slot emptied:
        the root passes its packets); the root's links go with the last family."""
        dirs = [self.dir]
        if self.families is not None:
            try:
                self.families.delete(XDP_FAMILY_SLOT[self.pf])
            except BpfilterError as e:
                if e.errno != errno.ENOENT:
                    raise
            other = [p for p in XDP_FAMILY_SLOT if p != self.pf][0]
            if not os.path.isdir(os.path.join(os.path.dirname(self.dir),
                                              f"{FAMILY_DIRS[other]}-{self.flavor}")):
                dirs.append(self.link_dir)
        for d in dirs:
            for f in sorted(os.listdir(d)) if os.path.isdir(d) else ():
                if f.startswith("link_"):
                    try:
                        with K.Link.from_pin(os.path.join(d, f)) as link:
                            link.detach()
                    except BpfilterError:
                        pass            # defunct already (device deleted)
        for h in range(NF_INET_NUMHOOKS):
            self.detach(h)
        self.set_devices(None)
        self.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.dir))
        except OSError:
            pass

    def close(self):
        for m in (self.prog_array, self.ifnames, self.families, self.served):
            if m is not None:
                m.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_attachment(flavor: str, family, **kw):
    """The attachment of `flavor` for `family` in the calling thread's namespace."""
    if flavor == "nf":
        return NfAttachment.open(family, **kw)
    return L2Attachment.open(flavor, family, **kw)


def attachment_directory(flavor: str, family, cookie: int = None) -> str:
    if flavor == "nf":
        return NfAttachment.directory(nfproto(family), cookie=cookie)
    return L2Attachment.directory(flavor, family, cookie=cookie)


# ---- the interface watcher ---------------------------------------------------------------------
# tcx and XDP attach per device, so a device created or renamed after the ruleset was installed
# must be handled without any iptables command. The helper process is started on demand and may
# not be running, so the first tc/xdp install starts one small watcher per (netns, flavor, family):
# `python -m bpfilter_umh.attach watch FLAVOR FAMILY` subscribes to RTNLGRP_LINK and calls
# L2Attachment.sync() on every link message. It stops when the pin directory goes (flush) and is
# killed by flush through its pid file; a namespace being torn down kills it with its processes.
WATCH_ROOT = "/run/bpfilter"
WATCH_POLL = 0.5        # seconds between checks that the attachment still exists


def _watch_pidfile(flavor: str, family, cookie: int = None) -> str:
    cookie = K.netns_cookie() if cookie is None else cookie
    return os.path.join(WATCH_ROOT, str(cookie), f"watch-{FAMILY_DIRS[nfproto(family)]}-{flavor}.pid")


def start_watcher(flavor: str, family="ipv4") -> int:
    """Start the watcher of the calling thread's namespace unless one runs; returns its pid."""
    return daemons.start(_watch_pidfile(flavor, family), "bpfilter_umh.attach",
                         ["watch", flavor, FAMILY_DIRS[nfproto(family)]])


def stop_watcher(flavor: str, family="ipv4", cookie: int = None):
    daemons.stop(_watch_pidfile(flavor, family, cookie))


def watcher_running(flavor: str, family="ipv4") -> bool:
    return daemons.running(_watch_pidfile(flavor, family)) is not None


def watch(flavor: str, family="ipv4"):
    """The watcher's loop (runs in the namespace it was started in)."""
    import select
    from pyroute2 import IPRoute
    from pyroute2.netlink.rtnl import RTMGRP_LINK
    d = L2Attachment.directory(flavor, family)
    with IPRoute() as ipr:
        ipr.bind(groups=RTMGRP_LINK)
        while os.path.isdir(d):
            try:
                with L2Attachment.open(flavor, family, create=False) as att:
                    att.sync()
            except BpfilterError:
                pass                 # a device vanished mid-sync: the next message retries
            while os.path.isdir(d):
                r, _, _ = select.select([ipr.fileno()], [], [], WATCH_POLL)
                if r:
                    ipr.get()        # drain; the content does not matter, sync() looks at all
                    break


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m bpfilter_umh.attach watch tc|xdp ipv4|ipv6")
