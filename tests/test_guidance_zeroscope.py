"""Zeroscope video SDS on a tiny random-weight UNet3DConditionModel + SD-style VAE/CLIP, loaded from disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import save_tiny_zeroscope, tiny_zeroscope_config

from fourdfy.clock import Moment
from fourdfy.guidance.base import Guidance
from fourdfy.guidance.configs import ZeroscopeConfig
from fourdfy.guidance.memory import encode_latents
from fourdfy.guidance.zeroscope import ZeroscopeGuidance, ZeroscopeModels
from fourdfy.render.cameras import Cameras, cameras_from_spherical

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels

PROMPT = "a dog riding a skateboard"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_zeroscope(tmp_path_factory.mktemp("zeroscope") / "zs", seed=2)


@pytest.fixture(scope="module")
def guidance(model_dir: Path) -> ZeroscopeGuidance:
    return ZeroscopeGuidance.from_config(tiny_zeroscope_config(model_dir), seed=0)


def S3(step: int) -> Moment:
    """A stage-3 moment at a stage-local step."""
    return Moment(step, 3, step)


def _variant(g: ZeroscopeGuidance, **changes: object) -> ZeroscopeGuidance:
    """Another prior over the same loaded networks with some config fields changed."""
    models = ZeroscopeModels(g.unet, g.vae, g.text.tokenizer, g.text.text_encoder, g.schedule)
    return ZeroscopeGuidance(dataclasses.replace(g.cfg, **changes), models, seed=0)


def _video_camera(azimuth: float = 0.0, n: int = 4) -> Cameras:
    return cameras_from_spherical(10.0, torch.full((n,), azimuth), 3.0, 40.0)


def test_is_a_guidance_with_the_authors_defaults(guidance: ZeroscopeGuidance) -> None:
    assert isinstance(guidance, Guidance)
    assert (
        guidance.is_video and guidance.n_views == guidance.n_frames == 4 and guidance.native_size == (16, 24)
    )
    assert (guidance.min_step, guidance.max_step) == (20, 980)  # t ~ U{20..980}
    cfg = ZeroscopeConfig()
    assert (cfg.n_frames, cfg.render_height, cfg.render_width, cfg.image_height, cfg.image_width) == (
        16,
        160,
        288,
        320,
        576,
    )
    assert (cfg.guidance_scale, cfg.loss_weight, cfg.view_prompts.front_threshold) == (100.0, 0.1, 45.0)
    assert cfg.pretrained_model == "cerspense/zeroscope_v2_576w"


def test_call_gives_finite_loss_and_gradient_on_every_frame(guidance: ZeroscopeGuidance) -> None:
    renders = torch.rand(4, 16, 24, 3, requires_grad=True)
    out = guidance(renders, PROMPT, _video_camera(), torch.linspace(0, 0.2, 4), step=S3(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(renders.grad).all() and (renders.grad.abs().sum((1, 2, 3)) > 0).all()
    assert 20 <= out.stats["t"] <= 980


def test_latents_are_frames_encoded_one_by_one(guidance: ZeroscopeGuidance) -> None:
    g = _variant(guidance, sample_posterior=False)
    renders = torch.rand(4, 16, 24, 3)
    latents = g.encode(renders)
    assert latents.shape == (1, 4, 4, 4, 6)
    with torch.no_grad():
        x = F.interpolate(renders.permute(0, 3, 1, 2), (32, 48), mode="bilinear", align_corners=False)
        for k in range(4):  # each frame alone through the VAE: mean × 0.18215
            mean = g.vae.encode(x[k : k + 1] * 2 - 1).latent_dist.mean
            torch.testing.assert_close(latents[0, :, k], mean[0] * 0.18215, rtol=1e-5, atol=1e-6)


def test_video_sds_matches_an_independent_computation(guidance: ZeroscopeGuidance) -> None:
    """0.1·(1−ᾱ)(ε_c + 100(ε_c − ε_u) − ε) with the 45° view-dependent prompt, on the latents."""
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(1, 4, 4, 4, 6, generator=gen)
    noise = torch.randn(1, 4, 4, 4, 6, generator=gen)
    t = 700
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    a = float(np.cumprod(1.0 - betas)[t])
    z_t = a**0.5 * z + (1 - a) ** 0.5 * noise
    tok, enc = guidance.text.tokenizer, guidance.text.text_encoder
    with torch.no_grad():
        # azimuth 40°: "front" with Zeroscope's 45° threshold (it would be "side" at SD's 30°).
        ids = tok([PROMPT + ", front view", ""], padding="max_length", max_length=77, return_tensors="pt")
        emb = enc(ids.input_ids)[0]
        eps = guidance.unet(torch.cat([z_t, z_t]), torch.tensor([t, t]), encoder_hidden_states=emb).sample
    eps_c, eps_u = eps[:1], eps[1:]
    expected = 0.1 * (1 - a) * (eps_c + 100.0 * (eps_c - eps_u) - noise)

    latents = z.clone().requires_grad_(True)
    out = guidance.loss_on_latents(latents, PROMPT, _video_camera(40.0), t=t, noise=noise)
    out.loss.backward()
    torch.testing.assert_close(latents.grad, expected, rtol=1e-4, atol=1e-6)
    assert out.loss.item() == pytest.approx(0.1 * 0.5 * ((expected / 0.1) ** 2).sum().item(), rel=1e-4)


def test_backprop_through_only_some_frames(guidance: ZeroscopeGuidance) -> None:
    g = _variant(guidance, vae_grad_frames=2)
    renders = torch.rand(4, 16, 24, 3, requires_grad=True)
    g(renders, PROMPT, _video_camera(), torch.zeros(4), S3(0)).loss.backward()
    with_grad = (renders.grad.abs().sum((1, 2, 3)) > 0).sum().item()
    assert with_grad == 2
    # The values do not depend on which frames keep a graph.
    x = torch.rand(4, 3, 32, 48)
    torch.testing.assert_close(
        encode_latents(g.vae, x, None, [True, False, False, True]),
        encode_latents(g.vae, x, None),
        rtol=0,
        atol=1e-6,
    )


def test_exact_resume_from_state_dict(guidance: ZeroscopeGuidance) -> None:
    renders = torch.rand(4, 16, 24, 3)
    state = guidance.state_dict()
    first = guidance(renders, PROMPT, _video_camera(), torch.zeros(4), S3(0))
    guidance.load_state_dict(state)
    again = guidance(renders, PROMPT, _video_camera(), torch.zeros(4), S3(0))
    assert first.loss.item() == again.loss.item() and first.stats == again.stats
    assert guidance.finetune_step(renders, PROMPT, _video_camera(), S3(0)) == {}
    assert again.latents is None  # no fine-tuning step, nothing handed over; the keyword is accepted
    assert guidance.finetune_step(renders, PROMPT, _video_camera(), S3(0), latents=again.latents) == {}


def test_bad_inputs_raise_value_errors(guidance: ZeroscopeGuidance) -> None:
    with pytest.raises(ValueError, match="n_frames=4"):
        guidance(torch.rand(3, 16, 24, 3), PROMPT, _video_camera(n=3), torch.zeros(3), S3(0))
    with pytest.raises(ValueError, match="16x24"):
        guidance(torch.rand(4, 24, 16, 3), PROMPT, _video_camera(), torch.zeros(4), S3(0))
    with pytest.raises(ValueError, match="one camera per frame"):
        guidance(torch.rand(4, 16, 24, 3), PROMPT, _video_camera(n=1), torch.zeros(4), S3(0))
    with pytest.raises(ValueError, match=r"guidance\.zeroscope\.vae_grad_frames"):
        _variant(guidance, vae_grad_frames=5)
    with pytest.raises(ValueError, match=r"guidance\.zeroscope\.n_frames must be >= 1"):
        ZeroscopeConfig(n_frames=0).validate()
    with pytest.raises(ValueError, match=r"guidance\.zeroscope\.min_step_percent"):
        ZeroscopeConfig(min_step_percent=0.5, max_step_percent=0.2).validate()


def test_bfloat16_weights_work(model_dir: Path) -> None:
    """Half-precision weights with fp32 renders (a dtype mismatch here once broke the GPU path)."""
    g = ZeroscopeGuidance.from_config(tiny_zeroscope_config(model_dir), dtype=torch.bfloat16)
    assert g.unet.dtype == torch.bfloat16
    renders = torch.rand(4, 16, 24, 3, requires_grad=True)
    out = g(renders, PROMPT, _video_camera(), torch.zeros(4), S3(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and (renders.grad.abs().sum((1, 2, 3)) > 0).all()
