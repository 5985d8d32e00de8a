"""Experiment logging: Weights & Biases (offline by default) or nothing, behind one small interface."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fourdfy.atomic import write_json_atomic
from fourdfy.enums import StrChoice
from fourdfy.errors import import_extra, require_extra


class LoggerKind(StrChoice):
    """Where metrics go besides the run's own log.jsonl."""

    none = "none"  # nowhere else
    wandb = "wandb"  # Weights & Biases (pip install 'fourdfy[wandb]')


class WandbMode(StrChoice):
    """wandb.init's mode."""

    offline = "offline"  # files under the run directory's wandb/, uploaded later with `wandb sync`
    online = "online"  # streamed to the W&B server
    disabled = "disabled"  # W&B calls do nothing


@dataclass
class LoggerConfig:
    """Where metrics go (W&B runs offline unless WANDB_MODE says otherwise)."""

    kind: LoggerKind = LoggerKind.none  # wandb or none
    project: str = "fourdfy"  # W&B project
    entity: str | None = None  # W&B entity (team); None: the default of the logged-in user
    group: str | None = None  # W&B group; run.py sets the sweep name when it is None
    mode: WandbMode = WandbMode.offline  # W&B mode: offline (default, sync later with `wandb sync`), online, disabled

    def validate(self) -> None:
        """W&B is an optional extra: its absence is reported before any work, with the pip command."""
        if LoggerKind(self.kind) is LoggerKind.wandb:
            require_extra("wandb", "logger.kind=wandb")


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, key: str, path: Path, step: int) -> None: ...
    def log_video(self, key: str, path: Path, step: int) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """Logs nothing (``logger.kind=none``); the run's own log.jsonl still records every scalar."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def log_video(self, key: str, path: Path, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """W&B run that survives requeues: the run id is stored in the run directory and resumed."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], name: str, job_type: str):
        wandb = import_extra("wandb", "logger.kind=wandb")  # optional dependency: imported only when asked for

        id_file = Path(run_dir) / "wandb_run_id.json"
        run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else uuid.uuid4().hex[:12]
        write_json_atomic(id_file, {"id": run_id})
        mode = os.environ.get("WANDB_MODE", str(cfg.mode))  # the environment wins, as documented
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, job_type=job_type, name=name,
            id=run_id, resume="allow", dir=str(run_dir), config=config, mode=mode,
        )
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def log_video(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Video(str(path), format=Path(path).suffix.lstrip("."))}, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], name: str, job_type: str) -> Logger:
    """The logger ``cfg.kind`` names (LoggerKind: none or wandb)."""
    if LoggerKind(cfg.kind) is LoggerKind.wandb:
        return WandbLogger(cfg, run_dir, config, name, job_type)
    return NullLogger()
