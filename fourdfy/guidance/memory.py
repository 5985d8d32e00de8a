"""Memory options shared by the real priors: weight dtype, offloading, and the memory-aware VAE encoder.

An out-of-memory error during a run is re-raised as `GPUOutOfMemoryError`, whose one line names these keys
(`explain_out_of_memory`; conf/preset/paper_24gb.yaml sets them, bench/README.md tables their costs).

The paper's configuration needs an 80 GB GPU (the authors' README: "Original configs used in paper with
80 GB GPU memory"; their *_low_vram.yaml configs fit 24-48 GB). Three levers bring it down, each a config
value of every prior:
- weights in fp16/bf16 on a GPU (the authors' `half_precision_weights: true`), fp32 on the CPU;
- offloading: a prior's frozen networks live on the CPU between calls and visit the GPU only inside its
  call, so only the prior in use holds GPU memory (one update uses one prior);
- the VAE encoder, the only network the SDS gradient flows through, can recompute its activations in the
  backward pass (gradient checkpointing) and, for video, keep the graph of only some frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from fourdfy.errors import UserError

if TYPE_CHECKING:  # annotations only: keeps this module (and guidance/base.py) free of the diffusers import
    from diffusers import AutoencoderKL

    from fourdfy.config import RunConfig

# Names accepted by `parse_dtype` (config files hold strings; the code wants torch dtypes).
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' -> the torch dtype (for dtypes written in config files)."""
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def resolve_dtype(device: torch.device | str, dtype: torch.dtype | None) -> torch.dtype:
    """The weight dtype: `dtype` when given, else fp16 on CUDA (authors' half_precision_weights) and fp32
    elsewhere (half-precision convolutions are slow or missing on CPUs)."""
    device = torch.device(device)
    if dtype is not None:
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32/float16/bfloat16, got {dtype}")
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError(
                "dtype=float16 on the CPU is not supported (slow or missing kernels); use float32"
            )
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` in eval mode with gradients off, its floating parameters cast to `dtype` only if needed
    (diffusers warns on every `.to(dtype)` call, even a no-op one)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


class Placement:
    """Where a prior's networks live.

    Without offloading every network sits on `device`. With offloading the networks passed to `active`
    live on `storage` (the CPU) and move to `device` only inside the `with` block. The VAE is never
    offloaded: the SDS loss is backpropagated through its encoder after the prior's call has returned.
    """

    def __init__(
        self, device: torch.device | str, offload: bool, storage: torch.device | str = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.storage = torch.device(storage)
        self.offload = offload and self.device != self.storage

    def home(self, module: nn.Module) -> nn.Module:
        """Move `module` to where it rests between calls (storage when offloading, else device)."""
        return module.to(self.storage if self.offload else self.device)

    @contextmanager
    def active(self, *modules: nn.Module) -> Iterator[None]:
        """Inside the block the modules are on `device`; with offloading they go back to storage after."""
        if not self.offload:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to(self.storage)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def encode_latents(
    vae: AutoencoderKL,
    images: torch.Tensor,
    generator: torch.Generator | None,
    grad_mask: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Encode images to scaled VAE latents, as the authors' `encode_images`.

    images: [N, 3, H, W] in [0, 1] (any float dtype; differentiable). Mapped to [-1, 1], encoded in the VAE's
    dtype; latents = posterior sample × vae.config.scaling_factor (0.18215 for SD 2.x VAEs), or the posterior
    mean when `generator` is None. The posterior noise is drawn on the CPU from `generator` (so results do not
    depend on the device) in float32.
    grad_mask: [N] booleans; images whose entry is False are encoded under no_grad (the video prior's
    "back-propagate through only some frames" memory option). None = all with gradient.
    Returns [N, 4, H/8, W/8] float32.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    n = images.shape[0]
    if grad_mask is None:
        grad_mask = [True] * n
    if len(grad_mask) != n:
        raise ValueError(f"grad_mask must have one entry per image ({n}), got {len(grad_mask)}")
    dtype = vae.dtype
    x = (images * 2.0 - 1.0).to(dtype)

    def posterior(rows: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            dist = vae.encode(rows).latent_dist
            return dist.mean.float(), dist.std.float()

    mask = torch.tensor(list(grad_mask), dtype=torch.bool)
    if bool(mask.all()) or not bool(mask.any()):
        mean, std = posterior(x, bool(mask.all()))
    else:
        # Two VAE batches: the frames that keep a graph and the rest; results are put back in order.
        idx_grad, idx_free = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        mean_g, std_g = posterior(x[idx_grad.to(x.device)], True)
        mean_f, std_f = posterior(x[idx_free.to(x.device)], False)
        order = torch.argsort(torch.cat([idx_grad, idx_free])).to(x.device)
        mean = torch.cat([mean_g, mean_f])[order]
        std = torch.cat([std_g, std_f])[order]
    if generator is None:
        latents = mean
    else:
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        latents = mean + std * noise
    return latents * float(vae.config.scaling_factor)


# ---------------------------------------------------------------- out of memory

PRIOR_KEYS = ("mvdream", "sd_vsd", "zeroscope", "videocrafter2")  # guidance.<key> of each real prior's config
# Paper-fidelity levers, named last: they change what is optimised (fewer samples, smaller renders).
LAST_RESORT_KEYS = ("renderer.n_samples", "guidance.mvdream.render_sizes", "guidance.sd_vsd.render_size",
                    "guidance.zeroscope.render_height/render_width")


class GPUOutOfMemoryError(UserError):
    """The GPU ran out of memory; the message names the memory keys still to set and the preset that sets them."""


def memory_keys_to_try(cfg: RunConfig) -> list[str]:
    """The memory levers ``cfg`` has not pulled, as overrides to try, cheapest in time first (real priors);
    the field's chunk and the last-resort keys always."""
    keys: list[str] = []
    if str(cfg.guidance.backend) == "real":
        priors = {name: getattr(cfg.guidance, name) for name in PRIOR_KEYS if hasattr(cfg.guidance, name)}
        video = str(cfg.guidance.video_prior)
        used = {name: p for name, p in priors.items() if name in ("mvdream", "sd_vsd", video)}
        keys += [f"guidance.{name}.vae_gradient_checkpointing=true" for name, p in used.items()
                 if not p.vae_gradient_checkpointing]
        grad_frames = getattr(used.get(video), "vae_grad_frames", 4)
        if grad_frames is None or grad_frames > 4:  # the authors' low_ram_vae: 4 (fourdfy_stage_3_low_vram.yaml)
            keys.append(f"guidance.{video}.vae_grad_frames=4")
        keys += [f"guidance.{name}.offload=true" for name, p in used.items() if not p.offload]
    keys.append(f"a smaller field.checkpoint_chunk (now {cfg.field.checkpoint_chunk})")
    return keys


def out_of_memory_message(cfg: RunConfig, error: str, where: str) -> str:
    """One line: what ran out, where, the keys to set (memory_keys_to_try) and the preset that sets them."""
    first = error.strip().splitlines()[0] if error.strip() else "CUDA out of memory"
    return (f"{first.rstrip('.')} ({where}); lower the run's GPU memory with preset=paper_24gb or these keys: "
            f"{', '.join(memory_keys_to_try(cfg))}; as a last resort {', '.join(LAST_RESORT_KEYS)} "
            "(bench/README.md gives each key's cost in GiB and seconds)")


@contextmanager
def explain_out_of_memory(cfg: RunConfig, where: Callable[[], str]) -> Iterator[None]:
    """Re-raise a CUDA out-of-memory error inside the block as GPUOutOfMemoryError (out_of_memory_message);
    where(): the place, read when it happens (e.g. "at iteration 4211")."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the caller may go on (a sweep's next job in the same process)
        raise GPUOutOfMemoryError(out_of_memory_message(cfg, str(err), where())) from err
