"""Tiny random-weight stand-ins for the real priors' models, saved in the hub repos' folder layout.

Every function writes what `save_pretrained` writes (unet/, vae/, text_encoder/, tokenizer/, scheduler/),
so the tests load them through the real loading code (`from_config` -> weights.py -> from_pretrained).
Nothing is downloaded: the tokenizer is built from the BPE vocabulary that open_clip ships
(ENVIRONMENT.md), read from its file without importing open_clip (a ~10 s import).

`build_tiny_guidances(tmp_path)` returns one constructed tiny prior of each kind for end-to-end tests.
`save_tiny_videocrafter2(root)` writes a tiny VideoCrafter2 `model.ckpt` in the released file's key layout (UNet,
lvdm VAE, OpenCLIP text tower, schedule buffers), read by the real loader (videocrafter_weights.py).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from fourdfy.guidance.configs import MVDreamConfig, SDVSDConfig, VideoCrafter2Config, ZeroscopeConfig
from fourdfy.guidance.mvdream import MVDreamGuidance
from fourdfy.guidance.sd_vsd import SDVSDGuidance
from fourdfy.guidance.zeroscope import ZeroscopeGuidance
from fourdfy.kinds import UpdateKind
from fourdfy.models.mvdream_unet import CHECKPOINT_PREFIX, MultiViewUNet
from fourdfy.models.videocrafter_unet import CHECKPOINT_PREFIX as VC_UNET_PREFIX
from fourdfy.models.videocrafter_unet import VideoCrafterUNet

CONTEXT_DIM = 32  # tiny CLIP hidden size = every tiny UNet's cross-attention width
VOCAB_SIZE = 49408  # CLIP BPE: 256 bytes ×2 + 48,894 merges + 2 special tokens

# A 2-level MultiViewUNet (the shape of shared/testdata/mvdream/config.json, context width CONTEXT_DIM).
TINY_MVDREAM_UNET_CONFIG: dict[str, Any] = {
    "image_size": 4,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": CONTEXT_DIM,
    "use_checkpoint": False,
    "legacy": False,
    "camera_dim": 16,
}

# A 2-level VideoCrafterUNet (the shape of shared/testdata/videocrafter2/config.json), context width CONTEXT_DIM.
TINY_VIDEOCRAFTER_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [2, 1],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "transformer_depth": 1,
    "context_dim": CONTEXT_DIM,
    "use_linear": True,
    "use_checkpoint": False,
    "temporal_conv": True,
    "temporal_attention": True,
    "temporal_selfatt_only": True,
    "use_relative_position": False,
    "use_causal_attention": False,
    "temporal_length": 4,
    "addition_attention": True,
    "fps_cond": True,
}
# An lvdm AutoencoderKL config (first_stage_config.params, flattened): 4 levels so latents are 1/8 of the image,
# widths 32 and 64 because lvdm's GroupNorm always has 32 groups.
TINY_VIDEOCRAFTER_VAE_CONFIG: dict[str, Any] = {
    "embed_dim": 4,
    "double_z": True,
    "z_channels": 4,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2, 2, 2],  # a channel change, so resblocks have nin_shortcut
    "num_res_blocks": 1,
    "attn_resolutions": [],
}
# An OpenCLIP text tower (3 blocks; "penultimate" uses 2), width CONTEXT_DIM, the real vocabulary.
TINY_VIDEOCRAFTER_TEXT_CONFIG: dict[str, Any] = {
    "context_length": 77,
    "vocab_size": VOCAB_SIZE,
    "width": CONTEXT_DIM,
    "heads": 4,
    "layers": 3,
    "mlp_ratio": 4.0,
    "layer": "penultimate",
}


# ---------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _clip_bpe_files() -> tuple[str, str]:
    """(vocab.json text, merges.txt text) of CLIP's tokenizer, built from open_clip's bundled BPE merges."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is needed for its BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)")
    bpe = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]  # open_clip's slice
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [b + "</w>" for b in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE
    vocab_json = json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_json, merges_txt


def write_tokenizer(folder: Path) -> None:
    """SD 2.1's tokenizer folder: vocab.json, merges.txt and a config with pad "!" and 77 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_json, merges_txt = _clip_bpe_files()
    (folder / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "pad_token": "!",  # SD 2.x pads with "!" (id 0), like OpenCLIP's tokenizer
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


# ---------------------------------------------------------------- networks


def tiny_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=CONTEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            pad_token_id=0,
            bos_token_id=49406,
            eos_token_id=49407,
        )
    )


def tiny_vae() -> AutoencoderKL:
    """4 levels like SD's VAE, so latents are 1/8 of the image side with 4 channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,  # SD 2.x VAE config
    )


def tiny_unet2d() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=2,
        use_linear_projection=True,  # SD 2.x
    )


def tiny_unet3d() -> UNet3DConditionModel:
    return UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=4,
    )


def _scheduler_kwargs(prediction_type: str) -> dict[str, Any]:
    # SD 2.1 scheduler_config.json values; steps_offset/clip_sample avoid deprecation warnings.
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "steps_offset": 1,
        "clip_sample": False,
    }


# ---------------------------------------------------------------- folders


def save_tiny_sd(root: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) under `root`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiny_unet2d().save_pretrained(root / "unet")
        tiny_vae().save_pretrained(root / "vae")
        tiny_text_encoder().save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    DDPMScheduler(**_scheduler_kwargs(prediction_type)).save_pretrained(root / "scheduler")
    return root


def save_tiny_zeroscope(root: Path, seed: int = 0) -> Path:
    """A tiny text-to-video folder (UNet3DConditionModel + SD-style VAE/CLIP, DDIM scheduler config)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiny_unet3d().save_pretrained(root / "unet")
        tiny_vae().save_pretrained(root / "vae")
        tiny_text_encoder().save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    DDIMScheduler(**_scheduler_kwargs("epsilon")).save_pretrained(root / "scheduler")
    return root


def save_tiny_mvdream(root: Path, filename: str = "sd-v2.1-base-4view.pt", seed: int = 0) -> Path:
    """A folder holding a tiny MVDream checkpoint with the official key layout (`model.diffusion_model.*`
    plus a stray `first_stage_model.*` tensor that the loader must ignore)."""
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = MultiViewUNet(**TINY_MVDREAM_UNET_CONFIG)
    state = {CHECKPOINT_PREFIX + k: v for k, v in unet.state_dict().items()}
    state["first_stage_model.dummy"] = torch.zeros(1)
    torch.save(state, root / filename)
    return root


def tiny_openclip_text():  # -> open_clip.transformer.TextTransformer
    """A tiny OpenCLIP text tower (TINY_VIDEOCRAFTER_TEXT_CONFIG), random weights; its state dict has the names
    of the released checkpoint's `cond_stage_model.model.*` (FrozenOpenCLIPEmbedder deletes `visual`)."""
    from open_clip.transformer import TextTransformer

    c = TINY_VIDEOCRAFTER_TEXT_CONFIG
    return TextTransformer(
        context_length=c["context_length"], vocab_size=c["vocab_size"], width=c["width"], heads=c["heads"],
        layers=c["layers"], mlp_ratio=c["mlp_ratio"], output_dim=c["width"],
    )


def ldm_vae_state_dict(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's tensors under the names of the original LDM / lvdm VAE (videocrafter
    lvdm/modules/networks/ae_modules.py Encoder/Decoder, lvdm/models/autoencoder.py): the layout of
    `first_stage_model.*` in VideoCrafter2's model.ckpt. Written from those module names, independently of
    the diffusers converter the loader uses, so a round trip tests the converter."""
    n = len(vae.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        new = key
        for side in ("encoder", "decoder"):
            new = new.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
            new = new.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            new = new.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for old, name in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                              ("to_out.0.", "proj_out.")):
                new = new.replace(old, name)
            if new.endswith(".weight") and value.ndim == 2:  # lvdm AttnBlock: 1x1 convolutions
                value = value[:, :, None, None]
        for i in range(n):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[new] = value.clone()
    return out


def tiny_videocrafter_vae() -> AutoencoderKL:
    """The diffusers form of TINY_VIDEOCRAFTER_VAE_CONFIG (what the loader builds)."""
    from fourdfy.guidance.videocrafter_weights import diffusers_vae_config

    return AutoencoderKL(**diffusers_vae_config(TINY_VIDEOCRAFTER_VAE_CONFIG))


def save_tiny_videocrafter2(root: Path, filename: str = "model.ckpt", seed: int = 0) -> Path:
    """A folder holding a tiny VideoCrafter2 checkpoint laid out as the released model.ckpt: {'state_dict': {
    model.diffusion_model.*, first_stage_model.* (lvdm names), cond_stage_model.model.* (OpenCLIP names, plus
    logit_scale), the DDPM buffers betas / alphas_cumprod and use_scale's scale_arr}}. Returns the file."""
    from fourdfy.guidance.videocrafter_weights import videocrafter2_schedule

    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = VideoCrafterUNet(**TINY_VIDEOCRAFTER_UNET_CONFIG)
        vae = tiny_videocrafter_vae()
        text = tiny_openclip_text()
        with torch.no_grad():  # open_clip initialises the final LayerNorm / embeddings plainly: perturb them
            for p in text.parameters():
                p.add_(0.02 * torch.randn_like(p))
    state: dict[str, torch.Tensor] = {VC_UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({"first_stage_model." + k: v for k, v in ldm_vae_state_dict(vae).items()})
    state.update({"cond_stage_model.model." + k: v for k, v in text.state_dict().items()})
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    alphas_cumprod = videocrafter2_schedule().alphas_cumprod.float()
    state["alphas_cumprod"] = alphas_cumprod
    state["betas"] = 1 - alphas_cumprod / torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    state["scale_arr"] = torch.cat([torch.linspace(1.0, 0.7, 400), torch.full((1000,), 0.7)])
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, root / filename)
    return root / filename


def tiny_videocrafter2_config(checkpoint: Path) -> VideoCrafter2Config:
    """4 frames rendered 16×24, resized to 32×48 (latents [1, 4, 4, 4, 6]); the authors' other values."""
    return VideoCrafter2Config(
        checkpoint=str(checkpoint),
        unet_config=dict(TINY_VIDEOCRAFTER_UNET_CONFIG),
        vae_config=dict(TINY_VIDEOCRAFTER_VAE_CONFIG),
        text_config=dict(TINY_VIDEOCRAFTER_TEXT_CONFIG),
        n_frames=4,
        render_height=16,
        render_width=24,
        image_height=32,
        image_width=48,
    )


# ---------------------------------------------------------------- tiny priors


def tiny_mvdream_config(mvdream_dir: Path, components_dir: Path) -> MVDreamConfig:
    """4 views rendered 16² or 32², resized to 32² (latents 4×4×4)."""
    return MVDreamConfig(
        checkpoint=str(mvdream_dir),
        components_model=str(components_dir),
        unet_config=dict(TINY_MVDREAM_UNET_CONFIG),
        image_size=32,
        render_sizes=(16, 32),
    )


def tiny_sd_vsd_config(sd_base_dir: Path, sd_v_dir: Path) -> SDVSDConfig:
    """One 32² render upsampled to 64² (latents 4×8×8)."""
    return SDVSDConfig(
        pretrained_model=str(sd_base_dir), lora_pretrained_model=str(sd_v_dir), render_size=32, image_size=64
    )


def tiny_zeroscope_config(zeroscope_dir: Path) -> ZeroscopeConfig:
    """4 frames rendered 16×24, upsampled to 32×48 (latents [1, 4, 4, 4, 6])."""
    return ZeroscopeConfig(
        pretrained_model=str(zeroscope_dir),
        n_frames=4,
        render_height=16,
        render_width=24,
        image_height=32,
        image_width=48,
    )


def save_tiny_models(root: Path) -> dict[str, Path]:
    """All tiny model folders under `root`: sd_base (ε), sd_v (v-prediction), zeroscope, mvdream."""
    return {
        "sd_base": save_tiny_sd(root / "sd-base", "epsilon", seed=0),
        "sd_v": save_tiny_sd(root / "sd-v", "v_prediction", seed=1),
        "zeroscope": save_tiny_zeroscope(root / "zeroscope", seed=2),
        "mvdream": save_tiny_mvdream(root / "mvdream", seed=3),
    }


def build_tiny_guidances(tmp_path: Path, seed: int = 0) -> dict[UpdateKind, Any]:
    """Tiny random-weight priors {MULTIVIEW: MVDream, IMAGE: SD VSD, VIDEO: Zeroscope}, loaded via from_config.

    Render sizes: MULTIVIEW 4 views of 32×32 (or 16×16), IMAGE 1 view of 32×32, VIDEO 4 frames of 16×24
    (each prior's `n_views` and `native_size` say so). Keys are str enums: `guidances["vid"]` works too.
    """
    paths = save_tiny_models(tmp_path)
    return {
        UpdateKind.MULTIVIEW: MVDreamGuidance.from_config(
            tiny_mvdream_config(paths["mvdream"], paths["sd_base"]), seed=seed
        ),
        UpdateKind.IMAGE: SDVSDGuidance.from_config(tiny_sd_vsd_config(paths["sd_base"], paths["sd_v"]), seed=seed),
        UpdateKind.VIDEO: ZeroscopeGuidance.from_config(tiny_zeroscope_config(paths["zeroscope"]), seed=seed),
    }
