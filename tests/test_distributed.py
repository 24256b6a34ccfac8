"""Data parallel attribution: two gloo processes give the scores of one process (to 1e-5), every method.

The two ranks run `dist_worker.py` (subprocesses with RANK/WORLD_SIZE/MASTER_* set,
as torchrun would) over every case of `dist_cases.CASES` once per module; the
single-process references run here, with `distributed=False`.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tiny_models, dist_cases under --import-mode=importlib
import dist_cases  # noqa: E402
from dist_cases import CASES, SKIPPED, poisoning, run_case  # noqa: E402
from tiny_models import tiny_llama_lora  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD),
           "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), str(out)],
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references here, like the ranks, on one thread: on a loaded 2-core machine two OpenMP
    threads (torch, pyinf._C) spin against each other and a 0.1 s case can take 20 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_llama_lora(seed=0)


_REFS: dict = {}


def _reference(model, method, tmp_path):
    """One process, store="cpu" (the disk and "none" stores give the same scores, test_attributor)."""
    if method not in _REFS:
        _REFS[method] = run_case(model, method, "cpu", tmp_path, False)
    return _REFS[method]


def _close(got, ref, tol=1e-5):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    err = (got[~nan] - ref[~nan]).abs().max() / ref[~nan].abs().max()
    assert err <= tol, f"normwise error {float(err):.3g}"


@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("method,store", CASES)
def test_two_ranks_equal_one_process(ranks, model, method, store, tmp_path):
    got, other = ranks[0][(method, store)], ranks[1][(method, store)]
    ref = _reference(model, method, tmp_path)
    assert got["n"] == other["n"] == ref["n"] == dist_cases.N
    assert other["scores"] is None  # the (m, n) matrix is on rank 0 only
    _close(got["scores"], ref["scores"])
    if "self" in ref and store == "cpu":
        assert other["self"] is None and other["top"] is None
        _close(got["self"], ref["self"])
        for g, r in zip(got["top"], ref["top"]):
            if g.dtype == torch.long:
                assert torch.equal(g, r)
            else:
                _close(g, r)


@pytest.mark.parametrize("case", [("datainf", "skip", "cpu"), ("exact", "skip-disk", "disk")])
def test_two_ranks_nan_skip(ranks, model, case, monkeypatch, tmp_path):
    from pyinf import gradients as gradients_mod

    method, key, store = case
    got, other = ranks[0][(method, key)], ranks[1][(method, key)]
    poisoning(gradients_mod, monkeypatch.setattr)
    ref = run_case(model, method, store, tmp_path, False, nan_policy="skip")
    assert got["skipped"] == other["skipped"] == ref["skipped"] == SKIPPED
    assert torch.isnan(got["scores"][:, SKIPPED]).all()
    _close(got["scores"], ref["scores"])
    _close(got["self"] if "self" in got else got["scores"], ref["self"] if "self" in ref else ref["scores"])
    if "top" in got:
        assert not set(got["top"].helpful_indices.flatten().tolist()) & set(SKIPPED)
        assert torch.equal(got["top"].helpful_indices, ref["top"].helpful_indices)
