"""The one exception type of bpfilter, and the one place that maps failures to errno.

Every failure the helper can report to an iptables caller is a BpfilterError carrying the errno
the kernel's ip_tables would have returned for the same request, so that the unmodified binary
prints the message users already know (iptables turns EINVAL into "Invalid argument", ELOOP into
"Too many levels of symbolic links", ENOENT on a table into "Table does not exist", ...).
"""
import errno as _errno


class BpfilterError(Exception):
    """A failure with the errno the kernel would return and a message for the log."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err
        self.message = message

    def __str__(self):
        return f"[{_errno.errorcode.get(self.errno, self.errno)}] {self.message}"


def to_errno(exc: BaseException) -> int:
    """Map any exception raised while serving a request to a positive errno.

    BpfilterError carries its own; OSError from a syscall keeps the kernel's; anything else is a
    bug in the helper and is reported as EIO (never crashes the helper, never hangs the caller).
    """
    if isinstance(exc, BpfilterError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, MemoryError):
        return _errno.ENOMEM
    import logging      # here, not at import: every `bpfilter exec` imports this module
    logging.getLogger("bpfilter").exception("internal error while serving a request")
    return _errno.EIO
