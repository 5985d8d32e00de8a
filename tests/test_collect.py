"""ablations/collect.py on a hand-built sweep: statuses, metric means, caching, user study, files, errors.

The sweep below is what a Table-2 sweep leaves after trouble: 3 variants × 2 prompts, of which two runs
finished, one died after writing metrics.json but before DONE, one failed at start (submitit recorded
the error) and two never started. Checkpoints hold random (untrained) fields: the metrics only need to be
computable, and their expected values are computed here independently of collect.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import shutil
from functools import cache
from pathlib import Path

import imageio.v3 as iio
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare
from scipy.stats import t as t_dist

from ablations import collect
from ablations.table2 import ROWS
from eval.gt_metrics import run_metrics
from fourdfy.build import build_field
from fourdfy.checkpoint import save_checkpoint
from fourdfy.config import RunConfig, compose_run_config
from fourdfy.export.video import write_video
from fourdfy.identity import identity_of
from fourdfy.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
BALL, CUBE = "a red ball bouncing on a blue box", "a yellow cube spinning"
FAIL_MESSAGE = "ValueError: schedule.p_3d must be a probability in [0, 1], got 1.5"

MULTIRUN_YAML = f"""\
hydra:
  sweeper:
    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper
    max_batch_size: null
    params:
      prompt: '"{BALL}","{CUBE}"'
  overrides:
    task:
    - variant=full,no_3d,no_vsd
    - preset=smoke
variant:
  name: full
prompt: {BALL}
seed: 0
"""


@cache
def _composed(variant: str, prompt: str) -> RunConfig:
    return compose_run_config(["preset=smoke", f"variant={variant}", f"prompt={prompt}"])


def run_config(variant: str, prompt: str) -> RunConfig:
    return copy.deepcopy(_composed(variant, prompt))


def run_dir_of(root: Path, variant: str, prompt: str) -> Path:
    """Where run.py puts the smoke run of (variant, prompt) below ``root``."""
    return root / identity_of(run_config(variant, prompt)).path


def make_run(root: Path, variant: str, prompt: str, finished: bool, seed: int = 0) -> Path:
    run_dir = run_dir_of(root, variant, prompt)
    cfg = run_config(variant, prompt)
    RunDir(run_dir).prepare(cfg)
    torch.manual_seed(seed)
    field, background = build_field(cfg.field)
    save_checkpoint(run_dir / "checkpoints", 20, {"iteration": 20, "field": field.state_dict(),
                                                  "background": background.state_dict()})
    # What generate writes before DONE: its own metrics. A run that died here is not finished.
    (run_dir / "metrics.json").write_text(json.dumps({"psnr": 1.0, "skipped_steps": 0}))
    if finished:
        (run_dir / "DONE").write_text("finished\n")
    return run_dir


def make_failed_job(root: Path, variant: str, prompt: str, job_id: str) -> Path:
    """A Hydra job that failed before training: .hydra/ only, and submitit's error pickle."""
    run_dir = run_dir_of(root, variant, prompt)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(run_config(variant, prompt)), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"id": job_id, "num": 3}}}), run_dir / ".hydra" / "hydra.yaml")
    folder = root / ".submitit" / job_id
    folder.mkdir(parents=True)
    with open(folder / f"{job_id}_0_result.pkl", "wb") as f:
        pickle.dump(("error", f"Traceback (most recent call last):\n  ...\n{FAIL_MESSAGE}\n"), f)
    return run_dir


@pytest.fixture(scope="module")
def base_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("base") / "2026-01-01_00-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text(MULTIRUN_YAML)
    make_run(root, "full", BALL, finished=True, seed=1)
    make_run(root, "full", CUBE, finished=True, seed=2)
    make_run(root, "no_3d", BALL, finished=False, seed=3)
    make_failed_job(root, "no_3d", CUBE, "7_3")
    return root  # no_vsd: both jobs never started


@pytest.fixture
def sweep(base_sweep: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (collect writes into it)."""
    return Path(shutil.copytree(base_sweep, tmp_path / "multirun" / base_sweep.name))


def _row(table: pd.DataFrame, variant: str) -> pd.Series:
    return table.set_index("variant").loc[variant]


def test_statuses_means_and_cached_metrics(sweep: Path, tmp_path: Path) -> None:
    result = collect.collect(sweep, collect.CollectOptions(out_dir=tmp_path / "out"))
    table = result.table
    assert list(table["variant"]) == ["full", "no_3d", "no_vsd"]  # Table 2's order, every variant kept

    full = _row(table, "full")
    assert (full["expected"], full["finished"], full["failed"], full["missing"]) == (2, 2, 0, 0)
    direct = [run_metrics(run_dir_of(sweep, "full", p)) for p in (BALL, CUBE)]
    for key in ("psnr", "ssim", "depth_error", "motion_error", "gt_error"):
        assert full[key] == pytest.approx((direct[0][key] + direct[1][key]) / 2, rel=1e-9)

    no_3d = _row(table, "no_3d")
    assert (no_3d["finished"], no_3d["failed"], no_3d["unfinished"]) == (0, 1, 1)
    assert math.isnan(no_3d["psnr"])  # a run without DONE is never scored, though it has metrics.json
    assert (_row(table, "no_vsd")["missing"], _row(table, "no_vsd")["expected"]) == (2, 2)

    by_key = {(r.variant, r.prompt): r for r in result.records}
    assert by_key[("no_3d", CUBE)].reason == FAIL_MESSAGE
    assert "no DONE" in by_key[("no_3d", BALL)].reason
    assert by_key[("no_vsd", BALL)].status == collect.MISSING and by_key[("no_vsd", BALL)].path is None
    assert len(pd.read_csv(result.files["runs"])) == 6

    # Written beside the run, generate's own keys kept; no temporary file left behind.
    saved = json.loads((run_dir_of(sweep, "full", BALL) / "metrics.json").read_text())
    assert saved["psnr"] == 1.0 and saved["eval"]["gt"]["values"]["psnr"] == pytest.approx(direct[0]["psnr"])
    assert not [p for p in sweep.rglob("*") if ".tmp-" in p.name]
    unfinished = json.loads((run_dir_of(sweep, "no_3d", BALL) / "metrics.json").read_text())
    assert "eval" not in unfinished


def test_metrics_are_recomputed_only_when_asked(sweep: Path) -> None:
    collect.collect(sweep)
    path = run_dir_of(sweep, "full", BALL) / "metrics.json"
    data = json.loads(path.read_text())
    true_psnr = data["eval"]["gt"]["values"]["psnr"]
    data["eval"]["gt"]["values"]["psnr"] = 99.0  # a marker: reused values come back unchanged
    path.write_text(json.dumps(data))
    other = collect.collect(sweep).records
    assert next(r for r in other if r.variant == "full" and r.prompt == BALL).metrics["psnr"] == 99.0
    fresh = collect.collect(sweep, collect.CollectOptions(recompute=True)).records
    assert next(r for r in fresh if r.variant == "full" and r.prompt == BALL).metrics["psnr"] == true_psnr

    data = json.loads(path.read_text())
    data["eval"]["gt"]["settings"]["size"] = 64  # computed with other settings
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{path}.*--recompute"):
        collect.collect(sweep)


def _answers(path: Path) -> Path:
    rows = []
    aq_choices = ["left", "left", "left", "right"]  # `full` (left) wins AQ 3 of 4
    for i, aq in enumerate(aq_choices):
        for criterion in ("AQ", "SQ", "MQ", "TA", "Overall"):
            rows.append([f"r{i}", "c1", BALL, "full", "no_3d", criterion, aq if criterion == "AQ" else "left"])
        overall = "right" if i < 2 else "left"  # `full` (right) against mav3d: 2 of 4 overall
        for criterion in ("AQ", "SQ", "MQ", "TA", "Overall"):
            rows.append([f"r{i}", "c2", BALL, "mav3d", "full", criterion, overall])
    pd.DataFrame(rows, columns=["rater_id", "comparison_id", "prompt", "left_method", "right_method", "criterion",
                                "choice"]).to_csv(path, index=False)
    return path


def test_userstudy_shares_merge_into_the_table(sweep: Path) -> None:
    with pytest.raises(FileNotFoundError, match="answers.csv do not exist"):
        collect.collect(sweep, collect.CollectOptions(userstudy=sweep / "answers.csv"))
    (sweep / "userstudy").mkdir()
    _answers(sweep / "userstudy" / "answers.csv")  # the default place: found without an option
    result = collect.collect(sweep)
    table = result.table
    assert list(table["variant"]) == ["mav3d", "full", "no_3d", "no_vsd"]  # study-only baseline first, as MAV3D
    no_3d = _row(table, "no_3d")
    assert no_3d["AQ"] == pytest.approx(75.0) and no_3d["SQ"] == pytest.approx(100.0)
    assert no_3d["AQ_p"] == pytest.approx(chisquare([3, 1]).pvalue)
    assert _row(table, "mav3d")["Overall"] == pytest.approx(50.0) and _row(table, "mav3d")["expected"] == 0
    assert math.isnan(_row(table, "full")["AQ"])  # the reference method has no share against itself

    md = result.files["md"].read_text()
    assert "| w/o ∇L_3D |" in md and "no runs" in md
    # χ² against 50/50 (eval.stats): 3 of 4 has p = 0.32, 4 of 4 has p = 0.046 (marked).
    assert "| 75% | 100%* | 100%* | 100%* | 100%* |" in md and "*: χ² test against 50/50 at p < 0.05" in md
    assert f"**failed** — {FAIL_MESSAGE}" in md and "**missing**" in md
    tex = result.files["tex"].read_text()
    assert r"w/o $\nabla_{\theta} \mathcal{L}_{3D}$" in tex and r"\multicolumn{4}{c}{Human" in tex
    assert r"75\% & 100\%$^*$" in tex
    assert iio.imread(result.files["png"]).ndim == 3


def test_table2_rows_follow_the_paper() -> None:
    assert [r.variant for r in ROWS] == ["full", "no_image_guidance", "no_3d", "no_vsd", "no_hybrid", "hexplane"]
    assert [r.paper_clip for r in ROWS] == [35.0, 29.3, 35.1, 34.5, 33.8, 34.5]  # paper Table 2, ablation block


def test_bad_input_errors_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        collect.collect(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} is an empty sweep"):
        collect.collect(empty)
    (empty / "multirun.yaml").write_text(MULTIRUN_YAML)
    with pytest.raises(ValueError, match="lists 6 job\\(s\\) but none has started"):
        collect.collect(empty)

    other = tmp_path / "other" / "run"
    other.mkdir(parents=True)
    (other / "config.yaml").write_text("prompt: x\nseed: 0\nlearning_rate: 0.1\n")
    (other / "fingerprint.json").write_text('{"fingerprint": "0"}')
    with pytest.raises(ValueError, match=f"{other / 'config.yaml'} does not match the fourdfy run schema"):
        collect.collect(tmp_path / "other")

    assert collect.main([str(empty)]) == 2
    assert "empty sweep" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# One row per configuration


def _scored_run(root: Path, overrides: list[str], psnr: float, where: Path | None = None) -> Path:
    """A finished smoke run whose ground-truth metrics are already cached (collect reuses them: no rendering)."""
    from fourdfy.synthetic.metrics import GTMetricsConfig

    cfg = compose_run_config(["preset=smoke", *overrides])
    run_dir = root / (where or identity_of(cfg).path)
    RunDir(run_dir).prepare(cfg)
    values = {"psnr": psnr, "ssim": 0.5, "depth_error": 0.1, "motion_error": 0.2}
    settings = GTMetricsConfig.from_eval(cfg.eval).settings()
    (run_dir / "metrics.json").write_text(json.dumps({"eval": {"gt": {"settings": settings, "values": values}}}))
    (run_dir / "DONE").write_text("finished\n")
    return run_dir


def test_one_row_per_configuration_with_the_swept_keys_and_mean_sd_over_seeds(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    _scored_run(root, ["schedule.p_3d=0.3", "seed=0"], 20.0)
    _scored_run(root, ["schedule.p_3d=0.3", "seed=1"], 22.0)
    _scored_run(root, ["schedule.p_3d=0.3", "seed=0", f"prompt={CUBE}"], 30.0)
    _scored_run(root, ["schedule.p_3d=0.7", "seed=0"], 25.0)
    # Disagreements are reported, never merged: a run in another config's directory, and an edited config.yaml.
    moved = _scored_run(root, ["schedule.p_3d=0.9"], 99.0,
                        where=identity_of(run_config("full", BALL)).path.parent.parent / "schedule.p_3d=0.7" / "seed5")
    edited = _scored_run(root, ["schedule.p_3d=0.7", "seed=2"], 98.0)
    (edited / "config.yaml").write_text((edited / "config.yaml").read_text().replace("p_3d: 0.7", "p_3d: 0.8"))
    stamped = _scored_run(root, ["schedule.p_3d=0.7", "seed=3"], 97.0)
    (stamped / "fingerprint.json").write_text('{"fingerprint": "0123456789abcdef"}')

    result = collect.collect(root)
    table = result.table.set_index("tag")
    assert list(table.index) == ["schedule.p_3d=0.3", "schedule.p_3d=0.7"]
    assert list(table["schedule.p_3d"]) == [0.3, 0.7] and (table["preset"] == "smoke").all()
    row = table.loc["schedule.p_3d=0.3"]
    assert (row["expected"], row["finished"], row["psnr_n"]) == (3, 3, 3)  # pooled: both prompts, both seeds
    assert row["psnr"] == pytest.approx(24.0) and row["psnr_std"] == pytest.approx(5.291502622, rel=1e-9)
    # 95% t interval of 20, 22, 30: 24 ± t_{2, 0.975} · s / √3 (scipy).
    half = t_dist.ppf(0.975, 2) * 5.291502622 / 3 ** 0.5
    assert (row["psnr_low"], row["psnr_high"]) == (pytest.approx(24.0 - half), pytest.approx(24.0 + half))
    assert table.loc["schedule.p_3d=0.7", "psnr_n"] == 1 and math.isnan(table.loc["schedule.p_3d=0.7", "psnr_std"])

    per_prompt = result.by_prompt.set_index(["tag", "prompt"])
    ball = per_prompt.loc[("schedule.p_3d=0.3", BALL)]
    assert (ball["psnr"], ball["psnr_n"]) == (21.0, 2) and ball["psnr_std"] == pytest.approx(2 ** 0.5)
    assert per_prompt.loc[("schedule.p_3d=0.3", CUBE), "psnr"] == 30.0

    status = {r.path: (r.status, r.reason) for r in result.records}
    assert status[moved][0] == collect.MISMATCHED and "schedule.p_3d=0.9/seed0, not in" in status[moved][1]
    assert status[edited][0] == collect.MISMATCHED and "schedule.p_3d=0.8/seed2, not in" in status[edited][1]
    assert status[stamped][0] == collect.MISMATCHED and "fingerprint.json (0123456789abcdef)" in status[stamped][1]
    md = result.files["md"].read_text()
    assert "| Method | Config | `p_3d` | GT err. (combined) ↓ | PSNR ↑ |" in md
    assert "| 4D-fy | schedule.p_3d=0.3 | 0.3 | " in md and f"| 24.00 ± {half:.2f} |" in md and "| 3/3 |" in md
    assert "| 4D-fy | schedule.p_3d=0.7 | 0.7 | " in md and "| 25.00 |" in md  # one run: no interval
    assert "mean ± half-width of the 95% CI" in md
    # 20, 22 over seeds: 21 ± t_{1, 0.975} · √2 / √2 = 12.71.
    assert "Per prompt (mean ± 95% CI half-width over seeds; no paired tests):" in md
    assert f"| 21.00 ± {t_dist.ppf(0.975, 1):.2f} |" in md
    assert len(result.paired) == 0  # every row is `full`: nothing to compare
    assert f"- {moved}: **mismatched**" in md and f"- {edited}: **mismatched**" in md
    assert "99.00" not in md and "98.00" not in md and "97.00" not in md


def test_an_earlier_runs_csv_stands_in_for_purged_run_directories(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    first = tmp_path / "first"
    _scored_run(first, ["schedule.p_3d=0.3", "seed=0"], 20.0)
    _scored_run(first, ["schedule.p_3d=0.3", "seed=1"], 22.0)
    _scored_run(first, ["seed=0"], 26.0)
    _scored_run(first, ["variant=hexplane", "field.hexplane.resolutions=[8,24]", "seed=0"], 21.0)  # a list setting
    before = collect.collect(first, collect.CollectOptions(out_dir=tmp_path / "before"))
    shutil.rmtree(first)  # the scratch disk was purged: only the collected files are left

    # runs.csv alone rebuilds every table file byte for byte (configuration columns, intervals, Markdown).
    alone = collect.collect(None, collect.CollectOptions(out_dir=tmp_path / "alone",
                                                         runs_csv=(before.files["runs"],)))
    for name in ("csv", "by_prompt", "paired", "md", "tex", "runs"):
        assert alone.files[name].read_bytes() == before.files[name].read_bytes(), name

    # New runs on disk join the earlier ones; a rerun on disk wins over its runs.csv line.
    second = tmp_path / "second"
    _scored_run(second, ["schedule.p_3d=0.3", "seed=1"], 24.0)
    _scored_run(second, ["schedule.p_3d=0.3", "seed=2"], 30.0)
    merged = collect.collect(second, collect.CollectOptions(runs_csv=(before.files["runs"],)))
    row = merged.table.set_index("tag").loc["schedule.p_3d=0.3"]
    assert (row["finished"], row["psnr_n"], row["schedule.p_3d"]) == (3, 3, 0.3)
    assert row["psnr"] == pytest.approx((20.0 + 24.0 + 30.0) / 3)
    assert merged.table.set_index("tag").loc["default", "psnr"] == 26.0
    assert merged.table.set_index("tag").loc["field.hexplane.resolutions=[8,24]", "field.hexplane.resolutions"] \
        == "[8, 24]"
    assert sorted(str(r.path).startswith(str(second)) for r in merged.records) == [False] * 3 + [True] * 2

    # A line whose tag no longer names its configuration (a default changed since) is reported, never merged.
    frame = pd.read_csv(before.files["runs"], dtype=str, keep_default_na=False)
    default_line = int(frame.index[frame["tag"] == "default"][0])
    frame.loc[default_line, "schedule.p_3d"] = "0.9"  # as if the preset's p_3d had been 0.9 when it ran
    listed = int(frame.index[frame["variant"] == "hexplane"][0])
    frame.loc[listed, "field.hexplane.resolutions"] = "[16, 32]"  # as if [16, 32] had been named: today's default
    changed = tmp_path / "changed.csv"
    frame.to_csv(changed, index=False)
    stale = collect.collect(None, collect.CollectOptions(out_dir=tmp_path / "stale", runs_csv=(changed,)))
    status = {(r.tag, r.seed): (r.status, r.reason) for r in stale.records}
    assert status[("default", 0)][0] == collect.MISMATCHED
    assert f"line {default_line + 2}: its tag 'default' leaves out schedule.p_3d=0.9, but today's default" \
        in status[("default", 0)][1]
    assert status[("schedule.p_3d=0.3", 1)] == (collect.FINISHED, "")
    hexplane = next(r for r in stale.records if r.variant == "hexplane")
    assert hexplane.status == collect.MISMATCHED and "names field.hexplane.resolutions=[16, 32], but today's" \
        in hexplane.reason
    assert list(stale.table["tag"]) == ["schedule.p_3d=0.3"]

    # Bad input names the file, the column or the missing option.
    broken = tmp_path / "broken.csv"
    broken.write_text(before.files["runs"].read_text().replace("status,", "state,", 1))
    with pytest.raises(ValueError, match=f"--runs-csv {broken} has no column 'status'"):
        collect.records_from_runs_csv(broken)
    assert collect.main(["--runs-csv", str(before.files["runs"])]) == 2
    assert "pass --runs-csv (an earlier runs.csv) and --out" in capsys.readouterr().err
    assert collect.main(["--runs-csv", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x")]) == 2
    assert f"--runs-csv {tmp_path / 'none.csv'} does not exist" in capsys.readouterr().err


@pytest.mark.slow  # builds a ViT-B/32 (random weights): ~10-20 s on 2 busy cores
def test_clip_scores_join_the_table_when_asked(sweep: Path) -> None:
    # Random CLIP weights (pretrained=None): no download; the number is meaningless, the wiring is not.
    for prompt in (BALL, CUBE):
        frames = torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(0))
        write_video(frames, run_dir_of(sweep, "full", prompt) / "renders" / "orbit.mp4", fps=4)
    result = collect.collect(sweep, collect.CollectOptions(clip=True, clip_pretrained=None))
    full = _row(result.table, "full")
    assert 0.0 <= full["clip"] <= 100.0 and full["clip_n"] == 2
    saved = json.loads((run_dir_of(sweep, "full", BALL) / "metrics.json").read_text())["eval"]["clip"]
    assert saved["settings"]["pretrained"] is None and 0.0 <= saved["values"]["clip"] <= 100.0
    md = result.files["md"].read_text()
    assert "CLIP ↑" in md and "CLIP (paper)" in md and "| 4D-fy | " + f"{full['clip']:.1f}" in md


# ----------------------------------------------------------------------------------------------
# Intervals and paired comparisons with the full model, on fabricated run records

PROMPTS = (BALL, CUBE, "a green cone rolling")


def _gt_record(variant: str, prompt: str, seed: int, gt_error: float, psnr: float) -> collect.RunRecord:
    """A finished toy run as find_runs + ensure_metrics would leave it (no directory: collect is stubbed)."""
    return collect.RunRecord(variant, prompt, seed, collect.FINISHED, None, backend="synthetic", preset="smoke",
                             tag="default", metrics={"gt_error": gt_error, "psnr": psnr})


def _fabricated() -> list[collect.RunRecord]:
    """full, no_3d (worse on every (prompt, seed) pair), no_vsd (noise), hexplane (one run); unmatched runs: a
    no_vsd seed 2 and a full seed 2 with no partner. A real-prompt block (preset paper): CLIP, 6 prompts, full with
    2 seeds a prompt, no_image_guidance with 1."""
    records = []
    for i, prompt in enumerate(PROMPTS):
        for seed in (0, 1):
            base, psnr = 0.10 + 0.02 * i + 0.005 * seed, 20.0 + i + 0.5 * seed
            records.append(_gt_record("full", prompt, seed, base, psnr))
            records.append(_gt_record("no_3d", prompt, seed, base + 0.03 + 0.001 * (i + seed), psnr - 1.5 - 0.1 * i))
            records.append(_gt_record("no_vsd", prompt, seed, base + NOISE[2 * i + seed], psnr + NOISE[2 * i + seed]))
    records.append(_gt_record("no_vsd", BALL, 2, 0.5, 10.0))  # no full seed 2 for BALL: dropped
    records.append(_gt_record("full", CUBE, 2, 0.5, 10.0))  # no ablation has CUBE seed 2: dropped
    records.append(_gt_record("hexplane", BALL, 0, 0.2, 19.0))  # one pair: no interval, p = 1
    lone = _gt_record("no_hybrid", BALL, 0, 0.3, 18.0)
    lone.tag = "schedule.p_3d=0.3"  # no full run with this tag: nothing to pair with
    records.append(lone)
    for k in range(6):
        for seed in (0, 1):
            records.append(collect.RunRecord("full", f"prompt {k}", seed, collect.FINISHED, None, backend="real",
                                             preset="paper", tag="default", metrics={"clip": 30.0 + k + seed}))
        records.append(collect.RunRecord("no_image_guidance", f"prompt {k}", 0, collect.FINISHED, None,
                                         backend="real", preset="paper", tag="default",
                                         metrics={"clip": 27.0 + k + 0.1 * k * k}))
    return records


NOISE = (0.004, -0.003, 0.001, -0.005, 0.002, -0.001)  # no_vsd − full on the six matched pairs


@pytest.fixture
def fabricated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> collect.CollectResult:
    records = _fabricated()
    monkeypatch.setattr(collect, "find_runs", lambda root: records)
    monkeypatch.setattr(collect, "ensure_metrics", lambda record, options, clip: None)
    return collect.collect(tmp_path, collect.CollectOptions(out_dir=tmp_path / "out"))


def _values(variant: str, key: str, preset: str = "smoke") -> list[float]:
    return [r.metrics[key] for r in _fabricated() if (r.preset, r.variant) == (preset, variant) and key in r.metrics]


def _by_unit(variant: str, key: str) -> dict[tuple[str, int], float]:
    """(prompt, seed) -> value of the smoke-preset runs of ``variant``."""
    return {(r.prompt, r.seed): r.metrics[key] for r in _fabricated()
            if (r.preset, r.variant) == ("smoke", variant) and key in r.metrics}


def test_rows_report_t_intervals_computed_by_eval_paired(fabricated: collect.CollectResult) -> None:
    from eval.paired import mean_interval

    table = fabricated.table.set_index(["preset", "variant"])
    for variant in ("full", "no_3d", "no_vsd"):
        row, ref = table.loc[("smoke", variant)], mean_interval(_values(variant, "gt_error"))
        assert (row["gt_error"], row["gt_error_low"], row["gt_error_high"], row["gt_error_n"]) == pytest.approx(
            (ref.mean, ref.low, ref.high, ref.n), rel=1e-12)
    hexplane = table.loc[("smoke", "hexplane")]
    assert hexplane["gt_error_n"] == 1 and math.isnan(hexplane["gt_error_low"])
    on_disk = pd.read_csv(fabricated.files["csv"])
    assert {"gt_error_low", "gt_error_high", "gt_error_n", "gt_error_std", "clip_low"} <= set(on_disk.columns)
    # Whiskers only where n >= 2: not hexplane (one run), not the paper-preset rows (no gt_error).
    metric = next(m for m in collect.METRICS if m.key == "gt_error")
    rows = list(fabricated.table["variant"] + "/" + fabricated.table["preset"])
    assert [rows[i] for i, _, _ in collect.error_bars(fabricated.table, metric)] == [
        "full/smoke", "no_3d/smoke", "no_vsd/smoke"]
    assert iio.imread(fabricated.files["png"]).ndim == 3


def test_paired_comparisons_with_the_full_model(fabricated: collect.CollectResult) -> None:
    from eval.paired import paired_test

    paired = pd.read_csv(fabricated.files["paired"], keep_default_na=False, na_values=[""])
    assert {"row", "metric", "diff", "low", "high", "p", "n_pairs"} <= set(paired.columns)
    line = paired.set_index(["variant", "metric"])
    units = [(p, s) for p in PROMPTS for s in (0, 1)]

    def expected(variant: str, key: str) -> tuple:
        ours, full = _by_unit(variant, key), _by_unit("full", key)
        return paired_test([ours[u] for u in units], [full[u] for u in units])

    for variant in ("no_3d", "no_vsd"):
        for key in ("gt_error", "psnr"):
            ref, got = expected(variant, key), line.loc[(variant, key)]
            assert got["n_pairs"] == 6 and got["unit"] == "prompt, seed"
            assert (got["diff"], got["low"], got["high"], got["p"]) == pytest.approx(
                (ref.diff, ref.low, ref.high, ref.p_value), rel=1e-9)
    # no_3d is worse on all six pairs: the exact sign-flip p is 2/2^6. no_vsd is noise (signs +-+-+-).
    assert line.loc[("no_3d", "gt_error"), "p"] == 2 / 64 and line.loc[("no_3d", "psnr"), "p"] == 2 / 64
    assert line.loc[("no_vsd", "gt_error"), "p"] > 0.5
    assert line.loc[("no_3d", "gt_error"), "low"] > 0 and line.loc[("no_3d", "psnr"), "high"] < 0

    # Unmatched runs are dropped and named.
    assert line.loc[("no_3d", "gt_error"), "dropped"] == 1 and line.loc[("no_vsd", "gt_error"), "dropped"] == 2
    assert line.loc[("no_vsd", "gt_error"), "note"] == (
        f"dropped 2 unmatched (no_vsd only: {BALL!r} seed 2; full only: {CUBE!r} seed 2)")
    hexplane = line.loc[("hexplane", "gt_error")]
    assert (hexplane["n_pairs"], hexplane["p"]) == (1, 1.0) and math.isnan(hexplane["low"])

    # CLIP on real runs: paired over prompts, full's two seeds averaged per prompt.
    clip = line.loc[("no_image_guidance", "clip")]
    ablation = [27.0 + k + 0.1 * k * k for k in range(6)]
    full = [(30.0 + k + 31.0 + k) / 2 for k in range(6)]
    ref = paired_test(ablation, full)
    assert (clip["unit"], clip["n_pairs"], clip["dropped"]) == ("prompt", 6, 0)
    assert (clip["diff"], clip["low"], clip["high"], clip["p"]) == pytest.approx(
        (ref.diff, ref.low, ref.high, ref.p_value), rel=1e-9)
    assert clip["p"] == 2 / 64  # differences 0.1 k² − 3.5 < 0 for k = 0..5: one sign, 2 of 2^6 patterns
    lone = line.loc[("no_hybrid", "gt_error")]
    assert lone["n_pairs"] == 0 and math.isnan(lone["p"])
    assert lone["note"] == "no full run with preset smoke and tag schedule.p_3d=0.3: nothing to pair with"
    # full is the reference, not compared with itself
    assert set(paired["variant"]) == {"no_3d", "no_vsd", "hexplane", "no_hybrid", "no_image_guidance"}


def test_markdown_and_latex_mark_significant_differences(fabricated: collect.CollectResult) -> None:
    from eval.paired import mean_interval, paired_test

    md = fabricated.files["md"].read_text()
    main_table = md.split("\n\n")[0].splitlines()  # the pooled table, before the legend and the per-prompt one
    lines = {line.split(" | ")[0].lstrip("| "): line for line in main_table}
    gt = mean_interval(_values("no_3d", "gt_error"))
    assert f"| {gt.mean:.4f} ± {(gt.high - gt.low) / 2:.4f}* |" in lines["w/o ∇L_3D"]
    noise = mean_interval(_values("no_vsd", "gt_error"))
    assert f"| {noise.mean:.4f} ± {(noise.high - noise.low) / 2:.4f} |" in lines["w/o ∇L_IMG"]
    assert "| Δ GT err. (combined) vs 4D-fy |" in md
    ours, full = _by_unit("no_3d", "gt_error"), _by_unit("full", "gt_error")
    d = paired_test([ours[u] for u in ours], [full[u] for u in ours])  # full's unmatched CUBE seed 2 left out
    assert f"| {d.diff:+.4f} ± {(d.high - d.low) / 2:.4f} (p = 0.031)* |" in lines["w/o ∇L_3D"]
    assert "*: differs from `full` (same preset and config) at p < 0.05: two-sided paired sign-flip" in md
    assert "With fewer than 6 pairs (w/ HexPlane) no difference can reach p < 0.05: the smallest exact p is 2/2^n " \
           "(0.0625 for 5 pairs)" in md
    assert (f"- w/o ∇L_IMG (gt_error, psnr): dropped 2 unmatched (no_vsd only: {BALL!r} seed 2; "
            f"full only: {CUBE!r} seed 2)") in md
    tex = fabricated.files["tex"].read_text()
    assert "95\\% CI" in tex and r"$\Delta$ GT err. (combined)" in tex
    assert f"{gt.mean:.4f} $\\pm$ {(gt.high - gt.low) / 2:.4f}$^*$" in tex
    assert f"{noise.mean:.4f} $\\pm$ {(noise.high - noise.low) / 2:.4f} &" in tex
