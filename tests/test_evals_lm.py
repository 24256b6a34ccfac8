"""The LoRA language-model evals (`pyinf eval leakage`, `pyinf eval lds --task lm`) and the split model cache
(`pretrained_base`, `finetune`): tiny end-to-end CLI runs, planted copies, a resumed retrain cache, bad input.
Mechanics only: no quality thresholds on a trained model."""
import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from pyinf.cli import main
from pyinf.evals import lds_lm
from pyinf.evals.leakage import LeakageConfig, copy_ranks, leaked_training_set, paraphrase
from pyinf.evals.lm import TINY_MODEL
from pyinf.tasks.math_problems import math_problems
from pyinf.tasks.model import UNK, WordTokenizer, base_key, build_model, cache_key, finetune, pretrained_base
from pyinf.tasks.sentences import sentence_transformations

TINY = ["--tiny", "--quiet"]


def test_paraphrase_keeps_the_answer_rewords_the_prompt_in_vocabulary():
    tok = WordTokenizer()
    for task, data in (("sentences", sentence_transformations(0, 2, 2)), ("math", math_problems(0, 2, 2))):
        for ex in data.test:
            p = paraphrase(ex, task)
            assert p.answer == ex.answer and p.label == ex.label and p.prompt != ex.prompt
            assert UNK not in tok.encode(p.text), p.text
    ex = sentence_transformations(0, 2, 2).test[0]  # class 0: blorf = reverse the word order
    assert paraphrase(ex, "sentences").prompt == "reverse the word order: " + ex.prompt.split(": ", 1)[1]
    m = math_problems(0, 2, 2).test[0]
    facts, question = m.prompt.split(". ")
    assert paraphrase(m, "math").prompt == f"{question} {facts}."
    with pytest.raises(ValueError, match="no paraphrase"):
        paraphrase(ex, "images")


@pytest.mark.parametrize("copies", [1, 2])
def test_planted_copies_are_where_the_report_says(copies):
    cfg = LeakageConfig(n_train=3, n_test=2, n_leak=4, copies=copies)
    train, queries, planted = leaked_training_set(cfg, seed=5)
    assert len(queries) == len(planted) == 2 * cfg.n_leak
    assert len(train) == 2 * 10 * cfg.n_train + 2 * copies * len(queries)
    tasks = [sentence_transformations(5, 3, 2), math_problems(5, 3, 2)]
    # every original training example is still there, once
    originals = [e for t in tasks for e in t.train]
    rest = list(train)
    for p in planted:
        for i in p["exact"] + p["paraphrase_at"]:
            rest[i] = None
    assert sorted(e.text for e in rest if e is not None) == sorted(e.text for e in originals)
    for q, p in enumerate(planted):
        task = next(t for t in tasks if t.name == p["task"])
        assert queries[q] == task.test[p["test_index"]] and p["query"] == queries[q].text
        assert len(p["exact"]) == len(p["paraphrase_at"]) == copies
        assert all(train[i] == queries[q] for i in p["exact"])
        assert all(train[i].text == p["paraphrase"] == paraphrase(queries[q], p["task"]).text
                   for i in p["paraphrase_at"])
    assert leaked_training_set(cfg, seed=5) == (train, queries, planted)  # seeded
    assert leaked_training_set(cfg, seed=6)[0] != train


def test_copy_ranks_count_better_and_tied_examples():
    # helpfulness = -score: query 0 ranks example 2 first, then 0, then 1 and 3 tied
    scores = torch.tensor([[-2.0, -1.0, -3.0, -1.0], [-1.0, -1.0, -1.0, -5.0]])
    planted = [{"exact": [0], "paraphrase_at": [3]}, {"exact": [3], "paraphrase_at": [0]}]
    r = copy_ranks(scores, planted)
    assert r["exact"].tolist() == [[1], [0]]
    assert r["paraphrase"].tolist() == [[3], [3]]  # ties count against the copy: 2 better/tied others + itself 0
    # duplicates of a copy do not push each other down
    r = copy_ranks(torch.tensor([[-3.0, -3.0, -1.0]]), [{"exact": [0, 1], "paraphrase_at": [2]}])
    assert r["exact"].tolist() == [[0, 0]] and r["paraphrase"].tolist() == [[2]]


def test_eval_leakage_tiny(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = main(["eval", "leakage", *TINY, "--n-train", "4", "--n-test", "2", "--n-leak", "3", "--seeds", "0,1",
               "--methods", "tracin,datainf,kfac,forward", "--cache", str(cache), "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "leakage_report.json").read_text())
    assert (out / "leakage.png").stat().st_size > 1000
    assert set(rep["runs"]) == {"0", "1"} and list(rep["summary"]) == ["tracin", "datainf", "kfac", "forward"]
    assert rep["run"]["git_commit"] and rep["config"]["model"]["hidden"] == TINY_MODEL.hidden
    cfg = LeakageConfig(n_train=4, n_test=2, n_leak=3)
    for seed in (0, 1):
        run = rep["runs"][str(seed)]
        train, queries, planted = leaked_training_set(cfg, seed)
        assert run["planted"] == planted and run["n_train"] == len(train)
        for m, r in run["methods"].items():
            for kind in ("exact", "paraphrase"):
                ranks = torch.tensor(r[f"{kind}_ranks"])
                assert ranks.shape == (len(queries), 1) and ranks.min() >= 0 and ranks.max() < len(train)
                assert r[f"{kind}_in_top"] == pytest.approx((ranks < 10).double().mean().item())
                assert r[f"{kind}_median_rank"] == pytest.approx(ranks.double().quantile(0.5).item())
    for m, s in rep["summary"].items():
        vals = [rep["runs"][k]["methods"][m]["exact_in_top"] for k in ("0", "1")]
        assert s["exact_in_top"] == pytest.approx(sum(vals) / 2)
    # warm: the fine-tunes come from the cache, the same scores
    rc = main(["eval", "leakage", *TINY, "--n-train", "4", "--n-test", "2", "--n-leak", "3", "--seeds", "0,1",
               "--methods", "tracin,datainf,kfac,forward", "--cache", str(cache), "--out", str(tmp_path / "warm")])
    warm = json.loads((tmp_path / "warm" / "leakage_report.json").read_text())
    assert rc == 0 and all(warm["runs"][k]["model"]["cached"] for k in ("0", "1"))
    for k in ("0", "1"):
        for m in rep["summary"]:
            assert warm["runs"][k]["methods"][m]["exact_ranks"] == rep["runs"][k]["methods"][m]["exact_ranks"]


LDS_ARGS = ["eval", "lds", "--task", "lm", *TINY, "--n-train", "3", "--n-query", "1", "--subsets", "5",
            "--seeds", "0", "--methods", "tracin,datainf,forward"]


def test_eval_lds_lm_tiny_and_the_retrain_cache_resumes(tmp_path, monkeypatch):
    rc = main([*LDS_ARGS, "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "full")])
    assert rc == 0
    full = json.loads((tmp_path / "full" / "lds_lm_report.json").read_text())
    assert (tmp_path / "full" / "lds_lm.png").stat().st_size > 1000
    run = full["runs"]["0"]
    assert run["retrain"]["trained"] == 5 and run["retrain"]["cached"] == 0
    assert run["n_train"] == 60 and run["n_query"] == 20
    for m, r in run["methods"].items():
        assert len(r["per_query"]) == 20 and -1 <= r["lds"] <= 1

    # interrupted after the full fine-tune and 2 of the 5 subset fine-tunes, in a fresh cache
    calls, tune = [], lds_lm.tune

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return tune(*a, **k)

    monkeypatch.setattr(lds_lm, "tune", interrupted)
    assert main([*LDS_ARGS, "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "cut")]) == 2
    assert not (tmp_path / "cut" / "lds_lm_report.json").exists()
    monkeypatch.setattr(lds_lm, "tune", tune)
    assert main([*LDS_ARGS, "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "resumed")]) == 0
    resumed = json.loads((tmp_path / "resumed" / "lds_lm_report.json").read_text())["runs"]["0"]
    assert resumed["retrain"]["cached"] == 2 and resumed["retrain"]["trained"] == 3
    assert resumed["model"]["cached"]
    for m, r in run["methods"].items():
        assert resumed["methods"][m]["per_query"] == pytest.approx(r["per_query"], abs=1e-6)


@pytest.mark.parametrize("argv, needle", [
    (["eval", "leakage", "--n-leak", "30", "--n-test", "2"], "--n-leak"),
    (["eval", "leakage", "--seeds", "1,1"], "--seeds"),
    (["eval", "leakage", "--seeds", "a"], "--seeds"),
    (["eval", "leakage", "--copies", "0"], "--copies"),
    (["eval", "lds", "--task", "lm", "--fraction", "1.5"], "--fraction"),
    (["eval", "lds", "--task", "lm", "--subsets", "2"], "--subsets"),
    (["eval", "lds", "--task", "images"], "--task"),
])
def test_lm_evals_bad_input(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyinf: error:") and needle in err
    assert not (tmp_path / "c").exists()  # nothing trained before the check


def test_base_and_finetune_cache_split(tmp_path):
    cfg = TINY_MODEL
    assert base_key(cfg, 0, 0) == base_key(dataclasses.replace(cfg, finetune_epochs=3, lora_r=4), 0, 0)
    assert base_key(cfg, 0, 0) != base_key(dataclasses.replace(cfg, hidden=16), 0, 0)
    assert base_key(cfg, 0, 0) != base_key(cfg, 1, 0) != base_key(cfg, 0, 1)
    ex = list(sentence_transformations(0, 3, 1).train)
    base, tok, info = pretrained_base(cfg, cache=tmp_path, progress=False)
    assert not info["cached"] and (tmp_path / "bases" / base_key(cfg, 0, 0) / "base.pt").exists()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m1, i1 = finetune(base, tok, ex, cfg, cache=tmp_path, progress=False)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base is left untouched
    path = tmp_path / "tasks" / cache_key(cfg, 0, 0, ex) / "model.pt"
    assert not i1["cached"] and path.exists() and "adapter" in torch.load(path, weights_only=True)
    m2, i2 = finetune(base, tok, ex, cfg, cache=tmp_path, progress=False)
    assert i2["cached"]
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    # build_model is the composition, with the same cache key: it loads what finetune wrote
    m3, _, i3 = build_model(ex, cfg, cache=tmp_path, progress=False)
    assert i3["cached"] and all(torch.equal(s1[k], v) for k, v in m3.state_dict().items())
    # a fresh fine-tune without the cache trains the same model (seeded init and order, one machine)
    m4, i4 = finetune(base, tok, ex, cfg, use_cache=False, progress=False)
    assert not i4["cached"] and all(torch.equal(s1[k], v) for k, v in m4.state_dict().items())


@pytest.mark.parametrize("seed", ["3", "0"])  # 0 too: it is not the same as no --seed (seeds 0, 1, 2)
def test_lm_eval_seed_alone_runs_that_seed(tmp_path, seed):
    rc = main(["eval", "leakage", *TINY, "--n-train", "2", "--n-test", "1", "--n-leak", "1", "--seed", seed,
               "--methods", "tracin", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    rep = json.loads((tmp_path / "o" / "leakage_report.json").read_text())
    assert rc == 0 and list(rep["runs"]) == [seed] and rep["config"]["base_seed"] == 0
    assert rep["summary"]["tracin"]["exact_in_top_sd"] is None  # one seed: no sd


@pytest.mark.parametrize("argv, message", [
    (["eval", "lds", "--seeds", "1,2"], "--seeds applies to --task lm only"),
    (["eval", "lds", "--tiny", "--no-cache"], "--no-cache, --tiny apply to --task lm only"),
    (["eval", "lds", "--task", "lm", "--steps", "10"], "--steps applies to --task digits only"),
])
def test_lds_options_of_the_other_task_are_refused(argv, message, capsys):
    """Options the parser takes for one task are an error on the other, never silently ignored."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err
