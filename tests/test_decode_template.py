"""Cold decode by template (model._walk_range, issue #7: a restore of 10 000 rules into an empty
table): an entry equal to an earlier one outside its key fields (addresses and masks, tcp/udp
ports, a jump's offset, a user chain's name; comefrom and the counters) is read with that
entry's checks and objects. model.TEMPLATES = False walks every entry in full; both must give
the same decode: the Table, every rule's fields (match and target payloads as parsed and as
kept, cache_key), the jumps' landing places, the kept blob, the extension names, or the same
refusal (errno and message), for

  - the bench's ruleset shapes (bench/rulesets.py) and tests/rulegen.py's tables as the
    kernel's iptables-legacy-restore encodes them (root: network namespaces), with the
    kernel's comefrom and with what iptables-restore sends (comefrom and counters zero);
  - the codec error corpus (test_codec_errors.CASES);
  - tables with many entries per template, every byte of an entry read by a template
    replaced (key fields and template fields alike), IPv4 and IPv6.
"""
import copy
import dataclasses
import ipaddress
import os
import random
import sys

import pytest
from construct import Container

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_xt as kx  # noqa: E402
from bpfilter_umh import model, uapi  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402
from bpfilter_umh.model import (AF_INET, AF_INET6, XT_RETURN, Chain, ExtTarget,  # noqa: E402
                                IpHeader, Jump, Match, Rule, Table, Verdict, decode_replace,
                                error_target)

ACCEPT, DROP = -2, -1
CACHES = ("_ENTRY_CACHE", "_LAST_WALK", "_PAYLOADS", "_CHAIN_NAMES")
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def _target_facts(t) -> tuple:
    """(kind, fields) of target t by value: the dataclass it is (a target whose payload is
    parsed when read, model._NamedError, is the ExtTarget it subclasses) and every field."""
    kind = next(k for k in (Verdict, Jump, ExtTarget) if isinstance(t, k))
    return kind.__name__, {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}


def _facts(t: Table):
    """Everything the decoded table says, objects compared by value (Match.raw and
    ExtTarget.raw too, which Rule equality leaves out)."""
    ents = t.entries()
    per = []
    for r in ents:
        per.append((model._RULE_FIELDS(r), *_target_facts(r.target),
                    [(m.name, m.revision, m.data, m.raw) for m in r.matches],
                    getattr(r, "cache_key", None)))
    return (t, per, t.kept_blob, t.target_names, t.match_names,
            [(c.name, c.hook, c.policy, len(c.rules), c.policy_entry is not None,
              c.head_entry is not None, len(c.trailer)) for c in t.chains],
            t.tail_entry, t.hook_entry, t.underflow, t.size, t.num_entries)


def _decode(buf: bytes, family: int, templates: bool):
    """(outcome, entries read by a template) of a cold decode_replace."""
    for name in CACHES:
        getattr(model, name).clear()
    before = model.TEMPLATES
    model.TEMPLATES = templates
    try:
        try:
            t = decode_replace(buf, family)[1]
        except BpfilterError as e:
            return ("error", e.errno, str(e)), 0
        raws = model._LAST_WALK[family][1]
        return ("ok", _facts(t)), sum(1 for r in raws if r.tpl is not None)
    finally:
        model.TEMPLATES = before
        for name in CACHES:
            getattr(model, name).clear()


def same(buf: bytes, family: int, where="", outcome=None) -> int:
    """Both decodes agree; returns how many entries the template decode read by template
    (and puts "ok" or the errno into the set `outcome`)."""
    fast, n = _decode(buf, family, True)
    slow, n_slow = _decode(buf, family, False)
    assert n_slow == 0
    if fast != slow and fast[0] == slow[0] == "ok":
        # the first entry that differs, for the message
        for a, b in zip(fast[1][1], slow[1][1]):
            assert a == b, where
    assert fast == slow, where
    if outcome is not None:
        outcome.add(fast[0] if fast[0] == "ok" else fast[1])
    return n


def _zeroed(blob: bytes, family: int) -> bytes:
    """What iptables-restore sends for the table the kernel shows: comefrom and counters 0."""
    cf, cnt, end = model._VOLATILE[family]
    out, off = bytearray(blob), 0
    while off < len(out):
        nxt = int.from_bytes(out[off + cf - 2:off + cf], "little")
        out[off + cf:off + cf + 4] = bytes(4)
        out[off + cnt:off + end] = bytes(end - cnt)
        off += nxt
    return bytes(out)


def _buf(info, blob: bytes) -> bytes:
    return kx.replace_buffer("filter", info.valid_hooks, info.num_entries, len(blob),
                             list(info.hook_entry), list(info.underflow), 4, 0, blob)


def _kernel_blobs(texts):
    import lab
    from nsutil import Netns
    out = []
    with Netns("dt") as ns:
        for text in texts:
            lab.restore(ns, text)
            with ns.inside():
                out.append(kx.snapshot(AF_INET))
    return out


# ---- what the kernel's iptables-legacy-restore writes -----------------------------------------

@root
def test_ruleset_shapes_decode_as_walked_in_full():
    import rulesets
    texts = [rulesets.make(s, 1500, seed=5).text for s in rulesets.SHAPES]
    for shape, (info, blob) in zip(rulesets.SHAPES, _kernel_blobs(texts)):
        for b in (blob, _zeroed(blob, AF_INET)):
            n = same(_buf(info, b), AF_INET, shape)
            assert n >= 0.99 * info.num_entries - 10, shape     # nearly every entry


@root
def test_generated_tables_decode_as_walked_in_full():
    import rulegen
    texts = [rulegen.generate(seed, big=True).text() for seed in range(40)]
    total = 0
    for seed, (info, blob) in enumerate(_kernel_blobs(texts)):
        total += same(_buf(info, blob), AF_INET, f"seed {seed}")
        same(_buf(info, _zeroed(blob, AF_INET)), AF_INET, f"seed {seed} zeroed")
    assert total > 0


# ---- the codec error corpus ---------------------------------------------------------------------

@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_error_corpus_decodes_alike(family):
    import test_codec_errors as tce
    for case, (fn, want) in tce.CASES.items():
        b = tce.Buf(tce.base_table(family), 4)
        fn(b)
        got, _n = _decode(b.build(), family, True)
        assert (got[1] if got[0] == "error" else 0) == want, case
        same(b.build(), family, case)


# ---- many entries per template, each byte of templated entries replaced -----------------------

def _tcp(sp, dp, inv=0):
    return Match("tcp", 0, Container(spts=[sp, sp], dpts=[dp, dp + 3], option=0, flg_mask=0,
                                     flg_cmp=0, invflags=inv))


def _udp(sp, dp):
    return Match("udp", 0, Container(spts=[sp, sp + 1], dpts=[dp, dp], invflags=0))


def _ip(family, k, proto=0, src=True, dst=False):
    ip = IpHeader.any(family)
    if family == AF_INET:
        a = ipaddress.IPv4Address(0xC6336400 + k % 200)
        full = ipaddress.IPv4Address(0xFFFFFF00 if k % 3 else 0xFFFFFFFF)
    else:
        a = ipaddress.IPv6Address((0x20010DB8 << 96) + k)
        full = ipaddress.IPv6Address(((1 << 128) - 1) ^ (0xFF if k % 3 else 0))
    if src:
        ip.src, ip.smsk = a, full
    if dst:
        ip.dst, ip.dmsk = a, full
    if proto:
        ip.proto = proto
        if family == AF_INET6:
            ip.flags |= uapi.IP6T_F_PROTO
    return ip


def template_table(family: int, n: int = 8) -> Table:
    """INPUT: n rules of each of several templates (source prefixes, tcp and udp ports,
    address pairs with a protocol, jumps and gotos to user chains); FORWARD: jumps; user
    chains u0.. (ERROR heads, one rule, RETURN)."""
    t = copy.deepcopy(Table.empty("filter", family))
    users = [f"u{k}" for k in range(n)]
    rules = []
    for k in range(n):
        rules += [Rule(_ip(family, k), target=Verdict(DROP if k % 4 else ACCEPT)),
                  Rule(_ip(family, k, 6, src=False), [_tcp(1000 + k, 80 + k)], Verdict(ACCEPT)),
                  Rule(_ip(family, k, 17, src=False), [_udp(53, 5000 + k)], Verdict(DROP)),
                  Rule(_ip(family, k, 6, dst=True), target=Verdict(DROP)),
                  Rule(_ip(family, k, 6, src=False, dst=True), [_tcp(0, 443 + k)],
                       Jump(users[k])),
                  Rule(IpHeader.any(family), target=Jump(users[(k + 1) % n]))]
    t.chain("INPUT").rules = rules
    goto = _ip(family, 0)
    goto.flags |= uapi.layout(family).f_goto
    t.chain("FORWARD").rules = [Rule(_ip(family, k), target=Jump(users[k])) for k in range(n)] \
        + [Rule(goto, target=Jump(users[0], goto=True))]
    for u in users:
        t.chains.append(Chain(u, head_entry=Rule(IpHeader.any(family), target=error_target(u)),
                              rules=[Rule(_ip(family, 7), target=Verdict(ACCEPT))],
                              policy_entry=Rule(IpHeader.any(family),
                                                target=Verdict(XT_RETURN))))
    t.layout()
    return t


def _table_buf(t: Table, blob: bytes) -> bytes:
    return kx.replace_buffer("filter", t.valid_hooks, t.num_entries, len(blob), t.hook_entry,
                             t.underflow, 4, 0, blob)


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_template_table_decodes_alike(family):
    t = template_table(family)
    buf = _table_buf(t, t.encode())
    n = same(buf, family)
    assert n >= t.num_entries - 16        # all but each template's first entry


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_every_byte_of_a_templated_entry_replaced(family):
    """For one late entry of each template (its earlier entries read it in full): each byte
    set to other values; the template decode and the full walk agree (accepted alike, or
    refused with the same errno and message)."""
    t = template_table(family, 3)
    blob = t.encode()
    ents = t.entries()
    # the last entry of each kind: rules of INPUT (6 templates), a FORWARD jump, the last user
    # chain's head, rule and RETURN
    last_user = t.chains[-1]
    picks = t.chain("INPUT").rules[-6:] + [t.chain("FORWARD").rules[-2]] + \
        [last_user.head_entry, last_user.rules[0], last_user.policy_entry]
    size = {r.offset: (ents[i + 1].offset if i + 1 < len(ents) else len(blob)) - r.offset
            for i, r in enumerate(ents)}
    rng = random.Random(family)
    outcomes = set()
    for r in picks:
        for pos in range(size[r.offset]):
            at = r.offset + pos
            for v in {blob[at] ^ 0x01, 0xFF if blob[at] else rng.choice([0x80, 0x02, 0x11])}:
                if v == blob[at]:
                    continue
                b = bytearray(blob)
                b[at] = v
                same(_table_buf(t, bytes(b)), family, f"entry {r.offset} byte {pos} = {v}",
                     outcomes)
    # the replacements were accepted and refused in several ways
    assert "ok" in outcomes and len(outcomes) >= 3, outcomes


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_key_fields_edges(family):
    """Key fields at their edges in a templated entry: all-zero addresses (an unconditional
    rule in the middle of a chain, or on an underflow), a jump verdict that is no jump, an
    errorname without NUL, ports 0 and 65535."""
    t = template_table(family)
    blob = bytearray(t.encode())
    cf = model._VOLATILE[family][0]
    asz = 16 if family == AF_INET else 64
    inp = t.chain("INPUT").rules
    cases = []
    # addresses and masks zero: the rule becomes unconditional (mark_source_chains stops)
    r = inp[-6]
    cases.append(("uncond", [(r.offset, bytes(asz))]))
    # a jump's verdict made a standard verdict, RETURN, 0, a non-entry, the table's end
    j = inp[-1]
    toff = int.from_bytes(blob[j.offset + cf - 4:j.offset + cf - 2], "little")
    for v in (DROP, XT_RETURN, 0, 8, len(blob), 1 << 30):
        cases.append((f"verdict {v}", [(j.offset + toff + 32, v.to_bytes(4, "little",
                                                                         signed=True))]))
    # the last chain's name without NUL (error_tg_ok), and a name of 29 characters
    h = t.chains[-1].head_entry
    toff = int.from_bytes(blob[h.offset + cf - 4:h.offset + cf - 2], "little")
    cases.append(("errorname", [(h.offset + toff + 32, b"x" * 30)]))
    cases.append(("errorname29", [(h.offset + toff + 32, b"y" * 29 + b"\0")]))
    # ports at their edges
    m = inp[-5]
    mpos = m.offset + uapi.layout(family).entry_size + 32
    for ports in (bytes(8), b"\xff" * 8, b"\x00\x00\xff\xff\xff\xff\x00\x00"):
        cases.append((f"ports {ports.hex()}", [(mpos, ports)]))
    # tcp invflags in a templated entry (tcp_mt_check) and the udp padding byte
    cases.append(("tcp invflags", [(mpos + 11, b"\x10")]))
    cases.append(("tcp pad", [(mpos + 12, b"\x01")]))
    for what, edits in cases:
        b = bytearray(blob)
        for at, data in edits:
            b[at:at + len(data)] = data
        same(_table_buf(t, bytes(b)), family, what)
