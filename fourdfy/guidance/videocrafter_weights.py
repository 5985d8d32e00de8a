"""Where VideoCrafter2's weights come from, and how its one checkpoint becomes the video prior's four parts.

The checkpoint: the hub repo `VideoCrafter/VideoCrafter2` (file `model.ckpt`, the authors' scripts/evaluation/
funcs.py load_model_checkpoint default) or a local file / folder. Resolution is
`fourdfy.guidance.weights.resolve_checkpoint_file` (hf_hub_download, from the local hub cache only when
HF_HUB_OFFLINE=1): a missing checkpoint raises one ModelNotAvailableError naming the config key to set, before
anything is loaded. The file is read once; its parts (the authors' LatentDiffusion attributes, lvdm/models/
ddpm3d.py, configured by videocrafter/configs/inference_t2v_512_v2.0.yaml) become:

- UNet (`model.diffusion_model.*`): `fourdfy.models.videocrafter_unet.VideoCrafterUNet`, official names.
- VAE (`first_stage_model.*`, lvdm/models/autoencoder.py AutoencoderKL with ae_modules.py Encoder/Decoder): the
  same network as Stable Diffusion's VAE, so it becomes a diffusers `AutoencoderKL` through diffusers' own
  converter for original-SD VAE checkpoints (`convert_ldm_vae_checkpoint`), loaded strictly. We chose this over
  re-implementing the lvdm VAE: the prior only calls `encode`, and the diffusers class is what the other
  priors' `encode_latents` already drives.
- Text encoder (`cond_stage_model.model.*`, lvdm/modules/encoders/condition.py FrozenOpenCLIPEmbedder: the
  OpenCLIP ViT-H-14 text tower, `layer: penultimate`): the embeddings are ln_final applied to the output of
  all resblocks but the last. A transformers `CLIPTextModel` with one layer fewer computes exactly that
  (its `last_hidden_state` is final_layer_norm of its last layer), so the OpenCLIP tensors are renamed into
  one (`in_proj_*` split into q/k/v) and the last resblock is dropped.
- Tokenizer: open_clip's own (`open_clip.tokenize`, what FrozenOpenCLIPEmbedder.forward calls), behind the
  small part of the transformers tokenizer interface that `fourdfy.guidance.text.PromptEncoder` uses.
- Noise schedule: not read from the file but from the yaml (linear_start / linear_end / timesteps), checked
  against the checkpoint's own `alphas_cumprod` buffer when it has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel

from fourdfy.guidance.memory import frozen
from fourdfy.guidance.noise import scaled_linear_alphas_cumprod
from fourdfy.guidance.weights import (
    ModelNotAvailableError,
    NoiseSchedule,
    PredictionType,
    resolve_checkpoint_file,
)
from fourdfy.models.videocrafter_unet import (
    VIDEOCRAFTER2_T2V_512_CONFIG,
    VideoCrafterUNet,
    _read_checkpoint,
    load_videocrafter_unet,
)

# 4D-fy configs/fourdfy_stage_3_vc.yaml prompt_processor_video.pretrained_model_name_or_path: the hub repo
# whose model.ckpt funcs.py downloads.
VIDEOCRAFTER2_REPO: Final[str] = "VideoCrafter/VideoCrafter2"
VIDEOCRAFTER2_FILE: Final[str] = "model.ckpt"
DEFAULT_CONFIG_KEY: Final[str] = "guidance.videocrafter2.checkpoint"

# videocrafter/configs/inference_t2v_512_v2.0.yaml, model.params.
VIDEOCRAFTER2_TIMESTEPS: Final[int] = 1000  # timesteps
VIDEOCRAFTER2_LINEAR_START: Final[float] = 0.00085  # linear_start
VIDEOCRAFTER2_LINEAR_END: Final[float] = 0.012  # linear_end
VIDEOCRAFTER2_SCALE_FACTOR: Final[float] = 0.18215  # scale_factor (scale_by_std: false)
# model.params.first_stage_config.params: embed_dim and the ddconfig (lvdm AutoencoderKL), flattened.
VIDEOCRAFTER2_VAE_CONFIG: Final[dict[str, Any]] = {
    "embed_dim": 4,
    "double_z": True,
    "z_channels": 4,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
}
# model.params.cond_stage_config: FrozenOpenCLIPEmbedder(arch "ViT-H-14", layer "penultimate"); the text tower
# of open_clip's model_configs/ViT-H-14.json (text_cfg), GELU, LayerNorm eps 1e-5, causal attention.
VIDEOCRAFTER2_TEXT_CONFIG: Final[dict[str, Any]] = {
    "context_length": 77,
    "vocab_size": 49408,
    "width": 1024,
    "heads": 16,
    "layers": 24,
    "mlp_ratio": 4.0,
    "layer": "penultimate",
}

# Prefixes of the parts in the checkpoint (LatentDiffusion attribute names, lvdm/models/ddpm3d.py).
FIRST_STAGE_PREFIX: Final[str] = "first_stage_model."
COND_STAGE_PREFIX: Final[str] = "cond_stage_model.model."  # FrozenOpenCLIPEmbedder.model = the open_clip CLIP
_DEEPSPEED_PREFIX: Final[str] = "_forward_module."
# FrozenOpenCLIPEmbedder.LAYERS: how many resblocks at the end are skipped (condition.py layer_idx).
_SKIPPED_LAYERS: Final[dict[str, int]] = {"last": 0, "penultimate": 1}
# OpenCLIP tensors the text embeddings do not use (the pooled projection, the contrastive temperature, the
# causal mask, which CLIPTextModel builds itself).
_UNUSED_TEXT_KEYS: Final[frozenset[str]] = frozenset({"text_projection", "logit_scale", "attn_mask"})
# open_clip tokenizer ids: "<start_of_text>", "<end_of_text>"; padding is 0.
_SOT, _EOT = 49406, 49407


@dataclass
class VideoCrafter2Models:
    """The loaded networks of the VideoCrafter2 video prior (fourdfy.guidance.videocrafter2)."""

    unet: VideoCrafterUNet
    vae: AutoencoderKL
    tokenizer: Any  # OpenCLIPTokenizer, or any tokenizer with the transformers call interface
    text_encoder: CLIPTextModel
    schedule: NoiseSchedule


def resolve_videocrafter_checkpoint(
    value: str = VIDEOCRAFTER2_REPO,
    filename: str = VIDEOCRAFTER2_FILE,
    config_key: str = DEFAULT_CONFIG_KEY,
) -> Path:
    """The local path of the checkpoint named by `value`: a file, a folder holding `filename`, or a hub repo
    id whose `filename` is downloaded (offline: taken from the hub cache). Raises ModelNotAvailableError naming
    `config_key` when it is not there."""
    return resolve_checkpoint_file(value, filename, config_key)


def load_videocrafter2_unet(
    value: str = VIDEOCRAFTER2_REPO,
    *,
    filename: str = VIDEOCRAFTER2_FILE,
    config_key: str = DEFAULT_CONFIG_KEY,
    unet_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_pickle: bool = False,
) -> VideoCrafterUNet:
    """Resolve the checkpoint (see resolve_videocrafter_checkpoint) and load its UNet, frozen, in eval mode.

    unet_config: VideoCrafterUNet arguments (default VIDEOCRAFTER2_T2V_512_CONFIG). A file that cannot be read
    or does not fit the config raises ModelNotAvailableError naming `config_key`, with the reader's message
    (missing / unexpected keys, shape mismatches).
    """
    path = resolve_videocrafter_checkpoint(value, filename, config_key)
    config = dict(unet_config if unet_config is not None else VIDEOCRAFTER2_T2V_512_CONFIG)
    try:
        unet = load_videocrafter_unet(path, config=config, dtype=dtype, device=device, trust_pickle=trust_pickle)
    except ValueError as err:
        raise ModelNotAvailableError(f"{config_key} = {value!r}: {err}") from err
    return unet.requires_grad_(False)


# ---------------------------------------------------------------- the checkpoint's parts


def checkpoint_part(checkpoint: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix` of a VideoCrafter checkpoint, prefix stripped ({} when there are none).

    checkpoint: a flat dict of the LatentDiffusion's tensors, or the same under 'state_dict' (Lightning) or
    under 'module' with '_forward_module.' prefixes (DeepSpeed): the layouts funcs.py load_model_checkpoint
    accepts (as `fourdfy.models.videocrafter_unet.unet_state_dict`).
    """
    state: Mapping[str, Any] = checkpoint
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    elif isinstance(state.get("module"), Mapping):
        state = {k.removeprefix(_DEEPSPEED_PREFIX): v for k, v in state["module"].items()}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def _load_strict(model: torch.nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """load_state_dict(strict) with a ValueError naming missing / unexpected keys and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in expected
                  if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the checkpoint's {what} does not fit its config: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {unexpected[:8]} ({len(unexpected)}), shape mismatches {mismatched[:8]}"
        )
    model.load_state_dict(state, strict=True)


def diffusers_vae_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """diffusers AutoencoderKL arguments for an lvdm AutoencoderKL config (default VIDEOCRAFTER2_VAE_CONFIG).

    lvdm's ae_modules.Normalize is GroupNorm(32 groups, eps 1e-6), as diffusers' VAE; attention only in the
    middle blocks (attn_resolutions = []), as diffusers' DownEncoderBlock2D / UpDecoderBlock2D.
    """
    c = dict(config if config is not None else VIDEOCRAFTER2_VAE_CONFIG)
    if list(c.get("attn_resolutions", [])) or not c.get("double_z", True) or c["embed_dim"] != c["z_channels"]:
        raise NotImplementedError(
            "only lvdm VAEs with attn_resolutions=[], double_z=true and embed_dim == z_channels (every released "
            f"VideoCrafter config) have a diffusers equivalent here, got {c}"
        )
    n = len(c["ch_mult"])
    return {
        "in_channels": c["in_channels"],
        "out_channels": c["out_ch"],
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(c["ch"] * m for m in c["ch_mult"]),
        "layers_per_block": c["num_res_blocks"],
        "latent_channels": c["embed_dim"],
        "norm_num_groups": 32,
        "scaling_factor": VIDEOCRAFTER2_SCALE_FACTOR,  # LatentDiffusion.scale_factor
    }


def vae_from_checkpoint(
    checkpoint: Mapping[str, Any], config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """The checkpoint's `first_stage_model.*` as a frozen diffusers AutoencoderKL (strict; ValueError if not)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = checkpoint_part(checkpoint, FIRST_STAGE_PREFIX)
    if not state:
        raise ValueError(f"no '{FIRST_STAGE_PREFIX}*' tensors in the checkpoint (the VAE)")
    kwargs = diffusers_vae_config(config)
    converted = convert_ldm_vae_checkpoint(state, kwargs)
    vae = AutoencoderKL(**kwargs)
    _load_strict(vae, converted, f"VAE ({FIRST_STAGE_PREFIX}*)")
    return frozen(vae, dtype)


def clip_text_config(config: Mapping[str, Any] | None = None) -> CLIPTextConfig:
    """A CLIPTextConfig that computes FrozenOpenCLIPEmbedder's embeddings for an OpenCLIP text tower config
    (default VIDEOCRAFTER2_TEXT_CONFIG): `layer` "penultimate" -> one layer fewer than the tower has."""
    c = dict(config if config is not None else VIDEOCRAFTER2_TEXT_CONFIG)
    if c.get("layer", "penultimate") not in _SKIPPED_LAYERS:
        raise ValueError(f"text encoder layer must be one of {sorted(_SKIPPED_LAYERS)}, got {c['layer']!r}")
    return CLIPTextConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["width"],
        intermediate_size=int(c["width"] * c.get("mlp_ratio", 4.0)),
        num_hidden_layers=c["layers"] - _SKIPPED_LAYERS[c.get("layer", "penultimate")],
        num_attention_heads=c["heads"],
        max_position_embeddings=c["context_length"],
        hidden_act="gelu",  # open_clip's nn.GELU (exact); CLIPTextConfig's default is quick_gelu
        layer_norm_eps=1e-5,  # open_clip LayerNorm = torch's default eps
        projection_dim=c["width"],
        pad_token_id=0,
        bos_token_id=_SOT,
        eos_token_id=_EOT,
    )


def openclip_to_clip_text(state: Mapping[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """Rename an OpenCLIP text tower's tensors (cond_stage_model.model.*, prefix stripped) to transformers'
    CLIPTextTransformer names, keeping resblocks 0..n_layers-1 (the rest are what `layer` skips).

    Raises ValueError on a tensor it does not know, so a different architecture is not half-loaded.
    """
    out: dict[str, Tensor] = {}
    simple = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    block = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for key, value in state.items():
        if key in _UNUSED_TEXT_KEYS:
            continue
        if key in simple:
            out[simple[key]] = value
            continue
        parts = key.split(".")
        if parts[:2] != ["transformer", "resblocks"] or len(parts) < 5:
            raise ValueError(f"unknown OpenCLIP text tensor {key!r}")
        index, rest = int(parts[2]), ".".join(parts[3:])
        if index >= n_layers:
            continue
        prefix = f"encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = chunk
            continue
        module, leaf = rest.rsplit(".", 1)
        if module not in block:
            raise ValueError(f"unknown OpenCLIP text tensor {key!r}")
        out[f"{prefix}{block[module]}.{leaf}"] = value
    return out


def text_encoder_from_checkpoint(
    checkpoint: Mapping[str, Any], config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> CLIPTextModel:
    """The checkpoint's `cond_stage_model.model.*` as a frozen CLIPTextModel whose `last_hidden_state` is
    FrozenOpenCLIPEmbedder's output (strict; ValueError if the tensors do not fit `config`)."""
    state = checkpoint_part(checkpoint, COND_STAGE_PREFIX)
    if not state:
        raise ValueError(f"no '{COND_STAGE_PREFIX}*' tensors in the checkpoint (the OpenCLIP text encoder)")
    text_config = clip_text_config(config)
    model = CLIPTextModel(text_config)
    converted = openclip_to_clip_text(state, text_config.num_hidden_layers)
    # transformers 4 names the tensors text_model.*, transformers 5 without the prefix.
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    _load_strict(model, {prefix + k: v for k, v in converted.items()}, f"text encoder ({COND_STAGE_PREFIX}*)")
    return frozen(model, dtype)


class OpenCLIPTokenizer:
    """open_clip's tokenizer (`open_clip.tokenize`, what FrozenOpenCLIPEmbedder.forward calls) with the part of
    the transformers tokenizer interface `PromptEncoder` uses: ids padded with 0 to 77, start/end tokens."""

    def __init__(self, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer  # ~0.4 s after torch/transformers

        self._tokenizer = SimpleTokenizer(context_length=context_length)
        self.model_max_length = context_length

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        truncation: bool | None = None,
        verbose: bool | None = None,
    ) -> dict[str, Any]:
        """Without return_tensors: {"input_ids": ids with start/end, not truncated} (a list per prompt).
        With return_tensors="pt", padding="max_length": {"input_ids": LongTensor [N, max_length]} as
        open_clip.tokenize (too-long prompts cut with the end token kept last)."""
        texts = [text] if isinstance(text, str) else list(text)
        if return_tensors is None:
            ids = [[_SOT, *self._tokenizer.encode(t), _EOT] for t in texts]
            return {"input_ids": ids[0] if isinstance(text, str) else ids}
        if return_tensors != "pt" or padding != "max_length":
            raise ValueError("OpenCLIPTokenizer returns padded tensors only: return_tensors='pt', padding='max_length'")
        return {"input_ids": self._tokenizer(texts, context_length=max_length or self.model_max_length)}


def videocrafter2_schedule(checkpoint: Mapping[str, Any] | None = None) -> NoiseSchedule:
    """ᾱ of the yaml's schedule (ε-prediction), as the authors' guidance reads it (`model.alphas_cumprod`).

    lvdm make_beta_schedule("linear") is linspace(√linear_start, √linear_end, T)² (diffusers' "scaled_linear");
    DDPM.register_schedule keeps ᾱ as a float32 buffer, so the table is rounded to float32 (held in float64).
    `use_scale` / `scale_b` of the yaml change only LatentDiffusion.q_sample, which the authors' SDS does not
    call. When the checkpoint holds its own `alphas_cumprod`, they must agree (ValueError otherwise).
    """
    alphas_cumprod = scaled_linear_alphas_cumprod(
        VIDEOCRAFTER2_TIMESTEPS, VIDEOCRAFTER2_LINEAR_START, VIDEOCRAFTER2_LINEAR_END
    ).float().double()
    stored = checkpoint_part(checkpoint, "").get("alphas_cumprod") if checkpoint is not None else None
    if stored is not None and not torch.allclose(stored.double(), alphas_cumprod, rtol=0, atol=1e-6):
        raise ValueError(
            "the checkpoint's alphas_cumprod differs from linear_start=0.00085, linear_end=0.012, 1000 steps "
            "(videocrafter/configs/inference_t2v_512_v2.0.yaml): not a VideoCrafter2 text-to-video checkpoint?"
        )
    return NoiseSchedule(alphas_cumprod=alphas_cumprod, prediction_type=PredictionType.epsilon)


def load_videocrafter2_models(
    value: str = VIDEOCRAFTER2_REPO,
    *,
    filename: str = VIDEOCRAFTER2_FILE,
    config_key: str = DEFAULT_CONFIG_KEY,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
    text_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    trust_pickle: bool = False,
) -> VideoCrafter2Models:
    """Resolve the checkpoint, read it once and build its UNet, VAE, text encoder (+ open_clip tokenizer) and
    schedule, frozen, in `dtype`, on the CPU. Configs default to the VideoCrafter2 ones above.

    Raises ModelNotAvailableError naming `config_key` when the file is missing or any part does not fit.
    """
    path = resolve_videocrafter_checkpoint(value, filename, config_key)
    try:
        checkpoint = _read_checkpoint(path, trust_pickle)
        unet = load_videocrafter_unet(
            checkpoint,
            config=dict(unet_config if unet_config is not None else VIDEOCRAFTER2_T2V_512_CONFIG),
            dtype=dtype,
        ).requires_grad_(False)
        vae = vae_from_checkpoint(checkpoint, vae_config, dtype)
        text_encoder = text_encoder_from_checkpoint(checkpoint, text_config, dtype)
        schedule = videocrafter2_schedule(checkpoint)
    except ValueError as err:
        raise ModelNotAvailableError(f"{config_key} = {value!r}: {err}") from err
    context = int((text_config or VIDEOCRAFTER2_TEXT_CONFIG)["context_length"])
    return VideoCrafter2Models(unet, vae, OpenCLIPTokenizer(context), text_encoder, schedule)
