"""The classifier (bpfilter_umh/classify.py): which rules form runs, what the maps hold, and, on the
real kernel with BPF_PROG_TEST_RUN, that a classified chain gives the same verdict and the same
per-entry counters as the same chain compiled as linear code, for seeded random tables whose runs
overlap (nested prefixes, duplicate ports, port ranges, RETURN in a user chain) and packets aimed
at them (fragments, tcp at offset 8 bytes, truncated headers).

The linear compiler is itself checked against the kernel by the differential suites; the
10 000-rule comparison against the kernel is tests/test_differential_large.py."""
import ipaddress
import os
import random
import re
import struct

import pytest

from test_compile_util import (ACCEPT, DROP, RETURN, HOOKS, ether, goto, icmp, icmp_hdr, ipv4,
                               jump, nf_ctx, rule, table, tcp, tcp_hdr, udp, udp_hdr)
from bpfilter_umh import classify
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF maps and programs")


# ---- shapes and runs (pure) -------------------------------------------------------------------

def test_runs_split_at_other_shapes(monkeypatch):
    rules = [rule(DROP, src=f"10.0.{i}.0/24") for i in range(5)]
    rules += [rule(ACCEPT, iniface="eth0")]                         # not classifiable
    rules += [rule(DROP, dst=f"10.1.{i}.0/24") for i in range(5)]   # another shape
    rules += [rule(ACCEPT, tcp(dport=(p, p)), proto=6) for p in range(3)]
    assert [(r.kind, r.start, r.end) for r in classify.find_runs(rules, 3)] == \
        [("lpm", 0, 5), ("lpm", 6, 11), ("hash", 11, 14)]
    assert classify.find_runs(rules, 6) == []
    monkeypatch.setenv("BPFILTER_CLASSIFY_MIN_RUN", "0")
    assert classify.find_runs(rules) == []


def _keyed(r):
    """A rule as decode gives it: cache_key = its content (classify memoizes on it)."""
    r.cache_key = repr((r.ip, r.matches, r.target)).encode()
    return r


def test_appends_after_a_seen_run_stay_linear(monkeypatch):
    """A run seen before plus up to TAIL_MAX rules after it: the seen run (same MapSpec, so the
    same map) and the new rules linear; more than TAIL_MAX, or a changed rule inside: one run."""
    monkeypatch.setattr(classify, "_SEEN_RUNS", {})
    monkeypatch.setattr(classify, "TAIL_MAX", 4)
    base = [_keyed(rule(DROP, src=f"10.{i // 256}.{i % 256}.0/24")) for i in range(40)]
    more = [_keyed(rule(ACCEPT, src=f"10.9.{i}.0/24")) for i in range(6)]
    spans = lambda rules: [(r.kind, r.start, r.end) for r in classify.find_runs(rules, 3)]  # noqa
    assert spans(base) == [("lpm", 0, 40)]
    assert spans(base + more[:1]) == [("lpm", 0, 40)]           # rule 40 linear
    assert spans(base + more[:4]) == [("lpm", 0, 40)]
    assert spans(base + more[:5]) == [("lpm", 0, 45)]           # past TAIL_MAX: rebuilt
    assert spans(base + more) == [("lpm", 0, 45)]               # ... and seen from now on
    changed = [_keyed(rule(ACCEPT, src="10.200.0.0/24"))] + base[1:]
    assert spans(changed + more[:1]) == [("lpm", 0, 41)]
    spec = classify.map_spec(classify.find_runs(base, 3)[0], "m")
    assert classify.map_spec(classify.find_runs(base + more[:2], 3)[0], "m") is spec


def test_multi_form_choice():
    """Interleaved shapes become one split multi run (a lookup per shape); a long plain run with
    a few rules of other shapes next to it stays a plain run plus linear rules (its map is kept
    across appends); more shapes than SPLIT_MAX_SHAPES take the bitmap form."""
    rnd = random.Random(3)
    mixed = _mixed_run(rnd, 300, [ACCEPT, DROP])
    runs = classify.find_runs(mixed, 34)
    assert [(r.kind, r.start, r.end) for r in runs] == [("multi", 0, 300)]
    assert classify._run_form(runs[0])[0] == "split" and "shapes" in runs[0].text("INPUT")
    block = [rule(DROP, src=f"10.{i >> 8}.{i & 255}.0/24") for i in range(200)]
    tail = [rule(ACCEPT, tcp(dport=(22, 22)), proto=6), rule(DROP, dst="10.9.0.0/16")]
    assert [(r.kind, r.start, r.end) for r in classify.find_runs(block + tail, 34)] == \
        [("lpm", 0, 200)]
    many = [rule(DROP, src=f"10.{i}.0.0/16", dst=f"10.0.0.0/{8 + i}", proto=6)
            for i in range(classify.SPLIT_MAX_SHAPES + 1)] * 30
    runs = classify.find_runs(many, 34)
    assert [(r.kind, len(r.rules)) for r in runs] == [("multi", len(many))]
    assert classify._run_form(runs[0])[0] == "bitmap"


@pytest.mark.parametrize("r", [
    rule(DROP, src="10.0.0.0/8", inv=0x08),                  # ! -s
    rule(DROP, src="10.0.0.0/8", frag=True),                 # -f
    rule(DROP, tcp(flags=(0x12, 0x02)), proto=6),            # --tcp-flags
    rule(DROP, tcp(option=2), proto=6),                      # --tcp-option
    rule(DROP, udp(dport=(53, 53), inv=0x02), proto=17),     # ! --dport
    rule(DROP, icmp(8), proto=1),                            # icmp match
    rule(jump("X"), tcp(dport=(80, 90)), proto=6),           # a jump with a port range
])
def test_unservable_rules_stay_linear(r):
    assert classify.rule_shape(r) is None


def test_noncontiguous_mask_is_not_a_prefix():
    r = rule(DROP, src="10.0.0.0/8")
    r.ip.smsk = ipaddress.IPv4Address("255.0.255.0")
    assert classify.rule_shape(r)[0] == "hash"


def _first_match_lpm(rules, field, addr):
    for r in rules:
        a, m = (r.ip.src, r.ip.smsk) if field == "src" else (r.ip.dst, r.ip.dmsk)
        if int(addr) & int(m) == int(a):
            return r
    return None


def test_lpm_values_are_first_match():
    """Longest-prefix lookup over lpm_entries() == first matching rule, for random nested
    prefixes (the argument in classify.py's docstring, checked by brute force)."""
    rnd = random.Random(7)
    rules = []
    for _ in range(300):
        plen = rnd.choice([0, 8, 12, 16, 20, 24, 28, 30, 32])
        a = ipaddress.IPv4Address(0x0A000000 | rnd.getrandbits(12) << 12 | rnd.getrandbits(4))
        rules.append(rule(rnd.choice([ACCEPT, DROP]), src=f"{a}/{plen}"))
    for i, r in enumerate(rules):
        r.index = i
    run = classify.find_runs(rules, 1)[0]
    keys = {}
    for k, v in classify.lpm_entries(run):
        plen, = struct.unpack_from("<I", k)
        keys[(plen, int.from_bytes(k[4:], "big"))] = struct.unpack("<II", v)[0]
    for _ in range(3000):
        addr = 0x0A000000 | rnd.getrandbits(12) << 12 | rnd.getrandbits(4)
        want = _first_match_lpm(rules, "src", addr)
        got = None
        for plen in range(32, -1, -1):
            net = addr & (((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1))
            if (plen, net) in keys:
                got = keys[(plen, net)]
                break
        assert got == (want.index if want else None)


# ---- classified == linear, on the kernel --------------------------------------------------------

def _addr(rnd, base="10.0.0.0"):
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(base)) | rnd.getrandbits(10)))


def _prefix_run(rnd, n, field, act):
    out = []
    for _ in range(n):
        plen = rnd.choice([16, 22, 24, 26, 30, 32])
        out.append(rule(rnd.choice(act), **{field: f"{_addr(rnd)}/{plen}"}))
    return out


def _port_run(rnd, n, act):
    out = []
    for _ in range(n):
        lo = rnd.randrange(1000, 1040)
        hi = lo if rnd.random() < 0.7 else lo + rnd.randrange(0, 8)
        if rnd.random() < 0.5:
            out.append(rule(rnd.choice(act), tcp(dport=(lo, hi)), proto=6))
        else:
            out.append(rule(rnd.choice(act), udp(dport=(lo, hi)), proto=17))
    return out


def _tuple_run(rnd, n, act):
    out = []
    for _ in range(n):
        sp, dp = rnd.randrange(2000, 2004), rnd.randrange(80, 84)
        out.append(rule(rnd.choice(act), tcp(sport=(sp, sp), dport=(dp, dp)), proto=6,
                        src=f"{_addr(rnd)}/32", dst=f"{_addr(rnd, '10.1.0.0')}/32"))
    return out


def _masked_pair_run(rnd, n, act):
    return [rule(rnd.choice(act), src=f"{_addr(rnd)}/22", dst=f"{_addr(rnd, '10.1.0.0')}/24",
                 proto=rnd.choice([6, 17])) for _ in range(n)]


def random_table(seed: int):
    rnd = random.Random(seed)
    va = [ACCEPT, DROP]
    builders = [lambda n: _prefix_run(rnd, n, "src", va), lambda n: _prefix_run(rnd, n, "dst", va),
                lambda n: _port_run(rnd, n, va), lambda n: _tuple_run(rnd, n, va),
                lambda n: _masked_pair_run(rnd, n, va)]
    rules = []
    for _ in range(4):
        rules += rnd.choice(builders)(rnd.randrange(5, 40))
        rules.append(rule(ACCEPT, icmp(0), proto=1))               # a linear separator
    user = _prefix_run(rnd, 30, "src", [ACCEPT, DROP, RETURN, RETURN]) + \
        _port_run(rnd, 20, [DROP, RETURN])
    rules.insert(rnd.randrange(len(rules)), rule(jump("USER"), proto=rnd.choice([0, 6])))
    # kube-proxy style fan-out: jumps (and gotos) to small service chains that RETURN or decide,
    # with repeated keys so a RETURN continues at the next rule holding the same key
    svc = {f"SVC{k}": [rule(rnd.choice([ACCEPT, DROP, RETURN]), src=f"{_addr(rnd)}/23"),
                       rule(rnd.choice([RETURN, DROP]), udp(sport=(2000, 2001)), proto=17)]
           for k in range(6)}
    fan = []
    for _ in range(rnd.randrange(8, 30)):
        p = rnd.choice([6, 17])
        d = rnd.randrange(1000, 1006)
        m = tcp(dport=(d, d)) if p == 6 else udp(dport=(d, d))
        t = rnd.choice([jump(rnd.choice(list(svc))), jump(rnd.choice(list(svc))),
                        goto(rnd.choice(list(svc))), ACCEPT, DROP])
        fan.append(rule(t, m, proto=p, dst=f"{_addr(rnd, '10.1.0.0')}/22"))
    at = rnd.randrange(len(rules))
    rules[at:at] = fan
    return table({"INPUT": (rnd.choice(va), rules)}, {"USER": user, **svc})


def random_packets(seed: int, n: int):
    rnd = random.Random(seed + 1000)
    out = []
    for _ in range(n):
        src, dst = _addr(rnd), _addr(rnd, rnd.choice(["10.0.0.0", "10.1.0.0"]))
        proto = rnd.choice([6, 6, 17, 17, 1])
        sport, dport = rnd.choice([2000, 2001, 2002, 2003, 5555]), rnd.choice(
            [80, 81, 82, 83] + list(range(1000, 1050)))
        l4 = tcp_hdr(sport, dport) if proto == 6 else udp_hdr(sport, dport) if proto == 17 \
            else icmp_hdr(0)
        kind = rnd.random()
        if kind < 0.06:
            out.append(ipv4(src, dst, proto, l4[:6]))                  # truncated L4 header
        elif kind < 0.12:
            out.append(ipv4(src, dst, proto, l4[8:], frag_off=1))     # fragment at 8 bytes
        elif kind < 0.18:
            out.append(ipv4(src, dst, proto, l4[16:], frag_off=2))    # later fragment
        elif kind < 0.24:
            out.append(ipv4(src, dst, proto, l4[:16], mf=True))       # first fragment
        else:
            out.append(ipv4(src, dst, proto, l4))
    return out


class Loaded:
    """One table compiled (classified or not), INPUT loaded with its own counters + lookup maps."""

    def __init__(self, tbl, monkeypatch, min_run: int, log_level: int = 0, **compile_kw):
        from bpfilter_umh import kernel as K
        from bpfilter_umh.engine import create_maps
        monkeypatch.setenv("BPFILTER_CLASSIFY_MIN_RUN", str(min_run))
        self.compiled = compile_table(tbl, KernelFacts.from_btf(), **compile_kw)
        monkeypatch.delenv("BPFILTER_CLASSIFY_MIN_RUN")
        self.cp = next(p for p in self.compiled.programs if p.chain == "INPUT")
        self.map = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16,
                                self.compiled.counters_entries, name="bpfilter_cnt")
        extra = create_maps(self.cp)
        try:
            code = self.cp.assemble({COUNTERS_MAP: self.map.fd,
                                     **{k: m.fd for k, m in extra.items()}})
            self.prog = K.Prog.load(self.cp.prog_type, code, license=self.cp.license,
                                    expected_attach_type=self.cp.expected_attach_type,
                                    log_level=log_level)
            self.insns = len(code) // 8
        finally:
            for m in extra.values():
                m.close()

    def run(self, pkt) -> int:
        return self.prog.test_run(ether(pkt), nf_ctx(HOOKS["INPUT"]))[0]

    def counters(self):
        out = []
        for i in range(self.compiled.counters_entries):
            vals = [struct.unpack("<QQ", v) for v in self.map.lookup_percpu(i)]
            out.append((sum(v[0] for v in vals), sum(v[1] for v in vals)))
        return out

    def close(self):
        self.prog.close()
        self.map.close()


def assert_same(lin, cls, packets, seed):
    """Each packet gets the same verdict from both, and every entry the same counters."""
    for i, pkt in enumerate(packets):
        a, b = lin.run(pkt), cls.run(pkt)
        assert a == b, f"seed {seed} packet {i} {pkt.hex()}: linear {a} classified {b}"
    lc, cc = lin.counters(), cls.counters()
    diff = [(i, x, y) for i, (x, y) in enumerate(zip(lc, cc)) if x != y]
    assert not diff, f"seed {seed}: counters differ (entry, linear, classified): {diff[:10]}"
    assert sum(p for p, _ in cc) > 0


@root
@pytest.mark.parametrize("seed", range(int(os.environ.get("BPFILTER_CLASSIFY_SEEDS", "40"))))
def test_classified_equals_linear(seed, monkeypatch):
    tbl = random_table(seed)
    cls = Loaded(tbl, monkeypatch, 4)
    lin = Loaded(tbl, monkeypatch, 0)
    try:
        assert cls.cp.maps and not lin.cp.maps
        assert "lookup on" in cls.cp.listing()
        assert_same(lin, cls, random_packets(seed, 400), seed)
    finally:
        cls.close()
        lin.close()


def _mixed_run(rnd, n, act):
    """Rules of every shape interleaved (a multi run): prefixes, ports, tuples, pairs, a bare
    protocol, source ports with ranges."""
    out = []
    for _ in range(n):
        k = rnd.randrange(7)
        if k < 2:
            out += _prefix_run(rnd, 1, "src" if k == 0 else "dst", act)
        elif k == 2:
            out += _port_run(rnd, 1, act)
        elif k == 3:
            out += _tuple_run(rnd, 1, act)
        elif k == 4:
            out += _masked_pair_run(rnd, 1, act)
        elif k == 5:
            out.append(rule(rnd.choice(act), proto=rnd.choice([1, 6, 17])))
        else:
            lo = rnd.randrange(2000, 2004)
            out.append(rule(rnd.choice(act), udp(sport=(lo, lo + rnd.randrange(3))), proto=17,
                            src=f"{_addr(rnd)}/{rnd.choice([20, 24, 32])}"))
    return out


@root
@pytest.mark.parametrize("form", ["bitmap", "split"])
@pytest.mark.parametrize("seed", range(int(os.environ.get("BPFILTER_CLASSIFY_SEEDS", "40"))))
def test_multi_run_equals_linear(seed, form, monkeypatch):
    """Rules of mixed shapes as multi runs (forced here by a zero base cost), in either form:
    per-field bitmap lookups ANDed, or one prefiltered lookup per shape with the smallest
    position winning == linear code, verdicts and counters, in built-in and user chains."""
    monkeypatch.setattr(classify, "MULTI_NS_BASE", 0.0)
    monkeypatch.setattr(classify, "MULTI_FORM", form)
    rnd = random.Random(seed + 5000)
    rules = _mixed_run(rnd, rnd.randrange(10, 140), [ACCEPT, DROP])
    rules.insert(rnd.randrange(len(rules)), rule(ACCEPT, icmp(0), proto=1))     # stays linear
    rules.insert(rnd.randrange(len(rules)), rule(jump("USER")))
    user = _mixed_run(rnd, rnd.randrange(10, 80), [ACCEPT, DROP, RETURN])
    tbl = table({"INPUT": (rnd.choice([ACCEPT, DROP]), rules)}, {"USER": user})
    cls = Loaded(tbl, monkeypatch, 4)
    lin = Loaded(tbl, monkeypatch, 0)
    try:
        tail = "_rules" if form == "bitmap" else "_bloom"
        assert any(m.name.endswith(tail) for m in cls.cp.maps), cls.cp.maps
        for i, pkt in enumerate(random_packets(seed, 400)):
            a, b = lin.run(pkt), cls.run(pkt)
            assert a == b, f"seed {seed} packet {i} {pkt.hex()}: linear {a} classified {b}"
        lc, cc = lin.counters(), cls.counters()
        diff = [(i, x, y) for i, (x, y) in enumerate(zip(lc, cc)) if x != y]
        assert not diff, f"seed {seed}: counters differ (entry, linear, classified): {diff[:10]}"
    finally:
        cls.close()
        lin.close()


def _sparse_mixed(rnd, n):
    """[(rule, a packet aimed at it)]: rules of five shapes (as bench/rulesets.py's mixed) spread
    over 10.0.0.0/8, so most random packets match none of them and the split form's prefilter
    skips most lookups."""
    def addr():
        return ipaddress.IPv4Address(0x0A000000 | rnd.getrandbits(24))

    def inside(a, plen):
        host = rnd.getrandbits(32 - plen) if plen < 32 else 0
        return str(ipaddress.IPv4Address(int(a) | host))
    out = []
    for _ in range(n):
        k, act = rnd.randrange(5), rnd.choice([ACCEPT, DROP])
        plen = rnd.choice([8, 16, 20, 24, 28, 32, 32])
        net = ipaddress.IPv4Address(int(addr()) & ((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1))
        p = rnd.choice([6, 17])
        sp, dp = rnd.randrange(1024, 1030), rnd.randrange(1000, 1100)
        s, d = addr(), addr()
        l4m = tcp if p == 6 else udp
        if k == 0:
            r, pkt = rule(act, src=f"{net}/{plen}"), (inside(net, plen), str(d), p, sp, dp)
        elif k == 1:
            r, pkt = rule(act, dst=f"{net}/{plen}"), (str(s), inside(net, plen), p, sp, dp)
        elif k == 2:
            r, pkt = rule(act, l4m(dport=(dp, dp)), proto=p), (str(s), str(d), p, sp, dp)
        elif k == 3:
            r = rule(act, l4m(sport=(sp, sp), dport=(dp, dp)), proto=p, src=f"{s}/32",
                     dst=f"{d}/32")
            pkt = (str(s), str(d), p, sp, dp)
        else:
            r, pkt = rule(act, proto=p, src=f"{s}/32", dst=f"{d}/32"), (str(s), str(d), p, sp, dp)
        out.append((r, pkt))
    return out


@root
@pytest.mark.parametrize("seed", range(6))
def test_split_prefilter_never_hides_a_match(seed, monkeypatch):
    """The split form on sparse rules: packets aimed at each rule (whole, truncated, fragments at
    8 bytes and later) and packets matching nothing give what linear code gives, verdicts and
    counters; a Bloom or /16 bit the packet side computes differently would hide a match."""
    monkeypatch.setattr(classify, "MULTI_FORM", "split")
    rnd = random.Random(seed + 7000)
    pairs = _sparse_mixed(rnd, rnd.randrange(200, 600))
    tbl = table({"INPUT": (ACCEPT, [r for r, _ in pairs])})
    cls = Loaded(tbl, monkeypatch, 4)
    lin = Loaded(tbl, monkeypatch, 0)
    try:
        assert any(m.name.endswith("_bloom") for m in cls.cp.maps), cls.cp.maps
        pkts = []
        for _, (s, d, p, sp, dp) in rnd.sample(pairs, min(150, len(pairs))):
            l4 = tcp_hdr(sp, dp) if p == 6 else udp_hdr(sp, dp)
            pkts += [ipv4(s, d, p, l4), ipv4(s, d, p, l4[:6]), ipv4(s, d, p, l4[8:], frag_off=1),
                     ipv4(s, d, p, l4[16:], frag_off=2),
                     ipv4(s, d, p, udp_hdr(sp, dp) if p == 6 else tcp_hdr(sp, dp))]
        for _ in range(200):
            s, d = (str(ipaddress.IPv4Address(0x0A000000 | rnd.getrandbits(24))) for _ in "sd")
            pkts.append(ipv4(s, d, rnd.choice([1, 6, 17]), udp_hdr(rnd.randrange(65536),
                                                                  rnd.randrange(65536))))
        for i, pkt in enumerate(pkts):
            assert lin.run(pkt) == cls.run(pkt), f"seed {seed} packet {i} {pkt.hex()}"
        lc, cc = lin.counters(), cls.counters()
        assert lc == cc
        assert sum(p for p, _ in cc[:len(pairs)]) > len(pkts) // 4
    finally:
        cls.close()
        lin.close()


BPF_LOG_STATS = 4


@root
def test_split_run_of_many_shapes_verifies_in_a_pass(monkeypatch):
    """A split run of SPLIT_MAX_SHAPES shapes (each `-s A/32 -d B/m` with its own m) is verified
    in about one pass over its code: the smallest position so far is bytes of no known value to
    the verifier, so the paths after a shape's lookup, hit or miss, are one state. Kept in a
    register (-1, or what a hit gave), the verifier walked 12x the code at 16 shapes (9 519
    instructions for 752, 13 ms; the mixed shape's 5 shapes 9-10x). And it answers as linear
    code."""
    monkeypatch.setattr(classify, "MULTI_NS_BASE", 0.0)
    monkeypatch.setattr(classify, "MULTI_FORM", "split")
    rnd = random.Random(16)
    shapes = classify.SPLIT_MAX_SHAPES
    pairs = [(_addr(rnd), _addr(rnd, "172.16.0.0"), 32 - k) for _ in range(8)
             for k in range(shapes)]
    rules = [rule(rnd.choice([ACCEPT, DROP]), src=f"{s}/32",
                  dst=str(ipaddress.ip_network(f"{d}/{m}", strict=False)))
             for s, d, m in pairs]
    tbl = table({"INPUT": (ACCEPT, rules)})
    cls = Loaded(tbl, monkeypatch, 4, log_level=BPF_LOG_STATS)
    lin = Loaded(tbl, monkeypatch, 0)
    try:
        assert any(m.name.endswith("_bloom") for m in cls.cp.maps), cls.cp.maps
        insns = cls.insns
        got = re.search(r"processed (\d+) insns", cls.prog.log)
        assert got, cls.prog.log[-400:]
        assert int(got.group(1)) <= 3 * insns, (got.group(0), insns)
        pkts = [ipv4(s, d, 17, udp_hdr(1, 2)) for s, d, _ in rnd.sample(pairs, 40)]
        pkts += [ipv4(_addr(rnd), _addr(rnd, "172.16.0.0"), 6, tcp_hdr(1, 2)) for _ in range(40)]
        for i, pkt in enumerate(pkts):
            assert lin.run(pkt) == cls.run(pkt), f"packet {i} {pkt.hex()}"
        assert lin.counters() == cls.counters()
    finally:
        cls.close()
        lin.close()


@root
def test_ten_thousand_rule_chain_loads_fast_and_costs_one_lookup(monkeypatch):
    """A 10 000-rule blocklist: the program stays small (the verifier never sees the rules), and a
    packet costs about what a 10-rule chain costs."""
    import time
    costs = {}
    for n in (10, 10_000):
        rules = [rule(DROP, src=f"10.{i >> 8 & 255}.{i & 255}.0/24") for i in range(n)]
        tbl = table({"INPUT": (ACCEPT, rules)})
        t0 = time.monotonic()
        ld = Loaded(tbl, monkeypatch, 1)
        load_s = time.monotonic() - t0
        try:
            assert len(ld.cp.items) < 300 and load_s < 5, (len(ld.cp.items), load_s)
            pkt = ether(ipv4("10.200.0.1", "192.0.2.1", 17, udp_hdr()))      # no rule matches
            best = min(ld.prog.test_run(pkt, nf_ctx(HOOKS["INPUT"]), repeat=20000)[1]
                       for _ in range(3))
            costs[n] = best
            drop = ether(ipv4(f"10.{(n - 1) >> 8 & 255}.{(n - 1) & 255}.9", "192.0.2.1", 17,
                              udp_hdr()))
            assert ld.prog.test_run(drop, nf_ctx(HOOKS["INPUT"]))[0] == 0
            assert ld.counters()[n - 1][0] == 1
        finally:
            ld.close()
    assert costs[10_000] < 2 * costs[10] + 40, costs


@root
def test_engine_status_names_the_runs_and_counters_come_back():
    """Installed through the engine: status lists the classified runs, the counters map is found
    among the program's maps (it is no longer the only one), a ping is counted on its rule."""
    from nsutil import Netns, veth
    from bpfilter_umh.engine import Engine
    rules = [rule(DROP, src=f"10.9.{i}.0/24") for i in range(200)]
    rules.append(rule(ACCEPT, src="192.0.2.1/32"))
    rules += [rule(DROP, udp(dport=(p, p)), proto=17) for p in range(3000, 3100)]
    tbl = table({"INPUT": (ACCEPT, rules)})
    with Netns("a") as a, Netns("b") as b:
        veth(a, "va", b, "vb", "192.0.2.1/24", "192.0.2.2/24")
        with b.inside():
            eng = Engine.open()
        try:
            with b.inside():
                eng.install(tbl)
                st = eng.status()
            inp = next(c for c in st["chains"] if c["name"] == "INPUT")
            assert len(inp["classified"]) == 2 and "LPM" in inp["classified"][0], inp["classified"]
            assert a.run("ping -n -q -c 2 -W 1 192.0.2.2", check=False).returncode == 0
            with b.inside():
                c = Engine.open().counters()
            assert c[rules[200].index][0] >= 2
            assert all(c[r.index][0] == 0 for r in rules[:200])
        finally:
            with b.inside():
                eng.flush()


@root
@pytest.mark.parametrize("flavor", ["tc", "xdp"])
def test_other_flavors_return_their_own_codes(flavor, monkeypatch):
    """A classified run answers with the flavor's ACCEPT/DROP codes, like the linear code."""
    from bpfilter_umh import kernel as K
    from bpfilter_umh.engine import create_maps
    rnd = random.Random(3)
    rules = _prefix_run(rnd, 40, "src", [ACCEPT, DROP]) + _port_run(rnd, 40, [ACCEPT, DROP])
    tbl = table({"INPUT": (DROP, rules)})

    def load(min_run):
        monkeypatch.setenv("BPFILTER_CLASSIFY_MIN_RUN", str(min_run))
        ct = compile_table(tbl, KernelFacts.from_btf(), flavor)
        cp = next(p for p in ct.programs if p.chain == "INPUT")
        cnt = K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, ct.counters_entries,
                           name="bpfilter_cnt")
        extra = create_maps(cp)
        fds = {COUNTERS_MAP: cnt.fd, **{k: m.fd for k, m in extra.items()}}
        for it in cp.items:              # the ifnames map attach.py keeps: empty is enough here
            if getattr(it, "map", None) and it.map not in fds:
                extra[it.map] = K.Map.create(K.BPF_MAP_TYPE_HASH, 4, 16, 8, name="aux")
                fds[it.map] = extra[it.map].fd
        try:
            return cp, cnt, K.Prog.load(cp.prog_type, cp.assemble(fds), license=cp.license,
                                        expected_attach_type=cp.expected_attach_type)
        finally:
            for m in extra.values():
                m.close()
    cls, lin = load(4), load(0)
    try:
        from bpfilter_umh import flavors
        fl = flavors.get(flavor)
        assert cls[0].maps and not lin[0].maps
        movs = {(it.comment, it.imm) for it in cls[0].items
                if getattr(it, "comment", "") in ("ACCEPT", "DROP", "hotdrop")}
        assert movs and movs <= {("ACCEPT", fl.ACCEPT), ("DROP", fl.DROP), ("hotdrop", fl.DROP)}, movs
        for pkt in random_packets(3, 200):      # (test-run here: same answer, whichever it is)
            assert lin[2].test_run(ether(pkt))[0] == cls[2].test_run(ether(pkt))[0]
    finally:
        for _, cnt, prog in (cls, lin):
            prog.close()
            cnt.close()


@root
@pytest.mark.parametrize("seed", range(8))
def test_comments_do_not_break_runs(seed, monkeypatch):
    """`-m comment` (kube-proxy and docker put one on every rule) is ignored by the shapes."""
    from bpfilter_umh.model import Match
    tbl = random_table(seed)
    rnd = random.Random(seed)
    for c in tbl.chains:
        for r in c.rules:
            if rnd.random() < 0.5:
                r.matches.insert(rnd.randrange(len(r.matches) + 1),
                                 Match("comment", 0, {"comment": b"svc/x: a comment"}))
    cls = Loaded(tbl, monkeypatch, 4)
    lin = Loaded(tbl, monkeypatch, 0)
    try:
        assert len(cls.cp.maps) >= 3
        for i, pkt in enumerate(random_packets(seed, 300)):
            assert lin.run(pkt) == cls.run(pkt), f"seed {seed} packet {i}"
        assert lin.counters() == cls.counters()
    finally:
        cls.close()
        lin.close()


@root
@pytest.mark.parametrize("seed", range(10))
def test_runs_inside_subprograms(seed, monkeypatch):
    """User chains called as BPF subprograms (compile.py, when inlining is too big): their runs
    (plain, jump cases, multi in both forms) reach the packet fields and their scratch slots
    through the main frame, and give what the inlined linear code gives."""
    monkeypatch.setattr(classify, "MULTI_NS_BASE", 0.0)
    monkeypatch.setattr(classify, "MULTI_FORM", "split" if seed % 4 == 2 else "bitmap")
    if seed % 2:
        tbl = random_table(seed)
    else:                                   # a multi run and a plain run, each in a subprogram
        rnd = random.Random(seed)
        tbl = table({"INPUT": (ACCEPT, [rule(jump("USER")), rule(jump("SVC"), proto=17)]
                               + _mixed_run(rnd, 30, [ACCEPT, DROP]))},
                    {"USER": _mixed_run(rnd, 60, [ACCEPT, DROP, RETURN]),
                     "SVC": _port_run(rnd, 40, [RETURN, DROP])})
    subs = {c.name for c in tbl.chains if not c.builtin}
    cls = Loaded(tbl, monkeypatch, 4, subprogs=subs)
    lin = Loaded(tbl, monkeypatch, 0)
    try:
        assert cls.cp.maps and "subprogram: chain USER" in cls.cp.listing()
        for i, pkt in enumerate(random_packets(seed, 300)):
            assert lin.run(pkt) == cls.run(pkt), f"seed {seed} packet {i}"
        assert lin.counters() == cls.counters()
    finally:
        cls.close()
        lin.close()
