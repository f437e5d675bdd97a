"""What an append to INPUT of --to-input's fan-out asks of the walk that keys INPUT's program
(session 13, issue #7): compile._Records hashes a sample of the walk's records,
compile._FirstByName makes the {name: first chain} dict only when a walk needs it, and the
chain facts of a spliced walk go into chain_info's dict only when it is read.

An append to INPUT of a fan-out in --to-input's layout (INPUT -j SVC, 3 333 service chains
behind it) gives INPUT's program a new walk every time: INPUT's record, then the hub's and the
service chains' spliced from the previous walk. Its key is looked up in _PROG_CACHE and kept
there, and hashing every record (the hub's alone holds 3 333 landings) took ~0.9 ms of each
append. _Records now hashes their count and a bounded sample of the records at both ends.
Checked here: equal records built from other objects hash and look up alike; the hash reads no
record outside the sample; records that differ only outside it are told apart by the dict (a
collision, not a wrong hit); and through the real decode, a table decoded again finds its
programs kept under its first decode's keys (the walk's records are other objects, equal).

_program_key resolves each jump of a walked chain by its chain_pos and refuses the program
key when that chain is not the first of its name (_scan and _landing would disagree). It used
to put every chain's name in a dict first (~0.35 ms of 3 337 chains), which the walk spliced
after INPUT (one jump, to SVC, the fourth chain) does not need. Checked: first_at answers as
the dict for every place, with names repeated, on both sides of SCAN_MAX; it makes no dict for
a place up to SCAN_MAX; the compiles of appends to INPUT make none, and give the programs of
a compile with every cache empty.

The walk spliced after INPUT took the previous walk's facts of every chain behind INPUT into
chain_info's dict (~0.7 ms of 3 333 service chains), which that compile does not read when the
hub's bodies are the kept ones (classify._moved_bodies): they are put in when chain_info is
next asked (compile._defer_chain_facts). Checked: the compiles of appends to INPUT ask chain_info
nothing while facts wait, and give a cold compile's programs; with the kept bodies refused, the
hub's bodies are read from the deferred facts (classify._walked_bodies), as cold.
"""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_model_incremental import clear_caches  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.model import AF_INET, Chain, Table, decode_replace  # noqa: E402


class _NoHash:
    """A value whose hash must not be asked (a record outside the sample)."""

    def __hash__(self):
        raise AssertionError("a record outside the sample was hashed")

    def __eq__(self, other):
        return isinstance(other, _NoHash)


def _walk_records(n: int, mid=None, copies: bool = False):
    """n records as _program_key makes them: a top chain with jumps to each service chain,
    then the service chains (no jumps); `mid` the rule keys of the middle one."""
    def key(s):
        return (s * 20).encode() if not copies else bytes(bytearray((s * 20).encode()))
    top = ("INPUT", 1, (key("a"),), key("p"), tuple((p, k + 1, 0, False) for p, k in
                                                     enumerate(range(n - 1))))
    recs = [top]
    for k in range(n - 1):
        keys = (key(f"r{k}"), key(f"d{k}"))
        if mid is not None and k == n // 2:
            keys = mid
        recs.append((f"SVC-{k}", None, keys, key("ret")))
    return C._Records(recs)


def test_equal_records_of_other_objects_hash_alike():
    a, b = _walk_records(300), _walk_records(300, copies=True)
    assert a is not b and a[1][2][0] is not b[1][2][0]
    assert a == b and hash(a) == hash(b)
    cache = {("INPUT", a): "kept"}
    assert cache.get(("INPUT", b)) == "kept"
    # short walks (every record in the sample) too
    assert hash(_walk_records(5)) == hash(_walk_records(5, copies=True))


def test_hash_reads_only_the_sample():
    # a record in the middle of a long walk holds a value that cannot be hashed: the sampled
    # hash does not read it (a full one would: ~0.9 ms for a fan-out's walk)
    recs = _walk_records(400, mid=(_NoHash(), b"x"))
    hash(recs)
    assert len(C._records_sample(recs)) == 1 + 2 * C._RECORDS_SAMPLE


def test_records_differing_outside_the_sample_are_told_apart():
    a = _walk_records(400, mid=(b"one", b"x"))
    b = _walk_records(400, mid=(b"two", b"x"))
    assert a != b and hash(a) == hash(b)            # a collision, by construction
    cache = {a: 1, b: 2}
    assert len(cache) == 2
    assert cache[_walk_records(400, mid=(b"one", b"x"))] == 1
    assert cache[_walk_records(400, mid=(b"two", b"x"))] == 2
    assert _walk_records(400, mid=(b"three", b"x")) not in cache


def test_a_table_decoded_again_finds_its_kept_programs(monkeypatch):
    """The --to-input fan-out (INPUT -j SVC, 1 200 rules) from the kernel: decoded, compiled,
    then decoded from the same blob into a new table (its walk's records other objects) and
    compiled: every program is the kept one (PROG_STATS reused), the same bytecode."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    from test_compile_kept import _clear, _programs
    from test_compile_lazy import _first_append
    from bpfilter_umh.compile import KernelFacts
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    facts = KernelFacts.fake()
    buf = _first_append(True)[0]
    clear_caches()
    _clear()
    first = decode_replace(buf, AF_INET)[1]
    want = _programs(first, facts)
    assert "INPUT" in want
    keys = list(C._PROG_CACHE)
    assert keys and max(len(k[-1]) for k in keys) > 300       # INPUT's walk: the fan-out
    clear_caches()              # the decode cache: the second table's records are made anew
    again = decode_replace(buf, AF_INET)[1]
    assert again is not first
    before = C.PROG_STATS["reused"]
    got = _programs(again, facts)
    assert C.PROG_STATS["reused"] - before == len(want)
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in want.items()}


def _named(names):
    return Table("filter", AF_INET, 0, [Chain(n, hook=k if k < 3 else None)
                                        for k, n in enumerate(names)])


@pytest.mark.parametrize("scan_max", [64, 0, 1000])
def test_first_at_answers_as_the_dict(monkeypatch, scan_max):
    monkeypatch.setattr(C._FirstByName, "SCAN_MAX", scan_max)
    rng = random.Random(7)
    for n in (1, 4, 70, 300):
        names = [f"C{rng.randrange(max(1, n // 3))}" for _ in range(n)]
        t = _named(names)
        by = C._first_by_name(t)
        for cp in range(n):
            got = C._FirstByName(t).first_at(cp)
            assert got == (by.get(t.chains[cp].name) is t.chains[cp]), (n, cp)
        lazy = C._FirstByName(t)
        assert [lazy.first_at(cp) for cp in range(n)] == \
            [by.get(c.name) is c for c in t.chains]
        assert lazy.get(names[-1]) is by[names[-1]] and lazy.get("nope") is None


def test_first_at_near_the_start_makes_no_dict(monkeypatch):
    made = []
    real = C._first_by_name
    monkeypatch.setattr(C, "_first_by_name", lambda t: made.append(t) or real(t))
    t = _named(["INPUT", "FORWARD", "OUTPUT", "SVC", "SVC"] + [f"S{k}" for k in range(3000)])
    lazy = C._FirstByName(t)
    assert lazy.first_at(3) and not lazy.first_at(4)
    assert lazy.first_at(C._FirstByName.SCAN_MAX)
    assert made == []
    assert lazy.first_at(2000) and len(made) == 1       # far in: the dict, once
    assert not lazy.first_at(4) and len(made) == 1


EXTRA = "-A INPUT -s 203.0.113.{k}/32 -p udp -m udp --dport 4 -j DROP"


def test_appends_to_input_make_no_name_dict(monkeypatch):
    """Appends to INPUT of the --to-input fan-out (1 200 rules, from the kernel): INPUT's walk
    is spliced after INPUT and resolves its jump to SVC without the dict; each compile gives
    a cold compile's programs."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    made = []
    real = C._first_by_name
    monkeypatch.setattr(C, "_first_by_name", lambda t: made.append(t) or real(t))

    def restored():
        assert made                     # the restore's walk reads the hub's 399 jumps: the dict

    def appended(k):
        assert made == [], k
    _appends_to_input(monkeypatch, restored, made.clear, appended, global_above=None)


def _jump_to_second_of_a_name():
    """A table whose INPUT jumps to the second of two user chains named XA (the kernel takes
    any names: translate_table checks none), decoded: the jump's chain_pos is that chain's."""
    import copy
    from test_model_incremental import _blob, _buf
    from bpfilter_umh import model
    from bpfilter_umh.model import IpHeader, Jump, Rule, Verdict

    def user(name, verdict):
        return Chain(name, head_entry=Rule(IpHeader.any(AF_INET),
                                           target=model.error_target(name)),
                     rules=[Rule(IpHeader.any(AF_INET), target=Verdict(verdict))],
                     policy_entry=Rule(IpHeader.any(AF_INET), target=Verdict(model.XT_RETURN)))
    t = copy.deepcopy(Table.empty("filter", AF_INET))
    t.chain("INPUT").rules = [Rule(IpHeader.any(AF_INET), target=Jump("XB"))]
    t.chains += [user("XA", -1), user("XB", -2)]         # DROP, ACCEPT
    blob, he, uf, vh, n = _blob(t)
    assert blob.count(b"XB\0") == 1
    clear_caches()
    got = decode_replace(_buf(blob.replace(b"XB\0", b"XA\0"), he, uf, vh, n), AF_INET)[1]
    cp = got.chain("INPUT").rules[0].target.chain_pos
    assert [c.name for c in got.chains][cp] == "XA" and got.chains[cp] is not got.chain("XA")
    return got


def test_a_jump_to_the_second_chain_of_its_name_gets_no_key():
    """_program_key refuses the key (the program is compiled, not kept) when a jump's chain
    is not the first of its name: first_at near the start, the dict far in."""
    from bpfilter_umh import flavors
    from bpfilter_umh.compile import KernelFacts
    t = _jump_to_second_of_a_name()
    args = (KernelFacts.fake(), flavors.get("nf"), C.SUBPROG_ABOVE, None, C._knobs())
    assert C._program_key(t, t.chain("INPUT"), *args) == (None, None)
    # the same table with the name made unique again gets one
    for c in t.chains:
        if c.name == "XA" and c is not t.chain("XA"):
            c.name = "XB"
            t.chain("INPUT").rules[0].target.chain = "XB"
    assert C._program_key(t, t.chain("INPUT"), *args)[0] is not None


def _appends_to_input(monkeypatch, restored=None, before=None, after=None, global_above=0):
    """The restore of --to-input's fan-out (1 200 rules, from the kernel), then two appends to
    INPUT, each compiled (its walk spliced after INPUT) and compared with a compile with every
    cache empty. restored(): after the restore's compile; before(k) / after(k): around append
    k's compile; global_above: classify.GLOBAL_ABOVE (None: as it is)."""
    import rulesets
    from test_append_moved import _same_programs
    from test_compile_kept import _clear, _programs
    from test_cplane_scale import decoded
    from bpfilter_umh.compile import KernelFacts
    if global_above is not None:
        monkeypatch.setattr(classify, "GLOBAL_ABOVE", global_above)
    facts = KernelFacts.fake()
    text = rulesets.make("fanout", 1200, seed=5).text.replace("-A FORWARD ", "-A INPUT ")
    _clear()
    tables = [decoded(text)]           # (alive: the next decode moves from them)
    _programs(tables[0], facts)
    if restored is not None:
        restored()
    for k in range(2):
        text = text.replace("COMMIT", EXTRA.format(k=90 + k) + "\nCOMMIT")
        t = decoded(text)
        tables.append(t)
        if before is not None:
            before()
        spliced = C.PROG_STATS["walks_spliced"]
        warm = _programs(t, facts)
        assert C.PROG_STATS["walks_spliced"] - spliced == 1
        if after is not None:
            after(k)
        _clear()
        cold = _programs(t, facts)
        _same_programs(warm, cold, k)
        _clear()
        _programs(t, facts)             # the next append finds this table's programs kept


def _watch(monkeypatch, module, name, log):
    real = getattr(module, name)

    def watched(*a, **k):
        got = real(*a, **k)
        log.append(got)
        return got
    monkeypatch.setattr(module, name, watched)


def test_appends_to_input_leave_the_spliced_facts_unread(monkeypatch):
    """Each append's compile takes the hub's kept bodies and asks chain_info nothing while
    the spliced facts wait (and gives a cold compile's programs)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    waiting, moved = [], []
    real = C.chain_info

    def asked(table):
        hit = C._WALKS.get(id(table))
        if hit is not None and hit[0] is table and hit[6]:
            waiting.append(table)
        return real(table)
    monkeypatch.setattr(C, "chain_info", asked)
    _watch(monkeypatch, classify, "_moved_bodies", moved)

    def before():
        waiting.clear()
        moved.clear()

    def after(k):
        assert any(m is not None for m in moved), k        # the hub's kept bodies
        assert waiting == [], k
    _appends_to_input(monkeypatch, before=before, after=after)


def test_hub_bodies_read_from_the_deferred_facts(monkeypatch):
    """The kept bodies refused (classify._moved_bodies None): the hub's bodies are read from
    the facts the spliced walk deferred (classify._walked_bodies, not _NOT_WALKED), and each
    append compiles as cold."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    import test_compile_kept as K
    walked, seen = [], []
    monkeypatch.setattr(classify, "_moved_bodies", lambda *a: None)
    _watch(monkeypatch, classify, "_walked_bodies", walked)
    real_programs = K._programs

    def programs(t, facts):
        walked.clear()
        got = real_programs(t, facts)
        seen.append([w is not classify._NOT_WALKED for w in walked])
        return got
    monkeypatch.setattr(K, "_programs", programs)
    _appends_to_input(monkeypatch)
    # per append: the warm compile (spliced, its facts deferred), the cold one, the kept one
    warm = [seen[1 + 3 * k] for k in range(2)]
    assert all(w and all(w) for w in warm), seen
