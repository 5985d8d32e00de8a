"""Where VideoCrafter2's weights come from: the hub repo `VideoCrafter/VideoCrafter2` (file `model.ckpt`, the
authors' scripts/evaluation/funcs.py load_model_checkpoint default) or a local file / folder.

Resolution is `fourdfy.guidance.weights.resolve_checkpoint_file` (hf_hub_download, from the local hub cache
only when HF_HUB_OFFLINE=1): a missing checkpoint raises one ModelNotAvailableError naming the config key to
set, before anything is loaded. The UNet is then read by `fourdfy.models.videocrafter_unet`. The same
model.ckpt also holds the VAE (`first_stage_model.*`) and the OpenCLIP text encoder (`cond_stage_model.*`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch

from fourdfy.guidance.weights import ModelNotAvailableError, resolve_checkpoint_file
from fourdfy.models.videocrafter_unet import VIDEOCRAFTER2_T2V_512_CONFIG, VideoCrafterUNet, load_videocrafter_unet

# 4D-fy configs/fourdfy_stage_3_vc.yaml leave the checkpoint unset, so funcs.py downloads this repo's file.
VIDEOCRAFTER2_REPO: Final[str] = "VideoCrafter/VideoCrafter2"
VIDEOCRAFTER2_FILE: Final[str] = "model.ckpt"
DEFAULT_CONFIG_KEY: Final[str] = "guidance.videocrafter.checkpoint"


def resolve_videocrafter_checkpoint(
    value: str = VIDEOCRAFTER2_REPO,
    filename: str = VIDEOCRAFTER2_FILE,
    config_key: str = DEFAULT_CONFIG_KEY,
) -> Path:
    """The local path of the checkpoint named by `value`: a file, a folder holding `filename`, or a hub repo
    id whose `filename` is downloaded (offline: taken from the hub cache). Raises ModelNotAvailableError naming
    `config_key` when it is not there."""
    return resolve_checkpoint_file(value, filename, config_key)


def load_videocrafter2_unet(
    value: str = VIDEOCRAFTER2_REPO,
    *,
    filename: str = VIDEOCRAFTER2_FILE,
    config_key: str = DEFAULT_CONFIG_KEY,
    unet_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_pickle: bool = False,
) -> VideoCrafterUNet:
    """Resolve the checkpoint (see resolve_videocrafter_checkpoint) and load its UNet, frozen, in eval mode.

    unet_config: VideoCrafterUNet arguments (default VIDEOCRAFTER2_T2V_512_CONFIG). A file that cannot be read
    or does not fit the config raises ModelNotAvailableError naming `config_key`, with the reader's message
    (missing / unexpected keys, shape mismatches).
    """
    path = resolve_videocrafter_checkpoint(value, filename, config_key)
    config = dict(unet_config if unet_config is not None else VIDEOCRAFTER2_T2V_512_CONFIG)
    try:
        unet = load_videocrafter_unet(path, config=config, dtype=dtype, device=device, trust_pickle=trust_pickle)
    except ValueError as err:
        raise ModelNotAvailableError(f"{config_key} = {value!r}: {err}") from err
    return unet.requires_grad_(False)
