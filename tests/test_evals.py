"""Metrics against hand-computed cases, and tiny end-to-end runs of the eval sub-commands."""
import json
import math

import pytest
import torch

from pyinf.metrics import curve_auc, detection_auc, detection_curve, recall_at_k, roc_auc, spearman


def test_roc_auc_with_ties():
    # positives 0.8, 0.5; negatives 0.5, 0.1: pairs (0.8>0.5)=1, (0.8>0.1)=1, (0.5=0.5)=0.5, (0.5>0.1)=1 -> 3.5/4
    v = torch.tensor([0.8, 0.5, 0.5, 0.1])
    pos = torch.tensor([True, True, False, False])
    assert roc_auc(v, pos).item() == pytest.approx(0.875)
    assert roc_auc(torch.ones(4), pos).item() == pytest.approx(0.5)
    rows = roc_auc(torch.stack([v, -v]), torch.stack([pos, pos]))
    assert rows.tolist() == pytest.approx([0.875, 0.125])


def test_recall_at_k():
    v = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    pos = torch.tensor([[True, False, True, False, True]] * 2)
    assert recall_at_k(v, pos, 2).tolist() == pytest.approx([1 / 3, 1 / 3])  # top 2: {0,1} / {4,3}
    assert recall_at_k(v, pos, 3).tolist() == pytest.approx([2 / 3, 2 / 3])
    assert recall_at_k(v, pos, 10).tolist() == pytest.approx([1.0, 1.0])
    # ties at the cut: stable, first index first
    assert recall_at_k(torch.zeros(4), torch.tensor([False, True, True, False]), 2).item() == pytest.approx(0.5)


def test_detection_curve_and_auc():
    v = torch.tensor([0.9, 0.1, 0.8, 0.2])
    pos = torch.tensor([True, False, False, True])
    x, f = detection_curve(v, pos)
    assert x.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert f.tolist() == pytest.approx([0, 0.5, 0.5, 1.0, 1.0])  # order 0 (pos), 2, 3 (pos), 1
    # trapezoid: 0.25*(0+0.5)/2 + 0.25*(0.5+0.5)/2 + 0.25*(0.5+1)/2 + 0.25*(1+1)/2 = 0.0625+0.125+0.1875+0.25
    assert detection_auc(v, pos) == pytest.approx(0.625)
    perfect = detection_auc(torch.tensor([1.0, 0.9, 0.1, 0.0]), torch.tensor([True, True, False, False]))
    assert perfect == pytest.approx(1 - 2 / (2 * 4))
    assert curve_auc(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        detection_curve(v, torch.zeros(4, dtype=torch.bool))


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a ** 3).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    # ties: b ranks (1, 2.5, 2.5, 4, 5) against (1..5): hand-computed rho = 9.5 / sqrt(10 * 9.5)
    b = torch.tensor([10.0, 20.0, 20.0, 30.0, 40.0])
    assert spearman(a, b).item() == pytest.approx(9.5 / math.sqrt(10 * 9.5))
    # a worked example: ranks x = (1,2,3,4), y = (2,1,4,3): d^2 sum = 4, rho = 1 - 6*4/(4*15) = 0.6
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 1, 9, 7])).item() == pytest.approx(0.6)
    rows = spearman(torch.stack([a, a]), torch.stack([a, -a]))
    assert rows.tolist() == pytest.approx([1.0, -1.0])
    assert torch.isnan(spearman(a, torch.ones(5)))


FAST = ["--methods", "tracin,datainf,exact,lissa,hyperinf,kfac,ekfac,forward", "--lissa-iterations", "20", "--quiet"]


def test_eval_mislabeled_tiny(tmp_path):
    from pyinf.cli import main

    rc = main(["eval", "mislabeled", "--n-train", "120", "--n-val", "40", "--steps", "40", "--hidden", "8",
               "--out", str(tmp_path), *FAST])
    assert rc == 0
    rep = json.loads((tmp_path / "mislabeled_report.json").read_text())
    assert (tmp_path / "mislabeled.png").stat().st_size > 1000
    assert rep["n_flipped"] == 24
    assert rep["run"]["device"] and rep["run"]["torch_version"] and "git_commit" in rep["run"]  # where it ran
    assert {"tracin", "datainf", "exact", "lissa", "hyperinf", "kfac", "ekfac"} <= set(rep["methods"])
    for m, r in rep["methods"].items():
        assert 0.0 <= r["aggregated_auc"] <= 1.0, m
        if m != "forward":
            assert 0.0 <= r["self_auc"] <= 1.0, m
    assert rep["methods"]["lissa"]["warnings"]  # 20 iterations: the warning is reported, not hidden


def test_eval_lds_tiny(tmp_path):
    from pyinf.cli import main

    rc = main(["eval", "lds", "--n-train", "80", "--n-query", "10", "--subsets", "6", "--steps", "30",
               "--hidden", "8", "--out", str(tmp_path), *FAST])
    assert rc == 0
    rep = json.loads((tmp_path / "lds_report.json").read_text())
    assert (tmp_path / "lds.png").stat().st_size > 1000
    for m, r in rep["methods"].items():
        assert -1.0 <= r["lds"] <= 1.0, m
