"""The configured flavor reaches the helper through the door, and a flavor switch without a flush
is refused (each flavor pins its objects in its own directory: silently adopting nothing would
leave the old ruleset filtering beside the new one)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPFILTER = f"{sys.executable} -m bpfilter_umh.cli"


def _env(ns, tmp_path, flavor):
    conf = tmp_path / f"{flavor}.conf"
    conf.write_text(f"ipv4 = {flavor}\n")
    return dict(ns.env, BPFILTER_CONFIG=str(conf), PYTHONPATH=ROOT, BPFILTER_IDLE_EXIT="1")


def _stop_helpers(ns):
    """Kill this namespace's helpers only (the pid namespace is the host's), and wait for them."""
    import signal
    import time
    mine = []
    for pid in ns.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"bpfilter_umh" in f.read():
                    os.kill(pid, signal.SIGTERM)
                    mine.append(pid)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in mine) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_config_file_selects_tc_and_switch_needs_flush(netns, tmp_path):
    env_tc = _env(netns, tmp_path, "tc")
    try:
        netns.run(f"{BPFILTER} exec -- iptables-legacy -A INPUT -p udp --dport 9 -j DROP",
                  env=env_tc)
        st = json.loads(netns.run(f"{BPFILTER} status --json", env=env_tc).stdout)
        assert st["ipv4"]["flavor"] == "tc"
        assert any(c.get("prog_id") for c in st["ipv4"]["chains"] if c["name"] == "INPUT")
        _stop_helpers(netns)
        # asking for nf while tc is installed: refused with a message, the tc table untouched
        env_nf = _env(netns, tmp_path, "nf")
        p = netns.run(f"{BPFILTER} exec -- iptables-legacy -A INPUT -j ACCEPT", env=env_nf,
                      check=False)
        assert p.returncode != 0
        log = open("/run/bpfilter/helper.log").read()
        assert "run `bpfilter flush` before serving it with flavor nf" in log
        # status and flush use the installed flavor, whatever the configuration says
        st = json.loads(netns.run(f"{BPFILTER} status --json", env=env_nf).stdout)
        assert st["ipv4"]["flavor"] == "tc"
        assert st["ipv4"]["chains"][0]["rule_count"] == 1
        netns.run(f"{BPFILTER} flush", env=env_nf)
        _stop_helpers(netns)
        netns.run(f"{BPFILTER} exec -- iptables-legacy -A INPUT -j ACCEPT", env=env_nf)
        st = json.loads(netns.run(f"{BPFILTER} status --json", env=env_nf).stdout)
        assert st["ipv4"]["flavor"] == "nf"
    finally:
        netns.run(f"{BPFILTER} flush", env=env_tc, check=False)
