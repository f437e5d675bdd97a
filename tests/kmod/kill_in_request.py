"""Run a command that sends the helper a request, and kill the helper while it works on it.

usage: kill_in_request.py REPORT HELPER_PID CMD [ARG...] < FILE

CMD inherits stdin (a regular file), stdout and stderr; the exit status is CMD's.  REPORT
gets one line: "inside"/"outside"/"missed", how many ms after CMD's start the helper was
stopped, and CMD's exit status and duration.

"Working" means: CMD has read its input to the end (so the request is the last one, the
COMMIT's SET_REPLACE, not iptc_init's GET_INFO/GET_ENTRIES), sleeps in bpfilter.ko's
helper_recv (its request is sent, no reply yet) and the helper's end of the channel (its fd 0,
an AF_UNIX stream socket) holds no unread byte, so the whole request has been read.  Once seen
working, the helper is stopped (SIGSTOP) and looked at again 0.2 s later: still working means
the stop landed inside the request, since a reply sent before the stop would have woken CMD,
which then leaves helper_recv or sends its next request (SET_ADD_COUNTERS) that the stopped
helper leaves unread.  Then it is killed.

Why a program and not a shell loop: in the guest (qemu without KVM) a turn of grep/ss polls
took longer than a fast helper takes for a 4000-rule SET_REPLACE, and so does the start of a
Python interpreter, so this one starts first and runs CMD itself, then polls every millisecond.
The unread count comes from FIONREAD on a copy of the helper's fd 0 (pidfd_getfd(2), Linux
5.6), closed at once: the copy never keeps the channel open after the helper dies.
"""
import ctypes
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time

NR_PIDFD_GETFD = 438
FIONREAD = 0x541B
TIMEOUT_S = 60

libc = ctypes.CDLL(None, use_errno=True)


def waiting_for_reply(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() == "helper_recv"
    except OSError:
        return False


def unread(helper_pidfd: int) -> int:
    fd = libc.syscall(NR_PIDFD_GETFD, helper_pidfd, 0, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd of the helper's fd 0")
    try:
        return struct.unpack("i", fcntl.ioctl(fd, FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(fd)


def input_read() -> bool:
    # CMD's stdin is this process's: one open file, one offset, which CMD's reads move
    return os.lseek(0, 0, os.SEEK_CUR) == os.fstat(0).st_size


def working(pid: int, helper_pidfd: int) -> bool:
    return input_read() and waiting_for_reply(pid) and unread(helper_pidfd) == 0


def stop_inside(cmd: subprocess.Popen, t0: float, helper: int, pidfd: int) -> str:
    while not working(cmd.pid, pidfd):
        if cmd.poll() is not None:
            return "missed (CMD ended first)"
        if time.monotonic() - t0 > TIMEOUT_S:
            return f"missed (not seen working within {TIMEOUT_S} s)"
        time.sleep(0.001)
    os.kill(helper, signal.SIGSTOP)
    ms = int((time.monotonic() - t0) * 1000)
    time.sleep(0.2)
    return f"{'inside' if working(cmd.pid, pidfd) else 'outside'}, stopped at {ms} ms"


def main() -> int:
    report, helper, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    pidfd = os.pidfd_open(helper)
    t0 = time.monotonic()
    cmd = subprocess.Popen(argv)
    try:
        outcome = stop_inside(cmd, t0, helper, pidfd)
    finally:
        os.close(pidfd)
        os.kill(helper, signal.SIGKILL)
    rc = cmd.wait()
    ms = int((time.monotonic() - t0) * 1000)
    with open(report, "w") as f:
        f.write(f"{outcome}; rc {rc} after {ms} ms\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
