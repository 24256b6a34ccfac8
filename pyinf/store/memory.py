"""`MemoryStore` (store="gpu" or "cpu"): fixed-size slabs of `chunk_size` samples in device or host
memory; see `pyinf.store`."""
from __future__ import annotations

import torch

from ..blocks import group_blocks
from .base import Store, chunk_to_device, default_chunk_size


class MemoryStore(Store):
    """Gradients in slabs of `chunk_size` samples on `storage` (a device, or pinned host memory)."""

    kind = "memory"

    def __init__(self, blocks, device, grad_dtype, storage, chunk_size=None, progress=None):
        super().__init__(blocks, device, grad_dtype, progress)
        self.storage = torch.device(storage)
        self.chunk_size = int(chunk_size or default_chunk_size(self.blocks, grad_dtype))
        self._pin = self.storage.type == "cpu" and torch.cuda.is_available()
        # A side stream copies chunk i+1 to the device while chunk i is used.
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.storage.type == "cpu" else None
        self._slabs: list[dict[str, torch.Tensor]] = []

    def _new_slab(self) -> dict[str, torch.Tensor]:
        """One slab: an array (b, chunk_size, rows, cols) per group, handed out as per-block views."""
        slab = {}
        for g in group_blocks(self.blocks):
            buf = torch.empty(len(g.names), self.chunk_size, g.rows, g.cols, dtype=self.grad_dtype,
                              device=self.storage, pin_memory=self._pin)
            slab.update({name: buf[k] for k, name in enumerate(g.names)})
        return slab

    def fill(self, capture, batches):
        self._slabs, n, self.skipped = [], 0, []
        with self._batches_bar(batches) as pb, self._accumulating():
            for batch in batches:
                g, skipped = self._capture(capture, batch, n + len(self.skipped))
                self.skipped += skipped
                c, pos = next(iter(g.values())).shape[0], 0
                while pos < c:  # a batch may straddle two slabs
                    slab, off = divmod(n, self.chunk_size)
                    if slab == len(self._slabs):
                        self._slabs.append(self._new_slab())
                    take = min(c - pos, self.chunk_size - off)
                    for name, t in g.items():
                        self._slabs[slab][name][off : off + take].copy_(t[pos : pos + take])
                    pos, n = pos + take, n + take
                pb.update()
        if n == 0:
            raise ValueError("the training data is empty" if not self.skipped else
                             f"every training sample ({len(self.skipped)}) was skipped for NaN/Inf gradients")
        self.n = n
        return self

    def _views(self, blocks, first=0):
        for i in range(first // self.chunk_size, len(self._slabs)):
            start, slab = i * self.chunk_size, self._slabs[i]
            c = min(self.chunk_size, self.n - start)
            yield start, {b.name: slab[b.name][:c] for b in blocks}

    def _chunks(self, blocks, first=0):
        if self._stream is None:  # views (same device), or plain copies
            for start, views in self._views(blocks, first):
                yield start, chunk_to_device(views, blocks, self.device)
            return
        main = torch.cuda.current_stream(self.device)

        def load(views):
            with torch.cuda.stream(self._stream):
                out = chunk_to_device(views, blocks, self.device, non_blocking=True)
            return out, self._stream.record_event()

        views = list(self._views(blocks, first))
        if not views:
            return
        nxt = load(views[0][1])
        for i, (start, _) in enumerate(views):
            cur, ready = nxt
            main.wait_event(ready)
            for t in cur.values():  # allocated on the side stream, used on the main one
                t.record_stream(main)
            if i + 1 < len(views):
                nxt = load(views[i + 1][1])
            yield start, cur

    def state(self):
        return {
            "kind": self.kind,
            "storage": self.storage.type,
            "n": self.n,
            "chunk_size": self.chunk_size,
            "slabs": [{name: t.cpu() for name, t in slab.items()} for slab in self._slabs],
            "skipped": list(self.skipped),
            "factors": self._factors_state(),
        }

    @classmethod
    def restore(cls, state, blocks, device, grad_dtype, progress=None, **_):
        """The store `state()` saved (its slabs), on `device`."""
        storage = device if state["storage"] == "cuda" else torch.device("cpu")
        self = cls(blocks, device, grad_dtype, storage, state["chunk_size"], progress)
        self.n = state["n"]
        self.skipped = list(state.get("skipped", []))
        self._restore_factors(state, device)
        for saved in state["slabs"]:
            slab = self._new_slab()
            for name, t in slab.items():
                t.copy_(saved[name])
            self._slabs.append(slab)
        return self


