"""BPF code for the extension targets REJECT, LOG and MARK (issue #6 item 2), called from
compile.py's target dispatch (handles() / emit() / refusal(); docs/targets.md).

A netfilter BPF program (flavor nf) can only answer NF_ACCEPT or NF_DROP: it cannot build a
packet or write the kernel log, and no flavor's program can. REJECT and LOG are therefore
"event-fed": the program copies what the reply or the log line needs into a BPF ring buffer
(map EVENTS_MAP, one per netns and family, pinned by engine.py through responder.open_events)
and the responder (responder.py, one process per netns and family) acts on it:

  REJECT  count the rule, record the event, drop (ipt_REJECT.c reject_tg() returns NF_DROP
          after sending the reply); the responder sends the TCP reset or ICMP error
  LOG     count the rule, record the event, go on with the next rule (xt_LOG.c returns
          XT_CONTINUE); the responder writes the line to /dev/kmsg

The event (little endian; EV_* offsets below) is self-contained: the target's parameters are
immediates of the program, so a ruleset replaced while events are in flight cannot make the
responder apply another rule's parameters. The packet is copied from the network header on, up
to EVENT_CAP bytes (nf: bpf_dynptr_read from the skb dynptr the prologue opened; tc:
bpf_skb_load_bytes): icmp_send quotes at most 576 - 20 - 8 bytes and icmpv6_send at most
IPV6_MIN_MTU - 40 - 8, so 1280 is enough for every reply and for the LOG line. Flavors nf and tc
record events; XDP is refused (no skb, nothing the stack would have answered yet).

MARK writes skb->mark (xt_MARK.c mark_tg) and continues. The skb is read-only to a netfilter
program, so MARK is refused on flavor nf naming the rule (refusal()); on flavor tc the program
writes __sk_buff->mark (tc_cls_act_is_valid_access() allows it), and XDP has no skb.
"""
from __future__ import annotations

import functools

from . import ebpf as E
from .ebpf import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Label

EVENTS_MAP = "events"                 # BPF_MAP_TYPE_RINGBUF
BPF_MAP_TYPE_RINGBUF = 27
EVENTS_BYTES = 1 << 20                # ring size: ~750 events in flight
BPF_FUNC_probe_read_kernel = 113
BPF_FUNC_ringbuf_reserve, BPF_FUNC_ringbuf_submit = 131, 132
BPF_FUNC_dynptr_read = 201
BPF_FUNC_skb_load_bytes = 26

KIND_REJECT, KIND_LOG = 1, 2
# event layout
EV_KIND, EV_PARAM, EV_HOOK, EV_FAMILY = 0, 4, 8, 12
EV_IN, EV_OUT, EV_MARK, EV_LEN, EV_CAPLEN = 16, 20, 24, 28, 32
EV_DEVTYPE, EV_HHLEN, EV_MACHDR, EV_NETHDR = 36, 38, 40, 42      # u16 each (skb->dev, offsets)
EV_HAVE_UID, EV_PKTTYPE = 44, 46                                  # u16 each
EV_UID, EV_GID, EV_RULE, EV_RTFLAGS = 48, 52, 56, 60
EV_MAC = 64            # 16 bytes at skb_mac_header()
EV_PREFIX = 80         # 32 bytes (xt_log_info.prefix, NUL-terminated)
EV_FLAGS = 112         # EVF_* below
EV_PKT = 120           # the packet from the network header on
EVENT_CAP = 1280
# the IP header is as it arrived: a FORWARD rule on tc runs before ip_forward() decrements the
# TTL / hop limit (the kernel's FORWARD hook sees the decremented header); the responder applies
# ip_decrease_ttl() to what it quotes and logs
EVF_TTL_PENDING = 1
EVENT_SIZE = EV_PKT + EVENT_CAP

TARGETS = ("REJECT", "LOG")          # event-fed, flavors nf and tc
SKB_MARK = 8                          # offsetof(struct __sk_buff, mark): writable at tc
XT_LOG_UID = 0x08                     # xt_LOG.h

REFUSED = {
    ("MARK", "nf"): "a netfilter BPF program cannot write skb->mark (the skb is read-only to "
                    "it); use flavor tc, where __sk_buff->mark is writable",
    ("MARK", "xdp"): "an XDP frame has no skb, hence no skb->mark; use flavor tc",
}


def handles(t, flavor: str) -> bool:
    """compile.py: this module emits the target (a decoded REJECT or LOG on flavor nf or tc,
    MARK on flavor tc)."""
    if isinstance(t.data, (bytes, bytearray)):
        return False
    if t.name == "LOG" and flavor == "tc" and t.data.logflags & XT_LOG_UID:
        return False
    return t.name in TARGETS and flavor in ("nf", "tc") or t.name == "MARK" and flavor == "tc"


def needs_packet(t) -> bool:
    """The target reads the packet: the prologue must open it even if no match does."""
    return getattr(t, "name", None) in TARGETS


def uses_events(table) -> bool:
    """Does any rule of `table` feed the responder (engine.py: ring buffer and responder)?"""
    return any(needs_packet(r.target) for c in table.chains for r in c.rules)


def refusal(t, flavor: str) -> str:
    why = REFUSED.get((t.name, flavor))
    if t.name in TARGETS and flavor == "xdp":
        why = ("an XDP program runs before the stack has an skb for the packet; REJECT and LOG "
               "are served by flavors nf and tc")
    if t.name == "LOG" and flavor == "tc":
        why = ("--log-uid needs the socket's file credentials, which a tc program cannot reach; "
               "use flavor nf")
    if why is None or isinstance(t.data, (bytes, bytearray)):
        return f"target {t.name}"
    return f"target {t.name} (flavor {flavor}: {why})"


_PATHS = {"ifindex": ("net_device", "ifindex"), "mark": ("sk_buff", "mark"),
          "dev": ("sk_buff", "dev"), "type": ("net_device", "type"),
          "hard_header_len": ("net_device", "hard_header_len"),
          "head": ("sk_buff", "head"), "mac_header": ("sk_buff", "mac_header"),
          "network_header": ("sk_buff", "network_header"),
          "sk": ("sk_buff", "sk"), "state": ("sock", "__sk_common.skc_state"),
          "socket": ("sock", "sk_socket"), "file": ("socket", "file"),
          "cred": ("file", "f_cred"), "fsuid": ("cred", "fsuid"), "fsgid": ("cred", "fsgid"),
          "sknet": ("sock", "__sk_common.skc_net"), "net": ("nf_hook_state", "net"),
          "refdst": ("sk_buff", "_skb_refdst"), "rt_flags": ("rtable", "rt_flags")}
_FAKE = dict(ifindex=224, mark=168, dev=16, type=536, hard_header_len=540, head=192,
             mac_header=182, network_header=180, sk=24, state=18, socket=288, file=16, cred=48,
             fsuid=32, fsgid=36, sknet=48, net=32, refdst=88, rt_flags=140,
             pkt_type=(128, 0, 7))
SKB_DST_NOREF = 1                     # low bit of skb->_skb_refdst (include/linux/skbuff.h)


@functools.lru_cache(maxsize=None)
def _facts(fake: bool) -> dict:
    if fake:
        return _FAKE
    from . import btf
    out = {k: btf.member_offset(*v) for k, v in _PATHS.items()}
    b = btf.vmlinux()
    bitoff, _t, bits = b._member_in(b._composite("sk_buff"), "pkt_type")
    out["pkt_type"] = (bitoff // 8, bitoff % 8, (1 << bits) - 1)
    return out


def _reject_param(t) -> int:
    return int(t.data["with"])


def _log_param(t) -> tuple:
    d = t.data
    return d.level | d.logflags << 8, bytes(d.prefix)


def emit(cc, t, rule, nxt: str):
    """After the rule's counter: record the event, then REJECT drops, LOG goes on at nxt;
    MARK writes the mark and goes on at nxt."""
    if t.name == "MARK":
        _mark(cc, t.data)
        cc.emit(E.ja(nxt, "MARK: XT_CONTINUE"))
    elif t.name == "REJECT":
        _event(cc, KIND_REJECT, _reject_param(t), rule, b"", False)
        cc.emit(E.mov(R0, cc.fl.DROP, comment="REJECT: NF_DROP, the responder replies"),
                E.exit_())
    else:
        param, prefix = _log_param(t)
        _event(cc, KIND_LOG, param, rule, prefix, bool(t.data.logflags & 0x08))
        cc.emit(E.ja(nxt, "LOG: XT_CONTINUE"))


def _mark(cc, d):
    """xt_MARK.c mark_tg(): skb->mark = (skb->mark & ~mask) ^ mark, written at once, so a later
    -m mark in the same traversal sees it (matchers.py reads __sk_buff->mark on tc each time)."""
    cc.emit(E.ldx(E.W, R1, R6, SKB_MARK, f"MARK --set-xmark {d.mark:#x}/{d.mask:#x}"),
            E.ld_imm64(R2, ~d.mask & 0xffffffff), E.alu(E.AND, R1, R2),
            E.ld_imm64(R2, d.mark), E.alu(E.XOR, R1, R2),
            E.stx(E.W, R6, SKB_MARK, R1, "__sk_buff->mark"))


def _peek_to(cc, ev_off: int, size: int, base_reg, off: int = 0):
    """event[ev_off..+size] = size bytes at base_reg + off (bpf_probe_read_kernel: zeros on a
    fault, so a NULL base reads as 0)."""
    cc.emit(E.mov(R3, base_reg), E.alu(E.ADD, R3, off), E.mov(R1, R8),
            E.alu(E.ADD, R1, ev_off), E.mov(R2, size), E.call(BPF_FUNC_probe_read_kernel))


def _event(cc, kind: int, param: int, rule, prefix: bytes, uid: bool):
    from .compile import KernelFacts
    f = _facts(cc.facts == KernelFacts.fake())
    done = cc.label("ev_done")
    cc.emit(E.ld_map_fd(R1, EVENTS_MAP), E.mov(R2, EVENT_SIZE), E.mov(R3, 0),
            E.call(BPF_FUNC_ringbuf_reserve, "event for the responder"),
            E.jmp(E.JEQ, R0, 0, done, comment="ring full: no event (the verdict stands)"),
            E.mov(R8, R0),
            E.st(E.W, R8, EV_KIND, kind), E.st(E.W, R8, EV_PARAM, param),
            E.st(E.W, R8, EV_HOOK, cc.chain.hook),
            E.st(E.W, R8, EV_FAMILY, 10 if cc.v6 else 2),
            E.st(E.W, R8, EV_RULE, rule.index), E.st(E.W, R8, EV_RTFLAGS, 0),
            E.st(E.H, R8, EV_HAVE_UID, 0), E.st(E.W, R8, EV_UID, 0), E.st(E.W, R8, EV_GID, 0),
            E.st(E.W, R8, EV_FLAGS, EVF_TTL_PENDING if cc.fl.name == "tc" and cc.chain.hook == 2
                 else 0), E.st(E.W, R8, EV_FLAGS + 4, 0))
    for i in range(0, 32, 4):
        cc.emit(E.st(E.W, R8, EV_PREFIX + i,
                     int.from_bytes(prefix[i:i + 4].ljust(4, b"\0"), "little", signed=True)))
    if cc.fl.name == "tc":
        _event_tc(cc)
    else:
        _event_nf(cc, f, uid)
    cc.emit(E.mov(R1, R8), E.mov(R2, 0), E.call(BPF_FUNC_ringbuf_submit), Label(done))


def _capped_len(cc, skip: str):
    """r9 = min(S_LEN, EVENT_CAP), also stored as the event's caplen; 0 goes to skip."""
    from .compile import S_LEN
    capped = cc.label("ev_capped")
    cc.emit(E.st(E.W, R8, EV_CAPLEN, 0),
            E.ldx(E.DW, R9, FP, S_LEN), E.jmp(E.JEQ, R9, 0, skip),
            E.jmp(E.JLE, R9, EVENT_CAP, capped),
            E.mov(R9, EVENT_CAP), Label(capped),
            E.stx(E.W, R8, EV_CAPLEN, R9))


def _event_nf(cc, f, uid: bool):
    """flavor nf: the hook state's devices, the skb's fields through the trusted skb pointer (r7)
    and the packet from the skb dynptr."""
    from .compile import S_DYNPTR, S_LEN
    for off, ev, what in ((cc.facts.state_in, EV_IN, "in"), (cc.facts.state_out, EV_OUT, "out")):
        have = cc.label(f"ev_{what}")
        cc.emit(E.ldx(E.DW, R1, R6, cc.facts.nf_ctx_state, "ctx->state"),
                E.ldx(E.DW, R2, R1, off, f"state->{what}"), E.mov(R3, 0),
                E.jmp(E.JEQ, R2, 0, have), E.ldx(E.W, R3, R2, f["ifindex"], f"{what}->ifindex"),
                Label(have), E.stx(E.W, R8, ev, R3))
    cc.emit(E.ldx(E.W, R1, R7, f["mark"], "skb->mark"), E.stx(E.W, R8, EV_MARK, R1),
            E.ldx(E.DW, R1, FP, S_LEN), E.stx(E.W, R8, EV_LEN, R1),
            E.ldx(E.H, R1, R7, f["mac_header"], "skb->mac_header"),
            E.stx(E.H, R8, EV_MACHDR, R1),
            E.ldx(E.H, R1, R7, f["network_header"], "skb->network_header"),
            E.stx(E.H, R8, EV_NETHDR, R1),
            E.ldx(E.DW, R9, R7, f["dev"], "skb->dev"))
    _peek_to(cc, EV_DEVTYPE, 2, R9, f["type"])
    _peek_to(cc, EV_HHLEN, 2, R9, f["hard_header_len"])
    cc.emit(E.ldx(E.DW, R9, R7, f["head"], "skb->head"),
            E.ldx(E.H, R1, R7, f["mac_header"]), E.alu(E.ADD, R9, R1))
    _peek_to(cc, EV_MAC, 16, R9)                     # skb_mac_header(skb)
    # skb->pkt_type and the route's rt_flags: icmp_send() answers only PACKET_HOST datagrams,
    # and neither it nor nf_send_reset() answers RTCF_BROADCAST/RTCF_MULTICAST routes
    byte, bit, mask = f["pkt_type"]
    cc.emit(E.ldx(E.B, R1, R7, byte, "skb->pkt_type"), E.alu(E.RSH, R1, bit),
            E.alu(E.AND, R1, mask), E.stx(E.H, R8, EV_PKTTYPE, R1))
    if not cc.v6:
        cc.emit(E.ldx(E.DW, R9, R7, f["refdst"], "skb->_skb_refdst"),
                E.alu(E.AND, R9, ~SKB_DST_NOREF))
        _peek_to(cc, EV_RTFLAGS, 4, R9, f["rt_flags"])                # skb_rtable()->rt_flags
    if uid:
        _uid_gid(cc, f)
    skip = cc.label("ev_nopkt")
    _capped_len(cc, skip)
    cc.emit(E.mov(R1, R8), E.alu(E.ADD, R1, EV_PKT), E.mov(R2, R9),
            E.mov(R3, FP), E.alu(E.ADD, R3, S_DYNPTR), E.mov(R4, 0), E.mov(R5, 0),
            E.call(BPF_FUNC_dynptr_read, "the packet from the network header"),
            E.jmp(E.JEQ, R0, 0, skip),
            E.st(E.W, R8, EV_CAPLEN, 0, "unreadable: no bytes"),
            Label(skip))


def _event_tc(cc):
    """flavor tc: __sk_buff (r6) gives ifindex, mark and pkt_type; the frame is read with
    bpf_skb_load_bytes (the MAC header at 0, the IP header at ETH_HLEN). INPUT/FORWARD run at
    ingress (in = this device; FORWARD's out = the FIB lookup's answer), OUTPUT at egress
    (out = this device). No route exists yet at ingress: rt_flags stays 0."""
    from .compile import S_LEN
    from .flavors import (BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, ETH_HLEN, S_FIB,
                          SKB_IFINDEX, SKB_PKT_TYPE, fib_lookup_insns)
    ingress = cc.chain.hook != 3
    cc.emit(E.ldx(E.W, R1, R6, SKB_IFINDEX, "skb->ifindex"),
            E.stx(E.W, R8, EV_IN if ingress else EV_OUT, R1),
            E.st(E.W, R8, EV_OUT if ingress else EV_IN, 0),
            E.ldx(E.W, R1, R6, SKB_MARK, "skb->mark"), E.stx(E.W, R8, EV_MARK, R1),
            E.ldx(E.DW, R1, FP, S_LEN), E.stx(E.W, R8, EV_LEN, R1),
            E.ldx(E.W, R1, R6, SKB_PKT_TYPE, "skb->pkt_type"), E.stx(E.H, R8, EV_PKTTYPE, R1),
            E.st(E.H, R8, EV_DEVTYPE, 1, "ARPHRD_ETHER: tc attaches to Ethernet devices"),
            E.st(E.H, R8, EV_HHLEN, ETH_HLEN),
            E.st(E.H, R8, EV_MACHDR, 0), E.st(E.H, R8, EV_NETHDR, ETH_HLEN if ingress else 0))
    if cc.chain.hook == 2:
        done = cc.label("ev_fib")
        cc.emit(*fib_lookup_insns(cc.fl, cc),
                E.jmp(E.JEQ, R0, BPF_FIB_LKUP_RET_SUCCESS, done + "_have"),
                E.jmp(E.JNE, R0, BPF_FIB_LKUP_RET_NO_NEIGH, done),
                Label(done + "_have"),
                E.ldx(E.W, R1, FP, S_FIB + 8, "params.ifindex: the output device"),
                E.stx(E.W, R8, EV_OUT, R1), Label(done))
    if ingress:
        cc.emit(E.mov(R1, R6), E.mov(R2, 0), E.mov(R3, R8), E.alu(E.ADD, R3, EV_MAC),
                E.mov(R4, ETH_HLEN), E.call(BPF_FUNC_skb_load_bytes, "the Ethernet header"))
    skip = cc.label("ev_nopkt")
    _capped_len(cc, skip)
    cc.emit(E.mov(R1, R6), E.mov(R2, ETH_HLEN), E.mov(R3, R8), E.alu(E.ADD, R3, EV_PKT),
            E.mov(R4, R9), E.call(BPF_FUNC_skb_load_bytes, "the packet from the IP header"),
            E.jmp(E.JEQ, R0, 0, skip),
            E.st(E.W, R8, EV_CAPLEN, 0, "unreadable: no bytes"),
            Label(skip))


def _uid_gid(cc, f):
    """nf_log_dump_sk_uid_gid(): skb->sk, a full socket of this netns with sk_socket->file:
    fsuid/fsgid of file->f_cred. The pointers are walked with bpf_probe_read_kernel into the
    event's UID/GID words (used as scratch first)."""
    no = cc.label("ev_nouid")
    TMP = EV_UID
    _peek_dw(cc, R7, f["sk"])                                          # r9 = skb->sk
    cc.emit(E.jmp(E.JEQ, R9, 0, no))
    _peek_to(cc, TMP, 1, R9, f["state"])
    cc.emit(E.ldx(E.B, R1, R8, TMP), E.jmp(E.JEQ, R1, 12, no, comment="TCP_NEW_SYN_RECV"),
            E.jmp(E.JEQ, R1, 6, no, comment="TCP_TIME_WAIT: not a full socket"))
    _peek_to(cc, TMP, 8, R9, f["sknet"])
    # state->net == sock_net(sk)?  (state is trusted: a plain load)
    cc.emit(E.ldx(E.DW, R1, R6, cc.facts.nf_ctx_state), E.ldx(E.DW, R2, R1, f["net"]),
            E.ldx(E.DW, R1, R8, TMP), E.jmp(E.JNE, R1, R2, no, comment="socket of another netns"))
    _peek_dw(cc, R9, f["socket"])
    cc.emit(E.jmp(E.JEQ, R9, 0, no))
    _peek_dw(cc, R9, f["file"])
    cc.emit(E.jmp(E.JEQ, R9, 0, no))
    _peek_dw(cc, R9, f["cred"])
    cc.emit(E.jmp(E.JEQ, R9, 0, no))
    _peek_to(cc, EV_UID, 4, R9, f["fsuid"])
    _peek_to(cc, EV_GID, 4, R9, f["fsgid"])
    cc.emit(E.st(E.H, R8, EV_HAVE_UID, 1), Label(no))
    nouid = cc.label("ev_uid_done")
    cc.emit(E.ldx(E.H, R1, R8, EV_HAVE_UID), E.jmp(E.JNE, R1, 0, nouid),
            E.st(E.W, R8, EV_UID, 0), E.st(E.W, R8, EV_GID, 0), Label(nouid))


def _peek_dw(cc, base_reg, off: int):
    """r9 = *(u64 *)(base_reg + off) through bpf_probe_read_kernel via the event's UID/GID words
    (8 bytes at EV_UID), which are rewritten afterwards."""
    _peek_to(cc, EV_UID, 8, base_reg, off)
    cc.emit(E.ldx(E.DW, R9, R8, EV_UID))
