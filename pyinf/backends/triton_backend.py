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
fp32. Query-side operands are float32.

Groups of b same-shape blocks (`base.py`): every primitive serves the whole
group with the launches of the table above, the same count as for one block
(the block index is a grid axis; the block strides are kernel arguments), so
a group that is a view of a bigger chunk (block stride > c·D) is not copied.
`score` sums over the blocks inside the kernel (the blocks are more of its
reduction), so no (b, m, c) intermediate is made.

Fallbacks to the torch reference (documented, deliberate):
  * float64 anywhere: float64 gradients (a validation setting), and the
    float64-accumulating calls of `base.py` (float64 V / H / C, `gram` / `gfim`
    with `dtype=torch.float64`: exact's Gram and dots, hyperinf's GFIM, float64
    H scored), which the reference runs as cuBLAS DGEMMs on a float64 copy of
    one chunk. A fused path (fp64 tiles and accumulator in these kernels, G
    read once) works under the interpreter and compiles for sm_90 with Triton
    3.9, but Triton 3.6 (the GPU machines') fails to lower bf16 -> fp64 tiles
    and spills in the fp32 configs, so it is not used (issue 12 follow-up).
    Cost of the fallback on an H100 / H200 (reasoning, not measured): the
    dots read G once in fp32 and write / read the fp64 copy (~5× the bytes
    of fp32 G), and stay memory-bound (2m flops per element against ~67
    TFLOP/s of fp64 tensor cores); the Gram and the GFIM are compute-bound
    GEMMs, ~2.5× slower in fp64 than with tf32x3;
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
from .dense import schulz_inverse, spd_inverse
from .torch_backend import TorchBackend

#: Schulz precision for `tl.dot` ("ieee" default, "tf32x3" to experiment; see kernels/schulz.py).
SCHULZ_PRECISION = "ieee"


def _kernels():
    """The kernel modules, imported on first use (importing triton is slow)."""
    from pyinf.kernels import gfim, gram, norms_dots, rank_one_accumulate, schulz, score

    return gfim, gram, norms_dots, rank_one_accumulate, schulz, score


def _interpreting() -> bool:
    from pyinf.kernels import _util

    return _util.interpreting()


def _rows_contiguous(t: torch.Tensor) -> bool:
    from pyinf.kernels import _util

    return _util.rows_contiguous(t)


class TritonBackend(Backend):
    """The Triton kernels on CUDA tensors (module doc: which primitive takes which kernel, and the float64 paths)."""
    name = "triton"

    def __init__(self):
        self._ref = TorchBackend()
        (self._gfim, self._gram, self._nd, self._r1, self._schulz, self._score) = _kernels()

    # -- dispatch helpers ------------------------------------------------
    def _use_ref(self, *ts: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
        if dtype == torch.float64 or any(t.dtype == torch.float64 for t in ts):
            return True
        dev = ts[0].device
        return dev.type != "cuda" and not _interpreting()

    @staticmethod
    def _f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).contiguous()

    @staticmethod
    def _blocks(G: torch.Tensor) -> torch.Tensor:
        """G as the kernels take it: each block row-major; a group's block stride is kept (no copy of a view)."""
        return G if _rows_contiguous(G) else G.contiguous()

    # -- primitives ------------------------------------------------------
    def sq_norms(self, G):
        if self._use_ref(G):
            return self._ref.sq_norms(G)
        return self._nd.sq_norms(self._blocks(G))

    def dots(self, G, V):
        if self._use_ref(G, V):
            return self._ref.dots(G, V)
        return self._nd.dots(self._blocks(G), self._f32(V))

    def norms_and_dots(self, G, V):
        if self._use_ref(G, V):
            return self._ref.norms_and_dots(G, V)
        return self._nd.norms_dots(self._blocks(G), self._f32(V))

    def weighted_sum(self, C, G):
        if self._use_ref(C, G):
            return self._ref.weighted_sum(C, G)
        return self._r1.weighted_sum(self._f32(C), self._blocks(G))

    def rank_one_accumulate(self, acc, G, V, w):
        if self._use_ref(acc, G, V, w):
            return self._ref.rank_one_accumulate(acc, G, V, w)
        G, V, w = self._blocks(G), self._f32(V), self._f32(w)
        if acc.dtype == torch.float32 and _rows_contiguous(acc) and (acc.dim() == 2 or acc.shape[0] == 1
                                                                      or acc.stride(0) >= acc[0].numel()):
            self._r1.rank_one_accumulate(acc, G, V, w)
        else:
            tmp = self._f32(acc)
            self._r1.rank_one_accumulate(tmp, G, V, w)
            acc.copy_(tmp)

    def gram(self, G1, G2, dtype=None):
        if self._use_ref(G1, G2, dtype=dtype):
            return self._ref.gram(G1, G2, dtype)
        return self._gram.gram(G1.contiguous(), G2.contiguous())

    def gfim(self, G, dtype=None, out=None):
        if self._use_ref(G, dtype=dtype if out is None else out.dtype):
            return self._ref.gfim(G, dtype, out)
        F = self._gfim.gfim(G.contiguous())
        return F if out is None else out.add_(F)

    def score(self, H, G):
        if self._use_ref(H, G):
            return self._ref.score(H, G)
        return self._score.score(self._f32(H), self._blocks(G))

    def spd_inverse(self, A, *, iterations, tol, solver="auto", out=None):
        b, k, _ = A.shape
        group = _group_size(b, k, A.device, bytes_per_entry=(2 if out is not None else 3) * 8)  # [A,] L, X

        def schulz(part, it, tol_):
            if part.device.type != "cuda" and not _interpreting():
                return schulz_inverse(part, it, tol_)
            return self._schulz.schulz_inverse(part, it, tol_, precision=SCHULZ_PRECISION)

        return spd_inverse(A, iterations=iterations, tol=tol, solver=solver, group=group, out=out, schulz=schulz)


def _group_size(b: int, k: int, device: torch.device, bytes_per_entry: int) -> int:
    """Blocks per group so that the temporaries fit in 70 % of the free device memory."""
    if device.type != "cuda":
        return b
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(b, int(0.7 * free) // (bytes_per_entry * k * k)))
