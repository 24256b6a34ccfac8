"""The Triton kernels and `backend="triton"`, on the CPU under TRITON_INTERPRET=1.

* every kernel against its plain-PyTorch reference (float64 upcast) on odd
  shapes, fp32 and bf16 gradients, with every `torch.empty` pre-filled with NaN
  so that an unwritten tile (or workspace entry) fails;
* every method through `pyinf.influence(..., backend="triton")` against the
  same call on the torch backend and against float64 inputs, to 1e-4.
The interpreter costs ~1 ms per program, so shapes are small and the
launchers pick big blocks when interpreting; the file runs in well under a minute.
"""
import math
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("the Triton tests run under TRITON_INTERPRET=1", allow_module_level=True)

import pyinf  # noqa: E402
from pyinf.backends import BACKENDS, get_backend  # noqa: E402
from pyinf.kernels import _autotune, _util  # noqa: E402
from pyinf.kernels import gfim as k_gfim  # noqa: E402
from pyinf.kernels import gram as k_gram  # noqa: E402
from pyinf.kernels import norms_dots as k_nd  # noqa: E402
from pyinf.kernels import rank_one_accumulate as k_r1  # noqa: E402
from pyinf.kernels import schulz as k_schulz  # noqa: E402
from pyinf.kernels import score as k_score  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
GRAM_DTYPES = DTYPES + [torch.float16]  # gram / gfim: fp16 has an MMA mode of its own (_dot.mma MODE 3)
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}  # vs float64 on the STORED values: both
# accumulate in fp32
CS, DS, MS = (1, 7, 41), (13, 401, 1271), (1, 3, 16)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


pytestmark = pytest.mark.usefixtures("nan_empty")  # tests/conftest.py: outputs start as NaN


def data(c, D, m, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * c + D + m)
    return torch.randn(c, D, generator=gen).to(dtype), torch.randn(m, D, generator=gen)


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------
def test_registered():
    assert "triton" in BACKENDS
    assert get_backend("triton", torch.device("cpu")).name == "triton"
    assert get_backend("auto", torch.device("cpu")).name != "triton"  # auto: triton for CUDA tensors only


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("D", DS)
def test_norms_dots_score(c, D, dtype):
    for m in MS:
        G, V = data(c, D, m, dtype)
        s0, P0 = k_nd.norms_dots_reference(G, V, upcast=True)
        s, P = k_nd.norms_dots(G, V)
        assert s.shape == (c,) and P.shape == (m, c)
        assert rel(s, s0) < TOL[dtype] and rel(P, P0) < TOL[dtype], (c, D, m)
        assert rel(k_nd.sq_norms(G), s0) < TOL[dtype]
        assert rel(k_nd.dots(G, V), P0) < TOL[dtype]
        assert rel(k_score.score(V, G), k_score.score_reference(V, G, upcast=True)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_dots_split_d_and_many_query_tiles(dtype):
    """The two-stage reduction over D slices (GPU default) and m > one query tile."""
    G, V = data(41, 1271, 130, dtype)
    s0, P0 = k_nd.norms_dots_reference(G, V, upcast=True)
    s, P = k_nd.launch(G, V, norms=True, dots=True, splits=3)
    assert rel(s, s0) < TOL[dtype] and rel(P, P0) < TOL[dtype]
    P = k_nd.launch(G, V, norms=False, dots=True, sign=-1.0, splits=2)[1]
    assert rel(P, -P0) < TOL[dtype]


def gpu_blocks(monkeypatch, splits):
    """norms_dots with H100-sized blocks (BLOCK_D = 64: many D tiles) and `splits` D slices, interpreted."""
    cfg = lambda b, c, D, m, device, **kw: dict(  # noqa: E731
        BLOCK_C=32, BLOCK_M=16, BLOCK_D=64, splits=splits, num_warps=4)
    monkeypatch.setattr(k_nd, "_config", cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dots_padded_rows_and_uneven_splits(monkeypatch, dtype):
    """c = 41 samples: the dots' rows are padded to 48 (exact zeros in 41..47, the layout rank_one_accumulate
    loads); 20 D tiles in 7 slices of 2 or 3 tiles; the public functions return the (m, c) part, contiguous."""
    gpu_blocks(monkeypatch, splits=7)
    G, V = data(41, 1271, 19, dtype)
    s0, P0 = k_nd.norms_dots_reference(G, V, upcast=True)
    s, P = k_nd.launch(G, V, norms=True, dots=True, padded=True)
    assert P.shape == (19, 48) and P.is_contiguous() and torch.equal(P[:, 41:], torch.zeros(19, 7))
    assert rel(s, s0) < TOL[dtype] and rel(P[:, :41], P0) < TOL[dtype]
    s, P = k_nd.norms_dots(G, V)
    assert P.shape == (19, 41) and P.is_contiguous() and rel(P, P0) < TOL[dtype] and rel(s, s0) < TOL[dtype]
    assert rel(k_score.score(V, G), k_score.score_reference(V, G, upcast=True)) < TOL[dtype]


@pytest.mark.parametrize("b,c,dots,m,summed", [(1, 900, False, 1, False), (1, 900, True, 1, False),
                                                 (1, 900, True, 16, False), (1, 900, True, 100, False),
                                                 (1, 900, True, 100, True), (160, 20, False, 1, False),
                                                 (160, 20, True, 16, False), (160, 20, True, 100, False),
                                                 (160, 20, True, 100, True)])
def test_norms_dots_splits_fill_whole_waves(monkeypatch, b, c, dots, m, summed):
    """The reduction split at the 13B shapes (D = 40960; one block of c = 900, or a group of 160 blocks of
    c = 20; `summed`: score's sum over the blocks) on 132 SMs runs within 10 % of the ideal time tiles ×
    reduction tiles / slots, in D-tile steps of one program: waves × (the most D tiles of a slice), counting
    the programs an SM holds at once as the launcher does (1 at 8 warps, 4 at 4; the sm_90 compile check
    asserts these bounds). The former rule ran m = 100 as 540 programs, 4.09 waves: 81 %. The partials'
    workspace stays within a quarter of the bytes of bf16 G."""
    monkeypatch.setattr(k_nd._util, "interpreting", lambda: False)
    monkeypatch.setattr(k_nd._util, "num_sms", lambda device: 132)
    D = 40960
    cfg = k_nd._config(b, c, D, m, torch.device("cpu"), norms=not dots, dots=dots, sum_blocks=summed, itemsize=2)
    tiles = -(-c // cfg["BLOCK_C"]) * (-(-m // cfg["BLOCK_M"]) if dots else 1) * (1 if summed else b)
    d_tiles, splits = D // cfg["BLOCK_D"] * (b if summed else 1), cfg["splits"]
    slots = 132 * (1 if cfg["num_warps"] == 8 else 4)
    steps = -(-tiles * splits // slots) * -(-d_tiles // splits)
    assert tiles * d_tiles / slots / steps >= 0.9, (cfg, tiles * splits)
    assert splits <= -(-4 * 132 // tiles)  # never more partials than the former rule
    workspace = 4 * splits * (1 if summed else b) * (m * k_nd.padded_len(c) if dots else c)
    assert splits == 1 or workspace <= b * c * D * 2 / 4, (splits, workspace)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [41, 48])
def test_rank_one_gpu_blocks_padded_p(monkeypatch, c, dtype):
    """rank_one_accumulate / weighted_sum with the H100 blocks (BLOCK_C = 32, BLOCK_D = 128, m = 100 in one
    128-row tile) and c not a multiple of 16 (P padded with zero columns) or one (no padding)."""
    monkeypatch.setattr(k_r1, "_config", lambda c, D, m, fma: dict(BLOCK_M=128, BLOCK_C=32, BLOCK_D=128, num_warps=8))
    gpu_blocks(monkeypatch, splits=3)
    G, V = data(c, 401, 100, dtype, seed=2)
    gen = torch.Generator().manual_seed(c)
    w, C, acc0 = torch.rand(c, generator=gen), torch.randn(100, c, generator=gen), torch.randn(100, 401, generator=gen)
    acc = acc0.clone()
    k_r1.rank_one_accumulate(acc, G, V, w)
    assert rel(acc, k_r1.rank_one_accumulate_reference(acc0, G, V, w, upcast=True)) < TOL[dtype]
    assert rel(k_r1.weighted_sum(C, G), k_r1.weighted_sum_reference(C, G, upcast=True)) < TOL[dtype]


def test_bf16x2_split_precision():
    """bf16 gradient × fp32 query as two bf16 products (the GPU default for bf16 G); ~1e-5."""
    G, V = data(41, 1271, 16, torch.bfloat16)
    P0 = k_nd.norms_dots_reference(G, V, upcast=True)[1]
    P = k_nd.dots(G, V, precision="bf16x2")
    assert rel(P, P0) < 5e-5
    acc0 = torch.randn(16, 1271)
    w = torch.rand(41)
    acc = acc0.clone()
    k_r1.rank_one_accumulate(acc, G, V, w, precision="bf16x2")
    assert rel(acc, k_r1.rank_one_accumulate_reference(acc0, G, V, w, upcast=True)) < 5e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("D", DS)
def test_rank_one_accumulate_and_weighted_sum(c, D, dtype):
    for m in MS:
        G, V = data(c, D, m, dtype, seed=1)
        gen = torch.Generator().manual_seed(c + D + m)
        w = torch.rand(c, generator=gen)
        C = torch.randn(m, c, generator=gen)
        acc0 = torch.randn(m, D, generator=gen)
        acc = acc0.clone()
        k_r1.rank_one_accumulate(acc, G, V, w)
        assert rel(acc, k_r1.rank_one_accumulate_reference(acc0, G, V, w, upcast=True)) < TOL[dtype], (c, D, m)
        assert rel(k_r1.weighted_sum(C, G), k_r1.weighted_sum_reference(C, G, upcast=True)) < TOL[dtype]


# (b, c, D, m): one block as a group, c = 1, m not a multiple of 16, m over one 128-row query tile
BATCHED = [(1, 1, 13, 1), (3, 7, 401, 3), (4, 41, 1271, 19), (2, 1, 129, 130)]


def group(b, c, D, m, dtype, seed=0):
    """A group of b blocks that is a view of a bigger chunk (block stride (c + 5)·D > c·D), and queries."""
    gen = torch.Generator().manual_seed(seed + 1000 * c + D + m + 7 * b)
    G = torch.randn(b, c + 5, D, generator=gen).to(dtype)[:, 3 : 3 + c]
    assert G.stride(0) > c * D and G[0].is_contiguous()
    return G, torch.randn(b, m, D, generator=gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,c,D,m", BATCHED, ids=lambda *_: None)
@pytest.mark.parametrize("splits", [None, 5], ids=["one-slice", "5-slices"])
def test_batched_kernels(monkeypatch, b, c, D, m, dtype, splits):
    """Every kernel on a group of blocks against the float64 per-block formulas; with `splits`, H100-sized
    D tiles in 5 reduction slices: uneven per block, and across block boundaries for the summed score."""
    if splits:
        gpu_blocks(monkeypatch, splits)
    G, V = group(b, c, D, m, dtype)
    G64, V64 = G.double(), V.double()
    s0, P0 = (G64 * G64).sum(-1), V64 @ G64.mT
    s, P = k_nd.norms_dots(G, V)
    assert s.shape == (b, c) and P.shape == (b, m, c) and P.is_contiguous()
    assert rel(s, s0) < TOL[dtype] and rel(P, P0) < TOL[dtype]
    assert rel(k_nd.sq_norms(G), s0) < TOL[dtype]
    assert rel(k_nd.dots(G, V), P0) < TOL[dtype]
    S = k_score.score(V, G)
    assert S.shape == (m, c) and rel(S, -P0.sum(0)) < TOL[dtype]
    assert rel(S, k_score.score_reference(V, G, upcast=True)) < TOL[dtype]
    gen = torch.Generator().manual_seed(b + c)
    w, C = torch.rand(b, c, generator=gen), torch.randn(b, m, c, generator=gen)
    chunk = torch.randn(b, m + 2, D, generator=gen)
    acc = chunk[:, 1 : 1 + m]  # acc as a view too: block stride (m + 2)·D
    before = chunk.clone()
    k_r1.rank_one_accumulate(acc, G, V, w)
    assert rel(acc, k_r1.rank_one_accumulate_reference(before[:, 1 : 1 + m], G, V, w, upcast=True)) < TOL[dtype]
    assert torch.equal(chunk[:, 0], before[:, 0]) and torch.equal(chunk[:, -1], before[:, -1])  # nothing else
    out = k_r1.weighted_sum(C, G)
    assert out.shape == (b, m, D) and rel(out, C.double() @ G64) < TOL[dtype]


class _Counted:
    """A kernel whose launches (`kernel[grid](...)`) are recorded."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_one_launch_per_kernel_for_a_group(monkeypatch):
    """A group of 8 blocks costs each primitive the kernel launches of one block (the triton_backend table:
    2 for rank_one_accumulate, 1 for the rest), the block on a grid axis; also on the GPU's split path."""
    grids = []
    for mod, name in ((k_nd, "_norms_dots_kernel"), (k_r1, "_weighted_sum_kernel")):
        monkeypatch.setattr(mod, name, _Counted(getattr(mod, name), grids))
    be = get_backend("triton", torch.device("cpu"))
    calls = {
        "sq_norms": lambda G, V, C, w, acc: be.sq_norms(G),
        "dots": lambda G, V, C, w, acc: be.dots(G, V),
        "norms_and_dots": lambda G, V, C, w, acc: be.norms_and_dots(G, V),
        "score": lambda G, V, C, w, acc: be.score(V, G),
        "weighted_sum": lambda G, V, C, w, acc: be.weighted_sum(C, G),
        "rank_one_accumulate": lambda G, V, C, w, acc: be.rank_one_accumulate(acc, G, V, w),
    }
    expect = dict(sq_norms=1, dots=1, norms_and_dots=1, score=1, weighted_sum=1, rank_one_accumulate=2)
    for splits in (None, 3):
        if splits:
            gpu_blocks(monkeypatch, splits)
        for name, call in calls.items():
            counts = {}
            for b in (1, 8):
                G, V = group(b, 5, 300, 3, torch.bfloat16)
                C, w, acc = torch.randn(b, 3, 5), torch.rand(b, 5), torch.zeros(b, 3, 300)
                grids.clear()
                call(G, V, C, w, acc)
                counts[b] = len(grids)
            assert counts == {1: expect[name], 8: expect[name]}, (name, splits, counts)


@pytest.mark.parametrize("dtype", GRAM_DTYPES, ids=str)
@pytest.mark.parametrize("b,c1,c2,D", [(1, 1, 1, 13), (1, 7, 41, 401), (3, 41, 70, 129)])
def test_gram(b, c1, c2, D, dtype):
    """16-bit inputs also with precision="tf32x3": the one-MMA modes (bf16: MODE 2, fp16: MODE 3, whose native
    fp16 tl.dot the interpreter runs as the GPU does) instead of the interpreter's default ieee."""
    gen = torch.Generator().manual_seed(c1 * c2 + D)
    G1 = torch.randn(b, c1, D, generator=gen).to(dtype)
    G2 = torch.randn(b, c2, D, generator=gen).to(dtype)
    ref = k_gram.gram_reference(G1, G2, upcast=True)
    assert rel(k_gram.gram(G1, G2), ref) < TOL[dtype]
    assert rel(k_gram.gram(G1[0], G2[0]), ref[0]) < TOL[dtype]
    if dtype != torch.float32:
        assert rel(k_gram.gram(G1, G2, precision="tf32x3"), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", GRAM_DTYPES, ids=str)
@pytest.mark.parametrize("b,c,rows,cols", [(1, 1, 1, 13), (1, 7, 3, 33), (3, 41, 8, 70)])
def test_gfim(b, c, rows, cols, dtype):
    """70 columns = 2 × 2 tiles: the mirrored (transposed) stores of the off-diagonal tile."""
    gen = torch.Generator().manual_seed(c * rows + cols)
    G = torch.randn(b, c, rows, cols, generator=gen).to(dtype)
    ref = k_gfim.gfim_reference(G, upcast=True)
    out = k_gfim.gfim(G)
    assert out.shape == (b, cols, cols)
    assert rel(out, ref) < TOL[dtype]
    assert torch.equal(out, out.transpose(1, 2))
    assert rel(k_gfim.gfim(G[0]), ref[0]) < TOL[dtype]
    if dtype != torch.float32:
        out = k_gfim.gfim(G, precision="tf32x3")
        assert rel(out, ref) < TOL[dtype] and torch.equal(out, out.transpose(1, 2))


def test_mma_modes_on_a_gpu(monkeypatch):
    """What gram / gfim multiply with on a tensor-core GPU: one exact MMA when both operands are bf16 or both
    fp16 (fp16 went through tf32x3 before), the split modes otherwise."""
    monkeypatch.setattr(_util, "interpreting", lambda: False)
    monkeypatch.setattr(_util, "_has_tensor_cores", lambda device: True)
    monkeypatch.delenv("PYINF_TRITON_PRECISION", raising=False)
    f32, bf16, f16, cuda = torch.float32, torch.bfloat16, torch.float16, torch.device("cuda")
    assert k_gram._modes(f16, f16, cuda, None) == ("ieee", 3)
    assert k_gram._modes(bf16, bf16, cuda, None) == ("ieee", 2)
    assert k_gram._modes(f32, f32, cuda, None) == ("tf32x3", 0)
    assert k_gram._modes(f32, bf16, cuda, None) == ("ieee", 1)
    assert k_gram._modes(f32, f16, cuda, None) == ("tf32x3", 0)
    assert k_gram._modes(f16, f16, cuda, "ieee") == ("ieee", 0)  # the opt-out: FMA on the CUDA cores


def test_size_class():
    """The autotune key: one bucket per power of two of each size, the sizes told apart by position."""
    sc = _autotune.size_class
    assert sc(900, 900, 40960) == sc(513, 1024, 32769) != sc(1025, 900, 40960)
    assert sc(900, 5120) != sc(5120, 900) and sc(1) == sc(1, 1) == 0


def _run_autotuned(monkeypatch, tuners, winner: int, launch):
    """`launch()` through the GPU path (`_autotune.launch`, no interpreter shortcut) with a stand-in timer under
    which config `winner` is fastest: every config of the list runs once (the benchmark), then the winner.
    Returns (launch's result, kernel launches)."""
    monkeypatch.setattr(_util, "interpreting", lambda: False)
    launches = []
    for tuner in tuners:
        times = iter(range(len(tuner.configs)))

        def bench(kernel_call, quantiles, times=times):
            kernel_call()
            t = next(times)
            return [0.0 if t == winner else 1.0 + t] * 3

        def run(*args, tuner=tuner, run=tuner.run, **kwargs):
            launches.append(tuner)
            return run(*args, **kwargs)

        monkeypatch.setitem(vars(tuner), "do_bench", bench)  # shadows Autotuner.do_bench (a cached_property)
        monkeypatch.setattr(tuner, "cache", {})  # tune afresh
        monkeypatch.setattr(tuner, "run", run)
    return launch(), len(launches)


@pytest.mark.parametrize("winner", range(4))
def test_autotuned_launch_path(monkeypatch, winner):
    """The launch a GPU takes, run by the interpreter: whichever config wins, gram, gfim and the Schulz step are
    right (grids from the config; the fp16 one-MMA mode; Schulz's Σ R² workspace, which a bigger winning tile
    fills less than the configs benchmarked before it did). Rows not a multiple of 16 (D = 150, cols = 70) take
    the first config alone. Every batch here is two launches: the blocks tuned on (_autotune.TUNE_WAVES waves
    of programs; `num_sms` is 1 on the CPU), then the rest with the config chosen."""
    tiles = (k_gram.TILES_16, k_gram.TILES_32, k_gfim.TILES_16, k_gfim.TILES_32, k_schulz.TILES)
    assert all(len(t) == 4 for t in tiles)
    for tuners in (k_gram._TUNED[True], k_gram._TUNED[False], k_gfim._TUNED[True], k_gfim._TUNED[False],
                   k_schulz._TUNED):
        assert len(tuners[True].configs) == 4 and len(tuners[False].configs) == 1
    gram_tuners = [t for d in k_gram._TUNED.values() for t in d.values()]
    gfim_tuners = [t for d in k_gfim._TUNED.values() for t in d.values()]
    gen = torch.Generator().manual_seed(winner)
    for dtype, prec in ((torch.float32, None), (torch.float16, "tf32x3")):
        for D, cols in ((160, 144), (150, 70)):
            G1 = torch.randn(3, 41, D, generator=gen).to(dtype)
            G2 = torch.randn(3, 70, D, generator=gen).to(dtype)
            out, n = _run_autotuned(monkeypatch, gram_tuners, winner, lambda: k_gram.gram(G1, G2, precision=prec))
            assert rel(out, k_gram.gram_reference(G1, G2, upcast=True)) < TOL[dtype] and n == 2
            G = torch.randn(2, 9, 3, cols, generator=gen).to(dtype)
            out, n = _run_autotuned(monkeypatch, gfim_tuners, winner, lambda: k_gfim.gfim(G, precision=prec))
            assert rel(out, k_gfim.gfim_reference(G, upcast=True)) < TOL[dtype] and torch.equal(out, out.mT)
            assert n == 2
    k = 140
    A = spd(2, k).float()
    X = torch.eye(k).repeat(2, 1, 1) / torch.linalg.matrix_norm(A).reshape(-1, 1, 1)
    Xn_ref, r_ref = k_schulz.schulz_step_reference(A, X, upcast=True)
    Ap, Xp = k_schulz.padded(A), k_schulz.padded(X)
    R = torch.empty_like(Ap)
    tuners = k_schulz._TUNED.values()
    r, n = _run_autotuned(monkeypatch, tuners, winner, lambda: k_schulz.residual(Ap, Xp, R, k))
    assert rel(r, r_ref) < 1e-5 and n == 2
    Xn, n = _run_autotuned(monkeypatch, tuners, winner, lambda: k_schulz.update(Xp, R, torch.empty_like(Xp)))
    assert rel(Xn[:, :k, :k], Xn_ref) < 1e-5 and not Xn[:, k:].any() and not Xn[:, :, k:].any() and n == 2


def spd(b, k, cond=1e3, seed=0):
    gen = torch.Generator().manual_seed(seed + k)
    Q, _ = torch.linalg.qr(torch.randn(b, k, k, generator=gen, dtype=torch.float64))
    ev = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return (Q * ev) @ Q.transpose(1, 2) * 37.0


@pytest.mark.parametrize("k", [1, 7, 33, 70, 80])
def test_schulz_step_and_residual(k):
    """On the padded n × n (n = k rounded up to 16; 80 needs none) as schulz_inverse runs them: the k × k
    corner is the step, and the padding stays exactly zero (no identity there, nothing in ‖R‖)."""
    A = spd(2, k).float()
    X = torch.eye(k).repeat(2, 1, 1) / torch.linalg.matrix_norm(A).reshape(-1, 1, 1)
    X = X + 1e-3 * torch.randn(2, k, k, generator=torch.Generator().manual_seed(k))
    Xn_ref, r_ref = k_schulz.schulz_step_reference(A, X, upcast=True)
    Ap, Xp = k_schulz.padded(A), k_schulz.padded(X)
    n = Ap.shape[-1]
    assert n % 16 == 0 and n - 16 < k <= n
    R = torch.empty_like(Ap)
    r = k_schulz.residual(Ap, Xp, R, k)
    assert rel(r, r_ref) < 1e-5
    Xn = k_schulz.update(Xp, R, torch.empty_like(Xp))
    assert rel(Xn[:, :k, :k], Xn_ref) < 1e-5
    for t in (R, Xn):
        assert not t[:, k:].any() and not t[:, :, k:].any()


def test_schulz_bad_input():
    A = torch.zeros(1, 16, 16)
    with pytest.raises(AssertionError, match="k = 17"):
        k_schulz.residual(A, A.clone(), A.clone(), 17)
    with pytest.raises(AssertionError, match="must all be"):
        k_schulz.update(A, A.clone(), torch.zeros(1, 32, 32))


@pytest.mark.parametrize("k,cond", [(7, 10.0), (33, 1e3), (70, 1e4)])
def test_schulz_inverse_meets_float64(k, cond):
    """fp32 kernels, then the float64 refinement: to the float64 inverse whatever κ fp32 handles."""
    A = spd(3, k, cond)
    X, res, steps = k_schulz.schulz_inverse(A, iterations=100, tol=1e-10, group=2)  # 2 groups
    assert X.dtype == torch.float64 and res < 1e-10 and steps <= 100
    assert rel(X, torch.linalg.inv(A)) < 1e-8
    X_ref, _, _ = k_schulz.schulz_inverse_reference(A, 100, 1e-10)
    assert rel(X, X_ref) < 1e-8


def test_schulz_linear_phase_stays_in_fp32(monkeypatch):
    """A few small eigenvalues (κ = 2e4): their slow linear phase (~15 doublings) runs in fp32, and
    float64 only refines from the fp32 floor. The switch comes at a residual r ≤ FLOOR ≈ 1e-3 here
    (schulz.py), and a float64 step maps r to ≤ √k·r² (R ← R², ‖R²‖_F ≤ ‖R‖_F²): ≤ 8e-6, then
    ≤ 5e-10 < tol, so ≤ 2 float64 steps (the former stall test ran 17 of 22 steps in float64)."""
    k = 64
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    ev = torch.linspace(0.5, 1.0, k, dtype=torch.float64)
    ev[:3] = torch.tensor([5e-5, 2e-4, 1e-3], dtype=torch.float64)
    A = ((Q * ev) @ Q.T)[None]
    update, fp32_steps = k_schulz.update, []
    monkeypatch.setattr(k_schulz, "update", lambda *a, **kw: fp32_steps.append(1) or update(*a, **kw))
    X, res, steps = k_schulz.schulz_inverse(A, iterations=100, tol=1e-9)
    assert res < 1e-9 and rel(X, torch.linalg.inv(A)) < 1e-7
    assert steps - len(fp32_steps) <= 2, f"{steps - len(fp32_steps)} of {steps} steps in float64"


@pytest.mark.parametrize("solver", ["auto", "cholesky", "schulz"])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_spd_inverse(name, solver):
    A = spd(3, 33, 1e4)
    X, res, steps = get_backend(name, torch.device("cpu")).spd_inverse(A, iterations=100, tol=1e-9, solver=solver)
    assert X.shape == A.shape and X.dtype == torch.float64
    assert rel(X, torch.linalg.inv(A)) < 1e-7
    assert (steps > 0) == (solver == "schulz")
    assert res < 1e-9 if solver == "schulz" else math.isnan(res)  # Cholesky forms no residual


def test_spd_inverse_bad_solver():
    with pytest.raises(ValueError, match="solver"):
        get_backend("triton", torch.device("cpu")).spd_inverse(spd(1, 3), iterations=5, tol=1e-8, solver="lu")


# ----------------------------------------------------------------------------
# methods end to end
# ----------------------------------------------------------------------------
SHAPES = {"q.lora_A": (4, 24), "v.lora_B": (2, 40), "bias": (50,)}
CASES = [
    ("tracin", {}, {}),
    ("datainf", {}, {}),
    ("exact", {}, {}),
    ("lissa", dict(damping=1.0), dict(iterations=400)),
    ("hyperinf", {}, {}),
    ("hyperinf", {}, dict(solver="schulz")),
    ("hyperinf", {}, dict(solver="cholesky")),
]


def grads(n, m, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    train = {k: torch.randn(n, *s, generator=gen).to(dtype) for k, s in SHAPES.items()}
    query = {k: torch.randn(m, *s, generator=gen).to(dtype) for k, s in SHAPES.items()}
    return train, query


@pytest.mark.parametrize("method,kw,opts", CASES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())) or "default")
def test_methods_match_torch_and_float64(method, kw, opts):
    train, query = grads(37, 3)
    # 3 chunks, the last one short (lissa: one chunk, its many passes cost ~1 ms per program here)
    args = dict(method=method, chunk_size=None if method == "lissa" else 16, **kw, **opts)
    S = pyinf.influence(train, query, backend="triton", **args)
    S_t = pyinf.influence(train, query, backend="torch", **args)
    train64 = {k: v.double() for k, v in train.items()}
    query64 = {k: v.double() for k, v in query.items()}
    S_64 = pyinf.influence(train64, query64, backend="torch", **args)
    assert S.shape == (3, 37) and S.dtype == torch.float32 and bool(torch.isfinite(S).all())
    assert rel(S, S_t) < 1e-4, method
    assert rel(S, S_64) < 1e-4, method


@pytest.mark.parametrize("method", ["tracin", "datainf", "exact", "hyperinf"])
def test_methods_bf16_match_torch(method):
    train, query = grads(37, 3, dtype=torch.bfloat16, seed=1)
    S = pyinf.influence(train, query, method=method, backend="triton", chunk_size=16)
    S_t = pyinf.influence(train, query, method=method, backend="torch", chunk_size=16)
    assert rel(S, S_t) < 1e-4, method


@pytest.mark.parametrize("method", ["datainf", "hyperinf"])
def test_self_influence_and_aggregate(method):
    train, query = grads(21, 4, seed=2)
    si = pyinf.self_influence(train, method=method, backend="triton", chunk_size=8)
    si_t = pyinf.self_influence(train, method=method, backend="torch", chunk_size=8)
    assert rel(si, si_t) < 1e-4 and bool((si <= 0).all())
    a = pyinf.influence(train, query, method=method, aggregate=True, backend="triton")
    a_t = pyinf.influence(train, query, method=method, aggregate=True, backend="torch")
    assert a.shape == (21,) and rel(a, a_t) < 1e-4


def test_float64_falls_back_to_reference():
    train, query = grads(9, 2)
    train = {k: v.double() for k, v in train.items()}
    query = {k: v.double() for k, v in query.items()}
    S = pyinf.influence(train, query, method="datainf", backend="triton")
    S_t = pyinf.influence(train, query, method="datainf", backend="torch")
    assert rel(S, S_t) < 1e-12
