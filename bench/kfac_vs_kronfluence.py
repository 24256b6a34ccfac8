"""pyinf's kfac/ekfac against Kronfluence's on the demo's tiny LoRA Llama and sentence task.

    python bench/kfac_vs_kronfluence.py [--tiny] [--n-train 90] [--n-test 10] [--out bench/results]

Not a test dependency: needs `pip install kronfluence` (1.0.1). The model and
the data are `pyinf demo`'s (the model from its cache, trained if missing);
both libraries score the same training and query examples with the same
loss. Conventions matched:

- loss: pyinf's per-sample loss is the mean over the sample's target tokens;
  Kronfluence is given the same (`compute_train_loss` = Σ_i mean_t, and the
  query measurement the same loss), so δ is the same in both.
- padding: both drop padded positions from the token statistics (Kronfluence
  through `get_attention_mask`).
- damping: pyinf's relative damping 0.1 = Kronfluence's `damping_factor=None`
  (0.1 × the mean eigenvalue of the curvature it inverts).
- Fisher: empirical (`use_empirical_fisher=True`; Kronfluence's default draws labels).
- sign: Kronfluence's score is +g_qᵀ H⁻¹ g_i (positive = helpful), pyinf's the
  negative: compared as pyinf against −Kronfluence.
- blocks: the LoRA A and B modules of every adapted layer (pyinf stores B
  transposed, which changes no score).

Reports the Spearman correlation of the (m, n) score matrices (all entries,
and mean per query) and the wall times; JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from pyinf.metrics import spearman

    return float(spearman(a.flatten().double(), b.flatten().double()))


def _per_query(a: torch.Tensor, b: torch.Tensor) -> float:
    from pyinf.metrics import spearman

    return float(spearman(a.double(), b.double()).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the demo's --tiny model (seconds; numbers mean little)")
    p.add_argument("--n-train", type=int, default=90, help="training examples per class")
    p.add_argument("--n-test", type=int, default=10, help="queries per class")
    p.add_argument("--methods", default="kfac,ekfac")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    import pyinf
    from pyinf.losses import causal_lm_loss
    from pyinf.tasks.model import ModelConfig, build_model
    from pyinf.tasks.sentences import sentence_transformations

    torch.set_num_threads(1)
    cfg = ModelConfig()
    if args.tiny:
        cfg = ModelConfig(hidden=32, layers=1, heads=2, intermediate=64, pretrain_texts=200, pretrain_epochs=1,
                          finetune_epochs=1)
    task = sentence_transformations(0, args.n_train, args.n_test)
    model, tok, _ = build_model(task.train, cfg, seed=0, data_seed=0, progress=False)
    model.eval()
    train_b = tok.batch(task.train, cfg.answer_only)
    test_b = tok.batch(task.test, cfg.answer_only)

    def per_sample(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss(logits, batch["labels"], batch["attention_mask"])

    results = {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        att = pyinf.Attributor(model, method=method, loss=per_sample, batch_size=64, progress=False)
        att.fit([{k: v[i : i + 64] for k, v in train_b.items()} for i in range(0, len(task.train), 64)])
        ours = att.score([test_b]).double()
        results[method] = {"pyinf_seconds": time.perf_counter() - t0}
        results[method]["_scores"] = ours

    class Rows(torch.utils.data.Dataset):
        def __init__(self, batch):
            self.b = batch

        def __len__(self):
            return self.b["input_ids"].shape[0]

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.b.items()}

    tracked = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (".lora_A." in n or ".lora_B." in n)]

    class LoraTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            if not sample:
                return per_sample(model, batch).sum()
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                drawn = torch.multinomial(torch.softmax(logits[:, :-1].float().flatten(0, 1), -1), 1)
                labels = batch["labels"].clone()
                labels[:, 1:] = torch.where(labels[:, 1:] != -100, drawn.view(labels.shape[0], -1), labels[:, 1:])
            return per_sample(model, {**batch, "labels": labels}).sum()

        def compute_measurement(self, batch, model):
            return per_sample(model, batch).sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    kmodel = prepare_model(model, LoraTask())
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("pyinf_bench", kmodel, LoraTask(), disable_model_save=True, output_dir=tmp,
                            disable_tqdm=True)
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            fa = FactorArguments(strategy=method, use_empirical_fisher=True)
            analyzer.fit_all_factors(method, Rows(train_b), per_device_batch_size=64, factor_args=fa,
                                     overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(f"{method}_scores", method, Rows(test_b), Rows(train_b),
                                             per_device_query_batch_size=len(task.test),
                                             per_device_train_batch_size=64,
                                             score_args=ScoreArguments(damping_factor=None),
                                             overwrite_output_dir=True)
            theirs = -analyzer.load_pairwise_scores(f"{method}_scores")["all_modules"].double()
            r = results[method]
            ours = r.pop("_scores")
            r["kronfluence_seconds"] = time.perf_counter() - t0
            r["spearman_all"] = _spearman(ours, theirs)
            r["spearman_per_query_mean"] = _per_query(ours, theirs)
            r["relative_difference"] = float((ours - theirs).norm() / theirs.norm())
            # K-FAC: Kronfluence inverts per-token factors, pyinf the per-sample Fisher's (T̄ = tokens per sample
            # times larger, see the README): the scores differ by 1/T̄ under relative damping. The best scale:
            scale = float((ours * theirs).sum() / (theirs * theirs).sum())
            r["scale"], r["relative_difference_after_scale"] = scale, float((ours - scale * theirs).norm() / (scale * theirs).norm())
            print(f"{method}: Spearman {r['spearman_all']:.5f} (per query {r['spearman_per_query_mean']:.5f}), "
                  f"relative difference {r['relative_difference']:.2e} ({r['relative_difference_after_scale']:.2e} "
                  f"after a scale of {scale:.4g}); pyinf {r['pyinf_seconds']:.1f} s, "
                  f"Kronfluence {r['kronfluence_seconds']:.1f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"task": "sentences", "tiny": args.tiny, "n_train": len(task.train), "n_query": len(task.test),
              "device": platform.processor() or platform.machine(), "commit": commit, "methods": results}
    path = out / f"kfac-vs-kronfluence-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
