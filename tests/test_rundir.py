"""The run directory (fourdfy/rundir.py) and the one atomic-write helper (fourdfy/atomic.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from fourdfy.atomic import atomic_path, stale_temporaries, temporary_path, write_json_atomic, write_text_atomic
from fourdfy.config import compose_run_config, load_run_config
from fourdfy.fields.field4d import FieldKind
from fourdfy.rundir import RunDir, config_fingerprint

# Fingerprints of the presets, pinned so that no change of the code alters them by accident: a changed fingerprint
# makes every run started before it refuse to resume. They last changed on purpose with issue #15 (the authors'
# per-stage clocks: stage-local loss weights and t ranges, a fresh optimiser per stage, SH degree 3, MVDream fp32,
# the authors' marching in preset=paper), whose runs differ from the ones before; the ones before it were those of
# commit edbbb8e (21adbc8307144734, 8ede983390398d81, 0996970cc0d196b9, 43c6ff1071170958), kept through #17's enums.
FINGERPRINTS_BEFORE = {
    ("preset=smoke",): "08d89ef7c392db00",
    ("preset=demo_cpu",): "7a30697571fb1bbc",
    ("preset=paper",): "9c9eb6dfe2d356bf",
    ("preset=demo_cpu", "variant=hexplane"): "f792a7801b636135",
}


@pytest.mark.parametrize("overrides", sorted(FINGERPRINTS_BEFORE))
def test_fingerprints_of_the_presets_are_pinned(overrides: tuple[str, ...]) -> None:
    assert config_fingerprint(compose_run_config(list(overrides))) == FINGERPRINTS_BEFORE[overrides]


@pytest.mark.parametrize(("override", "choices"), [
    ("field.kind=hashgird", "hashgrid, hexplane, dense"),
    ("guidance.backend=toy", "synthetic, real"),
    ("field.static_grid.backend=cuda", "torch, tcnn"),
    ("logger.kind=tensorboard", "none, wandb"),
    ("guidance.synthetic.video.weighting=x0", "recon, sds"),
])
def test_a_misspelt_choice_fails_at_compose_time_listing_the_choices(override: str, choices: str) -> None:
    with pytest.raises(ConfigCompositionException, match=re.escape(override)) as err:
        compose_run_config(["preset=smoke", override])
    assert isinstance(err.value.__cause__, ValidationError) and choices in str(err.value.__cause__)


def test_a_misspelt_choice_assigned_in_code_fails_too() -> None:
    with pytest.raises(ValidationError, match="recon, sds"):
        OmegaConf.structured(compose_run_config(["preset=smoke"])).guidance.synthetic.video.weighting = "x0"


def test_saved_config_round_trips_with_plain_values(tmp_path: Path) -> None:
    cfg = compose_run_config(["preset=smoke", "variant=hexplane"])
    RunDir(tmp_path).prepare(cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert "kind: hexplane" in text and "backend: synthetic" in text  # the values, as before the enums
    again = load_run_config(tmp_path)
    assert again == cfg and again.field.kind is FieldKind.hexplane
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == {"fingerprint": config_fingerprint(cfg)}


def test_truncate_log_keeps_rows_before_the_iteration_and_drops_torn_ones(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rows = [json.dumps({"iteration": i, "loss": float(i)}) for i in range(6)]
    run.log.write_text("\n".join(rows[:5]) + "\n" + rows[5][:7])  # the last row torn by a kill
    run.truncate_log(3)
    assert run.log.read_text() == "".join(r + "\n" for r in rows[:3])


def test_finish_writes_metrics_then_done(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert not run.is_finished() and run.read_metrics() == {}
    run.finish({"psnr": 20.5})
    assert run.is_finished() and run.read_metrics() == {"psnr": 20.5}


def test_atomic_path_replaces_on_success_and_leaves_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".csv" and tmp.name.startswith(".")
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["table.csv"]
    with pytest.raises(RuntimeError, match="produced no file"), atomic_path(target):
        pass
    write_json_atomic(target, {"b": 1, "a": 2}, durable=True)
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}'


def test_stale_temporaries_are_other_processes_only(tmp_path: Path) -> None:
    mine = temporary_path(tmp_path / "ckpt_000000005.pt")
    mine.write_text("mine")
    # A pid that is a prefix of ours, and one that extends ours, are other processes' files.
    pid = os.getpid()
    others = [tmp_path / f".ckpt_000000005.tmp-{pid}0.pt", tmp_path / f".ckpt_000000005.tmp-{str(pid)[:-1]}.pt"]
    for path in others:
        path.write_text("stale")
    (tmp_path / "ckpt_000000005.pt").write_text("kept")
    assert sorted(stale_temporaries(tmp_path, "ckpt_*")) == sorted(others)


def test_a_killed_writer_leaves_the_target_intact(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"psnr": 1.0})
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from fourdfy.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_text('{{"psnr": 2')
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=60, check=False).returncode == -9
    assert json.loads(target.read_text()) == {"psnr": 1.0}
    assert len(stale_temporaries(tmp_path, "metrics*")) == 1  # what the killed process left, for cleaning
