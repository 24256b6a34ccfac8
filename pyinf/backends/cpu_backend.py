"""`backend="cpu"`: the C++ kernels of `pyinf._C` on CPU tensors.

`CPUBackend` subclasses the torch reference and overrides what C++ does
better: the streaming passes that read each training gradient once and are
bound by memory (or by FMAs at m ≈ 8 queries), with bf16 storage converted on
the fly instead of materialising an fp32 copy of every chunk, which is what
the reference does before calling BLAS. Where a dense GEMM is the whole job,
PyTorch's own BLAS is the faster tool and is kept.

Path of each primitive (fp32 or bf16 G, fp32 query-side operands; one block
or a group, see below):

=====================  ==========================================================
primitive              path
=====================  ==========================================================
sq_norms               C++ `norms_and_dots` with m = 0 (one read of G)
norms_and_dots         C++ `norms_and_dots` (one read of G, norms + all dots)
dots                   C++ `dots` (4 rows × 2 queries register blocking); torch
                       BLAS when m > ``MAX_STREAM_M`` (compute-bound GEMM)
score                  C++ `dots` with alpha = −1; same switch as dots
rank_one_accumulate    C++ fused pass: per block of 4 rows, dots then axpy while
                       the rows are hot in L2 (G read from memory once);
                       torch when m > ``MAX_STREAM_M``
weighted_sum           C++ (the axpy half of rank_one); torch when m > ``MAX_STREAM_M``
gram                   C++ `dots` when one side has ≤ ``MAX_STREAM_M`` rows
                       (a streaming pass); otherwise torch BLAS (a GEMM)
gfim                   torch BLAS: Σ g_iᵀ g_i is a syrk with K = c·rows, a
                       compute-bound GEMM (cols² flops per element read)
spd_inverse            torch (float64 Cholesky / Schulz: dense LAPACK/BLAS)
=====================  ==========================================================

Fallbacks to the torch reference, per call: float64 anywhere, including the
float64-accumulating calls of `base.py` (a float64 query-side operand, `gram`
/ `gfim` with `dtype=torch.float64`: exact's and hyperinf's; the C++ kernels
accumulate in float32, and there the reference upcasts one chunk at a time and
runs a float64 BLAS GEMM), float16 storage (no fp16 kernels), query-side
operands that are not float32, tensors not on the CPU. Inputs are handed to C++
as zero-copy numpy views (`tensor.numpy()`, bf16 as `view(torch.int16)`), so a
tensor made by `torch.from_numpy(np.memmap(...))` is read straight from the
page cache; an input whose blocks are not C-contiguous is made contiguous
once. Outputs are allocated with torch and filled in place through their
numpy views.

Groups of b same-shape blocks (`base.py`) are one C++ call per primitive:
each pass of `pyinf._C` takes operands with a leading block axis (each block
C-contiguous, any block stride: a group that is a view of a bigger chunk is
read in place) and runs the whole group as one job on the worker pool
(csrc/passes.cpp `run_group`: the dots' items are ranges of the rows of all
blocks, the accumulating passes' items whole blocks). `score` of a group is
the C++ dots with alpha = −1 per block, (b, m, c), summed over the blocks in
block order (torch `.sum(0)`); the m > ``MAX_STREAM_M`` and float64 paths are
the reference's batched GEMMs, as for one block. Chosen over a Python loop
over the blocks (one C++ call each on zero-copy views of G[k]) by measuring
both, `python bench/cpu_group.py` (b = 16 blocks of 8 × 512, c = 20, m = 16,
G a view with block stride > c·D; 2-core shared VM, Intel Xeon, load average
3-5 from other jobs; per call, loop time / batched time, median of 7 rounds
of 100 calls; run 1 / run 2, a minute apart):

  threads  fp32: norms_and_dots  dots       rank_one   weighted_sum  bf16: all four
  1              1.15/1.16       1.12/1.10  1.11/1.08  1.23/1.26     1.11-1.27
  2              1.73/1.02       1.70/0.96  2.12/1.03  1.81/1.04     1.00-2.17

e.g. fp32 dots at 1 thread: loop 874 µs, batched 778 µs. The loop pays the
per-call overhead 16 times (at 1 thread: 76-231 µs more a call, 5-14 µs a
block), and its per-block calls (20 × 4096 × 16 = 1.3 M multiply-adds) are
below the pool's item size (4 M), so it never uses a second thread; the
batched call cuts the group into items and used the second thread in run 1
(1.7-2.2×), not in run 2, when the other core was busy with other jobs.

Threads: `pyinf._native.set_num_threads` (default: OMP_NUM_THREADS or the
CPUs available). The passes run on the extension's own worker pool, not
OpenMP regions: the calling thread works too and claims pieces of the pass
dynamically, idle workers sleep instead of spinning, and calls too small to
gain from a second thread stay on the caller, so a busy machine slows the
passes down about as much as it takes CPU away (see csrc/pool.h and
bench/test_bench_cpu_load.py). Results are bitwise reproducible for a given
thread count.

The extension is required: `CPUBackend()` raises RuntimeError when
`pyinf._C` is not importable (``backend="auto"`` then picks "torch" with the
one warning of `pyinf._native.load`).
"""
from __future__ import annotations

import torch

from .. import _native
from ..kernels._util import rows_contiguous
from .torch_backend import TorchBackend

#: above this many query rows the dots / axpy are compute-bound GEMMs: use BLAS.
MAX_STREAM_M = 64

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """`t` with every block row-major contiguous: as it is when it is (a group's block stride is kept:
    a view of a bigger chunk is not copied), else a contiguous copy."""
    t = t.detach()
    return t if rows_contiguous(t) else t.contiguous()


def _grad_buffer(G: torch.Tensor):
    """`G` ([b,] c, D) float32 / bfloat16 CPU tensor -> a zero-copy numpy view (bf16 as int16 bits)."""
    G = _blocks(G)
    if G.dtype == torch.bfloat16:
        return G.view(torch.int16).numpy()
    return G.numpy()


def _f32(t: torch.Tensor):
    return _blocks(t).numpy()


class CPUBackend(TorchBackend):
    """The C++ extension's primitives on CPU tensors (module doc: which take the native path); the rest as TorchBackend."""
    name = "cpu"

    def __init__(self):
        if not _native.is_available():
            raise RuntimeError(
                "backend='cpu' needs the C++ extension pyinf._C, which is not available: "
                f"{_native.unavailable_reason()}; reinstall pyinf with a C++ compiler, "
                "or use backend='torch' (or 'auto', which falls back to it)"
            )
        self._C = _native.load()

    # -- dispatch helpers ------------------------------------------------
    @staticmethod
    def _native_ok(G: torch.Tensor, *others: torch.Tensor) -> bool:
        if G.device.type != "cpu" or G.dtype not in _NATIVE_DTYPES or G.dim() not in (2, 3):
            return False
        return all(o.device.type == "cpu" and o.dtype == torch.float32 for o in others)

    # -- primitives ------------------------------------------------------
    def sq_norms(self, G):
        if not self._native_ok(G):
            return super().sq_norms(G)
        lead = G.shape[:-2]  # the block axis of a group, if any
        s = torch.empty(*lead, G.shape[-2], dtype=torch.float32)
        none = torch.empty(*lead, 0, G.shape[-1])  # m = 0 queries: the norms alone
        self._C.norms_and_dots(_grad_buffer(G), none.numpy(), s.numpy(), torch.empty(*lead, 0, G.shape[-2]).numpy())
        return s

    def norms_and_dots(self, G, V):
        if not self._native_ok(G, V):
            return super().norms_and_dots(G, V)
        s = torch.empty(G.shape[:-1], dtype=torch.float32)
        P = torch.empty(*V.shape[:-1], G.shape[-2], dtype=torch.float32)
        self._C.norms_and_dots(_grad_buffer(G), _f32(V), s.numpy(), P.numpy())
        return s, P

    def _dots(self, G, V, alpha):
        P = torch.empty(*V.shape[:-1], G.shape[-2], dtype=torch.float32)
        self._C.dots(_grad_buffer(G), _f32(V), P.numpy(), alpha)
        return P

    def dots(self, G, V):
        if not self._native_ok(G, V) or V.shape[-2] > MAX_STREAM_M:
            return super().dots(G, V)
        return self._dots(G, V, 1.0)

    def score(self, H, G):
        if not self._native_ok(G, H) or H.shape[-2] > MAX_STREAM_M:
            return super().score(H, G)
        S = self._dots(G, H, -1.0)
        return S if S.dim() == 2 else S.sum(0)  # a group: the (b, m, c) block scores summed in block order

    def weighted_sum(self, C, G):
        if not self._native_ok(G, C) or C.shape[-2] > MAX_STREAM_M:
            return super().weighted_sum(C, G)
        out = torch.empty(*C.shape[:-1], G.shape[-1], dtype=torch.float32)
        self._C.weighted_sum(_f32(C), _grad_buffer(G), out.numpy())
        return out

    def rank_one_accumulate(self, acc, G, V, w):
        if not self._native_ok(G, acc, V, w) or V.shape[-2] > MAX_STREAM_M:
            return super().rank_one_accumulate(acc, G, V, w)
        if rows_contiguous(acc) and (acc.dim() == 2 or acc.shape[0] == 1 or acc.stride(0) >= acc[0].numel()):
            self._C.rank_one_accumulate(acc.detach().numpy(), _grad_buffer(G), _f32(V), _f32(w))
        else:
            tmp = acc.contiguous()
            self._C.rank_one_accumulate(tmp.numpy(), _grad_buffer(G), _f32(V), _f32(w))
            acc.copy_(tmp)

    def gram(self, G1, G2, dtype=None):
        if (G1.dtype not in _NATIVE_DTYPES or G2.dtype not in _NATIVE_DTYPES or G1.device.type != "cpu"
                or dtype == torch.float64 or G1.dim() not in (2, 3)):
            return super().gram(G1, G2, dtype)
        c1, c2 = G1.shape[-2], G2.shape[-2]
        if c2 <= MAX_STREAM_M and c2 <= c1:
            return self._dots(G1, G2.float(), 1.0).mT.contiguous()
        if c1 <= MAX_STREAM_M:
            return self._dots(G2, G1.float(), 1.0)
        return super().gram(G1, G2, dtype)

    # gfim, spd_inverse: inherited (torch BLAS / LAPACK), see the module docstring.
