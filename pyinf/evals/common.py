"""Shared by the evals: scikit-learn's bundled digits, a small MLP, its training, and
attribution through `pyinf.Attributor` with the MLP's `nn.Linear` layers as plain blocks (weight and bias)
(the one per-sample gradient path: `pyinf.capture`, as `pyinf.per_sample_grads`)."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("tracin", "datainf", "exact", "lissa", "hyperinf", "kfac", "ekfac", "forward")


@dataclass
class EvalConfig:
    """Options shared by the digits evals (the MLP, its training, the methods, the output)."""

    hidden: int = 32
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    damping: float = 0.1
    lissa_iterations: int = 300
    forward_lr: float = 1e-2
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    out: str = "pyinf-out"
    progress: bool | None = None
# Every parameter of the MLP, one block per layer: the weight with its bias appended as a last input
# column ([W | b], `pyinf.capture`'s "+bias"), as Kronfluence attributes a layer with a bias. Forward-INF
# moves parameters, not joined blocks: it attributes the weights.
BLOCKS = ["fc1+bias", "fc2+bias"]
FORWARD_BLOCKS = ["fc1", "fc2"]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(X (1797, 64) float32 in [0, 1], y (1797,) int64): scikit-learn's bundled copy, no download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a user-facing error: the CLI turns it into one line
        raise ValueError("pyinf eval needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def split_digits(cfg: EvalConfig, n_train: int, n_other: int, other: str):
    """A seeded split of digits: (X_train, y_train, X_other, y_other, the generator, for more draws)."""
    X, y = load_digits_tensors()
    if n_train + n_other > len(X):
        raise ValueError(f"--n-train + --n-{other} must be <= {len(X)} (the digits set), got {n_train + n_other}")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(X), generator=g)
    tr, ot = perm[:n_train], perm[n_train : n_train + n_other]
    return X[tr], y[tr].clone(), X[ot], y[ot], g


def train_cfg_mlp(cfg: EvalConfig, X, y):
    """The eval's MLP trained on (X, y) with the config's settings (same seeded init every time)."""
    return train_mlp(X, y, hidden=cfg.hidden, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     init_seed=cfg.seed)


class MLP(nn.Module):
    """The evals' classifier: d_in → hidden (ReLU) → classes; its two Linear weights are the blocks."""
    def __init__(self, d_in: int = 64, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def per_sample_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy per sample, `(B,)`, of a batch {"x": (B, d_in), "labels": (B,)}."""
    return F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


def train_mlp(X, y, *, hidden: int, steps: int, lr: float, weight_decay: float, init_seed: int,
              init_state=None) -> MLP:
    """Full-batch Adam from a seeded init (deterministic; the same init for every retrain)."""
    torch.manual_seed(init_seed)
    model = MLP(X.shape[1], hidden, 10)
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(X), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum((p * p).sum() for n, p in model.named_parameters() if "weight" in n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def batches(X, y, bs: int = 256):
    """`X` (n, d_in), `y` (n,) as a list of {"x", "labels"} batches of `bs` samples (under torchrun, this rank's
    contiguous share)."""
    from ..distributed import batch_size_for_ranks

    bs = batch_size_for_ranks(len(X), bs)
    return [{"x": X[k : k + bs], "labels": y[k : k + bs]} for k in range(0, len(X), bs)]


def available_methods(methods) -> tuple[list[str], list[str]]:
    """(methods `pyinf.Attributor` accepts, methods it does not) of `methods`."""
    from ..tasks.demo import method_available

    ok = [m for m in methods if method_available(m)]
    return ok, [m for m in methods if m not in ok]


def sweep(methods, dampings) -> list[tuple[str, str, float]]:
    """The analyses of a sweep from one capture: (row name, method, damping) for every method and damping;
    the row is "method@damping" when there are several dampings ("method" for one), and tracin and forward,
    which take no damping, run once."""
    dampings = list(dict.fromkeys(float(d) for d in dampings))
    if not dampings or any(not d > 0 for d in dampings):
        raise ValueError(f"dampings must be > 0, got {dampings}")
    rows = []
    for m in methods:
        undamped = m in ("tracin", "forward")
        for d in (dampings[:1] if undamped else dampings):
            rows.append((m if len(dampings) == 1 or undamped else f"{m}@{d:g}", m, d))
    return rows


def _options(method: str, damping: float, lissa_iterations: int, forward_lr: float,
             forward_moves=FORWARD_BLOCKS) -> dict:
    if method == "forward":  # it moves the weights: a joined [W | b] block cannot be stepped
        return {"lr": forward_lr, **({"moves": forward_moves} if forward_moves is not None else {})}
    return {"damping": damping, **({"iterations": lissa_iterations} if method == "lissa" else {})}


def capture(model, methods, train, *, damping: float, lissa_iterations: int, forward_lr: float, progress: bool,
            blocks=BLOCKS, loss=per_sample_loss, forward_moves=FORWARD_BLOCKS):
    """(the training data captured once for every method, `pyinf.capture_gradients`; seconds). The defaults are
    the digits MLP's; a PEFT model takes blocks="lora", loss=None (its Hugging Face loss), forward_moves=None."""
    from .. import capture_gradients
    from ..analysis import make_analysis, shared_capture_options

    device = next(model.parameters()).device
    analyses = []
    for m in methods:
        opts = _options(m, damping, lissa_iterations, forward_lr, forward_moves)
        analyses.append(make_analysis(m, device, damping=opts.pop("damping", damping), options=opts))
    needs = shared_capture_options(analyses)
    t0 = time.perf_counter()
    grads = capture_gradients(model, train, blocks=blocks, loss=loss, batch_size=256, progress=progress,
                              **needs)
    return grads, time.perf_counter() - t0


def attribute(grads, method: str, query, *, damping: float, lissa_iterations: int, forward_lr: float,
              self_influence: bool, query_grads: dict, forward_moves=FORWARD_BLOCKS):
    """(scores (m, n), self-influence (n,) or None, info) of one method from the shared capture `grads`
    (the gradient methods score query gradients captured once, kept in `query_grads`)."""
    from .. import Attributor
    from ..distributed import broadcast_from_rank0
    from ..tasks.demo import score_in_sweep

    t0 = time.perf_counter()
    info = {"warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        att = Attributor(grads.model, method=method, gradients=grads,
                         **_options(method, damping, lissa_iterations, forward_lr, forward_moves))
        info["options"] = att.describe()
        # rank 0's result on every rank (Attributor returns None on the others), so all compute the same metrics
        scores = broadcast_from_rank0(score_in_sweep(att, grads, query, query_grads)).float()
        si = None
        if self_influence:
            try:
                si = att.self_influence()
            except (NotImplementedError, ValueError, AttributeError, TypeError) as e:
                info["self_influence_error"] = f"{type(e).__name__}: {e}"
            si = broadcast_from_rank0(si)
            si = None if si is None else si.float()
    info["seconds"] = time.perf_counter() - t0
    info["warnings"] = list(dict.fromkeys(str(w.message) for w in caught if "pyinf" in str(w.filename)))
    return scores, si, info


def mean_sd(values) -> tuple[float, float | None]:
    """(mean, sample sd) of `values`; the sd is None for a single value (undefined)."""
    values = [float(v) for v in values]
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def pm(mean: float, sd: float | None, digits: int = 2) -> str:
    """"mean ± sd" (just the mean when the sd is undefined)."""
    return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def checked_seeds(seeds) -> list[int]:
    """`seeds` as a list; ValueError when one repeats (a repeated seed would count one run twice in mean ± sd)."""
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {seeds}")
    return seeds
