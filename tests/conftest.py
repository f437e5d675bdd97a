import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

import nsutil  # noqa: E402
from nsutil import Netns  # noqa: E402

# where bpfilter keeps a namespace's pins and state, per netns cookie (bpfilter_umh/gc.py)
STATE_ROOTS = ("/sys/fs/bpf/bpfilter", "/run/bpfilter")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: creates network namespaces and loads BPF")
        for item in items:
            if "netns" in item.fixturenames or item.get_closest_marker("root"):
                item.add_marker(skip)


@pytest.fixture
def netns():
    """A fresh network namespace, removed after the test whatever happens."""
    with Netns() as ns:
        yield ns


def state_left_behind(cookies) -> list:
    """The pin and state directories of these namespaces that still exist."""
    return [d for c in sorted(cookies) for d in (os.path.join(r, str(c)) for r in STATE_ROOTS)
            if os.path.exists(d)]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """After the test's teardown (its module's too, when it is the module's last): a namespace
    of ours closed with bpfilter state in it was never flushed, and its pins and
    /run/bpfilter/<cookie> would outlive the run (gc.py's leftovers). Removed here, and the
    test fails at teardown naming them."""
    closed = set(nsutil.CLOSED)
    nsutil.CLOSED.clear()
    left = state_left_behind(closed)
    if not left:
        return
    # gc removes only what no live namespace owns: a process killed at the close may still be
    # exiting in it for a moment
    from bpfilter_umh import gc
    end = time.monotonic() + 5
    while state_left_behind(closed) and time.monotonic() < end:
        try:
            gc.collect(only={int(os.path.basename(d)) for d in left})
        except Exception:  # noqa: BLE001 - the failure below names what is left anyway
            pass
        time.sleep(0.1)
    pytest.fail(f"namespace(s) deleted with bpfilter state never flushed: {', '.join(left)}"
                + ("" if not state_left_behind(closed) else " (not all removable)"),
                pytrace=False)
