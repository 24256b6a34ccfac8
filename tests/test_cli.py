"""`pyinf demo` end to end at a tiny size, and user errors: exit code 2, one line, no traceback."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from pyinf.cli import main


def test_demo_tiny_end_to_end_and_cache(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["demo", "--tiny", "--n-train", "6", "--n-test", "2", "--out", str(out), "--cache", str(cache),
            "--lissa-iterations", "10", "--quiet"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "sentences" in table and "math" in table and "datainf" in table
    rep = json.loads((out / "demo_report.json").read_text())
    assert rep["model"]["cached"] is False
    assert rep["backend"].startswith("cpu (C++ extension pyinf._C") and "backend: cpu" in table  # make test builds it
    assert all(r["backend"] == "cpu" for m, r in rep["tasks"]["math"]["methods"].items() if m != "forward")
    assert set(rep["tasks"]) == {"sentences", "math"}
    for task in rep["tasks"].values():
        assert {"tracin", "datainf", "exact", "lissa", "hyperinf", "kfac", "ekfac"} <= set(task["methods"])
        for r in task["methods"].values():
            assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["recall_at_k"] <= 1.0 and r["seconds"] >= 0
    saved = torch.load(out / "demo_scores.pt", weights_only=True)
    assert saved["scores"]["sentences"]["datainf"].shape == (20, 60)
    assert (out / "demo.png").stat().st_size > 1000
    assert len(list(cache.rglob("model.pt"))) == 1
    # second run: the model comes from the cache, and the scores are the same
    assert main(args + ["--methods", "datainf"]) == 0
    rep2 = json.loads((out / "demo_report.json").read_text())
    assert rep2["model"]["cached"] is True
    again = torch.load(out / "demo_scores.pt", weights_only=True)["scores"]["sentences"]["datainf"]
    torch.testing.assert_close(again, saved["scores"]["sentences"]["datainf"])


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--methods", "nope"], "unknown method"),
    (["demo", "--n-train", "0"], "--n-train"),
    (["eval", "lds", "--subsets", "x"], "--subsets"),
    (["eval"], "eval"),
    (["frobnicate"], "invalid choice"),
    (["eval", "mislabeled", "--n-train", "5000"], "--n-train + --n-val"),
    (["eval", "mislabeled", "--flip", "1.5"], "--flip"),
])
def test_user_errors_exit_2_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyinf: error:") and needle in err[0], err


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["eval", "lds", "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_module_entry_point_no_traceback():
    r = subprocess.run([sys.executable, "-m", "pyinf", "demo", "--damping", "-1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, missing, extra", [
    (["demo"], "transformers", "pyinf[hf]"),
    (["demo", "--tiny"], "matplotlib", "pyinf[eval]"),
    (["eval", "lds"], "sklearn", "pyinf[eval]"),
])
def test_missing_extra_named_before_any_work(argv, missing, extra, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and missing in err[0] and f"pip install '{extra}'" in err[0], err
