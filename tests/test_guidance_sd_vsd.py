"""VSD with a tiny ε UNet (pretrained branch) and a tiny v-prediction UNet + LoRA (fine-tuned branch);
also the shared prompt code (view-dependent prompts, caching)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import save_tiny_sd, tiny_sd_vsd_config

from fourdfy.clock import Moment
from fourdfy.guidance.base import Guidance
from fourdfy.guidance.configs import SDVSDConfig, ViewPromptConfig
from fourdfy.guidance.sd_vsd import SDVSDGuidance
from fourdfy.guidance.text import BACK, FRONT, OVERHEAD, SIDE, view_direction
from fourdfy.render.cameras import Cameras, cameras_from_spherical

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels

PROMPT = "a panda eating ice cream"


def S2(step: int) -> Moment:
    """A stage-2 moment at a stage-local step."""
    return Moment(step, 2, step)


def _alphas_cumprod_numpy() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd")
    return save_tiny_sd(root / "sd-base", "epsilon", seed=0), save_tiny_sd(
        root / "sd-v", "v_prediction", seed=1
    )


@pytest.fixture
def vsd(dirs: tuple[Path, Path]) -> SDVSDGuidance:
    """A fresh prior per test (fine-tuning changes its LoRA)."""
    return SDVSDGuidance.from_config(tiny_sd_vsd_config(*dirs), seed=0)


def _camera(azimuth: float = 0.0) -> Cameras:
    return cameras_from_spherical(20.0, azimuth, 2.8, 40.0)


def _frozen_params(g: SDVSDGuidance) -> dict[str, torch.Tensor]:
    """Every parameter that must never train (the LoRA UNet's base weights included), by unique name."""
    named = {f"unet.{k}": v for k, v in g.unet.named_parameters()}
    named |= {f"unet_lora.{k}": v for k, v in g.unet_lora.named_parameters()}
    named |= {f"vae.{k}": v for k, v in g.vae.named_parameters()}
    named |= {f"text.{k}": v for k, v in g.text.text_encoder.named_parameters()}
    return {k: v for k, v in named.items() if "lora_" not in k and ".class_embedding." not in k}


# ---------------------------------------------------------------- prompts


def test_view_direction_thresholds() -> None:
    cfg = ViewPromptConfig(front_threshold=30.0, back_threshold=30.0)
    azimuth = torch.tensor([0.0, 29.0, 31.0, -29.0, 90.0, 151.0, -151.0, 180.0, 360.0, 0.0])
    elevation = torch.tensor([10.0] * 9 + [70.0])
    expected = [FRONT, FRONT, SIDE, FRONT, SIDE, BACK, BACK, BACK, FRONT, OVERHEAD]
    assert view_direction(elevation, azimuth, cfg).tolist() == expected
    # Zeroscope's 45°: 40° is still "front".
    assert view_direction(torch.tensor([10.0]), torch.tensor([40.0]), ViewPromptConfig()).tolist() == [FRONT]


def test_prompt_embeddings_are_cached(vsd: SDVSDGuidance) -> None:
    calls = []
    handle = vsd.text.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = vsd.text.encode([PROMPT, "x"])
        second = vsd.text.encode(["x", PROMPT])
    finally:
        handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(first, second.flip(0), rtol=0, atol=0)
    assert first.shape == (2, 77, 32)


def test_too_long_prompt_is_a_clear_error(vsd: SDVSDGuidance) -> None:
    with pytest.raises(ValueError, match="at most 77"):
        vsd(torch.rand(1, 32, 32, 3), "a very " * 40 + "long prompt", _camera(), torch.zeros(1), S2(0))


# ---------------------------------------------------------------- VSD loss


def test_is_a_guidance_with_the_authors_defaults(vsd: SDVSDGuidance) -> None:
    assert isinstance(vsd, Guidance)
    assert vsd.n_views == 1 and vsd.native_size == (32, 32) and not vsd.is_video
    assert vsd.timestep_range(S2(0)) == (20, 980) and vsd.timestep_range(S2(5000)) == (20, 980)
    assert vsd.timestep_range(S2(5001)) == (20, 500)  # max_step_percent_annealed after anneal_start_step
    assert vsd.timestep_range(Moment(0, 3, 0)) == (20, 500)
    assert vsd.lora_v_prediction and not vsd.shared
    cfg = SDVSDConfig()
    assert (cfg.guidance_scale, cfg.lora_rank, cfg.lora_lr, cfg.render_size, cfg.image_size) == (
        7.5,
        4,
        1e-4,
        256,
        512,
    )
    assert cfg.view_prompts.front_threshold == 30.0
    assert cfg.lora_pretrained_model == "stabilityai/stable-diffusion-2-1"


def test_call_gives_finite_loss_and_gradient_on_renders(vsd: SDVSDGuidance) -> None:
    renders = torch.rand(1, 32, 32, 3, requires_grad=True)
    out = vsd(renders, PROMPT, _camera(), torch.zeros(1), step=S2(5001))  # t_max annealed to 0.5 after 5000
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(renders.grad).all() and renders.grad.abs().sum() > 0
    assert 20 <= out.stats["t"] <= 500


def test_vsd_gradient_matches_an_independent_computation(vsd: SDVSDGuidance) -> None:
    """w(t)(ε_pre,cfg − ε_lora) with the view-dependent prompt, CFG 7.5, v→ε and a zero uncond camera."""
    for _ in range(2):  # train the LoRA a little so that it (and the camera embedding) matter
        vsd.finetune_on_latents(torch.randn(1, 4, 8, 8), PROMPT, _camera())
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    t, cam = 300, _camera(azimuth=170.0)  # back view
    # ᾱ_t as the prior uses it, rounded to float32: a float64 ᾱ differs by ~6e-8 relative, which CFG 7.5 and
    # the UNet amplify past float32 round-off (1.7e-6 at one element was seen on one CPU).
    a = float(np.float32(_alphas_cumprod_numpy()[t]))
    z_t = a**0.5 * z + (1 - a) ** 0.5 * noise

    tok, enc = vsd.text.tokenizer, vsd.text.text_encoder
    with torch.no_grad():
        prompts = [PROMPT + ", back view", "", PROMPT]
        emb = enc(tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
        tt = torch.tensor([t, t])
        pre = vsd.unet(torch.cat([z_t, z_t]), tt, encoder_hidden_states=emb[[0, 1]]).sample
        eps_pre = pre[1] + 7.5 * (pre[0] - pre[1])
        labels = torch.cat([cam.c2w.reshape(1, 16), torch.zeros(1, 16)])
        v = vsd.unet_lora(
            torch.cat([z_t, z_t]), tt, encoder_hidden_states=emb[[2, 1]], class_labels=labels
        ).sample
        eps_lora = (a**0.5 * v + (1 - a) ** 0.5 * torch.cat([z_t, z_t]))[0]  # scale 1.0: the cond half
    expected = (1 - a) * (eps_pre - eps_lora)

    latents = z.clone().requires_grad_(True)
    vsd.loss_on_latents(latents, PROMPT, cam, t=torch.tensor([t]), noise=noise).loss.backward()
    # Both sides are float32 through the same networks; only the summation order of their kernels may differ
    # (by CPU and SIMD width): a few float32 ulps of the largest terms, far below a wrong formula's error.
    scale = float(expected.abs().max())
    torch.testing.assert_close(latents.grad[0], expected, rtol=1e-4, atol=64 * torch.finfo(torch.float32).eps * scale)


# ---------------------------------------------------------------- LoRA fine-tuning


def test_finetune_trains_lora_and_camera_embedding_only(vsd: SDVSDGuidance) -> None:
    lora_before = {k: v.detach().clone() for k, v in vsd.lora_params.items()}
    camera_before = {k: v.detach().clone() for k, v in vsd.camera_embedding.state_dict().items()}
    frozen_before = {k: v.detach().clone() for k, v in _frozen_params(vsd).items()}
    renders = torch.rand(1, 32, 32, 3)
    for step in range(3):
        out = vsd(renders, PROMPT, _camera(), torch.zeros(1), S2(step))
        stats = vsd.finetune_step(renders, PROMPT, _camera(), S2(step), latents=out.latents)
        assert np.isfinite(stats["lora_loss"]) and np.isfinite(out.loss.item())
    assert len(lora_before) > 0
    for name, before in lora_before.items():
        assert not torch.equal(before, vsd.lora_params[name]), f"LoRA tensor {name} did not change"
        assert vsd.lora_params[name].dtype == torch.float32
    for name, before in camera_before.items():
        assert not torch.equal(before, vsd.camera_embedding.state_dict()[name]), (
            f"camera {name} did not change"
        )
    frozen_now = _frozen_params(vsd)
    assert len(frozen_now) == len(frozen_before) > 100
    for name, before in frozen_before.items():
        assert torch.equal(before, frozen_now[name]), f"frozen {name} changed"
        assert not frozen_now[name].requires_grad
    # The optimiser holds exactly the LoRA and camera-embedding parameters.
    trained = {id(p) for group in vsd.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in vsd.lora_params.values()} | {id(p) for p in vsd.camera_embedding.parameters()}
    assert trained == expected


def test_finetune_step_trains_on_the_handed_latents(vsd: SDVSDGuidance, dirs: tuple[Path, Path]) -> None:
    """`GuidanceOut.latents` are the call's detached latents; finetune_step uses them as they are (no second
    VAE pass, no posterior draw) and encodes the renders itself only when it is given none."""
    encodes = []
    handle = vsd.vae.encoder.register_forward_hook(lambda *args: encodes.append(1))
    try:
        renders = torch.rand(1, 32, 32, 3, requires_grad=True)
        out = vsd(renders, PROMPT, _camera(), torch.zeros(1), S2(0))
        assert len(encodes) == 1
        assert out.latents is not None and out.latents.shape == (1, 4, 8, 8) and not out.latents.requires_grad
        replay = SDVSDGuidance.from_config(tiny_sd_vsd_config(*dirs), seed=1)
        replay.load_state_dict(vsd.state_dict())  # same LoRA, optimiser and generator state
        expected = replay.finetune_on_latents(out.latents.clone(), PROMPT, _camera())
        assert vsd.finetune_step(renders.detach(), PROMPT, _camera(), S2(0), latents=out.latents) == expected
        assert len(encodes) == 1  # the handed latents were not encoded again
        vsd.finetune_step(renders.detach(), PROMPT, _camera(), S2(1))  # none handed: encoded here
        assert len(encodes) == 2
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="one latent per render"):
        vsd.finetune_step(renders.detach(), PROMPT, _camera(), S2(2), latents=torch.zeros(2, 4, 8, 8))


def test_camera_dropout_zeroes_the_camera(vsd: SDVSDGuidance) -> None:
    """With dropout 1 the camera input is 0, so linear_1's weight gets no gradient: AdamW only decays it."""
    vsd.cfg = dataclasses.replace(vsd.cfg, lora_camera_dropout=1.0)
    w = vsd.camera_embedding.linear_1.weight.detach().clone()
    stats = vsd.finetune_on_latents(torch.randn(1, 4, 8, 8), PROMPT, _camera())
    assert stats["lora_camera_dropped"] == 1.0
    torch.testing.assert_close(vsd.camera_embedding.linear_1.weight.detach(), w * (1 - 1e-4 * 0.01))
    vsd.cfg = dataclasses.replace(vsd.cfg, lora_camera_dropout=0.0)
    vsd.finetune_on_latents(torch.randn(1, 4, 8, 8), PROMPT, _camera())
    assert (vsd.camera_embedding.linear_1.weight.detach() - w).abs().max() > 1e-6


@pytest.mark.parametrize("epsilon_objective", [False, True])
def test_finetune_loss_matches_an_independent_computation(
    vsd: SDVSDGuidance, epsilon_objective: bool
) -> None:
    """The fine-tuning loss for the documented draws (t, ε, dropout coin): v-target or paper Eq. 5's ε."""
    vsd.cfg = dataclasses.replace(vsd.cfg, lora_epsilon_objective=epsilon_objective, lora_camera_dropout=0.0)
    x0 = torch.randn(1, 4, 8, 8)
    replay = torch.Generator()
    replay.set_state(vsd.generator.get_state())
    t = torch.randint(0, 1000, (1,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    a = float(_alphas_cumprod_numpy()[int(t)])
    z_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
    tok, enc = vsd.text.tokenizer, vsd.text.text_encoder
    with torch.no_grad():
        emb = enc(tok([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
        v = vsd.unet_lora(z_t, t, encoder_hidden_states=emb, class_labels=_camera().c2w.reshape(1, 16)).sample
    if epsilon_objective:
        expected = ((a**0.5 * v + (1 - a) ** 0.5 * z_t - noise) ** 2).mean()
    else:
        expected = ((v - (a**0.5 * noise - (1 - a) ** 0.5 * x0)) ** 2).mean()
    stats = vsd.finetune_on_latents(x0, PROMPT, _camera())
    assert stats["lora_t"] == float(t)
    assert stats["lora_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_exact_resume_from_state_dict(vsd: SDVSDGuidance, dirs: tuple[Path, Path]) -> None:
    renders = torch.rand(1, 32, 32, 3)

    def run(g: SDVSDGuidance) -> list[float]:
        values = []
        for step in range(2):
            out = g(renders, PROMPT, _camera(), torch.zeros(1), S2(step))
            values.append(out.loss.item())
            values.append(g.finetune_step(renders, PROMPT, _camera(), S2(step), latents=out.latents)["lora_loss"])
        return values

    vsd.finetune_step(renders, PROMPT, _camera(), S2(0))  # some optimiser state worth saving
    state = vsd.state_dict()
    first = run(vsd)
    fresh = SDVSDGuidance.from_config(tiny_sd_vsd_config(*dirs), seed=123)  # other seed: state must override
    fresh.load_state_dict(state)
    assert run(fresh) == first
    for name, p in vsd.lora_params.items():
        assert torch.equal(p, fresh.lora_params[name])


def test_shared_model_keeps_the_pretrained_branch_lora_free(dirs: tuple[Path, Path]) -> None:
    """Paper choice: LoRA on the pretrained model itself; its pretrained branch must ignore the LoRA."""
    cfg = dataclasses.replace(tiny_sd_vsd_config(*dirs), lora_pretrained_model=str(dirs[0]))
    g = SDVSDGuidance.from_config(cfg, seed=0)
    assert g.shared and g.unet is g.unet_lora and not g.lora_v_prediction
    for _ in range(3):
        g.finetune_on_latents(torch.randn(1, 4, 8, 8), PROMPT, _camera())
    reference = SDVSDGuidance.from_config(tiny_sd_vsd_config(*dirs), seed=0).unet  # a LoRA-free copy
    z, tt = torch.randn(2, 4, 8, 8), torch.tensor([100, 100])
    text = g.text.encode([PROMPT, ""])
    with torch.no_grad(), g._pretrained_branch():
        ours = g.unet(z, tt, encoder_hidden_states=text).sample
    with torch.no_grad():
        theirs = reference(z, tt, encoder_hidden_states=text).sample
        with_lora = g.unet(z, tt, encoder_hidden_states=text, class_labels=torch.zeros(2, 16)).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (with_lora - theirs).abs().max() > 1e-6  # and the LoRA does act outside that block
    out = g(torch.rand(1, 32, 32, 3, requires_grad=True), PROMPT, _camera(), torch.zeros(1), S2(0))
    assert torch.isfinite(out.loss)


def test_config_validate_names_the_key() -> None:
    SDVSDConfig().validate()
    with pytest.raises(ValueError, match=r"guidance\.sd_vsd\.min_step_percent and guidance\.sd_vsd\.max_step"):
        SDVSDConfig(min_step_percent=0.6, max_step_percent=0.5).validate()
    with pytest.raises(ValueError, match=r"guidance\.img\.max_step_percent"):
        SDVSDGuidance.from_config(SDVSDConfig(max_step_percent=1.0), config_key="guidance.img")


def test_bad_inputs_raise_value_errors(vsd: SDVSDGuidance) -> None:
    with pytest.raises(ValueError, match="32x32"):
        vsd(torch.rand(1, 64, 64, 3), PROMPT, _camera(), torch.zeros(1), S2(0))
    with pytest.raises(ValueError, match="one camera per render"):
        vsd(torch.rand(2, 32, 32, 3), PROMPT, _camera(), torch.zeros(2), S2(0))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        vsd(torch.rand(1, 32, 32), PROMPT, _camera(), torch.zeros(1), S2(0))


def test_bfloat16_weights_work(dirs: tuple[Path, Path]) -> None:
    """Half-precision frozen weights, fp32 LoRA + camera embedding (a dtype mismatch once broke the GPU)."""
    g = SDVSDGuidance.from_config(tiny_sd_vsd_config(*dirs), dtype=torch.bfloat16)
    assert g.unet.dtype == torch.bfloat16 and not g.grad_scaler.is_enabled()  # loss scaling is for fp16 only
    assert all(p.dtype == torch.float32 for p in [*g.lora_params.values(), *g.camera_embedding.parameters()])
    renders = torch.rand(1, 32, 32, 3, requires_grad=True)
    out = g(renders, PROMPT, _camera(), torch.zeros(1), S2(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and renders.grad.abs().sum() > 0
    before = {k: v.detach().clone() for k, v in g.lora_params.items()}
    for step in range(2):
        assert np.isfinite(g.finetune_step(renders.detach(), PROMPT, _camera(), S2(step))["lora_loss"])
    assert all(not torch.equal(before[k], v) for k, v in g.lora_params.items())


def test_paper_era_switch_leaves_lora_and_camera_embedding_untrained(dirs: tuple[Path, Path]) -> None:
    """guidance.sd_vsd.train_lora=false: the authors' first public commit (5c6e0cc), where the LoRA optimiser
    group pointed at MVDream and the VSD LoRA and camera embedding never trained (fixed in 7e09c67)."""
    cfg = dataclasses.replace(tiny_sd_vsd_config(*dirs), train_lora=False)
    g = SDVSDGuidance.from_config(cfg, seed=0)
    before = {k: v.detach().clone() for k, v in g.lora_params.items()}
    before |= {f"camera.{k}": v.detach().clone() for k, v in g.camera_embedding.named_parameters()}
    renders = torch.rand(1, 32, 32, 3)
    out = g(renders, PROMPT, _camera(), torch.zeros(1), S2(0))
    assert torch.isfinite(out.loss)  # the VSD loss itself still runs, with the untrained LoRA branch
    assert g.finetune_step(renders, PROMPT, _camera(), S2(0), latents=out.latents) == {}
    after = dict(g.lora_params) | {f"camera.{k}": v for k, v in g.camera_embedding.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not g.optimizer.state  # no AdamW step was taken


def test_reset_optimizer_forgets_the_lora_moments(vsd: SDVSDGuidance) -> None:
    renders = torch.rand(1, 32, 32, 3)
    vsd.finetune_step(renders, PROMPT, _camera(), S2(0))
    assert vsd.optimizer.state
    vsd.reset_optimizer()  # a stage start (schedule.reset_optimizer_at_stage_start)
    assert not vsd.optimizer.state
