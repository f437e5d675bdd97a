"""Differential suite, hand-written: one ruleset per item of the issue (every ipt_ip field and
IPT_INV_* inversion, tcp, udp, icmp, every target kind, policies), each with probes placed on
the boundaries of what its rules match. Kernel iptables-legacy and bpfilter must deliver or drop
every probe alike and end with equal packet and byte counters on every entry."""
import os

import pytest

from lab import differential, number
from labfixtures import labs  # noqa: F401  (fixture)
from probes import (FRAG_BOTH, FRAG_FIRST, FRAG_LATER, FRAG_OFF1, FRAG_TINY, FRAG_WHOLE,
                    IPPROTO_ICMP, IPPROTO_OTHER, IPPROTO_TCP, IPPROTO_UDP, Probe)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

TCP, UDP, ICMP, OTHER = IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_OTHER
SYN, ACK, FIN, RST, PSH, URG = 2, 16, 1, 4, 8, 32
# one default route per hook: INPUT from c0 to the host, FORWARD c0 -> server side,
# OUTPUT host -> client side
DEFAULTS = {"INPUT": ("c0", "192.0.2.9", "192.0.2.1"),
            "FORWARD": ("c0", "192.0.2.9", "198.51.100.77"),
            "OUTPUT": ("host", "192.0.2.1", "192.0.2.10")}


def P(hook, **kw):
    sender, src, dst = DEFAULTS[hook]
    kw.setdefault("sender", sender)
    kw.setdefault("src", src)
    kw.setdefault("dst", dst)
    return Probe(hook, **kw)


def every_hook(**kw):
    return [P(h, **kw) for h in DEFAULTS]


def table(rules: str, inp="ACCEPT", fwd="ACCEPT", out="ACCEPT", chains=()) -> str:
    head = ["*filter", f":INPUT {inp} [0:0]", f":FORWARD {fwd} [0:0]", f":OUTPUT {out} [0:0]"]
    head += [f":{c} - [0:0]" for c in chains]
    return "\n".join(head + [r.strip() for r in rules.strip().splitlines()] + ["COMMIT", ""])


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------------------ ipt_ip fields
@case
def source_masks_and_inversion():
    t = table("""
        -A INPUT -s 192.0.2.9/32 -j DROP
        -A INPUT -s 203.0.113.0/25
        -A INPUT ! -s 203.0.113.0/24 -j ACCEPT
        -A INPUT -s 203.0.113.128/255.255.255.128 -j DROP
        -A FORWARD -s 198.51.7.3/255.255.0.255 -j DROP
        -A FORWARD ! -s 0.0.0.0/0 -j DROP
        -A FORWARD -s 0.0.0.0/0
        -A OUTPUT ! -s 192.0.2.1 -j DROP""")
    srcs = ["192.0.2.9", "192.0.2.8", "203.0.113.5", "203.0.113.127", "203.0.113.128",
            "203.0.113.254", "198.51.100.3", "198.51.100.200", "192.0.2.1"]
    return t, [P(h, src=s) for h in DEFAULTS for s in srcs if not (h == "INPUT" and s == "192.0.2.1")]


@case
def destination_masks_and_inversion():
    t = table("""
        -A INPUT -d 192.0.2.65 -j DROP
        -A INPUT ! -d 192.0.2.0/24 -j DROP
        -A FORWARD -d 198.51.100.0/26 -j DROP
        -A FORWARD ! -d 203.0.113.128/25
        -A FORWARD -d 203.0.113.250/255.255.255.254 -j DROP
        -A OUTPUT -d 192.0.2.0/255.255.255.192 -j DROP
        -A OUTPUT ! -d 192.0.2.0/25 -j ACCEPT""")
    ps = [P("INPUT", sender=s, dst=d) for s in ("c0", "s0")
          for d in ("192.0.2.1", "192.0.2.65", "192.0.2.129", "198.51.100.1", "203.0.113.1")]
    ps += [P("FORWARD", dst=d) for d in ("198.51.100.3", "198.51.100.63", "198.51.100.64",
                                         "203.0.113.129", "203.0.113.250", "203.0.113.251",
                                         "203.0.113.252")]
    ps += [P("OUTPUT", dst=d) for d in ("192.0.2.10", "192.0.2.67", "192.0.2.131", "198.51.100.3")]
    return t, ps


@case
def protocols_all_numbers_and_inversion():
    t = table("""
        -A INPUT -p tcp -j DROP
        -A INPUT -p 17
        -A INPUT ! -p icmp -j DROP
        -A FORWARD -p all
        -A FORWARD -p 0
        -A FORWARD -p 253 -j DROP
        -A FORWARD ! -p udp -j ACCEPT
        -A OUTPUT -p icmp -j DROP
        -A OUTPUT ! -p 253""")
    return t, [p for proto in (TCP, UDP, ICMP, OTHER) for p in every_hook(proto=proto)]


@case
def input_interfaces_wildcards_and_inversion():
    t = table("""
        -A INPUT -i eth0 -p tcp -j DROP
        -A INPUT -i eth+ -p udp -j DROP
        -A INPUT ! -i veth-a -p icmp -j DROP
        -A INPUT -i + -p 253
        -A INPUT ! -i s+ -p 253 -j DROP
        -A FORWARD -i veth+ -j DROP
        -A FORWARD ! -i eth1 -p tcp -j DROP
        -A FORWARD -i eth0+ -p udp -j DROP
        -A INPUT -i longifname12345 -p tcp -j DROP
        -A INPUT ! -i longifname1234+ -p udp
        -A FORWARD -i longifname1234 -j DROP
        -A FORWARD -i longifname1234+ -p icmp -j DROP""")
    ps = []
    for s in ("c0", "c1", "c2", "c3", "s0"):
        for proto in (TCP, UDP, ICMP, OTHER):
            ps.append(P("INPUT", sender=s, proto=proto))
            ps.append(P("FORWARD", sender=s, proto=proto,
                        dst="192.0.2.10" if s == "s0" else "198.51.100.77"))
    return t, ps


@case
def output_interfaces_wildcards_and_inversion():
    t = table("""
        -A FORWARD -o srv0 -p tcp -j DROP
        -A FORWARD ! -o eth+ -p udp -j DROP
        -A FORWARD -o + -p icmp
        -A FORWARD -o veth-a -p icmp -j DROP
        -A OUTPUT -o eth1 -j DROP
        -A OUTPUT ! -o e+ -p tcp -j DROP
        -A OUTPUT -o veth+ -p udp -j DROP
        -A OUTPUT -o s+ -p icmp -j DROP
        -A OUTPUT -o longifname12345 -p 253 -j DROP
        -A FORWARD ! -o longifname1234+ -p 253 -j DROP""")
    dsts = ["192.0.2.10", "192.0.2.67", "192.0.2.131", "203.0.113.5", "198.51.100.77",
            "203.0.113.100"]
    ps = []
    for d in dsts:
        for proto in (TCP, UDP, ICMP, OTHER):
            ps.append(P("OUTPUT", dst=d, proto=proto))
            if d != "192.0.2.10":
                ps.append(P("FORWARD", dst=d, proto=proto))
            else:
                ps.append(P("FORWARD", sender="s0", src="198.51.100.9", dst=d, proto=proto))
    return t, ps


@case
def interfaces_seen_from_user_chains():
    # a user chain reached from OUTPUT sees no input device (ipt_do_table's nulldevname): only
    # an all-wildcard "-i +" matches it; from INPUT no output device
    t = table("""
        -A INPUT -j both
        -A FORWARD -j both
        -A OUTPUT -j both
        -A both -i + -o + -p 253 -j DROP
        -A both -i eth+
        -A both -o eth+ -j DROP
        -A both ! -i eth0 -p udp -j DROP
        -A both ! -o srv0 -p icmp -j DROP
        -A both -i + -p tcp -j DROP""", chains=["both"])
    return t, [p for proto in (TCP, UDP, ICMP, OTHER) for p in every_hook(proto=proto)] + \
        [P("FORWARD", sender="c1", dst="192.0.2.10", proto=proto) for proto in (TCP, UDP)]


@case
def fragments_flag_and_inversion():
    t = table("""
        -A FORWARD -f -p udp -j DROP
        -A FORWARD ! -f -p tcp -j DROP
        -A FORWARD -f
        -A OUTPUT -f -j DROP
        -A INPUT -f -j DROP
        -A INPUT ! -f -p icmp -j DROP""")
    ps = []
    for proto in (TCP, UDP, ICMP, OTHER):
        for f in (FRAG_WHOLE, FRAG_BOTH, FRAG_FIRST, FRAG_LATER, FRAG_OFF1, FRAG_TINY):
            ps.append(P("FORWARD", proto=proto, frag=f))
            ps.append(P("OUTPUT", proto=proto, frag=f))
        for f in (FRAG_WHOLE, FRAG_BOTH):        # INPUT sees reassembled datagrams
            ps.append(P("INPUT", proto=proto, frag=f))
    return t, ps


@case
def ip_options_and_header_length():
    # the transport header starts after the IP options: ports and types must be read there
    t = table("""
        -A INPUT -p tcp -m tcp --dport 22 -j DROP
        -A FORWARD -p udp -m udp --sport 53 -j DROP
        -A OUTPUT -p icmp -m icmp --icmp-type echo-request -j DROP""")
    ps = []
    for opts in (False, True):
        ps += [P("INPUT", proto=TCP, dport=d, ip_opts=opts) for d in (22, 23)]
        ps += [P("FORWARD", proto=UDP, sport=s, ip_opts=opts) for s in (53, 54)]
        ps += [P("OUTPUT", proto=ICMP, icmp_type=t, ip_opts=opts) for t in (8, 0)]
    return t, ps


# ------------------------------------------------------------------------------------- tcp
@case
def tcp_ports_ranges_and_inversion():
    t = table("""
        -A INPUT -p tcp -m tcp --dport 22 -j DROP
        -A INPUT -p tcp -m tcp --sport 1000:2000 --dport 80:90 -j DROP
        -A INPUT -p tcp -m tcp ! --dport 0:1023
        -A INPUT -p tcp -m tcp ! --sport 5 ! --dport 443 -j DROP
        -A FORWARD -p tcp -m tcp --dport 65535 -j DROP
        -A FORWARD -p tcp -m tcp --sport :1023 -j DROP
        -A FORWARD -p tcp -m tcp --dport 8080: -j DROP
        -A OUTPUT -p tcp -m tcp --sport 0 -j DROP""")
    ports = [0, 1, 5, 21, 22, 23, 79, 80, 90, 91, 443, 999, 1000, 1023, 1024, 2000, 2001, 8079,
             8080, 65534, 65535]
    ps = []
    for i, p in enumerate(ports):
        q = ports[(i * 7 + 3) % len(ports)]
        for h in DEFAULTS:
            ps.append(P(h, proto=TCP, sport=q, dport=p))
            ps.append(P(h, proto=TCP, sport=p, dport=q))
    ps += [P(h, proto=TCP, sport=s, dport=d) for h in DEFAULTS
           for s, d in ((1000, 80), (2000, 90), (1500, 85), (2000, 8080), (5000, 9000))]
    return t, ps


@case
def tcp_flags_syn_and_inversion():
    t = table("""
        -A INPUT -p tcp -m tcp --syn -j DROP
        -A INPUT -p tcp -m tcp --tcp-flags ALL NONE -j DROP
        -A INPUT -p tcp -m tcp ! --tcp-flags ACK,FIN FIN
        -A FORWARD -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK
        -A FORWARD -p tcp -m tcp ! --syn -j DROP
        -A OUTPUT -p tcp -m tcp --tcp-flags ALL FIN,PSH,URG -j DROP
        -A OUTPUT -p tcp -m tcp --tcp-flags RST RST -j DROP""")
    flags = [0, SYN, SYN | ACK, ACK, FIN, FIN | ACK, RST, RST | ACK, PSH | ACK, FIN | PSH | URG,
             0x3F, SYN | 0x40, SYN | 0x80, 0xFF, SYN | FIN]
    return t, [P(h, proto=TCP, tcp_flags=f) for h in DEFAULTS for f in flags]


@case
def tcp_options_and_inversion():
    t = table("""
        -A INPUT -p tcp -m tcp --tcp-option 8 -j DROP
        -A INPUT -p tcp -m tcp ! --tcp-option 2
        -A FORWARD -p tcp -m tcp --tcp-option 30 -j DROP
        -A FORWARD -p tcp -m tcp ! --tcp-option 3 -j DROP
        -A OUTPUT -p tcp -m tcp --tcp-option 4 -j DROP""")
    sets = [(), (2,), (3,), (4,), (8,), (30,), (2, 3), (2, 3, 4, 8), (3, 30), (2, 4, 8, 30)]
    ps = [P(h, proto=TCP, tcp_opts=o) for h in DEFAULTS for o in sets]
    # options cut off by fragmentation: tcp_find_option cannot read them and hotdrops
    ps += [P("FORWARD", proto=TCP, tcp_opts=(2, 3, 4, 8), frag=FRAG_FIRST)]
    # a data offset below 5 words, or past the end of the packet: tcp_mt hotdrops (only when
    # it has an option to look for)
    ps += [P(h, proto=TCP, tcp_opts=o, tcp_doff=d, payload_len=8) for h in DEFAULTS
           for o, d in (((), 3), ((), 4), ((2,), 15), ((8,), 10), ((2, 3), 6))]
    return t, ps


@case
def tcp_fragments_hotdrop():
    # tcp_mt: a fragment at offset 8 bytes is dropped outright; a first fragment too short for
    # the TCP header is dropped; other non-first fragments simply do not match
    t = table("""
        -A FORWARD -p tcp -m tcp --dport 80 -j ACCEPT
        -A FORWARD -p udp -m udp --dport 80 -j ACCEPT
        -A FORWARD -p icmp -m icmp --icmp-type any -j ACCEPT
        -A FORWARD -j DROP
        -A OUTPUT -p tcp -m tcp ! --dport 80 -j ACCEPT""", out="DROP")
    ps = []
    for proto in (TCP, UDP, ICMP):
        for f in (FRAG_WHOLE, FRAG_FIRST, FRAG_LATER, FRAG_OFF1, FRAG_TINY):
            ps.append(P("FORWARD", proto=proto, dport=80, frag=f, payload_len=24))
            ps.append(P("OUTPUT", proto=proto, dport=81, frag=f, payload_len=24))
    return t, ps


# ------------------------------------------------------------------------------------- udp
@case
def udp_ports_ranges_and_inversion():
    t = table("""
        -A INPUT -p udp -m udp --dport 53 -j DROP
        -A INPUT -p udp -m udp --sport 100:200 ! --dport 1000:2000 -j DROP
        -A FORWARD -p udp -m udp ! --sport 1024:65535 -j DROP
        -A FORWARD -p udp -m udp --dport 0 -j DROP
        -A OUTPUT -p udp -m udp ! --dport 53 -j DROP""")
    ports = [0, 1, 52, 53, 54, 99, 100, 150, 200, 201, 999, 1000, 2000, 2001, 1023, 1024, 65535]
    ps = []
    for i, p in enumerate(ports):
        q = ports[(i * 5 + 2) % len(ports)]
        for h in DEFAULTS:
            ps.append(P(h, proto=UDP, sport=p, dport=q))
            ps.append(P(h, proto=UDP, sport=q, dport=p))
    ps += [P(h, proto=UDP, sport=s, dport=d) for h in DEFAULTS
           for s, d in ((5000, 0), (150, 999), (100, 2001), (200, 53))]
    return t, ps


# ------------------------------------------------------------------------------------ icmp
@case
def icmp_types_codes_names_any_and_inversion():
    t = table("""
        -A INPUT -p icmp -m icmp --icmp-type echo-request -j DROP
        -A INPUT -p icmp -m icmp --icmp-type 3/3 -j DROP
        -A INPUT -p icmp -m icmp ! --icmp-type destination-unreachable
        -A INPUT -p icmp -m icmp --icmp-type any
        -A FORWARD -p icmp -m icmp --icmp-type ttl-zero-during-transit -j DROP
        -A FORWARD -p icmp -m icmp ! --icmp-type 8/1 -j DROP
        -A OUTPUT -p icmp -m icmp --icmp-type timestamp-request -j DROP
        -A OUTPUT -p icmp -m icmp ! --icmp-type any -j DROP
        -A OUTPUT -p icmp -m icmp --icmp-type host-unreachable -j DROP""")
    types = [(0, 0), (3, 0), (3, 1), (3, 3), (3, 13), (8, 0), (8, 1), (11, 0), (11, 1), (12, 0),
             (13, 0), (14, 0), (17, 0)]
    return t, [P(h, proto=ICMP, icmp_type=a, icmp_code=b) for h in DEFAULTS for a, b in types]


# ---------------------------------------------------------------------------------- targets
@case
def accept_drop_and_policy_fallthrough_accept():
    t = table("""
        -A INPUT -p tcp -j ACCEPT
        -A INPUT -p udp -j DROP
        -A FORWARD -p icmp -j DROP
        -A OUTPUT -p 253 -j DROP""")
    return t, [p for proto in (TCP, UDP, ICMP, OTHER) for p in every_hook(proto=proto)]


@case
def policy_drop_fallthrough():
    t = table("""
        -A INPUT -p tcp -j ACCEPT
        -A INPUT -p udp
        -A FORWARD -p icmp -j ACCEPT
        -A OUTPUT -p udp -j ACCEPT""", inp="DROP", fwd="DROP", out="DROP")
    return t, [p for proto in (TCP, UDP, ICMP, OTHER) for p in every_hook(proto=proto)]


@case
def rules_without_target_only_count():
    t = table("""
        -A INPUT
        -A INPUT -p tcp
        -A INPUT -p tcp -m tcp --dport 22
        -A FORWARD
        -A FORWARD -p udp
        -A OUTPUT -p icmp
        -A OUTPUT""", fwd="DROP")
    return t, [p for proto in (TCP, UDP, ICMP) for d in (22, 23)
               for p in every_hook(proto=proto, dport=d)]


@case
def return_from_builtin_chain_is_policy():
    t = table("""
        -A INPUT -p tcp -j RETURN
        -A INPUT -j DROP
        -A FORWARD -p udp -j RETURN
        -A FORWARD -j ACCEPT
        -A OUTPUT -p icmp -j RETURN
        -A OUTPUT -j ACCEPT""", inp="ACCEPT", fwd="DROP", out="DROP")
    return t, [p for proto in (TCP, UDP, ICMP, OTHER) for p in every_hook(proto=proto)]


@case
def nested_jumps_and_returns():
    t = table("""
        -A INPUT -p tcp -j level1
        -A INPUT -p udp -j level1
        -A INPUT -j DROP
        -A FORWARD -j level1
        -A FORWARD -p tcp -j ACCEPT
        -A OUTPUT -p udp -j level1
        -A level1 -p tcp -m tcp --dport 22 -j ACCEPT
        -A level1 -j level2
        -A level1 -p udp -j ACCEPT
        -A level1 -p tcp -m tcp --dport 23 -j DROP
        -A level2 -p tcp -m tcp --dport 80 -j RETURN
        -A level2 -p tcp -j level3
        -A level2 -p udp -m udp --dport 53 -j DROP
        -A level3 -p tcp -m tcp --dport 443 -j ACCEPT
        -A level3 -p tcp -m tcp --dport 444 -j RETURN
        -A level3 -p tcp -m tcp --dport 445 -j DROP""",
              fwd="DROP", chains=["level1", "level2", "level3"])
    ps = [p for d in (22, 23, 53, 80, 443, 444, 445, 1000)
          for proto in (TCP, UDP) for p in every_hook(proto=proto, dport=d)]
    return t, ps + every_hook(proto=ICMP)


@case
def gotos_return_to_the_last_jump():
    # -g pushes nothing: a RETURN in the goto target resumes after the last -j, or at the
    # policy when the chain was only reached by gotos from a built-in chain
    t = table("""
        -A INPUT -p tcp -g g1
        -A INPUT -p udp -j j1
        -A INPUT -j ACCEPT
        -A FORWARD -p tcp -g g1
        -A FORWARD -j j1
        -A FORWARD -j DROP
        -A OUTPUT -g g2
        -A OUTPUT -j DROP
        -A j1 -p udp -m udp --dport 53 -g g1
        -A j1 -p udp -m udp --dport 54 -g g2
        -A j1 -p udp -j DROP
        -A j1 -j ACCEPT
        -A g1 -p tcp -m tcp --dport 22 -j DROP
        -A g1 -p tcp -m tcp --dport 23 -j g2
        -A g1 -p tcp -m tcp --dport 24 -g g2
        -A g1 -j RETURN
        -A g2 -p tcp -m tcp --dport 23 -j RETURN
        -A g2 -p udp -j RETURN
        -A g2 -p tcp -m tcp --dport 24 -j ACCEPT
        -A g2 -j DROP""", inp="DROP", fwd="ACCEPT", out="ACCEPT", chains=["j1", "g1", "g2"])
    ps = [p for d in (22, 23, 24, 25, 53, 54, 55)
          for proto in (TCP, UDP) for p in every_hook(proto=proto, dport=d)]
    return t, ps + every_hook(proto=ICMP)


@case
def empty_user_chains_and_unreferenced_chains():
    t = table("""
        -A INPUT -j empty
        -A INPUT -p tcp -g empty
        -A FORWARD -j empty
        -A OUTPUT -p udp -g empty
        -A unused -j DROP""", inp="DROP", chains=["empty", "unused"])
    return t, [p for proto in (TCP, UDP, ICMP) for p in every_hook(proto=proto)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_handwritten(name, labs):
    ref, cand = labs
    text, probes = CASES[name]()
    probes = number(probes)
    diffs = differential(ref, cand, text, probes)
    assert not diffs, f"case {name}\n{text}\n" + "\n".join(diffs)


REAL_RULES = table("""
    -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
    -A INPUT -p tcp -m tcp --dport 23 -j DROP
    -A INPUT -p udp -m udp --dport 53 -j ACCEPT
    -A INPUT -p udp -m udp --dport 54 -j DROP
    -A INPUT -p icmp -m icmp --icmp-type echo-request -j ACCEPT
    -A FORWARD -p tcp -m tcp --dport 80 -j ACCEPT
    -A FORWARD -p tcp -m tcp --sport 80 -j ACCEPT
    -A FORWARD -p udp -j DROP
    -A FORWARD -p icmp -j ACCEPT
    -A OUTPUT -p udp -m udp --sport 55 -j DROP
    -A OUTPUT -p tcp -m tcp --sport 81 -j DROP""", fwd="DROP")


def real_traffic(lab):
    """Connections and exchanges with the kernel's own sockets, through INPUT/OUTPUT (to the
    host) and FORWARD (to the server)."""
    out = {}
    for port in (22, 23, 24, 81):
        out[f"tcp host:{port}"] = lab.tcp_connect("host", "192.0.2.1", port)
    for port in (80, 443):
        out[f"tcp server:{port}"] = lab.tcp_connect("server", "198.51.100.2", port)
    for port in (53, 54, 55):
        out[f"udp host:{port}"] = lab.udp_exchange("host", "192.0.2.1", port)
    out["udp server:53"] = lab.udp_exchange("server", "198.51.100.2", 53)
    out["ping host"] = lab.ping("192.0.2.1")
    out["ping server"] = lab.ping("198.51.100.2")
    return out


def test_real_sockets(labs):
    ref, cand = labs
    results, counters = [], []
    for lab in (ref, cand):
        lab.load(REAL_RULES)
        results.append(real_traffic(lab))
        counters.append(lab.counters())
    assert results[0] == results[1]
    assert results[0]["tcp host:22"] == "connected" and results[0]["tcp host:23"] == "timeout"
    assert counters[0] == counters[1]
