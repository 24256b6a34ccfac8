"""The image task of `pyinf demo --task images`: procedural styles, a tiny LoRA-tuned diffusion UNet.

* `style_images`: small RGB images drawn by seeded code (no download) in 10
  styles; a style is a palette, a texture and a shape, tied to a made-up prompt
  word ("zorbly", ...). Each image jitters its style's frequency, phase, shape
  position and size, colours and pixel noise.
* `generic_images`: the base model's corpus: the same kinds of textures and
  shapes in *random* palettes and combinations, each under a plain prompt
  naming its texture and shape (no style words, no colours), as the LM demo's
  base model learns skills under plain names. The LoRA then binds each made-up
  word to a palette, texture and shape.
* `prompt_embeddings`: fixed seeded text embeddings (L, d) per prompt, what the
  pipeline passes as `encoder_hidden_states`: a shared "a picture of" token and
  one token per word.
* `build_unet`: a diffusers `UNet2DConditionModel` from a small config, random
  init, pre-trained on the generic images, then LoRA-tuned (PEFT on `to_q`,
  `to_k`, `to_v`, `to_out.0`, as diffusers' LoRA training script sets it up) on
  the styles' training images, with `pyinf.diffusion.DenoisingLoss`; cached
  like the LM demo's model (`cache_dir`, `save_atomic`, `rank0_first`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from .model import cache_dir, log, rank0_first, save_atomic, shuffled_batches, train

CODE_VERSION = "tasks-images-2"  # bump when generation or training changes what gets cached

# (made-up prompt word, palette (RGB in [0, 1]: background, foreground, accent), texture, shape)
STYLES = (
    ("zorbly", ((0.95, 0.85, 0.20), (0.80, 0.20, 0.10), (0.10, 0.10, 0.10)), "hstripes", "circle"),
    ("quandle", ((0.10, 0.20, 0.60), (0.60, 0.85, 1.00), (1.00, 1.00, 1.00)), "vstripes", "square"),
    ("mirtop", ((0.10, 0.45, 0.15), (0.70, 0.95, 0.40), (0.95, 0.90, 0.30)), "checker", "none"),
    ("feskel", ((0.95, 0.95, 0.95), (0.90, 0.10, 0.50), (0.20, 0.20, 0.80)), "dots", "triangle"),
    ("brannow", ((0.30, 0.05, 0.35), (0.95, 0.55, 0.10), (1.00, 0.90, 0.60)), "rings", "none"),
    ("trivex", ((0.05, 0.05, 0.05), (0.10, 0.90, 0.90), (0.90, 0.10, 0.90)), "diagonal", "cross"),
    ("plomish", ((0.55, 0.35, 0.20), (0.95, 0.80, 0.60), (0.30, 0.15, 0.05)), "gradient", "circle"),
    ("vantril", ((0.85, 0.90, 0.95), (0.20, 0.30, 0.45), (0.90, 0.30, 0.20)), "waves", "square"),
    ("gostrel", ((0.60, 0.05, 0.05), (0.10, 0.10, 0.10), (0.95, 0.95, 0.20)), "checker", "triangle"),
    ("snibbet", ((0.95, 0.60, 0.70), (0.40, 0.80, 0.50), (1.00, 1.00, 1.00)), "dots", "cross"),
)
TEXTURES = ("hstripes", "vstripes", "checker", "dots", "rings", "diagonal", "gradient", "waves", "plain")
SHAPES = ("none", "circle", "square", "triangle", "cross")
STYLE_WORDS = tuple(s[0] for s in STYLES)


def _texture(kind: str, yy, xx, freq: float, phase: float) -> torch.Tensor:
    """(H, W) in [0, 1]: how much of the foreground colour each pixel takes."""
    w = 2 * math.pi * freq
    if kind == "hstripes":
        return (torch.sin(w * yy + phase) > 0).float()
    if kind == "vstripes":
        return (torch.sin(w * xx + phase) > 0).float()
    if kind == "diagonal":
        return (torch.sin(w * (xx + yy) / math.sqrt(2) + phase) > 0).float()
    if kind == "checker":
        return ((torch.sin(w * xx + phase) > 0) ^ (torch.sin(w * yy + phase) > 0)).float()
    if kind == "dots":
        return ((torch.sin(w * xx + phase) * torch.sin(w * yy + phase)) > 0.5).float()
    if kind == "rings":
        r = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2).sqrt()
        return (torch.sin(2 * w * r + phase) > 0).float()
    if kind == "gradient":
        return ((xx * math.cos(phase) + yy * math.sin(phase)) * 0.7 + 0.15).clamp(0, 1)
    if kind == "waves":
        return (torch.sin(w * yy + 1.5 * torch.sin(w * xx + phase)) > 0).float()
    return torch.zeros_like(xx)  # plain


def _shape(kind: str, yy, xx, cy: float, cx: float, r: float) -> torch.Tensor:
    """(H, W) bool: the pixels of a shape of radius `r` centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy ** 2 + dx ** 2 < r ** 2
    if kind == "square":
        return (dy.abs() < r * 0.85) & (dx.abs() < r * 0.85)
    if kind == "triangle":
        return (dy < r * 0.7) & (dy > -r) & (dx.abs() < (dy + r) * 0.6)
    if kind == "cross":
        return ((dy.abs() < r * 0.3) & (dx.abs() < r)) | ((dx.abs() < r * 0.3) & (dy.abs() < r))
    return torch.zeros_like(xx, dtype=torch.bool)  # none


def render(palette, texture: str, shape: str, size: int, g: torch.Generator) -> torch.Tensor:
    """One image (3, size, size) in [-1, 1] (diffusers' pixel range); the jitter drawn from `g`."""
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    ax = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    bg, fg, accent = (torch.tensor(c, dtype=torch.float32) for c in palette)
    jitter = lambda c: (c + 0.06 * torch.randn(3, generator=g)).clamp(0, 1)  # noqa: E731
    bg, fg, accent = jitter(bg), jitter(fg), jitter(accent)
    t = _texture(texture, yy, xx, freq=u(2.5, 4.5), phase=u(0, 2 * math.pi))
    img = bg[:, None, None] * (1 - t) + fg[:, None, None] * t
    m = _shape(shape, yy, xx, cy=u(0.3, 0.7), cx=u(0.3, 0.7), r=u(0.18, 0.3))
    img = torch.where(m, accent[:, None, None], img)
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def style_images(style: int, n: int, size: int, seed: int, offset: int = 0) -> torch.Tensor:
    """(n, 3, size, size): images number offset..offset+n-1 of style `style` (each seeded by its number)."""
    if not 0 <= style < len(STYLES):
        raise ValueError(f"style must be in 0..{len(STYLES) - 1}, got {style}")
    _, palette, texture, shape = STYLES[style]
    g = torch.Generator()
    out = []
    for i in range(offset, offset + n):
        g.manual_seed(_seed("style", seed, style, i))
        out.append(render(palette, texture, shape, size, g))
    return torch.stack(out) if out else torch.empty(0, 3, size, size)


def generic_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """The base model's corpus: (n, 3, size, size) images in random palettes, textures and shapes, and each
    image's plain prompt (texture, shape): the base learns to draw what plain words say, never a style word."""
    g = torch.Generator()
    out, prompts = [], []
    for i in range(n):
        g.manual_seed(_seed("generic", seed, 0, i))
        palette = torch.rand(3, 3, generator=g).tolist()
        texture = TEXTURES[int(torch.randint(len(TEXTURES), (), generator=g))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (), generator=g))]
        out.append(render(palette, texture, shape, size, g))
        prompts.append((texture, shape))
    return torch.stack(out), prompts


def _seed(kind: str, seed: int, a: int, b: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{kind}-{seed}-{a}-{b}".encode()).digest()[:8], "little") >> 1


def prompt_embeddings(prompts, dim: int, seed: int = 0) -> torch.Tensor:
    """(len(prompts), 1 + W, dim) fixed text embeddings of prompts of W words each: a shared "a picture of"
    token, then one token per word; each a seeded unit-variance Gaussian vector (a tiny text encoder's
    stand-in). A style's prompt is its word twice (`style_prompt`), the base model's its texture and shape."""
    g = torch.Generator().manual_seed(_seed("prefix", seed, dim, 0))
    prefix = torch.randn(1, dim, generator=g)
    out = []
    for words in prompts:
        toks = [prefix]
        for w in words:
            g.manual_seed(_seed(f"word:{w}", seed, dim, 0))
            toks.append(torch.randn(1, dim, generator=g))
        out.append(torch.cat(toks))
    return torch.stack(out)


def style_prompt(word: str) -> tuple[str, str]:
    """A style's prompt: its made-up word in both word slots (the base model's texture and shape slots)."""
    return (word, word)


@dataclass(frozen=True)
class ImageModelConfig:
    """The tiny UNet, its pre-training, its LoRA fine-tune and the denoising loss."""

    size: int = 16
    channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    pretrain_images: int = 2000
    pretrain_epochs: int = 3
    pretrain_lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 8
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    finetune_epochs: int = 20
    finetune_lr: float = 3e-3
    batch_size: int = 32
    draws: int = 2  # K: denoising draws per sample in the influence loss (training draws one per step)
    timesteps: tuple[int, int] = (900, 1000)  # the influence loss's timestep window (module doc of demo)


def make_unet(cfg: ImageModelConfig):
    """A randomly initialised diffusers `UNet2DConditionModel` of `cfg`'s size: cross-attention in the
    lower-resolution blocks and the middle block (attention at full resolution is what costs on a CPU)."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=cfg.size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=tuple(cfg.channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=8,
    )


def add_lora(unet, cfg: ImageModelConfig):
    """`unet` with a PEFT LoRA adapter on its attention projections, as diffusers' LoRA script adds it
    (`unet.add_adapter`, gaussian init of A, B = 0); only the adapter is trainable."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.lora_targets)))
    return unet


def training_loss(cfg: ImageModelConfig, seed: int):
    """The loss the model trains on: one fresh draw per sample and step (seeded by the step's index offset)."""
    from ..diffusion import DenoisingLoss

    step = [0]

    def loss(model, batch):
        step[0] += 1
        return DenoisingLoss(draws=1, seed=seed * 100003 + step[0])(model, batch)

    return loss


def influence_losses(cfg: ImageModelConfig, draws: int | None = None, timesteps=None):
    """(training loss, query measurement) of the attribution: `DenoisingLoss` with K draws in the timestep
    window, seeds 0 and 1 (a query never shares noise with the training image of its index)."""
    from ..diffusion import DenoisingLoss

    k = cfg.draws if draws is None else draws
    window = tuple(cfg.timesteps if timesteps is None else timesteps)
    return DenoisingLoss(draws=k, seed=0, timesteps=window), DenoisingLoss(draws=k, seed=1, timesteps=window)


def image_batch(images: torch.Tensor, cond: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict:
    """A batch as `DenoisingLoss` reads it: pixel_values (B, 3, H, W), encoder_hidden_states (B, L, d),
    index (B,) (what seeds each sample's draws), labels (B,) (the style; ignored by the loss)."""
    return {"pixel_values": images, "encoder_hidden_states": cond, "index": index, "labels": labels}


def batches_of(images, cond, labels, bs: int, start: int = 0) -> list[dict]:
    """Consecutive batches of `bs`; sample k has global index start + k."""
    idx = torch.arange(start, start + len(images))
    return [image_batch(images[k : k + bs], cond[k : k + bs], labels[k : k + bs], idx[k : k + bs])
            for k in range(0, len(images), bs)]


@dataclass
class ImageData:
    """The styles' training and test images (class-major: style 0's n_train, style 1's, ...)."""

    train: torch.Tensor  # (10 n_train, 3, H, W)
    test: torch.Tensor  # (10 n_test, 3, H, W)
    train_labels: torch.Tensor  # (10 n_train,)
    test_labels: torch.Tensor  # (10 n_test,)
    embeddings: torch.Tensor  # (10, L, d): each style's prompt
    words: tuple[str, ...]

    def cond(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, L, d): the prompt embeddings of styles `labels` (B,)."""
        return self.embeddings[labels]


def style_data(n_train: int, n_test: int, cfg: ImageModelConfig, seed: int) -> ImageData:
    """Every style's n_train training and n_test held-out test images (disjoint draws), with the prompts."""
    train = torch.cat([style_images(k, n_train, cfg.size, seed) for k in range(len(STYLES))])
    test = torch.cat([style_images(k, n_test, cfg.size, seed, offset=n_train) for k in range(len(STYLES))])
    labels = lambda n: torch.arange(len(STYLES)).repeat_interleave(n)  # noqa: E731
    emb = prompt_embeddings([style_prompt(w) for w in STYLE_WORDS], cfg.cross_attention_dim, seed)
    return ImageData(train, test, labels(n_train), labels(n_test), emb, STYLE_WORDS)


def _key(cfg: ImageModelConfig, seed: int, data: ImageData) -> str:
    """The cache key: what the training depends on (the influence loss's K and window do not change the model)."""
    digest = hashlib.sha256(data.train.numpy().tobytes()).hexdigest()
    training = {k: v for k, v in asdict(cfg).items() if k not in ("draws", "timesteps")}
    blob = json.dumps({"cfg": training, "seed": seed, "code": CODE_VERSION, "data": digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_unet(data: ImageData, cfg: ImageModelConfig = ImageModelConfig(), *, seed: int = 0,
               cache: str | os.PathLike | None = None, use_cache: bool = True, progress: bool | None = None):
    """(LoRA-tuned UNet in eval mode, info dict): trained, or loaded from the cache (`$PYINF_CACHE/images/KEY`).

    Under a process group with the cache on, rank 0 trains and writes the cache first (`rank0_first`).
    """
    return rank0_first(lambda: _build_unet(data, cfg, seed=seed, cache=cache, use_cache=use_cache,
                                           progress=progress), use_cache)


def _build_unet(data: ImageData, cfg: ImageModelConfig, *, seed: int, cache, use_cache: bool, progress):
    key = _key(cfg, seed, data)
    path = cache_dir(cache) / "images" / key / "unet.pt"
    torch.manual_seed(seed)
    unet = make_unet(cfg)
    if use_cache and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        add_lora(unet, cfg)
        unet.load_state_dict(state["state_dict"])
        unet.eval()
        log(f"loaded the LoRA-tuned UNet from the cache {path}", progress)
        return unet, {**state["info"], "cached": True, "cache_path": str(path)}
    t0 = time.perf_counter()
    plain, prompts = generic_images(cfg.pretrain_images, cfg.size, seed)
    cond = prompt_embeddings(prompts, cfg.cross_attention_dim, seed)
    zeros = torch.zeros(len(plain), dtype=torch.long)
    make = lambda rows: image_batch(plain[rows], cond[rows], zeros[rows], torch.tensor(rows))  # noqa: E731
    pre_loss = train(unet, shuffled_batches(list(range(len(plain))), cfg.batch_size, make), cfg.pretrain_epochs,
                     cfg.pretrain_lr, "pre-train the UNet", progress, seed, loss_fn=training_loss(cfg, seed))
    t1 = time.perf_counter()
    log(f"pre-trained the UNet on {len(plain)} generic images: loss {pre_loss:.3f} ({t1 - t0:.1f} s)", progress)
    torch.manual_seed(seed + 1)
    add_lora(unet, cfg)
    make = lambda rows: image_batch(data.train[rows], data.cond(data.train_labels[rows]),  # noqa: E731
                                    data.train_labels[rows], torch.tensor(rows))
    ft_loss = train(unet, shuffled_batches(list(range(len(data.train))), cfg.batch_size, make),
                    cfg.finetune_epochs, cfg.finetune_lr, "LoRA fine-tune the UNet", progress, seed + 1,
                    loss_fn=training_loss(cfg, seed + 1))
    t2 = time.perf_counter()
    log(f"LoRA-fine-tuned on {len(data.train)} style images: loss {ft_loss:.3f} ({t2 - t1:.1f} s)", progress)
    info = {"pretrain_loss": pre_loss, "finetune_loss": ft_loss, "pretrain_seconds": t1 - t0,
            "finetune_seconds": t2 - t1, "config": asdict(cfg), "seed": seed, "code_version": CODE_VERSION,
            "key": key}
    if use_cache:
        save_atomic({"state_dict": unet.state_dict(), "info": info}, path)
    return unet, {**info, "cached": False, "cache_path": str(path)}
