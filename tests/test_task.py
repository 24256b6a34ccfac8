"""`pyinf.Task`: the training loss and the query measurement are two functions (issue 15, item 1)."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import pyinf
from pyinf import Attributor, Task
from pyinf.losses import classification_margin, completion_log_prob, default_loss, selected_tokens_loss

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # tiny_models, under --import-mode=importlib
from tiny_models import lora_modules, make_batch, roberta_head_block, single_sample_grads  # noqa: E402
from tiny_models import tiny_llama_lora, tiny_roberta_lora  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama_lora(seed=0)
    train = [make_batch("llama", B=4, T=8, seed=i) for i in range(3)]
    queries = make_batch("llama", B=3, T=8, seed=50)
    return model, train, queries


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _logits(model, batch):
    model.eval()  # no dropout, as the measurements see it
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()


# -- the ready-made measurements, against their formulas ---------------------------------
def test_completion_log_prob_is_the_sum_of_target_log_probs(llama):
    model, _, batch = llama
    logp = _logits(model, batch).log_softmax(-1)
    tgt, real = batch["labels"][:, 1:], batch["attention_mask"].bool()
    valid = (tgt != -100) & real[:, :-1] & real[:, 1:]
    picked = logp[:, :-1].gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    want = torch.where(valid, picked, torch.zeros(())).sum(1)
    with torch.no_grad():
        got = completion_log_prob(model.eval(), batch)
        loss = default_loss(model, batch)
    assert _rel(got, want) < 1e-5
    torch.testing.assert_close(got.double(), -loss.double() * valid.sum(1), rtol=1e-5, atol=1e-6)  # mean -> sum


def test_classification_margin_and_log_prob_of_a_classifier():
    model = tiny_roberta_lora(seed=0).eval()
    batch = make_batch("roberta", B=5, T=6, seed=3)
    z, y = _logits(model, batch), batch["labels"]
    others = z.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    with torch.no_grad():
        assert _rel(classification_margin(model, batch), z.gather(1, y[:, None])[:, 0] - others) < 1e-5
        assert _rel(completion_log_prob(model, batch), -F.cross_entropy(z, y, reduction="none")) < 1e-5
    with pytest.raises(ValueError, match="classification_margin"):
        classification_margin(tiny_llama_lora(seed=0), make_batch("llama", B=2, T=6))


def test_selected_tokens_loss(llama):
    model, _, batch = llama
    measure = selected_tokens_loss("keep")
    with torch.no_grad():
        everything = measure(model.eval(), {**batch, "keep": torch.ones_like(batch["labels"])})
        torch.testing.assert_close(everything, default_loss(model, batch))
        keep = torch.zeros_like(batch["labels"])
        keep[:, -3:] = 1  # the last three label positions (targets predicted by positions T-4 .. T-2)
        got = measure(model, {**batch, "keep": keep})
    logp = _logits(model, batch).log_softmax(-1)
    tgt, real = batch["labels"][:, 1:], batch["attention_mask"].bool()
    valid = (tgt != -100) & real[:, :-1] & real[:, 1:] & (keep[:, 1:] != 0)
    nll = -logp[:, :-1].gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    want = torch.where(valid, nll, torch.zeros(())).sum(1) / valid.sum(1).clamp(min=1)
    assert _rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="'keep'"):
        measure(model, batch)


# -- query gradients come from the measurement ---------------------------------------------
@pytest.mark.parametrize("measurement", [completion_log_prob, "custom"])
def test_query_gradient_is_autograd_of_the_measurement(llama, measurement):
    """A custom measurement's query gradient equals torch.autograd of that measurement, sample by sample;
    the training gradients stay those of the training loss."""
    model, train, queries = llama
    if measurement == "custom":
        def measurement(model, batch):  # the logit of the first real token's label at the last position
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            return logits[:, -1, :].float().gather(1, batch["input_ids"][:, :1])[:, 0] ** 2
    att = Attributor(model, method="tracin", task=Task(measurement=measurement), progress=False).fit(train)
    V = att.query_grads(queries)
    ref = single_sample_grads(model, queries, lora_modules(model), loss=measurement)
    assert set(V) == set(ref)
    for name in V:
        assert _rel(V[name], ref[name]) < 1e-5, name
    G = att.gradients.store
    train_ref = single_sample_grads(model, train[0], lora_modules(model))
    first = next(G.chunks())[1]
    for name in train_ref:
        assert _rel(first[name][:4], train_ref[name]) < 1e-5, name


def test_tracin_sign_and_scale_of_a_log_prob_measurement(llama):
    """∇ log p(completion) = −(number of targets) · ∇ mean loss: tracin's rows scale by −count."""
    model, train, queries = llama
    grads = pyinf.capture_gradients(model, train, progress=False)
    by_loss = Attributor(grads.model, method="tracin", gradients=grads).score(queries)
    measured = pyinf.capture_gradients(model, train, task=Task(measurement=completion_log_prob), progress=False)
    by_logp = Attributor(measured.model, method="tracin", gradients=measured).score(queries)
    real = queries["attention_mask"].bool()
    count = ((queries["labels"][:, 1:] != -100) & real[:, :-1] & real[:, 1:]).sum(1).double()
    assert _rel(by_logp, -count[:, None] * by_loss.double()) < 1e-5


def test_forward_steps_on_the_measurement(llama):
    """Forward-INF descends the measurement: at a small lr it agrees with tracin on the same task."""
    model, train, queries = llama
    task = Task(measurement=completion_log_prob)
    grads = pyinf.capture_gradients(model, train, task=task, progress=False)
    tracin = Attributor(grads.model, method="tracin", gradients=grads).score(queries)
    forward = Attributor(grads.model, method="forward", gradients=grads, lr=1e-4, queries_per_pass=1).score(queries)
    assert _rel(forward, tracin) < 0.05


def test_task_defaults_and_errors(llama):
    model, train, queries = llama
    default = Attributor(model, method="datainf", progress=False).fit(train).score(queries)
    same = Attributor(model, method="datainf", task=Task(), progress=False).fit(train).score(queries)
    old = Attributor(model, method="datainf", loss=default_loss, progress=False).fit(train).score(queries)
    assert torch.equal(default, same) and torch.equal(default, old)
    assert Task().query_loss is default_loss and Task(train_loss=len).query_loss is len
    with pytest.raises(ValueError, match="not both"):
        Attributor(model, task=Task(), loss=default_loss)
    with pytest.raises(TypeError, match="measurement"):
        Task(measurement=3)
    with pytest.raises(TypeError, match="pyinf.Task"):
        Attributor(model, task=default_loss)
    assert Attributor(model, task=Task(measurement=selected_tokens_loss("k"))).describe()["task"] == {
        "train_loss": "default_loss", "measurement": "selected_tokens_loss('k')"}


def test_classifier_margin_task_end_to_end():
    model = tiny_roberta_lora(seed=0)
    train = [make_batch("roberta", B=4, T=6, seed=i) for i in range(2)]
    queries = make_batch("roberta", B=3, T=6, seed=9)
    blocks = [roberta_head_block(model)]
    att = Attributor(model, method="datainf", blocks=blocks, task=Task(measurement=classification_margin),
                     progress=False).fit(train)
    ref = single_sample_grads(model, queries, {blocks[0]: (dict(model.named_modules())[blocks[0]], False)},
                              loss=classification_margin)
    V = att.query_grads(queries)
    assert _rel(V[blocks[0]], ref[blocks[0]]) < 1e-5
    assert att.score(queries).shape == (3, 8)
