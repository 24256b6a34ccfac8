"""Which parameters of a model are blocks, and how each module reads them.

`resolve_blocks(model, blocks)` turns a `blocks` spec into `Target`s: one per
captured parameter, with its `Block` (name, rows, cols) and every `Use` (the
module that reads it and how). `pyinf.capture` hooks the uses;
`pyinf.forward` moves the same parameters.

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

Tied weights: a parameter held by several modules (GPT-2's and Llama's
`lm_head` tied to the input embedding, T5's and BART's shared embedding) is
captured through every one of them and the shares are summed: its block is
the parameter's whole gradient. If one of its holders reads it in a way
pyinf cannot capture (any module not listed below), the block is refused
with a ValueError naming the holder. A parameter read outside its modules'
forward (e.g. `F.linear(h, self.embed.weight)` in a model's own code) cannot
be seen by hooks, and its gradient would miss that use.
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from .blocks import Block

__all__ = ["Use", "Target", "BlockSpec", "resolve_blocks", "is_lora_layer", "active_adapters", "LARGE_BLOCK"]

BlockSpec = Union[str, Sequence[str]]


@dataclass(frozen=True, eq=False)
class Use:
    """A module whose forward reads a captured parameter (a tied weight has several)."""

    module: nn.Module
    kind: str  # "linear" | "conv1d" | "bias" | "embedding" | "lora_emb_A" | "lora_emb_B"
    adapter: str = ""  # LoRA embedding: the adapter
    scale: float = 1.0  # a scaled word embedding's output factor


@dataclass(frozen=True, eq=False)
class Target:
    """One resolved block: its parameter (LoRA A, B as Bᵀ, or a plain weight, with its bias for "+bias"), the
    uses the capture hooks read, and its `Block` shape."""

    name: str
    param: nn.Parameter
    uses: tuple[Use, ...]
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


def is_lora_layer(mod: nn.Module) -> bool:
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


def active_adapters(mod: nn.Module) -> list[str]:
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
        self.lora_layers = {n: m for n, m in self.modules.items() if is_lora_layer(m)}
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

    def use(self, holder: tuple[str, nn.Module, str], p: torch.Tensor) -> Use | None:
        """How the holder's forward reads p, or None where pyinf cannot capture that use."""
        _, m, attr = holder
        if id(p) in self.lora_emb:
            layer, ad, which = self.lora_emb[id(p)]
            return Use(layer, f"lora_emb_{which}", ad)
        linear = isinstance(m, nn.Linear)
        if attr == "bias" and (linear or _is_conv1d(m)):
            return Use(m, "bias")
        if attr == "weight" and (linear or _is_conv1d(m)):
            return Use(m, "linear" if linear else "conv1d")
        if attr == "weight" and isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq:
            scale = _embedding_scale(m)
            return None if scale is None else Use(m, "embedding", scale=scale)
        return None

    def capturable(self, p: torch.Tensor) -> bool:
        return all(self.use(h, p) is not None for h in self.holders[id(p)])

    def target(self, p: torch.Tensor, transpose: bool, name: str | None = None) -> Target:
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
        return Target(name, p, uses, transpose, Block(name, *shape))

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
    """`"<module>+bias"`: (weight, False, name, its Target with the bias appended as a last input column)."""
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
    return w, False, entry, Target(entry, w, t.uses, False, Block(entry, rows, cols), mod.bias)


def _close_matches(name: str, candidates: list[str]) -> list[str]:
    suffix = [c for c in candidates if c.endswith("." + name)]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    return list(dict.fromkeys(suffix[:5] + close))[:6]


def resolve_blocks(model: nn.Module, blocks: BlockSpec) -> list[Target]:
    """The `Target`s `blocks` names in `model` (module doc: "lora", layer, module or parameter names), one
    per parameter in the entries' order; ValueError naming an unknown or uncapturable entry (with close matches)."""
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
                     if isinstance(m, (nn.Linear, nn.Embedding)) or _is_conv1d(m) or is_lora_layer(m)]
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
    unique: dict[int, Target] = {}
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
