"""`make bench-ipv6`: IPv6 rulesets in ip6tables INPUT, kernel ip6tables-legacy against bpfilter,
side by side: what classify.py's IPv6 runs give. Shapes:
  blocklist6   `-s PREFIX -j DROP|ACCEPT` (prefix runs, lpm6)
  ports6       `-p tcp|udp --dport PORT[:PORT] -j DROP|ACCEPT` (port runs, hash6)

For each shape and N in 10, 100, 1000, 10 000:
  test-run     BPF_PROG_TEST_RUN ns/packet of the compiled INPUT (nf) for a packet no rule
               matches (every rule consulted), classifier on, and off for N <= 1000 (linear code)
  side by side the empty program, N=10 and N=10 000 test-run in turn, round after round (as
               ruleset_bench.side_by_side): N=10 000 / N=10 and the added ns over the empty program
  control      wall time of ip6tables-legacy-restore (kernel) and of the same through the launcher
               to the running helper, one `ip6tables-legacy -A` on the loaded table, 3 runs each
               (kernel first and bpfilter first in turn), the restores' ratio per run

    python bench/ipv6_bench.py [--n 10,100,1000,10000] [--repeat 3] [--shapes blocklist6,ports6]
Needs root. Runs only in namespaces it creates and removes.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import random
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests"), HERE]

import ruleset_bench as RB  # noqa: E402

from bpfilter_umh import classify  # noqa: E402

FLOOD_SRC, FLOOD_DST = "2001:db8::1", "2001:db8::2"     # no rule's prefix holds FLOOD_SRC
NF_CTX6 = bytes([1, 10]) + bytes(6)                     # hook LOCAL_IN, pf NFPROTO_IPV6
APPEND6 = "-A INPUT -s 2001:db8:ffff::99/128 -p udp -m udp --dport 4 -j DROP"
EMPTY6 = RB.EMPTY_TEXT


def blocklist6(n: int, seed: int = 1) -> str:
    """n rules: cold prefixes of fd00::/8 (/32 .. /128, DROP) and 200 hot ones nested in
    2001:db8:100::/40 (/40 .. /128, a third ACCEPT) at random places among them."""
    rnd = random.Random(seed)

    def cold():
        plen = rnd.choice([32, 48, 48, 56, 64, 64, 128])
        net = ipaddress.IPv6Network((0xfd << 120 | rnd.getrandbits(120), plen), strict=False)
        return f"-A INPUT -s {net} -j DROP"

    def hot():
        plen = rnd.choice([40, 44, 48, 56, 64, 128])
        a = 0x20010db8_0100 << 80 | rnd.getrandbits(4) << 76 | rnd.getrandbits(4) << 64 | \
            rnd.getrandbits(2)
        net = ipaddress.IPv6Network((a, plen), strict=False)
        return f"-A INPUT -s {net} -j {'ACCEPT' if rnd.random() < 0.33 else 'DROP'}"
    hots = [hot() for _ in range(min(200, max(1, n // 4)))]
    lines = [cold() for _ in range(n - len(hots))]
    for h in hots:
        lines.insert(rnd.randrange(len(lines) + 1), h)
    return "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" + \
        "".join(x + "\n" for x in lines) + "COMMIT\n"


def ports6(n: int, seed: int = 1) -> str:
    """n rules: tcp and udp ports 1024-65535 (a tenth of them ranges of up to 16 ports, DROP),
    and 200 hot ones among 20 ports with either verdict at random places among them; the
    flood's udp port 7 is no rule's."""
    rnd = random.Random(seed)

    def line(port: str, verdict: str) -> str:
        p = rnd.choice(["tcp", "udp"])
        return f"-A INPUT -p {p} -m {p} --dport {port} -j {verdict}"

    def cold():
        lo = rnd.randrange(1024, 65520)
        return line(f"{lo}:{lo + rnd.randrange(1, 16)}" if rnd.random() < 0.1 else str(lo),
                    "DROP")
    hot_ports = [rnd.randrange(1024, 2048) for _ in range(20)]
    hots = [line(str(rnd.choice(hot_ports)), "ACCEPT" if rnd.random() < 0.33 else "DROP")
            for _ in range(min(200, max(1, n // 4)))]
    lines = [cold() for _ in range(n - len(hots))]
    for h in hots:
        lines.insert(rnd.randrange(len(lines) + 1), h)
    return "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" + \
        "".join(x + "\n" for x in lines) + "COMMIT\n"


SHAPES = {"blocklist6": blocklist6, "ports6": ports6}


def flood_frame6() -> bytes:
    from test_compile_ipv6_util import NH_UDP, ipv6, udp6
    return b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x86\xdd" + ipv6(FLOOD_SRC, FLOOD_DST, NH_UDP,
                                                             udp6(7, 7, b"x" * 18))


def table6(text: str):
    from test_differential_ipv6_lab import blob_of
    return blob_of(text)


def test_run(table, min_run=None) -> dict:
    got = RB.bench_test_run(table, min_run, frame=flood_frame6(), nf_ctx=NF_CTX6)
    if "error" in got:
        raise RuntimeError(got["error"])
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="10,100,1000,10000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("ipv6_bench: needs root (namespaces, BPF)")
    ns_list = [int(x) for x in args.n.split(",")]
    print(f"machine: {RB.machine()}", flush=True)
    for shape in args.shapes.split(","):
        run_shape(shape, ns_list, args)


def run_shape(shape: str, ns_list: list, args) -> None:
    ends = {}
    for n in ns_list:
        text = SHAPES[shape](n)
        table = table6(text)
        if n in (min(ns_list), max(ns_list)):
            ends[n] = table
        runs = [t for ts in classify.describe(table).values() for t in ts]
        cls = test_run(table)
        s = (f"{shape:10} N={n:<6} runs {len(runs)} | test-run {cls['ns']:.1f} ns "
             f"({cls['insns']} insns, {cls['maps']} maps, load {cls['load_s'] * 1e3:.0f} ms)")
        if n <= 1000:
            lin = test_run(table, 0)
            s += f" | linear {lin['ns']:.1f} ns (load {lin['load_s'] * 1e3:.0f} ms)"
        if not args.no_control:
            cp = RB.control_plane_repeated(text, args.repeat, restore="ip6tables-legacy-restore",
                                           binary="ip6tables-legacy", append=APPEND6)
            if "kernel_restore_s" in cp and "bpfilter_restore_s" in cp:
                ratios = sorted(b / k for k, b in cp.get("restore_samples", ()))
                s += (f" | restore kernel {cp['kernel_restore_s'] * 1e3:.0f} ms bpfilter "
                      f"{cp['bpfilter_restore_s'] * 1e3:.0f} ms (helper "
                      f"{cp.get('helper_restore_s', 0) * 1e3:.0f} ms)")
                if ratios:
                    s += (f", ratio median {statistics.median(ratios):.2f}x of "
                          f"{', '.join(f'{r:.2f}' for r in ratios)}")
                s += (f" | append kernel {cp['kernel_append_s'] * 1e3:.0f} ms bpfilter "
                      f"{cp['bpfilter_append_s'] * 1e3:.0f} ms")
            for k in ("kernel_error", "bpfilter_error"):
                if k in cp:
                    s += f" | {k}: {cp[k]!r}"
        print(s, flush=True)
    if len(ends) > 1:
        side = RB.side_by_side(ends, empty=table6(EMPTY6), frame=flood_frame6(), nf_ctx=NF_CTX6)
        print(RB.side_line(shape, side), flush=True)


if __name__ == "__main__":
    main()
