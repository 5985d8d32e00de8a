"""Compose real run configs (conf/ through Hydra) for tests, exactly as run.py would."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import run  # noqa: F401  (registers the schema and the `slug` resolver)
from fourdfy.config import RunConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The RunConfig that `python run.py <overrides>` would run."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_object(cfg)
