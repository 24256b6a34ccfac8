"""Cases shared by test_distributed.py (one process) and dist_worker.py (each gloo rank).

70 training samples in 9 batches of 8 (the last 6): rank 0 of 2 gets batches 0-3
(32 samples, 4 chunks of 8), rank 1 batches 4-8 (38 samples, 5 chunks): uneven
shards. The tiny Llama's LoRA blocks have D_b = 128, 128, 128 and 64 (v_proj B),
so with n = 70 "exact" runs both regimes at once: v_proj B primal (D_b <= n),
the others Woodbury.
"""
from __future__ import annotations

import torch

from tiny_models import make_batch

N, BATCH, CHUNK = 70, 8, 8
METHODS = ["tracin", "datainf", "exact", "lissa", "hyperinf"]
OPTIONS = {"lissa": {"iterations": 4, "scale": 1e3}, "forward": {"lr": 1e-2}}
CASES = [(m, s) for m in METHODS for s in ("cpu", "disk")] + [("datainf", "none"), ("exact", "none"), ("forward", "cpu")]
CASES += [("kfac", "cpu"), ("ekfac", "disk")]  # K-FAC statistics summed over the ranks
POISON = {1: 0, 6: 2}  # batch -> sample made NaN in the nan_policy="skip" case: global samples 8 and 50
SKIPPED = [8, 50]


def train():
    return [make_batch("llama", B=min(BATCH, N - i), T=8, seed=i) for i in range(0, N, BATCH)]


def queries():
    return [make_batch("llama", B=3, T=8, seed=500), make_batch("llama", B=2, T=8, seed=501)]


def run_case(model, method, store, tmp, distributed, **kw):
    from pyinf import Attributor

    spec = f"disk:{tmp}/{method}" if store == "disk" else store
    att = Attributor(model, method=method, store=spec, chunk_size=CHUNK, progress=False, distributed=distributed,
                     **OPTIONS.get(method, {}), **kw)
    att.fit(train())
    out = {"scores": att.score(queries()), "n": att.n, "skipped": att.skipped}
    if method != "forward" and store == "cpu":
        out["self"] = att.self_influence()
        out["top"] = att.score(queries(), top_k=3)
    return out


def poisoning(gradients_mod, monkeypatch_setattr):
    """Make the capture return NaN for the POISON samples (matched by the batch's tokens)."""
    from pyinf.capture import GradientCapture

    batches = train()

    def make(model, blocks, loss):
        cap = GradientCapture(model, blocks=blocks, loss=loss)
        call = cap.__call__

        class Poisoned:
            def __init__(self):
                self.blocks = cap.blocks
                self.close = cap.close

            def __call__(self, batch):
                g = call(batch)
                for b, i in POISON.items():
                    ids = batch["input_ids"].cpu()
                    if ids.shape == batches[b]["input_ids"].shape and torch.equal(ids, batches[b]["input_ids"]):
                        g[cap.blocks[1].name][i, 0, 0] = float("nan")
                return g

        return Poisoned()

    monkeypatch_setattr(gradients_mod, "_make_capture", make)
