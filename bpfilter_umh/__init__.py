"""bpfilter: the unmodified iptables binaries programming the kernel's eBPF machinery."""
from .errors import BpfilterError
from .model import Chain, Rule, Table

__all__ = ["BpfilterError", "Chain", "Rule", "Table"]
