"""VideoCrafter2 video SDS (motion amplification) on a tiny random-weight checkpoint in the released file's layout,
loaded through the real loader (videocrafter_weights.py): UNet, lvdm VAE, OpenCLIP text tower, schedule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import (
    TINY_VIDEOCRAFTER_TEXT_CONFIG,
    TINY_VIDEOCRAFTER_VAE_CONFIG,
    ldm_vae_state_dict,
    save_tiny_videocrafter2,
    tiny_openclip_text,
    tiny_videocrafter2_config,
    tiny_videocrafter_vae,
)
from torch import nn

from fourdfy.clock import Moment
from fourdfy.guidance.base import Guidance
from fourdfy.guidance.configs import VideoCrafter2Config, VideoPrior
from fourdfy.guidance.videocrafter2 import VideoCrafter2Guidance, VideoCrafter2Models, amplify_motion, weights_dtype
from fourdfy.guidance.videocrafter_weights import (
    VIDEOCRAFTER2_LINEAR_END,
    VIDEOCRAFTER2_LINEAR_START,
    VIDEOCRAFTER2_SCALE_FACTOR,
    VIDEOCRAFTER2_TIMESTEPS,
    OpenCLIPTokenizer,
    checkpoint_part,
    clip_text_config,
    diffusers_vae_config,
    text_encoder_from_checkpoint,
    vae_from_checkpoint,
    videocrafter2_schedule,
)
from fourdfy.guidance.weights import ModelNotAvailableError
from fourdfy.render.cameras import Cameras, cameras_from_spherical

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels

PROMPT = "a dog riding a skateboard"
NEGATIVE = "low motion, static statue, not moving, no motion"


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_videocrafter2(tmp_path_factory.mktemp("videocrafter2") / "vc2", seed=4)


@pytest.fixture(scope="module")
def guidance(ckpt_path: Path) -> VideoCrafter2Guidance:
    return VideoCrafter2Guidance.from_config(tiny_videocrafter2_config(ckpt_path), seed=0)


def _models(g: VideoCrafter2Guidance, unet: nn.Module | None = None) -> VideoCrafter2Models:
    return VideoCrafter2Models(unet or g.unet, g.vae, g.text.tokenizer, g.text.text_encoder, g.schedule)


def _variant(g: VideoCrafter2Guidance, unet: nn.Module | None = None, **changes: object) -> VideoCrafter2Guidance:
    """Another prior over the same loaded networks with some config fields changed."""
    cfg = dataclasses.replace(g.cfg, **changes)
    return VideoCrafter2Guidance(cfg, _models(g, unet), seed=0)


def S3(step: int, iteration: int = 0) -> Moment:
    """A stage-3 moment at a stage-local step (the video prior's stage)."""
    return Moment(iteration, 3, step)


def _video_camera(azimuth: float = 0.0, n: int = 4) -> Cameras:
    return cameras_from_spherical(10.0, torch.full((n,), azimuth), 3.0, 40.0)


def _alphas_cumprod_float32() -> np.ndarray:
    """lvdm make_beta_schedule('linear') + register_schedule's float32 buffer, in numpy."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


def _embed(g: VideoCrafter2Guidance, prompts: list[str]) -> torch.Tensor:
    """Text embeddings straight from open_clip.tokenize ids and the loaded encoder (no PromptEncoder)."""
    import open_clip

    with torch.no_grad():
        return g.text.text_encoder(open_clip.tokenize(prompts))[0]


class _Recorder(nn.Module):
    """Wraps the UNet and records each call's arguments."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, fps: torch.Tensor) -> torch.Tensor:
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(), "fps": fps.clone()})
        return self.unet(x, t, context, fps=fps)


# ---------------------------------------------------------------- the authors' numbers


def test_defaults_are_the_authors_stage_3_vc_values() -> None:
    cfg = VideoCrafter2Config()
    cfg.validate()
    assert cfg.checkpoint == "VideoCrafter/VideoCrafter2" and cfg.checkpoint_file == "model.ckpt"
    assert (cfg.n_frames, cfg.render_height, cfg.render_width, cfg.image_height, cfg.image_width) == (
        16, 80, 128, 320, 512)
    assert (cfg.fps, cfg.guidance_scale, cfg.motion_amp_scale, cfg.vae_grad_frames) == (8, 100.0, 30.0, 2)
    assert cfg.negative_prompt == NEGATIVE
    assert (cfg.view_dependent_prompting, cfg.view_prompts.front_threshold, cfg.view_prompts.back_threshold,
            cfg.view_prompts.overhead_threshold) == (True, 45.0, 45.0, 60.0)
    assert cfg.min_step_percent == [0, 0.02, 0.02, 5000] and cfg.max_step_percent == [0, 0.98, 0.5, 5000]
    assert (cfg.half_precision_weights, cfg.loss_weight, cfg.sample_posterior) == (False, 0.1, True)
    # The model's own numbers (inference_t2v_512_v2.0.yaml).
    assert (VIDEOCRAFTER2_TIMESTEPS, VIDEOCRAFTER2_LINEAR_START, VIDEOCRAFTER2_LINEAR_END,
            VIDEOCRAFTER2_SCALE_FACTOR) == (1000, 0.00085, 0.012, 0.18215)
    vae = diffusers_vae_config()
    assert vae["block_out_channels"] == (128, 256, 512, 512) and vae["layers_per_block"] == 2
    assert vae["latent_channels"] == 4 and vae["scaling_factor"] == 0.18215
    text = clip_text_config()  # ViT-H-14 text tower, penultimate layer: 24 - 1 blocks
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.hidden_act) == (
        1024, 23, 16, "gelu")
    assert {p.value for p in VideoPrior} == {"zeroscope", "videocrafter2"}


def test_is_a_video_guidance_in_fp32(guidance: VideoCrafter2Guidance) -> None:
    assert isinstance(guidance, Guidance)
    assert guidance.is_video and guidance.n_views == guidance.n_frames == 4 and guidance.native_size == (16, 24)
    assert guidance.dtype == torch.float32 and all(p.dtype == torch.float32 for p in guidance.unet.parameters())
    assert weights_dtype(VideoCrafter2Config(), "cuda") == torch.float32  # half_precision_weights: false
    assert weights_dtype(VideoCrafter2Config(half_precision_weights=True), "cuda") == torch.float16
    with pytest.raises(ValueError, match=r"guidance\.videocrafter2\.half_precision_weights=true needs a CUDA"):
        weights_dtype(VideoCrafter2Config(half_precision_weights=True), "cpu")


def test_schedule_is_the_yaml_one_in_float32(guidance: VideoCrafter2Guidance) -> None:
    np.testing.assert_array_equal(guidance.alphas_cumprod.numpy(), _alphas_cumprod_float32().astype(np.float64))
    bad = {"alphas_cumprod": torch.linspace(0.99, 0.01, 1000)}
    with pytest.raises(ValueError, match="alphas_cumprod differs"):
        videocrafter2_schedule(bad)


@pytest.mark.parametrize("local, t_max", [(0, 980), (2500, 740), (5000, 500), (20000, 500)])
def test_t_range_anneals_over_the_first_5000_steps_of_the_stage(
    guidance: VideoCrafter2Guidance, local: int, t_max: int
) -> None:
    """U{20..980} at the stage's first step, {20..740} halfway, {20..500} from step 5000 on, counted on the
    stage-local step (the global iteration plays no part)."""
    g = _variant(guidance)
    expected_max = int(1000 * (0.98 + (0.5 - 0.98) * min(1.0, local / 5000)))  # threestudio C(), int()
    assert expected_max == t_max
    assert g.step_range(S3(local, iteration=1234 + local)) == (20, t_max)
    assert guidance.step_range(S3(local)) == (20, t_max)
    drawn: list[tuple[int, int]] = []
    draw = g.draw_timesteps
    g.draw_timesteps = lambda low, high, n: drawn.append((low, high)) or draw(low, high, n)  # type: ignore[method-assign]
    out = g(torch.rand(4, 16, 24, 3), PROMPT, _video_camera(), torch.zeros(4), step=S3(local, 1234 + local))
    assert drawn == [(20, t_max)] and 20 <= out.stats["t"] <= t_max


# ---------------------------------------------------------------- renders -> latents


def test_frames_are_resized_and_encoded_one_by_one(guidance: VideoCrafter2Guidance) -> None:
    g = _variant(guidance, sample_posterior=False, vae_grad_frames=None)
    renders = torch.rand(4, 16, 24, 3)
    latents = g.encode(renders)
    assert latents.shape == (1, 4, 4, 4, 6)  # 32x48 (the tiny 320x512) / 8
    with torch.no_grad():
        x = F.interpolate(renders.permute(0, 3, 1, 2), (32, 48), mode="bilinear", align_corners=False)
        for k in range(4):
            mean = g.vae.encode(x[k : k + 1] * 2 - 1).latent_dist.mean
            torch.testing.assert_close(latents[0, :, k], mean[0] * 0.18215, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_frames, expected", [(2, 2), (None, 4), (1, 1)])
def test_low_ram_vae_backpropagates_through_that_many_random_frames(
    guidance: VideoCrafter2Guidance, grad_frames: int | None, expected: int
) -> None:
    g = _variant(guidance, vae_grad_frames=grad_frames)
    picked = set()
    for _ in range(3):
        renders = torch.rand(4, 16, 24, 3, requires_grad=True)
        g(renders, PROMPT, _video_camera(), torch.zeros(4), S3(0)).loss.backward()
        with_grad = (renders.grad.abs().sum((1, 2, 3)) > 0).nonzero().flatten().tolist()
        assert len(with_grad) == expected
        picked.add(tuple(with_grad))
    assert guidance.cfg.vae_grad_frames == 2  # the authors' low_ram_vae
    if grad_frames == 2:
        assert len(picked) > 1  # a new random set per call


# ---------------------------------------------------------------- the UNet call and the SDS gradient


def test_unet_gets_fps_8_and_the_negative_prompt_as_uncond(guidance: VideoCrafter2Guidance) -> None:
    recorder = _Recorder(guidance.unet)
    g = _variant(guidance, unet=recorder)
    latents = torch.randn(1, 4, 4, 4, 6)
    g.loss_on_latents(latents, PROMPT, _video_camera(40.0), t=321)
    (call,) = recorder.calls
    assert call["fps"].tolist() == [8, 8] and call["t"].tolist() == [321, 321]
    assert call["x"].shape == (2, 4, 4, 4, 6) and torch.equal(call["x"][0], call["x"][1])
    # azimuth 40°: "front" at the 45° threshold; uncond = the negative prompt, not "".
    expected = _embed(g, [PROMPT + ", front view", NEGATIVE])
    torch.testing.assert_close(call["context"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(call["context"][1], _embed(g, [""])[0])
    # azimuth 90°: "side"; 180°: "back".
    for azimuth, suffix in ((90.0, ", side view"), (180.0, ", back view")):
        g.loss_on_latents(latents, PROMPT, _video_camera(azimuth), t=321)
        torch.testing.assert_close(recorder.calls[-1]["context"][0], _embed(g, [PROMPT + suffix])[0],
                                   rtol=1e-5, atol=1e-6)


def test_motion_amplification_by_hand() -> None:
    score = torch.tensor([1.0, 2.0, 6.0]).reshape(1, 1, 3, 1, 1)  # mean over T = 3
    out = amplify_motion(score, 30.0)
    assert out.flatten().tolist() == [3 + 30 * -2, 3 + 30 * -1, 3 + 30 * 3]  # [-57, -27, 93]
    rand = torch.randn(1, 4, 5, 2, 3)
    torch.testing.assert_close(amplify_motion(rand, 30.0).mean(2), rand.mean(2), rtol=1e-5, atol=1e-5)
    assert amplify_motion(rand, 1.0) is rand  # the authors skip it at 1


def test_video_sds_matches_an_independent_computation(guidance: VideoCrafter2Guidance) -> None:
    """0.1·(1−ᾱ)·amp₃₀(ε_c + 100(ε_c − ε_u) − ε), ε̂ from the UNet with fps 8 on (front-view prompt, negative)."""
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(1, 4, 4, 4, 6, generator=gen)
    noise = torch.randn(1, 4, 4, 4, 6, generator=gen)
    t = 700
    a = float(_alphas_cumprod_float32()[t])
    z_t = a**0.5 * z + (1 - a) ** 0.5 * noise
    emb = _embed(guidance, [PROMPT + ", front view", NEGATIVE])
    with torch.no_grad():
        eps = guidance.unet(torch.cat([z_t, z_t]), torch.tensor([t, t]), emb, fps=torch.tensor([8, 8]))
    eps_c, eps_u = eps[:1], eps[1:]
    score = eps_c + 100.0 * (eps_c - eps_u) - noise
    score = score.mean(2, keepdim=True) + 30.0 * (score - score.mean(2, keepdim=True))
    expected = 0.1 * (1 - a) * score

    latents = z.clone().requires_grad_(True)
    out = guidance.loss_on_latents(latents, PROMPT, _video_camera(40.0), t=t, noise=noise)
    out.loss.backward()
    torch.testing.assert_close(latents.grad, expected, rtol=1e-4, atol=1e-5)
    assert out.loss.item() == pytest.approx(0.1 * 0.5 * ((expected / 0.1) ** 2).sum().item(), rel=1e-4)
    assert out.stats["t"] == 700.0


def test_exact_resume_from_state_dict(guidance: VideoCrafter2Guidance) -> None:
    renders = torch.rand(4, 16, 24, 3)
    state = guidance.state_dict()
    first = guidance(renders, PROMPT, _video_camera(), torch.zeros(4), S3(3000))
    guidance.load_state_dict(state)
    again = guidance(renders, PROMPT, _video_camera(), torch.zeros(4), S3(3000))
    assert first.loss.item() == again.loss.item() and first.stats == again.stats
    assert guidance.finetune_step(renders, PROMPT, _video_camera(), S3(0)) == {}


def test_bad_inputs_and_configs_name_the_key(guidance: VideoCrafter2Guidance) -> None:
    with pytest.raises(ValueError, match="n_frames=4"):
        guidance(torch.rand(3, 16, 24, 3), PROMPT, _video_camera(n=3), torch.zeros(3), S3(0))
    with pytest.raises(ValueError, match="16x24"):
        guidance(torch.rand(4, 24, 16, 3), PROMPT, _video_camera(), torch.zeros(4), S3(0))
    with pytest.raises(ValueError, match="one camera per frame"):
        guidance(torch.rand(4, 16, 24, 3), PROMPT, _video_camera(n=1), torch.zeros(4), S3(0))
    with pytest.raises(ValueError, match=r"guidance\.videocrafter2\.vae_grad_frames"):
        _variant(guidance, vae_grad_frames=5)
    with pytest.raises(ValueError, match=r"guidance\.videocrafter2\.image_height must be a positive multiple of 8"):
        VideoCrafter2Config(image_height=30).validate()
    with pytest.raises(ValueError, match=r"guidance\.videocrafter2\.min_step_percent and .*max_step_percent need"):
        VideoCrafter2Config(min_step_percent=[0, 0.02, 0.6, 5000]).validate()
    with pytest.raises(ValueError, match=r"guidance\.videocrafter2\.motion_amp_scale"):
        VideoCrafter2Config(motion_amp_scale=-1.0).validate()


# ---------------------------------------------------------------- loading the released layout


def test_text_encoder_is_openclip_penultimate_layer(ckpt_path: Path) -> None:
    """CLIPTextModel(converted) == FrozenOpenCLIPEmbedder(layer="penultimate"): the OpenCLIP tower's blocks but
    the last, then ln_final (condition.py encode_with_transformer), on open_clip.tokenize ids."""
    import open_clip

    checkpoint = torch.load(ckpt_path, weights_only=True)
    tower = tiny_openclip_text()
    state = checkpoint_part(checkpoint, "cond_stage_model.model.")
    state.pop("logit_scale")
    tower.load_state_dict(state, strict=True)
    ids = open_clip.tokenize([PROMPT, NEGATIVE, ""])
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        batch_first = getattr(tower.transformer, "batch_first", False)  # older open_clip: blocks take [L, N, D]
        x = x if batch_first else x.permute(1, 0, 2)
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=tower.attn_mask)
        reference = tower.ln_final(x if batch_first else x.permute(1, 0, 2))
        ours = text_encoder_from_checkpoint(checkpoint, TINY_VIDEOCRAFTER_TEXT_CONFIG)(ids)[0]
        last = text_encoder_from_checkpoint(checkpoint, {**TINY_VIDEOCRAFTER_TEXT_CONFIG, "layer": "last"})(ids)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(last, reference, atol=1e-3)  # the layer matters
    with pytest.raises(ValueError, match="text encoder"):
        text_encoder_from_checkpoint(checkpoint, {**TINY_VIDEOCRAFTER_TEXT_CONFIG, "width": 64})


def test_tokenizer_is_open_clip_tokenize() -> None:
    import open_clip

    tok = OpenCLIPTokenizer()
    prompts = [PROMPT + ", back view", NEGATIVE, "A  Panda, dancing!"]
    padded = tok(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert torch.equal(padded, open_clip.tokenize(prompts))
    ids = tok(prompts[0], truncation=False, verbose=False)["input_ids"]
    assert ids == padded[0][: len(ids)].tolist() and ids[0] == 49406 and ids[-1] == 49407
    assert int(padded[0][len(ids):].abs().sum()) == 0 and tok.model_max_length == 77


def test_vae_from_the_lvdm_layout_equals_the_original(tmp_path: Path) -> None:
    """first_stage_model.* in lvdm names (ae_modules.py Encoder/Decoder) -> diffusers AutoencoderKL: same outputs."""
    torch.manual_seed(0)
    original = tiny_videocrafter_vae().eval()
    ldm = ldm_vae_state_dict(original)
    for name in ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.0.downsample.conv.weight",
                 "encoder.mid.block_1.norm1.weight", "encoder.norm_out.weight", "decoder.up.3.upsample.conv.weight",
                 "decoder.up.0.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.weight"):
        assert name in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # AttnBlock's 1x1 convolutions
    checkpoint = {"state_dict": {"first_stage_model." + k: v for k, v in ldm.items()}}
    vae = vae_from_checkpoint(checkpoint, TINY_VIDEOCRAFTER_VAE_CONFIG)
    assert vae.config.scaling_factor == 0.18215 and not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        a, b = original.encode(x).latent_dist, vae.encode(x).latent_dist
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
        assert torch.equal(original.decode(a.mean).sample, vae.decode(a.mean).sample)
    broken = {"state_dict": {k: v for k, v in checkpoint["state_dict"].items() if "mid.attn_1.q." not in k}}
    with pytest.raises(ValueError, match=r"VAE .*missing"):
        vae_from_checkpoint(broken, TINY_VIDEOCRAFTER_VAE_CONFIG)


def test_missing_or_mismatched_checkpoint_names_the_config_key(ckpt_path: Path, tmp_path: Path) -> None:
    cfg = tiny_videocrafter2_config(tmp_path / "nowhere" / "model.ckpt")
    with pytest.raises(ModelNotAvailableError, match=r"guidance\.videocrafter2\.checkpoint = .*not available"):
        VideoCrafter2Guidance.from_config(cfg)
    wrong = dataclasses.replace(tiny_videocrafter2_config(ckpt_path), vae_config=None)  # full-size VAE config
    with pytest.raises(ModelNotAvailableError, match=r"(?s)guidance\.videocrafter2\.checkpoint = .*VAE"):
        VideoCrafter2Guidance.from_config(wrong)


# ---------------------------------------------------------------- wiring: the real backend and the trainer


def test_real_backend_builds_videocrafter2_on_the_stage_3_clock(ckpt_path: Path) -> None:
    from fourdfy.config import RunConfig
    from fourdfy.guidance.real import build_real_guidances
    from fourdfy.kinds import UpdateKind

    cfg = RunConfig()
    cfg.schedule.stage_lengths = [0, 0, 2]
    cfg.schedule.stage3_video_only = True
    # Set as attributes: GuidanceConfig gains the fields in fourdfy/config.py (issue #19).
    cfg.guidance.video_prior = VideoPrior.videocrafter2
    cfg.guidance.videocrafter2 = tiny_videocrafter2_config(ckpt_path)
    guidances = build_real_guidances(cfg)
    assert list(guidances) == [UpdateKind.VIDEO] and isinstance(guidances["vid"], VideoCrafter2Guidance)
    assert guidances["vid"].step_range(Moment(35000, 3, 0)) == (20, 980)  # the stage-local step, not 35000


def test_one_iteration_through_the_real_trainer(guidance: VideoCrafter2Guidance, tmp_path: Path) -> None:
    from fourdfy.build import build_trainer
    from fourdfy.config import compose_run_config
    from fourdfy.kinds import ParamGroup, UpdateKind

    n = guidance.n_views
    cfg = compose_run_config(["preset=smoke", "schedule.stage_lengths=[0,0,2]", "schedule.stage3_video_only=true",
                              f"trainer.n_frames={n}", "renderer.n_samples=8"])
    cfg.prompt = "a panda dancing"
    cfg.trainer.lambda_sparsity = cfg.trainer.lambda_opacity_entropy = 0.0  # only the prior's gradient
    trainer = build_trainer(cfg, tmp_path, guidances={UpdateKind.VIDEO: guidance})
    dynamic_before = [p.detach().clone() for p in trainer.groups[ParamGroup.DYNAMIC]]
    scalars = trainer.step()
    assert scalars["kind"] == "vid" and scalars["skipped_steps"] == 0
    assert torch.isfinite(torch.tensor(scalars["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(dynamic_before, trainer.groups[ParamGroup.DYNAMIC],
                                                     strict=True))
