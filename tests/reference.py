"""Slow, explicit float64 reference implementations of every pyinf method.

Written from the formulas in DESIGN.md (section 1-3) only, never from the
package code, so that the tests are an independent check.  Every
preconditioner is built as an explicit dense ``D_b x D_b`` matrix and inverted
with ``torch.linalg.inv``; nothing here is clever and nothing is fast.

Conventions (DESIGN.md):
    score[j, i] = - sum_b  vec(v_jb)^T  P_b  vec(g_ib)          (P_b ~ H_b^-1)
    lambda_b    = damping * mean_i ||g_ib||^2 / D_b   (relative)
                = damping                             (absolute)
    F_b         = (1/n) sum_i vec(g_ib) vec(g_ib)^T
Blocks are flattened row-major (``reshape(n, rows*cols)``).
"""
from __future__ import annotations

from typing import Dict, Mapping, Union

import torch

DT = torch.float64
SINGLE = "<single>"  # block name used for a bare (n, D) tensor input

Grads = Union[torch.Tensor, Mapping[str, torch.Tensor]]


# ----------------------------------------------------------------------------
# input normalisation
# ----------------------------------------------------------------------------
def as_blocks(grads: Grads) -> Dict[str, torch.Tensor]:
    """name -> float64 (n, rows, cols); flat (n, D) blocks get rows = 1."""
    if isinstance(grads, torch.Tensor):
        grads = {SINGLE: grads}
    out = {}
    for name, g in grads.items():
        g = g.detach().to("cpu", DT)
        if g.ndim == 2:
            g = g.reshape(g.shape[0], 1, g.shape[1])
        assert g.ndim == 3, (name, g.shape)
        out[name] = g
    return out


def flat(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], -1)


def block_damping(G: torch.Tensor, damping: float, damping_mode: str) -> float:
    """lambda_b for one block; G is (n, rows, cols) float64."""
    Gf = flat(G)
    D = Gf.shape[1]
    if damping_mode == "relative":
        return float(damping * (Gf * Gf).sum(1).mean() / D)
    if damping_mode == "absolute":
        return float(damping)
    raise ValueError(damping_mode)


def fisher(G: torch.Tensor) -> torch.Tensor:
    Gf = flat(G)
    return Gf.T @ Gf / Gf.shape[0]


def gfim(G: torch.Tensor) -> torch.Tensor:
    """HyperINF GFIM  Phi = (1/n) sum_i g_i^T g_i  (cols x cols)."""
    n = G.shape[0]
    return torch.einsum("nrc,nrd->cd", G, G) / n


# ----------------------------------------------------------------------------
# dense preconditioners P_b (the explicit "H_b^-1" of every method)
# ----------------------------------------------------------------------------
def precond_tracin(G, lam):
    D = flat(G).shape[1]
    return torch.eye(D, dtype=DT)


def precond_datainf(G, lam):
    """(1/n) sum_i (g_i g_i^T + lam I)^-1  -- explicit per-sample inverses.

    By Sherman-Morrison this is exactly DESIGN's
    h = (1/lam)[v - (1/n) sum_i <v,g_i>/(lam+||g_i||^2) g_i]."""
    Gf = flat(G)
    n, D = Gf.shape
    I = torch.eye(D, dtype=DT)
    P = torch.zeros(D, D, dtype=DT)
    for i in range(n):
        g = Gf[i : i + 1].T
        P += torch.linalg.inv(g @ g.T + lam * I)
    return P / n


def precond_datainf_formula(G, lam):
    """The DESIGN closed form, written literally, as a cross-check of the above."""
    Gf = flat(G)
    n, D = Gf.shape
    I = torch.eye(D, dtype=DT)
    P = torch.zeros(D, D, dtype=DT)
    for i in range(n):
        g = Gf[i : i + 1].T
        P += (g @ g.T) / (lam + float((g * g).sum()))
    return (I - P / n) / lam


def precond_exact(G, lam):
    D = flat(G).shape[1]
    return torch.linalg.inv(fisher(G) + lam * torch.eye(D, dtype=DT))


def hyperinf_matrix(G, lam):
    """A = Phi / rows + lam I  (cols x cols)."""
    rows, cols = G.shape[1], G.shape[2]
    return gfim(G) / rows + lam * torch.eye(cols, dtype=DT)


def precond_hyperinf(G, lam):
    """kron(I_rows, A^-1): vec_rowmajor(V A^-1) = kron(I, A^-1) vec_rowmajor(V)."""
    rows = G.shape[1]
    Ainv = torch.linalg.inv(hyperinf_matrix(G, lam)).contiguous()
    return torch.kron(torch.eye(rows, dtype=DT), Ainv)


PRECOND = {
    "tracin": precond_tracin,
    "datainf": precond_datainf,
    "exact": precond_exact,
    "lissa": precond_exact,  # LiSSA converges to the exact block solve
    "hyperinf": precond_hyperinf,
}
METHODS = tuple(PRECOND)


# ----------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------
def _check_names(T, Q):
    assert set(T) == set(Q), (sorted(T), sorted(Q))


def block_scores(train: Grads, query: Grads, *, method, damping=0.1,
                 damping_mode="relative") -> Dict[str, torch.Tensor]:
    """Per-block (m, n) float64 score contributions."""
    T, Q = as_blocks(train), as_blocks(query)
    _check_names(T, Q)
    out = {}
    for b, G in T.items():
        lam = block_damping(G, damping, damping_mode)
        P = PRECOND[method](G, lam)
        out[b] = -(flat(Q[b]) @ P @ flat(G).T)
    return out


def influence(train: Grads, query: Grads, *, method, damping=0.1,
              damping_mode="relative", aggregate=False) -> torch.Tensor:
    """(m, n) float64, or (n,) with aggregate=True (mean query gradient)."""
    if aggregate:
        Q = as_blocks(query)
        query = {b: q.mean(0, keepdim=True) for b, q in Q.items()}
        if not isinstance(train, Mapping):
            train = as_blocks(train)
    parts = block_scores(train, query, method=method, damping=damping,
                         damping_mode=damping_mode)
    S = sum(parts.values())
    return S[0] if aggregate else S


def self_influence(train: Grads, *, method, damping=0.1,
                   damping_mode="relative") -> torch.Tensor:
    """(n,) float64:  - sum_b g_ib^T P_b g_ib."""
    T = as_blocks(train)
    n = next(iter(T.values())).shape[0]
    s = torch.zeros(n, dtype=DT)
    for b, G in T.items():
        lam = block_damping(G, damping, damping_mode)
        P = PRECOND[method](G, lam)
        Gf = flat(G)
        s -= torch.einsum("nd,de,ne->n", Gf, P, Gf)
    return s


# ----------------------------------------------------------------------------
# LiSSA / Schulz helpers
# ----------------------------------------------------------------------------
def lissa_truncated(train: Grads, query: Grads, *, scale, terms, damping=0.1,
                    damping_mode="relative") -> torch.Tensor:
    """Truncated Neumann series of LiSSA with a fixed scale s:
    h = (1/s) sum_{k<terms} (I - (F+lam I)/s)^k v   (per block)."""
    T, Q = as_blocks(train), as_blocks(query)
    _check_names(T, Q)
    S = 0
    for b, G in T.items():
        lam = block_damping(G, damping, damping_mode)
        D = flat(G).shape[1]
        M = torch.eye(D, dtype=DT) - (fisher(G) + lam * torch.eye(D, dtype=DT)) / scale
        V = flat(Q[b]).T  # (D, m)
        acc = torch.zeros_like(V)
        term = V.clone()
        for _ in range(terms):
            acc += term
            term = M @ term
        S = S - (acc / scale).T @ flat(G).T
    return S


def lissa_contraction(train: Grads, *, damping, damping_mode, scale=None):
    """Per block: (lam_b, lambda_max(F_b), s_b, rate = max |eig(I - (F+lam)/s)|)."""
    out = {}
    for b, G in as_blocks(train).items():
        lam = block_damping(G, damping, damping_mode)
        ev = torch.linalg.eigvalsh(fisher(G))
        lmax = float(ev.max())
        s = 1.1 * (lmax + lam) if scale is None else float(scale)
        eig = 1 - (ev + lam) / s
        out[b] = (lam, lmax, s, float(eig.abs().max()))
    return out


def schulz(A: torch.Tensor, x0_scale: float, iterations: int):
    """Plain Newton-Schulz X_{k+1} = X_k (2I - A X_k), X_0 = x0 I (float64).
    Returns (X, list of relative residuals ||I - A X||_F / sqrt(cols))."""
    A = A.to(DT)
    c = A.shape[0]
    I = torch.eye(c, dtype=DT)
    X = x0_scale * I
    res = []
    for _ in range(iterations):
        X = X @ (2 * I - A @ X)
        res.append(float(torch.linalg.matrix_norm(I - A @ X) / c ** 0.5))
    return X, res


def rel_err(S: torch.Tensor, S_ref: torch.Tensor) -> float:
    """Normwise relative error ||S - S_ref||_F / ||S_ref||_F (in float64)."""
    S = S.detach().to("cpu", DT)
    S_ref = S_ref.detach().to("cpu", DT)
    assert S.shape == S_ref.shape, (S.shape, S_ref.shape)
    return float(torch.linalg.norm(S - S_ref) / torch.linalg.norm(S_ref))
