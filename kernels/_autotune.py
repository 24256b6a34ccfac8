"""Tile configs chosen by `triton.autotune` on a GPU (launch-side helpers for gram, gfim and schulz).

On a CUDA device these GEMM-like kernels launch through `tuned(...)`: the first call of each
key benchmarks every config of the list once per process (Triton's `do_bench`) and later calls
reuse the winner. The key is `size_class(...)` (an int: the power-of-two bucket of each size,
passed to the kernel as the otherwise unused argument SIZE_CLASS), the named constexprs
(precision, MMA mode, epilogue) and the dtypes of the tensor arguments (Triton adds those
itself). Shapes in one class share a config, so a run with a short last chunk does not
benchmark again. Under the interpreter (the CPU tests) nothing is tuned: the launchers pick
one fixed config there, since every benchmark run would cost seconds.

A config is a tuple (tile sizes..., num_warps, num_stages). Every config of every list is
compiled for sm_90 by `bench/compile_sm90.py` (class "default": no spills allowed), since any of
them may win on a GPU. Rows whose length is not a multiple of 16 elements get the first config of
the list only (`tuned`). Nothing here was timed on a GPU.
"""
from __future__ import annotations

import triton


def size_class(*sizes: int) -> int:
    """One int naming the power-of-two bucket of each size (6 bits each): the autotune key."""
    return sum(max(0, int(s) - 1).bit_length() << (6 * i) for i, s in enumerate(sizes))


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
                                     reset_to_zero=reset_to_zero)(kernel) for aligned in (True, False)}
