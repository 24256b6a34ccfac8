"""Bad input must fail early with a ValueError that says what is wrong and,
where there is one, names the offending block."""
from __future__ import annotations

import math
import re

import pytest
import torch

import pyinf

METHODS = ("tracin", "datainf", "exact", "lissa", "hyperinf")

# distinctive block names, so "the name is in the message" means something
A, B = "layers.3.q_proj.lora_A", "layers.7.v_proj.lora_B"


def grads(n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = {A: torch.randn(n, 3, 7, generator=g), B: torch.randn(n, 11, generator=g)}
    query = {A: torch.randn(m, 3, 7, generator=g), B: torch.randn(m, 11, generator=g)}
    return train, query


def raises(pattern, *names):
    """pytest.raises(ValueError, match=pattern) that also checks each name
    appears literally in the message."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(ValueError, match=pattern or None)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            for name in names:
                assert name in msg, f"block {name!r} not named in error: {msg!r}"
            return out
    return _Ctx()


def influence(train, query, **kw):
    kw.setdefault("method", "datainf")
    return pyinf.influence(train, query, **kw)


# ----------------------------------------------------------------------------
# block structure
# ----------------------------------------------------------------------------
def test_mismatched_block_names():
    train, query = grads(5, 2)
    query2 = {A: query[A], "layers.9.k_proj.lora_A": query[B]}
    with raises("block"):
        influence(train, query2)


def test_query_missing_a_block():
    train, query = grads(5, 2)
    with raises("block"):
        influence(train, {A: query[A]})


def test_query_extra_block():
    train, query = grads(5, 2)
    with raises("block"):
        influence(train, dict(query, extra_block=torch.randn(2, 4)))


def test_mismatched_per_sample_shape_matrix():
    train, query = grads(5, 2)
    query[A] = torch.randn(2, 7, 3)  # same D, transposed shape
    with raises(re.escape(A), A):
        influence(train, query)


def test_mismatched_per_sample_shape_flat():
    train, query = grads(5, 2)
    query[B] = torch.randn(2, 12)
    with raises(re.escape(B), B):
        influence(train, query)


def test_mismatched_single_tensor_width():
    with pytest.raises(ValueError):
        influence(torch.randn(5, 8), torch.randn(2, 9))


def test_inconsistent_sample_count_across_blocks():
    train, query = grads(5, 2)
    train[B] = torch.randn(6, 11)
    with pytest.raises(ValueError):
        influence(train, query)
    with pytest.raises(ValueError):
        pyinf.self_influence(train, method="datainf")


def test_inconsistent_query_count_across_blocks():
    train, query = grads(5, 2)
    query[B] = torch.randn(3, 11)
    with pytest.raises(ValueError):
        influence(train, query)


def test_no_blocks():
    with pytest.raises(ValueError):
        influence({}, {})


# ----------------------------------------------------------------------------
# empty
# ----------------------------------------------------------------------------
def test_empty_train():
    train, query = grads(5, 2)
    train = {k: v[:0] for k, v in train.items()}
    with raises("empty"):
        influence(train, query)
    with raises("empty"):
        pyinf.self_influence(train, method="datainf")


def test_empty_query():
    train, query = grads(5, 2)
    query = {k: v[:0] for k, v in query.items()}
    with raises("empty"):
        influence(train, query)
    with raises("empty"):
        influence(train, query, aggregate=True)


def test_empty_single_tensor():
    with raises("empty"):
        influence(torch.randn(0, 8), torch.randn(2, 8))
    with raises("empty"):
        influence(torch.randn(4, 8), torch.randn(0, 8))


# ----------------------------------------------------------------------------
# non-finite values
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["train", "query"])
@pytest.mark.parametrize("block", [A, B])
def test_nonfinite(bad, where, block):
    train, query = grads(5, 2)
    target = train if where == "train" else query
    t = target[block].clone()
    t.view(-1)[3] = bad
    target[block] = t
    with raises("NaN|Inf", block):
        influence(train, query)


@pytest.mark.parametrize("method", ["exact", "tracin"])  # tracin makes no norms pass to catch it in
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_self_influence(bad, method):
    train, _ = grads(5, 2)
    train[B] = train[B].clone()
    train[B][2, 4] = bad
    with raises("sample 2 contains NaN or Inf", B):
        pyinf.self_influence(train, method=method)


def test_nonfinite_bf16():
    train, query = grads(5, 2)
    train = {k: v.bfloat16() for k, v in train.items()}
    query = {k: v.bfloat16() for k, v in query.items()}
    train[A][1, 2, 3] = math.nan
    with raises("NaN|Inf", A):
        influence(train, query)


# ----------------------------------------------------------------------------
# damping
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("damping", [0.0, -0.1, math.nan, -math.inf])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_bad_damping(damping, mode):
    train, query = grads(5, 2)
    with raises("damping"):
        influence(train, query, damping=damping, damping_mode=mode)
    with raises("damping"):
        pyinf.self_influence(train, method="exact", damping=damping, damping_mode=mode)


@pytest.mark.parametrize("mode", ["relativ", "RELATIVE_X", "", None, "abs"])
def test_bad_damping_mode(mode):
    train, query = grads(5, 2)
    with raises("damping_mode"):
        influence(train, query, damping_mode=mode)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "tracin"])
def test_all_zero_block_under_relative_damping(method):
    train, query = grads(5, 2)
    train[B] = torch.zeros(5, 11)
    kw = {"iterations": 10} if method == "lissa" else {}
    with raises("zero", B):
        influence(train, query, method=method, damping_mode="relative", **kw)
    with raises("zero", B):
        pyinf.self_influence(train, method=method, damping_mode="relative", **kw)


def test_all_zero_block_tracin():
    """tracin never uses lambda: it may reject the zero block (naming it) or
    score it (the block then contributes nothing)."""
    train, query = grads(5, 2)
    train[B] = torch.zeros(5, 11)
    try:
        S = influence(train, query, method="tracin", damping_mode="relative")
    except ValueError as e:
        assert B in str(e) and "zero" in str(e), str(e)
    else:
        S_a = influence({A: train[A]}, {A: query[A]}, method="tracin")
        assert torch.allclose(S, S_a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# method and options
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["foo", "DataInf2", "", "lissa "])
def test_unknown_method(method):
    train, query = grads(5, 2)
    with raises("unknown method"):
        influence(train, query, method=method)
    with raises("unknown method"):
        pyinf.self_influence(train, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option(method):
    train, query = grads(5, 2)
    with raises("unknown option"):
        influence(train, query, method=method, frobnicate=3)
    with raises("unknown option"):
        pyinf.self_influence(train, method=method, frobnicate=3)


@pytest.mark.parametrize("method,option", [("tracin", "iterations"), ("datainf", "iterations"),
                                           ("exact", "tol"), ("datainf", "scale")])
def test_option_of_another_method(method, option):
    """iterations/tol/scale belong to lissa/hyperinf, not to the direct methods."""
    train, query = grads(5, 2)
    with raises("unknown option"):
        influence(train, query, method=method, **{option: 3})


def test_hyperinf_flat_block_wider_than_8192():
    wide = "wide.flat_block"
    train = {A: torch.randn(3, 3, 7), wide: torch.randn(3, 8193)}
    query = {A: torch.randn(2, 3, 7), wide: torch.randn(2, 8193)}
    with raises("8192", wide):
        influence(train, query, method="hyperinf")
    with raises("8192", wide):
        pyinf.self_influence(train, method="hyperinf")


def test_hyperinf_single_tensor_wider_than_8192():
    with raises("8192"):
        influence(torch.randn(3, 8193), torch.randn(2, 8193), method="hyperinf")


# ----------------------------------------------------------------------------
# dtype / shape / device
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("where", ["train", "query"])
def test_bad_dtype(dtype, where):
    train, query = grads(5, 2)
    target = train if where == "train" else query
    target[B] = (target[B] > 0).to(dtype)
    with raises("dtype", B):
        influence(train, query)


def test_bad_dtype_single_tensor():
    with raises("dtype"):
        influence(torch.ones(4, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))


def test_one_dimensional_single_tensor():
    with raises("shape"):
        influence(torch.randn(8), torch.randn(8))
    with raises("shape"):
        pyinf.self_influence(torch.randn(8), method="datainf")


@pytest.mark.parametrize("bad_shape", [(5,), (5, 2, 3, 4)])
def test_bad_block_rank(bad_shape):
    train, query = grads(5, 2)
    train[B] = torch.randn(*bad_shape)
    query[B] = torch.randn(2, *bad_shape[1:])
    with raises(None, B):
        influence(train, query)


def test_four_d_single_tensor():
    with raises("shape"):
        influence(torch.randn(4, 2, 3, 4), torch.randn(2, 2, 3, 4))


def test_not_a_tensor():
    train, query = grads(5, 2)
    train[B] = train[B].tolist()
    with pytest.raises((ValueError, TypeError)):
        influence(train, query)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_and_query_on_different_devices():
    train, query = grads(5, 2)
    query = {k: v.cuda() for k, v in query.items()}
    with raises("device"):
        influence(train, query)
