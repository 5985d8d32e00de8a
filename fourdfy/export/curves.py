"""Training curves from a run's ``log.jsonl``: losses per update kind and learning rates per parameter group.

``log.jsonl`` holds one JSON object per logged iteration (written by the trainer) with the keys
iteration, stage, kind, loss, loss/<name>, <kind>/<stat>, lr/<group>; non-finite numbers are stored as
strings ("nan", "inf"). After a resume, iterations between the last checkpoint and the kill are logged
twice: the later line wins. A line cut short by a kill is skipped.

Plotted with matplotlib's object API (no pyplot state, the Agg canvas), so it is safe inside training.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourdfy.export.video import atomic_output

LOG_FILE = "log.jsonl"
_DASHES = ("-", "--", ":", "-.")


@dataclass
class Curves:
    """Logged scalars, one entry per distinct iteration, sorted by iteration."""

    iterations: list[int] = field(default_factory=list)  # [N]
    stages: list[int] = field(default_factory=list)  # [N] stage (1, 2, 3) of each iteration
    kinds: list[str] = field(default_factory=list)  # [N] update kind ("3d", "img", "vid")
    loss: list[float] = field(default_factory=list)  # [N] total loss (nan where it was not finite)
    components: dict[str, list[float]] = field(default_factory=dict)  # loss/<name> -> [N] (nan where absent)
    lrs: dict[str, list[float]] = field(default_factory=dict)  # lr/<group> -> [N] (nan where absent)

    def loss_by_kind(self) -> dict[str, tuple[list[int], list[float]]]:
        """Update kind -> (iterations, total losses) of the iterations of that kind."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for it, kind, loss in zip(self.iterations, self.kinds, self.loss, strict=True):
            its, losses = out.setdefault(kind, ([], []))
            its.append(it)
            losses.append(loss)
        return out


def _number(value: Any) -> float:
    """A logged scalar as a float: numbers as they are, "nan"/"inf" strings as their floats."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_log(path: Path) -> Curves:
    """Parse ``log.jsonl`` (see the module docstring). Raises FileNotFoundError when it does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: no training log to plot")
    records: dict[int, dict[str, Any]] = {}
    skipped = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            iteration = int(record["iteration"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            skipped += 1
            continue
        records[iteration] = record  # a later line for the same iteration (after a resume) wins
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} unreadable line(s) (a write cut short by a kill?)",
                      stacklevel=2)
    curves = Curves()
    ordered = [records[i] for i in sorted(records)]
    component_keys = sorted({k for r in ordered for k in r if k.startswith("loss/")})
    lr_keys = sorted({k for r in ordered for k in r if k.startswith("lr/")})
    for r in ordered:
        curves.iterations.append(int(r["iteration"]))
        curves.stages.append(int(r.get("stage", 0)))
        curves.kinds.append(str(r.get("kind", "?")))
        curves.loss.append(_number(r.get("loss")))
    for key in component_keys:
        curves.components[key.removeprefix("loss/")] = [_number(r.get(key)) for r in ordered]
    for key in lr_keys:
        curves.lrs[key.removeprefix("lr/")] = [_number(r.get(key)) for r in ordered]
    return curves


def _positive(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0


def plot_curves(
    curves: Curves, path: Path, title: str | None = None, stage_starts: list[int] | None = None
) -> Path:
    """Write a PNG with three panels (total loss per update kind; loss terms; learning rate per group),
    atomically. Stage starts (e.g. from the schedule's stage lengths) are drawn as dotted lines; without
    them, where the logged stage changes. Raises ValueError when ``curves`` is empty."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves.iterations:
        raise ValueError("the training log holds no logged iteration yet: nothing to plot")
    fig = Figure(figsize=(7.0, 8.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_terms, ax_lr = fig.subplots(3, 1, sharex=True)
    for kind, (its, losses) in curves.loss_by_kind().items():
        ax_loss.plot(its, losses, marker="o", markersize=2.5, linewidth=0.8, label=f"{kind} updates")
    ax_loss.set_ylabel("total loss")
    ax_loss.set_yscale("log" if _positive(curves.loss) else "linear")
    for name, values in curves.components.items():
        ax_terms.plot(curves.iterations, values, linewidth=0.8, label=name)
    ax_terms.set_ylabel("loss terms")
    ax_terms.set_yscale("log" if all(_positive(v) for v in curves.components.values()) else "linear")
    for i, (group, values) in enumerate(curves.lrs.items()):
        # Groups often share a rate (static = dynamic = 0.01): dashes keep overlapping lines visible.
        ax_lr.step(curves.iterations, values, where="post", linewidth=1.0, label=group,
                   linestyle=_DASHES[i % len(_DASHES)])
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_yscale("log" if all(_positive(v) for v in curves.lrs.values()) else "linear")
    ax_lr.set_xlabel("iteration")
    if stage_starts is None:  # the first logged iteration of each new stage (log_every may blur it)
        stage_starts = [it for prev, stage, it in zip(curves.stages, curves.stages[1:], curves.iterations[1:],
                                                      strict=False) if stage != prev]
    boundaries = [it for it in stage_starts if curves.iterations[0] < it <= curves.iterations[-1]]
    for ax in (ax_loss, ax_terms, ax_lr):
        for it in boundaries:
            ax.axvline(it, color="gray", linestyle=":", linewidth=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_output(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def write_curves(
    run_dir: Path, out: Path | None = None, title: str | None = None, stage_lengths: list[int] | None = None
) -> Path:
    """curves.png of ``run_dir/log.jsonl``, written to ``out`` (default run_dir/renders/curves.png).

    stage_lengths: the schedule's iterations per stage, for exact stage boundaries.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "renders" / "curves.png"
    starts = [sum(stage_lengths[: i + 1]) for i in range(len(stage_lengths) - 1)] if stage_lengths else None
    return plot_curves(read_log(run_dir / LOG_FILE), out, title, starts)


def curves_callback(
    every: int, title: str | None = None, stage_lengths: list[int] | None = None
) -> Callable[[Any, int], None]:
    """A trainer callback (``cb(trainer, iteration)``) that redraws run_dir/renders/curves.png every
    ``every`` iterations, so a long run's progress can be watched while it trains."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")

    def callback(trainer: Any, iteration: int) -> None:
        if (iteration + 1) % every == 0 and (Path(trainer.run_dir) / LOG_FILE).exists():
            try:
                write_curves(trainer.run_dir, title=title, stage_lengths=stage_lengths)
            except ValueError:  # nothing logged yet
                pass

    return callback
