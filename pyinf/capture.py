"""Per-sample gradients of the parameters a LoRA fine-tune trains, from one batched backward.

    with GradientCapture(model) as cap:          # blocks="lora": what the PEFT adapter trains
        grads = cap(batch)                       # {block: (B, rows, cols)} float32

How: a forward hook on every module that reads a captured parameter keeps
its input `a` `(B, T, d_in)` (token ids `(B, T)` for an embedding) and
registers a hook on its output tensor that receives `e = dL/d(output)`
`(B, T, d_out)` during the backward of `loss(model, batch).sum()`. The
per-sample losses are independent, so row i of e belongs to sample i alone:
an `nn.Linear` weight's per-sample gradient is `g_i = Σ_t e[i,t]ᵀ ⊗ a[i,t]`,
a bias's `Σ_t e[i,t]`, an embedding's row v `Σ_{t: ids[i,t]=v} e[i,t]`.
One forward and one backward per batch, never a batch-size-1 backward. The
LoRA scaling s is inside e (`result + lora_B(lora_A(x)) * s`), so
`g_A = s Σ_t (Bᵀδ) ⊗ x` and `g_Bᵀ = s Σ_t (A x) ⊗ δ` come out as in DESIGN.md §4.

Tied weights: a parameter held by several modules (GPT-2's and Llama's
`lm_head` tied to the input embedding, T5's and BART's shared embedding) is
captured through every one of them and the shares are summed: its block is
the parameter's whole gradient. If one of its holders reads it in a way
pyinf cannot capture (any module not listed below), the block is refused
with a ValueError naming the holder. A parameter read outside its modules'
forward (e.g. `F.linear(h, self.embed.weight)` in a model's own code) cannot
be seen by hooks, and its gradient would miss that use.

Padding: the result is the exact gradient of each sample's loss. Where the
loss never reads a padded position (causal LM with right or left padding,
classification reading a real token), e is exactly zero there, so padding
adds nothing. Masking by the attention_mask is NOT applied by default: a model
may legitimately read a padded position (RobertaForSequenceClassification
with left padding classifies from position 0, a pad), and masking would then
return something that is not the gradient. `mask_padding=True` drops
positions with attention_mask == 0 from the sums (a no-op in the first case;
the kernel then skips their loads).

Blocks (in the order of the `blocks` entries, one per parameter):

* LoRA A `...lora_A.<adapter>`: `(r, d_in)`, the weight's gradient.
* LoRA B `...lora_B.<adapter>`: stored TRANSPOSED, `(r, d_out)`.
* LoRA on an embedding (`...lora_embedding_A.<adapter>` `(r, V)`,
  `...lora_embedding_B.<adapter>` stored transposed `(r, d)`), from the token ids.
* an `nn.Linear` weight `...name`: `(out, in)`; transformers' `Conv1D`
  (GPT-2) `...name`: `(in, out)`, its weight's own layout; an `nn.Embedding`
  `...name` (or a transformers `*ScaledWordEmbedding`): `(V, d)`, no gradient
  at `padding_idx`; a bias `...name.bias`: `(1, out)`.

`blocks` is "lora" or a list of names. "lora" is what the PEFT adapter
trains: the A and B of every active adapter of every LoRA layer (on
`nn.Linear`s, GPT-2's Conv1D and embeddings), every weight and bias of the
active `modules_to_save` copies (a `SEQ_CLS` classifier, a saved `lm_head`),
and any other trainable (`requires_grad`) weight or bias of the kinds above
(e.g. biases under `bias="all"`), except a non-LoRA parameter of more than
`LARGE_BLOCK` values (a saved `lm_head` or embedding of a real vocabulary:
its per-sample gradients would take GBs per sample; name it in a list to
attribute it anyway); it needs a PEFT model. Every trainable (or
active-adapter) parameter it leaves out (a LayerNorm, a LoRA on a Conv2d,
trainable tokens, a large head, ...) is named in a UserWarning with why.
A list entry is "lora", a LoRA layer (e.g. `...q_proj`, expands to its A and
B), a LoRA A/B linear, an `nn.Linear`, `Conv1D` or `nn.Embedding` module (a
trailing ".weight" is accepted), or a parameter name (`...dense.bias`,
`...lora_embedding_A.default`). `"<module>+bias"` names an `nn.Linear` or
`Conv1D` with a bias as ONE block, its weight with the bias appended as a last
input column: `[W | b]` `(out, in + 1)` for nn.Linear, `[W; b]` `(in + 1, out)`
for Conv1D, the gradient `Σ_t e_t ⊗ [a_t; 1]` (what Kronfluence attributes for
a layer with a bias; K-FAC then factors the bias with the weight).

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
`(B, T, d_in)` tensor per captured module's input).

K-FAC statistics: with `factors` (a `pyinf.factors.FactorStats`, while its
`active` flag is on) the same hooks add each block's token sums of the two
factors' outer products (`Σ_t p_t p_tᵀ`, `Σ_t q_t q_tᵀ`, see `pyinf.factors`)
in the same pass; for the true Fisher (`factors.fisher == "true"`) a second
forward and backward on `fisher_batch(model, batch)` (labels sampled from the
model, `pyinf.losses.sample_labels`) adds them instead, and the gradients stay
those of the batch's own labels.

On CUDA (when triton is importable) the outer products and the per-sample
squared norms come from one Triton kernel (`pyinf.kernels.per_sample_outer`);
elsewhere from a batched fp32 matmul; embedding rows from a scatter-add. `last_sq_norms` holds `{block: (B,)}`
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
from .oom import is_oom
from .optional_kernel import OptionalKernel

__all__ = ["GradientCapture", "per_sample_grads"]

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
BlockSpec = Union[str, Sequence[str]]


@dataclass(frozen=True, eq=False)
class _Use:
    """A module whose forward reads a captured parameter (a tied weight has several)."""

    module: nn.Module
    kind: str  # "linear" | "conv1d" | "bias" | "embedding" | "lora_emb_A" | "lora_emb_B"
    adapter: str = ""  # LoRA embedding: the adapter
    scale: float = 1.0  # a scaled word embedding's output factor


@dataclass(frozen=True, eq=False)
class _Target:
    name: str
    param: nn.Parameter
    uses: tuple[_Use, ...]
    transpose: bool  # LoRA B: the parameter's transpose, (r, d_out)
    block: Block
    bias: nn.Parameter | None = None  # a "<module>+bias" block: the bias, appended as a last input column


# --------------------------------------------------------------------------- #
# finding the blocks
# --------------------------------------------------------------------------- #
CAPTURABLE = "weights and biases of nn.Linear and Conv1D layers, nn.Embedding weights and PEFT LoRA matrices"
# blocks="lora" leaves out non-LoRA parameters larger than this (values per sample; 16 MiB in float32):
# a saved lm_head of a 32k vocabulary at d = 4096 is 134M values, 0.5 GB per sample.
LARGE_BLOCK = 1 << 22


def _is_lora_layer(mod: nn.Module) -> bool:
    """A PEFT LoraLayer (duck-typed, so that importing peft is never needed)."""
    return isinstance(getattr(mod, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(mod, "lora_B", None), nn.ModuleDict
    )


def _is_modules_to_save(mod: nn.Module) -> bool:
    """A PEFT ModulesToSaveWrapper: one trainable copy of a module per adapter."""
    return isinstance(getattr(mod, "modules_to_save", None), nn.ModuleDict) and hasattr(mod, "original_module")


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's linear layers): y = x W + b with W of shape (in, out)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _embedding_scale(m: nn.Embedding) -> float | None:
    """The factor on F.embedding's output: 1 for nn.Embedding's own forward, `embed_scale` for
    transformers' *ScaledWordEmbedding (`super().forward(ids) * embed_scale`), None for any other forward."""
    if type(m).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(m, "embed_scale", None)
    if type(m).__name__.endswith("ScaledWordEmbedding") and (
        isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1)
    ):
        return float(scale)
    return None


def _adapters(mod: nn.Module) -> list[str]:
    act = getattr(mod, "active_adapters", None)
    if act is None:
        act = getattr(mod, "active_adapter", "default")
    return [act] if isinstance(act, str) else list(act)


def _active_adapters(mod: nn.Module) -> list[str]:
    """The active adapters of a LoRA layer that have nn.Module A/B (lora.Linear's)."""
    return [a for a in _adapters(mod) if a in mod.lora_A]


def _lora_params(name: str, mod: nn.Module, adapters: list[str] | None = None) -> list[tuple[str, bool]]:
    """(parameter name, transpose) of A and B of the layer's active (or given) adapters."""
    if getattr(mod, "merged", False) or getattr(mod, "merged_adapters", None):
        raise ValueError(
            f"LoRA layer '{name}' has its adapter merged into the base weight; "
            "call model.unmerge_adapter() before capturing gradients"
        )
    emb = getattr(mod, "lora_embedding_A", None)
    out = []
    for ad in adapters if adapters is not None else _adapters(mod):
        if ad in (getattr(mod, "lora_variant", None) or {}):
            raise ValueError(
                f"LoRA layer '{name}', adapter '{ad}': LoRA variants (DoRA, ...) are not supported; "
                "pass blocks=[module names] of plain nn.Linear weights instead"
            )
        if ad in mod.lora_A and isinstance(mod.lora_A[ad], nn.Linear) and isinstance(mod.lora_B[ad], nn.Linear):
            out += [(f"{name}.lora_A.{ad}.weight", False), (f"{name}.lora_B.{ad}.weight", True)]
        elif isinstance(emb, nn.ParameterDict) and ad in emb:
            if ad in (getattr(mod, "input_fns", None) or {}) or ad in (getattr(mod, "output_fns", None) or {}):
                raise ValueError(
                    f"LoRA layer '{name}', adapter '{ad}': tensor-parallel embedding hooks are not supported"
                )
            out += [(f"{name}.lora_embedding_A.{ad}", False), (f"{name}.lora_embedding_B.{ad}", True)]
    return out


class _ModelIndex:
    """A model's parameters, the modules that hold each (a tied weight: several) and PEFT's adapters."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for mn, m in self.modules.items():
            for attr, p in m._parameters.items():
                if p is not None:
                    self.holders.setdefault(id(p), []).append((mn, m, attr))
        self.lora_layers = {n: m for n, m in self.modules.items() if _is_lora_layer(m)}
        self.saved = {n: m for n, m in self.modules.items() if _is_modules_to_save(m)}
        # id(param) -> (owner layer name, owner, adapter) for every adapter's parameters
        self.owner: dict[int, tuple[str, nn.Module, str]] = {}
        self.lora_emb: dict[int, tuple[nn.Module, str, str]] = {}  # id(param) -> (layer, adapter, "A"/"B")
        for ln, lm in self.lora_layers.items():
            for which in ("A", "B"):
                for ad, sub in getattr(lm, f"lora_{which}").items():
                    self.owner.update({id(p): (ln, lm, ad) for p in sub.parameters()})
                for ad, p in (getattr(lm, f"lora_embedding_{which}", None) or {}).items():
                    self.owner[id(p)] = (ln, lm, ad)
                    self.lora_emb[id(p)] = (lm, ad, which)
        for wn, w in self.saved.items():
            for ad, copy in w.modules_to_save.items():
                self.owner.update({id(p): (wn, w, ad) for p in copy.parameters()})

    def use(self, holder: tuple[str, nn.Module, str], p: torch.Tensor) -> _Use | None:
        """How the holder's forward reads p, or None where pyinf cannot capture that use."""
        _, m, attr = holder
        if id(p) in self.lora_emb:
            layer, ad, which = self.lora_emb[id(p)]
            return _Use(layer, f"lora_emb_{which}", ad)
        linear = isinstance(m, nn.Linear)
        if attr == "bias" and (linear or _is_conv1d(m)):
            return _Use(m, "bias")
        if attr == "weight" and (linear or _is_conv1d(m)):
            return _Use(m, "linear" if linear else "conv1d")
        if attr == "weight" and isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq:
            scale = _embedding_scale(m)
            return None if scale is None else _Use(m, "embedding", scale=scale)
        return None

    def capturable(self, p: torch.Tensor) -> bool:
        return all(self.use(h, p) is not None for h in self.holders[id(p)])

    def target(self, p: torch.Tensor, transpose: bool, name: str | None = None) -> _Target:
        holders = self.holders[id(p)]
        if name is None:  # a weight is named by its module (as blocks=[...] names it), the rest by parameter name
            mn, _, attr = holders[0]
            name = mn if attr == "weight" and id(p) not in self.lora_emb else f"{mn}.{attr}"
        for hn, hm, hattr in holders:
            if self.use((hn, hm, hattr), p) is None:
                if len(holders) > 1:
                    raise ValueError(
                        f"block '{name}': its parameter is shared (tied) with "
                        f"{[h[0] for h in holders if h[0] != name]}, and '{hn}' ({type(hm).__name__}.{hattr}) "
                        f"uses it in a way pyinf cannot capture, so its whole gradient cannot be given; "
                        "leave this block out of blocks=[...]"
                    )
                raise ValueError(f"block '{name}' is a {type(hm).__name__}.{hattr}; pyinf captures {CAPTURABLE}")
        if not p.is_floating_point():
            raise ValueError(f"block '{name}': weight has dtype {p.dtype}, not floating point")
        shape = (1, p.numel()) if p.dim() == 1 else tuple(p.shape[::-1] if transpose else p.shape)
        uses = tuple(self.use(h, p) for h in holders)
        return _Target(name, p, uses, transpose, Block(name, *shape))

    def lora_role(self, p: torch.Tensor) -> tuple[str, nn.Module, str, bool] | None:
        """(layer name, layer, adapter, is B) of a LoRA A/B parameter, else None."""
        own = self.owner.get(id(p))
        if own is None or own[0] not in self.lora_layers:
            return None
        ln, lm, ad = own
        if id(p) in self.lora_emb:
            return ln, lm, ad, self.lora_emb[id(p)][2] == "B"
        return ln, lm, ad, ad in lm.lora_B and any(q is p for q in lm.lora_B[ad].parameters())

    def peft_params(self) -> list[tuple[torch.Tensor, bool]]:
        """blocks="lora": LoRA A/B of the active adapters, the active modules_to_save copies' capturable
        parameters, and every other trainable capturable parameter (e.g. biases under bias="all"); nothing
        for a model without PEFT adapters (all of whose parameters may be trainable)."""
        if not self.lora_layers and not self.saved:
            return []
        out = [(self.params[n], tr) for ln, lm in self.lora_layers.items() for n, tr in _lora_params(ln, lm)]
        for w in self.saved.values():
            for ad in _adapters(w):
                if ad in w.modules_to_save:
                    out += [(p, False) for p in w.modules_to_save[ad].parameters() if self.capturable(p)]
        out += [(p, False) for p in self.params.values()
                if p.requires_grad and id(p) not in self.owner and self.capturable(p)]
        return [(p, tr) for p, tr in out if self.lora_role(p) is not None or p.numel() <= LARGE_BLOCK]

    def left_out(self, captured: set[int]) -> list[str]:
        """'name (why)' for every trainable or active-adapter parameter that is not captured."""
        out = []
        for n, p in self.params.items():
            own = self.owner.get(id(p))
            active = own is not None and own[2] in _adapters(own[1])
            if id(p) in captured or not (p.requires_grad or active):
                continue
            if own is not None and not active:
                why = f"adapter '{own[2]}' is not active"
            else:
                bad = [h for h in self.holders[id(p)] if self.use(h, p) is None]
                why = (f"{type(bad[0][1]).__name__}.{bad[0][2]} of '{bad[0][0]}'" if bad else "not selected")
                if len(self.holders[id(p)]) > 1 and bad:
                    why = "tied to " + why
                elif not bad and p.numel() > LARGE_BLOCK:
                    why = (f"{p.numel():,} values a sample, more than LARGE_BLOCK for blocks='lora'; "
                           "name it in blocks=[...] to attribute it")
            out.append(f"{n} ({why})")
        return out


def _with_bias(idx: _ModelIndex, entry: str) -> tuple:
    """`"<module>+bias"`: (weight, False, name, its _Target with the bias appended as a last input column)."""
    name = entry[: -len("+bias")]
    mod = idx.modules.get(name)
    if not (isinstance(mod, nn.Linear) or _is_conv1d(mod)) or name in idx.lora_layers:
        raise ValueError(f"block {entry!r}: '+bias' takes an nn.Linear or Conv1D module, "
                         f"not {type(mod).__name__ if mod is not None else 'a missing module'}")
    if not isinstance(getattr(mod, "bias", None), nn.Parameter):
        raise ValueError(f"block {entry!r}: {name} has no bias; name the module without '+bias'")
    w = mod.weight
    if len(idx.holders[id(w)]) > 1 or len(idx.holders[id(mod.bias)]) > 1:
        raise ValueError(f"block {entry!r}: a tied weight or bias cannot be joined; name them separately")
    t = idx.target(w, False, entry)
    rows, cols = (t.block.rows, t.block.cols + 1) if isinstance(mod, nn.Linear) else (t.block.rows + 1, t.block.cols)
    return w, False, entry, _Target(entry, w, t.uses, False, Block(entry, rows, cols), mod.bias)


def _close_matches(name: str, candidates: list[str]) -> list[str]:
    suffix = [c for c in candidates if c.endswith("." + name)]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    return list(dict.fromkeys(suffix[:5] + close))[:6]


def _resolve_blocks(model: nn.Module, blocks: BlockSpec) -> list[_Target]:
    idx = _ModelIndex(model)
    entries = [blocks] if isinstance(blocks, str) else list(blocks)
    if not all(isinstance(e, str) for e in entries):
        raise TypeError(f"blocks must be 'lora' or a list of module names, got {blocks!r}")
    chosen: list[tuple[torch.Tensor, bool, str | None]] = []  # (parameter, transpose, block name)
    for entry in entries:
        if entry == "lora":
            found = idx.peft_params()
            if not found:
                raise ValueError("no LoRA adapters found; pass blocks=[module names]")
            chosen += [(p, tr, None) for p, tr in found]
            continue
        if entry.endswith("+bias"):
            chosen.append(_with_bias(idx, entry))
            continue
        name = entry[: -len(".weight")] if entry.endswith(".weight") and entry not in idx.modules else entry
        mod = idx.modules.get(name)
        if mod is not None and name in idx.lora_layers:
            found = _lora_params(name, mod)
            if not found:
                raise ValueError(f"LoRA layer {entry!r} has no active nn.Linear or nn.Embedding adapter")
            chosen += [(idx.params[n], tr, None) for n, tr in found]
            continue
        if mod is not None:
            p = getattr(mod, "weight", None)
            if not isinstance(p, nn.Parameter) or idx.use((name, mod, "weight"), p) is None:
                raise ValueError(
                    f"block {entry!r} is a {type(mod).__name__}, not an nn.Linear, Conv1D, nn.Embedding "
                    "or a LoRA layer"
                )
        elif entry in idx.params:
            p, name = idx.params[entry], None
        else:
            cands = [n for n, m in idx.modules.items()
                     if isinstance(m, (nn.Linear, nn.Embedding)) or _is_conv1d(m) or _is_lora_layer(m)]
            hint = _close_matches(entry, cands + [n for n in idx.params if not n.endswith(".weight")])
            raise ValueError(
                f"unknown block {entry!r}: no such module or parameter in the model"
                + (f"; close matches: {hint}" if hint else "")
            )
        role = idx.lora_role(p)
        if role is not None:
            _lora_params(role[0], role[1], [role[2]])  # refuses merged layers and variants
        chosen.append((p, role is not None and role[3], name))
    # one block per parameter, named after its first holder
    unique: dict[int, _Target] = {}
    biased = {id(c[0]): c[3] for c in chosen if len(c) == 4}
    for p, tr, name, *bias in chosen:
        if id(p) in biased and name != biased[id(p)].name:
            raise ValueError(f"blocks {name!r} and {biased[id(p)].name!r} both hold the weight of one layer; name one")
        if id(p) not in unique:
            unique[id(p)] = idx.target(p, tr, name) if not bias else bias[0]
    if not unique:
        raise ValueError("no blocks to capture; pass blocks='lora' or blocks=[module names]")
    if "lora" in entries:
        left = idx.left_out(set(unique))
        if left:
            warnings.warn(
                f"pyinf: {len(left)} trainable parameter(s) are not attributed (pyinf captures {CAPTURABLE}): "
                + ", ".join(left[:20]) + (", ..." if len(left) > 20 else ""),
                stacklevel=3,
            )
    return list(unique.values())


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


def _scatter_rows(ids: torch.Tensor, u: torch.Tensor, rows: int, padding_idx: int | None, mask):
    """(B, T) ids, (B, T, k) -> (B, rows, k) fp32: row v of sample i sums u[i, t] over ids[i, t] == v.

    This is F.embedding's weight gradient per sample: nothing reaches padding_idx, nor masked positions.
    """
    keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if mask is None else mask != 0
    if padding_idx is not None:
        keep = keep & (ids != padding_idx)
    u = torch.where(keep[:, :, None], u.float(), torch.zeros((), dtype=torch.float32, device=u.device))
    out = torch.zeros((u.shape[0], rows, u.shape[2]), dtype=torch.float32, device=u.device)
    return out.scatter_add_(1, ids[:, :, None].expand(-1, -1, u.shape[2]), u)


# --------------------------------------------------------------------------- #
# the capture
# --------------------------------------------------------------------------- #
class GradientCapture:
    """Per-sample gradients `{block: (B, rows, cols)}` of a model's trained parameters.

    Args:
        model: a torch model, typically a PEFT `PeftModel` of a transformers model.
        blocks: "lora" (what the PEFT adapter trains: LoRA matrices, modules_to_save
            heads; see the module doc) or a list of module or parameter names.
            Unknown names: ValueError with close matches.
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
        factors=None,
        fisher_batch: Callable[[nn.Module, Mapping[str, Any]], Mapping[str, Any]] | None = None,
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
        self.factors = factors
        self.fisher_batch = fisher_batch
        self.fisher_loss: LossFn | None = None  # the sampled pass's loss (default: `loss`)
        self.last_sq_norms: dict[str, torch.Tensor] = {}
        self._active = False
        self._token_H: dict[str, torch.Tensor] | None = None  # token_scores: H per block, (m, rows, cols)
        self._token_T = 0
        self._reset()
        by_module: dict[int, tuple[nn.Module, list[tuple[_Target, _Use]]]] = {}
        for t in self._targets:
            for u in t.uses:
                by_module.setdefault(id(u.module), (u.module, []))[1].append((t, u))
        self._handles = [
            m.register_forward_hook(functools.partial(self._forward_hook, uses), with_kwargs=True)
            for m, uses in by_module.values()
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
        self._stat_mask: torch.Tensor | None = None
        self._phase = "grads"  # "grads" | "factors" (statistics only) | "both"
        self._added = False
        self._kernel = None
        self._tokens: torch.Tensor | None = None  # token_scores: the (m, B, T) sum so far

    def _forward_hook(self, uses: list[tuple[_Target, _Use]], module, args, kwargs, output):
        if not self._active:
            return None
        self._seen.update(t.name for t, _ in uses)
        if not (isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled()):
            return None  # e.g. the no-grad first pass of reentrant checkpointing
        x = args[0] if args else next((kwargs[k] for k in ("input", "x") if k in kwargs), None)
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"block '{uses[0][0].name}': cannot find the layer's input tensor")
        # The input rides with the output's hook: each back-propagated output
        # pairs with the input of its own forward.
        output.register_hook(functools.partial(self._grad_hook, uses, x.detach()))
        return None

    def _grad_hook(self, uses: list[tuple[_Target, _Use]], a: torch.Tensor, e: torch.Tensor):
        with torch.no_grad():
            B = self._B
            e3 = e.reshape(e.shape[0], -1, e.shape[-1]) if e.dim() != 2 else e[:, None, :]
            if a.is_floating_point():  # a linear layer's input (B, ..., d_in)
                a3 = a.reshape(a.shape[0], -1, a.shape[-1]) if a.dim() != 2 else a[:, None, :]
            else:  # an embedding's token ids (B, ...)
                a3 = a.reshape(a.shape[0], -1)
            if a3.shape[0] != B or e3.shape[:2] != a3.shape[:2]:
                raise RuntimeError(
                    f"block '{uses[0][0].name}': its input has shape {tuple(a.shape)} but the batch has "
                    f"{B} samples; per-sample capture needs the batch in dimension 0"
                )
            mask = self._mask if self._mask is not None and self._mask.shape == a3.shape[:2] else None
            ones = None  # "+bias" blocks: the input with a last column of ones
            if any(t.bias is not None for t, _ in uses):
                ones = torch.cat([a3, a3.new_ones((*a3.shape[:-1], 1))], dim=-1)
            if self._phase != "grads":
                self._add_factors(uses, a3, e3, ones)
            if self._phase == "factors":
                return None
            if self._token_H is not None:  # token_scores: each token's bilinear form, no gradients
                self._add_token_scores(uses, a3, e3, ones, mask)
                return None
            for target, use in uses:
                g, sq = self._contribution(target, use, a3 if target.bias is None else ones, e3, mask)
                name = target.name
                if name in self._grads:
                    self._grads[name] = self._grads[name] + g
                else:
                    self._grads[name] = g
                    self._sq[name] = sq
                self._count[name] = self._count.get(name, 0) + 1
        return None

    def _add_factors(self, uses: list[tuple[_Target, _Use]], a: torch.Tensor, e: torch.Tensor, ones=None) -> None:
        """K-FAC token statistics of this use (`pyinf.factors`): the rows and cols sides of the block's outer
        products, over the tokens the batch's attention_mask keeps. Embeddings have none."""
        keep = self._stat_mask
        keep = keep != 0 if keep is not None and keep.shape == a.shape[:2] else None
        for t, u in uses:
            if u.kind in ("linear", "conv1d"):
                x = a if t.bias is None else ones
                self.factors.add(t.name, *((e, x) if (u.kind == "linear") != t.transpose else (x, e)), keep)
            elif u.kind == "bias":
                self.factors.add(t.name, None, e, keep)
            else:
                continue
            self._added = True

    def _add_token_scores(self, uses: list[tuple[_Target, _Use]], a: torch.Tensor, e: torch.Tensor, ones, mask) -> None:
        """token_scores: add this use's per-token scores (`pyinf.token_scores`) into `self._tokens`."""
        from .token_scores import use_token_scores

        for t, u in uses:
            if a.shape[1] != self._token_T:
                raise ValueError(
                    f"block '{t.name}': its input has {a.shape[1]} positions per sample, not the batch's "
                    f"{self._token_T} tokens (e.g. a head that reads one token): per-token scores need blocks "
                    f"that read every position; leave it out with blocks=[...]"
                )
            s = use_token_scores(u.kind, t.transpose, a if t.bias is None else ones, e, self._token_H[t.name],
                                 mask, t.name)
            self._tokens = s if self._tokens is None else self._tokens + s

    def _contribution(self, t: _Target, u: _Use, a: torch.Tensor, e: torch.Tensor, mask):
        """This use's share of the per-sample gradients, in the block's layout: ((B, rows, cols) fp32, norms or None).

        a: (B, T, d_in) inputs, or (B, T) token ids for an embedding; e: (B, T, d_out) = dL/d(output).
        """
        if u.kind in ("linear", "conv1d"):
            # nn.Linear's weight (out, in) is Σ e ⊗ a, Conv1D's (in, out) is Σ a ⊗ e; LoRA B is stored transposed
            return self._outer(*((e, a) if (u.kind == "linear") != t.transpose else (a, e)), mask)
        if u.kind == "bias":
            e = e.float()
            if mask is not None:
                e = torch.where((mask != 0)[:, :, None], e, torch.zeros((), dtype=e.dtype, device=e.device))
            return e.sum(dim=1)[:, None, :], None
        if u.kind == "embedding":
            m = u.module
            rows = _scatter_rows(a, e, m.num_embeddings, m.padding_idx, mask)
            return (rows if u.scale == 1.0 else rows * u.scale), None
        # PEFT LoRA embedding: out = base(ids) + s · A.T[ids] @ B.T (A (r, V), B (d, r))
        layer, ad = u.module, u.adapter
        base = layer.get_base_layer()
        s = float(layer.scaling[ad])
        scale = layer._get_embed_scale() if hasattr(layer, "_get_embed_scale") else None
        if scale is not None:
            s *= float(scale)
        A, Bw = layer.lora_embedding_A[ad].detach(), layer.lora_embedding_B[ad].detach()
        if u.kind == "lora_emb_B":  # Σ s A.T[ids] ⊗ e, (r, d): B transposed
            g, sq = self._outer(A.t()[a], e, mask)
            return g * s, (None if sq is None else sq * (s * s))
        rows = _scatter_rows(a, torch.matmul(e.float(), Bw.float()), A.shape[1], base.padding_idx, mask)
        return (rows * s).transpose(1, 2).contiguous(), None  # (r, V), A's layout

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
    def token_scores(self, batch: Mapping[str, Any], H: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-token scores `(m, B, T)` of a batch against preconditioned queries `H` {block: (m, D_b)}
        (`Method.precondition`): `−Σ_b u_tᵀ H_b v_t` per position t, summing over t to the batch's
        `(m, B)` scores; see `pyinf.token_scores` for the math and what a token's share means.
        One forward and backward, as a call; no per-sample gradient is formed."""
        ids = next((batch[k] for k in ("input_ids", "attention_mask") if isinstance(batch.get(k), torch.Tensor)), None)
        if ids is None or ids.dim() != 2:
            raise ValueError("token_scores needs a batch with (B, T) input_ids or attention_mask (its positions)")
        missing = sorted({t.name for t in self._targets} - set(H))
        if missing:
            raise ValueError(f"token_scores: H has no block {missing[:4]}")
        self._token_T = ids.shape[1]
        self._token_H = {t.name: H[t.name].reshape(H[t.name].shape[0], t.block.rows, t.block.cols)
                         for t in self._targets}
        try:
            return self(batch)
        finally:
            self._token_H = None

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample gradients `{block: (B, rows, cols)}` float32 on the model's device."""
        if self._handles is None:
            raise RuntimeError("this GradientCapture is closed")
        device = model_device(self.model)
        batch = move_to_device(batch, device)
        weights = [t.param for t in self._targets]
        state = _snapshot(self.model)
        self._reset()
        mask = batch.get("attention_mask")
        stats = self.factors if self.factors is not None and self.factors.active else None
        sampled = stats is not None and stats.fisher == "true"
        if sampled and self.fisher_batch is None:
            raise ValueError("fisher='true' statistics need fisher_batch (labels sampled from the model)")
        self._phase = "grads" if stats is None or sampled else "both"
        self._stat_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        try:
            _enter_capture_mode(self.model, weights, state)
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
                    if sampled:  # the true Fisher's statistics: a second backward, on labels drawn from the model
                        self._phase = "factors"
                        self._sampled_backward(batch)
                finally:
                    for p, g in stash:
                        p.grad = g
            return self._collect(device)
        except Exception as err:
            if self._added and is_oom(err):  # not retried in halves: the statistics cannot be taken back
                raise RuntimeError(
                    "ran out of device memory while accumulating the K-FAC statistics of a batch, which are "
                    "partly added and cannot be retried in halves; use a smaller batch_size"
                ) from err
            raise
        finally:
            self._active = False
            _restore(state)
            self._reset_buffers()

    # -- a forward and backward run by the caller (pyinf.callback, at="train") -- #
    def begin(self, batch_size: int, attention_mask: torch.Tensor | None = None) -> None:
        """Capture the next forward and backward of a batch of `batch_size` samples that the caller runs
        itself (a Trainer's step), as they are: the model's mode (dropout), loss and scaling are the
        caller's, so `end()` returns the per-sample gradients of the caller's loss. `attention_mask`
        (B, T): for `mask_padding`. No K-FAC statistics."""
        if self._handles is None:
            raise RuntimeError("this GradientCapture is closed")
        self._reset()
        self._B = int(batch_size)
        if self.mask_padding and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self._mask = attention_mask
        self._kernel = self._pick_kernel(model_device(self.model))
        self._active = True

    def end(self) -> dict[str, torch.Tensor]:
        """The per-sample gradients `{block: (B, rows, cols)}` float32 of the backward since `begin`."""
        try:
            return self._collect(model_device(self.model))
        finally:
            self._active = False
            self._reset_buffers()

    def _sampled_backward(self, batch: Mapping[str, Any]) -> None:
        """Forward and backward of the loss on `fisher_batch(model, batch)`; the hooks only add statistics."""
        with torch.no_grad():
            fb = self.fisher_batch(self.model, batch)
        losses = self._check_losses((self.fisher_loss or self.loss)(self.model, fb), fb.get("attention_mask"))
        if losses.requires_grad:
            losses.float().sum().backward()

    def _reset_buffers(self) -> None:
        self._grads, self._sq, self._count = {}, {}, {}
        self._mask = self._stat_mask = None
        self._phase, self._added = "grads", False
        self._kernel = None
        self._tokens = None

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
        if self._token_H is not None:  # token_scores: the hooks' sum (zero if no block reached the loss)
            m = next(iter(self._token_H.values())).shape[0]
            if self._tokens is None:
                dtype = next(iter(self._token_H.values())).dtype
                return torch.zeros(m, self._B, self._token_T, dtype=dtype, device=device)
            return self._tokens
        B = self._B
        out, norms = {}, {}
        for t in self._targets:
            g = self._grads.get(t.name)
            if g is None:  # used, but the loss does not depend on it
                g = torch.zeros((B, t.block.rows, t.block.cols), dtype=torch.float32, device=device)
            sq = self._sq.get(t.name) if self._count.get(t.name, 0) == 1 else None
            out[t.name] = g
            # one read of g, no (B, rows, cols) temporary: 5x cheaper than g.pow(2).sum on the CPU
            norms[t.name] = sq if sq is not None else torch.linalg.vector_norm(g, dim=(1, 2)).square()
        self.last_sq_norms = norms
        return out


def _snapshot(model: nn.Module):
    return [(m, m.training) for m in model.modules()], [(p, p.requires_grad) for p in model.parameters()]


# Enter and restore set only the flags that change: writing every module's flag
# (nn.Module.__setattr__, a recursive model.eval()) took 1 ms a call on the demo
# model (141 modules), 2% of its forward + backward on a batch.
def _enter_capture_mode(model: nn.Module, weights: list[torch.Tensor], state) -> None:
    training, flags = state
    if any(t for _, t in training):
        model.eval()
    for m, _ in training:
        # transformers checkpoints a layer only while it is training; keep the
        # flag on the checkpointed layer itself (its children stay in eval).
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    ids = {id(w) for w in weights}  # the captured weights are parameters of `model`
    for p, f in flags:
        if f != (id(p) in ids):
            p.requires_grad_(not f)


def _restore(state) -> None:
    training, flags = state
    for m, t in training:
        if m.training != t:
            m.training = t
    for p, f in flags:
        if p.requires_grad != f:
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
