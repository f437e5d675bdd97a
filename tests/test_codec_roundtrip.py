"""Codec round trips against the real kernel.

* test_roundtrip: a ruleset goes into a fresh namespace through iptables-legacy-restore (or
  ip6tables-legacy-restore), GET_INFO/GET_ENTRIES are read directly (tests/kernel_xt.py) and
  Table.decode(blob).encode() must give back the same bytes, with the same GET_INFO numbers.
* test_empty_table: Table.empty(name, family) is byte for byte the table a fresh namespace has.
* test_normalization: the decoded table is "dirtied" the way a caller may send it (random
  counters and comefrom, junk after the NUL of extension names, junk in limit's kernel-private
  part); decode_replace() of that buffer must predict exactly what the kernel then returns from
  GET_ENTRIES after the same buffer went through a raw IPT_SO_SET_REPLACE.
"""
import errno
import random

import pytest

import kernel_xt as kx
from bpfilter_umh import extensions as ext
from bpfilter_umh import uapi
from bpfilter_umh.model import Table, decode_replace
from nsutil import Netns

V4, V6 = uapi.NFPROTO_IPV4, uapi.NFPROTO_IPV6

RULESETS_V4 = {
    "empty-policies": """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
""",
    "user-chains-jumps-gotos": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:a - [0:0]
:b - [0:0]
:empty - [0:0]
-A INPUT -j a
-A INPUT -g b
-A INPUT -j empty
-A a -s 192.0.2.1 -j RETURN
-A a -j b
-A b -d 198.51.100.0/24 -j DROP
-A b -j RETURN
-A OUTPUT -j b
COMMIT
""",
    "every-inv-flag": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT ! -i veth+ -j DROP
-A FORWARD ! -o eth1 -j DROP
-A INPUT ! -s 192.0.2.0/24 -j DROP
-A INPUT ! -d 203.0.113.7 -j DROP
-A INPUT ! -f -j ACCEPT
-A INPUT -f -j DROP
-A INPUT ! -p udp -j ACCEPT
-A FORWARD ! -i a+ ! -o b+ ! -s 192.0.2.0/25 ! -d 198.51.100.128/25 ! -p tcp ! -f -j ACCEPT
COMMIT
""",
    "tcp-udp-icmp-options": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --sport 1:1023 ! --dport 22 -j ACCEPT
-A INPUT -p tcp --syn -j DROP
-A INPUT -p tcp ! --tcp-flags ALL NONE --tcp-option 2 -j DROP
-A INPUT -p tcp ! --sport 80 ! --dport 8000:9000 ! --tcp-option 3 -j DROP
-A INPUT -p udp --sport 53 --dport 1024: -j ACCEPT
-A INPUT -p udp ! --dport :100 -j DROP
-A INPUT -p icmp --icmp-type any -j ACCEPT
-A INPUT -p icmp --icmp-type 3/4 -j ACCEPT
-A INPUT -p icmp ! --icmp-type echo-reply -j DROP
-A OUTPUT -o lo -p tcp -m tcp --dport 443 -j ACCEPT
COMMIT
""",
    "counters": """*filter
:INPUT DROP [123:45678]
:FORWARD ACCEPT [1:2]
:OUTPUT ACCEPT [99999999999:888888888888]
:c - [0:0]
[5:500] -A INPUT -p tcp --dport 22 -j ACCEPT
[7:700] -A INPUT -j c
[3:33] -A c -j RETURN
COMMIT
""",
    "opaque-extensions": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m comment --comment "hello world" -j ACCEPT
-A INPUT -p icmp -m limit --limit 3/min --limit-burst 2 -j ACCEPT
-A INPUT -p tcp -m multiport --dports 22,80,443:445 -j LOG --log-prefix "mp " --log-level 4
-A INPUT -p tcp -j REJECT --reject-with tcp-reset
-A INPUT -p udp -j REJECT
-A FORWARD -m comment --comment x -m limit --limit 10/sec -j LOG
-A OUTPUT -p udp -m multiport --sports 53,5353 -j ACCEPT
COMMIT
""",
}

RULESETS_V6 = {
    "empty-policies": """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT DROP [0:0]
COMMIT
""",
    "chains-inv-options": """*filter
:INPUT ACCEPT [4:400]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:svc - [0:0]
:more - [0:0]
[1:80] -A INPUT ! -i veth+ -s 2001:db8::/32 -j svc
-A INPUT -g more
-A FORWARD ! -o eth+ ! -s 2001:db8:1::1 ! -d 2001:db8:2::/48 ! -p udp -j DROP
-A svc -p tcp --sport 1000:2000 ! --dport 22 --tcp-flags SYN,ACK SYN -j ACCEPT
-A svc -p udp ! --sport 53 -j RETURN
-A svc -p ipv6-icmp --icmpv6-type echo-request -j ACCEPT
-A svc -p ipv6-icmp ! --icmpv6-type 1/3 -j DROP
-A more -j RETURN
COMMIT
""",
    "opaque-extensions": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m comment --comment "v6 hello" -j ACCEPT
-A INPUT -p tcp -m multiport --dports 80,443 -m limit --limit 1/sec -j LOG --log-prefix "v6 "
-A INPUT -p tcp -j REJECT --reject-with tcp-reset
-A OUTPUT -p udp -j REJECT --reject-with icmp6-adm-prohibited
COMMIT
""",
}

CASES = [(V4, k) for k in RULESETS_V4] + [(V6, k) for k in RULESETS_V6]


def restore(ns: Netns, family: int, text: str) -> None:
    tool = "iptables-legacy-restore" if family == V4 else "ip6tables-legacy-restore"
    ns.run(f"{tool} -c", input=text)


def load(family: int, key: str):
    """Install a named ruleset in a fresh namespace; return (getinfo, entries blob)."""
    text = (RULESETS_V4 if family == V4 else RULESETS_V6)[key]
    with Netns() as ns:
        restore(ns, family, text)
        with ns.inside():
            return kx.snapshot(family)


@pytest.mark.parametrize("family,key", CASES, ids=[f"{'v4' if f == V4 else 'v6'}-{k}" for f, k in CASES])
def test_roundtrip(family, key):
    info, blob = load(family, key)
    table = Table.decode(blob, family, info.hook_entry, info.underflow, info.valid_hooks)
    assert table.encode() == blob
    assert table.getinfo_bytes() == uapi.ipt_getinfo.build(info)
    assert [r.index for r in table.entries()] == list(range(info.num_entries))


def test_roundtrip_decodes_fields():
    """The decoded model carries the kernel field names the compiler relies on."""
    info, blob = load(V4, "tcp-udp-icmp-options")
    t = Table.decode(blob, V4, info.hook_entry, info.underflow, info.valid_hooks)
    first = t.chain("INPUT").rules[0]
    assert first.ip.proto == uapi.IPPROTO_TCP
    tcp = first.matches[0]
    assert (tcp.name, tcp.revision) == ("tcp", 0)
    assert list(tcp.data.spts) == [1, 1023] and list(tcp.data.dpts) == [22, 22]
    assert tcp.data.invflags == 0x02
    icmp = t.chain("INPUT").rules[7].matches[0]
    assert (icmp.data.type, list(icmp.data.code)) == (3, [4, 4])
    info, blob = load(V4, "user-chains-jumps-gotos")
    t = Table.decode(blob, V4, info.hook_entry, info.underflow, info.valid_hooks)
    tg = [r.target for r in t.chain("INPUT").rules]
    assert (tg[0].chain, tg[0].goto, tg[1].chain, tg[1].goto) == ("a", False, "b", True)
    assert t.chain("empty").rules == [] and t.chain("empty").policy_entry is not None
    assert t.chain("INPUT").policy == -2


@pytest.mark.parametrize("family", [V4, V6])
@pytest.mark.parametrize("name", ["filter", "mangle", "raw", "security", "nat"])
def test_empty_table(netns, family, name):
    with netns.inside():
        try:
            info, blob = kx.snapshot(family, name)
        except OSError as e:
            pytest.skip(f"kernel has no {name} table for family {family}: {e}")
    table = Table.empty(name, family)
    assert table.encode() == blob
    assert table.getinfo_bytes()[32:] == uapi.ipt_getinfo.build(info)[32:]


def _dirty(table: Table, rng: random.Random) -> bytes:
    """Encode `table` the way a careless caller could: random counters/comefrom, junk after the
    NUL of match names and in the kernel-private part (after `usersize`) of payloads."""
    ents = table.entries()
    t = table.with_counters([(rng.getrandbits(40), rng.getrandbits(48)) for _ in ents])
    for e in t.entries():
        e.comefrom = rng.getrandbits(32)
    blob = bytearray(t.encode())
    lay = uapi.layout(t.family)
    junk = lambda n: bytes(rng.getrandbits(8) for _ in range(n))   # noqa: E731
    for e in t.entries():
        pos = e.offset + lay.entry_size
        for m in e.matches:
            size = int.from_bytes(blob[pos:pos + 2], "little")
            n = len(m.name) + 1
            blob[pos + 2 + n:pos + 31] = junk(29 - n)      # xt_obj_to_user copies strlen + 1
            x = ext.lookup(ext.MATCH, t.family, m.name, m.revision)
            if x is not None and x.usersize and size - 32 == uapi.XT_ALIGN(x.size):
                blob[pos + 32 + x.usersize:pos + 32 + x.size] = junk(x.size - x.usersize)
            pos += size
    return bytes(blob)


@pytest.mark.parametrize("family,key", CASES, ids=[f"{'v4' if f == V4 else 'v6'}-{k}" for f, k in CASES])
def test_normalization(family, key):
    rng = random.Random(key)
    info, blob = load(family, key)
    table = Table.decode(blob, family, info.hook_entry, info.underflow, info.valid_hooks)
    dirty = _dirty(table, rng)
    with Netns() as ns:
        with ns.inside():
            cur = kx.get_info(family)
            cb = kx.CounterBuffer(cur.num_entries)
            buf = kx.replace_buffer("filter", info.valid_hooks, info.num_entries, info.size,
                                    info.hook_entry, info.underflow, cur.num_entries, cb.address,
                                    dirty)
            hdr, predicted = decode_replace(buf, family)
            kx.set_replace(family, buf)
            got_info, got = kx.snapshot(family)
    assert predicted.encode() == got
    assert predicted.getinfo_bytes()[32:] == uapi.ipt_getinfo.build(got_info)[32:]
    assert hdr.name == "filter" and hdr.counters == cb.address


def test_replace_reports_kernel_errno_for_bad_name(netns):
    """Sanity of kernel_xt itself: an unknown table name gives ENOENT from GET_INFO."""
    with netns.inside():
        with pytest.raises(OSError) as ei:
            kx.get_info(V4, "nosuchtable")
    assert ei.value.errno == errno.ENOENT


def test_encode_with_live_counters():
    info, blob = load(V4, "counters")
    t = Table.decode(blob, V4, info.hook_entry, info.underflow, info.valid_hooks)
    live = [(i, 10 * i) for i in range(t.num_entries)]
    assert t.encode(counters=live) == t.with_counters(live).encode()
    assert [r.counters for r in Table.decode(t.encode(counters=live), V4, info.hook_entry,
                                             info.underflow, info.valid_hooks).entries()] == live
    assert t.encode() == blob      # the table itself is unchanged


@pytest.mark.parametrize("family,key", [(V4, "tcp-udp-icmp-options"), (V6, "chains-inv-options")])
def test_fast_structs_agree(family, key):
    """The struct-module twins used on the hot path read every entry header exactly as the
    construct definitions of ipt_entry/ip6t_entry and xt_entry_target do."""
    info, blob = load(family, key)
    lay = uapi.layout(family)
    fast = uapi.IPT_ENTRY_FAST if family == V4 else uapi.IP6T_ENTRY_FAST
    off = 0
    while off < len(blob):
        c = lay.entry.parse(blob[off:off + lay.entry_size])
        f = fast.unpack_from(blob, off)
        ip = c[lay.ip_key]
        want = [ip.src.packed, ip.dst.packed, ip.smsk.packed, ip.dmsk.packed, ip.iniface,
                ip.outiface, ip.iniface_mask, ip.outiface_mask, ip.proto]
        want += [ip.flags, ip.invflags] if family == V4 else [ip.tos, ip.flags, ip.invflags, ip.pad]
        want += [c.nfcache, c.target_offset, c.next_offset, c.comefrom]
        want += [] if family == V4 else [c.pad]
        want += [c.counters.pcnt, c.counters.bcnt]
        assert list(f) == want
        t = uapi.xt_entry_target.parse(blob[off + c.target_offset:off + c.target_offset + 32])
        assert uapi.XT_EXT_HDR_FAST.unpack_from(blob, off + c.target_offset) == \
            (t.target_size, t.name, t.revision)
        off += c.next_offset
    assert off == len(blob)
