"""VideoCrafterUNet against the official VideoCrafter2 outputs in shared/testdata/videocrafter2 (tiny UNet with
random σ 0.2 weights).

The reference values were produced by running the authors' vendored VideoCrafter `UNetModel` (README.md there
says how); here our independent implementation must reproduce them. Tolerances:
- float32: 1e-5 max abs (measured 1.8e-6, the size of float32 rounding itself: the reference's own float32 and
  float64 outputs differ by 1.8e-6);
- float64: 1e-12 max abs (measured 4e-15, i.e. float64 rounding of O(1) outputs through ~100 layers; 1e-12
  leaves room for other BLAS kernels / thread counts). Mistakes too small for the float32 check are caught
  here: transformer GroupNorm eps 1e-5 instead of 1e-6 moves eps by 2e-6 (passes 1e-5 in float32!),
  computing the sinusoidal embeddings in float64 instead of float32 by 8e-8, a tanh GELU by 1.3e-4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from fourdfy.models.videocrafter_unet import (
    CHECKPOINT_PREFIX,
    VIDEOCRAFTER2_T2V_512_CONFIG,
    TemporalTransformer,
    VideoCrafterUNet,
    load_videocrafter_unet,
    unet_state_dict,
)

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "videocrafter2"


def _data(name: str) -> Path:
    """A reference file; skips the test (only those that need the data) when the shared data is absent."""
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"VideoCrafter2 reference data not found at {DATA} (shared/testdata next to the repository)")
    return path


# VideoCrafter 1 (configs/inference_t2v_512_v1.0.yaml: relative positions, no temporal conv, no fps): counted by
# building the official UNetModel with that config on the meta device (not part of the shared test data).
VIDEOCRAFTER1_T2V_512_CONFIG: dict[str, Any] = {
    **VIDEOCRAFTER2_T2V_512_CONFIG,
    "temporal_conv": False,
    "use_relative_position": True,
    "fps_cond": False,
}
VIDEOCRAFTER1_T2V_512_N_PARAMS = 1_144_485_956
VIDEOCRAFTER1_T2V_512_N_KEYS = 1196
# The reference data's tiny UNet (config.json unet_config); the data itself is compared with it below.
TINY_CONFIG: dict[str, Any] = {
    **VIDEOCRAFTER2_T2V_512_CONFIG,
    "use_checkpoint": False,
    "model_channels": 32,
    "attention_resolutions": [2, 1],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "context_dim": 32,
    "temporal_length": 4,
}


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads(_data("config.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_data("io.safetensors")))


@pytest.fixture(scope="module")
def ckpt() -> dict[str, Tensor]:
    """The tiny UNet's tensors under the checkpoint's own 'model.diffusion_model.' keys."""
    from safetensors.torch import load_file

    return load_file(str(_data("unet_tiny.safetensors")))


@pytest.fixture(scope="module")
def state(ckpt: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in ckpt.items()}


@pytest.fixture(scope="module")
def unet(meta: dict[str, Any], state: dict[str, Tensor]) -> VideoCrafterUNet:
    model = VideoCrafterUNet(**meta["unet_config"])
    model.load_state_dict(state, strict=True)  # raises on any missing / unexpected key or shape
    return model.eval()


def _max_err(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


def _eps(model: VideoCrafterUNet, io: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    with torch.no_grad():
        return model(io["x"].to(dtype), io["timesteps"], io["context"].to(dtype), io["fps"])


def test_tiny_checkpoint_loads_strict(unet: VideoCrafterUNet, meta: dict[str, Any], ckpt: dict[str, Tensor]) -> None:
    assert meta["unet_config"] == TINY_CONFIG
    assert len(unet.state_dict()) == meta["n_keys_tiny"] == len(ckpt) == 626
    assert {CHECKPOINT_PREFIX + k for k in unet.state_dict()} == set(ckpt)
    assert all(v.dtype == torch.float32 for v in ckpt.values())


def test_eps_matches_official_float32(unet: VideoCrafterUNet, io: dict[str, Tensor]) -> None:
    eps = _eps(unet, io)
    assert eps.shape == io["x"].shape == (2, 4, 4, 8, 8)
    assert eps.dtype == torch.float32
    assert _max_err(eps, io["eps"]) <= 1e-5


def test_eps_matches_official_float64(
    meta: dict[str, Any], state: dict[str, Tensor], io: dict[str, Tensor]
) -> None:
    model = VideoCrafterUNet(**meta["unet_config"])
    model.load_state_dict(state, strict=True)
    model = model.double().eval()
    eps = _eps(model, io, torch.float64)
    assert eps.dtype == torch.float64
    assert _max_err(eps, io["eps_float64"]) <= 1e-12
    # float32 input to the float64 model: computed in float64, returned in the input's dtype.
    eps32 = _eps(model, io)
    assert eps32.dtype == torch.float32
    assert _max_err(eps32, io["eps_float64"]) <= 1e-5


def test_fps_int_equals_tensor_and_matters(unet: VideoCrafterUNet, io: dict[str, Tensor]) -> None:
    assert io["fps"].tolist() == [8, 8]
    with torch.no_grad():
        as_int = unet(io["x"], io["timesteps"], io["context"], 8)
        default = unet(io["x"], io["timesteps"], io["context"])  # the official default, 16
    assert _max_err(as_int, io["eps"]) <= 1e-5
    assert _max_err(default, io["eps"]) > 1e-3


def test_videos_in_a_batch_are_independent(unet: VideoCrafterUNet, io: dict[str, Tensor]) -> None:
    with torch.no_grad():
        second = unet(io["x"][1:], io["timesteps"][1:], io["context"][1:], io["fps"][1:])
    assert _max_err(second, io["eps"][1:]) <= 1e-5


def test_full_size_config_on_meta(meta: dict[str, Any]) -> None:
    # The yaml sets use_checkpoint: true; the reference data's copy has it false (it does not change shapes).
    assert {**VIDEOCRAFTER2_T2V_512_CONFIG, "use_checkpoint": False} == meta["full_size_config"]
    with torch.device("meta"):
        model = VideoCrafterUNet(**VIDEOCRAFTER2_T2V_512_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == meta["full_size_n_params"] == 1_413_284_420
    assert all(p.device.type == "meta" for p in model.parameters())
    keys = model.state_dict()
    assert tuple(keys["init_attn.0.proj_in.weight"].shape) == (512, 320, 1)  # 8 heads x 64, Conv1d
    assert tuple(keys["input_blocks.1.0.temopral_conv.conv1.2.weight"].shape) == (320, 320, 3, 1, 1)
    assert tuple(keys["fps_embedding.2.weight"].shape) == (1280, 1280)


def test_videocrafter1_config_on_meta() -> None:
    with torch.device("meta"):
        model = VideoCrafterUNet(**VIDEOCRAFTER1_T2V_512_CONFIG)
    keys = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == VIDEOCRAFTER1_T2V_512_N_PARAMS
    assert len(keys) == VIDEOCRAFTER1_T2V_512_N_KEYS
    table = "input_blocks.1.2.transformer_blocks.0.attn1.relative_position_k.embeddings_table"
    assert tuple(keys[table].shape) == (2 * 16 + 1, 64)
    assert not any("temopral_conv" in k or k.startswith("fps_embedding") for k in keys)


def test_relative_position_and_causal_run() -> None:
    """The VideoCrafter 1 options (relative positions; causal temporal attention) build and run end to end.

    Their numerics were checked once against the official UNetModel (float64, 4e-15); no reference file here.
    """
    torch.manual_seed(0)
    cfg = {**TINY_CONFIG, "use_relative_position": True, "use_causal_attention": True}
    model = VideoCrafterUNet(**cfg).eval()
    x = torch.randn(1, 4, 4, 8, 8)
    with torch.no_grad():
        eps = model(x, torch.tensor([500]), torch.randn(1, 6, 32), 8)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


@pytest.mark.parametrize("relative_length", [None, 4])
def test_causal_temporal_attention_ignores_later_frames(relative_length: int | None) -> None:
    torch.manual_seed(0)
    video = torch.randn(1, 32, 4, 2, 2)
    later_changed = video.clone()
    later_changed[:, :, 1:] += 1.0
    for causal in (True, False):
        layer = TemporalTransformer(32, 2, 16, 1, True, 0.0, causal, relative_length).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.2)
            # The GroupNorm's statistics span all frames (as the official one); take it out to see the attention.
            layer.norm = torch.nn.Identity()
            change = _max_err(layer(video)[:, :, 0], layer(later_changed)[:, :, 0])
        assert (change <= 1e-6) if causal else (change > 1e-3), (causal, change)


def test_gradient_checkpointing_same_values_and_grads(meta: dict[str, Any], state: dict[str, Tensor]) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 8, 8)
    t = torch.tensor([500])
    ctx = torch.randn(1, 5, meta["unet_config"]["context_dim"])
    results = []
    for flag in (False, True):
        model = VideoCrafterUNet(**{**meta["unet_config"], "use_checkpoint": flag})
        model.load_state_dict(state)
        model.eval()  # dropout off; checkpointing still acts (gradients are recorded)
        assert all(m.use_checkpoint == flag for m in model.modules() if hasattr(m, "use_checkpoint"))
        xg = x.clone().requires_grad_(True)
        out = model(xg, t, ctx, 8)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((out.detach(), xg.grad, grads))
    (o0, gx0, g0), (o1, gx1, g1) = results
    assert torch.equal(o0, o1)
    assert gx0 is not None and gx1 is not None
    assert torch.allclose(gx0, gx1, atol=1e-6, rtol=1e-5)
    for name in g0:
        assert g0[name] is not None, name
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-5), name


def test_load_full_checkpoint_with_other_prefixes(
    tmp_path: Path, meta: dict[str, Any], ckpt: dict[str, Tensor], io: dict[str, Tensor]
) -> None:
    full = dict(ckpt)
    # What else the official model.ckpt holds: VAE, text encoder and schedule buffers.
    full["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    full["cond_stage_model.model.positional_embedding"] = torch.randn(77, 32)
    full["alphas_cumprod"] = torch.rand(1000)
    full["scale_arr"] = torch.rand(1000)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": full}, path)

    model = load_videocrafter_unet(path, config=meta["unet_config"])
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    loaded = model.state_dict()
    for k, v in ckpt.items():
        assert torch.equal(loaded[k.removeprefix(CHECKPOINT_PREFIX)], v), k
    assert _max_err(_eps(model, io), io["eps"]) <= 1e-5

    # The same from a loaded dict, a DeepSpeed layout, and the safetensors file, in float64.
    deepspeed = {"module": {"_forward_module." + k: v for k, v in full.items()}}
    for source in ({"state_dict": full}, deepspeed, DATA / "unet_tiny.safetensors"):
        other = load_videocrafter_unet(source, config=meta["unet_config"], dtype=torch.float64)
        assert all(p.dtype == torch.float64 for p in other.parameters())
        assert _max_err(_eps(other, io, torch.float64), io["eps_float64"]) <= 1e-12


def test_unet_state_dict_strips_prefix(ckpt: dict[str, Tensor]) -> None:
    full = {**ckpt, "first_stage_model.decoder.conv_out.bias": torch.zeros(3)}
    unet = unet_state_dict({"state_dict": full})
    assert set(unet) == {k.removeprefix(CHECKPOINT_PREFIX) for k in ckpt}
    with pytest.raises(ValueError, match=r"no 'model\.diffusion_model\.\*' tensors"):
        unet_state_dict({"first_stage_model.decoder.conv_out.bias": torch.zeros(3)})


def test_missing_and_unexpected_keys_are_named(meta: dict[str, Any], ckpt: dict[str, Tensor]) -> None:
    broken = dict(ckpt)
    del broken[CHECKPOINT_PREFIX + "fps_embedding.2.bias"]
    del broken[CHECKPOINT_PREFIX + "input_blocks.1.0.temopral_conv.conv4.3.weight"]
    broken[CHECKPOINT_PREFIX + "input_blocks.1.0.temporal_conv.conv4.3.weight"] = torch.zeros(32, 32, 3, 1, 1)
    with pytest.raises(ValueError) as info:
        load_videocrafter_unet({"state_dict": broken}, config=meta["unet_config"])
    msg = str(info.value)
    assert "missing keys (2)" in msg
    assert "fps_embedding.2.bias" in msg and "input_blocks.1.0.temopral_conv.conv4.3.weight" in msg
    assert "unexpected keys (1)" in msg and "input_blocks.1.0.temporal_conv.conv4.3.weight" in msg

    # Tiny weights for the full-size config: shape mismatches (and missing keys), before any allocation.
    with pytest.raises(ValueError, match="shape mismatches"):
        load_videocrafter_unet(DATA / "unet_tiny.safetensors")


def test_bad_inputs_raise(unet: VideoCrafterUNet, io: dict[str, Tensor]) -> None:
    x, t, ctx, fps = io["x"], io["timesteps"], io["context"], io["fps"]
    with pytest.raises(ValueError, match=r"x must have shape \[B, 4, T, H, W\]"):
        unet(x[:, :, 0], t, ctx, fps)  # a batch of images, not videos
    with pytest.raises(ValueError, match="channels before frames"):
        unet(x.transpose(1, 2).reshape(2, 4, 4, 8, 8)[:, :3], t, ctx, fps)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(x[..., :7, :7], t, ctx, fps)
    with pytest.raises(ValueError, match="timesteps"):
        unet(x, t[:1], ctx, fps)
    with pytest.raises(ValueError, match="context"):
        unet(x, t, ctx[..., :16], fps)
    with pytest.raises(ValueError, match="context"):
        unet(x, t, ctx[:1], fps)
    with pytest.raises(ValueError, match="fps"):
        unet(x, t, ctx, fps[:1])
    with pytest.raises(ValueError, match="fps"):
        unet(x, t, ctx, 8.0)  # type: ignore[arg-type]


def test_unsupported_options_are_named(meta: dict[str, Any]) -> None:
    cfg = meta["unet_config"]
    with pytest.raises(NotImplementedError, match="temporal_selfatt_only=False"):
        VideoCrafterUNet(**{**cfg, "temporal_selfatt_only": False})
    with pytest.raises(NotImplementedError, match="use_image_attention=True"):
        VideoCrafterUNet(**{**cfg, "use_image_attention": True})
    with pytest.raises(NotImplementedError, match="resblock_updown=True"):
        VideoCrafterUNet(**{**cfg, "resblock_updown": True})
    with pytest.raises(ValueError, match="temporal_length is required"):
        VideoCrafterUNet(**{**cfg, "use_relative_position": True, "temporal_length": None})
    with pytest.raises(ValueError, match="num_head_channels=24 must divide"):
        VideoCrafterUNet(**{**cfg, "num_head_channels": 24})


# --- Weights resolution (fourdfy/guidance/videocrafter_weights.py) -------------------------------------------


@pytest.fixture
def empty_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with an empty hub cache, whatever the machine's own cache holds."""
    from huggingface_hub import constants as hub_constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_model_ckpt(tmp_path: Path, ckpt: dict[str, Tensor]) -> Path:
    """A model.ckpt laid out as the released one ({'state_dict': {...}}, UNet under model.diffusion_model.)."""
    folder = tmp_path / "videocrafter2"
    folder.mkdir()
    full = {**ckpt, "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}
    torch.save({"state_dict": full}, folder / "model.ckpt")
    return folder / "model.ckpt"


def test_resolve_local_file_and_folder(empty_offline_hub: Path, tiny_model_ckpt: Path) -> None:
    from fourdfy.guidance.videocrafter_weights import resolve_videocrafter_checkpoint

    assert resolve_videocrafter_checkpoint(str(tiny_model_ckpt)) == tiny_model_ckpt
    assert resolve_videocrafter_checkpoint(str(tiny_model_ckpt.parent)) == tiny_model_ckpt


def test_resolve_hub_id_from_offline_cache(
    empty_offline_hub: Path, tiny_model_ckpt: Path, io: dict[str, Tensor]
) -> None:
    from fourdfy.guidance.videocrafter_weights import (
        VIDEOCRAFTER2_REPO,
        load_videocrafter2_unet,
        resolve_videocrafter_checkpoint,
    )

    repo = empty_offline_hub / ("models--" + VIDEOCRAFTER2_REPO.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision / "model.ckpt").write_bytes(tiny_model_ckpt.read_bytes())

    path = resolve_videocrafter_checkpoint()  # the default: the hub repo's model.ckpt
    assert path.is_file() and path.name == "model.ckpt" and empty_offline_hub in path.parents
    unet = load_videocrafter2_unet(unet_config=TINY_CONFIG)
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert _max_err(_eps(unet, io), io["eps"]) <= 1e-5


def test_missing_offline_names_the_config_key(empty_offline_hub: Path) -> None:
    from fourdfy.guidance.videocrafter_weights import load_videocrafter2_unet
    from fourdfy.guidance.weights import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError) as info:
        load_videocrafter2_unet(config_key="guidance.videocrafter.checkpoint")
    msg = str(info.value)
    assert msg.startswith("guidance.videocrafter.checkpoint = 'VideoCrafter/VideoCrafter2' is not available")
    assert "HF_HUB_OFFLINE=1" in msg and "model.ckpt" in msg
    with pytest.raises(ModelNotAvailableError, match="no such local file or folder"):
        load_videocrafter2_unet("/nonexistent/model.ckpt")


def test_wrong_checkpoint_names_the_config_key(empty_offline_hub: Path, tiny_model_ckpt: Path) -> None:
    from fourdfy.guidance.videocrafter_weights import load_videocrafter2_unet
    from fourdfy.guidance.weights import ModelNotAvailableError

    # Tiny weights against the full-size VideoCrafter2 config.
    with pytest.raises(ModelNotAvailableError, match=r"(?s)^guidance\.vc\.ckpt = .*shape mismatches"):
        load_videocrafter2_unet(str(tiny_model_ckpt), config_key="guidance.vc.ckpt")
