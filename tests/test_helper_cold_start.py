"""A new helper in a namespace whose table another helper installed (issue #7: the first command
after a helper has exited). What must hold:

  - the adopted table is answered from the blob the state file holds (engine._read_state,
    sockopt Backend._kept_snapshot), never encoded again: GET_INFO and GET_ENTRIES equal what
    the installing helper answered, byte for byte, live counters included;
  - the adoption's walk is the one the next SET_REPLACE's decode reuses (model._LAST_WALK), and
    an append served by the new helper leaves the entries the kernel's xtables hold after the
    same append (differential);
  - a --listen helper holding a table of heap.SMALL_TABLE entries or more stays past
    BPFILTER_IDLE_EXIT (it waits BPFILTER_IDLE_EXIT_BIG), and exits after BPFILTER_IDLE_EXIT
    once the table is flushed; one holding a small table exits after BPFILTER_IDLE_EXIT.

Real engines, real helpers and iptables-legacy, in namespaces of ours.
"""
import ctypes
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import kernel_xt as kx  # noqa: E402
import lab  # noqa: E402
import rulesets  # noqa: E402
from nsutil import Netns  # noqa: E402
from test_state_and_decode import _serve  # noqa: E402

from bpfilter_umh import heap, model  # noqa: E402
from bpfilter_umh import sockopt as S  # noqa: E402
from bpfilter_umh.model import AF_INET  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")

PY = sys.executable
LAUNCHER = os.path.join(ROOT, "build", "bpfilter-exec")
NAME = b"filter".ljust(32, b"\0")
APPEND = "-A INPUT -s 203.0.113.7/32 -p udp -m udp --dport 4 -j DROP"


def _info_and_entries(d):
    info = _serve(d, S.SO_GET_INFO, 0, NAME, S.GETINFO.size).raw[:S.GETINFO.size]
    size = S.GETINFO.unpack(info)[13]
    raw = _serve(d, S.SO_GET_ENTRIES, 0, S.GET_ENTRIES_HDR.pack(NAME, size),
                 S.GET_ENTRIES_HDR.size + size).raw
    return info, raw[S.GET_ENTRIES_HDR.size:S.GET_ENTRIES_HDR.size + size]


def _set_replace(d, info, blob: bytes, counters: list):
    old_n = d.backend(d.home_cookie, AF_INET).num_entries()
    back = ctypes.create_string_buffer(16 * old_n)
    hdr = S.REPLACE_HDR.pack(NAME, info.valid_hooks, info.num_entries, len(blob),
                             *info.hook_entry, *info.underflow, old_n, ctypes.addressof(back))
    _serve(d, S.SO_SET_REPLACE, 1, hdr + blob)
    _serve(d, S.SO_SET_ADD_COUNTERS, 1, S.COUNTERS_INFO_HDR.pack(NAME, len(counters))
           + b"".join(S.XT_COUNTERS.pack(p, b) for p, b in counters))


def _zeroed(blob: bytes) -> bytes:
    """The entries with their counters zero (ipt_entry: counters at 96, next_offset at 90)."""
    out, off = bytearray(blob), 0
    while off < len(out):
        out[off + 96:off + 112] = bytes(16)
        off += int.from_bytes(out[off + 90:off + 92], "little")
    return bytes(out)


def test_adopted_table_is_answered_from_its_state_and_appended_to(monkeypatch):
    text = rulesets.make("mixed", 1500, seed=5).text.replace("-A FORWARD ", "-A INPUT ")
    with Netns("csk") as k, Netns("csb") as b:
        lab.restore(k, text)
        with k.inside():
            info, kblob = kx.snapshot(AF_INET)
        with b.inside():
            d = S.Dispatcher()
            n = info.num_entries
            # as iptables-restore sends it, then libiptc's counters: two rules counted
            counted = [(0, 0)] * n
            counted[3], counted[700] = (5, 500), (2, 80)
            _set_replace(d, info, kx.restored(kblob, AF_INET), counted)
            before = _info_and_entries(d)
            try:
                # a new helper's engine adopts the state; nothing of it may be encoded
                encode = model.Table.encode
                monkeypatch.setattr(model.Table, "encode", lambda t, *a, **kw: _refuse_encode(
                    t, len(kblob)) or encode(t, *a, **kw))
                d2 = S.Dispatcher()
                be = d2.backend(d2.home_cookie, AF_INET)
                assert be.engine.state_error is None
                after = _info_and_entries(d2)
                assert after == before
                assert be._snap[1] is be.table.kept_blob
                # GET_INFO as the kernel answers it for the same table
                got = S.GETINFO.unpack(after[0])
                assert list(got[2:7]) == list(info.hook_entry)
                assert list(got[7:12]) == list(info.underflow)
                assert got[12:] == (info.num_entries, info.size)
                assert _zeroed(after[1]) == kblob
                # the walk the next SET_REPLACE's decode starts from is the adopted table's
                assert model._LAST_WALK[AF_INET][0] is be.table.kept_blob
                monkeypatch.undo()
                # an append served by the new helper, and the same append in the kernel
                k.run(["iptables-legacy"] + APPEND.split())
                with k.inside():
                    ainfo, ablob = kx.snapshot(AF_INET)
                new = next(o for o, s, _, _ in kx.entries(ablob, AF_INET)
                           if o + s == ainfo.underflow[1])
                sent = kx.libiptc_appended(ainfo, ablob, new, AF_INET)
                _set_replace(d2, ainfo, sent, [(0, 0)] * ainfo.num_entries)
                assert _zeroed(_info_and_entries(d2)[1]) == ablob
            finally:
                monkeypatch.undo()
                be = S.Dispatcher().backend(S.netns_cookie(), AF_INET)
                be.engine.flush()


def _refuse_encode(table, size: int):
    """(the engine encodes the empty table it starts from: that one may be)"""
    if table.num_entries > 100:
        raise AssertionError(f"the adopted table ({size} bytes) was encoded again")


def _helper(ns, env):
    """A --listen helper, returned once it serves (a command before that would start the
    door's own helper, and ours would find the socket taken and exit)."""
    helper = ns.popen([PY, "-m", "bpfilter_umh", "--listen"], cwd=ROOT, env=env,
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "serving netns cookie" not in seen:
        line = helper.stderr.readline()
        assert line, seen
        seen += line
    return helper


def _waits_on(helper, seconds: float) -> bool:
    """True when the helper is still running after `seconds`."""
    try:
        helper.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


@pytest.mark.parametrize("rules", [heap.SMALL_TABLE + 10, 20])
def test_a_helper_holding_a_big_table_stays_longer(rules):
    if not os.path.exists(LAUNCHER):
        subprocess.run(["make", "-C", ROOT, "launcher"], check=True, capture_output=True)
    text = rulesets.make("blocklist", rules, seed=3).text
    with Netns("csi") as ns:
        env = dict(ns.env, PYTHONPATH=ROOT, BPFILTER_IDLE_EXIT="1",
                   BPFILTER_IDLE_EXIT_BIG="60")
        helper = _helper(ns, env)
        try:
            ns.run([LAUNCHER, "--", "iptables-legacy-restore"], input=text, env=env)
            big = rules >= heap.SMALL_TABLE
            assert _waits_on(helper, 4) == big
            if big:
                ns.run([LAUNCHER, "--", "iptables-legacy", "-F"], env=env)
                # the table now holds the 4 entries of three empty chains: the short wait
                assert helper.wait(timeout=30) == 0
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
            ns.run([PY, "-m", "bpfilter_umh.cli", "flush"], env=dict(env, PYTHONPATH=ROOT),
                   check=False)
