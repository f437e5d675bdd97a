"""kernel.py's FFI: the module tools/gen_kernel_ffi.py generated from kernel_cdef.CDEF (cffi's
out-of-line ABI mode), so a helper starts without pycparser; it must be current and describe
exactly what CDEF parsed in-line describes, and a CDEF it was not generated from is parsed."""
import os
import re
import subprocess
import sys

import cffi

from bpfilter_umh import _kernel_ffi, kernel
from bpfilter_umh.kernel_cdef import CDEF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRUCTS = re.findall(r"^struct (\w+) \{", CDEF, re.M)
FUNCS = re.findall(r"^[\w ]+?\**\s*\b(\w+)\(", CDEF, re.M)


def _parsed():
    f = cffi.FFI()
    f.cdef(CDEF)
    return f


def test_the_generated_module_is_current():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_kernel_ffi.py"),
                        "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_kernel_uses_the_generated_ffi():
    assert kernel._ffi is _kernel_ffi.ffi


def test_the_generated_structs_are_the_parsed_ones():
    gen, ref = _kernel_ffi.ffi, _parsed()
    assert len(STRUCTS) == 5
    for name in STRUCTS:
        g, r = gen.typeof(f"struct {name}"), ref.typeof(f"struct {name}")
        assert gen.sizeof(g) == ref.sizeof(r), name
        assert [(n, f.offset, f.type.cname) for n, f in g.fields] == \
            [(n, f.offset, f.type.cname) for n, f in r.fields], name


def test_the_generated_functions_are_the_parsed_ones():
    gen, ref = _kernel_ffi.ffi, _parsed()
    glib, rlib = gen.dlopen("libbpf.so.1"), ref.dlopen("libbpf.so.1")
    assert "bpf_map_create" in FUNCS and "syscall" in FUNCS
    for name in FUNCS:
        assert gen.typeof(getattr(glib, name)).cname == ref.typeof(getattr(rlib, name)).cname


def test_declarations_it_was_not_generated_from_are_parsed():
    f = kernel._declared(CDEF + "int getpid(void);\n")
    assert f is not _kernel_ffi.ffi
    assert f.dlopen(None).getpid() == os.getpid()


def test_a_helper_start_parses_no_c():
    # what a helper imports and warms before its first request (__main__.preload)
    code = ("import sys; from bpfilter_umh import __main__ as m; m.preload(); "
            "from bpfilter_umh import kernel; kernel.warm_types(); "
            "print(sorted(n for n in ('pycparser', 'cffi') if n in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
