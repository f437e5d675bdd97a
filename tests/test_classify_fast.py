"""Rules of one template (classify._class_of, issue #7: a cold compile of 10 000 rules): a rule
whose entry bytes equal another's outside the key fields (addresses, tcp/udp ports, a comment's
text), with key fields giving the same predicates, takes that rule's answers. Every answer the
classifier takes so must be what asking the rule itself gives:

  - the per-rule facts (_rule_class: shape, multi, tcp/udp key count; jump, action);
  - compile.py's column kinds answered per template (TEMPLATE_KINDS: _reads, _rule_kept_ok);
  - the map contents read from the key (hash keys of the rule's shape, the ip-part key, the
    prefix of an LPM shape);

over rules the kernel's iptables-legacy-restore encoded (bench/rulesets.py's shapes,
tests/rulegen.py's generated tables) and over entries built here with the key fields at their
edges (ports any / exact / ranges / empty / wider than MAX_PORTS_PER_RULE, addresses with bits
outside their mask, comments, two tcp matches, other targets), decoded by model.decode_replace
as a SET_REPLACE is. A chain compiled with the templates (classify.vectors) must give the same
runs, code and maps as asking every rule (tests/test_classify_vectors.py does the same for the
ruleset shapes).
"""
import ipaddress
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import kernel_xt as kx  # noqa: E402
import lab  # noqa: E402
import rulegen  # noqa: E402
import rulesets  # noqa: E402
from nsutil import Netns  # noqa: E402
from test_compile_util import (ACCEPT, DROP, RETURN, goto, jump, rule, table, tcp,  # noqa: E402
                               udp)

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table  # noqa: E402
from bpfilter_umh.model import (AF_INET, IpHeader, Match, Verdict,  # noqa: E402
                                decode_replace)

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def _decode(t):
    """The table as SET_REPLACE hands it to the helper: encoded, then decoded (cache_keys)."""
    blob = t.encode()
    buf = kx.replace_buffer("filter", t.valid_hooks, len(t.entries()), len(blob), t.hook_entry,
                            t.underflow, 4, 0, blob)
    return decode_replace(buf, AF_INET)[1]


def _slow_facts(r):
    shape, multi, nkeys = classify._rule_class(r)
    return (classify._shape_id(shape), multi, isinstance(r.target, C.Jump),
            classify._action(r.target), nkeys)


def _check_rules(rules) -> int:
    """Every rule of `rules` with a class answers as itself; returns how many have one."""
    n = 0
    for r in rules:
        key = getattr(r, "cache_key", None)
        if key is None:
            continue
        c = classify._class_of(r, key)
        if c is None:
            continue
        n += 1
        where = f"rule at offset {r.offset}: {r}"
        assert c.facts == _slow_facts(r), where
        for kind, fn in (("scan", C._reads), ("kept", C._rule_kept_ok)):
            assert classify.TEMPLATE_KINDS[kind] == fn.__name__
            assert classify._answers(kind, fn, [r], [c]) == [fn(r)], (kind, where)
        shape = classify._SHAPES[c.facts[0]] if c.facts[0] >= 0 else None
        if shape is not None and shape[0] == "hash" and c.facts[4] <= 4096:
            # (a run never expands more than MAX_KEYS: two wide ranges are 2^32 keys)
            run = classify.Run("hash", 0, [r], shape)
            fast = classify._key_rule_keys(shape, key, c.lay)
            assert fast is None or fast == classify._rule_keys(run, r), where
            ip = r.ip
            run.cls, run.keys = [c], (key,)
            assert classify._ippart_keys(run) == [classify._hash_key(
                classify._le32(ip.src), classify._le32(ip.dst), ip.proto, 0, 0, 1)], where
            assert classify._run_rule_keys(run, pad=7) == \
                [[k[:14] + b"\x07\x00" for k in classify._rule_keys(run, r)]], where
        for field in ("src", "dst"):
            run = classify.Run("lpm", 0, [r], ("lpm", field))
            run.cls, run.keys = [c], (key,)
            a, m = (r.ip.src, r.ip.smsk) if field == "src" else (r.ip.dst, r.ip.dmsk)
            assert classify._prefixes([r], [0], field, run) == [(int(a), classify._plen(m))]
    return n


def _kernel_tables(texts):
    """{text: decoded table} as iptables-legacy-restore encodes each text (one namespace)."""
    out = []
    with Netns("cf") as ns:
        for text in texts:
            lab.restore(ns, text)
            with ns.inside():
                info, blob = kx.snapshot(AF_INET)
            buf = kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                                    list(info.hook_entry), list(info.underflow), 4, 0, blob)
            out.append(decode_replace(buf, AF_INET)[1])
    return out


@root
def test_ruleset_shapes_answer_as_their_rules():
    texts = [rulesets.make(s, 1500, seed=5).text for s in rulesets.SHAPES]
    for shape, t in zip(rulesets.SHAPES, _kernel_tables(texts)):
        rules = [r for c in t.chains for r in c.rules]
        got = _check_rules(rules)
        assert got >= 0.99 * len(rules), shape          # the templates serve nearly every rule


@root
def test_generated_rulesets_answer_as_their_rules():
    """Interfaces, inversions, fragments, tcp flags and options, icmp, jumps and gotos: each
    rule against the class its template and key fields give (classes kept across the cases,
    so most rules take an earlier case's answers)."""
    texts = [rulegen.generate(seed, big=True).text() for seed in range(40)]
    total = got = 0
    for t in _kernel_tables(texts):
        rules = [r for c in t.chains for r in c.rules + [c.policy_entry] if r is not None]
        total += len(rules)
        got += _check_rules(rules)
    assert got >= 0.9 * total


def _edge_rules(rnd) -> list:
    """Rules whose key fields sit at the predicates' edges, in several templates."""
    out = []
    ports = [(0, 65535), (0, 0), (7, 7), (65535, 65535), (0, 65534), (1, 65535), (10, 20),
             (20, 10), (1, 1024), (1, 1025), (100, 2000), (5, 6)]
    addrs = ["0.0.0.0/0", "10.1.2.0/24", "10.1.2.3/32", "10.0.0.0/8", "0.0.0.0/1"]
    targets = [ACCEPT, DROP, RETURN, jump("u"), goto("u"), Verdict(-4)]     # -4: QUEUE
    for _ in range(600):
        t = rnd.choice(targets)
        kw = {"src": rnd.choice(addrs), "dst": rnd.choice(addrs)}
        kind = rnd.randrange(6)
        if kind == 0:
            r = rule(t, **kw)
        elif kind in (1, 2):
            m = tcp if kind == 1 else udp
            r = rule(t, m(sport=rnd.choice(ports), dport=rnd.choice(ports)),
                     proto=6 if kind == 1 else 17, **kw)
        elif kind == 3:             # a comment in front (kube-proxy, docker)
            text = rnd.choice([b"", b"x", b"KUBE-SVC-" + bytes(str(rnd.randrange(99)), "ascii")])
            r = rule(t, Match("comment", 0, {"comment": text.ljust(256, b"\0")}),
                     tcp(dport=rnd.choice(ports)), proto=6, **kw)
        elif kind == 4:             # two tcp matches: no shape
            r = rule(t, tcp(dport=rnd.choice(ports)), tcp(sport=rnd.choice(ports)), proto=6, **kw)
        else:                       # a protocol without ports
            r = rule(t, proto=rnd.choice([1, 6, 17]), **kw)
        if rnd.random() < 0.2:      # bits outside the mask: never matches (iptables masks them)
            ip = r.ip
            r.ip = IpHeader(ipaddress.IPv4Address(int(ip.src) | rnd.choice([1, 256])), ip.dst,
                            ip.smsk, ip.dmsk, proto=ip.proto, flags=ip.flags)
        out.append(r)
    return out


def test_edge_rules_answer_as_themselves():
    rnd = random.Random(3)
    rules = _edge_rules(rnd)
    t = _decode(table({"FORWARD": (ACCEPT, rules)}, {"u": [rule(RETURN)]}))
    decoded = t.chain("FORWARD").rules
    assert len(decoded) == len(rules)
    assert _check_rules(decoded) >= 0.9 * len(decoded)


def _compiled(t, facts):
    out = {}
    for cp in compile_table(t, facts).programs:
        fds = {COUNTERS_MAP: 3, **{m.name: 4 + k for k, m in enumerate(cp.maps)}}
        out[cp.chain] = (cp.assemble(fds), [(m.name, m.entries) for m in cp.maps])
    return out


def test_long_chain_compiles_as_asking_each_rule(monkeypatch):
    """A 2 400-rule chain of edge rules in stretches of one shape (runs of every kind): the
    same runs, code and maps from the templates as from each rule."""
    rnd = random.Random(7)
    rules = []
    for _ in range(40):
        k = rnd.randrange(5)
        for _ in range(rnd.randrange(20, 100)):
            p = (rnd.randrange(1, 60000), )
            lo = p[0]
            rng = (lo, lo) if rnd.random() < 0.8 else (lo, lo + rnd.randrange(0, 8))
            tgt = rnd.choice([ACCEPT, DROP, RETURN])
            if k == 0:
                rules.append(rule(tgt, src=f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.0/24"))
            elif k == 1:
                rules.append(rule(tgt, dst=f"10.{rnd.randrange(256)}.0.0/16"))
            elif k == 2:
                rules.append(rule(tgt, tcp(dport=rng), proto=6))
            elif k == 3:
                rules.append(rule(tgt, Match("comment", 0, {"comment": b"c".ljust(256, b"\0")}),
                                  udp(sport=rng, dport=(53, 53)), proto=17,
                                  dst=f"192.0.2.{rnd.randrange(256)}/32"))
            else:
                rules.append(rule(rnd.choice([tgt, jump("u")]), tcp(dport=(lo, lo)), proto=6,
                                  dst=f"198.51.100.{rnd.randrange(256)}/32"))
    t = _decode(table({"FORWARD": (ACCEPT, rules)}, {"u": [rule(DROP, src="192.0.2.0/27"),
                                                          rule(RETURN)]}))
    facts = KernelFacts.fake()
    chain = t.chain("FORWARD").rules
    for form in (None, "split", "bitmap"):
        monkeypatch.setattr(classify, "MULTI_FORM", form)
        classify._VECS.clear()
        classify._SEEN_RUNS.clear()
        classify._RUN_SPECS.clear()
        C._PROG_CACHE.clear()
        fast_runs = classify.find_runs(chain)
        assert classify.vectors(chain) is not None
        classify._SEEN_RUNS.clear()
        fast = _compiled(t, facts)
        with monkeypatch.context() as m:
            m.setattr(classify, "VEC_MIN", 1 << 30)
            classify._SEEN_RUNS.clear()
            classify._RUN_SPECS.clear()
            C._PROG_CACHE.clear()
            slow_runs = classify.find_runs(chain)
            classify._SEEN_RUNS.clear()
            slow = _compiled(t, facts)
        assert fast_runs == slow_runs, form
        assert fast_runs, form
        assert fast == slow, form


def test_ipv6_chain_classes(monkeypatch):
    """An IPv6 entry's key has another layout: a long IPv6 chain's rules get classes of their
    own (classify._classes6: the key without addresses and ports), here one for each pair of
    verdict and whether the address is zero, and it compiles as with the lists off."""
    from test_compile_ipv6_util import rule6, table6
    from bpfilter_umh.model import AF_INET6

    rnd = random.Random(9)
    rules = [rule6(rnd.choice([ACCEPT, DROP]), tcp(dport=(p, p)), proto=6,
                   dst=f"2001:db8::{p:x}/128") for p in rnd.sample(range(1, 60000), 300)]
    t = table6({"FORWARD": (ACCEPT, rules)})
    blob = t.encode()
    buf = kx.replace_buffer("filter", t.valid_hooks, len(t.entries()), len(blob), t.hook_entry,
                            t.underflow, 4, 0, blob)
    t = decode_replace(buf, AF_INET6)[1]
    chain = t.chain("FORWARD").rules
    classify._VECS.clear()
    vec = classify.vectors(chain)
    assert vec is not None and None not in vec.cls and len(set(vec.cls)) <= 4
    facts = KernelFacts.fake()
    C._PROG_CACHE.clear()
    fast = _compiled(t, facts)
    with monkeypatch.context() as m:
        m.setattr(classify, "VEC_MIN", 1 << 30)
        C._PROG_CACHE.clear()
        assert _compiled(t, facts) == fast


def test_ipv6_classes_grouped_as_one_by_one():
    """classify._classes6 asks the class of each group of rules equal past the addresses (and
    zero alike) of its first rule: the classes are those _class6_of gives rule by rule, the
    same objects, over a chain of prefixes with zero and non-zero addresses, both verdicts,
    tcp ports (a group per port value) and comments (the text cut out of the class)."""
    from test_compile_ipv6_util import rule6, table6
    from bpfilter_umh.model import AF_INET6

    rnd = random.Random(11)
    rules = []
    for k in range(900):
        pick = rnd.random()
        kw = {rnd.choice(["src", "dst"]): f"2001:db8:{k:x}::/{rnd.choice([48, 64, 128])}"} \
            if pick < 0.8 else {}
        ms = [tcp(dport=(k % 7, k % 7))] if 0.6 < pick < 0.9 else []
        if rnd.random() < 0.2:
            ms.append(Match("comment", 0, {"comment": f"c{k % 3}".encode().ljust(256, b"\0")}))
        rules.append(rule6(rnd.choice([ACCEPT, DROP]), *ms, proto=6 if ms and
                           ms[0].name == "tcp" else 0, **kw))
    t = table6({"FORWARD": (ACCEPT, rules)})
    blob = t.encode()
    buf = kx.replace_buffer("filter", t.valid_hooks, len(t.entries()), len(blob), t.hook_entry,
                            t.underflow, 4, 0, blob)
    chain = decode_replace(buf, AF_INET6)[1].chain("FORWARD").rules
    keys = [r.cache_key for r in chain]
    # few enough groups that _classes6 groups them
    assert 4 * len({(k[32:], k[:16] != bytes(16), k[16:32] != bytes(16)) for k in keys}) <= len(keys)
    classify._CLASSES.clear()
    grouped = classify._classes6(chain, keys)
    classify._CLASSES.clear()
    one_by_one = list(map(classify._class6_of, chain, keys))
    assert [c is None for c in grouped] == [c is None for c in one_by_one]
    assert sum(c is not None for c in grouped) > 800
    # the same classes: the same rule represents each, and the rules share them alike
    assert [c and c.rep for c in grouped] == [c and c.rep for c in one_by_one]
    assert len({id(c) for c in grouped}) == len({id(c) for c in one_by_one})
