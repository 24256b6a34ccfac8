"""Kronecker factors: the token-level statistics of K-FAC and EK-FAC, accumulated by the capture.

A matrix block's per-sample gradient is a sum over tokens of outer products,
`g_i = Σ_t p_t q_tᵀ` (rows × cols), with the two factors the capture already
holds (`pyinf.capture`):

| block | p_t (rows side) | q_t (cols side) |
|---|---|---|
| LoRA A `(r, d_in)` | s·Bᵀδ_t, the output gradient of `lora_A` | x_t, its input |
| LoRA Bᵀ `(r, d_out)` | A x_t, the input of `lora_B` | s·δ_t, its output gradient |
| `nn.Linear` weight `(out, in)` | δ_t | x_t |
| Conv1D weight `(in, out)` | x_t | δ_t |
| bias `(1, out)` | 1 | δ_t |

`FactorStats` keeps, per block, the sums over every training token
`R = Σ_t p_t p_tᵀ` (rows × rows), `C = Σ_t q_t q_tᵀ` (cols × cols) and the
token count N: each batch's products in float32, added into float64 totals
(packed symmetric pairs, `pyinf.backends.dense.packed_pairs`: at the 13B LoRA shape, 160 blocks of
8 × 5120, 16.8 GB). Tokens are the positions with `attention_mask != 0` when
the batch has a `(B, T)` mask (a pad's input would otherwise weigh in the
input covariance; a pad's δ is zero for the default losses), all positions
otherwise. Embedding blocks have no factors (N stays 0; the methods refuse them).

The K-FAC curvature of a block is then `F_b ≈ (R / N) ⊗ (C / n)` for n
samples: the empirical Fisher `(1/n) Σ_i vec(g_i) vec(g_i)ᵀ` of the other
methods with the cross-token terms dropped and p, q taken independent
(`Σ_t p_t p_tᵀ ⊗ q_t q_tᵀ ≈ N · E_t[p pᵀ] ⊗ E_t[q qᵀ]`).

`fisher`: "empirical" (the training labels, default) or "true" (labels
sampled from the model, seeded: `pyinf.losses.sample_labels`); which one the
statistics hold is recorded and checked by the methods.

The capture adds into a `FactorStats` only while `active` (the store turns it
on while it fills; query captures and recomputed passes never add).
"""
from __future__ import annotations

import numpy as np
import torch

from .blocks import Block, group_blocks, group_order
from .backends.dense import pack, packed_pairs, unpack
from .methods.kfac import FISHERS


class FactorStats:
    """Per-block token sums R, C and token counts N, float64, on `device`; see the module docstring."""

    def __init__(self, blocks: list[Block], device, fisher: str = "empirical", seed: int = 0):
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        self.blocks = group_order(list(blocks))
        self.groups = group_blocks(self.blocks)
        self.device = torch.device(device)
        self.fisher, self.seed = fisher, int(seed)
        self.rows = [packed_pairs(len(g.names), g.rows, self.device) for g in self.groups]
        self.cols = [packed_pairs(len(g.names), g.cols, self.device) for g in self.groups]
        self.tokens = [torch.zeros(len(g.names), dtype=torch.float64, device=self.device) for g in self.groups]
        self.index = {name: (gi, k) for gi, g in enumerate(self.groups) for k, name in enumerate(g.names)}
        self.active = False

    # -- accumulation (the capture's hooks) --------------------------------
    def add(self, name: str, p: torch.Tensor | None, q: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Add one use's tokens: p (B, T, rows) or None (a bias: p_t = 1), q (B, T, cols), keep (B, T) bool or None."""
        gi, k = self.index[name]
        dtype = torch.promote_types(q.dtype, torch.float32)  # a batch's products in float32 (float64 stays)
        w = None if keep is None else keep.reshape(-1, 1).to(dtype)
        q2 = q.reshape(-1, q.shape[-1]).to(dtype)
        q2 = q2 if w is None else q2 * w
        count = torch.tensor(float(q2.shape[0]), dtype=torch.float64, device=q2.device) if w is None else w.sum().double()
        pack(self.cols[gi], k, (q2.mT @ q2).double())
        if p is None:
            pack(self.rows[gi], k, count.view(1, 1).to(self.device))
        else:
            p2 = p.reshape(-1, p.shape[-1]).to(dtype)
            p2 = p2 if w is None else p2 * w
            pack(self.rows[gi], k, (p2.mT @ p2).double())
        self.tokens[gi][k] += count.to(self.device)

    # -- reading (the methods) ---------------------------------------------
    def sums(self, gi: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocks lo..hi-1 of group gi: R (s, rows, rows), C (s, cols, cols), N (s,), float64, whole matrices."""
        R = torch.stack([unpack(self.rows[gi], k) for k in range(lo, hi)])
        C = torch.stack([unpack(self.cols[gi], k) for k in range(lo, hi)])
        return R, C, self.tokens[gi][lo:hi].clone()

    def missing(self) -> list[str]:
        """Blocks without any token (embeddings, or blocks the data never reached)."""
        return [name for name, (gi, k) in self.index.items() if float(self.tokens[gi][k]) == 0.0]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed triangles on disk (`triangles`)."""
        return sum(8 * (b.rows * (b.rows + 1) + b.cols * (b.cols + 1)) // 2 for b in self.blocks)

    # -- persistence -------------------------------------------------------
    def triangles(self):
        """The disk layout (`pyinf.store`): per block in storage order, the upper triangles (row by row,
        diagonal included) of R then C, as little-endian float64 numpy buffers."""
        for gi, g in enumerate(self.groups):
            for side, k in ((s, k) for k in range(len(g.names)) for s in (self.rows[gi], self.cols[gi])):
                X = unpack(side, k)
                iu = torch.triu_indices(X.shape[0], X.shape[0], device=X.device)
                yield X[iu[0], iu[1]].cpu().numpy().astype("<f8", copy=False)

    def load_triangles(self, raw: np.ndarray, tokens: dict[str, float]) -> None:
        """Set the sums from the bytes `triangles` wrote (uint8 array) and the token counts."""
        vals = torch.from_numpy(np.frombuffer(raw, dtype="<f8").copy())
        off = 0
        for gi, g in enumerate(self.groups):
            self.rows[gi].zero_()
            self.cols[gi].zero_()
            for k, name in enumerate(g.names):
                for side, dim in ((self.rows[gi], g.rows), (self.cols[gi], g.cols)):
                    size = dim * (dim + 1) // 2
                    iu = torch.triu_indices(dim, dim)
                    X = torch.zeros(dim, dim, dtype=torch.float64)
                    X[iu[0], iu[1]] = vals[off : off + size]
                    pack(side, k, (X + X.triu(1).mT).to(self.device))
                    off += size
                self.tokens[gi][k] = float(tokens[name])
        if off != vals.numel():
            raise ValueError(f"the factors file holds {vals.numel()} values, the blocks need {off}")

    def token_counts(self) -> dict[str, float]:
        """{block: the number of tokens its statistics summed over}."""
        return {name: float(self.tokens[gi][k]) for name, (gi, k) in self.index.items()}

    def state(self) -> dict:
        """CPU tensors for `Attributor.save` (`from_state` inverts it)."""
        return {"blocks": [(b.name, b.rows, b.cols) for b in self.blocks], "fisher": self.fisher, "seed": self.seed,
                "rows": [s.cpu() for s in self.rows], "cols": [s.cpu() for s in self.cols],
                "tokens": [t.cpu() for t in self.tokens]}

    @classmethod
    def from_state(cls, state: dict, device) -> "FactorStats":
        """The statistics `state()` saved, on `device`."""
        self = cls([Block(*b) for b in state["blocks"]], device, state["fisher"], state["seed"])
        for dst, src in zip(self.rows + self.cols + self.tokens, state["rows"] + state["cols"] + state["tokens"]):
            dst.copy_(src)
        return self
