"""Run identity (fourdfy/identity.py): one directory per configuration, found again by the same configuration.

The rule is tested without Hydra first (configs built as dataclasses, the base passed in), then as run.py
composes: presets, variants, sweeps, branches and the ``run_subdir`` resolver of conf/config.yaml.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fourdfy.config import RunConfig, compose_config, compose_run_config
from fourdfy.identity import (
    DEFAULT_TAG,
    MAX_TAG_CHARS,
    RunIdentity,
    identity_of,
    register_run_subdir_resolver,
    run_identity,
)

BALL = "a_red_ball_bouncing_on_a_blue_box"


def _cfg(**changes) -> RunConfig:
    """The schema's defaults under preset "demo" with dotted-key changes (no Hydra involved)."""
    cfg = RunConfig()
    cfg.preset.name = "demo"
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return cfg


BASE = _cfg()


# ----------------------------------------------------------------------------------------------
# The rule, without Hydra


def test_a_config_at_its_base_is_default_and_the_path_names_preset_variant_prompt_seed() -> None:
    who = run_identity(_cfg(), BASE)
    assert who.path == Path("demo", "full", BALL, DEFAULT_TAG, "seed0")
    assert RunIdentity.from_path(Path("/x/outputs") / who.path) == who
    assert RunIdentity.from_path(Path("a/b/seed0")) is None


def test_the_tag_names_each_differing_key_sorted_and_leaves_out_path_and_resume_safe_keys() -> None:
    cfg = _cfg(schedule__p_3d=0.3, trainer__lambda_sparsity=2.0, schedule__stage_lengths=[1, 2, 3],
               seed=4, prompt="a yellow cube spinning", device="cuda", trainer__log_every=1, eval__size=64,
               field__checkpoint_chunk=1024, logger__group="g")
    who = run_identity(cfg, BASE)
    assert who.tag == "schedule.p_3d=0.3,schedule.stage_lengths=[1,2,3],trainer.lambda_sparsity=2.0"
    assert (who.prompt, who.seed) == ("a_yellow_cube_spinning", 4)
    # Resume-safe keys alone keep the directory: a run may resume with them changed.
    assert run_identity(_cfg(device="cuda", trainer__log_every=1), BASE).tag == DEFAULT_TAG


def test_equal_configs_share_a_directory_and_different_ones_never_do() -> None:
    assert run_identity(_cfg(schedule__p_3d=0.3), BASE) == run_identity(_cfg(schedule__p_3d=0.3), BASE)
    paths = {run_identity(_cfg(schedule__p_3d=p), BASE).path for p in (0.3, 0.5, 0.7)}
    assert len(paths) == 3  # 0.5 is the base value: `default`
    assert run_identity(_cfg(schedule__p_3d=0.5), BASE).tag == DEFAULT_TAG


def test_long_or_odd_tags_become_a_hash_of_the_same_differences() -> None:
    long = {f"trainer__{k}": v for k, v in (("lambda_sparsity", 1.5), ("lambda_opacity_entropy", 7.0),
                                             ("weight_decay", 0.5), ("adam_eps", 1e-8), ("checkpoint_every", 7))}
    a, b = run_identity(_cfg(**long), BASE), run_identity(_cfg(**{**long, "trainer__weight_decay": 0.25}), BASE)
    assert re.fullmatch(r"cfg-[0-9a-f]{12}", a.tag) and a.tag != b.tag
    assert run_identity(_cfg(**long), BASE) == a  # deterministic
    odd = run_identity(_cfg(guidance__mvdream__checkpoint="/models/mv dream"), BASE)
    assert odd.tag.startswith("cfg-")  # a path or a space never reaches a folder name
    assert len(run_identity(_cfg(schedule__p_3d=0.25), BASE).tag) <= MAX_TAG_CHARS


def test_a_branch_is_tagged_by_its_source_and_point_then_its_own_differences() -> None:
    source = f"/runs/outputs/demo/full/{BALL}/schedule.p_3d=0.3/seed0"
    same = run_identity(_cfg(init_from=source, init_at="stage2"), BASE)
    assert same.tag == "schedule.p_3d=0.3@stage2"
    swept = run_identity(_cfg(init_from=source, init_at="stage2", guidance__synthetic__video__loss_weight=0.1), BASE)
    assert swept.tag == "schedule.p_3d=0.3@stage2,guidance.synthetic.video.loss_weight=0.1"
    # The source's own identity parts appear where they differ from the branch's.
    assert run_identity(_cfg(init_from=source, init_at="700", seed=1), BASE).tag == "seed0.schedule.p_3d=0.3@it700"
    outside = run_identity(_cfg(init_from="/somewhere/else", init_at="stage1"), BASE).tag
    assert re.fullmatch(r"src-[0-9a-f]{10}@stage1", outside)


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"init_at": "stage2"}, r"init_at=stage2 needs init_from=<run directory>"),
    ({"init_from": "/r"}, r"init_from=/r needs init_at=stage1, stage2"),
    ({"init_from": "/r", "init_at": "stage3"}, r"init_at='stage3': expected stage1, stage2"),
    ({"variant__name": "../up"}, r"variant.name='../up' must be a plain folder name"),
])
def test_malformed_identity_keys_are_refused_naming_the_key(changes: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        run_identity(_cfg(**changes), BASE)


# ----------------------------------------------------------------------------------------------
# As run.py composes


def test_presets_and_the_issue_s_examples_get_their_own_directories() -> None:
    smoke, demo = identity_of(compose_run_config(["preset=smoke"])), identity_of(compose_run_config([]))
    assert smoke.path == Path("smoke", "full", BALL, "default", "seed0")
    assert demo.path == Path("demo_cpu", "full", BALL, "default", "seed0") != smoke.path
    new = identity_of(compose_run_config(["schedule.p_3d=0.1", "guidance.synthetic.video.loss_weight=1.0"]))
    assert new.tag == "guidance.synthetic.video.loss_weight=1.0,schedule.p_3d=0.1"
    # A variant's own settings are part of its base: its rows stay `default`.
    assert identity_of(compose_run_config(["variant=no_3d"])).tag == DEFAULT_TAG


def test_a_sweep_sends_each_job_to_its_own_directory() -> None:
    parser = OverridesParser.create()
    jobs = BasicSweeper.split_arguments(parser.parse_overrides(["preset=smoke", "schedule.p_3d=0.3,0.5,0.7"]),
                                        None)[0]
    paths = [identity_of(compose_run_config(list(job))).path for job in jobs]
    assert len(set(paths)) == 3 and [p.parts[3] for p in paths] == ["schedule.p_3d=0.3", "default",
                                                                     "schedule.p_3d=0.7"]


def test_hydra_run_and_sweep_directories_come_from_the_resolver() -> None:
    register_run_subdir_resolver()
    cfg = compose_config(["preset=smoke", "schedule.p_3d=0.3", "seed=2"], with_hydra=True)
    expected = identity_of(compose_run_config(["preset=smoke", "schedule.p_3d=0.3", "seed=2"])).path.as_posix()
    assert OmegaConf.select(cfg, "hydra.run.dir") == f"outputs/{expected}"
    assert OmegaConf.select(cfg, "hydra.sweep.dir") == "outputs"  # stable: a relaunched sweep finds its runs
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == expected


def test_the_base_of_a_config_is_not_changed_by_computing_identities() -> None:
    cfg = compose_run_config(["preset=smoke", "schedule.p_3d=0.3"])
    before = copy.deepcopy(cfg)
    identity_of(cfg)
    identity_of(cfg)
    assert cfg == before and identity_of(compose_run_config(["preset=smoke"])).tag == DEFAULT_TAG
