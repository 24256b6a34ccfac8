"""Per-sample gradients of LoRA adapter matrices from one batched backward.

    with GradientCapture(model) as cap:          # blocks="lora": every PEFT adapter
        grads = cap(batch)                       # {block: (B, rows, cols)} float32

How: a forward hook on every captured `nn.Linear` keeps its input `a`
`(B, T, d_in)` and registers a hook on its output tensor that receives
`e = dL/d(output)` `(B, T, d_out)` during the backward of
`loss(model, batch).sum()`. The per-sample losses are independent, so row i
of e belongs to sample i alone and the per-sample weight gradient is
`g_i = Σ_t e[i,t]ᵀ ⊗ a[i,t]`. One forward and one backward per batch, never a batch-size-1 backward. The
LoRA scaling s is inside e (`result + lora_B(lora_A(x)) * s`), so
`g_A = s Σ_t (Bᵀδ) ⊗ x` and `g_Bᵀ = s Σ_t (A x) ⊗ δ` come out as in DESIGN.md §4.

Padding: the result is the exact gradient of each sample's loss. Where the
loss never reads a padded position (causal LM with right or left padding,
classification reading a real token), e is exactly zero there, so padding
adds nothing. Masking by the attention_mask is NOT applied by default: a model
may legitimately read a padded position (RobertaForSequenceClassification
with left padding classifies from position 0, a pad), and masking would then
return something that is not the gradient. `mask_padding=True` drops
positions with attention_mask == 0 from the sums (a no-op in the first case;
the kernel then skips their loads).

Blocks (names are module paths, in `model.named_modules()` order):

* LoRA A `...lora_A.<adapter>`: `(r, d_in)`, the weight's gradient.
* LoRA B `...lora_B.<adapter>`: stored TRANSPOSED, `(r, d_out)`.
* a plain `nn.Linear` `...name`: `(out, in)`, the weight's gradient only (a
  bias is not captured).

`blocks` is "lora" (every active adapter of every PEFT LoRA layer), or a list
of names: "lora", a LoRA layer (e.g. `...q_proj`, expands to its A and B),
a LoRA A/B linear, or any `nn.Linear` (a trailing ".weight" is accepted).

During a call the model is in eval mode (dropout off, LoRA dropout included;
layers with gradient checkpointing enabled keep `training=True` because
transformers only checkpoints in training mode, and their dropout children
stay off), exactly the captured weights require grad, and afterwards the
training flags, `requires_grad` flags and `.grad` fields are restored (the
captured weights' `.grad` is stashed and put back). Weights are never written.

Gradient checkpointing: hooks attach to the output tensors that are part of
the graph that is back-propagated, each with its own input `a`, so a
recomputed forward (reentrant: the first forward runs without grad and
registers nothing; non-reentrant: the recomputed outputs are never
back-propagated) is never counted twice. With non-reentrant checkpointing
the captured inputs of the first forward stay alive until the backward (one
`(B, T, d_in)` tensor per adapted input).

On CUDA (when triton is importable) the outer products and the per-sample
squared norms come from one Triton kernel (`pyinf.kernels.per_sample_outer`);
elsewhere from a batched fp32 matmul. `last_sq_norms` holds `{block: (B,)}`
squared Frobenius norms of the last call's gradients.
"""
from __future__ import annotations

import difflib
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from .blocks import Block
from .losses import default_loss, model_device, move_to_device
from .optional_kernel import OptionalKernel

__all__ = ["GradientCapture", "per_sample_grads"]

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
BlockSpec = Union[str, Sequence[str]]


@dataclass(frozen=True, eq=False)
class _Target:
    name: str
    module: nn.Linear
    transpose: bool  # LoRA B: store (r, d_out)
    block: Block


# --------------------------------------------------------------------------- #
# finding the blocks
# --------------------------------------------------------------------------- #
def _is_lora_layer(mod: nn.Module) -> bool:
    """A PEFT LoraLayer (duck-typed, so that importing peft is never needed)."""
    return isinstance(getattr(mod, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(mod, "lora_B", None), nn.ModuleDict
    )


def _active_adapters(mod: nn.Module) -> list[str]:
    act = getattr(mod, "active_adapters", None)
    if act is None:
        act = getattr(mod, "active_adapter", "default")
    if isinstance(act, str):
        act = [act]
    return [a for a in act if a in mod.lora_A]


def _lora_targets(name: str, mod: nn.Module, adapters: list[str] | None = None) -> list[_Target]:
    if getattr(mod, "merged", False) or getattr(mod, "merged_adapters", None):
        raise ValueError(
            f"LoRA layer '{name}' has its adapter merged into the base weight; "
            "call model.unmerge_adapter() before capturing gradients"
        )
    out = []
    for ad in adapters if adapters is not None else _active_adapters(mod):
        if ad in (getattr(mod, "lora_variant", None) or {}):
            raise ValueError(
                f"LoRA layer '{name}', adapter '{ad}': LoRA variants (DoRA, ...) are not supported; "
                "pass blocks=[module names] of plain nn.Linear weights instead"
            )
        A, B = mod.lora_A[ad], mod.lora_B[ad]
        if not (isinstance(A, nn.Linear) and isinstance(B, nn.Linear)):
            warnings.warn(
                f"pyinf: skipping LoRA layer '{name}' (adapter '{ad}'): only nn.Linear adapters are "
                f"supported, got {type(A).__name__}",
                stacklevel=3,
            )
            continue
        r = A.weight.shape[0]
        out.append(_Target(f"{name}.lora_A.{ad}", A, False, Block(f"{name}.lora_A.{ad}", r, A.weight.shape[1])))
        out.append(_Target(f"{name}.lora_B.{ad}", B, True, Block(f"{name}.lora_B.{ad}", r, B.weight.shape[0])))
    return out


def _close_matches(name: str, candidates: list[str]) -> list[str]:
    suffix = [c for c in candidates if c.endswith("." + name)]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    return list(dict.fromkeys(suffix[:5] + close))[:6]


def _resolve_blocks(model: nn.Module, blocks: BlockSpec) -> list[_Target]:
    modules = dict(model.named_modules())
    lora_layers = {n: m for n, m in modules.items() if _is_lora_layer(m)}
    # role of each LoRA A/B linear, found through its layer
    lora_role: dict[int, tuple[str, nn.Module, str]] = {}
    for ln, lm in lora_layers.items():
        for ad in lm.lora_A:
            lora_role[id(lm.lora_A[ad])] = (ln, lm, ad)
        for ad in lm.lora_B:
            lora_role[id(lm.lora_B[ad])] = (ln, lm, ad)

    entries = [blocks] if isinstance(blocks, str) else list(blocks)
    if not all(isinstance(e, str) for e in entries):
        raise TypeError(f"blocks must be 'lora' or a list of module names, got {blocks!r}")
    targets: list[_Target] = []
    for entry in entries:
        if entry == "lora":
            found = [t for n, m in lora_layers.items() for t in _lora_targets(n, m)]
            if not found:
                raise ValueError("no LoRA adapters found; pass blocks=[module names]")
            targets += found
            continue
        name = entry
        if name not in modules and name.endswith(".weight") and name[: -len(".weight")] in modules:
            name = name[: -len(".weight")]
        if name not in modules:
            cands = [n for n, m in modules.items() if isinstance(m, nn.Linear) or _is_lora_layer(m)]
            hint = _close_matches(name, cands)
            raise ValueError(
                f"unknown block {entry!r}: no such module in the model"
                + (f"; close matches: {hint}" if hint else "")
            )
        mod = modules[name]
        if _is_lora_layer(mod):
            found = _lora_targets(name, mod)
            if not found:
                raise ValueError(f"LoRA layer {entry!r} has no active nn.Linear adapter")
            targets += found
        elif isinstance(mod, nn.Linear):
            if id(mod) in lora_role:
                ln, lm, ad = lora_role[id(mod)]
                kind = 0 if (ad in lm.lora_A and lm.lora_A[ad] is mod) else 1
                targets.append(_lora_targets(ln, lm, [ad])[kind])
            else:
                w = mod.weight
                targets.append(_Target(name, mod, False, Block(name, w.shape[0], w.shape[1])))
        else:
            raise ValueError(
                f"block {entry!r} is a {type(mod).__name__}, not an nn.Linear or a LoRA layer"
            )
    # dedupe by module, keep the first name
    seen: set[int] = set()
    unique = []
    for t in targets:
        if id(t.module) not in seen:
            seen.add(id(t.module))
            unique.append(t)
    if not unique:
        raise ValueError("no blocks to capture; pass blocks='lora' or blocks=[module names]")
    for t in unique:
        if not t.module.weight.is_floating_point():
            raise ValueError(f"block '{t.name}': weight has dtype {t.module.weight.dtype}, not floating point")
    return unique


# --------------------------------------------------------------------------- #
# the outer products
# --------------------------------------------------------------------------- #
_KERNEL = OptionalKernel("per_sample_outer", "per_sample_outer")


def _load_kernel():
    """The per-sample outer-product kernel, or None where it cannot run."""
    return _KERNEL.get()


def _outer_torch(u: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """(B, T, U), (B, T, V), (B, T) -> Σ_t m u ⊗ v (B, U, V) fp32 (no norms)."""
    u = u.float()
    v = v.float()
    if mask is not None:
        keep = (mask != 0)[:, :, None]
        zero = torch.zeros((), dtype=torch.float32, device=u.device)
        if u.shape[-1] <= v.shape[-1]:  # mask the smaller factor
            u = torch.where(keep, u, zero)
        else:
            v = torch.where(keep, v, zero)
    return torch.bmm(u.transpose(1, 2), v), None


# --------------------------------------------------------------------------- #
# the capture
# --------------------------------------------------------------------------- #
class GradientCapture:
    """Per-sample gradients `{block: (B, rows, cols)}` of a model's LoRA matrices.

    Args:
        model: a torch model, typically a PEFT `PeftModel` of a transformers model.
        blocks: "lora" (every active PEFT LoRA adapter matrix) or a list of
            module names (see the module doc). Unknown names: ValueError with
            close matches.
        loss: `loss(model, batch) -> (B,)` per-sample losses; default
            `pyinf.losses.default_loss` (needs `labels` in the batch).
        mask_padding: drop positions with `attention_mask == 0` from the
            per-sample sums (default False: the exact gradient; see the module doc).
        use_triton: None (default): the Triton kernel on CUDA when triton is
            importable, else a batched matmul; True: always the kernel (on CPU
            only under TRITON_INTERPRET=1); False: never.

    Attributes:
        blocks: `list[Block]` (name, rows, cols) in a fixed order.
        last_sq_norms: `{block: (B,)}` squared norms of the last call's gradients.

    Hooks stay on the model until `close()` (or the end of a `with` block) but
    do nothing outside a call. Calls are not thread-safe.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        blocks: BlockSpec = "lora",
        loss: LossFn | None = None,
        mask_padding: bool = False,
        use_triton: bool | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss is not None and not callable(loss):
            raise TypeError("loss must be a callable loss(model, batch) -> (B,) per-sample losses")
        self.model = model
        self.loss = loss if loss is not None else default_loss
        self._targets = _resolve_blocks(model, blocks)
        self.blocks: list[Block] = [t.block for t in self._targets]
        self.use_triton = use_triton
        self.mask_padding = bool(mask_padding)
        self.last_sq_norms: dict[str, torch.Tensor] = {}
        self._active = False
        self._reset()
        self._handles = [
            t.module.register_forward_hook(functools.partial(self._forward_hook, t), with_kwargs=True)
            for t in self._targets
        ]

    # -- context manager -------------------------------------------------- #
    def __enter__(self) -> "GradientCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (the model state is already restored after every call)."""
        for h in self._handles or ():
            h.remove()
        self._handles = None
        self._reset()

    def __del__(self):  # best effort: never leave hooks behind
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- hooks ------------------------------------------------------------- #
    def _reset(self) -> None:
        self._grads: dict[str, torch.Tensor] = {}
        self._sq: dict[str, torch.Tensor | None] = {}
        self._count: dict[str, int] = {}
        self._seen: set[str] = set()
        self._B = 0
        self._mask: torch.Tensor | None = None
        self._kernel = None

    def _forward_hook(self, target: _Target, module, args, kwargs, output):
        if not self._active:
            return None
        self._seen.add(target.name)
        if not (isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled()):
            return None  # e.g. the no-grad first pass of reentrant checkpointing
        x = args[0] if args else kwargs.get("input", None)
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"block '{target.name}': cannot find the linear layer's input tensor")
        # The input rides with the output's hook: each back-propagated output
        # pairs with the input of its own forward.
        output.register_hook(functools.partial(self._grad_hook, target, x.detach()))
        return None

    def _grad_hook(self, target: _Target, a: torch.Tensor, e: torch.Tensor):
        with torch.no_grad():
            B = self._B
            a3 = a.reshape(a.shape[0], -1, a.shape[-1]) if a.dim() != 2 else a[:, None, :]
            e3 = e.reshape(e.shape[0], -1, e.shape[-1]) if e.dim() != 2 else e[:, None, :]
            if a3.shape[0] != B or e3.shape[:2] != a3.shape[:2]:
                raise RuntimeError(
                    f"block '{target.name}': its input has shape {tuple(a.shape)} but the batch has "
                    f"{B} samples; per-sample capture needs the batch in dimension 0"
                )
            mask = self._mask if self._mask is not None and self._mask.shape == a3.shape[:2] else None
            u, v = (a3, e3) if target.transpose else (e3, a3)
            g, sq = self._outer(u, v, mask)
            name = target.name
            if name in self._grads:
                self._grads[name] = self._grads[name] + g
            else:
                self._grads[name] = g
                self._sq[name] = sq
            self._count[name] = self._count.get(name, 0) + 1
        return None

    def _outer(self, u, v, mask):
        if self._kernel is not None:
            try:
                return self._kernel(u, v, mask)
            except Exception as exc:  # noqa: BLE001
                if self.use_triton:
                    raise
                warnings.warn(f"pyinf: the per-sample outer-product kernel failed ({exc}); using torch")
                self._kernel = None
                _KERNEL.disable(exc)
        return _outer_torch(u, v, mask)

    def _pick_kernel(self, device: torch.device):
        if self.use_triton is False:
            return None
        if self.use_triton is None and device.type != "cuda":
            return None
        k = _load_kernel()
        if k is None and self.use_triton:
            raise RuntimeError(f"use_triton=True but the Triton kernel is unavailable: {_KERNEL.error}")
        return k

    # -- the call ---------------------------------------------------------- #
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample gradients `{block: (B, rows, cols)}` float32 on the model's device."""
        if self._handles is None:
            raise RuntimeError("this GradientCapture is closed")
        device = model_device(self.model)
        batch = move_to_device(batch, device)
        weights = [t.module.weight for t in self._targets]
        state = _snapshot(self.model)
        self._reset()
        mask = batch.get("attention_mask")
        try:
            _enter_capture_mode(self.model, weights)
            self._kernel = self._pick_kernel(device)
            with torch.inference_mode(False), torch.enable_grad():
                self._active = True
                losses = self.loss(self.model, batch)
                losses = self._check_losses(losses, mask)
                self._B = losses.shape[0]
                if (
                    self.mask_padding
                    and isinstance(mask, torch.Tensor)
                    and mask.dim() == 2
                    and mask.shape[0] == self._B
                ):
                    self._mask = mask
                if not losses.requires_grad:
                    raise ValueError(
                        "the per-sample losses do not depend on any captured block "
                        f"({[b.name for b in self.blocks][:4]}...)"
                    )
                stash = [(p, p.grad) for p in weights]
                for p in weights:
                    p.grad = None
                try:
                    losses.float().sum().backward()
                finally:
                    for p, g in stash:
                        p.grad = g
            return self._collect(device)
        finally:
            self._active = False
            _restore(self.model, state)
            self._reset_buffers()

    def _reset_buffers(self) -> None:
        self._grads, self._sq, self._count = {}, {}, {}
        self._mask = None
        self._kernel = None

    @staticmethod
    def _check_losses(losses: Any, mask: Any) -> torch.Tensor:
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss(model, batch) must return per-sample losses of shape (B,), got {shape}")
        if isinstance(mask, torch.Tensor) and mask.dim() >= 1 and mask.shape[0] != losses.shape[0]:
            raise ValueError(
                f"loss returned {losses.shape[0]} values for a batch of {mask.shape[0]} samples"
            )
        bad = ~torch.isfinite(losses.detach())
        if bool(bad.any()):
            raise ValueError(f"the loss of samples {bad.nonzero().flatten().tolist()} is NaN or Inf")
        return losses

    def _collect(self, device: torch.device) -> dict[str, torch.Tensor]:
        missing = [t.name for t in self._targets if t.name not in self._seen]
        if missing:
            raise RuntimeError(
                f"blocks {missing[:6]}{'...' if len(missing) > 6 else ''} were not called in the forward "
                "pass (adapter disabled or not active, merged, or the module is unused)"
            )
        B = self._B
        out, norms = {}, {}
        for t in self._targets:
            g = self._grads.get(t.name)
            if g is None:  # used, but the loss does not depend on it
                g = torch.zeros((B, t.block.rows, t.block.cols), dtype=torch.float32, device=device)
            sq = self._sq.get(t.name) if self._count.get(t.name, 0) == 1 else None
            out[t.name] = g
            norms[t.name] = sq if sq is not None else g.pow(2).sum(dim=(1, 2))
        self.last_sq_norms = norms
        return out


def _snapshot(model: nn.Module):
    return [(m, m.training) for m in model.modules()], [(p, p.requires_grad) for p in model.parameters()]


def _enter_capture_mode(model: nn.Module, weights: list[torch.Tensor]) -> None:
    model.eval()
    for m in model.modules():
        # transformers checkpoints a layer only while it is training; keep the
        # flag on the checkpointed layer itself (its children stay in eval).
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    ids = {id(w) for w in weights}  # the captured weights are parameters of `model`
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def _restore(model: nn.Module, state) -> None:
    training, flags = state
    for m, t in training:
        m.training = t
    for p, f in flags:
        p.requires_grad_(f)


def per_sample_grads(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    blocks: BlockSpec = "lora",
    loss: LossFn | None = None,
    mask_padding: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients `{block: (B, rows, cols)}` float32 of one batch.

    One batched forward + backward; see `GradientCapture` for the blocks,
    the loss, padding and the guarantees on the model state.
    """
    with GradientCapture(model, blocks=blocks, loss=loss, mask_padding=mask_padding) as cap:
        return cap(batch)
