"""Issue #7: a helper that serves several namespaces (the kernel shim's serves all of them) decodes
a table whose entries an earlier decode cached as fast as a first restore, or faster. What must
hold:

  - entries found in the entry cache start templates as entries walked in full do, so the rest
    of a run is guessed and read a chunk at a time (model._walk_entries, _walk_run), not looked
    up in the cache one by one; the table is the one a cold decode makes;
  - the empty table a new namespace's engine starts from (Table.empty) is decoded beside the
    last walk, which stays the next decode's (model._LAST_WALK);
  - one process serving two namespaces: the same restore in each, then an append in the second,
    leave the entries the kernel's xtables hold after the same commands (differential), and the
    second namespace's restore reuses the first one's walk.

Real kernel blobs (iptables-legacy-restore in namespaces of ours), the real Dispatcher.
"""
import ctypes
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import kernel_xt as kx  # noqa: E402
import lab  # noqa: E402
import rulesets  # noqa: E402
from nsutil import Netns  # noqa: E402

from bpfilter_umh import model  # noqa: E402
from bpfilter_umh import sockopt as S  # noqa: E402
from bpfilter_umh.frames import Request  # noqa: E402
from bpfilter_umh.model import AF_INET, decode_replace  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

NAME = b"filter".ljust(32, b"\0")
CACHES = ("_ENTRY_CACHE", "_LAST_WALK", "_ADDRESSES", "_ADDR_INTS", "_PAYLOADS")
APPEND = "-A INPUT -s 203.0.113.7/32 -p udp -m udp --dport 4 -j DROP"


def _clear():
    for name in CACHES:
        c = getattr(model, name, None)
        if c is not None:
            c.clear()


def _kernel(text: str):
    with Netns("dok") as k:
        lab.restore(k, text)
        with k.inside():
            return kx.snapshot(AF_INET)


def _buf(info, blob: bytes) -> bytes:
    return kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                             list(info.hook_entry), list(info.underflow), 4, 0, blob)


@pytest.mark.parametrize("shape", ["blocklist", "fanout", "mixed"])
def test_cached_entries_are_read_in_runs(shape, monkeypatch):
    info, kblob = _kernel(rulesets.make(shape, 3000, seed=2).text)
    buf = _buf(info, kx.restored(kblob, AF_INET))
    _clear()
    cold = decode_replace(buf, AF_INET)[1]
    # the entries stay cached, the walk goes: what a decode in another namespace finds
    model._LAST_WALK.clear()
    in_runs = []
    real = model._walk_run

    def counting(*a):
        got = real(*a)
        in_runs.append(len(got[0]) if got else 0)
        return got
    monkeypatch.setattr(model, "_walk_run", counting)
    warm = decode_replace(buf, AF_INET)[1]
    assert warm == cold
    assert warm.kept_blob == cold.kept_blob == kblob
    # the mixed shape's templates come in no order: few runs there, cold or warm
    if shape != "mixed":
        assert sum(in_runs) >= 0.8 * info.num_entries, (shape, sum(in_runs))


def test_the_empty_table_keeps_the_last_walk():
    info, kblob = _kernel(rulesets.make("blocklist", 2000, seed=2).text)
    _clear()
    decode_replace(_buf(info, kx.restored(kblob, AF_INET)), AF_INET)
    last = model._LAST_WALK[AF_INET]
    empty = model.Table.empty("filter", AF_INET)
    assert empty.num_entries == 4
    assert model._LAST_WALK[AF_INET] is last


def _serve(d, cmd, is_set, data: bytes, size: int = None):
    buf = ctypes.create_string_buffer(bytes(data), size or max(1, len(data)))
    # the caller's namespace named in the request, as the kernel shim's helper gets it
    rep = d.serve(Request(cmd, is_set, AF_INET, os.getpid(), size or len(data),
                          ctypes.addressof(buf), S.netns_cookie()))
    assert rep.status == 0, (cmd, is_set, rep.status)
    return buf


def _entries(d) -> bytes:
    info = _serve(d, S.SO_GET_INFO, 0, NAME, S.GETINFO.size).raw[:S.GETINFO.size]
    size = S.GETINFO.unpack(info)[13]
    raw = _serve(d, S.SO_GET_ENTRIES, 0, S.GET_ENTRIES_HDR.pack(NAME, size),
                 S.GET_ENTRIES_HDR.size + size).raw
    return raw[S.GET_ENTRIES_HDR.size:S.GET_ENTRIES_HDR.size + size]


def _replace(d, info, blob: bytes):
    old_n = d.backend(S.netns_cookie(), AF_INET).num_entries()
    back = ctypes.create_string_buffer(16 * old_n)
    hdr = S.REPLACE_HDR.pack(NAME, info.valid_hooks, info.num_entries, len(blob),
                             *info.hook_entry, *info.underflow, old_n, ctypes.addressof(back))
    _serve(d, S.SO_SET_REPLACE, 1, hdr + blob)


def test_one_process_two_namespaces_same_rules(monkeypatch):
    text = rulesets.make("fanout", 3000, seed=4).text.replace("-A FORWARD ", "-A INPUT ")
    walked = []
    real = model._walk_range

    def counting(*a):
        out = real(*a)
        walked[-1] += len(out)
        return out
    monkeypatch.setattr(model, "_walk_range", counting)
    with Netns("dok") as k, Netns("doa") as a, Netns("dob") as b:
        lab.restore(k, text)
        with k.inside():
            info, kblob = kx.snapshot(AF_INET)
        k.run(["iptables-legacy"] + APPEND.split())
        with k.inside():
            ainfo, ablob = kx.snapshot(AF_INET)
        new = next(o for o, s, _, _ in kx.entries(ablob, AF_INET)
                   if o + s == ainfo.underflow[1])
        _clear()
        with a.inside():
            d = S.Dispatcher()      # serves b too, as the kernel shim's helper serves all
        try:
            for ns in (a, b):
                with ns.inside():
                    walked.append(0)
                    _replace(d, info, kx.restored(kblob, AF_INET))
                    assert _entries(d) == kblob
            # the second namespace's restore: the first one's walk reused, nothing walked
            assert walked[0] >= info.num_entries - 5 and walked[1] <= 5, walked
            with b.inside():
                _replace(d, ainfo, kx.libiptc_appended(ainfo, ablob, new, AF_INET))
                assert _entries(d) == ablob
            with a.inside():
                assert _entries(d) == kblob
        finally:
            for ns in (a, b):
                with ns.inside():
                    d.backend(S.netns_cookie(), AF_INET).engine.flush()
