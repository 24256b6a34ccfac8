"""The tiny model that learns the embedded tasks on a CPU, and its cache.

* `WordTokenizer`: one id per word, digit or punctuation mark the generators can emit (+ pad, bos, eos, unk).
* `build_model`: a `LlamaForCausalLM` from a small `LlamaConfig`, random init,
  pre-trained briefly on *generic* text of the same language (fresh random
  sentences and math questions, no task names, no answers), then wrapped with
  PEFT LoRA and fine-tuned on the tasks' training sets (both tasks, one
  adapter). Fine-tuning trains on the answer tokens only, for a few epochs:
  the model is *learning* the tasks, not fitted to them (see README: a model
  that fits its training set has near-orthogonal per-sample gradients).
* The result is cached under `$PYINF_CACHE` (default `~/.cache/pyinf`),
  keyed by the config, the seed and `CODE_VERSION`; a second run loads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .common import SEP, Example
from .math_problems import MATH_CLASSES
from .sentences import random_sentence

CODE_VERSION = "tasks-model-1"  # bump when training or generation code changes what gets cached
PAD, BOS, EOS, UNK = 0, 1, 2, 3
IGNORE = -100


TOKEN_RE = re.compile(r"\d|[A-Za-z]+|[^\sA-Za-z\d]")


def _vocabulary() -> list[str]:
    """Every token the generators can emit, in a fixed order (no data needed)."""
    from .sentences import SENTENCE_CLASSES, WORDS

    rng = random.Random("vocab")
    toks = list(string.ascii_lowercase) + list(string.digits) + list(".,:;?!-+*/=>'")
    for w in WORDS:
        for _, _, fn in SENTENCE_CLASSES:
            toks += fn([w, w])
    toks += [c[0] for c in SENTENCE_CLASSES]
    for c in SENTENCE_CLASSES:
        toks += TOKEN_RE.findall(c[1])
    for _, _, gen in MATH_CLASSES:
        for _ in range(30):
            toks += TOKEN_RE.findall(gen(rng)[0])
    toks += TOKEN_RE.findall(SEP)
    return list(dict.fromkeys(toks))


def pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: (ids (B, T) int64 filled with `value`, mask (B, T) int64: 1 on real tokens)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[k, : len(s)] = 1
    return ids, mask


class WordTokenizer:
    """Word-level tokenizer: words, single digits and punctuation marks (spaces dropped).

    The vocabulary is every token the task generators can produce (built from
    the generators, not from data); anything else maps to unk.
    """

    def __init__(self):
        self.tokens = _vocabulary()
        self.index = {t: i + 4 for i, t in enumerate(self.tokens)}
        self.vocab_size = len(self.tokens) + 4

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (unknown words: UNK)."""
        return [self.index.get(t, UNK) for t in TOKEN_RE.findall(text)]

    def decode(self, ids) -> str:
        """The words of `ids`, special tokens dropped."""
        return " ".join(self.tokens[i - 4] for i in ids if i >= 4)

    def example(self, ex: Example, answer_only: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels): bos prompt SEP answer eos; labels -100 on the prompt when answer_only."""
        head = [BOS] + self.encode(ex.prompt + SEP)
        tail = self.encode(ex.answer) + [EOS]
        ids = head + tail
        labels = ([IGNORE] * len(head) + tail) if answer_only else ([IGNORE] + ids[1:])
        return ids, labels

    def batch(self, examples, answer_only: bool = True) -> dict[str, torch.Tensor]:
        """A right-padded batch {input_ids, attention_mask, labels}, each (B, T) int64 (labels -100 off the answer)."""
        pairs = [self.example(e, answer_only) for e in examples]
        ids, mask = pad([i for i, _ in pairs], PAD)
        lab, _ = pad([l for _, l in pairs], IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    def text_batch(self, texts) -> dict[str, torch.Tensor]:
        """Plain language-model batch (bos text eos, loss on every token)."""
        ids, mask = pad([[BOS] + self.encode(t) + [EOS] for t in texts], PAD)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, IGNORE)}


@dataclass(frozen=True)
class ModelConfig:
    """Size and training schedule of the demo's tiny Llama and its LoRA fine-tune (part of the cache key)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_len: int = 64
    pretrain_texts: int = 12000
    pretrain_epochs: int = 4
    pretrain_lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    finetune_epochs: int = 2
    finetune_lr: float = 5e-3
    batch_size: int = 32
    answer_only: bool = False  # standard causal-LM fine-tuning: loss on every token after bos
    extra: dict = field(default_factory=dict)  # free-form, part of the cache key


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where trained task models are cached: `path`, else `$PYINF_CACHE`, else `~/.cache/pyinf`."""
    if path is not None:
        return Path(path)
    env = os.environ.get("PYINF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyinf"


def cache_key(cfg: ModelConfig, seed: int, data_seed: int, examples=()) -> str:
    """Config + seeds + code version + the training texts themselves."""
    data = hashlib.sha256("\n".join(e.text for e in examples).encode()).hexdigest()
    blob = json.dumps({"cfg": asdict(cfg), "seed": seed, "data_seed": data_seed, "code": CODE_VERSION,
                       "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def llama(cfg: ModelConfig, vocab: int):
    """A randomly initialised `LlamaForCausalLM` of `cfg`'s size (eager attention, untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_len, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    lc._attn_implementation = "eager"
    return LlamaForCausalLM(lc)


def wrap_lora(base, cfg: ModelConfig):
    """`base` wrapped with PEFT LoRA (r, alpha and target modules from `cfg`, no dropout)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(base, lcfg)


def _arithmetic(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 19), rng.randint(2, 9), rng.randint(1, 9)
    form = rng.randrange(6)
    if form == 0:
        return f"{a} + {b} = {a + b}"
    if form == 1:
        return f"{a + b} - {b} = {a}"
    if form == 2:
        return f"{a} * {b} = {a * b}"
    if form == 3:
        return f"{a * b} / {b} = {a}"
    if form == 4:
        return f"{a} * {b} + {c} = {a * b + c}"
    return f"{a} + {b} - {c} = {a + b - c}"


def pretrain_texts(n: int, seed: int) -> list[str]:
    """The base model's corpus: the *skills*, under plain descriptions, never the task names.

    Each sentence transformation introduced by its English description
    ("reverse the word order: a b c -> c b a"), bare arithmetic ("7 * 3 = 21")
    and math questions without answers. The LoRA fine-tune then has to bind
    each made-up name (and each word-problem template) to a skill the base
    already has, as an LLM fine-tuned on DataInf's tasks does.
    """
    from .sentences import SENTENCE_CLASSES, transform

    rng = random.Random(f"pretrain-{seed}")
    out = []
    for k in range(n):
        kind = k % 4
        if kind in (0, 1):
            label = rng.randrange(len(SENTENCE_CLASSES))
            s = random_sentence(rng)
            out.append(f"{SENTENCE_CLASSES[label][1]}: {s}{SEP}{transform(label, s)}")
        elif kind == 2:
            out.append(_arithmetic(rng))
        else:
            q, _ = MATH_CLASSES[rng.randrange(len(MATH_CLASSES))][2](rng)
            out.append(q)
    return out


def log(msg: str, progress: bool | None):
    """One progress line on stderr unless `progress` is False."""
    if progress is not False:
        print(msg, file=sys.stderr, flush=True)


def train(model, batches_fn, epochs: int, lr: float, desc: str, progress: bool | None, seed: int,
          loss_fn=None) -> float:
    """AdamW on the trainable parameters of `model`, warm-up then linear decay, gradient clipping at 1.

    `batches_fn(generator)` returns one epoch's batches (`shuffled_batches`);
    `loss_fn(model, batch)` gives per-sample losses (default: `pyinf.losses.default_loss`).
    Returns the smoothed last loss; leaves the model in eval mode.
    """
    from ..progress import bar
    from ..losses import default_loss

    loss_fn = loss_fn or default_loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    last = float("nan")
    n_batches = len(batches_fn(gen, dry=True))
    total = epochs * n_batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / total))
    with bar(desc, total, progress, unit="step") as pb:
        for _ in range(epochs):
            for batch in batches_fn(gen):
                loss = loss_fn(model, batch).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                last = 0.9 * last + 0.1 * loss.item() if last == last else loss.item()
                pb.update()
                if hasattr(pb, "set_postfix"):
                    pb.set_postfix(loss=f"{last:.3f}")
    model.eval()
    return last


def shuffled_batches(items, bs, make):
    """`fn(generator)`: one epoch of `make(list of items)` batches of `bs` in a seeded random order
    (`fn(generator, dry=True)` only counts them)."""
    def fn(gen, dry=False):
        if dry:
            return range((len(items) + bs - 1) // bs)
        order = torch.randperm(len(items), generator=gen).tolist()
        return [make([items[i] for i in order[k : k + bs]]) for k in range(0, len(order), bs)]

    return fn


def build_model(train_examples, cfg: ModelConfig = ModelConfig(), *, seed: int = 0, data_seed: int = 0,
                cache: str | os.PathLike | None = None, use_cache: bool = True, progress: bool | None = None):
    """(PEFT model in eval mode, tokenizer, info dict); trains or loads from the cache.

    `finetune(pretrained_base(...), train_examples)`: the base pre-trained on generic text, then the LoRA
    fine-tune on the examples, each stage cached on its own.
    Under a process group with the cache on, rank 0 trains (or loads) and writes
    the cache while the other ranks wait at a barrier, then they load it.
    Without the cache every rank trains the same (seeded) model.
    """
    kwargs = dict(seed=seed, data_seed=data_seed, cache=cache, use_cache=use_cache, progress=progress)
    return rank0_first(lambda: _build_model(train_examples, cfg, **kwargs), use_cache)


def rank0_first(build, use_cache: bool = True):
    """`build()` on rank 0 first (it fills the cache), then on the other ranks (they load it).

    Outside a process group, or with the cache off (every rank builds the same
    seeded result), just `build()`.
    """
    from ..distributed import current

    comm = current() if use_cache else None
    if comm is None:
        return build()
    if comm.rank == 0:
        out = build()
        comm.barrier()
        return out
    comm.barrier()
    return build()


def save_atomic(obj, path: Path) -> None:
    """`torch.save(obj, path)` through a per-process temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # never two writers on one file
    torch.save(obj, tmp)
    os.replace(tmp, path)


# The fields of ModelConfig that the LoRA fine-tune alone reads: the pre-trained base does not depend on them.
FINETUNE_FIELDS = ("lora_r", "lora_alpha", "lora_targets", "finetune_epochs", "finetune_lr", "answer_only")


def base_key(cfg: ModelConfig, seed: int, data_seed: int) -> str:
    """The pre-trained base's cache key: the config without its fine-tune fields, the seeds, the code version."""
    pre = {k: v for k, v in asdict(cfg).items() if k not in FINETUNE_FIELDS}
    blob = json.dumps({"cfg": pre, "seed": seed, "data_seed": data_seed, "code": CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_base(cfg: ModelConfig = ModelConfig(), *, seed: int = 0, data_seed: int = 0,
                    cache: str | os.PathLike | None = None, use_cache: bool = True, progress: bool | None = None):
    """(base `LlamaForCausalLM` in eval mode, tokenizer, info): `llama(cfg)` initialised under
    `torch.manual_seed(seed)` and pre-trained on `pretrain_texts(cfg.pretrain_texts, data_seed)`, or loaded
    from the cache (`<cache>/bases/<base_key>/base.pt`; the fine-tune fields of `cfg` are not part of the key).
    Under a process group, rank 0 first (`rank0_first`)."""
    kwargs = dict(seed=seed, data_seed=data_seed, cache=cache, use_cache=use_cache, progress=progress)
    return rank0_first(lambda: _pretrained_base(cfg, **kwargs), use_cache)


def _pretrained_base(cfg: ModelConfig, *, seed: int, data_seed: int, cache, use_cache: bool, progress):
    tok = WordTokenizer()
    key = base_key(cfg, seed, data_seed)
    path = cache_dir(cache) / "bases" / key / "base.pt"
    torch.manual_seed(seed)
    base = llama(cfg, tok.vocab_size)
    if use_cache and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        base.load_state_dict(state["state_dict"])
        base.eval()
        log(f"loaded the pre-trained base from the cache {path}", progress)
        return base, tok, {**state["info"], "cached": True, "cache_path": str(path)}
    t0 = time.perf_counter()
    texts = pretrain_texts(cfg.pretrain_texts, data_seed)
    loss = train(base, shuffled_batches(texts, cfg.batch_size, tok.text_batch), cfg.pretrain_epochs,
                 cfg.pretrain_lr, "pre-train the base model", progress, seed)
    seconds = time.perf_counter() - t0
    log(f"pre-trained the base model on {len(texts)} generic texts: loss {loss:.3f} ({seconds:.1f} s)", progress)
    info = {"pretrain_loss": loss, "pretrain_seconds": seconds, "seed": seed, "data_seed": data_seed,
            "code_version": CODE_VERSION, "base_key": key}
    if use_cache:
        save_atomic({"state_dict": base.state_dict(), "info": info}, path)
    return base, tok, {**info, "cached": False, "cache_path": str(path)}


def finetune(base, tok: WordTokenizer, examples, cfg: ModelConfig = ModelConfig(), *, seed: int = 0,
             data_seed: int = 0, cache: str | os.PathLike | None = None, use_cache: bool = True,
             progress: bool | None = None, desc: str = "LoRA fine-tune", base_info: dict | None = None):
    """(PEFT model in eval mode, info): a LoRA adapter on a copy of `base` (left untouched), initialised under
    `torch.manual_seed(seed + 1)` (the same adapter init for every call with this seed) and trained on
    `examples` (`cfg.finetune_epochs` epochs, shuffles seeded by seed + 1), or loaded from the cache.

    `base` must be `pretrained_base(cfg, seed=seed, data_seed=data_seed)`'s: the cache key
    (`cache_key(cfg, seed, data_seed, examples)`, `<cache>/tasks/<key>/model.pt`) names the base by them.
    The cache file holds the adapter's weights only (files written before hold the whole state: both load);
    its info records `base_info`'s pre-training loss and time when given. Under a process group, rank 0 first.
    """
    kwargs = dict(seed=seed, data_seed=data_seed, cache=cache, use_cache=use_cache, progress=progress, desc=desc,
                  base_info=base_info)
    return rank0_first(lambda: _finetune(base, tok, examples, cfg, **kwargs), use_cache)


def _finetune(base, tok: WordTokenizer, examples, cfg: ModelConfig, *, seed: int, data_seed: int, cache,
              use_cache: bool, progress, desc: str, base_info: dict | None):
    import copy

    examples = list(examples)
    key = cache_key(cfg, seed, data_seed, examples)
    path = cache_dir(cache) / "tasks" / key / "model.pt"
    torch.manual_seed(seed + 1)
    model = wrap_lora(copy.deepcopy(base), cfg)
    if use_cache and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "adapter" in state:
            missing = model.load_state_dict(state["adapter"], strict=False)
            if missing.unexpected_keys or set(state["adapter"]) != _trainable(model):
                raise ValueError(f"the cached adapter {path} does not fit this model: delete it to retrain")
        else:
            model.load_state_dict(state["state_dict"])
        model.eval()
        log(f"loaded the fine-tuned model from the cache {path}", progress)
        return model, {**state["info"], "cached": True, "cache_path": str(path)}
    t0 = time.perf_counter()
    loss = train(model, shuffled_batches(examples, cfg.batch_size, lambda b: tok.batch(b, cfg.answer_only)),
                 cfg.finetune_epochs, cfg.finetune_lr, desc, progress, seed + 1)
    seconds = time.perf_counter() - t0
    log(f"LoRA-fine-tuned on {len(examples)} task examples: loss {loss:.3f} ({seconds:.1f} s)", progress)
    info = {"finetune_loss": loss, "finetune_seconds": seconds, "config": asdict(cfg), "seed": seed,
            "data_seed": data_seed, "code_version": CODE_VERSION, "key": key, "examples": len(examples)}
    if base_info is not None:
        info.update(pretrain_loss=base_info.get("pretrain_loss"),
                    pretrain_seconds=0.0 if base_info.get("cached") else base_info.get("pretrain_seconds"))
    if use_cache:
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_atomic({"adapter": adapter, "info": info}, path)
    return model, {**info, "cached": False, "cache_path": str(path)}


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _build_model(train_examples, cfg: ModelConfig, *, seed: int, data_seed: int, cache, use_cache: bool,
                 progress: bool):
    examples = list(train_examples)
    path = cache_dir(cache) / "tasks" / cache_key(cfg, seed, data_seed, examples) / "model.pt"
    base_info = None
    whole = use_cache and path.exists() and "state_dict" in torch.load(path, map_location="cpu", weights_only=True)
    if whole:  # a cache file of the whole fine-tuned model (written before the split): no base needed
        tok = WordTokenizer()
        torch.manual_seed(seed)
        base = llama(cfg, tok.vocab_size)
    else:
        base, tok, base_info = _pretrained_base(cfg, seed=seed, data_seed=data_seed, cache=cache,
                                                use_cache=use_cache, progress=progress)
    model, info = _finetune(base, tok, examples, cfg, seed=seed, data_seed=data_seed, cache=cache,
                            use_cache=use_cache, progress=progress, desc="LoRA fine-tune", base_info=base_info)
    return model, tok, info


@torch.no_grad()
def per_example_loss(model, tok: WordTokenizer, examples, answer_only: bool = True, batch_size: int = 128):
    """(n,) mean answer-token loss per example."""
    from ..losses import default_loss

    out = [default_loss(model, tok.batch(examples[k : k + batch_size], answer_only))
           for k in range(0, len(examples), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def exact_match(model, tok: WordTokenizer, examples, max_new: int = 40) -> float:
    """Fraction of examples whose greedy answer equals the reference."""
    ok = 0
    for ex in examples:
        ids = torch.tensor([[BOS] + tok.encode(ex.prompt + SEP)])
        for _ in range(max_new):
            nxt = model(input_ids=ids).logits[0, -1].argmax().item()
            if nxt == EOS:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        head = 1 + len(tok.encode(ex.prompt + SEP))
        ok += ids[0, head:].tolist() == tok.encode(ex.answer)
    return ok / max(len(examples), 1)
