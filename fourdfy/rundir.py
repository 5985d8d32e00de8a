"""A run directory: what a run leaves on disk, and the rules for starting, resuming and finishing it.

Layout (every file written atomically, fourdfy/atomic.py):

    config.yaml        the resolved RunConfig
    fingerprint.json   hash of the config keys that shape the optimisation (see config_fingerprint)
    LOCK               who runs here now (host, pid, SLURM job); an flock on it is held for the whole run
    checkpoints/       ckpt_<iteration>.pt + .sha256 (fourdfy/checkpoint.py)
    log.jsonl          one JSON object per logged iteration; rows past a resumed checkpoint are dropped
    metrics.json       written at the end
    DONE               written last: a run without it is not finished, whatever else it holds

Rules: a directory whose stored config differs from the requested one (outside RESUME_SAFE_KEYS) is refused,
finished or not, naming each differing key; a finished one (DONE) is not run again; one process at a time runs
in a directory (``RunDir.lock``, fourdfy/runlock.py); a run resumes from its newest valid checkpoint. Where a
config's directory is: fourdfy/identity.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fourdfy.atomic import atomic_path, write_json_atomic, write_text_atomic
from fourdfy.checkpoint import list_checkpoints
from fourdfy.fields.deformation import DeformationConfig
from fourdfy.guidance.configs import VideoCrafter2Config, VideoPrior
from fourdfy.render.volume import AuthorsMarchingConfig
from fourdfy.runlock import RunLock, hold_lock

if TYPE_CHECKING:  # fourdfy.config gathers every module's config, the trainer's too, which uses this module
    from fourdfy.config import RunConfig

DONE_FILE = "DONE"
CONFIG_FILE = "config.yaml"
FINGERPRINT_FILE = "fingerprint.json"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "LOCK"

# Keys a resumed run may change: they do not change the optimisation. field.checkpoint_chunk trades memory for
# time: results agree to float round-off (not bit for bit across a changed value), so lowering it after an
# out-of-memory error keeps the run. preset.name is a label (the preset's values are what count); it names the
# directory's first level instead (fourdfy/identity.py).
RESUME_SAFE_KEYS = ("logger", "eval", "trainer.progress_bar", "trainer.log_every", "device", "field.checkpoint_chunk",
                    "field.static_grid.chunk_size", "field.dynamic_grid.chunk_size", "preset")
# Keys added after runs already existed, with the value that reproduces the behaviour from before them: at that
# value they leave the fingerprint, so a run started before the key existed still resumes after an upgrade.
# A whole section is neutral at its defaults (guidance.videocrafter2: only read with video_prior=videocrafter2).
NEUTRAL_NEW_KEYS: dict[str, Any] = {
    "guidance.synthetic.video.clip_azimuths_deg": None,
    "init_from": None,
    "init_at": None,
    "guidance.video_prior": VideoPrior.zeroscope,
    "guidance.videocrafter2": asdict(VideoCrafter2Config()),
    "field.dynamic": "grid",  # fourdfy.fields.field4d.DynamicKind.grid (a str enum): summed 4D features
    "field.deformation": asdict(DeformationConfig()),  # read only when field.dynamic=deformation
    "guidance.weights": "pretrained",  # fourdfy.config.WeightsSource.pretrained (a str enum; config imports us)
    "renderer.marching": "uniform",  # fourdfy.render.volume.MarchingMode.uniform: the marching before #15
    "renderer.authors": asdict(AuthorsMarchingConfig()),  # read only when renderer.marching=authors
    "guidance.sd_vsd.train_lora": True,  # the LoRA always trained before the switch existed
    "schedule.reset_optimizer_at_stage_start": False,  # the behaviour before #15 (the default is now True)
    "schedule.freeze_static_modules": False,  # new switch; off is the behaviour before it
    "trainer.lambda_deformation": 0.0,  # new term; only a deformation field has it
    "trainer.static_stages": [],  # before #15 no stage rendered t = 0 unless trainer.static_prior_time said so
    "field.background.sh_degree": 4,  # the 16 coefficients before #15 (the default is now 3)
}


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


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) pairs of nested dicts; lists are leaves, enums their values."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}{key}.")
    elif isinstance(data, Enum):
        yield prefix[:-1], data.value
    elif isinstance(data, (list, tuple)):
        yield prefix[:-1], [v.value if isinstance(v, Enum) else v for v in data]
    else:
        yield prefix[:-1], data


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` as dotted key -> value (lists as values, enums as their strings)."""
    return dict(_flatten(asdict(cfg)))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_diff(old: RunConfig, new: RunConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key that shapes the optimisation and differs.

    RESUME_SAFE_KEYS and the keys under ``ignore`` are left out. Equal diffs <=> equal fingerprints (a key of
    NEUTRAL_NEW_KEYS missing from an old config.yaml reads back at its default, the neutral value).
    """
    skip = RESUME_SAFE_KEYS + tuple(ignore)
    a = {k: v for k, v in flat_config(old).items() if not _under(k, skip)}
    b = {k: v for k, v in flat_config(new).items() if not _under(k, skip)}
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def describe_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    """One ``key: old -> new`` line per differing key."""
    return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in diff.items())


class ConfigMismatchError(ValueError):
    """A run directory holds a run of another config."""


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

    def stored_config(self, schema: type[RunConfig]) -> RunConfig | None:
        """config.yaml read into ``schema`` (keys added since read back at their defaults); None when absent."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))
        except OmegaConfBaseException as err:
            raise ConfigMismatchError(f"{path} does not fit the current run schema ({err}); refusing to run in "
                                      f"{self.path}. Use another directory, or the code version that wrote it."
                                      ) from err

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse a directory that holds a run of another config, finished or not (reads only).

        Raises ConfigMismatchError listing each differing key as ``key: old -> new``; keys of RESUME_SAFE_KEYS
        may differ.
        """
        stamp = self.path / FINGERPRINT_FILE
        if self.has_checkpoints() and not stamp.exists():
            raise ConfigMismatchError(f"{self.path} holds checkpoints but no {FINGERPRINT_FILE}, so its config "
                                      "cannot be checked; refusing to resume it. Use a new output directory.")
        fingerprint = config_fingerprint(cfg)
        old_fingerprint = json.loads(stamp.read_text())["fingerprint"] if stamp.exists() else fingerprint
        stored = self.stored_config(type(cfg))
        diff = config_diff(stored, cfg) if stored is not None else {}
        if diff or old_fingerprint != fingerprint:
            state = "finished" if self.is_finished() else "not finished"
            detail = describe_diff(diff) if diff else f"  fingerprint: {old_fingerprint} -> {fingerprint}"
            raise ConfigMismatchError(
                f"{self.path} holds a run of a different config ({state}); refusing it. Differing keys "
                f"(stored -> requested):\n{detail}\nLaunch without hydra.run.dir to get this config's own "
                "directory, or restore the stored values.")

    @contextmanager
    def lock(self) -> Iterator[RunLock]:
        """Hold this directory's lock (creating the directory) while the block runs: one process per run.

        Raises RunLockedError naming the holder when another live process holds it (fourdfy/runlock.py).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with hold_lock(self.path / LOCK_FILE) as held:
            yield held

    def prepare(self, cfg: RunConfig) -> None:
        """Save the resolved config and its fingerprint; refuse a directory that holds another config."""
        self.check_config(cfg)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / FINGERPRINT_FILE, {"fingerprint": config_fingerprint(cfg)})
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
