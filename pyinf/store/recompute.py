"""`RecomputeStore` (store="none"): no store; every pass captures the training data again; see
`pyinf.store`."""
from __future__ import annotations

from typing import Iterable

from ..batches import batch_len
from .base import Capture, Store, hash_batch

ORDER_ERROR = (
    "the training data changed order between passes; use a non-shuffled loader or a store "
    "(store='cpu', 'gpu' or 'disk:PATH')"
)


class RecomputeStore(Store):
    """No store: each pass re-runs the capture over the (re-iterable, unshuffled) training data."""

    kind = "none"

    def __init__(self, blocks, device, grad_dtype, progress=None):
        super().__init__(blocks, device, grad_dtype, progress)
        self.capture: Capture | None = None
        self.batches: Iterable | None = None
        self.hashes: list[str] = []
        self.sizes: list[int] = []

    def attach(self, capture: Capture, batches: Iterable) -> None:
        """Keep the capture and the (re-iterable) training batches that every pass runs again."""
        if iter(batches) is batches:
            raise ValueError(
                "store='none' reads the training data once per pass: pass a re-iterable "
                "(a DataLoader, a list of batches), not a one-shot iterator or generator"
            )
        self.capture, self.batches = capture, batches

    def fill(self, capture, batches):
        """One cheap pass without capture: batch sizes (n, chunk_size) and hashes (order check).

        With nan_policy="skip" this pass captures (once) to find the skipped samples.
        """
        self.attach(capture, batches)
        self.hashes, self.sizes, self.skipped = [], [], []
        orig = 0
        skip = self.nan_policy == "skip"
        factors = self.factors is not None
        desc = "capture (K-FAC factors)" if factors else "capture (find NaN/Inf)" if skip else "hash batches"
        with self._batches_bar(batches, desc) as pb, self._accumulating():
            for batch in batches:
                self.hashes.append(hash_batch(batch))
                size = batch_len(batch)
                if skip or factors:
                    _, sk = self._capture(capture, batch, orig)
                    self.skipped += sk
                    self.sizes.append(size - len(sk))
                else:
                    self.sizes.append(size)
                orig += size
                pb.update()
        if not self.sizes:
            raise ValueError("the training data is empty")
        self.n, self.chunk_size = sum(self.sizes), max(1, max(self.sizes))
        if self.n == 0:
            raise ValueError(f"every training sample ({orig}) was skipped for NaN/Inf gradients")
        return self

    def _check_batch(self, i: int, batch) -> None:
        """Batch i of this pass must be batch i of the data given to fill: same data, same order."""
        if i >= len(self.hashes):
            raise ValueError(f"the training data has more batches ({i + 1} or more) than when it was fitted "
                             f"({len(self.hashes)}); pass the same data")
        h = hash_batch(batch)
        if h == self.hashes[i]:
            return
        if h in self.hashes:
            raise ValueError(ORDER_ERROR)
        raise ValueError(f"batch {i} of the training data is not one it was fitted on: pass the same "
                         f"training data (store='none' reads it again on every pass)")

    def _chunks(self, blocks, first=0):  # every pass captures all blocks; `blocks` only filters
        start, orig, count = 0, 0, 0
        for i, batch in enumerate(self.batches):
            self._check_batch(i, batch)
            if start + self.sizes[i] <= first:  # before a resumed pass's first sample: not captured
                start, orig, count = start + self.sizes[i], orig + batch_len(batch), i + 1
                continue
            g, _ = self._capture(self.capture, batch, orig)
            c = next(iter(g.values())).shape[0]
            if c != self.sizes[i]:
                raise ValueError(f"batch {i}: its gradients changed between passes (NaN/Inf in different samples)")
            yield start, {b.name: g[b.name] for b in blocks}
            start, orig, count = start + c, orig + batch_len(batch), i + 1
        if count != len(self.hashes):
            raise ValueError(f"the training data has fewer batches ({count}) than when it was fitted "
                             f"({len(self.hashes)}); pass the same data")

    def state(self):
        return {"kind": self.kind, "hashes": self.hashes, "sizes": self.sizes, "skipped": list(self.skipped),
                "factors": self._factors_state()}

    @classmethod
    def restore(cls, state, blocks, device, grad_dtype, progress=None, capture=None, batches=None, **_):
        """A store over `batches` again (they must be the training data of the fit, in order)."""
        if batches is None:
            raise ValueError("this Attributor was fitted with store='none': pass train_data to Attributor.load")
        self = cls(blocks, device, grad_dtype, progress)
        self.attach(capture, batches)
        self.hashes, self.sizes = list(state["hashes"]), list(state["sizes"])
        self.skipped = list(state.get("skipped", []))
        self.n, self.chunk_size = sum(self.sizes), max(1, max(self.sizes))
        self._restore_factors(state, device)
        return self


