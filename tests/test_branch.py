"""Branching (fourdfy/branch.py): a run that starts from another run's stage checkpoint.

Bad input fails before any work with one line naming what exists; a branch trains only the iterations after its
branch point; a branch with its source's config ends bitwise equal to the source, even when it was interrupted
and its source deleted in between (it resumes from its own directory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.runs import flatten_state

from fourdfy.api import generate
from fourdfy.build import build_field, build_trainer
from fourdfy.checkpoint import checkpoint_path, list_checkpoints, save_checkpoint
from fourdfy.config import RunConfig, compose_run_config
from fourdfy.rundir import RunDir

SMOKE = ["preset=smoke", "trainer.log_every=1"]  # stages 6 / 6 / 8, a checkpoint every 5 iterations, keep 3
STAGE2_END, TOTAL = 12, 20


def _fake_source(run_dir: Path, iterations: tuple[int, ...]) -> RunConfig:
    """A started smoke run holding checkpoints of ``iterations`` (untrained fields)."""
    cfg = compose_run_config(SMOKE)
    RunDir(run_dir).prepare(cfg)
    field, background = build_field(cfg.field)
    for it in iterations:
        save_checkpoint(run_dir / "checkpoints", it, {"iteration": it, "field": field.state_dict(),
                                                      "background": background.state_dict()}, keep=10)
    return cfg


def _branch(source: Path, init_at: str, *more: str) -> RunConfig:
    return compose_run_config([*SMOKE, f"init_from={source}", f"init_at={init_at}", *more])


@pytest.mark.parametrize(("init_at", "more", "pattern"), [
    ("stage2", (), r"init_at=stage2: no checkpoint of iteration 12 \(the end of stage 2 is iteration 12 there, "
                   r"and stage-end checkpoints are never pruned: the source has not reached it\); its checkpoints/ "
                   r"holds iterations \[5, 6, 10\]"),
    ("7", (), r"init_at=7: no checkpoint of iteration 7 \(pruned by trainer.keep_checkpoints=3 or never saved "
              r"\(trainer.checkpoint_every=5\).*holds iterations \[5, 6, 10\]"),
    ("stage1", ("field.heads.hidden_dim=8",), r"a checkpoint loads only into the settings it was saved with, and "
                                               r"this branch changes field.heads.hidden_dim: 32 -> 8"),
    ("stage1", ("schedule.stage_lengths=[4,6,8]",), r"init_at=stage1 is iteration 6 in the source, but this "
                                                     r"branch's stage 1 ends at 4"),
])
def test_a_bad_branch_point_fails_in_one_line_naming_what_exists(tmp_path: Path, init_at: str, more: tuple,
                                                                 pattern: str) -> None:
    source = tmp_path / "source"
    _fake_source(source, (5, 6, 10))
    branch = tmp_path / "branch"
    with pytest.raises((FileNotFoundError, ValueError), match=pattern) as err:
        generate(_branch(source, init_at, *more), branch)
    assert "\n" not in str(err.value) and not branch.exists()


def test_init_from_a_directory_that_is_not_a_run_names_its_contents(tmp_path: Path) -> None:
    (tmp_path / "notarun" / "renders").mkdir(parents=True)
    (tmp_path / "notarun" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"init_from=\S+/notarun is not a fourdfy run directory "
                                                r"\(no config.yaml\); it holds: notes.txt, renders/$") as err:
        generate(_branch(tmp_path / "notarun", "stage2"), tmp_path / "branch")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"init_from=\S+/nowhere: no such directory"):
        generate(_branch(tmp_path / "nowhere", "stage2"), tmp_path / "branch")


def _state(path: Path) -> dict:
    return dict(flatten_state(torch.load(path, map_location="cpu", weights_only=False)))


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys() and any(k.startswith("/field/") for k in sa)
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), f"{key} differs"
        else:
            assert value == sb[key], f"{key}: {value!r} != {sb[key]!r}"


def _logged(run_dir: Path) -> list[tuple[int, int]]:
    return [(r["iteration"], r["stage"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_a_branch_trains_stage_3_only_and_with_the_source_config_ends_like_the_source(tmp_path: Path,
                                                                                       caplog) -> None:
    source = tmp_path / "source"
    generate(compose_run_config(SMOKE), source)
    # Stage ends survive pruning (keep 3: 12, 15, 20 are the newest; 6 is the end of stage 1).
    assert [int(p.name[5:14]) for p in list_checkpoints(source / "checkpoints")] == [6, 12, 15, 20]

    same = tmp_path / "same"
    generate(_branch(source, "stage2"), same)
    assert f"branched {same} from {source} at iteration {STAGE2_END}" in caplog.text
    assert _logged(same) == [(it, 3) for it in range(STAGE2_END, TOTAL)]
    _assert_bitwise_equal(checkpoint_path(same / "checkpoints", TOTAL), checkpoint_path(source / "checkpoints", TOTAL))
    assert (same / "metrics.json").read_text() == (source / "metrics.json").read_text()
    # The branch point is linked, not copied, into the branch: it resumes without its source from here on.
    linked = checkpoint_path(same / "checkpoints", STAGE2_END)
    assert linked.stat().st_ino == checkpoint_path(source / "checkpoints", STAGE2_END).stat().st_ino

    other = tmp_path / "other"
    generate(_branch(source, "stage2", "guidance.synthetic.video.loss_weight=1.0"), other)
    assert _logged(other) == [(it, 3) for it in range(STAGE2_END, TOTAL)]
    a = _state(checkpoint_path(other / "checkpoints", TOTAL))
    b = _state(checkpoint_path(source / "checkpoints", TOTAL))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("/field/"))


@pytest.mark.slow
def test_an_interrupted_branch_resumes_from_its_own_directory_after_its_source_is_gone(tmp_path: Path) -> None:
    source, reference = tmp_path / "source", tmp_path / "reference"
    generate(compose_run_config(SMOKE), source)
    shutil.copytree(source, reference)

    def crash(trainer, iteration):
        if iteration == 16:
            raise KeyboardInterrupt  # as a kill would: after the checkpoint of iteration 15, before 20

    branch = tmp_path / "branch"
    with pytest.raises(KeyboardInterrupt):
        generate(_branch(source, "stage2"), branch, callbacks=[crash])
    shutil.rmtree(source)
    generate(_branch(source, "stage2"), branch)  # the stored config still names the (deleted) source
    _assert_bitwise_equal(checkpoint_path(branch / "checkpoints", TOTAL),
                          checkpoint_path(reference / "checkpoints", TOTAL))
    assert _logged(branch) == [(it, 3) for it in range(STAGE2_END, TOTAL)]


def test_a_branch_carries_the_optimiser_state_but_takes_its_own_optimiser_settings(tmp_path: Path) -> None:
    source = build_trainer(compose_run_config(SMOKE), tmp_path / "a")
    source.step()
    branch = build_trainer(compose_run_config([*SMOKE, "trainer.weight_decay=0.5", "trainer.adam_eps=1e-8"]),
                           tmp_path / "b")
    branch.load_state_dict(source.state_dict())
    assert all((g["weight_decay"], g["eps"]) == (0.5, 1e-8) for g in branch.optimizer.param_groups)
    moments = [s["exp_avg"] for s in source.optimizer.state_dict()["state"].values()]
    assert moments and all(torch.equal(a["exp_avg"], b) for a, b in
                           zip(branch.optimizer.state_dict()["state"].values(), moments, strict=True))
