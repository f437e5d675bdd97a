"""Differential error tests: the same malformed ipt_replace/ip6t_replace buffer goes to the real
kernel (raw IPT_SO_SET_REPLACE in a throwaway namespace) and to decode_replace(); the errno must
be the same, and the one written in the case.

Which kernel check each case exercises (net/ipv4/netfilter/ip_tables.c, net/netfilter/x_tables.c,
net/netfilter/xt_tcpudp.c; ip6_tables.c has the same functions with ip6 names):

| kernel function                    | check                                         | case(s)                                |
|------------------------------------|-----------------------------------------------|----------------------------------------|
| do_replace                         | len < sizeof(ipt_replace)                     | short-header                           |
| do_replace                         | num_counters >= INT_MAX / sizeof(xt_counters) | huge-num-counters (ENOMEM)             |
| do_replace                         | num_counters == 0                             | zero-num-counters                      |
| do_replace                         | len < size + sizeof(ipt_replace)              | size-beyond-buffer                     |
| xt_alloc_table_info                | size >= XT_MAX_TABLE_SIZE                     | test_table_size_limit (decode only)    |
| translate_table                    | i != num_entries                              | num-entries-more, num-entries-fewer    |
| check_entry_size_and_hooks         | entry alignment                               | misaligned-next-offset                 |
| check_entry_size_and_hooks         | e + sizeof(ipt_entry) >= limit                | truncated-size                         |
| check_entry_size_and_hooks         | e + next_offset > limit                       | next-offset-past-end                   |
| check_entry_size_and_hooks         | next_offset < entry + xt_entry_target         | next-offset-too-small                  |
| ip_checkentry / ip6_checkentry     | flags / invflags outside the masks            | bad-ip-flags, bad-ip-invflags          |
| xt_check_entry_offsets             | target_offset < sizeof(ipt_entry)             | target-offset-in-header                |
| xt_check_entry_offsets             | target_offset + sizeof(target) > next_offset  | target-offset-past-next                |
| xt_check_entry_offsets             | target_size < sizeof(xt_entry_target)         | target-size-small                      |
| xt_check_entry_offsets             | target_offset + target_size > next_offset     | target-size-past-next                  |
| xt_check_entry_offsets             | standard: XT_ALIGN(toff+36) != next_offset    | standard-next-offset                   |
| verdict_ok                         | verdict 0, NF_STOLEN, NF_STOP, < XT_RETURN    | verdict-zero, -stolen, -stop, -minus-9 |
| error_tg_ok                        | target_size != sizeof(xt_error_target), name  | error-size, error-unterminated         |
| xt_check_entry_match               | match_size < 32, > remaining                  | match-size-small, match-size-large     |
| check_underflow                    | conditional / RETURN / non-standard underflow | underflow-conditional, -return, -error |
| xt_check_table_hooks               | hook/underflow not on an entry, unsorted, dup | hook-not-entry, underflow-not-entry,   |
|                                    |                                               | hooks-unsorted, underflow-duplicate    |
| mark_source_chains                 | loop between chains                           | loop-two-chains, loop-self (ELOOP)     |
| mark_source_chains/xt_find_jump_offset | jump onto no entry                        | jump-mid-entry (ELOOP)                 |
| mark_source_chains                 | fall off the end of the table                 | fall-off-end (ELOOP)                   |
| xt_find_match (strnlen)            | extension name not NUL-terminated             | match-name-unterminated                |
| xt_request_find_match/_target      | unknown revision of tcp / standard target     | tcp-rev-1, standard-rev-1 (ENOENT)     |
| xt_check_match                     | payload size != XT_ALIGN(matchsize)           | tcp-size                               |
| xt_check_match                     | proto mismatch / inverted proto               | tcp-without-proto, tcp-inv-proto,      |
|                                    |                                               | icmp-on-udp                            |
| xt_check_target                    | standard target payload size                  | standard-target-size-36                |
| tcp_mt_check / udp_mt_check        | invflags outside XT_TCP/UDP_INV_MASK          | tcp-invflags, udp-invflags             |
| icmp_checkentry / icmp6_checkentry | invflags outside IPT_ICMP_INV / IP6T_ICMP_INV | icmp-invflags                          |
| (all checks pass)                  | a valid table is accepted                     | valid                                  |
"""
import errno

import pytest
from construct import Container

import kernel_xt as kx
from bpfilter_umh import extensions as ext
from bpfilter_umh import uapi
from bpfilter_umh.errors import BpfilterError
from bpfilter_umh.model import (XT_RETURN, Chain, IpHeader, Jump, Match, Rule, Table, Verdict,
                                check_against_installed, decode_add_counters, decode_replace,
                                error_target)
from nsutil import Netns

V4, V6 = uapi.NFPROTO_IPV4, uapi.NFPROTO_IPV6
ACCEPT, DROP = -2, -1


def _tcp(**kw):
    d = dict(spts=[0, 65535], dpts=[0, 65535], option=0, flg_mask=0, flg_cmp=0, invflags=0)
    d.update(kw)
    return Match("tcp", 0, Container(**d))


def _udp(**kw):
    d = dict(spts=[0, 65535], dpts=[0, 65535], invflags=0)
    d.update(kw)
    return Match("udp", 0, Container(**d))


def _icmp(family, **kw):
    d = dict(type=0xFF if family == V4 else 0xFF, code=[0, 255], invflags=0)
    d.update(kw)
    return Match("icmp" if family == V4 else "icmp6", 0, Container(**d))


def _ip(family, proto=0, **kw):
    ip = IpHeader.any(family)
    ip.proto = proto
    if family == V6 and proto:
        ip.flags |= uapi.IP6T_F_PROTO
    for k, v in kw.items():
        setattr(ip, k, v)
    return ip


def base_table(family) -> Table:
    """filter with INPUT: tcp→jump a, udp, icmp; user chains a → b; every entry reachable."""
    t = Table.empty("filter", family)
    inp = t.chain("INPUT")
    icmp_proto = uapi.IPPROTO_ICMP if family == V4 else uapi.IPPROTO_ICMPV6
    inp.rules = [
        Rule(_ip(family, uapi.IPPROTO_TCP), [_tcp(dpts=[22, 22])], Jump("a")),
        Rule(_ip(family, uapi.IPPROTO_UDP), [_udp(spts=[53, 53])], Verdict(ACCEPT)),
        Rule(_ip(family, icmp_proto), [_icmp(family)], Verdict(DROP)),
    ]
    ret = lambda: Rule(IpHeader.any(family), target=Verdict(XT_RETURN))   # noqa: E731
    a = Chain("a", head_entry=Rule(IpHeader.any(family), target=error_target("a")),
              rules=[Rule(_ip(family), target=Jump("b"))], policy_entry=ret())
    b = Chain("b", head_entry=Rule(IpHeader.any(family), target=error_target("b")),
              rules=[Rule(_ip(family, uapi.IPPROTO_TCP), [_tcp()], Verdict(DROP))],
              policy_entry=ret())
    t.chains += [a, b]
    t.layout()
    return t


class Buf:
    """An ipt_replace under construction: header fields + a mutable entries blob."""

    def __init__(self, table: Table, num_counters: int):
        self.t = table
        self.lay = uapi.layout(table.family)
        self.blob = bytearray(table.encode())
        self.hdr = dict(valid_hooks=table.valid_hooks, num_entries=table.num_entries,
                        size=len(self.blob), hook_entry=table.hook_entry,
                        underflow=table.underflow, num_counters=num_counters)
        self.extra_len = None       # override of the total buffer length

    def reencode(self):
        """After changing the model: new blob and header fields (keeping num_counters)."""
        self.blob = bytearray(self.t.encode())
        self.hdr.update(num_entries=self.t.num_entries, size=len(self.blob),
                        hook_entry=self.t.hook_entry, underflow=self.t.underflow)

    def entry(self, chain: str, k: int) -> Rule:
        return self.t.chain(chain).entries()[k]

    def u16(self, off, v):
        self.blob[off:off + 2] = v.to_bytes(2, "little")

    def u32(self, off, v, signed=False):
        self.blob[off:off + 4] = v.to_bytes(4, "little", signed=signed)

    # offsets inside an entry
    def f_next(self, e):
        return e.offset + (90 if self.lay.family == V4 else 142)

    def f_toff(self, e):
        return e.offset + (88 if self.lay.family == V4 else 140)

    def f_flags(self, e):
        return e.offset + (82 if self.lay.family == V4 else 131)

    def f_invflags(self, e):
        return e.offset + (83 if self.lay.family == V4 else 132)

    def f_proto(self, e):
        return e.offset + (80 if self.lay.family == V4 else 128)

    def target(self, e):
        return e.offset + int.from_bytes(self.blob[self.f_toff(e):self.f_toff(e) + 2], "little")

    def match(self, e, i=0):
        pos = e.offset + self.lay.entry_size
        for _ in range(i):
            pos += int.from_bytes(self.blob[pos:pos + 2], "little")
        return pos

    def build(self, counters_addr=0) -> bytes:
        b = kx.replace_buffer("filter", self.hdr["valid_hooks"], self.hdr["num_entries"],
                              self.hdr["size"], self.hdr["hook_entry"], self.hdr["underflow"],
                              self.hdr["num_counters"], counters_addr, bytes(self.blob))
        return b if self.extra_len is None else (b + b"\0" * 64)[:self.extra_len]


def case_standard_tail(b):
    # 8 bytes after a standard target: next_offset != XT_ALIGN(target_offset + 36)
    b.t.chain("INPUT").rules[1].tail = 8
    b.reencode()


def case_misaligned(b):
    e = b.entry("INPUT", 0)
    b.u16(b.f_next(e), int.from_bytes(b.blob[b.f_next(e):b.f_next(e) + 2], "little") + 4)


def case_std_verdict(v):
    def f(b):
        e = b.entry("INPUT", 1)
        b.u32(b.target(e) + 32, v, signed=True)
    return f


def case_hooks_unsorted(b):
    he = list(b.hdr["hook_entry"])
    he[1], he[2] = he[2], he[1]
    uf = list(b.hdr["underflow"])
    uf[1], uf[2] = uf[2], uf[1]
    b.hdr["hook_entry"], b.hdr["underflow"] = he, uf


def case_underflow_duplicate(b):
    uf = list(b.hdr["underflow"])
    uf[2] = uf[1]
    b.hdr["underflow"] = uf


def case_loop_two_chains(b):
    # b's rule jumps back to a
    t = b.t
    t.chain("b").rules[0] = Rule(IpHeader.any(t.family), target=Jump("a"))
    b.reencode()


def case_loop_self(b):
    t = b.t
    t.chain("a").rules[0] = Rule(IpHeader.any(t.family), target=Jump("a"))
    b.reencode()


def case_fall_off_end(b):
    # b's final RETURN becomes conditional: b then falls through onto the final ERROR entry
    t = b.t
    t.chain("b").policy_entry.ip.proto = 17
    if t.family == V6:
        t.chain("b").policy_entry.ip.flags = uapi.IP6T_F_PROTO
    b.reencode()


def case_jump_mid_entry(b):
    e = b.entry("a", 1)               # a's rule jumping to b
    tgt = b.t.chain("b").entries()[1].offset
    b.u32(b.target(e) + 32, tgt + 8)


def case_match_name_unterminated(b):
    e = b.entry("INPUT", 0)
    m = b.match(e)
    b.blob[m + 2:m + 31] = b"t" * 29


def case_rev(where):
    def f(b):
        e = b.entry("INPUT", 0)
        pos = b.match(e) if where == "match" else b.target(b.entry("INPUT", 1))
        b.blob[pos + 31] = 1
    return f


def case_tcp_size(b):
    # match_size 40 (payload 8 bytes) and target moved: rebuild via raw payload bytes
    t = b.t
    r = t.chain("INPUT").rules[0]
    r.matches[0] = Match("tcp", 0, ext.xt_tcp.build(r.matches[0].data)[:8])
    b.reencode()


def case_proto(proto=0, inv=False, rule=0):
    def f(b):
        e = b.entry("INPUT", rule)
        b.u16(b.f_proto(e), proto)
        if inv:
            b.blob[b.f_invflags(e)] |= uapi.XT_INV_PROTO
    return f


def case_payload_byte(rule, offset, value, chain="INPUT"):
    def f(b):
        e = b.entry(chain, rule)
        b.blob[b.match(e) + 32 + offset] = value
    return f


def case_std_target_size_36(b):
    e = b.entry("INPUT", 1)
    b.u16(b.target(e), 36)


def case_num(field, delta):
    def f(b):
        b.hdr[field] += delta
    return f


def case_set(field, value):
    def f(b):
        b.hdr[field] = value
    return f


def case_hook_list(field, hook, delta):
    def f(b):
        v = list(b.hdr[field])
        v[hook] += delta
        b.hdr[field] = v
    return f


def case_underflow_to(chain, k):
    def f(b):
        v = list(b.hdr["underflow"])
        v[1] = b.entry(chain, k).offset
        b.hdr["underflow"] = v
    return f


def case_set_u16(getter, value):
    def f(b):
        b.u16(getter(b), value)
    return f


def case_error_unterminated(b):
    e = b.entry("a", 0)
    b.blob[b.target(e) + 32:b.target(e) + 62] = b"x" * 30


CASES = {
    "valid": (lambda b: None, 0),
    "short-header": (lambda b: setattr(b, "extra_len", 95), errno.EINVAL),
    "huge-num-counters": (case_set("num_counters", uapi.INT_MAX // 16), errno.ENOMEM),
    "zero-num-counters": (case_set("num_counters", 0), errno.EINVAL),
    "size-beyond-buffer": (case_num("size", 8), errno.EINVAL),
    "num-entries-more": (case_num("num_entries", 1), errno.EINVAL),
    "num-entries-fewer": (case_num("num_entries", -1), errno.EINVAL),
    "misaligned-next-offset": (case_misaligned, errno.EINVAL),
    "truncated-size": (lambda b: (b.hdr.__setitem__("size", b.hdr["size"] - 60),
                                  b.blob.__delitem__(slice(len(b.blob) - 60, None))), errno.EINVAL),
    "next-offset-past-end": (lambda b: b.u16(b.f_next(b.t.tail_entry), 4000), errno.EINVAL),
    "next-offset-too-small": (lambda b: b.u16(b.f_next(b.entry("INPUT", 1)), 64), errno.EINVAL),
    "bad-ip-flags": (lambda b: b.blob.__setitem__(b.f_flags(b.entry("INPUT", 1)), 0x80),
                     errno.EINVAL),
    "bad-ip-invflags": (lambda b: b.blob.__setitem__(b.f_invflags(b.entry("INPUT", 1)), 0x80),
                        errno.EINVAL),
    "target-offset-in-header": (lambda b: b.u16(b.f_toff(b.entry("INPUT", 1)), 8), errno.EINVAL),
    "target-offset-past-next": (lambda b: b.u16(b.f_toff(b.entry("INPUT", 3)), 300),
                                errno.EINVAL),
    "target-size-small": (lambda b: b.u16(b.target(b.entry("a", 0)), 16), errno.EINVAL),
    "target-size-past-next": (lambda b: b.u16(b.target(b.entry("a", 0)), 72), errno.EINVAL),
    "standard-next-offset": (case_standard_tail, errno.EINVAL),
    "verdict-zero": (case_std_verdict(0), errno.EINVAL),
    "verdict-stolen": (case_std_verdict(-3), errno.EINVAL),
    "verdict-minus-9": (case_std_verdict(-9), errno.EINVAL),
    "verdict-stop": (case_std_verdict(-6), errno.EINVAL),
    "verdict-queue": (case_std_verdict(-4), 0),
    "error-size": (lambda b: b.u16(b.target(b.entry("a", 0)), 56), errno.EINVAL),
    "error-unterminated": (case_error_unterminated, errno.EINVAL),
    "match-size-small": (lambda b: b.u16(b.match(b.entry("INPUT", 0)), 24), errno.EINVAL),
    "match-size-large": (lambda b: b.u16(b.match(b.entry("INPUT", 0)), 56), errno.EINVAL),
    "underflow-conditional": (case_underflow_to("INPUT", 1), errno.EINVAL),
    "underflow-return": (case_underflow_to("a", 2), errno.EINVAL),
    "underflow-error": (case_underflow_to("a", 0), errno.EINVAL),
    "hook-not-entry": (case_hook_list("hook_entry", 2, 8), errno.EINVAL),
    "underflow-not-entry": (case_hook_list("underflow", 3, 8), errno.EINVAL),
    "hooks-unsorted": (case_hooks_unsorted, errno.EINVAL),
    "underflow-duplicate": (case_underflow_duplicate, errno.EINVAL),
    "loop-two-chains": (case_loop_two_chains, errno.ELOOP),
    "loop-self": (case_loop_self, errno.ELOOP),
    "fall-off-end": (case_fall_off_end, errno.ELOOP),
    "jump-mid-entry": (case_jump_mid_entry, errno.ELOOP),
    "match-name-unterminated": (case_match_name_unterminated, errno.EINVAL),
    "tcp-rev-1": (case_rev("match"), errno.ENOENT),
    "standard-rev-1": (case_rev("target"), errno.ENOENT),
    "tcp-size": (case_tcp_size, errno.EINVAL),
    "tcp-without-proto": (case_proto(0), errno.EINVAL),
    "tcp-inv-proto": (case_proto(uapi.IPPROTO_TCP, inv=True), errno.EINVAL),
    "icmp-on-udp": (case_proto(uapi.IPPROTO_UDP, rule=2), errno.EINVAL),
    "standard-target-size-36": (case_std_target_size_36, errno.EINVAL),
    "tcp-invflags": (case_payload_byte(0, 11, 0x10), errno.EINVAL),
    "udp-invflags": (case_payload_byte(1, 8, 0x04), errno.EINVAL),
    "icmp-invflags": (case_payload_byte(2, 3, 0x02), errno.EINVAL),
}


def ours(buf: bytes, family: int) -> int:
    try:
        decode_replace(buf, family)
    except BpfilterError as e:
        return e.errno
    return 0


def kernels(buf: bytes, family: int) -> int:
    try:
        kx.set_replace(family, buf)
    except OSError as e:
        return e.errno
    return 0


@pytest.fixture(scope="module")
def ns():
    with Netns() as n:
        yield n


@pytest.mark.parametrize("family", [V4, V6], ids=["v4", "v6"])
@pytest.mark.parametrize("case", list(CASES))
def test_error_matches_kernel(ns, case, family):
    fn, want = CASES[case]
    with ns.inside():
        cur = kx.get_info(family)
        cb = kx.CounterBuffer(cur.num_entries)
        b = Buf(base_table(family), cur.num_entries)
        fn(b)
        buf = b.build(cb.address)
        mine = ours(buf, family)
        theirs = kernels(buf, family)
    name = lambda e: errno.errorcode.get(e, e)   # noqa: E731
    assert (name(mine), name(theirs)) == (name(want), name(want))


def test_error_message_names_offset():
    b = Buf(base_table(V4), 4)
    case_std_verdict(0)(b)
    with pytest.raises(BpfilterError) as ei:
        decode_replace(b.build(), V4)
    off = b.entry("INPUT", 1).offset
    assert ei.value.errno == errno.EINVAL and f"offset {off}" in ei.value.message


def test_table_size_limit():
    """xt_alloc_table_info(): sizeof(xt_table_info) + size >= XT_MAX_TABLE_SIZE → ENOMEM. Only
    decode_replace() is exercised (the kernel side needs a 512 MiB copy); the buffer is an
    untouched anonymous mapping, so no memory is committed."""
    import mmap
    size = uapi.XT_MAX_TABLE_SIZE - uapi.SIZEOF_XT_TABLE_INFO
    hdr = kx.replace_buffer("filter", 14, 4, size, [0] * 5, [0] * 5, 4, 0, b"")
    m = mmap.mmap(-1, size + len(hdr))
    try:
        m[:len(hdr)] = hdr
        assert ours(m, V4) == errno.ENOMEM
    finally:
        m.close()
    hdr = kx.replace_buffer("filter", 14, 4, 8, [0] * 5, [0] * 5, 4, 0, b"")
    with pytest.raises(BpfilterError) as ei:        # one byte below the limit passes that check
        decode_replace(hdr + bytes(8), V4)
    assert ei.value.errno == errno.EINVAL


# --- the checks after translate_table() and IPT_SO_SET_ADD_COUNTERS ----------------------------
def _installed(family):
    info, blob = kx.snapshot(family)
    return Table.decode(blob, family, info.hook_entry, info.underflow, info.valid_hooks)


@pytest.mark.parametrize("family", [V4, V6], ids=["v4", "v6"])
@pytest.mark.parametrize("case,field,value,want", [
    ("bad-valid-hooks", "valid_hooks", 0x1F, errno.EINVAL),   # __do_replace: "You lied!"
    ("num-counters-off", "num_counters", 3, errno.EAGAIN),    # xt_replace_table()
])
def test_installed_checks_match_kernel(ns, family, case, field, value, want):
    """check_against_installed(): __do_replace()/xt_replace_table() checks vs the kernel."""
    with ns.inside():
        cur = kx.get_info(family)
        b = Buf(base_table(family), cur.num_entries)
        if field == "valid_hooks":      # a valid all-hooks (mangle-shaped) table sent to filter
            b = Buf(Table.empty("mangle", family), cur.num_entries)
            assert b.hdr["valid_hooks"] == value
        else:
            b.hdr[field] = value
        cb = kx.CounterBuffer(cur.num_entries)
        buf = b.build(cb.address)
        hdr, _ = decode_replace(buf, family)
        try:
            check_against_installed(hdr, _installed(family))
            mine = 0
        except BpfilterError as e:
            mine = e.errno
        theirs = kernels(buf, family)
    assert (mine, theirs) == (want, want)


def test_installed_missing_table():
    b = Buf(base_table(V4), 4)
    hdr, _ = decode_replace(b.build(), V4)
    with pytest.raises(BpfilterError) as ei:
        check_against_installed(hdr, None)
    assert ei.value.errno == errno.ENOENT


@pytest.mark.parametrize("family", [V4, V6], ids=["v4", "v6"])
@pytest.mark.parametrize("case,n,ncnt,extra", [
    ("valid", None, None, 0), ("fewer", -1, -1, 0), ("more", 1, 1, 0), ("zero", "0", "0", 0),
    ("length-mismatch", 0, 0, 8), ("short", "short", None, 0),
])
def test_add_counters_match_kernel(ns, family, case, n, ncnt, extra):
    """decode_add_counters() vs IPT_SO_SET_ADD_COUNTERS (xt_copy_counters, do_add_counters)."""
    with ns.inside():
        cur = kx.get_info(family)
        if n == "short":
            buf = b"filter".ljust(20, b"\0")
        else:
            num = 0 if n == "0" else cur.num_entries + (n or 0)
            cnt = 0 if ncnt == "0" else cur.num_entries + (ncnt or 0)
            buf = uapi.xt_counters_info.build(dict(name=b"filter".ljust(32, b"\0"),
                                                   num_counters=num))
            buf += b"".join((i + 1).to_bytes(8, "little") + (100 * i).to_bytes(8, "little")
                            for i in range(cnt)) + b"\0" * extra
        before = _installed(family)
        try:
            name, counters = decode_add_counters(buf, before.num_entries)
            mine = 0
        except BpfilterError as e:
            mine = e.errno
        try:
            kx.setsockopt(family, "SET_ADD_COUNTERS", buf)
            theirs = 0
        except OSError as e:
            theirs = e.errno
        after = _installed(family)
    assert mine == theirs == (0 if case == "valid" else errno.EINVAL)
    if case == "valid":
        assert name == "filter"
        want = [(a[0] + c[0], a[1] + c[1]) for a, c in
                zip([r.counters for r in before.entries()], counters)]
        assert [r.counters for r in after.entries()] == want
