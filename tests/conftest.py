import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from nsutil import Netns  # noqa: E402


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
