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


# --------------------------------------------------------------------------- #
# issue 17: the LoRA text-classification task, `eval mislabeled --task text`, `eval select`
# --------------------------------------------------------------------------- #
TEXT_FAST = ["--tiny", "--lissa-iterations", "10", "--quiet"]


def test_text_task_flips_exactly_and_is_seeded():
    from pyinf.tasks import text_classes as tc

    texts, labels = tc.make_split(250, 3, "train")
    assert texts == tc.make_split(250, 3, "train")[0] and torch.equal(labels, tc.make_split(250, 3, "train")[1])
    assert texts != tc.make_split(250, 4, "train")[0]
    assert torch.bincount(labels).tolist() == [50] * 5  # balanced classes
    noisy, flipped = tc.flip_labels(labels, 0.2, 3)
    assert flipped.sum().item() == 50  # exactly 20%
    assert torch.equal(noisy != labels, flipped)  # a flip always changes the label
    n2, f2 = tc.flip_labels(labels, 0.2, 3)
    assert torch.equal(n2, noisy) and torch.equal(f2, flipped)
    assert not torch.equal(tc.flip_labels(labels, 0.2, 4)[1], flipped)
    # classes share vocabulary: every sentence holds words of two topics, eight words in all
    assert all(len(t.split()) == tc.SENTENCE_WORDS for t in texts)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="flip"):
            tc.flip_labels(labels, bad, 0)


def test_text_classifier_trains_the_head_and_pyinf_captures_it(tmp_path):
    import pyinf
    from pyinf.tasks import text_classes as tc

    base, _ = tc.pretrained_base(tc.TINY, 0, cache=tmp_path, progress=False)
    model = tc.lora_classifier(base, tc.TINY, 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    tok = tc.TextTokenizer()
    texts, labels = tc.make_split(10, 0, "val")
    grads = pyinf.capture_gradients(model, [tok.batch(texts, labels)], progress=False)
    names = [b.name for b in grads.blocks]
    assert any("score" in n for n in names), names  # the SEQ_CLS head is a captured block
    assert sum("lora_" in n for n in names) == 4 * tc.TINY.layers  # q and v, A and B
    # the same seed gives the same fresh head and adapter init
    again = tc.lora_classifier(base, tc.TINY, 0)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_eval_mislabeled_text_tiny_and_deterministic(tmp_path):
    from pyinf.cli import main

    args = ["eval", "mislabeled", "--task", "text", "--n-train", "60", "--n-val", "15", "--seeds", "0,1",
            "--damping", "0.1,1", "--methods", "tracin,datainf,exact,lissa,forward", "--cache", str(tmp_path / "c"),
            *TEXT_FAST]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    rep = json.loads((tmp_path / "a" / "mislabeled_report.json").read_text())
    assert (tmp_path / "a" / "mislabeled.png").stat().st_size > 1000
    assert rep["task"] == "text" and rep["seeds"] == [0, 1] and rep["n_flipped"] == 12
    # one capture per seed, every damping from it; tracin and forward take no damping
    assert set(rep["methods"]) == {"tracin", "datainf@0.1", "datainf@1", "exact@0.1", "exact@1", "lissa@0.1",
                                   "lissa@1", "forward"}
    for row, r in rep["methods"].items():
        assert len(r["aggregated_auc_per_seed"]) == 2 and 0 <= r["aggregated_auc"] <= 1, row
        assert r["aggregated_auc_sd"] >= 0
    assert "self_auc" not in rep["methods"]["forward"]
    # the second run loads the cached models and gives the same numbers
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    rep2 = json.loads((tmp_path / "b" / "mislabeled_report.json").read_text())
    assert all(p["model_cached"] for p in rep2["per_seed"])
    for row in rep["methods"]:
        assert rep2["methods"][row]["aggregated_auc"] == pytest.approx(rep["methods"][row]["aggregated_auc"], abs=1e-6)


def test_top_fraction_keeps_exactly_k_percent():
    from pyinf.evals.select import top_fraction

    h = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0, 0.0, 1.0, -2.0, 4.0, 0.1])
    assert top_fraction(h, 20).tolist() == [1, 8]  # 4.0, then the first of the tied 3.0s
    assert top_fraction(h, 50).tolist() == [1, 3, 4, 6, 8]
    assert len(top_fraction(torch.randn(1000), 20)) == 200
    for bad in (0, 100, 150, -5):
        with pytest.raises(ValueError, match="keep"):
            top_fraction(h, bad)
    with pytest.raises(ValueError, match="keeps none"):
        top_fraction(h, 1)


def test_top_fraction_per_class_shares_k_among_the_labels():
    from pyinf.evals.select import top_fraction_per_class

    h = torch.arange(10.0)  # the last index is the most helpful
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])  # 6 and 4: 50% keeps 3 and 2
    assert top_fraction_per_class(h, labels, 50).tolist() == [3, 4, 5, 8, 9]
    # 30% of 10 = 3: quotas 1.8 and 1.2 -> 1 and 1, the larger remainder (class 0) gets the third
    assert top_fraction_per_class(h, labels, 30).tolist() == [4, 5, 9]
    g = torch.Generator().manual_seed(0)
    big_h, big_l = torch.randn(1000, generator=g), torch.randint(0, 5, (1000,), generator=g)
    keep = top_fraction_per_class(big_h, big_l, 20)
    assert len(keep) == 200 and len(set(keep.tolist())) == 200
    share = torch.bincount(big_l[keep], minlength=5).double() / torch.bincount(big_l, minlength=5).double()
    assert (share - 0.2).abs().max() < 0.01
    with pytest.raises(ValueError, match="keep"):
        top_fraction_per_class(h, labels, 100)


def test_eval_select_tiny(tmp_path):
    from pyinf.cli import main

    rc = main(["eval", "select", "--n-train", "50", "--n-val", "10", "--n-test", "20", "--seeds", "0", "--keep",
               "20,50", "--methods", "tracin,datainf", "--cache", str(tmp_path / "c"), "--out", str(tmp_path),
               *TEXT_FAST])
    assert rc == 0
    rep = json.loads((tmp_path / "select_report.json").read_text())
    assert (tmp_path / "select.png").stat().st_size > 1000
    assert set(rep["methods"]) == {"tracin", "datainf", "tracin per class", "datainf per class"}
    for row, r in rep["methods"].items():
        assert r["20"]["n"] == 10 and r["50"]["n"] == 25, row  # exactly k% of the pool
        assert r["20"]["epochs"] == 5 * r["50"]["epochs"] // 2  # equal examples seen: epochs scale with 100 / k
        assert 0 <= r["20"]["test_accuracy"] <= 1
    assert rep["random"]["20"]["n"] == 10 and rep["full"]["n"] == 50 and rep["clean_only"]["n"] == 40
    assert rep["clean_only"]["flipped_fraction"] == 0 and rep["full"]["flipped_fraction"] == pytest.approx(0.2)


@pytest.mark.parametrize("argv, message", [
    (["eval", "select", "--keep", "0,50"], "keep"),
    (["eval", "select", "--keep", "100"], "keep"),
    (["eval", "select", "--keep", "20,20"], "repeated"),
    (["eval", "select", "--seeds", "0,x"], "seed"),
    (["eval", "select", "--flip", "1.5"], "flip"),
    (["eval", "select", "--damping", "0.1,-1"], "damping"),
    (["eval", "mislabeled", "--task", "images"], "task"),
    (["eval", "mislabeled", "--task", "text", "--seeds", ""], "seeds"),
])
def test_eval_text_bad_input(tmp_path, capsys, argv, message):
    from pyinf.cli import main

    assert main([*argv, "--tiny", "--quiet", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyinf: error:") and message in err, err


def test_text_evals_capture_once_per_seed_for_every_method_and_damping(tmp_path, monkeypatch):
    """Item 5 of issue 17: one capture of the training set per seed serves every method and damping."""
    from pyinf.cli import main
    from pyinf.gradients import TrainGradients

    fills = []
    real = TrainGradients._fill
    monkeypatch.setattr(TrainGradients, "_fill", lambda self, data: fills.append(1) or real(self, data))
    common = ["--seeds", "0,1", "--damping", "0.01,1", "--methods", "tracin,datainf,kfac,ekfac,forward",
              "--cache", str(tmp_path / "c"), *TEXT_FAST]
    assert main(["eval", "mislabeled", "--task", "text", "--n-train", "40", "--n-val", "10",
                 "--out", str(tmp_path / "m"), *common]) == 0
    assert len(fills) == 2
    rep = json.loads((tmp_path / "m" / "mislabeled_report.json").read_text())
    assert {"kfac@0.01", "kfac@1", "ekfac@0.01", "ekfac@1", "tracin", "forward"} <= set(rep["methods"])
    assert main(["eval", "select", "--n-train", "40", "--n-val", "10", "--n-test", "10",
                 "--out", str(tmp_path / "s"), *common]) == 0
    assert len(fills) == 4
