"""The paper's three priors, built together from a run config (the "real" guidance backend).

The video prior is Zeroscope (the paper) or VideoCrafter2 (the authors' *_vc configs), chosen by
`guidance.video_prior`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fourdfy.guidance.base import Guidance
from fourdfy.guidance.configs import VideoPrior
from fourdfy.kinds import UPDATE_KINDS, UpdateKind

if TYPE_CHECKING:
    from fourdfy.config import RunConfig


def _video_builder(cfg: RunConfig, device: torch.device) -> Callable[[], Guidance]:
    """The builder of the video prior named by guidance.video_prior."""
    g = cfg.guidance
    if VideoPrior(g.video_prior) is VideoPrior.videocrafter2:
        from fourdfy.guidance.videocrafter2 import VideoCrafter2Guidance

        return lambda: VideoCrafter2Guidance.from_config(
            g.videocrafter2, device, seed=cfg.seed + 3, config_key="guidance.videocrafter2",
        )
    from fourdfy.guidance.zeroscope import ZeroscopeGuidance

    return lambda: ZeroscopeGuidance.from_config(
        g.zeroscope, device, seed=cfg.seed + 3, config_key="guidance.zeroscope"
    )


def _random_guidances(cfg: RunConfig, used: set[UpdateKind]) -> dict[UpdateKind, Guidance]:
    """The used priors with random weights (fourdfy/guidance/random_weights.py); the hub is never asked."""
    from fourdfy.guidance.random_weights import build_random_guidances

    g = cfg.guidance
    guidances, _ = build_random_guidances(cfg, tiny=str(g.weights) == "random_tiny", kinds=used)
    return guidances


def build_real_guidances(cfg: RunConfig) -> dict[UpdateKind, Guidance]:
    """MVDream (3D), SD 2.1 VSD (IMG) and Zeroscope or VideoCrafter2 (VID) for the update kinds the schedule uses.

    Every missing model is reported in one error, so a user fixes all config keys in one go. With
    guidance.weights=random or random_tiny the networks are built with random weights instead (nothing loaded).
    """
    # Local imports: the priors pull in diffusers/transformers/peft (~12 s of CPU), which only the real
    # backend needs, so `import fourdfy.api` stays light; hybrid is local to keep this module standalone.
    from fourdfy.guidance.mvdream import MVDreamGuidance
    from fourdfy.guidance.sd_vsd import SDVSDGuidance
    from fourdfy.guidance.weights import ModelNotAvailableError
    from fourdfy.hybrid import HybridSchedule

    used = HybridSchedule(cfg.schedule).kinds_used()
    if str(cfg.guidance.weights) != "pretrained":  # guidance.weights=random|random_tiny: nothing is loaded
        return _random_guidances(cfg, used)
    device = torch.device(cfg.device)
    g = cfg.guidance
    builders: dict[UpdateKind, Callable[[], Guidance]] = {
        UpdateKind.MULTIVIEW: lambda: MVDreamGuidance.from_config(
            g.mvdream, device, seed=cfg.seed + 1, config_key="guidance.mvdream"
        ),
        UpdateKind.IMAGE: lambda: SDVSDGuidance.from_config(
            g.sd_vsd, device, seed=cfg.seed + 2, config_key="guidance.sd_vsd"
        ),
        UpdateKind.VIDEO: _video_builder(cfg, device),
    }
    guidances: dict[UpdateKind, Guidance] = {}
    missing: list[ModelNotAvailableError] = []
    for kind in UPDATE_KINDS:
        if kind not in used:
            continue
        try:
            guidances[kind] = builders[kind]()
        except ModelNotAvailableError as err:
            missing.append(err)
    if missing:
        # One count over every prior's models (MVDream alone can lack two), not the priors' own counts.
        raise ModelNotAvailableError.combined(missing)
    return guidances
