"""One raw IPT_SO_GET_INFO (or IP6T_SO_GET_INFO) for table "filter", as libiptc's iptc_init()
issues it, printing the syscall's outcome ("ok" or the errno name) and how long it took.

The guest test uses it where the iptables binary would hide the syscall's result: iptables
retries a failed iptc_init() once (do_command4 after xtables_load_ko()), so a helper that died
during the first call is invisible in its exit status.  `--repeat N` times N calls (the round trip caller -> bpfilter.ko -> helper).
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
    args = sys.argv[1:]
    family, level = ((socket.AF_INET6, socket.IPPROTO_IPV6) if "v6" in args
                     else (socket.AF_INET, socket.SOL_IP))
    repeat = int(args[args.index("--repeat") + 1]) if "--repeat" in args else 1
    s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    buf = ctypes.create_string_buffer(b"filter", GETINFO_SIZE)
    length = ctypes.c_uint32(GETINFO_SIZE)
    t0 = time.monotonic()
    for _ in range(repeat):
        length.value = GETINFO_SIZE
        rc = libc.getsockopt(s.fileno(), level, IPT_SO_GET_INFO, buf, ctypes.byref(length))
        if rc != 0:
            break
    elapsed = time.monotonic() - t0
    err = ctypes.get_errno()
    print(("ok" if rc == 0 else errno.errorcode.get(err, str(err))), f"{int(elapsed * 1000)}ms",
          *([f"{elapsed / repeat * 1e6:.0f}us/request"] if repeat > 1 else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
