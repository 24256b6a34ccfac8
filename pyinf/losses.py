"""Per-sample losses of Hugging Face style models.

`default_loss(model, batch) -> (B,)` is the loss a user expects from a model
called with `labels`, but one value per sample (pyinf needs the gradient of
each sample's own loss, and the samples must be independent):

* causal LM (a `*ForCausalLM` or `*LMHeadModel` model, or a decoder-only
  `*ForConditionalGeneration`; logits `(B, T, V)`, labels `(B, T)`): the mean
  over the sample's target tokens of the next-token cross-entropy, shifted
  (logits[:, t] predicts labels[:, t+1]). A target counts when its label is
  not -100 and, with an `attention_mask`, when both the target token and the
  token that predicts it are real: with left padding a pad never predicts the
  first real token, and a pad is never a target. A sample without any target
  has loss 0 (and zero gradient).
* encoder-decoder (`config.is_encoder_decoder`: BART, T5, ...): labels are
  the decoder's targets, unshifted; the mean over labels that are not -100
  (the `attention_mask` is the encoder's and is not applied). Without
  `decoder_input_ids` in the batch they are made from the labels by the
  model's own `prepare_decoder_input_ids_from_labels`, as the model does
  (a model without it, e.g. BartForSequenceClassification, makes its own).
* masked LM (`*ForMaskedLM`) and token classification
  (`*ForTokenClassification`), logits `(B, T, C)`, labels `(B, T)`: the mean
  over labels that are not -100 (and real tokens), unshifted.
* any other model with per-token logits: ValueError (pyinf cannot tell
  whether its labels are shifted); pass a `loss=` callable.
* sequence classification (logits `(B, C)`, integer labels `(B,)`):
  cross-entropy; regression (`C == 1`): squared error `(logit - label)²`;
  multi-label (float labels `(B, C)`): binary cross-entropy with logits,
  mean over the C classes.
* anything else: ValueError asking for a `loss=` callable.

The model is called with every entry of the batch except `labels` (so it
does not compute its own batch-mean loss), with `use_cache=False` for causal
LMs and encoder-decoders. Each sample's loss equals the model's own
`outputs.loss` for that sample alone. Losses are computed in float32.

A `Task` separates the training loss (what the training gradients g_i are
taken of) from the query measurement f (what the query gradients v_j are
taken of; Kronfluence's `Task` does the same), both `fn(model, batch) -> (B,)`:

    task = Task(measurement=completion_log_prob)      # train on default_loss, measure log p(completion)
    att = pyinf.Attributor(model, method="datainf", task=task)

`Task()` is the default (the training loss measures the queries too, as
`loss=` alone does). Every score is then the first-order change of the
measurement when training point i is up-weighted: score[j, i] = −∇f_jᵀ H⁻¹ g_i.
For a loss (the default) positive means harmful; for a log-probability or a
margin, which training raises, positive means HELPFUL. Ready-made
measurements, by `default_loss`'s rules for which tokens are targets:

* `completion_log_prob`: log p(labels | inputs), summed over the target
  tokens (labels != -100): the log-probability of a given completion;
  for a classifier log p(label).
* `classification_margin`: logit of the label − logsumexp of the other
  logits (sequence classification), as Kronfluence's and TRAK's margin.
* `selected_tokens_loss(key)`: `default_loss` on the target tokens that a
  `(B, T)` mask `batch[key]` (aligned with the labels) keeps; the key is not
  passed to the model.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

__all__ = ["default_loss", "check_losses", "sample_labels", "move_to_device", "model_device", "IGNORE_INDEX", "Task",
           "completion_log_prob", "classification_margin", "selected_tokens_loss"]

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its input embeddings, else its first parameter."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
            w = getattr(emb, "weight", None)
            if isinstance(w, torch.Tensor):
                return w.device
        except (NotImplementedError, AttributeError):
            pass
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def move_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A dict copy of `batch` with every tensor moved to `device` (others as is)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"a batch must be a mapping of tensors (as a tokenizer or a DataLoader yields), "
            f"got {type(batch).__name__}"
        )
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
    }


def check_losses(losses: Any, rows: int | None = None, *, finite: bool = True) -> torch.Tensor:
    """`losses` if it is a `(B,)` tensor of per-sample values (B = `rows` when given); else a ValueError
    naming what came back. `finite`: a NaN or Inf value is a ValueError naming the samples (one host read)."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or (rows is not None and losses.shape[0] != rows):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        want = "" if rows is None else f" with B = {rows}, the batch's samples"
        raise ValueError(f"loss(model, batch) must return per-sample losses of shape (B,){want}, got {got}")
    if finite:
        bad = ~torch.isfinite(losses.detach())
        if bool(bad.any()):
            raise ValueError(f"the loss of samples {bad.nonzero().flatten().tolist()} is NaN or Inf")
    return losses


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (PeftModel.get_base_model())."""
    get = getattr(model, "get_base_model", None)
    if callable(get):
        try:
            return get()
        except Exception:  # noqa: BLE001 - any wrapper quirk: use the model itself
            return model
    return model


def _family(model: nn.Module) -> str:
    """How a model's per-token labels are read: "causal", "seq2seq", "token" (unshifted) or "unknown"."""
    base = _unwrap(model)
    name = type(base).__name__
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return "seq2seq"
    if name.endswith(("ForMaskedLM", "ForTokenClassification")):
        return "token"
    if name.endswith(("ForCausalLM", "ForConditionalGeneration")) or (
        name.endswith("LMHeadModel") and not name.endswith("WithLMHeadModel")  # XLM's is a masked LM
    ):
        return "causal"
    return "unknown"


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        f"default_loss: cannot find logits in the model output ({type(out).__name__}); "
        "pass loss=callable(model, batch) -> (B,) per-sample losses"
    )


def _wide(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 at least: half-precision logits are upcast, float64 ones kept (`.float()` would round them)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`(B, T)` cross-entropy of each target token, 0 where not `valid`."""
    B, T, V = logits.shape
    safe = torch.where(valid, targets, torch.zeros((), dtype=targets.dtype, device=targets.device))
    ce = F.cross_entropy(_wide(logits.reshape(B * T, V)), safe.reshape(B * T), reduction="none").view(B, T)
    return torch.where(valid, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))


def _token_mean(nll: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return nll.sum(dim=1) / valid.sum(dim=1).clamp(min=1).to(nll.dtype)


def _causal_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, valid) `(B, T - 1)`: labels[:, t + 1], predicted by position t (rules in the module doc)."""
    tgt = labels[:, 1:]
    valid = tgt != IGNORE_INDEX
    if attention_mask is not None:
        real = attention_mask != 0
        valid = valid & real[:, :-1] & real[:, 1:]
    return tgt, valid


def _unshifted_valid(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    valid = labels != IGNORE_INDEX
    return valid if attention_mask is None else valid & (attention_mask != 0)


def causal_lm_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, T-1)` bool: which shifted targets `labels[:, 1:]` count in `causal_lm_loss` (rules in the module doc)."""
    return _causal_targets(labels, attention_mask)[1]


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample mean shifted next-token cross-entropy `(B,)` (rules in the module doc)."""
    tgt, valid = _causal_targets(labels, attention_mask)
    return _token_mean(_token_nll(logits[:, :-1, :], tgt, valid), valid)


def token_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample mean token cross-entropy `(B,)`, unshifted (token classification, masked LM, encoder-decoder)."""
    valid = _unshifted_valid(labels, attention_mask)
    return _token_mean(_token_nll(logits, labels, valid), valid)


def _seeded(seed: int, batch: Mapping[str, Any], device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by `seed` and the batch's inputs: the same draws for the same
    batch, whatever the order or the batching of the passes."""
    h = hashlib.sha256(str(seed).encode())
    for key in sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor)):
        h.update(key.encode() + batch[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.Generator(device=device).manual_seed(int.from_bytes(h.digest()[:8], "little") >> 1)


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One class per row of `logits` (..., C), drawn from softmax(logits)."""
    probs = torch.softmax(_wide(logits.reshape(-1, logits.shape[-1])), dim=-1)
    return torch.multinomial(probs, 1, generator=gen).view(logits.shape[:-1])


def sample_labels(model: nn.Module, batch: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """`batch` with its labels drawn from the model's own predictions (the true Fisher's labels, K-FAC).

    Covered: the cross-entropy losses of `default_loss`: causal LM (each target token drawn from the
    logits that predict it), token classification / masked LM and encoder-decoders (the decoder
    inputs stay those of the real labels), sequence classification. Positions that are no target
    (-100) stay -100. Seeded by `seed` and the batch's inputs (`_seeded`); the model runs in eval mode
    (dropout off, as the capture sees it; its modes are restored). Anything else: ValueError.
    """
    batch = move_to_device(batch, model_device(model))
    inputs, labels, family = _prepare(model, batch)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # the predictions without dropout, as the capture sees the model
    try:
        with torch.no_grad():
            logits = _logits(model(**inputs))
    finally:
        for m, t in modes:
            m.training = t
    gen = _seeded(seed, batch, logits.device)
    out = dict(batch)
    if family == "seq2seq" and "decoder_input_ids" in inputs:
        out["decoder_input_ids"] = inputs["decoder_input_ids"]
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[:2] == labels.shape and family != "unknown":
        drawn = _draw(logits, gen)
        new = labels.clone()
        if family == "causal":  # logits[:, t] predicts labels[:, t + 1]
            new[:, 1:] = torch.where(labels[:, 1:] != IGNORE_INDEX, drawn[:, :-1], labels[:, 1:])
        else:
            new = torch.where(labels != IGNORE_INDEX, drawn, labels)
        out["labels"] = new
        return out
    if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point() and logits.shape[1] > 1:
        out["labels"] = _draw(logits, gen).to(labels.dtype)
        return out
    raise ValueError(
        f"fisher='true' samples labels for cross-entropy losses (causal LM, token classification, masked LM, "
        f"encoder-decoder, sequence classification); not for logits {tuple(logits.shape)} with labels "
        f"{tuple(labels.shape)} ({labels.dtype}): use fisher='empirical'"
    )


def _prepare(model: nn.Module, batch: Mapping[str, Any]) -> tuple[dict[str, Any], torch.Tensor, str]:
    """(the model's inputs, the labels, the model family) of a batch on the model's device."""
    if "labels" not in batch or batch["labels"] is None:
        raise ValueError(
            "default_loss needs 'labels' in the batch; add them, or pass "
            "loss=callable(model, batch) -> (B,) per-sample losses"
        )
    labels = batch["labels"]
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"batch['labels'] must be a tensor, got {type(labels).__name__}")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    family = _family(model)
    if family in ("causal", "seq2seq"):
        inputs.setdefault("use_cache", False)
    prepare = getattr(_unwrap(model), "prepare_decoder_input_ids_from_labels", None)
    if family == "seq2seq" and callable(prepare) and inputs.get("decoder_input_ids") is None \
            and inputs.get("decoder_inputs_embeds") is None:
        inputs["decoder_input_ids"] = prepare(labels=labels)  # what the model does when given labels
    return inputs, labels, family


def _outputs(model: nn.Module, batch: Mapping[str, Any]):
    """(logits, labels, family, the (B, T) attention mask that applies to the labels or None) of a batch."""
    batch = move_to_device(batch, model_device(model))
    inputs, labels, family = _prepare(model, batch)
    logits = _logits(model(**inputs))
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.shape != labels.shape[:2] or family == "seq2seq":
        mask = None  # an encoder-decoder's attention_mask is the encoder's
    return logits, labels, family, mask


def _token_terms(model, logits, labels, family, mask, who: str, keep: torch.Tensor | None = None):
    """Per-token models: (nll `(B, T')`, valid `(B, T')`) of the target tokens by the module doc's rules
    (causal LMs shifted: T' = T − 1), only where `keep` (a `(B, T)` mask aligned with the labels) is
    nonzero when given; None for any other output."""
    if not (logits.dim() == 3 and labels.dim() == 2 and logits.shape[:2] == labels.shape):
        return None
    if family in ("seq2seq", "token"):
        valid = _unshifted_valid(labels, mask)
        valid = valid if keep is None else valid & (keep != 0)
        return _token_nll(logits, labels, valid), valid
    if family == "unknown":
        raise ValueError(
            f"{who} cannot tell how {type(_unwrap(model)).__name__} reads its per-token labels "
            "(a causal LM shifts them, an encoder-decoder or a masked LM does not); pass "
            "loss=callable(model, batch) -> (B,) per-sample losses"
        )
    if labels.shape[1] < 2:
        raise ValueError(f"{who}: causal LM batches need at least 2 tokens per sequence")
    tgt, valid = _causal_targets(labels, mask)
    valid = valid if keep is None else valid & (keep[:, 1:] != 0)
    return _token_nll(logits[:, :-1, :], tgt, valid), valid


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-sample losses `(B,)` of a Hugging Face style model; see the module doc."""
    logits, labels, family, mask = _outputs(model, batch)
    terms = _token_terms(model, logits, labels, family, mask, "default_loss")
    if terms is not None:
        return _token_mean(*terms)
    if logits.dim() == 2 and labels.shape[0] == logits.shape[0]:
        B, C = logits.shape
        if C == 1 and labels.numel() == B:  # regression, as transformers does for num_labels == 1
            return (_wide(logits[:, 0]) - _wide(labels.reshape(B))).pow(2)
        if labels.dim() == 1 and not labels.is_floating_point() and C > 1:
            return F.cross_entropy(_wide(logits), labels, reduction="none")
        if labels.dim() == 2 and labels.shape == logits.shape and labels.is_floating_point():
            bce = F.binary_cross_entropy_with_logits(_wide(logits), _wide(labels), reduction="none")
            return bce.mean(dim=1)
    raise ValueError(
        f"default_loss does not know this task: logits {tuple(logits.shape)} with labels "
        f"{tuple(labels.shape)} ({labels.dtype}); pass loss=callable(model, batch) -> (B,) "
        "per-sample losses"
    )


# --------------------------------------------------------------------------- #
# the task: training loss and query measurement
# --------------------------------------------------------------------------- #
def _class_logits(logits: torch.Tensor, labels: torch.Tensor, who: str) -> torch.Tensor:
    """`(B, C)` logits of a single-label classifier (integer labels `(B,)`, C > 1), else ValueError."""
    if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point() and logits.shape[1] > 1 \
            and labels.shape[0] == logits.shape[0]:
        return _wide(logits)
    raise ValueError(f"{who}: not for logits {tuple(logits.shape)} with labels {tuple(labels.shape)} "
                     f"({labels.dtype}); pass measurement=callable(model, batch) -> (B,)")


def completion_log_prob(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """`(B,)` log p(completion): the sum over target tokens (labels != -100; `default_loss`'s rules, shifted for
    a causal LM) of log p(token | what precedes it); a classifier's log p(label). A measurement: training raises
    it, so a positive score means helpful (module doc)."""
    logits, labels, family, mask = _outputs(model, batch)
    terms = _token_terms(model, logits, labels, family, mask, "completion_log_prob")
    if terms is not None:
        return -terms[0].sum(dim=1)
    return -F.cross_entropy(_class_logits(logits, labels, "completion_log_prob"), labels, reduction="none")


def classification_margin(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """`(B,)` logit of the label − logsumexp of the other logits (sequence classification, integer labels). A
    measurement: positive score = helpful (module doc)."""
    logits, labels, _, _ = _outputs(model, batch)
    z = _class_logits(logits, labels, "classification_margin")
    correct = z.gather(1, labels[:, None]).squeeze(1)
    others = z.scatter(1, labels[:, None], float("-inf"))
    return correct - others.logsumexp(dim=1)


def selected_tokens_loss(key: str = "measure_mask") -> LossFn:
    """A measurement: `default_loss` (the mean cross-entropy) over the target tokens that `batch[key]` keeps.

    `batch[key]` is a `(B, T)` mask aligned with `batch["labels"]` (nonzero = measured; for a causal LM the
    label at position t is predicted by position t − 1, as `default_loss` shifts it); it is taken out of the
    batch before the model is called. A sample with no kept target measures 0 (zero gradient)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a string (a batch entry), got {type(key).__name__}")

    def measure(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if key not in batch:
            raise ValueError(f"selected_tokens_loss: the batch has no {key!r} (a (B, T) mask of the measured tokens)")
        keep = batch[key]
        logits, labels, family, mask = _outputs(model, {k: v for k, v in batch.items() if k != key})
        if not isinstance(keep, torch.Tensor) or keep.shape != labels.shape:
            raise ValueError(f"selected_tokens_loss: batch[{key!r}] must be a tensor shaped like the labels "
                             f"{tuple(labels.shape)}, got {tuple(getattr(keep, 'shape', ()))}")
        terms = _token_terms(model, logits, labels, family, mask, "selected_tokens_loss", keep.to(labels.device))
        if terms is None:
            raise ValueError(f"selected_tokens_loss needs per-token logits and labels, got logits "
                             f"{tuple(logits.shape)} with labels {tuple(labels.shape)}")
        return _token_mean(*terms)

    measure.__name__ = measure.__qualname__ = f"selected_tokens_loss({key!r})"
    return measure


@dataclass(frozen=True)
class Task:
    """The training loss and the query measurement, each `fn(model, batch) -> (B,)` per-sample values.

    train_loss: what the training gradients g_i are taken of (default `default_loss`);
    measurement: what the query gradients v_j are taken of (None: the training loss). Scores are
    −v_jᵀ H⁻¹ g_i, the change of the measurement when training point i is up-weighted (module doc).
    """

    train_loss: LossFn = default_loss
    measurement: LossFn | None = None

    def __post_init__(self):
        for name in ("train_loss", "measurement"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"Task: {name} must be a callable {name}(model, batch) -> (B,), "
                                f"got {type(fn).__name__}")
        if self.train_loss is None:
            raise TypeError("Task: train_loss must be a callable train_loss(model, batch) -> (B,), got None")

    @property
    def query_loss(self) -> LossFn:
        """What query gradients are taken of: the measurement, or the training loss."""
        return self.measurement if self.measurement is not None else self.train_loss

    @classmethod
    def resolve(cls, task: "Task | None" = None, loss: LossFn | None = None) -> "Task":
        """`task=` or the older `loss=` (the training loss and the measurement both), never both; neither: `Task()`."""
        if task is not None and loss is not None:
            raise ValueError("pass task=Task(train_loss=..., measurement=...) or loss=..., not both")
        if task is not None and not isinstance(task, cls):
            raise TypeError(f"task must be a pyinf.Task, got {type(task).__name__}")
        return task if task is not None else cls(train_loss=loss) if loss is not None else cls()

    def describe(self) -> dict[str, str]:
        """The functions' names (what reports print)."""
        name = lambda fn: getattr(fn, "__qualname__", type(fn).__name__)  # noqa: E731
        return {"train_loss": name(self.train_loss), "measurement": name(self.query_loss)}
