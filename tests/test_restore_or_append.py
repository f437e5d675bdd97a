"""A restore over the loaded table, or libiptc's append? (issue #7, session 9)

The decode compares a blob that looks like a restore with the previous kept blob with comefrom
zeroed (model._reusable's splice, model._restored_over); anything else with the kept blob as it
is. model._restored_over used to call a blob a restore when the first or last entry that differs
from the kept blob was sent with comefrom 0. libiptc's append sends each rule with the comefrom
GET_ENTRIES showed, but builds the policies, chain heads, RETURN and ERROR entries itself with
comefrom 0: the first `iptables -A INPUT` after a restore of a fan-out on FORWARD (INPUT empty)
differs from the kept blob at its end only in SVC's RETURN entry, and was taken for a restore:
every one of the rules then differed from the zeroed blob (a header each, the spliced kept blob
rebuilt: ~40 ms of the decode). Now only a rule entry kept with comefrom set and sent with 0 is
evidence of a restore.

Checked against the kernel (iptables-legacy-restore, then iptables-legacy -A, GET_ENTRIES of
each): after a restore, the first append as libiptc sends it (_libiptc: the kernel's entries with
comefrom 0 in the new rule, the policies and the RETURN entries; byte-equal to what the real
iptables-legacy sent through the door, checked when this was written), with and without counted
packets, is decoded without the zeroed blob; a restore of the same text, with one rule changed,
with one more rule, with it; a table whose rules are all unreached (comefrom 0 kept: no evidence)
decodes all the same; over a table without a rule (no evidence either way) a restore is guessed
from its zero comefrom as before, so that its decode notes its blob as sent zeroed and the same
restore again compares at once. Whichever way it guessed, the decode equals a cold decode of the
same blob (Table, every entry's position data, the jumps) and its kept blob is the kernel's own
entries.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

import rulesets  # noqa: E402
import test_model_incremental as inc  # noqa: E402
import kernel_xt as kx  # noqa: E402
from kernel_xt import restored  # noqa: E402

from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.model import AF_INET, AF_INET6, decode_replace  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

RULE = "-s 203.0.113.99/32 -p udp -m udp --dport 4 -j DROP"
RULE2 = "-s 203.0.113.98/32 -j ACCEPT"
BASE = rulesets.make("fanout", 1200, seed=5).text       # FORWARD -j SVC, INPUT empty
TEXTS = {
    "base": BASE,
    "appended": BASE.replace("COMMIT", f"-A INPUT {RULE}\nCOMMIT"),
    "changed": BASE.replace("-A SVC-7 -s 192.0.2.0/27", "-A SVC-7 -s 192.0.2.32/27"),
    "more": BASE.replace("-A SVC-7 -j DROP", "-A SVC-7 -s 192.0.2.64/27 -j ACCEPT\n"
                         "-A SVC-7 -j DROP"),
    # the same rules, but nothing jumps to SVC: no rule is reached, every kept comefrom is 0
    "unreached": BASE.replace("-A FORWARD -j SVC\n", ""),
    # no rule at all (as the table the helper starts with)
    "empty": "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
             "COMMIT\n",
}
assert all(t != BASE for k, t in TEXTS.items() if k != "base")


@pytest.fixture(scope="module")
def kernel():
    """{name: (getinfo, entries)} of each text as the kernel keeps it (after
    iptables-legacy-restore), "appended_a" after `iptables-legacy -A INPUT RULE` on base,
    "appended_b" after `-A INPUT RULE2` on that."""
    import lab
    from nsutil import Netns
    out = {}
    with Netns("ra2") as ns:
        for name, text in TEXTS.items():
            lab.restore(ns, text)
            with ns.inside():
                out[name] = kx.snapshot(AF_INET)
        lab.restore(ns, BASE)
        ns.run(["iptables-legacy", "-A", "INPUT"] + RULE.split())
        with ns.inside():
            out["appended_a"] = kx.snapshot(AF_INET)
        ns.run(["iptables-legacy", "-A", "INPUT"] + RULE2.split())
        with ns.inside():
            out["appended_b"] = kx.snapshot(AF_INET)
    return out


def _entries(blob: bytes, family: int = AF_INET):
    return kx.entries(blob, family)


def _libiptc(info, blob: bytes, new: int, counted: bool = False,
             family: int = AF_INET) -> bytes:
    return kx.libiptc_appended(info, blob, new, family, counted)


def _buf(info, blob: bytes) -> bytes:
    return kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                             list(info.hook_entry), list(info.underflow), 4, 0, blob)


def _restore_of(kernel, name: str) -> bytes:
    info, blob = kernel[name]
    return _buf(info, restored(blob, AF_INET))


CASES = {
    # (what is sent after a restore of base, the kernel's entries it must keep, a restore?)
    "libiptc append": (lambda k: _buf(k["appended_a"][0], _libiptc(
        *k["appended_a"], k["appended_a"][0].hook_entry[1])), "appended_a", False),
    "libiptc append, counted": (lambda k: _buf(k["appended_a"][0], _libiptc(
        *k["appended_a"], k["appended_a"][0].hook_entry[1], True)), "appended_a", False),
    "restore, same": (lambda k: _restore_of(k, "base"), "base", True),
    "restore, a rule changed": (lambda k: _restore_of(k, "changed"), "changed", True),
    "restore, a rule more": (lambda k: _restore_of(k, "more"), "more", True),
    "restore, another table": (lambda k: _restore_of(k, "appended"), "appended", True),
}


def _said(monkeypatch) -> list:
    """The list each call of model._restored_over appends its answer to, from now on."""
    said = []
    real = model._restored_over

    def spy(*a):
        said.append(real(*a))
        return said[-1]
    monkeypatch.setattr(model, "_restored_over", spy)
    return said


def _decoded(bufs, monkeypatch):
    """The tables of bufs decoded in turn, and what _restored_over said for the last one."""
    said = _said(monkeypatch)
    inc.clear_caches()
    out = []
    for b in bufs:
        del said[:]
        out.append(decode_replace(b, AF_INET)[1])
    return out, said


def _cold(buf, family: int = AF_INET):
    inc.clear_caches()
    t = decode_replace(buf, family)[1]
    return t, inc._facts(t)


def test_the_append_emulated_is_the_kernels_append(kernel):
    """The append emulated is the kernel's: the same entries as iptables-legacy-restore of
    the text with the rule appended, but the comefrom values this test zeroes."""
    info, blob = kernel["appended_a"]
    r_info, r_blob = kernel["appended"]
    assert blob == r_blob and list(info.hook_entry) == list(r_info.hook_entry)
    sent = _libiptc(info, blob, info.hook_entry[1])
    diff = [o for o, n, _, _ in _entries(blob) if sent[o:o + n] != blob[o:o + n]]
    # the new rule, the three policies and SVC's RETURN (the service chains' are unreached:
    # each ends in an unconditional DROP, their RETURN entries keep comefrom 0)
    assert len(diff) == 5, diff


@pytest.mark.parametrize("case", list(CASES))
def test_after_a_restore_decodes_as_cold(kernel, case, monkeypatch):
    make, kept, is_restore = CASES[case]
    buf = make(kernel)
    want = _cold(buf)
    (first, got), said = _decoded([_restore_of(kernel, "base"), buf], monkeypatch)
    assert said and said[-1] is is_restore, said
    assert got.kept_blob == kernel[kept][1]
    assert got == want[0] and inc._facts(got) == want[1]


def test_a_table_no_rule_of_which_is_reached(kernel, monkeypatch):
    """Every kept comefrom of a rule is 0: a restore of the same text shows no evidence of
    being one (the policies are libiptc's too) and is compared with the kept bytes; the same
    table results, and a restore of base over it decodes as cold."""
    again = _restore_of(kernel, "unreached")
    (_, got), said = _decoded([again, again], monkeypatch)
    assert said == [False]
    want = _cold(again)
    assert got.kept_blob == kernel["unreached"][1]
    assert got == want[0] and inc._facts(got) == want[1]
    base = _restore_of(kernel, "base")
    (_, _, got), said = _decoded([again, again, base], monkeypatch)
    want = _cold(base)
    assert got.kept_blob == kernel["base"][1]
    assert got == want[0] and inc._facts(got) == want[1]


def test_an_append_after_the_append_is_no_restore(kernel, monkeypatch):
    """The second append (libiptc's, over the first append's kept blob, the first rule sent
    with the comefrom the kernel gave it) is no restore either, and reads as cold."""
    info, blob = kernel["appended_a"]
    first = _buf(info, _libiptc(info, blob, info.hook_entry[1], True))
    info2, blob2 = kernel["appended_b"]
    second = _buf(info2, _libiptc(info2, blob2, info.underflow[1]))
    (_, _, got), said = _decoded([_restore_of(kernel, "base"), first, second], monkeypatch)
    assert said == [False]
    want = _cold(second)
    assert got.kept_blob == blob2
    assert got == want[0] and inc._facts(got) == want[1]


def test_a_restore_over_a_table_without_rules(kernel, monkeypatch):
    """The table the helper starts with holds no rule: a restore over it is taken for one on
    the old evidence (its last entry's comefrom, sent 0), so its blob is noted as sent zeroed
    (the kept blob with comefrom zeroed, for the next restore: made for nothing, ~9 ms of a
    fan-out's 2 MB, if it were not); both read as cold."""
    empty, base = _restore_of(kernel, "empty"), _restore_of(kernel, "base")
    (_, got), said = _decoded([empty, base], monkeypatch)
    assert said == [True]
    assert model._LAST_WALK[AF_INET][4].zeroed is not None
    want = _cold(base)
    assert got.kept_blob == kernel["base"][1]
    assert got == want[0] and inc._facts(got) == want[1]
    (_, _, got), said = _decoded([empty, base, base], monkeypatch)
    assert said == [True]
    assert got == want[0] and inc._facts(got) == want[1]


def test_common_prefix_from_and_suffix_to():
    """The byte runs _restore_evidence steps over, against a plain loop (differences near and
    far, at the ends, none)."""
    import random
    rng = random.Random(4)
    for _ in range(300):
        a = bytes(rng.getrandbits(1) for _ in range(rng.randrange(0, 3000)))
        b = bytearray(a)
        for _ in range(rng.randrange(0, 3)):
            if b:
                b[rng.randrange(len(b))] ^= 1
        b = bytes(b[:rng.randrange(len(b) + 1)]) if rng.random() < 0.3 else bytes(b)
        i = rng.randrange(min(len(a), len(b)) + 1)
        k = 0
        while i + k < min(len(a), len(b)) and a[i + k] == b[i + k]:
            k += 1
        assert model._common_prefix_from(a, b, i) == k
        na = rng.randrange(len(b) + 1)
        nb = na if rng.random() < 0.7 else rng.randrange(len(b) + 1)
        k = 0
        while k < min(na, nb) and a[na - 1 - k] == b[nb - 1 - k]:
            k += 1
        assert model._common_suffix_to(a, na, b, nb) == k


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_libiptc_appends_to_an_empty_input_without_the_kernel(family, monkeypatch):
    """Both families, tables laid out by the model (test_model_lazy's fan-out on FORWARD,
    INPUT empty), each kept blob made by a cold decode: a restore, then three appends to
    INPUT as libiptc sends them (the first with counted packets): none is taken for a restore,
    the restore of the first table again is; each reads as cold."""
    from types import SimpleNamespace
    from test_model_lazy import _fanout_fwd
    from test_model_moved import _appended, _ip
    from bpfilter_umh.model import Rule, Verdict
    ts = [_fanout_fwd(family, 30)]
    ts[0].chain("INPUT").rules = []
    for k in range(3):
        ts.append(_appended(ts[-1], Rule(_ip(family, 90 + k), target=Verdict(inc.DROP))))
    bufs = []
    for k, t in enumerate(ts):
        blob, he, uf, vh, n = inc._blob(t)
        if k == 0:
            bufs.append(inc._buf(blob, he, uf, vh, n))
            continue
        kept = _cold(inc._buf(blob, he, uf, vh, n), family)[0].kept_blob
        new = uf[1] - (len(blob) - len(inc._blob(ts[k - 1])[0]))  # the rule before INPUT's policy
        info = SimpleNamespace(valid_hooks=vh, underflow=uf)
        bufs.append(inc._buf(_libiptc(info, kept, new, k == 1, family), he, uf, vh, n))
    bufs.append(bufs[0])
    inc.clear_caches()
    said = _said(monkeypatch)
    got = []
    for b in bufs:
        got.append(decode_replace(b, family)[1])
    assert said == [False, False, False, True], said
    for g, b in zip(got, bufs):
        inc.clear_caches()
        want = decode_replace(b, family)[1]
        assert g == want and inc._facts(g) == inc._facts(want)
