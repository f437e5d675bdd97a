"""Shared pytest fixture of the differential suites: a kernel lab (the oracle) and a candidate
lab, side by side, for the whole module.

The candidate is chosen by BPFILTER_LAB_CANDIDATE: "bpfilter" (default: bpfilter's engine fed
the blob iptables-legacy-restore builds), "kernel" (a second kernel lab: proves the lab is
deterministic) or "kernel-save" (kernel, counters through iptables-legacy-save -c).
"""
import os

import pytest

from lab import INSTALLERS, Lab


def _candidate():
    name = os.environ.get("BPFILTER_LAB_CANDIDATE", "bpfilter")
    if name not in INSTALLERS:
        pytest.fail(f"BPFILTER_LAB_CANDIDATE={name!r}: one of {sorted(INSTALLERS)}")
    if name == "bpfilter":
        try:
            import bpfilter_umh.engine  # noqa: F401
        except ImportError as e:
            pytest.skip(f"bpfilter_umh.engine is not importable yet ({e}); "
                        "BPFILTER_LAB_CANDIDATE=kernel runs the suite kernel vs kernel")
    return INSTALLERS[name]


@pytest.fixture(scope="module")
def labs():
    installer = _candidate()
    with Lab(tag="r") as ref, Lab(installer=installer, tag="c") as cand:
        yield ref, cand
