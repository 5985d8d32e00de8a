"""Turn runs into a table: one row per configuration, metrics over seeds, run status, user-study preferences.

    python -m ablations.collect OUTPUT_DIR [--out DIR] [--recompute] [--userstudy ANSWERS.csv] [--clip]
    python -m ablations.collect [OUTPUT_DIR] --runs-csv EARLIER/runs.csv [--runs-csv ...] --out DIR

OUTPUT_DIR is the runs' root (``outputs/``, where run.py puts single runs and sweeps alike), any folder below it,
or any folder of run directories. Steps:

1. Find the runs: every directory with ``.hydra/`` or ``config.yaml`` + ``fingerprint.json`` (hidden
   folders such as ``.submitit/`` are skipped). The jobs a sweep was meant to run are read back from its
   ``multirun.yaml`` (sweeper params × command-line sweeps, each composed to find its directory), so a job
   that never started is listed as ``missing``, not dropped.
2. Which configuration each run is: its preset, variant and tag (fourdfy/identity.py), computed from its stored
   config. A run whose stored config disagrees with its directory (the directory is not the one that config
   gets, or fingerprint.json does not match config.yaml) is ``mismatched``: reported, never merged into a row.
3. Status per run: ``finished`` only when ``DONE`` exists (fourdfy.api writes it last); ``failed`` when
   submitit recorded an error for the job; ``unfinished`` otherwise (running, interrupted, killed).
4. Metrics of finished runs, cached in the run's ``metrics.json`` under ``"eval"`` (written atomically;
   recomputed only with ``--recompute``): toy-world runs get ground-truth metrics (eval.gt_metrics, with
   the run's own eval settings); real runs get the CLIP score (eval.clip_score, paper §4.1).
   With ``--runs-csv``, the runs an earlier collection listed in its runs.csv join them (configuration,
   status and metrics as that collection found them), for sweeps whose directories were purged or live
   elsewhere; a run found on disk wins over a line with the same (preset, variant, tag, prompt, seed).
5. One row per configuration (preset, variant, tag): the swept settings as columns (every key that some row
   sets away from its preset + variant), each metric's mean, standard deviation, 95% confidence interval
   (Student t, eval.paired.mean_interval) over the row's finished runs (all prompts and seeds: "pooled") and
   their count; the same per prompt (over seeds) in ``table2_by_prompt.csv`` and under the Markdown table.
6. Paired comparisons (eval.paired.paired_test) of each row with the ``--method`` row (default ``full``) of the
   same preset and tag, per metric, over runs matched on (prompt, seed) (CLIP: over prompts, each prompt's mean
   over seeds): mean difference row − method, its 95% t interval, the exact sign-flip permutation p-value;
   unmatched runs are dropped, with a note. Markdown / LaTeX mark a cell whose p < 0.05.
7. User-study preferences (userstudy.analyze) from ``--userstudy`` or ``OUTPUT_DIR/userstudy/answers.csv``:
   the share of votes for ``--method`` against each variant and its χ² p-value (eval.stats).
8. Writes ``table2.csv``, ``table2_by_prompt.csv``, ``table2_paired.csv``, ``table2.md``, ``table2.tex``,
   ``table2.png`` (bar plot, 95% intervals) and ``runs.csv`` (one line per run, every status) into ``--out``
   (default OUTPUT_DIR).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ablations.table2 import EXTRA_ROWS, REFERENCE_VARIANT, ROWS, row_of
from eval.paired import EXACT_MAX_PAIRS, MONTE_CARLO_DRAWS, mean_interval, min_pairs_for_significance, paired_test
from fourdfy.atomic import atomic_path, write_json_atomic, write_text_atomic
from fourdfy.checkpoint import list_checkpoints
from fourdfy.config import RunConfig, compose_run_config, slug
from fourdfy.identity import DEFAULT_TAG, RunIdentity, base_config, identity_of, tag_items
from fourdfy.rundir import DONE_FILE, FINGERPRINT_FILE, config_fingerprint, flat_config

FINISHED, FAILED, UNFINISHED, MISSING = "finished", "failed", "unfinished", "missing"
STATUSES = (FINISHED, FAILED, UNFINISHED, MISSING)  # the statuses a table row counts
MISMATCHED = "mismatched"  # stored config and directory disagree: reported, never in a row
CRITERIA = ("AQ", "SQ", "MQ", "TA", "Overall")  # Table 2's human-preference columns (userstudy.CRITERIA)
USERSTUDY_DEFAULT = Path("userstudy") / "answers.csv"  # looked for inside OUTPUT_DIR
LEVEL = 0.95  # confidence level of every interval in the table
ALPHA = 0.05  # significance level of the markers: the paper's "p < 0.05" (§4.1)


@dataclass(frozen=True)
class Metric:
    """A table column computed from runs."""

    key: str  # key in RunRecord.metrics
    label: str  # column header
    higher_is_better: bool
    digits: int  # decimals shown in Markdown / LaTeX
    # Paired test unit. False: runs matched on (prompt, seed). True: prompts, each one's mean over its seeds
    # (the paper's CLIP score is a mean over prompts, Table 2; real runs are too costly to match seeds row to row).
    paired_by_prompt: bool = False


# Column order: CLIP first (the paper's one metric), then the toy world's ground-truth metrics, the
# combined one (fourdfy.synthetic.metrics.combined_error) first.
METRICS: tuple[Metric, ...] = (
    Metric("clip", "CLIP", True, 1, paired_by_prompt=True),
    Metric("gt_error", "GT err. (combined)", False, 4),
    Metric("psnr", "PSNR", True, 2),
    Metric("ssim", "SSIM", True, 3),
    Metric("depth_error", "Depth err.", False, 3),
    Metric("motion_error", "Motion err.", False, 3),
)
_GT_KEYS = ("psnr", "ssim", "depth_error", "motion_error")


@dataclass
class RunRecord:
    """One job: where it is, which configuration it is, how far it got, what it scored."""

    variant: str
    prompt: str
    seed: int
    status: str  # one of STATUSES, or MISMATCHED
    path: Path | None  # None for a missing run
    reason: str = ""  # why it is not finished (or not merged)
    backend: str | None = None  # guidance.backend: "synthetic" (toy world) or "real"
    metrics: dict[str, float] = field(default_factory=dict)
    config: RunConfig | None = None  # the run's config.yaml (None before the run wrote it)
    preset: str = ""  # preset.name: with variant and tag, the run's configuration (one table row)
    tag: str = ""  # the settings that differ from preset + variant, as its directory names them (fourdfy/identity.py)
    settings: dict[str, Any] = field(default_factory=dict)  # every setting, flattened (fourdfy.rundir.flat_config)
    swept: dict[str, Any] = field(default_factory=dict)  # the settings that differ from preset + variant

    @property
    def configuration(self) -> tuple[str, str, str]:
        """(preset, variant, tag): the table row this run belongs to."""
        return self.preset, self.variant, self.tag


@dataclass
class CollectOptions:
    """What to compute and where to write."""

    out_dir: Path | None = None  # None: the sweep directory
    recompute: bool = False  # recompute metrics even when metrics.json holds them
    clip: bool | None = None  # None: CLIP for real runs only; True: for toy runs too; False: never
    clip_pretrained: str | None = "openai"  # eval.clip_score weights (paper: OpenAI's ViT-B/32)
    clip_device: str = "cpu"
    userstudy: Path | None = None  # answers CSV; None: OUTPUT_DIR/userstudy/answers.csv when it exists
    method: str = REFERENCE_VARIANT  # the method whose preference shares are reported and every row is paired with
    runs_csv: tuple[Path, ...] = ()  # earlier collections' runs.csv: runs whose directories are gone (disk wins)


# ----------------------------------------------------------------------------------------------
# Finding runs


def _is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() or (
        (path / "config.yaml").is_file() and (path / "fingerprint.json").is_file()
    )


def discover(root: Path) -> tuple[list[Path], list[Path]]:
    """Run directories and multirun.yaml files under ``root`` (hidden folders and run contents skipped)."""
    runs: list[Path] = []
    sweeps: list[Path] = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        if "multirun.yaml" in files:
            sweeps.append(here / "multirun.yaml")
        if _is_run_dir(here):
            runs.append(here)
            dirs[:] = []  # checkpoints/, renders/, wandb/ hold no runs
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(runs), sorted(sweeps)


def _describe(record: RunRecord, cfg: RunConfig) -> RunIdentity:
    """Fill ``record``'s configuration from ``cfg``; returns its identity. Raises ValueError or HydraException
    when none can be computed (a preset or variant the config tree no longer has)."""
    who = identity_of(cfg)
    record.preset, record.tag = who.preset, who.tag
    record.settings = flat_config(cfg)
    record.swept = tag_items(cfg, _base(cfg))
    return who


def _base(cfg: RunConfig) -> RunConfig:
    return base_config(cfg.preset.name, cfg.variant.name)


def expected_jobs(multirun_yaml: Path) -> list[RunRecord] | None:
    """A ``missing`` record for every job a sweep was launched with, its configuration filled in.

    The job list is rebuilt as Hydra's basic sweeper built it: sweeper params plus the command line's
    overrides, expanded to their cartesian product; each job is composed to find its directory. Returns None
    for another sweeper, or when the config tree no longer composes the sweep's jobs (no way to know).
    """
    cfg = OmegaConf.load(multirun_yaml)
    target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default=""))
    if not target.endswith("BasicSweeper"):
        print(f"warning: {multirun_yaml} uses sweeper {target!r}; missing jobs cannot be listed", file=sys.stderr)
        return None
    # Imported here: Hydra's parser is only needed for sweeps.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
    parser = OverridesParser.create()
    out = []
    for job in BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)[0]:
        try:
            job_cfg = compose_run_config(list(job))
            record = RunRecord(job_cfg.variant.name, job_cfg.prompt, job_cfg.seed, MISSING, None,
                               "no run directory: the job never started (cancelled, or still queued)",
                               str(job_cfg.guidance.backend))
            _describe(record, job_cfg)
        except (ValueError, HydraException) as err:
            print(f"warning: {multirun_yaml}: job {' '.join(job)} does not compose with this config tree ({err}); "
                  "missing jobs cannot be listed", file=sys.stderr)
            return None
        out.append(record)
    return out


def _schema_error(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} does not match the fourdfy run schema (fourdfy/config.py RunConfig): {err}. "
                      "Collect it with the code version that wrote it, or move it out of the sweep directory.")


@lru_cache(maxsize=1)
def _run_schema() -> DictConfig:
    """The structured RunConfig schema, built once (building it costs a fraction of a second)."""
    return OmegaConf.structured(RunConfig)


def load_config_checked(run_dir: Path) -> RunConfig:
    """``run_dir/config.yaml`` merged into the run schema; ValueError naming the file if it does not fit."""
    path = run_dir / "config.yaml"
    try:
        return OmegaConf.to_object(OmegaConf.merge(_run_schema(), OmegaConf.load(path)))
    except OmegaConfBaseException as err:
        raise _schema_error(path, err) from err


def read_config(run_dir: Path) -> tuple[RunConfig, bool]:
    """(the run's config, whether it is its config.yaml): config.yaml, else Hydra's ``.hydra/config.yaml`` (the
    job started but wrote no config.yaml yet). Raises ValueError naming the file when it does not fit the schema.
    """
    if (run_dir / "config.yaml").is_file():
        return load_config_checked(run_dir), True
    path = run_dir / ".hydra" / "config.yaml"
    try:
        return OmegaConf.to_object(OmegaConf.merge(_run_schema(), OmegaConf.load(path))), False
    except OmegaConfBaseException as err:
        raise _schema_error(path, err) from err


def _disagreement(run_dir: Path, who: RunIdentity, cfg: RunConfig, stored: bool) -> str:
    """Why a run's stored config disagrees with its directory, or "" when they agree."""
    if Path(run_dir).parts[-5:] != who.path.parts:
        return (f"its config belongs in <root>/{who.path}, not in {run_dir} (moved, or launched with an explicit "
                "hydra.run.dir): move it there to merge it")
    stamp = run_dir / FINGERPRINT_FILE
    if stored and stamp.is_file():
        old = json.loads(stamp.read_text()).get("fingerprint")
        if old != config_fingerprint(cfg):
            return f"its {FINGERPRINT_FILE} ({old}) is not its config.yaml's ({config_fingerprint(cfg)}): edited?"
    return ""


def read_run(run_dir: Path, root: Path) -> RunRecord:
    """A found run directory's record: configuration, status (or MISMATCHED with the reason)."""
    cfg, stored = read_config(run_dir)
    status, reason = run_status(run_dir, root)
    record = RunRecord(cfg.variant.name, cfg.prompt, cfg.seed, status, run_dir, reason, str(cfg.guidance.backend),
                       config=cfg if stored else None)
    try:
        problem = _disagreement(run_dir, _describe(record, cfg), cfg, stored)
    except (ValueError, HydraException) as err:
        problem = f"its directory cannot be computed from its config ({err})"
    if problem:
        record.status, record.reason = MISMATCHED, problem
    return record


def _submitit_error(run_dir: Path, root: Path) -> str | None:
    """The last line of the error submitit recorded for this run's job, if any.

    The job id is Hydra's hydra.job.id (set by hydra-submitit-launcher); submitit keeps the job's result in
    <sweep dir>/.submitit/<id>/<id>_0_result.pkl as ("error", traceback) or ("success", value).
    """
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    job_id = str(OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.id", default="") or "")
    if not job_id or job_id.startswith("?"):
        return None
    for folder in (run_dir, *run_dir.parents):
        result = folder / ".submitit" / job_id / f"{job_id}_0_result.pkl"
        if result.is_file():
            with open(result, "rb") as f:
                kind, payload = pickle.load(f)
            if kind != "error":
                return None
            lines = [line for line in str(payload).strip().splitlines() if line.strip()]
            return lines[-1].strip() if lines else "error"
        if folder == root:
            break
    return None


def run_status(run_dir: Path, root: Path) -> tuple[str, str]:
    """(status, reason) of a run directory. Finished means DONE exists: it is written last."""
    if (run_dir / DONE_FILE).is_file():
        return FINISHED, ""
    error = _submitit_error(run_dir, root)
    if error is not None:
        return FAILED, error
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if checkpoints:
        return UNFINISHED, f"no {DONE_FILE}; newest checkpoint {checkpoints[-1].name} (running, interrupted or killed)"
    if (run_dir / "config.yaml").is_file():
        return UNFINISHED, f"no {DONE_FILE} and no checkpoint yet (running, or stopped before the first save)"
    return UNFINISHED, "no config.yaml: the job stopped (or is starting) before training"


def find_runs(root: Path) -> list[RunRecord]:
    """Every run under ``root`` and every job its sweeps meant to run; raises for an empty sweep."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist")
    run_dirs, sweeps = discover(root)
    records = [read_run(run_dir, root) for run_dir in run_dirs]
    expected: list[RunRecord] = []
    for sweep in sweeps:
        expected += expected_jobs(sweep) or []
    if not records:
        detail = (f"its multirun.yaml lists {len(expected)} job(s) but none has started (still queued?)"
                  if expected else "no run directory (.hydra/ or config.yaml + fingerprint.json) and no multirun.yaml")
        raise ValueError(f"{root} is an empty sweep: {detail}")
    found = {Path(r.path).parts[-5:] for r in records if r.path is not None}
    for job in expected:
        key = RunIdentity(job.preset, job.variant, slug(job.prompt), job.tag, job.seed).path.parts
        if key not in found:
            found.add(key)  # a sweep launched twice lists its jobs twice
            records.append(job)
    return records


# ----------------------------------------------------------------------------------------------
# Metrics, cached in metrics.json


def _cached(section: dict[str, Any], name: str, settings: dict[str, Any], path: Path,
            compute: Callable[[], dict[str, float]], recompute: bool) -> tuple[dict[str, float], bool]:
    """Values of ``section[name]`` if present with the same settings, else computed. Returns (values, changed)."""
    entry = section.get(name)
    if entry is not None and not recompute:
        if entry.get("settings") != settings:
            raise ValueError(f"{path} holds {name} metrics computed with other settings ({entry.get('settings')} "
                             f"!= {settings}); pass --recompute to replace them")
        return entry["values"], False
    values = compute()
    section[name] = {"settings": settings, "values": values}
    return values, True


class _ClipScorers:
    """Builds the CLIP scorer once, on first use (loading it costs seconds and needs the weights)."""

    def __init__(self, pretrained: str | None, device: str):
        self.pretrained, self.device = pretrained, device
        self._scorer: Any = None

    def settings(self) -> dict[str, Any]:
        from eval.clip_score import DEFAULT_MODEL_NAME

        return {"model_name": DEFAULT_MODEL_NAME, "pretrained": self.pretrained, "video": "renders/orbit.mp4"}

    def score_run(self, run_dir: Path) -> float:
        if self._scorer is None:
            from eval.clip_score import CLIPScorer

            self._scorer = CLIPScorer(pretrained=self.pretrained, device=self.device)
        return self._scorer.score_run(run_dir)


def ensure_metrics(record: RunRecord, options: CollectOptions, clip: _ClipScorers) -> None:
    """Fill ``record.metrics`` for a finished run, from its metrics.json or by computing them (then saved)."""
    assert record.path is not None and record.config is not None and record.status == FINISHED
    path = record.path / "metrics.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    section: dict[str, Any] = dict(data.get("eval") or {})
    changed = False
    if record.backend == "synthetic":
        from eval.gt_metrics import run_metrics
        from fourdfy.synthetic.metrics import GTMetricsConfig, combined_error

        gt_cfg = GTMetricsConfig.from_eval(record.config.eval)
        values, fresh = _cached(section, "gt", gt_cfg.settings(), path,
                                lambda: run_metrics(record.path, gt_cfg), options.recompute)
        record.metrics.update({k: float(values[k]) for k in _GT_KEYS})
        # Derived, not cached: metrics.json files written before the combined column still combine.
        record.metrics["gt_error"] = combined_error(record.metrics)
        changed |= fresh
    want_clip = options.clip if options.clip is not None else record.backend == "real"
    if want_clip:
        values, fresh = _cached(section, "clip", clip.settings(), path,
                                lambda: {"clip": clip.score_run(record.path)}, options.recompute)
        record.metrics["clip"] = float(values["clip"])
        changed |= fresh
    if changed:
        data["eval"] = section
        write_json_atomic(path, data)


# ----------------------------------------------------------------------------------------------
# The table


def userstudy_shares(answers_csv: Path, method: str) -> pd.DataFrame:
    """Percent of votes for ``method`` per (baseline, criterion) and p-values: index baseline,
    columns AQ..Overall and AQ_p..Overall_p."""
    from userstudy.analyze import load_answers, preference_table

    if not answers_csv.is_file():
        raise FileNotFoundError(f"user-study answers {answers_csv} do not exist")
    results = preference_table(load_answers(answers_csv), method)
    share = results.pivot(index="baseline", columns="criterion", values="share") * 100.0
    p_value = results.pivot(index="baseline", columns="criterion", values="p_value").add_suffix("_p")
    return share.join(p_value)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); NaN for fewer than two values."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.stdev(finite) if len(finite) > 1 else float("nan")


def swept_keys(records: list[RunRecord]) -> list[str]:
    """Settings some merged run sets away from its preset + variant: the table's configuration columns."""
    return sorted({key for r in records if r.status != MISMATCHED for key in r.swept})


def _cell(value: Any) -> Any:
    """A setting as a table cell: lists as ``[a, b]`` text (CSV cells hold one value)."""
    return str(list(value)) if isinstance(value, (list, tuple)) else value


def _configurations(records: list[RunRecord], studied: set[str]) -> list[tuple[str, str, str]]:
    """(preset, variant, tag) of every row, in Table 2's order: baselines only the user study knows first (as
    MAV3D heads the paper's table), then Table-2 variants, then other variants; within a variant, by preset,
    then `default` and the other tags sorted. A variant without runs gets a row with preset ""."""
    configs = {r.configuration for r in records if r.status != MISMATCHED}
    variants = {v for _, v, _ in configs}
    table2 = [row.variant for row in (*ROWS, *EXTRA_ROWS) if row.variant in variants | studied]
    others = sorted(variants - set(table2))
    out = [("", v, DEFAULT_TAG) for v in sorted(studied - set(table2) - variants)]
    for variant in table2 + others:
        mine = sorted((c for c in configs if c[1] == variant), key=lambda c: (c[0], c[2] != DEFAULT_TAG, c[2]))
        out += mine or [("", variant, DEFAULT_TAG)]
    return out


def _stats_columns(runs: list[RunRecord], metric_keys: list[str]) -> dict[str, Any]:
    """Counts per status, then each metric's mean, standard deviation, 95% t interval (``_low``, ``_high``; NaN
    for fewer than two values) and count over ``runs``."""
    out: dict[str, Any] = {"expected": len(runs), **{s: sum(r.status == s for r in runs) for s in STATUSES}}
    for key in metric_keys:
        values = [r.metrics[key] for r in runs if key in r.metrics and not math.isnan(r.metrics[key])]
        low, high = mean_interval(values, LEVEL)[1:3] if values else (float("nan"), float("nan"))
        out[key], out[f"{key}_std"] = _mean(values), _std(values)
        out[f"{key}_low"], out[f"{key}_high"], out[f"{key}_n"] = low, high, len(values)
    return out


def _identity_columns(config: tuple[str, str, str], runs: list[RunRecord], keys: list[str]) -> dict[str, Any]:
    preset, variant, tag = config
    row_def = row_of(variant)
    settings = runs[0].settings if runs else {}
    return {"preset": preset, "variant": variant, "tag": tag, "label": row_def.label if row_def else variant,
            **{key: _cell(settings.get(key)) for key in keys}}


def build_table(records: list[RunRecord], shares: pd.DataFrame | None, method: str) -> pd.DataFrame:
    """One row per configuration (preset, variant, tag), pooled over its prompts and seeds; mismatched runs are
    left out. Columns: the configuration, the swept settings, counts per status, metric mean/_std/_low/_high/_n
    (_low, _high: 95% t interval), and the user-study shares of the row's variant with their χ² p-values (_p)."""
    studied = set() if shares is None else {str(b) for b in shares.index}
    keys = swept_keys(records)
    metric_keys = [m.key for m in METRICS if any(m.key in rec.metrics for rec in records)]
    rows = []
    for config in _configurations(records, studied - {method}):
        mine = [r for r in records if r.configuration == config and r.status != MISMATCHED]
        row_def = row_of(config[1])
        row = {**_identity_columns(config, mine, keys),
               "paper_clip": row_def.paper_clip if row_def else float("nan"), **_stats_columns(mine, metric_keys)}
        for criterion in CRITERIA:
            have = shares is not None and config[1] in shares.index and criterion in shares.columns
            row[criterion] = float(shares.loc[config[1], criterion]) if have else float("nan")
            row[f"{criterion}_p"] = float(shares.loc[config[1], f"{criterion}_p"]) if have else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def build_prompt_table(records: list[RunRecord]) -> pd.DataFrame:
    """One row per (configuration, prompt): metric mean/_std/_low/_high/_n over that prompt's seeds."""
    keys = swept_keys(records)
    metric_keys = [m.key for m in METRICS if any(m.key in rec.metrics for rec in records)]
    rows = []
    for config in _configurations(records, set()):
        mine = [r for r in records if r.configuration == config and r.status != MISMATCHED]
        for prompt in sorted({r.prompt for r in mine}):
            runs = [r for r in mine if r.prompt == prompt]
            rows.append({**_identity_columns(config, runs, keys), "prompt": prompt,
                         **_stats_columns(runs, metric_keys)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Paired comparisons with the reference method


PAIRED_COLUMNS = ("preset", "variant", "tag", "row", "reference", "metric", "unit", "diff", "low", "high", "p",
                  "n_pairs", "exact", "dropped", "note")  # table2_paired.csv


def _paired_units(runs: list[RunRecord], metric: Metric) -> dict[tuple[Any, ...], float]:
    """What a paired test matches: each run's value keyed by (prompt, seed), or for a per-prompt metric each
    prompt's mean over its seeds keyed by (prompt,)."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for r in runs:
        value = r.metrics.get(metric.key)
        if value is not None and not math.isnan(value):
            groups.setdefault((r.prompt,) if metric.paired_by_prompt else (r.prompt, r.seed), []).append(value)
    # A unit with two values (two runs of one prompt and seed in a row) is averaged, never silently dropped.
    return {unit: sum(v) / len(v) for unit, v in groups.items()}


def _unit_text(unit: tuple[Any, ...]) -> str:
    return f"{unit[0]!r}" + (f" seed {unit[1]}" if len(unit) > 1 else "")


def _dropped_note(row_name: str, method: str, only_row: list[tuple[Any, ...]],
                  only_ref: list[tuple[Any, ...]]) -> str:
    """Which units had no partner: "dropped 2 unmatched (no_3d only: 'a ball' seed 1; full only: 'a cube' seed 0)"."""
    parts = []
    for who, units in ((row_name, only_row), (method, only_ref)):
        if units:
            shown = ", ".join(_unit_text(u) for u in units[:4]) + (", ..." if len(units) > 4 else "")
            parts.append(f"{who} only: {shown}")
    return f"dropped {len(only_row) + len(only_ref)} unmatched ({'; '.join(parts)})" if parts else ""


def paired_comparisons(records: list[RunRecord], method: str = REFERENCE_VARIANT) -> pd.DataFrame:
    """Each configuration against ``method``'s configuration of the same preset and tag, per metric: mean
    difference (row − method), its 95% t interval and the two-sided sign-flip permutation p-value over matched
    units (``Metric.paired_by_prompt``), eval.paired.paired_test. Units without a partner are dropped and named in
    ``note``; a row with no ``method`` counterpart or no matched unit gets NaN statistics and a note.
    Columns: PAIRED_COLUMNS, one line per (configuration, metric with values in that configuration)."""
    merged = [r for r in records if r.status != MISMATCHED]
    metrics = [m for m in METRICS if any(m.key in r.metrics for r in merged)]
    lines = []
    for config in _configurations(merged, set()):
        preset, variant, tag = config
        mine = [r for r in merged if r.configuration == config]
        if variant == method or not mine:
            continue
        reference = [r for r in merged if r.configuration == (preset, method, tag)]
        row_def = row_of(variant)
        name = (row_def.label if row_def else variant) + ("" if tag == DEFAULT_TAG else f" [{tag}]")
        for metric in metrics:
            ours, theirs = _paired_units(mine, metric), _paired_units(reference, metric)
            if not ours:
                continue
            matched = sorted(set(ours) & set(theirs), key=str)
            note = _dropped_note(variant, method, sorted(set(ours) - set(theirs), key=str),
                                 sorted(set(theirs) - set(ours), key=str))
            line = {"preset": preset, "variant": variant, "tag": tag, "row": name, "reference": method,
                    "metric": metric.key, "unit": "prompt" if metric.paired_by_prompt else "prompt, seed",
                    "diff": float("nan"), "low": float("nan"), "high": float("nan"), "p": float("nan"),
                    "n_pairs": len(matched), "exact": False, "dropped": len(set(ours) ^ set(theirs)), "note": note}
            if not reference:
                line["note"] = f"no {method} run with preset {preset} and tag {tag}: nothing to pair with"
            elif matched:
                res = paired_test([ours[u] for u in matched], [theirs[u] for u in matched], LEVEL)
                line.update(diff=res.diff, low=res.low, high=res.high, p=res.p_value, exact=res.exact)
            lines.append(line)
    return pd.DataFrame(lines, columns=list(PAIRED_COLUMNS))


def _paired_index(paired: pd.DataFrame | None) -> dict[tuple[str, str, str, str], pd.Series]:
    """(preset, variant, tag, metric) -> that comparison's line."""
    if paired is None:
        return {}
    return {(line["preset"], line["variant"], line["tag"], line["metric"]): line for _, line in paired.iterrows()}


def _significant(line: pd.Series | None) -> bool:
    return line is not None and not math.isnan(line["p"]) and line["p"] < ALPHA


def _fmt(value: float, digits: int, suffix: str = "") -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}{suffix}"


MARK, LATEX_MARK = "*", r"$^*$"  # on a cell whose difference from the reference method has p < ALPHA
DELTA_METRIC = "gt_error"  # toy rows: the paired difference of the combined ground-truth error gets a column


def _half_width(low: float, high: float) -> float:
    return (high - low) / 2.0


def _fmt_stat(row: pd.Series, metric: Metric, marked: bool = False) -> str:
    """``mean ± half-width of the 95% CI`` (``mean`` alone for one run, ``—`` for none), then MARK if marked."""
    mean = row[metric.key]
    if mean is None or math.isnan(mean):
        return "—"
    low, high = row.get(f"{metric.key}_low", float("nan")), row.get(f"{metric.key}_high", float("nan"))
    interval = "" if math.isnan(low) or math.isnan(high) else f" ± {_half_width(low, high):.{metric.digits}f}"
    return _fmt(mean, metric.digits) + interval + (MARK if marked else "")


def _fmt_delta(line: pd.Series | None, digits: int) -> str:
    """A paired comparison as ``+0.0123 ± 0.0050 (p = 0.031)*`` (no ± for one pair), ``—`` without one."""
    if line is None or math.isnan(line["diff"]):
        return "—"
    interval = "" if math.isnan(line["low"]) else f" ± {_half_width(line['low'], line['high']):.{digits}f}"
    return f"{line['diff']:+.{digits}f}{interval} (p = {line['p']:.2g})" + (MARK if _significant(line) else "")


def _fmt_share(row: pd.Series, criterion: str, suffix: str, mark: str) -> str:
    """A user-study share, marked when its χ² test against 50/50 (eval.stats) has p < ALPHA."""
    p = row.get(f"{criterion}_p", float("nan"))
    return _fmt(row[criterion], 0, suffix) + (mark if not math.isnan(p) and p < ALPHA else "")


def _method_label(method: str) -> str:
    row_def = row_of(method)
    return row_def.label if row_def else method


def _runs_cell(row: pd.Series) -> str:
    if row["expected"] == 0:
        return "no runs"
    extra = [f"{int(row[s])} {s}" for s in (FAILED, UNFINISHED, MISSING) if row[s]]
    return f"{int(row[FINISHED])}/{int(row['expected'])}" + (f" ({', '.join(extra)})" if extra else "")


def _metric_columns(table: pd.DataFrame) -> list[Metric]:
    return [m for m in METRICS if m.key in table.columns]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest trailing part that no other key ends with (``loss_weight``)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if not any(other != key and (other == name or other.endswith("." + name)) for other in keys):
                break
        out[key] = name
    return out


def _config_header(table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(column names, headers) that tell the rows' configurations apart, besides the method."""
    columns, headers = [], []
    if "preset" in table and table["preset"].nunique() > 1:
        columns, headers = ["preset"], ["Preset"]
    if "tag" in table and (table["tag"] != DEFAULT_TAG).any():
        columns, headers = [*columns, "tag"], [*headers, "Config"]
    reserved = {"preset", "variant", "tag", "label", "prompt", "paper_clip", "expected", *STATUSES, *CRITERIA}
    keys = [c for c in table.columns if "." in c and c not in reserved]
    names = short_names(keys)
    return columns + keys, headers + [f"`{names[k]}`" for k in keys]


def _delta_metric(table: pd.DataFrame, paired: pd.DataFrame | None) -> Metric | None:
    """The metric of the extra Δ column: DELTA_METRIC when the table has it and some row was compared."""
    metric = next((m for m in _metric_columns(table) if m.key == DELTA_METRIC), None)
    has = paired is not None and bool((paired["metric"] == DELTA_METRIC).any())
    return metric if has else None


def _markdown_rows(table: pd.DataFrame, extra: list[str], study: bool,
                   paired: pd.DataFrame | None = None, method: str = REFERENCE_VARIANT) -> list[str]:
    metrics = _metric_columns(table)
    index = _paired_index(paired)
    delta = _delta_metric(table, paired)
    config_columns, config_headers = _config_header(table)
    header = ["Method", *config_headers, *extra] + [m.label + (" ↑" if m.higher_is_better else " ↓") for m in metrics]
    header += [f"Δ {delta.label} vs {_method_label(method)}"] if delta else []
    clip_paper = study and any(m.key == "clip" for m in metrics)
    header += (["CLIP (paper)"] if clip_paper else []) + (list(CRITERIA) if study else []) + ["Runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        config = (row["preset"], row["variant"], row["tag"])
        cells = [str(row["label"])] + [str(row[c]) for c in config_columns] + [str(row[c]) for c in extra]
        cells += [_fmt_stat(row, m, _significant(index.get((*config, m.key)))) for m in metrics]
        if delta:
            cells.append(_fmt_delta(index.get((*config, delta.key)), delta.digits))
        if clip_paper:
            cells.append(_fmt(row["paper_clip"], 1))
        cells += ([_fmt_share(row, c, "%", MARK) for c in CRITERIA] if study else []) + [_runs_cell(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paired_legend(paired: pd.DataFrame, method: str) -> list[str]:
    """What the markers mean, and which runs the paired tests left out."""
    lines = [f"{MARK}: differs from `{method}` (same preset and config) at p < {ALPHA}: two-sided paired sign-flip "
             f"permutation test (eval.paired; exact up to {EXACT_MAX_PAIRS} pairs, else {MONTE_CARLO_DRAWS} seeded "
             "random sign patterns) over runs matched on (prompt, seed); CLIP: over prompts, each prompt's mean over "
             "seeds. "
             f"Δ: row − `{method}`, mean ± 95% CI half-width over the pairs. Every comparison: table2_paired.csv."]
    enough = min_pairs_for_significance(ALPHA)
    few = paired[(paired["n_pairs"] > 0) & (paired["n_pairs"] < enough)]
    if len(few):
        lines.append(f"With fewer than {enough} pairs ({', '.join(sorted(set(few['row'])))}) no difference can reach "
                     f"p < {ALPHA}: the smallest exact p is 2/2^n ({2 / 2 ** (enough - 1):.4g} for {enough - 1} "
                     "pairs); add seeds or prompts.")
    noted = paired[paired["note"] != ""]
    if len(noted):
        lines += ["", "Paired comparisons, runs left out:", ""]
        for (row, note), group in noted.groupby(["row", "note"], sort=False):
            lines.append(f"- {row} ({', '.join(group['metric'])}): {note}")
    return lines


def to_markdown(table: pd.DataFrame, records: list[RunRecord], method: str,
                by_prompt: pd.DataFrame | None = None, paired: pd.DataFrame | None = None) -> str:
    """The table as Markdown (mean ± 95% CI half-width over each row's runs, MARK on a significant paired
    difference from ``method``), the legend, then per prompt, then every run not merged or not finished."""
    lines = _markdown_rows(table, [], study=True, paired=paired, method=method)
    lines += ["", f"Metrics: mean ± half-width of the 95% CI (Student t) over the row's finished runs (every prompt "
              f"and seed; one run: the mean alone); Runs: finished/expected. Human preference: % of votes for "
              f"`{method}` against the row's method (— : no answers; {MARK}: χ² test against 50/50 at p < {ALPHA}, "
              "eval.stats)."]
    if paired is not None and len(paired):
        lines += _paired_legend(paired, method)
    if by_prompt is not None and len(by_prompt) and by_prompt["prompt"].nunique() > 1:
        lines += ["", "Per prompt (mean ± 95% CI half-width over seeds; no paired tests):", ""]
        lines += _markdown_rows(by_prompt, ["prompt"], study=False)
    mismatched = [r for r in records if r.status == MISMATCHED]
    if mismatched:
        lines += ["", "Runs not merged (stored config and directory disagree):", ""]
        lines += [f"- {r.path}: **{MISMATCHED}** — {r.reason}" for r in mismatched]
    pending = [r for r in records if r.status not in (FINISHED, MISMATCHED)]
    if pending:
        lines += ["", "Runs not finished:", ""]
        lines += [f"- {r.variant} / {r.tag} / {r.prompt!r} / seed {r.seed}: **{r.status}** — {r.reason}"
                  + (f" ({r.path})" if r.path else "") for r in pending]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")


def _latex(text: str) -> str:
    return text.replace("—", "--").replace(" ± ", r" $\pm$ ").replace(MARK, LATEX_MARK)


def to_latex(table: pd.DataFrame, paired: pd.DataFrame | None = None, method: str = REFERENCE_VARIANT) -> str:
    """The table as a LaTeX tabular (booktabs), laid out as the paper's: metrics (mean ± 95% CI half-width, $^*$
    on a significant paired difference from ``method``), the toy rows' Δ column, then human preference.
    A suggested caption, saying what the numbers and markers are, heads it as LaTeX comments."""
    metrics = _metric_columns(table)
    index = _paired_index(paired)
    delta = _delta_metric(table, paired)
    n_cols = 1 + len(metrics) + (delta is not None) + len(CRITERIA)
    lines = ["% Caption: metrics are mean $\\pm$ half-width of the 95\\% CI (Student $t$) over each row's runs "
             r"(prompts and seeds).",
             f"% $^*$: differs from {_latex_escape(_method_label(method))} at $p < {ALPHA}$, two-sided paired "
             "sign-flip permutation test over runs matched on (prompt, seed) (CLIP: over prompts);",
             rf"% human preference: $\chi^2$ test against 50/50 at $p < {ALPHA}$. $\Delta$: row minus "
             f"{_latex_escape(_method_label(method))}, mean $\\pm$ 95\\% CI half-width over the pairs.",
             r"\begin{tabular}{l" + "c" * (n_cols - 1) + "}", r"\toprule"]
    headers = [m.label for m in metrics] + ([rf"$\Delta$ {delta.label}"] if delta else [])
    lines.append("Method & " + " & ".join(headers) + (" & " if headers else "")
                 + r"\multicolumn{4}{c}{Human Preference} & Overall \\")
    lines.append(" & " * (1 + len(headers)) + " & ".join(CRITERIA[:4]) + r" & \\")
    lines.append(r"\midrule")
    heading = rf"\multicolumn{{{n_cols}}}{{l}}{{\textit{{Ablation Study}}}} \\"
    for _, row in table.iterrows():
        row_def = row_of(str(row["variant"]))
        if heading and (row_def is not None or row["expected"] > 0):  # after study-only baselines (MAV3D)
            lines.append(heading)
            heading = ""
        name = row_def.latex if row_def else _latex_escape(str(row["label"]))
        if row["tag"] != DEFAULT_TAG:
            name += r" \texttt{" + _latex_escape(str(row["tag"])) + "}"
        config = (row["preset"], row["variant"], row["tag"])
        cells = [_latex(_fmt_stat(row, m, _significant(index.get((*config, m.key))))) for m in metrics]
        if delta:
            cells.append(_latex(_fmt_delta(index.get((*config, delta.key)), delta.digits)).replace("p = ", "$p$ = "))
        cells += [_latex(_fmt_share(row, c, r"\%", MARK)) for c in CRITERIA]
        lines.append(" & ".join([name, *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _row_label(row: pd.Series) -> str:
    return str(row["label"]) + ("" if row["tag"] == DEFAULT_TAG else f"\n{row['tag']}")


def error_bars(table: pd.DataFrame, metric: Metric) -> list[tuple[int, float, float]]:
    """(bar index, length below the mean, length above) of each row's 95% CI whisker; only rows with n >= 2 runs
    (one run has no interval, and drawing none says so)."""
    out = []
    for i, (_, row) in enumerate(table.iterrows()):
        mean, low, high = row[metric.key], row[f"{metric.key}_low"], row[f"{metric.key}_high"]
        if row[f"{metric.key}_n"] >= 2 and not (math.isnan(low) or math.isnan(high)):
            # Clamped: equal values give low == mean == high up to a rounding error.
            out.append((i, max(mean - low, 0.0), max(high - mean, 0.0)))
    return out


def plot(table: pd.DataFrame, path: Path) -> Path:
    """Bar plot: one panel per metric, one bar per row (mean over its runs, whiskers: 95% CI where n >= 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metric_columns(table)
    panels = metrics or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.6), squeeze=False)
    labels = [_row_label(row) for _, row in table.iterrows()]
    for ax, metric in zip(axes[0], panels, strict=True):
        if metric is None:
            ax.text(0.5, 0.5, "no finished run has metrics", ha="center", va="center")
            ax.set_axis_off()
            continue
        means = [float(v) for v in table[metric.key]]
        x = range(len(labels))
        ax.bar(x, [0.0 if math.isnan(m) else m for m in means], color="tab:blue")
        bars = error_bars(table, metric)
        if bars:
            at, below, above = zip(*bars, strict=True)
            ax.errorbar(at, [means[i] for i in at], yerr=[below, above], fmt="none", ecolor="black", capsize=3)
        for i, mean in enumerate(means):
            if math.isnan(mean):
                ax.text(i, 0.0, "no runs", rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")
        ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric.label + (" (higher is better)" if metric.higher_is_better else " (lower is better)"),
                     fontsize=9)
    fig.suptitle("mean over runs; whiskers: 95% CI (Student t), only where n ≥ 2", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path


def runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One line per run: configuration, swept settings, status, reason, path, metrics."""
    keys = [m.key for m in METRICS if any(m.key in r.metrics for r in records)]
    swept = swept_keys(records)
    return pd.DataFrame([{"preset": r.preset, "variant": r.variant, "tag": r.tag, "prompt": r.prompt, "seed": r.seed,
                          **{k: _cell(r.settings.get(k)) for k in swept},
                          "status": r.status, "reason": r.reason, "path": "" if r.path is None else str(r.path),
                          **{k: r.metrics.get(k, float("nan")) for k in keys}} for r in records])


RUNS_CSV_COLUMNS = ("preset", "variant", "tag", "prompt", "seed", "status", "reason", "path")  # runs_frame's own


def records_from_runs_csv(path: Path) -> list[RunRecord]:
    """The runs an earlier collection listed in its ``runs.csv`` (runs_frame's format), as records: for runs whose
    directories are gone (a purged scratch disk, another machine). Each keeps the configuration, status and
    metrics that collection found; its settings are the swept columns it wrote, and a setting counts as swept
    where the run's tag names it. Mismatched lines (never merged) are skipped. Raises ValueError naming a
    missing column or a bad status."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--runs-csv {path} does not exist (a runs.csv written by python -m ablations.collect)")
    # Only an empty cell is missing: a prompt or setting that reads "NA" or "null" stays text.
    text = ("preset", "variant", "tag", "prompt", "status", "reason", "path")
    frame = pd.read_csv(path, dtype=dict.fromkeys(text, str), keep_default_na=False, na_values=[""])
    missing = [c for c in RUNS_CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"--runs-csv {path} has no column {missing[0]!r}: pass a runs.csv that python -m "
                         f"ablations.collect wrote (columns {', '.join(RUNS_CSV_COLUMNS)}, swept settings, metrics)")
    frame[list(text)] = frame[list(text)].fillna("")
    metric_keys = [m.key for m in METRICS if m.key in frame.columns]
    setting_keys = [c for c in frame.columns if c not in RUNS_CSV_COLUMNS and c not in metric_keys]
    records = []
    defaults: dict[tuple[str, str], dict[str, Any] | str] = {}  # (preset, variant) -> today's settings, or why none
    for line, row in enumerate(frame.to_dict("records"), start=2):
        if row["status"] == MISMATCHED:
            continue
        if row["status"] not in STATUSES:
            raise ValueError(f"--runs-csv {path} line {line}: status {row['status']!r} is not one of "
                             f"{', '.join(STATUSES)}")
        settings = {key: row[key] for key in setting_keys}
        names = set(row["tag"].split(",")) if row["tag"] != DEFAULT_TAG else set()
        record = RunRecord(
            row["variant"], row["prompt"], int(row["seed"]), row["status"], Path(row["path"]) if row["path"] else None,
            row["reason"], preset=row["preset"], tag=row["tag"], settings=settings,
            swept={key: value for key, value in settings.items() if any(n.startswith(f"{key}=") for n in names)},
            metrics={key: float(row[key]) for key in metric_keys if not math.isnan(float(row[key]))})
        if (record.preset, record.variant) not in defaults:
            defaults[record.preset, record.variant] = _today(record.preset, record.variant)
        stale = _stale_tag(record, defaults[record.preset, record.variant])
        if stale:
            record.status, record.reason = MISMATCHED, f"{path} line {line}: {stale}"
        records.append(record)
    return records


def _same_setting(written: Any, value: Any) -> bool:
    """Whether a runs.csv cell (as pandas read it) holds the config value ``value``."""
    if written is None or (isinstance(written, float) and math.isnan(written)):
        return value is None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(written, (int, float)):
        return float(written) == float(value)
    return str(written) == str(_cell(value))


def _today(preset: str, variant: str) -> dict[str, Any] | str:
    """Every setting of ``preset`` + ``variant`` as the config tree has them now (flat_config), or why none."""
    try:
        return flat_config(base_config(preset, variant))
    except (ValueError, HydraException, OmegaConfBaseException) as err:
        return f"preset {preset!r} / variant {variant!r} no longer composes ({err})"


def _stale_tag(record: RunRecord, today: dict[str, Any] | str) -> str:
    """Why a runs.csv line's tag no longer names its configuration under ``today``'s settings of its preset and
    variant (_today; a default changed since: a setting its tag leaves out is not today's default, or one it names
    is), or "" when it does. Only the settings that collection wrote as columns can be checked."""
    if isinstance(today, str):
        return today
    for key, written in record.settings.items():
        if key not in today:
            return f"{key} is no setting of today's config"
        named, default = key in record.swept, _same_setting(written, today[key])
        if named == default:
            what = "names" if named else "leaves out"
            return (f"its tag {record.tag!r} {what} {key}={written}, but today's default of {record.preset}/"
                    f"{record.variant} is {_cell(today[key])}: the defaults changed since that collection, so the "
                    "line is not merged (collect its run directory again, or pass the matching code's runs.csv)")
    return ""


def merge_runs(records: list[RunRecord], earlier: list[RunRecord]) -> list[RunRecord]:
    """``records`` plus the ``earlier`` runs (records_from_runs_csv) that none of them, nor an earlier line, is:
    a run is its (preset, variant, tag, prompt, seed); a run found on disk wins over a line of a runs.csv."""
    def key(r: RunRecord) -> tuple[Any, ...]:
        return (*r.configuration, r.prompt, r.seed)

    seen = {key(r) for r in records if r.status != MISMATCHED}
    merged = list(records)
    for record in earlier:
        if key(record) not in seen:
            if record.status != MISMATCHED:  # reported, never merged: it stands in for no run
                seen.add(key(record))
            merged.append(record)
    return merged


@dataclass
class CollectResult:
    """What collect produced."""

    table: pd.DataFrame  # one row per configuration, pooled over prompts and seeds (table2.csv)
    by_prompt: pd.DataFrame  # one row per configuration and prompt (table2_by_prompt.csv)
    paired: pd.DataFrame  # one line per (configuration, metric) compared with the method (table2_paired.csv)
    records: list[RunRecord]  # every run, every status (runs.csv)
    files: dict[str, Path]  # "csv", "by_prompt", "paired", "md", "tex", "png", "runs" -> written file


def collect(root: Path | None, options: CollectOptions | None = None) -> CollectResult:
    """Scan ``root``, compute (or reuse) metrics, merge the runs of ``options.runs_csv`` and the user study, and
    write the table files. ``root`` None: the runs.csv files alone (``options.out_dir`` is then required)."""
    options = options or CollectOptions()
    if root is None and (not options.runs_csv or options.out_dir is None):
        raise ValueError("without OUTPUT_DIR, pass --runs-csv (an earlier runs.csv) and --out (where to write)")
    root = Path(root) if root is not None else None
    if options.userstudy is not None and not Path(options.userstudy).is_file():
        raise FileNotFoundError(f"user-study answers {options.userstudy} do not exist")
    earlier = [record for csv in options.runs_csv for record in records_from_runs_csv(csv)]
    records = find_runs(root) if root is not None else []
    clip = _ClipScorers(options.clip_pretrained, options.clip_device)
    for record in records:
        if record.status == FINISHED:
            ensure_metrics(record, options, clip)
    records = merge_runs(records, earlier)
    if not records:
        raise ValueError(f"no runs in {', '.join(str(c) for c in options.runs_csv)}")
    answers = options.userstudy
    if answers is None and root is not None and (root / USERSTUDY_DEFAULT).is_file():
        answers = root / USERSTUDY_DEFAULT
    shares = userstudy_shares(Path(answers), options.method) if answers is not None else None
    table = build_table(records, shares, options.method)
    by_prompt = build_prompt_table(records)
    paired = paired_comparisons(records, options.method)
    out = Path(options.out_dir or root)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "table2.csv", "by_prompt": out / "table2_by_prompt.csv",
             "paired": out / "table2_paired.csv", "md": out / "table2.md", "tex": out / "table2.tex",
             "png": out / "table2.png", "runs": out / "runs.csv"}
    write_text_atomic(files["csv"], table.to_csv(index=False))
    write_text_atomic(files["by_prompt"], by_prompt.to_csv(index=False))
    write_text_atomic(files["paired"], paired.to_csv(index=False))
    write_text_atomic(files["runs"], runs_frame(records).to_csv(index=False))
    write_text_atomic(files["md"], to_markdown(table, records, options.method, by_prompt, paired))
    write_text_atomic(files["tex"], to_latex(table, paired, options.method))
    plot(table, files["png"])
    return CollectResult(table, by_prompt, paired, records, files)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablations.collect", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, nargs="?", default=None,
                        help="Hydra multirun directory (or a folder of runs); optional with --runs-csv and --out")
    parser.add_argument("--runs-csv", type=Path, action="append", default=[],
                        help="an earlier collection's runs.csv whose runs to merge (their directories may be gone); "
                             "repeatable; a run found in OUTPUT_DIR wins")
    parser.add_argument("--out", type=Path, default=None, help="where to write the tables (default OUTPUT_DIR)")
    parser.add_argument("--recompute", action="store_true", help="recompute metrics cached in metrics.json")
    clip_group = parser.add_mutually_exclusive_group()
    clip_group.add_argument("--clip", dest="clip", action="store_const", const=True, default=None,
                            help="CLIP-score toy-world runs too (default: real runs only)")
    clip_group.add_argument("--no-clip", dest="clip", action="store_const", const=False,
                            help="never compute CLIP scores")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip tag or checkpoint file")
    parser.add_argument("--clip-device", default="cpu")
    parser.add_argument("--userstudy", type=Path, default=None,
                        help=f"user-study answers CSV (default OUTPUT_DIR/{USERSTUDY_DEFAULT} when present)")
    parser.add_argument("--method", default=REFERENCE_VARIANT,
                        help="method whose preference shares are shown and that every row is paired with")
    args = parser.parse_args(argv)
    options = CollectOptions(out_dir=args.out, recompute=args.recompute, clip=args.clip,
                             clip_pretrained=args.clip_pretrained, clip_device=args.clip_device,
                             userstudy=args.userstudy, method=args.method, runs_csv=tuple(args.runs_csv))
    try:
        result = collect(args.output_dir, options)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.files["md"].read_text(), end="")
    counts = {s: sum(r.status == s for r in result.records) for s in (*STATUSES, MISMATCHED)}
    print(f"\n{len(result.records)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
