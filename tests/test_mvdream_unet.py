"""MultiViewUNet against the official MVDream outputs in shared/testdata/mvdream (tiny random-weight UNet).

The reference values were produced by running bytedance/MVDream's MultiViewUNetModel (config.json says how);
here our independent implementation must reproduce them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from fourdfy.models.mvdream_unet import (
    CHECKPOINT_PREFIX,
    MVDREAM_SD21_BASE_4VIEW_CONFIG,
    MultiViewUNet,
    load_mvdream_unet,
    timestep_embedding,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "mvdream"
pytestmark = [
    pytest.mark.numerics,  # floats against references: .ci/run reruns these on other SIMD kernels
    pytest.mark.skipif(
        not (DATA / "config.json").is_file(), reason=f"MVDream test data not found at {DATA}"
    ),
]


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads((DATA / "config.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(DATA / "io.safetensors"))


@pytest.fixture(scope="module")
def ckpt() -> dict[str, Tensor]:
    """The tiny checkpoint with its official 'model.diffusion_model.' keys, cast to float32."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(DATA / "unet_tiny.safetensors")).items()}


@pytest.fixture(scope="module")
def unet(meta: dict[str, Any], ckpt: dict[str, Tensor]) -> MultiViewUNet:
    model = MultiViewUNet(**meta["unet_config"])
    state = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in ckpt.items()}
    model.load_state_dict(state, strict=True)  # raises on any missing / unexpected key or shape
    return model.eval()


def _num_frames(io: dict[str, Tensor]) -> int:
    return int(io["num_frames"][0])


def _max_err(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_tiny_checkpoint_loads_strict(
    unet: MultiViewUNet, meta: dict[str, Any], ckpt: dict[str, Tensor]
) -> None:
    derived = meta["derived"]
    assert sum(p.numel() for p in unet.parameters()) == derived["num_parameters"] == 811652
    assert len(unet.state_dict()) == derived["num_keys"] == len(ckpt)
    # Same names in the same order as the official state_dict.
    assert [CHECKPOINT_PREFIX + k for k in unet.state_dict()] == [k for k, _ in meta["keys"]]


def test_eps_matches_official_float32(unet: MultiViewUNet, io: dict[str, Tensor]) -> None:
    f = _num_frames(io)
    assert f == 4
    with torch.no_grad():
        eps = unet(io["x"], io["timesteps"], io["context"], io["camera"], num_frames=f)
        eps_f1 = unet(io["x"], io["timesteps"], io["context"], io["camera"], num_frames=1)
        eps_nocam = unet(io["x"], io["timesteps"], io["context"], None, num_frames=f)
    assert eps.dtype == torch.float32
    # Tolerance from config.json suggested_tolerance (mistakes listed there move eps by >= 1.1e-5).
    assert _max_err(eps, io["eps"]) <= 1e-5
    assert _max_err(eps_f1, io["eps_num_frames_1"]) <= 1e-5
    assert _max_err(eps_nocam, io["eps_no_camera"]) <= 1e-5
    # The ablations really change the output (so the three checks are distinct).
    assert _max_err(io["eps"], io["eps_num_frames_1"]) > 1e-2
    assert _max_err(io["eps"], io["eps_no_camera"]) > 1e-2


def test_intermediates_match_official(unet: MultiViewUNet, io: dict[str, Tensor]) -> None:
    """Embeddings and every block's output, to localise a regression."""
    t_emb = timestep_embedding(io["timesteps"], unet.model_channels)
    assert _max_err(t_emb, io["intermediate.t_emb"]) <= 1e-5
    with torch.no_grad():
        assert unet.camera_embed is not None
        time_e = unet.time_embed(t_emb)
        cam_e = unet.camera_embed(io["camera"])
        assert _max_err(time_e, io["intermediate.time_embed"]) <= 1e-5
        assert _max_err(cam_e, io["intermediate.camera_embed"]) <= 1e-5
        assert _max_err(time_e + cam_e, io["intermediate.emb"]) <= 1e-5

        outputs: dict[str, Tensor] = {}
        stages = {f"input_blocks.{i}": s for i, s in enumerate(unet.input_blocks)}
        stages["middle_block"] = unet.middle_block
        stages.update({f"output_blocks.{i}": s for i, s in enumerate(unet.output_blocks)})
        handles = [
            stage.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out))
            for name, stage in stages.items()
        ]
        try:
            unet(io["x"], io["timesteps"], io["context"], io["camera"], num_frames=_num_frames(io))
        finally:
            for h in handles:
                h.remove()
    assert set(outputs) == {k.removeprefix("intermediate.") for k in io if k.startswith("intermediate.")} - {
        "t_emb", "emb", "time_embed", "camera_embed"
    }
    for name, out in outputs.items():
        assert _max_err(out, io[f"intermediate.{name}"]) <= 1e-5, name


def test_eps_matches_official_float64(
    unet: MultiViewUNet, meta: dict[str, Any], io: dict[str, Tensor]
) -> None:
    model = MultiViewUNet(**meta["unet_config"])
    model.load_state_dict(unet.state_dict())
    model = model.double().eval()
    with torch.no_grad():
        eps = model(
            io["x"].double(), io["timesteps"], io["context"].double(), io["camera"].double(),
            num_frames=_num_frames(io),
        )
    assert eps.dtype == torch.float64
    assert _max_err(eps, io["eps_float64"]) <= 1e-10


def test_full_size_config_on_meta(meta: dict[str, Any]) -> None:
    ref = meta["reference_full_size"]
    assert dict(MVDREAM_SD21_BASE_4VIEW_CONFIG) == ref["unet_config"]
    with torch.device("meta"):
        model = MultiViewUNet(**MVDREAM_SD21_BASE_4VIEW_CONFIG)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 867_572_164 == ref["num_parameters"]
    assert len(state) == 690 == ref["num_keys"]
    assert model.camera_embed is not None
    assert sum(p.numel() for p in model.camera_embed.parameters()) == ref["camera_embed_parameters"]
    expected = [(k.removeprefix(CHECKPOINT_PREFIX), tuple(shape)) for k, shape in ref["keys"]]
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected


def test_load_from_pt_with_state_dict_and_other_prefixes(
    tmp_path: Path, meta: dict[str, Any], ckpt: dict[str, Tensor], io: dict[str, Tensor]
) -> None:
    full = dict(ckpt)
    # What else the official checkpoint holds: VAE, text encoder and schedule buffers.
    full["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    full["cond_stage_model.model.positional_embedding"] = torch.randn(77, 32)
    full["betas"] = torch.linspace(0.00085, 0.012, 1000)
    full["alphas_cumprod"] = torch.rand(1000)
    path = tmp_path / "mvdream.pt"
    torch.save({"state_dict": full, "global_step": 123}, path)

    model = load_mvdream_unet(path, config=meta["unet_config"])
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    loaded = model.state_dict()
    assert set(loaded) == {k.removeprefix(CHECKPOINT_PREFIX) for k in ckpt}
    for k, v in ckpt.items():
        assert torch.equal(loaded[k.removeprefix(CHECKPOINT_PREFIX)], v), k
    with torch.no_grad():
        eps = model(io["x"], io["timesteps"], io["context"], io["camera"], num_frames=_num_frames(io))
    assert _max_err(eps, io["eps"]) <= 1e-5


def test_load_plain_dict_and_safetensors(
    tmp_path: Path, meta: dict[str, Any], ckpt: dict[str, Tensor]
) -> None:
    path = tmp_path / "plain.pt"
    torch.save(ckpt, path)
    a = load_mvdream_unet(path, config=meta["unet_config"], dtype=torch.float64)
    b = load_mvdream_unet(DATA / "unet_tiny.safetensors", config=meta["unet_config"], dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in a.parameters())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_missing_and_unexpected_keys_are_named(
    tmp_path: Path, meta: dict[str, Any], ckpt: dict[str, Tensor]
) -> None:
    broken = dict(ckpt)
    del broken[CHECKPOINT_PREFIX + "camera_embed.2.bias"]
    del broken[CHECKPOINT_PREFIX + "middle_block.1.transformer_blocks.0.attn1.to_q.weight"]
    broken[CHECKPOINT_PREFIX + "label_emb.0.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": broken}, path)
    with pytest.raises(ValueError) as info:
        load_mvdream_unet(path, config=meta["unet_config"])
    msg = str(info.value)
    assert "missing keys (2)" in msg
    assert "camera_embed.2.bias" in msg and "middle_block.1.transformer_blocks.0.attn1.to_q.weight" in msg
    assert "unexpected keys (1)" in msg and "label_emb.0.weight" in msg

    # A checkpoint of another size is reported as shape mismatches (full-size config, tiny weights).
    with pytest.raises(ValueError, match="shape mismatches"):
        load_mvdream_unet(DATA / "unet_tiny.safetensors")


def test_bad_inputs_raise(unet: MultiViewUNet, meta: dict[str, Any], io: dict[str, Tensor]) -> None:
    x, t, ctx, cam = io["x"], io["timesteps"], io["context"], io["camera"]
    with pytest.raises(ValueError, match="num_frames"):
        unet(x, t, ctx, cam, num_frames=3)
    with pytest.raises(ValueError, match="timesteps"):
        unet(x, t[:1], ctx, cam, num_frames=4)
    with pytest.raises(ValueError, match="camera"):
        unet(x, t, ctx, cam.reshape(8, 4, 4), num_frames=4)
    with pytest.raises(ValueError, match="context"):
        unet(x, t, ctx[:4], cam, num_frames=4)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(x[:, :, :7, :7], t, ctx, cam, num_frames=4)
    with pytest.raises(ValueError, match="num_head_channels"):
        MultiViewUNet(**{**meta["unet_config"], "num_head_channels": 48})


def test_views_attend_jointly_only_within_an_object(unet: MultiViewUNet, io: dict[str, Tensor]) -> None:
    """Swapping the two objects, or reordering the views inside each object, permutes eps the same way."""
    f = _num_frames(io)
    args = (io["x"], io["timesteps"], io["context"], io["camera"])
    perm = torch.tensor([5, 7, 4, 6, 2, 0, 3, 1])  # objects swapped, views shuffled within each
    with torch.no_grad():
        eps = unet(*[a[perm] for a in args], num_frames=f)
    assert _max_err(eps, io["eps"][perm]) <= 1e-5
    # Moving one view to the other object changes both objects' outputs: the attention is joint.
    mix = torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])
    with torch.no_grad():
        mixed = unet(*[a[mix] for a in args], num_frames=f)
    assert _max_err(mixed[:3], io["eps"][:3]) > 1e-4


def test_gradient_checkpointing_same_values_and_grads(meta: dict[str, Any], ckpt: dict[str, Tensor]) -> None:
    torch.manual_seed(0)
    cfg = meta["unet_config"]
    state = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in ckpt.items()}
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([10, 500, 999, 0])
    ctx = torch.randn(4, 77, cfg["context_dim"])
    cam = torch.randn(4, 16)
    results = []
    for flag in (False, True):
        model = MultiViewUNet(**{**cfg, "use_checkpoint": flag})
        model.load_state_dict(state)
        assert all(m.use_checkpoint == flag for m in model.modules() if hasattr(m, "use_checkpoint"))
        xg = x.clone().requires_grad_(True)
        out = model(xg, t, ctx, cam, num_frames=2)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((out.detach(), xg.grad, grads))
    (o0, gx0, g0), (o1, gx1, g1) = results
    assert torch.equal(o0, o1)
    assert torch.allclose(gx0, gx1, atol=1e-6, rtol=1e-5)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-5), name


def test_conv_projection_path_equals_linear_path(
    unet: MultiViewUNet, meta: dict[str, Any], io: dict[str, Tensor]
) -> None:
    """SD 1.x style (1x1 conv proj_in/out) with the same weights computes the same function."""
    conv = MultiViewUNet(**{**meta["unet_config"], "use_linear_in_transformer": False})
    state = {}
    conv_shapes = {k: v.shape for k, v in conv.state_dict().items()}
    for k, v in unet.state_dict().items():
        state[k] = v.reshape(conv_shapes[k])  # [out, in] -> [out, in, 1, 1] for proj_in / proj_out
    conv.load_state_dict(state, strict=True)
    assert any(len(s) == 4 and "proj_in" in k for k, s in conv_shapes.items())
    with torch.no_grad():
        eps = conv.eval()(io["x"], io["timesteps"], io["context"], io["camera"], num_frames=_num_frames(io))
    assert _max_err(eps, io["eps"]) <= 1e-5
