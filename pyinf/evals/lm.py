"""What the LoRA language-model evals share (`pyinf eval leakage`, `pyinf eval lds --task lm`).

The demo's model and tasks (`pyinf.tasks`): the pre-trained base (`pretrained_base`, cached: the demo's own
base at the default config and `base_seed`, 0; `--seed` picks the eval's data), LoRA fine-tunes of copies of it on the eval's training sets
(`finetune`, cached by config, seed and examples; the same seeded adapter init for every fine-tune), and
attribution of the adapter's blocks from one capture per model (`common.capture` / `common.attribute` with
blocks="lora" and the Hugging Face loss; the gradient methods score query gradients captured once).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..distributed import batch_size_for_ranks
from ..tasks.math_problems import math_problems
from ..tasks.model import ModelConfig, finetune, log, pretrained_base
from ..tasks.sentences import sentence_transformations
from .common import METHODS, attribute, capture, checked_seeds

# The test suite's model: trains in seconds, its numbers mean little (the demo's --tiny).
TINY_MODEL = ModelConfig(hidden=32, layers=1, heads=2, intermediate=64, pretrain_texts=200, pretrain_epochs=1,
                         finetune_epochs=1)


@dataclass
class LMEvalConfig:
    """Options shared by the LoRA language-model evals.

    `seeds`: one run per seed (its task data, and what the eval draws); the figures are mean ± sd over them.
    `base_seed`: the pre-trained base's seed and the adapter init's (seed + 1), the same for every run.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    base_seed: int = 0
    methods: tuple[str, ...] = METHODS
    damping: float = 0.1
    lissa_iterations: int = 100  # the demo's budget
    forward_lr: float = 1e-3  # the demo's step for the LoRA model
    batch_size: int = 64
    model: ModelConfig = field(default_factory=ModelConfig)
    out: str = "pyinf-out"
    cache: str | None = None
    use_cache: bool = True
    progress: bool | None = None


def check_config(cfg: LMEvalConfig) -> None:
    """ValueError naming the bad option (seeds, sizes)."""
    if not cfg.seeds:
        raise ValueError("--seeds: give at least one seed")
    checked_seeds(cfg.seeds)
    if not cfg.methods:
        raise ValueError("--methods: give at least one method")


def demo_tasks(seed: int, n_train: int, n_test: int):
    """The demo's two tasks (sentences, math) with `n_train` training and `n_test` test examples per class."""
    return [sentence_transformations(seed, n_train, n_test), math_problems(seed, n_train, n_test)]


def load_base(cfg: LMEvalConfig):
    """(base, tokenizer, info): the pre-trained base of `cfg.model` at `cfg.base_seed`, cached."""
    return pretrained_base(cfg.model, seed=cfg.base_seed, data_seed=cfg.base_seed, cache=cfg.cache,
                           use_cache=cfg.use_cache, progress=cfg.progress)


def tune(base, tok, examples, cfg: LMEvalConfig, desc: str = "LoRA fine-tune", progress: bool | None = None):
    """(PEFT model, info): `finetune` of a copy of `base` on `examples` (cached; the adapter init of `base_seed`)."""
    return finetune(base, tok, examples, cfg.model, seed=cfg.base_seed, data_seed=cfg.base_seed, cache=cfg.cache,
                    use_cache=cfg.use_cache, progress=cfg.progress if progress is None else progress, desc=desc)


def lm_batches(tok, examples, cfg: LMEvalConfig) -> list:
    """`examples` as tokenised batches of `cfg.batch_size` (loss tokens as in the fine-tune)."""
    examples = list(examples)
    bs = batch_size_for_ranks(len(examples), cfg.batch_size)  # under torchrun: a batch for every rank
    return [tok.batch(examples[k : k + bs], cfg.model.answer_only) for k in range(0, len(examples), bs)]


def attribute_all(model, tok, train, queries, methods, cfg: LMEvalConfig):
    """({method: scores (len(queries), len(train)) float32}, {method: info}, capture seconds): the training
    examples captured once, then every method from that capture (the adapter's blocks; forward moves them)."""
    opts = dict(damping=cfg.damping, lissa_iterations=cfg.lissa_iterations, forward_lr=cfg.forward_lr)
    grads, capture_s = capture(model, methods, lm_batches(tok, train, cfg), progress=cfg.progress, blocks="lora",
                               loss=None, forward_moves=None, **opts)
    query = lm_batches(tok, queries, cfg)
    scores, infos, shared = {}, {}, {}
    for i, method in enumerate(methods, 1):
        log(f"    [{i}/{len(methods)}] {method} on {len(queries)} queries x {len(train)} training examples",
            cfg.progress)
        S, _, info = attribute(grads, method, query, self_influence=False, query_grads=shared, forward_moves=None,
                               **opts)
        scores[method], infos[method] = S.cpu(), info
    return scores, infos, capture_s
