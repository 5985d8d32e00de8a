"""Full-size GPU benchmark: seconds per iteration of each update kind, peak memory, and the networks' floor.

    python -m bench.gpu --preset paper|lowmem [--iters 3] [--warmup 1] [--no-occupancy] [--n-samples N] [--out FILE]
    python -m bench.gpu --tiny                # the same code path on tiny models (CPU works), for tests

The run is the one ``python run.py preset=paper`` trains: its config comes from
``fourdfy.config.compose_run_config(["preset=paper", "device=...", *overrides])`` (``bench_overrides`` lists
the overrides: ``--tiny`` shrinks the hash tables, samples per ray, occupancy grid and render sizes; ``lowmem``
sets the priors' memory options; ``--no-occupancy`` and ``--n-samples`` set the renderer) and the trainer from
``fourdfy.build.build_trainer`` (the paper-size hash-grid field, schedule, sampler and renderer of that
config). The one thing built here is the priors: every network of the paper's three priors at full size
with random weights — the compute cost does not depend on the weight values — from the published configs
written below (MVDream's multi-view UNet, SD 2.1-base and SD 2.1 (768-v) UNets, Zeroscope v2 576w's UNet3D,
their VAEs and CLIP text encoders), wrapped in the real guidance classes (`MVDreamGuidance`,
`SDVSDGuidance`, `ZeroscopeGuidance`) with the config's guidance settings and handed to build_trainer.
`Trainer.step()` is then timed with the update kind forced, per kind.

Rendering skips empty space with the occupancy grid as conf/preset/paper.yaml trains (56³ cells over the
marching sphere's cube, threshold 0.01). The trainer keeps every cell occupied for its first 256 iterations,
longer than any bench, so the grid is built once before timing from the random-weight field, whose density
blob b(x) = 10·(1 − ‖x‖/0.5) makes an object-sized occupancy; the timed iterations are no grid-update
iterations, and one update is timed apart. ``--no-occupancy`` times dense marching (every sample queried).
Samples per ray are the preset's (128) unless ``--n-samples`` says otherwise.

Printed JSON, per kind ("3d", "img", "vid"):
- ``iteration_s``: median seconds of one full training iteration (render, guidance, backward, AdamW, and
  for IMG the LoRA fine-tuning step), CUDA-synchronised;
- ``floor_s``: the networks' own work alone at the same shapes, the least any implementation must do:
  the UNet forward passes (CFG batch ×2; IMG: pretrained + LoRA branch), the VAE encoding with its
  backward, and for IMG the LoRA fine-tuning forward + backward; ``floor_parts_s`` lists them;
- ``overhead_ratio`` = iteration_s / floor_s (1.0 = no overhead beyond the networks);
- ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` over that kind's iterations;
- ``samples_kept``: the fraction of the renders' samples that reach the field (in occupied cells) over
  that kind's iterations, warm-up included (1.0 with ``--no-occupancy``);
and at the top level ``field_checkpoint_chunk``: samples per activation-checkpointed chunk of the field
(``field.checkpoint_chunk`` of the preset, both presets; the field's activations are recomputed in
backward), and ``occupancy``: the grid's settings, ``occupied_cells`` (fraction of cells occupied) and
``update_s`` (one rebuild; the trainer rebuilds every ``occupancy_every`` = 16 iterations), or
``{"grid": false}``.

Presets: ``paper`` keeps every network on the GPU in fp16 (the authors' half_precision_weights) with the
full VAE graph; ``lowmem`` offloads each prior's UNet and text encoder to the CPU between calls,
recomputes VAE-encoder activations in backward and keeps the VAE graph of only 4 of the 16 video frames
(the memory levers of `fourdfy.guidance.memory`, set through their ``guidance.*`` config keys).

Without CUDA (and without --tiny) it exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fourdfy.kinds import UPDATE_KINDS, UpdateKind

if TYPE_CHECKING:
    from fourdfy.config import RunConfig

EXIT_NO_CUDA = 2  # exit status when no CUDA device is available

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

# ---------------------------------------------------------------- tiny configs (--tiny: logic checks on CPU)

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

PROMPT = "a panda dancing"  # any prompt: the cost does not depend on it (77 tokens always)
# An iteration of each kind's stage, so the schedule's learning rates and regularisers are those of
# the stage where the kind occurs (stage 1: 3D; stage 2: IMG; stage 3: VID), with the paper's lengths.
# Neither a stage start nor a multiple of occupancy_every (16), so the trainer does not rebuild the
# occupancy grid inside the timed step (the rebuild is timed apart). 3D: after MVDream's switch from 64² to
# 256² renders at step 5000 (render_size_milestones), the size of the other 95% of its steps.
KIND_ITERATION = {UpdateKind.MULTIVIEW: 5_001, UpdateKind.IMAGE: 10_001, UpdateKind.VIDEO: 35_001}
LOWMEM_VAE_GRAD_FRAMES = 4  # lowmem preset: video frames whose VAE encoding keeps its graph (bench's choice)
# Points per hash-grid chunk of the torch backend on the GPU (bounds temporaries to ~0.5 GB). Not a config
# key: HashGridEncoding's default (2^13) is sized for CPU caches, and on a GPU each chunk costs a fixed
# number of kernel launches, so 2^13-point chunks would spend most of a 35 M-sample VID render launching
# kernels (~4,300 chunks per pass, forward, recomputation and backward). Set on the built encodings.
HASHGRID_CHUNK_CUDA = 1 << 18
FIELD_CHECKPOINT_CHUNK_TINY = 1 << 10  # --tiny: small, so that its few thousand samples span several chunks
# --tiny: 16³ cells × 17 times = 70 k field queries per build, not 3 M (seconds on one CPU core, not a minute).
OCCUPANCY_RESOLUTION_TINY = 16
# --tiny: 2^12-entry hash tables (the paper's levels and resolutions), 8 samples per ray, and the tiny
# priors' render sizes (latents 4×4, 8×8, 4 frames of 4×6, as tests/helpers/tiny_models.py).
TINY_OVERRIDES = [
    "field.static_grid.log2_hashmap_size=12", "field.dynamic_grid.log2_hashmap_size=12",
    f"field.checkpoint_chunk={FIELD_CHECKPOINT_CHUNK_TINY}",
    "renderer.n_samples=8", f"renderer.occupancy_resolution={OCCUPANCY_RESOLUTION_TINY}",
    "guidance.mvdream.image_size=32", "guidance.mvdream.render_sizes=[32]",
    "guidance.mvdream.render_size_milestones=[]",
    "guidance.sd_vsd.render_size=32", "guidance.sd_vsd.image_size=64",
    "guidance.zeroscope.n_frames=4", "guidance.zeroscope.render_height=16", "guidance.zeroscope.render_width=24",
    "guidance.zeroscope.image_height=32", "guidance.zeroscope.image_width=48",
    "trainer.n_frames=4",  # the trainer checks it against the video prior's frames
]
PRIOR_KEYS = ("mvdream", "sd_vsd", "zeroscope")  # guidance.<key> of each prior's config


def bench_overrides(preset: str, tiny: bool, device: str, occupancy: bool = True,
                    n_samples: int | None = None) -> list[str]:
    """The Hydra overrides of the bench's run: ``python run.py <these>`` trains the same run.

    n_samples: samples per ray (None: the preset's; 8 with tiny).
    """
    overrides = ["preset=paper", f"device={device}", f"prompt='{PROMPT}'"]
    if tiny:
        overrides += TINY_OVERRIDES
    if preset == "lowmem":
        overrides += [f"guidance.{key}.{option}=true" for key in PRIOR_KEYS
                      for option in ("offload", "vae_gradient_checkpointing")]
        overrides.append(f"guidance.zeroscope.vae_grad_frames={2 if tiny else LOWMEM_VAE_GRAD_FRAMES}")
    if not occupancy:
        overrides.append("renderer.occupancy_grid=false")
    if n_samples is not None:
        overrides.append(f"renderer.n_samples={n_samples}")
    return overrides


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


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of fn after `warmup` untimed ones (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def build_random_priors(cfg: RunConfig, tiny: bool) -> tuple[dict[UpdateKind, Any], dict[str, int]]:
    """The three priors with random-weight full-size (or tiny) networks, keyed by update kind, built with
    the run config's guidance settings (``cfg.guidance.*``, on ``cfg.device``); and the networks'
    parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    from fourdfy.guidance.mvdream import MVDreamGuidance, MVDreamModels
    from fourdfy.guidance.noise import scaled_linear_alphas_cumprod
    from fourdfy.guidance.sd_vsd import SDVSDGuidance, SDVSDModels
    from fourdfy.guidance.weights import NoiseSchedule, PredictionType
    from fourdfy.guidance.zeroscope import ZeroscopeGuidance, ZeroscopeModels
    from fourdfy.models.mvdream_unet import MVDREAM_SD21_BASE_4VIEW_CONFIG, MultiViewUNet

    diffusers_logging.set_verbosity_error()  # its "cast with to()" notice is about loading, not us
    device = torch.device(cfg.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # authors' half_precision_weights
    unet2d_base = TINY_UNET2D if tiny else SD21_BASE_UNET
    unet2d_v = TINY_UNET2D if tiny else SD21_V_UNET
    unet3d = TINY_UNET3D if tiny else ZEROSCOPE_UNET
    vae_cfg = TINY_VAE if tiny else SD_VAE
    text_cfg = TINY_TEXT_ENCODER if tiny else SD21_TEXT_ENCODER
    mv_cfg = TINY_MVDREAM_UNET if tiny else dict(MVDREAM_SD21_BASE_4VIEW_CONFIG)

    def make(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        # Initialised on the device (fast for ~4e9 parameters), then cast to the weight dtype.
        with torch.device(device):
            return factory().to(dtype)

    def text_encoder() -> torch.nn.Module:
        return make(lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))

    def vae() -> torch.nn.Module:
        return make(lambda: AutoencoderKL(**vae_cfg))

    # SD 2.1's scheduler_config.json: ε for 2.1-base and Zeroscope, v for 2.1 (768-v).
    sd_schedule = NoiseSchedule(scaled_linear_alphas_cumprod(), PredictionType.epsilon)
    v_schedule = NoiseSchedule(scaled_linear_alphas_cumprod(), PredictionType.v_prediction)

    mv_models = MVDreamModels(make(lambda: MultiViewUNet(**mv_cfg)), vae(), StubTokenizer(), text_encoder())
    sd_models = SDVSDModels(
        unet=make(lambda: UNet2DConditionModel(**unet2d_base)),
        unet_lora=make(lambda: UNet2DConditionModel(**unet2d_v)),
        vae=vae(), tokenizer=StubTokenizer(), text_encoder=text_encoder(),
        schedule=sd_schedule, schedule_lora=v_schedule,
    )
    zs_models = ZeroscopeModels(
        unet=make(lambda: UNet3DConditionModel(**unet3d)), vae=vae(), tokenizer=StubTokenizer(),
        text_encoder=text_encoder(), schedule=sd_schedule,
    )
    n_params = {
        "mvdream_unet": _count(mv_models.unet), "sd21_base_unet": _count(sd_models.unet),
        "sd21_v_unet": _count(sd_models.unet_lora), "zeroscope_unet3d": _count(zs_models.unet),
        "vae": _count(mv_models.vae), "clip_text_encoder": _count(mv_models.text_encoder),
    }
    g = cfg.guidance
    # Seeds as fourdfy.guidance.real.build_real_guidances gives them.
    guidances: dict[UpdateKind, Any] = {
        UpdateKind.MULTIVIEW: MVDreamGuidance(g.mvdream, mv_models, device=device, dtype=dtype, seed=cfg.seed + 1),
        UpdateKind.IMAGE: SDVSDGuidance(g.sd_vsd, sd_models, device=device, dtype=dtype, seed=cfg.seed + 2),
        UpdateKind.VIDEO: ZeroscopeGuidance(g.zeroscope, zs_models, device=device, dtype=dtype, seed=cfg.seed + 3),
    }
    return guidances, n_params


def set_hashgrid_chunk(field: Any, chunk: int) -> None:
    """Points per chunk of the field's torch-backend hash grids (see HASHGRID_CHUNK_CUDA; not a config key, so
    set on the encodings build_field made)."""
    from fourdfy.fields.hashgrid import HashGridEncoding

    for encoding in (field.static_encoding, field.dynamic_encoding):
        if isinstance(encoding, HashGridEncoding):
            encoding.set_chunk_size(chunk)


class _CountingRenderer:
    """The trainer's renderer, counting the samples marched and those queried.

    Counts the samples marched (rays × n_samples) and those passed to the field (the rest fell in empty
    cells); everything else is the wrapped renderer's (the trainer moves cameras and times to the field's
    device itself).
    """

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer
        self.samples_marched = 0
        self.samples_queried = 0

    def render(self, field: Any, cameras: Any, times: torch.Tensor, height: int, width: int,
               **kwargs: Any) -> dict[str, torch.Tensor]:
        def counting(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.samples_queried += x.shape[0]  # x: [N, 3] of the samples in occupied cells
            return field(x, t)

        self.samples_marched += len(cameras) * height * width * self.renderer.cfg.n_samples
        return self.renderer.render(counting, cameras, times, height, width, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Everything else the trainer uses (occupancy grid, state_dict, ...) is the wrapped renderer's.
        return getattr(self.renderer, name)


def floor_parts(kind: UpdateKind, guidance: Any, device: torch.device) -> dict[str, Callable[[], None]]:
    """The networks' own passes of one update of `kind`, at the guidance's shapes, as timed callables."""
    from fourdfy.guidance.memory import encode_latents

    dtype = guidance.dtype
    text_width = guidance.text.text_encoder.config.hidden_size
    gen = torch.Generator().manual_seed(0)

    def vae_fwd_bwd(images_shape: tuple[int, ...]) -> Callable[[], None]:
        images = torch.rand(images_shape, device=device, requires_grad=True)

        def run() -> None:
            encode_latents(guidance.vae, images, gen).sum().backward()
            images.grad = None
        return run

    if kind == UpdateKind.MULTIVIEW:
        b, s = guidance.n_views, guidance.cfg.image_size
        lat = s // 8
        z = torch.randn(2 * b, 4, lat, lat, device=device, dtype=dtype)
        t = torch.full((2 * b,), 500, device=device)
        ctx = torch.randn(2 * b, 77, text_width, device=device, dtype=dtype)
        cam = torch.randn(2 * b, 16, device=device)

        @torch.no_grad()
        def unet() -> None:
            guidance.unet(z, t, ctx, cam, b)
        return {"unet_cfg_forward": unet, "vae_encode_fwd_bwd": vae_fwd_bwd((b, 3, s, s))}
    if kind == UpdateKind.IMAGE:
        s = guidance.cfg.image_size
        lat = s // 8
        z = torch.randn(2, 4, lat, lat, device=device, dtype=dtype)
        t = torch.full((2,), 300, device=device)
        ctx = torch.randn(2, 77, text_width, device=device, dtype=dtype)
        cam = torch.randn(2, 16, device=device)

        @torch.no_grad()
        def unets() -> None:
            with guidance._pretrained_branch():
                guidance.unet(z, t, encoder_hidden_states=ctx)
            guidance.unet_lora(z, t, encoder_hidden_states=ctx, class_labels=cam)

        def lora_train() -> None:
            out = guidance.unet_lora(z[:1], t[:1], encoder_hidden_states=ctx[:1], class_labels=cam[:1]).sample
            out.float().square().mean().backward()
            guidance.optimizer.zero_grad(set_to_none=True)
        return {"unet_cfg_forward_pretrained_and_lora": unets, "lora_finetune_fwd_bwd": lora_train,
                "vae_encode_fwd_bwd": vae_fwd_bwd((1, 3, s, s))}
    if kind == UpdateKind.VIDEO:
        c = guidance.cfg
        z = torch.randn(2, 4, c.n_frames, c.image_height // 8, c.image_width // 8, device=device, dtype=dtype)
        t = torch.full((2,), 500, device=device)
        ctx = torch.randn(2, 77, text_width, device=device, dtype=dtype)

        @torch.no_grad()
        def unet3d() -> None:
            guidance.unet(z, t, encoder_hidden_states=ctx)
        n_grad = c.vae_grad_frames or c.n_frames  # frames encoded with a graph; the rest are forward only
        parts = {"unet_cfg_forward": unet3d,
                 "vae_encode_fwd_bwd": vae_fwd_bwd((n_grad, 3, c.image_height, c.image_width))}
        if n_grad < c.n_frames:
            images = torch.rand(c.n_frames - n_grad, 3, c.image_height, c.image_width, device=device)

            @torch.no_grad()
            def vae_rest() -> None:
                encode_latents(guidance.vae, images, gen)
            parts["vae_encode_forward_no_grad"] = vae_rest
        return parts
    raise ValueError(f"kind must be one of {[str(k) for k in UPDATE_KINDS]}, got {kind!r}")


def build_occupancy(renderer: Any, field: Any, device: torch.device, times: torch.Tensor,
                    iters: int) -> dict[str, Any]:
    """Build the renderer's occupancy grid from the field (as the trainer's first update would) and time a
    rebuild; the JSON entry. times: the times the trainer probes (trainer.occupancy_times over [0, 1]:
    frame times 1/16 apart and t = 1)."""
    cfg = renderer.cfg

    def update() -> None:
        renderer.update_occupancy(field, times, device=device)
    update_s = statistics.median(_timed(update, device, 1, iters))  # the warm-up call builds the grid
    return {
        "grid": True, "resolution": cfg.occupancy_resolution, "radius": round(cfg.radius, 6),
        "threshold": cfg.occupancy_threshold, "dilation": cfg.occupancy_dilation, "times": len(times),
        "occupied_cells": round(float(renderer.occupancy.occupied.float().mean()), 4),
        "update_s": round(update_s, 4),
    }


def run_bench(preset: str, tiny: bool, iters: int, warmup: int, kinds: tuple[UpdateKind, ...],
              occupancy: bool = True, n_samples: int | None = None) -> dict[str, Any]:
    """Build everything, time each kind's iteration and floor; the JSON-ready result.

    occupancy: march with the occupancy grid (built once, before timing), else densely; n_samples: samples
    per ray (None: the preset's).
    """
    from fourdfy.build import build_trainer
    from fourdfy.config import compose_run_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    cfg = compose_run_config(bench_overrides(preset, tiny, device.type, occupancy, n_samples))
    guidances, n_params = build_random_priors(cfg, tiny)
    with tempfile.TemporaryDirectory(prefix="fourdfy-bench-") as run_dir:  # build_trainer writes nothing there
        trainer = build_trainer(cfg, Path(run_dir), guidances=guidances)
    if device.type == "cuda":
        set_hashgrid_chunk(trainer.field, HASHGRID_CHUNK_CUDA)
    renderer = _CountingRenderer(trainer.renderer)
    trainer.renderer = renderer  # type: ignore[assignment]
    n_params["field"] = _count(trainer.field)
    _sync(device)
    result: dict[str, Any] = {
        "preset": preset, "tiny": tiny, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", "torch": torch.__version__, "iters": iters, "warmup": warmup,
        "n_samples_per_ray": cfg.renderer.n_samples, "n_params": n_params,
        "field_checkpoint_chunk": trainer.field.checkpoint_chunk,
        "build_s": round(time.perf_counter() - t0, 2), "kinds": {},
    }
    occupancy_times = torch.linspace(0.0, 1.0, cfg.trainer.occupancy_times)
    result["occupancy"] = (build_occupancy(renderer.renderer, trainer.field, device, occupancy_times, iters)
                           if occupancy else {"grid": False})
    grid_before = renderer.renderer.occupancy.occupied if occupancy else None
    for kind in kinds:
        guidance = trainer.guidances[kind]
        size = guidance.render_size(KIND_ITERATION[kind])
        entry: dict[str, Any] = {"n_views": guidance.n_views, "render_size": list(size)}
        try:
            trainer.schedule.kind = lambda i, gen, k=kind: k  # type: ignore[method-assign]

            def step(k: UpdateKind = kind) -> None:
                trainer.iteration = KIND_ITERATION[k]
                trainer.step()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            skipped_before = trainer.skipped_steps
            renderer.samples_marched = renderer.samples_queried = 0
            times = _timed(step, device, warmup, iters)
            if occupancy and renderer.renderer.occupancy.occupied is not grid_before:
                raise RuntimeError(f"the trainer rebuilt the occupancy grid at iteration {KIND_ITERATION[kind]}:"
                                   " KIND_ITERATION must hold iterations without a grid update")
            entry["samples_kept"] = round(renderer.samples_queried / renderer.samples_marched, 4)
            entry["iteration_s"] = statistics.median(times)
            entry["iteration_all_s"] = [round(x, 4) for x in times]
            entry["skipped_steps"] = trainer.skipped_steps - skipped_before  # non-finite random-weight losses
            if device.type == "cuda":
                entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            parts: dict[str, float] = {}
            for name, fn in floor_parts(kind, guidance, device).items():
                nets = [guidance.unet, guidance.text.text_encoder] + (
                    [guidance.unet_lora] if kind == UpdateKind.IMAGE and not guidance.shared else [])
                with guidance.placement.active(*nets):  # lowmem: compute only, the transfers are overhead
                    parts[name] = statistics.median(_timed(fn, device, 1, iters))
            entry["floor_parts_s"] = {k: round(v, 4) for k, v in parts.items()}
            entry["floor_s"] = sum(parts.values())
            entry["overhead_ratio"] = round(entry["iteration_s"] / entry["floor_s"], 3)
            entry["iteration_s"] = round(entry["iteration_s"], 4)
            entry["floor_s"] = round(entry["floor_s"], 4)
        except torch.cuda.OutOfMemoryError as err:  # report and go on with the other kinds
            entry["error"] = f"CUDA out of memory: {str(err).splitlines()[0]}"
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - one kind failing must not lose the others' numbers
            entry["error"] = f"{type(err).__name__}: {err}"
        result["kinds"][kind.value] = entry
        print(f"[bench.gpu] {kind}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=("paper", "lowmem"), default="paper",
                        help="paper: every network on the GPU; lowmem: offloading + VAE memory options")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (checks the logic; CPU works)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per kind (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per kind first")
    parser.add_argument("--kinds", default=",".join(UPDATE_KINDS), help="comma-separated update kinds to time")
    parser.add_argument("--no-occupancy", action="store_true",
                        help="march densely (every sample queried) instead of with the paper preset's grid")
    parser.add_argument("--n-samples", type=int, default=None,
                        help="samples per ray (default: conf/preset/paper.yaml's renderer.n_samples, 128)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    names = tuple(k for k in args.kinds.split(",") if k)
    if not names or any(k not in UPDATE_KINDS for k in names):
        parser.error(f"--kinds must be a comma-separated subset of {','.join(UPDATE_KINDS)}, got {args.kinds!r}")
    kinds = tuple(UpdateKind(k) for k in names)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.n_samples is not None and args.n_samples < 1:
        parser.error(f"--n-samples must be >= 1 (samples per ray), got {args.n_samples}")
    if not args.tiny and not torch.cuda.is_available():
        print("bench.gpu: no CUDA GPU is available (torch.cuda.is_available() is False); run it on a "
              "machine with a CUDA GPU, or add --tiny to check the logic on tiny models on the CPU.",
              file=sys.stderr)
        return EXIT_NO_CUDA
    result = run_bench(args.preset, args.tiny, args.iters, args.warmup, kinds, not args.no_occupancy,
                       args.n_samples)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    failed = [k for k, entry in result["kinds"].items() if "error" in entry]
    if failed:
        print(f"bench.gpu: kinds {failed} failed; see their 'error' in the JSON", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
