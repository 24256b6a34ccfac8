"""pyinf.compat.datainf (IFEngine, IFEngineGeneration) vs the loop recipe of the original."""
from __future__ import annotations

import pathlib
import pickle
import sys

import numpy as np
import pytest
import torch

import pyinf
from pyinf.compat import IFEngine, IFEngineGeneration

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from datainf_loops import LoopIFEngine, LoopIFEngineGeneration  # noqa: E402

pd = pytest.importorskip("pandas")

SHAPES = {"lora_A": (8, 13), "lora_B": (3, 7), "bias": (5,)}
N, M = 23, 5
RTOL = 1e-4


def as64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.array(x, dtype=np.float64)


def relerr(a, b) -> float:
    """Normwise relative error ||a - b|| / ||b||."""
    a, b = as64(a), as64(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_grads(n, gen, scale=0.1, order=None):
    """``{i: {w: tensor}}`` with per-sample scales spread over a decade."""
    order = list(range(n)) if order is None else order
    scales = scale * torch.logspace(-0.5, 0.5, n)[torch.randperm(n, generator=gen)]
    return {
        i: {w: float(scales[i]) * torch.randn(*shape, generator=gen) for w, shape in SHAPES.items()} for i in order
    }


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    return make_grads(N, gen), make_grads(M, gen)


def stacked(grad_dict):
    ids = list(grad_dict)
    return {w: torch.stack([grad_dict[i][w].reshape(-1) for i in ids]) for w in SHAPES}


def run_classification(cls, tr, val, **kw):
    eng = cls()
    eng.preprocess_gradients(tr, val, noise_index=np.arange(3))
    eng.compute_hvps(lambda_const_param=10, **kw)
    eng.compute_IF()
    return eng


def run_generation(cls, tr, val, param=10, **kw):
    eng = cls(**kw)
    eng.preprocess_gradients(tr, val)
    eng.compute_hvps(lambda_const_param=param)
    eng.compute_IF()
    return eng


# -- IFEngine -------------------------------------------------------------------------------
def test_ifengine_matches_loops(data):
    tr, val = data
    ours = run_classification(IFEngine, tr, val)
    ref = run_classification(LoopIFEngine, tr, val)
    assert list(ours.hvp_dict) == ["identity", "proposed", "LiSSA", "accurate"]
    for key in ref.hvp_dict:
        assert set(ours.hvp_dict[key]) == set(SHAPES)
        for w, shape in SHAPES.items():
            h = ours.hvp_dict[key][w]
            assert isinstance(h, torch.Tensor) and tuple(h.shape) == shape, (key, w, h.shape)
            assert relerr(h, ref.hvp_dict[key][w]) < RTOL, (key, w)
        got = ours.IF_dict[key]
        assert isinstance(got, np.ndarray) and got.shape == (N,) and got.dtype == np.float64
        assert relerr(got, ref.IF_dict[key]) < RTOL, key
    assert set(ours.time_dict) == set(ref.hvp_dict)
    assert all(isinstance(t, float) and t >= 0 for t in ours.time_dict.values())
    for w in SHAPES:
        assert relerr(ours.val_grad_avg_dict[w], ref.val_grad_avg_dict[w]) < 1e-6


def test_ifengine_hvp_dtypes(data):
    tr, val = data
    ours = run_classification(IFEngine, tr, val)
    for key in ["identity", "proposed", "LiSSA"]:
        assert all(h.dtype == torch.float32 for h in ours.hvp_dict[key].values()), key
    assert all(h.dtype == torch.float64 for h in ours.hvp_dict["accurate"].values())


def test_accurate_ill_conditioned():
    """Nearly aligned gradients (cond(F + lambda I) ~ 1e3 on lora_A): still within RTOL of the float64 oracle."""
    gen = torch.Generator().manual_seed(3)
    direction = {w: torch.randn(*shape, generator=gen) for w, shape in SHAPES.items()}

    def aligned(n):
        return {
            i: {w: float(torch.randn((), generator=gen)) * d + 1e-2 * torch.randn(d.shape, generator=gen)
                for w, d in direction.items()}
            for i in range(n)
        }

    tr, val = aligned(N), aligned(M)
    ours = run_classification(IFEngine, tr, val)
    ref = run_classification(LoopIFEngine, tr, val)
    assert relerr(ours.IF_dict["accurate"], ref.IF_dict["accurate"]) < RTOL
    assert relerr(ours.IF_dict["proposed"], ref.IF_dict["proposed"]) < RTOL


def test_ifengine_without_accurate(data):
    tr, val = data
    ours = run_classification(IFEngine, tr, val, compute_accurate=False)
    assert set(ours.hvp_dict) == set(ours.IF_dict) == {"identity", "proposed", "LiSSA"}


def test_ifengine_equals_pyinf_influence(data):
    """IF_dict (scored from hvp_dict) equals pyinf.influence(aggregate=True) with damping = 1/param."""
    tr, val = data
    param = 10
    ours = run_classification(IFEngine, tr, val)
    G, V = stacked(tr), stacked(val)
    for key, method in [("identity", "tracin"), ("proposed", "datainf"), ("accurate", "exact")]:
        expected = pyinf.influence(G, V, method=method, damping=1 / param, aggregate=True)
        assert tuple(expected.shape) == (N,)
        assert relerr(ours.IF_dict[key], expected) < RTOL, key


def test_original_lissa_collapses_to_identity(data):
    """The original LiSSA rule (damping with the wrong sign, no scaling) gives ~11 v for small F."""
    tr, val = data
    tiny_tr = {i: {w: 1e-3 * g for w, g in d.items()} for i, d in tr.items()}
    ours = run_classification(IFEngine, tiny_tr, val, compute_accurate=False)
    for w in SHAPES:
        assert relerr(ours.hvp_dict["LiSSA"][w], 11 * ours.hvp_dict["identity"][w]) < 1e-3


def test_accurate_is_true_inverse(data):
    """'accurate' solves (F + lambda I) h = v: check the residual directly, in float64."""
    tr, val = data
    ours = run_classification(IFEngine, tr, val)
    G = stacked(tr)
    for w in SHAPES:
        g = G[w].double()
        lam = float((g * g).mean(dim=1).mean()) / 10
        F = g.T @ g / N + lam * torch.eye(g.shape[1], dtype=torch.float64)
        h = ours.hvp_dict["accurate"][w].reshape(-1).double()
        v = ours.val_grad_avg_dict[w].reshape(-1).double()
        assert float((F @ h - v).norm() / v.norm()) < 1e-5, w


def test_ifengine_save_result(data, tmp_path, monkeypatch):
    tr, val = data
    monkeypatch.chdir(tmp_path)
    eng = run_classification(IFEngine, tr, val)
    eng.save_result(noise_index=[1, 2], run_id=7)
    with open(tmp_path / "results_7.pkl", "rb") as f:
        res = pickle.load(f)
    assert set(res) == {"runtime", "noise_index", "influence"}
    assert res["noise_index"] == [1, 2]
    assert res["runtime"] == eng.time_dict
    for key, arr in eng.IF_dict.items():
        np.testing.assert_array_equal(res["influence"][key], arr)


# -- IFEngineGeneration ---------------------------------------------------------------------
def test_generation_matches_loops(data):
    tr, val = data
    ours = run_generation(IFEngineGeneration, tr, val)
    ref = run_generation(LoopIFEngineGeneration, tr, val)
    assert list(ours.hvp_dict) == ["identity", "proposed"]
    assert ours.hvp_dict["identity"] == val  # a shallow copy, as the original
    for j in val:
        for w, shape in SHAPES.items():
            h = ours.hvp_dict["proposed"][j][w]
            assert tuple(h.shape) == shape
            assert relerr(h, ref.hvp_dict["proposed"][j][w]) < RTOL, (j, w)
    for key in ["identity", "proposed"]:
        got, exp = ours.IF_dict[key], ref.IF_dict[key]
        assert isinstance(got, pd.DataFrame) and got.shape == (M, N)
        assert all(got.dtypes == np.float64)
        pd.testing.assert_index_equal(got.index, exp.index, exact=True)
        pd.testing.assert_index_equal(got.columns, exp.columns, exact=True)
        assert relerr(got.to_numpy(), exp.to_numpy()) < RTOL, key


def test_generation_key_order(data):
    """Rows/columns follow the dicts' order, like the original's DataFrame of dicts."""
    gen = torch.Generator().manual_seed(1)
    tr = make_grads(N, gen, order=list(torch.randperm(N, generator=gen).tolist()))
    val = make_grads(M, gen, order=[3, 0, 4, 1, 2])
    ours = run_generation(IFEngineGeneration, tr, val)
    ref = run_generation(LoopIFEngineGeneration, tr, val)
    for key in ["identity", "proposed"]:
        got, exp = ours.IF_dict[key], ref.IF_dict[key]
        assert list(got.index) == list(val) and list(got.columns) == list(tr)
        pd.testing.assert_index_equal(got.index, exp.index, exact=True)
        pd.testing.assert_index_equal(got.columns, exp.columns, exact=True)
        assert relerr(got.to_numpy(), exp.to_numpy()) < RTOL, key


def test_generation_equals_pyinf_influence(data):
    """Since DataInf commit c685ca29 (January 2024) IFEngineGeneration negates, as IFEngine does:
    its table is pyinf.influence (m, n), most helpful = most negative."""
    tr, val = data
    param = 7
    ours = run_generation(IFEngineGeneration, tr, val, param=param)
    G, V = stacked(tr), stacked(val)
    for key, method in [("identity", "tracin"), ("proposed", "datainf")]:
        expected = pyinf.influence(G, V, method=method, damping=1 / param, aggregate=False)
        assert tuple(expected.shape) == (M, N)
        assert relerr(ours.IF_dict[key].to_numpy(), expected) < RTOL, key


def test_generation_self_is_most_helpful():
    """The sign in a case with a known answer: a validation point equal to a training point
    finds that point most helpful (the smallest entry of its row) under the default sign,
    and most harmful under sign="2023" (the pre-2024 code, reversed rankings)."""
    gen = torch.Generator().manual_seed(2)
    tr = make_grads(N, gen)
    val = {j: {w: t.clone() for w, t in tr[i].items()} for j, i in enumerate([4, 11, 17])}
    for sign, pick in [("current", "idxmin"), ("2023", "idxmax")]:
        ours = run_generation(IFEngineGeneration, tr, val, sign=sign)
        ref = run_generation(LoopIFEngineGeneration, tr, val, sign=sign)
        for key in ["identity", "proposed"]:
            table = ours.IF_dict[key]
            assert list(getattr(table, pick)(axis=1)) == [4, 11, 17], (sign, key)
            assert relerr(table.to_numpy(), ref.IF_dict[key].to_numpy()) < RTOL, (sign, key)


def test_generation_bad_sign():
    with pytest.raises(ValueError, match="sign must be one of"):
        IFEngineGeneration(sign="+")


def test_generation_save_result(data, tmp_path, monkeypatch):
    tr, val = data
    monkeypatch.chdir(tmp_path)
    eng = run_generation(IFEngineGeneration, tr, val)
    eng.save_result(run_id=3)
    with open(tmp_path / "results_3.pkl", "rb") as f:
        res = pickle.load(f)
    assert set(res) == {"runtime", "influence"}
    for key, df in eng.IF_dict.items():
        pd.testing.assert_frame_equal(res["influence"][key], df)


def test_generation_without_pandas(data, monkeypatch):
    tr, val = data
    eng = IFEngineGeneration()
    eng.preprocess_gradients(tr, val)
    eng.compute_hvps()
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install pyinf\[compat\]"):
        eng.compute_IF()


# -- errors -----------------------------------------------------------------------------------
def test_zero_gradient_parameter_names_it(data):
    tr, val = data
    tr = {i: {**d, "lora_B": torch.zeros(SHAPES["lora_B"])} for i, d in tr.items()}
    eng = IFEngineGeneration()
    eng.preprocess_gradients(tr, val)
    with pytest.raises(ValueError, match="lora_B"):
        eng.compute_hvps()


@pytest.mark.parametrize("param", [0, -1.0])
def test_bad_lambda_const_param(data, param):
    tr, val = data
    eng = IFEngine()
    eng.preprocess_gradients(tr, val, noise_index=None)
    with pytest.raises(ValueError, match="lambda_const_param"):
        eng.compute_hvps(lambda_const_param=param)


def test_missing_parameter_names_it(data):
    tr, val = data
    tr = dict(tr)
    tr[4] = {w: g for w, g in tr[4].items() if w != "bias"}
    with pytest.raises(ValueError, match=r"tr_grad_dict\[4\].*bias"):
        IFEngine().preprocess_gradients(tr, val, noise_index=None)
