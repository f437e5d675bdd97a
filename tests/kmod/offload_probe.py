"""XDP hardware offload on a device that has an offload engine (netdevsim in the qemu guest; see
tests/kmod/guest-offload.sh). Run inside the namespace that holds the device:

    offload_probe.py load IFNAME PIN     offload a one-rule INPUT ruleset (-i IFNAME -p udp
                                         --dport 53 -j DROP) with prog_ifindex = IFNAME and
                                         XDP_FLAGS_HW_MODE; pin the link at PIN (it stays
                                         attached); print "ok prog_id=N map_id=M counters=..."
    offload_probe.py refusals IFNAME     the refusals: more counters than the engine holds, a
                                         rule the checker names, a device without an engine (lo)
    offload_probe.py engine IFNAME       through the engine, as the helper does with --offload:
                                         Engine.open(AF_INET, "xdp", offload=IFNAME).install:
                                         attached (bpftool: program and map offloaded_to IFNAME),
                                         a second install replaces the program on the same link,
                                         a new engine adopts it, flush removes it
    offload_probe.py all IFNAME PIN      load, then refusals (one interpreter start: the guest
                                         runs under TCG, where each start costs seconds)

Each line printed starts with "ok", "refused:" or "FAIL"; the exit status is 0 only if every
step behaved as expected.
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

from test_compile_util import ACCEPT, DROP, rule, table, tcp, udp  # noqa: E402
from bpfilter_umh import offload  # noqa: E402
from bpfilter_umh.compile import XT_TCP_INV_OPTION  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402


def load(ifname: str, pin: str) -> int:
    t = table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(53, 53)), proto=17, iniface=ifname)])})
    off = offload.install(t, ifname)
    try:
        off.link.pin(pin)
        info = off.link.info()
        prog_id = info.get("prog_id")
        print(f"ok prog_id={prog_id} map_id={off.counters_map.info()['id']} "
              f"counters={off.counters()} keys={off.keys}")
    finally:
        off.close()          # the pin keeps the link (and through it program and map)
    return 0


def expect_refusal(what: str, pattern: str, fn) -> bool:
    try:
        fn()
    except BpfilterError as e:
        ok = pattern in e.message
        print(f"{'refused:' if ok else 'FAIL'} {what}: errno {e.errno}: {e.message}")
        return ok
    print(f"FAIL {what}: accepted")
    return False


def refusals(ifname: str) -> int:
    three = table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(53, 53)), proto=17),
                                      rule(DROP, udp(dport=(54, 54)), proto=17)])})
    opt = table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(53, 53)), proto=17),
                                    rule(DROP, tcp(option=8, inv=XT_TCP_INV_OPTION), proto=6)])})
    one = table({"INPUT": (ACCEPT, [rule(DROP, proto=17)])})
    good = [
        expect_refusal("3 counters on netdevsim (it holds 2 map entries)",
                       "cannot hold the counters map (3 entries)",
                       lambda: offload.install(three, ifname)),
        expect_refusal("a TCP option match", "chain INPUT rule 2",
                       lambda: offload.install(opt, ifname)),
        expect_refusal("lo has no offload engine", "device lo has no BPF offload engine",
                       lambda: offload.install(one, "lo")),
    ]
    return 0 if all(good) else 1


def _sh(cmd: str) -> str:
    import subprocess
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr


def _step(what: str, good: bool, detail: str = "") -> bool:
    print(f"{'ok' if good else 'FAIL'} engine: {what}" + (f": {detail}" if detail else ""))
    return good


def engine(ifname: str) -> int:
    from bpfilter_umh import offload as O
    from bpfilter_umh.cli import format_status
    from bpfilter_umh.engine import Engine
    from bpfilter_umh.model import AF_INET
    from bpfilter_umh.sockopt import use_host_bpffs
    use_host_bpffs()            # `ip netns exec` hid /sys/fs/bpf: pin where the helper would
    t1 = table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(53, 53)), proto=17, iniface=ifname)])})
    t2 = table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(54, 54)), proto=17)])})
    eng = Engine.open(AF_INET, "xdp", offload=ifname)
    good = []
    try:
        eng.install(t1)
        st = eng.status()
        off = st.get("offload") or {}
        p1, m1 = off.get("prog_id"), off.get("map_id")
        print(format_status("ipv4", st))
        link, prog, m = O.attached(eng._offload_pins)
        l1 = link.info()["id"]
        for o in (link, prog, m):
            o.close()
        good.append(_step("install offloads INPUT", bool(p1 and m1), f"{off}"))
        good.append(_step("bpftool: the program is offloaded_to the device",
                          f"offloaded_to {ifname}" in _sh(f"bpftool prog show id {p1}"),
                          _sh(f"bpftool prog show id {p1}").strip()))
        good.append(_step("bpftool: its counters map is device-bound",
                          f"offloaded_to {ifname}" in _sh(f"bpftool map show id {m1}"),
                          _sh(f"bpftool map show id {m1}").strip()))
        good.append(_step("ip link: xdpoffload beside the host's xdp program",
                          "xdpoffload" in _sh(f"ip -d link show {ifname}")))
        # netdevsim keeps device maps in software (it runs no packets): counts written into the
        # device's array stand for packets the NIC handled. The DROP rule's count is added to
        # the host's; the ACCEPT policy's is not (the host counts what the NIC passes)
        drop_e, pol_e = t1.chains[0].rules[0].index, t1.chains[0].policy_entry.index
        link, prog, m = O.attached(eng._offload_pins)
        for key in range(m.max_entries):
            m.update(key, struct.pack("<QQ", 5, 500))
        for o in (link, prog, m):
            o.close()
        c = eng.counters()
        good.append(_step("the device's drops are added to the DROP rule's counters only",
                          c[drop_e] == (5, 500) and c[pol_e] == (0, 0), f"{c}"))
        old = eng.install(t2)
        good.append(_step("the replaced table's counters include the device's drops",
                          old[drop_e] == (5, 500) and old[pol_e] == (0, 0), f"{old}"))
        off2 = eng.status()["offload"]
        link, prog, m = O.attached(eng._offload_pins)
        l2 = link.info()["id"]
        for o in (link, prog, m):
            o.close()
        good.append(_step("a second install replaces the program on the same link "
                          "(BPF_LINK_UPDATE)", l2 == l1 and off2["prog_id"] != p1,
                          f"link {l1} -> {l2}, prog {p1} -> {off2['prog_id']}"))
        again = Engine.open(AF_INET, "xdp")     # a restarted helper, or `bpfilter status`
        off3 = again.status().get("offload") or {}
        good.append(_step("a new engine adopts it (pinned link, state file)",
                          off3.get("prog_id") == off2["prog_id"], f"{off3}"))
        good.append(_step("counters read with the device's",
                          len(again.counters()) == t2.num_entries))
        again.flush()
        good.append(_step("flush removes it", "xdpoffload" not in _sh(f"ip -d link show {ifname}")
                          and not os.path.exists(eng._offload_pins)
                          and "offload" not in Engine.open(AF_INET, "xdp").status()))
    except Exception as e:          # noqa: BLE001: reported as a FAIL line with its message
        good.append(_step("raised", False, f"{type(e).__name__}: {e}"))
        Engine.open(AF_INET, "xdp").flush()
    return 0 if good and all(good) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "engine":
        sys.exit(engine(sys.argv[2]))
    if len(sys.argv) == 4 and sys.argv[1] == "load":
        sys.exit(load(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 3 and sys.argv[1] == "refusals":
        sys.exit(refusals(sys.argv[2]))
    if len(sys.argv) == 4 and sys.argv[1] == "all":
        sys.exit(load(sys.argv[2], sys.argv[3]) or refusals(sys.argv[2]))
    sys.exit(__doc__)
