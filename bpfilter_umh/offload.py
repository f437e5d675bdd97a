"""XDP hardware offload (`--offload IFNAME`): the ruleset's INPUT chain compiled for an offload
engine, checked, and loaded onto the device.

An offload engine runs the program on the NIC, so the program may only use what the engine
provides (kernel/bpf/offload.c; drivers/net/ethernet/netronome/nfp/bpf/verifier.c
nfp_bpf_check_helper_call, offload.c nfp_bpf_map_alloc): direct packet access, plain array and
hash maps created for the device (map_ifindex), a few helpers, no kfuncs, no tail calls, no FIB.
The normal xdp flavor needs all of those (bpf_xdp_load_bytes, a per-CPU counters map, a
dispatcher that tail-calls after bpf_fib_lookup), so offload has its own code mode:

  - XdpOffloadFlavor: packet bytes through xdp->data/data_end with a bounds check per read;
    not IPv4 -> XDP_PASS; the INPUT/FORWARD split without a FIB: the destination is compared
    with the namespace's local and broadcast addresses (and multicast/255.255.255.255), taken
    when the ruleset is installed; anything else is passed unfiltered to the host (FORWARD is not
    served: a ruleset with FORWARD or OUTPUT rules is refused naming the chain); -i names are the
    offload device's own name (the program runs on that device only);
  - counters: a BPF_MAP_TYPE_ARRAY on the device, one slot per counted entry (dense keys, so
    small engines fit), read back through the driver;
  - check(): flavors.check_offload() names the first rule whose code needs more (a TCP option
    walk copies with bpf_xdp_load_bytes; a classified run needs a hash-of-maps or LPM map).

API:
  compile_offload(table, ifname, local_addrs) -> OffloadProgram   (pure: no kernel needed)
  OffloadProgram.check()                           flavors.check_offload with its map types
  install(table, ifname) -> Offloaded              check, create maps and load for the device
                                                   (prog_ifindex), attach XDP_FLAGS_HW_MODE
  Offloaded.counters() -> {entry index: (packets, bytes)}   .detach()
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field, replace

from . import ebpf as E
from . import flavors as F
from . import kernel as K
from .ebpf import FP, R0, R1, R2, R3, R6, Label
from .attach import XDP_FLAGS_HW_MODE
from .errors import BpfilterError

ETH_P_IP = 0x0800
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY = 1, 2
COUNT_COMMENT = "count entry "          # compile.py _count's store of the counter key


def _imm32(addr: bytes) -> int:
    """The value a 4-byte little-endian load of `addr` gives, as a signed 32-bit immediate."""
    v = int.from_bytes(addr, "little")
    return v - (1 << 32) if v >= 1 << 31 else v


class XdpOffloadFlavor(F.XdpFlavor):
    """XDP for an offload engine: direct packet access, INPUT only, constant interface name."""
    name = "xdp-offload"
    hooks = (F.NF_INET_LOCAL_IN,)
    maps = ()

    def __init__(self, ifname: str = "", local_addrs=()):
        self.ifname = ifname
        self.local = [ipaddress.IPv4Address(a).packed for a in local_addrs]
        self._n = 0

    def why_not(self, hook) -> str:
        return ("an offloaded program decides INPUT by the destination address alone; "
                "forwarding needs a FIB lookup the NIC does not have") \
            if hook == F.NF_INET_FORWARD else super().why_not(hook)

    def prologue(self, cc, drop):
        from .compile import S_INNAME, S_OUTNAME
        cc.emit(E.mov(R6, R1, comment="r6 = ctx"))
        self._len(cc)
        passed, ipv4 = cc.label("offload_pass"), cc.label("offload_ipv4")
        cc.emit(E.ldx(E.W, R2, R6, F.XDP_DATA, "xdp->data"),
                E.ldx(E.W, R3, R6, F.XDP_DATA_END, "xdp->data_end"),
                E.mov(R1, R2), E.alu(E.ADD, R1, F.ETH_HLEN),
                E.jmp(E.JGT, R1, R3, passed, comment="no Ethernet header: not ours"),
                E.ldx(E.H, R1, R2, 12, "h_proto"), E.be16(R1),
                E.jmp(E.JEQ, R1, ETH_P_IP, ipv4),
                Label(passed), E.mov(R0, F.XDP_PASS, comment="another family, or not INPUT"),
                E.exit_(), Label(ipv4))
        if cc.needs_ifnames:
            name = self.ifname.encode()[:15].ljust(16, b"\0")
            for slot, value in ((S_INNAME, name), (S_OUTNAME, bytes(16))):
                for half in (0, 8):
                    cc.emit(E.ld_imm64(R1, struct.unpack("<q", value[half:half + 8])[0]),
                            E.stx(E.DW, FP, slot + half, R1))

    def after_ip(self, cc):
        """INPUT = to a local or broadcast address of this namespace, multicast, or limited
        broadcast (what ip_route_input_slow would deliver locally); everything else is passed."""
        from .compile import S_DADDR
        mine, other = cc.label("offload_local"), cc.label("offload_notlocal")
        cc.emit(E.ldx(E.DW, R1, FP, S_DADDR, "daddr"))
        for a in self.local:
            cc.emit(E.jmp(E.JEQ, R1, _imm32(a), mine, bits=32,
                          comment=f"local {ipaddress.IPv4Address(a)}"))
        cc.emit(E.jmp(E.JEQ, R1, -1, mine, bits=32, comment="255.255.255.255"),
                E.alu(E.AND, R1, 0xf0), E.jmp(E.JEQ, R1, 0xe0, mine, comment="multicast"),
                Label(other), E.mov(R0, F.XDP_PASS, comment="not INPUT: the host decides"),
                E.exit_(), Label(mine))

    def load_bytes(self, set_offset, size):
        """r0 = xdp->data + ETH_HLEN + off when `size` bytes are there, else 0."""
        self._n += 1
        fail, done = f"dpa_short_{self._n}", f"dpa_done_{self._n}"
        return [set_offset,
                E.ldx(E.W, R0, R6, F.XDP_DATA, "xdp->data"),
                E.ldx(E.W, R1, R6, F.XDP_DATA_END, "xdp->data_end"),
                E.alu(E.ADD, R0, F.ETH_HLEN), E.alu(E.ADD, R0, R2),
                E.mov(R3, R0), E.alu(E.ADD, R3, size),
                E.jmp(E.JGT, R3, R1, fail, comment="bounds check for direct packet access"),
                E.ja(done), Label(fail), E.mov(R0, 0), Label(done)]


@dataclass
class OffloadProgram:
    program: object                       # compile.CompiledProgram of INPUT
    keys: dict = field(default_factory=dict)     # entry index -> counters array key

    @property
    def map_types(self) -> dict:
        from .compile import COUNTERS_MAP
        return {COUNTERS_MAP: BPF_MAP_TYPE_ARRAY,
                **{m.name: m.map_type for m in self.program.maps}}

    def check(self):
        F.check_offload(self.program, self.map_types)


def _dense_counter_keys(items: list) -> tuple:
    """Renumber the counters' keys 0..n-1 in the order the entries appear (an offload engine's
    map may hold few entries). Returns (items, {entry index: key})."""
    keys, out = {}, []
    for it in items:
        if isinstance(it, E.Insn) and it.cls == E.BPF_ST and it.comment.startswith(COUNT_COMMENT):
            k = keys.setdefault(it.imm, len(keys))
            it = replace(it, imm=k)
        out.append(it)
    return out, keys


def compile_offload(table, ifname: str, local_addrs, facts=None) -> OffloadProgram:
    """Compile `table` (IPv4) for the offload engine; BpfilterError names what cannot be served."""
    from .compile import KernelFacts, compile_table
    from .model import AF_INET
    if table.family != AF_INET:
        raise BpfilterError(errno.EOPNOTSUPP, "--offload: only ipv4 tables can be offloaded")
    fl = XdpOffloadFlavor(ifname, local_addrs)
    compiled = compile_table(table, facts or KernelFacts.fake(), fl)
    progs = [p for p in compiled.programs if p.hook == F.NF_INET_LOCAL_IN]
    if not progs:
        raise BpfilterError(errno.EINVAL, "--offload: the table has no INPUT chain")
    p = progs[0]
    p.items, keys = _dense_counter_keys(p.items)
    return OffloadProgram(p, keys)


def local_addresses() -> list:
    """IPv4 addresses and broadcast addresses of the calling thread's namespace."""
    from pyroute2 import IPRoute
    out = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            for attr in ("IFA_LOCAL", "IFA_ADDRESS", "IFA_BROADCAST"):
                v = a.get_attr(attr)
                if v and v not in out:
                    out.append(v)
    return out


def _map_for_device(map_type, key_size, value_size, max_entries, ifindex, name):
    """BPF_MAP_CREATE with map_ifindex: the map lives on the device (kernel/bpf/offload.c
    bpf_map_offload_map_alloc accepts array and hash only)."""
    opts = K._ffi.new("struct bpf_map_create_opts *")
    opts.sz = K._ffi.sizeof("struct bpf_map_create_opts")
    opts.map_ifindex = ifindex
    fd = K._libbpf.bpf_map_create(map_type, K._cstr(name), key_size, value_size, max_entries,
                                  opts)
    fd = K._check(fd, "BPF_MAP_CREATE", f"{name} on ifindex {ifindex} (type {map_type}, "
                                        f"max_entries {max_entries})")
    return K.Map(fd, map_type, key_size, value_size, max_entries, name, 0)


@dataclass
class Offloaded:
    ifname: str
    link: object
    counters_map: object
    keys: dict

    def counters(self) -> dict:
        out = {}
        for entry, key in self.keys.items():
            v = self.counters_map.lookup(key)
            out[entry] = struct.unpack("<QQ", bytes(v)) if v is not None else (0, 0)
        return out

    def detach(self):
        try:
            self.link.detach()
        finally:
            self.close()

    def close(self):
        self.link.close()
        self.counters_map.close()


def no_engine_message(ifname: str, err: int) -> str:
    return (f"--offload: device {ifname} has no BPF offload engine (its driver offers none; "
            f"Netronome nfp and netdevsim do): serve it with flavor xdp without --offload "
            f"({os.strerror(err)})")


@dataclass
class Prepared:
    """An offload program loaded for its device (prog_ifindex) with its counters array on the
    device, not attached: nothing filters differently yet."""
    ifname: str
    ifindex: int
    prog: object
    counters_map: object
    keys: dict

    def close(self):
        self.prog.close()
        self.counters_map.close()


def prepare(table, ifname: str, local_addrs=None) -> Prepared:
    """Compile, check, create the device's counters map and load the program for the device.
    Every refusal (a rule the engine cannot run, a device without an engine, a map too big for
    it, the device's verifier) is a BpfilterError raised before anything is attached."""
    from .compile import COUNTERS_MAP
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError:
        raise BpfilterError(errno.ENODEV, f"--offload: no interface {ifname!r} in this namespace")
    op = compile_offload(table, ifname, local_addresses() if local_addrs is None else local_addrs)
    op.check()
    try:
        cmap = _map_for_device(BPF_MAP_TYPE_ARRAY, 4, 16, max(1, len(op.keys)), ifindex,
                               "bpfilter_hwcnt")
    except BpfilterError as e:
        if e.errno in (errno.ENOMEM, errno.E2BIG):
            raise BpfilterError(e.errno, f"--offload: interface {ifname} cannot hold the "
                                         f"counters map ({len(op.keys)} entries) on its offload "
                                         f"engine: {e.message}") from None
        # kernel/bpf/offload.c bpf_map_offload_map_alloc: no offload device registered for the
        # ifindex -> EINVAL; said as EOPNOTSUPP, since the device, not the request, lacks it
        raise BpfilterError(errno.EOPNOTSUPP, no_engine_message(ifname, e.errno)) from None
    try:
        code = op.program.assemble({COUNTERS_MAP: cmap.fd})
        prog = K.Prog.load(K.BPF_PROG_TYPE_XDP, code, name="bpfilter_hw",
                           expected_attach_type=K.BPF_XDP, prog_ifindex=ifindex)
    except BpfilterError as e:
        cmap.close()
        raise BpfilterError(e.errno, f"--offload: the offload engine of {ifname} refused the "
                                     f"INPUT program: {e.message}") from None
    return Prepared(ifname, ifindex, prog, cmap, op.keys)


def install(table, ifname: str, local_addrs=None) -> Offloaded:
    """Compile, check, and load `table`'s INPUT chain onto `ifname`'s offload engine, attached
    by a new link (offload_probe.py; the engine uses prepare/commit)."""
    pre = prepare(table, ifname, local_addrs)
    try:
        link = K.link_create_ifindex(pre.prog, pre.ifindex, K.BPF_XDP, XDP_FLAGS_HW_MODE)
    except BpfilterError as e:
        pre.close()
        raise BpfilterError(e.errno, f"--offload: interface {ifname} refused the hardware-mode "
                                     f"XDP attach: {e.message}") from None
    pre.prog.close()        # the link holds it
    return Offloaded(ifname, link, pre.counters_map, pre.keys)


# ---- the offloaded program of an engine: pinned, replaced atomically, adopted, removed ----
#
# What runs where (docs/flavors.md "Offload"): the offloaded program runs first, on the NIC, for
# the IPv4 packets the device receives; it decides the INPUT chain for those addressed to this
# namespace and drops what the ruleset drops. What it passes (accepted INPUT packets, anything
# else) reaches the host, where the normal xdp flavor's programs, attached to every device
# including this one, run the whole ruleset again: INPUT from every device, FORWARD, the
# counters. So a packet the NIC passes is counted once, by the host; a packet the NIC drops never
# reaches the host and is counted only on the device: its DROP entries' counters (rules with -j
# DROP, a DROP policy) are added to the host's (Engine.counters). Not counted: the entries a
# dropped packet passed through before its DROP (a jump into a user chain): the device counts
# them too, but its count of them includes the packets it passed, which the host counts again.

OFFLOAD_LINK = "link"
BPF_LINK_UPDATE, BPF_F_REPLACE = 29, 1 << 2
DROP_VERDICT = -0 - 1           # xt_standard_target.verdict of DROP: -NF_DROP - 1


def pin_directory(engine_pin_dir: str) -> str:
    """Beside the xdp attachment's directory (not in it: attach.py removes that one whole)."""
    return engine_pin_dir + "-offload"


def drop_keys(table, keys: dict) -> dict:
    """{entry index: counters key} of the entries whose target is DROP (see above)."""
    return {r.index: keys[r.index] for r in table.entries()
            if r.index in keys and getattr(r.target, "verdict", None) == DROP_VERDICT}


def _link_ifindex(link) -> int:
    """struct bpf_link_info: type, id, prog_id, then (8-aligned) xdp.ifindex."""
    return struct.unpack_from("<I", link._info(48), 16)[0]


def _link_update(link, prog, old_prog) -> None:
    """BPF_LINK_UPDATE with BPF_F_REPLACE: the device swaps programs in one step, and only if
    the link still runs `old_prog` (net/core/dev.c bpf_xdp_link_update: EPERM otherwise)."""
    attr = K._ffi.new("char[]", 16)
    struct.pack_into("<IIII", K._ffi.buffer(attr), 0, link.fd, prog.fd, BPF_F_REPLACE,
                     old_prog.fd)
    ret = K._bpf(BPF_LINK_UPDATE, attr, 16)
    if ret < 0:
        raise BpfilterError(-ret, f"BPF_LINK_UPDATE of the offloaded program: "
                                  f"{os.strerror(-ret)}")


def read_counters(m, keys: dict) -> dict:
    """{entry index: (pcnt, bcnt)} of the device's counters array (read through the driver)."""
    out = {}
    for entry, key in keys.items():
        v = m.lookup(key)
        out[entry] = struct.unpack("<QQ", bytes(v)) if v is not None else (0, 0)
    return out


def attached(pin_dir: str):
    """(link, prog, counters map) of the pinned offloaded program, None when there is none (or
    its device went: the link is defunct)."""
    path = os.path.join(pin_dir, OFFLOAD_LINK)
    if not os.path.exists(path):
        return None
    link = K.Link.from_pin(path)
    try:
        prog_id = link.info()["prog_id"]
        if not prog_id:
            link.close()
            return None
        prog = K.Prog.from_id(prog_id)
        ids = prog.info()["map_ids"]
        m = K.Map.from_id(ids[0]) if ids else None
        return link, prog, m
    except BaseException:
        link.close()
        raise


def commit(pre: Prepared, pin_dir: str, old_keys: dict) -> dict:
    """Attach `pre` in place of the pinned offloaded program: one BPF_LINK_UPDATE on the same
    device (the NIC never runs without a program), or a new link when the device changed (the
    old one is detached after). Returns the old program's counters {entry index: (p, b)} read
    once it stopped running. The link is pinned; it holds the program, which holds its map."""
    old = attached(pin_dir)
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    path = os.path.join(pin_dir, OFFLOAD_LINK)
    try:
        if old is not None and _link_ifindex(old[0]) == pre.ifindex:
            _link_update(old[0], pre.prog, old[1])
        else:
            try:
                link = K.link_create_ifindex(pre.prog, pre.ifindex, K.BPF_XDP, XDP_FLAGS_HW_MODE)
            except BpfilterError as e:
                raise BpfilterError(e.errno, f"--offload: interface {pre.ifname} refused the "
                                             f"hardware-mode XDP attach: {e.message}") from None
            with link:
                if old is not None:
                    old[0].detach()
                _quietly_unlink(path)
                link.pin(path)
        counts = read_counters(old[2], old_keys) if old is not None and old[2] is not None \
            else {}
    finally:
        if old is not None:
            for o in old:
                if o is not None:
                    o.close()
    return counts


def remove(pin_dir: str) -> None:
    """Detach the pinned offloaded program and drop its pins (flush, or --offload dropped)."""
    old = None
    try:
        old = attached(pin_dir)
        if old is not None:
            old[0].detach()
    except BpfilterError:
        pass                    # defunct already (device deleted or moved away)
    finally:
        for o in old or ():
            if o is not None:
                o.close()
        import shutil
        shutil.rmtree(pin_dir, ignore_errors=True)


def _quietly_unlink(path: str):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
