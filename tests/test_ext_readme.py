"""Issue #6: the README's list of supported matches and targets is generated from the extension
registry (tools/gen_ext_table.py) and must be current."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gen_ext_table  # noqa: E402


def test_generated_list_names_every_registered_extension():
    text = gen_ext_table.text()
    for name in ("multiport", "iprange", "mark", "length", "ttl", "comment", "pkttype", "tos",
                 "dscp", "conntrack", "state", "limit", "owner", "mac", "addrtype", "REJECT",
                 "LOG", "MARK", "hl", "frag", "hbh", "dst", "rt", "ah"):
        assert f"| {name} |" in text
    assert "| match | multiport | 1 | compiled | compiled |" in text
    assert "| match | frag | 0 | — | compiled |" in text
    assert "| match | addrtype | 1 | compiled | compiled |" in text


def test_readme_list_is_current():
    with open(gen_ext_table.README) as f:
        part = gen_ext_table.current(f.read())
    if part is None:
        pytest.skip("README.md has no generated extension list yet: "
                    "run `python3 tools/gen_ext_table.py --write`")
    assert part == gen_ext_table.text(), \
        "README's extension list is stale: run `python3 tools/gen_ext_table.py --write`"


def test_cli_check_mode_agrees():
    with open(gen_ext_table.README) as f:
        has = gen_ext_table.current(f.read()) is not None
    rc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_ext_table.py"),
                         "--check"]).returncode
    assert rc == (0 if has else 1)
