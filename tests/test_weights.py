"""Weight resolution: hub id or local path, one clear ModelNotAvailableError offline; dtype rules."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers.tiny_models import (
    save_tiny_models,
    save_tiny_mvdream,
    save_tiny_sd,
    tiny_mvdream_config,
    tiny_sd_vsd_config,
    tiny_zeroscope_config,
)
from huggingface_hub import constants as hub_constants

from fourdfy.config import RunConfig
from fourdfy.guidance.configs import MVDreamConfig, SDVSDConfig, ZeroscopeConfig
from fourdfy.guidance.memory import parse_dtype, resolve_dtype
from fourdfy.guidance.mvdream import MVDreamGuidance
from fourdfy.guidance.real import build_real_guidances
from fourdfy.guidance.sd_vsd import SDVSDGuidance
from fourdfy.guidance.weights import (
    ModelNotAvailableError,
    PredictionType,
    PretrainedLocation,
    hub_offline,
    load_frozen,
    load_noise_schedule,
    locate_pretrained,
    resolve_checkpoint_file,
)
from fourdfy.guidance.zeroscope import ZeroscopeGuidance
from fourdfy.kinds import UpdateKind

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture(autouse=True)
def empty_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with an empty hub cache, whatever the machine's own cache holds."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("weights") / "sd-base", seed=0)


def _fake_hub_snapshot(cache: Path, repo_id: str, source: Path) -> Path:
    """Put `source`'s files into the hub-cache layout (models--owner--name/snapshots/<rev>, refs/main)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def test_error_type_is_a_value_error() -> None:
    assert issubclass(ModelNotAvailableError, ValueError)
    assert hub_offline()


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: MVDreamGuidance.from_config(MVDreamConfig()), "guidance.mvdream.checkpoint"),
        (lambda: SDVSDGuidance.from_config(SDVSDConfig()), "guidance.sd_vsd.pretrained_model"),
        (lambda: ZeroscopeGuidance.from_config(ZeroscopeConfig()), "guidance.zeroscope.pretrained_model"),
    ],
)
def test_missing_hub_models_raise_one_clear_error(build, key: str) -> None:
    with pytest.raises(ModelNotAvailableError) as info:
        build()
    message = str(info.value)
    assert message.count(key) >= 2  # what is missing, and what to set
    assert "HF_HUB_OFFLINE=1" in message and "Fix:" in message
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, OSError)


def test_all_missing_models_are_named_in_one_error() -> None:
    with pytest.raises(ModelNotAvailableError, match="2 models are not available") as info:
        SDVSDGuidance.from_config(SDVSDConfig())
    assert "guidance.sd_vsd.pretrained_model" in str(info.value)
    assert "guidance.sd_vsd.lora_pretrained_model" in str(info.value)
    with pytest.raises(ModelNotAvailableError, match="guidance.mvdream.components_model") as info:
        MVDreamGuidance.from_config(MVDreamConfig())
    assert "guidance.mvdream.checkpoint" in str(info.value)


def test_combined_error_counts_every_missing_model() -> None:
    """All three priors, nothing cached: MVDream lacks 2 models, SD-VSD 2, Zeroscope 1; the one error says 5
    (not the first prior's own "2") and lists each model once, every entry with its fix."""
    cfg = RunConfig()
    cfg.schedule.stage_lengths = [1, 1, 1]  # every kind
    with pytest.raises(ModelNotAvailableError) as info:
        build_real_guidances(cfg)
    message = str(info.value)
    assert message.startswith("5 models are not available:\n\n")
    assert message.count("models are not available") == 1
    assert len(info.value.entries) == 5 and message.count("Fix:") == 5
    keys = ("guidance.mvdream.checkpoint", "guidance.mvdream.components_model", "guidance.sd_vsd.pretrained_model",
            "guidance.sd_vsd.lora_pretrained_model", "guidance.zeroscope.pretrained_model")
    for key, entry in zip(keys, info.value.entries, strict=True):
        assert entry.startswith(f"{key} = "), entry


def test_missing_second_model_names_its_own_key(tiny_sd: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(SDVSDConfig(), pretrained_model=str(tiny_sd))
    with pytest.raises(ModelNotAvailableError, match="guidance.sd_vsd.lora_pretrained_model"):
        SDVSDGuidance.from_config(cfg)
    mv = tiny_mvdream_config(save_tiny_mvdream(tmp_path / "mv"), tiny_sd)
    with pytest.raises(ModelNotAvailableError, match=r"guidance\.3d\.components_model.*\n.*vae/"):
        MVDreamGuidance.from_config(
            dataclasses.replace(mv, components_model="stabilityai/stable-diffusion-2-1-base"),
            config_key="guidance.3d",
        )


def test_local_folder_missing_a_part_lists_it(tiny_sd: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd, partial, ignore=shutil.ignore_patterns("vae", "scheduler"))
    with pytest.raises(
        ModelNotAvailableError, match=r"lacks vae/config\.json, scheduler/scheduler_config\.json"
    ):
        locate_pretrained(str(partial), "guidance.sd_vsd.pretrained_model", SD_PARTS)
    with pytest.raises(ModelNotAvailableError, match="no such local folder"):
        locate_pretrained(str(tmp_path / "does" / "not" / "exist"), "k", SD_PARTS)
    assert locate_pretrained(str(tiny_sd), "k", SD_PARTS) == PretrainedLocation(str(tiny_sd), True)


def test_hub_id_loads_from_the_local_cache_offline(tiny_sd: Path, empty_offline_hub: Path) -> None:
    _fake_hub_snapshot(empty_offline_hub, "someone/tiny-sd", tiny_sd)
    loc = locate_pretrained("someone/tiny-sd", "k", SD_PARTS)
    assert loc == PretrainedLocation("someone/tiny-sd", local_files_only=True)
    unet = load_frozen(UNet2DConditionModel, loc, "unet", "k", torch.float32)
    assert unet.config.cross_attention_dim == 32 and not any(p.requires_grad for p in unet.parameters())


def test_checkpoint_file_resolution(tmp_path: Path, empty_offline_hub: Path) -> None:
    folder = save_tiny_mvdream(tmp_path / "mv")
    assert (
        resolve_checkpoint_file(str(folder), "sd-v2.1-base-4view.pt", "k") == folder / "sd-v2.1-base-4view.pt"
    )
    direct = folder / "sd-v2.1-base-4view.pt"
    assert resolve_checkpoint_file(str(direct), "ignored.pt", "k") == direct
    with pytest.raises(ModelNotAvailableError, match="has no other.pt"):
        resolve_checkpoint_file(str(folder), "other.pt", "guidance.mvdream.checkpoint")
    with pytest.raises(ModelNotAvailableError, match="not in the hub cache"):
        resolve_checkpoint_file("MVDream/MVDream", "sd-v2.1-base-4view.pt", "guidance.mvdream.checkpoint")
    snapshot = _fake_hub_snapshot(empty_offline_hub, "MVDream/MVDream", folder)
    found = resolve_checkpoint_file("MVDream/MVDream", "sd-v2.1-base-4view.pt", "k")
    assert found.resolve() == (snapshot / "sd-v2.1-base-4view.pt").resolve()


def test_noise_schedule_from_scheduler_config(tiny_sd: Path, tmp_path: Path) -> None:
    schedule = load_noise_schedule(PretrainedLocation(str(tiny_sd), True), "k")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert schedule.prediction_type == "epsilon" and schedule.prediction_type is PredictionType.epsilon
    other = tmp_path / "linear"
    shutil.copytree(tiny_sd / "scheduler", other / "scheduler")
    config = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    (other / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config | {"beta_schedule": "linear"})
    )
    with pytest.raises(ValueError, match="beta_schedule='linear'"):
        load_noise_schedule(PretrainedLocation(str(other), True), "k")


def test_a_failed_load_names_the_key_and_the_part(tiny_sd: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    loc = locate_pretrained(str(broken), "guidance.sd_vsd.pretrained_model", SD_PARTS)  # config.json is there
    with pytest.raises(ModelNotAvailableError, match=r"guidance\.sd_vsd\.pretrained_model = .*loading unet/ failed"):
        load_frozen(UNet2DConditionModel, loc, "unet", "guidance.sd_vsd.pretrained_model", torch.float32)


def test_real_backend_builds_the_priors_of_the_kinds_used(tmp_path: Path) -> None:
    """Keyed by UpdateKind, only the kinds the schedule draws; every missing model in one error."""
    cfg = RunConfig()
    cfg.schedule.stage_lengths = [2, 0, 0]  # stage 1 only: 3D updates only
    with pytest.raises(ModelNotAvailableError) as info:
        build_real_guidances(cfg)
    assert "guidance.mvdream.checkpoint" in str(info.value) and "guidance.sd_vsd" not in str(info.value)
    cfg.schedule.stage_lengths = [1, 1, 1]  # every kind
    with pytest.raises(ModelNotAvailableError) as info:
        build_real_guidances(cfg)
    for key in ("guidance.mvdream.checkpoint", "guidance.sd_vsd.pretrained_model",
                "guidance.sd_vsd.lora_pretrained_model", "guidance.zeroscope.pretrained_model"):
        assert key in str(info.value)
    paths = save_tiny_models(tmp_path / "tiny")
    cfg.guidance.mvdream = tiny_mvdream_config(paths["mvdream"], paths["sd_base"])
    cfg.guidance.sd_vsd = tiny_sd_vsd_config(paths["sd_base"], paths["sd_v"])
    cfg.guidance.zeroscope = tiny_zeroscope_config(paths["zeroscope"])
    guidances = build_real_guidances(cfg)
    assert list(guidances) == [UpdateKind.MULTIVIEW, UpdateKind.IMAGE, UpdateKind.VIDEO]
    assert isinstance(guidances["3d"], MVDreamGuidance) and isinstance(guidances["vid"], ZeroscopeGuidance)


def test_loading_through_from_config_uses_the_tiny_folders(tiny_sd: Path, tmp_path: Path) -> None:
    sd_v = save_tiny_sd(tmp_path / "sd-v", "v_prediction", seed=1)
    g = SDVSDGuidance.from_config(tiny_sd_vsd_config(tiny_sd, sd_v))
    assert g.lora_v_prediction and g.dtype == torch.float32 and g.text.max_length == 77


def test_dtype_rules() -> None:
    assert resolve_dtype("cpu", None) == torch.float32
    assert resolve_dtype("cuda", None) == torch.float16  # authors' half_precision_weights
    assert resolve_dtype("cuda", torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("cpu", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 on the CPU"):
        resolve_dtype("cpu", torch.float16)
    assert parse_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("fp8")
