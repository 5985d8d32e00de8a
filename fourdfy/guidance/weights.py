"""Where the real priors' weights come from: a hub id (default) or a local path, with one clear offline error.

Each model is named by a config value that is either a Hugging Face hub id (downloaded and cached by
huggingface_hub / diffusers / transformers as usual) or a local path. With `HF_HUB_OFFLINE=1` (every test and
CI run here) a model that is neither a local folder nor in the local hub cache raises one
`ModelNotAvailableError` naming the config key to set and the folder layout expected, before any loading
starts. Loading itself is the libraries' `from_pretrained(..., local_files_only=offline)` and
`hf_hub_download`: nothing here re-implements them. One loader serves every part (`load_pretrained`, and
`load_frozen` for networks): the class to load is passed in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import DDPMScheduler
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedModel

from fourdfy.enums import StrChoice
from fourdfy.errors import UserError
from fourdfy.guidance.noise import scaled_linear_alphas_cumprod

# Files that prove a subfolder is there (the hub repos' own layout); any one of each tuple will do
# (a tokenizer saved by transformers 5 has tokenizer.json instead of vocab.json + merges.txt).
_MARKER_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}
_LAYOUT_HELP: dict[str, str] = {
    "unet": "unet/ (config.json + diffusion_pytorch_model.safetensors)",
    "vae": "vae/ (config.json + diffusion_pytorch_model.safetensors)",
    "text_encoder": "text_encoder/ (config.json + model.safetensors)",
    "tokenizer": "tokenizer/ (vocab.json + merges.txt, or tokenizer.json)",
    "scheduler": "scheduler/ (scheduler_config.json)",
}
T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")


class ModelNotAvailableError(UserError, ValueError):
    """A prior's weights are neither at the configured local path nor obtainable from the hub.

    ``entries``: one message per missing model (what is missing and the fix); an error about several models
    (``combined``) lists them all and counts them.
    """

    def __init__(self, *entries: str):
        self.entries = list(entries)
        if len(entries) == 1:
            message = entries[0]
        else:
            message = f"{len(entries)} models are not available:\n\n" + "\n\n".join(entries)
        super().__init__(message)

    def __reduce__(self):  # pickled with its entries (submitit sends a SLURM job's exception back pickled)
        return type(self), tuple(self.entries)

    @classmethod
    def combined(cls, errors: list[ModelNotAvailableError]) -> ModelNotAvailableError:
        """One error for all of ``errors``: each model listed once, the count being the number listed."""
        return cls(*(entry for err in errors for entry in err.entries))


def hub_offline() -> bool:
    """True when the hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, now or at import)."""
    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return hub_constants.HF_HUB_OFFLINE or now.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _unavailable(
    config_key: str, value: str, reason: str, layout: str, hub_hint: str
) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"{config_key} = {value!r} is not available: {reason}.\n"
        f"Fix: set {config_key} to a local copy laid out as {layout}, or {hub_hint}."
    )


def _hub_hint(value: str) -> str:
    if not _HUB_ID.match(value):
        return "name a hub repo id (owner/name)"
    return (
        f"fill the hub cache ({hub_constants.HF_HUB_CACHE}) with `hf download {value}` where there is "
        "internet, "
        "or run without HF_HUB_OFFLINE=1"
    )


def resolve_together(*resolvers: Callable[[], T]) -> list[T]:
    """Run every resolver; if any raise ModelNotAvailableError, raise one error listing all of them.

    So a run with several missing models says so once, not one model per attempt.
    """
    results: list[T] = []
    errors: list[ModelNotAvailableError] = []
    for resolve in resolvers:
        try:
            results.append(resolve())
        except ModelNotAvailableError as err:
            errors.append(err)
    if errors:
        raise ModelNotAvailableError.combined(errors)
    return results


@dataclass(frozen=True)
class PretrainedLocation:
    """Where `from_pretrained` looks (a local folder or a hub id) and whether only local files may be used."""

    name_or_path: str
    local_files_only: bool


def locate_pretrained(value: str, config_key: str, subfolders: tuple[str, ...]) -> PretrainedLocation:
    """Check that a diffusers-layout model named by `value` (hub id or local folder) has `subfolders`.

    Local folder: every subfolder's marker file must exist. Hub id: offline, every marker file must be in the
    local hub cache; online, nothing is checked here (the download reports its own errors).
    Raises ModelNotAvailableError naming `config_key` and the layout otherwise.
    """
    layout = "a folder with " + ", ".join(_LAYOUT_HELP[s] for s in subfolders)
    path = Path(value).expanduser()
    if path.is_dir():
        missing = [
            f"{s}/{_MARKER_FILES[s][0]}"
            for s in subfolders
            if not any((path / s / name).is_file() for name in _MARKER_FILES[s])
        ]
        if missing:
            raise _unavailable(
                config_key, value, f"the folder {path} lacks {', '.join(missing)}", layout, _hub_hint(value)
            )
        return PretrainedLocation(str(path), local_files_only=True)
    if not _HUB_ID.match(value):
        raise _unavailable(
            config_key, value, "no such local folder, and it is not a hub id", layout, _hub_hint(value)
        )
    if not hub_offline():
        return PretrainedLocation(value, local_files_only=False)
    missing = [
        f"{s}/{_MARKER_FILES[s][0]}"
        for s in subfolders
        if not any(isinstance(try_to_load_from_cache(value, f"{s}/{name}"), str) for name in _MARKER_FILES[s])
    ]
    if missing:
        raise _unavailable(
            config_key,
            value,
            f"HF_HUB_OFFLINE=1 and the hub cache lacks {', '.join(missing)} of this repo",
            layout,
            _hub_hint(value),
        )
    return PretrainedLocation(value, local_files_only=True)


def _load_error(
    config_key: str, loc: PretrainedLocation, subfolder: str, err: Exception
) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"{config_key} = {loc.name_or_path!r}: loading {subfolder}/ failed ({type(err).__name__}: {err}).\n"
        f"Fix: point {config_key} at a complete copy with {_LAYOUT_HELP[subfolder]}."
    )


def load_pretrained(cls: type[T], loc: PretrainedLocation, subfolder: str, config_key: str, **kwargs: Any) -> T:
    """`cls.from_pretrained` on `subfolder` of `loc` (any diffusers/transformers class: a UNet, the VAE, the
    tokenizer, ...); a failure is a ModelNotAvailableError naming `config_key` and the layout expected."""
    try:
        return cls.from_pretrained(  # type: ignore[attr-defined]
            loc.name_or_path, subfolder=subfolder, local_files_only=loc.local_files_only, **kwargs
        )
    except (OSError, ValueError) as err:
        raise _load_error(config_key, loc, subfolder, err) from err


def load_frozen(cls: type[M], loc: PretrainedLocation, subfolder: str, config_key: str, dtype: torch.dtype) -> M:
    """A network (e.g. UNet2DConditionModel from "unet", AutoencoderKL from "vae") in `dtype`, frozen, in eval
    mode."""
    # Each library's own name for the weight dtype: transformers calls it `dtype` (`torch_dtype` is deprecated
    # there), diffusers `torch_dtype` (older diffusers within our pin do not know `dtype`).
    dtype_kwarg = "dtype" if issubclass(cls, PreTrainedModel) else "torch_dtype"
    model = load_pretrained(cls, loc, subfolder, config_key, **{dtype_kwarg: dtype})
    return model.eval().requires_grad_(False)


def load_text_encoder(
    loc: PretrainedLocation, config_key: str, dtype: torch.dtype
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The `tokenizer/` and `text_encoder/` (CLIP), the encoder frozen, in eval mode."""
    tokenizer = load_pretrained(CLIPTokenizer, loc, "tokenizer", config_key)
    return tokenizer, load_frozen(CLIPTextModel, loc, "text_encoder", config_key, dtype)


class PredictionType(StrChoice):
    """What a UNet predicts (its scheduler_config.json `prediction_type`); values are the diffusers names."""

    epsilon = "epsilon"  # ε (SD 2.1-base, MVDream, Zeroscope)
    v_prediction = "v_prediction"  # v = √ᾱ ε − √(1−ᾱ) x0 (SD 2.1 768-v)


@dataclass(frozen=True)
class NoiseSchedule:
    """What a prior needs from its `scheduler/` config."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float64, ᾱ_t
    prediction_type: PredictionType


def load_noise_schedule(loc: PretrainedLocation, config_key: str) -> NoiseSchedule:
    """Read `scheduler/scheduler_config.json`; ᾱ from `fourdfy.guidance.noise` with the config's betas.

    Only the "scaled_linear" schedule (every model used here) is accepted; anything else is a ValueError
    rather than a silently different ᾱ table.
    """
    try:  # the config only (a JSON file), not a scheduler object: load_config, not from_pretrained
        config = DDPMScheduler.load_config(
            loc.name_or_path, subfolder="scheduler", local_files_only=loc.local_files_only
        )
    except (OSError, ValueError) as err:
        raise _load_error(config_key, loc, "scheduler", err) from err
    schedule = config.get("beta_schedule", "linear")
    if schedule != "scaled_linear" or config.get("trained_betas") is not None:
        raise ValueError(
            f"{config_key} = {loc.name_or_path!r}: scheduler beta_schedule={schedule!r} is not supported; "
            "the priors assume Stable Diffusion's 'scaled_linear' schedule"
        )
    name = str(config.get("prediction_type", "epsilon"))
    if name not in {p.value for p in PredictionType}:
        raise ValueError(
            f"{config_key} = {loc.name_or_path!r}: prediction_type={name!r} is not supported "
            "(epsilon or v_prediction)"
        )
    alphas_cumprod = scaled_linear_alphas_cumprod(
        int(config.get("num_train_timesteps", 1000)),
        float(config.get("beta_start", 0.0001)),
        float(config.get("beta_end", 0.02)),
    )
    return NoiseSchedule(alphas_cumprod=alphas_cumprod, prediction_type=PredictionType(name))


def resolve_checkpoint_file(value: str, filename: str, config_key: str) -> Path:
    """A single-file checkpoint (MVDream's `.pt`): a local file, a local folder holding `filename`, or a hub
    repo id whose file `filename` is fetched with hf_hub_download (offline: from the cache only)."""
    layout = f"the file itself (.pt or .safetensors) or a folder holding {filename}"
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise _unavailable(
            config_key, value, f"the folder {path} has no {filename}", layout, _hub_hint(value)
        )
    if not _HUB_ID.match(value):
        raise _unavailable(
            config_key,
            value,
            "no such local file or folder, and it is not a hub id",
            layout,
            _hub_hint(value),
        )
    offline = hub_offline()
    try:
        return Path(hf_hub_download(value, filename, local_files_only=offline))
    except (OSError, ValueError) as err:  # LocalEntryNotFoundError, EntryNotFoundError, HTTP errors
        reason = (
            f"HF_HUB_OFFLINE=1 and {filename} of this repo is not in the hub cache"
            if offline
            else f"downloading {filename} failed ({type(err).__name__}: {err})"
        )
        raise _unavailable(config_key, value, reason, layout, _hub_hint(value)) from err
