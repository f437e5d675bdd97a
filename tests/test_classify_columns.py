"""Session 12 (issue #7: the compile of a cold restore of 10 000 rules): two more column-at-a-time
paths of the classifier answer exactly what the paths they stand in front of answer.

  - classify._run_prefix_codes reads an LPM run's prefix codes from byte columns of its rules'
    keys (the prefix length as the sum of the mask bytes' bit counts, the mask checked to be a
    prefix by _prefix_masks): the codes _prefix_codes unpacks key by key, for source and
    destination runs; the LPM maps so compiled (keys cut from one buffer, _lpm_keys; values
    packed for the first positions only, _best_values, jump cases among them) are those of the
    key-by-key path and answer the definition: the first rule whose prefix holds the key's.
  - classify._prefix_masks: every 32-bit mask it accepts is one of _PLEN's, and the other way
    round, over every prefix and masks one bit off one.

Each comparison is also run against a deliberately broken form of the path, which it must catch.
"""
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rulesets  # noqa: E402
from test_classify_fast import root  # noqa: E402
from test_classify_lpm_seen import _cold  # noqa: E402  (every compile cache emptied)
from test_cplane_scale import decoded  # noqa: E402

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh.engine import kernel_facts  # noqa: E402

N = 1500


# ---- LPM runs ----------------------------------------------------------------------------------

def _lpm_text(field: str) -> str:
    """The blocklist on `field` (-s or -d), with a /8 ahead of longer 10.x prefixes and a few
    gotos to a user chain among the prefixes (cases of the run, ACT_CASE values: a goto does
    not return into the run, so it stays in an LPM run where a jump would cut it)."""
    lines = rulesets.make("blocklist", N, seed=3).text.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("-A ")]
    for i in rules[len(rules) // 4::len(rules) // 6]:
        lines[i] = lines[i].replace("-j DROP", "-g CASE").replace("-j ACCEPT", "-g CASE")
    lines.insert(rules[len(rules) // 3], "-A INPUT -s 10.0.0.0/8 -j DROP")
    lines.insert(lines.index("*filter") + 1, ":CASE - [0:0]")
    at = max(i for i, line in enumerate(lines) if line.startswith("-A "))
    lines.insert(at + 1, "-A CASE -j RETURN")
    text = "\n".join(lines) + "\n"
    return text if field == "src" else text.replace(" -s ", " -d ")


@pytest.fixture(scope="module")
def lpm_tables():
    return {field: decoded(_lpm_text(field)) for field in ("src", "dst")}


def _lpm_runs(tab) -> list:
    """The LPM runs compile_table emits, as lpm_entries is asked for them."""
    runs = []
    real = classify.lpm_entries

    def spy(run):
        runs.append(run)
        return real(run)
    classify.lpm_entries = spy
    try:
        _cold()
        C.compile_table(tab, kernel_facts(), "nf")
    finally:
        classify.lpm_entries = real
    return runs


def _contains(outer: tuple, inner: tuple) -> bool:
    (n1, l1), (n2, l2) = outer, inner
    return l1 <= l2 and (n1 ^ n2) >> (32 - l1) == 0 if l1 else True


def _by_definition(run) -> dict:
    """{LPM key: the first rule's (position, action)} over the run's rules' prefixes."""
    field = run.sig[1]
    pre = []
    for r in run.rules:
        a, m = (r.ip.src, r.ip.smsk) if field == "src" else (r.ip.dst, r.ip.dmsk)
        pre.append((int(a), classify._plen(m)))
    values = classify._values(run)
    out = {}
    for p in sorted(set(pre)):
        best = min(i for i, q in enumerate(pre) if _contains(q, p))
        out[classify._PLEN_LE[p[1]] + p[0].to_bytes(4, "big")] = values[best]
    return out


@root
@pytest.mark.parametrize("field", ["src", "dst"])
def test_lpm_columns_are_the_keys_and_the_definition(lpm_tables, field, monkeypatch):
    runs = _lpm_runs(lpm_tables[field])
    runs = [r for r in runs if r.sig[1] == field and len(r.rules) > N // 2]
    assert runs
    for run in runs:
        n = len(run.rules)
        fast = classify._run_prefix_codes(run, field)
        assert fast is not None                     # the column path, not the key-by-key one
        assert list(fast) == classify._prefix_codes(range(n), field, run)
        assert classify.ACT_CASE in classify._run_acts(run)     # some values are cases
        classify._LPM_SEEN.clear()
        got = classify.lpm_entries(run)
        assert dict(got) == _by_definition(run) and len(got) == len(dict(got))
        # the same list as the key-by-key path's (the columns switched off)
        monkeypatch.setattr(classify, "_run_prefix_codes",
                            lambda run, field: classify._prefix_codes(range(len(run.rules)),
                                                                      field, run))
        classify._LPM_SEEN.clear()
        assert classify.lpm_entries(run) == got
        monkeypatch.undo()


@root
def test_broken_prefix_lengths_are_caught(lpm_tables, monkeypatch):
    """The prefix length summed from one mask byte fewer: the codes and the map differ."""
    run = max(_lpm_runs(lpm_tables["src"]), key=lambda r: len(r.rules))
    want = _by_definition(run)
    bits = bytearray(classify._BITS)
    bits[0xff] = 7                                  # a whole mask byte counts one bit less
    monkeypatch.setattr(classify, "_BITS", bytes(bits))
    classify._LPM_SEEN.clear()
    assert list(classify._run_prefix_codes(run, "src")) != \
        classify._prefix_codes(range(len(run.rules)), "src", run)
    assert dict(classify.lpm_entries(run)) != want


def _mask_columns(masks: list) -> list:
    b = b"".join(m.to_bytes(4, "big") for m in masks)
    return [b[k::4] for k in range(4)]


def test_prefix_masks_are_plen_keys():
    prefixes = [((1 << 32) - 1) ^ ((1 << (32 - n)) - 1) for n in range(33)]
    off_one = sorted({p ^ (1 << b) for p in prefixes for b in range(32)} - set(prefixes))
    assert classify._prefix_masks(_mask_columns(prefixes))
    for m in off_one:
        assert not classify._prefix_masks(_mask_columns(prefixes + [m])), hex(m)
        assert not classify._prefix_masks(_mask_columns([m] * 3)), hex(m)
    rnd = random.Random(1)
    for _ in range(200):
        ms = [rnd.choice(prefixes) if rnd.random() < 0.9 else rnd.getrandbits(32)
              for _ in range(rnd.randrange(1, 6))]
        assert classify._prefix_masks(_mask_columns(ms)) == \
            all(m in classify._PLEN for m in ms), [hex(m) for m in ms]


def test_broken_prefix_masks_are_caught(monkeypatch):
    """The check of the next byte after a partial one left out: 255.0.255.0 passes."""
    monkeypatch.setattr(classify, "_NOT_FF", bytes(256))
    assert classify._prefix_masks(_mask_columns([0xff00ff00]))
