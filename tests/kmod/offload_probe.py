"""XDP hardware offload on a device that has an offload engine (netdevsim in the qemu guest; see
tests/kmod/guest-offload.sh). Run inside the namespace that holds the device:

    offload_probe.py load IFNAME PIN     offload a one-rule INPUT ruleset (-i IFNAME -p udp
                                         --dport 53 -j DROP) with prog_ifindex = IFNAME and
                                         XDP_FLAGS_HW_MODE; pin the link at PIN (it stays
                                         attached); print "ok prog_id=N map_id=M counters=..."
    offload_probe.py refusals IFNAME     the refusals: more counters than the engine holds, a
                                         rule the checker names, a device without an engine (lo)
    offload_probe.py all IFNAME PIN      load, then refusals (one interpreter start: the guest
                                         runs under TCG, where each start costs seconds)

Each line printed starts with "ok", "refused:" or "FAIL"; the exit status is 0 only if every
step behaved as expected.
"""
import os
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
        expect_refusal("lo has no offload engine", "cannot",
                       lambda: offload.install(one, "lo")),
    ]
    return 0 if all(good) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "load":
        sys.exit(load(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 3 and sys.argv[1] == "refusals":
        sys.exit(refusals(sys.argv[2]))
    if len(sys.argv) == 4 and sys.argv[1] == "all":
        sys.exit(load(sys.argv[2], sys.argv[3]) or refusals(sys.argv[2]))
    sys.exit(__doc__)
