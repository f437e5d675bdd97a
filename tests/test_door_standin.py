"""An in-memory stand-in of the engine interface (Engine.open/table/counters/counters_nonzero/
install/add_counters), selected with BPFILTER_ENGINE=test_door_standin:MemoryEngine, for
exercising the control plane alone.  The real tests use the real engine (counters from BPF
maps); this module holds no tests of its own."""
from bpfilter_umh.model import Table


class MemoryEngine:
    @classmethod
    def open(cls, family):
        e = cls()
        e.install(Table.empty("filter", family))
        return e

    def install(self, table):
        old = getattr(self, "_counters", [])
        self.table = table
        self._counters = [(0, 0)] * table.num_entries
        return old

    def counters(self):
        return list(self._counters)

    def counters_nonzero(self):
        return {i: c for i, c in enumerate(self._counters) if c != (0, 0)}

    def add_counters(self, counters, packed=None):
        """packed (the request's xt_counters array, which the real engine stores as it is)
        holds the same counters: the stand-in keeps its list."""
        self._counters = [(a + c, b + d) for (a, b), (c, d) in zip(self._counters, counters)]
