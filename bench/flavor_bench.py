"""Per-packet cost of each flavor on the same rulesets (a benchmark, not a test).

  python3 bench/flavor_bench.py [--rules 0,10,100,1000] [--repeat 200000] [--flood 20000]

1. BPF_PROG_TEST_RUN: the INPUT chain program of an N-rule ruleset (N udp rules that do not match,
   then the policy) compiled for nf, tc, xdp and xdp's offload code mode (run by the host), on one
   64-byte UDP frame; printed in ns/packet
   and as a ratio against the same flavor's empty ruleset (policy only).
2. veth flood: a UDP flood from a client namespace into a host namespace through a veth pair,
   with the same ruleset installed by kernel iptables-legacy, or by bpfilter with each flavor;
   µs/packet and the ratio against kernel iptables. Namespaces are removed on exit.
"""
import argparse
import os
import socket
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

from nsutil import Netns, veth  # noqa: E402
from test_compile_util import ACCEPT, DROP, rule, table, udp  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.compile import compile_table  # noqa: E402
from bpfilter_umh.engine import Engine, create_maps, kernel_facts  # noqa: E402

FLAVORS = ("nf", "tc", "xdp")


def ruleset(n: int):
    return table({"INPUT": (ACCEPT, [rule(DROP, udp(dport=(1000 + i, 1000 + i)), proto=17)
                                     for i in range(n)])})


def frame(dport=9) -> bytes:
    payload = b"x" * 22
    udph = struct.pack("!HHHH", 5000, dport, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udph) + len(payload), 1, 0, 64, 17, 0,
                     socket.inet_aton("192.0.2.2"), socket.inet_aton("192.0.2.1"))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udph + payload


def test_run_ns(flavor: str, n: int, repeat: int) -> float:
    if flavor == "xdp-offload":
        # the offload code mode (bpfilter_umh/offload.py) run by the host: direct packet access,
        # a plain array for the counters; the frame goes to a local address, so INPUT runs
        from bpfilter_umh import offload
        cp = offload.compile_offload(ruleset(n), "bh0", ["192.0.2.1"]).program
        cnt_type = K.BPF_MAP_TYPE_ARRAY
    else:
        cp = [p for p in compile_table(ruleset(n), kernel_facts(), flavor).programs
              if p.chain == "INPUT"][0]
        cnt_type = K.BPF_MAP_TYPE_PERCPU_ARRAY
    with K.Map.create(cnt_type, 4, 16, max(1, n + 8)) as cnt, \
            K.Map.create(K.BPF_MAP_TYPE_HASH, 4, 16, 16) as ifn:
        extra = create_maps(cp)        # lookup maps of the classifier, if it made any
        code = cp.assemble({"counters": cnt.fd, "ifnames": ifn.fd,
                            **{k: m.fd for k, m in extra.items()}})
        try:
            p = K.Prog.load(cp.prog_type, code, name="bench", license=cp.license,
                            expected_attach_type=cp.expected_attach_type)
        finally:
            for m in extra.values():
                m.close()
        with p:
            ctx = bytes([1, 2]) + bytes(6) if flavor == "nf" else None
            _, ns, _ = p.test_run(frame(), ctx_in=ctx, repeat=repeat)
            return float(ns)


def flood(installer, n: int, packets: int) -> float:
    """µs per packet of a UDP flood to a closed port, counted at the receiver."""
    with Netns("bc") as c, Netns("bh") as h:
        veth(c, "bc0", h, "bh0", "192.0.2.2/24", "192.0.2.1/24")
        try:
            installer(h, n)
            with c.inside():
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(("192.0.2.1", 9))
            t0 = time.perf_counter()
            for _ in range(packets):
                try:
                    s.send(b"x" * 22)
                except OSError:
                    pass          # ICMP port unreachable reported back: ignore
            dt = time.perf_counter() - t0
            s.close()
            return dt / packets * 1e6
        finally:
            for fl in FLAVORS:
                with h.inside():
                    try:
                        Engine.open(flavor=fl).flush()
                    except Exception:
                        pass


def kernel_installer(h, n):
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A INPUT -p udp -m udp --dport {1000 + i} -j DROP" for i in range(n)]
    h.run(["iptables-legacy-restore"], input="\n".join(lines + ["COMMIT", ""]))


def bpf_installer(flavor):
    def inst(h, n):
        with h.inside():
            Engine.open(flavor=flavor).install(ruleset(n))
    return inst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="0,10,100,1000")
    ap.add_argument("--repeat", type=int, default=200000)
    ap.add_argument("--flood", type=int, default=20000)
    a = ap.parse_args()
    counts = [int(x) for x in a.rules.split(",")]
    print("BPF_PROG_TEST_RUN ns/packet (ratio vs the same flavor with 0 rules)")
    tested = FLAVORS + ("xdp-offload",)
    base = {fl: test_run_ns(fl, 0, a.repeat) for fl in tested}
    for n in counts:
        row = []
        for fl in tested:
            v = test_run_ns(fl, n, a.repeat)
            row.append(f"{fl} {v:7.1f} ({v / base[fl]:5.2f}x)")
        print(f"  {n:5} rules: " + "   ".join(row))
    if a.flood:
        print(f"veth flood µs/packet, {a.flood} packets (ratio vs kernel iptables)")
        for n in counts:
            k = flood(kernel_installer, n, a.flood)
            row = [f"kernel {k:6.2f}"]
            for fl in FLAVORS:
                v = flood(bpf_installer(fl), n, a.flood)
                row.append(f"{fl} {v:6.2f} ({v / k:4.2f}x)")
            print(f"  {n:5} rules: " + "   ".join(row))


if __name__ == "__main__":
    main()
