"""The one place a run is assembled from its config: field, priors, trainer; and a field rebuilt from a run.

``run.py`` (through ``fourdfy.api.generate``), the exports, ``eval/``, the benches and the tests all call these
functions; nothing else constructs a Trainer or picks encodings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fourdfy.checkpoint import load_latest_checkpoint
from fourdfy.clock import Clock, Scheduled
from fourdfy.config import GuidanceBackend, RunConfig, load_run_config
from fourdfy.fields.background import BackgroundMLP
from fourdfy.fields.deformation import Deformation, ProgressiveLevels
from fourdfy.fields.dense import DenseGridEncoding3D, DenseGridEncoding4D
from fourdfy.fields.field4d import DynamicKind, Field4D, FieldConfig, FieldKind
from fourdfy.fields.hashgrid import HashGridConfig, HashGridEncoding
from fourdfy.fields.hexplane import TimePlaneEncoding, TriPlaneEncoding
from fourdfy.guidance.base import Guidance
from fourdfy.hybrid import HybridSchedule
from fourdfy.kinds import UpdateKind
from fourdfy.render.volume import Renderer
from fourdfy.rundir import RunDir
from fourdfy.sampling import StepSampler
from fourdfy.trainer import Callback, Trainer


def _hash_grid(cfg: HashGridConfig, n_dims: int) -> HashGridEncoding:
    chunk = {} if cfg.chunk_size is None else {"chunk_size": cfg.chunk_size}
    return HashGridEncoding(n_dims, cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size,
                            cfg.base_resolution, cfg.per_level_scale, backend=cfg.backend, **chunk)


def build_field(cfg: FieldConfig, blob_std: Scheduled | None = None) -> tuple[Field4D, BackgroundMLP]:
    """The 4D field of ``cfg.kind`` and its background. Encodings are chosen in this one place.

    blob_std: the density blob's std scheduled on a run's clock (see build_trainer); None holds
    ``cfg.heads.blob_std`` (fields used outside training). With ``cfg.dynamic = deformation`` its clock also
    drives the deformation's progressive levels (stage-3 steps); None: every level active.
    """
    cfg.validate()
    if DynamicKind(cfg.dynamic) is DynamicKind.deformation:
        return _deformation_field(cfg, blob_std), BackgroundMLP(cfg.background)
    encodings: dict[FieldKind, Callable[[], tuple[nn.Module, nn.Module]]] = {
        FieldKind.hashgrid: lambda: (_hash_grid(cfg.static_grid, 3), _hash_grid(cfg.dynamic_grid, 4)),
        FieldKind.hexplane: lambda: (TriPlaneEncoding(cfg.hexplane), TimePlaneEncoding(cfg.hexplane)),
        FieldKind.dense: lambda: (
            DenseGridEncoding3D(cfg.dense.resolutions, cfg.dense.n_features, cfg.dense.init_scale),
            DenseGridEncoding4D(cfg.dense.dynamic_resolutions, cfg.dense.n_features, cfg.dense.time_resolution,
                                cfg.dense.init_scale),
        ),
    }
    static, dynamic = encodings[FieldKind(cfg.kind)]()
    field = Field4D(static, dynamic, cfg.heads, box_radius=cfg.box_radius, checkpoint_chunk=cfg.checkpoint_chunk,
                    blob_std=blob_std)
    return field, BackgroundMLP(cfg.background)


def _deformation_field(cfg: FieldConfig, blob_std: Scheduled | None) -> Field4D:
    """f(x, t) = f_static(x + Δ(x, t)): the static grid of ``cfg.kind`` and the deformation network (a 4D hash
    grid, or on the dense CPU path a dense 4D grid, then an MLP). FieldConfig.validate refuses kind=hexplane."""
    d = cfg.deformation
    if FieldKind(cfg.kind) is FieldKind.dense:
        static: nn.Module = DenseGridEncoding3D(cfg.dense.resolutions, cfg.dense.n_features, cfg.dense.init_scale)
        encoding: nn.Module = DenseGridEncoding4D(d.dense_resolutions, d.grid.n_features_per_level,
                                                  d.dense_time_resolution, cfg.dense.init_scale)
        n_levels = len(d.dense_resolutions)
    else:
        static, encoding, n_levels = _hash_grid(cfg.static_grid, 3), _hash_grid(d.grid, 4), d.grid.n_levels
    levels = None if blob_std is None else ProgressiveLevels(blob_std.clock, d.start_level, n_levels,
                                                             d.update_steps, d.start_step)
    deformation = Deformation(encoding, n_levels, d.hidden_dim, d.n_hidden_layers, levels=levels)
    return Field4D(static, None, cfg.heads, box_radius=cfg.box_radius, checkpoint_chunk=cfg.checkpoint_chunk,
                   blob_std=blob_std, deformation=deformation)


def build_guidances(cfg: RunConfig) -> dict[UpdateKind, Guidance]:
    """The priors the schedule will call, keyed by update kind."""
    if GuidanceBackend(cfg.guidance.backend) is GuidanceBackend.synthetic:
        from fourdfy.synthetic.priors import build_synthetic_priors

        return build_synthetic_priors(cfg.guidance.synthetic, cfg.prompt, seed=cfg.seed)
    # Local import: the real priors pull in diffusers/transformers/peft (~12 s of CPU), which only this
    # backend needs, so building a toy run stays light.
    from fourdfy.guidance.real import build_real_guidances

    return build_real_guidances(cfg)


def build_trainer(
    cfg: RunConfig,
    run_dir: Path,
    guidances: dict[UpdateKind, Guidance] | None = None,
    callbacks: list[Callback] | None = None,
) -> Trainer:
    """Everything a run trains with, from its config; writes nothing to ``run_dir``.

    guidances: priors to use instead of building them from ``cfg.guidance`` (tests and the GPU bench pass
    tiny or random-weight ones). The global torch seed is set to ``cfg.seed`` before the field is initialised.
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    schedule = HybridSchedule(cfg.schedule)
    clock = Clock(schedule.stages)
    blob_std = Scheduled(schedule.blob_std_schedule(cfg.field.heads.blob_std), clock)
    field, background = build_field(cfg.field, blob_std=blob_std)
    field.to(cfg.device)
    background.to(cfg.device)
    if guidances is None:
        guidances = build_guidances(cfg)
    sampler = StepSampler(cfg.cameras, cfg.trainer.n_frames, cfg.field.background.random_color_prob)
    return Trainer(cfg.trainer, field, background, Renderer(cfg.renderer), guidances, schedule, sampler, clock,
                   cfg.prompt, RunDir(run_dir), seed=cfg.seed, callbacks=callbacks)


def load_run(run_dir: Path) -> tuple[RunConfig, Field4D, BackgroundMLP, int]:
    """Rebuild a run's field and background from its config and newest valid checkpoint, in eval mode.

    Returns (config, field, background, iteration). The field's blob std is the one of the last iteration run.
    Raises FileNotFoundError naming the path when the run has no config or no checkpoint.
    """
    cfg = load_run_config(run_dir)
    run = RunDir(run_dir)
    found = load_latest_checkpoint(run.checkpoints)
    if found is None:
        raise FileNotFoundError(f"{run.checkpoints} holds no valid checkpoint")
    state, _ = found
    schedule = HybridSchedule(cfg.schedule)
    clock = Clock(schedule.stages, max(state["iteration"] - 1, 0))
    field, background = build_field(cfg.field, Scheduled(schedule.blob_std_schedule(cfg.field.heads.blob_std), clock))
    field.load_state_dict(state["field"])
    background.load_state_dict(state["background"])
    field.eval()
    return cfg, field, background, state["iteration"]
