"""A restore over the loaded table (issue #7: kube-proxy and docker re-apply their whole ruleset
periodically, mostly unchanged): iptables-restore sends every entry with comefrom 0 and zero
counters, so its bytes differ from the kept blob (comefrom as mark_source_chains set it) in every
entry. The decode compares such a blob with the previous kept blob with comefrom zeroed
(model._reusable's splice), builds the kept blob from the previous one (model._kept_spliced),
takes the previous comefrom when every changed entry is of the kind it was (model._mark_same_kinds)
and the previous table's Chain objects where nothing in them changed. None of that may change
what the decode says:

- along random edits, restores (and libiptc-style blobs in between) decoded warm equal each blob
  decoded cold: the Table, every entry's position data, the jumps, the kept blob, the refusals
  (errno and message);
- iptables-legacy-restore of a kube-proxy-like ruleset, the same again, then with one verdict,
  one rule, one chain changed: the kept blob the warm decode makes is the kernel's own entries
  (GET_ENTRIES after the same restore), and the table the cold decode's.
"""
from __future__ import annotations

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import test_model_incremental as inc  # noqa: E402
from kernel_xt import restored  # noqa: E402
from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.model import AF_INET, AF_INET6, Jump, Verdict, decode_replace  # noqa: E402


def _flip(rng, t):
    """A copy of t with one rule's verdict changed, or one jump sent to another user chain
    (same size: the restore of kube-proxy's sync with one endpoint changed)."""
    t = inc.copy.deepcopy(t)
    rules = [r for c in t.chains for r in c.rules]
    if not rules:
        return t
    r = rng.choice(rules)
    user = [c.name for c in t.chains if not c.builtin]
    if isinstance(r.target, Jump) and user:
        r.target = Jump(rng.choice(user), r.target.goto, 0, 0)
    else:
        r.target = Verdict(rng.choice([inc.ACCEPT, inc.DROP, model.XT_RETURN]))
    return t


@pytest.mark.parametrize("family,seed", [(AF_INET, 11), (AF_INET, 12), (AF_INET6, 13)])
def test_restores_over_the_table_decode_as_cold(family, seed, monkeypatch):
    rng = random.Random(seed)
    while True:                 # a table the kernel takes, to edit from
        good = inc._table(rng, family, nuser=5, nrules=8)
        inc.clear_caches()
        if inc._outcome(lambda: decode_replace(inc._buf(*inc._blob(good)), family))[0] == "ok":
            break
    bufs, kinds = [], []
    for _ in range(160):
        op = rng.random()
        t = good if op < 0.3 else _flip(rng, good) if op < 0.6 else inc._edit(rng, good)
        blob, he, uf, vh, n = inc._blob(t)
        op = rng.random()
        # what libiptc sends back (live counters), a restore, or a decode that is not
        # normalized in between (the engine reading its state file: Table.decode)
        kind = "libiptc" if op < 0.15 else "raw" if op < 0.25 else "restore"
        blob = inc._noisy(rng, blob, family) if kind != "restore" else restored(blob, family)
        bufs.append(inc._buf(blob, he, uf, vh, n) if kind != "raw" else (blob, he, uf, vh))
        kinds.append(kind)
        if kind != "raw":
            inc.clear_caches()
            if inc._outcome(lambda: decode_replace(bufs[-1], family))[0] == "ok":
                good = t

    def decode(b):
        if isinstance(b, tuple):
            t = model.Table.decode(b[0], family, *b[1:])
            return t, _raw_facts(t)
        t = decode_replace(b, family)[1]
        return t, inc._facts(t)
    cold = []
    for b in bufs:
        inc.clear_caches()
        got = inc._outcome(lambda: decode(b))
        cold.append(got if got[0] == "error" else ("ok",) + got[1])
    assert sum(c[0] == "error" for c in cold) >= 2, "some edits are refused"
    spliced = []
    real = model._kept_spliced

    def counting(*a):
        spliced.append(1)
        return real(*a)
    monkeypatch.setattr(model, "_kept_spliced", counting)
    inc.clear_caches()
    last = None
    shared_chains = 0
    for i, (b, want) in enumerate(zip(bufs, cold)):
        got = inc._outcome(lambda: decode(b))
        if last is not None:
            # the table installed before is untouched by this decode
            assert inc._facts(last[0]) == last[1], i
        if want[0] == "error":
            assert got == want, i
            continue
        assert got[0] == "ok", (i, got)
        assert got[1][0] == want[1], (i, kinds[i])
        assert got[1][1] == want[2], (i, kinds[i])
        if kinds[i] == "raw":
            continue
        if last is not None:
            ids = {id(c) for c in last[0].chains}
            shared_chains += sum(id(c) in ids for c in got[1][0].chains)
        last = got[1]
    # the paths under test ran
    assert len(spliced) > 50 and shared_chains > 100, (len(spliced), shared_chains)


def _raw_facts(t):
    """What a decode that is not normalized says of each entry (comefrom and counters as
    sent)."""
    return [(r.index, r.offset, r.comefrom, r.counters, r.ip, tuple(r.matches), r.target)
            for r in t.entries()]


# ---- against the kernel ----------------------------------------------------------------------

kernel = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def _kube(n_svc: int, change: str = "") -> str:
    """A kube-proxy-like filter table: KUBE-SERVICES jumping to one chain per service, each with
    its endpoints' rules and a final DROP."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":KUBE-SERVICES - [0:0]"]
    svcs = [f"SVC-{k}" for k in range(n_svc)]
    if change == "new chain":
        svcs.insert(n_svc // 2, "SVC-NEW")
    lines += [f":{s} - [0:0]" for s in svcs]
    lines += ["-A INPUT -j KUBE-SERVICES", "-A FORWARD -j KUBE-SERVICES"]
    for k, s in enumerate(svcs):
        lines.append(f"-A KUBE-SERVICES -d 198.51.100.{k % 250}/32 -p tcp -m tcp "
                     f"--dport {1000 + k} -j {s}")
    for k, s in enumerate(svcs):
        lines.append(f"-A {s} -s 192.0.2.{k % 250}/32 -j ACCEPT")
        if change == "rule added" and k == n_svc // 3:
            lines.append(f"-A {s} -s 203.0.113.7/32 -j ACCEPT")
        if change == "verdict" and k == n_svc // 2:
            lines.append(f"-A {s} -j ACCEPT")
        else:
            lines.append(f"-A {s} -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@kernel
def test_restore_again_keeps_what_the_kernel_keeps():
    import kernel_xt as kx
    import lab
    from nsutil import Netns
    steps = ["", "", "verdict", "verdict", "", "rule added", "", "new chain", "new chain", ""]
    snaps = []
    with Netns("ra") as ns:
        for change in steps:
            lab.restore(ns, _kube(60, change))
            with ns.inside():
                snaps.append(kx.snapshot(AF_INET))
    bufs = [kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                              list(info.hook_entry), list(info.underflow), 4, 0,
                              restored(blob, AF_INET)) for info, blob in snaps]
    cold = []
    for b in bufs:
        inc.clear_caches()
        cold.append(decode_replace(b, AF_INET)[1])
    inc.clear_caches()
    prev = None
    for i, (b, want, (_info, kblob)) in enumerate(zip(bufs, cold, snaps)):
        got = decode_replace(b, AF_INET)[1]
        assert got.kept_blob == kblob, (i, steps[i])        # the kernel's comefrom, counters 0
        assert got == want and inc._facts(got) == inc._facts(want), (i, steps[i])
        if prev is not None and steps[i] == steps[i - 1]:
            # the same restore again: the previous kept blob and chains, nothing built anew
            assert got.kept_blob is prev.kept_blob, i
            assert all(a is b for a, b in zip(got.chains, prev.chains)), i
        prev = got
    # an append after the restores (libiptc sends what GET_ENTRIES showed), then a restore
    info, blob = snaps[-1]
    inc.clear_caches()
    a = decode_replace(kx.replace_buffer("filter", info.valid_hooks, info.num_entries,
                                         len(blob), list(info.hook_entry),
                                         list(info.underflow), 4, 0, blob), AF_INET)[1]
    assert a.kept_blob == blob
    got = decode_replace(bufs[-1], AF_INET)[1]
    assert got.kept_blob == blob and got == cold[-1]
