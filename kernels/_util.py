"""Helpers shared by the pyinf Triton kernels (launch-side only, no @triton.jit here).

* `interpreting()`: True under ``TRITON_INTERPRET=1`` (the CPU test mode). The
  launchers then pick very large blocks: the interpreter costs about 1 ms per
  program, whatever the block size, and has no register limit.
* `dot_precision(G_dtype)`: how `tl.dot` multiplies fp32 operands on the GPU.

  - ``"ieee"``: exact fp32 FMA on the CUDA cores (~50 TFLOP/s on an H100).
  - ``"tf32x3"``: fp32-class accuracy on the tensor cores (each fp32 operand
    split into tf32 hi + lo, three MMAs); ~3x the ieee speed. The default for
    fp32 gradients.
  - ``"bf16x2"`` (pyinf's own, only for bf16 gradients): the gradient tile is
    exactly a bf16 tensor, so only the fp32 query side is split,
    v = v_hi + v_lo with both halves bf16, and two bf16 MMAs give v·g with a
    relative error ~2^-16 (~1.5e-5), an order below the 1e-4 target: half the
    tensor-core work of tf32x3 at twice the rate. The default for bf16 gradients.
  - ``"tf32"``: one tf32 MMA, ~5e-4 relative error: NOT accurate enough for the
    1e-4 target, offered for experiments only.

  ``PYINF_TRITON_PRECISION`` overrides the default (one of the names above).
  The interpreter ignores `input_precision` and computes in fp32 (numpy); for
  ``bf16x2`` it runs the split with fp32 dots, so the split itself is tested.
"""
from __future__ import annotations

import os

import torch

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x2")
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def clamp_pow2(x: int, lo: int, hi: int) -> int:
    """The power of two >= x, clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, next_pow2(x)))


def _has_tensor_cores(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def dot_precision(g_dtype: torch.dtype, device: torch.device, override: str | None = None) -> str:
    """The `tl.dot` precision for a gradient tile of `g_dtype` times an fp32 operand."""
    p = override or os.environ.get("PYINF_TRITON_PRECISION", "").strip() or None
    if p is not None:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
        if p == "bf16x2" and g_dtype != torch.bfloat16:
            p = "tf32x3"  # the split relies on the gradient being exactly bf16
        return p
    if interpreting() or not _has_tensor_cores(device):
        return "ieee"
    return "bf16x2" if g_dtype == torch.bfloat16 else "tf32x3"


def tl_precision(p: str) -> tuple[str, bool]:
    """(input_precision for tl.dot, SPLIT_BF16 flag) for a pyinf precision name."""
    if p == "bf16x2":
        return "ieee", True
    return p, False


def check_storage(name: str, t: torch.Tensor, ndim: int) -> None:
    assert t.dim() == ndim, f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}"
    assert t.dtype in STORAGE_DTYPES, f"{name}: dtype {t.dtype} not in {STORAGE_DTYPES} (float64: use the reference)"
    assert t.is_contiguous(), f"{name} must be contiguous"


def check_f32(name: str, t: torch.Tensor, ndim: int) -> None:
    assert t.dim() == ndim, f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}"
    assert t.dtype == torch.float32, f"{name}: expected float32, got {t.dtype}"
    assert t.is_contiguous(), f"{name} must be contiguous"


def rows_contiguous(t: torch.Tensor) -> bool:
    """Each (rows, cols) matrix of `t` (..., rows, cols) is row-major contiguous; the strides of the
    leading axes may be anything (a block of a group, a view of a bigger chunk). A vector: contiguous."""
    if t.dim() < 2:
        return t.numel() <= 1 or t.stride(-1) == 1
    rows, cols = t.shape[-2:]
    return (cols == 1 or t.stride(-1) == 1) and (rows == 1 or t.stride(-2) == cols)


def blocks(name: str, t: torch.Tensor, f32: bool = False) -> torch.Tensor:
    """`t` (rows, cols) or a group (b, rows, cols) -> a (b, rows, cols) view (b = 1 for 2-D).

    Every block must be row-major contiguous (`rows_contiguous`); the block stride `t.stride(0)` is
    passed to the kernels as it is. `f32`: a float32 query-side operand, else a gradient storage dtype."""
    assert t.dim() in (2, 3), f"{name}: expected (rows, cols) or (b, rows, cols), got shape {tuple(t.shape)}"
    if f32:
        assert t.dtype == torch.float32, f"{name}: expected float32, got {t.dtype}"
    else:
        assert t.dtype in STORAGE_DTYPES, f"{name}: dtype {t.dtype} not in {STORAGE_DTYPES} (float64: use the reference)"
    assert rows_contiguous(t), f"{name}: every block must be row-major contiguous, got strides {t.stride()}"
    t = t if t.dim() == 3 else t.unsqueeze(0)
    assert t.shape[0] >= 1, f"{name}: empty group"
    return t


def block_stride(t: torch.Tensor) -> int:
    """The block stride of a (b, rows, cols) group in elements (any value for one block)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1] * t.shape[2]


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
