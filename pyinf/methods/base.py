"""The protocol every method follows: fit -> precondition -> score_pass (the three names: a method's
scoring pass `score_pass`, the whole influence `influence` / `pyinf.Attributor.score`, the backend primitive
`Backend.score`).

- `fit(train)` reads the training gradients (one or more passes over the
  source) and keeps the statistics the method needs: per-block damping λ_b,
  squared norms, Grams, GFIMs...
- `precondition(queries)` turns query gradients `V_b` (m, rows, cols) into
  `H_b` (m, D_b) ≈ V_b (F_b + λ_b I)⁻¹.
- `score_pass(train, H)` is one pass: `score[j, i] = −Σ_b ⟨h_jb, g_ib⟩`, shape (m, n)
  (`influence(queries)` = precondition + score_pass: the whole influence).

Per-block scores (`per_block=True` in `influence`, `score_pass`, `score_chunks`):
block b's share `−⟨h_jb, g_ib⟩`, stacked `(n_blocks, m, n)` in the order of
`self.blocks`; the shares sum over blocks to the `(m, n)` scores. Where the
summed form makes one backend call per group (`Backend.score`, which sums over
the group's blocks inside), the per-block form makes one `Backend.dots` call
per group (`(b, m, c)`, the group's blocks kept apart): the same reads of G.

A method is one module defining a subclass with its `name` and its options
(`Options`, a dataclass of `pyinf.options`: defaults and rules, validated
there); everything else is shared here.

Block groups. Blocks of the same shape form a group (`pyinf.blocks.group_blocks`:
all 160 blocks of a 13B LoRA adapter on q and v are one group), and every pass
makes one backend call per group and chunk on the stacked `(b, c, D)` gradients
(`_grouped`), not one per block. Per-block statistics are kept stacked per
group (`(b, ...)` tensors) and H is returned as per-block views of one
`(b, m, D)` stack per group, which `stack_group` turns back into the stack
without a copy.

Data parallelism (`pyinf.distributed`): the training source may be one shard
of the data (`train.comm`, a `Comm`, and `train.offset`, the global index of
its first sample; plain sources have `comm = None`). Methods stay written
once: `self.n` is the GLOBAL sample count (the n of every formula), `train.n`
the local one (array sizes, chunk indices), and where a method finishes
accumulating a statistic over chunks it calls `self._allreduce(t)` /
`self._allreduce_dict(d)` (sums across ranks, in place) or
`self._all_columns(P)` (the (m, n_local) columns of every rank as (m, n)) —
all no-ops without a process group, so single-process results are unchanged.
Queries given to `precondition` must be the same on every rank (the
Attributor broadcasts them); `score` returns the local columns.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import ClassVar

import torch

from ..backends import Backend
from ..blocks import Block, BlockGroup, GradientSource, check_finite, stack_group, unstack_group
from ..options import Options

DAMPING_MODES = ("relative", "absolute")


class Method:
    """Base class of all methods. Subclasses set `name`, `Options` and override `_fit`/`precondition`."""

    name: ClassVar[str] = "abstract"
    #: the method's options (a `pyinf.options.Options` dataclass); anything else passed by the user is an error.
    Options: ClassVar[type[Options]] = Options
    #: whether `fit` needs the per-block damping (tracin does not).
    needs_damping: ClassVar[bool] = True
    # True: `_fit` sets λ from Σ_i ‖g_ib‖² (the trace of a matrix it builds anyway, `_damping_from_totals`),
    # which saves the norms pass over G
    damping_from_fit: ClassVar[bool] = False
    # True: `fit` reads the K-FAC token statistics `train.factors` (`pyinf.factors`), which the
    # Attributor has the capture accumulate while it fills the store
    needs_factors: ClassVar[bool] = False
    # True (ekfac): with fisher="true", `fit` reads the sampled-label gradients `train.fisher_gradients`
    refits_eigenvalues: ClassVar[bool] = False

    def __init__(self, backend: Backend, damping: float = 0.1, damping_mode: str = "relative", **options):
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
                or damping <= 0:
            raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
        self.args = self.Options.make(self.name, **options)  # validated there
        self.backend = backend
        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.opts = self.args.report()
        self.n = 0
        self.comm = None
        self.offset = 0
        self.lam: dict[str, float] = {}
        self.sq_norms: dict[str, torch.Tensor] = {}

    # -- fit -------------------------------------------------------------
    def fit(self, train: GradientSource) -> "Method":
        """Read the training gradients and keep what `precondition` needs."""
        if not isinstance(train, GradientSource):
            raise TypeError(f"fit() needs a pyinf.blocks.GradientSource, got {type(train).__name__}")
        self.train = train  # precondition passes over it again (datainf, exact, lissa)
        self.comm = train.comm  # a pyinf.distributed.Comm when train is one shard
        self.offset = train.offset if self.comm is not None else 0
        self.n = train.n if self.comm is None else sum(self.comm.all_ints(train.n))
        self.dtype = train.dtype
        self.blocks = train.blocks
        self.groups = train.groups
        self._check_blocks(train.blocks)
        if self.needs_damping and not self.damping_from_fit:
            self._fit_damping(train)
        self._fit(train)
        return self

    def _check_blocks(self, blocks: list[Block]) -> None:
        """Refuse block shapes the method cannot handle, before any pass."""

    def _fit(self, train: GradientSource) -> None:
        """Method-specific statistics (default: none)."""

    def _fit_damping(self, train: GradientSource) -> None:
        """One pass: per-sample squared norms, NaN/Inf check, and λ_b."""
        norms = [torch.empty(len(g.names), train.n, dtype=self.dtype, device=train.device) for g in self.groups]
        for start, chunk in train.chunks():
            for i, (g, G) in enumerate(self._grouped(chunk)):
                norms[i][:, start : start + G.shape[1]] = self.backend.sq_norms(G)
        err = None
        if not bool(torch.stack([torch.isfinite(s).all() for s in norms]).all()):  # one host read
            g, s = next((g, s) for g, s in zip(self.groups, norms) if not bool(torch.isfinite(s).all()))
            k, i = (~torch.isfinite(s)).nonzero()[0].tolist()
            err = ValueError(
                f"block '{g.names[k]}': train gradient of sample {self.offset + i} contains NaN or Inf "
                f"(or its squared norm overflows {s.dtype})"
            )
        if self.comm is not None:
            self.comm.raise_if_any(err)  # every rank raises, none waits in the next collective
        elif err is not None:
            raise err
        totals = torch.cat([s.double().sum(dim=1) for s in norms])
        if self.comm is not None:
            totals = self._allreduce(totals)
        names = [name for g in self.groups for name in g.names]
        self._set_damping(dict(zip(names, totals.tolist())))
        self.group_sq_norms = norms  # (b, n) per group
        self.sq_norms = {name: s[k] for g, s in zip(self.groups, norms) for k, name in enumerate(g.names)}

    def _set_damping(self, totals: dict[str, float]) -> None:
        """λ_b of the blocks named in `totals` from Σ_i ‖g_ib‖² over every rank's samples (relative
        damping), or the absolute damping."""
        size = {b.name: b.size for b in self.blocks}
        for name, total in totals.items():
            if self.damping_mode == "absolute":
                self.lam[name] = self.damping
                continue
            lam = self.damping * (total / self.n) / size[name]
            if lam == 0.0:
                raise ValueError(
                    f"block '{name}': all train gradients are zero, so relative damping gives λ = 0 "
                    f"(PEFT initialises LoRA B to zero, so g_A is zero before training); drop the block, "
                    f"train the adapter first, or use damping_mode='absolute'"
                )
            self.lam[name] = lam

    def _group_lam(self, g: BlockGroup, dtype: torch.dtype | None = None) -> torch.Tensor:
        """λ of the group's blocks as a `(b, 1, 1)` tensor on the training device."""
        lam = [self.lam[name] for name in g.names]
        return torch.tensor(lam, dtype=dtype or self.dtype, device=self.train.device).view(-1, 1, 1)

    def _damping_from_totals(self, train: GradientSource, totals: dict[str, float]) -> None:
        """For `damping_from_fit` methods: λ from the traces `_fit` built (global sums). A non-finite
        trace means a NaN/Inf gradient: the norms pass then finds and names the sample."""
        if not all(math.isfinite(t) for t in totals.values()):
            self._fit_damping(train)  # raises naming the sample (every rank sees the same traces)
            raise ValueError("the train gradients' squared norms overflow float64")  # pragma: no cover
        self._set_damping(totals)

    # -- precondition ----------------------------------------------------
    def precondition(self, queries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`queries` {name: (m, rows, cols)} -> `H` {name: (m, D_b)}, compute dtype or float64."""
        raise NotImplementedError

    # -- score -----------------------------------------------------------
    def influence(self, queries: dict[str, torch.Tensor], per_block: bool = False) -> torch.Tensor:
        """`(m, n)` scores of the fitted training set for `queries` {name: (m, rows, cols)}
        (`per_block`: `(n_blocks, m, n)`, each block's share, see the module docstring).

        precondition + score by default; a method overrides it where scoring
        the training set has a cheaper or more accurate form (exact).
        """
        return self.score_pass(self.train, self.precondition(queries), per_block=per_block)

    def score_pass(self, train: GradientSource, H: dict[str, torch.Tensor], per_block: bool = False) -> torch.Tensor:
        """One pass over `train`: `(m, n)` scores −Σ_b H_b G_bᵀ (`per_block`: `(n_blocks, m, n)`, unsummed)."""
        m = next(iter(H.values())).shape[0]
        # a float64 H (exact's primal blocks and precondition) is scored in
        # float64: H has large components that cancel against G, and rounding
        # H to float32 would cost ~κ·eps of the answer.
        dtype = torch.float64 if any(h.dtype == torch.float64 for h in H.values()) else self.dtype
        lead = (len(self.blocks),) if per_block else ()
        out = torch.zeros(*lead, m, train.n, dtype=dtype, device=train.device)
        for start, cols in self.score_chunks(train, H, per_block=per_block):
            out[..., start : start + cols.shape[-1]] = cols
        self._refuse_non_finite(train, out)
        return out

    def _refuse_non_finite(self, train: GradientSource, result: torch.Tensor) -> None:
        """The NaN/Inf check of methods without the norms pass (tracin), which refuses them there:
        a non-finite gradient makes `result` non-finite; only then pass again to name the sample."""
        if self.needs_damping or bool(torch.isfinite(result).all()):
            return
        for start, chunk in train.chunks():
            for name, G in chunk.items():
                check_finite(name, G, "train gradient", offset=start)

    def score_chunks(self, train: GradientSource, H: dict[str, torch.Tensor], per_block: bool = False, start: int = 0):
        """One pass: yield `(start, (m, c) scores)` per chunk (lets a caller keep a top-k or write a file,
        not (m, n)); `per_block`: `(n_blocks, m, c)` chunks. `start` > 0 skips the chunks that end
        before sample `start` (a resumed write, `pyinf.scores`): the first chunk yielded holds it."""
        stacks = [stack_group(H, g) for g in self.groups]  # views of precondition's stacks
        order = self._block_order() if per_block else None
        for first, chunk in train.chunks(start=start):
            parts = [-self.backend.dots(G, Hg) if per_block else self.backend.score(Hg, G)
                     for Hg, (_, G) in zip(stacks, self._grouped(chunk))]
            yield first, (torch.cat(parts)[order] if per_block else functools.reduce(torch.add, parts))

    def _block_order(self) -> list[int]:
        """Where each block of `self.blocks` sits among the groups' blocks (per-block results are
        computed group by group: `stacked[order]` puts them in the order of `self.blocks`)."""
        pos = {name: k for k, name in enumerate(name for g in self.groups for name in g.names)}
        return [pos[b.name] for b in self.blocks]

    def _group_rows(self) -> list[slice]:
        """Each group's rows in a `(n_blocks, ...)` stack laid out group by group."""
        out, lo = [], 0
        for g in self.groups:
            out.append(slice(lo, lo + len(g.names)))
            lo += len(g.names)
        return out

    def self_influence(self, train: GradientSource) -> torch.Tensor:
        """`(n,)`: −g_iᵀ H⁻¹ g_i, preconditioning each training chunk as queries (local `(n_local,)` on a shard)."""
        out = torch.empty(train.n, dtype=torch.float64, device=train.device)
        if self.comm is not None:
            return self._self_influence_sharded(train, out)
        for start, chunk in train.chunks():
            H = self.precondition(chunk)
            total = 0
            for g, G in self._grouped(chunk):
                Hg = stack_group(H, g)
                total = total - (Hg * G.to(Hg.dtype)).sum(dim=(0, 2))
            out[start : start + total.shape[0]] = total
        self._refuse_non_finite(train, out)
        return out

    def _self_influence_sharded(self, train: GradientSource, out: torch.Tensor) -> torch.Tensor:
        """Step t: every rank's chunk t, gathered, is preconditioned on every rank (the passes inside
        `precondition` need the same queries everywhere); each rank keeps its own rows."""
        it = iter(train.chunks())
        while True:
            nxt = next(it, None)
            mine = {b.name: torch.empty(0, b.rows, b.cols, dtype=self.dtype, device=train.device) for b in train.blocks}
            if nxt is not None:
                start, chunk = nxt
                mine = {name: G.to(self.dtype) for name, G in chunk.items()}
            parts = {name: self.comm.all_gather_var(G) for name, G in mine.items()}
            counts = [p.shape[0] for p in next(iter(parts.values()))]
            if sum(counts) == 0:  # every rank is done
                return out
            H = self.precondition({name: torch.cat(p) for name, p in parts.items()})
            lo = sum(counts[: self.comm.rank])
            c = counts[self.comm.rank]
            if c:
                total = 0
                for name, G in mine.items():
                    h = H[name][lo : lo + c]
                    total = total - (h * G.reshape(c, -1).to(h.dtype)).sum(dim=1)
                out[start : start + c] = total

    # -- data parallelism (no-ops on one process) --------------------------
    def _allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (no-op without a process group)."""
        if self.comm is not None:
            self.comm.all_reduce(t)
        return t

    def _allreduce_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum every tensor of `tensors` over the ranks, in place, one collective per dtype."""
        if self.comm is not None:
            self.comm.all_reduce_dict(tensors)
        return tensors

    def _allmax(self, x: float) -> float:
        """The largest `x` over the ranks (keeps data-dependent loop exits in step)."""
        return x if self.comm is None else self.comm.max_float(x)

    def _all_columns(self, P: torch.Tensor) -> torch.Tensor:
        """`(m, n_local)` columns of every rank -> `(m, n)` in the global order (identity on one process)."""
        return P if self.comm is None else self.comm.all_gather_cols(P)

    def _local_columns(self, P: torch.Tensor) -> torch.Tensor:
        """The columns of this rank's samples of a global `(..., n)` tensor."""
        return P if self.comm is None else P[..., self.offset : self.offset + self.train.n]

    # -- helpers for subclasses -----------------------------------------
    def _grouped(self, chunk: dict[str, torch.Tensor]) -> list[tuple[BlockGroup, torch.Tensor]]:
        """A chunk as one `(b, c, D)` tensor per group (views for a store's chunks)."""
        return [(g, stack_group(chunk, g)) for g in self.groups]

    def _stacked(self, queries: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Queries {name: (m, rows, cols)} as one `(b, m, D)` stack per group, in the compute dtype (or
        `dtype`): a view when they are one already, else one copy straight into the stack's dtype."""
        dtype = dtype or self.dtype
        out = []
        for g in self.groups:
            first = queries[g.names[0]]
            if first.dtype == dtype:
                out.append(stack_group(queries, g))
                continue
            stack = torch.empty(len(g.names), first.shape[0], g.size, dtype=dtype, device=first.device)
            for k, name in enumerate(g.names):
                stack[k].copy_(queries[name].reshape(first.shape[0], -1))
            out.append(stack)
        return out

    def _unstacked(self, stacks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-group `(b, m, D)` stacks -> {name: (m, D)} views (what `precondition` returns)."""
        out = {}
        for g, t in zip(self.groups, stacks):
            out.update(unstack_group(t, g))
        return {b.name: out[b.name] for b in self.blocks}

    def _allreduce_list(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """`_allreduce_dict` for a list of tensors."""
        self._allreduce_dict({str(i): t for i, t in enumerate(tensors)})
        return tensors

    def _warn_not_converged(self, what: str, iterations: int, residual: float, tol: float) -> None:
        warnings.warn(
            f"{self.name}: {what} did not reach tol={tol:g} in {iterations} iterations "
            f"(residual {residual:.3g}); raise `iterations` or the damping",
            RuntimeWarning,
            stacklevel=4,
        )
