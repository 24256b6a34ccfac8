#!/usr/bin/env python3
"""Compile every pyinf Triton kernel for sm_90 (H100 / H200) on a machine without a GPU.

    python bench/compile_sm90.py [--kernels DIR] [--json OUT] [--markdown OUT]
                                 [--only TEXT] [--jobs N] [--list]
    python bench/compile_sm90.py --merge RUN.json [RUN.json ...] --markdown OUT

By default the kernels of the installed package ``pyinf.kernels`` are compiled;
``--kernels DIR`` takes a folder laid out like the repository's ``kernels/``
instead (it needs torch and triton, not pyinf). ``--merge`` renders the JSON of
several runs (e.g. one per Triton version) as one markdown table, compiling
nothing. E.g., from the repository root, for the installed Triton and for a
second environment with Triton 3.6.0 (torch, triton, numpy; no pyinf needed):

    python bench/compile_sm90.py --json /tmp/a.json
    /venv-triton36/bin/python bench/compile_sm90.py --kernels kernels --json /tmp/b.json
    python bench/compile_sm90.py --merge /tmp/b.json /tmp/a.json --markdown bench/results/compile-sm90.md

How (no CUDA driver is touched at any point):

1. Every public launcher is called at the Llama-2-13B LoRA shapes of
   `cases()` (per_sample_outer also at Stable Diffusion 1.5's UNet LoRA shapes,
   `SD_LEVELS`, `SD_TEXT`, `SD_RANKS`) on fake CUDA tensors (torch's FakeTensorMode: shape, dtype and
   device "cuda", no memory), with the two GPU queries of ``_util`` answered
   as on an H100 (tensor cores; 132 SMs). The launcher therefore picks block
   sizes, precision and num_warps exactly as it would on the GPU. (Python
   indexing of a fake CUDA tensor is routed through a meta twin,
   `FakeCudaIndexing`: a CPU-only torch cannot open a CUDA device guard.)
2. The launch goes through Triton's own ``JITFunction.run`` (binder,
   specialisation, cache key) with a stand-in driver whose target is sm_90;
   ``triton.knobs.runtime.jit_cache_hook`` records the specialisation and
   answers "skip", so nothing is compiled or launched at that point. Tensors
   reach the binder as `DevicePointer`s (dtype + an address aligned as the
   CUDA caching allocator aligns it), so the 16-byte divisibility hints are
   those of a real launch.
3. Identical specialisations (same kernel, same runtime cache key) are
   compiled once, with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 90, 32))``: ttir -> ttgir -> llir -> ptx -> cubin,
   the last step by the ptxas shipped in the triton wheel. ``--jobs``
   processes compile in parallel (default: min(4, CPUs)); a compiler that
   crashes its process fails that config only.
4. Per specialisation: registers, spill stores / loads and stack frame (the
   ``ptxas -v`` log), shared memory (Triton's metadata) and the MMA
   instruction in the PTX: ``wgmma`` (Hopper warpgroup MMA), ``mma.sync``
   (Ampere-style MMA) or ``none`` (FMA on the CUDA cores). In the JSON also
   the bytes per thread of its global accesses (``gmem``: cp.async / ld / st,
   4 or less = scalar) and ``blocks_per_sm``, the programs one SM holds at
   once by registers, shared memory and warps (with ``grid``, that of the
   first case: the waves on 132 SMs).

Classes of cases:

* ``default``: what the launchers pick on an H100 with no precision override
  (``PYINF_TRITON_PRECISION`` is removed from the environment; Schulz at its
  default "ieee"), at the 13B shapes. A compile error or ANY spill fails.
* ``opt-in``: the precision overrides (``precision=``, i.e.
  ``PYINF_TRITON_PRECISION`` = ieee / tf32 / tf32x3 / bf16x2; Schulz's
  tf32x3 and tf32). A compile error fails; spills are warnings.
* ``edge``: tiny and odd shapes (ints equal to 1 become constexprs, odd sizes
  lose the divisibility hints). A compile error fails; spills are warnings.

A specialisation reached by cases of several classes counts as the strictest.
Exit status 1 when a kernel module fails to import, a launcher raises or
launches nothing, a specialisation fails to compile, a ``@triton.jit`` kernel
of the package is launched by no case (helpers called only from other
kernels, like ``_dot.mma``, are exempt), or a default config spills;
otherwise 0.

Triton versions (checked with 3.6.0, the GPU machines', and 3.9.0, the newest
on PyPI when written). Everything used exists in both:
``triton.knobs`` (``runtime.jit_cache_hook``, ``compilation.always_compile``,
``nvidia.dump_ptxas_log``), ``triton.runtime.driver.set_active``,
``JITFunction.run`` and the hook's ``compile`` dict (signature, constants,
configs[0] = attributes, specialization_data = JSON with the options, as
``JITFunction.preload`` reads it), ``ASTSource(fn, signature, constexprs,
attrs)`` and ``triton.compile(src, target=, options=)``. Differences that
matter: 3.6 runs the wheel's ``bin/ptxas`` (CUDA 12.8) for sm_90, 3.9 runs
``bin/ptxas-blackwell`` (CUDA 13.x) with ``--regAllocOptLevel=2``, so register
counts differ between the two; 3.9 warns when TRITON_DEFAULT_FP_FUSION is
unset (it is set to 1 here, the default of both); the hook gets an extra
``target`` in 3.9 (unused here, keyword arguments).
Autotuned launchers (``triton.autotune``: gram, gfim and schulz on a GPU, see
``kernels/_autotune.py``): the autotuner is not run (it would time the configs
on a GPU); instead every config of its list is recorded as a launch of its own,
case label + `` [tile AxBxC wW sS]`` (tile sizes, num_warps, num_stages), in
the case's class, since any of them may win on the GPU: a default config that
spills fails the check whichever config it is.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

# --- environment, before triton or the kernels are imported -----------------
os.environ["TRITON_INTERPRET"] = "0"            # real JITFunctions and the GPU launch configs
os.environ.pop("PYINF_TRITON_PRECISION", None)  # "default" = no precision override
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of 3.6 and 3.9 (3.9 warns when unset)
_CACHE_DIR = tempfile.mkdtemp(prefix="pyinf_sm90_cache_")
os.environ["TRITON_CACHE_DIR"] = _CACHE_DIR     # a fresh cache: every config goes through ptxas
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
DEFAULT, OPT_IN, EDGE = "default", "opt-in", "edge"

# --- the Llama-2-13B LoRA shapes ----------------------------------------------
C = 900                        # training samples per chunk
ROWS, COLS = 8, 5120           # one LoRA r=8 block (A or Bᵀ): 8 × 5120
D = ROWS * COLS                # 40960 parameters per block
NB = 2                         # blocks per batched launch (160 on the real run: only the grid grows)
GROUP, GROUP_C = 160, 20       # a block group at the 13B shape: 160 blocks per launch, chunks of 20 samples
QUERIES = (1, 16, 100)         # m, query gradients
SCHULZ_K = (900, 5120)         # Schulz inverse sizes: c × c Gram, 5120² GFIM
GROUPS, TOKENS, HIDDEN = 4, 4096, 5120  # grouped LoRA: k groups of M = 32 × 128 rows, K = N = 5120
LORA_RANKS = (8, 64)
BATCH, SEQ = 32, 128           # per-sample outer products: 32 sequences of 128 tokens
# Stable Diffusion 1.5's UNet with LoRA on to_q / to_k / to_v / to_out.0 (issue 16), 512² images = 64² latents:
# (spatial tokens, width) of its attention levels, the text encoder's (tokens, width) that cross-attention's
# to_k / to_v read, LoRA ranks (4: diffusers' train_text_to_image_lora.py default) and the batch.
SD_LEVELS = ((4096, 320), (1024, 640), (256, 1280), (64, 1280))  # 64², 32², 16² and the mid block's 8²
SD_TEXT = (77, 768)
SD_RANKS = (4, 8, 16, 64)
SD_BATCH = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OVERRIDES = ("ieee", "tf32", "tf32x3", "bf16x2")  # the PYINF_TRITON_PRECISION values


@dataclasses.dataclass
class Case:
    module: str                # kernel module (file stem) whose launcher is called
    label: str
    kind: str                  # DEFAULT, OPT_IN or EDGE
    call: Callable[[], Any]    # calls the launcher (inside FakeTensorMode)


def cases(k: dict[str, ModuleType]) -> list[Case]:
    """Every launcher call of the check, in report order. `k`: kernel modules by file stem."""
    out: list[Case] = []

    def add(module: str, label: str, kind: str, call: Callable[[], Any]) -> None:
        if module in k:
            out.append(Case(module, label, kind, call))

    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="cuda")

    gram, gfim, nd, r1 = (k.get(m) for m in ("gram", "gfim", "norms_dots", "rank_one_accumulate"))
    score, sch, gl, pso = (k.get(m) for m in ("score", "schulz", "grouped_lora", "per_sample_outer"))

    def lora(dt, r, *, base_dt=None, M=TOKENS, prec=None, k=GROUPS):
        """grouped_lora as pyinf.forward calls it: base (the base layer's output) updated in place."""
        def call():
            base = None if base_dt is None else t(k, M, HIDDEN, dtype=base_dt)
            return gl.grouped_lora(t(k, M, HIDDEN, dtype=dt), t(k, r, HIDDEN, dtype=dt),
                                   t(k, HIDDEN, r, dtype=dt), 2.0, base=base, out=base, precision=prec)
        return call

    # -- default configs at the 13B shapes ---------------------------------------
    for tag, dt in DTYPES.items():
        add("gram", f"gram {tag} c={C} D={D}", DEFAULT,
            lambda dt=dt: gram.gram(t(NB, C, D, dtype=dt), t(NB, C, D, dtype=dt)))
    add("gram", f"gram fp32 x bf16 c={C} D={D}", DEFAULT,
        lambda: gram.gram(t(NB, C, D), t(NB, C, D, dtype=torch.bfloat16)))
    for tag, dt in DTYPES.items():
        add("gfim", f"gfim {tag} c={C} {ROWS}x{COLS}", DEFAULT,
            lambda dt=dt: gfim.gfim(t(NB, C, ROWS, COLS, dtype=dt)))
    for tag, dt in DTYPES.items():
        add("norms_dots", f"sq_norms {tag} c={C} D={D}", DEFAULT, lambda dt=dt: nd.sq_norms(t(C, D, dtype=dt)))
        for m in QUERIES:
            add("norms_dots", f"norms_dots {tag} m={m}", DEFAULT,
                lambda dt=dt, m=m: nd.norms_dots(t(C, D, dtype=dt), t(m, D)))
            add("score", f"score {tag} m={m}", DEFAULT, lambda dt=dt, m=m: score.score(t(m, D), t(C, D, dtype=dt)))
            add("rank_one_accumulate", f"rank_one_accumulate {tag} m={m}", DEFAULT,
                lambda dt=dt, m=m: r1.rank_one_accumulate(t(m, D), t(C, D, dtype=dt), t(m, D), t(C)))
            add("rank_one_accumulate", f"weighted_sum {tag} m={m}", DEFAULT,
                lambda dt=dt, m=m: r1.weighted_sum(t(m, C), t(C, D, dtype=dt)))
    # one launch per kernel for the group; G a view of a chunk twice as long (block stride 2·c·D)
    grp = lambda: t(GROUP, 2 * GROUP_C, D, dtype=torch.bfloat16)[:, :GROUP_C]  # noqa: E731
    gm, gtag = QUERIES[-1], f"bf16 b={GROUP} c={GROUP_C}"
    add("norms_dots", f"sq_norms {gtag}", DEFAULT, lambda: nd.sq_norms(grp()))
    add("norms_dots", f"norms_dots {gtag} m={gm}", DEFAULT, lambda: nd.norms_dots(grp(), t(GROUP, gm, D)))
    add("score", f"score {gtag} m={gm}", DEFAULT, lambda: score.score(t(GROUP, gm, D), grp()))
    add("rank_one_accumulate", f"rank_one_accumulate {gtag} m={gm}", DEFAULT,
        lambda: r1.rank_one_accumulate(t(GROUP, gm, D), grp(), t(GROUP, gm, D), t(GROUP, GROUP_C)))
    add("rank_one_accumulate", f"weighted_sum {gtag} m={gm}", DEFAULT,
        lambda: r1.weighted_sum(t(GROUP, gm, GROUP_C), grp()))

    def schulz(kk, step, prec="ieee"):
        """A Schulz step as schulz_inverse runs it: k × k padded to n × n (n = k rounded up to 16)."""
        n = -(-kk // 16) * 16
        if step == "residual":
            return lambda: sch.residual(*(t(1, n, n),) * 3, kk, precision=prec)
        return lambda: sch.update(*(t(1, n, n),) * 3, precision=prec)

    for kk in SCHULZ_K:
        for step in ("residual", "update"):
            add("schulz", f"schulz {step} k={kk}", DEFAULT, schulz(kk, step))
    for tag, dt in DTYPES.items():
        for r in LORA_RANKS:
            add("grouped_lora", f"grouped_lora {tag} r={r} M={TOKENS} +{tag} base", DEFAULT, lora(dt, r, base_dt=dt))
        add("grouped_lora", f"grouped_lora {tag} r=8 M={TOKENS} no base", DEFAULT, lora(dt, 8))
        add("grouped_lora", f"grouped_lora {tag} r=8 M=20 +{tag} base", DEFAULT, lora(dt, 8, base_dt=dt, M=20))
    for r in LORA_RANKS:
        add("grouped_lora", f"grouped_lora bf16 r={r} M={TOKENS} +fp32 base", DEFAULT,
            lora(torch.bfloat16, r, base_dt=torch.float32))
    for tag, dt in DTYPES.items():  # one group: fewer M-tiles than SMs, the N split (another specialisation)
        add("grouped_lora", f"grouped_lora {tag} r=8 M={TOKENS} k=1 +fp32 base", DEFAULT,
            lora(dt, 8, base_dt=torch.float32, k=1))
    mask = lambda: torch.ones(BATCH, SEQ, dtype=torch.int64, device="cuda")  # noqa: E731  attention_mask
    for tag, dt in DTYPES.items():
        add("per_sample_outer", f"per_sample_outer {tag} LoRA {ROWS}x{COLS} T={SEQ} mask", DEFAULT,
            lambda dt=dt: pso.per_sample_outer(t(BATCH, SEQ, ROWS, dtype=dt), t(BATCH, SEQ, COLS, dtype=dt), mask()))
        add("per_sample_outer", f"per_sample_outer {tag} {COLS}x{COLS} T={SEQ}", DEFAULT,
            lambda dt=dt: pso.per_sample_outer(t(BATCH, SEQ, COLS, dtype=dt), t(BATCH, SEQ, COLS, dtype=dt)))
    add("per_sample_outer", "per_sample_outer bf16 x fp32 bool mask", DEFAULT,
        lambda: pso.per_sample_outer(t(BATCH, SEQ, ROWS, dtype=torch.bfloat16), t(BATCH, SEQ, COLS),
                                     torch.ones(BATCH, SEQ, dtype=torch.bool, device="cuda")))
    add("per_sample_outer", "per_sample_outer bf16 u T-major (strided)", DEFAULT,
        lambda: pso.per_sample_outer(t(SEQ, BATCH, ROWS, dtype=torch.bfloat16).transpose(0, 1),
                                     t(BATCH, SEQ, COLS, dtype=torch.bfloat16), mask()))
    # SD-1.5 UNet LoRA: u = (B, T, r) (A's output gradient, or A x for B), v = (B, T, d) (the layer's input for
    # A, its output gradient for B); no mask (every spatial position is real)
    def sd(dt, r, T, d):
        return lambda: pso.per_sample_outer(t(SD_BATCH, T, r, dtype=dt), t(SD_BATCH, T, d, dtype=dt))

    for tag, dt in DTYPES.items():
        for r in SD_RANKS:
            for T, d in SD_LEVELS:
                add("per_sample_outer", f"per_sample_outer {tag} SD-1.5 r={r} {d} T={T}", DEFAULT, sd(dt, r, T, d))
            text_T, text_d = SD_TEXT
            add("per_sample_outer", f"per_sample_outer {tag} SD-1.5 r={r} cross to_k/to_v A {text_d} T={text_T}",
                DEFAULT, sd(dt, r, text_T, text_d))
            for _, d in SD_LEVELS[:3]:
                add("per_sample_outer", f"per_sample_outer {tag} SD-1.5 r={r} cross to_k/to_v B {d} T={text_T}",
                    DEFAULT, sd(dt, r, text_T, d))

    # -- opt-in: every precision override, fp32 and bf16 gradients ----------------
    for p in OVERRIDES:
        for tag in ("fp32", "bf16"):
            dt = DTYPES[tag]
            add("gram", f"gram {tag} prec={p}", OPT_IN,
                lambda dt=dt, p=p: gram.gram(t(NB, C, D, dtype=dt), t(NB, C, D, dtype=dt), precision=p))
            add("gfim", f"gfim {tag} prec={p}", OPT_IN,
                lambda dt=dt, p=p: gfim.gfim(t(NB, C, ROWS, COLS, dtype=dt), precision=p))
            for m in (16, 100):
                add("norms_dots", f"norms_dots {tag} m={m} prec={p}", OPT_IN,
                    lambda dt=dt, m=m, p=p: nd.norms_dots(t(C, D, dtype=dt), t(m, D), precision=p))
                add("rank_one_accumulate", f"weighted_sum {tag} m={m} prec={p}", OPT_IN,
                    lambda dt=dt, m=m, p=p: r1.weighted_sum(t(m, C), t(C, D, dtype=dt), precision=p))
            for r in LORA_RANKS:
                add("grouped_lora", f"grouped_lora {tag} r={r} +{tag} base prec={p}", OPT_IN,
                    lora(dt, r, base_dt=dt, prec=p))
    for kk in SCHULZ_K:
        for p in ("tf32x3", "tf32"):
            for step in ("residual", "update"):
                add("schulz", f"schulz {step} k={kk} prec={p}", OPT_IN, schulz(kk, step, p))

    # -- edge shapes: compile only ---------------------------------------------------
    bf16 = torch.bfloat16
    for tag in ("fp32", "bf16"):
        dt = DTYPES[tag]
        add("gram", f"edge gram {tag} c1=1 c2=3 D=17", EDGE,
            lambda dt=dt: gram.gram(t(1, 1, 17, dtype=dt), t(1, 3, 17, dtype=dt)))
        add("grouped_lora", f"edge grouped_lora {tag} k=M=K=N=r=1", EDGE,
            lambda dt=dt: gl.grouped_lora(t(1, 1, 1, dtype=dt), t(1, 1, 1, dtype=dt), t(1, 1, 1, dtype=dt)))
        add("per_sample_outer", f"edge per_sample_outer {tag} B=T=DU=DV=1", EDGE,
            lambda dt=dt: pso.per_sample_outer(t(1, 1, 1, dtype=dt), t(1, 1, 1, dtype=dt)))
    add("gfim", "edge gfim bf16 c=1 rows=1 cols=3", EDGE, lambda: gfim.gfim(t(1, 1, 3, dtype=bf16)))
    add("gram", "edge gram fp16 c1=1 c2=3 D=17", EDGE,
        lambda: gram.gram(t(1, 1, 17, dtype=torch.float16), t(1, 3, 17, dtype=torch.float16)))
    add("gfim", "edge gfim fp16 c=1 rows=1 cols=3", EDGE, lambda: gfim.gfim(t(1, 1, 3, dtype=torch.float16)))
    # rows not a multiple of 16 elements: the first config only (kernels/_autotune.py), the others spill there
    add("gram", f"edge gram bf16 c={C} D={D + 1}", EDGE,
        lambda: gram.gram(t(1, C, D + 1, dtype=bf16), t(1, C, D + 1, dtype=bf16)))
    add("gfim", f"edge gfim fp32 c={C} {ROWS}x33", EDGE, lambda: gfim.gfim(t(1, C, ROWS, 33)))
    add("norms_dots", "edge norms_dots bf16 c=D=m=1", EDGE, lambda: nd.norms_dots(t(1, 1, dtype=bf16), t(1, 1)))
    add("norms_dots", "edge norms_dots fp32 c=5 D=100 m=3", EDGE, lambda: nd.norms_dots(t(5, 100), t(3, 100)))
    add("rank_one_accumulate", "edge rank_one_accumulate bf16 c=D=m=1", EDGE,
        lambda: r1.rank_one_accumulate(t(1, 1), t(1, 1, dtype=bf16), t(1, 1), t(1)))
    for kk in (1, 7):
        for step in ("residual", "update"):
            add("schulz", f"edge schulz {step} k={kk}", EDGE, schulz(kk, step))
    return out


# --------------------------------------------------------------------------- #
# the kernel package
# --------------------------------------------------------------------------- #
def load_kernels(folder: str | None) -> tuple[Path, dict[str, ModuleType], dict[str, str]]:
    """(folder, {file stem: module}, {file stem: import error}) of pyinf.kernels or of `folder`."""
    if folder is None:
        pkg_name = "pyinf.kernels"
        pkg = importlib.import_module(pkg_name)
    else:
        pkg_name = "_pyinf_sm90_kernels"
        path = Path(folder).resolve()
        spec = importlib.util.spec_from_file_location(pkg_name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[pkg_name] = pkg
        spec.loader.exec_module(pkg)
    path = Path(list(pkg.__path__)[0])
    mods, errors = {}, {}
    for f in sorted(path.glob("*.py")):
        if f.stem.startswith("__"):
            continue
        try:
            mods[f.stem] = importlib.import_module(f"{pkg_name}.{f.stem}")
        except Exception as e:  # noqa: BLE001 - reported as a failure
            errors[f.stem] = f"{type(e).__name__}: {e}"
    return path, mods, errors


def jit_kernels(mods: dict[str, ModuleType]) -> tuple[dict[str, JITFunction], dict[str, list[str]]]:
    """({"module.name": kernel} launched from Python, {"module.name": [kernels calling it]} for helpers)."""
    jits = {f"{m}.{a}": o for m, mod in mods.items() for a, o in vars(mod).items()
            if isinstance(o, JITFunction) and o.fn.__module__ == mod.__name__}
    helpers = {}
    for name, jf in jits.items():
        callers = [n for n, other in jits.items()
                   if other is not jf and re.search(rf"\b{jf.fn.__name__}\s*\(", other.src)]
        if callers:
            helpers[name] = callers
    return {n: jf for n, jf in jits.items() if n not in helpers}, helpers


def answer_gpu_queries_as_h100(mods: dict[str, ModuleType]) -> None:
    """The launchers' only CUDA-runtime queries (in _util), answered as on an H100 / H200."""
    u = mods["_util"]
    u._has_tensor_cores = lambda device: True
    u.num_sms = lambda device: H100_SMS


# --------------------------------------------------------------------------- #
# recording launches
# --------------------------------------------------------------------------- #
class DevicePointer:
    """A tensor argument as the binder sees it: dtype and data_ptr() (base aligned like cudaMalloc's)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._addr = (1 << 30) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._addr


class SM90Driver:
    """The driver `JITFunction.run` asks for its device, stream and target while launches are recorded."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET


@dataclasses.dataclass
class Launch:
    kernel: JITFunction
    grid: tuple
    key: Any = None            # the runtime's cache key (specialisation + options)
    signature: dict | None = None
    constexprs: dict | None = None
    attrs: dict | None = None
    options: Any = None        # the backend's options object
    config: str = ""           # " [tile ...]": one config of an autotuned launcher


class FakeCudaIndexing(TorchFunctionMode):
    """`t[...]` on fake CUDA tensors. torch's Python indexing opens a CUDA device guard, which a CPU-only
    build cannot; the view is computed on a meta twin instead and taken with `as_strided` (no guard)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and args[0].device.type == "cuda":
            t, index = args
            view = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")[index]
            return torch.as_strided(t, view.shape, view.stride(), t.storage_offset() + view.storage_offset())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording(launches: list[Launch]):
    """Launchers run inside: each kernel launch is specialised by Triton and appended, never compiled."""
    jit_run = JITFunction.run
    backend = make_backend(TARGET)

    def run(self, *args, grid, warmup, **kwargs):
        if callable(grid):  # grid(meta), as an autotuned launch passes it: meta = the arguments by name
            grid = grid({**dict(zip(self.arg_names, args)), **kwargs})
        launches.append(Launch(self, tuple(grid)))
        ptr = lambda a: DevicePointer(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
        return jit_run(self, *map(ptr, args), grid=grid, warmup=warmup, **{k: ptr(v) for k, v in kwargs.items()})

    def tuned_run(self, *args, grid, warmup, **kwargs):  # every config, none timed (module docstring)
        for cfg in self.configs:
            first = len(launches)
            self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **cfg.all_kwargs())
            for rec in launches[first:]:
                rec.config = f" [tile {'x'.join(map(str, cfg.kwargs.values()))} w{cfg.num_warps} s{cfg.num_stages}]"

    def hook(*, key, compile, **_):
        rec = launches[-1]
        opts = json.loads(compile["specialization_data"])["options"]  # as JITFunction.preload reads them
        rec.options = backend.parse_options({k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()})
        rec.key, rec.signature, rec.constexprs = key, compile["signature"], compile["constants"]
        rec.attrs = compile["configs"][0]
        return True  # skip: no compilation, no launch

    saved_hook, tuner_run = knobs.runtime.jit_cache_hook, Autotuner.run
    JITFunction.run, Autotuner.run, knobs.runtime.jit_cache_hook = run, tuned_run, hook
    try:
        with FakeTensorMode(), FakeCudaIndexing():
            yield
    finally:
        JITFunction.run, Autotuner.run, knobs.runtime.jit_cache_hook = jit_run, tuner_run, saved_hook


# --------------------------------------------------------------------------- #
# compiling
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class Spec:
    """One distinct specialisation: what is compiled, and which cases reached it."""
    kernel: str                # "module.kernel"
    launch: Launch
    cases: list[str]
    kinds: set[str]

    @property
    def kind(self) -> str:     # the strictest class
        return DEFAULT if DEFAULT in self.kinds else EDGE if EDGE in self.kinds else OPT_IN

    def describe(self) -> str:
        """The constexpr values and the pointer / int types, as in the kernel's signature."""
        l = self.launch
        names = [p.name for p in l.kernel.params]
        parts = []
        for i, n in enumerate(names):
            ty = l.signature[n]
            if ty == "constexpr":
                v = l.constexprs.get((i,))
                parts.append(f"{n}={getattr(v, 'value', v)!r}")
            else:  # "/16": the divisibility-by-16 hint (pointer alignment, int value)
                div16 = any(list(a) == ["tt.divisibility", 16] for a in l.attrs.get((i,), []))
                parts.append(f"{n}:{ty}{'/16' if div16 else ''}")
        return ", ".join(parts)


def _mma(ptx: str) -> tuple[str, str]:
    """(kind, detail) of the tensor-core instructions in the PTX: wgmma, mma.sync or none."""
    wg = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.\w+\.(\w+)\.", ptx)))
    ms = sorted(set(re.findall(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.\w+\.(\w+)\.", ptx)))
    kinds = (["wgmma"] if wg else []) + (["mma.sync"] if ms else [])
    detail = ", ".join(f"{s}.{ty}" for s, ty in wg + ms)
    return ("+".join(kinds) or "none"), detail


def _gmem(ptx: str) -> dict:
    """Bytes per thread of each global access in the PTX, by kind: cp.async (global -> shared), ld, st.
    4 or less is a scalar access; 16 a vector (v4 of 32-bit, v8 of 16-bit ...)."""
    cp = {int(x, 0) for x in re.findall(r"cp\.async\.c[ag]\.shared\.global[.\w]* \[[^\]]*\], \[[^\]]*\], "
                                      r"(0x[0-9a-f]+|\d+)", ptx)}

    def widths(op: str) -> list[int]:
        w = set()
        for m in re.finditer(rf"\b{op}\.global((?:\.[A-Za-z0-9_:]+)*)\s", ptx):
            parts = m.group(1).split(".")[1:]
            vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v[248]", p)), 1)
            w.add(vec * int(re.sub(r"\D", "", parts[-1]) or 0) // 8)
        return sorted(w)
    return {"cp.async": sorted(cp), "ld": widths("ld"), "st": widths("st")}


def blocks_per_sm(num_warps: int, regs: int, smem: int) -> int:
    """Programs of a kernel resident on one sm_90 SM at once: 64 K registers (allocated per warp in
    units of 256), 228 KB shared memory (+1 KB reserved per block), 64 warps, 32 blocks."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), 233472 // (smem + 1024), 64 // num_warps, 32)


def _ptxas(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return dict(regs=int(regs[-1]) if regs else None,
                spill_stores=int(spill[-1][0]) if spill else None,
                spill_loads=int(spill[-1][1]) if spill else None,
                stack=int(stack[-1]) if stack else None)


def _short_error(e: BaseException) -> str:
    """One line: the error and, for a Triton frontend error, the kernel source line it points at."""
    while isinstance(e.__cause__, type(e)):  # nested CompilationErrors (inlined helpers): the innermost
        e = e.__cause__
    lines = [ln.rstrip() for ln in str(e).splitlines() if ln.strip()]
    caret = next((i for i, ln in enumerate(lines) if i and set(ln.strip()) == {"^"}), None)
    if caret is not None:  # "at L:C:", the source, a caret under the culprit, the message
        msg = " ".join(ln.strip() for ln in lines[caret + 1:]) or lines[0]
        return f"{type(e).__name__}: {msg} [at `{lines[caret - 1].strip()}`]"[:300]
    tell = next((ln.strip() for ln in lines if re.search(r"\berror\s*:", ln)), lines[0].strip() if lines else "")
    return f"{type(e).__name__}: {tell}"[:300]  # ptxas: its first "error :" line


_SPECS: list[Spec] = []  # read by the (forked) compile workers


def compile_spec(i: int) -> dict:
    """Compile _SPECS[i] for sm_90 down to cubin; the resources, or the error."""
    l = _SPECS[i].launch
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # the ptxas -v log (dump_ptxas_log) is printed
            kernel = triton.compile(ASTSource(l.kernel, l.signature, l.constexprs, l.attrs),
                                    target=TARGET, options=l.options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile error is a reported result
        return dict(ok=False, error=_short_error(e), error_full=f"{type(e).__name__}: {e}"[:20000],
                    seconds=round(time.perf_counter() - t0, 2))
    mma, mma_detail = _mma(kernel.asm.get("ptx", ""))
    return dict(ok=True, **_ptxas(log.getvalue()), smem=kernel.metadata.shared, mma=mma, mma_detail=mma_detail,
                gmem=_gmem(kernel.asm.get("ptx", "")),
                ptx_bytes=len(kernel.asm.get("ptx", "")), cubin_bytes=len(kernel.asm.get("cubin", b"")),
                seconds=round(time.perf_counter() - t0, 2))


def _compile_isolated(i: int) -> dict:
    """compile_spec(i) in a process of its own: a compiler crash (abort, segfault) is that config's result."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as ex:
        try:
            return ex.submit(compile_spec, i).result()
        except BrokenProcessPool:
            return dict(ok=False, error="the compiler crashed (its process died)", error_full="", seconds=None)


def compile_all(n: int, jobs: int) -> list[dict]:
    """compile_spec over _SPECS[:n] in `jobs` forked processes (inline for jobs = 1)."""
    if jobs <= 1:
        return [compile_spec(i) for i in range(n)]
    results: list[dict | None] = [None] * n
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:  # workers inherit _SPECS
        futures = [ex.submit(compile_spec, i) for i in range(n)]
        for i, f in enumerate(futures):
            with contextlib.suppress(BrokenProcessPool):
                results[i] = f.result()
    # a crashed worker takes the pool down: redo what is missing one process each, to pin the crash down
    return [r if r is not None else _compile_isolated(i) for i, r in enumerate(results)]


# --------------------------------------------------------------------------- #
# reporting
# --------------------------------------------------------------------------- #
def _git_commit(path: Path) -> str | None:
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ptxas_version() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tool = get_ptxas(TARGET.arch)
        return f"{Path(tool.path).name} {tool.version}"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def _spill(r: dict) -> str:
    return "-" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}"


def render_markdown(runs: list[dict]) -> str:
    """One table over the runs (one column group per Triton version), rows in the first run's order."""
    heads = [f"Triton {r['triton']}" for r in runs]
    lines = ["| kernel | config (first case) | class | warps | " + " | ".join(
        f"{h}: regs | spill st/ld B | smem B | MMA" for h in heads) + " |"]
    lines.append("|" + "---|" * (4 + 4 * len(runs)))
    index = [{(x["kernel"], x["cases"][0]): x for x in r["results"]} for r in runs]
    for x in runs[0]["results"]:
        more = f" (+{len(x['cases']) - 1})" if len(x["cases"]) > 1 else ""
        cells = [f"`{x['kernel'].split('.')[-1]}`", x["cases"][0] + more, x["class"], str(x["num_warps"])]
        for idx in index:
            y = idx.get((x["kernel"], x["cases"][0]))
            if y is None:
                cells += ["n/a"] * 4
            elif not y["ok"]:
                cells += ["**FAIL**", "", "", y["error"][:80].replace("|", "/")]
            else:
                sp = _spill(y)
                sp = f"**{sp}**" if (y["spill_stores"] or y["spill_loads"]) else sp
                mma = y["mma"] + (f" ({y['mma_detail']})" if y["mma_detail"] else "")
                cells += [str(y["regs"]), sp, str(y["smem"]), mma]
        lines.append("| " + " | ".join(cells) + " |")
    summary = []
    for r in runs:
        s = r["summary"]
        summary.append(
            f"* Triton {r['triton']} (torch {r['torch']}, {r['ptxas']}), commit {(r['commit'] or '?')[:12]}, {r['date']}: "
            f"{s['specialisations']} distinct specialisations from {s['cases']} launcher calls, "
            f"{s['compile_errors']} compile errors, {s['default_spills']} default configs with spills, "
            f"{s['warnings']} warnings (opt-in / edge spills), exit status {r['exit_status']}; "
            f"{r['wall_seconds']:.0f} s wall on {r['cpus']} CPUs with {r['jobs']} compile processes ({r['cpu']}).")
        summary += [f"  * {kind}: {text}" for kind, items in (("FAIL", r["failures"]), ("warning", r["warnings"]))
                    for text in items]
    intro = (
        "# Triton kernels compiled for sm_90 (H100 / H200), without a GPU\n\n"
        "Written by `bench/compile_sm90.py` (see its docstring): every launcher called at the Llama-2-13B LoRA "
        "shapes with its launches recorded, each distinct specialisation compiled to cubin with "
        "`triton.compile(..., target=GPUTarget(\"cuda\", 90, 32))` and the ptxas of the triton wheel. "
        "Nothing here ran on a GPU. Class `default`: the configs the launchers pick on an H100 with no "
        "precision override (spills fail the check); `opt-in`: `PYINF_TRITON_PRECISION` / `precision=` "
        "overrides; `edge`: tiny shapes (spills there are warnings). \"(+n)\": n more launcher calls compiled "
        "to the same specialisation. Spill: bytes of spill stores / loads per thread (bold: nonzero). "
        "MMA: `wgmma` (Hopper warpgroup MMA), `mma.sync` (Ampere-style) or `none` (FMA on the CUDA cores), "
        "with shape and input type.\n\n")
    return intro + "\n".join(summary) + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", metavar="DIR", help="a kernels folder (default: the installed pyinf.kernels)")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    ap.add_argument("--markdown", metavar="OUT", help="write the results table as markdown")
    ap.add_argument("--only", metavar="TEXT", help="only the cases whose label contains TEXT (no coverage check)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--list", action="store_true", help="record and list the specialisations, compile nothing")
    ap.add_argument("--merge", nargs="+", metavar="RUN.json", help="render these runs' JSON with --markdown")
    a = ap.parse_args(argv)

    if a.merge:
        if not a.markdown:
            ap.error("--merge needs --markdown")
        runs = [json.loads(Path(p).read_text()) for p in a.merge]
        Path(a.markdown).write_text(render_markdown(runs))
        return 0

    t_start = time.perf_counter()
    driver.set_active(SM90Driver())  # for the whole run: no real driver is ever created
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    folder, mods, import_errors = load_kernels(a.kernels)
    print(f"# triton {triton.__version__}, torch {torch.__version__}, target sm_{TARGET.arch}, "
          f"{_ptxas_version()}, kernels {folder}")
    failures: list[str] = [f"import {m}: {e}" for m, e in import_errors.items()]
    warns: list[str] = []
    if "_util" not in mods:
        failures.append("no _util module: cannot answer the launchers' GPU queries")
        mods = {}
    else:
        answer_gpu_queries_as_h100(mods)
    kernels, helpers = jit_kernels(mods)
    names = {id(jf): n for n, jf in kernels.items()}

    # 1. record: every case's launches, grouped by the runtime's cache key
    all_cases = [c for c in cases(mods) if not a.only or a.only in c.label]
    by_key: dict[tuple, Spec] = {}
    for case in all_cases:
        launches: list[Launch] = []
        try:
            with recording(launches):
                case.call()
        except Exception as e:  # noqa: BLE001
            failures.append(f"{case.label}: the launcher raised {_short_error(e)}")
            continue
        if not launches:
            failures.append(f"{case.label}: the launcher launched nothing")
        for l in launches:
            name = names.get(id(l.kernel), l.kernel.fn.__qualname__)
            if l.key is None:
                failures.append(f"{case.label}: {name} was not specialised (Triton API change?)")
                continue
            spec = by_key.setdefault((name, l.key), Spec(name, l, [], set()))
            spec.cases.append(case.label + l.config)
            spec.kinds.add(case.kind)
    specs = list(by_key.values())
    covered = {s.kernel for s in specs}
    if not a.only:
        for n in sorted(set(kernels) - covered):
            failures.append(f"{n}: no case launches this kernel (add one to cases())")
    print(f"# {len(all_cases)} launcher calls -> {len(specs)} distinct specialisations; "
          f"helpers inlined: {', '.join(f'{h} (in {len(c)} kernels)' for h, c in helpers.items()) or 'none'}")

    if a.list:
        for s in specs:
            l = s.launch
            print(f"{s.kernel:<36} {s.kind:<8} nw={l.options.num_warps} ns={l.options.num_stages} grid={l.grid}"
                  f"  {'; '.join(s.cases)}\n    {s.describe()}")
        for f in failures:
            print(f"FAIL {f}")
        return 1 if failures else 0

    # 2. compile
    _SPECS[:] = specs
    t_compile = time.perf_counter()
    results = compile_all(len(specs), a.jobs)
    t_compile = time.perf_counter() - t_compile

    # 3. judge and report
    rows = []
    for s, r in zip(specs, results):
        l = s.launch
        row = dict(kernel=s.kernel, cases=s.cases, **{"class": s.kind}, num_warps=l.options.num_warps,
                   num_stages=l.options.num_stages, grid=list(l.grid), specialisation=s.describe(), **r)
        if r["ok"] and r["regs"] is not None:
            row["blocks_per_sm"] = blocks_per_sm(l.options.num_warps, r["regs"], r["smem"])
        spills = r["ok"] and bool(r["spill_stores"] or r["spill_loads"])
        head = f"{s.kernel.split('.')[-1]:<26} {s.kind:<8} {s.cases[0]:<48}"
        if not r["ok"]:
            status = "FAIL"
            failures.append(f"{s.kernel} [{s.cases[0]}]: {r['error']}")
        elif r["regs"] is None or r["spill_stores"] is None:
            status = "FAIL"
            failures.append(f"{s.kernel} [{s.cases[0]}]: no register / spill figures in the ptxas -v log")
        elif spills and s.kind == DEFAULT:
            status = "FAIL"
            failures.append(f"{s.kernel} [{s.cases[0]}]: spills {_spill(r)} B in a default config")
        elif spills:
            status = "WARN"
            warns.append(f"{s.kernel} [{s.cases[0]}]: spills {_spill(r)} B ({s.kind})")
        else:
            status = "OK"
        row["status"] = status
        rows.append(row)
        if r["ok"]:
            mma = r["mma"] + (f" ({r['mma_detail']})" if r["mma_detail"] else "")
            print(f"{status:<4} {head} nw={l.options.num_warps} regs={r['regs']} spill={_spill(r)} "
                  f"stack={r['stack']} smem={r['smem']} mma={mma} {r['seconds']}s")
        else:
            print(f"{status:<4} {head} nw={l.options.num_warps} {r['error']}")
        if len(s.cases) > 1:
            print(f"       also: {'; '.join(s.cases[1:])}")
    for w in warns:
        print(f"WARN {w}")
    for f in failures:
        print(f"FAIL {f}")
    rc = 1 if failures else 0
    wall = time.perf_counter() - t_start
    n_err = sum(not r["ok"] for r in results)
    n_def_spill = sum(row["class"] == DEFAULT and row["ok"] and bool(row["spill_stores"] or row["spill_loads"])
                      for row in rows)
    print(f"# {len(specs) - n_err}/{len(specs)} compiled, {n_err} compile errors, {n_def_spill} default configs "
          f"spill, {len(warns)} warnings, {len(failures)} failures; compile {t_compile:.0f} s with {a.jobs} "
          f"processes, wall {wall:.0f} s; exit {rc}")

    run = dict(
        triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
        target=f"cuda sm_{TARGET.arch} (warp {TARGET.warp_size})", ptxas=_ptxas_version(),
        commit=_git_commit(folder) or _git_commit(Path(__file__).parent),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        kernels=str(folder), cpu=_cpu_model(), cpus=os.cpu_count(), jobs=a.jobs,
        wall_seconds=round(wall, 1), compile_seconds=round(t_compile, 1), exit_status=rc,
        summary=dict(cases=len(all_cases), specialisations=len(specs), compile_errors=n_err,
                     default_spills=n_def_spill, warnings=len(warns), failures=len(failures)),
        failures=failures, warnings=warns, results=rows)
    if a.json:
        Path(a.json).write_text(json.dumps(run, indent=1) + "\n")
    if a.markdown:
        Path(a.markdown).write_text(render_markdown([run]))
    return rc


if __name__ == "__main__":
    try:
        code = main()
    finally:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (triton's nanobind prints "leaked ..." noise at exit)
