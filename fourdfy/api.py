"""Build a run from its config and carry it out: the one entry point run.py, tests and tools call.

``generate(cfg, run_dir)`` trains (resuming if run_dir holds a checkpoint), then writes the renders and
metrics, and finally the ``DONE`` marker — last, so nothing reads a half-written run as finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from fourdfy.checkpoint import list_checkpoints, load_latest_checkpoint
from fourdfy.config import FieldConfig, HashGridConfig, RunConfig
from fourdfy.export.curves import curves_callback
from fourdfy.export.outputs import write_outputs
from fourdfy.fields.background import BackgroundMLP
from fourdfy.fields.dense import DenseGridEncoding3D, DenseGridEncoding4D
from fourdfy.fields.field4d import Field4D
from fourdfy.fields.hashgrid import HashGridEncoding
from fourdfy.fields.hexplane import TimePlaneEncoding, TriPlaneEncoding
from fourdfy.guidance.base import Guidance
from fourdfy.hybrid import HybridSchedule
from fourdfy.render.volume import Renderer
from fourdfy.tracking import make_logger
from fourdfy.trainer import Callback, Trainer

DONE_FILE = "DONE"
# Config keys that may change between a run and its resume (they do not change the optimisation).
# Keys a resumed run may change. field.checkpoint_chunk trades memory for time: results agree to float round-off
# (not bit for bit across a changed value), so lowering it after an out-of-memory error keeps the run.
_RESUME_SAFE_KEYS = ("logger", "eval", "trainer.progress_bar", "trainer.log_every", "device", "field.checkpoint_chunk")
# Keys added after runs already existed, with the value that reproduces the behaviour from before them: at that
# value they leave the fingerprint, so a run started before the key existed still resumes after an upgrade.
_NEUTRAL_NEW_KEYS: dict[str, Any] = {"guidance.synthetic.video.clip_azimuths_deg": None}


def _hash_grid(cfg: HashGridConfig, n_dims: int) -> HashGridEncoding:
    return HashGridEncoding(n_dims, cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size,
                            cfg.base_resolution, cfg.per_level_scale, backend=cfg.backend)


def build_field(cfg: FieldConfig) -> tuple[Field4D, BackgroundMLP]:
    """The 4D field of ``cfg.kind`` and its background. Encodings are built in this one place."""
    encodings: dict[str, Callable[[], tuple[nn.Module, nn.Module]]] = {
        "hashgrid": lambda: (_hash_grid(cfg.static_grid, 3), _hash_grid(cfg.dynamic_grid, 4)),
        "hexplane": lambda: (TriPlaneEncoding(cfg.hexplane), TimePlaneEncoding(cfg.hexplane)),
        "dense": lambda: (
            DenseGridEncoding3D(cfg.dense.resolutions, cfg.dense.n_features, cfg.dense.init_scale),
            DenseGridEncoding4D(cfg.dense.dynamic_resolutions, cfg.dense.n_features, cfg.dense.time_resolution,
                                cfg.dense.init_scale),
        ),
    }
    if cfg.kind not in encodings:
        raise ValueError(f"field.kind must be one of {sorted(encodings)}, got {cfg.kind!r}")
    static, dynamic = encodings[cfg.kind]()
    field = Field4D(static, dynamic, cfg.heads, box_radius=cfg.box_radius, checkpoint_chunk=cfg.checkpoint_chunk)
    return field, BackgroundMLP(cfg.background)


def build_guidances(cfg: RunConfig) -> dict[str, Guidance]:
    """The priors the schedule will call, keyed by update kind."""
    if cfg.guidance.backend == "synthetic":
        from fourdfy.synthetic.priors import build_synthetic_priors

        return build_synthetic_priors(cfg.guidance.synthetic, cfg.prompt, seed=cfg.seed)
    if cfg.guidance.backend == "real":
        from fourdfy.guidance.real import build_real_guidances

        return build_real_guidances(cfg)
    raise ValueError(f"guidance.backend must be 'synthetic' or 'real', got {cfg.guidance.backend!r}")


def _parent_and_leaf(data: dict[str, Any], dotted_key: str) -> tuple[dict[str, Any], str]:
    """The dict of a nested dict that holds ``dotted_key``'s last part, and that part."""
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        data = data[part]
    return data, leaf


def config_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that shapes the optimisation: a resume under a different one is refused."""
    data = asdict(cfg)
    for key in _RESUME_SAFE_KEYS:
        parent, leaf = _parent_and_leaf(data, key)
        parent.pop(leaf, None)
    for key, neutral in _NEUTRAL_NEW_KEYS.items():
        parent, leaf = _parent_and_leaf(data, key)
        if leaf in parent and parent[leaf] == neutral:
            del parent[leaf]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Save the resolved config; refuse a directory that holds a run of an incompatible config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = run_dir / "fingerprint.json"
    fingerprint = config_fingerprint(cfg)
    has_checkpoints = bool(list_checkpoints(run_dir / "checkpoints"))
    if has_checkpoints and not stamp.exists():
        raise ValueError(f"{run_dir} holds checkpoints but no fingerprint.json, so its config cannot be checked; "
                         "refusing to resume it. Use a new output directory.")
    if stamp.exists() and has_checkpoints:
        old = json.loads(stamp.read_text())["fingerprint"]
        if old != fingerprint:
            raise ValueError(
                f"{run_dir} holds a run of a different config (fingerprint {old} != {fingerprint}); "
                "refusing to resume it. Use a new output directory, or restore the original settings."
            )
    else:  # a fresh directory, or one whose earlier attempt never trained: (re)stamp it
        _write_json_atomic(stamp, {"fingerprint": fingerprint})
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
    OmegaConf.save(OmegaConf.structured(cfg), tmp)
    os.replace(tmp, run_dir / "config.yaml")


def _validate_eval(cfg: RunConfig) -> None:
    for key in ("orbit_views", "size", "video_frames", "video_size", "grid_views", "grid_times", "fps", "n_samples"):
        if getattr(cfg.eval, key) < 1:
            raise ValueError(f"eval.{key} must be >= 1, got {getattr(cfg.eval, key)}")
    if cfg.field.heads.hidden_dim < 1:
        raise ValueError(f"field.heads.hidden_dim must be >= 1, got {cfg.field.heads.hidden_dim}")


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / DONE_FILE).exists()


def generate(cfg: RunConfig, run_dir: Path, callbacks: list[Callback] | None = None) -> dict[str, float]:
    """Train ``cfg`` in ``run_dir`` (resuming when possible) and write renders, metrics and DONE."""
    run_dir = Path(run_dir)
    if is_finished(run_dir):
        print(f"[fourdfy] {run_dir} is already finished (DONE exists); nothing to do.", flush=True)
        return json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    # Everything that can reject the config runs before the run directory is touched.
    cfg.schedule.validate()
    cfg.trainer.validate()
    cfg.cameras.validate()
    _validate_eval(cfg)
    torch.manual_seed(cfg.seed)
    field, background = build_field(cfg.field)
    field.to(cfg.device)
    background.to(cfg.device)
    guidances = build_guidances(cfg)
    schedule = HybridSchedule(cfg.schedule)
    prepare_run_dir(cfg, run_dir)
    logger = make_logger(cfg.logger, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)),
                         name=f"{cfg.variant.name}/{cfg.prompt}", job_type=cfg.variant.name)
    live_curves = curves_callback(cfg.trainer.checkpoint_every, cfg.prompt, list(schedule.stage_lengths))
    trainer = Trainer(
        cfg.trainer, field, background, Renderer(cfg.renderer), guidances, schedule, cfg.cameras, cfg.prompt,
        run_dir, seed=cfg.seed, random_background_prob=cfg.field.background.random_color_prob, logger=logger,
        callbacks=[live_curves, *(callbacks or [])],
    )
    if trainer.try_resume():
        print(f"[fourdfy] resumed {run_dir} at iteration {trainer.iteration}", flush=True)
    trainer.train()
    metrics = write_outputs(cfg, field, run_dir, logger, step=trainer.iteration)
    metrics["skipped_steps"] = trainer.skipped_steps
    _write_json_atomic(run_dir / "metrics.json", metrics)
    logger.finish()
    (run_dir / DONE_FILE).write_text("finished\n")
    return metrics




def load_run_config(run_dir: Path) -> RunConfig:
    """The RunConfig saved in ``run_dir/config.yaml`` (validated against the current schema)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a fourdfy run directory")
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def load_run(run_dir: Path) -> tuple[RunConfig, Field4D, BackgroundMLP, int]:
    """Rebuild a run's field and background from its config and newest valid checkpoint.

    Returns (config, field, background, iteration). Raises FileNotFoundError naming the path when the
    run has no checkpoint.
    """
    cfg = load_run_config(run_dir)
    found = load_latest_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{Path(run_dir) / 'checkpoints'} holds no valid checkpoint")
    state, _ = found
    field, background = build_field(cfg.field)
    field.load_state_dict(state["field"])
    background.load_state_dict(state["background"])
    # The blob std is a function of the iteration (annealed in stage 3), not checkpointed state.
    field.blob_std = HybridSchedule(cfg.schedule).blob_std(max(state["iteration"] - 1, 0), cfg.field.heads.blob_std)
    field.eval()
    return cfg, field, background, state["iteration"]
