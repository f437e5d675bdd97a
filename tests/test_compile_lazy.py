"""compile._walk_leaves reads a moved chain without making it (session 8, round 3, issue #7).

The first append after a restore of a fan-out with its jumps on FORWARD moves every service
chain (model._MovedChain, entries made on first read); _walk_leaves used to read each one's
rules, making all 3 333 of them (~40 ms). It now asks model.chain_outline (cache keys and entry
positions from the chain's source and placement) and model.chain_body (the source's entries, the
same bytes). Checked here: the outline of every chain of a lazy table is a cold decode's and
reading it makes nothing; a lazy table compiles (programs, _program_key's keys and bases,
chain_info, the remembered walk) as a cold decode of the same blob and its leaves stay unmade;
an outline whose first index is off by one is caught.
"""
import os
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


def _first_append(to_input: bool):
    """(the restore's table, the first append's) from the kernel's blobs of rulesets' fan-out
    (its jumps on FORWARD, or --to-input's layout) and one rule appended to INPUT."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "bench"))
    import rulesets
    from test_cplane_scale import kernel_blob, replace_buf
    base = rulesets.make("fanout", 1200, seed=5).text
    if to_input:
        base = base.replace("-A FORWARD ", "-A INPUT ")
    extra = "-A INPUT -s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"
    return [replace_buf(*kernel_blob(text))
            for text in (base, base.replace("COMMIT", extra + "\nCOMMIT"))]


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
    warm = _compiled(t, facts, monkeypatch)
    # the leaves stay unmade: the compile makes at most the chain holding the jumps (SVC: with
    # --to-input's layout INPUT's program, which the append changes, is compiled and its
    # code lands in SVC; classify reads the leaves' RETURN entries through policy_indexes)
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
    return warm, cold


@pytest.mark.parametrize("to_input", [False, True])
def test_first_append_compiles_as_cold(monkeypatch, to_input):
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    warm, cold = _check_lazy_compiles_as_cold(monkeypatch, to_input)
    # (bytes and map entries; the warm ones are kept programs, the cold made anew, and the
    # where texts of a warm compile of --to-input's INPUT differ, as before round 3)
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
    warm, cold = _check_lazy_compiles_as_cold(monkeypatch, False, broken="outline",
                                              made_ok=True)
    assert warm[1] != cold[1]


def test_to_input_append_with_broken_policy_indexes_is_caught(monkeypatch):
    """--to-input's first append with the leaves' RETURN entries one too far: INPUT's case map
    (classify._case_map: each case's RETURN entry relative to the run) is not the cold one."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    warm, cold = _check_lazy_compiles_as_cold(monkeypatch, True, broken="policy")
    assert {k: v[:2] for k, v in warm[0].items()} != {k: v[:2] for k, v in cold[0].items()}
