"""compile._walk_leaves reads a moved chain without making it (session 8, round 3, issue #7).

The first append after a restore of a fan-out with its jumps on FORWARD moves every service
chain (model._MovedChain, entries made on first read); _walk_leaves used to read each one's
rules, making all 3 333 of them (~40 ms). It now asks model.chain_outline (cache keys and entry
positions from the chain's source and placement) and model.chain_body (the source's entries, the
same bytes). Checked here: the outline of every chain of a lazy table is a cold decode's and
reading it makes nothing; a lazy table compiles (programs, _program_key's keys and bases,
chain_info, the remembered walk) as a cold decode of the same blob and its leaves stay unmade;
an outline whose first index is off by one is caught.

Session 9: with --to-input's layout (INPUT -j SVC) INPUT's program, which an append changes, is
compiled and inlines the hub SVC; it is read from its source (model.chain_source, chain_entry:
its entries at their moved positions) and stays unmade too, and the hub run's shared bodies are
the previous table's, moved (classify._moved_bodies) when the hub and its case chains moved
together. Checked: the engine's compile of the first append is the cold one and makes no chain;
the kept bodies are taken for the moved hub only (not past a changed chain between the hub and
its case chains); kept RETURN entries one entry off are caught; moved chains of plain rules
(jump, goto, tcp match) inlined one rule at a time compile as cold.
"""
import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_model_incremental import clear_caches  # noqa: E402
from test_model_lazy import _appends, _cold, _unmade  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.model import AF_INET, AF_INET6, decode_replace  # noqa: E402


def _lazy_tables(bufs, family):
    clear_caches()
    return [decode_replace(b, family)[1] for b in bufs]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_outlines_of_unmade_chains_are_cold(family):
    bufs = _appends(family, 3)
    lazy = _lazy_tables(bufs, family)
    for t, buf in zip(lazy[1:], bufs[1:]):
        before = _unmade(t)
        assert before > 0
        got = [model.chain_outline(c) for c in t.chains]
        bodies = [model.chain_body(c) for c in t.chains]
        assert _unmade(t) == before             # nothing made
        cold = _cold(buf, family)
        assert got == [model.chain_outline(c) for c in cold.chains]
        for (rules, pe), c in zip(bodies, cold.chains):
            # the same bytes (cache_key) and fields but the positions (the source's)
            assert [r.cache_key for r in rules] == [r.cache_key for r in c.rules]
            assert [(r.ip, r.matches, r.counters) for r in rules] == \
                [(r.ip, r.matches, r.counters) for r in c.rules]
            assert (pe is None) == (c.policy_entry is None)
            if pe is not None:
                assert pe.cache_key == c.policy_entry.cache_key
        # and the outline of the made chains, read from their entries, is the same again
        assert [model.chain_outline(c) for c in t.chains] == got
        for c in t.chains:
            c.rules
        assert _unmade(t) == 0
        assert [model.chain_outline(c) for c in t.chains] == got


def _off_by_one(monkeypatch):
    """A broken chain_outline: an unmade chain's first index one too far."""
    real = C.chain_outline

    def broken(c):
        out = real(c)
        if model._unmade(c) is not None:
            out = out[:3] + (out[3] + 1,) + out[4:]
        return out
    monkeypatch.setattr(C, "chain_outline", broken)


def test_off_by_one_outline_is_caught(monkeypatch):
    family = AF_INET
    bufs = _appends(family, 1)
    t = _lazy_tables(bufs, family)[1]
    _off_by_one(monkeypatch)
    assert [C.chain_outline(c) for c in t.chains] != \
        [C.chain_outline(c) for c in _cold(bufs[1], family).chains]


# --- compile of a lazy table against a cold decode's (root: the kernel parses the rules) ---

def _walk(t, monkeypatch):
    from test_classify_bulk import _walk as walk
    return walk(t, 1 << 30, monkeypatch, leaves_from=C.LEAVES_FROM)


def _compiled(t, facts, monkeypatch):
    from test_compile_kept import _programs
    walk = _walk(t, monkeypatch)            # first: a compile may make chains
    return _programs(t, facts), walk


def _first_append_texts(to_input: bool = True) -> tuple:
    """(the restore's text, the first append's): rulesets' fan-out (its jumps on FORWARD, or
    --to-input's layout) and one rule appended to INPUT."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "bench"))
    import rulesets
    base = rulesets.make("fanout", 1200, seed=5).text
    if to_input:
        base = base.replace("-A FORWARD ", "-A INPUT ")
    extra = "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"
    return base, base.replace("COMMIT", extra + "\nCOMMIT")


def _first_append(to_input: bool):
    """(the restore's table, the first append's) from the kernel's blobs of
    _first_append_texts."""
    from test_cplane_scale import kernel_blob, replace_buf
    return [replace_buf(*kernel_blob(text)) for text in _first_append_texts(to_input)]


_real_outline = model.chain_outline
_real_policy = model.policy_indexes


def _policy_off_by_one(monkeypatch):
    """A broken policy_indexes: an unmade chain's RETURN entry one too far."""
    def broken(chains):
        return [i if i is None or model._unmade(c) is None else i + 1
                for c, i in zip(chains, _real_policy(chains))]
    monkeypatch.setattr(classify, "policy_indexes", broken)


def _check_lazy_compiles_as_cold(monkeypatch, to_input, broken=False, made_ok=False):
    from test_compile_kept import _clear
    from bpfilter_umh.compile import KernelFacts
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    bufs = _first_append(to_input)
    clear_caches()
    _clear()
    prev = decode_replace(bufs[0], AF_INET)[1]
    C.compile_table(prev, facts)                # the restore, compiled as the engine does
    t = decode_replace(bufs[1], AF_INET)[1]
    before = _unmade(t)
    assert before > 300
    if broken == "outline":
        _off_by_one(monkeypatch)
    elif broken == "policy":
        _policy_off_by_one(monkeypatch)
        classify._KEPT_FOR.clear()          # the RETURN entries read, not kept ones moved
    from test_compile_kept import _programs
    # the engine's compile of the append (the restore's walks remembered): the leaves stay
    # unmade, and so does the chain holding the jumps (SVC: with --to-input's layout INPUT's
    # program, which the append changes, is compiled and inlines SVC read from its source,
    # model.chain_source; classify reads the leaves' RETURN entries through policy_indexes)
    direct = _programs(t, facts)
    if not made_ok:
        # (in FORWARD's layout the append goes to the empty INPUT, and FORWARD's program is
        # the restore's walk moved: compile._moved_program_key, model._note_moved)
        assert _unmade(t) == before
    # (the test's walk, from no remembered walk, makes SVC)
    warm = _compiled(t, facts, monkeypatch)
    if not made_ok:
        assert _unmade(t) >= before - 1
    if broken:
        monkeypatch.setattr(C, "chain_outline", _real_outline)
        monkeypatch.setattr(classify, "policy_indexes", _real_policy)
    clear_caches()
    _clear()
    cold_t = decode_replace(bufs[1], AF_INET)[1]
    assert _unmade(cold_t) == 0
    cold = _compiled(cold_t, facts, monkeypatch)
    del prev
    return warm, cold, direct


@pytest.mark.parametrize("to_input", [False, True])
def test_first_append_compiles_as_cold(monkeypatch, to_input):
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    warm, cold, direct = _check_lazy_compiles_as_cold(monkeypatch, to_input)
    # (bytes and map entries; the warm ones are kept programs, the cold made anew, and the
    # where texts of a warm compile of --to-input's INPUT differ, as before round 3)
    assert {k: v[:2] for k, v in direct.items()} == {k: v[:2] for k, v in cold[0].items()}
    assert {k: v[:2] for k, v in warm[0].items()} == {k: v[:2] for k, v in cold[0].items()}
    if not to_input:
        assert {k: v[:3] for k, v in warm[0].items()} == {k: v[:3] for k, v in cold[0].items()}
    assert warm[1] == cold[1]


def test_first_append_with_a_broken_outline_is_caught(monkeypatch):
    """The walk's bases (_program_key) of the lazy table are not the cold decode's (and, their
    key missing the restore's program, FORWARD's is made anew, which reads and makes every
    leaf: hence made_ok)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    warm, cold, _direct = _check_lazy_compiles_as_cold(monkeypatch, False, broken="outline",
                                                       made_ok=True)
    assert warm[1] != cold[1]


def test_to_input_append_with_broken_policy_indexes_is_caught(monkeypatch):
    """--to-input's first append with the leaves' RETURN entries one too far: INPUT's case map
    (classify._case_map: each case's RETURN entry relative to the run) is not the cold one."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    warm, cold, direct = _check_lazy_compiles_as_cold(monkeypatch, True, broken="policy")
    assert {k: v[:2] for k, v in direct.items()} != {k: v[:2] for k, v in cold[0].items()}
    assert {k: v[:2] for k, v in warm[0].items()} != {k: v[:2] for k, v in cold[0].items()}


# --- the shared bodies of a moved hub, kept for the next table (classify._moved_bodies) ---

def _hits(monkeypatch, name: str = "_moved_bodies") -> list:
    """Whether each call of classify's `name` (_moved_bodies, _leaf_bodies) took the kept
    bodies."""
    real, out = getattr(classify, name), []

    def spy(*a):
        got = real(*a)
        out.append(got is not None)
        return got
    monkeypatch.setattr(classify, name, spy)
    return out


def _kept_bodies_compile(monkeypatch):
    """--to-input's fan-out with one more user chain, SVC+, empty and reached from nowhere,
    between the hub and its case chains in the blob (libiptc sorts user chains by name):
    restored, one rule appended to INPUT (the hub and its case chains moved whole: the kept
    bodies are taken; the global functions made anew, so that the kept RETURN entries are
    read), then one rule appended to SVC+ (the case chains behind it moved, the hub not: the
    kept bodies must not be taken). Returns the hits, the two appends' tables, their
    programs and a cold compile's of each."""
    from test_compile_kept import _clear, _programs
    from test_cplane_scale import decoded
    from bpfilter_umh.compile import KernelFacts
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    base, first = (text.replace(":SVC ", ":SVC+ - [0:0]\n:SVC ") for text in _first_append_texts())
    texts = [base, first, first.replace("COMMIT", "-A SVC+ -s 203.0.113.7/32 -j ACCEPT\nCOMMIT")]
    clear_caches()
    _clear()
    hits = _hits(monkeypatch)
    tables, warm, moved = [], [], []
    for text in texts:
        tables.append(decoded(text))
        classify._FN_CACHE.clear()
        warm.append(_programs(tables[-1], facts))
        # the case chains moved with the hub, by one decode (before the next decode, which
        # makes the chains in front of its change)
        t = tables[-1]
        hub, cases = t.chain("SVC"), [c for c in t.chains if c.name.startswith("SVC-")]
        moved.append(model.placement(hub) is not None and
                     model.placed_by(cases, model.placement(hub)))
    assert moved == [False, True, False]
    names = [c.name for c in tables[2].chains]
    assert names.index("SVC") < names.index("SVC+") < names.index("SVC-0")
    cold = []
    for text in texts[1:]:
        clear_caches()
        _clear()
        cold.append(_programs(decoded(text), facts))
    return hits, tables[1:], warm[1:], cold


def _code(programs) -> dict:
    return {k: v[:2] for k, v in programs.items()}


def test_kept_bodies_are_taken_for_a_moved_hub_only(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    hits, _tables, warm, cold = _kept_bodies_compile(monkeypatch)
    assert hits[:3] == [False, True, False]
    assert [_code(w) for w in warm] == [_code(c) for c in cold]


def test_kept_bodies_moved_wrong_are_caught(monkeypatch):
    """The kept RETURN entries moved one entry too far: the global function made for the first
    append counts the wrong entries."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    real = classify._MovedAnchors.__getitem__
    monkeypatch.setattr(classify._MovedAnchors, "__getitem__",
                        lambda self, pos: real(self, pos) + 1)
    hits, _tables, warm, cold = _kept_bodies_compile(monkeypatch)
    assert hits[:3] == [False, True, False]
    assert _code(warm[0])["INPUT"] != _code(cold[0])["INPUT"]
    assert _code(warm[1]) == _code(cold[1])


_PLAIN_CHAINS = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:A - [0:0]
:B - [0:0]
-A INPUT -s 192.0.2.0/24 -j A
-A A -s 192.0.2.1/32 -j B
-A A -s 192.0.2.3/32 -g B
-A A -p tcp -m tcp --dport 22 -j DROP
-A B -s 192.0.2.4/32 -j ACCEPT
COMMIT
"""


def test_moved_chain_of_plain_rules_compiles_as_cold():
    """User chains an append to INPUT moves whole, whose rules no run holds (a jump, a goto, a
    tcp match), inlined into INPUT's program: each rule placed on its own (model.chain_entry),
    the chains not made; the programs are a cold compile's. (Not here: a rule without -j,
    libiptc's jump to the next entry, keeps decode_replace from moving the chains; a LOG
    target or a limit match keeps the program from being kept, and the walks that find it out
    read the chains' rules, making them.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    from test_compile_kept import _clear
    from test_cplane_scale import decoded
    from bpfilter_umh import ebpf as E
    from bpfilter_umh.compile import KernelFacts
    facts = KernelFacts.fake()
    texts = [_PLAIN_CHAINS, _PLAIN_CHAINS.replace(
        "COMMIT", "-A INPUT -s 203.0.113.99/32 -j DROP\nCOMMIT")]

    def programs(t):
        out = {}
        for cp in C.compile_table(t, facts).programs:
            names = sorted({i.map for i in cp.items if isinstance(i, E.Insn) and i.map})
            out[cp.chain] = cp.assemble({name: 3 + k for k, name in enumerate(names)})
        return out
    clear_caches()
    _clear()
    prev = decoded(texts[0])
    programs(prev)
    t = decoded(texts[1])
    assert _unmade(t) == 2
    warm = programs(t)
    assert _unmade(t) == 2
    clear_caches()
    _clear()
    assert warm == programs(decoded(texts[1]))
    del prev


@pytest.mark.parametrize("to_input", [False, True])
def test_append_into_a_service_chain_compiles_as_cold(monkeypatch, to_input):
    """After an append to INPUT, an append into a service chain in the middle (iptables -A
    SVC-300): the decode moves the chains behind it whole and shares those before it, both
    unmade (model._build), the compile makes at most the hub and the changed chain, and its
    programs and walks are a cold decode's."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    from test_compile_kept import _clear
    from test_cplane_scale import kernel_blob, replace_buf
    from bpfilter_umh.compile import KernelFacts
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    bufs = [replace_buf(*kernel_blob(text)) for text in _leaf_texts(to_input, "append SVC-300")]
    clear_caches()
    _clear()
    t = decode_replace(bufs[0], AF_INET)[1]
    C.compile_table(t, facts)
    t = decode_replace(bufs[1], AF_INET)[1]
    C.compile_table(t, facts)
    t = decode_replace(bufs[2], AF_INET)[1]
    before = _unmade(t)
    assert before >= len(t.chains) - 6    # made: the 3 built-in ones, SVC, SVC-300 (+1)
    warm = _compiled(t, facts, monkeypatch)
    assert _unmade(t) >= before - 1
    clear_caches()
    _clear()
    cold_t = decode_replace(bufs[2], AF_INET)[1]
    assert _unmade(cold_t) == 0
    cold = _compiled(cold_t, facts, monkeypatch)
    assert {k: v[:2] for k, v in warm[0].items()} == {k: v[:2] for k, v in cold[0].items()}
    assert warm[1] == cold[1]


def _leaf_texts(to_input: bool, change: str) -> tuple:
    """(restore, an append to INPUT, the change) of a 1 200-rule fan-out on FORWARD or INPUT."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "bench"))
    import rulesets
    base = rulesets.make("fanout", 1200, seed=5).text
    if to_input:
        base = base.replace("-A FORWARD ", "-A INPUT ")
    one = base.replace("COMMIT", "-A INPUT -s 203.0.113.99/32 -j DROP\nCOMMIT")
    new = "-s 203.0.113.98/32 -p udp -m udp --dport 4 -j DROP"
    kind, _, chain = change.partition(" ")
    if kind == "append":            # iptables -A CHAIN
        two = one.replace("COMMIT", f"-A {chain} {new}\nCOMMIT")
    elif kind in ("insert", "insert2"):     # iptables -I CHAIN 1 (or 2)
        at = one.index(f"-A {chain} ")
        if kind == "insert2":
            at = one.index("\n", at) + 1
        two = one[:at] + f"-A {chain} {new}\n" + one[at:]
    elif kind == "renumber":        # SVC-100 with a body of its own, then an append to CHAIN
        one = one.replace("COMMIT", "-A SVC-100 -s 203.0.113.97/32 -j DROP\nCOMMIT")
        two = one.replace("COMMIT", f"-A {chain} {new}\nCOMMIT")
    elif kind == "delete":          # iptables -D CHAIN -s 203.0.113.97/32 -j DROP
        one = one.replace("COMMIT", f"-A {chain} -s 203.0.113.97/32 -j DROP\nCOMMIT")
        two = one.replace(f"-A {chain} -s 203.0.113.97/32 -j DROP\n", "")
    else:                           # jump: an append that jumps to another service chain
        two = one.replace("COMMIT", f"-A {chain} -s 203.0.113.98/32 -j SVC-301\nCOMMIT")
    return base, one, two


def _walked_as_cold(monkeypatch, to_input: bool, change: str) -> tuple:
    """(programs, remembered walks, chain_info by name) of a warm compile of the change after
    an append to INPUT, the same of a cold decode+compile, and PROG_STATS' change in the warm
    one."""
    from test_compile_kept import _clear, _programs
    from test_cplane_scale import kernel_blob, replace_buf
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = C.KernelFacts.fake()
    bufs = [replace_buf(*kernel_blob(text)) for text in _leaf_texts(to_input, change)]
    infos = []
    compile_chains = C._compile_chains

    def spy(table, *a):
        compile_chains(table, *a)
        names = {id(c): c.name for c in table.chains}
        # (the changed leaf: its chain named, CHANGED_LEAF's value the set of (id, place))
        infos.append({(k[0], names[k[1]]) if isinstance(k, tuple) else
                      k if k == C.CHANGED_LEAF else names[k]:
                      {(names[i], at) for i, at in v} if k == C.CHANGED_LEAF else v
                      for k, v in C.chain_info(table).items()})
    monkeypatch.setattr(C, "_compile_chains", spy)

    def compiled(t):
        programs = _programs(t, facts)
        return programs, dict(C._WALK_RECORDS[id(t)][1]), infos[-1]
    clear_caches()
    _clear()
    t = decode_replace(bufs[0], AF_INET)[1]
    C.compile_table(t, facts)
    prev = decode_replace(bufs[1], AF_INET)[1]     # installed while the next one compiles
    C.compile_table(prev, facts)
    t = decode_replace(bufs[2], AF_INET)[1]
    stats = dict(C.PROG_STATS)
    taken = _hits(monkeypatch, "_leaf_bodies")
    warm = compiled(t)
    stats = {k: C.PROG_STATS[k] - v for k, v in stats.items()}
    stats["leaf_bodies"] = sum(taken)
    del prev
    clear_caches()
    _clear()
    cold = compiled(decode_replace(bufs[2], AF_INET)[1])
    return warm, cold, stats


def _same(warm, cold):
    # (code and maps, as above: the `where` texts of a warm compile may miss a case chain's
    # RETURN entry that a cold one names, with or without the splice)
    assert {k: v[:2] for k, v in warm[0].items()} == {k: v[:2] for k, v in cold[0].items()}
    assert warm[1] == cold[1]
    # chain_info of the chains both walked (a warm compile walks only what it compiles)
    both = warm[2].keys() & cold[2].keys()
    assert {k: warm[2][k] for k in both} == {k: cold[2][k] for k in both}
    return both


@pytest.mark.parametrize("to_input", [False, True])
@pytest.mark.parametrize("change", ["append SVC-300", "append SVC-0", "append SVC-99",
                                    "append SVC-398", "insert2 SVC-300", "delete SVC-300",
                                    "insert SVC-300"])
def test_change_in_a_leaf_chain_splices_the_walk(monkeypatch, to_input, change):
    """A change of plain rules in one service chain (a leaf of the walk of the built-in chain
    that reaches the fan-out): the previous walk is taken with that chain's record made anew
    (compile._changed_leaf, _leaf_anew), and the programs, remembered walks and chain facts
    are a cold decode+compile's. SVC-0 is the first service chain in table order and walk
    order, SVC-99 the last in table order (libiptc sorts by name), SVC-398 the last one the
    hub jumps to. A rule put at a service chain's head is where the hub's jump lands, which
    decode_replace does not take as a plain change (model.moved_from): walked, as cold."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    warm, cold, stats = _walked_as_cold(monkeypatch, to_input, change)
    spliced = 0 if change.startswith("insert ") else 1
    assert stats["walks_leaf"] == spliced and stats["walks_spliced"] == spliced, stats
    # the hub's jump cases (classify._leaf_bodies), unless the program is a kept one (a delete
    # that gives FORWARD the restore's program back)
    assert stats["leaf_bodies"] == spliced or stats["made"] == 0, stats
    both = _same(warm, cold)
    assert change.split()[1] in both


@pytest.mark.parametrize("to_input", [False, True])
def test_leaf_case_map_renumbers_bodies(monkeypatch, to_input):
    """The hub's case map made from the previous one (classify._leaf_case_map) when the
    changed chain's new body comes before another body in case order: SVC-100's body (its
    own since the append before) is numbered one more, and its case's value changes though
    its chain did not move (libiptc sorts chains by name: SVC-100 is ahead of SVC-50 in the
    table, behind it in the hub). The maps are a cold compile's."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    patched = _hits(monkeypatch, "_leaf_case_map")
    warm, cold, stats = _walked_as_cold(monkeypatch, to_input, "renumber SVC-50")
    assert stats["walks_leaf"] == 1 and stats["leaf_bodies"] == 1, stats
    assert patched.count(True) == 1      # the warm compile (the cold one has none)
    _same(warm, cold)
    # the case map: an array of the hub's 399 cases, keyed 0..398 (classify._case_keys)
    hub = "INPUT" if to_input else "FORWARD"
    keys = [[k for k, _v in entries] for entries in warm[0][hub][1]]
    assert [struct.pack("<I", k) for k in range(399)] in keys


@pytest.mark.parametrize("to_input", [False, True])
def test_hub_runs_are_found_once(monkeypatch, to_input):
    """The hub's runs that the restore's compile found (classify.find_runs of its 399 jumps)
    serve the compiles after it: kept for the hub the restore made (compile._chain_runs),
    passed on through the append to INPUT (its program a kept one, classify.carry_bodies, or
    compiled: compile._moved_runs), taken by the change in a service chain. find_runs reads
    the hub twice: for the restore and for the cold compile."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    real, sizes = classify.find_runs, []

    def spy(rules, *a, **kw):
        if len(rules) >= 256:
            sizes.append(len(rules))
        return real(rules, *a, **kw)
    monkeypatch.setattr(classify, "find_runs", spy)
    warm, cold, stats = _walked_as_cold(monkeypatch, to_input, "append SVC-300")
    assert stats["walks_leaf"] == 1, stats
    assert len(sizes) == 2, sizes
    _same(warm, cold)


def test_jump_added_to_a_service_chain_walks_it(monkeypatch):
    """An append of a jump into a service chain is no plain change (model.moved_from): the
    walk is not spliced, and the compile is a cold one's."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    warm, cold, stats = _walked_as_cold(monkeypatch, False, "jump SVC-300")
    assert stats["walks_leaf"] == 0 and stats["walks_spliced"] == 0
    _same(warm, cold)


def test_leaf_made_wrong_is_caught(monkeypatch):
    """The check above catches a spliced walk that keeps the changed chain's old record."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    leaf_anew = C._leaf_anew

    def stale(c, old_rec, old_reads):
        got = leaf_anew(c, old_rec, old_reads)
        return got and (old_rec,) + got[1:]
    monkeypatch.setattr(C, "_leaf_anew", stale)
    warm, cold, stats = _walked_as_cold(monkeypatch, False, "append SVC-300")
    assert stats["walks_leaf"] == 1
    with pytest.raises(AssertionError):
        _same(warm, cold)


def test_leaf_bodies_moved_wrong_are_caught(monkeypatch):
    """The check above catches jump cases taken from the previous table with a RETURN entry
    not moved (classify._leaf_bodies: SVC-0 changed, the cases behind it moved)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    leaf_bodies = classify._leaf_bodies

    def unmoved(cc, run, chain, by_k, small):
        got = leaf_bodies(cc, run, chain, by_k, small)
        if got is not None:
            got[1][by_k[-1]] -= 1
        return got
    monkeypatch.setattr(classify, "_leaf_bodies", unmoved)
    warm, cold, stats = _walked_as_cold(monkeypatch, False, "append SVC-0")
    assert stats["leaf_bodies"] == 1
    with pytest.raises(AssertionError):
        _same(warm, cold)
