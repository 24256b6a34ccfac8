"""Forward-INF (mirrored influence, Ko et al., CVPR 2024): influence from forward passes only.

    scores = pyinf.forward_influence(model, train_data, query_data, lr=1e-3)   # (m, n)
    att = pyinf.Attributor(model, method="forward", lr=1e-3).fit(train_data)
    scores = att.score(query_data)

For each query q_j, take `steps` optimizer steps of size `lr` on the query's own
loss (its measurement, `pyinf.losses.Task`: by default the training loss),
moving exactly the attributed blocks (the blocks of
`pyinf.capture.GradientCapture`: LoRA A/B weights, or named `nn.Linear`
weights; a bias never moves), from θ to θ'_j. Then every training loss is
evaluated with forward passes only (no_grad):

    score[j, i] = (ℓ(z_i; θ'_j) − ℓ(z_i; θ)) / (steps · lr)

The base losses ℓ(z_i; θ) go through exactly the computation of the perturbed
ones (below: the same forward, or group 0 of the same grouped pass), so a
query whose step leaves the weights unchanged (e.g. zero gradient: no target
tokens) scores exactly 0, and no rounding difference between two forward
implementations is divided by lr.

Sign and scale (DESIGN.md §1): with plain SGD and one step,
ℓ(z_i; θ − lr v_j) − ℓ(z_i; θ) ≈ −lr ⟨v_j, g_i⟩, so the score approximates
tracin's −⟨v_j, g_i⟩ (positive = harmful, negative = helpful), up to O(lr)
curvature terms (and, with steps > 1, the curvature along the query's own
trajectory). **With optimizer="adam" the score is a different metric**: Adam's
first step moves each coordinate by lr · v/(|v| + eps) ≈ lr · sign(v), so the
score approximates −⟨sign(v_j), g_i⟩ (a sign-like, per-coordinate normalised
dot product), not an influence estimate; compare rankings, not magnitudes.
Adam here is the standard one (β = (0.9, 0.999), eps = 1e-8, bias-corrected,
fresh state per query).

Numerics: the score is a difference of two losses divided by lr, so the
rounding of the forward pass is amplified by 1/lr: the rounding error of the
perturbed loss is not that of the base loss (any change of the weights moves
the roundings), so each score carries noise of about (rounding error of a
loss) / lr. In float32 a step lr·‖v_j‖ of 0.2-0.6 % of the blocks' norm
balances rounding against the O(lr) curvature term (both below 1.5 %); in
bfloat16 the rounding noise is ~10³ times larger and the best lr leaves
~14 % error (measured on a small Llama: README, "Forward-INF in bfloat16").
The moved weights are stepped in a float32 master copy (float64 for float64
weights) and cast to the weights' dtype for the evaluation (θ'_j is then the
model you would have), so with bf16 adapters a step below bf16's resolution is
rounded away: a warning says so; use a larger lr or float32 adapters.

Model state: the model is in eval mode during the passes (dropout off; the
query steps are also taken in eval mode), and its training flags,
`requires_grad` flags and `.grad` fields are restored afterwards. The model's
weights are restored bit for bit (the one-query-at-a-time path writes θ'_j
into them and copies the saved θ back; the grouped path never writes them).

Many queries per pass (`queries_per_pass=k > 1`, the default): k perturbed
adapters and the unperturbed θ are evaluated in one forward over the training
batch replicated k + 1 times (group-major: rows g·B … g·B + B − 1 belong to
group g; group 0 is θ, a zero perturbation, whose losses are the base of the
pass; group g ≥ 1 is query g of the pass). The forward of each adapted layer
is temporarily replaced: a PEFT LoRA layer runs its frozen base layer once on
all (k + 1)·B rows (one read of the base weight) and adds the different
deltas with a grouped low-rank op, `scale · (x_g A_gᵀ) B_gᵀ` per group (the
Triton kernel `pyinf.kernels.grouped_lora` on CUDA without grad, `torch.bmm`
elsewhere); a plain `nn.Linear` block computes `x_g (W + ΔW_g)ᵀ` per group
with `bmm`. The base group costs 1/(k + 1) of each pass, and is needed: the
losses of the model's own forward differ from the grouped op's in rounding
(PEFT rounds after each matmul, the kernel once), and that difference,
divided by lr, would bias every score. The query steps use the same
machinery with grad: one batched forward/backward per query batch gives every
query's gradient with respect to its own copy of the blocks. Hidden states
differ per query after the first adapted layer, so nothing else is shared;
the gain is fewer weight reads and fuller batches. k is chosen from free GPU
memory on CUDA (`torch.cuda.mem_get_info` and the measured activation memory
of one training batch, k + 1 groups), 8 on the CPU. `queries_per_pass=1` is
the plain path: the model's own weights are set to θ'_j, its own forward runs
unchanged on the batches of `fit`, whose base losses (the same forward at θ)
it uses, and the weights are restored (works for any layer type).

Requirements of the grouped path: every tensor input of the model has the
batch in dimension 0 (as for capture), a LoRA layer is a PEFT `lora.Linear`
(`base_layer`, `lora_A`/`lora_B` ModuleDicts, `scaling`), not merged, adapters
enabled, no `adapter_names` mixed batches, the attributed adapters have
no variant (DoRA, ...), and every block is a LoRA A/B or an untied
`nn.Linear` weight (with biases, Conv1D, embedding or tied weights among the
blocks, the automatic choice is `queries_per_pass=1`).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .batches import as_batches, batch_len, slice_batch
from .losses import check_losses, default_loss, model_device, move_to_device
from .model_state import ModelMode
from .targets import active_adapters, is_lora_layer, resolve_blocks
from .optional_kernel import OptionalKernel
from .options import Options, any_value, one_of, positive_float, positive_int
from .progress import bar

__all__ = ["forward_influence", "ForwardInfluence", "ForwardOptions", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
CPU_QUERIES_PER_PASS = 8
MAX_QUERIES_PER_PASS = 256
GPU_MEMORY_FRACTION = 0.8  # of the free memory, for the k replicated activations and the k weight copies


# --------------------------------------------------------------------------- #
# options
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ForwardOptions(Options):
    """Forward-INF's options (`ForwardInfluence` below says what each does). `moves` only through
    `pyinf.Attributor`: the blocks the steps move (None: the capture's blocks; a list of names where
    those are "+bias" blocks, which Forward-INF cannot move)."""

    lr: float = positive_float()
    steps: int = positive_int(1)
    optimizer: str = one_of("sgd", OPTIMIZERS, any_case=True)
    queries_per_pass: int | None = positive_int(None, optional=True)
    use_triton: bool | None = one_of(None, (None, True, False))
    moves: Any = any_value(None)


# --------------------------------------------------------------------------- #
# the moved weights, grouped by the layer whose forward is replaced
# --------------------------------------------------------------------------- #
@dataclass
class _LoraUnit:
    """One adapter of one PEFT LoRA layer; `moved` holds 'A' and/or 'B'."""

    name: str  # layer name
    layer: nn.Module
    adapter: str
    a_block: str | None = None  # block names of the moved matrices
    b_block: str | None = None

    @property
    def A(self) -> nn.Parameter:
        return self.layer.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:
        return self.layer.lora_B[self.adapter].weight


@dataclass
class _LinearUnit:
    name: str
    module: nn.Linear


@dataclass
class _Plan:
    params: dict[str, nn.Parameter]  # block name -> moved weight (block order)
    lora: dict[int, tuple[str, nn.Module, dict[str, _LoraUnit]]] = field(default_factory=dict)  # id(layer) ->
    linear: list[_LinearUnit] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # blocks only the one-query-at-a-time path moves


def _plan(model: nn.Module, blocks) -> tuple[list, _Plan]:
    targets = resolve_blocks(model, blocks)
    role: dict[int, tuple[str, nn.Module, str, str]] = {}
    for ln, lm in model.named_modules():
        if is_lora_layer(lm):
            for ad in lm.lora_A:
                role[id(lm.lora_A[ad])] = (ln, lm, ad, "A")
            for ad in lm.lora_B:
                role[id(lm.lora_B[ad])] = (ln, lm, ad, "B")
    joined = [t.name for t in targets if t.bias is not None]
    if joined:
        raise ValueError(f"blocks {joined[:4]}: Forward-INF moves parameters, not a weight joined with its bias "
                         f"('+bias'); name the weight and the bias as blocks of their own")
    plan = _Plan(params={t.name: t.param for t in targets})
    for t in targets:
        module = t.uses[0].module
        if len(t.uses) > 1 or t.uses[0].kind != "linear":  # biases, Conv1D, embeddings, tied weights
            plan.other.append(t.name)
        elif id(module) in role:
            ln, lm, ad, which = role[id(module)]
            if ad not in active_adapters(lm):
                raise ValueError(f"block '{t.name}': adapter '{ad}' is not active, so its weights do not affect the loss")
            entry = plan.lora.setdefault(id(lm), (ln, lm, {}))
            unit = entry[2].setdefault(ad, _LoraUnit(ln, lm, ad))
            if which == "A":
                unit.a_block = t.name
            else:
                unit.b_block = t.name
        else:
            plan.linear.append(_LinearUnit(t.name, module))
    return [t.block for t in targets], plan


def _check_grouped(plan: _Plan) -> None:
    """Refuse layers the grouped forward cannot replace, before any pass."""
    if plan.other:
        raise ValueError(
            f"blocks {plan.other[:4]}{'...' if len(plan.other) > 4 else ''} (biases, Conv1D, embedding or tied "
            "weights) are not supported by the grouped forward; use queries_per_pass=1"
        )
    for ln, lm, units in plan.lora.values():
        for attr in ("base_layer", "scaling", "lora_dropout"):
            if not hasattr(lm, attr):
                raise ValueError(
                    f"LoRA layer '{ln}' ({type(lm).__name__}) is not a PEFT lora.Linear (no {attr}); "
                    "use queries_per_pass=1"
                )
        if getattr(lm, "disable_adapters", False):
            raise ValueError(f"LoRA layer '{ln}': adapters are disabled, so the blocks do not affect the loss")
        for ad in units:
            if ad in (getattr(lm, "lora_variant", None) or {}):
                raise ValueError(f"LoRA layer '{ln}', adapter '{ad}': LoRA variants are not supported")


# --------------------------------------------------------------------------- #
# the grouped forward
# --------------------------------------------------------------------------- #
_KERNEL = OptionalKernel("grouped_lora", "grouped_lora")


def _groups(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.shape[0] % k:
        raise RuntimeError(
            f"{what}: its input has {x.shape[0]} rows in dimension 0, not a multiple of the {k} queries of "
            "this pass; the grouped forward needs the batch in dimension 0 (use queries_per_pass=1)"
        )
    return x.reshape(k, -1, x.shape[-1])


def grouped_lora_torch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """`(k, M, N)` = scale · (x Aᵀ) Bᵀ per group with `torch.bmm` (differentiable)."""
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2)) * scale


class _Grouped:
    """Replaces the forward of the adapted layers while active; `weights` {block: (k, *shape)}."""

    def __init__(self, plan: _Plan, use_triton: bool | None):
        self.plan = plan
        self.use_triton = use_triton
        self.k = 1
        self.weights: dict[str, torch.Tensor] = {}
        self._saved: list[tuple[nn.Module, Any]] = []

    def __enter__(self):
        for ln, lm, units in self.plan.lora.values():
            self._patch(lm, functools.partial(self._lora_forward, ln, lm, units))
        for u in self.plan.linear:
            self._patch(u.module, functools.partial(self._linear_forward, u))
        return self

    def __exit__(self, *exc):
        for mod, old in reversed(self._saved):
            if old is None:
                del mod.forward
            else:
                mod.forward = old
        self._saved = []

    def _patch(self, mod: nn.Module, fn) -> None:
        self._saved.append((mod, mod.__dict__.get("forward")))
        mod.forward = fn

    def _stack(self, block: str | None, param: torch.Tensor) -> torch.Tensor:
        if block is not None:
            return self.weights[block]
        return param.detach().unsqueeze(0).expand(self.k, *param.shape)

    def _kernel(self, x: torch.Tensor):
        if torch.is_grad_enabled() or self.use_triton is False or (self.use_triton is None and not x.is_cuda):
            return None  # True: the kernel wherever it runs (on the CPU under TRITON_INTERPRET=1)
        k = _KERNEL.get()
        if k is None and self.use_triton:
            raise RuntimeError(f"use_triton=True but the grouped_lora kernel is unavailable: {_KERNEL.error}")
        return k

    def _lora_forward(self, ln: str, lm: nn.Module, units: dict[str, _LoraUnit], x, *args, **kwargs):

        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(f"LoRA layer '{ln}': mixed-adapter batches (adapter_names) are not supported")
        result = lm.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for ad in active_adapters(lm):
            A_mod, B_mod = lm.lora_A[ad], lm.lora_B[ad]
            cast = getattr(lm, "_cast_input_dtype", None)
            xa = cast(x, A_mod.weight.dtype) if cast is not None else x.to(A_mod.weight.dtype)
            scaling = lm.scaling[ad]
            if ad not in units:  # an adapter that is not attributed: as PEFT does
                variant = (getattr(lm, "lora_variant", None) or {}).get(ad)
                if variant is not None:
                    result = variant.forward(lm, active_adapter=ad, x=xa, result=result)
                else:
                    result = result + B_mod(A_mod(lm.lora_dropout[ad](xa))) * scaling
                continue
            u = units[ad]
            A = self._stack(u.a_block, A_mod.weight)
            B = self._stack(u.b_block, B_mod.weight)
            xs = _groups(xa, self.k, f"LoRA layer '{ln}'")
            kernel = self._kernel(xs)
            if kernel is not None and xs.dtype in (torch.float32, torch.bfloat16, torch.float16) \
                    and A.dtype == xs.dtype and B.dtype == xs.dtype:
                base = result.reshape(self.k, -1, result.shape[-1]).contiguous()
                out = kernel(xs.contiguous(), A.contiguous(), B.contiguous(), float(scaling), base=base, out=base)
                result = out.reshape(result.shape)
            else:
                d = grouped_lora_torch(xs, A, B, scaling)
                result = result + d.reshape(*result.shape[:-1], d.shape[-1])
        return result.to(result_dtype)

    def _linear_forward(self, u: _LinearUnit, x, *args, **kwargs):
        W = self.weights[u.name]  # (k, out, in): W + ΔW_g per group
        xs = _groups(x, self.k, f"block '{u.name}'")
        y = torch.bmm(xs.to(W.dtype), W.transpose(1, 2))
        if u.module.bias is not None:
            y = y + u.module.bias
        return y.reshape(*x.shape[:-1], W.shape[1])


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _replicate(batch: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Every tensor with the samples in dim 0, repeated k times group-major."""
    if k == 1:
        return dict(batch)
    B = batch_len(batch)
    return {
        key: v.repeat(k, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v
        for key, v in batch.items()
    }


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 stays float64, anything else becomes float32 (losses, master weights, gradients)."""
    return t.double() if t.dtype == torch.float64 else t.float()


class _Optimizer:
    """SGD or Adam on a dict of float32 tensors (elementwise: a (k, ...) stack steps k queries independently)."""

    def __init__(self, kind: str, lr: float, params: dict[str, torch.Tensor]):
        self.kind, self.lr, self.t = kind, lr, 0
        if kind == "adam":
            self.m = {n: torch.zeros_like(p) for n, p in params.items()}
            self.v = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        self.t += 1
        for n, p in params.items():
            g = grads[n]
            if self.kind == "sgd":
                p.sub_(self.lr * g)
            else:
                b1, b2 = ADAM_BETAS
                self.m[n].mul_(b1).add_(g, alpha=1 - b1)
                self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                mhat = self.m[n] / (1 - b1 ** self.t)
                vhat = self.v[n] / (1 - b2 ** self.t)
                p.sub_(self.lr * mhat / (vhat.sqrt() + ADAM_EPS))


# --------------------------------------------------------------------------- #
# the engine
# --------------------------------------------------------------------------- #
class ForwardInfluence:
    """The Forward-INF engine (module doc): `fit(train)` once, then `score(queries)` any number of times.

    Args:
        model: a torch module (e.g. a PEFT-wrapped Hugging Face model).
        lr: step size > 0. steps: optimizer steps per query (>= 1).
        optimizer: "sgd" (scores comparable with tracin) or "adam" (a sign-like metric; module doc).
        blocks: "lora" or a list of module names (as `GradientCapture`).
        loss: None (`pyinf.losses.default_loss`) or `loss(model, batch) -> (B,)`: the training losses.
        measurement: None (the loss) or `measurement(model, batch) -> (B,)`: what the query steps descend.
        batch_size: when the data is a Dataset or (dataset, collate_fn).
        queries_per_pass: k perturbed models per forward (θ itself is one more group); None: automatic
            (CUDA: from free memory; CPU: 8); 1: the plain path (the model's own weights set to θ'_j
            and restored).
        use_triton: None: the grouped_lora kernel on CUDA for the no-grad passes, bmm elsewhere;
            False: always bmm; True: always the kernel (on the CPU only under TRITON_INTERPRET=1).
        progress: progress bars on stderr.
    """

    def __init__(self, model: nn.Module, *, lr: float, steps: int = 1, optimizer: str = "sgd", blocks="lora",
                 loss: Callable | None = None, batch_size: int = 8, queries_per_pass: int | None = None,
                 use_triton: bool | None = None, progress: bool | None = None, measurement: Callable | None = None):
        ForwardOptions.make("forward", lr=lr, steps=steps, optimizer=optimizer, queries_per_pass=queries_per_pass,
                            use_triton=use_triton)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"forward: batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, fn in (("loss", loss), ("measurement", measurement)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable {name}(model, batch) -> (B,) per-sample values")
        self.model = model
        self.lr, self.steps, self.optimizer = float(lr), steps, optimizer.lower()
        self.blocks_spec = blocks
        self.loss = loss if loss is not None else default_loss
        self.measurement = measurement if measurement is not None else self.loss
        self.batch_size = batch_size
        self.use_triton = use_triton
        self.progress = progress
        self.blocks, self.plan = _plan(model, blocks)
        if queries_per_pass is None and self.plan.other:
            queries_per_pass = 1  # the automatic choice where the grouped forward cannot move every block
        self.queries_per_pass = queries_per_pass
        if queries_per_pass != 1:
            _check_grouped(self.plan)
        self.batches: list | None = None
        self.base_losses: torch.Tensor | None = None
        self._act_bytes = 0  # measured activation memory of one training batch (CUDA)

    @property
    def n(self) -> int:
        """Training samples fitted (after `fit`)."""
        if self.base_losses is None:
            raise RuntimeError("call fit(train_data) first")
        return self.base_losses.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go."""
        return model_device(self.model)

    def _loss(self, batch, query: bool = False) -> torch.Tensor:
        """The training losses of `batch`, or (`query`) its measurements, `(B,)`."""
        batch = move_to_device(batch, self.device)
        return check_losses((self.measurement if query else self.loss)(self.model, batch), batch_len(batch),
                            finite=False)

    # -- fit ------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, train_data) -> "ForwardInfluence":
        """Keep the training batches (a list); compute the base losses ℓ(z_i; θ) with the model's own forward.

        They are the base of the plain path (`queries_per_pass=1`); the grouped path recomputes
        them in each pass, through the grouped op (module doc).
        """
        self.batches = list(as_batches(train_data, self.batch_size))
        if not self.batches:
            raise ValueError("the training data is empty")
        out = []
        dev = self.device
        with ModelMode(self.model), bar("forward: base losses", len(self.batches), self.progress, unit="batch") as pb:
            for i, b in enumerate(self.batches):
                if i == 0 and dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    before = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                out.append(_wide(self._loss(b).detach()))
                if i == 0 and dev.type == "cuda":
                    self._act_bytes = max(1, torch.cuda.max_memory_allocated(dev) - before)
                pb.update()
        L = torch.cat(out)
        if not bool(torch.isfinite(L).all()):
            raise ValueError(f"the training loss of samples {(~torch.isfinite(L)).nonzero().flatten().tolist()} is NaN or Inf")
        self.base_losses = L
        return self

    # -- k --------------------------------------------------------------------
    def pick_queries_per_pass(self, m: int) -> int:
        """k: the option if set, else from free GPU memory (CUDA; k + 1 groups fit) or 8 (CPU); at most m."""
        if self.queries_per_pass is not None:
            return max(1, min(self.queries_per_pass, m))
        dev = self.device
        if dev.type != "cuda":
            return max(1, min(CPU_QUERIES_PER_PASS, m))
        free, _ = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # the allocator's cache
        stack = sum(p.numel() * p.element_size() for p in self.plan.params.values())
        per_group = self._act_bytes + 3 * stack  # activations of a replicated batch; weights, contiguous copies
        groups = int(GPU_MEMORY_FRACTION * free // max(per_group, 1))
        return max(1, min(groups - 1, m, MAX_QUERIES_PER_PASS))  # one group is the base θ

    # -- score ----------------------------------------------------------------
    def score(self, query_data) -> torch.Tensor:
        """`(m, n)` float32 scores (ℓ(z_i; θ'_j) − ℓ(z_i; θ)) / (steps · lr); positive = harmful."""
        if self.batches is None:
            raise RuntimeError("call fit(train_data) first")
        qbatches = list(as_batches(query_data, self.batch_size))
        m = sum(batch_len(b) for b in qbatches)
        if m == 0:
            raise ValueError("the query data is empty")
        k = self.pick_queries_per_pass(m)
        self.last_queries_per_pass = k
        out = torch.empty(m, self.n, dtype=torch.float32, device=self.base_losses.device)
        desc = f"forward: {self.optimizer} steps + train losses ({k} queries per pass)"
        with ModelMode(self.model), bar(desc, m, self.progress, unit="query") as pb:
            if k == 1:
                self._one_at_a_time(qbatches, out, pb)
            else:
                self._grouped(qbatches, k, out, pb)
        return out

    def _scores(self, L: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Score rows (L − base) / (steps · lr), the difference in float64, as float32."""
        return ((L.double() - base.double()) / (self.steps * self.lr)).float()

    # -- the plain path ---------------------------------------------------------
    def _one_at_a_time(self, qbatches, out, pb) -> None:
        params = self.plan.params
        orig = {n: p.detach().clone() for n, p in params.items()}
        unchanged = 0
        try:
            j = 0
            for qb in qbatches:
                for r in range(batch_len(qb)):
                    q = slice_batch(qb, r, r + 1, batch_len(qb))
                    master = {n: _wide(o).clone() for n, o in orig.items()}
                    opt = _Optimizer(self.optimizer, self.lr, master)
                    for _ in range(self.steps):
                        with torch.no_grad():
                            for n, p in params.items():
                                p.copy_(master[n])
                        for p in params.values():
                            p.requires_grad_(True)
                        with torch.enable_grad():
                            loss = self._loss(q, query=True)
                            grads = self._grad(loss, list(params.values()))
                        for p in params.values():
                            p.requires_grad_(False)
                        opt.step(master, {n: _wide(g) for n, g in zip(params, grads)})
                    with torch.no_grad():
                        for n, p in params.items():
                            p.copy_(master[n])
                        unchanged += all(torch.equal(p, orig[n]) for n, p in params.items())
                        out[j] = self._scores(self._train_losses(1)[0], self.base_losses)
                    j += 1
                    pb.update()
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(orig[n])
        self._warn_unchanged(unchanged)

    @staticmethod
    def _grad(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not bool(torch.isfinite(loss.detach()).all()):
            raise ValueError("a query loss is NaN or Inf")
        if not loss.requires_grad:
            raise ValueError("the query loss does not depend on any attributed block")
        grads = torch.autograd.grad(_wide(loss).sum(), inputs, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]

    # -- the grouped path -------------------------------------------------------
    def _grouped(self, qbatches, k: int, out, pb) -> None:
        params = self.plan.params
        grouped = _Grouped(self.plan, self.use_triton)
        theta = {n: p.detach().unsqueeze(0) for n, p in params.items()}
        pending: dict[str, list[torch.Tensor]] = {n: [theta[n]] for n in params}  # group 0 of every pass: θ
        state = {"count": 0, "j": 0, "unchanged": 0}

        def flush(take: int) -> None:
            W = {n: torch.cat(pending[n]) for n in params}
            grouped.k, grouped.weights = take + 1, {n: w[: take + 1] for n, w in W.items()}
            with torch.no_grad():
                same = torch.stack([(W[n][1 : take + 1] == params[n]).flatten(1).all(dim=1) for n in params])
                state["unchanged"] += int(same.all(dim=0).sum())
                L = self._train_losses(take + 1)
                out[state["j"] : state["j"] + take] = self._scores(L[1:], L[:1])
            grouped.weights = {}
            for n, w in W.items():
                pending[n] = [theta[n], w[take + 1 :]]
            state["count"] -= take
            state["j"] += take
            pb.update(take)

        with grouped:
            for qb in qbatches:
                for s in range(0, batch_len(qb), k):  # step up to k queries of this batch together
                    new = self._step_group(grouped, slice_batch(qb, s, min(s + k, batch_len(qb)), batch_len(qb)))
                    for n in params:
                        pending[n].append(new[n])
                    state["count"] += next(iter(new.values())).shape[0]
                    while state["count"] >= k:
                        flush(k)
            if state["count"]:
                flush(state["count"])
        self._warn_unchanged(state["unchanged"])

    def _step_group(self, grouped: _Grouped, q: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """θ'_g for the c queries of `q` (one per group): {block: (c, *shape)} in the weights' dtype."""
        params = self.plan.params
        c = batch_len(q)
        master = {n: _wide(p.detach()).unsqueeze(0).repeat(c, *([1] * p.dim())) for n, p in params.items()}
        opt = _Optimizer(self.optimizer, self.lr, master)
        grouped.k = c
        for _ in range(self.steps):
            with torch.enable_grad():
                leaves = {n: w.detach().requires_grad_(True) for n, w in master.items()}
                grouped.weights = {n: leaves[n].to(params[n].dtype) for n in params}
                loss = self._loss(q, query=True)
                grads = self._grad(loss, list(leaves.values()))
            opt.step(master, dict(zip(leaves, grads)))
        grouped.weights = {}
        return {n: master[n].to(params[n].dtype) for n in params}

    @torch.no_grad()
    def _train_losses(self, k: int) -> torch.Tensor:
        """`(k, n)`: the training losses under the k current models (one forward per replicated batch)."""
        out = torch.empty(k, self.n, dtype=self.base_losses.dtype, device=self.base_losses.device)
        start = 0
        for b in self.batches:
            B = batch_len(b)
            L = _wide(self._loss(_replicate(move_to_device(b, self.device), k))).reshape(k, B)  # replicate on the device
            if start + B > self.n:
                raise RuntimeError("the training batches changed since fit")
            out[:, start : start + B] = L
            start += B
        if start != self.n:
            raise RuntimeError("the training batches changed since fit")
        return out

    def _warn_unchanged(self, count: int) -> None:
        if count:
            dtypes = sorted({str(p.dtype) for p in self.plan.params.values()})
            warnings.warn(
                f"forward: for {count} quer{'y' if count == 1 else 'ies'} the step left every attributed weight "
                f"unchanged after rounding to {dtypes} (or the query gradient is zero): those scores are 0; "
                "raise lr or use float32 adapters",
                RuntimeWarning,
                stacklevel=3,
            )


def forward_influence(model: nn.Module, train_data, query_data, *, lr: float, steps: int = 1,
                      optimizer: str = "sgd", blocks="lora", loss: Callable | None = None, batch_size: int = 8,
                      progress: bool | None = None, queries_per_pass: int | None = None,
                      use_triton: bool | None = None, measurement: Callable | None = None) -> torch.Tensor:
    """Forward-INF scores `(m, n)` float32 (queries × train), positive = harmful; see the module doc.

    score[j, i] = (ℓ(z_i; θ'_j) − ℓ(z_i; θ)) / (steps · lr), θ'_j = `steps` steps of `optimizer`
    ("sgd": ≈ tracin's −⟨v_j, g_i⟩; "adam": a sign-like metric) on query j's loss. Data: a
    DataLoader, a list of batch dicts, a Dataset or (dataset, collate_fn). The model's weights
    and state are restored exactly.
    """
    eng = ForwardInfluence(model, lr=lr, steps=steps, optimizer=optimizer, blocks=blocks, loss=loss,
                           batch_size=batch_size, queries_per_pass=queries_per_pass, use_triton=use_triton,
                           progress=progress, measurement=measurement)
    return eng.fit(train_data).score(query_data)
