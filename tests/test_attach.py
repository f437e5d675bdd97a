"""bpfilter_umh.attach (flavor nf) on the real kernel: real pings and a UDP flood through a veth
pair between two throwaway namespaces; pins under a per-test bpffs directory."""
import errno
import itertools
import os
import shutil
import socket
import struct
import sys
import threading

import pytest

from bpfilter_umh import attach as A
from bpfilter_umh import gc
from bpfilter_umh import kernel as K
from bpfilter_umh.errors import BpfilterError
from nsutil import Netns, veth
from test_kernel import eth_ipv4, nf_proto_prog

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: loads BPF programs, creates links and pins")
_n = itertools.count()
INPUT = 1
B_ADDR = "192.0.2.2"


@pytest.fixture
def root():
    K.ensure_bpffs()
    d = f"/sys/fs/bpf/bpft{os.getpid()}_att{next(_n)}"
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pair():
    """a (192.0.2.1) <-veth-> b (192.0.2.2)"""
    with Netns("a") as a, Netns("b") as b:
        veth(a, "eth0", b, "eth0", "192.0.2.1/24", B_ADDR + "/24")
        yield a, b


def ping(ns, addr=B_ADDR) -> bool:
    return ns.run(f"ping -n -q -c 1 -W 2 {addr}", check=False).returncode == 0


def accept_prog():
    return K.Prog.load(K.BPF_PROG_TYPE_NETFILTER, K.mov64_imm(0, K.NF_ACCEPT) + K.exit_(),
                       name="t_accept", expected_attach_type=K.BPF_NETFILTER)


def test_dispatcher_tail_calls_the_slot():
    """The dispatcher itself, test-run without any link: empty slot -> ACCEPT, then the slot's
    verdict."""
    with K.Map.create(K.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 5, "t_pa") as pa, \
            K.Prog.load(K.BPF_PROG_TYPE_NETFILTER, A.dispatcher_insns(pa.fd, INPUT),
                        name="t_disp", expected_attach_type=K.BPF_NETFILTER) as disp, \
            nf_proto_prog(1, K.NF_DROP) as drop:
        ctx = bytes([INPUT, K.NFPROTO_IPV4])
        assert disp.test_run(eth_ipv4(1), ctx_in=ctx)[0] == K.NF_ACCEPT
        pa.update(INPUT, drop)
        assert disp.test_run(eth_ipv4(1), ctx_in=ctx)[0] == K.NF_DROP
        assert disp.test_run(eth_ipv4(17), ctx_in=ctx)[0] == K.NF_ACCEPT


def test_ping_drop_swap_detach(pair, root):
    a, b = pair
    assert ping(a)
    with b.inside():
        att = A.NfAttachment.open("ipv4", [INPUT], root=root)
    drop, acc = nf_proto_prog(1, K.NF_DROP, name="t_icmpdrop"), accept_prog()
    try:
        att.swap(INPUT, drop)
        assert not ping(a), "ICMP drop program attached at INPUT but ping passed"
        info = att.attached()[INPUT]
        assert (info["pf"], info["hooknum"], info["priority"]) == (K.NFPROTO_IPV4, INPUT, 0)
        d = A.NfAttachment.directory(K.NFPROTO_IPV4, root, cookie=_cookie(b))
        assert sorted(os.listdir(d)) == ["link_INPUT", "prog_INPUT", "prog_array"]

        att.swap(INPUT, acc)
        assert ping(a)
        # a second helper (or the same one restarted) adopts the pinned state
        att.close()
        with b.inside():
            att = A.NfAttachment.open("ipv4", [INPUT], root=root)
        assert att.attached()[INPUT]["id"] == info["id"]
        with att.program(INPUT) as cur:
            assert cur.id == acc.id
        att.swap(INPUT, drop)
        assert not ping(a)
        att.detach_all()
        assert ping(a)
        assert not os.path.exists(d) and not os.path.exists(os.path.dirname(d))
    finally:
        drop.close()
        acc.close()
        att.close()


def _cookie(ns):
    with ns.inside():
        return K.netns_cookie()


SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[1])):
    s.sendto(b"x" * 32, (sys.argv[2], 9999))
    if i % 10 == 9:
        time.sleep(0.002)       # spread the flood over ~0.4 s so that swaps land inside it
"""


def test_ipv6_ping_drop_and_swap(root):
    with Netns("a") as a, Netns("b") as b:
        veth(a, "eth0", b, "eth0")
        a.run("ip addr add 2001:db8::1/64 dev eth0 nodad")
        b.run("ip addr add 2001:db8::2/64 dev eth0 nodad")
        assert ping(a, "2001:db8::2")
        with b.inside():
            att = A.NfAttachment.open("ipv6", [INPUT], root=root)
        drop = nf_proto_prog(58, K.NF_DROP, name="t_icmp6drop", ipv6=True)
        acc = accept_prog()
        try:
            att.swap(INPUT, drop)
            assert not ping(a, "2001:db8::2")
            att.swap(INPUT, acc)
            assert ping(a, "2001:db8::2")
        finally:
            att.detach_all()
            drop.close()
            acc.close()


def test_atomic_swap_under_flood(pair, root):
    """2000 UDP datagrams while the INPUT program is swapped 200 times between two programs that
    both accept but count into different slots: nothing lost, nothing uncounted."""
    a, b = pair
    packets, swaps = 2000, 200
    with b.inside():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        att = A.NfAttachment.open("ipv4", [INPUT], root=root)
    rx.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)     # SO_RCVBUFFORCE
    rx.bind((B_ADDR, 9999))
    rx.settimeout(0.5)
    counts = K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 8, 2, "t_counts")
    progs = [nf_proto_prog(17, K.NF_ACCEPT, counts, slot, name=f"t_count{slot}")
             for slot in (0, 1)]
    received = [0]

    def drain():
        for _ in range(packets + 100):
            try:
                rx.recv(64)
            except socket.timeout:
                return
            received[0] += 1

    try:
        att.swap(INPUT, progs[0])
        t = threading.Thread(target=drain)
        t.start()
        sender = a.popen([sys.executable, "-c", SENDER, str(packets), B_ADDR])
        def counted():
            return sum(struct.unpack("<Q", counts.lookup(k))[0] for k in (0, 1))

        for _ in range(5000):                   # bounded wait for the flood to start
            if counted():
                break
            threading.Event().wait(0.001)
        during = 0                              # swaps made while packets were flowing
        for i in range(swaps):
            att.swap(INPUT, progs[(i + 1) % 2])
            during += 0 < counted() < packets
            threading.Event().wait(0.0005)
        assert sender.wait(timeout=60) == 0
        t.join(timeout=30)
        c0, c1 = (struct.unpack("<Q", counts.lookup(k))[0] for k in (0, 1))
        assert received[0] == packets, f"lost {packets - received[0]} datagrams"
        assert c0 + c1 == packets, (c0, c1)
        print(f"flood: {packets} datagrams, {swaps} swaps ({during} while packets flowed), "
              f"slot counts {c0}/{c1}")
        assert during >= 50 and c0 > 0 and c1 > 0, (during, c0, c1)
    finally:
        att.detach_all()
        for p in progs:
            p.close()
        counts.close()
        rx.close()
        att.close()


def test_priority_busy_is_explained(netns, root):
    netns.run("iptables-legacy -w -L -n")          # instantiates the kernel's filter table at 0
    with netns.inside():
        att = A.NfAttachment.open("ipv4", [INPUT], root=root)
    try:
        with accept_prog() as p:
            with pytest.raises(BpfilterError) as e:
                att.swap(INPUT, p)
        assert e.value.errno == errno.EBUSY and "iptables" in e.value.message
        # nothing half-installed remains
        assert att.attached() == {} and att.program(INPUT) is None
    finally:
        att.detach_all()


def test_both_families_and_bad_input(netns, root):
    with netns.inside():
        v4 = A.NfAttachment.open(socket.AF_INET, root=root)
        v6 = A.NfAttachment.open("ipv6", [INPUT, 3], root=root)
    try:
        with accept_prog() as p:
            v4.swap(3, p)
            v6.swap(INPUT, p)
            assert v6.attached()[INPUT]["pf"] == K.NFPROTO_IPV6
            with pytest.raises(BpfilterError) as e:
                v6.swap(2, p)                      # not served
            assert e.value.errno == errno.EINVAL
        with K.Prog.load(K.BPF_PROG_TYPE_XDP, K.mov64_imm(0, 2) + K.exit_()) as x:
            with pytest.raises(BpfilterError) as e:
                v4.swap(INPUT, x)
            assert e.value.errno == errno.EINVAL
        with pytest.raises(BpfilterError) as e:
            A.NfAttachment.open("arp", root=root)
        assert e.value.errno == errno.EAFNOSUPPORT
        v4.detach_all()
        assert os.path.isdir(v6.dir)                # the other family is untouched
        assert v6.attached()[INPUT]["hooknum"] == INPUT
    finally:
        v4.close()
        v6.detach_all()
    assert not os.path.exists(v6.dir)


def test_attach_no_fd_leak(netns, root):
    def cycle():
        with netns.inside():
            att = A.NfAttachment.open("ipv4", [INPUT], root=root)
        with accept_prog() as p:
            att.swap(INPUT, p)
            att.swap(INPUT, p)
        att.close()
        with netns.inside():
            att = A.NfAttachment.open("ipv4", [INPUT], root=root)
        att.detach_all()
    cycle()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        cycle()
    assert len(os.listdir("/proc/self/fd")) == before


def test_gc_removes_state_of_dead_namespaces(root):
    dead, live = Netns("d"), Netns("l")
    try:
        atts = []
        with accept_prog() as p:
            for ns in (dead, live):
                with ns.inside():
                    att = A.NfAttachment.open("ipv4", [INPUT], root=root)
                att.swap(INPUT, p)
                atts.append(att)
        dead_dir, live_dir = (os.path.dirname(a.dir) for a in atts)
        link_id = atts[0].attached()[INPUT]["id"]
        for a in atts:
            a.close()
        dead.close()
        # gc.py collects pins and /run state of dead namespaces (tests/test_reliability_gc.py)
        assert gc.collect(pin_root=root, state_root=root + "-state") == [dead_dir]
        assert not os.path.exists(dead_dir) and os.path.isdir(live_dir)
        with pytest.raises(BpfilterError):
            K.Link.from_id(link_id).close()        # detached and released
    finally:
        dead.close()
        with live.inside():
            A.NfAttachment.open("ipv4", root=root).detach_all()
        live.close()
