"""Flavors: how a compiled chain program obtains packet bytes, interface names and the byte count,
and which numbers mean ACCEPT and DROP. The compiler (compile.py) walks headers and rules; it asks
the flavor object for these primitives, so one rule compiler serves every attach point.

  get(name) -> Flavor            "nf", "tc", "xdp"
  Flavor.check_chain(chain)      refuse a chain this flavor cannot serve (BpfilterError naming it)
  Flavor.prologue(cc, drop)      first instructions: keep ctx in r6, S_LEN, interface names (nf)
  Flavor.open_packet(cc, drop)   make the packet readable (nf: a dynptr over the skb)
  Flavor.after_ip(cc)            after the IP header is in the stack slots (tc/xdp: names, FIB)
  Flavor.load_bytes(set_off, n)  instructions leaving r0 = pointer to n bytes at network offset
                                 (set_off puts the offset in r2) or r0 = 0 when the packet is short
  Flavor.read_bytes(dst, len_reg, set_off)  copy len_reg bytes at network offset r4 (set_off) to
                                 the stack at fp+dst; r0 == 0 on success
  Flavor.ACCEPT / Flavor.DROP    return codes

Semantics that differ between flavors are listed in docs/flavors.md, each with its test.
"""
from __future__ import annotations

import errno
import functools

from . import ebpf as E
from .ebpf import FP, R0, R1, R2, R3, R4, R6, R7, Label
from .errors import BpfilterError

# stack slots owned by the flavor layer (compile.py uses -8 .. -248)
S_FIB = -312          # struct bpf_fib_lookup (64 bytes)

# include/uapi/linux/bpf.h
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP, BPF_PROG_TYPE_NETFILTER = 3, 6, 32
BPF_NETFILTER, BPF_TCX_INGRESS, BPF_TCX_EGRESS, BPF_XDP = 45, 46, 47, 37
BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_tail_call = 12
BPF_FUNC_skb_load_bytes = 26
BPF_FUNC_fib_lookup = 69
BPF_FUNC_xdp_load_bytes = 189
BPF_FUNC_dynptr_read = 201
BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_FWD_DISABLED, \
    BPF_FIB_LKUP_RET_UNSUPP_LWT, BPF_FIB_LKUP_RET_NO_NEIGH = 0, 4, 5, 6, 7
TCX_NEXT, TCX_PASS, TCX_DROP = -1, 0, 2          # == TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT
XDP_DROP, XDP_PASS = 1, 2
ETH_HLEN = 14
PACKET_OTHERHOST = 3
NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT = 1, 2, 3
IFNAMES_MAP = "ifnames"      # BPF_MAP_TYPE_HASH u32 ifindex -> char name[16], kept by attach.py
SERVED_MAP = "served"        # BPF_MAP_TYPE_HASH u32 ifindex -> 1: devices a tc/xdp flavor serves

# struct __sk_buff / struct xdp_md offsets (include/uapi/linux/bpf.h)
SKB_LEN, SKB_PKT_TYPE, SKB_PROTOCOL, SKB_INGRESS_IFINDEX, SKB_IFINDEX = 0, 4, 16, 36, 40
XDP_DATA, XDP_DATA_END, XDP_INGRESS_IFINDEX = 0, 4, 12


def _policy_accept(chain) -> bool:
    return chain.policy == -1 - 1          # -NF_ACCEPT - 1


class Flavor:
    name = "?"
    prog_type = 0
    expected_attach_type = 0
    license = "GPL"
    ACCEPT = 1
    DROP = 0
    hooks = (NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT)
    needs_ip = False           # the prologue needs the IP header even if no rule reads it
    maps = ()                  # map names besides the counters the programs reference

    def check_chain(self, chain):
        if chain.hook not in self.hooks and (chain.rules or not _policy_accept(chain)):
            from .model import HOOK_NAMES
            raise BpfilterError(errno.EOPNOTSUPP,
                                f"chain {chain.name}: flavor {self.name} cannot serve the "
                                f"{HOOK_NAMES.get(chain.hook, chain.hook)} hook "
                                f"({self.why_not(chain.hook)}); use flavor nf for it")

    def why_not(self, hook) -> str:
        return "no attach point"

    def serves(self, chain) -> bool:
        return chain.hook in self.hooks

    def prologue(self, cc, drop):
        raise NotImplementedError

    def open_packet(self, cc, drop):
        pass

    def after_ip(self, cc):
        pass

    def load_bytes(self, set_offset, size: int) -> list:
        raise NotImplementedError

    def read_bytes(self, dst: int, len_reg, set_offset: list) -> list:
        raise NotImplementedError


class NfFlavor(Flavor):
    """BPF_PROG_TYPE_NETFILTER behind a netfilter link: exactly where iptables' filter runs."""
    name = "nf"
    prog_type = BPF_PROG_TYPE_NETFILTER
    expected_attach_type = BPF_NETFILTER
    ACCEPT, DROP = 1, 0                       # NF_ACCEPT, NF_DROP
    # hooks whose chain a tc/xdp flavor serves on some devices (docs/flavors.md "Per-interface
    # flavors"): their programs pass, unfiltered and uncounted, what arrives on those devices
    skip_served = frozenset()

    def prologue(self, cc, drop):
        from .compile import S_INNAME, S_LEN, S_OUTNAME
        f = cc.facts
        cc.emit(E.mov(R6, R1, comment="r6 = struct bpf_nf_ctx *"))
        if cc.chain.hook in self.skip_served:
            self._skip_served(cc)
        cc.emit(E.ldx(E.DW, R7, R6, f.nf_ctx_skb, "r7 = ctx->skb"),
                E.ldx(E.W, R1, R7, f.skb_len, "skb->len"),
                E.stx(E.DW, FP, S_LEN, R1))
        if cc.needs_ifnames:
            cc.emit(E.ldx(E.DW, E.R8, R6, f.nf_ctx_state, "r8 = ctx->state"))
            for off, slot, what in ((f.state_in, S_INNAME, "in"), (f.state_out, S_OUTNAME, "out")):
                done = cc.label(f"{what}dev_done")
                cc.emit(E.st(E.DW, FP, slot, 0, f"{what}dev name = nulldevname"),
                        E.st(E.DW, FP, slot + 8, 0),
                        E.ldx(E.DW, R1, E.R8, off, f"state->{what}"),
                        E.jmp(E.JEQ, R1, 0, done),
                        E.ldx(E.DW, R2, R1, f.dev_name, f"state->{what}->name[0..7]"),
                        E.stx(E.DW, FP, slot, R2),
                        E.ldx(E.DW, R2, R1, f.dev_name + 8, f"state->{what}->name[8..15]"),
                        E.stx(E.DW, FP, slot + 8, R2),
                        Label(done))

    def _skip_served(self, cc):
        """NF_ACCEPT a packet whose input device is in the map "served": the tc/xdp flavor
        already filtered and counted it. At NF_INET_LOCAL_IN and NF_INET_FORWARD, state->in is
        skb->dev as ip_rcv/ipv6_rcv got it, the device whose tc ingress or XDP hook ran."""
        go = cc.label("not_served")
        cc.emit(E.ldx(E.DW, R1, R6, cc.facts.nf_ctx_state, "ctx->state"),
                E.ldx(E.DW, R1, R1, cc.facts.state_in, "state->in"),
                E.jmp(E.JEQ, R1, 0, go),
                E.ldx(E.W, R1, R1, _dev_ifindex(), "state->in->ifindex"),
                E.stx(E.W, FP, S_FIB, R1),
                E.ld_map_fd(R1, SERVED_MAP), E.mov(R2, FP), E.alu(E.ADD, R2, S_FIB),
                E.call(BPF_FUNC_map_lookup_elem),
                E.jmp(E.JEQ, R0, 0, go),
                E.mov(R0, self.ACCEPT, comment="served by the tc/xdp flavor"), E.exit_(),
                Label(go))

    def open_packet(self, cc, drop):
        from .compile import S_DYNPTR
        cc.emit(E.mov(R1, R7), E.mov(R2, 0), E.mov(R3, FP), E.alu(E.ADD, R3, S_DYNPTR),
                E.kfunc("bpf_dynptr_from_skb"),
                E.jmp(E.JNE, R0, 0, drop, comment="no dynptr: cannot inspect, fail closed"))

    def load_bytes(self, set_offset, size):
        """r0 = bpf_dynptr_slice(&dynptr, <offset in r2>, buf, size)."""
        from .compile import S_BUF, S_DYNPTR
        return [E.mov(R1, FP), E.alu(E.ADD, R1, S_DYNPTR), set_offset, E.mov(R3, FP),
                E.alu(E.ADD, R3, S_BUF), E.mov(R4, size), E.kfunc("bpf_dynptr_slice")]

    def read_bytes(self, dst, len_reg, set_offset):
        """bpf_dynptr_read(dst, len, &dynptr, offset, 0)."""
        from .compile import S_DYNPTR
        return [E.mov(R1, FP), E.alu(E.ADD, R1, dst), E.mov(R2, len_reg),
                E.mov(R3, FP), E.alu(E.ADD, R3, S_DYNPTR), *set_offset, E.mov(E.R5, 0),
                E.call(BPF_FUNC_dynptr_read)]


class _L2Flavor(Flavor):
    """tc and xdp: the program sees the Ethernet frame; a dispatcher (attach.py) has already
    checked the EtherType (IPv4 or IPv6, one dispatcher per family) and decided which chain the
    packet belongs to, and tail-calls the chain program. Bytes are copied with a load-bytes helper
    into the bounce buffer."""
    needs_ip = True
    maps = (IFNAMES_MAP,)
    load_helper = 0

    def _len(self, cc):
        raise NotImplementedError

    def _ifindex(self, reg, cc):
        raise NotImplementedError

    def prologue(self, cc, drop):
        from .compile import S_INNAME, S_OUTNAME
        cc.emit(E.mov(R6, R1, comment="r6 = ctx"))
        self._len(cc)
        if cc.needs_ifnames:
            for slot in (S_INNAME, S_OUTNAME):
                cc.emit(E.st(E.DW, FP, slot, 0), E.st(E.DW, FP, slot + 8, 0))

    def _ifname(self, cc, slot, what):
        """name of the ifindex in r1 from the ifnames map into fp+slot (zero when unknown)."""
        from .compile import S_KEY
        done = cc.label(f"{what}name_done")
        cc.emit(E.stx(E.W, FP, S_KEY, R1, f"{what}dev ifindex"),
                E.ld_map_fd(R1, IFNAMES_MAP), E.mov(R2, FP), E.alu(E.ADD, R2, S_KEY),
                E.call(BPF_FUNC_map_lookup_elem),
                E.jmp(E.JEQ, R0, 0, done, comment="unknown interface: empty name"),
                E.ldx(E.DW, R1, R0, 0), E.stx(E.DW, FP, slot, R1),
                E.ldx(E.DW, R1, R0, 8), E.stx(E.DW, FP, slot + 8, R1),
                Label(done))

    def after_ip(self, cc):
        """Interface names: INPUT has in = this device; OUTPUT out = this device; FORWARD
        in = this device and out = what bpf_fib_lookup says the routing decision is."""
        from .compile import S_INNAME, S_OUTNAME
        if not cc.needs_ifnames:
            return
        hook = cc.chain.hook
        if hook in (NF_INET_LOCAL_IN, NF_INET_FORWARD):
            self._ifindex(R1, cc)
            self._ifname(cc, S_INNAME, "in")
        if hook == NF_INET_LOCAL_OUT:
            self._ifindex(R1, cc)
            self._ifname(cc, S_OUTNAME, "out")
        if hook == NF_INET_FORWARD:
            done, have = cc.label("fib_done"), cc.label("fib_out")
            cc.emit(*fib_lookup_insns(self, cc),
                    E.jmp(E.JEQ, R0, BPF_FIB_LKUP_RET_SUCCESS, have),
                    E.jmp(E.JNE, R0, BPF_FIB_LKUP_RET_NO_NEIGH, done,
                          comment="no output device: empty out name"),
                    Label(have),
                    E.ldx(E.W, R1, FP, S_FIB + 8, "params.ifindex: the output device"))
            self._ifname(cc, S_OUTNAME, "out")
            cc.emit(Label(done))

    def load_bytes(self, set_offset, size):
        """r0 = &buf when <load helper>(ctx, ETH_HLEN + off, buf, size) == 0, else 0."""
        self._n = getattr(self, "_n", 0) + 1
        return load_bytes_branchy(self.load_helper, set_offset, size, f"{self.name}{self._n}")

    def read_bytes(self, dst, len_reg, set_offset):
        return [E.mov(R1, R6), *set_offset, E.mov(R2, R4), E.alu(E.ADD, R2, ETH_HLEN),
                E.mov(R3, FP), E.alu(E.ADD, R3, dst), E.mov(R4, len_reg),
                E.call(self.load_helper)]


@functools.lru_cache(maxsize=None)
def _dev_ifindex() -> int:
    """offsetof(struct net_device, ifindex) in the running kernel (vmlinux BTF)."""
    from . import btf
    return btf.member_offset("net_device", "ifindex")


def load_bytes_branchy(helper: int, set_offset, size: int, tag: str) -> list:
    from .compile import S_BUF
    fail, done = f"lb_fail_{tag}", f"lb_done_{tag}"
    return [set_offset, E.alu(E.ADD, R2, ETH_HLEN), E.mov(R1, R6), E.mov(R3, FP),
            E.alu(E.ADD, R3, S_BUF), E.mov(R4, size), E.call(helper),
            E.jmp(E.JNE, R0, 0, fail), E.mov(R0, FP), E.alu(E.ADD, R0, S_BUF), E.ja(done),
            Label(fail), E.mov(R0, 0), Label(done)]


def fib_lookup_insns(fl, cc) -> list:
    """bpf_fib_lookup(ctx, &params, 64, 0) on the packet's addresses and protocol, as an input
    lookup from this device (net/core/filter.c bpf_ipv4_fib_lookup / bpf_ipv6_fib_lookup).
    tot_len 0: no MTU check."""
    from .compile import S_DADDR, S_PROTO, S_SADDR
    out = [E.st(E.DW, FP, S_FIB + o, 0) for o in range(0, 64, 8)]
    out += [E.ldx(E.DW, R1, FP, S_PROTO), E.stx(E.B, FP, S_FIB + 1, R1, "l4_protocol")]
    if cc.v6:
        from .family import AF_INET6, S_DADDR6, S_SADDR6
        out += [E.st(E.B, FP, S_FIB, AF_INET6, "params.family = AF_INET6")]
        for src, dst in ((S_SADDR6, S_FIB + 16), (S_DADDR6, S_FIB + 32)):
            out += [E.ldx(E.DW, R1, FP, src), E.stx(E.DW, FP, dst, R1),
                    E.ldx(E.DW, R1, FP, src + 8), E.stx(E.DW, FP, dst + 8, R1)]
    else:
        out += [E.st(E.B, FP, S_FIB, 2, "params.family = AF_INET"),
                E.ldx(E.DW, R1, FP, S_SADDR), E.stx(E.W, FP, S_FIB + 16, R1),
                E.ldx(E.DW, R1, FP, S_DADDR), E.stx(E.W, FP, S_FIB + 32, R1)]
    out += fl.ifindex_insns(R1)
    out += [E.stx(E.W, FP, S_FIB + 8, R1, "params.ifindex = input device"),
            E.mov(R1, R6), E.mov(R2, FP), E.alu(E.ADD, R2, S_FIB), E.mov(R3, 64), E.mov(R4, 0),
            E.call(BPF_FUNC_fib_lookup)]
    return out


class TcFlavor(_L2Flavor):
    """BPF_PROG_TYPE_SCHED_CLS tail-called from the tcx dispatchers of every interface."""
    name = "tc"
    prog_type = BPF_PROG_TYPE_SCHED_CLS
    expected_attach_type = 0
    ACCEPT, DROP = TCX_NEXT, TCX_DROP
    load_helper = BPF_FUNC_skb_load_bytes

    def _len(self, cc):
        from .compile import S_LEN
        # skb->len at tc includes the Ethernet header; iptables counts from the IP header
        cc.emit(E.ldx(E.W, R1, R6, SKB_LEN, "skb->len (frame)"), E.alu(E.SUB, R1, ETH_HLEN),
                E.stx(E.DW, FP, S_LEN, R1))

    def ifindex_insns(self, reg):
        return [E.ldx(E.W, reg, R6, SKB_IFINDEX, "skb->ifindex")]

    def _ifindex(self, reg, cc):
        cc.emit(*self.ifindex_insns(reg))

    def why_not(self, hook):
        return "tc sees packets at interfaces, PREROUTING/POSTROUTING are not compiled"


class XdpFlavor(_L2Flavor):
    """BPF_PROG_TYPE_XDP tail-called from the XDP dispatcher of every interface: ingress only."""
    name = "xdp"
    prog_type = BPF_PROG_TYPE_XDP
    expected_attach_type = BPF_XDP
    ACCEPT, DROP = XDP_PASS, XDP_DROP
    hooks = (NF_INET_LOCAL_IN, NF_INET_FORWARD)
    load_helper = BPF_FUNC_xdp_load_bytes

    def _len(self, cc):
        from .compile import S_LEN
        cc.emit(E.ldx(E.W, R1, R6, XDP_DATA_END, "xdp->data_end"),
                E.ldx(E.W, R2, R6, XDP_DATA, "xdp->data"), E.alu(E.SUB, R1, R2),
                E.alu(E.SUB, R1, ETH_HLEN, comment="iptables counts from the IP header"),
                E.stx(E.DW, FP, S_LEN, R1))

    def ifindex_insns(self, reg):
        return [E.ldx(E.W, reg, R6, XDP_INGRESS_IFINDEX, "xdp->ingress_ifindex")]

    def _ifindex(self, reg, cc):
        cc.emit(*self.ifindex_insns(reg))

    def why_not(self, hook):
        return "XDP runs only on receive, before any socket or route exists; OUTPUT has no XDP hook"


FLAVORS = {"nf": NfFlavor, "tc": TcFlavor, "xdp": XdpFlavor}


def get(name: str) -> Flavor:
    try:
        return FLAVORS[name]()
    except KeyError:
        raise BpfilterError(errno.EINVAL, f"unknown flavor {name!r} (known: "
                                          f"{', '.join(FLAVORS)})") from None


# ---- XDP hardware offload ------------------------------------------------------------------
# What an offload engine accepts (drivers/net/ethernet/netronome/nfp/bpf/verifier.c
# nfp_bpf_check_helper_call and offload.c nfp_bpf_map_alloc; kernel/bpf/offload.c): plain
# array/hash maps, helpers map_lookup/update/delete, get_prandom_u32, xdp_adjust_head/tail,
# perf_event_output; no kfuncs, no tail calls, no per-CPU maps.
OFFLOAD_HELPERS = {1: "map_lookup_elem", 2: "map_update_elem", 3: "map_delete_elem",
                   7: "get_prandom_u32", 25: "perf_event_output", 44: "xdp_adjust_head",
                   65: "xdp_adjust_tail"}
OFFLOAD_MAP_TYPES = {1: "hash", 2: "array"}
HELPER_NAMES = {12: "tail_call", 26: "skb_load_bytes", 69: "fib_lookup",
                189: "xdp_load_bytes", 201: "dynptr_read"}


def check_offload(program, map_types: dict) -> None:
    """Raise BpfilterError(EOPNOTSUPP) naming the first rule (or the prologue) of `program` (a
    compile.CompiledProgram) that an offload engine cannot run. map_types: {map name: type}."""
    if program.prog_type != BPF_PROG_TYPE_XDP:
        raise BpfilterError(errno.EOPNOTSUPP, f"chain {program.chain}: only XDP programs can be "
                                              f"offloaded, this one is flavor {program.flavor}")
    slot = 0
    for it in program.items:
        if isinstance(it, Label):
            continue
        why = None
        if it.map is not None and map_types.get(it.map) not in OFFLOAD_MAP_TYPES:
            why = f"map {it.map!r} of type {map_types.get(it.map)} (offload engines hold only " \
                  f"array and hash maps, no per-CPU maps)"
        elif it.kfunc is not None:
            why = f"kfunc {it.kfunc} (offloaded programs cannot call kernel functions)"
        elif it.code == (E.BPF_JMP | E.CALL) and it.src == 0 and it.imm not in OFFLOAD_HELPERS:
            why = f"helper {HELPER_NAMES.get(it.imm, it.imm)} (offload engines provide only " \
                  f"{', '.join(sorted(OFFLOAD_HELPERS.values()))})"
        if why:
            raise BpfilterError(errno.EOPNOTSUPP, f"{program.locate(slot + 1)}: cannot be "
                                                  f"offloaded: {why}")
        slot += it.slots
