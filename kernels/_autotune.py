"""Tile configs chosen by `triton.autotune` on a GPU (launch-side helpers for gram, gfim and schulz).

On a CUDA device these batched GEMM-like kernels launch through `launch(tuned(...)[aligned], ...)`:
the first call of each key times every config of the list and later calls reuse the winner (per
process). The key is SIZE_CLASS (`size_class`: an int naming the power-of-two bucket of each
size, passed to the kernel as an argument it does not use), the named constexprs (precision, MMA
mode, epilogue) and the dtypes of the tensor arguments (Triton adds those itself): shapes in one
class share a config, so a short last chunk is not timed again. Under the interpreter (the CPU
tests) nothing is tuned: the launchers pick one fixed config there.

Cost of tuning. Each config is timed by `triton.testing.do_bench`, which runs it at least 8 times
(1 + 5 to estimate + warm-up + repeats), here with 5 ms warm-up and 25 ms of repeats (Triton's
defaults, 25 / 100 ms, would cost ~0.5 s a key for 4 configs). At full size that would cost more
than the work: one Schulz step over 160 blocks of 5120² is ~1 s of FMA on an H100 (an estimate,
2·160·5120³ FLOP at ~50 TFLOP/s). So `launch` runs a batch as two launches: the first blocks,
enough for TUNE_WAVES waves of the first config's tiles (tuned on when the key is new), then the
rest with the config chosen.

A config is a tuple (tile sizes..., num_warps, num_stages). Every config of every list is
compiled for sm_90 by `bench/compile_sm90.py` (class "default": no spills allowed), since any of
them may win on a GPU. Rows whose length is not a multiple of 16 elements get the first config of
the list only (`tuned`). Nothing here was timed on a GPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.testing

try:  # installed as pyinf.kernels
    from . import _util
except ImportError:  # pragma: no cover - imported by path while developing
    import _util  # type: ignore

TUNE_WAVES = 4  # the first launch of a batch: about this many waves of programs (module docstring)


def size_class(*sizes: int) -> int:
    """One int naming the power-of-two bucket of each size (6 bits each): the autotune key."""
    return sum(max(0, int(s) - 1).bit_length() << (6 * i) for i, s in enumerate(sizes))


def _bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def tuned(kernel, tile_names: tuple[str, ...], configs: list[tuple[int, ...]], key: list[str],
          reset_to_zero: list[str] | None = None) -> dict[bool, triton.runtime.Autotuner]:
    """{aligned: `kernel` autotuned over `configs` = [(*tile sizes, num_warps, num_stages)]}, keyed on
    SIZE_CLASS and `key`; `reset_to_zero`: outputs a config leaves partly written (see schulz).

    aligned=False (the row length is not a multiple of 16 elements) gets the first config only: such rows
    are loaded element by element, with a 64-bit address each, and the larger tiles then spill
    (e.g. 108-320 B for gfim at cols = 3 or 33, `bench/results/kernels-sm90-i13.md`)."""
    assert all(len(c) == len(tile_names) + 2 for c in configs), (tile_names, configs)
    cfgs = [triton.Config(dict(zip(tile_names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in configs]
    return {aligned: triton.autotune(configs=cfgs if aligned else cfgs[:1], key=["SIZE_CLASS", *key],
                                     reset_to_zero=reset_to_zero, do_bench=_bench)(kernel)
            for aligned in (True, False)}


def launch(tuner: triton.runtime.Autotuner, grid, args: tuple, b: int, sizes: tuple[int, ...], **kwargs) -> None:
    """`tuner` over a batch of b blocks: axis 0 of every tensor in `args`; grid(meta, blocks) is the launch
    grid. The first blocks (TUNE_WAVES waves of the first config's programs) go first, the rest after
    (module docstring); SIZE_CLASS = size_class(*sizes, blocks of the first launch)."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    per_block = math.prod(grid(tuner.configs[0].kwargs, 1))
    first = min(b, _util.cdiv(TUNE_WAVES * _util.num_sms(device), per_block))
    for lo, hi in ((0, first), (first, b)):
        if lo < hi:
            part = [a[lo:hi] if isinstance(a, torch.Tensor) else a for a in args]
            tuner[lambda meta, nb=hi - lo: grid(meta, nb)](*part, SIZE_CLASS=size_class(*sizes, first), **kwargs)
