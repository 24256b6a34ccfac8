"""The "images" task of `pyinf demo` (`--task images`), as a `DemoTask`, and its grid figure.

Training set: every style's training images under its prompt; queries: held-out
images of each style under its prompt; ground truth: the training images of the
query's style (DataInf's class-ID ROC-AUC). Training loss and measurement: the
seeded denoising loss (`pyinf.diffusion.DenoisingLoss`) with K draws in the
timestep window of `ImageModelConfig` (seeds 0 and 1). `images_grid.png`: one
query per style beside its 5 most helpful training images.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..distributed import batch_size_for_ranks
from .common import shown_method
from .images import STYLE_WORDS, batches_of, build_unet, influence_losses, style_data

GRID_TOP = 5


@torch.no_grad()
def prompt_accuracy(unet, data, loss) -> float:
    """Fraction of test images whose denoising loss (`loss`, seeded) is lowest under their own style's prompt
    among all 10 prompts: whether the LoRA bound each made-up word to its style (chance: 0.1)."""
    m, n_styles = len(data.test), len(data.words)
    losses = torch.empty(m, n_styles)
    idx = torch.arange(m)
    for k in range(n_styles):
        cond = data.embeddings[k].expand(m, *data.embeddings.shape[1:])
        losses[:, k] = loss(unet, {"pixel_values": data.test, "encoder_hidden_states": cond, "index": idx})
    return (losses.argmin(dim=1) == data.test_labels).float().mean().item()


def image_task(cfg):
    """(the images `DemoTask` of the demo config `cfg`, the UNet's info): the UNet built or loaded from the cache."""
    from .. import Task
    from .demo import DemoTask

    icfg = cfg.images
    data = style_data(cfg.image_n_train, cfg.image_n_test, icfg, cfg.seed)
    unet, info = build_unet(data, icfg, seed=cfg.seed, cache=cfg.cache, use_cache=cfg.use_cache,
                            progress=cfg.progress)
    train_loss, measurement = influence_losses(icfg)
    # the binding shows over every timestep (at high noise the prompt moves the loss little): seeded, K draws
    everywhere = influence_losses(icfg, timesteps=(0, len(measurement.alphas_cumprod)))[1]
    bs = batch_size_for_ranks(len(data.train), cfg.batch_size)  # under torchrun: a training batch per rank
    train = batches_of(data.train, data.cond(data.train_labels), data.train_labels, bs)

    def queries(rows):
        rows = torch.as_tensor(rows, dtype=torch.long)
        return [{"pixel_values": data.test[r], "encoder_hidden_states": data.cond(data.test_labels[r]),
                 "index": r, "labels": data.test_labels[r]} for r in rows.split(bs)]

    with torch.no_grad():
        fit = {"train_loss": torch.cat([train_loss(unet, b) for b in train]).mean().item(),
               "test_loss": torch.cat([measurement(unet, b) for b in queries(list(range(len(data.test))))]).mean().item(),
               "test_prompt_accuracy": prompt_accuracy(unet, data, everywhere)}
    task = DemoTask(name="images", class_names=STYLE_WORDS, model=unet, train_batches=train, query_batches=queries,
                    train_labels=data.train_labels, query_labels=data.test_labels, n_train=cfg.image_n_train,
                    n_test=cfg.image_n_test, task=Task(train_loss=train_loss, measurement=measurement), fit=fit,
                    finish=lambda out, scores: [str(p) for p in [grid(Path(out) / "images_grid.png", data, scores)]
                                                if p is not None]
                    if scores else [])
    return task, info


def grid(path: Path, data, scores: dict, method: str = "datainf") -> Path | None:
    """`path`: the first query of each style (rows) beside its GRID_TOP most helpful training images under
    `method` (or the first method that scored every query), framed green when of the query's style, red
    otherwise; None (no figure) when no method scored every query."""
    from ..reports import pyplot, save_figure

    method = shown_method(scores, len(data.test_labels), method)
    if method is None:
        return None
    plt = pyplot()
    S = scores[method]
    rows = [int((data.test_labels == k).nonzero()[0]) for k in range(len(data.words))]
    fig, axes = plt.subplots(len(rows), GRID_TOP + 1, figsize=(1.3 * (GRID_TOP + 1), 1.3 * len(rows)),
                             squeeze=False)
    show = lambda x: ((x.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()  # noqa: E731
    for r, q in enumerate(rows):
        top = (-S[q]).argsort(descending=True)[:GRID_TOP].tolist()  # most helpful: most negative score
        style = int(data.test_labels[q])
        axes[r, 0].imshow(show(data.test[q]), interpolation="nearest")
        axes[r, 0].set_ylabel(data.words[style], fontsize=8)
        for c, i in enumerate(top, 1):
            ax = axes[r, c]
            ax.imshow(show(data.train[i]), interpolation="nearest")
            color = "tab:green" if int(data.train_labels[i]) == style else "tab:red"
            for side in ax.spines.values():
                side.set_edgecolor(color)
                side.set_linewidth(3)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("query", fontsize=8)
    for c in range(1, GRID_TOP + 1):
        axes[0, c].set_title(f"top {c}", fontsize=8)
    fig.suptitle(f"{method}: each query's most helpful training images (green: same style)", fontsize=9)
    return save_figure(fig, path)
