"""The per-sample denoising loss of a diffusion UNet, deterministic per sample.

A diffusion model's training loss is random (a noise draw and a timestep per
step), but influence needs one fixed function per sample, the same in the
training capture, the query capture, a disk store's reuse check and
Forward-INF's forward passes. `DenoisingLoss` fixes it: sample i's draws
k = 0..K-1 come from a CPU generator seeded by (seed, i, k), so they do not
depend on the batch a sample lands in, its position there, the device or
the other samples, and

    loss_i = (1/K) Σ_k  mean_{c,h,w} (model(x_t, t_k, cond_i) − target)²
    x_t    = √ᾱ(t_k) x_i + √(1 − ᾱ(t_k)) ε_ik,     t_k ~ U{0..T−1}, ε_ik ~ N(0, I)

with target ε_ik (epsilon prediction), the velocity √ᾱ ε − √(1−ᾱ) x
(v_prediction) or x_i (sample), as diffusers' training scripts compute it
(their mean-squared error in float32, here per sample instead of over the
batch). DataInf's stable-diffusion recipe averages over timesteps: K is that
average. The K draws run as K forward calls of the batch, so a per-sample
capture sees each sample on its own rows (no batch-size-1 backward, no
folding of rows).

A batch is a mapping with
    batch[input_key]  (B, C, H, W) images (or VAE latents), float
    batch[cond_key]   (B, L, d) text embeddings, `encoder_hidden_states` as the pipeline passes them
    batch[index_key]  (B,) integer: each sample's global index (what seeds its draws)
Other entries (e.g. a class label) are ignored. Training and query sets
should use different seeds (`Task(train_loss=DenoisingLoss(seed=0),
measurement=DenoisingLoss(seed=1))`) or disjoint indices, so that a query
never shares noise with the training image of the same index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["DenoisingLoss", "sd_alphas_cumprod"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, index, draw) over generator seeds


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ(t), (T,) float64: Stable Diffusion's "scaled_linear" schedule (diffusers' DDPMScheduler default for SD)."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _draw_seed(seed: int, index: int, draw: int) -> int:
    h = (seed * _MIX + index) % (1 << 64)
    h = (h * _MIX + draw + 1) % (1 << 64)
    return h % (1 << 63)


@dataclass(frozen=True)
class DenoisingLoss:
    """`loss(model, batch) -> (B,)` float32: each sample's denoising loss over its K seeded draws (module doc).

    draws: K, noise draws and timesteps averaged per sample (≥ 1);
    seed: what the draws of every sample derive from, with its index;
    alphas_cumprod: ᾱ(t), (T,) (default: Stable Diffusion's schedule, T = 1000); pass a diffusers
        scheduler's `scheduler.alphas_cumprod` to match its training;
    prediction_type: "epsilon", "v_prediction" or "sample" (the scheduler's `config.prediction_type`);
    timesteps: (low, high): t is drawn from U{low..high−1} (default: every timestep).
    """

    draws: int = 1
    seed: int = 0
    alphas_cumprod: torch.Tensor | None = None
    prediction_type: str = "epsilon"
    timesteps: tuple[int, int] | None = None
    input_key: str = "pixel_values"
    cond_key: str = "encoder_hidden_states"
    index_key: str = "index"

    def __post_init__(self):
        if not isinstance(self.draws, int) or self.draws < 1:
            raise ValueError(f"DenoisingLoss: draws must be an integer >= 1, got {self.draws!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"DenoisingLoss: prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        ac = sd_alphas_cumprod() if self.alphas_cumprod is None else torch.as_tensor(self.alphas_cumprod)
        if ac.dim() != 1 or ac.numel() < 1 or not bool(((ac > 0) & (ac <= 1)).all()):
            raise ValueError("DenoisingLoss: alphas_cumprod must be a 1-d tensor of values in (0, 1]")
        object.__setattr__(self, "alphas_cumprod", ac.detach().to("cpu", torch.float64))
        low, high = self.timesteps if self.timesteps is not None else (0, ac.numel())
        if not (0 <= low < high <= ac.numel()):
            raise ValueError(f"DenoisingLoss: timesteps must satisfy 0 <= low < high <= {ac.numel()}, "
                             f"got {self.timesteps}")
        object.__setattr__(self, "timesteps", (int(low), int(high)))

    def draw(self, index: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The draws of samples `index` (B,): noise (K, B, *shape) float32 and timesteps (K, B) int64, on the CPU."""
        idx = [int(i) for i in index.reshape(-1).tolist()]
        low, high = self.timesteps
        noise = torch.empty((self.draws, len(idx), *shape), dtype=torch.float32)
        t = torch.empty((self.draws, len(idx)), dtype=torch.int64)
        g = torch.Generator()
        for k in range(self.draws):
            for b, i in enumerate(idx):
                g.manual_seed(_draw_seed(self.seed, i, k))
                t[k, b] = torch.randint(low, high, (1,), generator=g)
                noise[k, b] = torch.randn(shape, generator=g)
        return noise, t

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        x, cond, index = self._inputs(batch)
        _check_model_shapes(model, x, cond, self.input_key, self.cond_key)
        noise, t = self.draw(index, tuple(x.shape[1:]))
        noise = noise.to(x.device)
        ac = self.alphas_cumprod.to(x.device)
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for k in range(self.draws):
            tk = t[k].to(x.device)
            a = ac[tk].sqrt().view(-1, *([1] * (x.dim() - 1)))
            s = (1.0 - ac[tk]).sqrt().view_as(a)
            xf, eps = x.double(), noise[k].double()
            noisy = (a * xf + s * eps).to(x.dtype)
            if self.prediction_type == "epsilon":
                target = eps
            elif self.prediction_type == "v_prediction":
                target = a * eps - s * xf
            else:
                target = xf
            pred = _sample(model(noisy, tk, encoder_hidden_states=cond))
            if pred.shape != x.shape:
                raise ValueError(f"DenoisingLoss: the model predicts shape {tuple(pred.shape)} for inputs "
                                 f"{tuple(x.shape)}; a denoising UNet returns its input's shape")
            err = pred.float() - target.float()
            total = total + err.square().flatten(1).mean(dim=1)
        return total / self.draws

    def _inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(batch, Mapping):
            raise TypeError(f"DenoisingLoss: a batch must be a mapping, got {type(batch).__name__}")
        missing = [k for k in (self.input_key, self.cond_key, self.index_key) if k not in batch]
        if missing:
            raise ValueError(f"DenoisingLoss: the batch has no {missing} (it has {sorted(batch)}); every "
                             f"sample needs its image '{self.input_key}', its text embeddings "
                             f"'{self.cond_key}' and its global index '{self.index_key}' (which seeds its draws)")
        x, cond, index = batch[self.input_key], batch[self.cond_key], batch[self.index_key]
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 3):
            raise ValueError(f"DenoisingLoss: '{self.input_key}' must be a float (B, C, H, W) tensor")
        if not (isinstance(cond, torch.Tensor) and cond.dim() == 3 and cond.shape[0] == x.shape[0]):
            raise ValueError(f"DenoisingLoss: '{self.cond_key}' must be (B, L, d) with B = {x.shape[0]}, "
                             f"got {tuple(getattr(cond, 'shape', ()))}")
        index = torch.as_tensor(index)
        if index.shape != (x.shape[0],) or index.is_floating_point():
            raise ValueError(f"DenoisingLoss: '{self.index_key}' must be (B,) integers, got {tuple(index.shape)} "
                             f"{index.dtype}")
        return x, cond, index


def _check_model_shapes(model: nn.Module, x: torch.Tensor, cond: torch.Tensor, input_key: str, cond_key: str):
    """Name a batch that does not fit a diffusers UNet's config (its own error is a shape mismatch deep inside)."""
    cfg = getattr(model, "config", None)
    channels = getattr(cfg, "in_channels", None)
    if isinstance(channels, int) and x.shape[1] != channels:
        raise ValueError(f"DenoisingLoss: '{input_key}' has {x.shape[1]} channels but the model's "
                         f"in_channels = {channels} (pass VAE latents to a latent UNet)")
    # the embeddings' width: encoder_hid_dim where the UNet projects them first, else cross_attention_dim
    name, width = "encoder_hid_dim", getattr(cfg, "encoder_hid_dim", None)
    if width is None:
        name, width = "cross_attention_dim", getattr(cfg, "cross_attention_dim", None)
    if isinstance(width, (list, tuple)) and len(set(width)) == 1:
        width = width[0]
    if isinstance(width, int) and cond.shape[-1] != width:
        raise ValueError(f"DenoisingLoss: '{cond_key}' holds text embeddings of width {cond.shape[-1]} but the "
                         f"model's {name} = {width}")


def _sample(output) -> torch.Tensor:
    """A UNet's prediction: diffusers' `UNet2DConditionOutput.sample`, a tuple's first entry, or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"DenoisingLoss: cannot read a prediction from the model's {type(output).__name__}")
