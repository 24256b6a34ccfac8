"""Per-token scores of training sequences, from the captured factors, without per-token gradients.

    S = att.token_scores(query_data, train_data)   # (m, n, T): S.sum(-1) = att's (m, n) scores

The math. A linear block's per-sample gradient is a sum over the positions t
of the sequence of rank-one terms (`pyinf.capture`): for an `nn.Linear` with
input a_t (d_in) and output gradient e_t = dL/d(output_t) (d_out),
`g = Σ_t e_t ⊗ a_t`; for LoRA (`y = W x + s·B A x`, PEFT's layers):

    g_A  = Σ_t (s·Bᵀδ_t) ⊗ x_t          (r, d_in):  u_t = s·Bᵀδ_t, v_t = x_t
    g_Bᵀ = Σ_t (A x_t) ⊗ (s·δ_t)         (r, d_out): u_t = A x_t,   v_t = s·δ_t

(δ_t = dL/dy_t; PEFT's scaling s sits inside the captured output gradient of
lora_A/lora_B, so u and v are exactly the captured a and e). Any block is
`g = Σ_t u_t ⊗ v_t` with u_t (rows), v_t (cols). Every method scores a
training point i against a query j as `score[j, i] = −Σ_b ⟨h_jb, g_ib⟩` with
`h_jb` (rows × cols) the preconditioned query (`Method.precondition`). The
score is linear in g, so it splits over the positions:

    score[j, i] = Σ_t s_jit,    s_jit = −Σ_b u_itᵀ H_jb v_it

(a bias: v_t = e_t, u_t = 1; a "<module>+bias" block: v_t = [a_t; 1]). Each
token's share is one bilinear form in the two factors the capture already
has; the `(rows, cols)` per-token gradient is never formed. Cost per block and
batch: m·B·T·rows·cols multiply-adds, as two batched GEMMs (`bilinear`:
contract the longer side of H first, so the temporary is m·B·T·min(rows, cols),
sliced over queries to stay under `TEMP_BYTES`); memory: the (m, B, T) result.

What a token's share means. s_jit is the score of the gradient of the loss
with respect to the block AS USED AT POSITION t: give each position its own
copy of the weight (all equal), and s_jit is −⟨h_j, dL_i/d(copy t)⟩ (the
reference in tests/test_token_scores.py). This is the per-token
decomposition of kronfluence (`compute_per_token_scores`) and the one the
captured factors give. It is NOT the score of each token's loss term
ℓ_it (the cross-entropy of the token predicted at t): a weight used at
position t also changes the loss of every later token through attention, and
the loss at t depends on the weights at every earlier position. The two agree
exactly for a block whose output at position t reaches only the loss at t
(e.g. the LAST layer's q_proj of a causal LM: its query at t is read only by
position t's attention output; tested), and differ elsewhere (v_proj, any
earlier layer). The per-loss-term decomposition is a forward-mode derivative
(⟨h_j, ∇ℓ_it⟩ for all t from one JVP per query and batch), not built here.

Positions are the batch's columns as given (left padding included; a padded
position's share is 0 whenever its output gradient is, as for causal LMs; with
`mask_padding=True` positions with attention_mask 0 are left out). Scores are
computed in H's dtype (float32, or float64 for exact and hyperinf) from the
fp32 factors. Embedding blocks (nn.Embedding, LoRA on an embedding) and blocks
that do not read every position of the sequence (a classification head reading
one token) are refused: name the linear blocks with `blocks=[...]`.
"""
from __future__ import annotations

import torch

TEMP_BYTES = 256 << 20  # the (m, B, T, min(rows, cols)) temporary of `bilinear`, per slice of queries


def bilinear(u: torch.Tensor, H: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`u` (B, T, R), `H` (m, R, C), `v` (B, T, C) -> `(m, B, T)`: u_btᵀ H_j v_bt, in H's dtype.

    Two batched GEMMs; the side of H that is longer is contracted first (for
    LoRA A, C = d_in: (B·T, C) @ (C, m·R)), then the short side per token.
    """
    u, v = u.to(H.dtype), v.to(H.dtype)
    m, R, C = H.shape
    B, T = u.shape[:2]
    out = torch.empty(m, B, T, dtype=H.dtype, device=H.device)
    step = max(1, TEMP_BYTES // max(1, B * T * min(R, C) * H.element_size()))
    for lo in range(0, m, step):
        h = H[lo : lo + step]
        if R <= C:
            out[lo : lo + step] = torch.einsum("mbtr,btr->mbt", torch.einsum("btc,mrc->mbtr", v, h), u)
        else:
            out[lo : lo + step] = torch.einsum("mbtc,btc->mbt", torch.einsum("btr,mrc->mbtc", u, h), v)
    return out


def use_token_scores(kind: str, transpose: bool, a: torch.Tensor, e: torch.Tensor, H: torch.Tensor,
                     mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """One use of a block in the capture's hook (`pyinf.capture`): its per-token scores `(m, B, T)`.

    `kind`: the capture's use kind ("linear", "conv1d", "bias", ...), `transpose`: the block is the
    parameter's transpose (LoRA B); `a` (B, T, d_in) the input (with a last column of ones for a
    "+bias" block), `e` (B, T, d_out) the output gradient, `H` (m, rows, cols) the block's
    preconditioned queries, `mask` (B, T) or None: positions with 0 left out.
    """
    if kind in ("linear", "conv1d"):
        # the block is Σ_t u_t ⊗ v_t in its own layout, as the capture's outer products
        u, v = (e, a) if (kind == "linear") != transpose else (a, e)
        s = -bilinear(u, H, v)
    elif kind == "bias":
        s = -torch.einsum("btc,mc->mbt", e.to(H.dtype), H[:, 0, :])
    else:
        raise ValueError(
            f"block '{name}': per-token scores of embedding blocks are not implemented (pyinf.token_scores); "
            f"leave it out with blocks=[...]"
        )
    if mask is not None:
        s = s * (mask != 0).to(s.dtype)
    return s


def pad_positions(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-batch `(m, B, T_k)` scores -> `(m, n, max T_k)`, shorter batches padded with 0 on the right."""
    T = max(p.shape[2] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[2])) for p in parts], dim=1)
