"""bpfilter_umh.kernel on the real kernel: maps, loads with verifier logs, test-run, links, pins,
feature probes, fd hygiene. Everything that attaches runs inside a throwaway namespace; pins go to
a per-test directory in bpffs that is removed afterwards."""
import errno
import itertools
import os
import shutil
import struct

import pytest

from bpfilter_umh import btf
from bpfilter_umh import kernel as K
from bpfilter_umh.errors import BpfilterError


pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: loads BPF programs, creates links and pins")
_n = itertools.count()

# --- hand-encoded test programs (independent of the project's assembler) ------------------------
R0, R1, R2, R3, R4, R6, R10 = 0, 1, 2, 3, 4, 6, 10


def _jeq_imm(dst, imm, off):
    return K.insn(0x15, dst, 0, off, imm)


def _jne_imm(dst, imm, off):
    return K.insn(0x55, dst, 0, off, imm)


def nf_proto_prog(proto: int, verdict: int, count_map: "K.Map" = None, slot: int = 0,
                  name: str = "t_nf", ipv6: bool = False) -> K.Prog:
    """A netfilter program: if the IPv4 protocol (IPv6 next header) is `proto`, (count into
    count_map[slot] and) return `verdict`; otherwise NF_ACCEPT. Reads the header through
    bpf_dynptr_from_skb + bpf_dynptr_slice, as the compiler does."""
    skb = btf.member_offset("bpf_nf_ctx", "skb")
    body = [
        K.mov64_reg(R6, R1),
        K.insn(0x79, R1, R6, skb),                            # r1 = ctx->skb
        K.mov64_imm(R2, 0),
        K.mov64_reg(R3, R10), K.insn(0x07, R3, 0, 0, -16),    # r3 = &dynptr (fp-16)
        K.call(btf.func_id("bpf_dynptr_from_skb"), K.BPF_PSEUDO_KFUNC_CALL),
        K.mov64_reg(R1, R10), K.insn(0x07, R1, 0, 0, -16),
        K.mov64_imm(R2, 0),                                   # offset 0: the IP header
        K.mov64_reg(R3, R10), K.insn(0x07, R3, 0, 0, -40),    # 20-byte buffer at fp-40
        K.mov64_imm(R4, 20),
        K.call(btf.func_id("bpf_dynptr_slice"), K.BPF_PSEUDO_KFUNC_CALL),
    ]
    count = []
    if count_map is not None:
        count = [
            K.insn(0x62, R10, 0, -44, slot),                  # *(u32 *)(fp-44) = slot
            K.mov64_reg(R2, R10), K.insn(0x07, R2, 0, 0, -44),
            K.ld_imm64(R1, count_map.fd, K.BPF_PSEUDO_MAP_FD),
            K.call(K.BPF_FUNC_map_lookup_elem),
            _jeq_imm(R0, 0, 2),
            K.mov64_imm(R1, 1),
            K.insn(0xDB, R0, R1, 0, 0),                       # lock *(u64 *)(r0) += r1
        ]
    tail = count + [K.mov64_imm(R0, verdict), K.exit_()]
    accept = [K.mov64_imm(R0, K.NF_ACCEPT), K.exit_()]
    body += [
        _jeq_imm(R0, 0, 2 + len(b"".join(tail)) // 8),        # no slice: accept
        K.insn(0x71, R1, R0, 6 if ipv6 else 9),               # r1 = nexthdr / protocol
        _jne_imm(R1, proto, len(b"".join(tail)) // 8),
    ] + tail + accept
    return K.Prog.load(K.BPF_PROG_TYPE_NETFILTER, b"".join(body), name=name,
                       expected_attach_type=K.BPF_NETFILTER)


def eth_ipv4(proto: int, payload: bytes = b"\0" * 8) -> bytes:
    """An Ethernet frame carrying an IPv4 packet 192.0.2.1 -> 192.0.2.2 (checksum not needed by
    the test-run path)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                     bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + payload


@pytest.fixture
def pindir():
    K.ensure_bpffs()
    d = f"/sys/fs/bpf/bpft{os.getpid()}_{next(_n)}"
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# --- maps ---------------------------------------------------------------------------------------
def test_array_map_update_lookup_delete():
    with K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 8, 4, "t_array") as m:
        assert m.lookup(1) == b"\0" * 8
        m.update(1, struct.pack("<Q", 42))
        assert m.lookup(1) == struct.pack("<Q", 42)
        info = m.info()
        assert info["name"] == "t_array" and info["max_entries"] == 4 and info["value_size"] == 8
        assert m.id == info["id"] > 0
        with pytest.raises(BpfilterError) as e:
            m.update(9, b"\0" * 8)              # out of range index
        assert e.value.errno == errno.E2BIG
        with pytest.raises(BpfilterError) as e:
            m.update(1, b"\0" * 3)
        assert e.value.errno == errno.EINVAL


def test_hash_map_keys_and_missing():
    with K.Map.create(K.BPF_MAP_TYPE_HASH, 4, 4, 16, "t_hash") as m:
        assert m.lookup(b"abcd") is None
        for i in range(5):
            m.update(i, i * 10)
        assert sorted(int.from_bytes(k, "little") for k in m.keys()) == list(range(5))
        m.delete(3)
        assert m.lookup(3) is None
        with pytest.raises(BpfilterError) as e:
            m.delete(3)
        assert e.value.errno == errno.ENOENT


def test_percpu_array_lookup():
    ncpu = K.possible_cpus()
    with open("/sys/devices/system/cpu/possible") as f:
        assert ncpu >= 1 and f.read().strip()
    with K.Map.create(K.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 12, 2, "t_pcpu") as m:
        vals = m.lookup_percpu(0)
        assert vals == [b"\0" * 12] * ncpu
        per = [struct.pack("<QI", 100 + c, c) + b"\0" * 4 for c in range(ncpu)]   # 12 -> 16
        m.update(1, b"".join(per))
        assert m.lookup_percpu(1) == [p[:12] for p in per]
        m.update(1, struct.pack("<QI", 7, 7))       # one value: replicated on every CPU
        assert m.lookup_percpu(1) == [struct.pack("<QI", 7, 7)] * ncpu
        with pytest.raises(BpfilterError):
            m.lookup(0)


def test_map_create_failure_is_precise():
    with pytest.raises(BpfilterError) as e:
        K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 8, 0, "t_bad")       # max_entries 0
    assert e.value.errno == errno.EINVAL and "BPF_MAP_CREATE" in e.value.message


def test_map_pin_and_from_pin(pindir):
    with K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 4, 2, "t_pinned") as m:
        m.update(0, 5)
        m.pin(pindir + "/sub/m")                    # parents created
        mid = m.id
    with K.Map.from_pin(pindir + "/sub/m") as m2:
        assert m2.id == mid and m2.value_size == 4 and m2.name == "t_pinned"
        assert m2.lookup(0) == (5).to_bytes(4, "little")
    with pytest.raises(BpfilterError) as e:
        K.Map.from_pin(pindir + "/nothing")
    assert e.value.errno == errno.ENOENT
    for wrong in (K.Prog.from_pin, K.Link.from_pin):      # a map pin is neither
        with pytest.raises(BpfilterError) as e:
            wrong(pindir + "/sub/m")
        assert e.value.errno == errno.EINVAL and "is not a BPF" in e.value.message


# --- program load -------------------------------------------------------------------------------
def test_prog_load_info_and_pin(pindir):
    with K.Prog.load(K.BPF_PROG_TYPE_XDP, K.mov64_imm(0, 2) + K.exit_(), name="t_xdp_pass") as p:
        i = p.info()
        assert i["type"] == K.BPF_PROG_TYPE_XDP and i["name"] == "t_xdp_pass"
        assert i["xlated_prog_len"] == 16 and i["jited_prog_len"] > 0 and len(i["tag"]) == 16
        p.pin(pindir + "/p")
        with K.Prog.from_pin(pindir + "/p") as q:
            assert q.id == i["id"] and q.prog_type == K.BPF_PROG_TYPE_XDP
        with K.Prog.from_id(i["id"]) as q:
            assert q.info()["tag"] == i["tag"]


def test_verifier_rejection_quotes_log():
    with pytest.raises(BpfilterError) as e:
        K.Prog.load(K.BPF_PROG_TYPE_XDP, K.exit_(), name="t_noret")    # R0 never written
    assert e.value.errno == errno.EACCES
    assert "R0 !read_ok" in e.value.message and "verifier log" in e.value.message
    with pytest.raises(BpfilterError) as e:
        K.Prog.load(K.BPF_PROG_TYPE_XDP, K.insn(0xFF) + K.mov64_imm(0, 2) + K.exit_())
    assert e.value.errno == errno.EINVAL and "unknown opcode" in e.value.message
    with pytest.raises(BpfilterError) as e:
        K.Prog.load(K.BPF_PROG_TYPE_XDP, b"\0" * 7)
    assert e.value.errno == errno.EINVAL


def test_verifier_log_grows_on_enospc(monkeypatch):
    """A tiny first buffer must be grown to log_true_size and the message keep the log's end."""
    monkeypatch.setattr(K, "LOG_START", 64)
    n = 300
    insns = K.mov64_imm(0, 0) + b"".join(K.insn(0x07, 0, 0, 0, 1) for _ in range(n)) + K.exit_()
    with K.Prog.load(K.BPF_PROG_TYPE_XDP, insns, name="t_log", log_level=2) as p:
        assert "processed" in p.log and len(p.log) > 64 * 10
    bad = b"".join(K.insn(0x07, 0, 0, 0, 1) for _ in range(n)) + K.exit_()    # r0 uninitialised
    with pytest.raises(BpfilterError) as e:
        K.Prog.load(K.BPF_PROG_TYPE_XDP, bad, name="t_logbad")
    msg = e.value.message
    assert e.value.errno == errno.EACCES and "R0 !read_ok" in msg
    assert msg.count("\n") <= K.LOG_TAIL_LINES + 1


# --- test-run -----------------------------------------------------------------------------------
def test_test_run_xdp():
    frame = eth_ipv4(17)
    with K.Prog.load(K.BPF_PROG_TYPE_XDP, K.mov64_imm(0, 2) + K.exit_(), name="t_xdp") as p:
        ret, dur, out = p.test_run(frame, repeat=100)
        assert ret == 2 and out == frame and dur >= 0
    with pytest.raises(BpfilterError) as e:
        K.test_run(-1, frame)
    assert e.value.errno == errno.EBADF


def test_test_run_netfilter_icmp_drop():
    with nf_proto_prog(1, K.NF_DROP, name="t_icmpdrop") as p:
        ctx = bytes([1, K.NFPROTO_IPV4])                 # LOCAL_IN, IPv4
        assert p.test_run(eth_ipv4(1), ctx_in=ctx)[0] == K.NF_DROP
        assert p.test_run(eth_ipv4(17), ctx_in=ctx)[0] == K.NF_ACCEPT
        for hook in (0, 2, 4):
            assert p.test_run(eth_ipv4(1), ctx_in=bytes([hook, 2]))[0] == K.NF_DROP, hook
        # measured on 6.18: at LOCAL_OUT (also the default without ctx_in) data_in is taken as
        # is: a bare IP packet; an Ethernet frame there puts a MAC byte at offset 9
        assert p.test_run(eth_ipv4(1)[14:], ctx_in=bytes([3, 2]))[0] == K.NF_DROP
        assert p.test_run(eth_ipv4(1)[14:])[0] == K.NF_DROP
        assert p.test_run(eth_ipv4(1), ctx_in=bytes([3, 2]))[0] == K.NF_ACCEPT
        with pytest.raises(BpfilterError) as e:          # EtherType IPv4 but pf IPv6
            p.test_run(eth_ipv4(1), ctx_in=bytes([1, K.NFPROTO_IPV6]))
        assert e.value.errno == errno.EINVAL


def test_netfilter_counting_prog():
    with K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 8, 2, "t_cnt") as m, \
            nf_proto_prog(17, K.NF_ACCEPT, m, 1, name="t_count") as p:
        for _ in range(3):
            assert p.test_run(eth_ipv4(17), ctx_in=bytes([1, 2]))[0] == K.NF_ACCEPT
        p.test_run(eth_ipv4(6), ctx_in=bytes([1, 2]))
        assert m.lookup(1) == struct.pack("<Q", 3) and m.lookup(0) == b"\0" * 8


# --- links, netns -------------------------------------------------------------------------------
def test_netfilter_link_info_and_busy(netns):
    with netns.inside():
        with nf_proto_prog(1, K.NF_DROP) as p:
            with K.link_create_netfilter(p, K.NFPROTO_IPV4, 1, 5) as link:
                i = link.info()
                assert (i["type"], i["pf"], i["hooknum"], i["priority"]) == \
                    (K.BPF_LINK_TYPE_NETFILTER, K.NFPROTO_IPV4, 1, 5)
                assert i["prog_id"] == p.id
                with pytest.raises(BpfilterError) as e:
                    K.link_create_netfilter(p, K.NFPROTO_IPV4, 1, 5)
                assert e.value.errno == errno.EBUSY and "priority" in e.value.message
                link.detach()
                with pytest.raises(BpfilterError) as e:
                    K.link_create_netfilter(p, K.NFPROTO_IPV4, 9, 5)
                assert e.value.errno == errno.EPROTO      # nf_bpf_link.c: unknown hook
                with pytest.raises(BpfilterError) as e:
                    K.link_create_netfilter(p, K.NFPROTO_IPV4, 1, -2147483648)
                assert e.value.errno == errno.ERANGE      # NF_IP_PRI_FIRST is reserved


def test_netns_cookie_differs(netns):
    host = K.netns_cookie()
    with netns.inside():
        inner = K.netns_cookie()
        assert inner == K.netns_cookie()
    assert inner != host and K.netns_cookie() == host


def test_bpffs_check():
    K.ensure_bpffs()
    assert K.is_bpffs("/sys/fs/bpf") and not K.is_bpffs("/proc")
    with pytest.raises(BpfilterError) as e:
        K.obj_pin(0, "/tmp/bpft-not-bpffs/x")
    assert e.value.errno == errno.EINVAL and "not a bpf filesystem" in e.value.message
    shutil.rmtree("/tmp/bpft-not-bpffs", ignore_errors=True)


# --- probes -------------------------------------------------------------------------------------
def test_feature_probes(netns):
    rep = K.features.report()
    assert set(rep) == set(K.Features.DESCRIPTIONS)
    # this machine's 6.18 kernel has them all; the point is that each probe ran and is cached
    assert all(ok for ok, _ in rep.values()), rep
    K.features.require("netfilter_link")
    with pytest.raises(BpfilterError) as e:
        K.features.require("warp_drive")
    assert e.value.errno == errno.EINVAL
    f = K.Features()
    f._cache["xdp"] = (False, "probe said no")             # what a lacking kernel reports
    with pytest.raises(BpfilterError) as e:
        f.require("xdp")
    assert e.value.errno == errno.EOPNOTSUPP and "this kernel lacks XDP programs" in e.value.message


# --- fd hygiene ---------------------------------------------------------------------------------
def test_no_fd_leaks(netns, pindir):
    def cycle():
        with K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 8, 1, "t_leak") as m:
            m.pin(pindir + "/m")
            K.Map.from_pin(pindir + "/m").close()
            K.unpin(pindir + "/m")
            m.pin(pindir + "/m2")
        for bad in (lambda: K.Prog.load(K.BPF_PROG_TYPE_XDP, K.exit_()),
                    lambda: K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 8, 0),
                    lambda: K.Map.from_pin(pindir + "/missing"),
                    lambda: K.Prog.from_pin("/sys/fs/bpf"),
                    lambda: K.Prog.from_pin(pindir + "/m2"),          # a map pin
                    lambda: K.Prog.from_id(0x7FFFFFF0)):
            with pytest.raises(BpfilterError):
                bad()
        with netns.inside(), nf_proto_prog(1, K.NF_DROP) as p:
            with K.link_create_netfilter(p, 2, 1, 7):
                with pytest.raises(BpfilterError):
                    K.link_create_netfilter(p, 2, 1, 7)
            p.test_run(eth_ipv4(1))
            K.netns_cookie()
        K.unpin(pindir + "/m2")
    cycle()                          # warm caches (BTF, libbpf probes)
    before = open_fds()
    for _ in range(3):
        cycle()
    assert open_fds() == before
