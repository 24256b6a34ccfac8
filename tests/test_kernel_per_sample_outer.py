"""pyinf.kernels.per_sample_outer against its PyTorch reference, on the CPU
under TRITON_INTERPRET=1 (outputs pre-filled with NaN, odd shapes, fp32/bf16)."""
from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tiny_models as tm  # noqa: E402  (load_kernel_module)

K = tm.load_kernel_module()


def _needs_kernel():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a GPU")


def _device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _inputs(B, T, DU, DV, dtype, seed, mask_kind):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, DU, generator=g).to(dtype)
    v = torch.randn(B, T, DV, generator=g).to(dtype)
    if mask_kind is None:
        mask = None
    else:
        mask = (torch.rand(B, T, generator=g) > 0.3).long()
        mask[:, 0] = 1
        if mask_kind == "bool":
            mask = mask.bool()
    dev = _device()
    return u.to(dev), v.to(dev), (mask.to(dev) if mask is not None else None)


def _check(out, sq, u, v, mask, rtol=1e-5):
    ref, ref_sq = K.per_sample_outer_reference(u.cpu(), v.cpu(), None if mask is None else mask.cpu(),
                                               upcast_fp64=True)
    out, sq = out.cpu().double(), sq.cpu().double()
    assert torch.isfinite(out).all() and torch.isfinite(sq).all(), "unwritten (NaN) output"
    err = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert float(err.max()) <= rtol, err
    torch.testing.assert_close(sq, ref_sq, rtol=rtol, atol=0)


SHAPES = [
    (3, 5, 13, 7),    # odd, one tile
    (4, 37, 70, 40),  # several T steps (37 > 32) and two tiles along U (70 > 64)
    (2, 3, 5, 150),   # two tiles along V (150 > 128)
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", [None, "long", "bool"])
def test_matches_reference(shape, dtype, mask_kind):
    _needs_kernel()
    B, T, DU, DV = shape
    u, v, mask = _inputs(B, T, DU, DV, dtype, seed=sum(shape), mask_kind=mask_kind)
    out = torch.full((B, DU, DV), float("nan"), device=u.device)
    sq_out = torch.full((B,), float("nan"), device=u.device)
    o, s = K.per_sample_outer(u, v, mask, out=out, sq_out=sq_out)
    assert o is out and s is sq_out
    # bf16 inputs: products are exact in fp32, so the fp64 reference of the same
    # bf16 values is matched to fp32 accuracy
    _check(out, sq_out, u, v, mask)


def test_strided_inputs_and_strided_out():
    _needs_kernel()
    B, T, DU, DV = 3, 6, 9, 11
    u, v, mask = _inputs(B, T, DU + 4, DV, torch.float32, seed=1, mask_kind="long")
    u = u[:, :, 2 : 2 + DU]                       # a sliced view (stride 13 along T)
    v = v.transpose(0, 1).contiguous().transpose(0, 1)  # (T, B, DV) memory
    big = torch.full((B, DV, DU), float("nan"), device=u.device)
    out = big.transpose(1, 2)                     # non-contiguous output (B, DU, DV)
    o, s = K.per_sample_outer(u, v, mask, out=out)
    _check(o, s, u, v, mask)


def test_masked_rows_never_leak():
    """NaN/Inf in padded positions must not reach the result (masked loads)."""
    _needs_kernel()
    B, T, DU, DV = 2, 7, 5, 6
    u, v, mask = _inputs(B, T, DU, DV, torch.float32, seed=2, mask_kind="long")
    mask[:, -2:] = 0
    u[:, -2:] = float("nan")
    v[:, -1] = float("inf")
    o, s = K.per_sample_outer(u, v, mask)
    assert torch.isfinite(o).all()
    keep = mask.bool()[:, :, None]
    _check(o, s, torch.where(keep, u, 0), torch.where(keep, v, 0), None)


def test_reference_against_loop():
    B, T, DU, DV = 2, 4, 3, 5
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(B, T, DU, generator=g), torch.randn(B, T, DV, generator=g)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    out, sq = K.per_sample_outer_reference(u, v, mask, upcast_fp64=True)
    assert out.dtype == torch.float64
    for b in range(B):
        exp = sum(torch.outer(u[b, t], v[b, t]).double() for t in range(T) if mask[b, t])
        torch.testing.assert_close(out[b], exp)
        torch.testing.assert_close(sq[b], exp.pow(2).sum())
    out32, _ = K.per_sample_outer_reference(u, v)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, torch.einsum("btu,btv->buv", u, v))


def test_launcher_asserts():
    _needs_kernel()
    u = torch.randn(2, 3, 4, device=_device())
    with pytest.raises(AssertionError):
        K.per_sample_outer(u, torch.randn(2, 4, 5, device=_device()))  # T differs
    with pytest.raises(AssertionError):
        K.per_sample_outer(u, torch.randn(2, 3, 5, device=_device()), torch.ones(3, 3, device=_device()))
