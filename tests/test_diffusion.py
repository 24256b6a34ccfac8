"""Issue 16: a LoRA-tuned diffusers UNet through pyinf's capture, every method and store, Forward-INF, CPU.

* per-sample gradients of the seeded denoising loss (`pyinf.diffusion.DenoisingLoss`) from the one
  batched backward equal batch-size-1 autograd with the same draws, for a batch whose samples have
  different timesteps, K = 1 and K = 2;
* the loss is a function of the sample alone (its index seeds its draws): not of the batch it lands in;
* `Attributor` scores equal `pyinf.influence` on the captured gradients for every method and store;
  kfac / ekfac (which need the capture's token statistics) agree across stores and with a dense K-FAC
  built from those statistics;
* Forward-INF with SGD at a small lr matches tracin to first order;
* bad batches and options are ValueErrors that name the problem;
* a bf16 UNet through the Triton per-sample outer-product kernel (TRITON_INTERPRET=1 on the CPU).

The model (`tiny_models.tiny_unet_lora`): 8x8 latents, 4 transformer blocks (8 attention modules,
self- and cross-attention), LoRA r = 4 on to_q, to_k, to_v, to_out.0: 64 blocks.
"""
from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

import pyinf
from pyinf.attributor import Attributor
from pyinf.capture import GradientCapture, per_sample_grads
from pyinf.diffusion import DenoisingLoss
from pyinf.forward import forward_influence
from pyinf.methods import METHODS

pytest.importorskip("diffusers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # tiny_models, under --import-mode=importlib
from tiny_models import (  # noqa: E402
    UNET_TARGETS, image_batches, lora_modules, make_image_batch, single_sample_grads, tiny_unet_lora, unet_task,
)

SHAPE = (4, 8, 8)  # one latent
BATCH = 4          # 6 training samples -> batches 4, 2 = the chunks of every store with chunk_size=4
N_TRAIN = 6
OPTIONS = {"lissa": {"iterations": 2, "scale": 1e3}}  # store "none" captures once per iteration


@pytest.fixture(scope="module")
def unet():
    return tiny_unet_lora(seed=0)  # training mode: the capture must turn nothing random on


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| over max |ref| (of one block, all samples)."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


# -- the model is what diffusers' LoRA script trains ---------------------------------------------
def test_tiny_unet_is_set_up_like_the_diffusers_lora_script(unet):
    from diffusers import UNet2DConditionModel

    assert isinstance(unet, UNet2DConditionModel) and unet.training
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = {n.split(".lora_")[0] for n in trainable}
    assert {next((t for t in UNET_TARGETS if ln.endswith("." + t)), ln) for ln in layers} == set(UNET_TARGETS)
    mods = lora_modules(unet)
    assert len(mods) == 64  # 8 attention modules x 4 projections x (A, B)
    assert all(float(m.weight.detach().abs().max()) > 0 for m, _ in mods.values())  # B nonzero: g_A is not degenerate
    blocks = GradientCapture(unet).blocks
    assert {b.name for b in blocks} == set(mods)
    cross_k = [b for b in blocks if b.name.endswith("attn2.to_k.lora_A.default")]
    assert cross_k and all(b.cols == 12 for b in cross_k)  # to_k of cross-attention reads the text embeddings


# -- the loss ---------------------------------------------------------------------------------------
def test_denoising_loss_is_a_function_of_the_sample_alone(unet):
    """A sample's loss does not depend on the batch it is in, nor its position there: its draws come from
    (seed, index, draw); another seed draws other noise."""
    loss = DenoisingLoss(draws=2, seed=5)
    batch = make_image_batch(B=4, seed=0, start=20)
    unet.eval()
    try:
        with torch.no_grad():
            whole = loss(unet, batch)
            perm = [2, 0, 3, 1]
            shuffled = loss(unet, {k: v[perm] for k, v in batch.items()})
            alone = torch.cat([loss(unet, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(4)])
            other = DenoisingLoss(draws=2, seed=6)(unet, batch)
    finally:
        unet.train()
    assert whole.shape == (4,) and whole.dtype == torch.float32
    assert torch.allclose(shuffled, whole[perm], rtol=1e-5, atol=0)
    assert torch.allclose(alone, whole, rtol=1e-5, atol=0)
    assert not torch.allclose(other, whole, rtol=1e-2, atol=0)
    n1, t1 = loss.draw(batch["index"], SHAPE)
    n2, t2 = loss.draw(batch["index"], SHAPE)
    assert torch.equal(n1, n2) and torch.equal(t1, t2) and n1.shape == (2, 4, *SHAPE) and t1.shape == (2, 4)


def test_timestep_window():
    loss = DenoisingLoss(draws=3, seed=0, timesteps=(100, 110))
    _, t = loss.draw(torch.arange(50), SHAPE)
    assert int(t.min()) >= 100 and int(t.max()) < 110 and len(set(t.flatten().tolist())) > 1


# -- (a) per-sample gradients = batch-size-1 autograd -----------------------------------------------
@pytest.mark.parametrize("draws", [1, 2])
def test_per_sample_grads_equal_batch_size_1_autograd(unet, draws):
    loss = DenoisingLoss(draws=draws, seed=3)
    batch = make_image_batch(B=4, seed=0, start=10)
    _, t = loss.draw(batch["index"], SHAPE)
    assert all(len(set(t[k].tolist())) == 4 for k in range(draws)), t  # every sample its own timestep
    got = per_sample_grads(unet, batch, loss=loss)
    ref = single_sample_grads(unet, batch, lora_modules(unet), loss=loss)
    assert set(got) == set(ref) and len(got) == 64
    worst = 0.0
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape and g.shape[0] == 4 and g.dtype == torch.float32
        assert float(r.abs().max()) > 0, name
        worst = max(worst, _rel_err(g, r))
    print(f"K={draws}: max |capture − autograd| / max |autograd| over 64 blocks: {worst:.2e}")
    assert worst <= 1e-5, worst


# -- (b) every method, every store --------------------------------------------------------------------
class Setup:
    """The UNet, its training and query batches, and their captured gradients (cached across tests)."""

    def __init__(self, model):
        self.model = model
        self.task = unet_task(draws=1)  # K = 2 is covered by the gradient test; every pass here is a capture
        self.train = image_batches(N_TRAIN, BATCH, seed=0)
        self.queries = image_batches(3, 2, seed=1)
        self._grads = {}

    def grads(self, which):
        if which not in self._grads:
            batches, loss = ((self.train, self.task.train_loss) if which == "train"
                             else (self.queries, self.task.query_loss))
            with GradientCapture(self.model, loss=loss) as cap:
                parts = [cap(b) for b in batches]
            self._grads[which] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self._grads[which]


@pytest.fixture(scope="module")
def setup(unet):
    return Setup(unet)


def _store(kind, tmp_path):
    return f"disk:{tmp_path / 'grads'}" if kind == "disk" else kind


@pytest.mark.filterwarnings("ignore:lissa.*did not reach")
@pytest.mark.parametrize("store", ["cpu", "none", "disk"])
@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if not cls.needs_factors))
def test_scores_equal_influence(setup, method, store, tmp_path):
    att = Attributor(setup.model, method=method, task=setup.task, store=_store(store, tmp_path),
                     chunk_size=BATCH, progress=False, **OPTIONS.get(method, {}))
    att.fit(setup.train)
    assert att.n == N_TRAIN
    got = att.score(setup.queries)
    ref = pyinf.influence(setup.grads("train"), setup.grads("query"), method=method, chunk_size=BATCH,
                          **OPTIONS.get(method, {}))
    assert got.shape == (3, N_TRAIN) and got.dtype == torch.float32 and bool((ref != 0).any())
    assert torch.equal(got, ref), (got - ref).abs().max()


def test_capture_gradients_then_attributor(setup):
    """The two-step API (`capture_gradients` once, then `Attributor(gradients=...)`) gives the same scores."""
    grads = pyinf.capture_gradients(setup.model, setup.train, task=setup.task, store="cpu", chunk_size=BATCH,
                                    progress=False)
    got = Attributor(setup.model, method="datainf", gradients=grads).score(setup.queries)
    ref = pyinf.influence(setup.grads("train"), setup.grads("query"), method="datainf", chunk_size=BATCH)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("store", ["none", "disk"])
@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if cls.needs_factors))
def test_kfac_stores_agree(setup, method, store, tmp_path):
    """kfac / ekfac read the capture's statistics, which pyinf.influence on tensors has not: every store
    gives the in-memory store's scores."""
    key = f"{method}-cpu"
    if key not in setup._grads:
        setup._grads[key] = Attributor(setup.model, method=method, task=setup.task, store="cpu", chunk_size=BATCH,
                                       progress=False).fit(setup.train).score(setup.queries)
    ref = setup._grads[key]
    got = Attributor(setup.model, method=method, task=setup.task, store=_store(store, tmp_path), chunk_size=BATCH,
                     progress=False).fit(setup.train).score(setup.queries)
    assert ref.shape == (3, N_TRAIN) and torch.isfinite(ref).all() and bool((ref != 0).any())
    assert torch.equal(got, ref)


def test_kfac_matches_dense_reference(setup):
    """kfac on the UNet equals a float64 K-FAC built from its captured statistics and gradients by the dense
    formula: the tokens of a block are the spatial positions (self-attention) or the text tokens
    (cross-attention to_k / to_v), summed over the K draws."""
    att = Attributor(setup.model, method="kfac", task=setup.task, store="cpu", progress=False).fit(setup.train)
    S = att.score(setup.queries).double()
    st, V = att.gradients.store.factors, att.query_grads(setup.queries)
    G = {name: torch.cat([c[name] for _, c in att.gradients.store.chunks()]) for name in V}
    ref = torch.zeros_like(S)
    for name in V:
        gi, j = st.index[name]
        R, C, Ntok = (t[0] for t in st.sums(gi, j, j + 1))
        F = torch.kron(R.double() / Ntok, C.double() / N_TRAIN)
        lam = 0.1 * torch.diagonal(F).mean()
        P = torch.linalg.inv(F + lam * torch.eye(F.shape[0], dtype=torch.float64))
        ref -= V[name].double().reshape(3, -1) @ P @ G[name].double().reshape(N_TRAIN, -1).T
    assert float((S - ref).abs().max() / ref.abs().max()) < 1e-4


# -- (c) Forward-INF -------------------------------------------------------------------------------------
# The tiny UNet's tracin scores are ~1e-3, so a step of lr moves a training loss (~1) by ~lr·1e-3, which
# must stay far above the float32 rounding of two forward passes (~1e-6): measured Pearson 0.9998 at
# lr = 1e-2, 0.975 at 1e-3 (rounding), 0.52 at 1e-4. lr = 1e-2 is still first order (norm ratio 1.0003).
FORWARD_LR = 1e-2


def test_forward_sgd_matches_tracin(setup):
    tracin = Attributor(setup.model, method="tracin", task=setup.task, store="cpu", progress=False)
    tracin = tracin.fit(setup.train).score(setup.queries)
    fwd = forward_influence(setup.model, setup.train, setup.queries, lr=FORWARD_LR, loss=setup.task.train_loss,
                            measurement=setup.task.measurement, batch_size=BATCH, progress=False)
    assert fwd.shape == (3, N_TRAIN) and fwd.dtype == torch.float32
    pearson = float(torch.corrcoef(torch.stack([fwd.flatten(), tracin.flatten()]))[0, 1])
    ratio = float(fwd.norm() / tracin.norm())
    print(f"forward (sgd, lr {FORWARD_LR:g}) vs tracin on the UNet: Pearson {pearson:.5f}, norm ratio {ratio:.4f}")
    assert pearson >= 0.99, pearson
    assert 0.9 < ratio < 1.1  # same sign and scale: ≈ −⟨v_j, g_i⟩
    via_attributor = Attributor(setup.model, method="forward", task=setup.task, lr=FORWARD_LR, batch_size=BATCH,
                                progress=False).fit(setup.train).score(setup.queries)
    assert torch.allclose(via_attributor, fwd, rtol=1e-4, atol=1e-4 * float(fwd.abs().max()))


# -- (d) bad input ---------------------------------------------------------------------------------------
def test_bad_batches_are_named(unet):
    loss = DenoisingLoss()
    good = make_image_batch(B=2)
    cases = [
        ({k: v for k, v in good.items() if k != "encoder_hidden_states"}, r"has no \['encoder_hidden_states'\]"),
        ({k: v for k, v in good.items() if k != "index"}, r"has no \['index'\].*seeds its draws"),
        ({**good, "encoder_hidden_states": good["encoder_hidden_states"][0]}, r"must be \(B, L, d\) with B = 2"),
        ({**good, "encoder_hidden_states": good["encoder_hidden_states"][:1]}, r"must be \(B, L, d\) with B = 2"),
        ({**good, "index": good["index"].float()}, r"'index' must be \(B,\) integers"),
        ({**good, "index": good["index"][:1]}, r"'index' must be \(B,\) integers"),
        ({**good, "pixel_values": good["pixel_values"][:, 0, 0]}, r"must be a float \(B, C, H, W\) tensor"),
        ({**good, "pixel_values": good["pixel_values"][:, :3]}, r"3 channels.*in_channels = 4"),
        ({**good, "encoder_hidden_states": good["encoder_hidden_states"][..., :7]},
         r"text embeddings of width 7.*cross_attention_dim = 12"),
    ]
    for batch, match in cases:
        with pytest.raises(ValueError, match=match):
            Attributor(unet, task=unet_task(), progress=False).fit([batch])
    with pytest.raises(TypeError, match="must be a mapping"):
        loss(unet, [good["pixel_values"]])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="draws must be an integer >= 1"):
        DenoisingLoss(draws=0)
    with pytest.raises(ValueError, match="prediction_type"):
        DenoisingLoss(prediction_type="x0")
    with pytest.raises(ValueError, match="timesteps must satisfy"):
        DenoisingLoss(timesteps=(500, 500))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DenoisingLoss(alphas_cumprod=torch.tensor([0.5, 1.5]))


# -- (e) bf16 through the Triton kernel ------------------------------------------------------------------
def _needs_kernel():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a GPU")


def test_bf16_unet_through_the_triton_kernel():
    """A bf16 UNet's per-sample gradients through the per-sample outer-product kernel equal the batched
    fp32 matmul of the same captured bf16 inputs (to fp32 summation order), and the fp32 model's
    batch-size-1 autograd to what bf16 activations allow."""
    _needs_kernel()
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    loss = DenoisingLoss(draws=1, seed=3)  # K = 2 is the gradient test's; the interpreter is slow
    fp32 = tiny_unet_lora(seed=0)
    bf16 = tiny_unet_lora(seed=0, dtype=torch.bfloat16).to(device)
    batch = make_image_batch(B=3, seed=0, start=10, dtype=torch.bfloat16)
    with GradientCapture(bf16, loss=loss, use_triton=True) as cap:
        assert cap._pick_kernel(torch.device(device)) is not None
        kernel = cap(batch)
    with GradientCapture(bf16, loss=loss, use_triton=False) as cap:
        torch_path = cap(batch)
    ref = single_sample_grads(fp32, {k: v.float() if v.is_floating_point() else v for k, v in batch.items()},
                              lora_modules(fp32), loss=loss)
    kernel_err, worst_cos = 0.0, 1.0
    for name, r in ref.items():
        g = kernel[name].cpu()
        assert g.dtype == torch.float32 and g.shape == r.shape
        kernel_err = max(kernel_err, _rel_err(g, torch_path[name].cpu()))
        cos = torch.nn.functional.cosine_similarity(g.flatten(1).double(), r.flatten(1).double(), dim=1)
        worst_cos = min(worst_cos, float(cos.min()))
    print(f"bf16 UNet, Triton kernel: vs torch path {kernel_err:.2e} (max rel), "
          f"vs fp32 autograd: worst per-sample cosine {worst_cos:.5f}")
    assert kernel_err <= 1e-5, kernel_err
    assert worst_cos >= 0.98, worst_cos
