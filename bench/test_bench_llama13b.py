"""End-to-end benchmark on a Llama-2-13B-shaped model (issue 5), one run, JSON under bench/results/.

    pytest bench/test_bench_llama13b.py -s                       # needs a CUDA GPU (~30 GB + stores)
    PYINF_BENCH_TINY=1 pytest bench/test_bench_llama13b.py -s    # the same code, tiny config, on CPU

Model: transformers LlamaConfig with the 13B sizes (hidden 5120, 40 layers, 40
heads, intermediate 13824, vocab 32000), random bf16 weights built directly on
the GPU, PEFT LoRA r=8, alpha=32 on q_proj and v_proj (160 blocks, 6.55M
parameters; LoRA B perturbed away from PEFT's zero init so that g_A ≠ 0).
Measured:
  (a) bare batched forward + backward tokens/s (loss on the LoRA weights),
  (b) per-sample gradient capture tokens/s (pyinf.capture.GradientCapture),
  (c) DataInf fit + score end to end (capture included) for 900 train x 100
      queries of 128 tokens, store "gpu" and "cpu", with peak GPU memory,
  (d) n = 4000 x 256 tokens, store "cpu",
  and Kronfluence's gradient dot product on (c)'s data when kronfluence is
  importable (optional; never a runtime dependency).
Targets (issue 5), recorded in the JSON, not asserted: capture >= 0.8x bare
forward+backward; (c) under 25 s.
"""
from __future__ import annotations

import json
import pathlib
import tempfile
import time

import machine
import torch
from llama13b import MODEL, TINY, batches as _batches_raw, build_model as _build_model, device as _device, requires_gpu, sync as _sync, timed

pytestmark = requires_gpu

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
if TINY:
    C_TRAIN, C_QUERY, C_T, D_TRAIN, D_T, BATCH, D_BATCH, REPEATS = 36, 6, 16, 40, 32, 8, 8, 2
else:
    C_TRAIN, C_QUERY, C_T, D_TRAIN, D_T, BATCH, D_BATCH, REPEATS = 900, 100, 128, 4000, 256, 32, 16, 5
TARGET_CAPTURE_RATIO, TARGET_C_SECONDS = 0.8, 25.0


def _batches(n: int, T: int, B: int, seed: int):
    return _batches_raw(n, T, B, seed)


def _timed(fn, repeats=REPEATS):
    return timed(fn, repeats)


def _to(batch):
    return {k: v.to(_device(), non_blocking=True) for k, v in batch.items()}


def _reset_peak():
    if torch.cuda.is_available():
        _sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _bare_tokens_per_s(model, batch):
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    batch = _to(batch)

    def step():
        loss = model(**batch).loss
        torch.autograd.grad(loss, lora)

    med, times = _timed(step)
    return batch["input_ids"].numel() / med, times


def _capture_tokens_per_s(model, batch):
    from pyinf.capture import GradientCapture

    batch = _to(batch)
    with GradientCapture(model) as cap:
        med, times = _timed(lambda: cap(batch))
        n_blocks = len(cap.blocks)
        n_params = sum(b.size for b in cap.blocks)
    return batch["input_ids"].numel() / med, times, n_blocks, n_params


def _end_to_end(model, train, queries, store):
    import pyinf

    _reset_peak()
    _sync()
    t = time.perf_counter()
    att = pyinf.Attributor(model, method="datainf", store=store, progress=False)
    att.fit(train)
    t_fit = time.perf_counter() - t
    scores = att.score(queries)
    _sync()
    total = time.perf_counter() - t
    assert scores.shape == (sum(b["input_ids"].shape[0] for b in queries), att.n)
    assert bool(torch.isfinite(scores).all())
    out = {"store": store, "seconds": total, "fit_seconds": t_fit, "score_seconds": total - t_fit,
           "peak_gpu_gb": _peak_gb(), "n": att.n, "m": scores.shape[0]}
    del att
    return out, scores


def _kronfluence(model, train, queries):
    """Kronfluence's gradient dot product ("identity" factors) on the same data; None if not importable."""
    try:
        import kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task
    except ImportError:
        return None

    def lm_loss(batch, model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )

    modules = [n for n, m in model.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))]

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return lm_loss(batch, model)

        def compute_measurement(self, batch, model):
            return lm_loss(batch, model)

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, batches):
            self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    task = LMTask()
    try:
        kmodel = prepare_model(model, task)  # wraps the tracked modules in place: run last
        with tempfile.TemporaryDirectory() as tmp:
            analyzer = Analyzer(analysis_name="bench", model=kmodel, task=task, output_dir=tmp, disable_tqdm=True)
            _reset_peak()
            _sync()
            t = time.perf_counter()
            analyzer.fit_all_factors(factors_name="identity", dataset=Rows(train),
                                     factor_args=FactorArguments(strategy="identity"), per_device_batch_size=BATCH)
            analyzer.compute_pairwise_scores(scores_name="s", factors_name="identity", query_dataset=Rows(queries),
                                             train_dataset=Rows(train), per_device_query_batch_size=BATCH,
                                             per_device_train_batch_size=BATCH)
            _sync()
            return {"version": kronfluence.__version__, "strategy": "identity (gradient dot product)",
                    "seconds": time.perf_counter() - t, "peak_gpu_gb": _peak_gb()}
    except Exception as err:  # noqa: BLE001 - an optional comparison must not sink the run
        return {"error": f"{type(err).__name__}: {err}"}


def _versions():
    import numpy
    import peft
    import transformers

    import pyinf

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "numpy": numpy.__version__, "pyinf": pyinf.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def test_llama13b_end_to_end():
    device = _device()
    result = {
        "benchmark": "llama13b" + ("-tiny" if TINY else ""),
        "device": machine.device_name(),
        "versions": _versions(),
        "commit": machine.git_commit(),
        "config": {**MODEL, "lora": "r=8 alpha=32 q_proj,v_proj", "dtype": "bfloat16", "batch": BATCH},
    }
    t = time.perf_counter()
    model = _build_model()
    result["build_seconds"] = time.perf_counter() - t

    probe = _batches(BATCH, C_T, BATCH, seed=99)[0]
    result["a_bare_fwd_bwd_tokens_per_s"], result["a_times"] = _bare_tokens_per_s(model, probe)
    tps, times, n_blocks, n_params = _capture_tokens_per_s(model, probe)
    result.update(b_capture_tokens_per_s=tps, b_times=times, blocks=n_blocks, lora_params=n_params)
    result["capture_over_bare"] = tps / result["a_bare_fwd_bwd_tokens_per_s"]

    train, queries = _batches(C_TRAIN, C_T, BATCH, seed=0), _batches(C_QUERY, C_T, BATCH, seed=1)
    result["c"] = []
    ref = None
    for store in (["gpu"] if device.type == "cuda" else []) + ["cpu"]:
        r, scores = _end_to_end(model, train, queries, store)
        if ref is not None:  # same bf16 gradients, same chunks: the stores agree
            r["max_abs_diff_vs_gpu"] = float((scores - ref).abs().max())
        ref = scores
        result["c"].append(r)
    del ref
    d_train = _batches(D_TRAIN, D_T, D_BATCH, seed=2)
    result["d"], _ = _end_to_end(model, d_train, queries[:1] if TINY else _batches(C_QUERY, D_T, D_BATCH, seed=3), "cpu")
    del d_train

    kf = _kronfluence(model, train, queries)  # last: it rewraps the model's modules
    if kf is not None:
        result["kronfluence"] = kf
        if "seconds" in kf:
            result["kronfluence_over_pyinf"] = kf["seconds"] / result["c"][0]["seconds"]

    result["targets"] = {
        "capture_over_bare>=0.8": result["capture_over_bare"] >= TARGET_CAPTURE_RATIO,
        "c_under_25s": all(r["seconds"] < TARGET_C_SECONDS for r in result["c"]),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{result['benchmark']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_times")}, indent=1))
    print(f"wrote {path}")
