"""Forward-INF and friends against real retraining on a convex model (issue 6); Forward-INF's rounding noise
in bfloat16 and float32 against a float64 reference (issue 12).

    python bench/forward_validation.py [--n-train 1200] [--lam 1e-3] [--queries 10] [--lr 1e-3]
    python bench/forward_validation.py --bf16-noise [--n-train 64] [--queries 16] [--lrs 1e-3,3e-3,1e-2,3e-2,1e-1,0.3,1]

--bf16-noise: `bf16_noise` below (its docstring). Without it:

Model: multinomial logistic regression on scikit-learn's bundled digits
(`sklearn.datasets.load_digits`, no download; pixels / 16 plus a constant 1,
so the bias is part of the weight W (10 × 65), one nn.Linear without bias),
float64, objective

    R(θ; w) = (1/n) Σ_i w_i ℓ(z_i; θ) + (λ/2) ‖θ‖²,   w_i = 1,

minimised by LBFGS (strong Wolfe), then polished by Newton steps to
|∇R| < 1e-14. Every retrain (LOO, dual) is warm-started at θ* and solved by
Newton-chord steps with the exact Hessian of the retrained objective at θ*
(a rank-10 change of ∇²R) to |∇R| < 1e-14: its fixed point is the exact
minimiser, and it is ~100× faster than LBFGS, which stalls near |∇R| ~ 1e-9,
an error in θ of up to |∇R|/λ, as large as the LOO changes themselves at
λ = 1e-3. For the 10 validation points with the highest loss at θ*:

* true LOO: retrain with w_i = 0 (warm-started at θ*), Δ_i = ℓ_q(θ_{-i}) − ℓ_q(θ*);
* dual (mirrored): retrain on D ∪ {q}, i.e. add (1/n) ℓ_q to R, and measure each
  training loss change δ_i = ℓ_i(θ_{+q}) − ℓ_i(θ*);
* forward: `pyinf.forward_influence` (SGD, one step of size lr on ℓ_q);
* forward-adam: the same with one Adam step (a sign-like metric);
* tracin, exact: `pyinf.influence` on the per-sample gradients
  g_i = (p_i − y_i) ⊗ x_i (checked against `pyinf.per_sample_grads`);
* exact-hessian: the same formula with the true Hessian in place of the
  empirical Fisher (the textbook influence function).

Sign and scale. pyinf's score estimates d ℓ_q / d ε_i for the objective with
w_i = 1 + ε_i·n, i.e. the score is −v_qᵀ H⁻¹ g_i with H = ∇²R. Removing i is
ε_i = −1/n, so the first-order LOO change is −(1/n) · score. Up-weighting q by
1/n moves θ by −(1/n) H⁻¹ v_q, so δ_i ≈ −(1/n) g_iᵀ H⁻¹ v_q = −Δ_i (the mirror):
the dual's LOO estimate is −δ_i. Every method's estimate below is put on the
LOO scale that way (correlations do not depend on the scale, the sign matters).

Damping. ∇²R = (1/n) Σ ∇²ℓ_i + λ I, and pyinf's exact method uses
(F + λ_b I) with F = (1/n) Σ g_i g_iᵀ, the empirical Fisher of the same
mean-normalised loss; so the L2 strength λ of the mean-loss objective enters as
`damping=λ, damping_mode="absolute"` directly (with scikit-learn's C,
Σ ℓ_i + ‖θ‖²/(2C), that is λ = 1/(n C)). The remaining difference between
"exact" and "exact-hessian" is the empirical Fisher vs the Hessian
Σ x xᵀ ⊗ (diag p − p pᵀ) / n.

Prints a table (Pearson and Spearman against true LOO: mean over the queries of
the per-query correlations over the n training points, and pooled over all
(query, point) pairs) and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import functools
import platform
import sys
import time

import machine  # bench/machine.py: this script's folder is on sys.path
import torch
from torch import nn

DT = torch.float64


def load_digits_split(n_train: int, seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=DT) / 16.0
    X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=DT)], dim=1)  # bias column
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:n_train], perm[n_train:]
    return X[tr], y[tr], X[va], y[va]


class Softmax(nn.Module):
    def __init__(self, d: int, c: int):
        super().__init__()
        self.linear = nn.Linear(d, c, bias=False, dtype=DT)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x):
        return self.linear(x)


def per_sample_loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def losses_at(W, X, y):
    return nn.functional.cross_entropy(X @ W.T, y, reduction="none")


def fit(X, y, lam, w=None, W0=None, extra=None, tol=1e-12, max_iter=500):
    """argmin (1/n)[Σ w_i ℓ_i (+ ℓ_extra)] + (λ/2)‖W‖² by LBFGS in float64; returns (W, iterations)."""
    n = X.shape[0]
    W = (torch.zeros(10, X.shape[1], dtype=DT) if W0 is None else W0.clone()).requires_grad_(True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-20,
                            history_size=50, line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        opt.zero_grad()
        L = losses_at(W, X, y)
        obj = (L.sum() if w is None else (w * L).sum()) / n + 0.5 * lam * W.pow(2).sum()
        if extra is not None:
            obj = obj + losses_at(W, extra[0], extra[1]).sum() / n
        obj.backward()
        evals[0] += 1
        return obj

    opt.step(closure)
    return W.detach(), evals[0]


def objective_grad(W, X, y, lam, w=None, extra=None):
    """∇R in closed form: (1/n)[Σ w_i (p_i − y_i) ⊗ x_i (+ the extra point's)] + λW."""
    P = torch.softmax(X @ W.T, dim=1)
    P[torch.arange(len(y)), y] -= 1
    if w is not None:
        P = P * w[:, None]
    g = P.T @ X
    if extra is not None:
        g = g + per_sample_grads(W, *extra).sum(0)
    return g / X.shape[0] + lam * W


def grad_norm(W, X, y, lam, w=None, extra=None):
    return float(objective_grad(W, X, y, lam, w, extra).norm())


def sample_hessian(W, x):
    """∇²ℓ at one point x (d,): (diag p − p pᵀ) ⊗ x xᵀ, row-major vec(W)."""
    p = torch.softmax(W @ x, dim=0)
    return torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(x, x))


def newton(W0, X, y, lam, H, w=None, extra=None, tol=1e-14, max_iter=60):
    """Polish to |∇R| < tol: Newton-chord steps W −= H⁻¹∇R(W) with the Hessian H of this objective at W0.

    The fixed point is the exact minimiser (R is strictly convex); H only sets the
    speed. Falls back to a fresh Hessian at the current point if progress stalls.
    Returns (W, |∇R|, iterations).
    """
    W = W0.clone()
    L = torch.linalg.cholesky(H)
    last = float("inf")
    for it in range(max_iter):
        g = objective_grad(W, X, y, lam, w, extra)
        gn = float(g.norm())
        if gn < tol:
            return W, gn, it
        if gn > 0.5 * last:  # slow contraction: refresh the Hessian here
            Hn = hessian(W, X, lam, w)
            if extra is not None:
                Hn = Hn + sample_hessian(W, extra[0][0]) / X.shape[0]
            L = torch.linalg.cholesky(Hn)
        last = gn
        W = W - torch.cholesky_solve(g.reshape(-1, 1), L).reshape(W.shape)
    return W, float(objective_grad(W, X, y, lam, w, extra).norm()), max_iter


def per_sample_grads(W, X, y):
    """(n, 10, d): ∇_W ℓ_i = (p_i − onehot(y_i)) ⊗ x_i."""
    P = torch.softmax(X @ W.T, dim=1)
    P[torch.arange(len(y)), y] -= 1
    return P[:, :, None] * X[:, None, :]


def hessian(W, X, lam, w=None):
    """∇²R (D × D), D = 10·d, row-major vec(W) (sample weights w)."""
    P = torch.softmax(X @ W.T, dim=1)
    S = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]  # (n, 10, 10)
    if w is not None:
        S = S * w[:, None, None]
    H = torch.einsum("nab,ni,nj->aibj", S, X, X).reshape(W.numel(), W.numel()) / X.shape[0]
    H.diagonal().add_(lam)
    return H


def rankdata(x):
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r  # ties are measure-zero for these continuous values


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def spearman(a, b):
    return pearson(rankdata(a), rankdata(b))


NOISE_MODEL = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, intermediate_size=688, max_position_embeddings=64)


def _rms_norm64(norm, x):
    """LlamaRMSNorm in the input's dtype (transformers computes it in float32 whatever the dtype)."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _lm_loss64(model, batch):
    """Per-sample mean next-token cross-entropy in float64 (pyinf's default loss takes it in float32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    tgt = batch["labels"][:, 1:]
    ce = nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), tgt.flatten(), reduction="none")
    return ce.view(tgt.shape).mean(dim=1)


def bf16_noise(args) -> list[dict]:
    """How noisy Forward-INF is in bfloat16 (and float32) at a given lr.

    Model: a Llama from `NOISE_MODEL` (random weights, seed `--seed`) with PEFT
    LoRA r = 8, alpha = 16 on q_proj and v_proj, LoRA B drawn N(0, 0.02²) (PEFT
    zeroes it), then rounded to bfloat16; the float32 and float64 models are
    that bf16 model cast up, so all three hold the same θ. Every op of the
    float64 model runs in float64 (its RMSNorms, which transformers runs in
    float32, are replaced; attention is sdpa). Data: random tokens, `--n-train`
    training and `--queries` query sequences of 32 tokens, no padding.

    Reference: s_ref(lr) = (ℓ(z_i; θ − lr v_j) − ℓ(z_i; θ)) / lr of the float64
    model with a float64 loss: the quantity the bf16 and fp32 runs compute (one
    SGD step of the same lr), without rounding. For each lr and dtype: the
    relative error ‖s − s_ref‖_F / ‖s_ref‖_F (rounding noise) and the mean over
    the queries of Spearman(s_j, s_ref_j) over the training points; the
    relative error against the first-order score s_1 = −⟨v_j, g_i⟩ (float64,
    lr = 1e-7), which adds the O(lr) curvature term ‖s_ref − s_1‖ / ‖s_1‖; and
    the relative step lr · mean_j ‖v_j‖ / ‖θ‖ (θ, v: the LoRA weights and the
    query gradient). Default path (grouped, `torch.bmm`, 8 queries per pass on
    the CPU).
    """
    import copy
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import pyinf

    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(LlamaConfig(**NOISE_MODEL, tie_word_embeddings=False, attn_implementation="sdpa"))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if ".lora_B." in name:
                prm.copy_(0.02 * torch.randn(prm.shape, generator=g))
    model = model.to(torch.bfloat16).eval()
    models = {torch.bfloat16: model, torch.float32: copy.deepcopy(model).float(),
              torch.float64: copy.deepcopy(model).double()}
    for mod in models[torch.float64].modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = functools.partial(_rms_norm64, mod)

    def batches(n, seed):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, NOISE_MODEL["vocab_size"], (n, 32), generator=gen)
        return [{"input_ids": ids[s : s + 8], "attention_mask": torch.ones_like(ids[s : s + 8]),
                 "labels": ids[s : s + 8]} for s in range(0, n, 8)]

    train, queries = batches(args.n_train, 10), batches(args.queries, 11)

    lora = [p for n, p in models[torch.float64].named_parameters() if "lora_" in n]
    theta_norm = float(torch.cat([p.detach().flatten() for p in lora]).norm())
    v_norms = []
    for qb in queries:
        for r in range(qb["input_ids"].shape[0]):
            loss = _lm_loss64(models[torch.float64], {k: v[r : r + 1] for k, v in qb.items()}).sum()
            v_norms.append(float(torch.cat([d.flatten() for d in torch.autograd.grad(loss, lora)]).norm()))
    v_over_theta = sum(v_norms) / len(v_norms) / theta_norm

    def run(dt, lr):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            S = pyinf.forward_influence(models[dt], train, queries, lr=lr, progress=False,
                                        loss=_lm_loss64 if dt == torch.float64 else None)
        return S.double(), [str(w.message) for w in caught if "unchanged" in str(w.message)]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    t0 = time.perf_counter()
    first, _ = run(torch.float64, 1e-7)
    rows = []
    for lr in args.lrs:
        ref, _ = run(torch.float64, lr)
        row = {"lr": lr, "relative_step": lr * v_over_theta, "mean_abs_ref": float(ref.abs().mean()),
               "curvature_rel": rel(ref, first)}
        for dt, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            S, unchanged = run(dt, lr)
            row[f"{tag}_rel_err"] = rel(S, ref)
            row[f"{tag}_spearman"] = sum(spearman(S[j], ref[j]) for j in range(len(S))) / len(S)
            row[f"{tag}_rel_err_first_order"] = rel(S, first)
            row[f"{tag}_unchanged_warning"] = unchanged
        rows.append(row)
        print(f"  lr {lr:g} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    print(f"Forward-INF rounding noise: Llama {NOISE_MODEL}, LoRA r=8 on q_proj/v_proj "
          f"({sum(p.numel() for p in lora)} weights, ‖θ‖ = {theta_norm:.3g}, mean ‖v_j‖ = "
          f"{sum(v_norms) / len(v_norms):.3g}), {args.n_train} train x {args.queries} queries of 32 tokens")
    head = (f"{'lr':>6s} {'lr‖v‖/‖θ‖':>10s} {'mean|s_ref|':>11s} | {'bf16 err':>8s} {'Spearman':>8s} "
            f"{'vs s_1':>7s} | {'fp32 err':>8s} {'Spearman':>8s} {'vs s_1':>7s} | {'s_ref vs s_1':>12s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['lr']:6g} {r['relative_step']:10.2g} {r['mean_abs_ref']:11.3g} | {r['bf16_rel_err']:8.3g} "
              f"{r['bf16_spearman']:8.3f} {r['bf16_rel_err_first_order']:7.3g} | {r['fp32_rel_err']:8.2g} "
              f"{r['fp32_spearman']:8.4f} {r['fp32_rel_err_first_order']:7.3g} | {r['curvature_rel']:12.3g}")
        for w in r["bf16_unchanged_warning"] + r["fp32_unchanged_warning"]:
            print(f"       warning: {w}")
    print(f"err: ‖s − s_ref‖/‖s_ref‖ (rounding), Spearman: mean per query vs s_ref, vs s_1: ‖s − s_1‖/‖s_1‖ "
          f"(rounding + curvature); {time.perf_counter() - t0:.0f} s")
    out = machine.write_result("forward_bf16_noise", {
        "benchmark": "forward_bf16_noise", "args": vars(args), "model": NOISE_MODEL,
        "device": platform.processor() or platform.machine(), "cpu": machine.cpu_model(),
        "python": platform.python_version(), "torch": torch.__version__, "git_commit": machine.git_commit(),
        "theta_norm": theta_norm, "mean_query_grad_norm": sum(v_norms) / len(v_norms), "rows": rows,
    }, args.out, indent=2)
    print(f"wrote {out}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=None, help="default 1200 (--bf16-noise: 64)")
    ap.add_argument("--lam", type=float, default=1e-3, help="L2 strength of the mean-loss objective")
    ap.add_argument("--queries", type=int, default=None, help="default 10 (--bf16-noise: 16)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Forward-INF step size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default=None)
    ap.add_argument("--bf16-noise", action="store_true", help="the bf16/fp32 rounding-noise table instead")
    ap.add_argument("--lrs", type=lambda v: [float(x) for x in v.split(",")], default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
                    help="--bf16-noise: the step sizes")
    args = ap.parse_args(argv)
    if args.n_train is None:
        args.n_train = 64 if args.bf16_noise else 1200
    if args.queries is None:
        args.queries = 16 if args.bf16_noise else 10
    if args.bf16_noise:
        return bf16_noise(args)

    import pyinf

    t_all = time.perf_counter()
    Xtr, ytr, Xva, yva = load_digits_split(args.n_train, args.seed)
    n, lam = Xtr.shape[0], args.lam

    t = time.perf_counter()
    W, evals = fit(Xtr, ytr, lam, max_iter=1000)
    gn_lbfgs = grad_norm(W, Xtr, ytr, lam)
    H = hessian(W, Xtr, lam)
    W, gn, newton_it = newton(W, Xtr, ytr, lam, H)
    H = hessian(W, Xtr, lam)  # ∇²R at θ*
    t_fit = time.perf_counter() - t
    acc = float(((Xva @ W.T).argmax(1) == yva).double().mean())
    print(f"digits: n={n} train, {len(yva)} validation; λ={lam:g}; θ*: LBFGS {evals} evaluations (|∇R| "
          f"{gn_lbfgs:.1e}), then {newton_it} Newton steps (|∇R| {gn:.1e}), {t_fit:.2f} s; validation accuracy {acc:.3f}")

    Lva = losses_at(W, Xva, yva)
    q_idx = Lva.argsort(descending=True)[: args.queries]
    Xq, yq = Xva[q_idx], yva[q_idx]
    Lq0 = losses_at(W, Xq, yq)
    Ltr0 = losses_at(W, Xtr, ytr)
    est: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}

    # -- true leave-one-out -----------------------------------------------------
    t = time.perf_counter()
    loo = torch.empty(len(q_idx), n, dtype=DT)
    worst_gn, tot_it = 0.0, 0
    for i in range(n):
        w = torch.ones(n, dtype=DT)
        w[i] = 0
        # warm start at θ*, Newton with the exact Hessian of R_{-i} at θ* (H − ∇²ℓ_i / n)
        Wi, gi, it = newton(W, Xtr, ytr, lam, H - sample_hessian(W, Xtr[i]) / n, w=w)
        tot_it += it
        worst_gn = max(worst_gn, gi)
        loo[:, i] = losses_at(Wi, Xq, yq) - Lq0
        if (i + 1) % 200 == 0:
            print(f"  LOO retrains {i + 1}/{n} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    times["true_loo"] = time.perf_counter() - t
    print(f"true LOO: {n} warm-started retrains, {tot_it / n:.1f} Newton steps each, {times['true_loo']:.1f} s, "
          f"max final |∇R_(-i)| {worst_gn:.1e}; mean |Δ| {float(loo.abs().mean()):.2e}")

    # -- dual: train on D ∪ {q} ---------------------------------------------------
    t = time.perf_counter()
    dual = torch.empty_like(loo)
    for j in range(len(q_idx)):
        ex = (Xq[j : j + 1], yq[j : j + 1])
        Wq, gq, _ = newton(W, Xtr, ytr, lam, H + sample_hessian(W, Xq[j]) / n, extra=ex)
        worst_gn = max(worst_gn, gq)
        dual[j] = -(losses_at(Wq, Xtr, ytr) - Ltr0)  # the mirror: −δ_i estimates Δ_i
    times["dual"] = time.perf_counter() - t
    est["dual (retrain on D ∪ {q})"] = dual

    # -- pyinf: Forward-INF -----------------------------------------------------
    model = Softmax(Xtr.shape[1], 10)
    with torch.no_grad():
        model.linear.weight.copy_(W)
    bs = 256
    train = [{"x": Xtr[s : s + bs], "y": ytr[s : s + bs]} for s in range(0, n, bs)]
    queries = [{"x": Xq, "y": yq}]
    for name, kw in (("forward (SGD, 1 step)", dict(optimizer="sgd")),
                     ("forward (Adam, 1 step)", dict(optimizer="adam"))):
        t = time.perf_counter()
        S = pyinf.forward_influence(model, train, queries, lr=args.lr, blocks=["linear"], loss=per_sample_loss,
                                    progress=False, **kw)
        times[name] = time.perf_counter() - t
        est[name] = -S.double() / n
    assert torch.equal(model.linear.weight, W), "forward_influence did not restore the weights"

    # -- pyinf: gradient methods ------------------------------------------------
    G = per_sample_grads(W, Xtr, ytr)
    V = per_sample_grads(W, Xq, yq)
    cap = pyinf.per_sample_grads(model, train[0], blocks=["linear"], loss=per_sample_loss)["linear"]
    assert torch.allclose(cap.double(), G[: cap.shape[0]], rtol=1e-5, atol=1e-7), "capture disagrees with the closed form"
    for name, method in (("tracin", "tracin"), ("exact (empirical Fisher + λI)", "exact")):
        t = time.perf_counter()
        S = pyinf.influence(G, V, method=method, damping=lam, damping_mode="absolute")
        times[name] = time.perf_counter() - t
        est[name] = -S.double() / n
    t = time.perf_counter()
    Hinv_v = torch.linalg.solve(H, V.reshape(len(q_idx), -1).T).T
    est["exact-hessian (true ∇²R)"] = (Hinv_v @ G.reshape(n, -1).T) / n  # = −(1/n)(−vᵀH⁻¹g)
    times["exact-hessian (true ∇²R)"] = time.perf_counter() - t

    # -- table --------------------------------------------------------------------
    rows = []
    for name, E in est.items():
        pq = [pearson(E[j], loo[j]) for j in range(len(q_idx))]
        sq = [spearman(E[j], loo[j]) for j in range(len(q_idx))]
        rows.append({
            "method": name,
            "pearson_mean": sum(pq) / len(pq), "pearson_min": min(pq),
            "spearman_mean": sum(sq) / len(sq), "spearman_min": min(sq),
            "pearson_pooled": pearson(E.flatten(), loo.flatten()),
            "spearman_pooled": spearman(E.flatten(), loo.flatten()),
            "scale": float((E * loo).sum() / (E * E).sum()),  # least-squares factor estimate -> true LOO
            "seconds": times.get(name, float("nan")),
        })
    head = f"{'method':32s} {'Pearson':>8s} {'(min)':>7s} {'Spearman':>9s} {'(min)':>7s} {'P pooled':>9s} {'S pooled':>9s} {'scale':>7s} {'s':>7s}"
    print(f"\n{len(q_idx)} highest-loss validation points x {n} training points; correlation with the true LOO change "
          "(mean over queries of the per-query correlation, its minimum, and pooled over all pairs)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:32s} {r['pearson_mean']:8.4f} {r['pearson_min']:7.3f} {r['spearman_mean']:9.4f} "
              f"{r['spearman_min']:7.3f} {r['pearson_pooled']:9.4f} {r['spearman_pooled']:9.4f} {r['scale']:7.3f} "
              f"{r['seconds']:7.2f}")
    print(f"(true LOO retraining: {times['true_loo']:.1f} s; total {time.perf_counter() - t_all:.1f} s)")

    out = machine.write_result("forward_validation", {
        "benchmark": "forward_validation",
        "args": vars(args),
        "device": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "git_commit": machine.git_commit(),
        "n_train": n, "n_queries": len(q_idx), "query_indices": q_idx.tolist(), "validation_accuracy": acc,
        "theta_grad_norm": gn, "true_loo_seconds": times["true_loo"], "rows": rows,
        "sign_convention": "estimates on the LOO scale: Δ_i ≈ −score/n (pyinf methods), −δ_i (dual)",
    }, args.out, indent=2)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
