"""Issue #6 part 3: every command of tests/ext_cp_script.txt gives the same exit status, stdout
and stderr under `bpfilter exec` as against the kernel, each side in a fresh network namespace:
rules with the extensions the compiler translates are accepted and listed back identically, and
each of the kernel's checkentry rules (REJECT tcp-reset without -p tcp, limit's overflow ERANGE,
the `hooks` masks of mac and owner, also through a user chain, addrtype's interface limits)
fails with the kernel's errno.

One difference is expected and allowed: for an extension bpfilter decodes and checks but does
not compile, GET_REVISION says "not supported" (sockopt.supported_revisions admits only to what
the compiler translates), so iptables prints "Warning: Extension X revision N not supported,
missing kernel module?" before the kernel's own error; that line alone is dropped before
comparing, and only for those extensions.

Also: GET_REVISION answers come from the registry (the revisions the compiler translates)."""
import errno
import os
import re
import sys

import pytest

from test_control_plane import run_both

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ext_cp_script.txt")
RUNNER = os.path.join(HERE, "test_control_plane.py")
WARNING = re.compile(r"^Warning: Extension (\S+) revision (\d+) not supported, missing kernel "
                     r"module\?\n", re.M)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def _checked_only():
    """(name, revision) registered with a codec but not compiled, for IPv4."""
    from bpfilter_umh import extensions as ext
    from bpfilter_umh.uapi import NFPROTO_IPV4
    return {(k[2], k[3]) for k, e in ext._registry.items()
            if k[1] == NFPROTO_IPV4 and e.codec is not None and not e.compiled}


def _strip(stderr: str, allowed: set) -> str:
    return WARNING.sub(lambda m: "" if (m.group(1), int(m.group(2))) in allowed else m.group(0),
                       stderr)


def test_extension_commands_match_kernel(netns):
    kres, bres = run_both(netns, [sys.executable, RUNNER, SCRIPT])
    assert len(kres) == len(bres) >= 40
    allowed = _checked_only()
    bad = []
    for kr, br in zip(kres, bres):
        br = [br[0], br[1], br[2], _strip(br[3], allowed)]
        if kr != br:
            bad.append(f"$ {kr[0]}\n--- kernel rc={kr[1]}\n{kr[2]}{kr[3]}"
                       f"--- bpfilter rc={br[1]}\n{br[2]}{br[3]}")
    assert not bad, f"{len(bad)} of {len(kres)} commands differ:\n\n" + "\n\n".join(bad[:8])
    # the script is not vacuous: the checkentry commands failed in the kernel
    assert sum(1 for r in kres if r[1] != 0) >= 8


def test_get_revision_answers_from_registry():
    from bpfilter_umh import sockopt
    from bpfilter_umh.uapi import NFPROTO_IPV4, NFPROTO_IPV6
    rev = sockopt.supported_revisions
    assert rev(NFPROTO_IPV4, "multiport", False) == {0, 1}
    assert rev(NFPROTO_IPV4, "conntrack", False) == {1, 2, 3}
    assert rev(NFPROTO_IPV4, "tos", False) == {1}
    assert rev(NFPROTO_IPV4, "addrtype", False) == {0, 1}
    # an extension the compiler lacks: iptables must not be told it is there
    assert rev(NFPROTO_IPV4, "quota", False) == set()
    # IPv6: the same matches (hl, not ttl) and the extension-header ones
    assert rev(NFPROTO_IPV6, "multiport", False) == {0, 1}
    assert rev(NFPROTO_IPV6, "hl", False) == {0}
    assert rev(NFPROTO_IPV6, "ttl", False) == set()
    for name in ("frag", "hbh", "dst", "rt", "ah", "conntrack", "owner"):
        assert rev(NFPROTO_IPV6, name, False), name
    assert rev(NFPROTO_IPV6, "addrtype", False) == {1}


SCRIPT_V6 = os.path.join(HERE, "ext_cp_script_ipv6.txt")


def test_ipv6_extension_commands_match_kernel(netns):
    """The same for ip6tables (ext_cp_script_ipv6.txt): the matches listed back identically, and
    the checkentry rules of rt (--rt-0-* needs --rt-type 0), limit, the hooks of mac and owner,
    multiport's protocol, also through a user chain."""
    kres, bres = run_both(netns, [sys.executable, RUNNER, SCRIPT_V6])
    assert len(kres) == len(bres) >= 40
    bad = []
    for kr, br in zip(kres, bres):
        if kr != br:
            bad.append(f"$ {kr[0]}\n--- kernel rc={kr[1]}\n{kr[2]}{kr[3]}"
                       f"--- bpfilter rc={br[1]}\n{br[2]}{br[3]}")
    assert not bad, f"{len(bad)} of {len(kres)} commands differ:\n\n" + "\n\n".join(bad[:8])
    assert sum(1 for r in kres if r[1] != 0) >= 8


# ---- IPv6 checkentry rules ip6tables' parser never lets through: crafted payloads ----------
V6_RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m frag --fragid 1:2 -j DROP
-A INPUT -m hbh --hbh-len 8 -j DROP
-A INPUT -m dst --dst-len 8 -j DROP
-A INPUT -m rt --rt-type 2 -j DROP
-A FORWARD -m rt --rt-type 0 -j DROP
-A INPUT -m ah --ahspi 5 -j DROP
COMMIT
"""
# (match name, which occurrence, payload byte, value OR-ed in, errno the kernel gives)
V6_PAYLOAD_CASES = {
    "untouched": ("frag", 0, 13, 0, 0),
    "frag-invflags": ("frag", 0, 13, 0x04, errno.EINVAL),            # frag_mt6_check
    "hbh-invflags": ("hbh", 0, 5, 0x02, errno.EINVAL),               # hbh_mt6_check
    "hbh-nstrict": ("hbh", 0, 4, 0x04, errno.EINVAL),
    "dst-invflags": ("dst", 0, 5, 0x80, errno.EINVAL),
    "dst-nstrict": ("dst", 0, 4, 0x04, errno.EINVAL),
    "rt-invflags": ("rt", 0, 17, 0x08, errno.EINVAL),                # rt_mt6_check
    "rt-res-type2": ("rt", 0, 16, 0x08, errno.EINVAL),
    "rt-addrs-type2": ("rt", 0, 16, 0x10, errno.EINVAL),
    "rt-res-type0": ("rt", 1, 16, 0x08, 0),
    "rt-res-type0-inverted": ("rt", 1, 17, 0x01, 0),
    "ah-invflags": ("ah", 0, 13, 0x08, errno.EINVAL),                # ah_mt6_check
}


@pytest.fixture(scope="module")
def v6_blob():
    import kernel_xt as kx
    from nsutil import Netns
    from bpfilter_umh.uapi import NFPROTO_IPV6
    with Netns("c6") as ns:
        ns.run(["ip6tables-legacy-restore"], input=V6_RULES)
        with ns.inside():
            return kx.snapshot(NFPROTO_IPV6)


def _payload_at(blob: bytes, name: str, nth: int) -> int:
    """Offset of the nth `name` match's payload (xt_entry_match: u16 size, name[29], revision)."""
    at = -1
    for _ in range(nth + 1):
        at = blob.index(name.encode() + b"\0", at + 1)
        while blob[at - 2:at] != (0x20 + {"frag": 16, "hbh": 40, "dst": 40, "rt": 280,
                                          "ah": 16}[name]).to_bytes(2, "little"):
            at = blob.index(name.encode() + b"\0", at + 1)
    return at - 2 + 32


@pytest.mark.parametrize("case", list(V6_PAYLOAD_CASES))
def test_ipv6_payload_checkentry_matches_kernel(case, v6_blob):
    """The same ip6t_replace, with one payload byte changed, given to the kernel's ip6_tables
    and to bpfilter's decoder: the same errno (0 = accepted) from both."""
    import kernel_xt as kx
    from nsutil import Netns
    from bpfilter_umh.errors import BpfilterError
    from bpfilter_umh.model import decode_replace
    from bpfilter_umh.uapi import NFPROTO_IPV6
    name, nth, off, bits, want = V6_PAYLOAD_CASES[case]
    info, blob = v6_blob
    blob = bytearray(blob)
    blob[_payload_at(bytes(blob), name, nth) + off] |= bits
    with Netns("c6") as ns, ns.inside():
        cur = kx.get_info(NFPROTO_IPV6)
        cb = kx.CounterBuffer(cur.num_entries)
        buf = kx.replace_buffer("filter", info.valid_hooks, info.num_entries, info.size,
                                info.hook_entry, info.underflow, cur.num_entries, cb.address,
                                bytes(blob))
        try:
            decode_replace(buf, NFPROTO_IPV6)
            mine = 0
        except BpfilterError as e:
            mine = e.errno
        try:
            kx.set_replace(NFPROTO_IPV6, buf)
            theirs = 0
        except OSError as e:
            theirs = e.errno
    assert (mine, theirs) == (want, want)
