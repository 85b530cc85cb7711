"""Count the host reads of a decode: the tensor calls that block the host when the tensor lives on an
accelerator (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()`, `int()`, `float()`, `__index__`,
`.nonzero()`), whatever device the tensors are on, so a CPU run counts what a GPU run would wait for.

    with HostReads() as reads:
        target.generate(ids, assistant_model=drafter, tree_budget=16)
    reads.total, reads.by_kind, reads.sites(5)

A read of a tensor made from host data the same round (bookkeeping that never left the host) is
counted too: the loop keeps such bookkeeping in Python ints instead, so the count is an upper bound.
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.overrides import TorchFunctionMode

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__", "nonzero")
_READ_FUNCS = {getattr(torch.Tensor, name): name for name in READS}
_READ_FUNCS[torch.nonzero] = "nonzero"


class HostReads(TorchFunctionMode):
    """A `TorchFunctionMode` that counts host reads (see the module docstring) while it is active.

    total: reads counted; by_kind: {call name: count}; by_site: {(file, line): count} for frames
    inside hf_ddtree (the first such frame up the stack), so a report can say where they come from.
    """

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_kind: collections.Counter = collections.Counter()
        self.by_site: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _READ_FUNCS.get(func)
        if name is not None:
            self.total += 1
            self.by_kind[name] += 1
            self.by_site[_site()] += 1
        return func(*args, **(kwargs or {}))

    def sites(self, k: int = 10) -> list[tuple[str, int]]:
        """The k sites with the most reads, as ("file:line", count)."""
        return [(f"{f}:{n}", c) for (f, n), c in self.by_site.most_common(k)]


def _site() -> tuple[str, int]:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "hf_ddtree" in path and not path.endswith("host_reads.py"):
            return path.rsplit("hf_ddtree/", 1)[-1], frame.f_lineno
        frame = frame.f_back
    return "<outside>", 0
