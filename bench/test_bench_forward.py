"""Forward-INF on the Llama-2-13B-shaped benchmark model (issue 6), one run, JSON under bench/results/.

    pytest bench/test_bench_forward.py -s                       # needs a CUDA GPU (~30 GB)
    PYINF_BENCH_TINY=1 pytest bench/test_bench_forward.py -s    # the same code, tiny config, on CPU

Model: as bench/test_bench_llama13b.py (13B sizes, random bf16 weights on the
GPU, PEFT LoRA r=8, alpha=32 on q_proj and v_proj, LoRA B perturbed from 0).
Measured:
  (a) bare inference tokens/s: a no-grad forward + per-sample loss of the plain
      PEFT model on a batch of k·B sequences (B = 8, 128 tokens), k = the
      queries per pass Forward-INF picks (capped at K_CAP);
  (b) Forward-INF scoring tokens/s: one grouped pass, i.e. the same k·B
      sequences (B training sequences replicated k times), each group with its
      own perturbed adapters (`ForwardInfluence._train_losses`), Triton
      grouped_lora kernel on; target (b)/(a) >= 0.9;
  (c) end to end on 900 train x 128 tokens: Forward-INF (fit = base losses,
      score = query steps + passes) for m = 1 and m = k queries, and DataInf
      (Attributor, store "gpu") for m = 1 and m = 100 queries; each cost is
      modelled as fit + per-pass (Forward-INF: ceil(m/k) passes) or fit +
      per-query (DataInf) and the crossover, the largest m for which
      Forward-INF is faster end to end, is reported.
Targets are recorded in the JSON, not asserted.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import machine
import torch
from llama13b import MODEL, TINY, batches, build_model, device as _device, requires_gpu, sync as _sync, timed

pytestmark = requires_gpu

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
if TINY:
    N_TRAIN, T, B, K_CAP, M_DATAINF, REPEATS = 24, 16, 4, 4, 8, 2
else:
    N_TRAIN, T, B, K_CAP, M_DATAINF, REPEATS = 900, 128, 8, 16, 100, 3
TARGET_RATIO = 0.9


def _build_model():
    return build_model(torch.float32 if TINY else torch.bfloat16)


def _batches(n, seed, bs=B):
    return batches(n, T, bs, seed)


def _timed(fn, repeats=REPEATS):
    return timed(fn, repeats)


def _wall(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def test_forward_influence_throughput_and_crossover():
    import pyinf
    from pyinf.forward import ForwardInfluence, _replicate
    from pyinf.losses import default_loss, move_to_device

    model = _build_model()
    dev = _device()
    lr = 1e-2 if TINY else 5e-2  # bf16 adapters: a step that survives bf16 rounding
    result = {"benchmark": "forward" + ("-tiny" if TINY else ""),
              **machine.machine_info(),
              "config": {**MODEL, "lora": "r=8 alpha=32 q_proj,v_proj", "T": T, "B": B, "n_train": N_TRAIN, "lr": lr}}

    train = _batches(N_TRAIN, seed=0)
    eng = ForwardInfluence(model, lr=lr, progress=False).fit(train)
    k = min(eng.pick_queries_per_pass(10**6), K_CAP)
    result["k_auto"], result["k"] = eng.pick_queries_per_pass(10**6), k
    eng.queries_per_pass = k

    # (a) bare inference on k·B sequences
    probe = move_to_device(train[0], dev)
    rep = _replicate(probe, k)
    with torch.no_grad():
        t_a, times_a = _timed(lambda: default_loss(model, rep))
    tokens = rep["input_ids"].numel()
    result["a_bare_inference_tokens_per_s"], result["a_times"] = tokens / t_a, times_a

    # (b) one grouped Forward-INF pass over the same k·B sequences
    from pyinf.forward import _Grouped

    queries = _batches(k, seed=1, bs=k)
    one = ForwardInfluence(model, lr=lr, queries_per_pass=k, progress=False).fit([train[0]])
    grouped = _Grouped(one.plan, None)
    with grouped:
        W = one._step_group(grouped, move_to_device(queries[0], dev))
        grouped.k, grouped.weights = k, W
        with torch.no_grad():
            t_b, times_b = _timed(lambda: one._train_losses(k))
    result["b_forward_inf_tokens_per_s"], result["b_times"] = tokens / t_b, times_b
    result["b_over_a"] = t_a / t_b

    # (c) end to end
    t_fit_f, _ = _wall(lambda: ForwardInfluence(model, lr=lr, queries_per_pass=k, progress=False).fit(train))
    fwd_m = {}
    eng.score(_batches(1, seed=9))  # warm-up (kernels compiled, allocator primed)
    for m in (1, k):
        q = _batches(m, seed=2, bs=min(m, B))
        t, S = _wall(lambda: eng.score(q))
        assert S.shape == (m, eng.n) and bool(torch.isfinite(S).all())
        fwd_m[m] = t
    di = {}
    pyinf.Attributor(model, method="datainf", progress=False).fit(train[:1]).score(_batches(1, seed=9))  # warm-up
    for m in (1, M_DATAINF):
        q = _batches(m, seed=3, bs=min(m, B))
        t, S = _wall(lambda: pyinf.Attributor(model, method="datainf", store="gpu" if not TINY else "cpu",
                                              progress=False).fit(train).score(q))
        di[m] = t
    per_pass = fwd_m[k]  # m = k: one pass (k query steps + k·n forwards)
    per_query_di = (di[M_DATAINF] - di[1]) / (M_DATAINF - 1)
    fit_di = di[1] - per_query_di

    def t_fwd(m):
        return t_fit_f + math.ceil(m / k) * per_pass

    def t_di(m):
        return fit_di + m * per_query_di

    crossover = 0
    for m in range(1, 100001):
        if t_fwd(m) <= t_di(m):
            crossover = m
        elif m > 4 * k and t_fwd(m) - t_di(m) > t_fwd(crossover or 1):
            break
    result["c"] = {"forward_fit_seconds": t_fit_f, "forward_score_seconds": {str(m): v for m, v in fwd_m.items()},
                   "datainf_end_to_end_seconds": {str(m): v for m, v in di.items()},
                   "datainf_fit_seconds_model": fit_di, "datainf_per_query_seconds_model": per_query_di,
                   "crossover_queries": crossover}
    result["targets"] = {"b_over_a>=0.9": result["b_over_a"] >= TARGET_RATIO}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{result['benchmark']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k_: v for k_, v in result.items() if not k_.endswith("_times")}, indent=1))
    print(f"wrote {path}")
