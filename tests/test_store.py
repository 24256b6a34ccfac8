"""The gradient stores: chunks, the disk format, resume, checksums, the order check of store='none'."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pyinf import store as store_mod
from pyinf.attributor import Attributor
from pyinf.gradients import TrainGradients
from pyinf.blocks import Block
from pyinf.store import DiskStore, MemoryStore, RecomputeStore, make_store

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # test_attributor, under importlib mode

BLOCKS = [Block("a", 2, 3), Block("b", 1, 5)]
CPU = torch.device("cpu")


def make_batches(n=10, batch_size=4, seed=0):
    """Batches that carry their own 'gradients', so that the capture is a lookup."""
    gen = torch.Generator().manual_seed(seed)
    ga, gb = torch.randn(n, 2, 3, generator=gen), torch.randn(n, 5, generator=gen)
    return [
        {"ids": torch.arange(i, min(i + batch_size, n)), "ga": ga[i : i + batch_size], "gb": gb[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


class CountingCapture:
    def __init__(self):
        self.seen = []

    def __call__(self, batch):
        self.seen.append(int(batch["ids"][0]))
        return {"a": batch["ga"], "b": batch["gb"]}


def full(batches):
    return {"a": torch.cat([b["ga"] for b in batches]), "b": torch.cat([b["gb"] for b in batches]).unsqueeze(1)}


def read_all(store):
    parts = list(store.chunks())
    assert [s for s, _ in parts] == sorted(s for s, _ in parts)
    assert all(next(iter(c.values())).shape[0] <= store.chunk_size for _, c in parts)
    return {b.name: torch.cat([c[b.name] for _, c in parts]) for b in store.blocks}, len(parts)


def disk(path, dtype=torch.float32, chunk_size=4, fp="model-1"):
    return DiskStore(path, BLOCKS, CPU, dtype, fp, chunk_size=chunk_size, progress=False)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
def test_memory_store_slabs(chunk_size):
    batches = make_batches()
    st = MemoryStore(BLOCKS, CPU, torch.float32, "cpu", chunk_size, progress=False).fill(CountingCapture(), batches)
    got, k = read_all(st)
    assert st.n == 10 and k == st.num_chunks == -(-10 // chunk_size)
    for name, t in full(batches).items():
        assert torch.equal(got[name], t)


def test_bf16_storage_and_compute_dtype():
    batches = make_batches()
    st = make_store("cpu", blocks=BLOCKS, device=CPU, grad_dtype=torch.bfloat16, progress=False)
    st.fill(CountingCapture(), batches)
    got, _ = read_all(st)
    assert st.dtype == torch.float32 and got["a"].dtype == torch.bfloat16
    assert torch.equal(got["a"], full(batches)["a"].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_format(tmp_path, dtype):
    batches = make_batches(n=10, batch_size=2)
    st = disk(tmp_path, dtype).fill(CountingCapture(), batches)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["format"] == "pyinf-gradient-store" and man["version"] == 2 and man["complete"]
    assert man["n"] == 10 and man["batches_per_shard"] == 2 and man["samples_per_shard"] == 4
    assert man["grad_dtype"] == str(dtype).removeprefix("torch.")
    assert [e["count"] for e in man["shards"]] == [4, 4, 2]
    # The documented layout: blocks one after the other, C order, little-endian.
    e = man["shards"][1]
    raw = np.fromfile(tmp_path / e["file"], dtype=np.uint16 if dtype == torch.bfloat16 else "<f4")
    a = torch.from_numpy(raw[: 4 * 6].copy()).view(dtype).reshape(4, 2, 3)
    assert torch.equal(a, full(batches)["a"][4:8].to(dtype))
    got, k = read_all(st)
    assert k == 3 and torch.equal(got["b"], full(batches)["b"].to(dtype))
    assert not list(tmp_path.glob("*.tmp"))


def test_disk_resume_after_interruption(tmp_path):
    batches = make_batches(n=10, batch_size=2)  # shards of 2 batches: [0, 1] [2, 3] [4]

    def interrupted():
        for i, b in enumerate(batches):
            if i == 3:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt):
        disk(tmp_path).fill(CountingCapture(), interrupted())
    assert len(json.loads((tmp_path / "manifest.json").read_text())["shards"]) == 1
    cap = CountingCapture()
    st = disk(tmp_path).fill(cap, batches)
    # shard 0 (samples 0-3) is not recomputed; its first batch is captured again to check it
    assert cap.seen == [0, 4, 6, 8]
    got, _ = read_all(st)
    assert all(torch.equal(got[k], v) for k, v in full(batches).items())
    cap = CountingCapture()
    disk(tmp_path).fill(cap, batches)  # a complete store: nothing to capture but the check
    assert cap.seen == [0]


def test_disk_corrupted_shard_detected_and_recomputed(tmp_path):
    batches = make_batches(n=10, batch_size=2)
    disk(tmp_path).fill(CountingCapture(), batches)
    p = tmp_path / "shard-000001.bin"
    data = bytearray(p.read_bytes())
    data[5] ^= 0xFF
    p.write_bytes(bytes(data))
    store_mod.disk._VERIFIED.clear()  # as in a new process
    st = DiskStore.restore({"path": str(tmp_path)}, BLOCKS, CPU, torch.float32, progress=False, fingerprint="model-1")
    with pytest.raises(ValueError, match="corrupt"):
        read_all(st)
    cap = CountingCapture()
    with pytest.warns(RuntimeWarning, match="recomputing"):
        st = disk(tmp_path).fill(cap, batches)
    assert cap.seen == [0, 4, 6]  # batch 0: the check of the reused shard 0
    got, _ = read_all(st)
    assert all(torch.equal(got[k], v) for k, v in full(batches).items())


def test_disk_refuses_other_model_or_data(tmp_path):
    batches = make_batches(n=10, batch_size=2)
    disk(tmp_path).fill(CountingCapture(), batches)
    with pytest.raises(ValueError, match="different model"):
        disk(tmp_path, fp="model-2").fill(CountingCapture(), batches)
    with pytest.raises(ValueError, match="different model"):
        disk(tmp_path, dtype=torch.bfloat16).fill(CountingCapture(), batches)
    with pytest.raises(ValueError, match="training data"):
        disk(tmp_path).fill(CountingCapture(), make_batches(n=10, batch_size=2, seed=1))
    with pytest.raises(ValueError, match="fewer batches"):
        disk(tmp_path).fill(CountingCapture(), batches[:2])


def test_disk_resume_after_sigkill(tmp_path):
    """A fill killed by SIGKILL (no cleanup at all) resumes from its finished shards."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import CountingCapture, disk, make_batches
        def killed():
            for i, b in enumerate(make_batches(n=10, batch_size=2)):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield b
        disk({str(tmp_path)!r}).fill(CountingCapture(), killed())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    cap = CountingCapture()
    batches = make_batches(n=10, batch_size=2)
    st = disk(tmp_path).fill(cap, batches)
    assert cap.seen == [0, 4, 6, 8]  # batch 0: the check of the reused shard 0
    got, _ = read_all(st)
    assert all(torch.equal(got[k], v) for k, v in full(batches).items())


def test_recompute_store_order_check():
    batches = make_batches()
    cap = CountingCapture()
    st = RecomputeStore(BLOCKS, CPU, torch.float32, progress=False).fill(cap, batches)
    assert cap.seen == [] and st.n == 10 and st.chunk_size == 4  # fill only hashes
    got, _ = read_all(st)
    assert all(torch.equal(got[k], v) for k, v in full(batches).items())
    batches.reverse()
    with pytest.raises(ValueError, match="changed order between passes"):
        read_all(st)
    batches.reverse()
    batches.pop()
    with pytest.raises(ValueError, match=r"fewer batches \(2\) than when it was fitted \(3\)"):
        read_all(st)


@pytest.mark.parametrize("kind", ["cpu", "none", "disk"])
def test_nan_names_sample_and_block(kind, tmp_path):
    batches = make_batches()
    batches[1]["gb"] = batches[1]["gb"].clone()
    batches[1]["gb"][3, 2] = float("inf")
    spec = f"disk:{tmp_path}" if kind == "disk" else kind
    st = make_store(spec, blocks=BLOCKS, device=CPU, grad_dtype=torch.float32, fingerprint="x", progress=False)
    with pytest.raises(ValueError, match="block 'b': train gradient of sample 7 contains NaN or Inf"):
        st.fill(CountingCapture(), batches)
        read_all(st)


def test_finite_check_is_one_host_sync_per_batch(monkeypatch):
    """The NaN/Inf check of a batch reads one flag back to the host, however many blocks (each read is a
    device sync on a GPU; per block it was 160 syncs a batch at the 13B shape)."""
    blocks = [Block(f"blk{j}", 2, 3) for j in range(40)]
    gen = torch.Generator().manual_seed(0)
    batches = [{f"blk{j}": torch.randn(4, 2, 3, generator=gen) for j in range(40)} for _ in range(3)]
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    st = make_store("cpu", blocks=blocks, device=CPU, grad_dtype=torch.float32, progress=False)
    st.fill(lambda b: dict(b), batches)
    monkeypatch.undo()
    assert len(reads) == len(batches)
    got, _ = read_all(st)
    assert all(torch.equal(got[b.name], torch.cat([x[b.name] for x in batches])) for b in blocks)


def test_attributor_disk_interrupted_fit_gives_identical_scores(monkeypatch, tmp_path):
    from test_attributor import Setup

    setup = Setup()
    train, queries = setup.train(12, 2), setup.train(3, 3, seed=1)

    def interrupted():
        for i, b in enumerate(train):
            if i == 4:
                raise RuntimeError("killed")
            yield b

    spec = f"disk:{tmp_path / 'g'}"
    with pytest.raises(RuntimeError, match="killed"):
        Attributor(setup.model, blocks=setup.blocks, store=spec, chunk_size=4, progress=False).fit(interrupted())
    calls = []
    real = TrainGradients._capture_batch
    monkeypatch.setattr(TrainGradients, "_capture_batch", lambda self, b: calls.append(1) or real(self, b))
    resumed = Attributor(setup.model, blocks=setup.blocks, store=spec, chunk_size=4, progress=False).fit(train)
    assert len(calls) == 3  # 6 batches, shards of 2: shards 0 and 1 were finished (+ batch 0 to check them)
    fresh = Attributor(setup.model, blocks=setup.blocks, store="cpu", chunk_size=4, progress=False).fit(train)
    assert torch.equal(resumed.score(queries), fresh.score(queries))
    # A different model (other adapter weights) is refused.
    with torch.no_grad():
        next(p for n, p in setup.model.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(ValueError, match="different model"):
        Attributor(setup.model, blocks=setup.blocks, store=spec, chunk_size=4, progress=False).fit(train)


# -- what a disk store may reuse (issue 12, item 9) ---------------------------
def test_disk_refuses_gradients_that_changed(tmp_path):
    """What the fingerprint cannot see (the loss: here a 3x capture) is caught by recomputing batch 0."""
    batches = make_batches(n=10, batch_size=2)
    disk(tmp_path).fill(CountingCapture(), batches)

    def tripled(batch):
        return {"a": 3 * batch["ga"], "b": 3 * batch["gb"]}

    with pytest.raises(ValueError, match=r"gradients differ .*training samples 0\.\.1, recomputed.*loss function"):
        disk(tmp_path).fill(tripled, batches)
    # within the storage precision it is the same store: 1 + 2^-9 is below bf16's tolerance of 2^-6
    disk(tmp_path / "bf16", dtype=torch.bfloat16).fill(CountingCapture(), batches)
    near = lambda b: {"a": b["ga"] * (1 + 2**-9), "b": b["gb"] * (1 + 2**-9)}  # noqa: E731
    disk(tmp_path / "bf16", dtype=torch.bfloat16).fill(near, batches)


def _fresh_llama():
    from tiny_models import tiny_llama_lora

    return tiny_llama_lora(seed=0)


def _llama_train():
    from tiny_models import make_batch

    return [make_batch("llama", B=2, T=8, seed=i) for i in range(3)]


@pytest.mark.parametrize("change", ["loss x3", "lora scaling x4", "mask_padding"])
def test_attributor_refit_on_a_disk_store_refuses_other_gradients(tmp_path, change):
    """Refitting after the loss, the LoRA scaling or mask_padding changed reused the old gradients
    (a 3x loss gave 3x the scores instead of 9x); now it is an error."""
    from pyinf.losses import default_loss

    model, train, spec = _fresh_llama(), _llama_train(), f"disk:{tmp_path / 'g'}"
    Attributor(model, store=spec, chunk_size=4, progress=False).fit(train)
    kw = {}
    if change == "loss x3":
        kw["loss"] = lambda m, b: 3 * default_loss(m, b)
    elif change == "mask_padding":
        kw["mask_padding"] = True
    else:
        for m in model.modules():
            if isinstance(getattr(m, "scaling", None), dict):
                m.scaling["default"] *= 4
    match = "loss function" if change == "loss x3" else "fingerprint differs"
    with pytest.raises(ValueError, match=match):
        Attributor(model, store=spec, chunk_size=4, progress=False, **kw).fit(train)


def test_fingerprint_sees_every_value():
    """Every value of every parameter and buffer, LoRA scaling and the capture options count
    (it used to see only the first 4096 values of a base weight)."""
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4), torch.nn.BatchNorm1d(4))
    model.big = torch.nn.Parameter(torch.zeros(store_mod.base.FULL_HASH_NUMEL + 1))  # the checksum path
    blocks = [Block("1", 4, 128)]

    def fp(**options):
        return store_mod.fingerprint(model, blocks, torch.float32, options)

    base = fp()
    assert fp() == base and fp(mask_padding=True) != base
    for t, i in ((model[0].weight, 5000), (model.big, store_mod.base.FULL_HASH_NUMEL), (model[2].running_var, 3)):
        with torch.no_grad():
            old = t.view(-1)[i].clone()
            t.view(-1)[i] = torch.nextafter(old, old + 1)  # the smallest change there is
        assert fp() != base, (tuple(t.shape), i)
        with torch.no_grad():
            t.view(-1)[i] = old
        assert fp() == base
    model[0].scaling = {"default": 2.0}
    assert fp() != base


def test_disk_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    st = make_store("disk:~/grads", blocks=BLOCKS, device=CPU, grad_dtype=torch.float32, fingerprint="x", progress=False)
    st.fill(CountingCapture(), make_batches())
    assert (tmp_path / "grads" / "manifest.json").exists() and not Path("~").exists()


def test_disk_refuses_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not empty and is not a pyinf gradient store \(it holds \['notes.txt'\]\)"):
        disk(tmp_path).fill(CountingCapture(), make_batches())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_complete_store_on_read_only_storage(tmp_path, monkeypatch):
    """A complete store is only read when refitted and scored: no manifest rewrite, no write at all."""
    root = tmp_path / "g"
    batches = make_batches(n=10, batch_size=2)
    disk(root).fill(CountingCapture(), batches)
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    for p in [root, *root.iterdir()]:
        p.chmod(p.stat().st_mode & ~0o222)  # read-only (root ignores it: hence the patch below)

    def no_write(path, chunks):
        raise AssertionError(f"wrote {path}")

    monkeypatch.setattr(store_mod.disk, "_write_atomic", no_write)
    try:
        st = disk(root).fill(CountingCapture(), batches)
        got, _ = read_all(st)
    finally:
        for p in [root, *root.iterdir()]:
            p.chmod(p.stat().st_mode | 0o200)
    assert all(torch.equal(got[k], v) for k, v in full(batches).items())
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before


def test_resumed_fill_says_how_many_shards_it_reused(tmp_path, capfd):
    batches = make_batches(n=10, batch_size=2)  # shards of 2 batches: [0, 1] [2, 3] [4]
    disk(tmp_path).fill(CountingCapture(), batches[:4])
    capfd.readouterr()
    DiskStore(tmp_path, BLOCKS, CPU, torch.float32, "model-1", chunk_size=4, progress=None).fill(CountingCapture(), batches)
    assert f"gradient store {tmp_path}: reused 2 of 3 shards from an earlier fit, captured 1" in capfd.readouterr().err


def test_other_data_is_named_as_such():
    """store='none' given other data (e.g. Attributor.load(train_data=...)) said 'changed order'."""
    batches, cap = make_batches(), CountingCapture()
    st = RecomputeStore(BLOCKS, CPU, torch.float32, progress=False).fill(cap, batches)
    st.attach(cap, [batches[0], make_batches(seed=1)[1], batches[2]])
    with pytest.raises(ValueError, match="batch 1 of the training data is not one it was fitted on"):
        read_all(st)
    st.attach(cap, batches + batches[:1])
    with pytest.raises(ValueError, match=r"more batches \(4 or more\) than when it was fitted \(3\)"):
        read_all(st)
