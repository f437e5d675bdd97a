"""bpfilter_umh.btf against bpftool's own reading of the same /sys/kernel/btf/vmlinux."""
import errno
import re
import shutil
import subprocess

import pytest

from bpfilter_umh import btf
from bpfilter_umh.errors import BpfilterError

NEEDED = [("bpf_nf_ctx", "state"), ("bpf_nf_ctx", "skb"), ("nf_hook_state", "hook"),
          ("nf_hook_state", "pf"), ("nf_hook_state", "in"), ("nf_hook_state", "out"),
          ("net_device", "name"), ("sk_buff", "len"), ("sk_buff", "mark")]


@pytest.fixture(scope="module")
def bpftool_types():
    """id -> (kind, name, size, [(member, type_id, bits_offset, bitfield_size)]) from
    `bpftool btf dump file vmlinux` (raw format)."""
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed: no independent BTF reader to compare with")
    out = subprocess.run(["bpftool", "btf", "dump", "file", btf.VMLINUX], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    types, cur = {}, None
    head = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
    mem = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?")
    for line in out.splitlines():
        m = head.match(line)
        if m:
            size = re.search(r"\bsize=(\d+)", m.group(4))
            tid = re.search(r"\btype_id=(\d+)", m.group(4))
            cur = [m.group(2), m.group(3), int(size.group(1)) if size else None,
                   int(tid.group(1)) if tid else None, []]
            types[int(m.group(1))] = cur
            continue
        m = mem.match(line)
        if m and cur is not None and cur[0] in ("STRUCT", "UNION"):
            cur[4].append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4) or 0)))
    return types


def _ref_member(types, sid, name):
    """Reference lookup over bpftool's view: C name lookup through anonymous members."""
    for mname, tid, boff, _bs in types[sid][4]:
        if mname == name:
            return boff
        if mname == "(anon)" or mname == "":
            t = tid
            while types[t][0] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
                t = types[t][3]
            if types[t][0] in ("STRUCT", "UNION"):
                inner = _ref_member(types, t, name)
                if inner is not None:
                    return boff + inner
    return None


def test_needed_offsets_match_bpftool(bpftool_types):
    by_name = {}
    for tid, (kind, name, *_r) in bpftool_types.items():
        if kind == "STRUCT":
            by_name.setdefault(name, tid)
    for s, m in NEEDED:
        ref = _ref_member(bpftool_types, by_name[s], m)
        assert ref is not None and ref % 8 == 0, (s, m)
        assert btf.member_offset(s, m) == ref // 8, (s, m)
    # fixed by the kernel's layout (include/linux/netfilter.h, include/net/netfilter/nf_bpf_link.h)
    assert btf.member("nf_hook_state", "hook") == (0, 1)
    assert btf.member("nf_hook_state", "pf") == (1, 1)
    assert btf.member("bpf_nf_ctx", "skb") == (8, 8)
    assert btf.member("net_device", "name")[1] == 16
    assert btf.member("sk_buff", "mark")[1] == 4


def test_all_struct_sizes_and_member_offsets(bpftool_types):
    """Every non-bitfield named member of every uniquely named struct, and every size."""
    seen, dup = {}, set()
    for tid, (kind, name, *_r) in bpftool_types.items():
        if kind == "STRUCT" and name != "(anon)":
            if name in seen:
                dup.add(name)
            seen.setdefault(name, tid)
    checked = 0
    for name, tid in seen.items():
        if name in dup:
            continue
        kind, _n, size, _t, members = bpftool_types[tid]
        assert btf.vmlinux().struct_size(name) == size, name
        names = [m[0] for m in members]
        for mname, _mt, boff, bsize in members:
            if mname in ("(anon)", "") or bsize or boff % 8 or names.count(mname) > 1:
                continue
            assert btf.vmlinux().member_offset(name, mname) == boff // 8, (name, mname)
            checked += 1
    assert checked > 10000


def test_func_ids_match_bpftool(bpftool_types):
    funcs = {}
    for tid, (kind, name, *_r) in bpftool_types.items():
        if kind == "FUNC":
            funcs.setdefault(name, tid)
    for name in ("bpf_dynptr_from_skb", "bpf_dynptr_slice", "bpf_skb_ct_lookup",
                 "bpf_ct_release"):
        if name in funcs:
            assert btf.func_id(name) == funcs[name], name
    assert btf.func_id("bpf_dynptr_from_skb") == funcs["bpf_dynptr_from_skb"]
    sample = sorted(funcs.items())[::97]
    for name, tid in sample:
        assert btf.vmlinux().func_id(name) == tid


def test_errors_are_precise(tmp_path):
    with pytest.raises(BpfilterError) as e:
        btf.func_id("no_such_kfunc_bpfilter")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(BpfilterError) as e:
        btf.member_offset("sk_buff", "no_such_member")
    assert e.value.errno == errno.ENOENT and "sk_buff" in e.value.message
    with pytest.raises(BpfilterError) as e:
        btf.struct_size("no_such_struct_bpfilter")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(BpfilterError) as e:    # bitfield: no byte offset
        btf.vmlinux().member_offset("task_struct", "sched_reset_on_fork")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(BpfilterError) as e:
        btf.member_offset("nf_hook_state", "hook.x")
    assert e.value.errno == errno.EINVAL
    bad = tmp_path / "bad.btf"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(BpfilterError) as e:
        btf.Btf(str(bad))
    assert e.value.errno == errno.EINVAL and "magic" in e.value.message
    with pytest.raises(BpfilterError) as e:
        btf.Btf(str(tmp_path / "missing"))
    assert e.value.errno == errno.ENOENT
    data = bytearray(open(btf.VMLINUX, "rb").read(4096))   # header + truncated sections
    trunc = tmp_path / "trunc.btf"
    trunc.write_bytes(bytes(data))
    with pytest.raises(BpfilterError) as e:
        btf.Btf(str(trunc))
    assert e.value.errno == errno.EINVAL


def test_nested_path():
    """sk_buff's struct_group(headers, ...) makes mark/protocol reachable both directly (through
    the anonymous union) and through the named member `headers`: both must agree."""
    for m in ("mark", "protocol", "inner_protocol"):
        assert btf.member("sk_buff", "headers." + m) == btf.member("sk_buff", m)
    assert btf.member_offset("sk_buff", "headers") < btf.member_offset("sk_buff", "mark")
