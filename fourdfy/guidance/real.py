"""The paper's three priors, built together from a run config (the "real" guidance backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fourdfy.guidance.base import Guidance
from fourdfy.kinds import UPDATE_KINDS, UpdateKind

if TYPE_CHECKING:
    from fourdfy.config import RunConfig


def build_real_guidances(cfg: RunConfig) -> dict[UpdateKind, Guidance]:
    """MVDream (3D), SD 2.1 VSD (IMG) and Zeroscope (VID) for the update kinds the schedule uses.

    Every missing model is reported in one error, so a user fixes all config keys in one go.
    """
    # Local imports: the priors pull in diffusers/transformers/peft (~12 s of CPU), which only the real
    # backend needs, so `import fourdfy.api` stays light; hybrid is local to keep this module standalone.
    from fourdfy.guidance.mvdream import MVDreamGuidance
    from fourdfy.guidance.sd_vsd import SDVSDGuidance
    from fourdfy.guidance.weights import ModelNotAvailableError
    from fourdfy.guidance.zeroscope import ZeroscopeGuidance
    from fourdfy.hybrid import HybridSchedule

    used = HybridSchedule(cfg.schedule).kinds_used()
    device = torch.device(cfg.device)
    g = cfg.guidance
    builders: dict[UpdateKind, Callable[[], Guidance]] = {
        UpdateKind.MULTIVIEW: lambda: MVDreamGuidance.from_config(
            g.mvdream, device, seed=cfg.seed + 1, config_key="guidance.mvdream"
        ),
        UpdateKind.IMAGE: lambda: SDVSDGuidance.from_config(
            g.sd_vsd, device, seed=cfg.seed + 2, config_key="guidance.sd_vsd"
        ),
        UpdateKind.VIDEO: lambda: ZeroscopeGuidance.from_config(
            g.zeroscope, device, seed=cfg.seed + 3, config_key="guidance.zeroscope"
        ),
    }
    guidances: dict[UpdateKind, Guidance] = {}
    missing: list[str] = []
    for kind in UPDATE_KINDS:
        if kind not in used:
            continue
        try:
            guidances[kind] = builders[kind]()
        except ModelNotAvailableError as err:
            missing.append(str(err))
    if missing:
        raise ModelNotAvailableError("\n\n".join(missing))
    return guidances
