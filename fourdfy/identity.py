"""Where a run lives: its directory follows from its resolved config, so different configs never share one and
the same config always finds its own (a requeued, relaunched or re-swept job resumes, or is skipped when done).

    <root>/<preset>/<variant>/<prompt>/<tag>/seed<N>        root: outputs/ (conf/config.yaml)

``<tag>`` names the settings in which the run differs from its preset + variant alone, as ``key=value`` items
joined by ``,`` (sorted keys, values as resolved: ``schedule.p_3d=0.3``), ``default`` when there are none. Left
out: what the path names already (PATH_KEYS) and fourdfy.rundir.RESUME_SAFE_KEYS (they never change the
optimisation, so changing them keeps the run). A tag longer than MAX_TAG_CHARS, or holding a string that a folder
name should not (``/``, spaces, ``,``), becomes ``cfg-<hash>``, the hash of that same tag: still one folder per
config. A branch (fourdfy/branch.py) is tagged ``<source>@<point>`` followed by its own differences, e.g.
``default@stage2,guidance.synthetic.video.loss_weight=1.0``: ``<source>`` is the source's tag, read from its
path (``init_from``), prefixed with the source's preset, variant, prompt or seed where they differ from the
branch's; ``<point>`` is ``stage1``, ``stage2`` or ``it<iteration>``.

``run_identity(cfg, base)`` is the rule (pure: the base config is an argument); ``identity_of(cfg)`` composes
the base with Hydra. run.py gets its directory through the ``run_subdir`` resolver (conf/config.yaml) because
Hydra writes ``.hydra/`` and the job log into the directory before the task function runs, and a SLURM job
resolves its sweep subdir inside the job: only a resolver is evaluated by Hydra at that point, in both processes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fourdfy.branch import parse_init_at
from fourdfy.config import RunConfig, compose_run_config, slug
from fourdfy.rundir import config_diff

DEFAULT_TAG = "default"  # the tag of a run with its preset + variant's settings
HASH_TAG_PREFIX = "cfg-"  # a tag too long or too odd for a folder name: cfg-<12 hex digits>
MAX_TAG_CHARS = 120  # well under the 255 bytes a folder name may have
NO_PRESET = "none"  # preset.name when composed without a preset (~preset)
# Keys the path names itself (or, for a branch, the tag's <source>@<point> part): never tag items.
PATH_KEYS = ("preset", "variant", "prompt", "seed", "init_from", "init_at")
_PLAIN = re.compile(r"[A-Za-z0-9._+\-]*")  # a string value that reads unambiguously inside a tag
_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")  # preset and variant names: one plain folder level
_SEED_DIR = re.compile(r"seed(\d+)")


@dataclass(frozen=True)
class RunIdentity:
    """The parts of a run's directory below the root."""

    preset: str  # preset.name
    variant: str  # variant.name
    prompt: str  # the prompt as a folder name (fourdfy.config.slug)
    tag: str  # the settings that differ from preset + variant (module docstring)
    seed: int  # seed

    @property
    def path(self) -> Path:
        """``<preset>/<variant>/<prompt>/<tag>/seed<N>``, relative to the root."""
        return Path(self.preset, self.variant, self.prompt, self.tag, f"seed{self.seed}")

    @classmethod
    def from_path(cls, path: Path) -> RunIdentity | None:
        """The identity a directory's last five levels spell, or None when they are not in the layout."""
        parts = Path(path).parts
        seed = _SEED_DIR.fullmatch(parts[-1]) if len(parts) >= 5 else None
        if seed is None:
            return None
        preset, variant, prompt, tag = parts[-5:-1]
        return cls(preset, variant, prompt, tag, int(seed.group(1)))


def _render(value: Any) -> tuple[str, bool]:
    """(a value as a tag writes it, whether it reads unambiguously there). Lists as ``[a,b]``, YAML words."""
    if isinstance(value, bool):
        return ("true" if value else "false"), True
    if value is None:
        return "null", True
    if isinstance(value, (list, tuple)):
        items = [_render(v) for v in value]
        return "[" + ",".join(text for text, _ in items) + "]", all(ok for _, ok in items)
    if isinstance(value, str):
        return value, bool(value) and _PLAIN.fullmatch(value) is not None
    if isinstance(value, (int, float)):
        return str(value), True
    return str(value), False  # dicts and anything else: hashed


def tag_items(cfg: RunConfig, base: RunConfig) -> dict[str, Any]:
    """Dotted key -> value of every setting the tag names: where ``cfg`` differs from ``base`` (sorted keys)."""
    return {key: new for key, (_, new) in config_diff(base, cfg, ignore=PATH_KEYS).items()}


def _source_label(cfg: RunConfig) -> str:
    """How a branch's tag names its source: the source's tag, prefixed with what else differs (see module)."""
    init_from = str(cfg.init_from)
    source = RunIdentity.from_path(Path(init_from))
    if source is None:  # a source outside the layout: named by where it is
        return "src-" + hashlib.sha256(os.path.abspath(init_from).encode()).hexdigest()[:10]
    mine = (cfg.preset.name, cfg.variant.name, slug(cfg.prompt), f"seed{cfg.seed}")
    theirs = (source.preset, source.variant, source.prompt, f"seed{source.seed}")
    return ".".join([*(t for t, m in zip(theirs, mine, strict=True) if t != m), source.tag])


def run_identity(cfg: RunConfig, base: RunConfig) -> RunIdentity:
    """Where ``cfg`` runs, below the root. ``base``: the config of ``cfg``'s preset and variant alone
    (``base_config``); the tag names how ``cfg`` differs from it. Raises ValueError naming the key for a
    preset or variant name that is not one plain folder name, or a malformed init_from / init_at."""
    for key, name in (("preset.name", cfg.preset.name), ("variant.name", cfg.variant.name)):
        if not _NAME.fullmatch(name):
            raise ValueError(f"{key}={name!r} must be a plain folder name (letters, digits, '.', '_', '-')")
    point = parse_init_at(cfg.init_from, cfg.init_at)
    rendered = {key: _render(value) for key, value in tag_items(cfg, base).items()}
    head = [f"{_source_label(cfg)}@{point.label}"] if point is not None else []
    tag = ",".join(head + [f"{key}={text}" for key, (text, _) in rendered.items()]) or DEFAULT_TAG
    if len(tag) > MAX_TAG_CHARS or not all(plain for _, plain in rendered.values()):
        tag = HASH_TAG_PREFIX + hashlib.sha256(tag.encode()).hexdigest()[:12]
    return RunIdentity(cfg.preset.name, cfg.variant.name, slug(cfg.prompt), tag, cfg.seed)


@functools.lru_cache(maxsize=32)
def base_config(preset: str, variant: str) -> RunConfig:
    """The config of ``preset=<preset> variant=<variant>`` and nothing else (cached: treat it as read-only)."""
    overrides = [f"preset={preset}" if preset != NO_PRESET else "~preset", f"variant={variant}"]
    from hydra.core.global_hydra import GlobalHydra  # Hydra's state: inside run.py, compose with its config tree

    if GlobalHydra.instance().is_initialized():
        from hydra import compose

        return OmegaConf.to_object(compose("config", overrides))
    return compose_run_config(overrides)


def identity_of(cfg: RunConfig) -> RunIdentity:
    """Where ``cfg`` runs, below the root (its base composed from conf/)."""
    return run_identity(cfg, base_config(cfg.preset.name, cfg.variant.name))


def _run_subdir(*, _root_: DictConfig) -> str:
    """The ``run_subdir`` resolver: the identity path of the config being composed (the hydra node left out)."""
    task = OmegaConf.masked_copy(_root_, [key for key in _root_ if key != "hydra"])
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.to_container(task, resolve=True))
    return identity_of(OmegaConf.to_object(merged)).path.as_posix()


def register_run_subdir_resolver() -> None:
    """Register ``${run_subdir:}`` (conf/config.yaml's hydra.run.dir and hydra.sweep.subdir). Idempotent."""
    if not OmegaConf.has_resolver("run_subdir"):
        OmegaConf.register_new_resolver("run_subdir", _run_subdir)
