"""The DataInf reference recipe as slow Python loops: the oracle for tests, the bench baseline.

Written from the formulas of ``IFEngine`` / ``IFEngineGeneration`` in the DataInf
research code (Kwon et al., ICLR 2024, ``src/influence.py``), with the same loop
structure (samples x parameters x queries, one small torch op at a time), the same
dtypes (float32 accumulators) and the same results, except for one deliberate fix:

* ``'accurate'`` solves ``(F + lambda I) h = v`` with ``torch.linalg.solve`` in
  float64 (``F = (1/n) sum_i g_i g_i^T``) and keeps ``h`` (and so its scores) in
  float64, where the original used a general ``torch.linalg.eig`` and ``V.T`` in
  place of ``V^{-1}``, then rounded to float32.

Reproduced as the original has them (quirks included):

* ``lambda = mean_i mean(g_i**2) / lambda_const_param`` per parameter.
* ``'LiSSA'``: 10 iterations of ``h <- v + h - ((1/n) sum_i <g_i, h> g_i - lambda h)``,
  i.e. the damping enters with the wrong sign and there is no scaling.
* Both ``compute_IF`` negate (``-<h, g_i>``), as the original does since its commit
  c685ca29 (January 2024); ``LoopIFEngineGeneration(sign="2023")`` drops the minus of
  ``IFEngineGeneration`` as the code did before it.

Inputs: nested dicts ``{sample index 0..n-1: {param name: tensor}}``.
"""
from __future__ import annotations

from collections import defaultdict
from time import time

import numpy as np
import torch


def _lambda_const(tr_grad_dict, weight_name, lambda_const_param):
    S = torch.zeros(len(tr_grad_dict))
    for tr_id in tr_grad_dict:
        S[tr_id] = torch.mean(tr_grad_dict[tr_id][weight_name] ** 2)
    return torch.mean(S) / lambda_const_param


def _hvp_proposed(tr_grad_dict, v, lam):
    n = len(tr_grad_dict)
    hvp = torch.zeros(v.shape)
    for tr_id in tr_grad_dict:
        g = tr_grad_dict[tr_id]
        c = torch.sum(v * g) / (lam + torch.sum(g**2))
        hvp += (v - c * g) / (n * lam)
    return hvp


def _hvp_accurate(tr_grads, v, lam):
    """Exact ``(F + lam I)^{-1} v`` in float64 (``tr_grads``: list of tensors of v's shape)."""
    n = len(tr_grads)
    D = v.numel()
    F = torch.zeros(D, D, dtype=torch.float64)
    for g in tr_grads:
        g64 = g.reshape(-1).double()
        F += torch.outer(g64, g64)
    F /= n
    F += float(lam) * torch.eye(D, dtype=torch.float64)
    h = torch.linalg.solve(F, v.reshape(-1).double())
    return h.reshape(v.shape)  # kept float64: the scores <h, g_i> are then float64 too


def _hvp_lissa(tr_grad_dict, v, lam, n_iteration=10, alpha_const=1.0):
    n = len(tr_grad_dict)
    running = v
    for _ in range(n_iteration):
        tmp = torch.zeros(v.shape)
        for tr_id in tr_grad_dict:
            g = tr_grad_dict[tr_id]
            tmp += (torch.sum(g * running) * g - lam * running) / n
        running = v + running - alpha_const * tmp
    return running


class LoopIFEngine:
    """Loop version of DataInf's ``IFEngine`` (aggregated validation gradient)."""

    def __init__(self):
        self.time_dict = defaultdict(list)
        self.hvp_dict = defaultdict(list)
        self.IF_dict = defaultdict(list)

    def preprocess_gradients(self, tr_grad_dict, val_grad_dict, noise_index=None):
        self.tr_grad_dict = tr_grad_dict
        self.val_grad_dict = val_grad_dict
        self.noise_index = noise_index
        self.n_train = len(tr_grad_dict)
        self.n_val = len(val_grad_dict)
        self.val_grad_avg_dict = {}
        for w in val_grad_dict[0]:
            acc = torch.zeros(val_grad_dict[0][w].shape)
            for val_id in val_grad_dict:
                acc += val_grad_dict[val_id][w] / self.n_val
            self.val_grad_avg_dict[w] = acc

    def _per_weight(self, key, fn):
        start = time()
        out = {}
        for w, v in self.val_grad_avg_dict.items():
            tr_w = {i: self.tr_grad_dict[i][w] for i in self.tr_grad_dict}
            out[w] = fn(tr_w, v, w)
        self.hvp_dict[key] = out
        self.time_dict[key] = time() - start

    def compute_hvps(self, lambda_const_param=10, compute_accurate=True):
        p = lambda_const_param
        start = time()
        self.hvp_dict["identity"] = self.val_grad_avg_dict.copy()
        self.time_dict["identity"] = time() - start
        self._per_weight(
            "proposed",
            lambda tr, v, w: _hvp_proposed(tr, v, _lambda_const(self.tr_grad_dict, w, p)),
        )
        self._per_weight(
            "LiSSA",
            lambda tr, v, w: _hvp_lissa(tr, v, _lambda_const(self.tr_grad_dict, w, p)),
        )
        if compute_accurate:
            self._per_weight(
                "accurate",
                lambda tr, v, w: _hvp_accurate(list(tr.values()), v, _lambda_const(self.tr_grad_dict, w, p)),
            )

    def compute_IF(self):
        for method, hvps in self.hvp_dict.items():
            vals = []
            for tr_id in self.tr_grad_dict:
                s = 0
                for w in self.val_grad_avg_dict:
                    s += torch.sum(hvps[w] * self.tr_grad_dict[tr_id][w])
                vals.append(-float(s))
            self.IF_dict[method] = np.asarray(vals, dtype=float)


class LoopIFEngineGeneration:
    """Loop version of DataInf's ``IFEngineGeneration`` (one score per query)."""

    def __init__(self, sign="current"):
        self.sign = sign
        self.time_dict = defaultdict(list)
        self.hvp_dict = defaultdict(list)
        self.IF_dict = defaultdict(list)

    def preprocess_gradients(self, tr_grad_dict, val_grad_dict):
        self.tr_grad_dict = tr_grad_dict
        self.val_grad_dict = val_grad_dict
        self.n_train = len(tr_grad_dict)
        self.n_val = len(val_grad_dict)

    def compute_hvps(self, lambda_const_param=10):
        start = time()
        self.hvp_dict["identity"] = self.val_grad_dict.copy()
        self.time_dict["identity"] = time() - start
        start = time()
        out = defaultdict(dict)
        for val_id in self.val_grad_dict:
            for w, v in self.val_grad_dict[val_id].items():
                lam = _lambda_const(self.tr_grad_dict, w, lambda_const_param)
                tr_w = {i: self.tr_grad_dict[i][w] for i in self.tr_grad_dict}
                out[val_id][w] = _hvp_proposed(tr_w, v, lam)
        self.hvp_dict["proposed"] = out
        self.time_dict["proposed"] = time() - start

    def compute_IF(self):
        import pandas as pd

        for method, hvps in self.hvp_dict.items():
            table = defaultdict(dict)
            for tr_id in self.tr_grad_dict:
                for val_id in self.val_grad_dict:
                    s = 0
                    for w in self.val_grad_dict[0]:
                        s += torch.sum(hvps[val_id][w] * self.tr_grad_dict[tr_id][w])
                    table[tr_id][val_id] = -float(s) if self.sign == "current" else float(s)
            self.IF_dict[method] = pd.DataFrame(table, dtype=float)
