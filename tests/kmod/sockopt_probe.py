"""One raw IPT_SO_GET_INFO (or IP6T_SO_GET_INFO) for table "filter", as libiptc's iptc_init()
issues it, printing the syscall's outcome ("ok" or the errno name) and how long it took.

The guest test uses it where the iptables binary would hide the syscall's result: iptables
retries a failed iptc_init() once (do_command4 after xtables_load_ko()), so a helper that died
during the first call is invisible in its exit status.
"""
import ctypes
import errno
import socket
import sys
import time

IPT_SO_GET_INFO = 64
GETINFO_SIZE = 84          # struct ipt_getinfo / ip6t_getinfo

libc = ctypes.CDLL(None, use_errno=True)


def main() -> int:
    family, level = ((socket.AF_INET6, socket.IPPROTO_IPV6) if sys.argv[1:] == ["v6"]
                     else (socket.AF_INET, socket.SOL_IP))
    s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    buf = ctypes.create_string_buffer(b"filter", GETINFO_SIZE)
    length = ctypes.c_uint32(GETINFO_SIZE)
    t0 = time.monotonic()
    rc = libc.getsockopt(s.fileno(), level, IPT_SO_GET_INFO, buf, ctypes.byref(length))
    ms = int((time.monotonic() - t0) * 1000)
    err = ctypes.get_errno()
    print(("ok" if rc == 0 else errno.errorcode.get(err, str(err))), f"{ms}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
