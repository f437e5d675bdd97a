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
    # not translated: iptables must not be told they are there
    assert rev(NFPROTO_IPV4, "REJECT", True) == set()
    # IPv4 only so far
    assert rev(NFPROTO_IPV6, "multiport", False) == set()
