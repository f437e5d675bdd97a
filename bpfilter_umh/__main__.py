"""The helper: `python3 -m bpfilter_umh` serves request frames on stdin and answers on stdout (the
channel the kernel shim starts it with); `python3 -m bpfilter_umh --listen` serves the doors of its
own network namespace (`bpfilter exec`) on the abstract unix socket "\\0bpfilter".

Both transports hand each frame to the same Dispatcher, one request at a time: requests are
serialized like the xtables lock serializes the kernel's replace (net/netfilter/x_tables.c
xt_find_table_lock holds xt[af].mutex).  In --listen mode the helper exits once it has had no
client for BPFILTER_IDLE_EXIT seconds (default 5): all state is pinned by the engine, so the next
door simply starts a new helper, and nothing keeps running after a test.
"""
import errno
import logging
import os
import selectors
import socket
import sys
import time

from .errors import BpfilterError
from .frames import REQUEST, Request, read_exact

log = logging.getLogger("bpfilter")
HELPER_SOCKET = b"\0bpfilter"


def serve_stdio(dispatcher) -> int:
    rd = lambda n: os.read(0, n)  # noqa: E731
    while True:
        try:
            buf = read_exact(rd, REQUEST.size)
            if not buf:
                return 0
            req = Request.unpack(buf)
        except BpfilterError as e:
            # a torn or foreign frame: the stream cannot be resynchronized, so stop
            log.error("bad frame on stdin: %s", e)
            return 1
        rep = dispatcher.serve(req)
        data = rep.pack()
        while data:
            data = data[os.write(1, data):]


def serve_listen(dispatcher, idle: float) -> int:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        srv.bind(HELPER_SOCKET)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:     # another helper serves this netns already
            return 0
        raise
    srv.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    clients = 0
    last = time.monotonic()
    log.info("helper %d serving netns cookie %d", os.getpid(), dispatcher.home_cookie)
    while True:
        events = sel.select(timeout=0.5)
        now = time.monotonic()
        if not events:
            if clients == 0 and now - last >= idle:
                srv.close()
                log.info("helper %d idle for %.1fs, exiting", os.getpid(), idle)
                return 0
            continue
        last = now
        for key, _ in events:
            if key.fileobj is srv:
                conn, _addr = srv.accept()
                sel.register(conn, selectors.EVENT_READ)
                clients += 1
                continue
            conn = key.fileobj
            try:
                buf = read_exact(conn.recv, REQUEST.size)
                if buf:
                    conn.sendall(dispatcher.serve(Request.unpack(buf)).pack())
                    continue
            except (OSError, BpfilterError) as e:
                log.warning("dropping a door connection: %s", e)
            sel.unregister(conn)
            conn.close()
            clients -= 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("BPFILTER_LOG", "INFO"),
                        format="bpfilter[%(process)d] %(levelname)s %(message)s")
    from .sockopt import Dispatcher
    dispatcher = Dispatcher()
    if argv[:1] == ["--listen"]:
        return serve_listen(dispatcher, float(os.environ.get("BPFILTER_IDLE_EXIT", "5")))
    if argv:
        print("usage: python3 -m bpfilter_umh [--listen]", file=sys.stderr)
        return 2
    return serve_stdio(dispatcher)


if __name__ == "__main__":
    sys.exit(main())
