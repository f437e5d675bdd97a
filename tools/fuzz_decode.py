#!/usr/bin/env python3
"""Coverage-guided fuzzing of the blob decoder (model.decode_replace: do_replace + translate_table's
checks) with atheris/libFuzzer. Every input must give a table or a BpfilterError: any other
exception is a crash, a slow input (> -timeout) a hang; libFuzzer stops and saves the input.

    python3 tools/fuzz_decode.py -runs=1000000 [-max_len=4096] [CORPUS_DIR ...]

Input: byte 0 picks the family (odd: IPv4, even: IPv6), the rest is the ipt_replace buffer. The
seed corpus (written to /tmp/bpfilter-fuzz-decode-corpus when none is given) holds the replace buffers of
real tables, so mutations start from valid structures. The decoder is pure: no state to check.
"""
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import atheris  # noqa: E402

with atheris.instrument_imports(include=["bpfilter_umh"]):
    from bpfilter_umh import model  # noqa: E402
from bpfilter_umh.errors import BpfilterError  # noqa: E402


def seed_buffers():
    """ipt_replace buffers of real tables: the reliability rulesets and the empty tables."""
    import kernel_xt as kx
    from test_reliability_util import two_rulesets
    out = []
    for t in (*two_rulesets(), model.Table.empty("filter", 2), model.Table.empty("filter", 10)):
        blob = t.encode()
        fam = b"\x01" if t.family == 2 else b"\x00"
        out.append(fam + kx.replace_buffer("filter", t.valid_hooks, t.num_entries, len(blob),
                                           t.hook_entry, t.underflow, t.num_entries, 0, blob))
    return out


def one_input(data: bytes):
    if not data:
        return
    family = 2 if data[0] & 1 else 10
    try:
        model.decode_replace(data[1:], family)
    except BpfilterError:
        pass


def main():
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        # one fixed directory, reused: the corpus grows across runs (and nothing piles up)
        corpus = os.path.join(tempfile.gettempdir(), "bpfilter-fuzz-decode-corpus")
        os.makedirs(corpus, exist_ok=True)
        for i, b in enumerate(seed_buffers()):
            with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
                f.write(b)
        argv.append(corpus)
    if not any(a.startswith("-max_len") for a in argv):
        argv.append("-max_len=4096")
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
