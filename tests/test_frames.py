"""The Python frames mirror kmod/bpfilter_msg.h: compile a tiny C program that prints sizeof and
offsetof of every field and compare with bpfilter_umh.frames."""
import os
import shutil
import subprocess

import pytest

from bpfilter_umh import frames
from bpfilter_umh.errors import BpfilterError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _c_layout(tmp_path):
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed: cannot compile the C side of the frame layout")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "bpfilter_msg.h"',
             'int main(void) {',
             'printf("magic %u\\n", (unsigned)BPFILTER_MSG_MAGIC);',
             'printf("hold %u\\n", (unsigned)BPFILTER_CMD_HOLD);',
             'printf("adopt %u\\n", (unsigned)BPFILTER_CMD_ADOPT);',
             'printf("socket %zu", sizeof(BPFILTER_HELPER_SOCKET) - 1);',
             'for (size_t i = 0; i < sizeof(BPFILTER_HELPER_SOCKET) - 1; i++)',
             '    printf(" %d", BPFILTER_HELPER_SOCKET[i]);',
             'printf("\\n");']
    for st, fields in (("bpfilter_request", frames.REQUEST_FIELDS),
                       ("bpfilter_reply", frames.REPLY_FIELDS)):
        lines.append(f'printf("{st} sizeof %zu\\n", sizeof(struct {st}));')
        for f in fields:
            lines.append(f'printf("{st} {f} %zu %zu\\n", offsetof(struct {st}, {f}), '
                         f'sizeof(((struct {st} *)0)->{f}));')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I", os.path.join(ROOT, "kmod"), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return [ln.split() for ln in out.splitlines()]


def test_layout_matches_c(tmp_path):
    rows = _c_layout(tmp_path)
    assert int(rows[0][1]) == frames.BPFILTER_MSG_MAGIC
    # the launcher's requests and the helper's socket (bin/bpfilter-exec.c)
    assert int(rows[1][1]) == frames.BPFILTER_CMD_HOLD
    assert int(rows[2][1]) == frames.BPFILTER_CMD_ADOPT
    assert bytes(int(c) for c in rows[3][2:]) == frames.HELPER_SOCKET
    assert int(rows[3][1]) == len(frames.HELPER_SOCKET)
    rows = rows[3:]
    py = {"bpfilter_request": (frames.REQUEST, frames.REQUEST_FIELDS),
          "bpfilter_reply": (frames.REPLY, frames.REPLY_FIELDS)}
    seen = 0
    for row in rows[1:]:
        st, what = row[0], row[1]
        pst, names = py[st]
        if what == "sizeof":
            assert int(row[2]) == pst.size, st
            continue
        offs = frames.field_offsets(pst, names)
        code = pst.format.lstrip("=")[names.index(what)]
        assert int(row[2]) == offs[what], (st, what)
        assert int(row[3]) == frames.struct.calcsize("=" + code), (st, what)
        seen += 1
    assert seen == len(frames.REQUEST_FIELDS) + len(frames.REPLY_FIELDS)


def test_roundtrip_and_bad_frames():
    r = frames.Request(cmd=65, is_set=0, family=2, pid=1234, len=672, addr=0x7fff0000,
                       netns_cookie=1 << 40)
    assert frames.Request.unpack(r.pack()) == r
    rep = frames.Reply(-2, 0)
    assert frames.Reply.unpack(rep.pack()) == rep
    with pytest.raises(BpfilterError):
        frames.Request.unpack(b"\0" * frames.REQUEST.size)
    with pytest.raises(BpfilterError):
        frames.Request.unpack(r.pack()[:-1])
    chunks = [r.pack()[:5], r.pack()[5:]]
    assert frames.read_exact(lambda n: chunks.pop(0) if chunks else b"", frames.REQUEST.size) == r.pack()
    assert frames.read_exact(lambda n: b"", 8) == b""
    with pytest.raises(BpfilterError):
        part = [b"abc"]
        frames.read_exact(lambda n: part.pop(0) if part else b"", 8)
