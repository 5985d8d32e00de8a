"""The real priors with random weights: every network built from its published config, nothing downloaded.

``guidance.weights=random`` builds MVDream's multi-view UNet, the SD 2.1-base and SD 2.1 (768-v) UNets, Zeroscope
v2 576w's UNet3D, their VAEs and CLIP text encoders at full size from the configs written below, with random
weights, and wraps them in the real guidance classes (MVDreamGuidance, SDVSDGuidance, ZeroscopeGuidance) with
the run's ``guidance.*`` settings (memory options included). The compute and memory of a run do not depend on
the weight values, so ``python run.py preset=paper guidance.weights=random`` checks a GPU, a cluster and the
whole paper pipeline (stages, occupancy updates, render-size switches, checkpoints, resume, exports) before
~20 GB of weights are fetched; ``bench/gpu.py`` times the same priors. ``guidance.weights=random_tiny`` builds
tiny networks of the same classes (``TINY_*``), for the same pipeline on a CPU in seconds (tests); their
render and image sizes must then be small too (``TINY_PRIOR_OVERRIDES``).

The tokenizer is a stand-in (``StubTokenizer``: no vocabulary files); weights are drawn from a fixed seed
(``RANDOM_WEIGHTS_SEED``), so a resumed run rebuilds the same priors. The video prior is the one
``guidance.video_prior`` names: Zeroscope, or VideoCrafter2 (its released inference_t2v_512_v2.0 configs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fourdfy.guidance.base import Guidance
from fourdfy.guidance.configs import VideoPrior
from fourdfy.kinds import UPDATE_KINDS, UpdateKind

if TYPE_CHECKING:
    from fourdfy.config import RunConfig

# Seed of the random weights (+1, +2, +3 for MVDream, SD, Zeroscope): fixed, not the run's seed (pretrained weights
# do not change with it either), so every run and every resume of a config builds the same networks.
RANDOM_WEIGHTS_SEED = 0

# ---------------------------------------------------------------- published configs (full size)

# stabilityai/stable-diffusion-2-1-base, unet/config.json (865,910,724 parameters).
SD21_BASE_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}
# stabilityai/stable-diffusion-2-1 (768-v), unet/config.json: the base config at 96² latents with
# upcast_attention (same parameter count).
SD21_V_UNET: dict[str, Any] = {**SD21_BASE_UNET, "sample_size": 96, "upcast_attention": True}
# stabilityai/stable-diffusion-2-1(-base), vae/config.json (83,653,863 parameters); Zeroscope: same VAE.
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}
# stabilityai/stable-diffusion-2-1(-base), text_encoder/config.json: OpenCLIP ViT-H-14's text tower without
# its last layer (23 of 24), hidden 1024 (340,387,840 parameters). Zeroscope uses the same encoder.
SD21_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
# cerspense/zeroscope_v2_576w, unet/config.json (ModelScope text-to-video architecture, UNet3DConditionModel).
ZEROSCOPE_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 64,
    "cross_attention_dim": 1024,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}

# ---------------------------------------------------------------- tiny configs (random_tiny: logic checks on CPU)

TINY_CONTEXT = 32  # tiny text width = every tiny UNet's cross-attention width
TINY_UNET2D: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "cross_attention_dim": TINY_CONTEXT,
    "attention_head_dim": 2,
    "use_linear_projection": True,
}
TINY_UNET3D: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "cross_attention_dim": TINY_CONTEXT,
    "attention_head_dim": 4,
}
TINY_VAE: dict[str, Any] = {
    **SD_VAE, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4,
    "sample_size": 64,
}
TINY_TEXT_ENCODER: dict[str, Any] = {
    **SD21_TEXT_ENCODER, "hidden_size": TINY_CONTEXT, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
TINY_MVDREAM_UNET: dict[str, Any] = {
    "image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
    "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": TINY_CONTEXT,
    "use_checkpoint": False, "legacy": False, "camera_dim": 16,
}

# A 2-level VideoCrafterUNet of 4 frames (the shape of shared/testdata/videocrafter2/config.json), an lvdm VAE
# whose 4 levels make latents 1/8 of the image, and a 3-block OpenCLIP text tower ("penultimate" uses 2).
TINY_VIDEOCRAFTER_UNET: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [2, 1],
    "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "transformer_depth": 1,
    "context_dim": TINY_CONTEXT, "use_linear": True, "use_checkpoint": False, "temporal_conv": True,
    "temporal_attention": True, "temporal_selfatt_only": True, "use_relative_position": False,
    "use_causal_attention": False, "temporal_length": 4, "addition_attention": True, "fps_cond": True,
}
TINY_VIDEOCRAFTER_VAE: dict[str, Any] = {
    "embed_dim": 4, "double_z": True, "z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
}
TINY_VIDEOCRAFTER_TEXT: dict[str, Any] = {
    "context_length": 77, "vocab_size": 49408, "width": TINY_CONTEXT, "heads": 4, "layers": 3, "mlp_ratio": 4.0,
    "layer": "penultimate",
}

# The guidance.* sizes the tiny networks need (latents 4×4, 8×8, 4 frames of 4×6, as tests/helpers/tiny_models.py);
# guidance.weights=random_tiny runs must add them (with trainer.n_frames=4, which the trainer checks against
# the video prior's frames).
TINY_PRIOR_OVERRIDES = [
    "guidance.mvdream.image_size=32", "guidance.mvdream.render_sizes=[32]",
    "guidance.mvdream.render_size_milestones=[]", "guidance.mvdream.batch_sizes=[4]",
    "guidance.sd_vsd.render_size=32", "guidance.sd_vsd.image_size=64",
    "guidance.zeroscope.n_frames=4", "guidance.zeroscope.render_height=16", "guidance.zeroscope.render_width=24",
    "guidance.zeroscope.image_height=32", "guidance.zeroscope.image_width=48",
    "guidance.videocrafter2.n_frames=4", "guidance.videocrafter2.render_height=16",
    "guidance.videocrafter2.render_width=24", "guidance.videocrafter2.image_height=32",
    "guidance.videocrafter2.image_width=48",
    "trainer.n_frames=4",
]


class StubTokenizer:
    """Stand-in for CLIP's BPE tokenizer (no vocabulary files on the GPU machine): one id per byte.

    The text encoder always sees 77 positions, so its cost is that of the real tokenizer's ids.
    """

    model_max_length = 77
    _BOS, _EOS, _PAD = 49406, 49407, 0  # CLIP's start/end tokens; SD 2.x pads with id 0

    def __call__(
        self,
        text: str | list[str],
        padding: str | bool = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        ids = [[self._BOS, *text_ids[: self.model_max_length - 2], self._EOS]
               for text_ids in ([b + 256 for b in t.encode()] for t in texts)]
        if padding == "max_length":
            length = max_length or self.model_max_length
            ids = [row + [self._PAD] * (length - len(row)) for row in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids)}
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_random_guidances(
    cfg: RunConfig, tiny: bool, kinds: set[UpdateKind] | None = None
) -> tuple[dict[UpdateKind, Guidance], dict[str, int]]:
    """The priors of ``kinds`` (None: all three) with random-weight full-size (or tiny) networks, keyed by
    update kind, built with the run config's guidance settings (``cfg.guidance.*``, on ``cfg.device``); and
    the networks' parameter counts (one entry per network built)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    from fourdfy.guidance.mvdream import MVDreamGuidance, MVDreamModels
    from fourdfy.guidance.noise import scaled_linear_alphas_cumprod
    from fourdfy.guidance.sd_vsd import SDVSDGuidance, SDVSDModels
    from fourdfy.guidance.videocrafter2 import VideoCrafter2Guidance
    from fourdfy.guidance.weights import NoiseSchedule, PredictionType
    from fourdfy.guidance.zeroscope import ZeroscopeGuidance, ZeroscopeModels
    from fourdfy.models.mvdream_unet import MVDREAM_SD21_BASE_4VIEW_CONFIG, MultiViewUNet

    diffusers_logging.set_verbosity_error()  # its "cast with to()" notice is about loading, not us
    kinds = set(UPDATE_KINDS) if kinds is None else set(kinds)
    device = torch.device(cfg.device)
    unet2d_base = TINY_UNET2D if tiny else SD21_BASE_UNET
    unet2d_v = TINY_UNET2D if tiny else SD21_V_UNET
    unet3d = TINY_UNET3D if tiny else ZEROSCOPE_UNET
    vae_cfg = TINY_VAE if tiny else SD_VAE
    text_cfg = TINY_TEXT_ENCODER if tiny else SD21_TEXT_ENCODER
    mv_cfg = TINY_MVDREAM_UNET if tiny else dict(MVDREAM_SD21_BASE_4VIEW_CONFIG)

    def make(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        # Initialised on the device (fast for ~4e9 parameters) in float32; each prior casts its networks to its
        # own weight dtype (guidance.<prior>.precision where it has one, else fp16 on CUDA), as for loaded weights.
        with torch.device(device):
            return factory()

    def text_encoder() -> torch.nn.Module:
        return make(lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))

    def vae() -> torch.nn.Module:
        return make(lambda: AutoencoderKL(**vae_cfg))

    # SD 2.1's scheduler_config.json: ε for 2.1-base and Zeroscope, v for 2.1 (768-v).
    sd_schedule = NoiseSchedule(scaled_linear_alphas_cumprod(), PredictionType.epsilon)
    v_schedule = NoiseSchedule(scaled_linear_alphas_cumprod(), PredictionType.v_prediction)
    g = cfg.guidance
    guidances: dict[UpdateKind, Guidance] = {}
    n_params: dict[str, int] = {}
    # One fixed seed for every draw of the weights; the global generators are restored afterwards.
    cuda_devices = [torch.cuda.current_device() if device.index is None else device.index] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        # Each prior's networks from their own seed: the same whichever other priors are built. The priors' own
        # generators are seeded as fourdfy.guidance.real.build_real_guidances seeds them.
        if UpdateKind.MULTIVIEW in kinds:
            torch.manual_seed(RANDOM_WEIGHTS_SEED + 1)
            mv = MVDreamModels(make(lambda: MultiViewUNet(**mv_cfg)), vae(), StubTokenizer(), text_encoder())
            n_params.update(mvdream_unet=count_parameters(mv.unet), vae=count_parameters(mv.vae),
                            clip_text_encoder=count_parameters(mv.text_encoder))
            guidances[UpdateKind.MULTIVIEW] = MVDreamGuidance(g.mvdream, mv, device=device,
                                                              seed=cfg.seed + 1)
        if UpdateKind.IMAGE in kinds:
            torch.manual_seed(RANDOM_WEIGHTS_SEED + 2)
            sd = SDVSDModels(
                unet=make(lambda: UNet2DConditionModel(**unet2d_base)),
                unet_lora=make(lambda: UNet2DConditionModel(**unet2d_v)),
                vae=vae(), tokenizer=StubTokenizer(), text_encoder=text_encoder(),
                schedule=sd_schedule, schedule_lora=v_schedule,
            )
            n_params.update(sd21_base_unet=count_parameters(sd.unet), sd21_v_unet=count_parameters(sd.unet_lora),
                            vae=count_parameters(sd.vae), clip_text_encoder=count_parameters(sd.text_encoder))
            guidances[UpdateKind.IMAGE] = SDVSDGuidance(g.sd_vsd, sd, device=device, seed=cfg.seed + 2)
        if UpdateKind.VIDEO in kinds and VideoPrior(g.video_prior) is VideoPrior.videocrafter2:
            torch.manual_seed(RANDOM_WEIGHTS_SEED + 3)
            vc = _videocrafter2_models(tiny, make)
            n_params.update(videocrafter2_unet=count_parameters(vc.unet), videocrafter2_vae=count_parameters(vc.vae),
                            openclip_text_encoder=count_parameters(vc.text_encoder))
            guidances[UpdateKind.VIDEO] = VideoCrafter2Guidance(g.videocrafter2, vc, device=device, seed=cfg.seed + 3)
        elif UpdateKind.VIDEO in kinds:
            torch.manual_seed(RANDOM_WEIGHTS_SEED + 3)
            zs = ZeroscopeModels(
                unet=make(lambda: UNet3DConditionModel(**unet3d)), vae=vae(), tokenizer=StubTokenizer(),
                text_encoder=text_encoder(), schedule=sd_schedule,
            )
            n_params.update(zeroscope_unet3d=count_parameters(zs.unet), vae=count_parameters(zs.vae),
                            clip_text_encoder=count_parameters(zs.text_encoder))
            guidances[UpdateKind.VIDEO] = ZeroscopeGuidance(g.zeroscope, zs, device=device,
                                                            seed=cfg.seed + 3)
    return guidances, n_params


def _videocrafter2_models(tiny: bool, make: Callable[[Callable[[], torch.nn.Module]], torch.nn.Module]) -> Any:
    """VideoCrafter2's UNet, VAE and penultimate-layer text encoder with random weights, from the released configs
    (fourdfy/guidance/videocrafter_weights.py; tiny ones with ``tiny``), its schedule and the stub tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from fourdfy.guidance.videocrafter_weights import (
        VIDEOCRAFTER2_TEXT_CONFIG,
        VIDEOCRAFTER2_VAE_CONFIG,
        VideoCrafter2Models,
        clip_text_config,
        diffusers_vae_config,
        videocrafter2_schedule,
    )
    from fourdfy.models.videocrafter_unet import VIDEOCRAFTER2_T2V_512_CONFIG, VideoCrafterUNet

    unet_cfg = TINY_VIDEOCRAFTER_UNET if tiny else VIDEOCRAFTER2_T2V_512_CONFIG
    vae_cfg = TINY_VIDEOCRAFTER_VAE if tiny else VIDEOCRAFTER2_VAE_CONFIG
    text_cfg = TINY_VIDEOCRAFTER_TEXT if tiny else VIDEOCRAFTER2_TEXT_CONFIG
    unet = make(lambda: VideoCrafterUNet(**unet_cfg)).requires_grad_(False)
    vae = make(lambda: AutoencoderKL(**diffusers_vae_config(vae_cfg)))
    text_encoder = make(lambda: CLIPTextModel(clip_text_config(text_cfg)))
    return VideoCrafter2Models(unet, vae, StubTokenizer(), text_encoder, videocrafter2_schedule())
