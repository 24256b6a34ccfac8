"""The `pyinf` CLI under torchrun: two gloo ranks give the single-process report; user errors stay exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
ARGS = ["eval", "mislabeled", "--n-train", "60", "--n-val", "20", "--steps", "20", "--methods", "tracin,datainf"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pyinf"]


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)  # the single-process run must not think it is under torchrun
    # cwd: a scratch folder, so `-m pyinf` imports the installed package, not a checkout beside it
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_eval_mislabeled_torchrun_matches_one_process(tmp_path):
    dist_out, one_out = tmp_path / "dist", tmp_path / "one"
    r = _run(TORCHRUN + ARGS + ["--out", str(dist_out)], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("agg AUC") == 1  # the table, from rank 0 only
    assert sorted(p.name for p in dist_out.iterdir()) == ["mislabeled.png", "mislabeled_report.json"]
    assert not list(tmp_path.glob("pyinf-rank*"))
    r = _run([sys.executable, "-m", "pyinf"] + ARGS + ["--out", str(one_out), "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    dist_rep = json.loads((dist_out / "mislabeled_report.json").read_text())
    one_rep = json.loads((one_out / "mislabeled_report.json").read_text())
    assert dist_rep["methods"].keys() == one_rep["methods"].keys() == {"tracin", "datainf"}
    for method, one in one_rep["methods"].items():
        numbers = {k: v for k, v in one.items() if isinstance(v, float) and k != "seconds"}
        assert {"aggregated_auc", "self_auc"} <= numbers.keys()
        for key, v in numbers.items():
            assert dist_rep["methods"][method][key] == pytest.approx(v, abs=1e-5), (method, key)
    for key in ("val_accuracy", "fits_flipped", "perfect_auc"):
        assert dist_rep[key] == pytest.approx(one_rep[key], abs=1e-6)


def test_user_error_under_torchrun_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = _run(TORCHRUN + ARGS + ["--out", str(tmp_path / "afile")], tmp_path)
    assert r.returncode != 0  # torchrun reports the ranks' exit code 2 as a failure of its own
    assert r.stderr.count("pyinf: error:") == 1, r.stderr[-3000:]
    assert "exists and is not a folder" in r.stderr
    assert "Traceback" not in r.stderr.split("pyinf: error:")[0]


def test_user_error_of_another_rank_maps_to_exit_2(monkeypatch, capsys):
    from pyinf import cli

    def other_rank_failed(args):
        raise RuntimeError("rank 1 failed: ValueError: training batch 3: NaN gradient")

    def internal(args):
        raise RuntimeError("rank 1 failed: AssertionError: a bug")

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "eval_mislabeled", other_rank_failed)
    assert cli.main(["eval", "mislabeled"]) == 2
    assert capsys.readouterr().err.strip() == "pyinf: error: rank 1 failed: ValueError: training batch 3: NaN gradient"
    monkeypatch.setattr(cli, "eval_mislabeled", internal)
    with pytest.raises(RuntimeError, match="AssertionError"):
        cli.main(["eval", "mislabeled"])


def _numbers(tree, path=()):
    """Every float leaf of a report (but wall times), keyed by its path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() if key not in ("seconds", "run", "config")
                for k, v in _numbers(sub, path + (key,)).items()}
    if isinstance(tree, float) and "seconds" not in path[-1]:
        return {path: tree}
    return {}


LORA_EVALS = {
    "text": (["eval", "mislabeled", "--task", "text", "--tiny", "--seeds", "0", "--n-train", "60", "--n-val", "20",
              "--methods", "tracin,datainf,kfac"], "mislabeled_report.json"),
    "images demo": (["demo", "--task", "images", "--tiny", "--n-train", "3", "--n-test", "2", "--methods",
                     "tracin,datainf,kfac,forward"], "demo_report.json"),
    "leakage": (["eval", "leakage", "--tiny", "--n-train", "3", "--n-test", "2", "--n-leak", "2", "--seeds", "0",
                 "--methods", "tracin,kfac,forward"], "leakage_report.json"),
}


@pytest.mark.parametrize("name", sorted(LORA_EVALS))
def test_lora_evals_torchrun_match_one_process(tmp_path, name):
    """The LoRA evals and the images demo under two gloo ranks (rank 0 trains and caches the model, rank 1 loads
    it; at least one batch per rank however small the set) give the single-process numbers."""
    args, report = LORA_EVALS[name]
    cache = ["--cache", str(tmp_path / "cache")]
    r = _run(TORCHRUN + args + cache + ["--out", str(tmp_path / "dist")], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run([sys.executable, "-m", "pyinf"] + args + cache + ["--out", str(tmp_path / "one"), "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    dist = _numbers(json.loads((tmp_path / "dist" / report).read_text()))
    one = _numbers(json.loads((tmp_path / "one" / report).read_text()))
    assert dist.keys() == one.keys() and len(one) > 5
    for key, v in one.items():
        assert dist[key] == pytest.approx(v, abs=1e-5), key
