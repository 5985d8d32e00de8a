"""Errors a user can act on: one line naming the key (or path, or package) and the fix, before any work.

Each test checks the message itself: what a user sees once an entry point prints it without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fourdfy.build import build_trainer
from fourdfy.cli import main as fourdfy_main
from fourdfy.config import RunConfig, compose_run_config
from fourdfy.errors import EXTRA_OF_MODULE, ConfigError, MissingExtraError, UserError, import_extra
from fourdfy.synthetic.scenes import SCENES, UnknownToyPromptError
from fourdfy.tracking import LoggerConfig, make_logger

REPO = Path(__file__).resolve().parents[1]


def one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message, message
    return message


def test_cuda_device_without_cuda_names_device_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    cfg = compose_run_config(["preset=paper"])
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    message = one_line(info.value)
    assert message.startswith("device=cuda but torch.cuda.is_available() is False")
    assert "set device=cpu" in message and "GPU" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)


def test_a_device_torch_does_not_know_names_device() -> None:
    with pytest.raises(ConfigError, match=r"^device='gpu' is not a torch device .*set device=cpu or device=cuda"):
        RunConfig(device="gpu").validate()


def test_a_part_out_of_range_is_a_config_error_naming_its_key() -> None:
    cfg = RunConfig()
    cfg.eval.size = 0
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert one_line(info.value) == "eval.size must be >= 1, got 0"


def test_unknown_toy_prompt_lists_the_toy_prompts_and_points_to_the_paper_preset(tmp_path: Path) -> None:
    cfg = compose_run_config(["preset=smoke", "prompt=a panda dancing"])
    with pytest.raises(UnknownToyPromptError) as info:
        build_trainer(cfg, tmp_path / "run")
    message = one_line(info.value)
    assert message.startswith("prompt='a panda dancing' is not a toy-world scene")
    for scene in SCENES:
        assert repr(scene.prompt) in message
    assert "real prompts need preset=paper" in message
    assert isinstance(info.value, ConfigError)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- optional extras


def test_the_extras_named_are_pyprojects() -> None:
    import tomllib  # Python >= 3.11 (the project supports 3.10: only this test needs it)

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in EXTRA_OF_MODULE.items():
        assert any(req.split(">")[0].split("=")[0].strip() == module for req in extras[extra]), (module, extra)


def test_missing_wandb_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` fails
    cfg = compose_run_config(["preset=smoke", "logger.kind=wandb"])
    with pytest.raises(MissingExtraError) as info:
        cfg.validate()  # before any work
    assert one_line(info.value) == ("logger.kind=wandb needs the optional package 'wandb', which is not installed: "
                                    "pip install 'fourdfy[wandb]'")
    assert isinstance(info.value, ModuleNotFoundError) and info.value.name == "wandb"
    with pytest.raises(MissingExtraError, match=r"pip install 'fourdfy\[wandb\]'"):
        make_logger(LoggerConfig(kind="wandb"), tmp_path, {}, name="n", job_type="full")
    assert list(tmp_path.iterdir()) == []


def test_meshes_at_the_end_of_a_run_need_the_export_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trimesh", None)
    cfg = compose_run_config(["preset=smoke", "eval.mesh_on_finish=true"])
    with pytest.raises(MissingExtraError) as info:
        cfg.validate()
    assert one_line(info.value).endswith("pip install 'fourdfy[export]'")
    assert "eval.mesh_on_finish=true" in str(info.value)


def test_import_extra_keeps_other_import_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed package whose own import fails is not a missing extra: its error is left as it is.
    monkeypatch.setitem(sys.modules, "pygltflib", None)
    with pytest.raises(MissingExtraError, match=r"fourdfy\[export\]"):
        import_extra("pygltflib", "writing mesh.glb")

    def broken(name: str, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(ModuleNotFoundError) as info:
        import_extra("trimesh", "writing PLY/OBJ meshes")
    assert not isinstance(info.value, MissingExtraError)


def _run_folder(path: Path) -> Path:
    """A folder that is a run as far as `fourdfy export` checks before loading (config.yaml, log.jsonl)."""
    path.mkdir()
    (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(RunConfig())))
    (path / "log.jsonl").write_text("")
    return path


@pytest.mark.parametrize(("flags", "module"), [(["--mesh"], "trimesh"), (["--glb"], "pygltflib"), ([], "trimesh")])
def test_export_without_the_export_extra_names_the_pip_command_and_writes_nothing(
    flags: list[str], module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_folder(tmp_path / "run")
    monkeypatch.setitem(sys.modules, module, None)
    assert fourdfy_main(["export", str(run_dir), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fourdfy export: error: fourdfy export ") and err.count("\n") == 1, err
    assert f"needs the optional package {module!r}" in err and err.endswith("pip install 'fourdfy[export]'\n")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "log.jsonl"], "renders/ must not appear"
