"""MVDream's multi-view UNet (SD 2.1 UNet + joint cross-view self-attention + camera MLP).

Our own implementation of `MultiViewUNetModel` from bytedance/MVDream
(mvdream/ldm/modules/diffusionmodules/openaimodel.py and mvdream/ldm/modules/attention.py), written so that
its parameter names are the official ones: the UNet tensors of the official `sd-v2.1-base-4view` checkpoint
(keys `model.diffusion_model.*`, prefix stripped) load with `strict=True`.

What differs from Stable Diffusion 2.1's UNet:
- every transformer's self-attention (`attn1`) runs jointly over the tokens of the F views of one object:
  rows are grouped `(b f)` (views of one object are consecutive), tokens `[(b f), L, C] -> [b, F*L, C]`;
- a camera MLP `camera_embed` (camera_dim -> 4*model_channels -> 4*model_channels, SiLU between) whose
  output is added to the timestep embedding that every ResBlock receives.

Numerics follow the official code (checked against /work/shared/testdata/mvdream to 1e-5 in float32):
ResBlock and output GroupNorms use eps 1e-5 and compute in (at least) float32; the transformer GroupNorm uses
eps 1e-6; LayerNorms eps 1e-5; exact (erf) GELU in GEGLU; timestep embedding is [cos, sin].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Prefix of the UNet tensors in the official checkpoint: LatentDiffusionInterface.model is a
# DiffusionWrapper whose attribute `diffusion_model` is the UNet (MVDream, mvdream/ldm/interface.py).
CHECKPOINT_PREFIX: Final[str] = "model.diffusion_model."

# The UNet config of `sd-v2.1-base-4view`: MVDream, mvdream/configs/sd-v2-base.yaml, model.params.unet_config.
# 867,572,164 parameters in 690 tensors. Copy it (dict(...)) before changing a field.
MVDREAM_SD21_BASE_4VIEW_CONFIG: Final[dict[str, Any]] = {
    "image_size": 32,  # unused by the UNet (yaml comment "# unused"); latent is 4x32x32 for 256x256 images
    "in_channels": 4,  # SD latent channels
    "out_channels": 4,  # epsilon prediction, same shape as the latent
    "model_channels": 320,  # SD 2.1 base width
    "attention_resolutions": [4, 2, 1],  # transformers at downsample factors 1, 2, 4 (not at 8)
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],  # widths 320, 640, 1280, 1280
    "num_head_channels": 64,  # heads = width // 64 at every level (5, 10, 20)
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,  # SD 2.x: proj_in / proj_out are Linear, not 1x1 conv
    "transformer_depth": 1,
    "context_dim": 1024,  # OpenCLIP ViT-H-14 penultimate-layer width
    "use_checkpoint": False,
    "legacy": False,
    "camera_dim": 16,  # flattened 4x4 camera-to-world matrix, row-major
}

# GroupNorm settings of the official code: `normalization(ch)` = GroupNorm32(32, ch) with the default eps
# 1e-5 in ResBlocks and the output head (diffusionmodules/util.py); `Normalize(ch)` = GroupNorm(32, ch,
# eps=1e-6) in the spatial transformer (attention.py).
_NUM_GROUPS: Final[int] = 32
_RESBLOCK_NORM_EPS: Final[float] = 1e-5
_TRANSFORMER_NORM_EPS: Final[float] = 1e-6
# Timestep embedding base period (openaimodel/util.py `timestep_embedding`, max_period=10000).
_MAX_PERIOD: Final[float] = 10000.0
# FeedForward inner width = 4 * dim, gated (GEGLU) (attention.py FeedForward(mult=4, glu=True)).
_FF_MULT: Final[int] = 4


def timestep_embedding(timesteps: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal timestep embedding, cosines first (as in the official `timestep_embedding`).

    timesteps: [N] (int or float); dim: embedding width; dtype: computation dtype of the frequencies and
    the result (float32 as the official code; float64 for a float64 model). Returns [N, dim].
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape [N], got {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=dtype, device=timesteps.device) / half
    freqs = torch.exp(-math.log(_MAX_PERIOD) * exponent)
    args = timesteps.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd widths get one zero column, as in the official code
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _GroupNormF32(nn.GroupNorm):
    """GroupNorm computed in at least float32 and cast back (the official GroupNorm32).

    In fp16/bf16 the statistics of wide activations overflow or lose precision; the official ResBlock norm
    upcasts for that reason, and we do the same in the transformer norm (identical in float32).
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] -> [N, C, H, W] (same dtype)."""
        compute = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(compute) if self.weight is not None else None
        bias = self.bias.to(compute) if self.bias is not None else None
        return F.group_norm(x.to(compute), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _maybe_checkpoint(enabled: bool, fn: Any, *args: Any) -> Any:
    """Run fn(*args), recomputing its activations in backward when `enabled` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ResBlock(nn.Module):
    """Residual block conditioned on the (time + camera) embedding by a per-channel bias.

    Keys: in_layers.{0: norm, 2: conv}, emb_layers.1, out_layers.{0: norm, 3: conv}, skip_connection.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.use_checkpoint = False
        self.in_layers = nn.Sequential(
            _GroupNormF32(_NUM_GROUPS, channels, eps=_RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            _GroupNormF32(_NUM_GROUPS, out_channels, eps=_RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # Identity keeps the key set of the official model (no skip_connection.* when widths match).
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: [N, C_in, H, W], emb: [N, E] -> [N, C_out, H, W]."""
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, emb)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W (key `op`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] -> [N, C, ceil(H/2), ceil(W/2)]."""
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (key `conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] -> [N, C, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention with the official parameter names (to_q, to_k, to_v without bias; to_out.0).

    Computed with `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, exact math on
    CPU); scale dim_head**-0.5 as in the official code.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: [B, L, Cq], context: [B, T, Cc] (None: self-attention over x) -> [B, L, Cq]."""
        source = x if context is None else context
        batch, length, _ = x.shape
        # '(b) n (h d) -> b h n d': heads are the outer factor of the channel axis.
        q = self.to_q(x).view(batch, length, self.heads, self.dim_head).transpose(1, 2)
        k = self.to_k(source).view(batch, source.shape[1], self.heads, self.dim_head).transpose(1, 2)
        v = self.to_v(source).view(batch, source.shape[1], self.heads, self.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.dim_head**-0.5)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection: first half of `proj` is the value, second half the gate (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim_in] -> [..., dim_out]."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, keys net.0.proj and net.2."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        inner = _FF_MULT * dim
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] -> [..., dim]."""
        return self.net(x)


class BasicTransformerBlock3D(nn.Module):
    """Pre-norm transformer block whose self-attention is joint over the views of one object.

    attn1 (self) over the F*L tokens of an object's F views; attn2 (cross, to the text context) and the
    feed-forward per view. Attribute order matches the official state_dict order.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float) -> None:
        super().__init__()
        self.use_checkpoint = False
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5 (nn.LayerNorm default, as the official code)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def _forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        rows, length, channels = x.shape
        # '(b f) l c -> b (f l) c': rows are grouped by object, so a reshape concatenates the views.
        joint = x.reshape(rows // num_frames, num_frames * length, channels)
        joint = self.attn1(self.norm1(joint)) + joint
        x = joint.reshape(rows, length, channels)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        """x: [N, L, C] with N = B*F rows grouped (b f); context: [N, T, Cc] -> [N, L, C]."""
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, context, num_frames)


class SpatialTransformer3D(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks (multi-view) -> proj_out, plus the input (residual).

    use_linear: SD 2.x style Linear projections on tokens; otherwise SD 1.x style 1x1 convolutions.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        if inner != channels:
            # The official linear path builds proj_out as Linear(channels, inner) and only works when equal.
            raise ValueError(f"heads*dim_head ({heads}*{dim_head}) must equal the width {channels}")
        self.use_linear = use_linear
        self.norm = _GroupNormF32(_NUM_GROUPS, channels, eps=_TRANSFORMER_NORM_EPS)
        self.proj_in: nn.Module = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock3D(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)]
        )
        self.proj_out: nn.Module = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        """x: [N, C, H, W], context: [N, T, Cc] -> [N, C, H, W]."""
        n, c, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, num_frames)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(n, h.shape[-1], height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class UNetStage(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers applied in order (keys 0, 1, ...).

    ResBlocks get the embedding, transformers the text context and num_frames, other layers only h.
    """

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:  # type: ignore[override]
        """h: [N, C, H, W], emb: [N, E], context: [N, T, Cc] -> [N, C', H', W']."""
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer3D):
                h = layer(h, context, num_frames)
            else:
                h = layer(h)
        return h


class MultiViewUNet(nn.Module):
    """MVDream's MultiViewUNetModel; constructor arguments named as MVDream's unet_config.

    Args (MVDream names):
        image_size: latent size in the config; unused by the network (any H, W divisible by 2**(levels-1)).
        in_channels / out_channels: latent channels in / predicted-noise channels out.
        model_channels: base width; the time (and camera) embedding width is 4 * model_channels.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up); an int or
            one int per level.
        attention_resolutions: downsample factors (1, 2, 4, ...) at which a transformer follows each ResBlock.
        channel_mult: width multiplier per level.
        num_heads: fixed number of heads (SD 1.x configs); -1 when num_head_channels is given.
        num_head_channels: width per head (SD 2.x configs); heads = width // num_head_channels per level.
        use_spatial_transformer: must be True (every MVDream config); the old AttentionBlock path is absent.
        use_linear_in_transformer: Linear proj_in/proj_out (SD 2.x) instead of 1x1 convolutions (SD 1.x).
        transformer_depth: transformer blocks per SpatialTransformer3D.
        context_dim: width of the text context tokens.
        use_checkpoint: gradient checkpointing of ResBlocks and transformer blocks (saves memory in backward).
        legacy: accepted for config compatibility; with spatial transformers it does not change the network.
        camera_dim: camera vector width (16), or None for a model without camera_embed.
        dropout: dropout probability in ResBlocks, attention outputs and feed-forwards (0 in MVDream).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_spatial_transformer: bool = True,
        use_linear_in_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
        legacy: bool = True,
        camera_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not use_spatial_transformer:
            raise ValueError(
                "use_spatial_transformer=False (the AttentionBlock UNet) is not implemented; "
                "MVDream's configs all set use_spatial_transformer=True"
            )
        if context_dim is None:
            raise ValueError(
                "context_dim is required with use_spatial_transformer=True (e.g. 1024 for SD 2.1)"
            )
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"set exactly one of num_heads ({num_heads}) and num_head_channels ({num_head_channels}); "
                "the other must be -1"
            )
        levels = len(channel_mult)
        if isinstance(num_res_blocks, int):
            res_blocks = [num_res_blocks] * levels
        else:
            res_blocks = list(num_res_blocks)
            if len(res_blocks) != levels:
                raise ValueError(
                    f"num_res_blocks has {len(res_blocks)} entries but channel_mult has {levels} levels; "
                    "give one int or one per level"
                )
        for width in [model_channels] + [m * model_channels for m in channel_mult]:
            if width % _NUM_GROUPS:
                raise ValueError(
                    f"every width must be a multiple of {_NUM_GROUPS} (GroupNorm groups); width {width} from "
                    f"model_channels={model_channels}, channel_mult={list(channel_mult)} is not"
                )

        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.camera_dim = camera_dim
        self.context_dim = context_dim
        self.num_levels = levels
        self.legacy = legacy
        self.use_checkpoint = use_checkpoint
        attn_res = set(attention_resolutions)
        time_embed_dim = 4 * model_channels  # official: time_embed_dim = model_channels * 4

        def heads_for(width: int) -> tuple[int, int]:
            # Recomputed at every width (legacy=False semantics; with spatial transformers legacy=True
            # yields the same numbers).
            if num_head_channels != -1:
                if width % num_head_channels:
                    raise ValueError(f"num_head_channels={num_head_channels} must divide the width {width}")
                return width // num_head_channels, num_head_channels
            if width % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide the width {width}")
            return num_heads, width // num_heads

        def transformer(width: int) -> SpatialTransformer3D:
            heads, dim_head = heads_for(width)
            return SpatialTransformer3D(
                width, heads, dim_head, transformer_depth, context_dim, use_linear_in_transformer, dropout
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.camera_embed: nn.Sequential | None = None
        if camera_dim is not None:
            self.camera_embed = nn.Sequential(
                nn.Linear(camera_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            )

        self.input_blocks = nn.ModuleList([UNetStage([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        skip_widths = [model_channels]  # width of every input block's output, popped LIFO on the way up
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, time_embed_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attn_res:
                    layers.append(transformer(ch))
                self.input_blocks.append(UNetStage(layers))
                skip_widths.append(ch)
            if level != levels - 1:
                self.input_blocks.append(UNetStage([Downsample(ch)]))
                skip_widths.append(ch)
                ds *= 2

        # The middle transformer ignores attention_resolutions (official: "always uses a self-attn").
        self.middle_block = UNetStage(
            [
                ResBlock(ch, time_embed_dim, ch, dropout),
                transformer(ch),
                ResBlock(ch, time_embed_dim, ch, dropout),
            ]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(res_blocks[level] + 1):
                skip = skip_widths.pop()
                layers = [ResBlock(ch + skip, time_embed_dim, model_channels * mult, dropout)]
                ch = model_channels * mult
                if ds in attn_res:
                    layers.append(transformer(ch))
                if level and i == res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetStage(layers))

        self.out = nn.Sequential(
            _GroupNormF32(_NUM_GROUPS, ch, eps=_RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(model_channels, out_channels, 3, padding=1),
        )
        self.set_gradient_checkpointing(use_checkpoint)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn gradient checkpointing of every ResBlock and transformer block on or off."""
        self.use_checkpoint = enabled
        for module in self.modules():
            if isinstance(module, (ResBlock, BasicTransformerBlock3D)):
                module.use_checkpoint = enabled

    def _check_inputs(
        self, x: Tensor, timesteps: Tensor, context: Tensor, camera: Tensor | None, num_frames: int
    ) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        n = x.shape[0]
        if not isinstance(num_frames, int) or num_frames < 1 or n % num_frames:
            raise ValueError(
                f"num_frames must be a positive int dividing the batch N={n} (N = objects * views), "
                f"got {num_frames!r}"
            )
        factor = 2 ** (self.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"H and W of x ({x.shape[2]}x{x.shape[3]}) must be multiples of {factor} "
                f"(2**(levels-1)) so that skip connections line up"
            )
        if timesteps.shape != (n,):
            raise ValueError(
                f"timesteps must have shape [N]=[{n}] (one per row; expand a shared t), "
                f"got {tuple(timesteps.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != n or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must have shape [N={n}, T, {self.context_dim}] (one row per view; repeat the "
                f"prompt embedding over the views), got {tuple(context.shape)}"
            )
        if camera is not None:
            if self.camera_embed is None:
                raise ValueError("camera was given but the model has no camera_embed (camera_dim=None)")
            if camera.shape != (n, self.camera_dim):
                raise ValueError(
                    f"camera must have shape [N, {self.camera_dim}]=[{n}, {self.camera_dim}], "
                    f"got {tuple(camera.shape)}"
                )

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        camera: Tensor | None = None,
        num_frames: int = 1,
    ) -> Tensor:
        """Predict the noise of every view.

        x: [N, in_channels, H, W] noisy latents, N = B*num_frames with rows grouped (b f) (the views of one
        object are consecutive); timesteps: [N]; context: [N, T, context_dim] text tokens;
        camera: [N, camera_dim] flattened camera-to-world matrices, or None (no camera conditioning);
        num_frames: views per object (1 = ordinary per-image attention).
        Computes in the dtype of the parameters; returns eps [N, out_channels, H, W] in x's dtype.
        """
        self._check_inputs(x, timesteps, context, camera, num_frames)
        dtype = self.time_embed[0].weight.dtype
        # Frequencies in float32 as the official code (float64 for a float64 model), then the model dtype.
        t_emb = timestep_embedding(timesteps, self.model_channels, torch.promote_types(dtype, torch.float32))
        emb = self.time_embed(t_emb.to(dtype))
        if camera is not None and self.camera_embed is not None:
            emb = emb + self.camera_embed(camera.to(dtype))
        context = context.to(dtype)

        h = x.to(dtype)
        skips: list[Tensor] = []
        for stage in self.input_blocks:
            h = stage(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)  # order [h, skip]
        return self.out(h).to(x.dtype)


def _read_tensors(path: Path, trust_pickle: bool) -> dict[str, Tensor]:
    """All tensors of a `.safetensors` file or a torch pickle (a plain dict or one under 'state_dict')."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # torch raises several types for pickles with non-tensor objects
        raise ValueError(
            f"could not read {path} as a weights-only torch checkpoint ({err}); if you trust the file, "
            "pass trust_pickle=True, or convert it to .safetensors"
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, expected a dict of tensors or {{'state_dict': ...}}"
        )
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _unet_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The UNet tensors with the 'model.diffusion_model.' prefix stripped (a bare UNet dict as is)."""
    if any(k.startswith(CHECKPOINT_PREFIX) for k in tensors):
        return {k[len(CHECKPOINT_PREFIX):]: v for k, v in tensors.items() if k.startswith(CHECKPOINT_PREFIX)}
    return dict(tensors)


def _check_keys(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Raise a ValueError naming missing / unexpected keys and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, items: list[str], limit: int = 20) -> str:
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more

    parts = [f"checkpoint {source} does not match the MultiViewUNet config"]
    if missing:
        parts.append(listing("missing keys", missing))
    if unexpected:
        parts.append(listing("unexpected keys", unexpected))
    if mismatched:
        parts.append(listing("shape mismatches", mismatched))
    parts.append(
        f"\n  (UNet keys are read under '{CHECKPOINT_PREFIX}'; check the file and the config passed to "
        "load_mvdream_unet)"
    )
    raise ValueError("".join(parts))


def load_mvdream_unet(
    path: str | Path,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_pickle: bool = False,
) -> MultiViewUNet:
    """Build a MultiViewUNet and load the official checkpoint's UNet tensors (strict).

    path: `.safetensors` or torch `.pt`/`.ckpt` (a plain dict, or a dict with a 'state_dict' key); keys
    under 'model.diffusion_model.' are taken and the prefix stripped, other prefixes (VAE, text encoder,
    schedule buffers) ignored; a file without that prefix is read as a bare UNet state dict.
    config: MultiViewUNet arguments (default MVDREAM_SD21_BASE_4VIEW_CONFIG).
    dtype / device: of the returned model's parameters. trust_pickle: allow arbitrary pickled objects in a
    .pt (only for files you trust). Returns the model in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MVDream checkpoint not found: {path}")
    state = _unet_tensors(_read_tensors(path, trust_pickle))
    # Built on the meta device and filled by assignment: no second full-size copy in memory.
    with torch.device("meta"):
        model = MultiViewUNet(**dict(config if config is not None else MVDREAM_SD21_BASE_4VIEW_CONFIG))
    _check_keys(model, state, str(path))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
