"""The few libc functions the door and the helper call, through the _ctypes extension alone.

`import ctypes` defines its whole type zoo at import and costs a `python3 -S` process ~3-4 ms
(measured: `python3 -S -c 'import ctypes'` 12.1 ms against 8.3 ms for `-c pass`); the door runs
once per iptables command and needs five functions, so it declares just those (the helper reads
its callers' memory through the same ones: caller.py), with the calling convention
ctypes.CDLL(None, use_errno=True) would give them: cdecl, errno saved after each call (read with
get_errno), Python ints passed as C int, bytes passed as a const char pointer.
"""
import _ctypes


class _Int(_ctypes._SimpleCData):
    _type_ = "i"


class _Long(_ctypes._SimpleCData):
    _type_ = "l"


class _ULong(_ctypes._SimpleCData):
    _type_ = "L"


class _Char(_ctypes._SimpleCData):
    _type_ = "c"


class _Function(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


_program = _ctypes.dlopen(None, _ctypes.RTLD_LOCAL)     # dlopen(NULL): the program and its libc


def _function(name: str, restype=_Int):
    fn = _Function(_ctypes.dlsym(_program, name))
    fn.restype = restype
    return fn


syscall = _function("syscall", _Long)
prctl = _function("prctl")
setns = _function("setns")
process_vm_readv = _function("process_vm_readv", _Long)
process_vm_writev = _function("process_vm_writev", _Long)
# the helper's heap reserve (heap.py): malloc's thresholds, and giving its free pages back
mallopt = _function("mallopt")
malloc_trim = _function("malloc_trim")
malloc_trim.argtypes = (_ULong,)
# and the heap's top faulted in while idle (heap._topup): where the break is, and populating
# a range of pages (addresses and lengths passed as unsigned long, not as C int)
sbrk = _function("sbrk", _Long)
sbrk.argtypes = (_Long,)
madvise = _function("madvise")
madvise.argtypes = (_ULong, _ULong, _Int)
get_errno = _ctypes.get_errno
addressof = _ctypes.addressof


def char_buffer(init) -> "_ctypes.Array":
    """A writable char[] of `init` bytes (an int) or holding a copy of `init` (bytes); .raw
    reads it back, addressof() gives the pointer to hand the kernel."""
    if isinstance(init, int):
        return (_Char * init)()
    buf = (_Char * len(init))()
    buf.raw = init
    return buf


class _CharP(_ctypes._SimpleCData):
    _type_ = "z"


class _VoidP(_ctypes._SimpleCData):
    _type_ = "P"


def char_view(buf: bytearray, start: int, n: int) -> "_ctypes.Array":
    """buf[start:start + n] as a char[] over the bytearray's own storage (no copy)."""
    return (_Char * n).from_buffer(buf, start)


def data_address(data) -> tuple:
    """(address of data's bytes, an object to keep alive while the address is used): a bytes
    object's own storage (a char pointer to it), a bytearray's (a view), else a copy."""
    if isinstance(data, bytes):
        p = _CharP(data)
        return _VoidP.from_buffer(p).value, p
    buf = char_view(data, 0, len(data)) if isinstance(data, bytearray) else \
        char_buffer(bytes(data))
    return addressof(buf), buf


def check(ret: int) -> int:
    """A libc return value: negative is a failure with errno set."""
    if ret < 0:
        err = get_errno()
        import os
        raise OSError(err, os.strerror(err))
    return ret
