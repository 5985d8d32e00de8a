"""Prompt encoding for the real priors: CLIP text embeddings, cached per prompt, and view-dependent prompts.

Follows threestudio's prompt processor as used by 4D-fy (threestudio/models/prompt_processors/base.py):
a prompt becomes four view-dependent variants "<prompt>, side view" / ", front view" / ", back view" /
", overhead view"; a camera picks one by its azimuth and elevation; the negative (unconditional) prompt
is the same for every direction. Embeddings = the text encoder's last hidden state for the prompt padded
to 77 tokens (`text_encoder(ids)[0]`), which for SD 2.1's CLIPTextModel is OpenCLIP ViT-H-14's penultimate
layer. Each distinct prompt string is encoded once and cached.
"""

from __future__ import annotations

import torch
from torch import nn

from fourdfy.guidance.configs import ViewPromptConfig
from fourdfy.guidance.memory import Placement, frozen

# Direction order and suffixes: threestudio PromptProcessor.configure (view_dependent_prompt_front=False).
DIRECTION_SUFFIXES: tuple[str, ...] = (", side view", ", front view", ", back view", ", overhead view")
SIDE, FRONT, BACK, OVERHEAD = 0, 1, 2, 3


def view_direction(elevation: torch.Tensor, azimuth: torch.Tensor, cfg: ViewPromptConfig) -> torch.Tensor:
    """Index into DIRECTION_SUFFIXES per camera; elevation, azimuth: [B] degrees -> [B] long.

    Later rules win (threestudio's order): side by default, then front, back, overhead.
    """
    shifted = (azimuth + 180.0) % 360.0 - 180.0  # threestudio shift_azimuth_deg: to [-180, 180)
    idx = torch.full(azimuth.shape, SIDE, dtype=torch.long, device=azimuth.device)
    idx[(shifted > -cfg.front_threshold) & (shifted < cfg.front_threshold)] = FRONT
    idx[(shifted > 180.0 - cfg.back_threshold) | (shifted < -180.0 + cfg.back_threshold)] = BACK
    idx[elevation > cfg.overhead_threshold] = OVERHEAD
    return idx


class PromptEncoder:
    """A CLIP tokenizer + text encoder that turns prompt strings into cached [77, C] embeddings.

    The encoder rests where `placement` keeps it (on the CPU when offloading) and runs only for prompts it
    has not seen; embeddings are kept in `dtype` on `placement.device`.
    """

    def __init__(
        self, tokenizer: object, text_encoder: nn.Module, placement: Placement, dtype: torch.dtype
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = placement.home(frozen(text_encoder, dtype))
        self.placement = placement
        self.dtype = dtype
        self.max_length: int = int(getattr(tokenizer, "model_max_length", 77))  # CLIP: 77 tokens
        self._cache: dict[str, torch.Tensor] = {}

    def check_length(self, prompt: str) -> None:
        """Raise ValueError if `prompt` has more tokens (start/end included) than the encoder takes."""
        n = len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])  # type: ignore[operator]
        if n > self.max_length:
            raise ValueError(
                f"prompt {prompt!r} is {n} tokens long (start/end tokens included) but the CLIP text encoder "
                f"takes at most {self.max_length}; shorten the prompt (view-dependent variants add ', back "
                "view' etc.)"
            )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Embeddings [N, 77, C] of `prompts` in `dtype` on the compute device; new prompts encoded once."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            for p in new:
                self.check_length(p)
            ids = self.tokenizer(  # type: ignore[operator]
                new, padding="max_length", max_length=self.max_length, return_tensors="pt"
            )["input_ids"]
            with self.placement.active(self.text_encoder):
                hidden = self.text_encoder(ids.to(self.placement.device))[0]
            for p, h in zip(new, hidden, strict=True):
                self._cache[p] = h.to(self.dtype)
        return torch.stack([self._cache[p] for p in prompts])

    def cfg_pair(
        self,
        prompt: str,
        negative_prompt: str,
        n: int,
        direction: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text context for classifier-free guidance: [2n, 77, C] = [cond × n, uncond × n] (authors' order).

        direction: [n] indices into DIRECTION_SUFFIXES for view-dependent prompts, or None for the plain
        prompt. The negative prompt is the same for every direction (threestudio: `lambda s: s`).
        """
        if direction is None:
            cond = self.encode([prompt]).expand(n, -1, -1)
        else:
            if direction.shape != (n,):
                raise ValueError(f"direction must be [n]=[{n}], got {tuple(direction.shape)}")
            table = self.encode([prompt + s for s in DIRECTION_SUFFIXES])  # [4, 77, C]
            cond = table[direction.to(table.device)]
        uncond = self.encode([negative_prompt]).expand(n, -1, -1)
        return torch.cat([cond, uncond], dim=0)
