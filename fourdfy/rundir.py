"""A run directory: what a run leaves on disk, and the rules for starting, resuming and finishing it.

Layout (every file written atomically, fourdfy/atomic.py):

    config.yaml        the resolved RunConfig
    fingerprint.json   hash of the config keys that shape the optimisation (see config_fingerprint)
    checkpoints/       ckpt_<iteration>.pt + .sha256 (fourdfy/checkpoint.py)
    log.jsonl          one JSON object per logged iteration; rows past a resumed checkpoint are dropped
    metrics.json       written at the end
    DONE               written last: a run without it is not finished, whatever else it holds

Resume policy: a directory with checkpoints resumes only under the same fingerprint; a directory whose earlier
attempt never saved a checkpoint is re-stamped with the new config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from fourdfy.atomic import atomic_path, write_json_atomic, write_text_atomic
from fourdfy.checkpoint import list_checkpoints

if TYPE_CHECKING:  # fourdfy.config gathers every module's config, the trainer's too, which uses this module
    from fourdfy.config import RunConfig

DONE_FILE = "DONE"
CONFIG_FILE = "config.yaml"
FINGERPRINT_FILE = "fingerprint.json"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"

# Keys a resumed run may change: they do not change the optimisation. field.checkpoint_chunk trades memory for
# time: results agree to float round-off (not bit for bit across a changed value), so lowering it after an
# out-of-memory error keeps the run.
RESUME_SAFE_KEYS = ("logger", "eval", "trainer.progress_bar", "trainer.log_every", "device", "field.checkpoint_chunk")
# Keys added after runs already existed, with the value that reproduces the behaviour from before them: at that
# value they leave the fingerprint, so a run started before the key existed still resumes after an upgrade.
NEUTRAL_NEW_KEYS: dict[str, Any] = {"guidance.synthetic.video.clip_azimuths_deg": None}


def _parent_and_leaf(data: dict[str, Any], dotted_key: str) -> tuple[dict[str, Any], str]:
    """The dict of a nested dict that holds ``dotted_key``'s last part, and that part."""
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        data = data[part]
    return data, leaf


def config_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that shapes the optimisation: a resume under a different one is refused.

    Enum values hash as their strings (they are ``str`` enums), so typing a choice changed no fingerprint.
    """
    data = asdict(cfg)
    for key in RESUME_SAFE_KEYS:
        parent, leaf = _parent_and_leaf(data, key)
        parent.pop(leaf, None)
    for key, neutral in NEUTRAL_NEW_KEYS.items():
        parent, leaf = _parent_and_leaf(data, key)
        if leaf in parent and parent[leaf] == neutral:
            del parent[leaf]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunDir:
    """One run's directory (see the module docstring for its files and rules)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    def is_finished(self) -> bool:
        return (self.path / DONE_FILE).exists()

    def has_checkpoints(self) -> bool:
        return bool(list_checkpoints(self.checkpoints))

    def prepare(self, cfg: RunConfig) -> None:
        """Save the resolved config; refuse a directory that holds checkpoints of an incompatible config."""
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = self.path / FINGERPRINT_FILE
        fingerprint = config_fingerprint(cfg)
        has_checkpoints = self.has_checkpoints()
        if has_checkpoints and not stamp.exists():
            raise ValueError(f"{self.path} holds checkpoints but no {FINGERPRINT_FILE}, so its config cannot be "
                             "checked; refusing to resume it. Use a new output directory.")
        if stamp.exists() and has_checkpoints:
            old = json.loads(stamp.read_text())["fingerprint"]
            if old != fingerprint:
                raise ValueError(
                    f"{self.path} holds a run of a different config (fingerprint {old} != {fingerprint}); "
                    "refusing to resume it. Use a new output directory, or restore the original settings."
                )
        else:  # a fresh directory, or one whose earlier attempt never trained: (re)stamp it
            write_json_atomic(stamp, {"fingerprint": fingerprint})
        with atomic_path(self.path / CONFIG_FILE) as tmp:
            OmegaConf.save(OmegaConf.structured(cfg), tmp)

    def truncate_log(self, iteration: int) -> None:
        """Drop log rows of ``iteration`` and later (a resumed run is about to write them again) and rows
        torn by a kill."""
        if not self.log.exists():
            return
        kept = []
        for line in self.log.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] < iteration:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a row torn by the kill
        write_text_atomic(self.log, "".join(row + "\n" for row in kept))

    def read_metrics(self) -> dict[str, float]:
        """metrics.json, or {} when the run wrote none."""
        return json.loads(self.metrics.read_text()) if self.metrics.exists() else {}

    def finish(self, metrics: dict[str, float]) -> None:
        """Write metrics.json, then DONE (last, so nothing reads a half-written run as finished)."""
        write_json_atomic(self.metrics, metrics)
        write_text_atomic(self.path / DONE_FILE, "finished\n")
