"""What the compile and the load read by opcode or by name instead of through properties and
files (issue #7: one append to a 10 000-rule fan-out), checked against the slow reads they
replace, on real tables (the kernel's blobs, decoded):

- compile._label_slots / _local_calls (CompiledProgram._layout, assemble, func_btf) against
  Insn.slots / Insn.is_local_call and ebpf.subprogram_starts, on programs with global
  functions, kfunc calls (src BPF_PSEUDO_KFUNC_CALL: not local calls) and lddw map loads;
- compile._compile_chains' built-in chains (Chain.hook read by C-level maps) against
  Chain.builtin, with user chains before, between and after them;
- compile._knobs' BPFILTER_* environment (names read first) against os.environ.items();
- _compile_chain's "a chain reached from several sites" test (max() first) against the set it
  stands for;
- kernel._check_kind's readlink of the anon inode against /proc/self/fdinfo: taken for maps,
  programs and links (pinned ones too), never accepting another kind, and the fdinfo still
  deciding any other name."""
import errno
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import rulesets  # noqa: E402
from test_cplane_scale import decoded  # noqa: E402 - the Table restore sends

from bpfilter_umh import classify  # noqa: E402
from bpfilter_umh import compile as C  # noqa: E402
from bpfilter_umh import ebpf as E  # noqa: E402
from bpfilter_umh import kernel as K  # noqa: E402
from bpfilter_umh.compile import COUNTERS_MAP, KernelFacts, compile_table  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, bpf")


def _slow_label_slots(items):
    at, slot = {}, 0
    for it in items:
        if isinstance(it, E.Label):
            at[it.name] = slot
        else:
            slot += it.slots
    return at, slot


def _slow_local_calls(items):
    out, slot = {}, 0
    for it in items:
        if isinstance(it, E.Label):
            continue
        if it.is_local_call:
            out[slot] = it.target
        slot += it.slots
    return out


def _programs(shape, n, monkeypatch):
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    C._PROG_CACHE.clear()
    text = rulesets.make(shape, n, seed=5).text
    return compile_table(decoded(text), KernelFacts.fake()).programs


@pytest.mark.parametrize("shape,n", [("fanout", 1500), ("blocklist", 300), ("mixed", 300)])
def test_opcode_reads_match_the_properties(shape, n, monkeypatch):
    progs = _programs(shape, n, monkeypatch)
    kinds = set()
    for cp in progs:
        items = cp.items
        assert C._label_slots(items) == _slow_label_slots(items)
        assert C._local_calls(items) == _slow_local_calls(items)
        kinds |= {(it.code, it.src) for it in items if it.__class__ is E.Insn}
        names = sorted({m.name for m in cp.maps} | {COUNTERS_MAP})
        fds = {nm: 3 + k for k, nm in enumerate(names)}
        facts = cp.facts
        # the layout's placed bytecode (local calls patched by _local_calls) is every item's
        assert cp.assemble(fds) == E.assemble(items, fds, facts.kfunc_ids)
        if cp.global_labels:
            # the layout's function starts (_local_calls) are the items' subprogram starts
            lay = cp._layout()
            got = cp.func_btf()
            cp.__dict__["_lay"] = False             # func_btf through subprogram_starts
            try:
                assert cp.func_btf() == got
            finally:
                cp.__dict__["_lay"] = lay
    if shape == "fanout":
        # what the opcode reads tell apart was there: local calls, kfunc calls, map loads
        assert (E.BPF_JMP | E.CALL, E.BPF_PSEUDO_CALL) in kinds
        assert (E.BPF_JMP | E.CALL, E.BPF_PSEUDO_KFUNC_CALL) in kinds
        assert any(code == E._LDDW for code, _ in kinds)
        assert any(cp.global_labels and cp.fn_parts for cp in progs)


def test_built_in_chains_among_user_chains(monkeypatch):
    """User chains beside the built-in ones in table.chains: the programs are those of the
    built-in chains, in table order."""
    text = "\n".join([
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":AAA - [0:0]", ":MMM - [0:0]", ":ZZZ - [0:0]",
        "-A INPUT -p tcp --dport 22 -j AAA", "-A AAA -s 10.0.0.0/8 -j ACCEPT",
        "-A FORWARD -j MMM", "-A MMM -p udp -j ZZZ", "-A ZZZ -j DROP",
        "-A OUTPUT -d 192.0.2.1/32 -j DROP", "COMMIT", ""])
    table = decoded(text)
    assert len(table.chains) == 6
    C._PROG_CACHE.clear()
    got = [cp.chain for cp in compile_table(table, KernelFacts.fake()).programs]
    assert got == [c.name for c in table.chains if c.builtin]
    assert got == ["INPUT", "FORWARD", "OUTPUT"]


def test_knobs_read_the_bpfilter_environment(monkeypatch):
    for k in [k for k in os.environ if k.startswith("BPFILTER_")]:
        monkeypatch.delenv(k)
    base = C._knobs()
    monkeypatch.setenv("BPFILTER_TEST_KNOB_B", "2")
    monkeypatch.setenv("BPFILTER_TEST_KNOB_A", "x y")
    monkeypatch.setenv("NOT_BPFILTER_TEST_KNOB", "1")
    got = C._knobs()
    assert got != base
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("BPFILTER_")))
    assert got[len(got) - len(env):] == env
    assert got[len(got) - 2:] == (("BPFILTER_TEST_KNOB_A", "x y"), ("BPFILTER_TEST_KNOB_B", "2"))
    monkeypatch.setenv("BPFILTER_TEST_KNOB_B", "3")
    assert C._knobs() != got                       # a value changed: another key


def test_chain_reached_twice_gets_subprograms():
    """_compile_chain's max() shortcut: a chain jumped to from two places still becomes a
    subprogram where the size asks for it (subprog_above 0), and one reached once does not."""
    text = "\n".join([
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":TWICE - [0:0]", ":ONCE - [0:0]",
        "-A INPUT -p tcp --dport 22 -j TWICE", "-A INPUT -p tcp --dport 23 -j TWICE",
        "-A INPUT -p udp -j ONCE", "-A TWICE -s 10.0.0.0/8 -j DROP", "-A ONCE -j ACCEPT",
        "COMMIT", ""])
    C._PROG_CACHE.clear()
    ct = compile_table(decoded(text), KernelFacts.fake(), subprog_above=0)
    inp = next(cp for cp in ct.programs if cp.chain == "INPUT")
    labels = {it.name for it in inp.items if isinstance(it, E.Label)}
    assert any(lb.startswith("sub_TWICE") for lb in labels)
    assert not any(lb.startswith("sub_ONCE") for lb in labels)


# ---- kernel._check_kind ----------------------------------------------------------------------

@pytest.fixture
def pindir():
    K.ensure_bpffs()
    d = f"/sys/fs/bpf/bpft_kind{os.getpid()}"
    os.makedirs(d, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _no_fdinfo(monkeypatch):
    """open() of /proc/self/fdinfo fails: only the readlink can accept."""
    import builtins
    real = builtins.open

    def guarded(path, *a, **kw):
        if isinstance(path, str) and path.startswith("/proc/self/fdinfo/"):
            raise AssertionError("fdinfo read")
        return real(path, *a, **kw)
    monkeypatch.setattr(builtins, "open", guarded)


def test_check_kind_by_the_anon_inode(pindir, monkeypatch):
    xdp = K.mov64_imm(0, 2) + K.exit_()
    with K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 4, 2, "t_kind") as m, \
            K.Prog.load(K.BPF_PROG_TYPE_XDP, xdp, name="t_kind") as p:
        m.pin(pindir + "/m")
        p.pin(pindir + "/p")
        _no_fdinfo(monkeypatch)
        with K.Map.from_pin(pindir + "/m") as m2, K.Prog.from_pin(pindir + "/p") as p2:
            assert m2.id == m.id and p2.id == p.id
        for fd, kind in ((m.fd, "map"), (p.fd, "prog")):
            assert K._check_kind(fd, kind) == fd
        monkeypatch.undo()
        # another kind is refused (by the fdinfo, which closes the fd it was given)
        for wrong in ("prog", "link"):
            fd = os.dup(m.fd)
            with pytest.raises(BpfilterError) as e:
                K._check_kind(fd, wrong, "dup")
            assert e.value.errno == errno.EINVAL and "is not a BPF" in e.value.message
            with pytest.raises(OSError):
                os.fstat(fd)                                    # closed
        # a file that is no bpf object at all
        fd = os.open("/dev/null", os.O_RDONLY)
        with pytest.raises(BpfilterError) as e:
            K._check_kind(fd, "map", "/dev/null")
        assert e.value.errno == errno.EINVAL


def test_check_kind_other_names_go_to_the_fdinfo(monkeypatch):
    """A name the readlink does not know (another kernel's) is decided by the fdinfo."""
    monkeypatch.setattr(K, "_ANON_NAMES", {"map": (), "prog": (), "link": ()})
    seen = []
    import builtins
    real = builtins.open

    def spy(path, *a, **kw):
        if isinstance(path, str) and path.startswith("/proc/self/fdinfo/"):
            seen.append(path)
        return real(path, *a, **kw)
    monkeypatch.setattr(builtins, "open", spy)
    with K.Map.create(K.BPF_MAP_TYPE_ARRAY, 4, 4, 2, "t_kind2") as m:
        assert K._check_kind(m.fd, "map") == m.fd
        fd = os.dup(m.fd)
        with pytest.raises(BpfilterError):
            K._check_kind(fd, "prog")
    assert len(seen) == 2


def test_check_kind_pinned_links():
    """Links: the engine's netfilter links, read back from their pins by NfAttachment.open,
    are accepted by the readlink (bpf_link_new_fd's "bpf-link")."""
    from test_cplane_scale import netns_engine
    from bpfilter_umh import attach
    text = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
        "-A INPUT -p tcp --dport 22 -j DROP\nCOMMIT\n"
    with netns_engine("kindlink") as e:
        e.install(decoded(text))
        names = []
        real = K._check_kind

        def spy(fd, kind, where=""):
            names.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
            return real(fd, kind, where)
        K._check_kind = spy
        try:
            att = attach.open_attachment("nf", e.family)
            att.close()
        finally:
            K._check_kind = real
        links = [n for k, n in names if k == "link"]
        assert links and all(n in K._ANON_NAMES["link"] for n in links)


def test_built_in_chain_at_hook_zero():
    """A built-in chain whose hook is 0 (NF_INET_PRE_ROUTING: falsy) is a built-in chain too:
    the flavor's check_chain sees it (and refuses it, naming the hook: the nf flavor has no
    attach point there), instead of it being skipped as a user chain."""
    text = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
        "-A INPUT -p tcp --dport 22 -j DROP\nCOMMIT\n"
    table = decoded(text)
    inp = next(c for c in table.chains if c.name == "INPUT")
    inp.hook = 0
    C._PROG_CACHE.clear()
    with pytest.raises(BpfilterError) as e:
        compile_table(table, KernelFacts.fake())
    assert e.value.errno == errno.EOPNOTSUPP and "chain INPUT" in e.value.message and \
        "PREROUTING" in e.value.message


# ---- engine._after_install: which kept programs are encoded after the reply ----------------

def test_chain_changed_twice_is_not_encoded_after_the_reply(monkeypatch):
    """After a restore every kept program is encoded (compile.encode_kept); after an append to
    INPUT, which the restore compiled too, INPUT's new program is not (the next append changes
    it again). An install that then keeps INPUT (a rule added to OUTPUT) encodes it when it
    assembles it: the bytes of every item, as always."""
    from bpfilter_umh import engine
    from nsutil import Netns
    monkeypatch.setattr(classify, "GLOBAL_ABOVE", 0)
    C._PROG_CACHE.clear()
    base = rulesets.make("fanout", 1500, seed=11).text
    one = "-A INPUT -s 203.0.113.1/32 -p udp -m udp --dport 4 -j DROP\n"
    out = "-A OUTPUT -d 192.0.2.9/32 -p tcp -m tcp --dport 25 -j DROP\n"
    texts = [base, base.replace("COMMIT", one + "COMMIT"),
             base.replace("COMMIT", one + out + "COMMIT")]
    tables = [decoded(t) for t in texts]
    monkeypatch.setattr(engine, "AFTER_REPLY", [])
    encoded = []
    real = engine.encode_kept

    def spy(programs):
        programs = list(programs)
        encoded.append({cp.chain for cp in programs})
        return real(programs)
    monkeypatch.setattr(engine, "encode_kept", spy)

    def fresh(eng):
        return {cp.chain: cp for ct in eng._compiled_tables for cp in ct.programs
                if "_kept_copy" in cp.__dict__}
    with Netns("kce2") as ns, ns.inside():
        eng = engine.Engine.open()
        try:
            eng.install(tables[0])
            engine.run_after_reply()
            assert "INPUT" in encoded[-1] and "FORWARD" in encoded[-1]
            eng.install(tables[1])
            input_copy = fresh(eng)["INPUT"].__dict__["_kept_copy"]
            engine.run_after_reply()
            assert "INPUT" not in encoded[-1]
            assert "_code" not in input_copy.__dict__          # not encoded after the reply
            eng.install(tables[2])
            kept = [cp for ct in eng._compiled_tables for cp in ct.programs
                    if cp.chain == "INPUT"]
            assert kept and isinstance(kept[0], C._KeptProgram)
            assert kept[0].__dict__["_kept"][0] is input_copy
            assert "_code" in input_copy.__dict__              # encoded by that install
            engine.run_after_reply()
        finally:
            eng.flush()
            eng.close()
    cp = kept[0]
    facts = cp.facts
    fds = {COUNTERS_MAP: 3, **{m.name: 4 for m in cp.maps}}
    assert cp.assemble(fds) == E.assemble(cp.items, fds, facts.kfunc_ids if facts else {})
