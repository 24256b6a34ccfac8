"""`pyinf.kernels.grouped_lora` against its float64 reference, on the CPU under TRITON_INTERPRET=1.

Odd shapes (M, K, N not multiples of any block; ranks 1, 3, 8 and 17, which
is padded to 32), fp32 and bf16 operands, with and without a base, in place,
and every torch.empty pre-filled with NaN so that an unwritten tile fails.
"""
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("the Triton tests run under TRITON_INTERPRET=1", allow_module_level=True)

from pyinf.kernels import grouped_lora as kg  # noqa: E402

TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}  # vs float64 on the stored values


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


pytestmark = pytest.mark.usefixtures("nan_empty")  # tests/conftest.py: outputs start as NaN


def data(k, M, K, N, R, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * k + M + 3 * K + N + R)
    x = torch.randn(k, M, K, generator=g).to(dtype)
    A = (torch.randn(k, R, K, generator=g) / K**0.5).to(dtype)
    B = torch.randn(k, N, R, generator=g).to(dtype)
    base = torch.randn(k, M, N, generator=g).to(dtype)
    return x, A, B, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,M,K,N,R", [(1, 1, 13, 7, 1), (3, 41, 13, 401, 3), (2, 137, 401, 41, 8), (5, 7, 33, 19, 17)])
def test_matches_reference(k, M, K, N, R, dtype):
    x, A, B, base = data(k, M, K, N, R, dtype)
    got = kg.grouped_lora(x, A, B, 0.37, base=base)
    assert got.dtype == dtype and got.shape == (k, M, N)
    assert torch.isfinite(got).all()
    ref = kg.grouped_lora_reference(x, A, B, 0.37, base=base, upcast=True)
    assert rel(got, ref) < (4e-3 if dtype == torch.bfloat16 else TOL[dtype])  # bf16: the output is rounded
    # without a base: the output is the delta alone, into NaN-filled memory
    d = kg.grouped_lora(x, A, B, 2.0)
    ref_d = kg.grouped_lora_reference(x, A, B, 2.0, upcast=True)
    assert torch.isfinite(d).all() and rel(d, ref_d) < (4e-3 if dtype == torch.bfloat16 else TOL[dtype])


def test_fp32_accumulation_of_bf16():
    """bf16 inputs, fp32 output: the products are exact and accumulate in fp32."""
    x, A, B, _ = data(3, 41, 77, 29, 4, torch.bfloat16)
    base = torch.zeros(3, 41, 29)
    got = kg.grouped_lora(x, A, B, 1.0, base=base)
    assert got.dtype == torch.float32
    assert rel(got, kg.grouped_lora_reference(x, A, B, 1.0, upcast=True)) < TOL[torch.bfloat16]


def test_in_place():
    x, A, B, base = data(4, 19, 23, 31, 2, torch.float32)
    ref = kg.grouped_lora_reference(x, A, B, 0.5, base=base.clone(), upcast=True)
    out = kg.grouped_lora(x, A, B, 0.5, base=base, out=base)
    assert out.data_ptr() == base.data_ptr()
    assert rel(base, ref) < TOL[torch.float32]


def test_groups_are_independent():
    """Each group reads only its own adapter: changing group 1's A leaves groups 0 and 2 bit-identical."""
    x, A, B, base = data(3, 9, 11, 13, 2, torch.float32)
    a = kg.grouped_lora(x, A, B, 1.0, base=base)
    A2 = A.clone()
    A2[1] += 1.0
    b = kg.grouped_lora(x, A2, B, 1.0, base=base)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and not torch.equal(a[1], b[1])


def test_bad_shapes():
    x, A, B, base = data(2, 5, 6, 7, 3, torch.float32)
    with pytest.raises(AssertionError):
        kg.grouped_lora(x, A[:1], B)
    with pytest.raises(AssertionError):
        kg.grouped_lora(x, A, B.to(torch.bfloat16))
    with pytest.raises(AssertionError):
        kg.grouped_lora(x, A, B, base=base[:, :4])


def gpu_tiles(monkeypatch, sms=1):
    """Launch with the tiles of `_gpu_config` for a GPU of `sms` SMs (run by the interpreter)."""
    monkeypatch.setattr(kg, "_config", lambda k, M, K, N, R, device: kg._gpu_config(k, M, K, N, R, sms))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,R", [(150, 3), (150, 40), (20, 8)])
def test_gpu_tiles(monkeypatch, M, R, dtype):
    """The H100 tiles of `_gpu_config` (BLOCK_M 64 or 32, BLOCK_N 64, BLOCK_K 64 or 32 for r > 32), run
    by the interpreter: several M, K and N tiles with ragged edges, r padded to 16 or 64."""
    gpu_tiles(monkeypatch)
    cfg = kg._gpu_config(2, M, 150, 130, R, 1)
    assert cfg["BLOCK_N"] == 64 and cfg["BLOCK_M"] == (64 if M > 32 else 32) and cfg["n_splits"] == 1
    x, A, B, base = data(2, M, 150, 130, R, dtype)
    got = kg.grouped_lora(x, A, B, 0.37, base=base)
    ref = kg.grouped_lora_reference(x, A, B, 0.37, base=base, upcast=True)
    assert torch.isfinite(got).all() and rel(got, ref) < (4e-3 if dtype == torch.bfloat16 else TOL[dtype])
    base32 = base.float()
    got = kg.grouped_lora(x, A, B, 0.37, base=base32, out=base32)  # in place, fp32 base (bf16 operands too)
    assert got.data_ptr() == base32.data_ptr() and rel(got, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_groups_are_bit_identical(monkeypatch, dtype):
    """Forward-INF takes a pass's base losses from group 0 (the unperturbed adapter) of the same op, so a
    query whose step left its adapter unchanged must get the bit-identical output: every group runs the same
    code. A LoRA layer of r = 8 and 1024 × 1024 with the H100 tiles (16 K and 16 N tiles), base in the
    operand dtype (bf16: rounded once more) and in fp32."""
    gpu_tiles(monkeypatch)
    x, A, B, base = data(1, 40, 1024, 1024, 8, dtype)
    x, base = x.expand(3, -1, -1).contiguous(), base.expand(3, -1, -1).contiguous()
    A, B = A.repeat(3, 1, 1), B.repeat(3, 1, 1)
    A[1] += 1.0  # group 1 is another adapter; groups 0 and 2 are the same
    for b in (base, base.float()):
        out = kg.grouped_lora(x, A, B, 1.5, base=b)
        assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])


def test_one_group_fills_the_gpu():
    """One group of 4096 rows (Forward-INF with one query) is 64 M-tiles: N is split so that the 132 SMs
    of an H100 / H200 all get a program, in slices of whole BLOCK_N tiles balanced to within one."""
    cfg = kg._gpu_config(1, 4096, 5120, 5120, 8, 132)
    assert cfg["n_splits"] == 3 and 64 * cfg["n_splits"] >= 132
    assert kg._gpu_config(4, 4096, 5120, 5120, 8, 132)["n_splits"] == 1  # 256 programs already
    assert kg._gpu_config(1, 20, 5120, 100, 8, 132)["n_splits"] == 2  # never more slices than N tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [130, 449])
def test_n_split(monkeypatch, N, dtype):
    """The N slices (3 M-tiles on a GPU of 8 SMs: 3 slices, of one N tile each for N = 130, of 2, 3 and 3
    tiles for N = 449) cover every column once, into NaN-filled memory and in place on an fp32 base."""
    gpu_tiles(monkeypatch, sms=8)
    assert kg._gpu_config(1, 150, 77, N, 8, 8)["n_splits"] == 3
    x, A, B, base = data(1, 150, 77, N, 8, dtype)
    ref = kg.grouped_lora_reference(x, A, B, 0.37, base=base, upcast=True)
    got = kg.grouped_lora(x, A, B, 0.37, base=base)
    assert torch.isfinite(got).all() and rel(got, ref) < (4e-3 if dtype == torch.bfloat16 else TOL[dtype])
    base32 = base.float()
    got = kg.grouped_lora(x, A, B, 0.37, base=base32, out=base32)
    assert got.data_ptr() == base32.data_ptr() and rel(got, ref) < TOL[torch.float32]
