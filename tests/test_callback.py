"""The Trainer callback (pyinf.callback.GradientStoreCallback) on a tiny Llama + LoRA Trainer run.

Reference: `per_sample_grads` of dataset sample i alone, at the parameters the
callback says it was captured at (a snapshot of the model at the start of each
optimizer step), so a match also checks the dataset order of the store.
"""
from __future__ import annotations

import copy
import os
import pathlib
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tiny_models as tm  # noqa: E402

import pyinf  # noqa: E402
from pyinf.callback import GradientStoreCallback  # noqa: E402
from pyinf.capture import per_sample_grads  # noqa: E402

# peft reads transformers' deprecated `is_gradient_checkpointing`
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

N = 10
RTOL = 1e-5


def _data(n: int = N, seed: int = 1) -> list[dict]:
    b = tm.make_batch("llama", B=n, T=9, seed=seed)
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


class _Snapshots(TrainerCallback):
    """The model's state at the start of every optimizer step, by `state.global_step`."""

    def __init__(self):
        self.states = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _model(kind: str = "llama", dropout: float = 0.1, seed: int = 0):
    """The tiny model with every dropout probability (LoRA's, the base model's) set to `dropout`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (tm.tiny_llama_lora if kind == "llama" else tm.tiny_roberta_lora)(seed, lora_dropout=dropout)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    cfg = model.get_base_model().config
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):  # roberta's (Llama's attention has none)
        if hasattr(cfg, k):
            setattr(cfg, k, dropout)
    return model


def _train(cb, tmp_path, data, *, model=None, epochs=2, ga=1, bs=4, drop_last=False, seed=0, extra=(), **args):
    model = model if model is not None else _model()  # dropout 0.1: the Trainer trains with dropout on
    snaps = _Snapshots()
    args = TrainingArguments(
        str(tmp_path / "trainer"), per_device_train_batch_size=bs, num_train_epochs=epochs,
        gradient_accumulation_steps=ga, learning_rate=2e-2, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_drop_last=drop_last, seed=seed, **args,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[snaps, *extra, cb]).train()
    return model, snaps.states


def _stored(store) -> dict[str, torch.Tensor]:
    parts: dict[str, list] = {}
    for _, chunk in store.chunks():
        for k, v in chunk.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _reference(model, state, example) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    ref.load_state_dict(state)
    return {k: v[0] for k, v in per_sample_grads(ref, {k: v[None] for k, v in example.items()}).items()}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return float((a - b).norm()) <= rtol * float(b.norm())


@pytest.mark.parametrize("ga,store", [(1, "cpu"), (2, "cpu"), (2, "disk")])
def test_step_gradients_equal_a_capture_at_each_steps_parameters(tmp_path, ga, store):
    data = _data()
    spec = f"disk:{tmp_path / 'grads'}" if store == "disk" else store
    cb = GradientStoreCallback(store=spec, progress=False)
    model, states = _train(cb, tmp_path, data, ga=ga)
    G = _stored(cb.store)
    assert cb.store.n == N
    assert not list(tmp_path.glob(".pyinf-scratch-*"))  # the disk scratch is gone
    steps_per_epoch = -(-N // (4 * ga))
    # the last epoch's steps, each sample at the step that trained on it; a step's micro-batches share it
    assert set(cb.steps.tolist()) == set(range(steps_per_epoch, 2 * steps_per_epoch))
    assert sorted(torch.bincount(cb.steps).tolist())[-1] == min(4 * ga, N)
    for i, ex in enumerate(data):
        ref = _reference(model, states[int(cb.steps[i])], ex)
        for name, g in ref.items():
            assert _close(G[name][i], g), (i, name)
    # the gradients at the end of training differ: the test sees the parameters
    end = _reference(model, model.state_dict(), data[0])
    assert not any(_close(G[name][0], g, 1e-3) for name, g in end.items())


@pytest.mark.parametrize("kind,ga", [("llama", 1), ("llama", 2), ("roberta", 2)])
def test_train_gradients_without_dropout_equal_a_capture_at_each_steps_parameters(tmp_path, kind, ga):
    data = _data() if kind == "llama" else [{k: v[i] for k, v in tm.make_batch("roberta", B=N, T=9, seed=1).items()}
                                              for i in range(N)]
    cb = GradientStoreCallback(store="cpu", at="train", progress=False)
    model, states = _train(cb, tmp_path, data, model=_model(kind, dropout=0.0), ga=ga)
    G = _stored(cb.store)
    assert len(set(cb.steps.tolist())) > 1
    for i, ex in enumerate(data):
        ref = _reference(model, states[int(cb.steps[i])], ex)
        for name, g in ref.items():
            assert _close(G[name][i], g), (i, name)


class _Grads(TrainerCallback):
    """The LoRA parameters' .grad before each optimizer step, by `state.global_step`."""

    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads[state.global_step] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_train_gradients_with_dropout_are_the_terms_of_the_trainers_update(tmp_path):
    from pyinf.losses import causal_lm_targets

    data = _data()
    cb, grads = GradientStoreCallback(store="cpu", at="train", progress=False), _Grads()
    _train(cb, tmp_path, data, extra=[grads], max_grad_norm=0.0)  # LoRA dropout 0.1, no clipping
    G = _stored(cb.store)
    tokens = torch.stack([causal_lm_targets(ex["labels"][None], ex["attention_mask"][None]).sum() for ex in data])
    for step, got in grads.grads.items():
        rows = (cb.steps == step).nonzero().flatten()
        if not len(rows):
            continue  # a step of the first epoch
        w = (tokens[rows] / tokens[rows].sum()).view(-1, 1, 1)  # the Trainer's token mean over the step
        for name, g in G.items():
            update = (w * g[rows]).sum(0)
            p = got[name + ".weight"]
            assert _close(update, p.t() if ".lora_B." in name else p), (step, name)
    # with dropout on, they are not the deterministic (eval-mode) gradients
    step = _stored(_train_store(tmp_path, data, "step"))
    assert not _close(G[next(iter(G))], step[next(iter(G))], 1e-2)


def _train_store(tmp_path, data, at):
    cb = GradientStoreCallback(store="cpu", at=at, progress=False)
    _train(cb, tmp_path, data, max_grad_norm=0.0)
    return cb.store


def test_train_refuses_a_loss_it_cannot_rescale(tmp_path):
    cb = GradientStoreCallback(store="cpu", at="train", progress=False)
    with pytest.warns(RuntimeWarning, match="no gradient store"):
        _train(cb, tmp_path, _data(), label_smoothing_factor=0.1)  # the Trainer pops the labels
    with pytest.raises(RuntimeError, match="needs the model's own loss"):
        cb.store


def test_end_gradients_and_scores_equal_an_attributor_fit_after_training(tmp_path):
    data = _data()
    cb = GradientStoreCallback(store="cpu", at="end", progress=False)
    model, _ = _train(cb, tmp_path, data, ga=2)
    assert cb.steps.unique().tolist() == [4]  # 2 epochs of 2 steps: all at the final parameters
    queries = tm.make_batch("llama", B=3, T=9, seed=7)
    got = cb.attributor(method="datainf").score(queries)
    ref_att = pyinf.Attributor(model, method="datainf", batch_size=3, progress=False).fit(data)
    assert got.shape == (3, N)
    assert _close(got, ref_att.score(queries))
    assert _close(_stored(cb.store)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"],
                  _stored(ref_att.gradients.store)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"])


def test_scores_from_a_step_store_are_pyinf_influence_of_its_gradients(tmp_path):
    cb = GradientStoreCallback(store="cpu", progress=False)
    _train(cb, tmp_path, _data())
    queries = tm.make_batch("llama", B=3, T=9, seed=7)
    att = cb.attributor(method="hyperinf", damping=0.05)
    want = pyinf.influence(_stored(cb.store), att.query_grads(queries), method="hyperinf", damping=0.05)
    assert _close(att.score(queries), want)
    top = att.score(queries, top_k=2)
    assert top.helpful_indices.shape == (3, 2)
    # one store, many methods: no capture of the training data; cb.gradients is what capture_gradients returns
    assert cb.attributor(method="tracin").score(queries).shape == (3, N)
    assert isinstance(cb.gradients, pyinf.TrainGradients) and cb.gradients is att.gradients
    assert cb.gradients.n == N and cb.gradients.store is cb.store


def test_a_chosen_epoch_and_kfac_statistics(tmp_path):
    data = _data()
    cb = GradientStoreCallback(store="cpu", at="end", epoch=0, factors=True, progress=False)
    model, _ = _train(cb, tmp_path, data)
    queries = tm.make_batch("llama", B=3, T=9, seed=7)
    got = cb.attributor(method="kfac").score(queries)
    want = pyinf.Attributor(model, method="kfac", batch_size=4, progress=False).fit(data).score(queries)
    assert _close(got, want)
    with pytest.raises(ValueError, match="keep no training data"):  # ekfac's Λ* on drawn labels recaptures
        cb.attributor(method="ekfac", fisher="true")


def test_save_and_load_an_attributor_on_a_callback_store(tmp_path):
    cb = GradientStoreCallback(store="cpu", progress=False)
    model, _ = _train(cb, tmp_path, _data())
    queries = tm.make_batch("llama", B=3, T=9, seed=7)
    att = cb.attributor(method="datainf")
    att.save(tmp_path / "att.pt")
    again = pyinf.Attributor.load(tmp_path / "att.pt", model, progress=False)
    assert torch.equal(again.score(queries), att.score(queries))


def test_an_incomplete_epoch_builds_no_store_and_says_why(tmp_path):
    cb = GradientStoreCallback(store="cpu", progress=False)
    with pytest.warns(RuntimeWarning, match="no gradient store"):
        _train(cb, tmp_path, _data(), drop_last=True)  # 10 samples, batches of 4: 2 are never trained on
    with pytest.raises(RuntimeError, match="did not train on 2 of the 10"):
        cb.store


def test_bad_arguments_and_runs_are_refused(tmp_path):
    for kwargs, match in [({"store": "none"}, "keeps no gradients"), ({"at": "later"}, "at must be"),
                          ({"epoch": 1.0}, "epoch must be"), ({"chunk_size": 0}, "chunk_size"),
                          ({"nan_policy": "drop"}, "nan_policy"), ({"at": "train", "factors": True}, "no loss"),
                          ({"at": "train", "loss": lambda model, batch: None}, "no loss")]:
        with pytest.raises(ValueError, match=match):
            GradientStoreCallback(**kwargs)
    with pytest.raises(RuntimeError, match="run trainer.train"):
        GradientStoreCallback().store
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        _train(GradientStoreCallback(store=f"disk:{busy}"), tmp_path, _data())
    with pytest.raises(ValueError, match="the run trains 2 epochs"):
        _train(GradientStoreCallback(epoch=2), tmp_path, _data())
