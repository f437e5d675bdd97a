"""The configured flavor (also per chain) reaches the helper through the door, and a flavor switch
needs no flush: the installed table is adopted from its flavors' attachments and moved to the
configured ones at the next install (docs/flavors.md "Per-chain flavors")."""
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
        # asking for nf while tc is installed: the table is adopted and moves to nf at the next
        # install, no flush needed (docs/flavors.md "Per-chain flavors": new slot filled first,
        # then the old attachment removed)
        env_nf = _env(netns, tmp_path, "nf")
        # status and flush use the installed flavor, whatever the configuration says
        st = json.loads(netns.run(f"{BPFILTER} status --json", env=env_nf).stdout)
        assert st["ipv4"]["flavor"] == "tc"
        assert st["ipv4"]["chains"][0]["rule_count"] == 1
        netns.run(f"{BPFILTER} exec -- iptables-legacy -A INPUT -j ACCEPT", env=env_nf)
        st = json.loads(netns.run(f"{BPFILTER} status --json", env=env_nf).stdout)
        assert st["ipv4"]["flavor"] == "nf" and st["ipv4"]["chains"][0]["rule_count"] == 2
        assert {c["flavor"] for c in st["ipv4"]["chains"] if c.get("prog_id")} == {"nf"}
        _stop_helpers(netns)
        # per-chain: INPUT on tc, the rest on nf, through the door; status names each chain's
        mixed = tmp_path / "mixed.conf"
        mixed.write_text("ipv4 = nf\nipv4 INPUT = tc\n")
        env_mixed = dict(env_nf, BPFILTER_CONFIG=str(mixed))
        netns.run(f"{BPFILTER} exec -- iptables-legacy -A OUTPUT -p udp --dport 9 -j DROP",
                  env=env_mixed)
        st = json.loads(netns.run(f"{BPFILTER} status --json", env=env_mixed).stdout)
        assert st["ipv4"]["flavor"] == "INPUT=tc,FORWARD=nf,OUTPUT=nf"
        fl = {c["name"]: c["flavor"] for c in st["ipv4"]["chains"] if c.get("prog_id")}
        assert fl["INPUT"] == "tc" and fl["OUTPUT"] == "nf", fl
        text = netns.run(f"{BPFILTER} status", env=env_mixed).stdout
        assert "INPUT=tc,FORWARD=nf,OUTPUT=nf" in text, text
    finally:
        netns.run(f"{BPFILTER} flush", env=env_tc, check=False)
