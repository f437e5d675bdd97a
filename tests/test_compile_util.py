"""Helpers for the compiler/engine tests: build model Tables in code (entry indices and offsets in
blob order, as Table.decode would give them), craft IPv4 packets, test-run nf programs."""
from __future__ import annotations

import ipaddress
import struct

from bpfilter_umh.compile import COUNTERS_MAP, IPT_F_FRAG, IPT_F_GOTO
from bpfilter_umh.model import error_target
from bpfilter_umh.model import (AF_INET, NF_INET_FORWARD, NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT,
                                XT_RETURN, Chain, IpHeader, Jump, Match, Rule, Table,
                                Verdict)

ACCEPT, DROP, RETURN, QUEUE = Verdict(-2), Verdict(-1), Verdict(XT_RETURN), Verdict(-4)
HOOKS = {"INPUT": NF_INET_LOCAL_IN, "FORWARD": NF_INET_FORWARD, "OUTPUT": NF_INET_LOCAL_OUT}
NF_DROP, NF_ACCEPT = 0, 1


def _iface(name: str):
    """iptables' xtables_parse_interface: 'eth+' compares the prefix only, else name + NUL."""
    if not name:
        return bytes(16), bytes(16)
    if name.endswith("+"):
        base = name[:-1].encode()
        n = len(base)
    else:
        base = name.encode()
        n = len(base) + 1
    return base.ljust(16, b"\0"), (b"\xff" * n).ljust(16, b"\0")


def ip(src="0.0.0.0/0", dst="0.0.0.0/0", proto=0, iniface="", outiface="", frag=False, inv=0,
       goto=False) -> IpHeader:
    s, d = ipaddress.ip_network(src, strict=False), ipaddress.ip_network(dst, strict=False)
    inn, inm = _iface(iniface)
    outn, outm = _iface(outiface)
    return IpHeader(src=s.network_address, dst=d.network_address, smsk=s.netmask, dmsk=d.netmask,
                    iniface=inn, outiface=outn, iniface_mask=inm, outiface_mask=outm, proto=proto,
                    flags=(IPT_F_FRAG if frag else 0) | (IPT_F_GOTO if goto else 0), invflags=inv)


def rule(target=ACCEPT, *matches, **ipkw) -> Rule:
    if isinstance(target, Jump) and target.goto:
        ipkw["goto"] = True
    return Rule(ip=ip(**ipkw), matches=list(matches), target=target)


def jump(chain):
    return Jump(chain)


def goto(chain):
    return Jump(chain, goto=True)


def tcp(sport=(0, 65535), dport=(0, 65535), flags=(0, 0), option=0, inv=0) -> Match:
    return Match("tcp", 0, dict(spts=list(sport), dpts=list(dport), option=option,
                                flg_mask=flags[0], flg_cmp=flags[1], invflags=inv))


def udp(sport=(0, 65535), dport=(0, 65535), inv=0) -> Match:
    return Match("udp", 0, dict(spts=list(sport), dpts=list(dport), invflags=inv))


def icmp(type_=0xFF, code=(0, 0xFF), inv=0) -> Match:
    return Match("icmp", 0, dict(type=type_, code=list(code), invflags=inv))


def table(builtin: dict, user: dict = None, family: int = AF_INET, ip=ip,
          stride: int = 100) -> Table:
    """builtin: {"INPUT": (policy Verdict, [rules])}, user: {"name": [rules]}.
    Entries are numbered in blob order; offsets are index * stride (fake but unique); `ip`
    builds the family's empty ipt_ip / ip6t_ip6."""
    t = Table("filter", family, 0)
    idx = 0

    def place(r: Rule) -> Rule:
        nonlocal idx
        r.index, r.offset = idx, idx * stride
        idx += 1
        return r

    for name in ("INPUT", "FORWARD", "OUTPUT"):
        policy, rules = builtin.get(name, (ACCEPT, []))
        c = Chain(name, hook=HOOKS[name], policy=policy.verdict)
        c.rules = [place(r) for r in rules]
        c.policy_entry = place(Rule(ip=ip(), target=policy))
        t.valid_hooks |= 1 << c.hook
        t.chains.append(c)
    for name, rules in (user or {}).items():
        c = Chain(name)
        c.head_entry = place(Rule(ip=ip(), target=error_target(name)))
        c.rules = [place(r) for r in rules]
        c.policy_entry = place(Rule(ip=ip(), target=RETURN))
        t.chains.append(c)
    t.tail_entry = place(Rule(ip=ip(), target=error_target("ERROR")))
    return t


# ---- packets ---------------------------------------------------------------------------------

def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def ipv4(src="192.0.2.1", dst="192.0.2.2", proto=17, payload=b"", frag_off=0, mf=False,
         ihl=5) -> bytes:
    opts = b"\x01" * ((ihl - 5) * 4)
    tot = 20 + len(opts) + len(payload)
    fo = (frag_off & 0x1fff) | (0x2000 if mf else 0)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot, 1, fo, 64, proto, 0,
                    ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + opts
    h = h[:10] + struct.pack("!H", _csum(h)) + h[12:]
    return h + payload


def udp_hdr(sport=1000, dport=53, data=b"x" * 8) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def tcp_hdr(sport=1000, dport=80, flags=0x02, options=b"", doff=None, data=b"") -> bytes:
    options = options + b"\0" * (-len(options) % 4)
    if doff is None:
        doff = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 1024, 0, 0) + options + data


def icmp_hdr(type_=8, code=0, data=b"ping") -> bytes:
    return struct.pack("!BBHHH", type_, code, 0, 1, 1) + data


def ether(packet: bytes) -> bytes:
    return b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x02" + b"\x08\x00" + packet


def nf_ctx(hook: int) -> bytes:
    """struct nf_hook_state prefix for BPF_PROG_TEST_RUN: hook at byte 0, pf (NFPROTO_IPV4) at 1."""
    return bytes([hook, 2]) + bytes(6)


# ---- loading and test-running ------------------------------------------------------------------

class Runner:
    """A table compiled with the running kernel's facts, each chain's program loaded (not attached)
    with its own counters map, ready for BPF_PROG_TEST_RUN. Use as a context manager."""

    def __init__(self, tbl: Table):
        from bpfilter_umh import kernel as K
        from bpfilter_umh.compile import KernelFacts, compile_table
        self.K = K
        self.table = tbl
        self.compiled = compile_table(tbl, KernelFacts.from_btf())
        self.map = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, self.compiled.counters_entries,
                                name="counters")
        self.progs = {}
        try:
            for p in self.compiled.programs:
                self.progs[p.chain] = K.Prog.load(p.prog_type, p.assemble({COUNTERS_MAP: self.map.fd}),
                                                  license=p.license, name=p.name,
                                                  expected_attach_type=p.expected_attach_type)
        except BaseException:
            self.close()
            raise

    def run(self, chain: str, packet: bytes) -> int:
        """Verdict of `chain` for an IPv4 packet (NF_DROP 0 / NF_ACCEPT 1). bpf_prog_test_run_nf
        takes an Ethernet frame except at LOCAL_OUT, where data starts at the IP header."""
        hook = HOOKS[chain]
        data = packet if hook == NF_INET_LOCAL_OUT else ether(packet)
        ret, _dur, _ = self.progs[chain].test_run(data, nf_ctx(hook))
        return ret

    def counters(self) -> list:
        out = []
        for i in range(self.compiled.counters_entries):
            vals = [struct.unpack("<QQ", v) for v in self.map.lookup_percpu(i)]
            out.append((sum(v[0] for v in vals), sum(v[1] for v in vals)))
        return out

    def close(self):
        for p in self.progs.values():
            p.close()
        self.map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
