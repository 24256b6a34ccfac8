"""Cost model of the influence passes at the 13B LoRA shape, on the CPU (issue 13, item 4).

Per method and entry path, without 12 GB of real tensors, it measures:

- primitive calls: every backend call with an operand `G` (`G1`/`G2` for
  `gram`), the training gradients, and the bytes of G it covers (numel x
  itemsize of the G operand, whatever its rank: (c, D), (c, rows, cols) or a
  batch of blocks; `gram` counts both operands unless they are the same data;
  `calls_on_copies_of_g` counts the calls given a copy of G, not its storage);
- passes (one per `chunks()` iteration of the training source that yields),
  primitive calls per pass, and reads of G = bytes of G covered / bytes of G;
- the peak memory the method allocates beyond G and the queries.

How (the numbers are counts on the real code, not estimates):

- G and the queries are meta tensors (shape and dtype, no data), so the real
  method code runs at the real shape in seconds and without memory.
- `CountingBackend` wraps the torch reference backend and records each call
  (a wrapper, so the kernels' own reads are not seen: the Triton
  `rank_one_accumulate` reads G twice per call, counted once here).
- `MetaRun`, a TorchDispatchMode, tracks the live bytes of every tensor
  storage created while the method runs (each storage counted once, views are
  free, a storage is freed when its last tensor dies: the torch allocator's
  "allocated" bytes, not its cache), and answers the host syncs that meta
  tensors cannot: `bool(t.any())` is False and `bool(t.all())` True (clean,
  finite data), any other scalar read is 1 (1.0, True), and a copy to the CPU
  (`.tolist()`, `.cpu()`) is ones. So data-dependent loops run their maximum:
  LiSSA all its iterations, Schulz (not used: Cholesky succeeds) would too.
  It also counts the bytes of G read by any aten op (`aten_reads_of_g`; on the
  torch backend the same as the primitives' unless a method reads G itself).

Entry paths (each mirrors the code it names; update it with that code):

- "influence": `pyinf.influence`: `as_blocks`, `TensorSource` with the
  default chunk size, `method.fit(train)`, `method.influence(queries)`;
  train and queries bf16.
- "attributor": `Attributor.fit`/`score` with `store="auto"` on a GPU: the
  store `make_store("gpu", chunk_size=None)` makes (the Attributor's default
  chunk size), filled with G in bf16, then `method.fit(store)` and
  `method.influence(V)` each inside `store.phase`; V float32 (what
  `Attributor.query_grads` returns).

Usage: `python bench/costmodel.py [--methods datainf exact] [--paths influence]`
writes `bench/results/costmodel-<timestamp>.json` and prints a table. The
budgets of issue 13 are checked by `tests/test_cost_model.py` (`violations`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import statistics
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyinf.backends import get_backend
from pyinf.blocks import Block, TensorSource, as_blocks
from pyinf.methods import get_method
from pyinf.store import make_store

aten = torch.ops.aten
META = torch.device("meta")
MB, GB = 10**6, 10**9


@dataclass(frozen=True)
class Shape:
    blocks: int
    rows: int
    cols: int
    n: int
    m: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def g_bytes(self) -> int:
        """Bytes of all training gradients G."""
        return self.n * self.blocks * self.rows * self.cols * self.dtype.itemsize


# Llama-2-13B with LoRA r = 8 on q, v: 160 blocks of 8 x 5120; n = 900 train, m = 100 queries (11.8 GB of G).
SHAPE_13B = Shape(blocks=160, rows=8, cols=5120, n=900, m=100)
METHODS = {"tracin": {}, "datainf": {}, "lissa": {"iterations": 3}, "hyperinf": {}, "exact": {}, "kfac": {}, "ekfac": {}}
PATHS = ("influence", "attributor")
# kfac/ekfac read the K-FAC statistics the capture accumulates into the store: no "influence" path
FACTOR_METHODS = ("kfac", "ekfac")


def paths(method: str) -> tuple[str, ...]:
    """The entry paths `method` has."""
    return ("attributor",) if method in FACTOR_METHODS else PATHS

# Issue 13, "Budgets": every call covers >= 32 MB of G (or all of G), <= ~370 calls a pass (11.8 GB / 32 MB);
# reads of G (lissa: per iteration, during precondition); exact's Gram: one read of G, <= 4 launches per
# block group; peak allocation beyond G and the model. MB and GB are decimal, as the 11.8 GB of G.
MIN_CALL_BYTES = 32 * MB
MAX_CALLS_PER_PASS = 370
MAX_READS = {"tracin": 1, "datainf": 3, "hyperinf": 2, "exact": 2, "kfac": 1, "ekfac": 2}
MAX_LISSA_READS_PER_ITERATION = 1
MAX_GRAM_READS = 1
MAX_GRAM_LAUNCHES_PER_BLOCK_GROUP = 4
# kfac/ekfac: beyond the store's K-FAC statistics too (16.8 GB at the 13B shape, held like G), issue 14
MAX_PEAK_BYTES = {"hyperinf": 24 * GB, "exact": 8 * GB, "kfac": 24 * GB, "ekfac": 24 * GB}


# -- counting ------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _data_key(t: torch.Tensor) -> tuple:
    """The same data: same storage, offset, shape and strides (two views of one chunk are one read)."""
    return _storage_key(t), t.storage_offset(), tuple(t.shape), t.stride()


@dataclass
class Call:
    name: str
    phase: str
    pass_index: int | None  # the innermost pass running, or None
    g_bytes: int  # bytes of the G operand(s); 0 for a call without one (spd_inverse)
    g_batch: int  # blocks in the call: G's leading axis when G is (b, c, D) for gram, else 1
    shapes: tuple


class OverBudget(Exception):
    """Raised by a `Recorder` with `stop_over_budget` once a pass or the Gram certainly exceeds its budget."""


@dataclass
class Recorder:
    """Primitive calls, passes and phases (fit / precondition / influence / score_pass) of one run.

    `train`: storage keys of the training gradients (a G operand elsewhere is a copy of them).
    `stop_over_budget`: raise `OverBudget` at the first pass with more than `MAX_CALLS_PER_PASS`
    calls, or once the Gram has more than `MAX_GRAM_LAUNCHES_PER_BLOCK_GROUP` launches per
    block (`n_blocks` blocks), so a test does not wait for the rest of a run already over budget.
    """

    train: set = field(default_factory=set)
    n_blocks: int = 1
    stop_over_budget: bool = False
    calls: list[Call] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)  # the phase each pass ran in
    copies: int = 0  # calls whose G operand is not the training gradients' storage
    _passes: list[int] = field(default_factory=list)  # running passes, innermost last
    _phases: list[str] = field(default_factory=lambda: ["setup"])
    _in_pass: dict[int, int] = field(default_factory=dict)  # pass -> calls so far
    _gram_blocks: int = 0

    def record(self, name: str, g_ops: list[torch.Tensor], shapes: tuple) -> None:
        seen, g_bytes = set(), 0
        for t in g_ops:
            key = _data_key(t)
            if key not in seen:
                seen.add(key)
                g_bytes += t.numel() * t.element_size()
        self.copies += any(_storage_key(t) not in self.train for t in g_ops)
        batch = g_ops[0].shape[0] if name == "gram" and g_ops and g_ops[0].dim() == 3 else 1
        where = self._passes[-1] if self._passes else None
        self.calls.append(Call(name, self._phases[-1], where, g_bytes, batch, shapes))
        if not g_bytes or not self.stop_over_budget:
            return
        if where is not None:
            self._in_pass[where] = self._in_pass.get(where, 0) + 1
            if self._in_pass[where] > MAX_CALLS_PER_PASS:
                raise OverBudget(f"more than {MAX_CALLS_PER_PASS} primitive calls in pass {where}")
        if name == "gram":
            self._gram_blocks += batch
            if self._gram_blocks > MAX_GRAM_LAUNCHES_PER_BLOCK_GROUP * self.n_blocks:
                raise OverBudget(f"more than {MAX_GRAM_LAUNCHES_PER_BLOCK_GROUP} gram launches per block group")

    @contextlib.contextmanager
    def counted_passes(self, source):
        """Within the `with`, each iteration of `source.chunks()` that yields is one pass (an instance patch)."""
        inner = source.chunks

        def chunks(names=None, start=0):
            it, index = inner(names, start=start), None
            try:
                for item in it:
                    if index is None:
                        index = len(self.passes)
                        self.passes.append(self._phases[-1])
                        self._passes.append(index)
                    yield item
            finally:
                if index is not None:
                    self._passes.remove(index)
                it.close()

        source.chunks = chunks
        try:
            yield
        finally:
            del source.chunks  # the class's method again (a store is reused by the next run)

    def phased(self, method) -> None:
        """Label the calls made inside fit / precondition / influence / score_pass (patches the instance)."""
        for name in ("fit", "precondition", "influence", "score_pass"):
            inner = getattr(method, name)

            def wrapped(*args, _inner=inner, _name=name, **kwargs):
                self._phases.append(_name)
                try:
                    return _inner(*args, **kwargs)
                finally:
                    self._phases.pop()

            setattr(method, name, wrapped)


@functools.lru_cache(maxsize=None)
def _signature(cls: type, name: str) -> inspect.Signature:
    return inspect.signature(getattr(cls, name))  # of the function: bind (self, *args)


class CountingBackend:
    """The torch reference backend, recording every call in `recorder` (G operands: parameters named G, G1, G2)."""

    def __init__(self, recorder: Recorder, device: torch.device = torch.device("cpu")):
        self._inner = get_backend("torch", device)
        self._recorder = recorder

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr
        signature = _signature(type(self._inner), name)

        def call(*args, **kwargs):
            bound = signature.bind(self._inner, *args, **kwargs).arguments
            g_ops = [v for k, v in bound.items() if k in ("G", "G1", "G2") and isinstance(v, torch.Tensor)]
            shapes = tuple(tuple(v.shape) for v in bound.values() if isinstance(v, torch.Tensor))
            self._recorder.record(name, g_ops, shapes)
            return attr(*args, **kwargs)

        return call


# -- meta tensors: memory and host syncs ---------------------------------------------------------
def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class MetaRun(TorchDispatchMode):
    """Live bytes of the meta storages created while `tracking`, and answers to host syncs (module docstring).

    `train`: the training gradients' tensors; their storages are never counted
    as allocations, and the bytes aten ops read from them add to `read_bytes`.
    """

    def __init__(self, train=()):
        super().__init__()
        self.train = {_storage_key(t) for t in train}
        self.tracking = False
        self.live: dict[int, int] = {}  # storage -> bytes
        self.now = self.peak = self.read_bytes = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].is_meta:
            t = args[0]
            value = getattr(t, "_costmodel_value", True)
            return bool(value) if t.dtype == torch.bool else (float(value) if t.is_floating_point() else int(value))
        if func is aten._to_copy.default and args[0].is_meta and torch.device(kwargs.get("device", META)).type == "cpu":
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = func(*args, **kwargs)
        if func.overloadpacket in (aten.any, aten.all):
            out._costmodel_value = func.overloadpacket is aten.all  # nothing bad, everything finite
        if self.tracking:
            inputs = list(_tensors((args, kwargs)))
            if not func.is_view:
                read = {_data_key(t): t.numel() * t.element_size() for t in inputs if _storage_key(t) in self.train}
                self.read_bytes += sum(read.values())
            used = {_storage_key(t) for t in inputs}
            for t in _tensors(out):
                if t.is_meta:
                    key = _storage_key(t)
                    if key not in used and key not in self.live and key not in self.train:
                        storage = t.untyped_storage()
                        self.live[key] = storage.nbytes()
                        self.now += self.live[key]
                        weakref.finalize(storage, self._free, key)
            self.peak = max(self.peak, self.now)
        return out


# -- the two entry paths ---------------------------------------------------------------------------
def meta_grads(shape: Shape, count: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {f"block{i}": torch.empty(count, shape.rows, shape.cols, dtype=dtype, device=META)
            for i in range(shape.blocks)}


def attributor_store(shape: Shape, train: dict[str, torch.Tensor]):
    """The store `Attributor.fit` makes with `store="auto"` on a GPU (bf16, default chunk size), holding `train`,
    retargeted to the meta device (make_store("gpu") needs a CUDA device name; nothing touches CUDA), with
    the K-FAC statistics kfac/ekfac read (`pyinf.factors`, on meta: store memory, like G)."""
    from pyinf.factors import FactorStats

    blocks = [Block(name, shape.rows, shape.cols) for name in train]
    store = make_store("gpu", blocks=blocks, device=torch.device("cuda"), grad_dtype=shape.dtype, progress=False)
    store.device = store.storage = META
    store.factors = FactorStats(store.blocks, META)
    with MetaRun():  # the capture's finite check reads a flag back
        store.fill(lambda batch: batch, [train])
    store.comm, store.offset = None, 0  # Attributor._place on one process
    return store


def run(method: str, path: str, shape: Shape = SHAPE_13B, options: dict | None = None, *, store=None,
        train=None, queries=None, stop_over_budget: bool = False) -> dict:
    """Fit `method` and score `shape.m` queries through `path` on meta tensors; the summary (see `summarize`).

    `store` (attributor: e.g. one `attributor_store` for every method), `train` and `queries` (real small
    tensors, for the harness's own tests) replace the meta ones. `stop_over_budget`: see `Recorder`; the
    summary then covers the calls up to the stop and says why in "stopped".
    """
    options = METHODS[method] if options is None else options
    if path == "influence":
        train = meta_grads(shape, shape.n, shape.dtype) if train is None else train
        queries = meta_grads(shape, shape.m, shape.dtype) if queries is None else queries
        train_tensors = list(train.values())
    elif path == "attributor":
        store = attributor_store(shape, meta_grads(shape, shape.n, shape.dtype)) if store is None else store
        queries = meta_grads(shape, shape.m, torch.float32) if queries is None else queries
        train_tensors = [t for _, chunk in store.chunks() for t in chunk.values()]
    else:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
    n_blocks = len(queries)
    mode = MetaRun(train_tensors)
    rec = Recorder(set(mode.train), n_blocks, stop_over_budget)
    scores, stopped = None, None
    t0 = time.perf_counter()
    try:
        with mode, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LiSSA's "did not converge": the residual is 1 on meta tensors
            mode.tracking = True
            m = get_method(method)(CountingBackend(rec), **options)
            rec.phased(m)
            if path == "influence":  # pyinf.influence, default chunk size
                source = TensorSource(as_blocks(train, "train_grads"))
                V = as_blocks(queries, "query_grads", blocks=source.blocks)
                with rec.counted_passes(source):
                    m.fit(source)
                    scores = m.influence(V)
            else:  # Attributor.fit / score
                with rec.counted_passes(store):
                    with store.phase(f"{method}: fit"):
                        m.fit(store)
                    with store.phase(f"{method}: score"):
                        scores = m.influence(queries)
    except OverBudget as err:
        stopped = str(err)
    finally:
        mode.tracking = False
    seconds = time.perf_counter() - t0
    g_bytes = sum(t.numel() * t.element_size() for t in train_tensors)
    r = summarize(rec, mode, g_bytes, n_blocks)
    r.update(method=method, path=path, options=dict(options), stopped=stopped, seconds=round(seconds, 2),
             scores_shape=None if scores is None else list(scores.shape))
    return r


def summarize(rec: Recorder, mode: MetaRun, g_bytes: int, n_blocks: int) -> dict:
    """The figures of one run (`run` adds method, path, options, stopped, seconds, scores_shape)."""
    g_calls = [c for c in rec.calls if c.g_bytes]
    per_pass = [0] * len(rec.passes)
    for c in g_calls:
        if c.pass_index is not None:
            per_pass[c.pass_index] += 1
    bytes_by_phase: dict[str, int] = {}
    for c in g_calls:
        bytes_by_phase[c.phase] = bytes_by_phase.get(c.phase, 0) + c.g_bytes
    by_name: dict[str, int] = {}
    for c in rec.calls:
        by_name[c.name] = by_name.get(c.name, 0) + 1
    grams = [c for c in g_calls if c.name == "gram"]
    sizes = [c.g_bytes for c in g_calls]
    return {
        "g_bytes": g_bytes,
        "passes": len(rec.passes),
        "calls": len(g_calls),
        "calls_per_pass": per_pass,
        "calls_outside_passes": sum(c.pass_index is None for c in g_calls),
        "calls_by_primitive": by_name,
        "calls_on_copies_of_g": rec.copies,
        "min_call_bytes": min(sizes) if sizes else 0,
        "median_call_bytes": statistics.median(sizes) if sizes else 0,
        "reads_of_g": sum(sizes) / g_bytes,
        "reads_of_g_by_phase": {phase: b / g_bytes for phase, b in bytes_by_phase.items()},
        "aten_reads_of_g": mode.read_bytes / g_bytes,
        "gram_reads_of_g": sum(c.g_bytes for c in grams) / g_bytes,
        # a call serves g_batch blocks (a block group): the launches that touch one block, on average
        "gram_launches_per_block_group": sum(c.g_batch for c in grams) / n_blocks,
        "peak_bytes": mode.peak,
    }


def violations(r: dict) -> list[str]:
    """The issue 13 budgets `r` (a `run` summary at the 13B shape) exceeds, one readable line each."""
    out, what = [], f"{r['method']} via {r['path']}"
    floor = min(MIN_CALL_BYTES, r["g_bytes"])
    if r["min_call_bytes"] < floor:
        small = r["min_call_bytes"] / MB
        out.append(f"{what}: a primitive call covers {small:.2f} MB of G < {floor / MB:.0f} MB")
    if max(r["calls_per_pass"], default=0) > MAX_CALLS_PER_PASS:
        out.append(f"{what}: {max(r['calls_per_pass'])} primitive calls in a pass > {MAX_CALLS_PER_PASS}")
    if r["method"] == "lissa":
        per_iteration = r["reads_of_g_by_phase"].get("precondition", 0.0) / r["options"]["iterations"]
        if per_iteration > MAX_LISSA_READS_PER_ITERATION + 1e-9:
            out.append(f"{what}: {per_iteration:.2f} reads of G per iteration > {MAX_LISSA_READS_PER_ITERATION}")
    elif r["reads_of_g"] > MAX_READS[r["method"]] + 1e-9:
        out.append(f"{what}: {r['reads_of_g']:.2f} reads of G > {MAX_READS[r['method']]}")
    if r["method"] == "exact":
        if r["gram_reads_of_g"] > MAX_GRAM_READS + 1e-9:
            out.append(f"{what}: the Gram reads G {r['gram_reads_of_g']:.2f} times > {MAX_GRAM_READS}")
        if r["gram_launches_per_block_group"] > MAX_GRAM_LAUNCHES_PER_BLOCK_GROUP:
            out.append(f"{what}: {r['gram_launches_per_block_group']:.2f} gram launches per block group "
                       f"> {MAX_GRAM_LAUNCHES_PER_BLOCK_GROUP}")
    limit = MAX_PEAK_BYTES.get(r["method"])
    if limit is not None and r["peak_bytes"] > limit:
        out.append(f"{what}: peak allocation {r['peak_bytes'] / GB:.1f} GB beyond G > {limit / GB:.0f} GB")
    return out


def table(results: list[dict]) -> str:
    head = (f"{'method':9} {'path':10} {'passes':>6} {'calls':>7} {'max/pass':>8} {'min MB':>7} {'med MB':>7} "
            f"{'reads':>6} {'peak GB':>8} {'s':>6}")
    rows = [head]
    for r in results:
        rows.append(
            f"{r['method']:9} {r['path']:10} {r['passes']:>6} {r['calls']:>7} {max(r['calls_per_pass'], default=0):>8} "
            f"{r['min_call_bytes'] / MB:>7.2f} {r['median_call_bytes'] / MB:>7.2f} {r['reads_of_g']:>6.2f} "
            f"{r['peak_bytes'] / GB:>8.2f} {r['seconds']:>6.1f}"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    args = parser.parse_args(argv)
    import machine  # bench/ is on sys.path when this file runs as a script

    shape = SHAPE_13B
    store = attributor_store(shape, meta_grads(shape, shape.n, shape.dtype)) if "attributor" in args.paths else None
    results = []
    for method in args.methods:
        for path in (p for p in args.paths if p in paths(method)):
            r = run(method, path, store=store if path == "attributor" else None)
            r["violations"] = violations(r)
            results.append(r)
            print(table([r]).splitlines()[-1], flush=True)
    print(table(results))
    for r in results:
        for line in r["violations"]:
            print("over budget:", line)
    out = machine.write_result("costmodel", {
        "shape": {"blocks": shape.blocks, "rows": shape.rows, "cols": shape.cols, "n": shape.n, "m": shape.m,
                  "dtype": str(shape.dtype), "g_bytes": shape.g_bytes},
        "backend": "torch reference, counted (bench/costmodel.py)",
        "budgets": {"min_call_bytes": MIN_CALL_BYTES, "max_calls_per_pass": MAX_CALLS_PER_PASS, "max_reads": MAX_READS,
                    "max_lissa_reads_per_iteration": MAX_LISSA_READS_PER_ITERATION, "max_gram_reads": MAX_GRAM_READS,
                    "max_gram_launches_per_block_group": MAX_GRAM_LAUNCHES_PER_BLOCK_GROUP,
                    "max_peak_bytes": MAX_PEAK_BYTES},
        "machine": machine.machine_info(),
        "results": results,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
