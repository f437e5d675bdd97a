"""The first restore's compile (issue #7: iptables-restore of 10 000 rules), work done once:
- compile._walk_leaves keeps each leaf chain's policy (RETURN) entry index for the compile
  (compile.policy_indexes_walked), and classify._walked_bodies takes the case chains' RETURN
  entries from there instead of reading the chains again (model.policy_indexes): the case map
  (RETURN entry - run start per case) is the one a compile without the walk makes, and the
  program gives the same verdicts and counters (BPF_PROG_TEST_RUN, real kernel);
- classify._classes_coded takes a key of the template and code of the key before (or of the
  last key of its template) without a lookup: against _classes_each; _classes_by_pair (one
  lookup a distinct template and code) gives the loop's classes."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_cplane_scale import _run_each, decoded  # noqa: E402
from test_shared_bodies import _packets, _text  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.compile import KernelFacts, compile_table  # noqa: E402
from bpfilter_umh.model import Jump  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def _fresh(monkeypatch, tag: str) -> None:
    """A compile context no earlier compile had (a BPFILTER_* variable is part of a kept
    program's key): the program is compiled, not taken from compile._PROG_CACHE."""
    monkeypatch.setenv("BPFILTER_TEST_FIRST_RESTORE", f"{tag} {os.getpid()} {id(monkeypatch)}")


def _input(table):
    return next(p for p in compile_table(table, KernelFacts.from_btf(), "nf").programs
                if p.chain == "INPUT")


def _case_map(cp):
    got = [m for m in cp.maps if m.name.startswith("case_")]
    assert len(got) == 1, [m.name for m in cp.maps]
    return got[0]


def test_case_chains_policy_entries_from_the_walk(monkeypatch):
    """A fresh fan-out table's compile takes every case chain's RETURN entry from the walk (no
    policy_indexes call) and makes the case map a compile without the walk
    (BPFILTER_PROG_CACHE=0: classify reads each case chain itself) makes; same verdicts and
    counters on the kernel."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    _fresh(monkeypatch, "walked")
    asked = []
    real = classify.policy_indexes
    monkeypatch.setattr(classify, "policy_indexes", lambda cs: asked.append(len(cs)) or real(cs))
    seen = []
    walked = classify._walked_policy_indexes

    def spy(table, ids, targets):
        seen.append(dict(C.policy_indexes_walked(table) or {}))
        return walked(table, ids, targets)
    monkeypatch.setattr(classify, "_walked_policy_indexes", spy)

    table = decoded(_text())
    fast = _input(table)
    assert seen and len(seen[0]) >= 100, "the walk kept no policy entry indexes"
    assert not asked, "the case chains were read again"
    # what the walk kept is each chain's RETURN entry index
    svc = {id(table.chain(f"S{k}")): table.chain(f"S{k}").policy_entry.index for k in range(100)}
    assert all(seen[0][i] == idx for i, idx in svc.items())

    monkeypatch.setenv("BPFILTER_PROG_CACHE", "0")
    slow_table = decoded(_text())
    slow = _input(slow_table)
    assert _case_map(fast).entries == _case_map(slow).entries
    results = _run_each((fast, slow), _packets(), table.num_entries, "fr")
    assert results[0] == results[1]
    assert len(set(results[0][0])) == 2, "both verdicts taken"


def test_chains_not_walked_are_read(monkeypatch):
    """A case chain the walk kept no index for (here: none kept) is read from the chains, with
    the same case map."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    _fresh(monkeypatch, "fast")
    fast = _case_map(_input(decoded(_text())))
    real = C._walk_leaves

    def no_index(*a):
        ok = real(*a)
        a[-1].clear()                   # (the policy indexes it put in)
        return ok
    monkeypatch.setattr(C, "_walk_leaves", no_index)
    _fresh(monkeypatch, "read")
    asked = []
    pi = classify.policy_indexes
    monkeypatch.setattr(classify, "policy_indexes", lambda cs: asked.append(len(cs)) or pi(cs))
    slow = _case_map(_input(decoded(_text())))
    assert asked, "the chains were not read"
    assert slow.entries == fast.entries


# ---- classify._classes_coded: a key of the template and code of the key before -------------

def _runs_of_templates() -> list:
    """A chain whose neighbours share a template and code (a fan-out hub's jumps), share the
    template but not the code (a zero source: the class code's src bit), share the code but
    not the template (another mask), come back to a template after others, and keys whose
    code has SLOW_CODE (port ranges) or whose layout is not the first key's, twice in a row."""
    from test_classify_fast import _decode
    from test_compile_util import ACCEPT, DROP, RETURN, rule, table, tcp, udp
    rules = [rule(DROP, src="10.0.0.0/8"), rule(DROP, src="11.0.0.0/8"),
             rule(DROP, src="12.0.0.0/8"),
             rule(DROP, src="0.0.0.0/8"), rule(DROP, src="0.0.0.0/8"),
             rule(DROP, src="13.0.0.0/8"),
             rule(DROP, src="12.0.0.0/16"), rule(DROP, src="12.1.0.0/16"),
             rule(ACCEPT, src="12.2.0.0/16"), rule(ACCEPT, src="12.3.0.0/16"),
             rule(DROP, src="14.0.0.0/8"), rule(DROP, src="14.0.0.0/8", dst="10.0.0.1/32"),
             rule(DROP, src="15.0.0.0/8")]
    rules += [rule(ACCEPT, tcp(dport=(10, 20)), proto=6, dst=f"10.0.0.{k}/32") for k in range(3)]
    rules += [rule(ACCEPT, tcp(dport=(80, 80)), proto=6, dst=f"10.0.0.{k}/32") for k in range(3)]
    rules += [rule(ACCEPT, udp(dport=(53, 53)), proto=17, dst=f"10.0.0.{k}/32") for k in range(3)]
    rules += [rule(ACCEPT, tcp(dport=(443, 443)), proto=6, dst="10.0.0.9/32"),
              rule(DROP, src="16.0.0.0/8")]
    return _decode(table({"FORWARD": (ACCEPT, rules)}, {"u": [rule(RETURN)]})) \
        .chain("FORWARD").rules


class _CountingGets(dict):
    def __init__(self, *a):
        super().__init__(*a)
        self.gets = 0

    def get(self, *a):
        self.gets += 1
        return super().get(*a)


def test_classes_of_neighbours_are_each_rules(monkeypatch):
    """Every rule gets the class asking it alone gives (_classes_each), whichever runs first,
    and a key of the template and code of its neighbour, or of the last key of its template, is
    not looked up again."""
    from test_classify_codes import _both_orders
    rules = _runs_of_templates()
    counting = _CountingGets()
    monkeypatch.setattr(classify, "_CLASSES", counting)
    fast = _both_orders(rules)
    assert sum(c is not None for c in fast) >= len(rules) - 3     # (the port ranges: none)
    keys = [r.cache_key for r in rules]
    lay = classify._layout(keys[0])
    codes = classify._layout_codes(lay, keys[:13])
    # the loop (_classes_by_pair declining)
    real_by_pair = classify._classes_by_pair
    monkeypatch.setattr(classify, "_classes_by_pair", lambda *a: None)
    counting.clear()
    counting.gets = 0
    got = classify._classes_coded(lay, keys[:13], codes, rules, range(13))
    gets = counting.gets
    assert all(a is b for a, b in zip(got, classify._classes_each(rules[:13], keys[:13])))
    # looked up: 10/8, 0/8 (the template of 10/8, another code), 13/8 (0/8's code was the
    # template's last), 12/16, 12.2/16 (ACCEPT), the /8 with a dst; not: the neighbours of
    # their template and code (11/8 and 12/8 after 10/8, the second 0/8, 12.1/16, 12.3/16),
    # nor 14/8 and 15/8 (the last of their template, 13/8, has their code)
    assert gets == 6, gets
    # _classes_by_pair: one lookup a distinct (template, code) pair, the same classes
    monkeypatch.setattr(classify, "_classes_by_pair", real_by_pair)
    counting.clear()
    counting.gets = 0
    got = classify._classes_coded(lay, keys[:13], codes, rules, range(13))
    assert counting.gets == 5, counting.gets  # /8 DROP, 0/8, /16 DROP, /16 ACCEPT, /8 + dst
    assert all(a is b for a, b in zip(got, classify._classes_each(rules[:13], keys[:13])))


@pytest.mark.parametrize("at", [range(13), range(16, 19), range(3), range(3, 5),
                                range(13, 23), [0, 6, 5], [0, 3, 5], [6, 8, 7, 9]])
def test_classes_by_pair_are_the_loops(monkeypatch, at):
    """_classes_by_pair (one dict of the (template, code) pairs; one count where the keys are
    a single pair, a fan-out hub's) gives each rule the class the loop gives, the same rule
    its class's rep, and declines (None) where a key has SLOW_CODE (a port range: 13..15) or
    another layout (udp after tcp), the loop then answering as before. [0, 6, 5]: one code,
    the first and last keys of one template, the middle one of another (not one pair)."""
    rules = _runs_of_templates()
    keys = [rules[p].cache_key for p in at]
    lay = classify._layout(keys[0])
    codes = classify._layout_codes(lay, keys)
    assert codes is not None                # (keys of one length, as _classes_coded's)
    real_by_pair = classify._classes_by_pair

    def reps(by_pair):
        monkeypatch.setattr(classify, "_CLASSES", {})
        monkeypatch.setattr(classify, "_classes_by_pair", by_pair)
        got = classify._classes_coded(lay, keys, codes, rules, at, 8)
        return [None if c is None else c.rep for c in got]

    monkeypatch.setattr(classify, "_CLASSES", {})
    taken = real_by_pair(lay, keys, codes, rules, at) is not None
    assert taken == (max(at) < 13 or min(at) == 16), (at, taken)
    fast, loop = reps(real_by_pair), reps(lambda *x: None)
    assert len(fast) == len(at) and all(x is y for x, y in zip(fast, loop)), at
    assert any(x is not None for x in fast)


# ---- classify._pair_numbers: the (template, code) pairs as a byte a key ---------------------

def _chain_keys(rules: list) -> list:
    from test_classify_fast import _decode
    from test_compile_util import ACCEPT, RETURN, rule, table
    got = _decode(table({"FORWARD": (ACCEPT, rules)}, {"u": [rule(RETURN)]})).chain("FORWARD")
    return got.rules


def _pairs_told(lay, keys: list, codes: bytes, ids: bytes) -> None:
    """ids[i] == ids[j] exactly where keys i and j have one template and one code."""
    pairs = list(zip(map(lay.cut, keys), codes))
    first = {}
    for i, p in enumerate(pairs):
        first.setdefault(p, i)
    assert len(ids) == len(keys)
    assert len(set(ids)) == len(first)
    assert all(ids[i] == ids[first[p]] for i, p in enumerate(pairs))


def _masks_rules(dst_lengths=(32,), src_lengths=range(16, 33)):
    """Rules of one layout whose source mask is each of src_lengths (/16../32: 17 templates, two
    mask byte columns of 9 distinct bytes, which with the codes' 2 and the verdict's 2 make a
    radix past 256: the numbers so far are ranked again), times the destination masks given,
    with a verdict that changes every 5 rules, and a zero source (another code) every 7."""
    from test_compile_util import ACCEPT, DROP, rule
    out = []
    for d in dst_lengths:
        for k in src_lengths:
            for x in range(2):
                src = "0.0.0.0/%d" % k if (k + x) % 7 == 0 else "%d.0.0.0/%d" % (128 + x, k)
                out.append(rule(DROP if len(out) // 5 % 2 else ACCEPT, src=src,
                                dst="10.0.0.0/%d" % d))
    return out


@pytest.mark.parametrize("name", ["templates", "masks", "one_pair", "tcp"])
def test_pair_numbers_are_the_pairs(name):
    """_pair_numbers numbers the keys as their (template, code) pairs, whether the keys differ
    in a few columns (the runs of templates), in many (every mask length, ranked again past a
    radix of 256), in none but the key fields (one pair) or where the template leaves ports out
    too (tcp matches); past 256 pairs it declines."""
    from test_compile_util import ACCEPT, rule, tcp
    if name == "templates":
        rules = _runs_of_templates()[:13]
    elif name == "masks":
        rules = _chain_keys(_masks_rules())
    elif name == "one_pair":
        rules = _chain_keys([rule(ACCEPT, src="10.0.%d.0/24" % k) for k in range(40)])
    else:
        rules = _chain_keys([rule(ACCEPT, tcp(dport=(80 + k % 3, 80 + k % 3)), proto=6,
                                  dst="10.0.0.%d/32" % k) for k in range(30)])
    keys = [r.cache_key for r in rules]
    lay = classify._layout(keys[0])
    codes = classify._layout_codes(lay, keys)
    assert codes is not None
    if name == "tcp":
        assert len(lay.out) == 2            # the addresses and the ports
    ids = classify._pair_numbers(lay, keys, codes)
    assert ids is not None
    _pairs_told(lay, keys, codes, ids)
    if name == "one_pair":
        assert len(set(ids)) == 1
    many = _chain_keys(_masks_rules(range(0, 33, 4), range(33)))       # 33 x 9 templates
    keys = [r.cache_key for r in many]
    lay = classify._layout(keys[0])
    assert classify._pair_numbers(lay, keys, classify._layout_codes(lay, keys)) is None


@pytest.mark.parametrize("name", ["masks", "templates"])
def test_classes_by_number_are_the_loops(monkeypatch, name):
    """_classes_by_pair through _pair_numbers gives each rule the class the loop gives (the same
    rule its class's rep) and makes the classes in the loop's order."""
    rules = _chain_keys(_masks_rules()) if name == "masks" else _runs_of_templates()[:13]
    keys = [r.cache_key for r in rules]
    lay = classify._layout(keys[0])
    codes = classify._layout_codes(lay, keys)
    at = range(len(keys))

    def reps(by_pair):
        monkeypatch.setattr(classify, "_CLASSES", {})
        monkeypatch.setattr(classify, "_classes_by_pair", by_pair)
        got = classify._classes_coded(lay, keys, codes, rules, at, 8)
        return [None if c is None else c.rep for c in got], \
            [c.rep for c in classify._CLASSES.values()]

    called = []
    real = classify._classes_by_number
    monkeypatch.setattr(classify, "_classes_by_number",
                        lambda *a: called.append(1) or real(*a))
    fast, made = reps(classify._classes_by_pair)
    assert called, "_classes_by_number not taken"
    loop, loop_made = reps(lambda *x: None)
    assert len(fast) == len(keys) and all(x is y for x, y in zip(fast, loop))
    assert len(made) == len(loop_made) and all(x is y for x, y in zip(made, loop_made))


# ---- compile._plain_lands: the walk's new chains and jump sites as C loops ---------------------

def _walk_loops(seen: dict, order: list, found: dict, sites: dict, counts: dict) -> None:
    """What compile._add_new and _add_counts stand for: the walk's loops."""
    for i, c in found.items():
        if i not in seen:
            seen[i] = len(order)
            order.append(c)
    for name, n in counts.items():
        sites[name] = sites.get(name, 0) + n


@pytest.mark.parametrize("known", [(), (1,), (1, 3, 4)])
def test_new_chains_and_sites_as_the_loops(known):
    """Chains seen already keep their place, new ones are appended in order; counts add to the
    sites there are (dict order included: the walk's key and records follow it)."""
    found = {1: "a", 2: "b", 3: "c", 5: "e"}
    counts = {"a": 2, "b": 1, "c": 3}

    def start():
        seen = {0: 0}
        order = ["top"]
        for i in known:
            seen[i] = len(order)
            order.append(f"old{i}")
        sites = {"x": 1}
        sites.update({"abc"[i - 1]: 5 for i in known if i <= 3})
        return seen, order, sites

    seen, order, sites = start()
    C._add_new(seen, order, dict(found))
    C._add_counts(sites, dict(counts))
    s2, o2, si2 = start()
    _walk_loops(s2, o2, dict(found), si2, dict(counts))
    assert list(seen.items()) == list(s2.items()) and order == o2
    assert list(sites.items()) == list(si2.items())


def test_plain_lands_walk_as_the_loop(monkeypatch):
    """A hub's jumps read column by column (_plain_lands) give the program key, bases and jump
    sites the walk's own loop gives (a chain jumped to twice: S50, S60 and S70)."""
    got = {}
    for tag, plain in (("plain", C._plain_lands), ("loop", lambda *a: None)):
        monkeypatch.setattr(C, "_plain_lands", plain)
        _fresh(monkeypatch, f"lands-{tag}")
        keys, sites = [], []
        pk, js = C._program_key, C._jump_sites
        monkeypatch.setattr(C, "_program_key", lambda *a: keys.append(pk(*a)) or keys[-1])
        monkeypatch.setattr(C, "_jump_sites", lambda *a: sites.append(js(*a)) or sites[-1])
        _input(decoded(_text()))
        monkeypatch.setattr(C, "_program_key", pk)
        monkeypatch.setattr(C, "_jump_sites", js)
        # (the keys hold the BPFILTER_* environment: the tag told apart)
        got[tag] = (repr(keys).replace(f"lands-{tag}", "lands"), [list(s.items()) for s in sites])
    assert "None" not in got["plain"][0][:20]
    assert any(dict(s).get("S50") == 2 for s in got["plain"][1])
    assert got["plain"] == got["loop"]


# ---- classify._walked_bodies: the jumps' columns as the walk read them ------------------------

def _hub_text(before: str = "", after: str = "") -> str:
    """test_shared_bodies' fan-out with a jump of another shape (no match: not in the run)
    before or after the hub's run of service jumps."""
    lines = _text().split("\n")
    at = next(i for i, ln in enumerate(lines) if ln.startswith("-A SVC "))
    last = max(i for i, ln in enumerate(lines) if ln.startswith("-A SVC "))
    if after:
        lines.insert(last + 1, after)
    if before:
        lines.insert(at, before)
    return "\n".join(lines)


@pytest.mark.parametrize("before, after, taken", [
    ("", "", "whole"),
    ("", "-A SVC -j S7", "first ones"),             # the run's cases: the chain's first jumps
    ("-A SVC -j S7", "", None),                     # a jump before the run's: read again
], ids=["all", "run-first", "jump-before"])
def test_walked_bodies_take_the_walks_columns(monkeypatch, before, after, taken):
    """The jump cases' shared bodies take the targets, landing chains and entries the walk read
    of these very jumps (compile._plain_lands), when the run's cases are the chain's first
    jumps; the case map and the program are the ones reading them again gives, with the same
    verdicts and counters on the kernel."""
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    text = _hub_text(before, after)
    seen = []
    real = classify._landed_columns
    monkeypatch.setattr(classify, "_landed_columns",
                        lambda rs, landed: seen.append((len(rs), real(rs, landed))) or seen[-1][1])
    _fresh(monkeypatch, f"landed-{taken}")
    table = decoded(text)
    fast = _input(table)
    assert seen, "no jump cases read"
    n, got = seen[0]
    if taken is None:
        assert got is None
    else:
        assert got is not None and len(got[0]) == n
        walked = table.chain("SVC").rules
        assert [r.target for r in walked if isinstance(r.target, Jump)][:n] == got[0]
        if taken == "first ones":
            assert n < sum(isinstance(r.target, Jump) for r in walked)
    monkeypatch.setattr(classify, "_landed_columns", lambda rs, landed: None)
    _fresh(monkeypatch, f"read-{taken}")
    slow = _input(decoded(text))
    assert fast.items == slow.items
    assert _case_map(fast).entries == _case_map(slow).entries
    results = _run_each((fast, slow), _packets(), table.num_entries, "lc")
    assert results[0] == results[1]
    assert len(set(results[0][0])) == 2, "both verdicts taken"


def test_landed_columns_of_the_same_jumps_only():
    """The walk's columns answer the jump rules it read, from the first one on: all of them,
    the first ones (the columns cut as long), not rules among which one is another object,
    nor more rules than it read, nor rules from another first one."""
    a, b, c, x = object(), object(), object(), object()
    cols = (["ta", "tb", "tc"], [1, 2, 3], [0, 0, 0], ["A", "B", "C"], [11, 12, 13],
            ["a", "b", "c"])
    known = {id(a): ([a, b, c],) + cols}
    assert classify._landed_columns([a, b, c], known) == cols
    assert classify._landed_columns([a, b], known) == tuple(col[:2] for col in cols)
    assert classify._landed_columns([a, x, c], known) is None
    assert classify._landed_columns([a, b, c, x], known) is None
    assert classify._landed_columns([b, c], known) is None
    assert classify._landed_columns([a, b], None) is None          # outside compile_table


# ---- classify: a cold blocklist's class codes and trie values --------------------------------

def _blocklist_run(n: int = 2000, seed: int = 31):
    from test_lpm_joined import _blocklist, _lpm_runs
    runs = _lpm_runs(_blocklist(n, seed))
    assert runs, "the blocklist has no LPM run"
    return max(runs, key=lambda r: len(r.rules))


def test_layout_codes_refuse_keys_of_other_lengths():
    """The keys _layout_codes reads are of one length (_classes_of_length's): keys whose first
    one is not of the layout's length, or whose joined length is not as many of it, give no
    codes (read strided, they would be another key's bytes)."""
    run = _blocklist_run(300, 5)
    keys = list(run.keys)
    lay = classify._layout(keys[0])
    assert classify._layout_codes(lay, keys) is not None
    assert classify._layout_codes(lay, keys[:3] + [keys[3] + bytes(4)] + keys[4:]) is None
    assert classify._layout_codes(lay, [keys[0][:-4]] + keys[1:]) is None
    assert classify._layout_codes(lay, []) is None


def test_trie_values_as_packed_each(monkeypatch):
    """A cold LPM run's trie values (their positions' _values, first rules picked by
    _lpm_columns) and their joined buffer are the ones packing each value gives (two
    blocklists of DROP and ACCEPT rules), and so for a run with a jump case among its actions
    (_values': the case's number added) and for one value."""
    for text_run in (_blocklist_run(), _blocklist_run(600, 8)):
        classify._LPM_SEEN.clear()
        got = classify.lpm_entries(text_run)
        values = classify._values(text_run)
        want = [values[p] for p in classify._LPM_SEEN[-1].bests]
        assert [v for _, v in got] == want
        assert got.joined[1] == b"".join(want)
    run = _blocklist_run(300, 9)
    acts = list(classify._run_acts(run))
    run.acts = acts[:5] + [classify.ACT_CASE] + acts[6:]     # a jump case among them
    run.cases = {5: 2}                  # (the third jump: its value is ACT_CASE + 2)
    bests = sorted(set(range(0, len(acts), 3)) | {5})
    vals, joined = classify._best_value_column(run, bests)
    want = [classify._values(run)[p] for p in bests]
    assert vals == want and joined == b"".join(want)
    run.acts = acts
    assert classify._best_value_column(run, [7]) == ([classify._values(run)[7]],
                                                     classify._values(run)[7])


def test_prefix_codes_from_the_joined_keys(monkeypatch):
    """A cold blocklist's LPM run reads its prefixes from the keys _layout_codes joined for its
    classes (not joined again), with the trie entries reading them again gives."""
    from test_lpm_joined import _blocklist
    table = _blocklist(2000, 31)
    tries = {}
    for tag in ("joined", "again"):
        got = []
        real = classify._joined_keys
        if tag == "again":
            real = lambda keys, n, start: None     # noqa: E731
        monkeypatch.setattr(classify, "_joined_keys",
                            lambda keys, n, start: got.append(real(keys, n, start)) or got[-1])
        # (nothing kept of an earlier compile of these rules: their lists, runs, MapSpecs)
        for cache in ("_LPM_SEEN", "_VECS"):
            monkeypatch.setattr(classify, cache, [])
        for cache in ("_RUN_SPECS", "_SEEN_RUNS"):
            monkeypatch.setattr(classify, cache, {})
        _fresh(monkeypatch, f"prefixes-{tag}")
        prog = _input(table)
        assert len(got) == 1 and (got[0] is not None) is (tag == "joined")
        tries[tag] = [(m.name, m.entries) for m in prog.maps if m.map_type ==
                      classify.BPF_MAP_TYPE_LPM_TRIE]
    assert tries["joined"] and len(tries["joined"][0][1]) > 1000
    assert tries["joined"] == tries["again"]


def test_joined_keys_of_the_same_keys_only(monkeypatch):
    """The joined keys answer keys that are theirs from a position on (the same objects, of
    their length), cut there; other keys, another length, or outside a compile: None."""
    keys = [bytes([k]) * 4 for k in range(6)]
    monkeypatch.setattr(classify, "_VEC_SCOPE", {classify._JOINED: (keys, 4, b"".join(keys))})
    assert classify._joined_keys(keys, 4, 0) == b"".join(keys)
    assert classify._joined_keys(tuple(keys[2:5]), 4, 2) == b"".join(keys[2:5])
    assert classify._joined_keys(keys[:3] + [bytes([9]) * 4], 4, 0) is None
    assert classify._joined_keys([bytes(bytearray(k)) for k in keys[:2]], 4, 0) is None   # equal, others
    assert classify._joined_keys(keys[4:], 4, 3) is None
    assert classify._joined_keys(keys[4:], 4, 5) is None
    assert classify._joined_keys(keys, 8, 0) is None
    monkeypatch.setattr(classify, "_VEC_SCOPE", None)
    assert classify._joined_keys(keys, 4, 0) is None
