"""A seeded text-classification task and its LoRA-tuned transformer classifier (issue 17's `--task text`).

The task: five topics (sport, food, weather, music, travel), each of 13
words, 7 of its own and 3 shared with each neighbouring topic (in a ring).
A sentence is eight words in random order: 2 or 3 words of its own topic,
1 or 2 words of one other topic (always fewer than its own), the rest shared
filler words ("the", "really", "today", ...). The label is the topic drawn
for more words, so the classifier has to weigh topic words against the
distractors: two classes share vocabulary in every sentence, no single word
decides it, and a sentence made mostly of shared words is ambiguous (the
task's Bayes accuracy is below 1).

    the new ball goal really rain team today  -> sport   (3 sport, 1 weather)

The model (`build_text_classifier`): a `LlamaForSequenceClassification` from
a small config, random init, pre-trained (every weight) on a clean training
set of the task; its classifier head is then re-initialised (seeded), as a
pre-trained encoder gets a fresh head for a new task, and PEFT LoRA (r = 8 on
q_proj and v_proj, `task_type="SEQ_CLS"`: the head is a `modules_to_save`
copy, trained too and captured by pyinf's `blocks="lora"`) is tuned on a
training set with a fraction of its labels flipped (`flip_labels`). Both
stages are cached under `$PYINF_CACHE/text_classes/` (`pyinf.tasks.model.save_atomic`).
"""
from __future__ import annotations

import hashlib
import json
import random
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from .model import cache_dir, log, pad, rank0_first, save_atomic, shuffled_batches, train

CODE_VERSION = "text-classes-1"  # bump when generation or training changes what gets cached

# Seven words of its own per topic, and three shared with the next topic (ring order): a shared word is
# evidence for two classes.
OWN = {
    "sport": "ball goal team coach player race pitch",
    "food": "bread soup cheese apple salad pasta spice",
    "weather": "rain snow wind storm cloud fog thunder",
    "music": "song guitar drum band piano choir melody",
    "travel": "flight hotel ticket map trip beach passport",
}
SHARED = ("score match win", "taste dinner bake", "cold sunny breeze", "tune album sing", "train road luggage")
TOPICS = {t: f"{OWN[t]} {SHARED[k]} {SHARED[k - 1]}" for k, t in enumerate(OWN)}
CLASS_NAMES = tuple(TOPICS)
FILLER = ("the a we they it is was very really today again some new old big good after before "
          "with and then quite our").split()
SENTENCE_WORDS = 8
PAD, EOS, UNK = 0, 1, 2


def random_sentence(rng: random.Random, label: int) -> str:
    """Eight shuffled words: 2-3 of topic `label`, fewer (1-2) of one other topic, the rest filler."""
    own = rng.choice((2, 3))
    other_n = rng.randint(1, own - 1)
    other = rng.choice([c for c in range(len(CLASS_NAMES)) if c != label])
    words = (rng.sample(TOPICS[CLASS_NAMES[label]].split(), own)
             + rng.sample(TOPICS[CLASS_NAMES[other]].split(), other_n))
    words += [rng.choice(FILLER) for _ in range(SENTENCE_WORDS - len(words))]
    rng.shuffle(words)
    return " ".join(words)


def make_split(n: int, seed: int, name: str) -> tuple[list[str], torch.Tensor]:
    """(n sentences, labels (n,) int64), classes balanced (n // 5 each, the rest to the first classes), shuffled,
    from a `random.Random` seeded by (name, seed): the splits of one seed are independent draws."""
    rng = random.Random(f"text-classes-{name}-{seed}")
    labels = [k % len(CLASS_NAMES) for k in range(n)]
    rng.shuffle(labels)
    return [random_sentence(rng, c) for c in labels], torch.tensor(labels, dtype=torch.long)


def flip_labels(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy labels, flipped mask (n,) bool): exactly round(fraction * n) labels, chosen by a generator seeded
    by `seed`, moved to a uniformly drawn *other* class."""
    if not 0 < fraction < 1:
        raise ValueError(f"flip fraction must be in (0, 1), got {fraction}")
    n, k = len(labels), len(CLASS_NAMES)
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(n, generator=g)[: int(round(fraction * n))]
    noisy = labels.clone()
    noisy[idx] = (noisy[idx] + torch.randint(1, k, (len(idx),), generator=g)) % k
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[idx] = True
    return noisy, flipped


class TextTokenizer:
    """One id per word of the task's vocabulary (+ pad, eos, unk); a batch ends each sentence with eos, the
    position the classifier reads."""

    def __init__(self):
        words = list(FILLER) + [w for t in TOPICS.values() for w in t.split()]
        self.index = {w: i + 3 for i, w in enumerate(dict.fromkeys(words))}
        self.vocab_size = len(self.index) + 3

    def batch(self, texts, labels) -> dict[str, torch.Tensor]:
        """{input_ids, attention_mask (B, T) int64, labels (B,) int64}, right-padded."""
        ids, mask = pad([[self.index.get(w, UNK) for w in t.split()] + [EOS] for t in texts], PAD)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(labels, dtype=torch.long)}

    def batches(self, texts, labels, bs: int = 64) -> list[dict[str, torch.Tensor]]:
        """`batch` over consecutive runs of `bs` examples (dataset order; under torchrun `bs` shrinks so that every
        rank gets a batch)."""
        from ..distributed import batch_size_for_ranks

        bs = batch_size_for_ranks(len(texts), bs)
        return [self.batch(texts[k : k + bs], labels[k : k + bs]) for k in range(0, len(texts), bs)]


@dataclass(frozen=True)
class TextModelConfig:
    """Size and training schedule of the text classifier and its LoRA tune (part of the cache key)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    pretrain_examples: int = 1000
    pretrain_epochs: int = 2
    pretrain_lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    finetune_epochs: int = 4
    finetune_lr: float = 5e-3
    batch_size: int = 32


TINY = TextModelConfig(hidden=16, layers=1, heads=2, intermediate=32, pretrain_examples=100, pretrain_epochs=1,
                       finetune_epochs=1)


def classifier(cfg: TextModelConfig, vocab: int):
    """A randomly initialised `LlamaForSequenceClassification` of `cfg`'s size, 5 labels (eager attention)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    lc = LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=16, pad_token_id=PAD, eos_token_id=EOS, num_labels=len(CLASS_NAMES),
                     problem_type="single_label_classification")
    lc._attn_implementation = "eager"
    return LlamaForSequenceClassification(lc)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([CODE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrained_base(cfg: TextModelConfig, seed: int, *, cache=None, use_cache: bool = True, progress=None):
    """(the base classifier pre-trained on `cfg.pretrain_examples` clean examples of the task, info); cached."""
    return rank0_first(lambda: _pretrained_base(cfg, seed, cache, use_cache, progress), use_cache)


def _pretrained_base(cfg, seed, cache, use_cache, progress):
    tok = TextTokenizer()
    key = _key("base", asdict(cfg), seed)
    path = cache_dir(cache) / "text_classes" / key / "base.pt"
    torch.manual_seed(seed)
    base = classifier(cfg, tok.vocab_size)
    if use_cache and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        base.load_state_dict(state["state_dict"])
        log(f"loaded the pre-trained text classifier from the cache {path}", progress)
        return base.eval(), {**state["info"], "cached": True}
    t0 = time.perf_counter()
    texts, labels = make_split(cfg.pretrain_examples, seed, "pretrain")
    items = list(zip(texts, labels.tolist()))
    loss = train(base, shuffled_batches(items, cfg.batch_size, lambda b: tok.batch(*zip(*b))), cfg.pretrain_epochs,
                 cfg.pretrain_lr, "pre-train the text classifier", progress, seed)
    info = {"pretrain_loss": loss, "pretrain_seconds": time.perf_counter() - t0}
    log(f"pre-trained the text classifier on {len(texts)} clean examples: loss {loss:.3f} "
        f"({info['pretrain_seconds']:.1f} s)", progress)
    if use_cache:
        save_atomic({"state_dict": base.state_dict(), "info": info}, path)
    return base.eval(), {**info, "cached": False}


def lora_classifier(base, cfg: TextModelConfig, seed: int):
    """A copy of `base` with a fresh classifier head (seeded by `seed`) wrapped with PEFT LoRA (`SEQ_CLS`: the head
    is trained too); the same `seed` gives the same head and adapter init."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    torch.manual_seed(20_000 + seed)
    torch.nn.init.normal_(model.score.weight, std=model.config.initializer_range)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets), task_type="SEQ_CLS")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question on every wrap
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lcfg)


def finetune(base, cfg: TextModelConfig, texts, labels, seed: int, *, epochs: int | None = None, progress=None,
             desc: str = "LoRA-tune the text classifier"):
    """`lora_classifier(base, cfg, seed)` LoRA-tuned on (texts, labels) for `epochs` (default `cfg.finetune_epochs`),
    batch order seeded by `seed`; (model in eval mode, smoothed last loss)."""
    model = lora_classifier(base, cfg, seed)
    items = list(zip(texts, torch.as_tensor(labels).tolist()))
    loss = train(model, shuffled_batches(items, cfg.batch_size, lambda b: TextTokenizer().batch(*zip(*b))),
                 epochs or cfg.finetune_epochs, cfg.finetune_lr, desc, progress, seed)
    return model, loss


def noisy_classifier(base, cfg: TextModelConfig, texts, labels, seed: int, *, cache=None, use_cache: bool = True,
                     progress=None):
    """(the LoRA classifier tuned on the given (noisy) training set, info); cached by (config, seed, data)."""
    def build():
        key = _key("lora", asdict(cfg), seed, list(texts), torch.as_tensor(labels).tolist())
        path = cache_dir(cache) / "text_classes" / key / "lora.pt"
        if use_cache and path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = lora_classifier(base, cfg, seed)
            model.load_state_dict(state["state_dict"])
            log(f"loaded the LoRA-tuned text classifier from the cache {path}", progress)
            return model.eval(), {**state["info"], "cached": True}
        t0 = time.perf_counter()
        model, loss = finetune(base, cfg, texts, labels, seed, progress=progress)
        info = {"finetune_loss": loss, "finetune_seconds": time.perf_counter() - t0}
        if use_cache:
            save_atomic({"state_dict": model.state_dict(), "info": info}, path)
        return model, {**info, "cached": False}

    return rank0_first(build, use_cache)


@torch.no_grad()
def accuracy(model, texts, labels, bs: int = 256) -> float:
    """Fraction of (texts, labels) the classifier gets right."""
    tok = TextTokenizer()
    right = sum((model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"]).sum().item()
                for b in tok.batches(texts, labels, bs))
    return right / max(len(texts), 1)


@dataclass
class NoisyText:
    """One seed's data: the noisy training set (with the truth), clean validation and test sets."""

    train_texts: list[str]
    train_labels: torch.Tensor  # (n,) noisy
    clean_labels: torch.Tensor  # (n,)
    flipped: torch.Tensor  # (n,) bool
    val_texts: list[str]
    val_labels: torch.Tensor
    test_texts: list[str]
    test_labels: torch.Tensor


def noisy_text(seed: int, n_train: int, n_val: int, n_test: int, flip: float) -> NoisyText:
    """The task's splits for `seed`, with `flip` of the training labels flipped (`flip_labels`)."""
    tr, ytr = make_split(n_train, seed, "train")
    va, yva = make_split(n_val, seed, "val")
    te, yte = make_split(n_test, seed, "test")
    noisy, flipped = flip_labels(ytr, flip, seed)
    return NoisyText(tr, noisy, ytr, flipped, va, yva, te, yte)

