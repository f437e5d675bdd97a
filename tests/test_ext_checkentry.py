"""Issue #6 part 3: every command of tests/ext_cp_script.txt gives the same stdout, stderr and
exit status under `bpfilter exec` as against the kernel, each side in a fresh network namespace:
rules with the extensions the compiler translates are accepted and listed back identically, and
each of the kernel's checkentry rules (REJECT tcp-reset without -p tcp, limit's overflow ERANGE,
the `hooks` masks of mac and owner, also through a user chain, addrtype's interface limits)
fails with the kernel's errno.

Also: GET_REVISION answers come from the registry (the revisions the compiler translates)."""
import os

import pytest

from test_control_plane import fidelity

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ext_cp_script.txt")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, BPF")


def test_extension_commands_match_kernel(netns):
    fidelity(netns, SCRIPT, 40)


def test_get_revision_answers_from_registry():
    from bpfilter_umh import sockopt
    from bpfilter_umh.uapi import NFPROTO_IPV4, NFPROTO_IPV6
    rev = sockopt.supported_revisions
    assert rev(NFPROTO_IPV4, "multiport", False) == {0, 1}
    assert rev(NFPROTO_IPV4, "conntrack", False) == {1, 2, 3}
    assert rev(NFPROTO_IPV4, "tos", False) == {1}
    # not translated (yet): iptables must not be told they are there
    assert rev(NFPROTO_IPV4, "limit", False) == set()
    assert rev(NFPROTO_IPV4, "REJECT", True) == set()
    # IPv4-only translations
    assert rev(NFPROTO_IPV6, "multiport", False) == set()
