"""VideoCrafter2's video UNet (SD 2.1-style spatial UNet + temporal convolutions + temporal attention).

Our own implementation of `UNetModel` from the VideoCrafter code the 4D-fy authors vendor (github
sherwinbahmani/4dfy, threestudio/models/guidance/videocrafter/: lvdm/modules/networks/openaimodel3d.py for the
UNet, ResBlock and TemporalConvBlock; lvdm/modules/attention.py for the spatial / temporal transformers;
lvdm/basics.py and lvdm/models/utils_diffusion.py for the norm and timestep-embedding helpers). Parameter names
are the official ones, so the UNet tensors of the released `VideoCrafter/VideoCrafter2` `model.ckpt` (keys
`model.diffusion_model.*`, prefix stripped) load with `strict=True`, including the official misspelling
`temopral_conv`.

What it adds to Stable Diffusion 2.1's UNet (every frame is an image row `(b t)` except in the temporal layers):
- after every ResBlock (temporal_conv): a 4-layer temporal convolution stack (kernels 3x1x1) over [B, C, T, H, W];
- after every spatial transformer (temporal_attention): a temporal transformer, self-attention along T at each
  (b, h, w) location;
- `init_attn` (addition_attention): one more temporal transformer right after the input convolution, 8 heads of
  num_head_channels, with 1x1-conv (not Linear) projections whatever use_linear says;
- `fps_embedding` (fps_cond): a sinusoid of the frame rate through an MLP, added to the timestep embedding.

Numerics follow the official code (checked against /work/shared/testdata/videocrafter2: within 1e-5 in
float32, within 1e-10 in float64): sinusoidal embeddings [cos, sin] computed in float32; ResBlock / output
GroupNorms eps 1e-5 computed in (at least) float32; transformer GroupNorms eps 1e-6; temporal-conv GroupNorms
eps 1e-5; LayerNorms eps 1e-5; exact (erf) GELU in GEGLU; attention scale dim_head**-0.5.
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

# Prefix of the UNet tensors in the official checkpoint: LatentDiffusion.model is a DiffusionWrapper whose
# attribute `diffusion_model` is the UNet (lvdm/models/ddpm3d.py).
CHECKPOINT_PREFIX: Final[str] = "model.diffusion_model."
# DeepSpeed checkpoints keep the model under 'module' with this prefix (scripts/evaluation/funcs.py
# load_model_checkpoint strips its 16 characters).
_DEEPSPEED_PREFIX: Final[str] = "_forward_module."

# The UNet config of VideoCrafter2 text-to-video 512 (configs/inference_t2v_512_v2.0.yaml,
# model.params.unet_config.params): 1,413,284,420 parameters. Copy it (dict(...)) before changing a field.
VIDEOCRAFTER2_T2V_512_CONFIG: Final[dict[str, Any]] = {
    "in_channels": 4,  # SD latent channels (latents 4 x 40 x 64 for 320 x 512 frames)
    "out_channels": 4,  # epsilon prediction
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],  # transformers at downsample factors 1, 2, 4 (not 8)
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],  # widths 320, 640, 1280, 1280
    "num_head_channels": 64,
    "transformer_depth": 1,
    "context_dim": 1024,  # OpenCLIP ViT-H-14 penultimate layer
    "use_linear": True,
    "use_checkpoint": True,  # as the yaml; only acts while gradients are recorded
    "temporal_conv": True,
    "temporal_attention": True,
    "temporal_selfatt_only": True,
    "use_relative_position": False,
    "use_causal_attention": False,
    "temporal_length": 16,
    "addition_attention": True,
    "fps_cond": True,
}

_NUM_GROUPS: Final[int] = 32
# basics.py `normalization` = GroupNorm(32, ch) with the default eps, computed in float32 (GroupNormSpecific).
_RESBLOCK_NORM_EPS: Final[float] = 1e-5
# attention.py SpatialTransformer / TemporalTransformer: GroupNorm(32, ch, eps=1e-6).
_TRANSFORMER_NORM_EPS: Final[float] = 1e-6
# openaimodel3d.py TemporalConvBlock: nn.GroupNorm(32, ch), default eps.
_TEMPORAL_CONV_NORM_EPS: Final[float] = 1e-5
# openaimodel3d.py ResBlock builds its TemporalConvBlock with dropout=0.1 whatever the UNet's dropout is; it
# only acts in train() mode.
_TEMPORAL_CONV_DROPOUT: Final[float] = 0.1
# openaimodel3d.py UNetModel: init_attn = TemporalTransformer(model_channels, n_heads=8, d_head=num_head_channels).
_INIT_ATTN_HEADS: Final[int] = 8
# utils_diffusion.py timestep_embedding(max_period=10000).
_MAX_PERIOD: Final[float] = 10000.0
# attention.py FeedForward(mult=4, glu=True).
_FF_MULT: Final[int] = 4
# openaimodel3d.py UNetModel.forward(fps=16): the frame rate used when none is given.
DEFAULT_FPS: Final[int] = 16


def timestep_embedding(values: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of timesteps (or frame rates), cosines first, computed in float32.

    As utils_diffusion.py `timestep_embedding`: float32 whatever the model dtype (the checkpoint was trained
    so; a float64 model casts the result). values: [N] int or float; returns [N, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    args = values.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd widths get one zero column, as the official code
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _GroupNormF32(nn.GroupNorm):
    """GroupNorm computed in at least float32 and cast back.

    The official ResBlock / output norm upcasts (basics.py GroupNormSpecific); the transformer and
    temporal-conv norms do not, but run under autocast in the official pipeline, which computes group_norm in
    float32 too. We upcast everywhere: identical in float32, exact (no float32 detour) in float64, safe in
    fp16 / bf16 where the statistics of wide activations lose precision.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, *] -> [N, C, *] (same dtype)."""
        compute = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(compute) if self.weight is not None else None
        bias = self.bias.to(compute) if self.bias is not None else None
        return F.group_norm(x.to(compute), self.num_groups, weight, bias, self.eps).to(x.dtype)


class _TokenConv1d(nn.Conv1d):
    """A kernel-1 Conv1d (official parameter shape [out, in, 1]) applied to tokens [..., in] as a linear map.

    The official temporal transformer without use_linear (and init_attn always) projects with Conv1d over
    [(b h w), c, t]; on tokens that is the same linear map without the transposes.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """x: [..., in] -> [..., out]."""
        return F.linear(x, self.weight[:, :, 0], self.bias)


class _TokenConv2d(nn.Conv2d):
    """A 1x1 Conv2d (official parameter shape [out, in, 1, 1]) applied to tokens [..., in] as a linear map.

    The official spatial transformer without use_linear projects with a 1x1 Conv2d on [N, C, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """x: [..., in] -> [..., out]."""
        return F.linear(x, self.weight[:, :, 0, 0], self.bias)


def _maybe_checkpoint(enabled: bool, fn: Any, *args: Any) -> Any:
    """Run fn(*args), recomputing its activations in backward when `enabled` and gradients are recorded."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _frames_to_video(h: Tensor, num_frames: int) -> Tensor:
    """'(b t) c h w -> b c t h w': [B*T, C, H, W] -> [B, C, T, H, W]."""
    n, c, height, width = h.shape
    return h.view(n // num_frames, num_frames, c, height, width).transpose(1, 2)


def _video_to_frames(h: Tensor) -> Tensor:
    """'b c t h w -> (b t) c h w': [B, C, T, H, W] -> [B*T, C, H, W]."""
    b, c, t, height, width = h.shape
    return h.transpose(1, 2).reshape(b * t, c, height, width)


class TemporalConvBlock(nn.Module):
    """Four pre-norm temporal convolutions with a residual (openaimodel3d.py TemporalConvBlock, from ModelScope).

    Kernels 3x1x1 (conv1 / conv2 3x3x3 with tempspatial_aware). Keys conv1.{0: norm, 2: conv},
    conv{2,3,4}.{0: norm, 3: conv} (a Dropout sits at index 2 of conv2-4).
    """

    def __init__(self, channels: int, spatial_aware: bool) -> None:
        super().__init__()
        kernel, padding = ((3, 3, 3), (1, 1, 1)) if spatial_aware else ((3, 1, 1), (1, 0, 0))

        def norm() -> nn.Module:
            return _GroupNormF32(_NUM_GROUPS, channels, eps=_TEMPORAL_CONV_NORM_EPS)

        self.conv1 = nn.Sequential(norm(), nn.SiLU(), nn.Conv3d(channels, channels, kernel, padding=padding))
        self.conv2 = nn.Sequential(
            norm(), nn.SiLU(), nn.Dropout(_TEMPORAL_CONV_DROPOUT),
            nn.Conv3d(channels, channels, kernel, padding=padding),
        )
        # conv3 / conv4 are temporal-only even when spatial_aware (as the official block).
        self.conv3 = nn.Sequential(
            norm(), nn.SiLU(), nn.Dropout(_TEMPORAL_CONV_DROPOUT),
            nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)),
        )
        self.conv4 = nn.Sequential(
            norm(), nn.SiLU(), nn.Dropout(_TEMPORAL_CONV_DROPOUT),
            nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)),
        )
        # Zero last layer: a freshly built block is the identity (official init).
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, T, H, W] -> [B, C, T, H, W]."""
        return self.conv4(self.conv3(self.conv2(self.conv1(x)))) + x


class ResBlock(nn.Module):
    """Residual block conditioned on the (time + fps) embedding by a per-channel bias, then (optionally) a
    temporal convolution stack on the result (openaimodel3d.py ResBlock, use_scale_shift_norm=False).

    Keys: in_layers.{0: norm, 2: conv}, emb_layers.1, out_layers.{0: norm, 3: conv}, skip_connection,
    temopral_conv (sic, the official name).
    """

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, dropout: float, temporal_conv: bool,
        tempspatial_aware: bool,
    ) -> None:
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
        # Identity keeps the official key set (no skip_connection.* when widths match).
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )
        self.temopral_conv: TemporalConvBlock | None = (
            TemporalConvBlock(out_channels, tempspatial_aware) if temporal_conv else None
        )

    def _forward(self, x: Tensor, emb: Tensor, num_frames: int) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if self.temopral_conv is not None:
            h = _video_to_frames(self.temopral_conv(_frames_to_video(h, num_frames)))
        return h

    def forward(self, x: Tensor, emb: Tensor, num_frames: int) -> Tensor:
        """x: [B*T, C_in, H, W] (rows (b t)), emb: [B*T, E] -> [B*T, C_out, H, W]."""
        # The official block checkpoints the whole of it, temporal convolutions included.
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, emb, num_frames)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W (key `op`; openaimodel3d.py Downsample, use_conv=True)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] -> [N, C, ceil(H/2), ceil(W/2)]."""
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 upsampling then a 3x3 convolution (key `conv`; openaimodel3d.py Upsample, use_conv=True)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] -> [N, C, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class RelativePosition(nn.Module):
    """Learned embeddings of the clipped offset k - q in [-max, max] (attention.py RelativePosition).

    Key `embeddings_table` [2*max+1, dim]. Used by the temporal attention of VideoCrafter 1 configs
    (use_relative_position: true); VideoCrafter2 has none.
    """

    def __init__(self, dim: int, max_relative_position: int) -> None:
        super().__init__()
        self.max_relative_position = max_relative_position
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_relative_position + 1, dim))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, length_q: int, length_k: int) -> Tensor:
        """Returns [length_q, length_k, dim]: the embedding of offset (j - i) for query i, key j."""
        device = self.embeddings_table.device
        offsets = torch.arange(length_k, device=device)[None, :] - torch.arange(length_q, device=device)[:, None]
        offsets = offsets.clamp(-self.max_relative_position, self.max_relative_position)
        return self.embeddings_table[offsets + self.max_relative_position]


class CrossAttention(nn.Module):
    """Multi-head attention with the official names (to_q, to_k, to_v without bias; to_out.0).

    attention.py CrossAttention. Without relative positions: `scaled_dot_product_attention` (flash /
    memory-efficient kernels on GPU, exact math on CPU). With them (VideoCrafter 1 temporal attention) the
    official formula, per head with tables shared over heads:
        softmax((q.k + q.rk[i, j]) * scale) @ v + softmax(...) @ rv[i, j],
    written out with matmuls. causal: query i sees keys j <= i (official mask tril(ones)).
    """

    def __init__(
        self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float,
        relative_length: int | None,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        source_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(source_dim, inner, bias=False)
        self.to_v = nn.Linear(source_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.relative_position_k: RelativePosition | None = None
        self.relative_position_v: RelativePosition | None = None
        if relative_length is not None:
            self.relative_position_k = RelativePosition(dim_head, relative_length)
            self.relative_position_v = RelativePosition(dim_head, relative_length)

    def _split_heads(self, t: Tensor) -> Tensor:
        # 'b n (h d) -> b h n d': heads are the outer factor of the channel axis.
        return t.view(t.shape[0], t.shape[1], self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, causal: bool = False) -> Tensor:
        """x: [N, L, Cq], context: [N, S, Cc] (None: self-attention over x) -> [N, L, Cq]."""
        source = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(source))
        v = self._split_heads(self.to_v(source))
        scale = self.dim_head**-0.5
        if self.relative_position_k is None or self.relative_position_v is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        else:
            length_q, length_k = q.shape[2], k.shape[2]
            rel_k = self.relative_position_k(length_q, length_k)  # [Lq, Lk, d]
            rel_v = self.relative_position_v(length_q, length_k)
            sim = (q @ k.transpose(-1, -2) + torch.einsum("nhid,ijd->nhij", q, rel_k)) * scale
            if causal:
                visible = torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).tril()
                sim = sim.masked_fill(~visible, float("-inf"))
            attn = sim.softmax(dim=-1)
            out = attn @ v + torch.einsum("nhij,ijd->nhid", attn, rel_v)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.dim_head)
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
    """GEGLU feed-forward of width 4*dim, keys net.0.proj and net.2 (attention.py FeedForward, glu=True)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        inner = _FF_MULT * dim
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] -> [..., dim]."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: attn1 (self), attn2 (cross to the context, or a second self-attention when
    context_dim is None), GEGLU feed-forward (attention.py BasicTransformerBlock).

    The temporal transformers build it with context_dim=None (temporal_selfatt_only), so their attn2 is a
    second self-attention; the causal mask, when on, applies to both (as the official block passes `mask` to
    both). Attribute order matches the official state_dict order.
    """

    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float,
        relative_length: int | None,
    ) -> None:
        super().__init__()
        self.use_checkpoint = False
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, relative_length)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, relative_length)
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5, nn.LayerNorm's default as the official code
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def _forward(self, x: Tensor, context: Tensor | None, causal: bool) -> Tensor:
        x = self.attn1(self.norm1(x), causal=causal) + x
        x = self.attn2(self.norm2(x), context, causal=causal) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, x: Tensor, context: Tensor | None = None, causal: bool = False) -> Tensor:
        """x: [N, L, C], context: [N, S, Cc] or None -> [N, L, C]."""
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, context, causal)


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the H*W tokens with text cross-attention (attention.py SpatialTransformer).

    GroupNorm -> proj_in -> blocks -> proj_out, plus the input. use_linear: Linear projections (SD 2.x);
    otherwise 1x1 convolutions (same map, [out, in, 1, 1] weights).
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = _GroupNormF32(_NUM_GROUPS, channels, eps=_TRANSFORMER_NORM_EPS)
        self.proj_in: nn.Module = nn.Linear(channels, inner) if use_linear else _TokenConv2d(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, None) for _ in range(depth)]
        )
        self.proj_out: nn.Module = nn.Linear(inner, channels) if use_linear else _TokenConv2d(inner, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: [N, C, H, W] (N = B*T frames), context: [N, S, Cc] -> [N, C, H, W]."""
        n, c, height, width = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # 'n c h w -> n (h w) c'
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out = self.proj_out(tokens).transpose(1, 2).reshape(n, c, height, width)
        return out + x


class TemporalTransformer(nn.Module):
    """Self-attention along time at every spatial location (attention.py TemporalTransformer,
    only_self_att=True).

    The GroupNorm's statistics span (C/32, T, H, W) of each video; tokens are [(b h w), t, c]; no text
    context. use_linear: Linear projections; otherwise kernel-1 Conv1d weights ([out, in, 1]), as `init_attn`.
    causal: frame t attends frames <= t (the official mask is tril(ones(temporal_length)), so there T must
    equal temporal_length; here any T). relative_length: learned relative-position tables clipped at
    +-relative_length (VideoCrafter 1), None for none.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, use_linear: bool, dropout: float,
        causal: bool, relative_length: int | None,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.causal = causal
        self.norm = _GroupNormF32(_NUM_GROUPS, channels, eps=_TRANSFORMER_NORM_EPS)
        self.proj_in: nn.Module = nn.Linear(channels, inner) if use_linear else _TokenConv1d(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, None, dropout, relative_length) for _ in range(depth)]
        )
        self.proj_out: nn.Module = nn.Linear(inner, channels) if use_linear else _TokenConv1d(inner, channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, T, H, W] -> [B, C, T, H, W]."""
        b, c, t, height, width = x.shape
        # 'b c t h w -> (b h w) t c'
        tokens = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * height * width, t, c)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, None, self.causal)
        tokens = self.proj_out(tokens)
        out = tokens.view(b, height, width, t, c).permute(0, 4, 3, 1, 2)  # '(b h w) t c -> b c t h w'
        return out + x


class UNetStage(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks / init_attn: layers applied in order (keys
    0, 1, ...), as openaimodel3d.py TimestepEmbedSequential.

    ResBlocks get the embedding, spatial transformers the text context, temporal transformers the rows
    regrouped as videos; other layers only h.
    """

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:  # type: ignore[override]
        """h: [B*T, C, H, W] (rows (b t)), emb: [B*T, E], context: [B*T, S, Cc] -> [B*T, C', H', W']."""
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, TemporalTransformer):
                h = _video_to_frames(layer(_frames_to_video(h, num_frames)))
            else:
                h = layer(h)
        return h


def _not_implemented(key: str, value: Any, why: str) -> NotImplementedError:
    return NotImplementedError(f"{key}={value!r} is not implemented ({why})")


class VideoCrafterUNet(nn.Module):
    """VideoCrafter's UNetModel (openaimodel3d.py); constructor arguments named and defaulted as the official
    ones, so a config's `unet_config.params` can be passed as is (VIDEOCRAFTER2_T2V_512_CONFIG for
    VideoCrafter2).

    Args (official names):
        in_channels / out_channels: latent channels in / predicted-noise channels out.
        model_channels: base width; the time (and fps) embedding width is 4 * model_channels.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: downsample factors (1, 2, 4, ...) at which transformers follow each ResBlock.
        dropout: dropout in ResBlocks, attention outputs and feed-forwards (the temporal-conv dropout is
            always 0.1, as the official code).
        channel_mult: width multiplier per level.
        conv_resample, dims, use_scale_shift_norm, resblock_updown, use_fp16, use_image_attention: only the
            values of the released text-to-video configs are implemented (True, 2, False, False, False, False);
            to compute in half precision cast the model instead (`.half()`).
        context_dim: width of the text tokens (1024, OpenCLIP ViT-H-14).
        num_heads / num_head_channels: fixed head count, or fixed head width (heads = width // channels);
            exactly one is -1.
        transformer_depth: blocks per spatial transformer (and in init_attn).
        temporal_transformer_depth: blocks per temporal transformer after a spatial one.
        use_linear: Linear proj_in / proj_out in the spatial and temporal transformers (init_attn's are
            always kernel-1 convolutions).
        use_checkpoint: gradient checkpointing of ResBlocks and transformer blocks.
        temporal_conv: temporal convolution stack after each ResBlock (the Downsample-level ones excepted);
            tempspatial_aware: its first two kernels 3x3x3 instead of 3x1x1.
        temporal_attention: a temporal transformer after each spatial transformer.
        temporal_selfatt_only: must be True (every released config); the temporal cross-attention variant
            is not implemented.
        use_relative_position / use_causal_attention / temporal_length: temporal attention with relative
            position tables clipped at +-temporal_length / causal in time; temporal_length is required by
            either.
        addition_attention: the extra temporal transformer `init_attn` after the input convolution.
        fps_cond: add an embedding of the frame rate to the timestep embedding.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        context_dim: int | None = None,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int = 1,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        temporal_conv: bool = False,
        tempspatial_aware: bool = False,
        temporal_attention: bool = True,
        temporal_selfatt_only: bool = True,
        use_relative_position: bool = True,
        use_causal_attention: bool = False,
        temporal_length: int | None = None,
        use_fp16: bool = False,
        addition_attention: bool = False,
        use_image_attention: bool = False,
        temporal_transformer_depth: int = 1,
        fps_cond: bool = False,
    ) -> None:
        super().__init__()
        # Options no released text-to-video config turns on: refuse rather than build something different.
        unsupported = [
            ("conv_resample", conv_resample, True, "Downsample / Upsample always use convolutions here"),
            ("dims", dims, 2, "frames are 2-D images; time is handled by the temporal layers"),
            ("use_scale_shift_norm", use_scale_shift_norm, False, "ResBlocks add the embedding as a bias"),
            ("resblock_updown", resblock_updown, False, "resampling is by Downsample / Upsample layers"),
            ("use_fp16", use_fp16, False, "cast the model with .half() instead"),
            ("use_image_attention", use_image_attention, False, "image-to-video conditioning"),
            ("temporal_selfatt_only", temporal_selfatt_only, True, "temporal cross-attention to the text"),
        ]
        for key, value, supported, why in unsupported:
            if value != supported:
                raise _not_implemented(key, value, why)
        if context_dim is None:
            raise ValueError("context_dim is required (1024 for VideoCrafter2's OpenCLIP text tokens)")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"set exactly one of num_heads ({num_heads}) and num_head_channels ({num_head_channels}); "
                "the other must be -1"
            )
        if addition_attention and num_head_channels == -1:
            raise ValueError("addition_attention needs num_head_channels (init_attn uses 8 heads of that width)")
        if (use_relative_position or use_causal_attention) and temporal_length is None and (
            temporal_attention or addition_attention
        ):
            raise ValueError(
                "temporal_length is required with use_relative_position or use_causal_attention "
                f"(got use_relative_position={use_relative_position}, "
                f"use_causal_attention={use_causal_attention})"
            )
        for width in [model_channels] + [m * model_channels for m in channel_mult]:
            if width % _NUM_GROUPS:
                raise ValueError(
                    f"every width must be a multiple of {_NUM_GROUPS} (GroupNorm groups); width {width} from "
                    f"model_channels={model_channels}, channel_mult={list(channel_mult)} is not"
                )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.num_levels = len(channel_mult)
        self.fps_cond = fps_cond
        self.temporal_length = temporal_length
        self.use_checkpoint = use_checkpoint
        attn_res = set(attention_resolutions)
        time_embed_dim = 4 * model_channels  # official: time_embed_dim = model_channels * 4
        relative_length = temporal_length if use_relative_position else None

        def heads_for(width: int) -> tuple[int, int]:
            # Recomputed at every width, as the official loop does.
            if num_head_channels != -1:
                if width % num_head_channels:
                    raise ValueError(f"num_head_channels={num_head_channels} must divide the width {width}")
                return width // num_head_channels, num_head_channels
            if width % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide the width {width}")
            return num_heads, width // num_heads

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, ch_out, dropout, temporal_conv, tempspatial_aware)

        def transformers(width: int) -> list[nn.Module]:
            heads, dim_head = heads_for(width)
            layers: list[nn.Module] = [
                SpatialTransformer(width, heads, dim_head, transformer_depth, context_dim, use_linear, dropout)
            ]
            if temporal_attention:
                layers.append(
                    TemporalTransformer(
                        width, heads, dim_head, temporal_transformer_depth, use_linear, dropout,
                        use_causal_attention, relative_length,
                    )
                )
            return layers

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.fps_embedding: nn.Sequential | None = None
        if fps_cond:
            self.fps_embedding = nn.Sequential(
                nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            )

        self.input_blocks = nn.ModuleList([UNetStage([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        self.init_attn: UNetStage | None = None
        if addition_attention:
            # Official quirks kept: 8 heads of num_head_channels (inner width 8*64 = 512 != 320), depth
            # transformer_depth, and use_linear not passed (so kernel-1 Conv1d projections).
            self.init_attn = UNetStage(
                [
                    TemporalTransformer(
                        model_channels, _INIT_ATTN_HEADS, num_head_channels, transformer_depth, False, dropout,
                        use_causal_attention, relative_length,
                    )
                ]
            )

        skip_widths = [model_channels]  # width of every input block's output, popped LIFO on the way up
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attn_res:
                    layers.extend(transformers(ch))
                self.input_blocks.append(UNetStage(layers))
                skip_widths.append(ch)
            if level != self.num_levels - 1:
                self.input_blocks.append(UNetStage([Downsample(ch)]))
                skip_widths.append(ch)
                ds *= 2

        # The middle transformers ignore attention_resolutions (always present, as the official code).
        self.middle_block = UNetStage([res_block(ch, ch), *transformers(ch), res_block(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_widths.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attn_res:
                    layers.extend(transformers(ch))
                if level and i == num_res_blocks:
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
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                module.use_checkpoint = enabled

    def _fps_tensor(self, fps: Tensor | int, batch: int, device: torch.device) -> Tensor:
        if isinstance(fps, Tensor):
            if fps.shape != (batch,):
                raise ValueError(f"fps must be an int or have shape [B]=[{batch}], got {tuple(fps.shape)}")
            return fps
        if isinstance(fps, bool) or not isinstance(fps, int):
            raise ValueError(f"fps must be an int or a [B] tensor, got {type(fps).__name__}")
        return torch.full((batch,), fps, dtype=torch.long, device=device)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, context: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, T, H, W] (channels before frames), "
                f"got {tuple(x.shape)}"
            )
        b = x.shape[0]
        factor = 2 ** (self.num_levels - 1)
        if x.shape[3] % factor or x.shape[4] % factor:
            raise ValueError(
                f"H and W of x ({x.shape[3]}x{x.shape[4]}) must be multiples of {factor} "
                "(2**(levels-1)) so that skip connections line up"
            )
        if timesteps.shape != (b,):
            raise ValueError(
                f"timesteps must have shape [B]=[{b}] (one per video; expand a shared t), "
                f"got {tuple(timesteps.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must have shape [B={b}, S, {self.context_dim}] (one token sequence per video), "
                f"got {tuple(context.shape)}"
            )

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, fps: Tensor | int = DEFAULT_FPS) -> Tensor:
        """Predict the noise of every frame of every video.

        x: [B, in_channels, T, H, W] noisy latents; timesteps: [B] (int or float); context: [B, S, context_dim]
        text tokens (shared by the T frames); fps: [B] frame rates or one int (the official default 16;
        ignored when fps_cond is False). Computes in the dtype of the parameters; returns
        eps [B, out_channels, T, H, W] in x's dtype.
        """
        self._check_inputs(x, timesteps, context)
        b, _, t, _, _ = x.shape
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.fps_embedding is not None:
            fps_t = self._fps_tensor(fps, b, x.device)
            emb = emb + self.fps_embedding(timestep_embedding(fps_t, self.model_channels).to(dtype))
        # Every frame is a row: the embedding and the text tokens are repeated per frame, rows (b t).
        emb = emb.repeat_interleave(t, dim=0)
        context = context.to(dtype).repeat_interleave(t, dim=0)

        h = _video_to_frames(x.to(dtype))
        skips: list[Tensor] = []
        for index, stage in enumerate(self.input_blocks):
            h = stage(h, emb, context, t)
            if index == 0 and self.init_attn is not None:
                h = self.init_attn(h, emb, context, t)
            skips.append(h)
        h = self.middle_block(h, emb, context, t)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context, t)  # order [h, skip]
        eps = _frames_to_video(self.out(h), t)
        return eps.to(x.dtype)


def _read_checkpoint(path: Path, trust_pickle: bool) -> Mapping[str, Any]:
    """The top-level mapping of a `.safetensors` file or a torch pickle (`.ckpt` / `.pt`)."""
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
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def unet_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The UNet tensors of a full VideoCrafter checkpoint, 'model.diffusion_model.' stripped.

    checkpoint: the loaded object, a flat dict of the LatentDiffusion's tensors or the same under
    'state_dict' (Lightning) or under 'module' with '_forward_module.' prefixes (DeepSpeed), as the official
    load_model_checkpoint accepts. VAE / text-encoder / schedule tensors are dropped. A dict without any
    'model.diffusion_model.' key raises a ValueError (it is not a VideoCrafter checkpoint, or a bare UNet
    state dict that can be loaded directly).
    """
    state: Mapping[str, Any] = checkpoint
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    elif isinstance(state.get("module"), Mapping):
        state = {k.removeprefix(_DEEPSPEED_PREFIX): v for k, v in state["module"].items()}
    unet = {
        k[len(CHECKPOINT_PREFIX):]: v
        for k, v in state.items()
        if k.startswith(CHECKPOINT_PREFIX) and isinstance(v, Tensor)
    }
    if not unet:
        sample = ", ".join(list(state)[:5])
        raise ValueError(
            f"no '{CHECKPOINT_PREFIX}*' tensors in the checkpoint (first keys: {sample or 'none'}); "
            "expected a VideoCrafter model.ckpt"
        )
    return unet


def check_unet_keys(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Raise a ValueError naming the missing / unexpected keys and shape mismatches of `state` for `model`."""
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

    parts = [f"checkpoint {source} does not match the VideoCrafterUNet config"]
    if missing:
        parts.append(listing("missing keys", missing))
    if unexpected:
        parts.append(listing("unexpected keys", unexpected))
    if mismatched:
        parts.append(listing("shape mismatches", mismatched))
    parts.append(
        f"\n  (UNet keys are read under '{CHECKPOINT_PREFIX}'; check the file and the config passed to "
        "load_videocrafter_unet)"
    )
    raise ValueError("".join(parts))


def load_videocrafter_unet(
    source: str | Path | Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_pickle: bool = False,
) -> VideoCrafterUNet:
    """Build a VideoCrafterUNet and load the UNet tensors of an official checkpoint (strict).

    source: a path (`model.ckpt` / `.pt` torch pickle, or `.safetensors`) or an already loaded checkpoint
    dict; see `unet_state_dict` for the layouts accepted. config: VideoCrafterUNet arguments (default
    VIDEOCRAFTER2_T2V_512_CONFIG). dtype / device: of the returned model's parameters. trust_pickle: allow
    arbitrary pickled objects (Lightning checkpoints may hold some; only for files you trust).
    Returns the model in eval mode. Raises ValueError naming missing / unexpected keys.
    """
    if isinstance(source, Mapping):
        name, checkpoint_obj = "(dict)", source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"VideoCrafter checkpoint not found: {path}")
        name, checkpoint_obj = str(path), _read_checkpoint(path, trust_pickle)
    state = unet_state_dict(checkpoint_obj)
    # Built on the meta device and filled by assignment: no second full-size copy in memory.
    with torch.device("meta"):
        model = VideoCrafterUNet(**dict(config if config is not None else VIDEOCRAFTER2_T2V_512_CONFIG))
    check_unet_keys(model, state, name)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
