"""Faults: NaN/Inf training gradients (error and skip policies), out of memory (halve and retry),
disk shards that are corrupted, truncated, or half-written by a killed fit."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import pyinf
from pyinf import gradients as gradients_mod
from pyinf import store as store_mod
from pyinf.attributor import Attributor
from pyinf.gradients import TrainGradients
from pyinf.capture import GradientCapture
from pyinf.store import DiskStore

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tiny_models, test_attributor, test_store under --import-mode=importlib
from test_attributor import BATCH, Setup  # noqa: E402
from test_store import BLOCKS, CPU, CountingCapture, disk, full, make_batches, read_all  # noqa: E402

POISON = {(1, 2): 6, (2, 1): 9}  # (batch, position) -> sample index; batches of 4
SKIPPED = [6, 9]


@pytest.fixture(scope="module")
def setup():
    return Setup()


def _close(got, ref, tol=1e-5):
    err = (got - ref).abs().max() / ref.abs().max()
    assert err <= tol, f"normwise error {float(err):.3g}"


def _poison(monkeypatch, train, block_index=3):
    """The real capture, with NaN in the POISON samples of one block."""

    def make(model, blocks, loss):
        cap = GradientCapture(model, blocks=blocks, loss=loss)

        class Poisoned:
            def __init__(self):
                self.blocks, self.close = cap.blocks, cap.close

            def __call__(self, batch):
                g = cap(batch)
                for (b, i), _ in POISON.items():
                    ids = batch["input_ids"].cpu()
                    if ids.shape == train[b]["input_ids"].shape and torch.equal(ids, train[b]["input_ids"]):
                        g[cap.blocks[block_index].name][i, 1, 2] = float("inf") if b == 2 else float("nan")
                return g

        return Poisoned()

    monkeypatch.setattr(gradients_mod, "_make_capture", make)


def _store(kind, tmp_path):
    return f"disk:{tmp_path / 'g'}" if kind == "disk" else kind


# -- NaN / Inf ---------------------------------------------------------------
@pytest.mark.parametrize("store", ["cpu", "disk", "none"])
def test_nan_error_names_sample_and_block(setup, monkeypatch, tmp_path, store):
    train = setup.train(10, BATCH)
    _poison(monkeypatch, train)
    name = GradientCapture(setup.model).blocks[3].name
    att = Attributor(setup.model, method="datainf", store=_store(store, tmp_path), chunk_size=BATCH, progress=False)
    with pytest.raises(ValueError, match=f"block '{name}': train gradient of sample 6 contains NaN or Inf"):
        att.fit(train)


SKIP_CASES = [(m, "cpu") for m in ("datainf", "exact", "lissa", "hyperinf", "tracin")] + [
    (m, s) for m in ("datainf", "exact") for s in ("disk", "none")  # the stores share the skip logic
]


@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("method,store", SKIP_CASES)
def test_nan_skip_equals_a_run_without_those_samples(setup, monkeypatch, tmp_path, store, method):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    grads, qgrads = setup.grads(train), setup.grads(queries)  # captured before poisoning
    opts = {"iterations": 4, "scale": 1e3} if method == "lissa" else {}
    _poison(monkeypatch, train)
    att = Attributor(setup.model, method=method, store=_store(store, tmp_path), chunk_size=BATCH, progress=False,
                     nan_policy="skip", **opts).fit(train)
    assert att.skipped == SKIPPED and att.n == 10
    keep = [i for i in range(10) if i not in SKIPPED]
    kept = {k: v[keep] for k, v in grads.items()}
    ref = pyinf.influence(kept, qgrads, method=method, chunk_size=BATCH, **opts)
    S = att.score(queries)
    assert S.shape == (3, 10) and torch.isnan(S[:, SKIPPED]).all() and torch.isfinite(S[:, keep]).all()
    _close(S[:, keep], ref)
    if store != "none":
        self_inf = att.self_influence()
        assert torch.isnan(self_inf[SKIPPED]).all()
        _close(self_inf[keep], pyinf.self_influence(kept, method=method, chunk_size=BATCH, **opts))
    top = att.score(queries, top_k=3)
    idx = torch.tensor(keep)
    assert torch.equal(top.helpful_indices, idx[ref.topk(3, dim=1, largest=False).indices])
    assert not set(top.harmful_indices.flatten().tolist()) & set(SKIPPED)


def test_nan_skip_survives_save_load_and_disk_resume(setup, monkeypatch, tmp_path):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    _poison(monkeypatch, train)
    spec = f"disk:{tmp_path / 'g'}"
    att = Attributor(setup.model, store=spec, chunk_size=BATCH, progress=False, nan_policy="skip").fit(train)
    S = att.score(queries)
    att.save(tmp_path / "state.pt")
    loaded = Attributor.load(tmp_path / "state.pt", setup.model, progress=False)
    assert loaded.skipped == SKIPPED
    assert torch.allclose(loaded.score(queries), S, equal_nan=True)
    # A complete store resumes without capturing; under nan_policy="error" its skipped samples are refused.
    again = Attributor(setup.model, store=spec, chunk_size=BATCH, progress=False, nan_policy="skip").fit(train)
    assert again.skipped == SKIPPED and torch.allclose(again.score(queries), S, equal_nan=True)
    with pytest.raises(ValueError, match="sample 6 contains NaN or Inf"):
        Attributor(setup.model, store=spec, chunk_size=BATCH, progress=False).fit(train)


def test_nan_policy_validated(setup):
    with pytest.raises(ValueError, match="nan_policy"):
        Attributor(setup.model, nan_policy="ignore")
    with pytest.raises(ValueError, match="nan_policy='skip' is not available for method 'forward'"):
        Attributor(setup.model, method="forward", lr=1e-3, nan_policy="skip")


def test_nan_query_gradient_is_refused(setup, monkeypatch):
    train, queries = setup.train(10, BATCH), setup.train(3, 3, seed=1)
    att = Attributor(setup.model, chunk_size=BATCH, progress=False, nan_policy="skip").fit(train)
    _poison(monkeypatch, train)  # the skip policy is for training data: queries are always checked
    with pytest.raises(ValueError, match="query gradient of sample 5 contains NaN or Inf"):
        att.score(queries + [train[1]])  # the poisoned sample 2 of train[1] is query 3 + 2


# -- out of memory ---------------------------------------------------------
def _oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def _oom_warnings(record):
    return [w for w in record if "out of memory" in str(w.message)]


def test_oom_in_capture_halves_the_batch_and_warns_once(setup, monkeypatch):
    train, queries = setup.train(12, 4), setup.train(4, 4, seed=1)
    ref = Attributor(setup.model, chunk_size=4, progress=False).fit(train).score(queries)
    sizes = []

    def make(model, blocks, loss):
        cap = GradientCapture(model, blocks=blocks, loss=loss)

        class Flaky:  # out of memory above 2 samples per backward
            def __init__(self):
                self.blocks, self.close = cap.blocks, cap.close

            def __call__(self, batch):
                sizes.append(batch["input_ids"].shape[0])
                if sizes[-1] > 2:
                    raise _oom()
                return cap(batch)

        return Flaky()

    monkeypatch.setattr(gradients_mod, "_make_capture", make)
    att = Attributor(setup.model, chunk_size=4, progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        S = att.fit(train).score(queries)
    assert len(_oom_warnings(record)) == 1, [str(w.message) for w in record]
    assert "micro-batches of 2" in str(_oom_warnings(record)[0].message)
    assert sizes[:3] == [4, 2, 2] and max(sizes[3:]) == 2  # the size that worked is kept
    _close(S, ref)

    def always(model, blocks, loss):  # out of memory even for one sample: the error surfaces
        cap = make(model, blocks, loss)
        cap.__class__.__call__ = lambda self, batch: (_ for _ in ()).throw(_oom())
        return cap

    monkeypatch.setattr(gradients_mod, "_make_capture", always)
    with pytest.raises(torch.cuda.OutOfMemoryError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Attributor(setup.model, chunk_size=4, progress=False).fit(train)


@pytest.mark.parametrize("method", ["datainf", "exact"])
def test_oom_in_scoring_halves_the_chunk_and_warns_once(setup, method):
    train, queries = setup.train(12, 4), setup.train(4, 4, seed=1)
    att = Attributor(setup.model, method=method, chunk_size=4, progress=False).fit(train)
    ref, ref_self = att.score(queries), att.self_influence()
    backend = att.analysis.method.backend
    real_dots, real_score = backend.dots, backend.score
    calls = []

    def flaky(real):
        def f(*args):
            calls.append(args[0].shape[-2] if real is real_dots else args[1].shape[-2])  # samples of G
            if calls[-1] > 2:
                raise _oom()
            return real(*args)

        return f

    backend.dots, backend.score = flaky(real_dots), flaky(real_score)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        S = att.score(queries)
        self_inf = att.self_influence()
    assert len(_oom_warnings(record)) == 1 and "chunks of 2 samples" in str(_oom_warnings(record)[0].message)
    assert att.gradients.store.piece == 2
    _close(S, ref)
    _close(self_inf, ref_self)


# -- disk shards -------------------------------------------------------------
def test_truncated_shard_detected_and_recomputed(tmp_path):
    batches = make_batches(n=10, batch_size=2)
    disk(tmp_path).fill(CountingCapture(), batches)
    p = tmp_path / "shard-000001.bin"
    p.write_bytes(p.read_bytes()[:-7])
    store_mod.disk._VERIFIED.clear()  # as in a new process
    st = DiskStore.restore({"path": str(tmp_path)}, BLOCKS, CPU, torch.float32, progress=False, fingerprint="model-1")
    with pytest.raises(ValueError, match="truncated"):  # never read as data
        read_all(st)
    cap = CountingCapture()
    with pytest.warns(RuntimeWarning, match="truncated.*recomputing"):
        st = disk(tmp_path).fill(cap, batches)
    assert cap.seen == [0, 4, 6]  # batch 0: the check of the reused shard 0
    got, _ = read_all(st)
    assert all(torch.equal(got[k], v) for k, v in full(batches).items())


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    disk(tmp_path).fill(CountingCapture(), make_batches())
    (tmp_path / "manifest.json").write_text('{"format": "pyinf-grad')
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        disk(tmp_path).fill(CountingCapture(), make_batches())


def test_fit_killed_while_writing_a_shard_resumes_with_identical_scores(setup, tmp_path):
    """SIGKILL in the middle of a shard's write (half its bytes in the .tmp file): the next fit
    keeps the finished shards, removes the partial file, recomputes the rest; scores are identical."""
    spec = f"disk:{tmp_path / 'g'}"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(HERE)!r})
        import torch
        from pyinf import store as store_mod
        from pyinf.attributor import Attributor
        from test_attributor import Setup
        real, writes = store_mod.disk._write_atomic, []

        def dying(path, chunks):
            if path.name.startswith("shard-"):
                writes.append(path.name)
                if len(writes) == 3:  # the third shard: half written, then killed
                    data = b"".join(bytes(c) for c in chunks)
                    with open(path.with_name(path.name + ".tmp"), "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(path, chunks)

        store_mod.disk._write_atomic = dying
        setup = Setup()
        Attributor(setup.model, blocks=setup.blocks, store={spec!r}, chunk_size=4, progress=False).fit(setup.train(12, 2))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = tmp_path / "g"
    assert (root / "shard-000002.bin.tmp").exists() and not (root / "shard-000002.bin").exists()
    assert len(json.loads((root / "manifest.json").read_text())["shards"]) == 2
    train, queries = setup.train(12, 2), setup.train(3, 3, seed=1)
    calls = []
    real = TrainGradients._capture_batch
    resumed = Attributor(setup.model, blocks=setup.blocks, store=spec, chunk_size=4, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainGradients, "_capture_batch", lambda self, b: calls.append(1) or real(self, b))
        resumed.fit(train)
    assert len(calls) == 3  # 6 batches in shards of 2: shards 0 and 1 were finished (+ batch 0 to check them)
    assert not list(root.glob("*.tmp"))
    fresh = Attributor(setup.model, blocks=setup.blocks, store="cpu", chunk_size=4, progress=False).fit(train)
    assert torch.equal(resumed.score(queries), fresh.score(queries))


def test_flipped_byte_and_truncated_shard_recomputed_with_identical_scores(setup, tmp_path):
    train, queries = setup.train(12, 2), setup.train(3, 3, seed=1)
    spec = f"disk:{tmp_path / 'g'}"
    ref = Attributor(setup.model, store=spec, chunk_size=4, progress=False).fit(train).score(queries)
    root = tmp_path / "g"
    flipped = bytearray((root / "shard-000000.bin").read_bytes())
    flipped[len(flipped) // 3] ^= 0x10
    (root / "shard-000000.bin").write_bytes(bytes(flipped))
    (root / "shard-000002.bin").write_bytes((root / "shard-000002.bin").read_bytes()[:100])
    store_mod.disk._VERIFIED.clear()  # as in a new process
    with pytest.warns(RuntimeWarning, match="recomputing") as record:
        att = Attributor(setup.model, store=spec, chunk_size=4, progress=False).fit(train)
    msgs = " ".join(str(w.message) for w in record)
    assert "shard-000000.bin is corrupt" in msgs and "shard-000002.bin is missing or truncated" in msgs
    assert torch.equal(att.score(queries), ref)


# -- NaN losses, NaN weights, queries without targets (issue 12, item 11) -----
def _weighted_examples(n=12, bad=None):
    """Per-example dicts with a loss weight `w` (NaN/Inf where `bad` says), and the loss that applies it."""
    from tiny_models import make_batch

    batch = make_batch("llama", B=n, T=8, seed=4, lengths=[8] * n)
    w = torch.ones(n)
    for i, v in (bad or {}).items():
        w[i] = v
    ex = [dict({k: v[i] for k, v in batch.items()}, w=w[i]) for i in range(n)]

    def loss(model, b):
        return pyinf.losses.default_loss(model, {k: v for k, v in b.items() if k != "w"}) * b["w"]

    return ex, loss


@pytest.mark.parametrize("store", ["cpu", "none"])
def test_nan_loss_skipped_or_named_by_global_index(setup, store):
    """A NaN/Inf loss stopped the capture even under nan_policy='skip', with a batch-local index."""
    ex, loss = _weighted_examples(bad={6: float("nan"), 9: float("inf")})
    queries = ex[:3]  # the loss reads `w`
    with pytest.raises(ValueError, match="the loss of training sample 6 is NaN or Inf"):
        Attributor(setup.model, loss=loss, store=store, batch_size=4, progress=False).fit(ex)
    att = Attributor(setup.model, loss=loss, store=store, batch_size=4, progress=False, nan_policy="skip").fit(ex)
    assert att.skipped == [6, 9]
    keep = [i for i in range(12) if i not in (6, 9)]
    ref = Attributor(setup.model, loss=loss, batch_size=4, progress=False).fit([ex[i] for i in keep]).score(queries)
    S = att.score(queries)
    assert torch.isnan(S[:, [6, 9]]).all()
    _close(S[:, keep], ref)  # the same kept gradients, in other batches and chunks: float rounding only


def test_nan_weights_are_named_as_such(setup):
    from tiny_models import tiny_llama_lora

    model = tiny_llama_lora(seed=0)
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        p[0, 0] = float("nan")
    for policy in ("error", "skip"):  # skip would leave out every sample
        with pytest.raises(ValueError, match=f"parameter '{name}' contains NaN or Inf.*load finite weights"):
            Attributor(model, progress=False, nan_policy=policy).fit(setup.train(4, 4))


def test_query_without_targets_warns_and_nan_query_loss_is_named(setup):
    train, queries = setup.train(10, BATCH), setup.train(4, 4, seed=1)
    att = Attributor(setup.model, chunk_size=BATCH, progress=False).fit(train)
    blank = dict(queries[0], labels=queries[0]["labels"].clone())
    blank["labels"][2] = -100
    with pytest.warns(RuntimeWarning, match=r"query samples \[2\] have an all-zero gradient .*every label -100"):
        S = att.score([blank])
    assert torch.equal(S[2], torch.zeros(10))
    ex, loss = _weighted_examples(n=6, bad={5: float("nan")})
    att = Attributor(setup.model, loss=loss, batch_size=4, progress=False).fit(ex[:4])
    with pytest.raises(ValueError, match="the loss of query sample 5 is NaN or Inf"):
        att.score(ex)
