"""The experiment harness around run.py: compose-time errors, prompt sets, the Table-2 sweep definition, the
SLURM launcher config, out-of-range values, and what a relaunch does to a finished or incompatible run.

Fast tests compose configs in-process with Hydra's compose API (what run.py does before calling
fourdfy.api.generate); the run.py end-to-end checks start the real entry point and are marked slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from ablations.table2 import ROWS, VARIANTS, sweep_overrides
from fourdfy.api import generate
from fourdfy.build import build_field
from fourdfy.checkpoint import save_checkpoint
from fourdfy.config import RunConfig, compose_config
from fourdfy.rundir import NEUTRAL_NEW_KEYS, RunDir, config_fingerprint
from fourdfy.synthetic.scenes import SCENES

REPO = Path(__file__).resolve().parents[1]
PROMPTS_FOUND = Path(__file__).resolve().parents[2] / "shared" / "prompts_found.md"


def compose_cfg(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    return compose_config(overrides, with_hydra=hydra_node)


def sweep_prompts(prompt_set: str) -> list[str]:
    """The prompts a `-m prompts=<set>` sweep runs, expanded by Hydra's own sweeper code."""
    params = compose_cfg([f"prompts={prompt_set}"], hydra_node=True).hydra.sweeper.params
    parser = OverridesParser.create()
    jobs = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]), None)[0]
    return [parser.parse_override(job[0]).value() for job in jobs]


def _code_block_after(text: str, marker: str) -> list[str]:
    """Lines of the first ``` block after the line containing ``marker``."""
    start = text.index(marker)
    block = re.search(r"```\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no code block after {marker!r}"
    return [line for line in block.group(1).splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Compose-time errors


@pytest.mark.parametrize(("override", "error", "pattern"), [
    ("variant=no_such_variant", MissingConfigException, r"variant/no_such_variant.*no_image_guidance"),
    ("prompts=no_such_set", MissingConfigException, r"prompts/no_such_set.*ablation5"),
    ("schedule.p3d=0.5", ConfigCompositionException, r"schedule\.p3d"),
    ("seed=abc", ConfigCompositionException, r"seed"),
    ("field.kind=foo", ConfigCompositionException, r"field\.kind=foo"),  # choices are enums
    ("guidance.backend=foo", ConfigCompositionException, r"guidance\.backend=foo"),
])
def test_unknown_names_fail_at_compose_time(override: str, error: type, pattern: str) -> None:
    with pytest.raises(error, match=re.compile(pattern, re.S)):
        compose_cfg([override])


@pytest.mark.parametrize(("override", "key"), [
    ("schedule.p_3d=1.5", "schedule.p_3d"),
    ("schedule.p_img=-0.1", "schedule.p_img"),
    ("schedule.stage_lengths=[1,2]", "schedule.stage_lengths"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every"),
    ("trainer.static_prior_time=2.0", "trainer.static_prior_time"),
    ("cameras.fovy_range=[10,200]", "fovy_range"),
    ("renderer.n_samples=0", "n_samples"),
    ("eval.size=0", "eval.size"),
    ("field.heads.hidden_dim=0", "field.heads.hidden_dim"),
])
def test_out_of_range_values_fail_before_any_work_naming_the_key(override: str, key: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(key)):
        # run.py's two steps: the typed config, then generate (RunConfig.validate() before any work).
        generate(OmegaConf.to_object(compose_cfg(["preset=smoke", override])), run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(p.name for p in run_dir.iterdir())


# ----------------------------------------------------------------------------------------------
# Prompt sets and the Table-2 sweep


def test_mav3d28_is_the_normalised_list_of_prompts_found() -> None:
    prompts = sweep_prompts("mav3d28")
    assert len(prompts) == 28 == len(set(prompts))
    if not PROMPTS_FOUND.is_file():
        pytest.skip(f"{PROMPTS_FOUND} is absent: cannot compare with the source list")
    assert prompts == _code_block_after(PROMPTS_FOUND.read_text(), "### 1c.")


def test_ablation5_is_the_project_page_spelling_and_a_subset_of_mav3d28() -> None:
    prompts = sweep_prompts("ablation5")
    assert len(prompts) == 5 and set(prompts) <= set(sweep_prompts("mav3d28"))
    if not PROMPTS_FOUND.is_file():
        pytest.skip(f"{PROMPTS_FOUND} is absent: cannot compare with the source list")
    assert prompts == _code_block_after(PROMPTS_FOUND.read_text(), "Spelling on the project page")


def test_toy_prompt_sets_name_toy_scenes() -> None:
    toy = {s.prompt for s in SCENES}
    assert len(sweep_prompts("toy2")) == 2 and set(sweep_prompts("toy2")) <= toy
    assert set(sweep_prompts("toy")) <= toy


def test_table2_sweep_is_every_variant_times_every_prompt() -> None:
    overrides = sweep_overrides()
    assert overrides[:3] == ["-m", "variant=full,no_image_guidance,no_3d,no_vsd,no_hybrid,hexplane",
                             "prompts=ablation5"]
    parser = OverridesParser.create()
    params = compose_cfg(overrides[2:], hydra_node=True).hydra.sweeper.params
    args = [f"{k}={v}" for k, v in params.items()] + overrides[1:]
    jobs = BasicSweeper.split_arguments(parser.parse_overrides(args), None)[0]
    pairs = []
    for job in jobs:
        values = {o.key_or_group: o.value() for o in parser.parse_overrides(job)}
        pairs.append((values["variant"], values["prompt"]))
    assert len(pairs) == 30 == len(set(pairs))  # 6 variants × 5 prompts, each once
    assert {v for v, _ in pairs} == set(VARIANTS) and {p for _, p in pairs} == set(sweep_prompts("ablation5"))


@pytest.mark.parametrize("row", ROWS, ids=[r.variant for r in ROWS])
def test_every_table2_row_is_a_variant_config_with_its_name(row) -> None:
    assert (REPO / "conf" / "variant" / f"{row.variant}.yaml").is_file()
    cfg = compose_cfg([f"variant={row.variant}"])
    assert cfg.variant.name == row.variant
    expected = {  # what each row changes (paper §4.3): P_3D, P_IMG, stage-3 video only, skip stages 1-2
        "full": (0.5, 0.5, False, False),
        "no_image_guidance": (0.0, 0.0, False, True),
        "no_3d": (0.0, 0.5, False, False),
        "no_vsd": (0.5, 0.0, False, False),
        "no_hybrid": (0.5, 0.5, True, False),
        "hexplane": (0.5, 0.5, False, False),
    }[row.variant]
    s = cfg.schedule
    assert (s.p_3d, s.p_img, s.stage3_video_only, s.skip_stages_1_2) == expected
    # Only the HexPlane row changes the representation; the others keep the preset's field.
    full_kind = compose_cfg(["variant=full"]).field.kind
    assert cfg.field.kind == ("hexplane" if row.variant == "hexplane" else full_kind) and full_kind != "hexplane"


def test_slurm_launcher_config_exposes_the_queue_settings() -> None:
    launcher = compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                            "hydra.launcher.gpus_per_node=1"], hydra_node=True).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node) == ("gpu", 1)
    for key in ("timeout_min", "mem_gb", "cpus_per_task", "array_parallelism", "signal_delay_s"):
        assert isinstance(launcher[key], int) and launcher[key] > 0, key
    assert launcher.max_num_timeout >= 1  # 0 would give up at the first time limit instead of requeueing
    with pytest.raises(ConfigCompositionException, match="partitionn"):
        compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partitionn=gpu"], hydra_node=True)


# ----------------------------------------------------------------------------------------------
# Relaunching a run: finished -> nothing to do; another config -> refused


def _fake_started_run(run_dir: Path, cfg: RunConfig) -> Path:
    RunDir(run_dir).prepare(cfg)
    field, background = build_field(cfg.field)
    return save_checkpoint(run_dir / "checkpoints", 5, {"iteration": 5, "field": field.state_dict(),
                                                        "background": background.state_dict()})


def test_generate_refuses_to_resume_a_run_of_another_config(tmp_path: Path) -> None:
    cfg = OmegaConf.to_object(compose_cfg(["preset=smoke"]))
    ckpt = _fake_started_run(tmp_path / "run", cfg)
    before = ckpt.read_bytes()
    other = OmegaConf.to_object(compose_cfg(["preset=smoke", "schedule.p_3d=0.25"]))
    assert config_fingerprint(other) != config_fingerprint(cfg)
    with pytest.raises(ValueError, match="holds a run of a different config"):
        generate(other, tmp_path / "run")
    assert ckpt.read_bytes() == before and sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) \
        == [ckpt.name, ckpt.name + ".sha256"]


def test_a_key_added_later_leaves_the_fingerprint_at_its_neutral_value() -> None:
    """Runs started before guidance.synthetic.video.clip_azimuths_deg (or init_from, init_at) existed must still
    resume: at its neutral value (None) the fingerprint is the one computed without the key; any other value
    changes it. preset.name, a label, is resume-safe (the directory names it instead)."""
    cfg = OmegaConf.to_object(compose_cfg(["preset=smoke"]))
    data = dataclasses.asdict(cfg)
    for key in ("logger", "eval", "device", "preset"):
        data.pop(key)
    for section, key in (("trainer", "progress_bar"), ("trainer", "log_every"), ("field", "checkpoint_chunk")):
        data[section].pop(key)
    for grid in ("static_grid", "dynamic_grid"):  # resume-safe too (RESUME_SAFE_KEYS)
        data["field"][grid].pop("chunk_size")
    at_neutral = 0
    for dotted, neutral in NEUTRAL_NEW_KEYS.items():  # every key added later that preset=smoke leaves neutral
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        if node[leaf] == neutral:
            del node[leaf]
            at_neutral += 1
    assert at_neutral >= 5  # clip_azimuths_deg, init_from, init_at, video_prior, ... (the test has teeth)
    before_the_key = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config_fingerprint(cfg) == before_the_key
    for override in ("guidance.synthetic.video.clip_azimuths_deg=[0,30]", "init_from=/runs/x", "init_at=stage2"):
        assert config_fingerprint(OmegaConf.to_object(compose_cfg(["preset=smoke", override]))) != before_the_key


def _run_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
def test_run_py_relaunch_of_finished_and_incompatible_runs(tmp_path: Path) -> None:
    # A finished run (DONE written last): relaunching does nothing and says so.
    finished = tmp_path / "finished"
    cfg = OmegaConf.to_object(compose_cfg(["preset=smoke"]))
    ckpt = _fake_started_run(finished, cfg)
    (finished / "metrics.json").write_text('{"psnr": 20.5}')
    (finished / "DONE").write_text("finished\n")
    stamp = ckpt.stat().st_mtime_ns
    proc = _run_py(["preset=smoke", f"hydra.run.dir={finished}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "already finished (DONE exists); nothing to do" in proc.stdout
    assert ckpt.stat().st_mtime_ns == stamp and len(list((finished / "checkpoints").glob("*.pt"))) == 1

    # A started run of another config: refused before touching it, with the reason.
    other = tmp_path / "other"
    _fake_started_run(other, OmegaConf.to_object(compose_cfg(["preset=smoke", "seed=7"])))
    proc = _run_py(["preset=smoke", f"hydra.run.dir={other}"], tmp_path)
    assert proc.returncode != 0
    assert "holds a run of a different config (not finished)" in proc.stderr
    assert "\n  seed: 7 -> 0\n" in proc.stderr  # each differing key, stored -> requested
    assert len(list((other / "checkpoints").glob("*.pt"))) == 1

    # An out-of-range value: the error names the key, no run state is written.
    bad = tmp_path / "bad"
    proc = _run_py(["preset=smoke", "schedule.p_3d=1.5", f"hydra.run.dir={bad}"], tmp_path)
    assert proc.returncode != 0 and "schedule.p_3d must be a probability in [0, 1], got 1.5" in proc.stderr
    assert not (bad / "config.yaml").exists() and not (bad / "checkpoints").exists()
