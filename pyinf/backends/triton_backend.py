"""The Triton backend: the fused primitives as GPU kernels (`pyinf.kernels`).

Chosen by `backend="auto"` for CUDA tensors when triton is importable. Each
primitive launches the kernels of one op file in `kernels/` (see their
headers for the tiling, the reductions and the precision modes):

| primitive            | kernel(s)                                   | reads of G |
|----------------------|---------------------------------------------|------------|
| sq_norms             | norms_dots (norms only)                     | 1          |
| norms_and_dots, dots | norms_dots                                  | 1          |
| score                | norms_dots with SIGN = −1 (score.py)        | 1          |
| weighted_sum         | rank_one_accumulate's second stage          | 1          |
| rank_one_accumulate  | dots, then the fused (P·w) G + acc stage    | 2          |
| gram, gfim           | gram.py, gfim.py (batched over blocks)      | –          |
| spd_inverse          | Cholesky (torch/cuSOLVER) or schulz.py      | –          |

Gradients stay in their stored dtype (float32, bfloat16, float16): tiles are
converted to fp32 in registers, never upcast in memory; every accumulation is
fp32. Query-side operands are float32, or float64 for the float64-accumulating
calls of `base.py` (float64 V / H / C, `gram` / `gfim` with
`dtype=torch.float64`): the same kernels then convert the tiles to fp64 in
registers and accumulate in fp64 (MODE 3 of `kernels/_dot.py`, DMMA).

Fallbacks to the torch reference (documented, deliberate):
  * float64 gradients (a validation setting, not a performance one), and
    `rank_one_accumulate` with float64 operands (no method needs it);
  * CPU tensors when TRITON_INTERPRET is not set (Triton needs a GPU; the CPU
    tests run the kernels under the interpreter).

`spd_inverse(solver="auto")` is batched float64 Cholesky on the device, in
groups of blocks sized to the free memory: on an H100 at 160 blocks of 5120²
it was ~70× faster than 60 fp32 Schulz steps and more accurate (1e-4 vs 5e-4).
`solver="schulz"` forces the Triton Schulz kernels (fp32, then a float64
refinement; see `kernels/schulz.py`).
"""
from __future__ import annotations

import torch

from .base import Backend
from .torch_backend import TorchBackend, cholesky_inverse

SOLVERS = ("auto", "schulz", "cholesky")
#: Schulz precision for `tl.dot` ("ieee" default, "tf32x3" to experiment; see kernels/schulz.py).
SCHULZ_PRECISION = "ieee"


def _kernels():
    """The kernel modules, imported on first use (importing triton is slow)."""
    from pyinf.kernels import gfim, gram, norms_dots, rank_one_accumulate, schulz, score

    return gfim, gram, norms_dots, rank_one_accumulate, schulz, score


def _interpreting() -> bool:
    from pyinf.kernels import _util

    return _util.interpreting()


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        self._ref = TorchBackend()
        (self._gfim, self._gram, self._nd, self._r1, self._schulz, self._score) = _kernels()

    # -- dispatch helpers ------------------------------------------------
    @staticmethod
    def _use_ref(G: torch.Tensor, *others: torch.Tensor) -> bool:
        """float64 gradients, or a tensor Triton cannot reach (CPU without the interpreter)."""
        if G.dtype == torch.float64 or any(o.dtype == torch.float64 for o in others):
            return True
        return G.device.type != "cuda" and not _interpreting()

    @staticmethod
    def _q(t: torch.Tensor) -> torch.Tensor:
        """A query-side operand for the kernels: float64 stays (fp64 accumulation), the rest fp32."""
        return t.contiguous() if t.dtype == torch.float64 else t.to(torch.float32).contiguous()

    # -- primitives ------------------------------------------------------
    def sq_norms(self, G):
        if self._use_ref(G):
            return self._ref.sq_norms(G)
        return self._nd.sq_norms(G.contiguous())

    def dots(self, G, V):
        if self._use_ref(G):
            return self._ref.dots(G, V)
        return self._nd.dots(G.contiguous(), self._q(V))

    def norms_and_dots(self, G, V):
        if self._use_ref(G):
            return self._ref.norms_and_dots(G, V)
        return self._nd.norms_dots(G.contiguous(), self._q(V))

    def weighted_sum(self, C, G):
        if self._use_ref(G):
            return self._ref.weighted_sum(C, G)
        return self._r1.weighted_sum(self._q(C), G.contiguous())

    def rank_one_accumulate(self, acc, G, V, w):
        if self._use_ref(G, acc, V, w):
            return self._ref.rank_one_accumulate(acc, G, V, w)
        if acc.dtype == torch.float32 and acc.is_contiguous():
            self._r1.rank_one_accumulate(acc, G.contiguous(), self._q(V), self._q(w))
        else:
            tmp = self._q(acc)
            self._r1.rank_one_accumulate(tmp, G.contiguous(), self._q(V), self._q(w))
            acc.copy_(tmp)

    def gram(self, G1, G2, dtype=None):
        if self._use_ref(G1, G2):
            return self._ref.gram(G1, G2, dtype)
        return self._gram.gram(G1.contiguous(), G2.contiguous(), dtype=dtype or torch.float32)

    def gfim(self, G, dtype=None):
        if self._use_ref(G):
            return self._ref.gfim(G, dtype)
        return self._gfim.gfim(G.contiguous(), dtype=dtype or torch.float32)

    def score(self, H, G):
        if self._use_ref(G):
            return self._ref.score(H, G)
        return self._score.score(self._q(H), G.contiguous())

    def spd_inverse(self, A, *, iterations, tol, solver="auto"):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        b, k, _ = A.shape
        if solver in ("auto", "cholesky"):
            out = cholesky_inverse(A, group=_group_size(b, k, A.device, bytes_per_entry=4 * 8))
            if out is not None:
                return out
        if A.device.type != "cuda" and not _interpreting():
            return self._ref.spd_inverse(A, iterations=iterations, tol=tol, solver="schulz")
        return self._schulz.schulz_inverse(A, iterations, tol, precision=SCHULZ_PRECISION)


def _group_size(b: int, k: int, device: torch.device, bytes_per_entry: int) -> int:
    """Blocks per group so that the temporaries fit in 70 % of the free device memory."""
    if device.type != "cuda":
        return b
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(b, int(0.7 * free) // (bytes_per_entry * k * k)))
