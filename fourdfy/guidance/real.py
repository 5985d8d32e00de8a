"""The paper's three priors, built together from a run config (the "real" guidance backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fourdfy.guidance.base import Guidance

if TYPE_CHECKING:
    from fourdfy.config import RunConfig


def build_real_guidances(cfg: RunConfig) -> dict[str, Guidance]:
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

    schedule = HybridSchedule(cfg.schedule)
    used = {kind for stage in (1, 2, 3) if schedule.stage_lengths[stage - 1] > 0
            for kind, p in schedule.probabilities(stage).items() if p > 0}
    device = torch.device(cfg.device)
    g = cfg.guidance
    builders = {
        "3d": lambda: MVDreamGuidance.from_config(g.mvdream, device, seed=cfg.seed + 1,
                                                  config_key="guidance.mvdream"),
        "img": lambda: SDVSDGuidance.from_config(g.sd_vsd, device, seed=cfg.seed + 2, config_key="guidance.sd_vsd"),
        "vid": lambda: ZeroscopeGuidance.from_config(g.zeroscope, device, seed=cfg.seed + 3,
                                                     config_key="guidance.zeroscope"),
    }
    guidances: dict[str, Guidance] = {}
    missing: list[str] = []
    for kind in ("3d", "img", "vid"):
        if kind not in used:
            continue
        try:
            guidances[kind] = builders[kind]()
        except ModelNotAvailableError as err:
            missing.append(str(err))
    if missing:
        raise ModelNotAvailableError("\n\n".join(missing))
    return guidances
