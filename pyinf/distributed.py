"""Data-parallel attribution over a `torch.distributed` process group.

Run the same script on every rank (`torchrun --nproc_per_node=K script.py`),
with the process group initialised (NCCL on GPUs, gloo on CPUs) before the
`Attributor` is built:

    torch.distributed.init_process_group("nccl")          # or "gloo"
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # NCCL: one GPU per rank
    att = pyinf.Attributor(model.cuda(), method="datainf", store="disk:/scratch/grads")
    att.fit(train_loader)          # every rank passes the SAME (unshuffled) data
    scores = att.score(queries)    # (m, n) on rank 0, None on the other ranks

What happens (`Attributor(distributed=None)` turns it on whenever a process
group is initialised; `distributed=False` keeps one process per model):

- **Sharding.** The training batches are split into `world` contiguous runs
  by batch index (`shard_range`): rank r captures batches
  `[⌊r·B/W⌋, ⌊(r+1)·B/W⌋)` into its own store (a disk store writes
  `PATH/rank{r}-of-{W}`, so each rank resumes its own shards). The global
  sample index of rank r's first sample is the number of samples on ranks
  `< r`, so the original order is restored by concatenating the ranks. Each
  rank iterates the data up to the end of its run (a DataLoader still loads
  the batches it skips, but nothing is captured for them). There must be at
  least as many batches as ranks.
- **Statistics** are combined by the methods themselves, through
  `Method._allreduce` and friends (no-ops without a process group), where a
  method finishes accumulating over chunks; see `pyinf.methods.base`.
- **Queries** are captured once, on rank 0, and broadcast.
- **Scores**: each rank scores its own shard; the columns are gathered on
  rank 0 in the original training order. Rank 0 gets the `(m, n)` matrix (and
  `self_influence`'s `(n,)`, `score(top_k=k)`'s `TopK`); every other rank
  gets None.
- **Errors** on one rank during `fit` (bad data, NaN gradients) are raised on
  every rank (the others raise a RuntimeError naming the failed rank), not
  left as a hang in the next collective.

Not under a process group: `save`/`load` (one process per state file), and
the out-of-memory retry of a whole pass (a rank that retried alone would
desynchronise the collectives; the per-batch capture retry is local and
stays on).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch

__all__ = ["Comm", "current", "shard_range", "ShardedBatches", "broadcast_from_rank0", "is_rank0"]


def _dist():
    import torch.distributed as dist

    return dist


def current() -> "Comm | None":
    """A `Comm` over the default process group when one is initialised, else None."""
    if not torch.distributed.is_available():
        return None
    dist = _dist()
    if not dist.is_initialized():
        return None
    return Comm()


def is_rank0() -> bool:
    """True without a process group, else whether this is rank 0."""
    comm = current()
    return comm is None or comm.rank == 0


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` (a tensor, None or any picklable object) on every rank; `obj` itself without a process group.

    Collective: every rank calls it (the other ranks' `obj` is ignored, e.g. the
    None that `Attributor.score` returns there). Tensors come back on the CPU.
    """
    comm = current()
    if comm is None:
        return obj
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
    box = [obj if comm.rank == 0 else None]
    _dist().broadcast_object_list(box, src=0, group=comm.group)
    return box[0]


def batch_size_for_ranks(n: int, bs: int) -> int:
    """`bs`, made small enough that `n` samples give every rank of the current process group at least one batch
    (per-sample gradients: the batching changes no score); `bs` itself outside a group."""
    comm = current()
    if comm is None:
        return bs
    return max(1, min(bs, -(-n // comm.world)))


def shard_range(num_batches: int, rank: int, world: int) -> tuple[int, int]:
    """Batch indices `[lo, hi)` of `rank`: contiguous, sizes differing by at most one."""
    return num_batches * rank // world, num_batches * (rank + 1) // world


class ShardedBatches:
    """Batches `[lo, hi)` of `data`, re-iterable when `data` is (a one-shot iterator is listed once)."""

    def __init__(self, data: Iterable, rank: int, world: int):
        if iter(data) is data:  # a generator or iterator: read it once
            data = list(data)
        self.data = data
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = sum(1 for _ in data)
        if total < world:
            raise ValueError(
                f"distributed attribution needs at least one training batch per rank: {total} batches, {world} ranks"
            )
        self.total = total
        self.lo, self.hi = shard_range(total, rank, world)

    def __len__(self) -> int:
        return self.hi - self.lo

    def __iter__(self):
        return itertools.islice(iter(self.data), self.lo, self.hi)


class Comm:
    """The collectives pyinf uses, on tensors of any device (moved to the group's device and back)."""

    def __init__(self, group=None):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def barrier(self) -> None:
        """Wait for every rank of the group."""
        _dist().barrier(group=self.group)

    # -- reductions --------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`t` (any shape, same on every rank) reduced in place (sum or max) on every rank; returns `t`."""
        dist = _dist()
        buf = t.detach().contiguous().to(self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        if buf.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(buf)
        return t

    def all_reduce_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum every tensor of {name: (any shape)} in place across ranks, one collective per dtype (flattened)."""
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, t in tensors.items():
            by_dtype.setdefault(t.dtype, []).append(name)
        for dtype, names in by_dtype.items():
            flat = torch.cat([tensors[n].reshape(-1).to(self.device) for n in names])
            self.all_reduce(flat)
            off = 0
            for n in names:
                t = tensors[n]
                with torch.no_grad():
                    t.copy_(flat[off : off + t.numel()].view(t.shape))
                off += t.numel()
        return tensors

    def all_ints(self, x: int) -> list[int]:
        """Every rank's `x`, in rank order."""
        dist = _dist()
        buf = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(buf, torch.tensor([int(x)], dtype=torch.int64, device=self.device), group=self.group)
        return [int(b.item()) for b in buf]

    def max_float(self, x: float) -> float:
        """The maximum of `x` over the ranks."""
        t = torch.tensor([float(x)], dtype=torch.float64)
        return float(self.all_reduce(t, op="max").item())

    # -- gathers -----------------------------------------------------------
    def all_gather_var(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (n_r, ...) (n_r may differ; the other dims and dtype must agree), a list in rank order."""
        dist = _dist()
        counts = self.all_ints(t.shape[0])
        top = max(counts)
        if top == 0:
            return [t.new_empty((0, *t.shape[1:])) for _ in counts]
        pad = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=self.device)
        pad[: t.shape[0]] = t.detach()
        out = [torch.empty_like(pad) for _ in counts]
        dist.all_gather(out, pad, group=self.group)
        return [o[:c].to(t.device) for o, c in zip(out, counts)]

    def all_gather_cols(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (..., n_r) concatenated along the last dimension in rank order, (..., Σ n_r), on every rank."""
        moved = t.movedim(-1, 0).contiguous()
        return torch.cat(self.all_gather_var(moved)).movedim(0, -1)

    def gather_cols(self, t: torch.Tensor) -> torch.Tensor | None:
        """As `all_gather_cols`, returned on rank 0 only (None on the other ranks)."""
        out = self.all_gather_cols(t)
        return out if self.rank == 0 else None

    def all_gather_object(self, obj: Any) -> list:
        """`[obj of rank 0, ..., obj of rank world-1]` on every rank (picklable objects)."""
        dist = _dist()
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, device: torch.device, src: int = 0):
        """Rank `src`'s {name: tensor (any shape)} on every rank (on `device`): shapes by object, data by tensor."""
        dist = _dist()
        meta = [None]
        if self.rank == src:
            meta = [[(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()]]
        dist.broadcast_object_list(meta, src=src, group=self.group)
        out = {}
        for name, shape, dtype in meta[0]:
            if self.rank == src:
                buf = tensors[name].detach().contiguous().to(self.device)
            else:
                buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.broadcast(buf, src=src, group=self.group)
            out[name] = tensors[name] if self.rank == src else buf.to(device)
        return out

    # -- errors ------------------------------------------------------------
    def raise_if_any(self, err: BaseException | None) -> None:
        """Collective: re-raise `err` on its rank, and a RuntimeError naming the failed rank on the others."""
        msgs = self.all_gather_object(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        for r, m in enumerate(msgs):
            if m is not None:
                raise RuntimeError(f"rank {r} failed: {m}")
