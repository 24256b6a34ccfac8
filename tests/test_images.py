"""`pyinf demo --task images`: the style generator, and the demo end to end at a tiny size (mechanics only: no
quality thresholds, a tiny UNet trained for a few steps means little)."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from pyinf.cli import main  # noqa: E402
from pyinf.tasks import demo as demo_mod  # noqa: E402
from pyinf.tasks.images import (STYLES, ImageModelConfig, generic_images, prompt_embeddings,  # noqa: E402
                                style_data, style_images)


def test_generator_is_deterministic_and_seeded():
    a, b = style_images(3, 4, 16, seed=0), style_images(3, 4, 16, seed=0)
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, style_images(3, 4, 16, seed=1))
    assert torch.equal(style_images(3, 6, 16, seed=0)[4:], style_images(3, 2, 16, seed=0, offset=4))
    (a5, p5), (b5, q5) = generic_images(5, 16, 0), generic_images(5, 16, 0)
    assert torch.equal(a5, b5) and p5 == q5 and len(p5) == 5
    e = prompt_embeddings([("zorbly", "zorbly"), ("quandle", "quandle")], 8, seed=0)
    assert e.shape == (2, 3, 8) and torch.equal(e, prompt_embeddings([("zorbly", "zorbly"), ("quandle", "quandle")], 8, seed=0))
    assert torch.equal(e[0, 0], e[1, 0]) and torch.equal(e[0, 1], e[0, 2])  # shared prefix, the word twice
    assert not torch.allclose(e[0, 1], e[1, 1])


def test_styles_differ_and_test_images_are_held_out():
    data = style_data(8, 2, ImageModelConfig(size=16), seed=0)
    assert data.train.shape == (80, 3, 16, 16) and data.test.shape == (20, 3, 16, 16)
    assert data.train_labels.tolist() == [k for k in range(len(STYLES)) for _ in range(8)]
    # the classes differ: every two styles' mean colours lie apart, and the mean colour alone already
    # tells most images' style (palettes; the textures and shapes tell the rest)
    colour = data.train.mean(dim=(2, 3))  # (80, 3)
    means = torch.stack([colour[data.train_labels == k].mean(0) for k in range(len(STYLES))])
    apart = torch.cdist(means, means) + 10 * torch.eye(len(STYLES))
    assert apart.min() > 0.1
    assert (torch.cdist(colour, means).argmin(dim=1) == data.train_labels).float().mean() >= 0.9
    # no test image equals a training image
    assert torch.cdist(data.test.flatten(1), data.train.flatten(1)).min() > 0


def test_images_demo_tiny_end_to_end(tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["demo", "--task", "images", "--tiny", "--n-train", "3", "--n-test", "2", "--out", str(out),
            "--cache", str(cache), "--lissa-iterations", "5", "--methods", "tracin,datainf,exact,kfac,forward",
            "--quiet"]
    real = demo_mod.run_method

    def exact_fails(grads, task, method, cfg, shared):
        if method == "exact":
            raise RuntimeError("injected failure")
        return real(grads, task, method, cfg, shared)

    monkeypatch.setattr(demo_mod, "run_method", exact_fails)
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "images" in table and "datainf" in table and "exact      failed" in table and "injected failure" in table
    rep = json.loads((out / "demo_report.json").read_text())
    assert set(rep["tasks"]) == {"images"}
    assert rep["run"]["device"] and rep["run"]["git_commit"] and rep["config"]["tasks"] == ["images"]
    methods = rep["tasks"]["images"]["methods"]
    assert "injected failure" in methods["exact"]["error"]
    for m in ("tracin", "datainf", "kfac", "forward"):
        assert 0.0 <= methods[m]["auc"] <= 1.0 and 0.0 <= methods[m]["recall_at_k"] <= 1.0
    assert rep["models"]["images"]["cached"] is False
    scores = torch.load(out / "demo_scores.pt", weights_only=True)["scores"]["images"]
    assert scores["datainf"].shape == (20, 30) and "exact" not in scores
    assert (out / "images_grid.png").stat().st_size > 1000 and (out / "demo.png").stat().st_size > 1000
    assert len(list(cache.rglob("unet.pt"))) == 1
    # second run: the UNet from the cache, the same scores (the seeded denoising loss is deterministic)
    monkeypatch.setattr(demo_mod, "run_method", real)
    assert main(args[:-3] + ["--methods", "datainf", "--quiet"]) == 0
    rep2 = json.loads((out / "demo_report.json").read_text())
    assert rep2["models"]["images"]["cached"] is True
    again = torch.load(out / "demo_scores.pt", weights_only=True)["scores"]["images"]["datainf"]
    torch.testing.assert_close(again, scores["datainf"])


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--task", "pictures"], "unknown task"),
    (["demo", "--task", ""], "unknown task"),
])
def test_bad_task_exits_2_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_missing_diffusers_named_before_any_work(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert main(["demo", "--task", "images", "--tiny"]) == 2
    err = capsys.readouterr().err
    assert "diffusers" in err and "pyinf[diffusion]" in err


def test_images_demo_figures_use_a_method_that_scored_every_query(tmp_path):
    """forward scores 3 queries per style: the grid and the heatmap must show another method (here kfac, listed
    after it), and with forward alone the demo still ends, without a grid."""
    args = ["demo", "--task", "images", "--tiny", "--n-train", "3", "--n-test", "4", "--cache", str(tmp_path / "c"),
            "--quiet"]
    out = tmp_path / "both"
    assert main(args + ["--methods", "forward,kfac", "--out", str(out)]) == 0
    task = json.loads((out / "demo_report.json").read_text())["tasks"]["images"]
    assert "finish_error" not in task and task["methods"]["forward"]["queries"] == 30
    assert (out / "images_grid.png").stat().st_size > 1000 and (out / "demo.png").stat().st_size > 1000
    out = tmp_path / "forward"
    assert main(args + ["--methods", "forward", "--out", str(out)]) == 0
    task = json.loads((out / "demo_report.json").read_text())["tasks"]["images"]
    assert "finish_error" not in task and task["files"] == []
    assert not (out / "images_grid.png").exists() and (out / "demo.png").stat().st_size > 1000
