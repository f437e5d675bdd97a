"""bpfilter: the unmodified iptables binaries programming the kernel's eBPF machinery.

Imports are lazy (PEP 562) so that `bpfilter exec`, which runs once per iptables command, does not
pay for construct and the model it never uses.
"""
__all__ = ["BpfilterError", "Chain", "Rule", "Table"]


def __getattr__(name):
    if name == "BpfilterError":
        from .errors import BpfilterError
        return BpfilterError
    if name in ("Chain", "Rule", "Table"):
        from . import model
        return getattr(model, name)
    raise AttributeError(name)
