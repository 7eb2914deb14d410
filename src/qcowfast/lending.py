"""What a batch gives the conversions it runs: cores to lend them, and a way to stop waiting.

convert() makes a Threads the LENDER of the conversion it runs (a context variable, so that it
holds for the thread running the conversion); its pools consult it as they submit units
(convert._run_units). convert_many gives each job a share that grows, once no job waits to
start, into the cores that idle job slots leave (fleet._Cores).

INTERRUPTED is the batch's check for a job that waits on something outside it (a FIFO
destination without a reader): called between short waits, it raises once the batch has been
interrupted. Outside a batch the wait is an ordinary blocking call, which signals interrupt.
"""
from __future__ import annotations

from contextvars import ContextVar

LENDER: ContextVar = ContextVar("qcowfast_lender", default=None)
INTERRUPTED: ContextVar = ContextVar("qcowfast_interrupted", default=None)


class Threads:
    """A conversion's worker threads: threads() is how many it may run now, `peak` the most its
    pools started, `refused` whether the system refused one (a memory limit)."""
    __slots__ = ("base", "peak", "refused")

    def __init__(self, base: int):
        self.base, self.peak, self.refused = base, 0, False

    def threads(self) -> int:
        return self.base

    def used(self, threads: int) -> int:
        """What ConvertResult.threads reports for a conversion given `threads`."""
        return self.peak if self.refused else max(threads, self.peak)


class Share(Threads):
    """One job's share of a batch's cores: its `base` while jobs wait to start, then the
    cores divided among the jobs still running (`cores`: the batch's fleet._Cores)."""
    __slots__ = ("cores",)

    def __init__(self, cores):
        super().__init__(cores.base)
        self.cores = cores

    def threads(self) -> int:
        c = self.cores
        if not c.pending.empty():
            return c.base
        return max(c.base, c.cores // max(1, c.running))
