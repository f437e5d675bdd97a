"""Issue #6, the match addrtype (bpfilter_umh/addrtype.py): differential against kernel
iptables-legacy with real packets through the lab, counters equal; the mirror of the local
routing table follows a route added after the install with no iptables command, and the
watcher process goes away with the rules."""
import ipaddress
import os
import socket
import struct
import time

import pytest

from lab import differential, number
from labfixtures import labs  # noqa: F401  (fixture)
from test_differential_ext import P

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

# routes added to the host's local table (255) in both labs, beside the kernel's own
LOCAL_ROUTES = ["local 198.51.100.128/25 dev lo",           # a whole local range (dev lo)
                "broadcast 192.0.2.63 dev eth0",            # a broadcast address
                "unreachable 192.0.2.100"]                  # an error type: inet_addr_type
                                                            # says UNICAST for it
SO_BROADCAST = 6


def _prepare(lab):
    for r in LOCAL_ROUTES:
        lab.host.run(f"ip route replace {r} table local")
    for s in lab.senders.values():     # sending to a broadcast address needs SO_BROADCAST
        s.setsockopt(socket.SOL_SOCKET, SO_BROADCAST, 1)


def _table(rules: str) -> str:
    head = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    return "\n".join(head + [r.strip() for r in rules.strip().splitlines()] + ["COMMIT", ""])


RULES = _table("""
    -A INPUT -p udp --dport 9 -m addrtype --dst-type LOCAL -j DROP
    -A INPUT -m addrtype --src-type BROADCAST
    -A INPUT -m addrtype ! --dst-type LOCAL
    -A INPUT -m addrtype --dst-type BROADCAST -j DROP
    -A INPUT -m addrtype --dst-type LOCAL --limit-iface-in
    -A INPUT -m addrtype --dst-type LOCAL
    -A FORWARD -m addrtype --src-type UNREACHABLE
    -A FORWARD -m addrtype --src-type BROADCAST -j DROP
    -A FORWARD -m addrtype --src-type UNICAST --dst-type UNICAST
    -A FORWARD -m addrtype ! --src-type UNICAST
    -A OUTPUT -m addrtype --src-type LOCAL --dst-type BROADCAST,MULTICAST -j DROP
    -A OUTPUT -m addrtype --src-type LOCAL --limit-iface-out
    -A OUTPUT -m addrtype ! --src-type LOCAL -j DROP
    -A OUTPUT -m addrtype --src-type LOCAL
""")


def _probes():
    ps = []
    for dst in ("192.0.2.1", "203.0.113.1", "198.51.100.130", "198.51.100.255", "192.0.2.63"):
        for dport in (9, 53):
            ps.append(P("INPUT", proto=17, dport=dport, dst=dst))
    ps.append(P("INPUT", proto=17, dport=67, src="0.0.0.0", dst="255.255.255.255"))
    for src in ("192.0.2.9", "192.0.2.100", "192.0.2.63", "0.0.0.0"):
        ps.append(P("FORWARD", proto=17, dport=53, src=src, dst="198.51.100.77"))
    for src, dst in (("192.0.2.1", "192.0.2.10"), ("192.0.2.1", "198.51.100.77"),
                     ("198.51.100.1", "198.51.100.77"), ("192.0.2.1", "192.0.2.63"),
                     ("192.0.2.1", "224.0.0.9"), ("192.0.2.9", "192.0.2.10")):
        ps.append(P("OUTPUT", proto=17, dport=53, src=src, dst=dst))
    return ps


def test_addrtype_differential(labs):
    ref, cand = labs
    for lab in labs:
        _prepare(lab)
    probes = number(_probes())
    diffs = differential(ref, cand, RULES, probes)
    assert not diffs, "\n".join(diffs)
    # the ruleset is not vacuous: every kind of answer was given by the oracle
    c = ref.counters()
    # (no source-BROADCAST packet gets this far: a raw socket fills in a 0.0.0.0 source, and
    # ip_route_input_slow() drops a broadcast one as martian)
    for key in (("INPUT", 0), ("INPUT", 2), ("INPUT", 3), ("INPUT", 4),
                ("INPUT", 5), ("FORWARD", 2), ("OUTPUT", 0), ("OUTPUT", 1), ("OUTPUT", 2)):
        assert c[key][0] > 0, f"{key} never matched in the kernel: {c}"
    assert c[("FORWARD", 0)][0] == 0          # an unreachable route reads as UNICAST
    # --limit-iface-in: only the address of the interface the packet came in on counts
    assert 0 < c[("INPUT", 4)][0] < c[("INPUT", 4)][0] + c[("INPUT", 5)][0]


def _pkt(lab, dst):
    return number([P("INPUT", proto=17, dport=7, dst=dst)], start=900)


def test_route_added_after_install_is_seen_without_iptables(labs):
    """A local route added after the install changes what the installed rule matches, in the
    kernel and in bpfilter alike, with no iptables command; the lag of the mirror is measured."""
    from bpfilter_umh import addrtype
    from bpfilter_umh import kernel as K
    ref, cand = labs
    text = _table("""
        -A INPUT -p udp --dport 7 -m addrtype --dst-type LOCAL -j DROP
        -A FORWARD -p udp --dport 7 -m addrtype ! --dst-type LOCAL
    """)
    dst, net = "203.0.113.200", "203.0.113.192/27"
    for lab in labs:
        lab.host.run(f"ip route del local {net} dev lo table local", check=False)
        lab.load(text)
    before = [lab.send(_pkt(lab, dst)) for lab in labs]
    assert before[0] == before[1] and before[0][900]                         # forwarded
    with cand.host.inside():
        pin = addrtype.pin_path(K.netns_cookie())
        assert addrtype.running()
    key = struct.pack("<I", 32) + ipaddress.IPv4Address(dst).packed
    m = K.Map.from_pin(pin)
    try:
        assert m.lookup(key) is None
        from pyroute2 import IPRoute
        with cand.host.inside(), IPRoute() as ipr:
            ipr.route("add", dst=net, type="local", scope="host",
                      table=addrtype.RT_TABLE_LOCAL, oif=1)
            t0 = time.monotonic()           # the kernel has the route (netlink ack)
        lag = None
        while time.monotonic() - t0 < 2:
            v = m.lookup(key)
            if v is not None and struct.unpack("<II", bytes(v))[0] == addrtype.RTN_LOCAL:
                lag = time.monotonic() - t0
                break
            time.sleep(0.0005)
        assert lag is not None, "the mirror did not follow the new route within 2 s"
        print(f"addrtype mirror lag after the route's netlink ack: {lag * 1000:.2f} ms")
        ref.host.run(f"ip route add local {net} dev lo table local")
        after = [lab.send(_pkt(lab, dst)) for lab in labs]
        assert after[0] == after[1] == {900: ()}                             # now local: DROP
        assert ref.counters() == cand.counters()
        # and back: the route goes, the address is forwarded again
        for lab in labs:
            lab.host.run(f"ip route del local {net} dev lo table local")
        t0 = time.monotonic()
        while m.lookup(key) is not None and time.monotonic() - t0 < 2:
            time.sleep(0.0005)
        assert m.lookup(key) is None
        again = [lab.send(_pkt(lab, dst)) for lab in labs]
        assert again[0] == again[1] and again[0][900]
        assert ref.counters() == cand.counters()
    finally:
        m.close()


def test_watcher_stops_with_the_rules(labs):
    from bpfilter_umh import addrtype, daemons
    from bpfilter_umh import kernel as K
    ref, cand = labs
    cand.load(_table("-A INPUT -m addrtype --dst-type LOCAL"))
    with cand.host.inside():
        assert addrtype.running()
        pin = addrtype.pin_path(K.netns_cookie())
        pidfile = addrtype._pidfile()
        pid = daemons.running(pidfile)
    assert os.path.exists(pin) and pid
    cand.load(_table("-A INPUT -p udp"))
    assert not os.path.exists(pin)
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().split()[2] == "Z"


REV0_RULES = _table("""
    -A INPUT -p udp --dport 9 -m addrtype --src-type UNICAST -j DROP
    -A INPUT -m addrtype --dst-type LOCAL
    -A INPUT -m addrtype ! --dst-type LOCAL
    -A INPUT -m addrtype --dst-type BROADCAST
    -A FORWARD -m addrtype --src-type UNICAST --dst-type UNICAST
    -A OUTPUT -m addrtype ! --src-type LOCAL -j DROP
    -A OUTPUT -m addrtype --src-type LOCAL --dst-type BROADCAST,MULTICAST
""")


def _as_rev0(table):
    """Every addrtype match of `table` as revision 0 (what iptables sends a kernel without rev
    1). The BROADCAST one gets invert_dest = 2: addrtype_mt_v0() computes `ret &= bool ^ u32`
    into a bool, so only bit 0 of the invert field counts and 2 means "not inverted"."""
    from construct import Container
    from bpfilter_umh.model import Match
    from bpfilter_umh import xt_ext as X
    for r in table.entries():
        out = []
        for m in r.matches:
            if m.name == "addrtype":
                d = m.data
                inv_d = 2 if d.dest & X.XT_ADDRTYPE_BROADCAST and not d.flags else \
                    int(bool(d.flags & X.XT_ADDRTYPE_INVERT_DEST))
                m = Match("addrtype", 0, Container(
                    source=d.source, dest=d.dest,
                    invert_source=d.flags & X.XT_ADDRTYPE_INVERT_SOURCE, invert_dest=inv_d))
            out.append(m)
        r.matches = out
    table.layout()
    return table


def test_revision0_differential(labs):
    """Revision 0 (IPv4 only) as the kernel runs it, installed in the kernel with a crafted
    IPT_SO_SET_REPLACE and in bpfilter with the engine: same verdicts, same counters."""
    import kernel_xt as kx
    from lab import kernel_snapshot, restore
    from bpfilter_umh.model import AF_INET
    ref, cand = labs
    if not hasattr(cand.installer, "engine"):
        pytest.skip("needs the engine installer: iptables itself never sends revision 0 while "
                    "the helper admits to revision 1")
    for lab in labs:
        _prepare(lab)
    restore(cand.installer.scratch, REV0_RULES)
    table = _as_rev0(kernel_snapshot(cand.installer.scratch))
    assert {m.revision for r in table.entries() for m in r.matches if m.name == "addrtype"} \
        == {0}
    blob = table.encode()
    with ref.host.inside():
        old = kx.get_info(AF_INET).num_entries
        cb = kx.CounterBuffer(old)
        kx.set_replace(AF_INET, kx.replace_buffer(
            "filter", table.valid_hooks, len(table.entries()), len(blob), table.hook_entry,
            table.underflow, old, cb.address, blob))
    with cand.host.inside():
        cand.installer.engine.install(table)
    cand.installer.table = table
    probes = number(_probes())
    o_ref, o_cand = ref.send(probes), cand.send(probes)
    diffs = [f"{p.describe()}: kernel {o_ref[p.ident]} bpfilter {o_cand[p.ident]}"
             for p in probes if o_ref[p.ident] != o_cand[p.ident]]
    c_ref, c_cand = ref.counters(), cand.counters()
    diffs += [f"{k}: kernel {c_ref.get(k)} bpfilter {c_cand.get(k)}"
              for k in sorted(set(c_ref) | set(c_cand), key=str) if c_ref.get(k) != c_cand.get(k)]
    assert not diffs, "\n".join(diffs)
    assert c_ref[("INPUT", 3)][0] > 0 and c_ref[("INPUT", 1)][0] > 0 and \
        c_ref[("INPUT", 2)][0] > 0


def test_mirror_entries_follow_the_kernels_lookup():
    """What the trie holds for a local table: the address classes win over routes inside them,
    TOS and dead/link-down routes are left out (fib_table_lookup skips them), error types read
    as UNICAST, the first alias of a prefix answers."""
    from bpfilter_umh import addrtype as A

    def k(a, n):
        return struct.pack("<I", n) + ipaddress.IPv4Address(a).packed

    def v(t, oif):
        return struct.pack("<II", t, oif)

    got = A.entries_from_routes([
        ("192.0.2.1", 32, A.RTN_LOCAL, 0, 0, 3),
        ("192.0.2.1", 32, A.RTN_BROADCAST, 0, 0, 4),          # second alias: ignored
        ("192.0.2.2", 32, A.RTN_LOCAL, 0x10, 0, 3),           # TOS route
        ("192.0.2.3", 32, A.RTN_LOCAL, 0, A.RTNH_F_LINKDOWN, 3),
        ("192.0.2.4", 32, A.RTN_PROHIBIT, 0, 0, None),
        ("224.1.2.3", 32, A.RTN_LOCAL, 0, 0, 1),              # inside 224.0.0.0/4
        (None, 0, A.RTN_LOCAL, 0, 0, 1),                      # default local route: kept
    ])
    assert got == {k("192.0.2.1", 32): v(A.RTN_LOCAL, 3),
                   k("192.0.2.4", 32): v(A.RTN_UNICAST, 0),
                   k("0.0.0.0", 0): v(A.RTN_LOCAL, 1),
                   k("0.0.0.0", 8): v(A.RTN_BROADCAST, A.ANY_DEV),
                   k("255.255.255.255", 32): v(A.RTN_BROADCAST, A.ANY_DEV),
                   k("224.0.0.0", 4): v(A.RTN_MULTICAST, A.ANY_DEV)}
